"""What leaves the sans-I/O core: every effect of an entry point of ``SbcCore`` is one of
these actions, returned in order (the sends and closes, then the commands for the media
workers, the call records and the drain's end that came of it). The I/O layer
(sbc/io/sip_transport.py, sbc/app.py) executes them; nothing else leaves the core."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, cast

from sbc.media.control import Command as MediaCommand
from sbc.sip.flow import Flow

__all__ = [
    "Action",
    "CallRecord",
    "Close",
    "Drained",
    "HandOver",
    "Persist",
    "SendData",
    "Share",
    "ToMediaWorker",
    "with_effects",
]


@dataclass(frozen=True, slots=True)
class SendData:
    """Send ``data`` on ``flow`` (for UDP: from flow.local to flow.remote)."""

    flow: Flow
    data: bytes


@dataclass(frozen=True, slots=True)
class Close:
    """Close the stream connection of ``flow``."""

    flow: Flow


@dataclass(frozen=True, slots=True)
class ToMediaWorker:
    """Give ``command`` to media worker ``worker`` (control.py: an update, a delete, a DTMF
    digit to send), in the order the actions come."""

    worker: int
    command: MediaCommand


@dataclass(frozen=True, slots=True)
class CallRecord:
    """One ended call's record, a JSON line (docs/calls.md), for the records file."""

    line: str


@dataclass(frozen=True, slots=True)
class Drained:
    """Draining (SIGTERM), the last call has ended and its last transaction finished: the
    process may stop. Returned once, by the entry point after which it became true."""


@dataclass(frozen=True, slots=True)
class Share:
    """A change of the state that the SBC's signalling workers share (a registration
    stored or dropped, a source banned), for every other worker: ``event`` is a tuple of
    plain values (str, int, float, bytes, None, tuples of them) that marshal carries; the
    other workers give it to ``SbcCore.apply_shared``."""

    event: tuple[object, ...]


@dataclass(frozen=True, slots=True)
class HandOver:
    """Something for another signalling worker of the SBC: a message received here whose
    transaction or dialog is that worker's (``received``: it goes in there as if received on
    ``flow``), or data to send on a connection that worker holds (``received`` False)."""

    worker: int
    flow: Flow
    data: bytes
    received: bool


@dataclass(frozen=True, slots=True)
class Persist:
    """An entry of the state kept outside the process (sbc/state.py): ``key`` (after the
    configured prefix) gets ``value`` until ``expires_at`` (wall-clock seconds), or is
    deleted (``value`` None)."""

    key: str
    value: bytes | None
    expires_at: float
    fresh: bool = False  # never written before (its deletion may simply cancel it)


Action = SendData | Close | ToMediaWorker | CallRecord | Drained | Share | HandOver | Persist


class _Core(Protocol):
    def _effects(self, actions: list[Action]) -> list[Action]: ...


_Entry = TypeVar("_Entry", bound=Callable[..., list[Action]])


def with_effects(entry: _Entry) -> _Entry:
    """An entry point of the core returns every effect of what it did: its own actions, then
    those its parts collected while they worked (``SbcCore._effects``: media commands, call
    records, the drain's end)."""

    @functools.wraps(entry)
    def wrapper(self: _Core, *args: Any, **kwargs: Any) -> list[Action]:
        return self._effects(entry(self, *args, **kwargs))

    return cast(_Entry, wrapper)
