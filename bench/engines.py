#!/usr/bin/env python3
"""The SBC's two media engines side by side: calls/s and CPU per call with ``[media] engine =
"builtin"`` and with ``engine = "rtpengine"``, and the SRTP relay rates of the two engines.

    .venv/bin/python bench/engines.py [--quick] [--out docs/performance.md]

Calls (measured here, in one run): the call benchmark of bench/calls.py, imported, not
copied: the same SIPp caller and callee (bench/scenarios/call_uac.xml, call_uas.xml: INVITE
with SDP, 100, 180, 200 with SDP, ACK, BYE, 200) over UDP on loopback, SIPp UAC -> ``sbc
run`` (the embedded registrar routes to bob, registered first from the port SIPp UAS then
listens on) -> SIPp UAS, the same pass criteria (a run passes with < 0.1 % failed calls and
every call finished; a short run also with retransmissions for < 1 % of its calls; a long
run of 10 s or more also with SIPp keeping 95 % of the rate), the same ladder of short
runs, bisection, and long run at the ladder's best rate (retried lower on a fresh SBC if it
fails). No RTP is sent: the signalling rate is what is measured; each call's SDP offer and
answer is still anchored by the engine (the built-in relay's media worker binds and frees
two port pairs per call; rtpengine gets an ng ``offer``, ``answer`` and ``delete`` per call
and opens its own ports). Three setups, each on a fresh ``sbc run`` (``[calls]
drain_timeout = 0``: at its stop the calls left end at once):

  builtin          ``[media] engine = "builtin"``, ``workers = 1``, ``ports =
                   "10000-32000"`` (as bench/calls.py);
  rtpengine        ``[media] engine = "rtpengine"`` with one ``[[media.rtpengine]]`` node:
                   Debian's rtpengine in userspace (``table = -1``), started by bench/media.py's
                   ``Rtpengine`` class (ports 10000-32000 here), ``num-threads`` =
                   ``--rtpengine-threads``, on the SBC's CPU: one core for the SBC and its
                   media engine, as builtin;
  rtpengine-split  the same, rtpengine on the other CPU (with the SIPps): the SBC's core for
                   the SBC alone, as with a media node on a host of its own.

With two or more CPUs the SBC (with its media worker) is pinned to one CPU and both SIPps
and this script to the other (``taskset -c``; rtpengine's threads with ``taskset -a``).
Before a setup's ladder, a fixed-rate run (``--cpu-rate`` calls/s for ``--cpu-seconds``)
gives CPU per call at one rate for all setups; the sustained rate's long run gives it at
saturation. CPU is utime + stime from /proc/PID/stat over the wall time of each SIPp run:
the SBC's signalling process (``sbc run``), its media worker (builtin), rtpengine's
process (all threads); CPU per call is that over the run's calls. Other work on the machine
(its busy time from /proc/stat less ours) is waited out before each run (bench/media.py's
``quiet_machine``: under 10 % of a core, 5 s at most) and a failed short run it disturbed
is run once more. At each SBC's stop, once it is idle: the calls it still has in progress
(/metrics ``sbc_calls_active``; then up to 40 s for them to end), and with rtpengine its
count of calls on the node against the node's own (ng ``statistics``), before and after
the SBC stopped; the SBC log's error lines and rtpengine's warnings, counted by kind.

SRTP relay rates are not measured again: bench/media.py measures both relays in one run;
the report quotes its latest section of the ``--media-from`` file (with its date).

Every process started here is stopped by its PID at the end, also on error; every SIPp run
is bounded (``-m``, ``-timeout``, ``-recv_timeout``), every wait has a deadline; everything
stays on 127.0.0.1. ``--quick`` is a smoke run of about a minute; ``--out`` rewrites the
section between the bench/engines.py markers.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import media
from calls import (
    BACKEND_EXPIRES,
    CLIENT_EXPIRES,
    LADDER,
    MEDIA_PORTS,
    RECV_TIMEOUT_MS,
    Caller,
    Running,
    Setup,
    Step,
    Uas,
    ladder,
    long_runs,
    register_bob,
    settle,
)
from harness import BenchError, Sbc, SbcCpu, environment, free_port, print_sbc_logs
from media import MAX_OTHER, QUIET_WAIT, Load, Relay, Rtpengine, quiet_machine
from media import BenchError as MediaBenchError
from report import ROOT, choose_cpus, compiled_line, machine_busy_seconds, publish

# The setups: the built-in relay; rtpengine on the SBC's CPU (one core for the SBC and its
# media engine, as builtin); rtpengine on the other CPU, with the SIPps (the SBC's core for
# the SBC alone, as with a media node on a host of its own).
ENGINES = ("builtin", "rtpengine", "rtpengine-split")
TITLES = {
    "builtin": "builtin",
    "rtpengine": "rtpengine, SBC's core",
    "rtpengine-split": "rtpengine, other core",
}
QUICK_LADDER = (200, 700)
MEDIA_SECTION = "bench/media.py"
LINGER = 40.0  # seconds to wait for calls left at the SBC to end (64*T1 = 32 s, and some)


# ---------------------------------------------------------------------------------------
# CPU per run: the SBC's signalling and media processes, rtpengine, the rest of the machine
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Usage:
    """CPU seconds over one SIPp run: the SBC (signalling, media workers), rtpengine, and
    other work on the machine (its busy time less ours, SIPp's included)."""

    sbc: SbcCpu
    rtpengine: float
    other: float
    wall: float

    def per_call(self, calls: int) -> tuple[float, float, float]:
        """(signalling, media workers, rtpengine) CPU seconds per call."""
        n = max(1, calls)
        return self.sbc.signalling / n, self.sbc.media / n, self.rtpengine / n

    @property
    def other_share(self) -> float:
        return self.other / self.wall if self.wall > 0 else 0.0


class Quiet:
    """What bench/media.py's ``quiet_machine`` asks of a relay and of the load: CPU seconds
    of processes that count as ours."""

    def __init__(self, cpu: Callable[[], float]) -> None:
        self.cpu = cpu

    def cpu_seconds(self) -> float:
        return self.cpu()


class MeteredCaller(Caller):
    """bench/calls.py's caller that also takes the CPU of the SBC's processes and of
    rtpengine over each run, and runs a failed short run once more if other work on the
    machine disturbed it."""

    def __init__(
        self, workdir: Path, name: str, sbc: Sbc, uas: Uas, rtpe: Rtpengine | None, cpu: int | None
    ) -> None:
        self.sbc, self.rtpe = sbc, rtpe
        super().__init__(workdir, name, sbc.port, uas, self.sut_seconds, cpu)
        self.usage: dict[Path, Usage] = {}
        self._before: dict[Path, tuple[SbcCpu, float, float, float]] = {}

    def sut_seconds(self) -> float:
        """The system under test: the SBC's process tree and rtpengine."""
        return self.sbc.cpu_split().total + self.rtpengine_seconds()

    def rtpengine_seconds(self) -> float:
        return self.rtpe.cpu_seconds() if self.rtpe is not None else 0.0

    def ours(self) -> float:
        """CPU seconds of every process of this bench (for the quiet-machine check)."""
        return self.sut_seconds() + self.uas.cpu_seconds()

    def idle(self) -> None:
        """After a run: until the SBC (and rtpengine) are idle, then until the rest of the
        machine is quiet (bench/media.py's check, at most its QUIET_WAIT)."""
        settle(self.sut_seconds)
        quiet = Quiet(self.ours)
        asyncio.run(quiet_machine(cast(Relay, quiet), cast(Load, Quiet(lambda: 0.0)), QUIET_WAIT))

    def start(self, rate: int, calls: int, hold_ms: int = 0) -> Running:
        before = (
            self.sbc.cpu_split(),
            self.rtpengine_seconds(),
            machine_busy_seconds(),
            time.perf_counter(),
        )
        running = super().start(rate, calls, hold_ms)
        self._before[running.run_dir] = before
        return running

    def finish(self, r: Running) -> Step:
        step = super().finish(r)
        sbc0, rtpe0, busy0, t0 = self._before.pop(r.run_dir)
        sbc = self.sbc.cpu_split() - sbc0
        rtpe = self.rtpengine_seconds() - rtpe0
        wall = time.perf_counter() - t0
        other = machine_busy_seconds() - busy0 - sbc.total - rtpe - step.sipp_busy * wall
        self.usage[r.run_dir] = Usage(sbc, rtpe, max(0.0, other), wall)
        return step

    def step(self, rate: int, calls: int) -> Step:
        first = super().step(rate, calls)
        usage = self.usage[cast(Path, first.run_dir)]
        if first.passed or usage.other_share < MAX_OTHER:
            return first
        print(
            f"  (other work used {100 * usage.other_share:.0f} % of a core during that run: "
            "once more)",
            flush=True,
        )
        self.idle()
        return super().step(rate, calls)


# ---------------------------------------------------------------------------------------
# One engine's setup: rtpengine (if any), the SBC, the callee; its runs
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Held:
    """Calls left at one SBC's stop, once it was idle: in progress (sbc_calls_active) then,
    and after waiting up to LINGER seconds for them to end; and at rtpengine (-1: not
    asked): the SBC's calls on the node (sbc_rtpengine_calls), the node's sessions (ng
    statistics) before the SBC's stop and after it (SIGTERM; ``[calls] drain_timeout = 0``
    ends every call left at once, deleting its media at the node)."""

    active: int
    active_later: int
    waited: float
    on_node: int
    sessions: int
    sessions_after: int

    def describe(self) -> str:
        text = f"{self.active} calls in progress at the SBC once idle"
        if self.active:
            text += f", {self.active_later} {self.waited:.0f} s later"
        if self.sessions >= 0:
            text += (
                f"; on the node: {self.on_node} by the SBC's count, {self.sessions} sessions "
                f"by rtpengine's, {self.sessions_after} after the SBC stopped"
            )
        return text


@dataclass
class EngineResult:
    engine: str
    setup: Setup
    fixed: Step | None = None  # the fixed-rate run (CPU per call at --cpu-rate)
    usage: dict[Path, Usage] = field(default_factory=dict)
    sbc_errors: collections.Counter[str] = field(default_factory=collections.Counter)
    rtpengine_warnings: collections.Counter[str] = field(default_factory=collections.Counter)
    held: list[Held] = field(default_factory=list)  # per SBC, at its stop
    exit_codes: list[int | None] = field(default_factory=list)
    probe: str = ""  # what the first calls did, if they failed

    def of(self, step: Step | None) -> Usage | None:
        return None if step is None or step.run_dir is None else self.usage.get(step.run_dir)


def _kind(line: str) -> str:
    """A log line without what differs between calls: times, numbers, ids, addresses."""
    line = re.sub(r"^\S+ \S+ ", "", line.strip())  # a leading date and time
    line = re.sub(r"\[[^\]]*\]", "[…]", line)
    line = re.sub(r"\b[0-9a-f]{8,}\b|\d+(\.\d+)*", "N", line)
    return line[:160]


class Bench:
    """Both engines in turn; every process it starts is stopped in ``close``."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sut_cpu, self.peer_cpu, self.pinning = choose_cpus(
            args.no_pin,
            None,
            None,
            target_is="the SBC (with its media worker, or with rtpengine)",
            peers_are="both SIPps",
        )
        self.workdir = Path(tempfile.mkdtemp(prefix="bench-engines-"))
        self.taken: set[int] = set()
        self.sbcs: list[Sbc] = []
        self.uases: list[Uas] = []
        self.rtpengines: list[Rtpengine] = []
        self.results = {name: EngineResult(name, Setup(name)) for name in ENGINES}
        self.rtpengine_version = "not run"

    # -- the processes ---------------------------------------------------------------------

    def start_rtpengine(self, name: str, cpu: int | None) -> Rtpengine:
        workdir = self.workdir / name
        workdir.mkdir()
        # rtpengine's ports: those of the built-in relay (the setups run one after the
        # other). Not bench/media.py's range, which holds 40000 and 42000, the ports the SIPp
        # caller and callee write in their SDP on the same address: a port of rtpengine's own
        # as a party's media address makes it relay its own packets (RTCP it makes), in a
        # loop that takes its CPU ("Too many packets in UDP receive queue").
        low, high = MEDIA_PORTS.split("-")
        media.RTPENGINE_PORTS = (int(low), int(high))
        rtpe = Rtpengine(self.args.rtpengine_threads, workdir)
        self.rtpengines.append(rtpe)
        asyncio.run(rtpe.start())
        self.rtpengine_version = rtpe.version
        assert rtpe.proc is not None
        if cpu is not None:  # every thread of it
            subprocess.run(
                ["taskset", "-a", "-c", "-p", str(cpu), str(rtpe.proc.pid)],
                check=True,
                capture_output=True,
                timeout=10,
            )
        return rtpe

    def start(self, engine: str, name: str) -> MeteredCaller:
        """rtpengine (for that engine), a fresh ``sbc run`` with bob registered, SIPp UAS
        listening as bob, and a caller that takes the CPU of all of them; its first calls
        go through (the SBC has its node up), else BenchError."""
        rtpe = None
        if engine != "builtin":
            cpu = self.sut_cpu if engine == "rtpengine" else self.peer_cpu
            rtpe = self.start_rtpengine(f"{name}-rtpengine", cpu)
        # drain_timeout = 0: at SIGTERM the calls left (failed ones) get BYE at once, and
        # their media is deleted at the node, before the SBC exits.
        media = f'\n[calls]\ndrain_timeout = 0\n\n[media]\nports = "{MEDIA_PORTS}"\nworkers = 1\n'
        if rtpe is not None:
            media += (
                f'engine = "rtpengine"\n\n[[media.rtpengine]]\n'
                f'url = "udp://127.0.0.1:{rtpe.ng_port}"\nweight = 1\n'
            )
        workdir = self.workdir / name
        workdir.mkdir()
        sbc = Sbc(
            workdir,
            self.sut_cpu,
            self.taken,
            client_expires=CLIENT_EXPIRES,
            backend_expires=BACKEND_EXPIRES,
            tables=media,
        )
        self.sbcs.append(sbc)
        sbc.start()
        sbc.wait_ready()
        uas = Uas(self.workdir, name, free_port(taken=self.taken), self.peer_cpu, life=900)
        self.uases.append(uas)
        if register_bob(sbc.port, uas.port, CLIENT_EXPIRES) != 200:
            raise BenchError(f"bob could not register at the SBC:\n{sbc.log()[-2000:]}")
        uas.start()
        caller = MeteredCaller(self.workdir, name, sbc, uas, rtpe, self.peer_cpu)
        for _ in range(5):  # the node answers its first ping within a moment
            probe = caller.step(10, 10)
            if probe.passed:
                break
            self.results[engine].probe = probe.verdict()
            time.sleep(1.0)
        else:
            raise BenchError(
                f"{engine}: the first calls failed ({self.results[engine].probe}):\n"
                f"{sbc.log()[-2000:]}"
            )
        caller.idle()
        return caller

    def stop(self, engine: str, caller: MeteredCaller) -> None:
        """The callee, the SBC, then rtpengine (after asking it how many sessions it still
        holds); the SBC's error lines and rtpengine's warnings counted by kind."""
        result = self.results[engine]
        result.usage.update(caller.usage)
        rtpe, sbc = caller.rtpe, caller.sbc
        settle(caller.sut_seconds)

        def gauge(name: str) -> int:
            return int(sum(v for (k, _), v in sbc.metrics().items() if k == name))

        active = later = gauge("sbc_calls_active")
        t0 = time.monotonic()
        while later and time.monotonic() - t0 < LINGER:  # failed calls time out
            time.sleep(1.0)
            later = gauge("sbc_calls_active")
        waited = time.monotonic() - t0
        on_node = gauge("sbc_rtpengine_calls")
        before = self.sessions(rtpe, result) if rtpe is not None else -1
        caller.uas.stop()
        sbc.stop()
        result.exit_codes.append(sbc.exit_code)
        for line in sbc.log().splitlines():
            if "ERROR" in line or "Traceback" in line:
                result.sbc_errors[_kind(line)] += 1
        if sbc.killed:
            result.sbc_errors[f"killed after SIGTERM: {', '.join(sbc.killed)}"] += 1
        after = -1
        if rtpe is not None:
            time.sleep(0.5)  # the last deletes
            after = self.sessions(rtpe, result)
            asyncio.run(rtpe.stop())
            for line in rtpe.log().splitlines():
                if re.search(r"\b(WARNING|ERR|ERROR|CRIT)\b", line):
                    result.rtpengine_warnings[_kind(line)] += 1
        result.held.append(Held(active, later, waited, on_node, before, after))

    @staticmethod
    def sessions(rtpe: Rtpengine, result: EngineResult) -> int:
        """The sessions (calls) the node holds (ng statistics); -1 if it did not say."""
        try:
            stats = rtpe.ng({"command": "statistics"})
            return int(stats["statistics"]["currentstatistics"]["sessionsown"])
        except (MediaBenchError, KeyError, TypeError, ValueError) as exc:
            result.rtpengine_warnings[f"statistics: {exc}"] += 1
            return -1

    # -- the runs --------------------------------------------------------------------------

    def engine(self, engine: str) -> None:
        args, result = self.args, self.results[engine]
        setup = result.setup
        running = [self.start(engine, f"{engine}-rate")]
        caller = running[0]
        fixed_calls = int(args.cpu_rate * args.cpu_seconds)
        result.fixed = caller.step(args.cpu_rate, fixed_calls)
        self._print_usage(f"{engine} fixed", caller.usage, result.fixed)
        caller.idle()
        ladder(caller, setup, args, caller.idle)

        def fresh() -> tuple[Caller, Callable[[], None]]:
            """A new SBC (and rtpengine) for a long run after a failed one."""
            self.stop(engine, running.pop())
            new = self.start(engine, f"{engine}-long-{len(setup.long_runs) + 1}")
            running.append(new)
            return new, new.idle

        long_runs(caller, setup, args, caller.idle, None, fresh)
        self.stop(engine, running.pop())
        for step in setup.steps:
            self._print_usage(engine, result.usage, step)
        if setup.errors:
            print(f"--- SIPp UAC errors, first failing run ({engine}) ---\n{setup.errors}")

    @staticmethod
    def _print_usage(name: str, usages: dict[Path, Usage], step: Step) -> None:
        usage = usages.get(step.run_dir) if step.run_dir else None
        if usage is None:
            return
        sig, media, rtpe = usage.per_call(step.calls)
        print(
            f"{name:14} {step.rate:5}/s x {step.calls:6}: CPU per call: SBC signalling "
            f"{1000 * sig:.3f} ms, media workers {1000 * media:.3f} ms, rtpengine "
            f"{1000 * rtpe:.3f} ms; other work {100 * usage.other_share:.0f} %",
            flush=True,
        )

    def close(self) -> None:
        for uas in self.uases:
            uas.stop()
        for sbc in self.sbcs:
            sbc.stop()
        for rtpe in self.rtpengines:
            asyncio.run(rtpe.stop())
        if self.args.keep:
            print(f"kept {self.workdir}")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def env(self) -> dict[str, str]:
        compiled = compiled_line()
        return environment(self.pinning) | {
            "rtpengine": self.rtpengine_version,
            "compiled": compiled,
            "pinned": "yes" if self.peer_cpu is not None else "",
        }


def run(args: argparse.Namespace) -> tuple[dict[str, EngineResult], dict[str, str]]:
    for tool in ("sipp", "rtpengine", "taskset"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} not installed (make peers; apt-get install rtpengine)")
    bench = Bench(args)
    try:
        for engine in args.engines:
            bench.engine(engine)
    except BaseException:
        print_sbc_logs(bench.sbcs)
        for rtpe in bench.rtpengines:
            print(f"--- rtpengine log ---\n{rtpe.log()[-2000:]}", file=sys.stderr)
        raise
    finally:
        bench.close()
    return bench.results, bench.env()


# ---------------------------------------------------------------------------------------
# The SRTP relay figures of bench/media.py's latest section
# ---------------------------------------------------------------------------------------


@dataclass
class MediaFigures:
    date: str
    command: str
    rows: dict[tuple[str, str], dict[str, str]]  # (relay, mode) -> column -> cell


def media_figures(path: Path) -> MediaFigures | None:
    """The date, command and main table of bench/media.py's section in ``path``."""
    try:
        text = path.read_text()
    except OSError:
        return None
    begin, end = text.find(f"<!-- {MEDIA_SECTION} -->"), text.find(f"<!-- /{MEDIA_SECTION} -->")
    if begin < 0 or end < begin:
        return None
    section = text[begin:end]
    date = re.search(r"^- Date: (.+)$", section, re.M)
    command = re.search(r"^- Command: `(.+)`$", section, re.M)
    table = re.search(r"^(\| Relay \| Mode \|.*)\n\|[-|: ]+\|\n((?:\|.*\n)+)", section, re.M)
    if date is None or table is None:
        return None
    header = [c.strip() for c in table.group(1).strip("|").split("|")]
    rows = {}
    for line in table.group(2).splitlines():
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=False))
        rows[(cells["Relay"], cells["Mode"])] = cells
    return MediaFigures(date.group(1), command.group(1) if command else "?", rows)


def _number(cell: str) -> float | None:
    m = re.search(r"[\d,]+(\.\d+)?", cell)
    return float(m.group(0).replace(",", "")) if m else None


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def _ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{1000 * seconds:.2f} ms"


def _ratio(a: float | None, b: float | None) -> str:
    return "—" if a is None or b is None or b <= 0 else f"{a / b:.2f}"


def _sustained(setup: Setup, args: argparse.Namespace) -> str:
    best = setup.best
    if best is None:
        tried = ", ".join(f"{s.rate:,}" for s in setup.long_runs)
        return f"none of {tried} held" if tried else "—"
    top = setup.ladder_best
    ceiling = top is not None and top.rate == max(args.rates) and top.rate == best.rate
    return f"{'≥ ' if ceiling else ''}{best.achieved:,.0f}"


def _ladder(setup: Setup) -> str:
    return ", ".join(f"{s.rate:,} {'✓' if s.passed else '✗'}" for s in setup.steps if not s.confirm)


def _long(setup: Setup) -> str:
    return "; ".join(
        f"{s.rate:,}/s {'✓' if s.passed else '✗'} ({s.failed} of {s.calls:,} failed, "
        f"{s.retransmissions:,} retransmissions)"
        for s in setup.long_runs
    )


def _first_fail(setup: Setup) -> str:
    failing = [s for s in setup.steps if not s.passed and not s.confirm]
    if not failing:
        return "none"
    s = min(failing, key=lambda s: s.rate)
    return f"{s.rate:,}/s: {s.verdict().removeprefix('fail: ')}"


PerCall = tuple[float, float, float]  # CPU seconds per call: signalling, media workers, rtpengine


def _per_call(result: EngineResult, step: Step | None) -> PerCall | None:
    usage = result.of(step)
    return None if usage is None or step is None else usage.per_call(step.calls)


def _used(result: EngineResult, step: Step | None) -> str:
    usage = result.of(step)
    return "—" if usage is None else f"{100 * usage.other_share:.0f} %"


def _sut(pc: PerCall | None) -> float | None:
    return None if pc is None else sum(pc)


def _part(pc: dict[str, PerCall | None], i: int) -> list[str]:
    """Media worker (``i`` 1, builtin only) or rtpengine (``i`` 2) CPU per call."""
    return [
        "—" if p is None or (i == 1) != (engine == "builtin") else _ms(p[i])
        for engine, p in pc.items()
    ]


def _row(title: str, values: list[str]) -> str:
    return f"| {title} | " + " | ".join(values) + " |"


def render(
    results: dict[str, EngineResult],
    args: argparse.Namespace,
    env: dict[str, str],
    media: MediaFigures | None,
) -> str:
    cols = [results[e] for e in args.engines]
    rate = {x.engine: x.setup.best.achieved if x.setup.best else None for x in cols}

    def vs_builtin(value: dict[str, float | None]) -> list[str]:
        ref = value.get("builtin")
        return [_ratio(value[x.engine], ref) for x in cols]

    fixed_n = int(args.cpu_rate * args.cpu_seconds)
    lines = [
        "## Media engines: calls/s and CPU per call, builtin vs rtpengine (bench/engines.py)",
        "",
        f"- Date: {env['date']}",
        f"- CPU: {env['cpu']}; {env['pinning']}",
        f"- Versions: sbc {env['sbc']}, {env['compiled']}, {env['python']}, uvloop "
        f"{env['uvloop']}, SIPp {env['sipp']}, rtpengine {env['rtpengine']}",
        f"- Command: `{env['command']}`",
        "- Load: bench/calls.py's calls, ladder and pass criteria (imported): SIPp UAC → `sbc "
        "run` (embedded registrar) → SIPp UAS over UDP on loopback; INVITE with SDP, 100, "
        "180, 200 with SDP, ACK, BYE, 200; open loop (`-r`), "
        f"`-recv_timeout {RECV_TIMEOUT_MS}`. No RTP is sent (the signalling rate is "
        "measured), but every offer and answer is anchored by the engine: builtin, `[media] "
        f'engine = "builtin"`, `workers = 1`, `ports = "{MEDIA_PORTS}"` (one media worker '
        'binds and frees two port pairs per call); rtpengine, `engine = "rtpengine"` with one '
        "`[[media.rtpengine]]` node, rtpengine in userspace (`table = -1`, `num-threads = "
        f"{args.rtpengine_threads}`, log level 4; an ng offer, answer and delete per call), "
        "pinned either to the SBC's core (one core for the SBC and its media engine, as "
        "builtin) or to the other core with the SIPps (the SBC's core for the SBC alone, "
        "as with a media node on a host of its own). `[calls] drain_timeout = 0`, "
        "everything else as bench/calls.py.",
        f"- Runs, per setup on a fresh SBC: {fixed_n:,} calls at {args.cpu_rate:,} calls/s "
        "(CPU per call at one rate for all), short runs "
        f"({args.step_seconds:g} s, at least {args.min_calls} calls) at "
        f"{', '.join(str(x) for x in args.rates)} calls/s up to the first failure, "
        f"{args.refine} bisection steps, then a long run ({args.long_seconds:g} s) at the "
        f"best, up to {args.long_tries} ({args.long_backoff:g} × lower each, on a fresh SBC "
        "and rtpengine).",
        "",
        "| | " + " | ".join(TITLES[x.engine] for x in cols) + " |",
        "|---|" + "---:|" * len(cols),
        _row(
            "**Sustained calls/s** (long run, < 0.1 % failed)",
            [_sustained(x.setup, args) for x in cols],
        ),
        _row("Sustained calls/s ÷ builtin", vs_builtin(rate)),
        _row(
            "Best short run (calls/s asked)",
            [f"{x.setup.ladder_best.rate:,}" if x.setup.ladder_best else "—" for x in cols],
        ),
        _row("First failing short run", [_first_fail(x.setup) for x in cols]),
    ]
    fixed = {x.engine: x.fixed for x in cols}
    best = {x.engine: x.setup.best for x in cols}
    for title, chosen in ((f"At {args.cpu_rate:,} calls/s", fixed), ("Sustained long run", best)):
        pc = {x.engine: _per_call(x, chosen[x.engine]) for x in cols}
        sig = {e: None if p is None else p[0] for e, p in pc.items()}
        sut = {e: _sut(p) for e, p in pc.items()}
        steps = list(chosen.values())
        lines += [
            _row(f"{title}: **SBC signalling CPU per call**", [_ms(v) for v in sig.values()]),
            _row(
                f"{title}: SBC signalling CPU per call ÷ builtin",
                vs_builtin(sig),
            ),
            _row(f"{title}: media worker CPU per call", _part(pc, 1)),
            _row(f"{title}: rtpengine CPU per call", _part(pc, 2)),
            _row(f"{title}: SBC + media engine CPU per call", [_ms(v) for v in sut.values()]),
            _row(
                f"{title}: SBC + media engine ÷ builtin",
                vs_builtin(sut),
            ),
            _row(
                f"{title}: mean call setup, INVITE → 200",
                ["—" if s is None else f"{s.setup_ms:,.0f} ms" for s in steps],
            ),
            _row(
                f"{title}: calls failed / retransmissions",
                [
                    "—" if s is None else f"{s.failed:,} of {s.calls:,} / {s.retransmissions:,}"
                    for s in steps
                ],
            ),
            _row(
                f"{title}: other work on the machine (share of a core)",
                [_used(x, s) for x, s in zip(cols, steps, strict=True)],
            ),
        ]
    lines += ["", "Short runs (calls/s asked; ✓ passed, ✗ failed) and long runs:", ""]
    lines += [
        f"- {TITLES[x.engine]}: {_ladder(x.setup)}; long: {_long(x.setup) or 'none'}." for x in cols
    ]
    lines += ["", "Checks:", ""]
    for x in cols:
        errors = ", ".join(f"{n}× `{k}`" for k, n in x.sbc_errors.most_common(4)) or "none"
        text = (
            f"- {TITLES[x.engine]}: `sbc run` exit codes after SIGTERM "
            f"{', '.join(str(c) for c in x.exit_codes)}; SBC log error lines: {errors}"
        )
        if x.engine != "builtin":
            warnings = (
                ", ".join(f"{n}× `{k}`" for k, n in x.rtpengine_warnings.most_common(4)) or "none"
            )
            text += f"; rtpengine warnings: {warnings}"
        lines.append(
            text + "; at each SBC's stop: " + "; ".join(h.describe() for h in x.held) + "."
        )
    lines += ["", *media_lines(media, args.media_from)]
    lines += ["", *interpretation(results, args)]
    lines += [
        "",
        "How it is measured: CPU is utime + stime from /proc/PID/stat over the wall time of "
        "the SIPp run (from just before SIPp UAC starts until it exits): the SBC's "
        "signalling process (`sbc run`), its media worker (builtin; `sbc.io.media_worker`), "
        "rtpengine's process with all its threads; per call: over the calls of that run. It "
        "leaves out the SBC's transaction timers that fire after the run (alike for all "
        "setups). Other work: the machine's busy time (/proc/stat, interrupts included) less "
        "that of the SBC, rtpengine and the SIPps. "
        + (
            "Both SIPps (and rtpengine in the split setup) share one core, the SBC (and its "
            "media worker or rtpengine) the other. "
            if env["pinned"]
            else ""
        )
        + "Before each run the bench waits for the SBC to be idle and for other work on the "
        f"machine to use under {100 * MAX_OTHER:.0f} % of a core ({QUIET_WAIT:g} s at most); "
        "a failed short run other work disturbed is run once more.",
    ]
    return "\n".join(lines) + "\n"


def media_lines(media: MediaFigures | None, path: Path) -> list[str]:
    """The SRTP relay rates quoted from bench/media.py's section."""
    if media is None:
        return [f"SRTP relay rates: no bench/media.py section in {path} to quote."]
    rel = path.resolve().relative_to(ROOT) if path.resolve().is_relative_to(ROOT) else path
    out = [
        "SRTP relay packets/s of one rtpengine node and of the built-in relay, not measured "
        f"here: quoted from bench/media.py's section of {rel} (run {media.date}, "
        f"`{media.command}`: the SBC's relay with 2 media worker processes, rtpengine with 2 "
        "threads, the load on the same 2 cores; SRTP re-keyed between two crypto suites):",
        "",
        "| Relay | Mode | Max packets/s at < 1 % loss | Relay CPU at that rate | "
        "Packets/s per relay core |",
        "|---|---|---:|---:|---:|",
    ]
    for relay, mode in (
        ("sbc", "SRTP"),
        ("rtpengine", "SRTP"),
        ("sbc", "RTP"),
        ("rtpengine", "RTP"),
    ):
        row = media.rows.get((relay, mode))
        if row is None:
            continue
        name = "builtin (SBC media workers)" if relay == "sbc" else "rtpengine"
        out.append(
            f"| {name} | {mode} | {row.get('Max packets/s at < 1 % loss', '?')} | "
            f"{row.get('Relay CPU at that rate', '?')} | "
            f"{row.get('Packets/s per relay core', '?')} |"
        )
    sbc, rtpe = media.rows.get(("sbc", "SRTP")), media.rows.get(("rtpengine", "SRTP"))
    if sbc and rtpe:
        key = "Packets/s per relay core"
        max_key = "Max packets/s at < 1 % loss"
        out += [
            "",
            f"SRTP, builtin ÷ rtpengine: {_ratio(_number(sbc[max_key]), _number(rtpe[max_key]))}"
            f" of the packets/s, {_ratio(_number(sbc[key]), _number(rtpe[key]))} per core.",
        ]
    return out


def interpretation(results: dict[str, EngineResult], args: argparse.Namespace) -> list[str]:
    """Two to four sentences from the figures."""
    b = results.get("builtin")
    out: list[str] = []
    if b is None or b.setup.best is None:
        return out
    rate_b = b.setup.best.achieved
    fixed_b = _per_call(b, b.fixed)
    for name in ("rtpengine", "rtpengine-split"):
        r = results.get(name)
        if r is None or name not in args.engines:
            continue
        where = "on the SBC's core" if name == "rtpengine" else "on the other core"
        if r.setup.best is not None:
            rate_r = r.setup.best.achieved
            text = (
                f"With rtpengine {where} the SBC sustained {rate_r:,.0f} calls/s against "
                f"{rate_b:,.0f} with its own relay ({rate_r / rate_b:.2f}×)"
            )
        else:
            text = (
                f"With rtpengine {where} no long run held (builtin: {rate_b:,.0f} calls/s; "
                f"first failing short run: {_first_fail(r.setup)})"
            )
        fixed_r = _per_call(r, r.fixed)
        if fixed_b and fixed_r:
            text += (
                f"; at {args.cpu_rate:,} calls/s its signalling process used "
                f"{1000 * fixed_r[0]:.2f} ms of CPU per call against {1000 * fixed_b[0]:.2f} "
                f"ms ({fixed_r[0] / fixed_b[0]:.2f}×), and rtpengine {1000 * fixed_r[2]:.2f} ms "
                f"per call against {1000 * fixed_b[1]:.2f} ms in the SBC's media worker"
            )
        out.append(text + ".")
    return out


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------


def add_call_options(ap: argparse.ArgumentParser) -> None:
    """The options of the call ladder (bench/calls.py's), shared by the benches that
    compare SBC setups with it (this one, bench/state.py)."""
    ap.add_argument(
        "--rates",
        type=lambda s: [int(x) for x in s.split(",")],
        help="comma-separated calls/s of the short runs (bench/calls.py's ladder; quick: "
        f"{','.join(map(str, QUICK_LADDER))})",
    )
    ap.add_argument("--step-seconds", type=float, help="short run length, s (2; quick 1)")
    ap.add_argument("--min-calls", type=int, help="fewest calls in a short run (300; quick 100)")
    ap.add_argument("--refine", type=int, help="bisection steps after a failure (2; quick 0)")
    ap.add_argument("--long-seconds", type=float, help="long run length, s (30; quick 6)")
    ap.add_argument("--long-tries", type=int, help="long runs at most (3; quick 1)")
    ap.add_argument(
        "--long-backoff", type=float, default=0.75, help="rate factor after a failed long run"
    )
    ap.add_argument("--cpu-rate", type=int, help="calls/s of the fixed-rate run (200; quick 100)")
    ap.add_argument("--cpu-seconds", type=float, help="its length, s (20; quick 3)")


def call_defaults(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The ladder's defaults (``--quick`` or full) for the options left unset; checked."""
    q = args.quick
    args.rates = sorted(set(args.rates or (QUICK_LADDER if q else LADDER)))
    args.step_seconds = args.step_seconds or (1.0 if q else 2.0)
    args.min_calls = args.min_calls or (100 if q else 300)
    args.refine = args.refine if args.refine is not None else (0 if q else 2)
    args.long_seconds = args.long_seconds or (6.0 if q else 30.0)
    args.long_tries = args.long_tries or (1 if q else 3)
    args.cpu_rate = args.cpu_rate or (100 if q else 200)
    args.cpu_seconds = args.cpu_seconds or (3.0 if q else 20.0)
    if min(*args.rates, args.min_calls, args.long_tries, args.cpu_rate) < 1:
        ap.error("rates, --min-calls, --long-tries and --cpu-rate must be >= 1")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run of about a minute")
    add_call_options(ap)
    ap.add_argument("--rtpengine-threads", type=int, default=1, help="num-threads (1)")
    ap.add_argument(
        "--engines", default=",".join(ENGINES), help=f"comma-separated: {', '.join(ENGINES)} (all)"
    )
    ap.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    ap.add_argument(
        "--media-from",
        type=Path,
        default=ROOT / "docs" / "performance.md",
        help="where bench/media.py's section is quoted from (docs/performance.md)",
    )
    ap.add_argument("--out", type=Path, help="rewrite the bench/engines.py section of FILE")
    args = ap.parse_args(argv)
    call_defaults(ap, args)
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if not set(args.engines) <= set(ENGINES):
        ap.error(f"--engines: {', '.join(ENGINES)}")
    if args.rtpengine_threads < 1:
        ap.error("--rtpengine-threads must be >= 1")

    t0 = time.monotonic()
    try:
        results, env = run(args)
    except (BenchError, MediaBenchError) as exc:
        print(f"bench/engines.py: {exc}", file=sys.stderr)
        return 1
    section = render(results, args, env, media_figures(args.media_from))
    print(f"({time.monotonic() - t0:.0f} s)")
    publish("bench/engines.py", section, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
