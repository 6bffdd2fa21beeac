"""CPU per call of the sans-I/O core alone: no sockets, no event loop, no media worker.

    .venv/bin/python bench/core_calls.py [--calls 2000] [--rounds 3] [--default-gc] [--profile]
    .venv/bin/python bench/core_calls.py --held 2000

Drives ``SbcCore`` with the B2BUA tests' call flow (tests/test_b2bua.py ``Lab``: an anchored
call alice -> SBC -> backend: INVITE with SDP, 180, 200 with SDP, ACK, BYE, 200; the
backend's answers made by the test helpers) and times only the core's own entry points
(``receive_datagram``, ``handle_timer``, ``media_event``), so the figure is what one call
costs the signalling process before any I/O. It bounds what bench/calls.py can reach on one
core: 1 / (CPU per call) calls per second at best. The time is the CPU time of this
process's thread (CLOCK_THREAD_CPUTIME_ID) spent inside those entry points, with the
garbage collector set as the running SBC sets it (``sbc.app.tune_gc``; ``--default-gc``
leaves Python's defaults); the figure is the median of ``--rounds`` rounds. ``--profile``
prints cProfile's top functions (cumulative) of one more run. ``--held N`` measures memory
instead: the heap per established call, and the heap after the calls ended.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import gc
import pstats
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
if "--held" in sys.argv:
    tracemalloc.start()  # before the SBC's modules: the whole heap is traced

import test_b2bua as tb
from timed import TimedCore

from sbc.app import tune_gc
from sbc.sip.message import Response

spent = [0.0]
ENTRY_POINTS = ("receive_datagram", "handle_timer", "media_event")
timing = [False]  # main() times the entry points; --held and the profile run do not


def _spend(seconds: float) -> None:
    spent[0] += seconds


def run(calls: int) -> None:
    lab = tb.Lab()
    if timing[0]:
        lab.core = TimedCore(lab.core, ENTRY_POINTS, _spend)  # type: ignore[assignment]
    run_calls(lab, 1, calls + 1, hang_up=True)
    lab.assert_clean()


def _settle(lab: tb.Lab) -> int:
    """The harness's own lists emptied, a full collection: the Python heap in bytes."""
    lab.seen.clear()
    lab.media_commands.clear()
    lab.records.clear()
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def held(calls: int) -> None:
    """Memory of established calls: ``calls`` calls set up and held until their set-up
    transactions are over (64*T1), the heap growth per call; then all hung up and their
    transactions over, the heap against where it was before (tracemalloc: every Python
    allocation; started before the SBC's modules are imported)."""
    lab = tb.Lab(media=dataclasses.replace(tb.MEDIA, ports=(20000, 20000 + 4 * calls + 100)))
    run_calls(lab, 1, 51, hang_up=True)  # warm-up: caches and tables at their working size
    before = _settle(lab)
    answers = run_calls(lab, 1000, 1000 + calls, hang_up=False)
    holding = _settle(lab)
    for i, got in enumerate(answers):
        tb.alice_hangs_up(lab, got, 2, 1000 + i)
        if i % 50 == 0:
            lab.seen.clear()
    answers.clear()
    lab.run_until(lab.now + 40)
    after = _settle(lab)
    lab.assert_clean()
    print(
        f"memory per held call: {(holding - before) / calls / 1024:.1f} KiB "
        f"({calls} calls; heap {before / 1024:,.0f} KiB before, {holding / 1024:,.0f} KiB "
        f"held); after they ended: {after / 1024:,.0f} KiB "
        f"({(after - before) / before * 100:+.1f} % of before)"
    )


def run_calls(lab: tb.Lab, first: int, last: int, *, hang_up: bool) -> list[Response]:
    """Calls ``first`` .. ``last - 1`` set up (and hung up), their set-up over (64*T1);
    the caller's 200s of those still up."""
    answers: list[Response] = []
    for n in range(first, last):
        _, _, got = tb.establish(lab, n)
        if hang_up:
            tb.alice_hangs_up(lab, got, 2, n)
        else:
            answers.append(got)
        if n % 50 == 0:
            lab.run_until(lab.now + 0.5)
            lab.seen.clear()
    lab.run_until(lab.now + 40)
    return answers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("--calls", type=int, default=2000, help="calls timed (2000)")
    ap.add_argument("--profile", action="store_true", help="print cProfile's top functions")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; the median is reported (3)")
    ap.add_argument("--default-gc", action="store_true", help="Python's GC defaults, not the SBC's")
    ap.add_argument("--held", type=int, metavar="N", help="measure the memory of N held calls")
    args = ap.parse_args()
    if args.held:
        held(args.held)
        return
    timing[0] = True
    run(200)  # warm-up: imports, caches
    if not args.default_gc:
        tune_gc()
    per_call: list[float] = []
    walls: list[float] = []
    for _ in range(args.rounds):
        spent[0] = 0.0
        wall = time.perf_counter()
        run(args.calls)
        walls.append((time.perf_counter() - wall) / args.calls)
        per_call.append(spent[0] / args.calls)
    cpu = statistics.median(per_call)
    rounds = ", ".join(f"{x * 1e6:.0f}" for x in per_call)
    gc_mode = "default GC" if args.default_gc else "the SBC's GC settings"
    print(
        f"core CPU per call: {cpu * 1e6:.0f} us, median of {args.rounds} rounds ({rounds}) "
        f"of {args.calls} calls with {gc_mode} (at most {1 / cpu:,.0f} calls/s on one core); "
        f"wall per call with the test peers: {statistics.median(walls) * 1e6:.0f} us"
    )
    if args.profile:
        timing[0] = False
        profile = cProfile.Profile()
        profile.enable()
        run(args.calls)
        profile.disable()
        pstats.Stats(profile).sort_stats("cumulative").print_stats("sbc/", 40)


if __name__ == "__main__":
    main()
