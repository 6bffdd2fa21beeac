"""The state the signalling workers of one SBC share, as events that travel between them.

With several workers (docs/architecture.md, "Signalling workers") the kernel spreads clients
over them, so a client's refresh or a call to a user may reach a worker other than the one
that took the user's first REGISTER. Each worker therefore keeps a whole copy of the shared
state, and every change one makes goes to the others as an event (``actions.Share``), which
they apply (``SbcCore.apply_shared``) without sharing it again. A (re)started worker gets
the whole state as the events of a live one's ``SbcCore.snapshot``.

An event is a tuple of plain values that marshal carries: its kind, the schema version
(``VERSION``: a worker refuses, and counts, an event of another version), then its fields.
A flow is ``(transport, (host, port), (host, port), conn_id)``; a contact is its text
(``str(NameAddr)``), read back by the header parser; times are the monotonic clock's, which
every process of the machine shares (CLOCK_MONOTONIC), so deadlines travel as they are.

============ =====================================================================
kind         fields after (kind, VERSION)
============ =====================================================================
``reg``      aor, flow, call_id, cseq, contacts, backend, backend_call_id (or None),
             backend_expires_at, client_expires, client_expires_at, owner: a
             registration relayed to a backend, stored whole (it replaces the
             record of its aor, call_id and flow)
``refresh``  aor, flow, call_id, cseq, client_expires, client_expires_at: a
             refresh answered by the SBC itself (offload)
``unreg``    aor, flow, call_id: a registration the client removed
``flow``     flow: a client flow found dead by its keep-alives
``lost``     flow: a client's connection that the sending worker held closed (its
             bindings stay until they expire; requests for it get 430)
``register`` aor, flow, call_id, cseq, contacts, expires, now: a REGISTER the
             embedded registrar applied (RFC 3261 10.3), applied again as it was
``binding``  aor, flow, call_id, cseq, contact, expires_at: one binding of the
             embedded registrar as it is (a snapshot)
``ban``      source, until, reason: a source the security guard banned
============ =====================================================================

Who does what with a relayed registration (``RegistrationProxy``): its ``owner`` is the
worker that stored it last from a backend's answer, whose Path (its own core socket) the
backend holds. Every change of a record is shared or made by every worker alike, and the work
at the backend (de-registration, recovery) is the owner's alone:

- a 2xx from the backend to a forwarded REGISTER: stored with the forwarding worker as owner,
  shared (``reg``); a de-registration's 2xx drops it, shared (``unreg``);
- a refresh answered locally, by the full path or from a template, moves the CSeq and the
  client's expiry on, shared (``refresh``); the owner stays, and learns that the client still
  refreshes. A ``refresh`` whose CSeq is not above the record's, or for a record gone, is
  stale and ignored;
- the client's expiry: every worker drops the record at the same deadline by itself; only the
  owner sends the de-REGISTER to the backend, and it shares the drop (``unreg``): a worker
  that answered a refresh just before the deadline, whose ``refresh`` reached the owner too
  late, drops the record too (no record outlives its backend binding), so the client's next
  refresh goes to the backend;
- a dead flow (keep-alives stay with the workers that watch them): the watcher shares it
  (``flow``); every worker drops the flow's records and bindings and ends its calls over it,
  and each owner de-registers its own records;
- a client's connection closed: the worker that held it shares it (``lost``); the others,
  which sent to the client through that worker, answer requests for it 430 (RFC 5626 5.3)
  and end their calls over it; the bindings stay everywhere until they expire, as with one
  worker;
- a backend that goes down: each worker finds it by its own probes and recovers only the
  records it owns, and shares each one the other backend takes (``reg``, the same owner).

Templates of refreshes (refresh.py) and keep-alives stay with the worker that made them; a
``reg`` drops the templates of the record it replaces.

The embedded registrar (``LocationService``) is shared by applying each REGISTER it took
(``register``) in every worker: the same operation on the same bindings gives the same
result; a binding already over when it arrives is not taken. A ban (``Guard``) is added by
the others for the same time (``ban``), counted there as ``shared_ban``, not as a ban of
their own.

The core counts the events it applied (``shared_applied``) and those it ignored
(``shared_ignored:version``, ``:kind``, ``:malformed``); the registration proxy counts the
stale ones (``shared_stale``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from sbc.features.registrar import CachedRegistration, LocalBinding
from sbc.sip.flow import Flow
from sbc.sip.headers import NameAddr, parse_name_addr_list

__all__ = [
    "VERSION",
    "Banned",
    "Bound",
    "Dropped",
    "FlowFailed",
    "Refreshed",
    "Registered",
    "Shared",
    "Stored",
    "Unusable",
    "ban_event",
    "binding_event",
    "decode",
    "decode_flow",
    "dropped_event",
    "encode_flow",
    "flow_failed_event",
    "refreshed_event",
    "register_event",
    "shift_times",
    "stored_event",
]

VERSION: Final = 1  # of the layouts above; changed with any of them

STORED: Final = "reg"
REFRESHED: Final = "refresh"
DROPPED: Final = "unreg"
FLOW_FAILED: Final = "flow"
FLOW_LOST: Final = "lost"
REGISTERED: Final = "register"
BOUND: Final = "binding"
BANNED: Final = "ban"

Event = tuple[object, ...]


class Unusable(Exception):
    """An event this worker cannot apply; ``why`` is "version" (another schema version),
    "kind" (unknown) or "malformed"."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


@dataclass(frozen=True, slots=True)
class Stored:
    reg: CachedRegistration


@dataclass(frozen=True, slots=True)
class Refreshed:
    aor: str
    flow: Flow
    call_id: str
    cseq: int
    client_expires: int
    client_expires_at: float


@dataclass(frozen=True, slots=True)
class Dropped:
    aor: str
    flow: Flow
    call_id: str


@dataclass(frozen=True, slots=True)
class FlowFailed:
    flow: Flow


@dataclass(frozen=True, slots=True)
class FlowLost:
    """A client's connection that the sending worker held closed: requests for its users
    get 430 (RFC 5626 5.3) and calls over it end; its bindings stay until they expire."""

    flow: Flow


@dataclass(frozen=True, slots=True)
class Registered:
    """The arguments of ``LocationService.register``."""

    aor: str
    flow: Flow
    call_id: str
    cseq: int
    contacts: tuple[NameAddr, ...]
    expires: int
    now: float


@dataclass(frozen=True, slots=True)
class Bound:
    aor: str
    binding: LocalBinding


@dataclass(frozen=True, slots=True)
class Banned:
    source: str
    until: float
    reason: str


Shared = Stored | Refreshed | Dropped | FlowFailed | FlowLost | Registered | Bound | Banned


# -- encoding ----------------------------------------------------------------------------------


def encode_flow(flow: Flow) -> Event:
    """A flow as plain values (transport, (host, port), (host, port), conn_id)."""
    return (flow.transport, flow.local, flow.remote, flow.conn_id)


def stored_event(reg: CachedRegistration) -> Event:
    return (
        STORED, VERSION, reg.aor, encode_flow(reg.flow), reg.call_id, reg.cseq,
        tuple(str(c) for c in reg.contacts), reg.backend, reg.backend_call_id,
        reg.backend_expires_at, reg.client_expires, reg.client_expires_at, reg.owner,
    )  # fmt: skip


def refreshed_event(reg: CachedRegistration) -> Event:
    return (
        REFRESHED, VERSION, reg.aor, encode_flow(reg.flow), reg.call_id, reg.cseq,
        reg.client_expires, reg.client_expires_at,
    )  # fmt: skip


def dropped_event(reg: CachedRegistration) -> Event:
    return (DROPPED, VERSION, reg.aor, encode_flow(reg.flow), reg.call_id)


def flow_failed_event(flow: Flow) -> Event:
    return (FLOW_FAILED, VERSION, encode_flow(flow))


def flow_lost_event(flow: Flow) -> Event:
    return (FLOW_LOST, VERSION, encode_flow(flow))


def register_event(
    *,
    aor: str,
    flow: Flow,
    call_id: str,
    cseq: int,
    contacts: tuple[NameAddr, ...],
    expires: int,
    now: float,
) -> Event:
    contact_texts = tuple(str(c) for c in contacts)
    return (REGISTERED, VERSION, aor, encode_flow(flow), call_id, cseq, contact_texts, expires, now)


def binding_event(aor: str, b: LocalBinding) -> Event:
    flow = encode_flow(b.flow)
    return (BOUND, VERSION, aor, flow, b.call_id, b.cseq, str(b.contact), b.expires_at)


def ban_event(source: str, until: float, reason: str) -> Event:
    return (BANNED, VERSION, source, until, reason)


# The positions of the times in each kind of event (the monotonic clock's).
_TIMES: Final = {
    STORED: (9, 11), REFRESHED: (7,), REGISTERED: (8,), BOUND: (7,), BANNED: (3,),
}  # fmt: skip


def shift_times(event: Event, delta: float) -> Event:
    """``event`` with its times moved by ``delta`` seconds: from one clock to another (a
    stored event's times are wall-clock ones, sbc/state.py); Unusable as ``decode``."""
    if len(event) < 2 or event[1] != VERSION or isinstance(event[1], bool):
        raise Unusable("malformed" if len(event) < 2 else "version")
    kind = event[0]
    positions = _TIMES.get(kind) if isinstance(kind, str) else None
    if positions is None:
        return event
    shifted = list(event)
    try:
        for i in positions:
            shifted[i] = _time(shifted[i]) + delta
    except (IndexError, ValueError) as exc:
        raise Unusable("malformed") from exc
    return tuple(shifted)


# -- decoding ----------------------------------------------------------------------------------


def decode(event: Event) -> Shared:
    """What ``event`` says, or Unusable."""
    if len(event) < 2:
        raise Unusable("malformed")
    kind, version = event[0], event[1]
    if version != VERSION or isinstance(version, bool):
        raise Unusable("version")
    try:
        if kind == REFRESHED:
            _fields(event, 8)
            return Refreshed(
                _str(event[2]), decode_flow(event[3]), _str(event[4]), _int(event[5]),
                _int(event[6]), _time(event[7]),
            )  # fmt: skip
        if kind == STORED:
            _fields(event, 13)
            backend_call_id = event[8]
            reg = CachedRegistration(
                aor=_str(event[2]), flow=decode_flow(event[3]), call_id=_str(event[4]),
                cseq=_int(event[5]), contacts=_contacts(event[6]), backend=_str(event[7]),
                backend_expires_at=_time(event[9]), client_expires=_int(event[10]),
                client_expires_at=_time(event[11]), owner=_int(event[12]),
            )  # fmt: skip
            reg.backend_call_id = None if backend_call_id is None else _str(backend_call_id)
            return Stored(reg)
        if kind == DROPPED:
            _fields(event, 5)
            return Dropped(_str(event[2]), decode_flow(event[3]), _str(event[4]))
        if kind == FLOW_FAILED:
            _fields(event, 3)
            return FlowFailed(decode_flow(event[2]))
        if kind == FLOW_LOST:
            _fields(event, 3)
            return FlowLost(decode_flow(event[2]))
        if kind == REGISTERED:
            _fields(event, 9)
            return Registered(
                _str(event[2]), decode_flow(event[3]), _str(event[4]), _int(event[5]),
                _contacts(event[6]), _int(event[7]), _time(event[8]),
            )  # fmt: skip
        if kind == BOUND:
            _fields(event, 8)
            [contact] = _contacts((event[6],))
            binding = LocalBinding(
                contact=contact, flow=decode_flow(event[3]), call_id=_str(event[4]),
                cseq=_int(event[5]), expires_at=_time(event[7]),
            )  # fmt: skip
            return Bound(_str(event[2]), binding)
        if kind == BANNED:
            _fields(event, 5)
            return Banned(_str(event[2]), _time(event[3]), _str(event[4]))
    except ValueError as exc:  # also what the header parser raises for a contact
        raise Unusable("malformed") from exc
    raise Unusable("kind")


def _fields(event: Event, count: int) -> None:
    if len(event) != count:
        raise ValueError("wrong number of fields")


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("not a str")
    return value


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError("not an int")
    return value


def _time(value: object) -> float:
    if isinstance(value, float):
        return value
    return float(_int(value))


def _address(value: object) -> tuple[str, int]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError("not an address")
    return _str(value[0]), _int(value[1])


def decode_flow(value: object) -> Flow:
    """The flow ``encode_flow`` made; ValueError if ``value`` is not one."""
    if not isinstance(value, (tuple, list)) or len(value) != 4:
        raise ValueError("not a flow")
    return Flow(_str(value[0]), _address(value[1]), _address(value[2]), _int(value[3]))


def _contacts(value: object) -> tuple[NameAddr, ...]:
    """Contacts from their texts, each read by the header parser (one contact, or ``*``)."""
    if not isinstance(value, (tuple, list)):
        raise ValueError("not a list of contacts")
    contacts: list[NameAddr] = []
    for text in value:
        parsed = parse_name_addr_list(_str(text))
        if len(parsed) != 1:
            raise ValueError("not one contact")
        contacts.append(parsed[0])
    return tuple(contacts)
