"""The call model: calls, legs, where a request goes, the call policy, the media seam;
the constants of what belongs to one leg and what names the core."""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from typing import Any, Protocol

from sbc.features.balancer import BackendState
from sbc.media.control import Command
from sbc.media.session import TranscodeCounts
from sbc.sides import Side
from sbc.sip.dialog import Dialog, without_tag
from sbc.sip.flow import Flow
from sbc.sip.headers import NameAddr
from sbc.sip.message import Request, Response
from sbc.sip.transaction import (
    ClientTransaction,
    ServerTransaction,
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
              content_type: str | None, webrtc: bool = False) -> bytes: ...  # fmt: skip

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

    def take_commands(self) -> list[tuple[int, Command]]: ...  # for the media workers

    # Whether a restarted SBC can take the call's media over (not a browser's).
    def keeps(self, call: str) -> bool: ...

    # The call's media session as plain values (a call kept across a restart), or None.
    def export(self, call: str) -> dict[str, Any] | None: ...

    # Take back a session ``export`` gave (its ports bound again); ValueError if it cannot.
    def restore(self, call: str, value: dict[str, Any]) -> None: ...


class PassThroughMedia:
    """No media relay: the SDP passes unchanged (unit tests of the signalling alone)."""

    def offer(self, call: str, sides: tuple[Side, Side], toward_caller: bool, body: bytes,
              content_type: str | None, webrtc: bool = False) -> bytes:  # fmt: skip
        return body

    def answer(self, call: str, sides: tuple[Side, Side], toward_caller: bool, body: bytes,
               content_type: str | None) -> bytes:  # fmt: skip
        return body  # as ``offer`` (no alias: mypyc compiles this class)

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

    def take_commands(self) -> list[tuple[int, Command]]:
        return []

    def keeps(self, call: str) -> bool:
        return True

    def export(self, call: str) -> dict[str, Any] | None:
        return None

    def restore(self, call: str, value: dict[str, Any]) -> None:
        return None


class ExternalMediaSeam(PassThroughMedia):
    """The media seam when the media is on rtpengine nodes: the core has had every SDP
    rewritten by the call's node before the B2BUA sees it (SbcCore's media holds), so
    offers and answers pass unchanged; the end of a call is queued (``ended``) for the
    core to delete at its node."""

    def __init__(self) -> None:
        self.ended: list[str] = []

    def release(self, call: str) -> bool:
        self.ended.append(call)
        return True  # the node's counters come with its answer to the delete


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


@dataclass(frozen=True, slots=True)
class NextHop:
    """Where a leg's requests within the dialog go (RFC 3261 12.2.1.1), for one route set
    (its first route) and remote target: the flow, and a Route to pre-load (8.1.2)."""

    route0: str
    target: str
    dest: Flow
    preload: str | None


class Leg:
    """One UA's side of a call: its dialog, the flow it is reached on, our Contact there."""

    __slots__ = (
        "ack_dest", "ack_pending", "ack_sent", "call", "caller", "contact", "dialog", "flow",
        "hop", "invite_cseq", "invite_in", "invite_out", "peer", "retransmit", "side",
        "update_out",
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
        self.hop: NextHop | None = None  # where requests within the dialog went last

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
        a_tx: ServerTransaction | None,
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


@dataclass(frozen=True, slots=True)
class MediaContext:
    """An SDP of a call as an external media engine sees it: the call, whether the caller
    sent it, whether it is an offer, and the side it goes to."""

    call: str
    from_caller: bool
    offer: bool
    to_side: Side
    to_browser: bool = False  # it goes to a party reached over a WebSocket (WebRTC)


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
