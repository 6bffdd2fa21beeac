"""State kept outside the process (``[state] url``: Redis), sans-I/O: which entries changed,
what each holds, and how a stored value is read back.

The SBC keeps its state in memory and writes each change through to the store, so that a
restarted SBC, or another instance that names the same store and ``key_prefix``, finds it
(docs/state.md). What is kept is the state the signalling workers already share
(sbc/registration/shared.py), as the same events, one entry per thing:

============================== ==========================================================
key (after ``key_prefix``)     value: the events that rebuild it
============================== ==========================================================
``reg:AOR|CALL-ID|FLOW``       one relayed registration (registration offload): ``reg``;
                               a refresh is written every other time (``refresh_due``)
                               (refreshes written every other time: ``refresh_due``)
``aor:AOR``                    the embedded registrar's bindings of an AOR: ``binding``
``ban:IP``                     a ban in force: ``ban``
``call:NODE:ID``               an established call: ``("call", VERSION, values)``, the
                               values of sbc/calls/persist.py (both dialogs, the media
                               session); this instance's own, never shared
============================== ==========================================================

A value is JSON, ``{"v": VERSION, "events": [...]}``, with the events' times in wall-clock
seconds (the writer's monotonic clock plus its ``wall_offset``; a reader moves them onto
its own clock). Each entry expires in the store when what it holds does (``expires_at``),
so nothing is ever scanned to clean up; an entry whose thing is gone is deleted.

The core marks what changed as it works (``MemoryRegistrationStore.changed``,
``LocationService.changed``, the guard's new bans) and turns the marks into ``Persist``
actions after each entry point (``collect``); changes it applies from another worker or
instance are not marked (they are the other's to write).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from sbc.actions import Persist
from sbc.features.registrar import CachedRegistration, LocalBinding
from sbc.registration.shared import (
    VERSION,
    Event,
    Unusable,
    ban_event,
    binding_event,
    shift_times,
    stored_event,
)
from sbc.sip.flow import Flow, format_address

# Plain values only (no cycles to look for): the encoder skips that check.
_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), check_circular=False)
REG: Final = "reg:"
AOR: Final = "aor:"
BAN: Final = "ban:"
CALL: Final = "call:"
KINDS: Final = (REG, AOR, BAN, CALL)  # the key prefixes a load reads
CALL_EVENT: Final = "call"
STORED_EVENT: Final = "reg"  # shared.py's kind of a relayed registration
# How long a call's entry lasts without [calls] max_duration (it is written again at every
# change of the call, and deleted at its end).
CALL_LIFETIME: Final = 86400.0


def flow_key(flow: Flow) -> str:
    return (
        f"{flow.transport}|{format_address(flow.local)}|{format_address(flow.remote)}"
        f"|{flow.conn_id}"
    )


def reg_key(aor: str, call_id: str, flow: Flow) -> str:
    return f"{REG}{aor}|{call_id}|{flow_key(flow)}"


def aor_key(aor: str) -> str:
    return f"{AOR}{aor}"


def ban_key(source: str) -> str:
    return f"{BAN}{source}"


def encode(events: Iterable[Event], wall_offset: float) -> bytes:
    """The stored value of ``events`` (times on the monotonic clock of ``wall_offset``)."""
    wall = [shift_times(e, wall_offset) for e in events]
    return _ENCODER.encode({"v": VERSION, "events": wall}).encode()


def decode(data: bytes, wall_offset: float) -> list[Event]:
    """The events of a stored value, their times on the monotonic clock of
    ``wall_offset``; Unusable("version") for another schema version, ("malformed")
    for anything else that is not one."""
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise Unusable("malformed") from exc
    if not isinstance(value, dict) or not isinstance(value.get("events"), list):
        raise Unusable("malformed")
    if value.get("v") != VERSION:
        raise Unusable("version")
    events: list[Event] = []
    for event in value["events"]:
        if not isinstance(event, list):
            raise Unusable("malformed")
        events.append(shift_times(_tuples(event), -wall_offset))
    return events


def _tuples(value: list[object]) -> tuple[object, ...]:
    """JSON's lists as the tuples the events were made of (flows, addresses, contacts)."""
    return tuple(_tuples(v) if isinstance(v, list) else v for v in value)


def registration(reg: CachedRegistration | None, key: str, wall_offset: float) -> Persist:
    """The entry of a relayed registration (deleted when ``reg`` is None). Its key lives a
    client period longer than the registration: a refresh is written only every other
    time (``refresh_due``), and a load gives each record that period back (``grace``)."""
    if reg is None:
        return Persist(key, None, 0.0)
    reg.persisted_expiry = reg.client_expires_at
    value = encode([stored_event(reg)], wall_offset)
    return Persist(key, value, reg.client_expires_at + reg.client_expires + wall_offset)


def refresh_due(reg: CachedRegistration) -> bool:
    """Whether a refreshed registration's entry must be written now: once the expiry written
    last is a client period behind (so a refresh costs a write every other time at most,
    on the path the registration offload makes cheap)."""
    return reg.client_expires_at - reg.persisted_expiry >= reg.client_expires


def grace(event: Event) -> Event:
    """A relayed registration read back at start, its client expiry moved on by a client
    period: the refresh written last may be one behind (``refresh_due``), and a client
    that lived through the restart refreshes within that period."""
    if event[0] != STORED_EVENT or len(event) != 13:
        return event
    client_expires, client_expires_at = event[10], event[11]
    if not isinstance(client_expires, int) or not isinstance(client_expires_at, (int, float)):
        return event
    return (*event[:11], client_expires_at + client_expires, *event[12:])


def bindings(aor: str, live: list[LocalBinding], wall_offset: float) -> Persist:
    """The entry of an AOR's bindings (deleted when none is left): it lasts as long as
    the longest binding."""
    key = aor_key(aor)
    if not live:
        return Persist(key, None, 0.0)
    value = encode([binding_event(aor, b) for b in live], wall_offset)
    return Persist(key, value, max(b.expires_at for b in live) + wall_offset)


def call_key(node: str, call_id: str) -> str:
    """A call's key: under its SBC's ``node`` (``node_id``): an instance loads its own calls
    only, never those of another instance on the same store."""
    return f"{CALL}{node}:{call_id}"


def node_id(name: str, listeners: list[str]) -> str:
    """A name for one SBC that a restart on the same config keeps: its [sbc] name and its
    listen URLs (two instances on one store listen on different addresses)."""
    digest = hashlib.sha256("\n".join([name, *sorted(listeners)]).encode()).hexdigest()
    return digest[:12]


def call(
    node: str,
    call_id: str,
    value: dict[str, object],
    until: float,
    wall_offset: float,
    *,
    fresh: bool,
) -> Persist:
    """The entry of an established call (sbc/calls/persist.py: its times are wall-clock
    ones already): ``("call", VERSION, values)``, kept by this instance alone (a call is
    not shared with other instances: its flows and media are this one's). ``fresh``: its
    first (a call that ends before it is written is not written at all)."""
    data = encode([(CALL_EVENT, VERSION, value)], 0.0)
    return Persist(call_key(node, call_id), data, until + wall_offset, fresh)


def ban(source: str, until: float, reason: str, wall_offset: float) -> Persist:
    value = encode([ban_event(source, until, reason)], wall_offset)
    return Persist(ban_key(source), value, until + wall_offset)


@dataclass(slots=True)
class StateHealth:
    """How the store is doing, for /readyz, /metrics and ``sbc status`` (the I/O layer's
    adapter keeps it up to date)."""

    up: bool = True
    down_since: float | None = None  # wall-clock time it became unreachable
    errors: int = 0  # writes or reads that failed
    writes: int = 0  # entries written or deleted
    published: int = 0  # events sent to the other instances
    received: int = 0  # events the other instances sent
    dropped: int = 0  # events not sent while the store was down (a resync follows)
    malformed: int = 0  # messages from the channel that were not the SBC's
    loaded: int = 0  # entries read at start
    pending: int = 0  # entries waiting to be written
