#!/usr/bin/env python3
"""A media worker's CPU to set up and tear down one anchored call, without packets.

    .venv/bin/python bench/media_control.py [--calls 1000] [--rounds 3]

One worker process (``sbc.io.media_worker.MediaWorkers``) is driven as the signalling side
drives it for a call with one audio stream, SRTP on the caller's leg and RTP on the
callee's: the offer's ``control.Update`` (the caller's address and key, the SBC's keys), the
answer's ``Update`` (the callee's address), then ``control.Delete``, answered with
``Stats``. Each round sends ``--calls`` calls' offers and answers, waits until every relay
port is bound, sends the deletes and waits for every Stats; the worker's CPU time (user +
system, /proc/PID/stat) over the round, divided by the calls, is the figure. The median of
``--rounds`` rounds is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import BenchError, cpu_seconds

from sbc.io.media_worker import MediaWorkers
from sbc.media import control

HOST = "127.0.0.1"
FIRST_PORT = 40000  # the relay ports: 4 per call (RTP and RTCP facing each party)
SUITE = "AES_CM_128_HMAC_SHA1_80"


def _key() -> control.SrtpKey:
    return control.SrtpKey(suite=SUITE, key_salt=secrets.token_bytes(30))


def _updates(call: int, port: int) -> tuple[control.Update, control.Update]:
    """The offer's and the answer's Update of one call, as the signalling side sends them."""
    session = f"bench-{call}"
    caller = control.Party(
        bind=HOST, port=port, remote=(HOST, 20000), remote_rtcp=(HOST, 20001),
        recv_key=_key(), send_key=_key(),
    )  # fmt: skip
    offered = control.Party(bind=HOST, port=port + 2, accept=True)
    answered = control.Party(
        bind=HOST, port=port + 2, remote=(HOST, 30000), remote_rtcp=(HOST, 30001)
    )
    offer = control.Update(session=session, streams=(control.Stream(index=0, a=caller, b=offered),))
    answer = control.Update(
        session=session, streams=(control.Stream(index=0, a=caller, b=answered),)
    )
    return offer, answer


async def _until(what: str, done: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not done():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise BenchError(f"{what} not done within {timeout:g} s")
        await asyncio.sleep(0.01)


async def _round(workers: MediaWorkers, pid: int, calls: int, events: list[object]) -> float:
    events.clear()
    before = cpu_seconds(pid)
    for call in range(calls):
        offer, answer = _updates(call, FIRST_PORT + 4 * call)
        workers.send(0, offer)
        workers.send(0, answer)
        if call % 100 == 99:
            await asyncio.sleep(0)  # let the commands go out, as the event loop would
    # A Totals report comes at once and then every few seconds; Stats only after Delete.
    for call in range(calls):
        workers.send(0, control.Delete(session=f"bench-{call}"))
        if call % 100 == 99:
            await asyncio.sleep(0)

    def all_stats() -> bool:
        return sum(isinstance(e, control.Stats) for e in events) >= calls

    await _until("the Stats of every call", all_stats, 60.0)
    return (cpu_seconds(pid) - before) / calls


async def run(calls: int, rounds: int) -> list[float]:
    events: list[object] = []
    workers = await MediaWorkers.start(1, timeout=3600.0, latch_window=5.0,
                                       on_event=events.append)  # fmt: skip
    try:
        pids = [p.pid for p in workers._procs]
        if len(pids) != 1:
            raise BenchError("expected one media worker process")
        await asyncio.sleep(0.5)  # the worker's start-up is not part of the figure
        await _round(workers, pids[0], min(calls, 200), events)  # warm-up
        return [await _round(workers, pids[0], calls, events) for _ in range(rounds)]
    finally:
        await workers.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("--calls", type=int, default=1000, help="calls per round (1000)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; the median is reported")
    args = ap.parse_args()
    if FIRST_PORT + 4 * args.calls > 65535:
        ap.error("too many calls for the port range")
    per_call = asyncio.run(run(args.calls, args.rounds))
    rounds = ", ".join(f"{x * 1e6:.0f}" for x in per_call)
    print(
        f"media worker CPU per call set up and torn down (no packets): "
        f"{statistics.median(per_call) * 1e6:.0f} us, median of {args.rounds} rounds "
        f"({rounds}) of {args.calls} calls; pid {os.getpid()}"
    )


if __name__ == "__main__":
    main()
