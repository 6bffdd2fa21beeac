"""SIP transactions (RFC 3261 section 17) with the RFC 6026 corrections, sans-I/O.

The layer never touches a socket or a clock. Every entry point takes ``now`` (seconds, any
monotonic origin) and returns a list of outputs: messages to send (to an opaque ``dest`` the
TU supplied), responses and failures for the TU, and terminations. The owner arms one timer
at ``next_deadline()`` and calls ``handle_timer(now)`` when it expires.

Each kind of transaction is one transition table, ``_TABLE`` at the end of its class, headed by
the RFC figure it implements (RFC 3261 figures 5-8; 5 and 7 as replaced by RFC 6026 8.4,
8.7): (state, ``Event``) -> (next state, effect). ``_fire`` looks the event up, moves the
state, then runs the effect; an event with no entry in the current state is discarded.
A transaction that reaches Terminated is removed from the layer and reported with a
``TransactionTerminated`` output so that the TU can drop its references.

Why one module of about 900 lines: the four state machines share their timers, their
outputs and the layer that matches requests, ACKs, CANCELs and responses to them (RFC 3261
17.1.3, 17.2.3); a reader checking one against the RFC's figures needs the others and the
matching beside it.
"""

from __future__ import annotations

import enum
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeAlias, cast

from sbc.deadlines import Deadlines
from sbc.sip.headers import MAGIC_COOKIE
from sbc.sip.message import Request, Response, make_response

__all__ = [
    "DEFAULT_TIMERS", "ClientTransaction", "InviteClientTransaction", "InviteServerTransaction",
    "NonInviteClientTransaction", "NonInviteServerTransaction", "Output", "RequestDisposition",
    "ResponseReceived", "Send", "ServerTransaction", "Timers", "TransactionLayer",
    "TransactionState", "TransactionTerminated", "TransactionTimeout", "cancel_request",
    "mark_branches", "new_branch", "non2xx_ack",
]  # fmt: skip


# -- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Timers:
    """Base timer values (RFC 3261 17.1.1.1, table 4) and the timers derived from them."""

    t1: float = 0.5  # RTT estimate
    t2: float = 4.0  # maximum retransmit interval for non-INVITE requests and INVITE responses
    t4: float = 5.0  # maximum duration a message remains in the network
    trying_delay: float = 0.2  # RFC 3261 17.2.1: 100 Trying if the TU is silent this long

    def __post_init__(self) -> None:
        if not self.t1 > 0:
            raise ValueError("T1 must be positive")
        if self.t2 < self.t1:
            raise ValueError("T2 must not be smaller than T1")
        if self.t4 < 0:
            raise ValueError("T4 must not be negative")
        if self.trying_delay < 0:
            raise ValueError("trying_delay must not be negative")

    @property
    def timer_b(self) -> float:
        """INVITE transaction timeout (RFC 3261 17.1.1.2): 64*T1."""
        return 64 * self.t1

    @property
    def timer_f(self) -> float:
        """Non-INVITE transaction timeout (RFC 3261 17.1.2.2): 64*T1."""
        return 64 * self.t1

    @property
    def timer_h(self) -> float:
        """Wait time for ACK receipt (RFC 3261 17.2.1): 64*T1."""
        return 64 * self.t1

    @property
    def timer_l(self) -> float:
        """Wait time for accepted INVITE request retransmits (RFC 6026 7.1): 64*T1."""
        return 64 * self.t1

    @property
    def timer_m(self) -> float:
        """Wait time for retransmission of 2xx to INVITE (RFC 6026 7.2): 64*T1."""
        return 64 * self.t1

    def timer_d(self, reliable: bool) -> float:
        """Wait for response retransmits (RFC 3261 17.1.1.2): >= 32 s unreliable, 0 reliable."""
        return 0.0 if reliable else max(32.0, 64 * self.t1)

    def timer_i(self, reliable: bool) -> float:
        """Wait time for ACK retransmits (RFC 3261 17.2.1): T4 unreliable, 0 reliable."""
        return 0.0 if reliable else self.t4

    def timer_j(self, reliable: bool) -> float:
        """Wait time for non-INVITE request retransmits (RFC 3261 17.2.2): 64*T1 / 0 reliable."""
        return 0.0 if reliable else 64 * self.t1

    def timer_k(self, reliable: bool) -> float:
        """Wait time for response retransmits (RFC 3261 17.1.2.2): T4 unreliable, 0 reliable."""
        return 0.0 if reliable else self.t4


DEFAULT_TIMERS = Timers()


# -- states, dispositions, outputs -----------------------------------------------------------


class TransactionState(enum.Enum):
    CALLING = "Calling"
    TRYING = "Trying"
    PROCEEDING = "Proceeding"
    COMPLETED = "Completed"
    CONFIRMED = "Confirmed"
    ACCEPTED = "Accepted"  # RFC 6026 7.1, 7.2
    TERMINATED = "Terminated"


class RequestDisposition(enum.Enum):
    """What ``TransactionLayer.receive_request`` did with a request."""

    NEW = "new"  # a new server transaction: the TU handles the request, answers via respond()
    RETRANSMISSION = "retransmission"  # absorbed (RFC 3261 17.2.1, 17.2.2)
    ACK_ABSORBED = "ack-absorbed"  # ACK of a non-2xx final (RFC 3261 17.2.1)
    ACK_TO_TU = "ack-to-tu"  # ACK matching no transaction, or one in Accepted (RFC 6026 7.1)
    STRAY = "stray"  # matched a transaction that cannot use it (ACK before any final): ignore


@dataclass(frozen=True, slots=True, kw_only=True)
class Send:
    """Send ``message`` to ``dest`` (the opaque destination the TU gave the transaction)."""

    message: Request | Response
    dest: Any


@dataclass(frozen=True, slots=True, kw_only=True)
class ResponseReceived:
    """A response the TU must handle (RFC 3261 17.1.1.2, 17.1.2.2, RFC 6026 8.4)."""

    transaction: ClientTransaction
    response: Response


@dataclass(frozen=True, slots=True, kw_only=True)
class TransactionTimeout:
    """Timer B/F on a client (the TU synthesises a 408, RFC 3261 8.1.3.1) or Timer H on an
    INVITE server transaction (the ACK never came, RFC 3261 17.2.1)."""

    transaction: ClientTransaction | ServerTransaction


@dataclass(frozen=True, slots=True, kw_only=True)
class TransactionTerminated:
    """The transaction reached Terminated and left the layer."""

    transaction: ClientTransaction | ServerTransaction


Output: TypeAlias = Send | ResponseReceived | TransactionTimeout | TransactionTerminated

TimerName = Literal["A", "B", "D", "E", "F", "G", "H", "I", "J", "K", "L", "M", "trying"]
ServerKey: TypeAlias = tuple[object, ...]
ClientKey: TypeAlias = tuple[str, str]

_S = TransactionState


class Event(enum.Enum):
    """What moves a transaction: the arcs of RFC 3261 figures 5-8 and RFC 6026 8.4, 8.7."""

    __hash__ = object.__hash__  # members are singletons: one C-level hash per table lookup

    REQUEST = "request retransmitted"  # server: the request again (RFC 3261 17.2.1, 17.2.2)
    ACK = "ACK"  # INVITE server: an ACK matching the transaction (RFC 3261 17.2.3)
    TU_1XX = "1xx from TU"
    TU_2XX = "2xx from TU"
    TU_300_699 = "300-699 from TU"
    RECV_1XX = "1xx received"
    RECV_2XX = "2xx received"
    RECV_300_699 = "300-699 received"
    # Timers (RFC 3261 17.1.1.2, 17.1.2.2, 17.2.1, 17.2.2; RFC 6026 7.1, 7.2), valued by their
    # name in pending_timers(); "trying": 100 Trying if the TU is silent 200 ms (17.2.1).
    TIMER_A = "A"
    TIMER_B = "B"
    TIMER_D = "D"
    TIMER_E = "E"
    TIMER_F = "F"
    TIMER_G = "G"
    TIMER_H = "H"
    TIMER_I = "I"
    TIMER_J = "J"
    TIMER_K = "K"
    TIMER_L = "L"
    TIMER_M = "M"
    TIMER_TRYING = "trying"
    # A transport error (RFC 3261 17.1.4, 17.2.4) or the TU giving the transaction up
    # (TransactionLayer.terminate, e.g. RFC 3261 9.1): Terminated from every state.
    TRANSPORT_ERROR = "transport error"


_TIMER_EVENTS: dict[str, Event] = {e.value: e for e in Event if e.name.startswith("TIMER_")}
# The events the hot paths fire, as module names (an Enum class attribute lookup is slow).
_REQUEST, _ACK, _TRANSPORT_ERROR = Event.REQUEST, Event.ACK, Event.TRANSPORT_ERROR
_TU_1XX, _TU_2XX, _TU_300_699 = Event.TU_1XX, Event.TU_2XX, Event.TU_300_699
_RECV_1XX, _RECV_2XX, _RECV_300_699 = Event.RECV_1XX, Event.RECV_2XX, Event.RECV_300_699
_ANY = None  # the state of a table entry that every state with a row shares

_Public: TypeAlias = "ClientTransaction | ServerTransaction"
# A transition table: (state or _ANY, event) -> (next state, the name of the kind's effect
# method, so that the table can sit in the class body); an effect is (transaction, now, the
# response of a response event or None) -> outputs.
_Effect: TypeAlias = Callable[[Any, float, Response | None], list[Output]]
_Table: TypeAlias = dict[tuple[TransactionState | None, Event], tuple[TransactionState, str]]
# A state's row of a compiled table: event -> (next state, its row, effect).
_Row: TypeAlias = "dict[Event, tuple[TransactionState, _Row, _Effect]]"


def _compile(kind: type[_Transaction]) -> dict[TransactionState, _Row]:
    """``kind._TABLE`` as rows per state, holding the next state's row: one hash per event."""
    table = kind._TABLE
    rows: dict[TransactionState, _Row] = {state: {} for state in TransactionState}
    states = {state for state, _ in table if state is not None}
    for (state, event), (target, effect) in table.items():
        for source in states if state is None else (state,):
            rows[source][event] = (target, rows[target], getattr(kind, effect))
    return rows


# -- helpers that build requests -------------------------------------------------------------


# The start of every branch this process makes: the magic cookie, and with several
# signalling workers the worker's mark (sbc/ownership.py), so that any worker knows whose
# transaction a response is for.
_branch_start = MAGIC_COOKIE


def mark_branches(tag: str) -> None:
    """Begin every branch made from now on with ``tag`` after the magic cookie."""
    global _branch_start
    _branch_start = MAGIC_COOKIE + tag


def new_branch() -> str:
    """A fresh RFC 3261 branch: the magic cookie plus a random token (RFC 3261 8.1.1.7)."""
    return _branch_start + secrets.token_urlsafe(12)


def _top_via_text(request: Request) -> str:
    vias = request.values("via")
    if not vias:
        raise ValueError(f"{request.method} request has no Via")
    return vias[0]


def _required(request: Request, name: str) -> str:
    value = request.get(name)
    if value is None:
        raise ValueError(f"{request.method} request has no {name}")
    return value


def _copy_routes(src: Request, dst: Request) -> None:
    for field in src.fields:
        if field.key == "route":
            dst.add("Route", field.value)


def non2xx_ack(invite: Request, response: Response) -> Request:
    """The ACK a client transaction sends for a 300-699 final response (RFC 3261 17.1.1.3).

    Request-URI, Call-ID and From of the INVITE; To of the response (with its tag); the CSeq
    number with method ACK; only the INVITE's top Via; its Route header fields.
    """
    cseq = invite.cseq
    if cseq is None:
        raise ValueError("INVITE has no CSeq")
    ack = Request("ACK", invite.uri_text)
    ack.add("Via", _top_via_text(invite))
    _copy_routes(invite, ack)
    ack.add("Max-Forwards", "70")
    ack.add("From", _required(invite, "from"))
    to = response.get("to")
    ack.add("To", to if to is not None else _required(invite, "to"))
    ack.add("Call-ID", _required(invite, "call-id"))
    ack.add("CSeq", f"{cseq.seq} ACK")
    ack.add("Content-Length", "0")
    return ack


def cancel_request(invite: Request) -> Request:
    """A CANCEL for ``invite`` (RFC 3261 9.1).

    Same Request-URI, Call-ID, To, From and CSeq number (method CANCEL); a single Via equal to
    the INVITE's top Via (so it matches the INVITE's branch); the INVITE's Route header fields.
    """
    cseq = invite.cseq
    if cseq is None:
        raise ValueError("INVITE has no CSeq")
    cancel = Request("CANCEL", invite.uri_text)
    cancel.add("Via", _top_via_text(invite))
    _copy_routes(invite, cancel)
    cancel.add("Max-Forwards", "70")
    cancel.add("From", _required(invite, "from"))
    cancel.add("To", _required(invite, "to"))
    cancel.add("Call-ID", _required(invite, "call-id"))
    cancel.add("CSeq", f"{cseq.seq} CANCEL")
    cancel.add("Content-Length", "0")
    return cancel


# -- matching keys ---------------------------------------------------------------------------


def _server_key(request: Request, method: str) -> ServerKey:
    """Server transaction key (RFC 3261 17.2.3). ``method`` is INVITE for ACK and CANCEL lookups.

    With the magic cookie: branch, sent-by and method. Otherwise the RFC 2543 rule: Request-URI,
    To tag, From tag, Call-ID, CSeq number and method, and the top Via.
    """
    via = request.top_via
    if via is not None and via.rfc3261_branch:
        return ("3261", via.branch, via.host_bare, via.port, method)
    to = request.to
    from_ = request.from_
    cseq = request.cseq
    return (
        "2543",
        request.uri_text,
        None if to is None else to.tag,
        None if from_ is None else from_.tag,
        request.call_id,
        None if cseq is None else cseq.seq,
        method,
        via,
    )


def _ack_key_2543(request: Request) -> ServerKey:
    """RFC 3261 17.2.3 (RFC 2543 ACK): Request-URI, From tag, Call-ID, CSeq number, top Via.

    The To tag is compared separately with the tag of the response the transaction sent.
    """
    from_ = request.from_
    cseq = request.cseq
    return (
        request.uri_text,
        None if from_ is None else from_.tag,
        request.call_id,
        None if cseq is None else cseq.seq,
        request.top_via,
    )


# -- transactions ----------------------------------------------------------------------------


class _Transaction:
    __slots__ = (
        "_interval",
        "_layer",
        "_row",
        "_timers",
        "dest",
        "key",
        "last_response",
        "reliable",
        "request",
        "state",
    )

    _INITIAL: ClassVar[TransactionState]  # where the kind's table starts
    _TABLE: ClassVar[_Table]  # the kind's transitions (RFC 3261 17 as RFC 6026 amends it)
    _rows: ClassVar[dict[TransactionState, _Row]]  # the same, compiled (_compile)

    def __init__(
        self,
        layer: TransactionLayer,
        request: Request,
        *,
        key: ServerKey | ClientKey,
        dest: object,
        reliable: bool,
        state: TransactionState | None = None,
    ) -> None:
        self._layer = layer
        self.request = request
        self.key = key
        self.dest = dest
        self.reliable = reliable
        self.state = state = self._INITIAL if state is None else state
        self._row = self._rows[state]  # the current state's row of the table
        self._timers: dict[TimerName, float] = {}  # armed timers: name -> deadline
        self.last_response: Response | None = None
        self._interval = 0.0  # current timer A, E or G interval

    @property
    def timers(self) -> Timers:
        return self._layer.timers

    def pending_timers(self) -> dict[str, float]:
        """Armed timers by name (A, B, ... , "trying") and their deadlines."""
        return {str(name): deadline for name, deadline in self._timers.items()}

    def _start(self, now: float) -> list[Output]:
        return []  # entering the initial state; RFC 3261 17.2.2: a non-INVITE server waits

    def _fire(self, event: Event, now: float, response: Response | None = None) -> list[Output]:
        """One step: move to the next state, then run the effect; no entry: discarded."""
        step = self._row.get(event)
        if step is None:
            return []
        self.state, self._row, effect = step
        return effect(self, now, response)

    def _set_timer(self, name: TimerName, deadline: float) -> None:
        self._timers[name] = deadline
        self._layer._deadlines.set((self, name), deadline)

    def _cancel_timer(self, *names: TimerName) -> None:
        for name in names:
            if self._timers.pop(name, None) is not None:
                self._layer._deadlines.cancel((self, name))

    # Effects shared by the kinds: (self, now, response) -> outputs, run after the move.
    def _terminate(self, now: float, response: Response | None) -> list[Output]:
        self._cancel_timer(*list(self._timers))
        self._layer._remove(self)
        return [TransactionTerminated(transaction=cast(_Public, self))]

    def _timeout(self, now: float, response: Response | None) -> list[Output]:
        # Timer B, F (RFC 3261 17.1.1.2, 17.1.2.2) or H (17.2.1): tell the TU.
        return [TransactionTimeout(transaction=cast(_Public, self)), *self._terminate(now, None)]

    def _absorb(self, now: float, response: Response | None) -> list[Output]:
        return []  # an arc labelled "-" in the RFC's figure

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.request.method} {self.state.value}>"


class ServerTransaction(_Transaction):
    """A server transaction (RFC 3261 17.2). The TU answers through ``respond``."""

    __slots__ = ()

    def respond(self, response: Response, now: float) -> list[Output]:
        """Send a response from the TU. Responses the state does not allow are discarded
        (RFC 3261 17.2.2: further finals in Completed) and give no output."""
        status = response.status
        event = _TU_1XX if status < 200 else _TU_2XX if status < 300 else _TU_300_699
        return self._fire(event, now, response)

    def _send_response(self, now: float, response: Response | None) -> list[Output]:
        assert response is not None
        self.last_response = response
        return [Send(message=response, dest=self.dest)]

    def _resend(self, now: float, response: Response | None) -> list[Output]:
        # RFC 3261 17.2.1, 17.2.2: a retransmitted request gets the most recent response.
        last = self.last_response
        return [] if last is None else [Send(message=last, dest=self.dest)]


class InviteServerTransaction(ServerTransaction):
    """RFC 3261 17.2.1 with the RFC 6026 7.1 Accepted state."""

    __slots__ = ("_ack_key",)

    def __init__(
        self,
        layer: TransactionLayer,
        request: Request,
        *,
        key: ServerKey,
        dest: object,
        reliable: bool,
    ) -> None:
        super().__init__(layer, request, key=key, dest=dest, reliable=reliable)
        # RFC 2543 ACK matching key, kept from creation (the TU may edit the request later).
        self._ack_key: ServerKey | None = None if key[0] == "3261" else _ack_key_2543(request)

    def _start(self, now: float) -> list[Output]:
        # RFC 3261 17.2.1: 100 Trying unless the TU answers within 200 ms.
        delay = self.timers.trying_delay
        if delay <= 0:
            return self._send_trying(now, None)
        self._set_timer("trying", now + delay)
        return []

    def _on_ack(self, now: float) -> tuple[RequestDisposition, list[Output]]:
        # Where the ACK went: to the TU in Accepted (RFC 6026 7.1), absorbed in Completed and
        # Confirmed (RFC 3261 17.2.1), stray before any final response (no ACK arc there).
        if self.state is _S.ACCEPTED:
            disposition = RequestDisposition.ACK_TO_TU
        elif _ACK in self._row:
            disposition = RequestDisposition.ACK_ABSORBED
        else:
            disposition = RequestDisposition.STRAY
        return disposition, self._fire(_ACK, now)

    def _ack_tag_matches(self, ack: Request) -> bool:
        """RFC 3261 17.2.3 (RFC 2543 ACK): the To tag equals that of the response sent."""
        if self.last_response is None:
            return False
        sent = self.last_response.to
        got = ack.to
        return (None if sent is None else sent.tag) == (None if got is None else got.tag)

    def _send_trying(self, now: float, response: Response | None) -> list[Output]:
        self.last_response = make_response(self.request, 100)
        return [Send(message=self.last_response, dest=self.dest)]

    def _answer(self, now: float, response: Response | None) -> list[Output]:
        self._cancel_timer("trying")  # the TU answered: no 100 Trying of our own
        return self._send_response(now, response)

    def _accept(self, now: float, response: Response | None) -> list[Output]:
        # RFC 6026 7.1: timer L; the TU retransmits the 2xx itself.
        out = self._answer(now, response)
        self._set_timer("L", now + self.timers.timer_l)
        return out

    def _reject(self, now: float, response: Response | None) -> list[Output]:
        # RFC 3261 17.2.1: timer G (unreliable only) and timer H.
        out = self._answer(now, response)
        if not self.reliable:
            self._interval = self.timers.t1
            self._set_timer("G", now + self._interval)
        self._set_timer("H", now + self.timers.timer_h)
        return out

    def _retransmit(self, now: float, response: Response | None) -> list[Output]:
        # RFC 3261 17.2.1: timer G re-sends the final response, its interval doubling up to T2.
        if self.last_response is None:
            return []
        self._interval = min(2 * self._interval, self.timers.t2)
        self._set_timer("G", now + self._interval)
        return [Send(message=self.last_response, dest=self.dest)]

    def _confirm(self, now: float, response: Response | None) -> list[Output]:
        # RFC 3261 17.2.1: stop G and H, start I (zero on reliable transports: fires at once).
        self._cancel_timer("G", "H")
        wait = self.timers.timer_i(self.reliable)
        if wait <= 0:
            return self._fire(Event.TIMER_I, now)
        self._set_timer("I", now + wait)
        return []

    # RFC 3261 figure 7 as replaced by RFC 6026 8.7.
    _INITIAL = _S.PROCEEDING
    _TABLE: ClassVar[_Table] = {
        (_ANY, Event.TRANSPORT_ERROR): (_S.TERMINATED, "_terminate"),
        (_S.PROCEEDING, Event.REQUEST): (_S.PROCEEDING, "_resend"),
        (_S.PROCEEDING, Event.TIMER_TRYING): (_S.PROCEEDING, "_send_trying"),
        (_S.PROCEEDING, Event.TU_1XX): (_S.PROCEEDING, "_answer"),
        (_S.PROCEEDING, Event.TU_2XX): (_S.ACCEPTED, "_accept"),
        (_S.PROCEEDING, Event.TU_300_699): (_S.COMPLETED, "_reject"),
        (_S.COMPLETED, Event.REQUEST): (_S.COMPLETED, "_resend"),
        (_S.COMPLETED, Event.TIMER_G): (_S.COMPLETED, "_retransmit"),
        (_S.COMPLETED, Event.ACK): (_S.CONFIRMED, "_confirm"),
        (_S.COMPLETED, Event.TIMER_H): (_S.TERMINATED, "_timeout"),
        (_S.CONFIRMED, Event.ACK): (_S.CONFIRMED, "_absorb"),  # RFC 3261 17.2.1
        (_S.CONFIRMED, Event.TIMER_I): (_S.TERMINATED, "_terminate"),
        (_S.ACCEPTED, Event.REQUEST): (_S.ACCEPTED, "_absorb"),
        (_S.ACCEPTED, Event.ACK): (_S.ACCEPTED, "_absorb"),  # to the TU: _on_ack
        (_S.ACCEPTED, Event.TU_2XX): (_S.ACCEPTED, "_send_response"),
        (_S.ACCEPTED, Event.TIMER_L): (_S.TERMINATED, "_terminate"),
    }


class NonInviteServerTransaction(ServerTransaction):
    """RFC 3261 17.2.2."""

    __slots__ = ()

    def _complete(self, now: float, response: Response | None) -> list[Output]:
        # RFC 3261 17.2.2: timer J (64*T1 unreliable; zero reliable: fires at once).
        out = self._send_response(now, response)
        wait = self.timers.timer_j(self.reliable)
        if wait <= 0:
            return out + self._fire(Event.TIMER_J, now)
        self._set_timer("J", now + wait)
        # Kept 32 s only to absorb retransmissions: no need for the parsed views.
        self.request.release_views()
        assert response is not None
        response.release_views()
        return out

    # RFC 3261 figure 8. Discarded: the request again in Trying, the TU's responses in Completed.
    _INITIAL = _S.TRYING
    _TABLE: ClassVar[_Table] = {
        (_ANY, Event.TRANSPORT_ERROR): (_S.TERMINATED, "_terminate"),
        (_S.TRYING, Event.TU_1XX): (_S.PROCEEDING, "_send_response"),
        (_S.TRYING, Event.TU_2XX): (_S.COMPLETED, "_complete"),
        (_S.TRYING, Event.TU_300_699): (_S.COMPLETED, "_complete"),
        (_S.PROCEEDING, Event.REQUEST): (_S.PROCEEDING, "_resend"),
        (_S.PROCEEDING, Event.TU_1XX): (_S.PROCEEDING, "_send_response"),
        (_S.PROCEEDING, Event.TU_2XX): (_S.COMPLETED, "_complete"),
        (_S.PROCEEDING, Event.TU_300_699): (_S.COMPLETED, "_complete"),
        (_S.COMPLETED, Event.REQUEST): (_S.COMPLETED, "_resend"),
        (_S.COMPLETED, Event.TIMER_J): (_S.TERMINATED, "_terminate"),
    }


class ClientTransaction(_Transaction):
    """A client transaction (RFC 3261 17.1). Created by ``TransactionLayer.send_request``."""

    __slots__ = ()

    def _received(self, response: Response | None) -> ResponseReceived:
        assert response is not None
        self.last_response = response
        return ResponseReceived(transaction=self, response=response)

    def _pass_up(self, now: float, response: Response | None) -> list[Output]:
        return [self._received(response)]


class InviteClientTransaction(ClientTransaction):
    """RFC 3261 17.1.1 with the RFC 6026 7.2 Accepted state."""

    __slots__ = ("ack",)

    def __init__(
        self,
        layer: TransactionLayer,
        request: Request,
        *,
        key: ClientKey,
        dest: object,
        reliable: bool,
    ) -> None:
        super().__init__(layer, request, key=key, dest=dest, reliable=reliable)
        self.ack: Request | None = None  # the ACK sent for a 300-699 final (RFC 3261 17.1.1.3)

    def _start(self, now: float) -> list[Output]:
        # RFC 3261 17.1.1.2: timer A (unreliable only) at T1, timer B at 64*T1.
        if not self.reliable:
            self._interval = self.timers.t1
            self._set_timer("A", now + self._interval)
        self._set_timer("B", now + self.timers.timer_b)
        return [Send(message=self.request, dest=self.dest)]

    def _retransmit(self, now: float, response: Response | None) -> list[Output]:
        # RFC 3261 17.1.1.2: timer A re-sends the INVITE and doubles its interval.
        self._interval *= 2
        self._set_timer("A", now + self._interval)
        return [Send(message=self.request, dest=self.dest)]

    def _proceed(self, now: float, response: Response | None) -> list[Output]:
        # RFC 3261 17.1.1.2: any response stops A; B only fires in Calling.
        self._cancel_timer("A", "B")
        return [self._received(response)]

    def _accept(self, now: float, response: Response | None) -> list[Output]:
        # RFC 6026 7.2: timer M; the TU (UAC core) sends the ACK.
        self._cancel_timer("A", "B")
        self._set_timer("M", now + self.timers.timer_m)
        return [self._received(response)]

    def _complete(self, now: float, response: Response | None) -> list[Output]:
        # RFC 3261 17.1.1.2: ACK, pass the response up, timer D (zero reliable: fires at once).
        assert response is not None
        self._cancel_timer("A", "B")
        self.ack = non2xx_ack(self.request, response)
        out: list[Output] = [Send(message=self.ack, dest=self.dest), self._received(response)]
        wait = self.timers.timer_d(self.reliable)
        if wait <= 0:
            return out + self._fire(Event.TIMER_D, now)
        self._set_timer("D", now + wait)
        return out

    def _ack_again(self, now: float, response: Response | None) -> list[Output]:
        # RFC 3261 17.1.1.2: a retransmitted final is ACKed again, not passed up.
        return [] if self.ack is None else [Send(message=self.ack, dest=self.dest)]

    # RFC 3261 figure 5 as replaced by RFC 6026 8.4. Absorbed: 1xx, 2xx in Completed; 1xx,
    # 300-699 in Accepted.
    _INITIAL = _S.CALLING
    _TABLE: ClassVar[_Table] = {
        (_ANY, Event.TRANSPORT_ERROR): (_S.TERMINATED, "_terminate"),
        (_S.CALLING, Event.TIMER_A): (_S.CALLING, "_retransmit"),
        (_S.CALLING, Event.TIMER_B): (_S.TERMINATED, "_timeout"),
        (_S.CALLING, Event.RECV_1XX): (_S.PROCEEDING, "_proceed"),
        (_S.CALLING, Event.RECV_2XX): (_S.ACCEPTED, "_accept"),
        (_S.CALLING, Event.RECV_300_699): (_S.COMPLETED, "_complete"),
        (_S.PROCEEDING, Event.RECV_1XX): (_S.PROCEEDING, "_proceed"),
        (_S.PROCEEDING, Event.RECV_2XX): (_S.ACCEPTED, "_accept"),
        (_S.PROCEEDING, Event.RECV_300_699): (_S.COMPLETED, "_complete"),
        (_S.COMPLETED, Event.RECV_300_699): (_S.COMPLETED, "_ack_again"),
        (_S.COMPLETED, Event.TIMER_D): (_S.TERMINATED, "_terminate"),
        (_S.ACCEPTED, Event.RECV_2XX): (_S.ACCEPTED, "_pass_up"),
        (_S.ACCEPTED, Event.TIMER_M): (_S.TERMINATED, "_terminate"),
    }


class NonInviteClientTransaction(ClientTransaction):
    """RFC 3261 17.1.2."""

    __slots__ = ()

    def _start(self, now: float) -> list[Output]:
        # RFC 3261 17.1.2.2: timer E (unreliable only) at T1, timer F at 64*T1.
        if not self.reliable:
            self._interval = self.timers.t1
            self._set_timer("E", now + self._interval)
        self._set_timer("F", now + self.timers.timer_f)
        return [Send(message=self.request, dest=self.dest)]

    def _retransmit(self, now: float, response: Response | None) -> list[Output]:
        # RFC 3261 17.1.2.2: timer E in Trying: re-send, the interval doubling up to T2.
        self._interval = min(2 * self._interval, self.timers.t2)
        self._set_timer("E", now + self._interval)
        return [Send(message=self.request, dest=self.dest)]

    def _retransmit_t2(self, now: float, response: Response | None) -> list[Output]:
        # RFC 3261 17.1.2.2: timer E in Proceeding: re-send every T2.
        self._interval = self.timers.t2
        self._set_timer("E", now + self._interval)
        return [Send(message=self.request, dest=self.dest)]

    def _complete(self, now: float, response: Response | None) -> list[Output]:
        # RFC 3261 17.1.2.2: timer K (T4 unreliable; zero reliable: fires at once).
        self._cancel_timer("E", "F")
        self.request.release_views()  # kept only for matching retransmitted responses
        out: list[Output] = [self._received(response)]
        wait = self.timers.timer_k(self.reliable)
        if wait <= 0:
            return out + self._fire(Event.TIMER_K, now)
        self._set_timer("K", now + wait)
        return out

    # RFC 3261 figure 6. Responses in Completed are absorbed.
    _INITIAL = _S.TRYING
    _TABLE: ClassVar[_Table] = {
        (_ANY, Event.TRANSPORT_ERROR): (_S.TERMINATED, "_terminate"),
        (_S.TRYING, Event.TIMER_E): (_S.TRYING, "_retransmit"),
        (_S.TRYING, Event.TIMER_F): (_S.TERMINATED, "_timeout"),
        (_S.TRYING, Event.RECV_1XX): (_S.PROCEEDING, "_pass_up"),
        (_S.TRYING, Event.RECV_2XX): (_S.COMPLETED, "_complete"),
        (_S.TRYING, Event.RECV_300_699): (_S.COMPLETED, "_complete"),
        (_S.PROCEEDING, Event.TIMER_E): (_S.PROCEEDING, "_retransmit_t2"),
        (_S.PROCEEDING, Event.TIMER_F): (_S.TERMINATED, "_timeout"),
        (_S.PROCEEDING, Event.RECV_1XX): (_S.PROCEEDING, "_pass_up"),
        (_S.PROCEEDING, Event.RECV_2XX): (_S.COMPLETED, "_complete"),
        (_S.PROCEEDING, Event.RECV_300_699): (_S.COMPLETED, "_complete"),
        (_S.COMPLETED, Event.TIMER_K): (_S.TERMINATED, "_terminate"),
    }


for _kind in (InviteServerTransaction, NonInviteServerTransaction, InviteClientTransaction,
              NonInviteClientTransaction):  # fmt: skip
    _kind._rows = _compile(_kind)


# -- the layer -------------------------------------------------------------------------------


class TransactionLayer:
    """All client and server transactions of one SIP element, and their timers."""

    def __init__(self, timers: Timers = DEFAULT_TIMERS) -> None:
        self.timers = timers
        self._servers: dict[ServerKey, ServerTransaction] = {}
        self._acks_2543: dict[ServerKey, InviteServerTransaction] = {}
        self._clients: dict[ClientKey, ClientTransaction] = {}
        self._deadlines: Deadlines[tuple[_Transaction, TimerName]] = Deadlines()

    def __len__(self) -> int:
        return len(self._servers) + len(self._clients)

    # -- server side -------------------------------------------------------------------------
    def receive_request(
        self, request: Request, *, dest: object, reliable: bool, now: float
    ) -> tuple[RequestDisposition, ServerTransaction | None, list[Output]]:
        """Match a request to a server transaction (RFC 3261 17.2.3) or create one.

        NEW returns the new transaction; RETRANSMISSION, ACK_ABSORBED, STRAY and an ACK_TO_TU
        for a transaction in Accepted return the matched transaction; an ACK_TO_TU matching
        nothing returns None. Raises ParseError if a header used for matching is malformed.
        """
        if request.method == "ACK":
            return self._receive_ack(request, now)
        key = _server_key(request, request.method)
        tx = self._servers.get(key)
        if tx is not None:
            return RequestDisposition.RETRANSMISSION, tx, tx._fire(_REQUEST, now)
        new: ServerTransaction
        if request.method == "INVITE":
            invite_tx = InviteServerTransaction(
                self, request, key=key, dest=dest, reliable=reliable
            )
            if invite_tx._ack_key is not None:
                self._acks_2543[invite_tx._ack_key] = invite_tx
            new = invite_tx
        else:
            new = NonInviteServerTransaction(self, request, key=key, dest=dest, reliable=reliable)
        self._servers[key] = new
        return RequestDisposition.NEW, new, new._start(now)

    def _receive_ack(
        self, ack: Request, now: float
    ) -> tuple[RequestDisposition, ServerTransaction | None, list[Output]]:
        via = ack.top_via
        found: ServerTransaction | None
        if via is not None and via.rfc3261_branch:
            found = self._servers.get(_server_key(ack, "INVITE"))
        else:
            old = self._acks_2543.get(_ack_key_2543(ack))
            found = old if old is not None and old._ack_tag_matches(ack) else None
        if not isinstance(found, InviteServerTransaction):
            # RFC 3261 17.2.3 / 13.3.1.4: an ACK for a 2xx is a transaction of its own.
            return RequestDisposition.ACK_TO_TU, None, []
        disposition, out = found._on_ack(now)
        return disposition, found, out

    def has_server(self, request: Request) -> bool:
        """Whether ``request`` matches a server transaction (RFC 3261 17.2.3): it is a
        retransmission. Raises ParseError if a header used for matching is malformed."""
        return _server_key(request, request.method) in self._servers

    def find_cancel_target(self, cancel: Request) -> InviteServerTransaction | None:
        """The INVITE server transaction a CANCEL refers to (RFC 3261 9.2): same matching key
        as the CANCEL's own transaction, with method INVITE."""
        tx = self._servers.get(_server_key(cancel, "INVITE"))
        return tx if isinstance(tx, InviteServerTransaction) else None

    # -- client side -------------------------------------------------------------------------
    def send_request(
        self, request: Request, *, dest: object, reliable: bool, now: float
    ) -> tuple[ClientTransaction, list[Output]]:
        """Start a client transaction. The TU has put a fresh RFC 3261 branch in the top Via
        (``new_branch()``). ACK is never sent in a transaction (RFC 3261 17.1.1.3, 13.2.2.4)."""
        if request.method == "ACK":
            raise ValueError("ACK is not sent in a client transaction")
        via = request.top_via
        if via is None or not via.rfc3261_branch or via.branch is None:
            raise ValueError("the top Via needs an RFC 3261 branch (new_branch())")
        key: ClientKey = (via.branch, request.method)
        if key in self._clients:
            raise ValueError(f"a client transaction with branch {via.branch} already exists")
        tx: ClientTransaction
        if request.method == "INVITE":
            tx = InviteClientTransaction(self, request, key=key, dest=dest, reliable=reliable)
        else:
            tx = NonInviteClientTransaction(self, request, key=key, dest=dest, reliable=reliable)
        self._clients[key] = tx
        return tx, tx._start(now)

    def receive_response(
        self, response: Response, *, now: float
    ) -> tuple[ClientTransaction | None, list[Output]]:
        """Match a response to a client transaction (RFC 3261 17.1.3: top Via branch and CSeq
        method). Unmatched: ``(None, [])`` and the TU decides. A matched response that the
        state absorbs gives ``(tx, [])``."""
        via = response.top_via
        cseq = response.cseq
        if via is None or cseq is None or via.branch is None:
            return None, []
        tx = self._clients.get((via.branch, cseq.method))
        if tx is None:
            return None, []
        status = response.status
        event = _RECV_1XX if status < 200 else _RECV_2XX if status < 300 else _RECV_300_699
        return tx, tx._fire(event, now, response)

    def terminate(self, transaction: ClientTransaction | ServerTransaction) -> list[Output]:
        """Remove a transaction at once, e.g. after a transport failure (RFC 3261 17.1.4,
        17.2.4) or 64*T1 after a CANCEL that never got its 487 (RFC 3261 9.1)."""
        return transaction._fire(_TRANSPORT_ERROR, 0.0)  # ignored once Terminated

    # -- timers ------------------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        """The earliest armed timer over all transactions, or None."""
        return self._deadlines.next_deadline()

    def handle_timer(self, now: float) -> list[Output]:
        """Fire every timer due at ``now``, in deadline order."""
        out: list[Output] = []
        deadlines = self._deadlines
        while (due := deadlines.pop_due(now)) is not None:
            tx, name = due
            del tx._timers[name]
            out.extend(tx._fire(_TIMER_EVENTS[name], now))
        return out

    @property
    def timer_entries(self) -> int:
        """Timer entries held, cancelled ones included (for leak checks)."""
        return self._deadlines.entries

    def _remove(self, tx: _Transaction) -> None:
        if isinstance(tx, ServerTransaction):
            if self._servers.get(tx.key) is tx:
                del self._servers[tx.key]
            ack_key = tx._ack_key if isinstance(tx, InviteServerTransaction) else None
            if ack_key is not None and self._acks_2543.get(ack_key) is tx:
                del self._acks_2543[ack_key]
        elif isinstance(tx, ClientTransaction):
            key = cast(ClientKey, tx.key)
            if self._clients.get(key) is tx:
                del self._clients[key]


# How a transaction user answers a server transaction through the core, which builds the
# response (RFC 3261 8.2.6: To tag, copied headers): (server transaction, status, reason or
# None for the default phrase, extra headers, now) -> outputs.
Respond: TypeAlias = Callable[
    [ServerTransaction, int, str | None, tuple[tuple[str, str], ...], float], list[Output]
]
