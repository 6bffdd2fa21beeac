#!/usr/bin/env python3
"""Sustained call throughput: SIPp calling SIPp directly, via the SBC and via Kamailio.

    .venv/bin/python bench/calls.py [--held 2000] [--py-spy FILE] [--out docs/performance.md]

One run, three setups, the same SIPp caller (bench/scenarios/call_uac.xml) and callee
(call_uas.xml) in each, over UDP on loopback:

  direct    SIPp UAC -> SIPp UAS, the yardstick;
  via SBC   SIPp UAC -> ``sbc run`` (no backends: its embedded registrar routes the call
            to bob's registered address, a B2BUA with two dialogs per call) -> SIPp UAS;
            ``[registration.client_expires] udp = 3600`` (the binding outlives the run),
            log level warning;
  Kamailio  SIPp UAC -> Kamailio 5.6 (docker/kamailio/kamailio.cfg: usrloc lookup,
            record-routed, transaction-stateful t_relay) -> SIPp UAS.

The callee bob is registered first (via SBC and Kamailio) from a Python UDP socket bound to
the port SIPp UAS then listens on (Contact sip:bob@127.0.0.1:P): both route a call to the
address the REGISTER came from. The caller calls sip:bob@example.com.

A call is short: INVITE with SDP, 100, 180, 200 with SDP (10 ms after the 180), ACK, BYE at
once, 200. Per setup, a ladder of short runs (``--rates``, ``--step-seconds`` of calls each,
at least ``--min-calls``), open loop (``-r RATE``, no ``-l``: calls start at the rate whether
or not the target keeps up), stopping at the first failing rate, then ``--refine`` bisection
steps. A short run passes with fewer than 0.1 % failed calls and SIP retransmissions for
fewer than 1 % of them. Then a long run (``--long-seconds`` of calls) at the ladder's best
rate, and if it fails up to ``--long-tries`` - 1 more, each ``--long-backoff`` x the rate
before (via the SBC each on a fresh ``sbc run``: one that collapsed keeps the failed calls'
state for half a minute and more): a long run passes with fewer than 0.1 % failed calls
and SIPp keeping 95 % of the rate. The sustained rate is the achieved rate of the passing
long run (the SBC reaches its steady state only after the 32 s of the RFC 3261 transaction
timers).

Held calls (via the SBC only, a fresh ``sbc run``): ``--held`` calls are opened at
``--held-rate`` per second and held (``-d``) until all are up at once; the SBC's resident
memory (/proc/PID/status VmRSS) is read before, while all are held, and after they ended.

With two or more CPUs the system under test (the SBC, Kamailio) is pinned to one CPU and
both SIPps (and this script) to another (``taskset -c``). Every process started here is
stopped by its PID at the end, also on error; every SIPp run is bounded by ``-m``,
``-timeout`` and ``-recv_timeout``. ``--py-spy FILE`` profiles the SBC (py-spy record, raw
format, 10 s) during its first long run and prints the hot spots; not with ``--out``.
``--out`` rewrites the section between the bench/calls.py markers.
"""

from __future__ import annotations

import argparse
import collections
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from harness import (
    DOMAIN,
    BenchError,
    Kamailio,
    Sbc,
    cpu_seconds,
    environment,
    free_port,
    pinned,
    print_sbc_logs,
    sip_exchange,
    sipp_command,
    sipp_ms,
    sipp_stats,
)
from report import children_cpu_seconds, choose_cpus, publish, sipp_stamp, stop_process

CLIENT_EXPIRES = 3600  # the binding of bob at the SBC outlives the run
BACKEND_EXPIRES = 7200  # must exceed every client_expires (unused: no backends)
# The relay's ports (each call anchors its SDP: two RTP/RTCP pairs per call): a wide range
# below the kernel's ephemeral ports, so that calls piling up while the SBC falls behind
# (each held until its transactions time out) do not run it out and turn into 488s.
MEDIA_PORTS = "10000-32000"
LADDER = (100, 200, 300, 400, 500, 700, 1000, 1500, 2000, 3000, 4000, 6000, 8000)
# Kamailio's shared memory (-m), MB: its transactions stay 5 s after a call (tm wait timer),
# and at about 500 calls/s the default 64 MB runs out ("could not allocate shared memory
# from shm pool", then 500 answers).
KAMAILIO_SHM_MB = 1024
MAX_FAILED = 0.001  # a step passes with fewer than 0.1 % failed calls
MIN_PACE = 0.95  # ... and SIPp reaching 95 % of the rate asked (in runs of 10 s or more)
MAX_RETRANS_SHORT = 0.01  # a short run passes with retransmissions for under 1 % of calls
PACED_RUN = 10.0  # seconds: in a shorter run the last calls' retransmissions skew the pace
RECV_TIMEOUT_MS = 4000  # a call waiting longer than this for any message fails
SETTLE_TIMEOUT = 15.0


# ---------------------------------------------------------------------------------------
# Small helpers: REGISTER from a given port, socket drops, memory, idleness
# ---------------------------------------------------------------------------------------


def register_bob(target_port: int, contact_port: int, expires: int) -> int | None:
    """REGISTER bob from 127.0.0.1:``contact_port`` (Contact sip:bob@ that address) at the
    registrar on ``target_port``; the final status, or None. The socket is closed after, so
    SIPp UAS can take the port."""
    return sip_exchange(
        target_port,
        "REGISTER",
        "bob",
        2.0,
        local_port=contact_port,
        uri=f"sip:{DOMAIN}",
        expires=expires,
    )


def udp_drops(port: int) -> int:
    """Datagrams the kernel dropped for the UDP sockets on 127.0.0.1:``port`` (their receive
    buffers were full): the last column of /proc/net/udp, summed over the sockets that
    share the port (SO_REUSEPORT: one per signalling worker); 0 if there is none."""
    drops = 0
    for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == f"0100007F:{port:04X}":
            drops += int(fields[-1])
    return drops


def rss_kib(pid: int) -> int:
    """VmRSS of a process, in KiB."""
    m = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    if m is None:
        raise BenchError(f"no VmRSS for PID {pid}")
    return int(m.group(1))


def settle(cpu: Callable[[], float]) -> None:
    """Until the system under test is idle (under 5 % of a core over 0.3 s), at most
    SETTLE_TIMEOUT: a failed step leaves transactions to retransmit and time out."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while time.monotonic() < deadline:
        c0 = cpu()
        time.sleep(0.3)
        if cpu() - c0 < 0.015:
            return


# ---------------------------------------------------------------------------------------
# The callee (the systems under test, Kamailio and the SBC, are in bench/harness.py)
# ---------------------------------------------------------------------------------------


class Uas:
    """SIPp UAS (bob) on a fixed port for the whole of one setup, stopped by its PID."""

    def __init__(self, workdir: Path, name: str, port: int, cpu: int | None, life: int) -> None:
        self.dir = workdir / f"uas-{name}"
        self.dir.mkdir()
        self.port, self.cpu, self.life = port, cpu, life
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = sipp_command(
            "call_uas.xml", self.port, self.dir,
            "-m", "100000000",
            "-timeout", str(self.life),
            "-buff_size", str(4 << 20),
        )  # fmt: skip
        with (self.dir / "screen.log").open("wb") as out:
            self.proc = subprocess.Popen(
                pinned(cmd, self.cpu), cwd=self.dir, stdin=subprocess.DEVNULL, stdout=out,
                stderr=out,
            )  # fmt: skip
        # SIPp binds at once; give it a moment, then make sure it did not exit (port taken).
        time.sleep(0.3)
        if self.proc.poll() is not None:
            raise BenchError(
                f"sipp UAS on port {self.port} exited with {self.proc.returncode}:\n"
                + (self.dir / "screen.log").read_text(errors="replace")[-2000:]
            )

    def cpu_seconds(self) -> float:
        return 0.0 if self.proc is None else cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        stop_process(self.proc)


# ---------------------------------------------------------------------------------------
# One SIPp UAC run
# ---------------------------------------------------------------------------------------


@dataclass
class Step:
    rate: int  # asked of SIPp (-r)
    calls: int  # -m
    ok: int
    failed: int
    retransmissions: int
    elapsed: float  # SIPp's start to end timestamps
    call_ms: float  # mean call length (SIPp's CallLength)
    setup_ms: float  # mean INVITE -> 200 (SIPp response time 1)
    sut_busy: float | None  # CPU share of the system under test over the wall time
    sipp_busy: float  # both SIPps
    sut_drops: int  # datagrams dropped at the target's socket (receive buffer full)
    uas_drops: int  # ... at SIPp UAS's
    failures: dict[str, int] = field(default_factory=dict)  # SIPp's Failed* counters
    run_dir: Path | None = None  # its SIPp files (command, stat.csv, errors.log, screen.log)
    confirm: bool = False  # a long run at a rate the ladder found

    @property
    def achieved(self) -> float:
        """Calls over the time SIPp took to start them (its run less one mean call)."""
        span = self.elapsed - self.call_ms / 1000
        return self.calls / span if span > 0 else 0.0

    @property
    def slow(self) -> bool:
        """SIPp could not start the calls at the rate asked (itself the limit)."""
        return self.calls / self.rate >= PACED_RUN and self.achieved < MIN_PACE * self.rate

    @property
    def behind(self) -> bool:
        """A short run in which the target fell behind (SIP retransmissions for 1 % of the
        calls or more): in 2 s retransmissions still rescue calls an overloaded target
        could not sustain for long."""
        return not self.confirm and self.retransmissions >= MAX_RETRANS_SHORT * self.calls

    @property
    def passed(self) -> bool:
        return (
            self.ok + self.failed == self.calls
            and self.failed < MAX_FAILED * self.calls
            and not self.slow
            and not self.behind
        )

    def verdict(self) -> str:
        if self.passed:
            return "pass"
        why = []
        if self.ok + self.failed != self.calls:
            why.append(f"{self.calls - self.ok - self.failed} calls unfinished")
        if self.failed:
            kinds = ", ".join(f"{k} {v}" for k, v in self.failures.items())
            why.append(f"{self.failed} failed ({kinds})" if kinds else f"{self.failed} failed")
        elif self.slow:
            why.append(f"SIPp reached only {self.achieved:,.0f} calls/s")
        if self.behind:
            why.append(f"{self.retransmissions} retransmissions")
        return "fail: " + "; ".join(why)


@dataclass
class Running:
    """A SIPp UAC run in progress, with the counters read when it started."""

    run_dir: Path
    proc: subprocess.Popen[bytes]
    rate: int
    calls: int
    hold_ms: int
    t0: float
    sut_cpu0: float
    sipp_cpu0: float
    sut_drops0: int
    uas_drops0: int

    @property
    def bound(self) -> float:
        """How long it may take at most: its -timeout, and some."""
        return self.calls / self.rate + self.hold_ms / 1000 + 3 * RECV_TIMEOUT_MS / 1000 + 20


class Caller:
    """Runs SIPp UAC against one target: the SBC, Kamailio, or SIPp UAS itself."""

    def __init__(
        self,
        workdir: Path,
        name: str,
        target_port: int,
        uas: Uas,
        sut_cpu: Callable[[], float] | None,
        cpu: int | None,
    ) -> None:
        self.workdir, self.name, self.target_port = workdir, name, target_port
        self.uas, self.sut_cpu, self.cpu = uas, sut_cpu, cpu
        self.count = 0
        self.scenario = "call_uac.xml"
        self.transport = "u1"  # SIPp -t: un for a socket (a source port) per call
        self.options: tuple[str, ...] = ()  # more SIPp options

    def command(self, run_dir: Path, rate: int, calls: int, hold_ms: int) -> list[str]:
        timeout = int(calls / rate + hold_ms / 1000 + 3 * RECV_TIMEOUT_MS / 1000) + 10
        return sipp_command(
            self.scenario, free_port(taken={self.target_port, self.uas.port}), run_dir,
            "-m", str(calls),
            "-r", str(rate),
            "-rp", "1000",
            "-d", str(hold_ms),
            "-recv_timeout", str(RECV_TIMEOUT_MS),
            "-timeout", str(timeout),
            "-timeout_error",
            "-buff_size", str(4 << 20),
            "-trace_stat", "-stf", str(run_dir / "stat.csv"), "-fd", "1",
            *self.options,
            target=self.target_port,
            transport=self.transport,
        )  # fmt: skip

    def start(self, rate: int, calls: int, hold_ms: int = 0) -> Running:
        self.count += 1
        run_dir = self.workdir / f"{self.name}-{self.count:02d}-{rate}"
        run_dir.mkdir()
        cmd = self.command(run_dir, rate, calls, hold_ms)
        (run_dir / "command").write_text(shlex.join(cmd) + "\n")
        sut_cpu0 = self.sut_cpu() if self.sut_cpu else 0.0
        sipp_cpu0 = self.uas.cpu_seconds() + children_cpu_seconds()
        sut_drops0, uas_drops0 = udp_drops(self.target_port), udp_drops(self.uas.port)
        t0 = time.perf_counter()
        with (run_dir / "screen.log").open("wb") as out:
            proc = subprocess.Popen(
                pinned(cmd, self.cpu), cwd=run_dir, stdin=subprocess.DEVNULL, stdout=out,
                stderr=out,
            )  # fmt: skip
        return Running(
            run_dir, proc, rate, calls, hold_ms, t0, sut_cpu0, sipp_cpu0, sut_drops0, uas_drops0
        )

    def finish(self, r: Running) -> Step:
        try:
            r.proc.wait(timeout=r.bound)
        except subprocess.TimeoutExpired:
            stop_process(r.proc)
            raise BenchError(f"sipp {r.run_dir.name} did not finish in {r.bound:.0f} s") from None
        wall = time.perf_counter() - r.t0
        sipp_cpu = self.uas.cpu_seconds() + children_cpu_seconds() - r.sipp_cpu0
        sut_busy = (self.sut_cpu() - r.sut_cpu0) / wall if self.sut_cpu else None
        rows = sipp_stats(r.run_dir / "stat.csv")
        if not rows:
            screen = (r.run_dir / "screen.log").read_text(errors="replace")[-2000:]
            raise BenchError(
                f"sipp {r.run_dir.name}: no statistics ({r.proc.returncode})\n{screen}"
            )
        last = rows[-1]
        failures = {
            k.removeprefix("Failed").removesuffix("(C)"): int(v)
            for k, v in last.items()
            if k.startswith("Failed") and k.endswith("(C)") and k != "FailedCall(C)" and int(v)
        }
        return Step(
            rate=r.rate,
            calls=r.calls,
            ok=int(last["SuccessfulCall(C)"]),
            failed=int(last["FailedCall(C)"]),
            retransmissions=int(last["Retransmissions(C)"]),
            elapsed=sipp_stamp(last["CurrentTime"]) - sipp_stamp(last["StartTime"]),
            call_ms=sipp_ms(last["CallLength(C)"]),
            setup_ms=sipp_ms(last["ResponseTime1(C)"]),
            sut_busy=sut_busy,
            sipp_busy=sipp_cpu / wall,
            sut_drops=udp_drops(self.target_port) - r.sut_drops0,
            uas_drops=udp_drops(self.uas.port) - r.uas_drops0,
            failures=failures,
            run_dir=r.run_dir,
        )

    def step(self, rate: int, calls: int) -> Step:
        return self.finish(self.start(rate, calls))


# ---------------------------------------------------------------------------------------
# A setup: the rate ladder and the long runs; via the SBC the held calls
# ---------------------------------------------------------------------------------------


@dataclass
class Held:
    calls: int
    rate: int
    hold_ms: int
    rss_before: int  # KiB
    rss_held: int
    rss_after: int
    current_calls: int  # SIPp's CurrentCall when the held RSS was read
    sbc_busy_held: float  # the SBC's CPU share while every call was held, idle
    run: Step


@dataclass
class Setup:
    name: str
    steps: list[Step] = field(default_factory=list)
    held: Held | None = None
    errors: str = ""  # SIPp error log of the first failing run (evidence)

    def _best(self, confirm: bool) -> Step | None:
        passing = [s for s in self.steps if s.passed and s.confirm == confirm]
        return max(passing, key=lambda s: s.rate) if passing else None

    @property
    def ladder_best(self) -> Step | None:
        return self._best(False)

    @property
    def best(self) -> Step | None:
        """The highest rate that held for a long run."""
        return self._best(True)

    @property
    def long_runs(self) -> list[Step]:
        return [s for s in self.steps if s.confirm]

    def record(self, step: Step) -> None:
        self.steps.append(step)
        busy = "" if step.sut_busy is None else f", target CPU {100 * step.sut_busy:3.0f} %"
        print(
            f"{self.name:9}{' long' if step.confirm else '     '} {step.rate:5}/s x "
            f"{step.calls:6}: {step.achieved:7,.0f}/s, {step.ok} ok, {step.failed} failed, "
            f"{step.retransmissions} retrans, drops {step.sut_drops}/{step.uas_drops}, setup "
            f"{step.setup_ms:4.0f} ms{busy}, SIPp CPU {100 * step.sipp_busy:3.0f} % "
            f"-> {step.verdict()}",
            flush=True,
        )
        if not step.passed and not self.errors and step.run_dir is not None:
            err = step.run_dir / "errors.log"
            if err.exists():
                text = err.read_text(errors="replace")
                self.errors = f"{step.run_dir.name}:\n{summarize_errors(text)}"


def summarize_errors(text: str) -> str:
    """Counts of the kinds of events in a SIPp error log, with one example of each."""
    kinds: collections.Counter[str] = collections.Counter()
    for m in re.finditer(
        r"(receive timeout on message [^:]+:\d+)|while (expecting '\w+'|pausing) \(index (\d+)\), "
        r"received '([^\r\n]*)|(Dead call) [^ ]+ \(([^)]*)\), received '([^\r\n]*)",
        text,
    ):
        if m.group(1):
            kinds[m.group(1)] += 1
        elif m.group(2):
            kinds[f"unexpected {m.group(4)} while {m.group(2)} (index {m.group(3)})"] += 1
        else:
            kinds[f"message for a call already ended ({m.group(6)}): {m.group(7)}"] += 1
    return "\n".join(f"{n:6}  {k}" for k, n in kinds.most_common(12)) or text[-1500:]


def ladder(
    caller: Caller, setup: Setup, args: argparse.Namespace, idle: Callable[[], None]
) -> None:
    """Step up the rates until one fails, then bisect ``--refine`` times."""

    def one(rate: int) -> bool:
        step = caller.step(rate, max(args.min_calls, int(rate * args.step_seconds)))
        setup.record(step)
        idle()
        return step.passed

    low, high = 0, 0
    for rate in args.rates:
        if not one(rate):
            high = rate
            break
        low = rate
    for _ in range(args.refine if high else 0):
        mid = int(round((low + high) / 2, -1))
        if low == 0 or high - mid < max(10, high // 20):
            break
        if one(mid):
            low = mid
        else:
            high = mid


def long_runs(
    caller: Caller,
    setup: Setup,
    args: argparse.Namespace,
    idle: Callable[[], None],
    during: Callable[[Running], None] | None = None,
    fresh: Callable[[], tuple[Caller, Callable[[], None]]] | None = None,
) -> None:
    """``--long-seconds`` at the ladder's best rate; if that fails, at lower rates, each
    after ``fresh()`` (a new caller and idle check) where given: a target that collapsed
    keeps the state of the calls that failed (transactions, ended dialogs) for half a
    minute and more, which the next run would pay for."""
    best = setup.ladder_best
    if best is None or args.long_seconds <= 0:
        return
    rate = best.rate
    for n in range(args.long_tries):
        if n and fresh is not None:
            caller, idle = fresh()
        running = caller.start(rate, int(rate * args.long_seconds))
        if during is not None:
            during(running)
            during = None
        step = caller.finish(running)
        step.confirm = True
        setup.record(step)
        idle()
        if step.passed:
            return
        rate = max(10, int(round(rate * args.long_backoff, -1)))


def held_calls(caller: Caller, sbc: Sbc, args: argparse.Namespace) -> Held:
    """``--held`` calls open at once through a fresh SBC; its RSS before, during, after."""
    caller.step(100, 200)  # warm-up: every code path of a call has run once
    settle(sbc.cpu_seconds)
    rss_before = rss_kib(sbc.pid)
    n, rate = args.held, args.held_rate
    open_s = n / rate
    hold_ms = int(1000 * (open_s + 6))
    running = caller.start(rate, n, hold_ms)
    # Every call created, then 2 s for the last ones to be answered: all are up until the
    # first one's BYE, hold_ms after it started.
    deadline = running.t0 + open_s + RECV_TIMEOUT_MS / 1000
    while time.perf_counter() < deadline and running.proc.poll() is None:
        time.sleep(0.25)
        rows = sipp_stats(running.run_dir / "stat.csv")
        if rows and int(rows[-1]["TotalCallCreated"]) >= n:
            break
    time.sleep(1.5)
    c0, w0 = sbc.cpu_seconds(), time.perf_counter()
    time.sleep(1.5)
    busy_held = (sbc.cpu_seconds() - c0) / (time.perf_counter() - w0)
    rss_held = rss_kib(sbc.pid)
    sampled_at = time.perf_counter() - running.t0
    rows = sipp_stats(running.run_dir / "stat.csv")
    current = int(rows[-1]["CurrentCall"]) if rows else 0
    run = caller.finish(running)
    if sampled_at >= hold_ms / 1000 - 0.5:
        raise BenchError(
            f"held calls: RSS read {sampled_at:.1f} s after the start, after the first BYE "
            f"({hold_ms / 1000:.1f} s): lower --held or raise --held-rate"
        )
    settle(sbc.cpu_seconds)
    rss_after = rss_kib(sbc.pid)
    print(
        f"held      {n} calls at {rate}/s held {hold_ms} ms: {run.ok} ok, {run.failed} "
        f"failed; SBC RSS {rss_before} -> {rss_held} -> {rss_after} KiB, "
        f"{current} calls in progress at the held reading",
        flush=True,
    )
    return Held(
        calls=n,
        rate=rate,
        hold_ms=hold_ms,
        rss_before=rss_before,
        rss_held=rss_held,
        rss_after=rss_after,
        current_calls=current,
        sbc_busy_held=busy_held,
        run=run,
    )


def py_spy(sbc: Sbc, out: Path, cpu: int | None) -> Callable[[Running], None]:
    """What to do during the first long run via the SBC: py-spy record, 10 s, from 5 s in."""
    exe = Path(sys.executable).with_name("py-spy")
    if not exe.exists():
        raise BenchError("py-spy is not installed in the virtualenv (pip install py-spy)")

    def record(running: Running) -> None:
        time.sleep(5.0)
        cmd = [str(exe), "record", "--nonblocking", "-o", str(out), "--pid", str(sbc.pid)]
        cmd += ["-d", "10", "-f", "raw"]
        spy = subprocess.run(
            pinned(cmd, cpu), capture_output=True, text=True, errors="replace", timeout=60
        )
        if spy.returncode != 0 or not out.exists():
            raise BenchError(f"py-spy failed ({spy.returncode}): {spy.stdout}{spy.stderr}")
        print(f"py-spy: {spy.stderr.strip()[-300:]}", flush=True)

    return record


def print_hot_spots(raw: Path, top: int = 25) -> None:
    """Self and inclusive shares of the functions in py-spy's raw (collapsed) stacks."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        total += n
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    print(f"\npy-spy: {total} samples (while not idle) in {raw}")
    for title, counter in (("self", own), ("inclusive", incl)):
        print(f"--- top {top} by {title} time ---")
        for f, n in counter.most_common(top):
            print(f"{100 * n / max(total, 1):5.1f} %  {f}")


# ---------------------------------------------------------------------------------------
# Environment and report
# ---------------------------------------------------------------------------------------


def _ms(x: float) -> str:
    return "< 1 ms" if x < 1 else f"{x:,.0f} ms"  # SIPp measures whole milliseconds


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.0f} %"


def _sustained(setup: Setup, args: argparse.Namespace) -> str:
    best = setup.best
    if best is None:
        tried = ", ".join(f"{s.rate:,}" for s in setup.long_runs)
        return f"none of {tried} held" if tried else "—"
    top = setup.ladder_best
    ceiling = top is not None and top.rate == max(args.rates) and top.rate == best.rate
    return f"{'≥ ' if ceiling else ''}{best.achieved:,.0f}"


def _ratio(a: Setup, b: Setup) -> str:
    if a.best is None or b.best is None:
        return "—"
    return f"{a.best.achieved / b.best.achieved:.2f}"


def _ladder(setup: Setup) -> str:
    return ", ".join(f"{s.rate:,} {'✓' if s.passed else '✗'}" for s in setup.steps if not s.confirm)


def _long(setup: Setup) -> str:
    runs = setup.long_runs
    return "; ".join(
        f"{s.rate:,}/s {'✓' if s.passed else '✗'} ({s.failed} of {s.calls:,} failed, "
        f"{s.retransmissions:,} retransmissions, {s.sut_drops:,} dropped datagrams)"
        for s in runs
    )


def _first_fail(setup: Setup) -> str:
    failing = [s for s in setup.steps if not s.passed and not s.confirm]
    if not failing:
        return "none"
    s = min(failing, key=lambda s: s.rate)
    return f"{s.rate:,}/s: {s.verdict().removeprefix('fail: ')}"


def _cell(step: Step | None, what: Callable[[Step], str]) -> str:
    return "—" if step is None else what(step)


def render(setups: dict[str, Setup], args: argparse.Namespace, env: dict[str, str]) -> str:
    direct, via, kam = setups["direct"], setups["sbc"], setups["kamailio"]
    order = (direct, via, kam)
    held = via.held
    target = 2000
    met = via.best is not None and via.best.achieved >= target
    at_best: list[tuple[str, Callable[[Step], str]]] = [
        ("Rate asked of SIPp", lambda s: f"{s.rate:,}"),
        ("Calls in the run (failed)", lambda s: f"{s.calls:,} ({s.failed})"),
        ("Mean call setup time, INVITE → 200", lambda s: _ms(s.setup_ms)),
        ("SIPp retransmissions", lambda s: f"{s.retransmissions:,}"),
        ("Datagrams dropped, full receive buffer: target / SIPp UAS", lambda s: (
            f"{'—' if s.sut_busy is None else f'{s.sut_drops:,}'} / {s.uas_drops:,}")),
        ("CPU busy: system under test / both SIPps", lambda s: (
            f"{_pct(s.sut_busy)} / {_pct(s.sipp_busy)}")),
    ]  # fmt: skip
    lines = [
        "## Call throughput (bench/calls.py)",
        "",
        f"- Date: {env['date']}",
        f"- CPU: {env['cpu']}; {env['pinning']}",
        f"- Versions: sbc {env['sbc']}, {env['python']}, uvloop {env['uvloop']}, "
        f"SIPp {env['sipp']}, Kamailio {env['kamailio']}",
        f"- Command: `{env['command']}`",
        "- Load: short calls over UDP on loopback, one SIPp caller (bench/scenarios/"
        "call_uac.xml, one socket) calling one SIPp callee (call_uas.xml): INVITE with SDP, "
        "100, 180, 200 with SDP 10 ms later, ACK, BYE at once, 200. Open loop: SIPp "
        "`-r RATE` starts calls at the rate whatever the target does (no `-l`); "
        f"`-recv_timeout {RECV_TIMEOUT_MS}` fails a call that waits longer for any message. "
        f"Per setup, a ladder of short runs ({args.step_seconds:g} s of calls each, at least "
        f"{args.min_calls}) at {', '.join(str(r) for r in args.rates)} calls/s, stopping "
        f"at the first failing rate, then up to {args.refine} bisection steps; then a long "
        f"run ({args.long_seconds:g} s of calls) at the best rate of the ladder, and if it "
        f"fails up to {args.long_tries - 1} more at {args.long_backoff:g} × the rate before "
        "(via the SBC each on a fresh `sbc run`: one that collapsed keeps the failed calls' "
        "state for half a minute and more, which the next run would pay for).",
        "- Direct: SIPp UAC → SIPp UAS. Via SBC: SIPp UAC → `sbc run` without backends "
        "(its embedded registrar routes the call to the callee's registered address; two "
        "dialogs per call, the B2BUA) → SIPp UAS; "
        f"`[registration.client_expires] udp = {CLIENT_EXPIRES}`, `[log] level = "
        '"warning"`, `[media] ports = "'
        f"{MEDIA_PORTS}\"`, `workers = 1` (every call's SDP is anchored: the media worker "
        "binds and releases two port pairs per call, on the SBC's CPU), `[security] allow` "
        "the load's address (a trusted load generator is not flood-banned or rate limited), "
        "everything else default. Via Kamailio: SIPp UAC → Kamailio "
        "(docker/kamailio/kamailio.cfg: usrloc lookup, record-route, stateful `t_relay`, 2 "
        f"UDP workers; `-m {KAMAILIO_SHM_MB}` MB of shared memory, as the default 64 MB runs "
        "out at about 500 calls/s) → SIPp UAS. The callee registered first as bob (from the "
        "UDP port SIPp UAS then listens on) at the SBC and at Kamailio.",
        "",
        "| | Direct | Via SBC | Via Kamailio |",
        "|---|---:|---:|---:|",
        "| **Sustained calls/s** (a long run with < 0.1 % failed calls) | "
        + " | ".join(_sustained(s, args) for s in order)
        + " |",
        f"| Ratio to direct | 1.00 | {_ratio(via, direct)} | {_ratio(kam, direct)} |",
    ]
    for title, what in at_best:
        lines.append(
            f"| {title}, in that run | " + " | ".join(_cell(s.best, what) for s in order) + " |"
        )
    lines += [
        "| Best rate of the short runs (calls/s asked) | "
        + " | ".join(_cell(s.ladder_best, lambda b: f"{b.rate:,}") for s in order)
        + " |",
        "| First failing short run | " + " | ".join(_first_fail(s) for s in order) + " |",
        "",
        "Short runs (calls/s asked; ✓ passed, ✗ failed): direct "
        f"{_ladder(direct)}; via SBC {_ladder(via)}; via Kamailio {_ladder(kam)}.",
        "",
        f"Long runs: direct {_long(direct)}; via SBC {_long(via)}; via Kamailio {_long(kam)}.",
        "",
        f"Target of issue 4 ({target:,} calls/s through the SBC): **"
        + ("met" if met else "not met")
        + "**"
        + (
            f": the SBC sustains {via.best.achieved:,.0f} calls/s on one core, "
            f"{via.best.achieved / target:.0%} of the target"
            if via.best is not None and not met
            else ""
        )
        + ".",
    ]
    if held is not None:
        grow = held.rss_held - held.rss_before
        lines += [
            "",
            f"Held calls through the SBC (a fresh `sbc run`, after 200 warm-up calls): "
            f"{held.calls:,} calls opened at {held.rate}/s and held (`-d {held.hold_ms}`) "
            f"until all were up at once ({held.current_calls:,} in progress at SIPp when the "
            f"memory was read; {held.run.ok:,} succeeded, {held.run.failed} failed).",
            "",
            "| SBC resident memory (VmRSS) | |",
            "|---|---:|",
            f"| Before (idle) | {held.rss_before / 1024:,.1f} MiB |",
            f"| With {held.calls:,} calls held | {held.rss_held / 1024:,.1f} MiB |",
            f"| After they ended (idle again) | {held.rss_after / 1024:,.1f} MiB |",
            f"| Growth per held call | {grow * 1024 / held.calls / 1000:,.1f} kB |",
            f"| SBC CPU busy while they were held, idle | {_pct(held.sbc_busy_held)} |",
        ]
    lines += [
        "",
        "How it is measured: a run passes when fewer than 0.1 % of its calls failed, every "
        "call finished, and, in a long run, SIPp started them at 95 % of the rate asked or more "
        "(calls over SIPp's own first-to-last statistics timestamps less one mean call length: "
        "the achieved rate); a short run passes only with SIP retransmissions for fewer than "
        "1 % of its calls too (in 2 s, retransmissions still rescue the calls of a target "
        "that could not keep that rate up). The "
        "sustained rate is that achieved rate in the highest passing long run: a short run "
        "flatters the SBC, which keeps each call's state for the RFC 3261 transaction "
        "timers and each ended call for 64*T1 (32 s on UDP), so it reaches its steady "
        "state only after about half a minute. The "
        "caller and callee ride out what SIP allows to be lost (a provisional response; a "
        "2xx, ACK or BYE recovered by retransmission), so a datagram dropped at a full "
        "socket buffer shows as retransmissions, and fails a call only when recovery takes "
        "longer than the receive timeout. Drops are the last column of /proc/net/udp for "
        "the target's and SIPp UAS's sockets. Call setup time is SIPp's response time 1, "
        "INVITE sent to 200 received, 10 ms of it the callee's wait between 180 and 200 (so "
        "that Kamailio's two workers do not relay them swapped). CPU busy is utime+stime "
        "from /proc (the SBC; Kamailio's whole process group; SIPp UAS) and getrusage (SIPp "
        "UAC) over the wall "
        "time of the run (100 % = one core). After a failing run the next waits until the "
        "target is idle. RSS is VmRSS from /proc/PID/status; growth per held call is (held − "
        "before) / calls.",
    ]
    if env["pinned"]:
        lines += [
            "",
            "The system under test (the SBC or Kamailio) has one core to itself; both SIPps "
            "share the other, so the direct figure is the limit of two SIPps on one core "
            "(see their CPU share), which the ratios are relative to.",
        ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------


class Bench:
    """The three setups in turn; every process it starts is stopped in ``close``."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sut_cpu, self.peer_cpu, self.pinning = choose_cpus(
            args.no_pin,
            args.sut_cpu,
            args.peer_cpu,
            target_is="the SBC or Kamailio",
            peers_are="both SIPps",
        )
        self.workdir = Path(tempfile.mkdtemp(prefix="bench-calls-"))
        self.taken: set[int] = set()
        self.started: list[Sbc | Kamailio | Uas] = []
        self.setups = {name: Setup(name) for name in ("direct", "sbc", "kamailio")}

    def uas(self, name: str) -> Uas:
        uas = Uas(self.workdir, name, free_port(taken=self.taken), self.peer_cpu, life=600)
        self.started.append(uas)
        return uas

    def sbc(self, name: str) -> tuple[Sbc, Uas]:
        """A fresh ``sbc run`` with bob registered and SIPp UAS listening as bob."""
        workdir = self.workdir / name
        workdir.mkdir()
        sbc = Sbc(
            workdir,
            self.sut_cpu,
            self.taken,
            client_expires=CLIENT_EXPIRES,
            backend_expires=BACKEND_EXPIRES,
            tables=f'\n[media]\nports = "{MEDIA_PORTS}"\nworkers = 1\n',
        )
        self.started.append(sbc)
        sbc.start()
        sbc.wait_ready()
        uas = self.uas(name)
        if register_bob(sbc.port, uas.port, CLIENT_EXPIRES) != 200:
            raise BenchError(f"bob could not register at the SBC:\n{sbc.log()[-2000:]}")
        uas.start()
        return sbc, uas

    def direct(self) -> None:
        uas = self.uas("direct")
        uas.start()
        caller = Caller(self.workdir, "direct", uas.port, uas, None, self.peer_cpu)
        pause = lambda: time.sleep(0.5)  # noqa: E731
        ladder(caller, self.setups["direct"], self.args, pause)
        long_runs(caller, self.setups["direct"], self.args, pause)
        uas.stop()

    def via_sbc(self) -> None:
        args, setup = self.args, self.setups["sbc"]
        if args.held:
            sbc, uas = self.sbc("sbc-held")
            caller = Caller(self.workdir, "held", sbc.port, uas, sbc.cpu_seconds, self.peer_cpu)
            setup.held = held_calls(caller, sbc, args)
            self.stop_sbc(sbc, uas)
        sbc, uas = self.sbc("sbc-rate")
        caller = Caller(self.workdir, "sbc", sbc.port, uas, sbc.cpu_seconds, self.peer_cpu)
        idle = lambda: settle(sbc.cpu_seconds)  # noqa: E731
        ladder(caller, setup, args, idle)
        during = py_spy(sbc, args.py_spy, self.peer_cpu) if args.py_spy else None
        running = [(sbc, uas)]

        def fresh() -> tuple[Caller, Callable[[], None]]:
            """A new ``sbc run`` (and callee) for a long run after a failed one."""
            self.stop_sbc(*running.pop())
            sbc, uas = self.sbc(f"sbc-long-{len(setup.long_runs) + 1}")
            running.append((sbc, uas))
            caller = Caller(self.workdir, "sbc", sbc.port, uas, sbc.cpu_seconds, self.peer_cpu)
            return caller, lambda: settle(sbc.cpu_seconds)

        long_runs(caller, setup, args, idle, during, fresh)
        self.stop_sbc(*running.pop())
        if setup.errors:
            print(f"--- SIPp UAC errors, first failing run via SBC ---\n{setup.errors}")
        if args.py_spy and args.py_spy.exists():
            print_hot_spots(args.py_spy)

    def stop_sbc(self, sbc: Sbc, uas: Uas) -> None:
        uas.stop()
        sbc.stop()
        log = sbc.log()
        if sbc.exit_code != 0 or "Traceback" in log:
            print(f"--- sbc run: exit code {sbc.exit_code} after SIGTERM; log ---\n{log[-3000:]}")
        elif log.strip():
            lines = log.splitlines()
            print(f"--- sbc run log: {len(lines)} lines (warnings), the last ones ---")
            print("\n".join(lines[-20:]))

    def via_kamailio(self) -> None:
        kam = Kamailio(
            "K", free_port(taken=self.taken), self.workdir / "kam", self.sut_cpu, KAMAILIO_SHM_MB
        )
        self.started.append(kam)
        kam.start()
        kam.wait_ready()
        uas = self.uas("kamailio")
        if register_bob(kam.port, uas.port, 3600) != 200:
            raise BenchError(f"bob could not register at Kamailio:\n{kam.log()}")
        uas.start()
        caller = Caller(self.workdir, "kamailio", kam.port, uas, kam.cpu_seconds, self.peer_cpu)
        setup = self.setups["kamailio"]
        idle = lambda: settle(kam.cpu_seconds)  # noqa: E731
        ladder(caller, setup, self.args, idle)
        long_runs(caller, setup, self.args, idle)
        errors = kam.errors()
        uas.stop()
        kam.stop()
        if errors:
            print(f"--- kamailio: {len(errors)} ERROR lines, the last ones ---")
            print("\n".join(errors[-5:]))
        if setup.errors:
            print(f"--- SIPp UAC errors, first failing run via Kamailio ---\n{setup.errors}")

    def close(self) -> None:
        for proc in reversed(self.started):
            proc.stop()
        if self.args.keep:
            print(f"kept {self.workdir}")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def env(self) -> dict[str, str]:
        return environment(self.pinning) | {"pinned": "yes" if self.peer_cpu is not None else ""}


def run(args: argparse.Namespace) -> tuple[dict[str, Setup], dict[str, str]]:
    for tool in ("sipp", "kamailio"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} not installed (make peers installs it)")
    bench = Bench(args)
    try:
        bench.direct()
        bench.via_sbc()
        bench.via_kamailio()
    except BaseException:
        print_sbc_logs(bench.started)
        raise
    finally:
        bench.close()
    return bench.setups, bench.env()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--rates",
        type=lambda s: [int(x) for x in s.split(",")],
        default=list(LADDER),
        help="comma-separated calls/s of the short runs (default: %(default)s)",
    )
    ap.add_argument("--step-seconds", type=float, default=2.0, help="short run length, s (2)")
    ap.add_argument("--min-calls", type=int, default=300, help="fewest calls in a short run (300)")
    ap.add_argument("--refine", type=int, default=2, help="bisection steps after a failure (2)")
    ap.add_argument("--long-seconds", type=float, default=30.0, help="long run length, s (30)")
    ap.add_argument("--long-tries", type=int, default=3, help="long runs at most (3)")
    ap.add_argument(
        "--long-backoff", type=float, default=0.75, help="rate factor after a failed long run"
    )
    ap.add_argument("--held", type=int, default=2000, help="calls held via the SBC (2000; 0: no)")
    ap.add_argument("--held-rate", type=int, default=200, help="rate they are opened at (200)")
    ap.add_argument("--sut-cpu", type=int, help="CPU for the SBC / Kamailio (first allowed)")
    ap.add_argument("--peer-cpu", type=int, help="CPU for both SIPps (default: second allowed)")
    ap.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    ap.add_argument("--py-spy", type=Path, help="profile the SBC in its first long run (raw FILE)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (SIPp logs)")
    ap.add_argument("--out", type=Path, help="rewrite the bench/calls.py section of FILE")
    args = ap.parse_args(argv)
    if min(*args.rates, args.min_calls, args.held_rate, args.long_tries) < 1 or args.held < 0:
        ap.error("rates, --min-calls, --held-rate and --long-tries must be >= 1, --held >= 0")
    if args.py_spy and args.out:
        ap.error("--py-spy slows the SBC: do not write its figures with --out")
    args.rates = sorted(set(args.rates))

    try:
        setups, env = run(args)
    except BenchError as exc:
        print(f"bench/calls.py: {exc}", file=sys.stderr)
        return 1
    publish("bench/calls.py", render(setups, args, env), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
