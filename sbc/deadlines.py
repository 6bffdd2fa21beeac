"""Deadlines: the one timer structure of the sans-I/O core.

Each layer (transactions, calls, the registration proxy ...) keeps its timers in a
``Deadlines`` keyed by what the timer is for, e.g. ``(transaction, "E")`` or
``(call, "no_answer")``, and exposes the earliest one as its ``next_deadline()``; the I/O
layer arms one timer for the core's earliest and calls ``handle_timer(now)`` when it fires.

A heap with lazy deletion: setting a timer is O(log n); cancelling one only forgets it, and
the heap entry is dropped when it comes to the top, or all at once when a cancellation
leaves the cancelled entries outnumbering the live ones, or when no timer is live at all.
So a cancelled timer never keeps its owner (a finished call, a terminated transaction)
alive for long, and once every timer has fired or been cancelled the structure holds
nothing.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class Deadlines(Generic[K]):
    __slots__ = ("_heap", "_live", "_seq", "_stale")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, K]] = []
        self._live: dict[K, int] = {}  # key -> sequence number of its heap entry
        self._seq = 0
        self._stale = 0  # cancellations since the last compaction (entries left behind)

    def set(self, key: K, deadline: float) -> None:
        """Arm the timer ``key`` for ``deadline`` (replacing it if it was armed: the old
        entry is skipped when it comes to the top, or dropped by a compaction)."""
        seq = self._seq = self._seq + 1
        self._live[key] = seq
        heapq.heappush(self._heap, (deadline, seq, key))

    def cancel(self, key: K) -> bool:
        """Disarm ``key``; whether it was armed."""
        live = self._live
        if live.pop(key, None) is None:
            return False
        if not live:
            self._heap.clear()  # every entry left is a cancelled one
            self._stale = 0
        else:
            self._stale += 1
            if self._stale > 64 and self._stale > len(live):
                self._compact()
        return True

    def __contains__(self, key: K) -> bool:
        return key in self._live

    def __len__(self) -> int:
        """Timers armed."""
        return len(self._live)

    @property
    def entries(self) -> int:
        """Heap entries held, cancelled ones included (for leak checks)."""
        return len(self._heap)

    def next_deadline(self) -> float | None:
        """The earliest armed deadline, or None."""
        heap, live = self._heap, self._live
        while heap:
            deadline, seq, key = heap[0]
            if live.get(key) == seq:
                return deadline
            heapq.heappop(heap)
        return None

    def pop_due(self, now: float) -> K | None:
        """The earliest timer due at ``now`` (disarmed), or None if none is. Call it in a
        loop: what a fired timer does may arm or cancel others."""
        heap, live = self._heap, self._live
        while heap and heap[0][0] <= now:
            _, seq, key = heapq.heappop(heap)
            if live.get(key) == seq:
                del live[key]
                return key
        return None

    def _compact(self) -> None:
        # In place, so that a caller holding the list sees the same object.
        live = self._live
        self._heap[:] = [entry for entry in self._heap if live.get(entry[2]) == entry[1]]
        heapq.heapify(self._heap)
        self._stale = 0
