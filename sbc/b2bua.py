"""Calls through the SBC: a back-to-back user agent (sans-I/O).

Every call is two dialogs joined by the SBC: the leg it received the request on
and the leg it sends its own request on, each with its own Call-ID, tags, CSeq space, Via,
Contact and route set (RFC 3261 12 per leg; the SBC is a UAS on one and a UAC on the
other, RFC 3261 6 "back-to-back user agent"). Requests and responses are mapped between
the legs; nothing that names the far side's topology crosses over.

- ``route`` decides where a new request goes: from a client to a backend (the balancer),
  from a backend to a registered client (the flow token in our Path, RFC 5626 5.3), or,
  without backends, to a client registered at the embedded registrar.
- ``start`` opens a call (INVITE, SUBSCRIBE, REFER) or relays a request that creates no
  dialog (MESSAGE, OPTIONS, PUBLISH, NOTIFY ...) with fresh ids.
- ``in_dialog`` / ``receive_ack`` / ``cancel`` handle what arrives within a call.
- Each fork of the core leg (a new To tag, RFC 3261 13.2.2.4) gets its own early dialog on
  the other leg; the first 2xx wins, a later 2xx from another fork is ACKed and BYEd.
- The SDP passes through ``MediaSeam`` (the media relay fills it in).

The core feeds it client-transaction events (``on_response``, ``on_timeout``, ``forget``)
and timers (``next_deadline``, ``handle_timer``); it returns transaction outputs.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from sbc.deadlines import Deadlines
from sbc.features.balancer import BackendState
from sbc.features.registrar import aor_of
from sbc.media import dtmf
from sbc.media.control import Dtmf
from sbc.media.session import MediaRefused, TranscodeCounts
from sbc.relay import BackendRelay
from sbc.sides import ACCESS, CORE, PEER, Side
from sbc.sip.dialog import Dialog, DialogKey, uac_dialog, uas_dialog, without_tag
from sbc.sip.flow import Flow, format_address, format_host
from sbc.sip.headers import NameAddr, parse_name_addr
from sbc.sip.message import ParseError, Request, Response, make_response
from sbc.sip.transaction import (
    ClientTransaction,
    InviteServerTransaction,
    Output,
    Send,
    ServerTransaction,
    Timers,
    TransactionLayer,
    TransactionState,
    cancel_request,
    new_branch,
)
from sbc.sip.uri import SipUri

log = logging.getLogger("sbc.calls")


# Methods whose request creates a dialog through the SBC (RFC 3261 12, RFC 6665, RFC 3515).
DIALOG_METHODS = frozenset({"INVITE", "SUBSCRIBE", "REFER"})
# Methods whose request and 2xx carry the sender's Contact (target refresh, RFC 3261 12.2,
# RFC 3311 5.2, RFC 6665 4.1.2, RFC 3515 2.4.6).
CONTACT_METHODS = frozenset({"INVITE", "UPDATE", "SUBSCRIBE", "NOTIFY", "REFER"})
# Header fields that belong to one leg and are never copied to the other: the SBC writes
# its own (RFC 3261 8.1.1, 12.2.1.1), or recomputes them (Content-Length, RAck).
LEG_HEADERS = frozenset({
    "via", "from", "to", "call-id", "cseq", "contact", "record-route", "route",
    "max-forwards", "content-length", "path", "service-route", "rack",
})  # fmt: skip
# Header fields that can name the core's hosts, removed towards clients (topology hiding):
# the SBC puts its own Server; Warning names the warn-agent (RFC 3261
# 20.43); Error-Info points into the core (20.18).
CORE_TOPOLOGY_HEADERS = frozenset({"server", "warning", "error-info"})


class MediaSeam(Protocol):
    """Where the SDP of each offer and answer is rewritten for the media relay:
    ``sides`` are the caller's and the callee's side, ``toward_caller`` the direction.
    ``offer`` raises MediaRefused for an offer that cannot be met (answered 488)."""

    def offer(self, call: str, sides: tuple[Side, Side], toward_caller: bool, body: bytes,
              content_type: str | None) -> bytes: ...  # fmt: skip

    def answer(self, call: str, sides: tuple[Side, Side], toward_caller: bool, body: bytes,
               content_type: str | None) -> bytes: ...  # fmt: skip

    def rejected(self, call: str) -> None: ...

    def release(self, call: str) -> bool: ...  # True: statistics will follow (media_stats)

    # A DTMF digit from SIP INFO: True if the relay sends it as RFC 4733 events instead.
    def dtmf_info(self, call: str, from_caller: bool, digit: str, duration_ms: int) -> bool: ...

    # A Warning value saying why the pending offer may have been refused (488/606), or None.
    def refused_warning(self, call: str) -> str | None: ...

    def transcoded(self, call: str) -> int: ...  # the call's streams transcoded at some time

    def transcoding(self) -> TranscodeCounts: ...


class PassThroughMedia:
    """No media relay: the SDP passes unchanged (unit tests of the signalling alone)."""

    def offer(self, call: str, sides: tuple[Side, Side], toward_caller: bool, body: bytes,
              content_type: str | None) -> bytes:  # fmt: skip
        return body

    answer = offer

    def rejected(self, call: str) -> None:
        return None

    def release(self, call: str) -> bool:
        return False

    def dtmf_info(self, call: str, from_caller: bool, digit: str, duration_ms: int) -> bool:
        return False

    def refused_warning(self, call: str) -> str | None:
        return None

    def transcoded(self, call: str) -> int:
        return 0

    def transcoding(self) -> TranscodeCounts:
        return TranscodeCounts()


@dataclass(frozen=True, slots=True, kw_only=True)
class CallPolicy:
    """[calls]: admission limits, timeouts and header stripping."""

    max_calls: int = 0  # concurrent calls in all; 0: no limit
    max_calls_per_source: int = 0  # per source address of the caller; 0: no limit
    no_answer_timeout: float = 180.0  # no final answer by then: 408 and CANCEL
    max_duration: float = 0.0  # an answered call is ended with BYE after this; 0: never
    retry_after: int = 5  # Retry-After of the 503 for calls over a limit
    strip_headers: tuple[str, ...] = ()  # lower-case names, "p-*" strips every P- header
    keep_records: bool = True  # collect a JSON line per call in ``B2bua.records``
    # Towards the core, this header names the client's real address ("ip:port;transport=");
    # the same header from a client is removed first (it cannot be spoofed). None: not sent.
    client_address_header: str | None = None


DEFAULT_POLICY = CallPolicy()


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerRoute:
    """A peer SBC and the calls that go to it ([[peers]])."""

    name: str
    host: str
    port: int
    transport: str = "tls"
    domains: frozenset[str] = frozenset()  # lower-case Request-URI hosts
    prefixes: tuple[str, ...] = ()  # Request-URI user part prefixes (numbers)
    tls_name: str = ""  # the name its certificate carries (mutual TLS); "": ``host``

    def matches(self, uri: SipUri) -> bool:
        if uri.host_bare in self.domains:
            return True
        user = uri.user
        return user is not None and any(user.startswith(p) for p in self.prefixes)


@dataclass(frozen=True, slots=True)
class Target:
    """Where a new request goes: the flow, its Request-URI, the side, the backend if any."""

    flow: Flow
    uri: str
    side: Side
    backend: BackendState | None = None


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    reason: str
    headers: tuple[tuple[str, str], ...] = ()


class Leg:
    """One UA's side of a call: its dialog, the flow it is reached on, our Contact there."""

    __slots__ = (
        "ack_dest", "ack_pending", "ack_sent", "call", "caller", "contact", "dialog", "flow",
        "invite_cseq", "invite_in", "invite_out", "peer", "retransmit", "side", "update_out",
    )  # fmt: skip

    def __init__(
        self, call: Call, side: Side, flow: Flow, dialog: Dialog, contact: str, caller: bool
    ) -> None:
        self.call = call
        self.caller = caller  # the caller's leg (the dialog the call came in on)
        self.side = side
        self.flow = flow
        self.dialog = dialog
        self.contact = contact
        self.peer: Leg | None = None
        self.invite_cseq = 0  # CSeq number of the last INVITE on this leg (sent or received)
        self.invite_in: ServerTransaction | None = None  # a (re-)INVITE being answered
        self.invite_out: ClientTransaction | None = None  # a re-INVITE sent, unanswered
        self.update_out: ClientTransaction | None = None
        self.ack_pending: int | None = None  # UAC: a 2xx to this INVITE CSeq awaits our ACK
        self.ack_sent: Request | None = None  # UAC: the ACK sent (re-sent on 2xx retransmission)
        self.ack_dest: Flow | None = None  # where that ACK went
        self.retransmit: _Retransmit | None = None  # UAS: our 2xx, until the ACK comes

    def __repr__(self) -> str:
        return f"<Leg {self.side} {self.dialog.key}>"


@dataclass(slots=True)
class _Retransmit:
    """RFC 3261 13.3.1.4: the UAS core re-sends its 2xx at T1, 2T1 ... T2 until the ACK, and
    gives up (ending the call with BYE) after 64*T1."""

    tx: ServerTransaction
    response: Response
    cseq: int
    interval: float
    give_up: float


class Call:
    """A call (or a subscription, or a lone transaction): the legs and their state."""

    def __init__(
        self,
        *,
        call_id: str,
        method: str,
        a_flow: Flow,
        a_side: Side,
        a_tx: ServerTransaction,
        a_request: Request,
        target: Target,
        now: float,
    ) -> None:
        self.id = call_id  # our own id: the user part of our Contacts and in the records
        self.method = method
        self.a_flow = a_flow
        self.a_side = a_side
        self.a_tx: ServerTransaction | None = a_tx
        self.a_request = a_request
        self.target = target
        self.b_request: Request | None = None
        self.b_tx: ClientTransaction | None = None
        self.forks: dict[str, Leg] = {}  # core-leg remote tag -> that fork's leg
        self.legs: list[Leg] = []
        self.confirmed: tuple[Leg, Leg] | None = None  # (caller's leg, callee's leg)
        self.a_tag = secrets.token_hex(6)  # our To tag towards the caller for untagged 1xx
        self.state = "early"  # early -> confirmed -> ended
        self.cancelled = False
        self.cancel_wanted = False  # a CANCEL waits for the first provisional (RFC 3261 9.1)
        self.provisional = False
        self.started = now
        self.answered: float | None = None
        self.ended: float | None = None
        self.cause = ""
        self.status: int | None = None
        self.tried: tuple[str, ...] = ()  # backends the request was sent to, in order
        self.timers: set[str] = set()  # the names of its armed timers (B2bua._deadlines)
        self.counted_backend: BackendState | None = None
        self.transcoded = 0  # streams the media relay transcoded (the record)

    @property
    def source(self) -> str:
        return self.a_flow.remote[0]

    def __repr__(self) -> str:
        return f"<Call {self.id} {self.method} {self.state}>"


@dataclass(slots=True)
class _Initial:
    call: Call


@dataclass(slots=True)
class _Mapped:
    """A request forwarded within a call: answer ``tx`` (from ``origin``) with what comes back."""

    tx: ServerTransaction
    origin: Leg
    dest: Leg
    method: str
    cseq: int
    final: bool = False


@dataclass(slots=True)
class _Own:
    """A request the SBC sends itself (BYE, CANCEL): answers are only logged."""

    call: Call
    method: str


Work = _Initial | _Mapped | _Own


class B2bua:
    def __init__(
        self,
        *,
        transactions: TransactionLayer,
        relay: BackendRelay,
        policy: CallPolicy = DEFAULT_POLICY,
        peers: tuple[PeerRoute, ...] = (),
        media: MediaSeam | None = None,
        key: bytes | None = None,
    ) -> None:
        self.transactions = transactions
        self.relay = relay
        self.set_policy(policy, peers)
        self.draining = False  # SIGTERM: no new calls, the others go on
        self.media: MediaSeam = media or PassThroughMedia()
        self._key = key or secrets.token_bytes(16)
        self.calls: dict[str, Call] = {}
        self._dialogs: dict[DialogKey, Leg] = {}
        self._b_pending: dict[tuple[str, str], Call] = {}  # (Call-ID, our From tag) of leg B
        self._server: dict[ServerTransaction, Call | Leg] = {}  # INVITEs we may see CANCELed
        self._work: dict[ClientTransaction, Work] = {}
        self._deadlines: Deadlines[tuple[Call, str]] = Deadlines()
        self._per_source: Counter[str] = Counter()
        self.active_calls = 0  # INVITE calls not ended (admission, metrics)
        self.records: list[str] = []  # one JSON line per ended call
        self._awaiting_stats: dict[str, Call] = {}  # ended calls whose media stats are due
        self.stats: Counter[str] = Counter()

    def set_policy(self, policy: CallPolicy, peers: tuple[PeerRoute, ...]) -> None:
        """[calls] and [[peers]], at start and on a reload: calls in
        progress keep their legs; limits, stripped headers and peer routes apply to what
        comes next."""
        self.policy = policy
        self.peers = peers
        self._peer_hosts = {(p.transport, p.host.lower()) for p in peers}
        header = policy.client_address_header
        # What is not copied to the other leg, per side it goes to.
        base = LEG_HEADERS | {p for p in policy.strip_headers if not p.endswith("*")}
        if header is not None:
            base |= {header.lower()}  # only the SBC writes it; a client's copy is dropped
        hidden = base | CORE_TOPOLOGY_HEADERS
        self._skip = {CORE: frozenset(base), ACCESS: frozenset(hidden), PEER: frozenset(hidden)}
        # A 3xx keeps its Contact list: the redirect targets are for the caller.
        self._skip_3xx = {side: skip - {"contact"} for side, skip in self._skip.items()}
        self._skip_prefixes = tuple(p[:-1] for p in policy.strip_headers if p.endswith("*"))

    @property
    def timers(self) -> Timers:
        return self.transactions.timers

    def __len__(self) -> int:
        return len(self.calls)

    def state_size(self) -> dict[str, int]:
        """What the B2BUA holds, for leak checks: all zero once every call is over."""
        return {
            "calls": len(self.calls),
            "dialogs": len(self._dialogs),
            "pending": len(self._b_pending),
            "server": len(self._server),
            "work": len(self._work),
            "sources": len(self._per_source),
            "awaiting_stats": len(self._awaiting_stats),
            "timers": self._deadlines.entries,
        }

    def owns(self, tx: ClientTransaction) -> bool:
        return tx in self._work

    def owns_server(self, tx: ServerTransaction) -> bool:
        return tx in self._server

    # -- routing -----------------------------------------------------------------------------
    def side_of(self, flow: Flow) -> Side:
        """Which side a flow is on: a peer SBC, the core (backends), or the access side."""
        if (flow.transport, flow.remote[0].lower()) in self._peer_hosts:
            return PEER
        return CORE if self.relay.is_core_flow(flow) else ACCESS

    def _peer_for(self, req: Request) -> PeerRoute | None:
        uri = req.uri
        if not isinstance(uri, SipUri):
            return None
        return next((p for p in self.peers if p.matches(uri)), None)

    def route(
        self, req: Request, flow: Flow, now: float, alive: Callable[[Flow], bool]
    ) -> Target | Refusal:
        where = self._route(req, flow, now, alive)
        uri = req.uri
        if (
            isinstance(where, Target)
            and where.flow.transport != "tls"
            and isinstance(uri, SipUri)
            and uri.secure
        ):
            # RFC 5630 5.3: a SIPS request is never sent on over a hop that is not TLS
            # (no last-hop exception); 480 with warn-code 380 (RFC 5630 9).
            self.stats["refused_sips_next_hop"] += 1
            return Refusal(480, "SIPS Not Allowed", (("Warning", '380 sbc "SIPS Not Allowed"'),))
        return where

    def _route(
        self, req: Request, flow: Flow, now: float, alive: Callable[[Flow], bool]
    ) -> Target | Refusal:
        relay = self.relay
        side = self.side_of(flow)
        peer = self._peer_for(req) if side != PEER else None
        if peer is not None:
            # SBC-to-SBC peering: the Request-URI's domain or number belongs to a peer.
            out = relay.flow_for(peer.transport, (peer.host, peer.port))
            if out is None:
                return Refusal(503, "No Route To Peer", (("Retry-After", "10"),))
            return Target(out, req.uri_text, PEER)
        if side == CORE:
            # From a backend: our Path in the top Route names the registered client's flow.
            client = relay.client_flow(req)
            if client is None:
                return Refusal(404, "Not Found")
            if not alive(client) or not relay.has_flow(client):
                return Refusal(430, "Flow Failed")  # RFC 5626 5.3
            return Target(client, req.uri_text, ACCESS)
        if relay.balancer.backends:
            # From a client: to the backend holding the caller's registration, which is the
            # one its AOR hashes to, unless another algorithm is configured.
            frm = req.from_
            aor = (aor_of(frm) if frm is not None else None) or req.uri_text
            backend = relay.balancer.pick_for_dialog(aor)
            out = relay.flow_to(backend) if backend is not None else None
            if backend is None or out is None:
                retry = (("Retry-After", "10"),)
                return Refusal(503, "No Backend Available", retry)
            # The Request-URI the client authenticated is kept.
            return Target(out, req.uri_text, CORE, backend)
        found = relay.local_target(req, now)
        if found is None:
            return Refusal(404, "Not Found")
        client, contact = found
        if not alive(client):
            return Refusal(430, "Flow Failed")
        return Target(client, str(contact) if contact is not None else req.uri_text, ACCESS)

    # -- a new request -----------------------------------------------------------------------
    def start(
        self, tx: ServerTransaction, req: Request, flow: Flow, target: Target, now: float
    ) -> list[Output]:
        method = req.method
        a_side = self.side_of(flow)
        if method == "INVITE":
            refusal = self._admit(flow)
            if refusal is not None:
                self.stats["calls_refused"] += 1
                return self._answer(tx, refusal.status, refusal.reason, refusal.headers, now)
        frm, to, cseq, call_id = req.from_, req.to, req.cseq, req.call_id
        if frm is None or to is None or cseq is None or call_id is None:
            return self._answer(tx, 400, "Missing Dialog Headers", (), now)
        call = Call(
            call_id=secrets.token_hex(8), method=method, a_flow=flow, a_side=a_side, a_tx=tx,
            a_request=req, target=target, now=now,
        )  # fmt: skip
        # The other leg's ids are derived from the caller's and the target, so a request
        # sent again with credentials after a 401/407 (same Call-ID and From tag, CSeq + 1,
        # RFC 3261 22.2) reaches the backend in the same Call-ID with a higher CSeq, while
        # the branches of a forked request (same Call-ID, another contact or flow) become
        # calls with ids of their own (8.1.1.4; a UA reached twice would see a merged
        # request, 8.2.2.2). Nothing of the caller's ids crosses over (topology hiding).
        where = f"{target.uri}\x00{target.flow}"
        b_call_id = self._derive("call-id", call_id, where) + "@sbc"
        b_tag = self._derive("tag", call_id, frm.tag or "", where)[:16]
        fwd = Request(method, target.uri)
        self._add_via(fwd, target.flow)
        mf = req.max_forwards
        fwd.add("Max-Forwards", str(70 if mf is None else mf - 1))
        fwd.add("From", _with_tag(frm, b_tag))
        fwd.add("To", _with_tag(to, None))
        fwd.add("Call-ID", b_call_id)
        fwd.add("CSeq", f"{cseq.seq} {method}")
        if method in DIALOG_METHODS or "contact" in req:
            fwd.add("Contact", self._contact(call, target.flow))
        self._copy_headers(req, fwd, target.side)
        replaces = fwd.get("replaces")
        if replaces is not None:
            fwd.set("Replaces", self._map_replaces(replaces, target.flow))
        header = self.policy.client_address_header
        if header is not None and a_side == ACCESS and target.side == CORE:
            # Topology hiding: the backend sees the SBC, and the client's address only here.
            host, port = flow.remote
            fwd.add(header, f"{format_host(host)}:{port};transport={flow.transport}")
        try:
            self._copy_body(call, req, fwd, False)
        except MediaRefused as exc:
            self.media.release(call.id)
            self.stats["calls_refused_media"] += 1
            return self._answer(tx, 488, str(exc), (), now)  # RFC 3261 21.4.26
        b_tx, out = self.transactions.send_request(
            fwd, dest=target.flow, reliable=target.flow.reliable, now=now
        )
        call.b_request = fwd
        call.b_tx = b_tx
        self._work[b_tx] = _Initial(call)
        self.calls[call.id] = call
        if method in DIALOG_METHODS:
            self._b_pending[(b_call_id, b_tag)] = call
        if isinstance(tx, InviteServerTransaction):
            self._server[tx] = call
        if method == "INVITE":
            self._per_source[call.source] += 1
            self.active_calls += 1
            if target.backend is not None:
                self.relay.balancer.dialog_started(target.backend)
                call.counted_backend = target.backend
            if self.policy.no_answer_timeout > 0:
                self._set_timer(call, "no_answer", now + self.policy.no_answer_timeout)
            self.stats["calls_started"] += 1  # an INVITE call, to a backend, client or peer
        if target.backend is not None:
            # Nothing at all from the backend by then (not even 100 Trying): the next one.
            call.tried = (target.backend.name,)
            self._set_timer(call, "failover", now + self.relay.request_timeout)
        log.info(
            "%s to %s", method, target.side,
            extra={"call": call.id, "call_id": call_id, "flow": str(target.flow)},
        )  # fmt: skip
        return out

    def _map_replaces(self, value: str, target: Flow) -> str:
        """RFC 3891 (attended transfer): Replaces names a dialog by the ids of the leg the
        INVITE came from; the far UA knows it by the other leg's ids. Both tag orders are
        tried; when two legs match (a call that left and re-entered the SBC through a
        proxy), the one whose other leg faces ``target`` wins. Unknown dialogs pass as
        they are (the far end answers 481)."""
        call_id, _, rest = value.partition(";")
        params = [p.strip() for p in rest.split(";") if p.strip()]
        tags = {k.lower(): v for k, _, v in (p.partition("=") for p in params)}
        to_tag, from_tag = tags.get("to-tag"), tags.get("from-tag")
        if not to_tag or not from_tag:
            return value
        found: list[tuple[Leg, bool]] = []
        for local, remote, swapped in ((to_tag, from_tag, False), (from_tag, to_tag, True)):
            leg = self._dialogs.get((call_id.strip(), local, remote))
            if leg is not None and leg.peer is not None:
                found.append((leg, swapped))
        if not found:
            return value
        leg, swapped = next(
            ((g, s) for g, s in found if g.peer and g.peer.flow == target), found[0]
        )
        assert leg.peer is not None
        other = leg.peer.dialog
        # to-tag is the local tag of the UA that gets the INVITE (RFC 3891 3): on leg L the SBC
        # stands in for that UA, so a to-tag equal to L's local tag becomes the far UA's own
        # tag on the other leg, which is that leg's remote tag.
        new_to, new_from = (other.local_tag, other.remote_tag) if swapped else (
            other.remote_tag, other.local_tag)  # fmt: skip
        extra = "".join(f";{p}" for p in params if p.partition("=")[0].lower() not in
                        ("to-tag", "from-tag"))  # fmt: skip
        self.stats["replaces_mapped"] += 1
        return f"{other.call_id};to-tag={new_to};from-tag={new_from}{extra}"

    def _admit(self, flow: Flow) -> Refusal | None:
        """503 with Retry-After over the overall or per-source call limit."""
        p = self.policy
        retry = (("Retry-After", str(p.retry_after)),)
        if self.draining:
            # Shutting down: RFC 3261 21.5.4, another SBC or later.
            return Refusal(503, "Shutting Down", retry)
        if p.max_calls and self.active_calls >= p.max_calls:
            return Refusal(503, "Too Many Calls", retry)
        if p.max_calls_per_source and self._per_source[flow.remote[0]] >= p.max_calls_per_source:
            return Refusal(503, "Too Many Calls From Source", retry)
        return None

    # -- responses to what we sent -----------------------------------------------------------
    def on_response(self, tx: ClientTransaction, resp: Response, now: float) -> list[Output]:
        work = self._work.get(tx)
        if isinstance(work, _Initial):
            return self._initial_response(work.call, resp, now)
        if isinstance(work, _Mapped):
            return self._mapped_response(work, resp, now)
        if isinstance(work, _Own) and work.method == "INFO" and resp.status >= 300:
            # Our own INFO (DTMF interworking) refused: 415/501 (the UA takes no such
            # INFO, RFC 6086 4.2.2), 481 ... counted and logged; the call goes on.
            self.stats["dtmf_info_failed"] += 1
            log.warning(
                "DTMF INFO answered %d %s", resp.status, resp.reason,
                extra={"call": work.call.id},
            )  # fmt: skip
        return []

    def _initial_response(self, call: Call, resp: Response, now: float) -> list[Output]:
        status = resp.status
        self._cancel_timer(call, "failover")  # the backend is alive
        if status == 100:
            return []  # hop by hop (RFC 3261 16.7 step 5); our own 100 went to the caller
        try:
            to = resp.to
        except ParseError:
            to = None
        tag = to.tag if to is not None else None
        leg: Leg | None = None
        out: list[Output] = []
        if tag and status < 300 and call.method in DIALOG_METHODS:
            leg = call.forks.get(tag)
            if leg is None and call.state == "ended":
                if status < 200:
                    return self._send_cancel(call, now) if call.cancel_wanted else []
                return self._kill_fork(call, tag, resp, now)
            if leg is None:
                try:
                    leg = self._fork(call, resp)
                except ParseError:
                    leg = None
            elif 200 <= status < 300:
                # RFC 3261 12.1.2 / 13.2.2.4: the 2xx sets the route set and target.
                leg.dialog.route_set = [str(r) for r in reversed(resp.name_addrs("record-route"))]
                leg.dialog.refresh_target(resp)
        if status < 200:
            call.provisional = True
            if call.cancel_wanted:
                call.cancel_wanted = False
                out += self._send_cancel(call, now)
            if call.state == "ended" or call.a_tx is None:
                return out
            a_tag = leg.peer.dialog.local_tag if leg is not None and leg.peer else call.a_tag
            mapped = self._map_response(
                resp, call.a_request, call.a_side, a_tag, call, self._contact(call, call.a_flow)
            )
            return out + call.a_tx.respond(mapped, now)
        if status < 300:
            return out + self._answered(call, leg, resp, now)
        # 300-699: the call failed (the transaction ACKed it, RFC 3261 17.1.1.3).
        call.status = status
        if call.a_tx is not None and not call.cancelled and call.state != "ended":
            mapped = self._map_response(resp, call.a_request, call.a_side, call.a_tag, call, None)
            self._media_warning(call, mapped)
            out += call.a_tx.respond(mapped, now)
        if call.state != "ended":
            self._finish(call, f"{status} {resp.reason}", now)
        return out

    def _answered(self, call: Call, leg: Leg | None, resp: Response, now: float) -> list[Output]:
        """A 2xx to the request that opened the call."""
        if call.method not in DIALOG_METHODS:
            # A request that creates no dialog: answer and forget (MESSAGE, OPTIONS ...).
            out: list[Output] = []
            if call.a_tx is not None and call.state != "ended":
                mapped = self._map_response(
                    resp,
                    call.a_request,
                    call.a_side,
                    call.a_tag,
                    call,
                    self._contact(call, call.a_flow),
                )
                out = call.a_tx.respond(mapped, now)
                call.status = resp.status
                self._finish(call, f"{resp.status} {resp.reason}", now)
            return out
        if leg is None or leg.peer is None:
            return []  # a 2xx we cannot make a dialog of (no To tag): nothing to confirm
        if call.confirmed is not None and call.confirmed[1] is leg:
            # RFC 6026 7.2 / RFC 3261 13.2.2.4: a retransmitted 2xx is ACKed again.
            return self._resend_ack(leg, resp)
        if call.cancelled or call.state == "ended" or call.confirmed is not None:
            # Too late (CANCELed, or another fork answered first): ACK and BYE this one
            # (RFC 3261 9.1 race; 13.2.2.4 for more than one 2xx).
            return self._ack_and_bye(call, leg, resp, now)
        a_leg = leg.peer
        call.confirmed = (a_leg, leg)
        call.state = "confirmed"
        call.answered = now
        call.status = resp.status
        self._cancel_timer(call, "no_answer")
        for tag, other in list(call.forks.items()):
            if other is not leg:
                # The other early dialogs end with the 2xx (RFC 3261 13.2.2.4).
                self._unindex(other)
                if other.peer is not None:
                    self._unindex(other.peer)
                del call.forks[tag]
        call.legs = [a_leg, leg]
        self._b_pending.pop((leg.dialog.call_id, leg.dialog.local_tag), None)
        if self.policy.max_duration > 0 and call.method == "INVITE":
            self._set_timer(call, "max_duration", now + self.policy.max_duration)
        if call.method == "INVITE":
            leg.ack_pending = leg.invite_cseq  # the INVITE's CSeq, set when the fork began
            self._session_timer(call, resp, now)
            self.stats["calls_answered"] += 1
        elif call.method == "SUBSCRIBE":
            self._subscription_expiry(call, resp, now)
        mapped = self._map_response(
            resp, call.a_request, call.a_side, a_leg.dialog.local_tag, call, a_leg.contact
        )
        a_tx = call.a_tx
        call.a_tx = None
        if a_tx is None:
            return []
        self._server.pop(a_tx, None)
        if call.method == "INVITE":
            self._start_retransmit(call, a_leg, a_tx, mapped, now)
        log.info("call answered", extra={"call": call.id, "call_id": call.a_request.call_id})
        return a_tx.respond(mapped, now)

    def _fork(self, call: Call, resp: Response) -> Leg:
        """A response with a new To tag: an early dialog on the callee's leg, and one with a
        To tag of its own on the caller's leg."""
        assert call.b_request is not None
        tag = resp.to.tag if resp.to is not None else ""
        b_dialog = uac_dialog(call.b_request, resp)
        a_dialog = uas_dialog(
            call.a_request,
            local_tag=call.a_tag if not call.forks else secrets.token_hex(6),
            local_seq=secrets.randbelow(10_000),
        )
        b_leg = Leg(call, call.target.side, call.target.flow, b_dialog,
                    self._contact(call, call.target.flow), False)  # fmt: skip
        a_leg = Leg(call, call.a_side, call.a_flow, a_dialog, self._contact(call, call.a_flow),
                    True)  # fmt: skip
        a_leg.peer, b_leg.peer = b_leg, a_leg
        if call.method == "INVITE":
            a_leg.invite_cseq = a_dialog.remote_seq or 0
            b_leg.invite_cseq = b_dialog.local_seq
        call.forks[tag or ""] = b_leg
        call.legs += [a_leg, b_leg]
        self._dialogs[a_dialog.key] = a_leg
        self._dialogs[b_dialog.key] = b_leg
        return b_leg

    def _kill_fork(self, call: Call, tag: str, resp: Response, now: float) -> list[Output]:
        """A 2xx for a call already over: ACK it and end that dialog at once (RFC 3261 15).
        The leg is kept with the call (not indexed) so a retransmitted 2xx is ACKed again."""
        assert call.b_request is not None
        try:
            dialog = uac_dialog(call.b_request, resp)
        except ParseError:
            return []
        leg = Leg(call, call.target.side, call.target.flow, dialog, "", False)
        call.forks[tag] = leg
        return self._ack_and_bye(call, leg, resp, now)

    def _ack_and_bye(self, call: Call, leg: Leg, resp: Response, now: float) -> list[Output]:
        if leg.ack_sent is not None:
            return self._resend_ack(leg, resp)
        cseq = resp.cseq.seq if resp.cseq is not None else leg.dialog.local_seq
        out = self._send_ack(leg, cseq, None)
        out += self._send_bye(
            call, leg, now, reason='SIP;cause=200;text="Call completed elsewhere"'
        )
        self._unindex(leg)
        self.stats["late_2xx_ended"] += 1
        return out

    def _resend_ack(self, leg: Leg, resp: Response) -> list[Output]:
        ack = leg.ack_sent
        cseq = resp.cseq
        if ack is None or cseq is None or ack.cseq is None or ack.cseq.seq != cseq.seq:
            return []
        return [Send(message=ack, dest=leg.ack_dest or leg.flow)]

    def _mapped_response(self, work: _Mapped, resp: Response, now: float) -> list[Output]:
        status = resp.status
        if status == 100:
            return []
        origin, dest, method = work.origin, work.dest, work.method
        call = origin.call
        if work.final:
            if method == "INVITE" and 200 <= status < 300:
                return self._resend_ack(dest, resp)  # a retransmitted 2xx (RFC 6026 7.2)
            return []
        if status >= 200:
            work.final = True
            if method == "INVITE":
                dest.invite_out = None
                origin.invite_in = None
                self._server.pop(work.tx, None)
            elif method == "UPDATE":
                dest.update_out = None
        ok = 200 <= status < 300
        if ok and method in ("INVITE", "UPDATE"):
            dest.dialog.refresh_target(resp)  # RFC 3261 12.2.1.2, RFC 3311 5.2
            self._session_timer(call, resp, now)
        mapped = self._map_response(
            resp,
            work.tx.request,
            origin.side,
            origin.dialog.local_tag,
            call,
            origin.contact,
            toward_caller=origin.caller,
        )
        if status >= 300 and method in ("INVITE", "UPDATE") and work.tx.request.body:
            self._media_warning(call, mapped)
            self.media.rejected(call.id)  # RFC 3264 8: a refused re-offer changes nothing
        out: list[Output] = []
        if method == "INVITE" and ok:
            dest.ack_pending = work.cseq
            dest.ack_sent = None
            self._start_retransmit(call, origin, work.tx, mapped, now)
        out += work.tx.respond(mapped, now)
        if status < 200:
            return out
        if method == "NOTIFY" and ok and _subscription_terminated(work.tx.request):
            if call.method in ("SUBSCRIBE", "REFER") and call.state != "ended":
                self._finish(call, "subscription terminated", now)
        elif method == "SUBSCRIBE" and ok and call.method == "SUBSCRIBE":
            self._subscription_expiry(call, resp, now)  # a refresh extends it (RFC 6665 4.1.2.1)
        elif status in (408, 481) and call.state != "ended":
            # RFC 3261 12.2.1.2: the dialog is gone on that side; end the other one too.
            out += self._end_call(call, f"{status} on {method}", now, skip=dest, code=status)
        return out

    def on_timeout(self, tx: ClientTransaction, now: float) -> list[Output]:
        work = self._work.pop(tx, None)
        if isinstance(work, _Initial):
            call = work.call
            out: list[Output] = []
            if call.target.backend is not None:
                # A transaction timeout towards a backend is a failure.
                out += self.relay.report_failure(
                    call.target.backend, f"{call.method} timed out", now
                )
            if call.a_tx is not None and not call.cancelled and call.state != "ended":
                reason = "Backend Timeout" if call.target.side == CORE else "Client Timeout"
                out += self._answer(call.a_tx, 408, reason, (), now)
            if call.state != "ended":
                self._finish(call, "timeout", now)
            return out
        if isinstance(work, _Mapped) and not work.final:
            call = work.origin.call
            out = self._answer(work.tx, 408, "Request Timeout", (), now)
            if work.method == "INVITE":
                work.dest.invite_out = None
                work.origin.invite_in = None
            if call.state != "ended":
                cause = f"{work.method} timed out"
                out += self._end_call(call, cause, now, skip=work.dest, code=408)
            return out
        if isinstance(work, _Own) and work.method == "INFO":
            self.stats["dtmf_info_failed"] += 1
            log.warning("DTMF INFO timed out", extra={"call": work.call.id})
        return []

    def forget(self, tx: ClientTransaction) -> None:
        self._work.pop(tx, None)

    def server_gone(self, tx: ServerTransaction) -> None:
        self._server.pop(tx, None)

    # -- requests within a call --------------------------------------------------------------
    @staticmethod
    def _dialog_key(req: Request) -> DialogKey | None:
        """The dialog a request within one names, as seen by us (RFC 3261 12.2.2): Call-ID,
        To tag (ours), From tag (the peer's)."""
        to, frm, call_id = req.to, req.from_, req.call_id
        if to is None or frm is None or to.tag is None or call_id is None:
            return None
        return (call_id, to.tag, frm.tag or "")

    def has_dialog(self, req: Request) -> bool:
        key = self._dialog_key(req)
        return key is not None and key in self._dialogs

    def in_dialog(
        self, tx: ServerTransaction, req: Request, flow: Flow, now: float
    ) -> list[Output]:
        key, cseq = self._dialog_key(req), req.cseq
        if key is None or cseq is None:
            return self._answer(tx, 400, "Missing Dialog Headers", (), now)
        leg = self._dialogs.get(key)
        if leg is None and req.method == "NOTIFY":
            leg = self._notify_fork(req, *key)
        if leg is None or leg.call.state == "ended" or leg.peer is None:
            # RFC 3261 12.2.2: no such dialog.
            return self._answer(tx, 481, None, (), now)
        call = leg.call
        method = req.method
        if not leg.dialog.accept_remote_cseq(cseq.seq):
            return self._answer(tx, 500, "CSeq Out of Order", (), now)  # RFC 3261 12.2.2
        peer = leg.peer
        if method == "BYE":
            return self._bye(tx, req, leg, now)
        if method == "INFO" and dtmf.is_dtmf(req.content_type) and call.confirmed is not None:
            # DTMF interworking: a digit from a party without telephone-event, for one with it,
            # goes on as RFC 4733 events; the INFO ends here (RFC 6086 4.2.2: 200).
            digit = dtmf.parse(req.content_type, req.body)
            if digit is not None and self.media.dtmf_info(call.id, leg.caller, *digit):
                self.stats["dtmf_info_to_rtp"] += 1
                return self._answer(tx, 200, None, (), now)
        if method == "INVITE":
            if leg.invite_out is not None or peer.invite_in is not None:
                return self._answer(tx, 491, None, (), now)  # RFC 3261 14.2: glare
            if leg.invite_in is not None or leg.retransmit is not None:
                retry = (("Retry-After", str(secrets.randbelow(10) + 1)),)
                return self._answer(tx, 500, "Previous INVITE Pending", retry, now)  # 14.2
            leg.dialog.refresh_target(req)
        if method == "UPDATE":
            if leg.update_out is not None or peer.update_out is not None:
                return self._answer(tx, 491, None, (), now)  # RFC 3311 5.2: glare
            leg.dialog.refresh_target(req)
        fwd, dest = self._within(peer, method)
        mf = req.max_forwards
        fwd.add("Max-Forwards", str(70 if mf is None else mf - 1))
        if method in CONTACT_METHODS:
            fwd.add("Contact", peer.contact)
        if method == "PRACK":
            rack = _mapped_rack(req.get("rack"), peer.invite_cseq)
            if rack is None:
                return self._answer(tx, 400, "Bad RAck", (), now)
            fwd.add("RAck", rack)  # RFC 3262 7.2, the CSeq number of this leg's INVITE
        self._copy_headers(req, fwd, peer.side)
        try:
            self._copy_body(call, req, fwd, peer.caller)
        except MediaRefused as exc:
            return self._answer(tx, 488, str(exc), (), now)  # the call goes on as it was
        seq = fwd.cseq.seq if fwd.cseq is not None else 0
        ctx, out = self.transactions.send_request(fwd, dest=dest, reliable=dest.reliable, now=now)
        self._work[ctx] = _Mapped(tx, leg, peer, method, seq)
        if method == "INVITE":
            leg.invite_in = tx
            leg.invite_cseq = cseq.seq
            peer.invite_out = ctx
            peer.invite_cseq = seq
            self._server[tx] = leg
        elif method == "UPDATE":
            peer.update_out = ctx
        self.stats[f"in_dialog:{method}"] += 1
        return out

    def _notify_fork(self, req: Request, call_id: str, local: str, remote: str) -> Leg | None:
        """RFC 6665 4.1.2.4: a NOTIFY may arrive before the 2xx to its SUBSCRIBE (or REFER)
        and creates the dialog itself."""
        call = self._b_pending.get((call_id, local))
        if call is None or call.method not in ("SUBSCRIBE", "REFER") or call.b_request is None:
            return None
        fake = make_response(call.b_request, 200, to_tag=remote)
        for contact in req.field_values("contact"):
            fake.add("Contact", contact)
        for rr in req.field_values("record-route"):
            fake.add("Record-Route", rr)
        try:
            leg = self._fork(call, fake)
        except ParseError:
            return None
        leg.dialog.route_set = list(reversed(leg.dialog.route_set))  # 12.1.1 order for requests
        return leg

    def _bye(self, tx: ServerTransaction, req: Request, leg: Leg, now: float) -> list[Output]:
        """RFC 3261 15: BYE from either side ends the call on both legs."""
        call = leg.call
        peer = leg.peer
        assert peer is not None
        if call.confirmed is None:
            # A BYE on an early dialog (RFC 3261 15): the caller gives up, or the callee does.
            out = self._answer(tx, 200, None, (), now)
            if call.forks.get(leg.dialog.remote_tag) is not leg:  # the caller's leg
                out += self._abandon(call, 487, "Request Terminated", now)
            else:
                out += self._abandon(call, 480, "Temporarily Unavailable", now, cancel=False)
            return out
        # RFC 3261 15.1.2: the session is over once a BYE is sent, so the BYE is answered at
        # once and the other leg gets a BYE of its own; the caller is not kept waiting on a
        # far end that may be gone (and a proxy in between, with a 5 s timer of its own, does
        # not turn a slow far end into a 408).
        call.cause = "BYE from " + ("caller" if leg is call.confirmed[0] else "callee")
        out = self._answer(tx, 200, None, (), now)
        if peer.ack_pending is not None:
            out += self._send_ack(peer, peer.ack_pending, None)  # RFC 3261 15: ACK, then BYE
        fwd, dest = self._within(peer, "BYE")
        mf = req.max_forwards
        fwd.add("Max-Forwards", str(70 if mf is None else mf - 1))
        self._copy_headers(req, fwd, peer.side)
        self._copy_body(call, req, fwd, peer.caller)
        ctx, sent = self.transactions.send_request(fwd, dest=dest, reliable=dest.reliable, now=now)
        self._work[ctx] = _Own(call, "BYE")
        self.stats["in_dialog:BYE"] += 1
        self._finish(call, call.cause, now)
        return out + sent

    def receive_ack(self, ack: Request, now: float) -> list[Output]:
        """An ACK for a 2xx (RFC 3261 13.2.2.4, 17.2.3: not part of any transaction): stop
        re-sending our 2xx on this leg and ACK the other leg's 2xx."""
        key, cseq = self._dialog_key(ack), ack.cseq
        if key is None or cseq is None:
            return []
        leg = self._dialogs.get(key)
        if leg is None or leg.peer is None:
            self.stats["stray_ack"] += 1
            return []
        rt = leg.retransmit
        if rt is None or rt.cseq != cseq.seq:
            return []  # a retransmitted ACK (absorbed), or one for an INVITE we never answered
        leg.retransmit = None
        self._cancel_timer(leg.call, self._rt_name(leg))
        peer = leg.peer
        if peer.ack_pending is None:
            return []
        self.stats["ack_relayed"] += 1
        return self._send_ack(peer, peer.ack_pending, ack)

    def _send_ack(self, leg: Leg, cseq: int, source: Request | None) -> list[Output]:
        """The UAC core's ACK for a 2xx (RFC 3261 13.2.2.4): same CSeq number, the dialog's
        route set, a new branch; a late SDP answer in the caller's ACK is carried over."""
        ack, dest = self._within(leg, "ACK", seq=cseq)
        mf = source.max_forwards if source is not None else None
        ack.add("Max-Forwards", str(70 if mf is None else max(mf - 1, 0)))  # RFC 3261 16.6
        if source is not None:
            self._copy_headers(source, ack, leg.side)
            self._copy_body(leg.call, source, ack, leg.caller)
        else:
            ack.add("Content-Length", "0")
        leg.ack_sent = ack
        leg.ack_dest = dest
        leg.ack_pending = None
        return [Send(message=ack, dest=dest)]

    # -- CANCEL (RFC 3261 9) -----------------------------------------------------------------
    def cancel(self, target: ServerTransaction, now: float) -> list[Output]:
        """The caller CANCELed an INVITE we forwarded: 487 to it at once (RFC 3261 9.2) and a
        CANCEL on the other leg (9.1). A 2xx that crosses it is ACKed and BYEd."""
        owner = self._server.pop(target, None)
        if isinstance(owner, Leg):
            # A re-INVITE: answered 487; the CANCEL goes to the re-INVITE we sent.
            out = self._answer(target, 487, None, (), now)
            peer = owner.peer
            ctx = peer.invite_out if peer is not None else None
            owner.invite_in = None
            if ctx is not None and peer is not None:
                # RFC 3261 9.1: the CANCEL goes where the request it cancels went.
                cancel = cancel_request(ctx.request)
                c_tx, sent = self.transactions.send_request(
                    cancel, dest=ctx.dest, reliable=ctx.reliable, now=now
                )
                self._work[c_tx] = _Own(owner.call, "CANCEL")
                out += sent
            return out
        if owner is None:
            return self._answer(target, 487, None, (), now)
        self.stats["calls_cancelled"] += 1
        return self._abandon(owner, 487, "Request Terminated", now)

    def _abandon(
        self, call: Call, status: int, reason: str, now: float, *, cancel: bool = True
    ) -> list[Output]:
        """End a call that was not answered: ``status`` to the caller, CANCEL to the callee."""
        out: list[Output] = []
        call.cancelled = True
        call.status = call.status or status  # what the caller was answered (records)
        if call.a_tx is not None:
            out += self._answer(call.a_tx, status, reason, (), now)
            self._server.pop(call.a_tx, None)
            call.a_tx = None
        if cancel:
            if call.provisional:
                out += self._send_cancel(call, now)
            else:
                call.cancel_wanted = True  # RFC 3261 9.1: only after a provisional response
        self._finish(call, f"{status} {reason}", now)
        return out

    def _send_cancel(self, call: Call, now: float) -> list[Output]:
        if call.b_request is None or call.b_tx is None or call.b_tx.state.name == "TERMINATED":
            return []
        if call.b_tx.last_response is not None and call.b_tx.last_response.status >= 200:
            return []
        cancel = cancel_request(call.b_request)
        flow = call.target.flow
        tx, out = self.transactions.send_request(cancel, dest=flow, reliable=flow.reliable, now=now)
        self._work[tx] = _Own(call, "CANCEL")
        return out

    # -- ending calls ------------------------------------------------------------------------
    def _end_call(
        self, call: Call, cause: str, now: float, *, skip: Leg | None = None, code: int = 200
    ) -> list[Output]:
        """End a call from the SBC: BYE on each confirmed leg (one leg died,
        or a limit was reached), or 408/CANCEL if it was never answered."""
        if call.state == "ended":
            return []
        if call.confirmed is None:
            return self._abandon(call, 408, "Request Timeout", now)
        if call.method != "INVITE":
            # A subscription (RFC 6665) has no BYE: the SBC forgets it; the subscriber's next
            # refresh gets 481 and it subscribes again.
            self._finish(call, cause, now)
            return []
        out: list[Output] = []
        for leg in call.confirmed:
            if leg.ack_pending is not None:
                # RFC 3261 15: the 2xx is ACKed before the dialog is ended with BYE.
                out += self._send_ack(leg, leg.ack_pending, None)
            if leg is not skip:
                reason = f'SIP;cause={code};text="{cause}"'  # RFC 3326
                out += self._send_bye(call, leg, now, reason=reason)
        self._finish(call, cause, now)
        return out

    def _send_bye(self, call: Call, leg: Leg, now: float, *, reason: str) -> list[Output]:
        bye, dest = self._within(leg, "BYE")
        bye.add("Max-Forwards", "70")
        bye.add("Reason", reason)  # RFC 3326
        bye.add("Content-Length", "0")
        tx, out = self.transactions.send_request(bye, dest=dest, reliable=dest.reliable, now=now)
        self._work[tx] = _Own(call, "BYE")
        return out

    def has_flow(self, flow: Flow) -> bool:
        """Whether a call still uses ``flow`` (its connection must not be closed as idle)."""
        return any(call.a_flow == flow or call.target.flow == flow for call in self.calls.values())

    def end_all(self, cause: str, now: float) -> list[Output]:
        """End every call (the drain deadline of a shutdown): BYE on each
        answered leg with Reason cause 503 (RFC 3326), unanswered ones abandoned."""
        out: list[Output] = []
        for call in list(self.calls.values()):
            out += self._end_call(call, cause, now, code=503)
        return out

    def end_calls_on_flow(self, flow: Flow, now: float) -> list[Output]:
        """A client flow failed (keep-alives unanswered, or its connection was lost): its
        calls end, the other leg with BYE (or CANCEL if not answered yet)."""
        out: list[Output] = []
        for call in list(self.calls.values()):
            legs = [leg for leg in call.legs if leg.flow == flow]
            if legs or call.a_flow == flow or call.target.flow == flow:
                skip = legs[0] if legs else None
                out += self._end_call(call, "flow failed", now, skip=skip, code=480)
        return out

    def _finish(self, call: Call, cause: str, now: float) -> None:
        """The call is over: forget its dialogs and timers, write its record."""
        call.state = "ended"
        call.ended = now
        call.cause = call.cause or cause
        for leg in call.legs:
            self._unindex(leg)
            leg.retransmit = None
        self._stop_timers(call)
        # INVITE client transactions still without a final answer (a CANCEL or BYE the far
        # end ignored) are ended after 64*T1, like a proxy's timer C (RFC 3261 9.1, 16.6).
        self._set_timer(call, "guard", now + self.timers.timer_b)
        if call.a_tx is not None:
            self._server.pop(call.a_tx, None)
        if call.b_request is not None:
            frm = call.b_request.from_
            tag = frm.tag if frm is not None else None
            self._b_pending.pop((call.b_request.call_id or "", tag or ""), None)
        self.calls.pop(call.id, None)
        if call.method == "INVITE":
            src = call.source
            self.active_calls -= 1
            self._per_source[src] -= 1
            if self._per_source[src] <= 0:
                del self._per_source[src]
            if call.counted_backend is not None:
                self.relay.balancer.dialog_ended(call.counted_backend)
                call.counted_backend = None
            call.transcoded = self.media.transcoded(call.id)
            stats_follow = self.media.release(call.id)
            if self.policy.keep_records:
                if stats_follow:
                    # The relay's statistics go into the record; it is
                    # written without them if they do not come within two seconds.
                    self._awaiting_stats[call.id] = call
                    self._set_timer(call, "record", now + 2.0)
                else:
                    self.records.append(self._record(call))
            self.stats["calls_ended"] += 1
        log.info(
            "call ended: %s", call.cause,
            extra={"call": call.id, "call_id": call.a_request.call_id},
        )  # fmt: skip

    def _unindex(self, leg: Leg) -> None:
        if self._dialogs.get(leg.dialog.key) is leg:
            del self._dialogs[leg.dialog.key]

    def media_timeout(self, call_id: str, now: float) -> list[Output]:
        """The relay saw no media for [media] timeout seconds: BYE both legs."""
        call = self.calls.get(call_id)
        if call is None or call.state == "ended":
            return []
        self.stats["calls_media_timeout"] += 1
        return self._end_call(call, "media timeout", now, code=408)

    def media_dtmf(self, event: Dtmf, now: float) -> list[Output]:
        """A digit one party sent as RFC 4733 events, the other party having none: an
        INFO with an application/dtmf-relay body in the other party's dialog
        (RFC 6086 4.1; RFC 3261 12.2.1.1: its CSeq, route set, remote target). Its 200 is
        absorbed; a failure is counted (``on_response``)."""
        call = self.calls.get(event.session)
        if call is None or call.state == "ended" or call.confirmed is None:
            return []
        leg = call.confirmed[1] if event.party == "a" else call.confirmed[0]
        info, dest = self._within(leg, "INFO")
        info.add("Max-Forwards", "70")
        info.set_body(dtmf.body(event.digit, event.duration_ms), dtmf.DTMF_RELAY)
        tx, out = self.transactions.send_request(info, dest=dest, reliable=dest.reliable, now=now)
        self._work[tx] = _Own(call, "INFO")
        self.stats["dtmf_rtp_to_info"] += 1
        return out

    def media_stats(self, call_id: str, media: list[dict[str, object]]) -> None:
        """The relay's statistics of an ended call: its record is written with them."""
        call = self._awaiting_stats.pop(call_id, None)
        if call is not None:
            self._cancel_timer(call, "record")
            self.records.append(self._record(call, media))

    def _record(self, call: Call, media: list[dict[str, object]] | None = None) -> str:
        """One JSON line per call, with its media statistics."""
        legs = [
            {"side": call.a_side, "call_id": call.a_request.call_id, "flow": str(call.a_flow)},
            {
                "side": call.target.side,
                "call_id": call.b_request.call_id if call.b_request else None,
                "flow": str(call.target.flow),
            },
        ]
        frm, to = call.a_request.from_, call.a_request.to
        wall = self.relay.wall_offset
        ended = call.ended if call.ended is not None else call.started
        answered = call.answered
        return json.dumps({
            "call": call.id,
            "start": round(call.started + wall, 3),
            "answer": None if answered is None else round(answered + wall, 3),
            "end": round(ended + wall, 3),
            "duration": 0.0 if answered is None else round(ended - answered, 3),
            "from": None if frm is None else frm.uri_text,
            "to": None if to is None else to.uri_text,
            "status": call.status,
            "cause": call.cause,
            "backend": call.target.backend.name if call.target.backend else None,
            "legs": legs,
            "transcoded_streams": call.transcoded,
            "media": media,
        }, separators=(",", ":"))  # fmt: skip

    # -- timers ------------------------------------------------------------------------------
    def _set_timer(self, call: Call, name: str, deadline: float) -> None:
        call.timers.add(name)
        self._deadlines.set((call, name), deadline)

    def _cancel_timer(self, call: Call, name: str) -> None:
        call.timers.discard(name)
        self._deadlines.cancel((call, name))

    def _stop_timers(self, call: Call) -> None:
        for leg in call.legs:
            leg.retransmit = None
        for name in call.timers:
            self._deadlines.cancel((call, name))
        call.timers.clear()

    def next_deadline(self) -> float | None:
        return self._deadlines.next_deadline()

    def handle_timer(self, now: float) -> list[Output]:
        out: list[Output] = []
        while (due := self._deadlines.pop_due(now)) is not None:
            call, name = due
            call.timers.discard(name)
            out += self._on_timer(call, name, now)
        return out

    def _on_timer(self, call: Call, name: str, now: float) -> list[Output]:
        if name == "no_answer":
            self.stats["calls_no_answer"] += 1
            return self._abandon(call, 408, "No Answer", now)
        if name == "failover":
            return self._failover(call, now)
        if name == "guard":
            return self._end_pending(call, now)
        if name == "record":
            if self._awaiting_stats.pop(call.id, None) is not None:
                self.records.append(self._record(call))
            return []
        if name == "max_duration":
            self.stats["calls_max_duration"] += 1
            return self._end_call(call, "maximum call duration", now)
        if name == "session":
            # RFC 4028 10: no refresh within the session interval; the session is over.
            self.stats["calls_session_expired"] += 1
            return self._end_call(call, "session timer expired", now, code=408)
        if name == "expires":
            return self._end_call(call, "subscription expired", now) if call.confirmed else []
        if name.startswith("2xx:") and call.confirmed is not None:
            leg = call.confirmed[int(name[4:])]
            rt = leg.retransmit
            if rt is None:
                return []
            if now >= rt.give_up:
                # RFC 3261 13.3.1.4: no ACK within 64*T1: the dialog ends with BYE.
                leg.retransmit = None
                self.stats["ack_timeout"] += 1
                return self._end_call(call, "no ACK", now, code=408)
            rt.interval = min(2 * rt.interval, self.timers.t2)
            self._set_timer(call, name, min(now + rt.interval, rt.give_up))
            return rt.tx.respond(rt.response, now)
        return []

    def _end_pending(self, call: Call, now: float) -> list[Output]:
        out: list[Output] = []
        pending = [call.b_tx, *(leg.invite_out for leg in call.legs)]
        for tx in pending:
            if tx is None or tx.state not in (
                TransactionState.CALLING,
                TransactionState.PROCEEDING,
            ):
                continue
            work = self._work.pop(tx, None)
            if isinstance(work, _Mapped) and not work.final:
                out += self._answer(work.tx, 487, None, (), now)
            out += self.transactions.terminate(tx)
            self.stats["invite_abandoned"] += 1
        self._dismantle(call)
        return out

    @staticmethod
    def _dismantle(call: Call) -> None:
        """64*T1 after its end nothing can need the call's legs any more: break its
        reference cycles (call -> legs -> call, leg <-> peer) so reference counting frees it
        at once. Left to the cyclic collector, ended calls piled up between its full
        collections, whose pauses then grew to a second under load and dropped packets."""
        for leg in (*call.legs, *call.forks.values()):
            leg.peer = None
            leg.retransmit = None
        call.legs = []
        call.forks = {}
        call.confirmed = None

    def _failover(self, call: Call, now: float) -> list[Output]:
        """The backend sent nothing at all within request_timeout: it counts a failure and
        the request goes to the next backend of the caller's AOR order (a transaction
        timeout is a failure: the caller does not wait for timer B on a dead backend)."""
        backend, b_tx, b_request = call.target.backend, call.b_tx, call.b_request
        if backend is None or b_tx is None or b_request is None or call.state == "ended":
            return []
        self._work.pop(b_tx, None)
        out = self.transactions.terminate(b_tx)
        out += self.relay.report_failure(backend, f"{call.method} unanswered", now)
        frm = call.a_request.from_
        aor = (aor_of(frm) if frm is not None else None) or call.a_request.uri_text
        nxt = self.relay.balancer.pick_for_aor(aor, exclude=call.tried)
        flow = self.relay.flow_to(nxt) if nxt is not None else None
        if nxt is None or flow is None:
            if call.a_tx is not None:
                out += self._answer(call.a_tx, 503, "No Backend Available", _RETRY, now)
            self._finish(call, "no backend answered", now)
            return out
        fwd = b_request.copy()
        fwd.pop_first_value("via")
        self._add_via(fwd, flow)
        if "contact" in fwd:
            fwd.set("Contact", self._contact(call, flow))
        if call.counted_backend is not None:
            self.relay.balancer.dialog_ended(call.counted_backend)
            self.relay.balancer.dialog_started(nxt)
            call.counted_backend = nxt
        call.target = Target(flow, call.target.uri, CORE, nxt)
        call.tried = (*call.tried, nxt.name)
        tx, sent = self.transactions.send_request(fwd, dest=flow, reliable=flow.reliable, now=now)
        call.b_request, call.b_tx = fwd, tx
        self._work[tx] = _Initial(call)
        self._set_timer(call, "failover", now + self.relay.request_timeout)
        self.stats["failover"] += 1
        log.info(
            "%s failed over", call.method,
            extra={"call": call.id, "call_id": call.a_request.call_id, "backend": nxt.name},
        )  # fmt: skip
        return out + sent

    def _rt_name(self, leg: Leg) -> str:
        confirmed = leg.call.confirmed
        return "2xx:0" if confirmed is None or confirmed[0] is leg else "2xx:1"

    def _start_retransmit(
        self, call: Call, leg: Leg, tx: ServerTransaction, resp: Response, now: float
    ) -> None:
        cseq = tx.request.cseq
        t1 = self.timers.t1
        leg.retransmit = _Retransmit(
            tx, resp, cseq.seq if cseq is not None else 0, t1, now + self.timers.timer_h
        )
        # Over a reliable transport the 2xx is not re-sent, but the ACK is still awaited.
        first = now + (t1 if not tx.reliable else self.timers.timer_h)
        self._set_timer(call, self._rt_name(leg), first)

    def _session_timer(self, call: Call, resp: Response, now: float) -> None:
        """RFC 4028: the SBC stays in the path of refreshes; with no refresh by the end of the
        interval it ends the call (RFC 4028 10: "the session is considered terminated")."""
        value = resp.get("session-expires")
        if value is None:
            return
        text = value.split(";", 1)[0].strip()
        if not text.isdigit():
            return
        interval = float(text)
        if interval < 90:
            return  # RFC 4028 4: below the minimum, ignored
        # RFC 4028 10: the refresher sends by half the interval; end after the whole one
        # minus a margin of min(32, interval / 3) like the UA that is not the refresher.
        self._set_timer(call, "session", now + interval - min(32.0, interval / 3))

    def _subscription_expiry(self, call: Call, resp: Response, now: float) -> None:
        value = resp.get("expires")
        seconds = int(value) if value is not None and value.isdigit() else 3600
        self._set_timer(call, "expires", now + seconds + 32)

    # -- building messages -------------------------------------------------------------------
    def _answer(
        self,
        tx: ServerTransaction,
        status: int,
        reason: str | None,
        headers: tuple[tuple[str, str], ...],
        now: float,
    ) -> list[Output]:
        return self.relay.respond(tx, status, reason, headers, now)

    def _derive(self, *parts: str) -> str:
        mac = hmac.new(self._key, "\x00".join(parts).encode("utf-8", "surrogateescape"),
                       hashlib.sha256)  # fmt: skip
        return mac.hexdigest()[:24]

    def _within(self, leg: Leg, method: str, *, seq: int | None = None) -> tuple[Request, Flow]:
        """A request within the dialog of ``leg`` (RFC 3261 12.2.1.1) with our Via, and the
        flow it goes out on.

        A client (access side) is reached over its own flow whatever its Contact says: the
        NAT binding or connection it registered or called from (RFC 5626 5.3, RFC 3581).
        Towards the core and peers the request follows the route set, else the remote
        target (12.2.1.1). A next hop that is this SBC itself (a call from one of its
        clients to another that went out to a registrar which did not record-route, and
        came back in) is handed to the SBC's own matching leg without leaving it. Any other
        next hop is reached through the leg's backend or peer as an outbound proxy, with its
        URI pre-loaded as a loose Route when the route set is empty (8.1.2), so that a proxy
        that did not record-route still forwards the request to the target instead of
        taking it for itself."""
        req = leg.dialog.request(method, seq=seq)
        dest = self._next_hop(leg, req)
        self._add_via(req, dest)
        return req, dest

    def _next_hop(self, leg: Leg, req: Request) -> Flow:
        flow = leg.flow
        if leg.side == ACCESS:
            return flow
        dialog = leg.dialog
        if dialog.route_set:
            try:
                uri = parse_name_addr(dialog.route_set[0], check_uri=False).sip_uri
            except ParseError:
                return flow
        else:
            uri = req.uri if isinstance(req.uri, SipUri) else None
        if uri is None:
            return flow
        port = uri.port or (5061 if uri.secure or flow.transport == "tls" else 5060)
        hop = (uri.host_bare, port)
        if hop == flow.remote:
            return flow
        own = self.relay.own_core_address(hop)
        if own is not None:
            self.stats["looped_in_dialog"] += 1
            return Flow(flow.transport, flow.local, own)
        if not dialog.route_set:
            transport = "" if flow.transport == "udp" else f";transport={flow.transport}"
            req.add("Route", f"<sip:{format_address(flow.remote)}{transport};lr>")
            self.stats["route_preloaded"] += 1
        return flow

    def _add_via(self, req: Request, flow: Flow) -> None:
        local = self.relay.advertised(flow)
        req.add("Via", f"SIP/2.0/{flow.transport.upper()} {local};branch={new_branch()};rport",
                first=True)  # fmt: skip

    def _contact(self, call: Call, flow: Flow) -> str:
        """Our Contact on a leg: the SBC's address on that side; the user part names the
        call (RFC 3261 8.1.1.8: a URI that reaches this UA for the dialog)."""
        transport = "" if flow.transport == "udp" else f";transport={flow.transport}"
        return f"<sip:{call.id}@{self.relay.advertised(flow)}{transport}>"

    def _copy_headers(
        self, src: Request | Response, dst: Request | Response, to_side: Side
    ) -> None:
        """Unknown and end-to-end headers pass, minus the leg's own and the
        configured strip list."""
        src.copy_fields_to(dst, skip=self._skip[to_side], skip_prefixes=self._skip_prefixes)

    def _copy_body(self, call: Call, src: Request, dst: Request, toward_caller: bool) -> None:
        """The body of a request; an SDP offer or answer goes through the media relay
        (RFC 3264 and RFC 3262 5 / RFC 3311 for where offers and answers may be).
        Raises MediaRefused for an offer that cannot be met."""
        body = src.body
        if body and (call.method != "INVITE" or call.state == "ended"):
            body = b"" if _is_sdp(src.content_type) else body  # no session to anchor it in
        elif body:
            method = src.method
            sides = (call.a_side, call.target.side)
            ctype = src.content_type
            if method in ("INVITE", "UPDATE") or (method == "PRACK" and call.a_request.body):
                body = self.media.offer(call.id, sides, toward_caller, body, ctype)
            elif method in ("ACK", "PRACK"):
                body = self.media.answer(call.id, sides, toward_caller, body, ctype)
            elif _is_sdp(ctype):
                body = b""  # SDP outside offer/answer would name the far side's addresses
        dst.set_body(body)

    def _map_response(
        self,
        resp: Response,
        request: Request,
        to_side: Side,
        to_tag: str,
        call: Call,
        contact: str | None,
        *,
        toward_caller: bool = True,
    ) -> Response:
        """The other leg's response as a response to ``request`` (RFC 3261 8.2.6.2 for the
        dialog headers): same status and reason, end-to-end headers and body, our Contact
        (a 3xx keeps its Contact list: the redirect targets are for the caller)."""
        out = make_response(request, resp.status, resp.reason, to_tag=to_tag)
        if 100 < resp.status < 300 and request.method in DIALOG_METHODS:
            # RFC 3261 12.1.1: a response that creates a dialog carries the request's
            # Record-Route (the proxies before us stay in the route set).
            for rr in request.field_values("record-route"):
                out.add("Record-Route", rr)
        skip = self._skip_3xx[to_side] if 300 <= resp.status < 400 else self._skip[to_side]
        resp.copy_fields_to(out, skip=skip, skip_prefixes=self._skip_prefixes)
        if (
            contact
            and 100 < resp.status < 300
            and ("contact" in resp or request.method in CONTACT_METHODS)
        ):
            out.add("Contact", contact)
        body = resp.body
        if body:
            body = self._response_body(call, resp, request, body, toward_caller)
        out.set_body(body)
        return out

    def _media_warning(self, call: Call, resp: Response) -> None:
        """A 488 or 606 to an offer (RFC 3261 21.4.26, 21.6.4) gets the SBC's own Warning
        saying why (the answerer's Warning names a core host and is not passed to clients):
        no codec the SBC transcodes, the cap, or no codec the answerer takes."""
        if resp.status not in (488, 606):
            return
        warning = self.media.refused_warning(call.id)
        if warning is not None:
            resp.add("Warning", warning)

    def _response_body(
        self, call: Call, resp: Response, request: Request, body: bytes, toward_caller: bool
    ) -> bytes:
        """An SDP in a 1xx/2xx to an offer is its answer; to a request without one (an
        INVITE with no SDP), it is the offer (RFC 3264, RFC 3261 13.2.1). Elsewhere an SDP
        is not passed (it would name the far side)."""
        ctype = resp.content_type
        if not _is_sdp(ctype):
            return body
        if not (100 < resp.status < 300 and request.method in ("INVITE", "UPDATE", "PRACK")):
            return b""
        if call.method != "INVITE" or call.state == "ended":
            return b""
        sides = (call.a_side, call.target.side)
        if request.body:
            return self.media.answer(call.id, sides, toward_caller, body, ctype)
        try:
            return self.media.offer(call.id, sides, toward_caller, body, ctype)
        except MediaRefused as exc:
            # An offer in a response cannot be refused with a status; it is not passed.
            log.warning(
                "media offer in a response refused: %s", exc,
                extra={"call": call.id, "call_id": call.a_request.call_id},
            )  # fmt: skip
            return b""


# -- helpers ---------------------------------------------------------------------------------


def _is_sdp(content_type: str | None) -> bool:
    return content_type is not None and (
        content_type.split(";", 1)[0].strip().lower() == "application/sdp"
    )


def _with_tag(value: NameAddr, tag: str | None) -> str:
    """A From/To value with its tag replaced (or removed with ``tag`` None)."""
    base = without_tag(value)
    return base if tag is None else f"{base};tag={tag}"


def _mapped_rack(value: str | None, invite_cseq: int) -> str | None:
    """RFC 3262 7.2: RAck is ``response-num CSeq-num method``; the CSeq number is the other
    leg's INVITE's; the RSeq passes unchanged (reliable provisionals are relayed end to end)."""
    if value is None:
        return None
    parts = value.split()
    if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit():
        return None
    return f"{parts[0]} {invite_cseq} {parts[2]}"


_RETRY = (("Retry-After", "10"),)


def _subscription_terminated(req: Request) -> bool:
    state = req.get("subscription-state")
    return state is not None and state.split(";", 1)[0].strip().lower() == "terminated"
