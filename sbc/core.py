"""The SBC's sans-I/O core: bytes and ``now`` in, actions and the next deadline out.

The I/O layer (sbc/io/) calls ``receive_datagram`` / ``receive_stream`` with what arrived on
a flow, ``connection_lost`` when a stream ends, ``media_event`` with what a media worker
reports and ``handle_timer`` at ``next_deadline()``; it executes the returned actions
(sbc/actions.py). Nothing here reads a clock or touches a socket: wall-clock time (Date
headers, call records) is ``now`` plus the ``wall_offset`` the core was made with.

A received message goes through the stages of sbc/pipeline.py (guard, framing, sanity,
transport rules, transactions) to the transaction user here: what the SBC answers itself,
REGISTER to the registration proxy, everything else to the calls; the events of client
transactions go to the part that started them (``_outputs``).
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sbc import __version__, state
from sbc.actions import (
    Action,
    CallRecord,
    Close,
    Drained,
    Persist,
    SendData,
    Share,
    ToMediaWorker,
    with_effects,
)
from sbc.backends import Backends
from sbc.calls import DEFAULT_POLICY, B2bua, CallPolicy, MediaSeam, PeerRoute, Refusal, persist
from sbc.calls.model import ExternalMediaSeam, MediaContext, Target, _is_sdp
from sbc.features.balancer import BackendSpec, Balancer, HealthPolicy
from sbc.features.guard import (
    INVITE,
    NO_POLICY,
    OTHER,
    REGISTER,
    Guard,
    GuardPolicy,
    Limited,
    credentials_user,
)
from sbc.features.keepalive import NatPolicy
from sbc.features.registrar import FlowTokens
from sbc.features.sanity import ALLOW, KNOWN_METHODS
from sbc.media.control import Dtmf, Timeout, stats_record
from sbc.media.control import Event as MediaEvent
from sbc.media.control import Update as MediaUpdate
from sbc.media.ng import NgReply, NoNode
from sbc.media.rtpengine import Rtpengine
from sbc.media.session import MediaRefused
from sbc.ownership import conn_owner, worker_tag
from sbc.pipeline import SUPPORTED, Pipeline
from sbc.registration import DEFAULT_OFFLOAD, OffloadPolicy, RawSend, RegistrationProxy
from sbc.registration.shared import Banned, FlowLost, Unusable, ban_event, decode
from sbc.sides import ACCESS, CORE, Side
from sbc.sip.flow import Address, Flow
from sbc.sip.message import Message, ParseError, Request, Response, make_response
from sbc.sip.parser import DEFAULT_LIMITS, Limits, StreamFramer
from sbc.sip.transaction import (
    DEFAULT_TIMERS,
    ClientTransaction,
    Output,
    ResponseReceived,
    Send,
    ServerTransaction,
    Timers,
    TransactionLayer,
    TransactionTerminated,
    TransactionTimeout,
)
from sbc.sip.uri import SipUri
from sbc.state import StateHealth

log = logging.getLogger("sbc.core")

DEFAULT_HEALTH = HealthPolicy()
MAX_LOST_FLOWS = 10_000  # other workers' closed connections remembered (FlowLost)
SECRET_BYTES = 48  # the key of the flow tokens (32) and of the B2BUA's tokens (16)


@dataclass(frozen=True, slots=True, kw_only=True)
class CoreSettings:
    """What the core needs from the config (kept small so tests can build one directly)."""

    local_hosts: frozenset[str]  # hosts (lower-case, no brackets) that mean "this SBC"
    server_header: str = f"sbc/{__version__}"
    timers: Timers = DEFAULT_TIMERS
    limits: Limits = DEFAULT_LIMITS
    tcp_idle_timeout: float = 300.0
    backends: tuple[BackendSpec, ...] = ()
    health: HealthPolicy = DEFAULT_HEALTH
    balance: str = "aor-hash"
    offload: OffloadPolicy = DEFAULT_OFFLOAD
    nat: NatPolicy | None = None
    request_timeout: float = 4.0
    calls: CallPolicy = DEFAULT_POLICY
    peers: tuple[PeerRoute, ...] = ()
    public_address: str | None = None  # [sbc] public_address: named towards clients
    security: GuardPolicy = NO_POLICY  # [security]; the default checks nothing


class SbcCore(Pipeline):
    """The composition of the core's parts, its entry points besides input (connections,
    timers, media events, reload, drain) and the transaction user (what the SBC answers
    itself, and which part takes a request or a client transaction's event)."""

    def __init__(
        self,
        settings: CoreSettings,
        media: MediaSeam | None = None,
        *,
        wall_offset: float = 0.0,
        secret: bytes | None = None,
        worker: int = 0,
        workers: int = 1,
        rtpengine: Rtpengine | None = None,
        persist: bool = False,
    ) -> None:
        """``wall_offset``: epoch minus the I/O layer's monotonic clock, read once when the
        core is made (Date headers and call records are in wall-clock time). ``secret``
        (48 bytes) keys the flow tokens in Path and the B2BUA's dialog tokens; several
        workers of one SBC share it, so that a token one made is good in all of them (and
        in a restarted one). None: a random key of this core's own. ``persist``: the
        state is kept outside the process too ([state] url, sbc/state.py): its changes
        leave as ``Persist`` actions, and as ``Share`` ones for the other instances."""
        if secret is not None and len(secret) < SECRET_BYTES:
            raise ValueError(f"secret: {SECRET_BYTES} bytes needed, got {len(secret)}")
        # This core is signalling worker ``worker`` of ``workers`` (docs/architecture.md,
        # "Signalling workers"); one SBC process is worker 0 of 1.
        self.worker = worker
        self.workers = workers
        # Media on rtpengine nodes ([media] engine = "rtpengine"): every SDP is rewritten by
        # the call's node before the B2BUA sees it; the message waits in ``_held`` (by the
        # ng cookie of its request) meanwhile, and responses to the same transaction that
        # come after it wait behind it (``_held_after``), so their order is kept.
        self.rtpengine = rtpengine
        self._external: ExternalMediaSeam | None = None
        if rtpengine is not None:
            self._external = ExternalMediaSeam()
            media = self._external
        self._held: dict[str, _Held] = {}
        self._held_after: dict[ClientTransaction, list[Response]] = {}
        # Set in a process that is one of several workers (the process's branches are marked
        # by the app: sip.transaction.mark_branches).
        self._handing_in = False  # a message handed over by another worker is being handled
        self._lost_flows: set[Flow] = set()  # other workers' connections that closed
        self.settings = settings
        self.transactions = TransactionLayer(settings.timers)
        # Changes of the shared state leave the core for other workers, or instances.
        self.sharing = workers > 1 or persist
        self.persisting = persist
        self.wall_offset = wall_offset
        self.state_health: StateHealth | None = None  # the store's, set by the I/O layer
        # The UDP access address of a live SBC instance that listens at an address (the
        # store's heartbeats, set by the I/O layer); None: no other instance known.
        self.peer_at: Callable[[Address], Address | None] | None = None
        self.guard = Guard(settings.security, sharing=self.sharing)
        # Transaction users of client transactions: the B2BUA (calls), the registration
        # proxy and the backends' health probes; each says which transactions it owns.
        self.backends = Backends(
            transactions=self.transactions,
            balancer=Balancer(
                settings.backends, policy=settings.health, algorithm=settings.balance
            ),
            server_header=settings.server_header,
            request_timeout=settings.request_timeout,
            public_address=settings.public_address,
        )
        self.registration = RegistrationProxy(
            transactions=self.transactions,
            backends=self.backends,
            respond=self._respond,
            offload=settings.offload,
            nat=settings.nat,
            register_gate=self.guard.backend_register if self.guard.active else None,
            wall_offset=wall_offset,
            tokens=FlowTokens(secret[:32]) if secret is not None else None,
            worker=worker,
            workers=workers,
        )
        self.registration.sharing = self.sharing
        # Established calls written to the store (their entries are deleted at the end),
        # under this SBC's node (state.node_id, set by the I/O layer).
        self._kept_calls: set[str] = set()
        self.node = ""
        if persist:
            self.registration.registrations.changed = set()
            self.registration.location.changed = set()
            self.registration.own_flow = self._own_flow
        # The access side's UDP sockets by address family (4, 6), and every local address.
        self._access_udp: dict[int, Address] = {}
        self._local_addresses: set[Address] = set()
        # A backend that goes down has its registrations recovered on the others.
        self.backends.on_down = self.registration.recover
        self.calls = B2bua(
            transactions=self.transactions,
            backends=self.backends,
            registration=self.registration,
            respond=self._respond,
            policy=settings.calls,
            peers=settings.peers,
            media=media,
            wall_offset=wall_offset,
            key=secret[32:SECRET_BYTES] if secret is not None else None,
        )
        if persist:
            self.calls.changed_calls = set()
        if workers > 1:
            self.calls.id_prefix = worker_tag(worker)
        self._framers: dict[Flow, StreamFramer] = {}
        # Open message-oriented connections (WebSocket: a whole message each, no framer).
        self._message_flows: set[Flow] = set()
        self._counted: set[Flow] = set()  # connections the guard counts for their source
        # Stream flows by last activity, oldest first (dicts keep insertion order).
        self._activity: dict[Flow, float] = {}
        self.stats: Counter[str] = Counter()
        self._loop_depth = 0  # messages to this SBC itself being received (_loop_back)
        self._drained = False  # the Drained action was returned
        # The guard's verdict on the datagram being handled, when the registration refresh
        # path asked it already (Pipeline._refresh): the full path answers it as it is.
        self._guard_verdict: Limited | None = None
        # The To tag of every 503 refused for overload (Pipeline._shed), and its octets,
        # by which the ACKs of those 503s are known before they are parsed.
        self._shed_tag = secrets.token_hex(8)
        self._shed_tag_bytes = f"tag={self._shed_tag}".encode()

    # -- reload and shutdown -----------------------------------------------------------------
    def reconfigure(self, settings: CoreSettings, now: float) -> None:
        """Take a reloaded config's settings without dropping registrations or calls:
        backends (kept ones keep their health), call limits and header lists, peers,
        registration offload, the guard's lists and limits (bans stay). What binds sockets
        or shapes the wire (listeners, timers, size limits) needs a restart: the app
        refuses a reload that changes it."""
        self.settings = settings
        self.backends.balancer.reconfigure(
            settings.backends, policy=settings.health, algorithm=settings.balance, now=now
        )
        self.registration.offload = settings.offload
        self.registration.refreshes.clear()  # their answers follow the old policies
        self.backends.request_timeout = settings.request_timeout
        self.calls.set_policy(settings.calls, settings.peers)
        # A backend or peer the reload removed still ends its calls and answers what was
        # sent to it: the core side keeps taking its packets until a restart.
        security = settings.security
        if security.restrict_core:
            kept = security.core_sources | self.guard.policy.core_sources
            security = dataclasses.replace(security, core_sources=kept)
        self.guard.set_policy(security)
        self.registration.register_gate = self.guard.backend_register if self.guard.active else None

    @with_effects
    def drain(self, now: float) -> list[Action]:
        """SIGTERM: new calls get 503 (Retry-After); calls in progress go on. ``Drained``
        comes back, from this or a later entry point, once the last one has ended."""
        self.calls.draining = True
        return []

    @property
    def draining(self) -> bool:
        return self.calls.draining

    @with_effects
    def end_all_calls(self, now: float) -> list[Action]:
        """The drain deadline: every call still up ends with BYE on both legs."""
        return self._outputs(self.calls.end_all("shutdown", now), now)

    def _effects(self, actions: list[Action]) -> list[Action]:
        """After an entry point's own actions, the effects its parts collected while they
        worked: commands for the media workers, call records, the changes of the state
        shared with the other workers, and the drain's end."""
        commands = self.calls.media.take_commands()
        if commands:
            actions += [ToMediaWorker(worker, command) for worker, command in commands]
            changed = self.calls.changed_calls
            if changed is not None:
                changed.update(c.session for _, c in commands if isinstance(c, MediaUpdate))
        external = self._external
        if external is not None and external.ended:
            actions += self._ng_deletes(external)
        records = self.calls.records
        if records:
            actions += [CallRecord(line) for line in records]
            records.clear()
        if self.sharing:
            shared = self.registration.shared
            if shared:
                actions += [Share(event) for event in shared]
                shared.clear()
            bans = self.guard.shared_bans
            if bans:
                actions += [Share(ban_event(ip, until, why)) for ip, until, why in bans]
                if self.persisting:
                    offset = self.wall_offset
                    actions += [state.ban(ip, until, why, offset) for ip, until, why in bans]
                bans.clear()
            if self.persisting:
                actions += self._persist_changes()
        if self.calls.draining and not self._drained and self.calls.idle():
            self._drained = True
            actions.append(Drained())
        return actions

    # -- the state kept outside the process (sbc/state.py) -------------------------------------
    def _persist_changes(self) -> list[Action]:
        """The entries of what changed since the last entry point."""
        actions: list[Action] = []
        offset = self.wall_offset
        regs = self.registration.registrations
        changed = regs.changed
        if changed:
            for aor, call_id, flow in changed:
                key = state.reg_key(aor, call_id, flow)
                actions.append(state.registration(regs.get(aor, call_id, flow), key, offset))
            regs.refreshed -= changed
            changed.clear()
        refreshed = regs.refreshed
        if refreshed:
            # A refresh is written once the entry written last would lag a client period
            # behind (its key lives a period longer than its record: sbc/state.py).
            for aor, call_id, flow in refreshed:
                reg = regs.get(aor, call_id, flow)
                if reg is not None and state.refresh_due(reg):
                    key = state.reg_key(aor, call_id, flow)
                    actions.append(state.registration(reg, key, offset))
            refreshed.clear()
        location = self.registration.location
        aors = location.changed
        if aors:
            actions += [state.bindings(aor, location.of(aor), offset) for aor in aors]
            aors.clear()
        calls = self.calls.changed_calls
        if calls:
            actions += [entry for call in calls if (entry := self._call_entry(call)) is not None]
            calls.clear()
        return actions

    def _call_entry(self, call_id: str) -> Persist | None:
        """The entry of an established INVITE call, or its deletion once it is over."""
        key = state.call_key(self.node, call_id)
        call = self.calls.calls.get(call_id)
        media_seam = self.calls.media
        if (
            call is None or call.state != "confirmed" or call.method != "INVITE"
            or not media_seam.keeps(call_id)
        ):  # fmt: skip
            if call_id in self._kept_calls and (call is None or call.state == "ended"):
                self._kept_calls.discard(call_id)
                return Persist(key, None, 0.0)
            return None
        value = persist.call_value(call, media_seam.export(call_id), self.wall_offset)
        fresh = call_id not in self._kept_calls
        self._kept_calls.add(call_id)
        limit = self.settings.calls.max_duration or state.CALL_LIFETIME
        answered = call.answered if call.answered is not None else call.started
        until = answered + limit + 60.0
        return state.call(self.node, call_id, value, until, self.wall_offset, fresh=fresh)

    @with_effects
    def restore_call(self, value: dict[str, object], now: float) -> list[Action]:
        """An established call kept in the store (a restart): its dialogs go on, its media
        session is bound again on the same ports with the same keys. ValueError (KeyError,
        TypeError, MediaRefused) if it cannot be."""
        call = persist.restore_call(value, self.wall_offset, self.backends.balancer.backends)
        if call.id in self.calls.calls or not call.id.startswith(self.calls.id_prefix):
            return []  # restored already, or another signalling worker's (its id's mark)
        media = value.get("media")
        if isinstance(media, dict):
            self.calls.media.restore(call.id, media)
        self.calls.restore(call, now)
        self._kept_calls.add(call.id)
        return []

    def _forget_changes(self) -> None:
        """What an apply_shared changed is the other worker's or instance's to write."""
        regs = self.registration.registrations
        for marks in (regs.changed, regs.refreshed, self.registration.location.changed):
            if marks:
                marks.clear()

    def persist_all(self, now: float) -> list[Persist]:
        """Every entry of the state as it is, established calls included (written back
        after the store was unreachable, which may have lost what it held)."""
        offset = self.wall_offset
        out = [
            state.registration(reg, state.reg_key(reg.aor, reg.call_id, reg.flow), offset)
            for reg in self.registration.registrations
        ]
        location = self.registration.location
        aors = {aor for aor, _ in location.bindings()}
        out += [state.bindings(aor, location.of(aor), offset) for aor in aors]
        out += [
            state.ban(ip, until, "restored", offset)
            for ip, until in self.guard.bans.items()
            if until > now
        ]
        out += [entry for call in self.calls.calls if (entry := self._call_entry(call)) is not None]
        return out

    def _own_flow(self, flow: Flow) -> tuple[Flow, bool]:
        """How to reach a client whose flow is another instance's (a binding found in the
        shared store): through that instance while it lives (``peer_at``: its UDP access
        address; the request goes there as to a proxy, which sends it down the flow, as
        between workers), else, over UDP, from this SBC's own access socket of the family.
        True: forwarded to the other instance."""
        if flow.local in self._local_addresses:
            return flow, False
        peer = self.peer_at(flow.local) if self.peer_at is not None else None
        if peer is not None:
            own = self._access_udp.get(6 if ":" in peer[0] else 4)
            if own is not None:
                return Flow("udp", own, peer), True
        if flow.transport != "udp":
            return flow, False
        own = self._access_udp.get(6 if ":" in flow.remote[0] else 4)
        return (flow if own is None else Flow("udp", own, flow.remote)), False

    # -- connections, media, timers -----------------------------------------------------------
    @with_effects
    def apply_shared(self, event: tuple[object, ...], now: float) -> list[Action]:
        """A change of the shared state that another worker made (its ``Share`` action, or
        an event of its ``snapshot``), made here too without being shared again
        (sbc/registration/shared.py). An event of another schema version, of an unknown
        kind or malformed is ignored, counted as ``shared_ignored:<why>``."""
        try:
            change = decode(event)
        except Unusable as exc:
            self.stats[f"shared_ignored:{exc.why}"] += 1
            return []
        self.stats["shared_applied"] += 1
        if isinstance(change, Banned):
            self.guard.apply_ban(change.source, change.until, change.reason, now)
            return []
        if isinstance(change, FlowLost):
            return self._lose_flow(change.flow, now)
        actions = self._outputs(self.registration.apply_shared(change, now), now)
        self._forget_changes()
        return actions + self._flows_failed(now)

    @with_effects
    def worker_restarted(self, worker: int, now: float) -> list[Action]:
        """Worker ``worker`` started again (it asked for the shared state): the TCP/TLS
        connections it held died with it, so its users' flows are failed here (430, RFC
        5626 5.3, until they register again on a new connection) and calls over them end."""
        flows = {
            flow
            for flow in self.registration.flows()
            if flow.conn_id and conn_owner(flow.conn_id) == worker
        }
        actions: list[Action] = []
        for flow in flows:
            actions += self._lose_flow(flow, now)
        return actions

    def _lose_flow(self, flow: Flow, now: float) -> list[Action]:
        """Another worker's connection is gone: ``_alive`` says so (430) and the calls over
        it end."""
        if len(self._lost_flows) >= MAX_LOST_FLOWS:
            self._lost_flows.clear()  # a forgotten one is only sent to and lost there
        self._lost_flows.add(flow)
        return self._outputs(self.calls.end_calls_on_flow(flow, now), now)

    def snapshot(self) -> list[tuple[object, ...]]:
        """The events that rebuild the shared state of this worker in another (a restarted
        one applies each with ``apply_shared``): every relayed registration, every binding
        of the embedded registrar, every ban (one already over is ignored there)."""
        events = self.registration.snapshot()
        events += [ban_event(ip, until, "snapshot") for ip, until in self.guard.bans.items()]
        return events

    def open_connections(self) -> dict[str, int]:
        """Stream and WebSocket connections that have carried data and are open, by
        transport (for the metrics)."""
        counts: dict[str, int] = {}
        for flows in (self._framers, self._message_flows):
            for flow in flows:
                counts[flow.transport] = counts.get(flow.transport, 0) + 1
        return counts

    def connection_closed(self, flow: Flow) -> None:
        self._framers.pop(flow, None)
        self._message_flows.discard(flow)
        # The guard counted the connection when it was opened, whether or not it ever
        # sent a byte; closing twice (by us, then reported lost) counts once.
        if flow in self._counted:
            self._counted.discard(flow)
            self.guard.connection_gone(flow.remote[0])
        self._activity.pop(flow, None)

    @with_effects
    def connection_lost(self, flow: Flow, now: float) -> list[Action]:
        """The I/O layer reports a stream connection gone (closed by the peer, reset, or
        closed by us). The SBC cannot open one back to a client behind NAT, so the calls
        over it end: the other leg gets BYE, or CANCEL if unanswered."""
        self.connection_closed(flow)
        self.registration.connection_lost(flow)
        return self._outputs(self.calls.end_calls_on_flow(flow, now), now)

    @with_effects
    def media_event(self, event: MediaEvent, now: float) -> list[Action]:
        """What a media worker reports: a session without media (its call ends), the
        statistics of a deleted one (into the call record), or a DTMF
        digit for the other party as SIP INFO."""
        if isinstance(event, Timeout):
            return self._outputs(self.calls.media_timeout(event.session, now), now)
        if isinstance(event, Dtmf):
            return self._outputs(self.calls.media_dtmf(event, now), now)
        self.calls.media_stats(event.session, stats_record(event))
        return []

    def _side(self, flow: Flow) -> Side:
        """The guard's side of a flow: peers and backends are the core side."""
        return ACCESS if self.calls.side_of(flow) == ACCESS else CORE

    def connection_opened(self, flow: Flow, now: float) -> bool:
        """The I/O layer accepted a stream connection: False to close it at once (a banned
        source, or one over its connection limit)."""
        # A connection that never sends a byte is closed by the idle timeout too.
        self._activity[flow] = now
        if not self.guard.active:
            return True
        ip = flow.remote[0]
        if self.guard.admit(ip, self._side(flow), now) and self.guard.connection_opened(ip, now):
            self._counted.add(flow)
            return True
        self._activity.pop(flow, None)
        return False

    def report_lag(self, lag: float, now: float) -> None:
        """The I/O layer's measure of its event loop's lateness (overload)."""
        self.guard.report_lag(lag, now)

    def add_listener(self, side: Side, transport: str, address: Address) -> None:
        """The I/O layer reports each socket it bound, and on which side."""
        self._local_addresses.add(address)
        if side == CORE:
            self.backends.add_core_socket(transport, address)
        elif transport == "udp":
            self._access_udp.setdefault(6 if ":" in address[0] else 4, address)

    def next_deadline(self) -> float | None:
        # Asked after every entry point by the I/O layer: the earliest of the parts' own,
        # compared one by one (no list of them made).
        best = earliest(self.transactions.next_deadline(), self.backends.next_deadline())
        best = earliest(best, self.registration.next_deadline())
        best = earliest(best, self.calls.next_deadline())
        best = earliest(best, self.guard.next_deadline())
        if self.rtpengine is not None:
            best = earliest(best, self.rtpengine.next_deadline())
        if self._activity:
            oldest = next(iter(self._activity.values()))
            best = earliest(best, oldest + self.settings.tcp_idle_timeout)
        return best

    @with_effects
    def handle_timer(self, now: float) -> list[Action]:
        actions = self._outputs(self.transactions.handle_timer(now), now)
        actions += self._outputs(self.backends.handle_timer(now), now)
        actions += self._outputs(self.registration.handle_timer(now), now)
        actions += self._outputs(self.calls.handle_timer(now), now)
        actions += self._flows_failed(now)
        if self.rtpengine is not None:
            actions += self._ng_timers(now)
        self.guard.handle_timer(now)
        idle = self.settings.tcp_idle_timeout
        while self._activity:
            flow, seen = next(iter(self._activity.items()))
            if seen + idle > now:
                break
            if self.registration.has_flow(flow) or self.calls.has_flow(flow):
                # A registered client's connection is how the SBC reaches it (RFC 5626 5.3):
                # kept while its registration, or a call over it, lives.
                del self._activity[flow]
                self._activity[flow] = now
                continue
            log.info("closing idle connection", extra={"flow": str(flow)})
            self.stats["idle_closed"] += 1
            actions.append(Close(flow))
            self.connection_closed(flow)
        return actions

    # -- messages ----------------------------------------------------------------------------

    def _respond(
        self,
        tx: ServerTransaction,
        status: int,
        reason: str | None,
        headers: tuple[tuple[str, str], ...],
        now: float,
    ) -> list[Output]:
        return tx.respond(self._response(tx.request, status, reason, headers=headers), now)

    def _handle_request(
        self, tx: ServerTransaction, req: Request, flow: Flow, now: float
    ) -> Sequence[Output | RawSend]:
        """The transaction user: what the SBC answers to a new request."""
        method = req.method
        uri = req.uri
        max_forwards = req.max_forwards
        to_us = isinstance(uri, SipUri) and uri.host_bare in self.settings.local_hosts
        if method == "CANCEL":
            # RFC 3261 9.2: 200 to the CANCEL and 487 to the INVITE if still pending.
            target = self.transactions.find_cancel_target(req)
            if target is None:
                return tx.respond(self._response(req, 481), now)
            out = tx.respond(self._response(req, 200), now)
            if self.calls.owns_server(target):
                return out + self.calls.cancel(target, now)
            return out + target.respond(self._response(target.request, 487), now)
        if not flow.secure and _asks_for_sips(req):
            # RFC 5630 4 / RFC 3261 26.2.2 (as amended by RFC 5630 A): a SIPS Request-URI
            # or top Route asks for TLS on every hop, and this hop was not TLS (nor WSS,
            # which is TLS too: RFC 7118 5.2.2). 416: the
            # scheme cannot be served over this transport (RFC 3261 8.2.2.1); a UAC must
            # not retry it as sip: on its own (RFC 5630 5.1.1).
            self.stats["rejected:sips_without_tls"] += 1
            return tx.respond(self._response(req, 416, "SIPS Requires TLS"), now)
        to = req.to
        if (
            method == "OPTIONS"
            and (to_us or max_forwards == 0)
            and not (to is not None and to.tag is not None and self.calls.has_dialog(req))
        ):
            # RFC 3261 11.2; 16.3 item 2 lets an element answer an OPTIONS with Max-Forwards 0.
            return tx.respond(self._options_answer(req), now)
        if max_forwards == 0:
            return tx.respond(self._response(req, 483), now)  # RFC 3261 16.3 item 2
        if method not in KNOWN_METHODS:
            # RFC 3261 8.2.1: an unknown method gets 501 with Allow.
            return tx.respond(self._response(req, 501, headers=(("Allow", ALLOW),)), now)
        if to is not None and to.tag is not None:
            # RFC 3261 12.2.2: within a dialog, which the B2BUA holds (or answers 481).
            if self.rtpengine is not None and method in ("INVITE", "UPDATE") and _has_sdp(req):
                ctx = self.calls.media_of_request(req)
                if ctx is not None:
                    return self._media_first(ctx, _Held("dialog", tx, req, flow), now)
            return self.calls.in_dialog(tx, req, flow, now)
        if self.guard.active:
            limited = self._guard_request(req, flow, now)
            if limited is not None:  # counted by the guard
                retry = limited.retry_after
                headers = (("Retry-After", str(retry)),) if retry else ()
                return tx.respond(
                    self._response(req, limited.status, limited.reason, headers=headers), now
                )
        if method == "REGISTER":
            if self.settings.backends:
                return self.registration.forward(tx, req, flow, now)
            return self.registration.register_locally(tx, req, flow, now)
        # Everything else starts a call or a transaction of its own through the B2BUA.
        where = self.calls.route(req, flow, now, self._alive)
        if isinstance(where, Refusal):
            resp = self._response(req, where.status, where.reason, headers=where.headers)
            return tx.respond(resp, now)
        if self.rtpengine is not None and method == "INVITE" and _has_sdp(req):
            ctx = MediaContext(
                self.calls.new_call_id(), True, True, where.side, where.flow.websocket
            )
            return self._media_first(ctx, _Held("start", tx, req, flow, where, ctx.call), now)
        return self.calls.start(tx, req, flow, where, now)

    def _guard_request(self, req: Request, flow: Flow, now: float) -> Limited | None:
        """Rate limits, overload and locked users for a new out-of-dialog request."""
        if self._guard_verdict is not None:
            verdict, self._guard_verdict = self._guard_verdict, None
            return verdict
        if self._side(flow) != ACCESS:
            return None  # backends and peers are limited by the access control only
        method = req.method
        cls = REGISTER if method == "REGISTER" else INVITE if method == "INVITE" else OTHER
        credentials = req.get("authorization") or req.get("proxy-authorization")
        key = (_auth_key(req), credentials_user(credentials)) if credentials is not None else None
        return self.guard.check_request(flow.remote[0], cls, now, credentials=key)

    def _alive(self, flow: Flow) -> bool:
        """A flow the SBC can still send on: UDP, or a stream connection that is open (one
        another worker holds is, until that worker says it failed: it writes for us)."""
        if flow.transport == "udp" or flow in self._framers or flow in self._message_flows:
            return True
        if self.workers == 1 or conn_owner(flow.conn_id) == self.worker:
            return False
        return flow not in self._lost_flows

    def _flows_failed(self, now: float) -> list[Action]:
        """Client flows the keep-alives found dead: their calls end."""
        failed = self.registration.failed_flows
        actions: list[Action] = []
        while failed:
            actions += self._outputs(self.calls.end_calls_on_flow(failed.pop(), now), now)
        self.backends.events.clear()  # nobody reads backend transitions yet (logged)
        return actions

    def _response(
        self,
        req: Request,
        status: int,
        reason: str | None = None,
        *,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> Response:
        resp = make_response(req, status, reason, to_tag=_tag_for(req))
        for name, value in headers:
            resp.add(name, value)
        return resp

    def _options_answer(self, req: Request) -> Response:
        """RFC 3261 11.2: 200 with Allow, Accept, Accept-Encoding, Accept-Language, Supported."""
        return self._response(
            req,
            200,
            headers=(
                ("Allow", ALLOW),
                ("Accept", "application/sdp"),
                ("Accept-Encoding", "identity"),
                ("Accept-Language", "en"),
                *((("Supported", ", ".join(sorted(SUPPORTED))),) if SUPPORTED else ()),
            ),
        )

    def _finish(self, resp: Response) -> bytes:
        if "server" not in resp:
            resp.add("Server", self.settings.server_header)
        return bytes(resp)

    def _outputs(self, outputs: Sequence[Output | RawSend], now: float) -> list[Action]:
        """Transaction outputs to actions; the events of a client transaction go to the
        transaction user that started it (``owns``): the B2BUA, the registration proxy or
        the backends' probes."""
        actions: list[Action] = []
        for out in outputs:
            if isinstance(out, RawSend):
                actions.append(SendData(out.flow, out.data))
            elif isinstance(out, Send):
                msg = out.message
                if isinstance(msg, Response):
                    if msg.status >= 200 and self.guard.expects_auth_answers:
                        # RFC 3261 22: the answer to a request with credentials; a new
                        # challenge with stale=true (RFC 2617 3.2.1: the nonce expired,
                        # the password was right) is no failure.
                        status = msg.status
                        if status in (401, 407) and _stale(msg):
                            status = 0
                        self.guard.auth_answer(_auth_key(msg), status, now)
                    data = self._finish(msg)
                else:
                    data = bytes(msg)
                assert isinstance(out.dest, Flow)
                if self.backends.is_listener(out.dest.remote, out.dest.transport):
                    actions += self._loop_back(data, out.dest, now)
                else:
                    actions.append(SendData(out.dest, data))
            elif isinstance(out, ResponseReceived):
                started = out.transaction
                if self.calls.owns(started):
                    actions += self._outputs(self._call_response(started, out.response, now), now)
                elif self.registration.owns(started):
                    actions += self._outputs(self.registration.on_response(out, now), now)
                elif self.backends.owns(started):
                    actions += self._outputs(self.backends.on_response(out, now), now)
            elif isinstance(out, TransactionTimeout):
                tx = out.transaction
                if isinstance(tx, ClientTransaction):
                    if self.calls.owns(tx):
                        actions += self._outputs(self.calls.on_timeout(tx, now), now)
                    elif self.registration.owns(tx):
                        actions += self._outputs(self.registration.on_timeout(tx, now), now)
                    elif self.backends.owns(tx):
                        actions += self._outputs(self.backends.on_timeout(tx, now), now)
            elif isinstance(out, TransactionTerminated):
                if isinstance(out.transaction, ClientTransaction):
                    self.calls.forget(out.transaction)
                    self.registration.forget(out.transaction)
                    self.backends.forget(out.transaction)
                else:
                    self.calls.server_gone(out.transaction)
        return actions

    # -- media on rtpengine nodes ------------------------------------------------------------
    def _media_first(self, ctx: MediaContext, held: _Held, now: float) -> list[Output | RawSend]:
        """Ask the call's rtpengine node to rewrite the SDP of ``held``'s message before the
        B2BUA sees it; a new call no node can take is refused (503)."""
        engine = self.rtpengine
        assert engine is not None
        message = held.message
        try:
            sent = engine.sdp(
                ctx.call, offer=ctx.offer, from_caller=ctx.from_caller, to_side=ctx.to_side,
                sdp=message.body, source=held.flow.remote[0] if held.flow else "", now=now,
                to_browser=ctx.to_browser,
            )  # fmt: skip
        except NoNode:
            log.error("no rtpengine node is up", extra={"call": ctx.call})
            return self._media_failed(held, 503, "No Media Relay Available", now)
        except MediaRefused as refused:
            return self._media_failed(held, 488, str(refused), now)
        held.call = ctx.call
        self._held[sent.cookie] = held
        return [RawSend(Flow("udp", engine.local, sent.node.address), sent.data)]

    def _call_response(
        self, tx: ClientTransaction, resp: Response, now: float
    ) -> list[Output | RawSend]:
        """A response to one of the B2BUA's requests: to the B2BUA, after the call's node
        rewrote its SDP; behind an earlier response of the same transaction that waits."""
        queued = self._held_after.get(tx)
        if queued is not None:
            queued.append(resp)
            return []
        if self.rtpengine is not None and _has_sdp(resp):
            ctx = self.calls.media_of_response(tx, resp)
            if ctx is not None:
                self._held_after[tx] = []
                return self._media_first(ctx, _Held("response", tx, resp), now)
        return list(self.calls.on_response(tx, resp, now))

    def _ng_datagram(self, data: bytes, flow: Flow, now: float) -> list[Action]:
        """A datagram on the ng socket: a node's reply; the message it held goes on."""
        engine = self.rtpengine
        assert engine is not None
        reply = engine.receive(flow.remote, data, now)
        if reply is None:
            return self._outputs(self._ng_news(now), now)
        held = self._held.pop(reply.cookie, None)
        if held is None:
            if not reply.ok:  # a delete's answer: the node had forgotten the call already
                log.info("rtpengine %s: %s %s", reply.node, reply.command, reply.error)
            return []
        return self._outputs(self._resume(held, reply, now), now)

    def _ng_timers(self, now: float) -> list[Action]:
        engine = self.rtpengine
        assert engine is not None
        resend, expired = engine.timers(now)
        outputs: list[Output | RawSend] = [
            RawSend(Flow("udp", engine.local, address), data) for address, data in resend
        ]
        for timeout in expired:
            held = self._held.pop(timeout.cookie, None)
            if held is None:
                continue
            log.error(
                "rtpengine %s: no answer to %s", timeout.node, timeout.command,
                extra={"call": held.call},
            )  # fmt: skip
            outputs += self._resume(held, None, now)
        outputs += self._ng_news(now)
        return self._outputs(outputs, now)

    def _ng_news(self, now: float) -> list[Output | RawSend]:
        """What the nodes' answers told of calls: counters of deleted ones (their records),
        calls without media (BYE both legs, as the built-in relay's timeout), calls of a
        node down for [media] timeout (their media is gone)."""
        engine = self.rtpengine
        assert engine is not None
        outputs: list[Output | RawSend] = []
        for call, node, result in engine.deleted:
            totals = result.get("totals")
            record: dict[str, object] = {"engine": "rtpengine", "node": node}
            if isinstance(totals, dict):
                record["totals"] = totals
            self.calls.media_stats(call, [record])
        engine.deleted.clear()
        for call in engine.timed_out:
            outputs += self.calls.media_timeout(call, now)
        engine.timed_out.clear()
        for call in engine.lost_calls(now):
            outputs += self.calls.media_lost(call, now)
        return outputs

    def _ng_deletes(self, external: ExternalMediaSeam) -> list[Action]:
        engine = self.rtpengine
        assert engine is not None
        actions: list[Action] = []
        for call in external.ended:
            sent = engine.delete(call)
            if sent is not None:
                actions.append(SendData(Flow("udp", engine.local, sent.node.address), sent.data))
        external.ended.clear()
        return actions

    def _resume(self, held: _Held, reply: NgReply | None, now: float) -> list[Output | RawSend]:
        """The node answered (or not: ``reply`` None) for ``held``'s SDP: the message goes on
        with the node's SDP, or is refused."""
        sdp = reply.result.get("sdp") if reply is not None and reply.ok else None
        if not isinstance(sdp, str):
            why = "no answer" if reply is None else reply.error or "no SDP in the answer"
            log.error("rtpengine refused the SDP: %s", why, extra={"call": held.call})
            status = 503 if reply is None else 488
            return self._media_failed(held, status, "Media Relay Failed", now)
        held.message.set_body(sdp.encode(errors="surrogateescape"))
        return self._go_on(held, now)

    def _go_on(self, held: _Held, now: float) -> list[Output | RawSend]:
        tx = held.tx
        if held.kind == "response":
            assert isinstance(tx, ClientTransaction) and isinstance(held.message, Response)
            out: list[Output | RawSend] = list(self.calls.on_response(tx, held.message, now))
            for resp in self._held_after.pop(tx, []):
                out += self._call_response(tx, resp, now)
            return out
        assert isinstance(tx, ServerTransaction) and isinstance(held.message, Request)
        if held.kind == "dialog":
            assert held.flow is not None
            return list(self.calls.in_dialog(tx, held.message, held.flow, now))
        last = tx.last_response
        if last is not None and last.status >= 200:
            # CANCELled (487) while the node worked: the call never starts.
            self._external_end(held.call)
            return []
        assert held.flow is not None and held.target is not None
        return list(self.calls.start(tx, held.message, held.flow, held.target, now, held.call))

    def _media_failed(
        self, held: _Held, status: int, reason: str, now: float
    ) -> list[Output | RawSend]:
        """No SDP from the node: a new call or a re-offer is refused; a response goes on
        without its SDP (never with the far side's addresses: topology hiding)."""
        tx = held.tx
        if held.kind == "response":
            held.message.set_body(b"")
            held.message.remove("content-type")
            return self._go_on(held, now)
        assert isinstance(tx, ServerTransaction) and isinstance(held.message, Request)
        if held.kind == "start":
            self._external_end(held.call)
        return list(tx.respond(self._response(held.message, status, reason), now))

    def _external_end(self, call: str) -> None:
        if self._external is not None and call:
            self._external.ended.append(call)

    # -- transport rules ---------------------------------------------------------------------


def _asks_for_sips(req: Request) -> bool:
    """Whether the Request-URI, or the top Route the request goes to next, is sips:."""
    uri = req.uri
    if isinstance(uri, SipUri) and uri.secure:
        return True
    if "route" not in req:
        return False
    try:
        routes = req.name_addrs("route")
        top = routes[0].uri if routes else None
    except (ParseError, ValueError):
        return False  # the routing answers a malformed Route
    return isinstance(top, SipUri) and top.secure


@dataclass(slots=True)
class _Held:
    """A message waiting for its SDP from the call's rtpengine node: a new INVITE
    ("start"), an offer within a call ("dialog"), a response ("response")."""

    kind: str
    tx: ServerTransaction | ClientTransaction
    message: Request | Response
    flow: Flow | None = None
    target: Target | None = None
    call: str = ""


def _has_sdp(msg: Message) -> bool:
    return bool(msg.body) and _is_sdp(msg.content_type)


def _stale(resp: Response) -> bool:
    """Whether a challenge says the credentials' nonce was stale (RFC 2617 3.2.1)."""
    challenge = resp.get("www-authenticate") or resp.get("proxy-authenticate") or ""
    return "stale=true" in challenge.lower().replace(" ", "").replace('"', "")


def _auth_key(msg: Message) -> str:
    """Which request a response answers, for the guard's authentication count: Call-ID,
    CSeq and the top Via branch (RFC 3261 17.2.3), so that guesses sent in parallel under
    one Call-ID and CSeq (svcrack reuses both) are each counted."""
    try:
        via = msg.top_via
    except ParseError:
        via = None
    branch = via.branch if via is not None else None
    return f"{msg.get('call-id')}\n{msg.get('cseq')}\n{branch}"


def _tag_for(req: Request) -> str:
    """A To tag that is the same for every response of one transaction (RFC 3261 8.2.6.2)."""
    seed = (req.get("via"), req.get("call-id"), req.get("cseq"), _TAG_SALT)
    return format(hash(seed) & 0xFFFFFFFFFFFF, "012x")


_TAG_SALT = secrets.token_hex(8)


def earliest(a: float | None, b: float | None) -> float | None:
    """The earlier of two deadlines, either of which may be None (no deadline)."""
    if a is None:
        return b
    if b is None or a <= b:
        return a
    return b
