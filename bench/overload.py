#!/usr/bin/env python3
"""Overload: goodput of the SBC offered more calls than it sustains, with its overload
control on and off.

    .venv/bin/python bench/overload.py [--rate R] [--factors 0.5,1,2,3] [--out FILE]

One run, one machine. The SBC as bench/calls.py runs it (``sbc run``, no backends, bob
registered at its embedded registrar, SIPp UAS as bob, media anchored by one media worker),
except that the load is not on its allow list (the overload control never refuses a trusted
source) and its per-source limits are off (one SIPp is one source): ``pike_density = 0``,
the ``register``/``invite``/``other`` buckets at rate 0.

1. The sustained rate: unless ``--rate`` is given, bench/calls.py's ladder and long runs
   (its pass rules: fewer than 0.1 % failed, SIPp retransmissions counted; a fresh SBC for
   a long run after a failed one) find the rate the SBC sustains for ``--long-seconds``,
   with the overload control off (its refusals would fail calls of a run near capacity).
2. For each factor of ``--factors``, ``--seconds`` of calls offered at factor x that rate
   (SIPp ``-r``, open loop) to a fresh SBC with the overload control as configured by
   default (``overload_lag``, or ``--target``), each call held ``--hold-ms`` after its ACK
   so that calls are up, and send BYEs, while the excess is refused. The caller
   (bench/scenarios/call_uac_overload.xml) takes a 503 to its INVITE as the end of that
   call (it ACKs it); SIPp's per-message counts (``-trace_counts``) tell the calls
   completed (200 to the BYE received) from the calls refused (503), and SIPp's failed
   calls are calls that broke after they were taken (a lost ACK or BYE, a timeout).
   Goodput is the calls completed per second of offered load.
3. The largest factor once more with the overload control off (``overload_lag = 0``).
4. After the run at 2x (or the largest factor below it): how long after the last new call
   was offered the SBC refused nothing again (its ``sbc_overload_shed_ratio`` at 0, read from
   /metrics every 0.1 s), and a run at 0.5x right after it: every call taken.

The table and a plot (``--plot``, PNG) of goodput against offered load go to ``--out``.
Every process started here is stopped by its PID at the end; every SIPp run is bounded.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import calls
from calls import MEDIA_PORTS, Caller, Setup, Uas, long_runs, register_bob, settle
from harness import HOST, BenchError, Sbc, environment, free_port, print_sbc_logs
from report import choose_cpus, write_section

CLIENT_EXPIRES = 3600
BACKEND_EXPIRES = 7200
# The load is one source: the per-source limits would refuse it long before overload.
UNLIMITED = """pike_density = 0
register = { rate = 0, burst = 1 }
invite = { rate = 0, burst = 1 }
other = { rate = 0, burst = 1 }
"""
SAMPLE_EVERY = 0.25  # seconds between two readings of the SBC's gauges
RECOVERY_LIMIT = 30.0  # seconds to wait at most for the overload control to let go
GOAL_GOODPUT = 0.9  # of the sustained rate, offered 2x


@dataclass
class Run:
    factor: float
    control: bool
    offered: float  # calls/s asked of SIPp
    seconds: float  # of offered load
    calls: int
    completed: int  # 200 to the BYE received
    refused: int  # 503 to the INVITE received
    failed: int  # SIPp's failed calls: taken, then broken
    invite_retrans: int
    retrans: int  # all of SIPp's retransmissions
    sbc_busy: float  # CPU share of the SBC process over the run
    recovery: float | None = None  # seconds until nothing was refused again
    samples: list[tuple[float, float, float]] = field(default_factory=list)

    def delays(self) -> tuple[float, float]:
        """Median and largest receive delay while calls were offered (after the first 2 s)."""
        during = [d for t, d, _ in self.samples if 2.0 <= t <= self.seconds] or [0.0]
        return statistics.median(during), max(during)

    @property
    def goodput(self) -> float:
        return self.completed / self.seconds


def counts(run_dir: Path) -> dict[str, int]:
    """The last row of SIPp's -trace_counts file: per scenario message, ``<index>_<what>_
    <Recv|Retrans|Timeout|Unexp|Sent|...>`` -> count."""
    files = sorted(run_dir.glob("*_counts.csv"))
    if not files:
        raise BenchError(f"no SIPp counts file in {run_dir}")
    with files[-1].open(newline="") as f:
        rows = [row for row in csv.reader(f, delimiter=";") if row]
    return {k: int(v) for k, v in zip(rows[0], rows[-1], strict=False) if v.strip().isdigit()}


def gauges(admin_port: int) -> tuple[float, float]:
    """The SBC's (receive delay, overload shed ratio) from /metrics."""
    with urllib.request.urlopen(f"http://{HOST}:{admin_port}/metrics", timeout=2) as resp:
        text = resp.read().decode()
    found: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("sbc_receive_delay_seconds", "sbc_overload_shed_ratio"):
            found[name] = float(value)
    if len(found) != 2:
        raise BenchError("no sbc_receive_delay_seconds / sbc_overload_shed_ratio in /metrics")
    return found["sbc_receive_delay_seconds"], found["sbc_overload_shed_ratio"]


class Sampler(threading.Thread):
    """The SBC's receive delay and shed ratio every ``SAMPLE_EVERY`` s while a run lasts."""

    def __init__(self, admin_port: int) -> None:
        super().__init__(daemon=True)
        self.admin_port = admin_port
        self.samples: list[tuple[float, float, float]] = []  # (t, delay, ratio)
        self.t0 = time.monotonic()
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(SAMPLE_EVERY):
            try:
                delay, ratio = gauges(self.admin_port)
            except (OSError, BenchError):
                continue  # a slow answer from a busy SBC: the next sample
            self.samples.append((time.monotonic() - self.t0, delay, ratio))

    def finish(self) -> list[tuple[float, float, float]]:
        self._done.set()
        self.join(timeout=5)
        return self.samples


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sut_cpu, self.peer_cpu, self.pinning = choose_cpus(
            args.no_pin, None, None, target_is="the SBC", peers_are="both SIPps"
        )
        self.workdir = Path(tempfile.mkdtemp(prefix="bench-overload-"))
        self.taken: set[int] = set()
        self.started: list[Sbc | Uas] = []
        self.count = 0
        self.after: tuple[int, int] | None = None  # the run at 0.5x after the recovery

    def sbc(self, name: str, control: bool) -> tuple[Sbc, Uas]:
        self.count += 1
        workdir = self.workdir / f"{self.count:02d}-{name}"
        workdir.mkdir()
        target = "0" if not control else (f"{self.args.target}" if self.args.target else "")
        security = UNLIMITED + (f"overload_lag = {target}\n" if target else "")
        sbc = Sbc(
            workdir, self.sut_cpu, self.taken,
            client_expires=CLIENT_EXPIRES, backend_expires=BACKEND_EXPIRES,
            tables=f'\n[media]\nports = "{MEDIA_PORTS}"\nworkers = 1\n',
            security=security, allow_load=False,
        )  # fmt: skip
        self.started.append(sbc)
        sbc.start()
        sbc.wait_ready()
        uas = Uas(workdir, name, free_port(taken=self.taken), self.peer_cpu, life=900)
        self.started.append(uas)
        if register_bob(sbc.port, uas.port, CLIENT_EXPIRES) != 200:
            raise BenchError(f"bob could not register at the SBC:\n{sbc.log()[-2000:]}")
        uas.start()
        return sbc, uas

    def stop(self, sbc: Sbc, uas: Uas) -> None:
        uas.stop()
        sbc.stop()
        if sbc.exit_code != 0 or "Traceback" in sbc.log():
            print(f"--- sbc run: exit code {sbc.exit_code}; log ---\n{sbc.log()[-3000:]}")

    def sustained(self) -> float:
        """bench/calls.py's ladder and long runs through the SBC with this bench's config
        and the overload control off (its refusals would fail the calls of a run near the
        capacity), each long run after a failed one on a fresh SBC."""
        if self.args.rate:
            return float(self.args.rate)
        sbc, uas = self.sbc("sustained", control=False)
        caller = Caller(self.workdir, "sustained", sbc.port, uas, sbc.cpu_seconds, self.peer_cpu)
        setup = Setup("sbc")
        calls.ladder(caller, setup, self.args, lambda: settle(sbc.cpu_seconds))
        running = [(sbc, uas)]

        def fresh() -> tuple[Caller, Callable[[], None]]:
            self.stop(*running.pop())
            sbc, uas = self.sbc("sustained", control=False)
            running.append((sbc, uas))
            caller = Caller(self.workdir, "sustained", sbc.port, uas, sbc.cpu_seconds,
                            self.peer_cpu)  # fmt: skip
            return caller, lambda: settle(sbc.cpu_seconds)

        long_runs(caller, setup, self.args, lambda: settle(sbc.cpu_seconds), None, fresh)
        self.stop(*running.pop())
        if setup.best is None:
            raise BenchError("no sustained rate: no long run passed")
        return setup.best.achieved

    def offer(self, factor: float, rate: float, control: bool, *, recovery: bool) -> Run:
        args = self.args
        name = f"{factor:g}x-{'on' if control else 'off'}"
        sbc, uas = self.sbc(name, control)
        caller = Caller(self.workdir, name, sbc.port, uas, sbc.cpu_seconds, self.peer_cpu)
        caller.scenario = "call_uac_overload.xml"
        caller.options = ("-trace_counts",)
        offered = max(1, round(factor * rate))
        n = int(offered * args.seconds)
        cpu0, t0 = sbc.cpu_seconds(), time.monotonic()
        running = caller.start(offered, n, args.hold_ms)
        sampler = Sampler(sbc.admin_port)
        sampler.start()
        recovered: float | None = None
        if recovery:
            # The last new call is offered at t0 + seconds; from then on, when did the
            # SBC refuse nothing any more?
            time.sleep(max(0.0, t0 + args.seconds - time.monotonic()))
            stop_offering = time.monotonic()
            while time.monotonic() - stop_offering < RECOVERY_LIMIT:
                if gauges(sbc.admin_port)[1] == 0.0:
                    recovered = time.monotonic() - stop_offering
                    break
                time.sleep(0.1)
        step = caller.finish(running)
        samples = sampler.finish()
        with (self.workdir / f"{name}-gauges.csv").open("w") as f:
            f.write("seconds,delay,shed_ratio\n")
            f.writelines(f"{t:.2f},{d:.4f},{r:.3f}\n" for t, d, r in samples)
        busy = (sbc.cpu_seconds() - cpu0) / (time.monotonic() - t0)
        c = counts(step.run_dir or caller.workdir)
        run = Run(
            factor=factor, control=control, offered=offered, seconds=n / offered, calls=n,
            completed=_count(c, "200", "Recv", last=True),
            refused=_count(c, "503", "Recv"),
            failed=step.failed,
            invite_retrans=_count(c, "INVITE", "Retrans"),
            retrans=step.retransmissions, sbc_busy=busy, recovery=recovered, samples=samples,
        )  # fmt: skip
        print(
            f"{name:8} {offered:5}/s x {n:6}: {run.completed} completed "
            f"({run.goodput:,.0f}/s), {run.refused} refused, {run.failed} failed, "
            f"{run.invite_retrans} INVITE retrans, SBC CPU {100 * busy:3.0f} %, delay "
            f"{run.delays()[0] * 1000:.0f}/{run.delays()[1] * 1000:.0f} ms"
            + ("" if recovered is None else f", refusing nothing {recovered:.1f} s after"),
            flush=True,
        )
        if recovery:
            after = caller.step(max(1, round(rate / 2)), max(100, int(rate / 2 * 5)))
            run_after = counts(after.run_dir or caller.workdir)
            print(
                f"  then 0.5x for 5 s: {after.ok} ok, {after.failed} failed, "
                f"{_count(run_after, '503', 'Recv')} refused",
                flush=True,
            )
            self.after = (after.calls, after.failed + _count(run_after, "503", "Recv"))
        self.stop(sbc, uas)
        return run

    def close(self) -> None:
        for proc in reversed(self.started):
            proc.stop()
        if self.args.keep:
            print(f"kept {self.workdir}")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _count(c: dict[str, int], what: str, kind: str, *, last: bool = False) -> int:
    """The count of scenario messages ``what`` (a method or status) of ``kind``; the first
    such message of the scenario, or the last (the 200 to the BYE)."""
    keys = sorted(
        (k for k in c if k.split("_")[1:] == [what, kind]), key=lambda k: int(k.split("_")[0])
    )
    if not keys:
        raise BenchError(f"no {what} {kind} in SIPp's counts: {sorted(c)}")
    return c[keys[-1] if last else keys[0]]


def plot(runs: list[Run], rate: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    on = sorted((r for r in runs if r.control), key=lambda r: r.offered)
    off = [r for r in runs if not r.control]
    top = max(r.offered for r in runs) * 1.05
    ax.plot([0, top], [0, top], ls=":", c="grey", label="every call completed")
    ax.axhline(rate, ls="--", c="grey", lw=0.8, label=f"sustained ({rate:,.0f}/s)")
    ax.plot([r.offered for r in on], [r.goodput for r in on], "o-", label="overload control on")
    ax.plot([r.offered for r in off], [r.goodput for r in off], "x", ms=9, c="red",
            label="overload control off")  # fmt: skip
    ax.set_xlabel("calls offered per second")
    ax.set_ylabel("calls completed per second")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("SBC goodput under overload (bench/overload.py)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def render(
    runs: list[Run], rate: float, after: tuple[int, int] | None, args: argparse.Namespace,
    env: dict[str, str], png: Path | None,
) -> str:  # fmt: skip
    two = next((r for r in runs if r.control and r.factor == 2), None)
    lines = [
        "## Overload (bench/overload.py)",
        "",
        f"- Date: {env['date']}",
        f"- CPU: {env['cpu']}; {env['pinning']}",
        f"- Versions: sbc {env['sbc']}, {env['python']}, SIPp {env['sipp']}",
        f"- Command: `{env['command']}`",
        f"- Sustained rate (bench/calls.py's rules, this run): {rate:,.0f} calls/s. Each "
        f"load below: {args.seconds:g} s of calls offered at a multiple of it, each call "
        f"held {args.hold_ms} ms after its ACK, then BYE; a fresh SBC per load; the load "
        "is not on the allow list, the per-source limits are off. Control on: "
        f"`overload_lag = {args.target or 'default (0.1)'}`; off: `overload_lag = 0`.",
        "",
        "| Offered | Control | Calls offered/s | Completed/s (goodput) | Of sustained | "
        "Refused (503) | Failed after taken | INVITE retransmissions | Receive delay, median / "
        "max | SBC CPU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r.factor:g}x | {'on' if r.control else 'off'} | {r.offered:,.0f} | "
            f"{r.goodput:,.0f} | {r.goodput / rate:.0%} | {r.refused:,} | {r.failed:,} | "
            f"{r.invite_retrans:,} | {r.delays()[0] * 1000:.0f} / {r.delays()[1] * 1000:.0f} ms "
            f"| {r.sbc_busy:.0%} |"
        )
    lines.append("")
    if two is not None:
        ok = two.goodput >= GOAL_GOODPUT * rate
        lines.append(
            f"At 2x: goodput {two.goodput / rate:.0%} of the sustained rate (goal "
            f"{GOAL_GOODPUT:.0%}: {'met' if ok else 'not met'}), {two.failed} calls broken "
            "after they were taken."
        )
    recov = next((r for r in runs if r.recovery is not None), None)
    if recov is not None:
        lines.append(
            f"After {recov.factor:g}x: the SBC refused nothing any more "
            f"{recov.recovery:.1f} s after the last new call was offered"
            + (
                f"; calls at 0.5x right after: {after[0] - after[1]} of {after[0]} taken."
                if after
                else "."
            )
        )
    lines += [
        "",
        "Goodput: calls completed (200 to the BYE received by SIPp) per second of offered load. "
        "Failed after taken: calls SIPp counted as failed (not refused: a timeout, a lost ACK "
        "or BYE). Receive delay: the SBC's `sbc_receive_delay_seconds`, read every 0.25 s "
        "after the first 2 s of the load. SBC CPU: the signalling process (its media worker "
        "shares the same core).",
    ]
    if png is not None:
        lines += ["", f"![goodput against offered load]({png.name})"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, help="the sustained rate (default: measure it)")
    ap.add_argument(
        "--factors",
        type=lambda s: [float(x) for x in s.split(",")],
        default=[0.5, 1.0, 1.5, 2.0, 3.0],
        help="multiples of the sustained rate offered (default: %(default)s)",
    )
    ap.add_argument("--seconds", type=float, default=30.0, help="offered load per run, s (30)")
    ap.add_argument("--hold-ms", type=int, default=0, help="calls held after the ACK (0)")
    ap.add_argument("--target", type=float, help="overload_lag of the SBC (default: its own)")
    ap.add_argument("--no-off", action="store_true", help="skip the run with the control off")
    ap.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--out", type=Path, help="rewrite the bench/overload.py section of FILE")
    ap.add_argument("--plot", type=Path, help="the PNG (default: next to --out)")
    # bench/calls.py's ladder, for the sustained rate.
    ap.add_argument("--rates", type=lambda s: [int(x) for x in s.split(",")],
                    default=[200, 400, 500, 600, 700, 800, 1000, 1200])  # fmt: skip
    ap.add_argument("--step-seconds", type=float, default=2.0)
    ap.add_argument("--min-calls", type=int, default=300)
    ap.add_argument("--refine", type=int, default=2)
    ap.add_argument("--long-seconds", type=float, default=30.0)
    ap.add_argument("--long-tries", type=int, default=3)
    ap.add_argument("--long-backoff", type=float, default=0.85)
    args = ap.parse_args(argv)
    if args.seconds <= 0 or min(args.factors) <= 0:
        ap.error("--seconds and --factors must be > 0")
    png = args.plot or (args.out.parent / "overload.png" if args.out else None)
    if shutil.which("sipp") is None:
        print("bench/overload.py: sipp not installed (make peers)", file=sys.stderr)
        return 1
    bench = Bench(args)
    runs: list[Run] = []
    try:
        rate = bench.sustained()
        print(f"sustained: {rate:,.0f} calls/s", flush=True)
        factors = sorted(args.factors)
        watch = max((f for f in factors if f <= 2), default=factors[-1])
        for factor in factors:
            runs.append(bench.offer(factor, rate, True, recovery=factor == watch))
        if not args.no_off:
            runs.append(bench.offer(factors[-1] if 2 not in factors else 2, rate, False,
                                    recovery=False))  # fmt: skip
    except BenchError as exc:
        print_sbc_logs(bench.started)
        print(f"bench/overload.py: {exc}", file=sys.stderr)
        return 1
    finally:
        bench.close()
    if png is not None:
        plot(runs, rate, png)
    section = render(runs, rate, bench.after, args, environment(bench.pinning), png)
    print()
    print(section)
    if args.out:
        write_section(args.out, "bench/overload.py", section)
        print(f"wrote {args.out}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
