"""The core side: the SBC's core-side sockets, the backends and their health (sans-I/O).

``Backends`` knows the core-side listeners the I/O layer bound and the flow that reaches a
backend or peer from them, names the SBC's own address on a flow (Via, Contact), holds the
``Balancer`` (which backend takes an AOR or a dialog; up/down state) and probes every
backend with OPTIONS, as the transaction user of those client transactions. A request
towards a backend that timed out counts as a failure (``report_failure``); a backend that
goes down is reported to ``on_down`` (the registration proxy recovers its registrations).
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from sbc.deadlines import Deadlines
from sbc.features.balancer import BackendState, BackendUp, Balancer, HealthChange
from sbc.sip.flow import Address, Flow, format_address, format_host
from sbc.sip.message import Request
from sbc.sip.transaction import (
    ClientTransaction,
    Output,
    ResponseReceived,
    TransactionLayer,
    new_branch,
)

log = logging.getLogger("sbc.backends")


@dataclass(slots=True)
class _Probe:
    backend: BackendState
    sent_at: float
    deadline: float  # no answer by then: a failed probe (not after timer F's 32 s)


class Backends:
    def __init__(
        self,
        *,
        transactions: TransactionLayer,
        balancer: Balancer,
        server_header: str,
        request_timeout: float = 4.0,
        public_address: str | None = None,
    ) -> None:
        self.transactions = transactions
        self.balancer = balancer
        self.server_header = server_header
        # A request to a backend unanswered this long fails over to the next backend.
        self.request_timeout = request_timeout
        self.public_address = public_address
        self._sockets: dict[tuple[str, bool], Address] = {}  # (transport, ipv6) -> local
        self._core_locals: set[Address] = set()  # every core-side listener
        # The same by kind: (True for UDP, address); TCP and TLS share the TCP port space,
        # which is not UDP's (a client's UDP port may equal a TCP listener's).
        self._core_kinds: set[tuple[bool, Address]] = set()
        self._probes: dict[ClientTransaction, _Probe] = {}
        self._deadlines: Deadlines[ClientTransaction] = Deadlines()  # probes unanswered
        self.events: list[HealthChange] = []  # backend up/down transitions, for the owner
        # A backend went down: what its owner sends about it (registration recovery).
        self.on_down: Callable[[BackendState, float], list[Output]] | None = None

    # -- the core-side sockets ---------------------------------------------------------------
    def add_core_socket(self, transport: str, address: Address) -> None:
        """A core-side listener the SBC sends from (the I/O layer reports what it bound)."""
        self._sockets.setdefault((transport, ":" in address[0]), address)
        self._core_locals.add(address)
        self._core_kinds.add((transport == "udp", address))

    @property
    def listening(self) -> bool:
        """Whether the I/O layer has reported a core-side listener (until then no timer of
        the core side or of registrations runs)."""
        return bool(self._sockets)

    def sends_from(self, host: str, port: int) -> bool:
        """Whether ``host:port`` (lower-case) is a core-side socket the SBC sends from: the
        address of its Via and Path towards the backends."""
        return (host, port) in {(h.lower(), p) for h, p in self._sockets.values()}

    def is_listener(self, address: Address, transport: str) -> bool:
        """Whether ``address`` over ``transport`` is exactly one of our core-side listeners,
        as the SBC itself writes it (a flow it made towards itself, ``own_core_address``): a
        set lookup, for every message sent."""
        return (transport == "udp", address) in self._core_kinds

    def own_core_address(self, address: Address) -> Address | None:
        """The core-side listener at ``address`` (host compared by value, so an IPv6
        address written another way still matches), or None if it is not this SBC's."""
        if address in self._core_locals:
            return address
        host, port = address
        try:
            wanted = ipaddress.ip_address(host)
        except ValueError:
            return None
        for local in self._core_locals:
            if local[1] == port and ipaddress.ip_address(local[0]) == wanted:
                return local
        return None

    def advertised(self, flow: Flow) -> str:
        """host:port the SBC names itself by on ``flow`` (Via, Contact): ``[sbc]
        public_address`` towards clients when configured, else the listener's address."""
        if self.public_address is not None and flow.local not in self._core_locals:
            return format_address((self.public_address, flow.local[1]))
        return format_address(flow.local)

    def flow_to(self, backend: BackendState) -> Flow | None:
        return self.flow_for(backend.transport, backend.address)

    def flow_for(self, transport: str, address: Address) -> Flow | None:
        """The flow to a backend or peer: from a core-side listener of its transport and
        address family (named in our Via). Over TCP and TLS the flow has no connection yet
        (conn_id 0): the I/O layer opens one (TLS with the core side's certificate) and
        reuses it."""
        local = self._sockets.get((transport, ":" in address[0]))
        if local is None:
            return None
        return Flow(transport, local, address)

    def is_core_flow(self, flow: Flow) -> bool:
        """From a core-side listener, or over a connection the SBC opened to a backend."""
        if flow.local in self._sockets.values():
            return True
        host, port = flow.remote
        return flow.reliable and self.balancer.by_address(host, port) is not None

    def own_request(
        self,
        method: str,
        target: str,
        flow: Flow,
        *,
        from_uri: str,
        to_uri: str | None = None,
        call_id: str | None = None,
        cseq: int = 1,
    ) -> Request:
        """A request the SBC originates on ``flow`` (RFC 3261 8.1.1: the mandatory headers;
        a Via with a fresh branch asking for rport, RFC 3581)."""
        local = self.advertised(flow)
        req = Request(method, target)
        req.add("Via", f"SIP/2.0/{flow.transport.upper()} {local};branch={new_branch()};rport")
        req.add("Max-Forwards", "70")
        req.add("From", f"<{from_uri}>;tag={secrets.token_hex(6)}")
        req.add("To", f"<{to_uri or target}>")
        req.add("Call-ID", call_id or f"{secrets.token_hex(10)}@{format_host(flow.local[0])}")
        req.add("CSeq", f"{cseq} {method}")
        req.add("User-Agent", self.server_header)
        return req

    # -- health ------------------------------------------------------------------------------
    def report_failure(self, backend: BackendState, reason: str, now: float) -> list[Output]:
        """A request towards ``backend`` timed out: one failure."""
        return self._health(self.balancer.request_failed(backend, now=now, reason=reason), now)

    def _health(self, change: HealthChange | None, now: float) -> list[Output]:
        """Log a backend going down or up; a backend going down goes to ``on_down``."""
        if change is None:
            return []
        self.events.append(change)
        if isinstance(change, BackendUp):
            log.info("backend up", extra={"backend": change.backend.name})
            return []
        log.warning("backend down: %s", change.reason, extra={"backend": change.backend.name})
        return self.on_down(change.backend, now) if self.on_down is not None else []

    # -- timers: health probes ---------------------------------------------------------------
    def next_deadline(self) -> float | None:
        if not self._sockets:
            return None
        deadlines = [
            d
            for d in (self._deadlines.next_deadline(), self.balancer.next_deadline())
            if d is not None
        ]
        return min(deadlines) if deadlines else None

    def handle_timer(self, now: float) -> list[Output]:
        out: list[Output] = []
        if not self._sockets:
            return out
        # A probe unanswered within its interval failed (so detection takes about
        # interval x failures, not failures x timer F).
        while (tx := self._deadlines.pop_due(now)) is not None:
            probe = self._probes.pop(tx)
            out += self.transactions.terminate(tx)
            out += self._health(self.balancer.probe_result(
                probe.backend, ok=False, now=now, reason="probe timed out"), now)  # fmt: skip
        for backend in self.balancer.probes_due(now):
            flow = self.flow_to(backend)
            if flow is None:
                out += self._health(self.balancer.probe_result(
                    backend, ok=False, now=now, reason="no socket towards it"), now)  # fmt: skip
                continue
            tx, sent = self.transactions.send_request(
                self._probe_request(backend, flow), dest=flow, reliable=flow.reliable, now=now
            )
            log.debug("probe sent", extra={"backend": backend.name})
            timeout = min(self.balancer.policy.probe_interval, self.transactions.timers.timer_f)
            self._probes[tx] = _Probe(backend, now, now + timeout)
            self._deadlines.set(tx, now + timeout)
            out += sent
        return out

    def _probe_request(self, backend: BackendState, flow: Flow) -> Request:
        target = f"sip:{format_address(backend.address)}"
        req = self.own_request(
            "OPTIONS", target, flow, from_uri=f"sip:probe@{format_address(flow.local)}"
        )
        req.add("Content-Length", "0")
        return req

    # -- transaction events of the probes ----------------------------------------------------
    def owns(self, tx: ClientTransaction) -> bool:
        return tx in self._probes

    def on_response(self, event: ResponseReceived, now: float) -> list[Output]:
        resp = event.response
        probe = self._probes.get(event.transaction)
        if probe is None or resp.status < 200:
            return []
        self.forget(event.transaction)
        ok = self.balancer.is_alive_reply(resp.status)
        log.debug("probe answered %d", resp.status, extra={"backend": probe.backend.name})
        return self._health(self.balancer.probe_result(
            probe.backend, ok=ok, now=now, rtt=now - probe.sent_at,
            reason=f"probe answered {resp.status}"), now)  # fmt: skip

    def on_timeout(self, tx: ClientTransaction, now: float) -> list[Output]:
        probe = self._probes.pop(tx, None)
        self._deadlines.cancel(tx)
        if probe is None:
            return []
        return self._health(self.balancer.probe_result(
            probe.backend, ok=False, now=now, reason="probe timed out"), now)  # fmt: skip

    def forget(self, tx: ClientTransaction) -> None:
        self._deadlines.cancel(tx)
        self._probes.pop(tx, None)
