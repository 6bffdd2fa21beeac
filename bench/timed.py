"""A core whose entry points are timed, for the sans-I/O benchmarks (bench/core_calls.py,
bench/core_register.py)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any


class TimedCore:
    """``core`` with the methods ``entry_points`` timed: each call's CPU time of this
    thread (CLOCK_THREAD_CPUTIME_ID) goes to ``record``. A wrapper, not a patched class: the
    compiled ``SbcCore`` is an extension type whose methods cannot be replaced; everything
    else is the core's own."""

    def __init__(
        self, core: Any, entry_points: Iterable[str], record: Callable[[float], None]
    ) -> None:
        self._core = core
        for name in entry_points:
            setattr(self, name, _timed(getattr(core, name), record))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._core, name)


def _timed(entry: Callable[..., Any], record: Callable[[float], None]) -> Callable[..., Any]:
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.thread_time()
        try:
            return entry(*args, **kwargs)
        finally:
            record(time.thread_time() - start)

    return timed
