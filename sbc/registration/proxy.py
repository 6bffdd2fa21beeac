"""Client registrations: REGISTERs forwarded to the backends, or the embedded registrar.

``RegistrationProxy`` is a transaction user of the core's client transactions. It forwards
a client's REGISTER to the backend that the balancer picks for the AOR as a stateful proxy
(RFC 3261 16) that adds a Path naming the client's flow (RFC 3327, RFC 5626 5.2), and
passes the answers back to the client's server transaction. Around that
(docs/registration.md): registration offload (unchanged re-REGISTERs answered from its
cache), failover to the next backend, de-registration of clients that stopped refreshing,
recovery of the registrations of a backend that went down, and keep-alives to clients
behind NAT. Without backends, REGISTERs go to the embedded registrar (RFC 3261 10.3).
"""

from __future__ import annotations

import email.utils
import logging
import random
import secrets
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from sbc.backends import Backends
from sbc.deadlines import Deadlines
from sbc.features.balancer import BackendState
from sbc.features.keepalive import NatPolicy, behind_nat
from sbc.features.registrar import (
    CachedRegistration,
    FlowTokens,
    LocationService,
    MemoryRegistrationStore,
    RegisterRefused,
    RegistrationStore,
    aor_of,
    aor_of_uri,
    client_expires_for,
    contact_expires,
    contact_key,
    may_answer_locally,
)
from sbc.registration.keepalives import NatKeepalives, RawSend
from sbc.registration.refresh import Cut, RefreshTemplates, Template
from sbc.registration.shared import (
    Bound,
    Dropped,
    FlowFailed,
    Refreshed,
    Registered,
    Shared,
    Stored,
    binding_event,
    dropped_event,
    flow_failed_event,
    flow_lost_event,
    refreshed_event,
    register_event,
    stored_event,
)
from sbc.sip.flow import Flow, format_address, format_host
from sbc.sip.headers import NameAddr, Via
from sbc.sip.message import ParseError, Request, Response
from sbc.sip.transaction import (
    ClientTransaction,
    Output,
    Respond,
    ResponseReceived,
    Send,
    ServerTransaction,
    TransactionLayer,
    new_branch,
)
from sbc.sip.uri import SipUri, Uri

log = logging.getLogger("sbc.registration")


@dataclass(slots=True, kw_only=True)
class _RegisterInfo:
    """What a forwarded REGISTER asked, to cache and rewrite its answer."""

    aor: str
    call_id: str
    cseq: int
    contacts: tuple[NameAddr, ...]
    flow: Flow
    client_expires: int  # what the client will be granted (0: a de-registration)
    nat: bool = False  # the client is behind NAT
    outbound: bool = False  # the client uses SIP outbound (RFC 5626)


@dataclass(slots=True)
class _Forwarded:
    """A client's REGISTER forwarded to a backend."""

    server_tx: ServerTransaction
    backend: BackendState
    register: _RegisterInfo | None  # None: "Contact: *", the backend decides
    request: Request  # the client's request, to forward again
    client: Flow
    tried: tuple[str, ...]  # backends it went to, the last one now


@dataclass(slots=True)
class _Deregister:
    backend: BackendState


@dataclass(slots=True)
class _Recovery:
    registration: CachedRegistration
    backend: BackendState
    call_id: str


_Work = _Forwarded | _Deregister | _Recovery


@dataclass(frozen=True, slots=True, kw_only=True)
class OffloadPolicy:
    """[registration]: expiry towards clients (per transport) and towards backends."""

    client_udp: int = 60
    client_tcp: int = 300
    client_tls: int = 300
    backend_expires: int = 3600
    backend_spread: float = 0.1

    def client_expires(self, transport: str) -> int:
        return client_expires_for(transport, self.client_udp, self.client_tcp, self.client_tls)


DEFAULT_OFFLOAD = OffloadPolicy()
_CORE_ONLY_HEADERS = ("path", "service-route", "server", "warning")


def _int_or(value: str | None, default: int) -> int:
    return int(value) if value is not None and value.isdigit() else default


def _requested_expires(req: Request) -> int:
    """The expiry a REGISTER asks for (RFC 3261 10.2.1.1): the smallest of its contacts'
    expires parameters, else its Expires header, else the registrar default of 3600 s."""
    default = _int_or(req.get("expires"), 3600)
    return min((contact_expires(c, default) for c in req.contact), default=default)


class RegistrationProxy:
    def __init__(
        self,
        *,
        transactions: TransactionLayer,
        backends: Backends,
        respond: Respond,
        offload: OffloadPolicy = DEFAULT_OFFLOAD,
        nat: NatPolicy | None = None,
        store: RegistrationStore | None = None,
        tokens: FlowTokens | None = None,
        rng: random.Random | None = None,
        register_gate: Callable[[float], int] | None = None,
        wall_offset: float = 0.0,
        worker: int = 0,
        workers: int = 1,
    ) -> None:
        """``worker`` of ``workers``: the signalling worker this proxy is part of, which
        shares its registrations with the others (sbc/registration/shared.py)."""
        self.transactions = transactions
        self.backends = backends
        self.respond = respond
        # Asked before a client's REGISTER goes to a backend: seconds to wait (503 with
        # Retry-After) when the backends' REGISTER ceiling is reached.
        self.register_gate = register_gate
        self.offload = offload
        self.tokens = tokens or FlowTokens()
        self.registrations: RegistrationStore = store or MemoryRegistrationStore()
        self.location = LocationService()  # the embedded registrar, without backends
        self.keepalives = NatKeepalives(
            transactions=transactions,
            backends=backends,
            policy=nat or NatPolicy(),
            on_dead=self._flow_failed,
        )
        self._rng = rng or random.Random()
        self.wall_offset = wall_offset  # epoch - monotonic (Date headers)
        # Refreshes answered from templates before parsing (refresh.py), and what the last
        # local answer was, for the pipeline to learn a template from.
        self.refreshes = RefreshTemplates()
        self.answered: tuple[CachedRegistration, bytes, Flow, float] | None = None
        self._date_cache: tuple[int, bytes] = (-1, b"")
        self._work: dict[ClientTransaction, _Work] = {}
        self._deadlines: Deadlines[ClientTransaction] = Deadlines()  # forwarded, unanswered
        self.stats: Counter[str] = Counter()
        self.failed_flows: list[Flow] = []  # client flows found dead, for the owner
        self.worker = worker
        # With several workers, each change of the registrations is kept here as an event
        # for the others (shared.py), until the core takes it; with one, nothing is.
        self.sharing = workers > 1
        self.shared: list[tuple[object, ...]] = []
        # How a binding's flow is reached from this SBC (one through another instance's
        # socket, found in the shared store: SbcCore._own_flow; True: forwarded to that
        # instance, the request keeps its URI); None: as is.
        self.own_flow: Callable[[Flow], tuple[Flow, bool]] | None = None

    # -- timers ------------------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        if not self.backends.listening:
            return None
        deadlines = [
            d
            for d in (
                self._deadlines.next_deadline(),
                self.registrations.next_deadline(),
                self.keepalives.next_deadline(),
            )
            if d is not None
        ]
        return min(deadlines) if deadlines else None

    def handle_timer(self, now: float) -> list[Output | RawSend]:
        out: list[Output | RawSend] = []
        if not self.backends.listening:
            return out
        while (tx := self._deadlines.pop_due(now)) is not None:
            work = self._work.pop(tx)
            assert isinstance(work, _Forwarded)
            out += self._failover(tx, work, now)
        out += self.keepalives.handle_timer(now)
        for reg in self.registrations.expired(now):
            # Every worker drops it at the same deadline; its owner de-registers it, and
            # has the others drop it too (shared.py: a refresh answered elsewhere too late).
            self.refreshes.drop(reg.flow, reg.call_id, reg.aor)
            if reg.owner == self.worker:
                out += self._deregister(reg, now)
                if self.sharing:
                    self.shared.append(dropped_event(reg))
            if not self.has_flow(reg.flow):
                self.keepalives.unwatch(reg.flow)
        return out

    def _done(self, tx: ClientTransaction) -> _Work | None:
        """The work of a transaction that ended, forgotten with its deadline."""
        self._deadlines.cancel(tx)
        return self._work.pop(tx, None)

    # -- client flows ------------------------------------------------------------------------
    def client_flow(self, req: Request) -> Flow | None:
        """The client flow named by the top Route, if it is one of our Path URIs (RFC 3327
        5.3: the registrar puts the Path in a Route of requests for the user)."""
        routes = req.name_addrs("route")
        uri = routes[0].sip_uri if routes else None
        if uri is None or uri.user is None or uri.port is None:
            return None
        if not self.backends.sends_from(uri.host_bare, uri.port):
            return None
        return self.tokens.decode(uri.user)

    def flows(self) -> set[Flow]:
        """The client flows of every registration, forwarded or local."""
        found = {reg.flow for reg in self.registrations}
        found.update(b.flow for _, b in self.location.bindings())
        return found

    def has_flow(self, flow: Flow) -> bool:
        """Whether a registration (forwarded or local) still reaches its client over ``flow``."""
        return self.registrations.has_flow(flow) or self.location.has_flow(flow)

    def connection_lost(self, flow: Flow) -> None:
        """A client's connection that this worker held is gone: the other workers, which
        send to the user through this one, learn that the flow failed (RFC 5626 5.3: a
        request for it gets 430) and end their calls over it. The bindings stay until
        they expire, here and there, as with one worker."""
        if self.sharing and self.has_flow(flow):
            self.shared.append(flow_lost_event(flow))

    def _flow_failed(self, flow: Flow, now: float) -> list[Output]:
        """keepalive_failures OPTIONS went unanswered: the client is gone. Its bindings are
        removed here, in the other workers and at the backends."""
        if self.sharing:
            self.shared.append(flow_failed_event(flow))
        log.info("client unreachable; its bindings are removed", extra={"flow": str(flow)})
        self.stats["keepalive_dead"] += 1
        return self._forget_flow(flow, now)

    def _forget_flow(self, flow: Flow, now: float) -> list[Output]:
        """The client behind ``flow`` is gone: its bindings go, the records this worker
        owns are de-registered at their backends, and the core ends the calls over the flow
        (``failed_flows``)."""
        self.failed_flows.append(flow)
        self.refreshes.drop_flow(flow)
        self.keepalives.unwatch(flow)
        self.location.drop_flow(flow)
        out: list[Output] = []
        for reg in self.registrations:
            if reg.flow == flow:
                self.registrations.drop(reg)
                if reg.owner == self.worker:
                    out += self._deregister(reg, now)
        return out

    # -- the embedded registrar --------------------------------------------------------------
    def register_locally(
        self, server_tx: ServerTransaction, req: Request, client: Flow, now: float
    ) -> list[Output]:
        """RFC 3261 10.3 in memory, for an SBC without backends (e.g. ``make run``)."""
        to, cseq, call_id = req.to, req.cseq, req.call_id
        aor = aor_of(to) if to is not None else None
        if aor is None or cseq is None or call_id is None:
            return self.respond(server_tx, 400, "To Is Not A SIP Address-of-Record", (), now)
        contacts = req.contact
        asked = _requested_expires(req)
        expires = min(asked, self.offload.client_expires(client.transport))
        try:
            bindings = self.location.register(
                aor=aor, contacts=contacts, flow=client, call_id=call_id, cseq=cseq.seq,
                expires=expires, now=now,
            )  # fmt: skip
        except RegisterRefused as exc:
            return self.respond(server_tx, exc.status, exc.reason, (), now)
        if self.sharing:  # the other workers apply the same REGISTER
            event = register_event(
                aor=aor, flow=client, call_id=call_id, cseq=cseq.seq, contacts=contacts,
                expires=expires, now=now,
            )  # fmt: skip
            self.shared.append(event)
        self.stats["register_local"] += 1
        if asked and self._behind_nat(req, contacts, client):
            self.keepalives.watch(client, contacts, now)
        headers: list[tuple[str, str]] = []
        if bindings:
            listed = ", ".join(str(c.with_param("expires", str(s))) for c, s in bindings)
            headers.append(("Contact", listed))
        headers.append(("Date", self._date(now)))
        return self.respond(server_tx, 200, None, tuple(headers), now)

    @staticmethod
    def _behind_nat(req: Request, contacts: tuple[NameAddr, ...], client: Flow) -> bool:
        """Whether a UDP client is behind a NAT (keep-alives are for UDP NAT bindings)."""
        via = req.top_via
        if client.transport != "udp" or via is None:
            return False
        hosts = [c.sip_uri.host for c in contacts if c.sip_uri is not None]
        return behind_nat(client.remote, via.host_bare, via.port, hosts)

    def local_target(self, req: Request, now: float) -> tuple[Flow, Uri | None] | None:
        """The flow and contact of a user registered here that ``req`` is addressed to."""
        uri = req.uri
        if not isinstance(uri, SipUri) or uri.user is None:
            return None
        bindings = self.location.lookup(aor_of_uri(uri), now)
        if not bindings:
            return None
        flow = bindings[0].flow
        if self.own_flow is not None:
            flow, forwarded = self.own_flow(flow)
            if forwarded:
                return flow, None  # the other instance finds the binding by the URI
        return flow, bindings[0].contact.uri

    def _date(self, now: float) -> str:
        return email.utils.formatdate(now + self.wall_offset, usegmt=True)  # RFC 3261 20.17

    # -- REGISTER to the backends (docs/registration.md) -------------------------------------
    def forward(
        self, server_tx: ServerTransaction, req: Request, client: Flow, now: float
    ) -> list[Output]:
        """A client's REGISTER: answered from the cache (offload) or forwarded to the
        backend the balancer picks for its AOR."""
        to, cseq, call_id = req.to, req.cseq, req.call_id
        aor = aor_of(to) if to is not None else None
        if aor is None or cseq is None or call_id is None:
            return self.respond(server_tx, 400, "To Is Not A SIP Address-of-Record", (), now)
        contacts = req.contact
        if any(c.star for c in contacts):
            info = None  # "Contact: *" removes every binding: the backend decides
        else:
            asked = _requested_expires(req)
            granted = min(asked, self.offload.client_expires(client.transport))
            cached = self.registrations.get(aor, call_id, client)
            offload = may_answer_locally(
                cached, cseq=cseq.seq, contacts=contacts, expires=asked, now=now
            )
            if offload and cached is not None:
                return self._answer_locally(server_tx, req, cached, granted, now)
            info = _RegisterInfo(
                aor=aor, call_id=call_id, cseq=cseq.seq, contacts=contacts, flow=client,
                client_expires=granted,
                nat=self._behind_nat(req, contacts, client),
                outbound="outbound" in {v.lower() for v in req.values("supported")}
                and any(c.param("reg-id") is not None for c in contacts),
            )  # fmt: skip
        wait = self.register_gate(now) if self.register_gate is not None else 0
        if wait:
            retry = (("Retry-After", str(wait)),)
            return self.respond(server_tx, 503, "Registrar Busy", retry, now)
        backend = self.backends.balancer.pick_for_aor(aor)
        flow = self.backends.flow_to(backend) if backend is not None else None
        if backend is None or flow is None:
            # RFC 3261 21.5.4: no backend can take it now; the client retries later.
            retry = (("Retry-After", "10"),)
            return self.respond(server_tx, 503, "No Backend Available", retry, now)
        return self._send_register(server_tx, req, client, backend, flow, info, (), now)

    def _send_register(
        self,
        server_tx: ServerTransaction,
        req: Request,
        client: Flow,
        backend: BackendState,
        flow: Flow,
        info: _RegisterInfo | None,
        tried: tuple[str, ...],
        now: float,
    ) -> list[Output]:
        fwd = self._forwarded(req, flow, client)
        if info is not None and info.client_expires > 0 and info.contacts:
            # RFC 3261 10.2.3: without Contact the REGISTER is a query; none is added.
            self._ask_backend_expiry(fwd, info.contacts)
        tx, out = self.transactions.send_request(fwd, dest=flow, reliable=flow.reliable, now=now)
        self._work[tx] = _Forwarded(server_tx, backend, info, req, client, (*tried, backend.name))
        # Failover: no final answer by then -> the next backend.
        self._deadlines.set(tx, now + self.backends.request_timeout)
        self.stats["register_forwarded"] += 1
        return out

    def _failover(self, tx: ClientTransaction, work: _Forwarded, now: float) -> list[Output]:
        """A forwarded REGISTER got no answer at all within request_timeout: the backend
        counts a failure and the REGISTER goes to the next backend in the AOR's order (a
        transaction timeout is a failure; the client is not left waiting for timer F)."""
        out = self.transactions.terminate(tx)
        out += self.backends.report_failure(work.backend, "REGISTER unanswered", now)
        aor = work.register.aor if work.register is not None else None
        to = work.request.to
        aor = aor or (aor_of(to) if to is not None else None)
        balancer = self.backends.balancer
        backend = balancer.pick_for_aor(aor, exclude=work.tried) if aor else None
        flow = self.backends.flow_to(backend) if backend is not None else None
        if backend is None or flow is None:
            return out + self.respond(work.server_tx, 408, "Backend Timeout", (), now)
        self.stats["register_failover"] += 1
        log.info("REGISTER failed over", extra={"aor": aor, "backend": backend.name})
        return out + self._send_register(
            work.server_tx, work.request, work.client, backend, flow, work.register, work.tried, now
        )

    def _ask_backend_expiry(self, fwd: Request, contacts: tuple[NameAddr, ...]) -> None:
        """Registration offload: the backend is asked for the long expiry, with a random
        spread so that bindings made together do not all refresh together."""
        expires = str(self._backend_expiry())
        fwd.set("Expires", expires)
        fwd.set("Contact", ", ".join(str(c.with_param("expires", expires)) for c in contacts))

    def _backend_expiry(self) -> int:
        spread = self.offload.backend_spread * self._rng.random()
        return max(60, int(self.offload.backend_expires * (1 - spread)))

    def _answer_locally(
        self,
        server_tx: ServerTransaction,
        req: Request,
        reg: CachedRegistration,
        granted: int,
        now: float,
    ) -> list[Output]:
        """A 200 for a refresh that changes nothing (RFC 3261 10.3 step 8 contents)."""
        reg.cseq = req.cseq.seq if req.cseq is not None else reg.cseq
        reg.client_expires = granted
        reg.client_expires_at = now + granted
        self.registrations.store(reg, refresh=True)
        if self.sharing:
            self.shared.append(refreshed_event(reg))
        self.stats["register_offloaded"] += 1
        contacts = ", ".join(str(c.with_param("expires", str(granted))) for c in reg.contacts)
        headers = (("Contact", contacts), ("Date", self._date(now)))
        out = self.respond(server_tx, 200, None, headers, now)
        if reg.flow.transport == "udp":
            for sent in out:
                if isinstance(sent, Send) and isinstance(sent.message, Response):
                    # The octets the core sends (it adds Server when absent), as a template
                    # for the next refreshes of this registration.
                    answer = sent.message
                    if "server" not in answer:
                        answer.add("Server", self.backends.server_header)
                    assert isinstance(sent.dest, Flow)
                    self.answered = (reg, bytes(answer), sent.dest, now)
        return out

    # -- refreshes answered from templates (refresh.py) --------------------------------------
    def refresh_candidate(self, data: bytes, flow: Flow, now: float) -> tuple[Template, Cut] | None:
        """The template ``data`` refreshes, when the SBC may answer it as it did before:
        a retransmission of the last one answered, or a higher CSeq while the registration
        is still the cached one and its backend binding stays fresh (may_answer_locally)."""
        found = self.refreshes.match(data, flow)
        if found is None:
            return None
        template, cut = found
        reg = template.reg
        if self.registrations.get(reg.aor, reg.call_id, reg.flow) is not reg:
            self.refreshes.drop(reg.flow, reg.call_id, reg.aor)
            return None
        if template.repeated_by(cut):
            # A retransmission, while its transaction would still absorb it (RFC 3261
            # 17.2.2: timer J, 64*T1); later it is a new request for the full path.
            wait = self.transactions.timers.timer_j(False)
            return found if now - template.answered_at <= wait else None
        if cut.cseq <= reg.cseq or reg.backend_expires_at - now < 2 * template.granted:
            return None
        return found

    def refresh(self, template: Template, cut: Cut, now: float) -> tuple[Flow, bytes]:
        """Answer a refresh ``refresh_candidate`` found: the 200, and where it goes."""
        if template.repeated_by(cut):
            self.stats["register_retransmitted"] += 1
            return template.dest, template.last
        reg = template.reg
        reg.cseq = cut.cseq
        reg.client_expires = template.granted
        reg.client_expires_at = now + template.granted
        self.registrations.store(reg, refresh=True)
        if self.sharing:
            self.shared.append(refreshed_event(reg))
        self.stats["register_offloaded"] += 1
        self.stats["register_templated"] += 1
        second = int(now + self.wall_offset)
        if second != self._date_cache[0]:
            self._date_cache = (second, self._date(now).encode())
        return template.dest, self.refreshes.answer(template, cut, self._date_cache[1], now)

    def _forwarded(self, req: Request, flow: Flow, client: Flow) -> Request:
        """RFC 3261 16.6: copy, Max-Forwards - 1, our Via on top; RFC 3327 4.1: our Path."""
        fwd = req.copy()
        mf = req.max_forwards
        fwd.set("Max-Forwards", str(70 if mf is None else mf - 1))
        host, port = flow.local
        params = (("branch", new_branch()), ("rport", ""))
        fwd.add_top_via(Via(transport=flow.transport.upper(), host=format_host(host), port=port,
                            params=params))  # fmt: skip
        local = format_address(flow.local)
        # The Path URI's user part is the client's flow token (RFC 5626 5.2); ;lr makes the
        # registrar put it in a Route that comes back here (RFC 3327 5.3).
        fwd.add("Path", f"<sip:{self.tokens.encode(client)}@{local};lr>", first=True)
        return fwd

    # -- REGISTERs of the SBC's own: de-registration and recovery ----------------------------
    def _own_register(
        self, reg: CachedRegistration, flow: Flow, *, call_id: str, cseq: int, expires: int
    ) -> Request:
        """A REGISTER the SBC sends itself for a cached registration: its AOR and contacts,
        with a Path naming the client's flow when it (re-)creates a binding."""
        local = format_address(flow.local)
        scheme, _, rest = reg.aor.partition(":")
        domain = f"{scheme}:{rest.rpartition('@')[2]}"  # RFC 3261 10.2: the registrar's domain
        req = self.backends.own_request(
            "REGISTER", domain, flow, from_uri=reg.aor, to_uri=reg.aor, call_id=call_id, cseq=cseq
        )
        value = str(expires)
        req.add("Contact", ", ".join(str(c.with_param("expires", value)) for c in reg.contacts))
        req.add("Expires", value)
        if expires:
            req.add("Path", f"<sip:{self.tokens.encode(reg.flow)}@{local};lr>")
        req.add("Content-Length", "0")
        return req

    def _deregister(self, reg: CachedRegistration, now: float) -> list[Output]:
        """The client stopped refreshing: remove its binding at the backend, so the
        backend stops routing calls into a dead NAT binding."""
        balancer = self.backends.balancer
        backend = next((b for b in balancer.backends if b.name == reg.backend), None)
        flow = self.backends.flow_to(backend) if backend is not None else None
        if backend is None or flow is None:
            return []
        call_id = reg.backend_call_id or reg.call_id
        req = self._own_register(reg, flow, call_id=call_id, cseq=reg.cseq + 1, expires=0)
        tx, out = self.transactions.send_request(req, dest=flow, reliable=flow.reliable, now=now)
        self._work[tx] = _Deregister(backend)
        self.stats["register_expired"] += 1
        log.info("client stopped refreshing; de-registering", extra={"aor": reg.aor})
        return out

    def recover(self, backend: BackendState, now: float) -> list[Output]:
        """``backend`` went down: its cached registrations are registered on the others,
        each by its owner (every worker finds the backend down by its own probes)."""
        out: list[Output] = []
        for reg in self.registrations:
            if reg.backend == backend.name and reg.owner == self.worker:
                out += self._recover(reg, now)
        return out

    def _recover(self, reg: CachedRegistration, now: float) -> list[Output]:
        """Registration recovery: the binding's backend went down, so the SBC
        registers it on the backend the AOR now hashes to, from its cache, without waiting
        for the client. A fresh Call-ID (RFC 3261 10.3 step 7: a binding with another Call-ID
        is updated) keeps its CSeq clear of the client's later refreshes."""
        backend = self.backends.balancer.pick_for_aor(reg.aor)
        flow = self.backends.flow_to(backend) if backend is not None else None
        if backend is None or flow is None:
            log.warning("no backend to recover a registration on", extra={"aor": reg.aor})
            return []
        call_id = f"{secrets.token_hex(10)}@{format_host(flow.local[0])}"
        expires = self._backend_expiry()
        req = self._own_register(reg, flow, call_id=call_id, cseq=1, expires=expires)
        tx, out = self.transactions.send_request(req, dest=flow, reliable=flow.reliable, now=now)
        self._work[tx] = _Recovery(reg, backend, call_id)
        self.stats["register_recovered"] += 1
        return out

    def _recovered(self, work: _Recovery, resp: Response, now: float) -> None:
        reg = work.registration
        if not 200 <= resp.status < 300:
            log.warning("recovery REGISTER answered %d", resp.status, extra={"aor": reg.aor})
            return
        try:
            default = _int_or(resp.get("expires"), self.offload.backend_expires)
            granted = min((contact_expires(c, default) for c in resp.contact), default=default)
        except ParseError:
            granted = self.offload.backend_expires
        reg.backend = work.backend.name
        reg.backend_call_id = work.call_id
        reg.backend_expires_at = now + granted
        if self.sharing and self.registrations.get(reg.aor, reg.call_id, reg.flow) is reg:
            self.shared.append(stored_event(reg))
        log.info("registration recovered", extra={"aor": reg.aor, "backend": reg.backend})

    # -- the state shared with the other workers (shared.py) ---------------------------------
    def apply_shared(self, change: Shared, now: float) -> list[Output]:
        """A change another worker made to the registrations, made here too without being
        shared again; what this worker owns in it is its work (shared.py: the rules)."""
        if isinstance(change, Refreshed):
            reg = self.registrations.get(change.aor, change.call_id, change.flow)
            if reg is None or change.cseq <= reg.cseq:
                self.stats["shared_stale"] += 1  # gone here, or a later refresh was seen
                return []
            reg.cseq = change.cseq
            reg.client_expires = change.client_expires
            reg.client_expires_at = change.client_expires_at
            self.registrations.store(reg)
            return []
        if isinstance(change, Stored):
            reg = change.reg
            # A template learnt for the record it replaces answers no more (refresh_candidate).
            self.refreshes.drop(reg.flow, reg.call_id, reg.aor)
            self.registrations.store(reg)
            return []
        if isinstance(change, Dropped):
            self.refreshes.drop(change.flow, change.call_id, change.aor)
            old = self.registrations.get(change.aor, change.call_id, change.flow)
            if old is not None:
                self.registrations.drop(old)
            return []
        if isinstance(change, FlowFailed):
            return self._forget_flow(change.flow, now)
        if isinstance(change, Registered):
            try:
                self.location.register(
                    aor=change.aor, contacts=change.contacts, flow=change.flow,
                    call_id=change.call_id, cseq=change.cseq, expires=change.expires,
                    now=change.now,
                )  # fmt: skip
            except RegisterRefused:
                self.stats["shared_stale"] += 1  # the bindings here differ (an event lost)
            return []
        if isinstance(change, Bound):
            if change.binding.expires_at > now:
                self.location.restore(change.aor, change.binding)
            return []
        return []  # a ban or a closed connection: the core's

    def snapshot(self) -> list[tuple[object, ...]]:
        """The events that rebuild the registrations of this worker in another: every
        relayed registration, every binding of the embedded registrar."""
        events = [stored_event(reg) for reg in self.registrations]
        events += [binding_event(aor, binding) for aor, binding in self.location.bindings()]
        return events

    # -- transaction events ------------------------------------------------------------------
    def owns(self, tx: ClientTransaction) -> bool:
        return tx in self._work or self.keepalives.owns(tx)

    def on_response(self, event: ResponseReceived, now: float) -> list[Output]:
        if self.keepalives.owns(event.transaction):
            self.keepalives.on_response(event)
            return []
        work = self._work.get(event.transaction)
        resp = event.response
        if work is None:
            return []
        if isinstance(work, _Deregister):
            if resp.status >= 200:
                self._done(event.transaction)
            return []
        if isinstance(work, _Recovery):
            if resp.status >= 200:
                self._done(event.transaction)
                self._recovered(work, resp, now)
            return []
        # A provisional answer leaves the failover deadline armed: only a final one ends it.
        if resp.status == 100:
            return []  # RFC 3261 16.7 step 5: a 100 Trying is not forwarded
        if resp.status >= 200:
            self._done(event.transaction)
        try:
            out = self._response_to_client(resp)
            if work.register is not None and 200 <= resp.status < 300:
                self._registered(work.register, work.backend, out, now)
        except ParseError as exc:
            # A response we cannot pass back (malformed Via, Contact ...): the client still
            # gets a final answer, or its server transaction would wait forever (RFC 3261
            # 16.7 10).
            self.stats["bad_relayed_response"] += 1
            log.info("cannot pass back a %d: %s", resp.status, exc.reason)
            if resp.status < 200:
                return []
            return self.respond(work.server_tx, 502, "Bad Gateway", (), now)
        return work.server_tx.respond(out, now)

    @staticmethod
    def _response_to_client(resp: Response) -> Response:
        """RFC 3261 16.7 step 3: remove our Via. Headers that describe the core are not passed
        to clients (topology hiding): the Path the registrar echoes (the SBC's core side),
        Service-Route (RFC 3608: core proxies; the client's requests reach the SBC, which
        routes them), and the backend's Server and Warning (the SBC puts its own Server)."""
        out = resp.copy()
        out.pop_first_value("via")
        for name in _CORE_ONLY_HEADERS:
            if name in out:
                out.remove(name)
        return out

    def _registered(
        self, info: _RegisterInfo, backend: BackendState, resp: Response, now: float
    ) -> None:
        """A 2xx to a forwarded REGISTER: cache it for offload and tell the client its own
        (short) expiry instead of the backend's."""
        # Whatever the answer, the registration is no longer the one a template answers for.
        self.refreshes.drop(info.flow, info.call_id, info.aor)
        if info.client_expires == 0:
            reg = self.registrations.get(info.aor, info.call_id, info.flow)
            if reg is not None:
                self.registrations.drop(reg)
                if self.sharing:
                    self.shared.append(dropped_event(reg))
            return
        mine = {contact_key(c) for c in info.contacts}
        try:
            granted = resp.contact
        except ParseError:
            return  # a 200 we cannot read: passed back as it is, not cached
        default = _int_or(resp.get("expires"), self.offload.backend_expires)
        ours = [contact_key(c) in mine for c in granted]
        backend_expiry = min(
            (contact_expires(c, default) for c, own in zip(granted, ours, strict=True) if own),
            default=default,
        )
        if backend_expiry == 0:
            return
        client_expiry = min(info.client_expires, backend_expiry)
        expiry = str(client_expiry)
        resp.set(
            "Contact",
            ", ".join(
                str(c.with_param("expires", expiry)) if own else str(c)
                for c, own in zip(granted, ours, strict=True)
            ),
        )
        if "expires" in resp:
            resp.set("Expires", expiry)
        if info.nat:
            self.keepalives.watch(info.flow, info.contacts, now)
        if info.outbound:
            # RFC 5626 4.4.1 / 5.4: how often the client should send its own keep-alives.
            resp.set("Flow-Timer", str(int(self.keepalives.policy.interval)))
        reg = CachedRegistration(
            aor=info.aor,
            flow=info.flow,
            call_id=info.call_id,
            cseq=info.cseq,
            contacts=info.contacts,
            backend=backend.name,
            backend_expires_at=now + backend_expiry,
            client_expires=client_expiry,
            client_expires_at=now + client_expiry,
            owner=self.worker,  # its Path names this worker's core socket
        )
        self.registrations.store(reg)
        if self.sharing:
            self.shared.append(stored_event(reg))

    def on_timeout(self, tx: ClientTransaction, now: float) -> list[Output]:
        if self.keepalives.owns(tx):
            return self.keepalives.on_timeout(tx, now)
        work = self._done(tx)
        if isinstance(work, _Forwarded):
            # A timeout towards a backend counts as a failure; RFC 3261 16.7
            # step 6 / 16.8: the proxy answers 408 itself.
            reason = f"{tx.request.method} timed out"
            out = self.backends.report_failure(work.backend, reason, now)
            return out + self.respond(work.server_tx, 408, "Backend Timeout", (), now)
        return []

    def forget(self, tx: ClientTransaction) -> None:
        self._done(tx)
        self.keepalives.forget(tx)
