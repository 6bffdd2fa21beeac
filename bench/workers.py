#!/usr/bin/env python3
"""Signalling workers: REGISTERs/s and CPU per call of the SBC with 1 and with 2 workers.

    .venv/bin/python bench/workers.py [--workers 1,2] [--rounds 3] [--out docs/performance.md]

One run; for each worker count of ``--workers`` (``[sbc] workers = N``, ``[media] workers =
N``: one media worker per signalling worker; worker i on the core port + i), in each of
``--rounds`` rounds, interleaved (1, 2, 1, 2, ...), two measurements, each on a fresh
``sbc run`` with a fresh Kamailio (docker/kamailio/kamailio.cfg) as its only backend, over
UDP on loopback, log level warning, the load's address on the allow list and the backend
REGISTER ceiling off (``backend_register = { rate = 0 }``): this measures the SBC, not its
limits. Nothing is pinned: two workers need both cores, and SIPp and Kamailio share them.

  REGISTERs  SIPp ``-t un`` (a socket, so a source port, per call: the kernel spreads the
             clients over the workers by source address and port) runs
             bench/scenarios/register_refresh_un.xml for ``--users`` users (``-inf``): per
             user one REGISTER, then ``--refreshes`` unchanged refreshes (same socket,
             Call-ID, From tag and Contact; CSeq + 1), every 200 checked. Registration
             offload: ``[registration] backend_expires = 3600``,
             ``[registration.client_expires] udp = 60``: the SBC relays the first REGISTER
             and answers the refreshes itself. Closed loop, ``-r --rate -l --limit``, so
             the SBC is saturated. Every call must pass, or the benchmark fails. Measured:
             REGISTER transactions over SIPp's first-to-last statistics timestamps, SIPp
             retransmissions, the CPU time of the SBC's signalling processes per REGISTER.
  calls      Kamailio as registrar and record-routing proxy behind the SBC; SIPp UAS
             (bench/scenarios/call_uas.xml) registered as bob through the SBC; SIPp UAC
             ``-t un`` (call_uac.xml, a source port per call) calls bob through the SBC and
             Kamailio: each call is two B2BUA calls in the SBC (the caller's leg in the
             worker the caller's port reaches, bob's leg in the worker his REGISTER
             reached, whose core port is in his Path at Kamailio), both with media
             anchored. ``--warmup-calls`` calls first, then ``--calls`` calls at
             ``--call-rate`` per second (open loop, ``-r``). Measured: achieved calls/s
             (calls over SIPp's timestamps less one mean call, as bench/calls.py),
             failed calls, SIPp retransmissions, CPU per call of the SBC's signalling
             processes (``sbc run`` and its ``sbc worker`` processes) and, apart, of its
             media workers (``sbc.io.media_worker``), and Kamailio's.

CPU time is utime+stime from /proc over the SIPp run, started once the whole machine is
idle: the SBC's process tree (found by parent PIDs), split by command line; Kamailio's
process group; SIPp by getrusage and /proc; from /proc/stat, interrupts and softirqs (the
network stack's work, charged to no process) and, less all of the above, other processes: a
run in which they pass 10 % of a core is made again on fresh processes, ``--retries`` times
at most, then reported as disturbed (the machine may be shared). For calls the SBC's CPU is
read on for ``--tail`` seconds after the run (its calls' transactions and dialogs expire 32
s after them), less the idle SBC's rate over 5 s read before the run (its probes and timers;
reported too). After each measurement the supervisor's /metrics gives each worker's share of
the REGISTERs (``sbc_worker_register_requests_total``) and of the calls
(``sbc_worker_calls_started_total``): the table shows the smallest share; its /status, the
registrations each worker holds (each must hold all: the workers share them). The SBC's log
(warnings and errors), failed calls and counts that do not add up are printed as findings at
the end. Reported: medians and ranges over the rounds, the ratios of 2 to 1 worker and the
issue's targets (REGISTERs/s with 2 workers at least 1.3 x that of 1; signalling CPU per
call with 2 workers at most 1.1 x).

Every process started here (Kamailio, the SBC and its tree, SIPp) is stopped by its PID at
the end of its measurement, also on error; every SIPp run is bounded (``-m``, ``-timeout``);
the temporary directory is removed. ``--out`` rewrites the section between the
bench/workers.py markers of the file (appended if they are missing).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from calls import Caller, Step, Uas, register_bob, settle, summarize_errors
from harness import (
    DOMAIN,
    START_TIMEOUT,
    BenchError,
    Kamailio,
    Sbc,
    SbcCpu,
    environment,
    free_port,
    print_sbc_logs,
)
from register import SippRun, sipp, warm_up
from report import children_cpu_seconds, interrupt_seconds, machine_busy_seconds, publish

CLIENT_EXPIRES = 60
BACKEND_EXPIRES = 3600
CALLEE_EXPIRES = 600  # bob's binding at the SBC outlives a measurement
SECURITY = "backend_register = { rate = 0 }\n"
# A call left behind (a failed one) must not hold the SBC's stop past harness.STOP_TIMEOUT.
DRAIN = "\n[calls]\ndrain_timeout = 2\n"
MAX_SOCKET = ("-max_socket", "2000")  # SIPp -t un refuses to start with its default here
# The SBC's relay ports, split among the workers: below the ephemeral ports (32768-) and the
# ranges the interop tests give their SBCs (20000-31999), which may run at the same time.
MEDIA_PORTS = "10000-19999"
KAMAILIO_SHM_MB = 256  # its transactions stay 5 s after each call (tm wait timer)
REGISTER_TARGET = 1.3  # REGISTERs/s with 2 workers / with 1, at least
CPU_TARGET = 1.1  # signalling CPU per call with 2 workers / with 1, at most
IDLE_SECONDS = 5.0  # the idle SBC's CPU is read this long before a call run
BUSY = "CPU busy: SBC signalling / SBC media / Kamailio / SIPp / interrupts / other"
SHARE_SETTLE = 1.0  # s for the workers' link to carry the last registrations
MAX_OTHER = 0.10  # other processes busier than this (share of a core) in a run: disturbed


# ---------------------------------------------------------------------------------------
# What one measurement reads
# ---------------------------------------------------------------------------------------


@dataclass
class Window:
    """CPU time over one SIPp run (and, for calls, the tail after it), and how the SBC's
    workers shared the work."""

    wall: float
    sbc: SbcCpu  # over the run
    kamailio: float
    sipp: float
    counts: list[float]  # per worker: REGISTERs or calls started during the run
    idle: SbcCpu  # CPU seconds per second of the idle SBC before the run (with a tail)
    tail: SbcCpu  # over the tail after the run, less the idle rate over that time
    machine: float  # busy CPU seconds of the whole machine over the run
    interrupts: float  # of it in interrupts and softirqs (the network stack's work)

    @property
    def other(self) -> float:
        """CPU seconds of other processes over the run (other work on the machine)."""
        ours = self.sbc.total + self.kamailio + self.sipp + self.interrupts
        return max(0.0, self.machine - ours)

    @property
    def total(self) -> SbcCpu:
        return self.sbc + self.tail

    @property
    def disturbed(self) -> bool:
        return self.other > MAX_OTHER * self.wall

    @property
    def min_share(self) -> float:
        total = sum(self.counts)
        return min(self.counts) / total if total else 0.0


@dataclass
class RegisterRun:
    workers: int
    round_no: int
    run: SippRun
    window: Window
    backend_registers: int
    held: list[int]  # registrations each worker holds after the run (its copy of all)

    @property
    def rate(self) -> float:
        return self.run.rate

    @property
    def signalling_us(self) -> float:
        return 1e6 * self.window.sbc.signalling / self.run.registers


@dataclass
class CallRun:
    workers: int
    round_no: int
    step: Step
    window: Window
    caller_share: float | None  # the smallest worker share of the callers' legs

    def per_call_us(self, cpu: float) -> float:
        return 1e6 * cpu / self.step.calls


def per_worker(metrics: dict[tuple[str, str], float], family: str, workers: int) -> list[float]:
    """A counter per worker from the SBC's /metrics: ``sbc_worker_<family>_total{worker}``
    of the supervisor, or the single SBC's ``sbc_<family>_total`` over all its labels."""
    if workers == 1:
        return [sum(v for (name, _), v in metrics.items() if name == f"sbc_{family}_total")]
    return [
        metrics.get((f"sbc_worker_{family}_total", f'worker="{i}"'), 0.0) for i in range(workers)
    ]


def registrations_held(sbc: Sbc, workers: int) -> list[int]:
    """The registrations each worker holds (the supervisor's /status), once the link has
    had SHARE_SETTLE s to carry the last changes; [] with one worker."""
    if workers == 1:
        return []
    time.sleep(SHARE_SETTLE)
    status, body = sbc.admin("/status")
    if status != 200:
        raise BenchError(f"sbc /status: {status} {body[:300]}")
    return [int(w.get("registrations") or 0) for w in json.loads(body)["workers"]]


def log_summary(log: str) -> tuple[int, list[str]]:
    """The SBC's log lines (at warning: warnings and errors), and the most frequent kinds
    (lines alike but for numbers, addresses and ids), each with its first line."""
    lines = [line for line in log.splitlines() if line.strip()]
    kinds = Counter(_mask(line) for line in lines)
    example = {_mask(line): line for line in reversed(lines)}  # the first of each kind
    return len(lines), [f"{n:6} x {example[kind][:300]}" for kind, n in kinds.most_common(8)]


def _mask(line: str) -> str:
    line = re.sub(r'"(ts|time|timestamp|asctime)": "[^"]*"', r'"\1": _', line)
    return re.sub(r"\b[0-9a-f]{8,}\b|\d+(\.\d+)?", "N", line)


# ---------------------------------------------------------------------------------------
# The measurements, each on a fresh SBC and a fresh Kamailio
# ---------------------------------------------------------------------------------------


class Bench:
    """Runs the measurements; every process it starts is stopped when its measurement
    ends (``finish``) or, on error, in ``close``."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.workdir = Path(tempfile.mkdtemp(prefix="bench-wk-"))  # short: ctl sockets
        self.taken: set[int] = set()
        self.started: list[Kamailio | Sbc | Uas] = []
        self.findings: list[str] = []  # SBC log lines, failed calls, processes left over

    def systems(
        self, name: str, workers: int, client_expires: int, shm_mb: int | None = None
    ) -> tuple[Kamailio, Sbc]:
        """A fresh Kamailio and a fresh ``sbc run`` in front of it, both ready."""
        workdir = self.workdir / name
        workdir.mkdir()
        kam = Kamailio("K", free_port(taken=self.taken), workdir / "kam", None, shm_mb)
        self.started.append(kam)
        kam.start()
        kam.wait_ready()
        sbc = Sbc(
            workdir,
            None,
            self.taken,
            client_expires=client_expires,
            backend_expires=BACKEND_EXPIRES,
            backend=kam.port,
            tables=DRAIN,
            security=SECURITY,
            workers=workers,
            media=f'ports = "{MEDIA_PORTS}"',
        )
        self.started.append(sbc)
        sbc.start()
        sbc.wait_ready()
        deadline = time.monotonic() + START_TIMEOUT
        while (answer := sbc.admin("/readyz"))[0] != 200:  # the backend is up in every worker
            if time.monotonic() > deadline:
                raise BenchError(f"{name}: sbc /readyz {answer} after {START_TIMEOUT} s")
            time.sleep(0.1)
        return kam, sbc

    def finish(self, name: str, sbc: Sbc, *others: Kamailio | Uas) -> None:
        """Stop the SBC and the others; what its log says (and any process of its tree
        that had to be killed) goes to the findings."""
        for proc in others:
            proc.stop()
        sbc.stop()
        count, kinds = log_summary(sbc.log())
        if count or sbc.exit_code != 0 or sbc.killed:
            note = f"{name}: sbc run exit code {sbc.exit_code}, {count} log lines"
            if sbc.killed:
                note += f"; killed after the stop: {', '.join(sbc.killed)}"
            self.findings.append("\n".join([note, *kinds]))
            print(self.findings[-1], flush=True)
        for proc in others:
            self.started.remove(proc)
        self.started.remove(sbc)

    def window(
        self,
        sbc: Sbc,
        kam: Kamailio,
        family: str,
        workers: int,
        load: Callable[[], float],
        tail: float = 0.0,
    ) -> Window:
        """Run ``load`` (it returns SIPp's CPU seconds) with the clocks around it, once the
        SBC is idle. With a ``tail`` (s), the SBC's CPU goes on being read that long after
        the run (less its idle rate, read over IDLE_SECONDS before the run)."""
        settle(machine_busy_seconds)  # the SBC, Kamailio and the rest of the machine idle
        idle = SbcCpu(0.0, 0.0)
        if tail:
            cpu0, t0 = sbc.cpu_split(), time.perf_counter()
            time.sleep(IDLE_SECONDS)
            idle = (sbc.cpu_split() - cpu0) * (1 / (time.perf_counter() - t0))
        before = per_worker(sbc.metrics(), family, workers)
        cpu0, kam0, t0 = sbc.cpu_split(), kam.cpu_seconds(), time.perf_counter()
        machine0, interrupts0 = machine_busy_seconds(), interrupt_seconds()
        sipp_cpu = load()
        machine = machine_busy_seconds() - machine0
        interrupts = interrupt_seconds() - interrupts0
        wall = time.perf_counter() - t0
        cpu, kam_cpu = sbc.cpu_split() - cpu0, kam.cpu_seconds() - kam0
        after = per_worker(sbc.metrics(), family, workers)
        counts = [b - a for a, b in zip(before, after, strict=True)]
        after_run = SbcCpu(0.0, 0.0)
        if tail:
            cpu0, t0 = sbc.cpu_split(), time.perf_counter()
            time.sleep(tail)
            spent = time.perf_counter() - t0
            after_run = sbc.cpu_split() - cpu0 - idle * spent
        return Window(wall, cpu, kam_cpu, sipp_cpu, counts, idle, after_run, machine, interrupts)

    def name(self, base: str) -> str:
        """A measurement's name, its directory's: ``base``, and a number if it is made
        again."""
        name, again = base, 1
        while (self.workdir / name).exists():  # as many times as the retries at most
            again += 1
            name = f"{base}-{again}"
        return name

    def registers(self, workers: int, round_no: int) -> RegisterRun:
        args = self.args
        name = self.name(f"reg-w{workers}-r{round_no}")
        kam, sbc = self.systems(name, workers, CLIENT_EXPIRES)
        warm_up(sbc.port, "the SBC")
        users_csv = self.workdir / name / "users.csv"
        users_csv.write_text(
            "SEQUENTIAL\n"
            + "".join(f"w{workers}r{round_no}u{i:06d};{DOMAIN}\n" for i in range(args.users))
        )
        received = kam.registers_received()
        runs: list[SippRun] = []

        def load() -> float:
            runs.append(
                sipp(
                    self.workdir / name,
                    f"uac-{name}",
                    port=sbc.port,
                    local_port=free_port(taken=self.taken),
                    cid=name,
                    scenario="register_refresh_un.xml",
                    users_csv=users_csv,
                    users=args.users,
                    per_call=1 + args.refreshes,
                    args=args,
                    cpu=None,
                    extra=("-set", "refreshes", str(args.refreshes), *MAX_SOCKET),
                    transport="un",
                )
            )
            return runs[0].sipp_cpu

        window = self.window(sbc, kam, "register_requests", workers, load)
        backend = kam.registers_received() - received
        held = registrations_held(sbc, workers)
        if sum(window.counts) != runs[0].registers:
            self.findings.append(
                f"{name}: the workers counted {sum(window.counts):.0f} REGISTERs, "
                f"{runs[0].registers} were sent"
            )
        if len(set(held)) > 1:
            self.findings.append(
                f"{name}: registrations held per worker {held}: each should hold all "
                f"{args.users + 1} (the users and the warm-up user)"
            )
        self.finish(name, sbc, kam)
        result = RegisterRun(workers, round_no, runs[0], window, backend, held)
        print(
            f"round {round_no} {workers} worker{'s' if workers > 1 else ' '} REGISTERs: "
            f"{result.run.registers} in {result.run.elapsed:6.3f} s = {result.rate:7,.0f}/s, "
            f"{result.run.retransmissions} retransmissions, backend received {backend}, "
            f"signalling {result.signalling_us:5,.0f} µs/REGISTER, busy "
            f"{_busy([window])}, worker shares {_shares(window.counts)}",
            flush=True,
        )
        return result

    def calls(self, workers: int, round_no: int) -> CallRun:
        args = self.args
        name = self.name(f"call-w{workers}-r{round_no}")
        kam, sbc = self.systems(name, workers, CALLEE_EXPIRES, KAMAILIO_SHM_MB)
        life = int((args.calls + args.warmup_calls) / args.call_rate) + 120
        uas = Uas(self.workdir / name, "bob", free_port(taken=self.taken), None, life)
        self.started.append(uas)
        before = per_worker(sbc.metrics(), "register_requests", workers)
        status = register_bob(sbc.port, uas.port, CALLEE_EXPIRES)
        if status != 200:
            raise BenchError(f"bob could not register through the SBC ({status}):\n{sbc.log()}")
        grew = per_worker(sbc.metrics(), "register_requests", workers)
        bob_worker = max(range(workers), key=lambda i: grew[i] - before[i])
        uas.start()
        caller = Caller(self.workdir / name, "uac", sbc.port, uas, None, None)
        caller.transport, caller.options = "un", MAX_SOCKET
        if args.warmup_calls:
            warm = caller.step(min(args.call_rate, 100), args.warmup_calls)
            if warm.failed or warm.ok != warm.calls:
                raise BenchError(f"{name}: warm-up calls {warm.verdict()}\n{_errors(warm)}")
        steps: list[Step] = []

        def load() -> float:
            sipp0 = uas.cpu_seconds() + children_cpu_seconds()
            steps.append(caller.step(args.call_rate, args.calls))
            return uas.cpu_seconds() + children_cpu_seconds() - sipp0

        window = self.window(sbc, kam, "calls_started", workers, load, args.tail)
        step = steps[0]
        # Each call is two B2BUA calls: the callers' legs spread by the kernel, bob's legs
        # all in the worker his REGISTER reached.
        callers = [c - (step.calls if i == bob_worker else 0) for i, c in enumerate(window.counts)]
        caller_share = min(callers) / step.calls if workers > 1 else None
        if step.failed or step.ok != step.calls:
            self.findings.append(f"{name}: {step.verdict()}\n{_errors(step)}")
            print(self.findings[-1], flush=True)
        if sum(window.counts) != 2 * step.calls:
            self.findings.append(
                f"{name}: the workers started {sum(window.counts):.0f} calls for "
                f"{step.calls} calls made (two each expected)"
            )
        self.finish(name, sbc, uas, kam)
        result = CallRun(workers, round_no, step, window, caller_share)
        print(
            f"round {round_no} {workers} worker{'s' if workers > 1 else ' '} calls: "
            f"{step.calls} at {step.rate}/s: {step.achieved:6,.1f}/s, {step.ok} ok, "
            f"{step.failed} failed, {step.retransmissions} retransmissions, setup "
            f"{step.setup_ms:.0f} ms; per call signalling "
            f"{result.per_call_us(window.total.signalling):,.0f} µs (tail "
            f"{result.per_call_us(window.tail.signalling):,.0f}), media "
            f"{result.per_call_us(window.total.media):,.0f} µs, Kamailio "
            f"{result.per_call_us(window.kamailio):,.0f} µs; idle signalling "
            f"{_pct1(window.idle.signalling)}; busy {_busy([window])}; calls "
            f"started per worker {[int(c) for c in window.counts]} (bob's in worker "
            f"{bob_worker})",
            flush=True,
        )
        return result

    def close(self) -> None:
        for proc in reversed(self.started):
            proc.stop()
        self.started.clear()
        if self.args.keep:
            print(f"kept {self.workdir}")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _errors(step: Step) -> str:
    err = step.run_dir / "errors.log" if step.run_dir is not None else None
    if err is None or not err.exists():
        return ""
    return summarize_errors(err.read_text(errors="replace"))


def _busy(windows: Sequence[Window]) -> str:
    """CPU busy over the runs: SBC signalling / SBC media / Kamailio / SIPp / interrupts /
    other processes, 100 % = one core."""
    wall = sum(w.wall for w in windows)
    parts = (
        sum(w.sbc.signalling for w in windows),
        sum(w.sbc.media for w in windows),
        sum(w.kamailio for w in windows),
        sum(w.sipp for w in windows),
        sum(w.interrupts for w in windows),
        sum(w.other for w in windows),
    )
    return " / ".join(_pct(p / wall) for p in parts)


def _shares(counts: Sequence[float]) -> str:
    total = sum(counts) or 1.0
    return "/".join(f"{100 * c / total:.0f} %" for c in counts)


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def _cell(values: Sequence[float], fmt: Callable[[float], str]) -> str:
    """Median, and the range if there are several."""
    median = fmt(statistics.median(values))
    return median if len(values) < 2 else f"{median} ({fmt(min(values))}–{fmt(max(values))})"


def _n(x: float) -> str:
    return f"{x:,.0f}"


def _pct(x: float) -> str:
    return f"{100 * x:.0f} %"


def _pct1(x: float) -> str:
    return f"{100 * x:.1f} %"


def render(
    regs: list[RegisterRun], calls: list[CallRun], args: argparse.Namespace, env: dict[str, str]
) -> str:
    counts: list[int] = args.workers
    by_reg = {w: [r for r in regs if r.workers == w] for w in counts}
    by_call = {w: [c for c in calls if c.workers == w] for w in counts}
    base = counts[0]
    rounds = f"{args.rounds} round{'s' if args.rounds > 1 else ''}"

    def reg_median(w: int) -> float:
        return statistics.median(r.rate for r in by_reg[w])

    def reg_cpu_median(w: int) -> float:
        return statistics.median(r.signalling_us for r in by_reg[w])

    def sig_median(w: int) -> float:
        return statistics.median(c.per_call_us(c.window.total.signalling) for c in by_call[w])

    def per_call(w: int, cpu: Callable[[Window], float]) -> str:
        return _cell([c.per_call_us(cpu(c.window)) for c in by_call[w]], lambda x: f"{x:,.0f} µs")

    def row(
        title: str, cells: Callable[[int], str], ratio: Callable[[int], float] | None = None
    ) -> str:
        ratios = [f"{ratio(w) / ratio(base):.2f}" if ratio else "" for w in counts[1:]]
        return f"| {title} | " + " | ".join([*(cells(w) for w in counts), *ratios]) + " |"

    head = (
        "| | "
        + " | ".join(f"{w} worker{'s' if w > 1 else ''}" for w in counts)
        + "".join(f" | {w} / {base}" for w in counts[1:])
        + " |"
    )
    rule = "|---|" + "---:|" * (2 * len(counts) - 1)
    per_reg = 1 + args.refreshes
    lines = [
        "## Signalling workers (bench/workers.py)",
        "",
        f"- Date: {env['date']}",
        f"- CPU: {env['cpu']}; {env['pinning']}",
        f"- Versions: sbc {env['sbc']}, {env['python']}, uvloop {env['uvloop']}, "
        f"SIPp {env['sipp']}, Kamailio {env['kamailio']}",
        f"- Command: `{env['command']}`",
        f"- Setup: per worker count ({', '.join(str(w) for w in counts)}) and round "
        f"({rounds}, interleaved), a fresh `sbc run` with `[sbc] workers = N`, "
        "`[media] workers = N` (one media worker per signalling worker; `ports = "
        f'"{MEDIA_PORTS}"` shared among them), UDP on loopback, '
        '`[log] level = "warning"`, `[security] allow` the load\'s address and '
        "`backend_register = { rate = 0 }`, and a fresh Kamailio (docker/kamailio/"
        "kamailio.cfg, 2 UDP workers) as its only backend. Nothing is pinned: the SBC's "
        "processes, SIPp and Kamailio share the machine's cores.",
        f"- REGISTERs: SIPp `-t un` (a socket, so a source port, per user: the kernel "
        f"spreads them over the workers), {args.users:,} users per round, each one REGISTER "
        f"then {args.refreshes} unchanged refreshes from the same port "
        "(bench/scenarios/register_refresh_un.xml), every 200 checked, every call passed; "
        f"closed loop `-r {args.rate} -l {args.limit}`. Registration offload: "
        f"`backend_expires = {BACKEND_EXPIRES}`, `client_expires.udp = {CLIENT_EXPIRES}`: "
        "the SBC relays the first REGISTER of each user and answers the refreshes.",
        f"- Calls: SIPp UAC `-t un` → SBC → Kamailio (usrloc lookup, record-route) → SBC → "
        "SIPp UAS registered as bob through the SBC (bench/scenarios/call_uac.xml, "
        "call_uas.xml: INVITE with SDP, 180, 200 with SDP, ACK, BYE at once); each call is "
        "two B2BUA calls in the SBC, both with media anchored (no RTP flows). "
        f"{args.warmup_calls} warm-up calls, then {args.calls:,} calls at "
        f"{args.call_rate}/s (open loop).",
        "",
        f"REGISTERs ({per_reg} per user):",
        "",
        head,
        rule,
        row(
            f"REGISTERs/s, median (range) of {args.rounds}",
            lambda w: _cell([r.rate for r in by_reg[w]], _n),
            reg_median,
        ),
        row(
            "Signalling CPU per REGISTER, all signalling processes",
            lambda w: _cell([r.signalling_us for r in by_reg[w]], lambda x: f"{x:,.0f} µs"),
            reg_cpu_median,
        ),
        row(
            "SIPp retransmissions, all rounds",
            lambda w: _n(sum(r.run.retransmissions for r in by_reg[w])),
        ),
        row(
            "Registrations each worker holds after the run (fewest–most; all "
            f"{args.users + 1:,} expected)",
            lambda w: _held([r.held for r in by_reg[w]]),
        ),
        row(
            "REGISTERs received by the backend, per round",
            lambda w: _cell([r.backend_registers for r in by_reg[w]], _n),
        ),
        row(
            "Smallest worker share of the REGISTERs, median (lowest)",
            lambda w: _share([r.window.min_share for r in by_reg[w]], w),
        ),
        row(BUSY, lambda w: _busy([r.window for r in by_reg[w]])),
        "",
        "Calls:",
        "",
        head,
        rule,
        row(
            f"Achieved calls/s ({args.call_rate} offered), median (range)",
            lambda w: _cell([c.step.achieved for c in by_call[w]], lambda x: f"{x:,.1f}"),
        ),
        row(
            "Failed calls, all rounds",
            lambda w: (
                f"{sum(c.step.failed for c in by_call[w])} of "
                f"{sum(c.step.calls for c in by_call[w]):,}"
            ),
        ),
        row(
            "SIPp retransmissions, all rounds",
            lambda w: _n(sum(c.step.retransmissions for c in by_call[w])),
        ),
        row(
            "Mean call setup time, INVITE → 200",
            lambda w: _cell([c.step.setup_ms for c in by_call[w]], lambda x: f"{x:,.0f} ms"),
        ),
        row(
            "**Signalling CPU per call**, all signalling processes, run and tail",
            lambda w: per_call(w, lambda x: x.total.signalling),
            sig_median,
        ),
        row(
            f"… of it in the {args.tail:g} s tail after the run (less the idle rate)",
            lambda w: per_call(w, lambda x: x.tail.signalling),
        ),
        row(
            "Media workers' CPU per call, run and tail",
            lambda w: per_call(w, lambda x: x.total.media),
        ),
        row("Kamailio's CPU per call, run", lambda w: per_call(w, lambda x: x.kamailio)),
        row(
            f"Idle SBC signalling CPU ({IDLE_SECONDS:g} s before the run), % of a core",
            lambda w: _cell([c.window.idle.signalling for c in by_call[w]], _pct1),
        ),
        row(
            "Smallest worker share of the calls started (both legs), median (lowest)",
            lambda w: _share([c.window.min_share for c in by_call[w]], w),
        ),
        row(
            "Smallest worker share of the callers' legs, median (lowest)",
            lambda w: _share([c.caller_share or 0.0 for c in by_call[w]], w),
        ),
        row(BUSY, lambda w: _busy([c.window for c in by_call[w]])),
        "",
    ]
    lines += _verdicts(counts, reg_median, sig_median)
    disturbed = sum(w.disturbed for w in (*(r.window for r in regs), *(c.window for c in calls)))
    if disturbed:
        lines += [
            "",
            f"**Disturbed:** in {disturbed} of the {len(regs) + len(calls)} runs "
            f"other processes on the machine used more than {_pct(MAX_OTHER)} of a core "
            f"(after {args.retries} more tries each); see the last row of each table.",
        ]
    lines += ["", *_meaning(by_reg, by_call, counts)]
    lines += [
        "",
        "How it is measured: REGISTERs/s are REGISTER transactions (retransmissions not "
        "counted) over SIPp's own first-to-last statistics timestamps; achieved calls/s are "
        "the calls over those timestamps less one mean call (bench/calls.py). CPU time is "
        "utime+stime from /proc over the wall time of the SIPp run (100 % = one core): the "
        "SBC's process tree found by parent PIDs, signalling (`sbc run`, `sbc worker`) and "
        "media (`sbc.io.media_worker`) told apart by command line; Kamailio's process "
        "group; getrusage and /proc for SIPp; interrupts and softirqs (the loopback "
        "network's work, charged to no process) and other processes from /proc/stat. The "
        "SBC's CPU per call also counts the "
        f"{args.tail:g} s after the call run, when the calls' transactions and dialogs "
        "expire (RFC 3261 timers, 32 s on UDP), less the idle SBC's rate read over "
        f"{IDLE_SECONDS:g} s before the run; the REGISTER figures count the run only. "
        "Worker shares are the "
        "supervisor's per-worker counters (`sbc_worker_register_requests_total`, "
        "`sbc_worker_calls_started_total`) before and after each run. With one callee, "
        "bob's legs are all in one worker: the calls-started share of the other is at most "
        "about a quarter by construction; the callers' legs show the kernel's spread.",
    ]
    return "\n".join(lines) + "\n"


def _held(held: list[list[int]]) -> str:
    counts = [n for per_run in held for n in per_run]
    return f"{min(counts):,}–{max(counts):,}" if counts else "—"


def _share(values: list[float], workers: int) -> str:
    if workers == 1:
        return "—"
    return f"{_pct(statistics.median(values))} ({_pct(min(values))})"


def _verdicts(
    counts: list[int], reg: Callable[[int], float], sig: Callable[[int], float]
) -> list[str]:
    if 1 not in counts or 2 not in counts:
        return ["The issue's targets compare 2 workers with 1: not both were measured."]
    reg_ratio, cpu_ratio = reg(2) / reg(1), sig(2) / sig(1)
    return [
        f"Targets: REGISTERs/s with 2 workers / with 1 = {reg_ratio:.2f} (at least "
        f"{REGISTER_TARGET}): **{'met' if reg_ratio >= REGISTER_TARGET else 'not met'}**; "
        f"signalling CPU per call with 2 workers / with 1 = {cpu_ratio:.2f} (at most "
        f"{CPU_TARGET}): **{'met' if cpu_ratio <= CPU_TARGET else 'not met'}**."
    ]


def _meaning(
    by_reg: dict[int, list[RegisterRun]], by_call: dict[int, list[CallRun]], counts: list[int]
) -> list[str]:
    """What the figures mean: who shares the cores."""
    top = counts[-1]
    regs = by_reg[top]
    wall = sum(r.window.wall for r in regs)
    sig = sum(r.window.sbc.signalling for r in regs) / wall
    others = sum(r.window.kamailio + r.window.sipp + r.window.interrupts for r in regs) / wall
    calls = [c for w in counts for c in by_call[w]]
    kept_up = all(c.step.failed == 0 and c.step.achieved >= 0.95 * c.step.rate for c in calls)
    pace = (
        "every call run kept the offered rate without a failed call, so there the CPU per "
        "call, not the rate, tells what a second worker costs"
        if kept_up
        else "not every call run kept the offered rate without failures (see above), so "
        "the CPU per call there includes the cost of falling behind"
    )
    return [
        f"What it means: the machine has {_cores()} cores, and in the REGISTER runs with "
        f"{top} workers the SBC's signalling processes used {sig:.1f} cores' worth while SIPp, "
        f"Kamailio and the kernel's loopback network work used {others:.1f}: they contend "
        "with the SBC for the same cores, so a second worker can only add the CPU that the "
        "load generator, the backend and the network stack leave free, not a whole core. "
        "The calls are offered at a "
        f"fixed rate: {pace} (a second event loop with its own timers and backend probes, "
        "fewer messages per wake-up of each loop, the supervisor). The media workers' CPU "
        "is the port allocation and release of two anchored legs per call (no RTP flows)."
    ]


def _cores() -> int:
    return len(os.sched_getaffinity(0))


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> tuple[list[RegisterRun], list[CallRun], dict[str, str]]:
    for tool in ("sipp", "kamailio", "kamcmd"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} not installed (make peers installs it)")
    if args.sipp_timeout is None:
        args.sipp_timeout = max(30, args.users * (args.refreshes + 1) // 300)
    bench = Bench(args)
    regs: list[RegisterRun] = []
    calls: list[CallRun] = []
    try:
        for round_no in range(1, args.rounds + 1):
            for workers in args.workers:
                regs.append(measure(bench.registers, workers, round_no, args.retries))
            for workers in args.workers:
                calls.append(measure(bench.calls, workers, round_no, args.retries))
    except BaseException:
        print_sbc_logs(bench.started)
        raise
    finally:
        bench.close()
    if bench.findings:
        print(f"\n--- findings: {len(bench.findings)} ---\n" + "\n".join(bench.findings))
    return regs, calls, environment(f"{_cores()} CPUs, nothing pinned")


Run = TypeVar("Run", RegisterRun, CallRun)


def measure(how: Callable[[int, int], Run], workers: int, round_no: int, retries: int) -> Run:
    """One measurement; made again (on fresh processes), ``retries`` times at most, while
    other work on the machine disturbed it."""
    for _ in range(retries):
        result = how(workers, round_no)
        if not result.window.disturbed:
            return result
        share = _pct(result.window.other / result.window.wall)
        print(f"  (other processes on the machine used {share} of a core: once more)", flush=True)
    return how(workers, round_no)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--workers",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 2],
        help="comma-separated worker counts (1,2)",
    )
    for flag, default, what in (
        ("--rounds", 3, "rounds"),
        ("--users", 5000, "users per REGISTER run"),
        ("--refreshes", 4, "refreshes per user"),
        ("--rate", 20000, "SIPp -r for REGISTERs"),
        ("--limit", 200, "SIPp -l for REGISTERs"),
        ("--calls", 4000, "calls per call run"),
        ("--call-rate", 200, "calls/s offered"),
        ("--warmup-calls", 100, "calls before each call run"),
        ("--tail", 35, "s the SBC's CPU is read after a call run: its calls' timers"),
        ("--retries", 2, "times a run disturbed by other work is made again at most"),
    ):
        ap.add_argument(flag, type=int, default=default, help=f"{what} ({default})")
    ap.add_argument(
        "--sipp-timeout",
        type=int,
        help="bound on each REGISTER run, s (default: 30, or users x (refreshes+1) / 300)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    ap.add_argument("--out", type=Path, help="rewrite the bench/workers.py section of FILE")
    args = ap.parse_args(argv)
    counts = (args.rounds, args.users, args.refreshes, args.rate, args.limit, args.calls)
    if (
        min(*counts, args.call_rate, *args.workers) < 1
        or min(args.warmup_calls, args.tail, args.retries) < 0
    ):
        ap.error("--warmup-calls, --tail and --retries must be >= 0, the other numbers >= 1")

    try:
        regs, calls, env = run(args)
    except BenchError as exc:
        print(f"bench/workers.py: {exc}", file=sys.stderr)
        return 1
    publish("bench/workers.py", render(regs, calls, args, env), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
