"""The core side: health probes to the backends and requests relayed to them (sans-I/O).

``BackendRelay`` is a transaction user of the core's client transactions. It sends OPTIONS
probes (issue 3 item 7) and forwards REGISTERs to the backend that the balancer picks for
the AOR, as a stateful proxy (RFC 3261 16) that adds a Path naming the client's flow
(RFC 3327, RFC 5626 5.2), and relays the answers back to the client's server transaction.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from sbc.features.balancer import BackendDown, BackendState, BackendUp, Balancer, HealthChange
from sbc.features.registrar import FlowTokens, aor_of
from sbc.sip.flow import Address, Flow, format_host
from sbc.sip.message import Request, Response
from sbc.sip.transaction import (
    ClientTransaction,
    Output,
    ResponseReceived,
    ServerTransaction,
    TransactionLayer,
    new_branch,
)

log = logging.getLogger("sbc.relay")

# (server transaction, status, reason or None, extra headers, now) -> outputs
Respond = Callable[
    [ServerTransaction, int, str | None, tuple[tuple[str, str], ...], float], list[Output]
]


@dataclass(slots=True)
class _Probe:
    backend: BackendState
    sent_at: float
    deadline: float  # no answer by then: a failed probe (not after timer F's 32 s)


@dataclass(slots=True)
class _Relayed:
    server_tx: ServerTransaction
    backend: BackendState


class BackendRelay:
    def __init__(
        self,
        *,
        transactions: TransactionLayer,
        balancer: Balancer,
        respond: Respond,
        server_header: str,
        tokens: FlowTokens | None = None,
    ) -> None:
        self.transactions = transactions
        self.balancer = balancer
        self.respond = respond
        self.server_header = server_header
        self.tokens = tokens or FlowTokens()
        self._sockets: dict[tuple[str, bool], Address] = {}  # (transport, ipv6) -> local
        self._work: dict[ClientTransaction, _Probe | _Relayed] = {}
        self.events: list[HealthChange] = []  # backend up/down transitions, for the owner

    def add_core_socket(self, transport: str, address: Address) -> None:
        """A core-side listener the SBC sends from (the I/O layer reports what it bound)."""
        self._sockets.setdefault((transport, ":" in address[0]), address)

    def flow_to(self, backend: BackendState) -> Flow | None:
        """The flow to a backend: a core-side UDP socket of the backend's address family.

        TCP/TLS to backends needs outgoing connections, which the I/O layer does not open yet.
        """
        host, port = backend.address
        local = self._sockets.get((backend.transport, ":" in host))
        if local is None or backend.transport != "udp":
            return None
        return Flow(backend.transport, local, (host, port))

    # -- timers: health probes (issue 3 item 7) ---------------------------------------------
    def next_deadline(self) -> float | None:
        if not self._sockets:
            return None
        deadlines = [w.deadline for w in self._work.values() if isinstance(w, _Probe)]
        nxt = self.balancer.next_deadline()
        if nxt is not None:
            deadlines.append(nxt)
        return min(deadlines) if deadlines else None

    def handle_timer(self, now: float) -> list[Output]:
        out: list[Output] = []
        if not self._sockets:
            return out
        # A probe unanswered within probe_interval failed: detection must take about
        # probe_interval x probe_failures, not probe_failures x timer F (issue 3 item 7).
        late = [
            (tx, w) for tx, w in self._work.items() if isinstance(w, _Probe) and w.deadline <= now
        ]
        for tx, work in late:
            del self._work[tx]
            out += self.transactions.terminate(tx)
            self._health(self.balancer.probe_result(
                work.backend, ok=False, now=now, reason="probe timed out"))  # fmt: skip
        for backend in self.balancer.probes_due(now):
            flow = self.flow_to(backend)
            if flow is None:
                self._health(self.balancer.probe_result(
                    backend, ok=False, now=now, reason="no socket towards it"))  # fmt: skip
                continue
            tx, sent = self.transactions.send_request(
                self._probe_request(backend, flow), dest=flow, reliable=flow.reliable, now=now
            )
            timeout = min(self.balancer.policy.probe_interval, self.transactions.timers.timer_f)
            self._work[tx] = _Probe(backend, now, now + timeout)
            out += sent
        return out

    def _probe_request(self, backend: BackendState, flow: Flow) -> Request:
        host, port = backend.address
        target = f"sip:{format_host(host)}:{port}"
        local = f"{format_host(flow.local[0])}:{flow.local[1]}"
        req = Request("OPTIONS", target)
        req.add("Via", f"SIP/2.0/{flow.transport.upper()} {local};branch={new_branch()};rport")
        req.add("Max-Forwards", "70")
        req.add("From", f"<sip:probe@{local}>;tag={secrets.token_hex(6)}")
        req.add("To", f"<{target}>")
        req.add("Call-ID", f"{secrets.token_hex(10)}@{format_host(flow.local[0])}")
        req.add("CSeq", "1 OPTIONS")
        req.add("User-Agent", self.server_header)
        req.add("Content-Length", "0")
        return req

    def _health(self, change: HealthChange | None) -> None:
        if change is None:
            return
        self.events.append(change)
        if isinstance(change, BackendDown):
            log.warning("backend down: %s", change.reason, extra={"backend": change.backend.name})
        elif isinstance(change, BackendUp):
            log.info("backend up", extra={"backend": change.backend.name})

    # -- REGISTER relay (issue 3 item 1) -----------------------------------------------------
    def relay_register(
        self, server_tx: ServerTransaction, req: Request, client: Flow, now: float
    ) -> list[Output]:
        to = req.to
        aor = aor_of(to) if to is not None else None
        if aor is None:
            return self.respond(server_tx, 400, "To Is Not A SIP Address-of-Record", (), now)
        backend = self.balancer.pick_for_aor(aor)
        flow = self.flow_to(backend) if backend is not None else None
        if backend is None or flow is None:
            # RFC 3261 21.5.4: no backend can take it now; the client retries later.
            retry = (("Retry-After", "10"),)
            return self.respond(server_tx, 503, "No Backend Available", retry, now)
        fwd = self._forwarded(req, flow, client)
        tx, out = self.transactions.send_request(fwd, dest=flow, reliable=flow.reliable, now=now)
        self._work[tx] = _Relayed(server_tx, backend)
        return out

    def _forwarded(self, req: Request, flow: Flow, client: Flow) -> Request:
        """RFC 3261 16.6: copy, Max-Forwards - 1, our Via on top; RFC 3327 4.1: our Path."""
        fwd = req.copy()
        mf = req.max_forwards
        fwd.set("Max-Forwards", str(70 if mf is None else mf - 1))
        local = f"{format_host(flow.local[0])}:{flow.local[1]}"
        fwd.add("Via", f"SIP/2.0/{flow.transport.upper()} {local};branch={new_branch()};rport",
                first=True)  # fmt: skip
        # The Path URI's user part is the client's flow token (RFC 5626 5.2); ;lr makes the
        # registrar put it in a Route that comes back here (RFC 3327 5.3).
        fwd.add("Path", f"<sip:{self.tokens.encode(client)}@{local};lr>", first=True)
        return fwd

    # -- transaction events -----------------------------------------------------------------
    def on_response(self, event: ResponseReceived, now: float) -> list[Output]:
        work = self._work.get(event.transaction)
        resp = event.response
        if work is None or (resp.status < 200 and isinstance(work, _Probe)):
            return []
        if isinstance(work, _Probe):
            del self._work[event.transaction]
            ok = self.balancer.is_alive_reply(resp.status)
            self._health(self.balancer.probe_result(
                work.backend, ok=ok, now=now, rtt=now - work.sent_at,
                reason=f"probe answered {resp.status}"))  # fmt: skip
            return []
        if resp.status == 100:
            return []  # RFC 3261 16.7 step 5: a 100 Trying is not forwarded
        if resp.status >= 200:
            del self._work[event.transaction]
        return work.server_tx.respond(self._relayed_response(resp), now)

    @staticmethod
    def _relayed_response(resp: Response) -> Response:
        """RFC 3261 16.7 step 3: remove our Via. The Path the registrar echoes names the SBC's
        core side: clients do not need it, so it is not passed on."""
        out = resp.copy()
        out.pop_first_value("via")
        out.remove("path")
        return out

    def on_timeout(self, tx: ClientTransaction, now: float) -> list[Output]:
        work = self._work.pop(tx, None)
        if isinstance(work, _Probe):
            self._health(self.balancer.probe_result(
                work.backend, ok=False, now=now, reason="probe timed out"))  # fmt: skip
            return []
        if isinstance(work, _Relayed):
            # Issue 3 item 7: a timeout towards a backend counts as a failure; RFC 3261 16.7
            # step 6 / 16.8: the proxy answers 408 itself.
            self._health(self.balancer.request_failed(
                work.backend, now=now, reason=f"{tx.request.method} timed out"))  # fmt: skip
            return self.respond(work.server_tx, 408, "Backend Timeout", (), now)
        return []

    def forget(self, tx: ClientTransaction) -> None:
        self._work.pop(tx, None)
