#!/usr/bin/env python3
"""What the state store costs: registrations/s, calls/s and the SBC's CPU with ``[state] url``
(Redis) set and unset, in one run, and the Redis commands and redis-server CPU per REGISTER
and per call.

    .venv/bin/python bench/state.py [--quick] [--out docs/performance.md]

Two setups, each measured on fresh ``sbc run`` processes (UDP only, log level warning, the
load's address on the allow list):

  memory  no ``[state]`` table: the state in memory only;
  redis   ``[state] url = "redis://127.0.0.1:PORT/0"`` to a redis-server started here
          (``--save "" --appendonly no``: no persistence, in its own temporary directory),
          with a ``key_prefix`` of its own per ``sbc run`` (none loads another's entries).
          The SBC writes every changed entry (SET with PXAT, or DEL) and PUBLISHes the shared
          events; what changed while its writer waited (a turn of the event loop, or the
          previous pipeline in flight) goes out as one pipeline, the latest value per key.

Registrations: bench/register.py's phases, imported (``measure_round``, ``warm_up``): per
round and setup a fresh ``sbc run`` with a Kamailio backend (one Kamailio per setup, started
once; docker/kamailio/kamailio.cfg), ``[registration] backend_expires = 3600``,
``[registration.client_expires] udp = 60`` (registration offload) and ``[security]
backend_register = { rate = 0 }``, as bench/register.py's "via SBC". Initial phase:
register.xml, one REGISTER per user, ``--users`` new users per round; refresh phase:
refresh.xml, ``--refreshes`` unchanged re-REGISTERs per user, which the SBC answers itself.
SIPp ``-r --reg-rate -l --limit`` (a closed loop); every call must succeed. Both setups run in
each of ``--rounds`` rounds, their order swapped from one round to the next.

Calls: bench/calls.py's calls, ladder and pass criteria, imported (``Caller``, ``Uas``,
``ladder``, ``long_runs``, ``register_bob``), metered by bench/engines.py's ``MeteredCaller``
(imported): SIPp UAC -> ``sbc run`` without backends (the embedded registrar routes to bob,
registered first from the port SIPp UAS then listens on; ``[media] ports = "10000-32000"``,
``workers = 1``) -> SIPp UAS; INVITE with SDP, 100, 180, 200 with SDP, ACK, BYE, 200; open
loop (``-r``). Per setup: a fixed-rate run (``--cpu-rate`` calls/s for ``--cpu-seconds``: CPU
and Redis commands per call at one rate for both), the ladder of short runs (``--rates``,
``--step-seconds``, ``--refine`` bisection steps), then a long run (``--long-seconds``) at the
ladder's best rate, retried lower (``--long-backoff``) on a fresh ``sbc run`` up to
``--long-tries`` times; the sustained rate is the achieved rate of the passing long run. The
setups run one after the other (memory first): an SBC cleaning up after its runs (the
transactions' 32 s timers) on the same core would disturb the other's runs.

Measured around every SIPp run (from just before SIPp starts until it exits; Redis's counts
until they stop moving, at most 3 s later: the SBC's last pipeline): the rate (SIPp's own
statistics timestamps), the SBC's CPU (utime + stime from /proc/PID/stat: ``sbc run`` for
registrations; ``sbc run`` and its media worker for calls), redis-server's CPU (all its
threads' run time from /proc/PID/task/*/schedstat, in nanoseconds: its few microseconds per
REGISTER are below /proc/PID/stat's clock tick over a short run; /proc/PID/stat without
schedstat), Redis's ``INFO commandstats`` (calls per command, this script's own INFO left out)
and ``INFO stats`` ``total_reads_processed`` (socket reads: at least one per pipeline the SBC
sends, one per 16 KB of it), before and after; other work on the machine (its busy time in
/proc/stat less that of the SBC, Kamailio, redis-server, SIPp and this script). Per REGISTER
and per call is over the run's REGISTER transactions and calls.

Checks, at the end of each redis ``sbc run`` (once it is idle, and its calls ended: up to
40 s): the keys under its prefix (SCAN): as many ``reg:`` keys as users registered through
it (its round's users and the warm-up user) and none of another kind in a registration
round; one ``aor:`` key (bob) and no ``reg:`` key in a call setup, and no ``call:`` key left,
then and after the SBC stopped; every key with an expiry (PTTL); ``sbc_state_up`` 1,
``sbc_state_errors`` and ``sbc_state_pending`` 0; for the memory setups, Redis got no
command at all. For every ``sbc run``: its exit code after SIGTERM and the ERROR and WARNING
lines of its log, by kind. A failed check does not stop the run: it is reported (and the
script exits with 1).

Target: the store costs at most 15 % of each rate (redis / memory >= 0.85).

With two or more CPUs the SBC is pinned to one CPU and SIPp, Kamailio, redis-server and this
script to the other (``taskset -c``). Every process started here (redis-server, Kamailio,
the SBCs, SIPp) is stopped by its PID at the end, also on error; every SIPp run is bounded
(``-m``, ``-timeout``; calls also ``-recv_timeout``); everything stays on 127.0.0.1.
``--quick`` is a smoke run of about a minute; ``--out`` rewrites the section between the
bench/state.py markers of the file.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import calls
import redis
import register
from calls import (
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
from engines import LINGER, MeteredCaller, Usage, _kind, add_call_options, call_defaults
from harness import (
    DOMAIN,
    HOST,
    BenchError,
    Kamailio,
    Sbc,
    cpu_seconds,
    environment,
    free_port,
    pinned,
    print_sbc_logs,
    wait_ready,
)
from report import (
    choose_cpus,
    compiled_line,
    dist_version,
    machine_busy_seconds,
    publish,
    stop_process,
)

SETUPS = ("memory", "redis")
TARGET = 0.85  # the store may cost at most 15 % of a rate
STORE_SETTLE = 3.0  # seconds Redis's counts may take to stop moving after a SIPp run
OWN_COMMANDS = ("info",)  # what this script sends to Redis inside a measured window
NOTED = ("ERROR", "WARNING", "CRITICAL", "Traceback")  # the SBC log lines counted by kind


# ---------------------------------------------------------------------------------------
# redis-server: the process, its counters, the keys under a prefix
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Counts:
    """Redis's counters (or their change over a run): calls per command (``INFO
    commandstats``), socket reads (``INFO stats`` ``total_reads_processed``), and
    redis-server's CPU seconds."""

    commands: dict[str, int]
    reads: int
    cpu: float

    def __sub__(self, before: Counts) -> Counts:
        """The change since ``before``, without this script's own INFO commands (each also
        one socket read)."""
        own = sum(self.commands.get(c, 0) - before.commands.get(c, 0) for c in OWN_COMMANDS)
        changed = {
            name: n - before.commands.get(name, 0)
            for name, n in self.commands.items()
            if name not in OWN_COMMANDS and n != before.commands.get(name, 0)
        }
        return Counts(changed, self.reads - before.reads - own, self.cpu - before.cpu)

    def __add__(self, other: Counts) -> Counts:
        names = self.commands.keys() | other.commands.keys()
        merged = {n: self.commands.get(n, 0) + other.commands.get(n, 0) for n in names}
        return Counts(merged, self.reads + other.reads, self.cpu + other.cpu)

    @property
    def total(self) -> int:
        return sum(self.commands.values())

    def work(self) -> tuple[tuple[str, int], ...]:
        """What the SBC's commands changed (to see that they stopped)."""
        return tuple(sorted((k, v) for k, v in self.commands.items() if k not in OWN_COMMANDS))


NO_COUNTS = Counts({}, 0, 0.0)


@dataclass(frozen=True, slots=True)
class Keys:
    """The keys matching a pattern: how many, how many without an expiry, and the least and
    most time left (seconds) of the others."""

    count: int
    no_expiry: int
    left_min: float | None
    left_max: float | None

    def describe(self) -> str:
        text = f"{self.count:,}"
        if self.left_min is not None and self.left_max is not None:
            text += f" (expiring in {self.left_min:,.0f}–{self.left_max:,.0f} s"
            text += f", {self.no_expiry} without an expiry)" if self.no_expiry else ")"
        elif self.no_expiry:
            text += f" ({self.no_expiry} without an expiry)"
        return text


class RedisServer:
    """redis-server on 127.0.0.1, no persistence, in the foreground in its own directory,
    pinned to ``cpu``, stopped by its PID; a client of it for the counters and the keys."""

    def __init__(self, workdir: Path, port: int, cpu: int | None) -> None:
        self.dir = workdir / "redis"
        self.dir.mkdir()
        self.port, self.cpu = port, cpu
        self.log_path = self.dir / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.client = redis.Redis(
            host=HOST, port=port, socket_timeout=5.0, socket_connect_timeout=5.0
        )
        self.version = "?"

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self) -> None:
        cmd = [
            shutil.which("redis-server") or "redis-server",
            "--port", str(self.port),
            "--bind", HOST,
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", str(self.dir),
        ]  # fmt: skip
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                pinned(cmd, self.cpu), cwd=self.dir, stdin=subprocess.DEVNULL, stdout=log,
                stderr=log,
            )  # fmt: skip
        wait_ready(self.proc, "redis-server", self._answers, self.log)
        self.version = str(self.client.info("server").get("redis_version", "?"))

    def _answers(self) -> bool:
        try:
            return bool(self.client.ping())
        except (redis.RedisError, OSError):
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def cpu_seconds(self) -> float:
        """Its CPU time, all threads: the run time /proc/PID/task/*/schedstat gives in
        nanoseconds (a REGISTER costs it microseconds, less than /proc/PID/stat's clock tick
        over a short run); /proc/PID/stat where there is no schedstat."""
        if self.proc is None:
            return 0.0
        ns, found = 0, False
        for task in Path(f"/proc/{self.proc.pid}/task").glob("*/schedstat"):
            try:
                ns += int(task.read_text().split()[0])
                found = True
            except (OSError, ValueError, IndexError):
                continue  # a thread that just ended
        return ns / 1e9 if found else cpu_seconds(self.proc.pid)

    def counts(self) -> Counts:
        info: dict[str, Any] = self.client.info("commandstats", "stats")
        commands = {
            k.removeprefix("cmdstat_"): int(v["calls"])
            for k, v in info.items()
            if k.startswith("cmdstat_")
        }
        return Counts(commands, int(info["total_reads_processed"]), self.cpu_seconds())

    def settled(self) -> Counts:
        """The counters once the SBC's commands stopped coming (two readings 0.1 s apart
        alike), STORE_SETTLE seconds at most: its last pipeline is in."""
        last = self.counts()
        deadline = time.monotonic() + STORE_SETTLE
        while time.monotonic() < deadline:
            time.sleep(0.1)
            now = self.counts()
            if now.work() == last.work():
                return now
            last = now
        return last

    def keys(self, pattern: str) -> Keys:
        names = list(self.client.scan_iter(match=pattern, count=1000))
        left: list[int] = []
        if names:
            pipe = self.client.pipeline(transaction=False)
            for name in names:
                pipe.pttl(name)
            left = [int(ms) for ms in pipe.execute()]
        live = [ms / 1000 for ms in left if ms >= 0]
        return Keys(
            len(names),
            sum(1 for ms in left if ms == -1),
            min(live) if live else None,
            max(live) if live else None,
        )

    def stop(self) -> None:
        self.client.close()
        stop_process(self.proc)


def own_cpu_seconds() -> float:
    """CPU time of this script (it polls Redis and /proc on the peers' core)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def state_table(url: str, prefix: str) -> str:
    return f'\n[state]\nurl = "{url}"\nkey_prefix = "{prefix}"\n'


def metric(sbc: Sbc, name: str) -> float:
    """One family of the SBC's /metrics, summed over its label sets."""
    return sum(v for (k, _), v in sbc.metrics().items() if k == name)


def state_metrics(sbc: Sbc) -> dict[str, float]:
    values = sbc.metrics()
    return {
        "up": values.get(("sbc_state_up", ""), -1.0),
        "errors": values.get(("sbc_state_errors_total", ""), -1.0),
        "pending": values.get(("sbc_state_pending", ""), -1.0),
        "writes": values.get(("sbc_state_writes_total", ""), -1.0),
        "sent": values.get(("sbc_state_events_total", 'direction="sent"'), -1.0),
        "received": values.get(("sbc_state_events_total", 'direction="received"'), -1.0),
    }


def wait_store_up(sbc: Sbc) -> None:
    """Until its /metrics says the store answers (sbc_state_up 1), 5 s at most."""
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        if metric(sbc, "sbc_state_up") == 1.0:
            return
        time.sleep(0.1)
    raise BenchError(f"sbc run: sbc_state_up is not 1 after its start:\n{sbc.log()[-2000:]}")


# ---------------------------------------------------------------------------------------
# Results and checks
# ---------------------------------------------------------------------------------------


@dataclass
class Checks:
    """What was checked at each ``sbc run``'s end, and what did not hold."""

    lines: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    log_lines: collections.Counter[str] = field(default_factory=collections.Counter)
    exit_codes: list[int | None] = field(default_factory=list)

    def expect(self, what: str, ok: bool) -> None:
        (self.lines if ok else self.failed).append(what)
        print(f"  check {'ok' if ok else 'FAILED'}: {what}", flush=True)

    def sbc_stopped(self, sbc: Sbc) -> None:
        self.exit_codes.append(sbc.exit_code)
        for line in sbc.log().splitlines():
            if any(w in line for w in NOTED):
                self.log_lines[_kind(line)] += 1
        if sbc.killed:
            self.failed.append(f"killed after SIGTERM: {', '.join(sbc.killed)}")
        if sbc.exit_code != 0:
            self.failed.append(f"sbc run exit code {sbc.exit_code} after SIGTERM")


@dataclass
class RegResult:
    """One setup's registration rounds (bench/register.py's) and Redis's counters per SIPp
    run (by its name), with the other work on the machine during it (share of a core)."""

    name: str
    rounds: list[register.Round] = field(default_factory=list)
    store: dict[str, Counts] = field(default_factory=dict)
    other: dict[str, float] = field(default_factory=dict)
    peers: dict[str, float] = field(default_factory=dict)  # Kamailio + redis + SIPp CPU share
    checks: Checks = field(default_factory=Checks)

    def phases(self, phase: str) -> list[register.Phase]:
        return [getattr(r, phase) for r in self.rounds]

    def runs(self, phase: str) -> list[str]:
        return [f"{self.name}-{n}-{phase}" for n in range(1, len(self.rounds) + 1)]


@dataclass
class CallResult:
    """One setup's call runs (bench/calls.py's), their CPU (bench/engines.py's Usage, with
    redis-server in rtpengine's place) and Redis's counters per run."""

    name: str
    setup: Setup
    fixed: Step | None = None
    usage: dict[Path, Usage] = field(default_factory=dict)
    store: dict[Path, Counts] = field(default_factory=dict)
    checks: Checks = field(default_factory=Checks)

    def of(self, step: Step | None) -> tuple[Usage | None, Counts | None]:
        if step is None or step.run_dir is None:
            return None, None
        return self.usage.get(step.run_dir), self.store.get(step.run_dir)


# ---------------------------------------------------------------------------------------
# Metering: around bench/register.py's SIPp runs, and bench/engines.py's caller
# ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def metered_register_runs(
    store: RedisServer, sbc: Sbc, kam: Kamailio, result: RegResult
) -> Iterator[None]:
    """While inside: every SIPp run of bench/register.py (its module's ``sipp``, which
    ``measure_round`` calls once per phase) with Redis's counters, the CPU of the peers
    and the machine's busy time taken around it."""
    original = register.sipp

    def sipp(workdir: Path, name: str, **kwargs: Any) -> register.SippRun:
        before = store.counts()
        sbc0, kam0, self0 = sbc.cpu_split().total, kam.cpu_seconds(), own_cpu_seconds()
        busy0, t0 = machine_busy_seconds(), time.perf_counter()
        run = original(workdir, name, **kwargs)
        peers = kam.cpu_seconds() - kam0 + store.cpu_seconds() - before.cpu + run.sipp_cpu
        delta = store.settled() - before
        busy, wall = machine_busy_seconds() - busy0, time.perf_counter() - t0
        ours = sbc.cpu_split().total - sbc0 + kam.cpu_seconds() - kam0 + delta.cpu
        ours += run.sipp_cpu + own_cpu_seconds() - self0
        result.store[name] = delta
        result.other[name] = max(0.0, busy - ours) / wall
        result.peers[name] = peers / max(run.wall, 1e-9)
        print(
            f"  {name}: Redis {_per_op(delta, run.registers)} per REGISTER, redis-server "
            f"{1e6 * delta.cpu / max(1, run.registers):.1f} µs per REGISTER; other work "
            f"{100 * result.other[name]:.0f} % of a core",
            flush=True,
        )
        return run

    register.sipp = sipp
    try:
        yield
    finally:
        register.sipp = original


class StoreCaller(MeteredCaller):
    """bench/engines.py's metered caller (the SBC's signalling and media worker CPU, other
    work on the machine, a disturbed failed short run run once more) with redis-server in
    rtpengine's place: its CPU counts with the SBC's as the system under test (the idle
    checks wait for both). Also Redis's counters around each run; each SIPp UAC started is
    added to ``sipps`` (stopped by its PID at the end if still running, on an error)."""

    def __init__(
        self,
        workdir: Path,
        name: str,
        sbc: Sbc,
        uas: Uas,
        store: RedisServer,
        cpu: int | None,
        sipps: list[subprocess.Popen[bytes]],
    ) -> None:
        self.store, self.sipps = store, sipps
        super().__init__(workdir, name, sbc, uas, None, cpu)
        self.counts: dict[Path, Counts] = {}
        self._counts0: dict[Path, Counts] = {}

    def rtpengine_seconds(self) -> float:
        return self.store.cpu_seconds()

    def start(self, rate: int, calls: int, hold_ms: int = 0) -> Running:
        before = self.store.counts()
        running = super().start(rate, calls, hold_ms)
        self.sipps.append(running.proc)
        self._counts0[running.run_dir] = before
        return running

    def finish(self, r: Running) -> Step:
        step = super().finish(r)
        self.counts[r.run_dir] = self.store.settled() - self._counts0.pop(r.run_dir)
        return step


# ---------------------------------------------------------------------------------------
# The bench: redis-server, the Kamailios, the SBCs
# ---------------------------------------------------------------------------------------


class Bench:
    """Both parts, both setups; every process it starts is stopped in ``close``."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sut_cpu, self.peer_cpu, self.pinning = choose_cpus(
            args.no_pin,
            None,
            None,
            target_is="the SBC (with its media worker)",
            peers_are="SIPp, Kamailio, redis-server",
        )
        self.workdir = Path(tempfile.mkdtemp(prefix="bench-state-"))  # short: Kamailio's ctl
        self.taken: set[int] = set()
        self.started: list[RedisServer | Kamailio | Sbc | Uas] = []
        self.sipps: list[subprocess.Popen[bytes]] = []  # SIPp UACs of the call runs
        self.store = RedisServer(self.workdir, free_port(taken=self.taken), self.peer_cpu)
        self.registrations = {name: RegResult(name) for name in SETUPS}
        self.calls = {name: CallResult(name, Setup(name)) for name in SETUPS}

    def start_store(self) -> None:
        self.started.append(self.store)
        self.store.start()

    def new_sbc(self, setup: str, label: str, **options: Any) -> tuple[Sbc, str]:
        """A fresh ``sbc run`` (its state in Redis under a prefix of its own in the redis
        setup), started and answering; (it, its prefix)."""
        prefix = f"bench:{label}:"
        tables = options.pop("tables", "")
        if setup == "redis":
            tables += state_table(self.store.url, prefix)
        workdir = self.workdir / label
        workdir.mkdir()
        sbc = Sbc(workdir, self.sut_cpu, self.taken, tables=tables, **options)
        self.started.append(sbc)
        sbc.start()
        sbc.wait_ready()
        if setup == "redis":
            wait_store_up(sbc)
        return sbc, prefix

    def check_store(self, checks: Checks, sbc: Sbc, setup: str) -> None:
        if setup != "redis":
            return
        m = state_metrics(sbc)
        checks.expect(
            f"{sbc.config.parent.name}: sbc_state_up {m['up']:.0f}, errors {m['errors']:.0f}, "
            f"pending {m['pending']:.0f} (entries written {m['writes']:,.0f}, events sent "
            f"{m['sent']:,.0f}, received {m['received']:,.0f})",
            m["up"] == 1 and m["errors"] == 0 and m["pending"] == 0,
        )

    def stop_sbc(self, sbc: Sbc, checks: Checks) -> None:
        sbc.stop()
        checks.sbc_stopped(sbc)
        noted = [line for line in sbc.log().splitlines() if any(w in line for w in NOTED)]
        if noted:
            print(f"--- sbc run {sbc.config.parent.name}: {len(noted)} error/warning lines ---")
            print("\n".join(noted[-10:]))

    # -- registrations -----------------------------------------------------------------------

    def registration_part(self) -> None:
        args = self.args
        kams = {}
        for name in SETUPS:
            port = free_port(taken=self.taken)
            kam = Kamailio(name[0].upper(), port, self.workdir / f"k{name[0]}", self.peer_cpu)
            kams[name] = kam
        for kam in kams.values():
            self.started.append(kam)
            kam.start()
        for kam in kams.values():
            kam.wait_ready()
        for round_no in range(1, args.rounds + 1):
            order = SETUPS if round_no % 2 else SETUPS[::-1]
            for name in order:
                self.registration_round(name, round_no, kams[name])
        for kam in kams.values():
            errors = kam.errors()
            if errors:
                print(f"--- kamailio {kam.name}: {len(errors)} ERROR lines, the last ---")
                print("\n".join(errors[-5:]))

    def registration_round(self, name: str, round_no: int, kam: Kamailio) -> None:
        args, result = self.args, self.registrations[name]
        sbc, prefix = self.new_sbc(
            name,
            f"reg-{name}-{round_no}",
            client_expires=register.CLIENT_EXPIRES,
            backend_expires=register.BACKEND_EXPIRES,
            backend=kam.port,
            security="backend_register = { rate = 0 }\n",
        )
        register.warm_up(sbc.port, "the SBC")
        users_csv = self.workdir / f"users-{name}-{round_no}.csv"
        users_csv.write_text(
            "SEQUENTIAL\n"
            + "".join(f"{name[0]}{round_no}u{i:06d};{DOMAIN}\n" for i in range(args.users))
        )
        with metered_register_runs(self.store, sbc, kam, result):
            result.rounds.append(
                register.measure_round(
                    name,
                    self.workdir,
                    round_no,
                    port=sbc.port,
                    backend=kam,
                    sbc=sbc,
                    users_csv=users_csv,
                    args=args,
                    cpu=self.peer_cpu,
                )
            )
        checks = result.checks
        label = f"reg-{name}-{round_no}"
        if name == "redis":
            settle(sbc.cpu_seconds)
            regs, others = self.store.keys(f"{prefix}reg:*"), self.store.keys(f"{prefix}*")
            expected = args.users + 1  # and the warm-up user
            checks.expect(
                f"{label}: {regs.describe()} reg: keys for {expected:,} users registered "
                f"(the warm-up user included), {others.count - regs.count - 1} other keys "
                "(the secret aside)",
                regs.count == expected and regs.no_expiry == 0 and others.count == regs.count + 1,
            )
        else:
            runs = (f"{name}-{round_no}-initial", f"{name}-{round_no}-refresh")
            delta = sum((result.store[run] for run in runs), NO_COUNTS)
            checks.expect(
                f"{label}: Redis received {delta.total} commands during its SIPp runs",
                delta.total == 0,
            )
        self.check_store(checks, sbc, name)
        self.stop_sbc(sbc, checks)

    # -- calls -------------------------------------------------------------------------------

    def call_part(self, name: str) -> None:
        args, result = self.args, self.calls[name]
        setup = result.setup

        def start(n: int) -> tuple[StoreCaller, str]:
            sbc, prefix = self.new_sbc(
                name,
                f"calls-{name}-{n}",
                client_expires=calls.CLIENT_EXPIRES,
                backend_expires=calls.BACKEND_EXPIRES,
                tables=f'\n[media]\nports = "{MEDIA_PORTS}"\nworkers = 1\n',
            )
            uas = Uas(self.workdir, f"{name}-{n}", free_port(taken=self.taken), self.peer_cpu, 900)
            self.started.append(uas)
            if register_bob(sbc.port, uas.port, calls.CLIENT_EXPIRES) != 200:
                raise BenchError(f"bob could not register at the SBC:\n{sbc.log()[-2000:]}")
            uas.start()
            caller = StoreCaller(
                self.workdir, f"{name}-{n}", sbc, uas, self.store, self.peer_cpu, self.sipps
            )
            probe = caller.step(10, 10)
            if not probe.passed:
                raise BenchError(
                    f"{name}: the first calls failed ({probe.verdict()}):\n{sbc.log()[-2000:]}"
                )
            caller.idle()
            return caller, prefix

        caller, prefix = start(1)
        running = [(caller, prefix)]
        result.fixed = caller.step(args.cpu_rate, int(args.cpu_rate * args.cpu_seconds))
        self.print_call_run(name, result.fixed, caller)
        caller.idle()
        ladder(caller, setup, args, caller.idle)

        def fresh() -> tuple[Caller, Callable[[], None]]:
            """A new SBC for a long run after a failed one."""
            self.stop_call_sbc(name, *running.pop())
            new = start(len(setup.long_runs) + 1)
            running.append(new)
            return new[0], new[0].idle

        long_runs(caller, setup, args, caller.idle, None, fresh)
        for step in setup.long_runs[-1:]:
            self.print_call_run(name, step, running[-1][0])
        self.stop_call_sbc(name, *running.pop())
        if setup.errors:
            print(f"--- SIPp UAC errors, first failing run ({name}) ---\n{setup.errors}")

    def print_call_run(self, name: str, step: Step, caller: StoreCaller) -> None:
        run = step.run_dir
        usage = caller.usage.get(run) if run else None
        counts = caller.counts.get(run) if run else None
        if usage is None or counts is None:
            return
        n = max(1, step.calls)
        print(
            f"  {name} {step.rate}/s x {step.calls}: SBC CPU per call "
            f"{1000 * usage.sbc.total / n:.3f} ms (signalling "
            f"{1000 * usage.sbc.signalling / n:.3f}); Redis {_per_op(counts, n)} "
            f"per call, redis-server {1e6 * counts.cpu / n:.1f} µs per call; other work "
            f"{100 * usage.other_share:.0f} % of a core",
            flush=True,
        )

    def stop_call_sbc(self, name: str, caller: StoreCaller, prefix: str) -> None:
        """Once it is idle and its calls ended (LINGER at most): the checks, then it stops."""
        result, sbc, checks = self.calls[name], caller.sbc, self.calls[name].checks
        result.usage.update(caller.usage)
        result.store.update(caller.counts)
        settle(caller.sut_seconds)
        active = metric(sbc, "sbc_calls_active")
        t0 = time.monotonic()
        while active and time.monotonic() - t0 < LINGER:
            time.sleep(1.0)
            active = metric(sbc, "sbc_calls_active")
        label = sbc.config.parent.name
        checks.expect(f"{label}: {active:.0f} calls in progress once idle", active == 0)
        if name == "redis":
            aors, left = self.store.keys(f"{prefix}aor:*"), self.store.keys(f"{prefix}call:*")
            regs = self.store.keys(f"{prefix}reg:*")
            checks.expect(
                f"{label}: aor: keys {aors.describe()} (bob registered), reg: keys "
                f"{regs.count}, call: keys left after the calls ended {left.count}",
                aors.count == 1 and aors.no_expiry == 0 and regs.count == 0 and left.count == 0,
            )
            self.check_store(checks, sbc, name)
        else:
            delta = sum(caller.counts.values(), NO_COUNTS)
            checks.expect(
                f"{label}: Redis received {delta.total} commands during its SIPp runs",
                delta.total == 0,
            )
        caller.uas.stop()
        self.stop_sbc(sbc, checks)
        if name == "redis":
            left = self.store.keys(f"{prefix}call:*")
            checks.expect(f"{label}: call: keys after it stopped {left.count}", left.count == 0)

    def close(self) -> None:
        for sipp in self.sipps:
            stop_process(sipp)
        for proc in reversed(self.started):
            proc.stop()
        if self.args.keep:
            print(f"kept {self.workdir}")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def env(self) -> dict[str, str]:
        compiled = compiled_line()
        return environment(self.pinning) | {
            "redis": self.store.version,
            "redis_py": dist_version("redis"),
            "compiled": compiled,
            "pinned": "yes" if self.peer_cpu is not None else "",
        }


def run(
    args: argparse.Namespace,
) -> tuple[dict[str, RegResult], dict[str, CallResult], dict[str, str]]:
    needed = ["sipp", "redis-server"]
    if "registrations" in args.parts:
        needed += ["kamailio", "kamcmd"]
    for tool in needed:
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} not installed (make peers; apt-get install redis-server)")
    bench = Bench(args)
    try:
        bench.start_store()
        if "registrations" in args.parts:
            bench.registration_part()
        if "calls" in args.parts:
            for name in SETUPS:
                bench.call_part(name)
    except BaseException:
        print_sbc_logs(bench.started)
        print(f"--- redis-server log ---\n{bench.store.log()}", file=sys.stderr)
        raise
    finally:
        bench.close()
    return bench.registrations, bench.calls, bench.env()


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def _per_op(counts: Counts | None, ops: int) -> str:
    """Redis commands per operation, by command: ``1.00 SET + 0.02 PUBLISH``."""
    if counts is None:
        return "—"
    if not counts.commands:
        return "0"
    n = max(1, ops)
    return " + ".join(
        f"{v / n:.2f} {k.upper()}"
        for k, v in sorted(counts.commands.items(), key=lambda kv: (-kv[1], kv[0]))
    )


def _ratio(a: float | None, b: float | None) -> str:
    return "—" if a is None or b is None or b <= 0 else f"{a / b:.2f}"


def _us(seconds: float | None) -> str:
    return "—" if seconds is None else f"{1e6 * seconds:,.0f} µs"


def _ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{1000 * seconds:.2f} ms"


def _row(title: str, values: list[str]) -> str:
    return f"| {title} | " + " | ".join(values) + " |"


@dataclass(frozen=True, slots=True)
class RegFigures:
    """One registration phase of one setup, over its rounds."""

    rates: list[float]
    registers: int
    sbc_cpu: float
    counts: Counts
    retransmissions: int
    other: float  # the largest share of a core other work used in one of its runs
    peers: float  # the largest share of the peers' core SIPp, Kamailio and redis-server used

    @property
    def rate(self) -> float | None:
        return statistics.median(self.rates) if self.rates else None

    def rate_cell(self) -> str:
        if not self.rates:
            return "—"
        spread = f" ({min(self.rates):,.0f}–{max(self.rates):,.0f})" if len(self.rates) > 1 else ""
        return f"{statistics.median(self.rates):,.0f}{spread}"

    def per(self, seconds: float) -> float | None:
        return seconds / self.registers if self.registers else None


def reg_figures(result: RegResult, phase: str) -> RegFigures:
    phases = result.phases(phase)
    runs = result.runs(phase)
    return RegFigures(
        rates=[p.run.rate for p in phases],
        registers=sum(p.run.registers for p in phases),
        sbc_cpu=sum(p.sbc_cpu or 0.0 for p in phases),
        counts=sum((result.store.get(r, NO_COUNTS) for r in runs), NO_COUNTS),
        retransmissions=sum(p.run.retransmissions for p in phases),
        other=max((result.other.get(r, 0.0) for r in runs), default=0.0),
        peers=max((result.peers.get(r, 0.0) for r in runs), default=0.0),
    )


@dataclass(frozen=True, slots=True)
class CallFigures:
    """One call run of one setup (the fixed-rate run, or the sustained long run)."""

    step: Step | None
    usage: Usage | None
    counts: Counts | None

    @property
    def rate(self) -> float | None:
        return None if self.step is None else self.step.achieved

    def per_call(self, seconds: float | None) -> float | None:
        if self.step is None or seconds is None:
            return None
        return seconds / max(1, self.step.calls)

    @property
    def sbc(self) -> float | None:
        return None if self.usage is None else self.per_call(self.usage.sbc.total)

    @property
    def signalling(self) -> float | None:
        return None if self.usage is None else self.per_call(self.usage.sbc.signalling)

    @property
    def redis_cpu(self) -> float | None:
        return None if self.counts is None else self.per_call(self.counts.cpu)

    def commands(self) -> str:
        return "—" if self.step is None else _per_op(self.counts, self.step.calls)

    def reads(self) -> str:
        if self.step is None or self.counts is None:
            return "—"
        return f"{self.counts.reads / max(1, self.step.calls):.2f}"

    def run_cell(self) -> str:
        s = self.step
        if s is None:
            return "—"
        other = "" if self.usage is None else f", other work {100 * self.usage.other_share:.0f} %"
        return (
            f"{s.rate:,}/s × {s.calls:,}: {s.failed} failed, {s.retransmissions:,} retrans.{other}"
        )


def call_figures(result: CallResult, step: Step | None) -> CallFigures:
    usage, counts = result.of(step)
    return CallFigures(step, usage, counts)


def _per_command(counts: Counts | None) -> str:
    if counts is None or not counts.total:
        return "—"
    return _us(counts.cpu / counts.total)


def render(
    regs: dict[str, RegResult],
    calls_: dict[str, CallResult],
    args: argparse.Namespace,
    env: dict[str, str],
) -> str:
    with_regs = "registrations" in args.parts
    with_calls = "calls" in args.parts
    quick = " **A --quick smoke run: short runs, few users; not for comparison.**"
    lines = [
        "## State store: memory vs Redis (bench/state.py)",
        "",
        f"- Date: {env['date']}",
        f"- CPU: {env['cpu']}; {env['pinning']}",
        f"- Versions: sbc {env['sbc']}, {env['compiled']}, {env['python']}, uvloop "
        f"{env['uvloop']}, SIPp {env['sipp']}, Kamailio {env['kamailio']}, Redis "
        f"{env['redis']} (redis-py {env['redis_py']})",
        f"- Command: `{env['command']}`",
        "- Setups, each on fresh `sbc run` processes: memory (no `[state]`) and redis "
        '(`[state] url = "redis://127.0.0.1:PORT/0"` to a redis-server started by the '
        'bench with `--save "" --appendonly no`, a `key_prefix` of its own per `sbc run`).'
        + (quick if args.quick else ""),
    ]
    if with_regs:
        lines.append(
            f"- Registrations: bench/register.py's phases (imported), {args.rounds} "
            f"round{'s' if args.rounds > 1 else ''} of {args.users:,} new users per setup, "
            "a fresh `sbc run` per round and setup (their order swapped each round) with a "
            f"Kamailio backend; `[registration] backend_expires = {register.BACKEND_EXPIRES}`, "
            f"`[registration.client_expires] udp = {register.CLIENT_EXPIRES}`, "
            "`backend_register = { rate = 0 }`. Initial: one REGISTER per user "
            f"(register.xml); refresh: {args.refreshes} unchanged re-REGISTERs per user "
            "(refresh.xml), answered by the SBC. SIPp "
            f"`-r {args.rate} -l {args.limit}`, every call must succeed."
        )
    if with_calls:
        lines.append(
            "- Calls: bench/calls.py's calls, ladder and pass criteria (imported): SIPp UAC → "
            "`sbc run` (embedded registrar, bob registered) → SIPp UAS; INVITE with SDP, 100, "
            f"180, 200, ACK, BYE, 200; open loop, `-recv_timeout {RECV_TIMEOUT_MS}`; `[media] "
            f'ports = "{MEDIA_PORTS}"`, `workers = 1`. Per setup: {args.cpu_rate:,} calls/s '
            f"for {args.cpu_seconds:g} s (CPU and Redis commands per call at one rate), short "
            f"runs ({args.step_seconds:g} s, at least {args.min_calls} calls) at "
            f"{', '.join(str(r) for r in args.rates)} calls/s up to the first failure, "
            f"{args.refine} bisection steps, a long run ({args.long_seconds:g} s) at the best, "
            f"up to {args.long_tries} ({args.long_backoff:g} × lower each, on a fresh SBC). "
            "The memory setup first, then the redis setup."
        )
    lines += ["", "| | memory | redis | redis ÷ memory |", "|---|---:|---:|---:|"]
    rates: dict[str, tuple[float | None, float | None]] = {}
    if with_regs:
        fig = {p: {s: reg_figures(regs[s], p) for s in SETUPS} for p in ("initial", "refresh")}
        for phase, title in (("initial", "initial REGISTERs"), ("refresh", "re-REGISTERs")):
            m, r = fig[phase]["memory"], fig[phase]["redis"]
            n = len(m.rates)
            rates[title] = (m.rate, r.rate)
            lines.append(
                _row(
                    f"**{title[0].upper()}{title[1:]}/s**, median (range) of {n}",
                    [m.rate_cell(), r.rate_cell(), _ratio(r.rate, m.rate)],
                )
            )
    if with_calls:
        best = {s: call_figures(calls_[s], calls_[s].setup.best) for s in SETUPS}
        fixed = {s: call_figures(calls_[s], calls_[s].fixed) for s in SETUPS}
        rates["calls"] = (best["memory"].rate, best["redis"].rate)
        lines.append(
            _row(
                "**Sustained calls/s** (long run, < 0.1 % failed)",
                [calls._sustained(calls_[s].setup, args) for s in SETUPS]
                + [_ratio(best["redis"].rate, best["memory"].rate)],
            )
        )
        tops = [calls_[s].setup.ladder_best for s in SETUPS]
        asked = [None if b is None else float(b.rate) for b in tops]
        lines.append(
            _row(
                "Best short run (calls/s asked)",
                [f"{b.rate:,}" if b else "—" for b in tops] + [_ratio(asked[1], asked[0])],
            )
        )
    if with_regs:
        for phase, title in (("initial", "initial REGISTER"), ("refresh", "re-REGISTER")):
            m, r = fig[phase]["memory"], fig[phase]["redis"]
            cpu_m, cpu_r = m.per(m.sbc_cpu), r.per(r.sbc_cpu)
            lines += [
                _row(
                    f"SBC CPU per {title} (`sbc run`)",
                    [_us(cpu_m), _us(cpu_r), _ratio(cpu_r, cpu_m)],
                ),
                _row(
                    f"Redis commands per {title}",
                    [_per_op(m.counts, m.registers), _per_op(r.counts, r.registers), ""],
                ),
                _row(
                    f"Redis socket reads per {title} (≥ 1 per pipeline)",
                    [f"{x.counts.reads / max(1, x.registers):.3f}" for x in (m, r)] + [""],
                ),
                _row(
                    f"redis-server CPU per {title} / per command",
                    [f"{_us(x.per(x.counts.cpu))} / {_per_command(x.counts)}" for x in (m, r)]
                    + [""],
                ),
                _row(
                    f"{title[0].upper()}{title[1:]}s: SIPp retransmissions; peers' core busy "
                    "(SIPp + Kamailio + redis-server), most of a run; other work, most",
                    [
                        f"{x.retransmissions}; {100 * x.peers:.0f} %; {100 * x.other:.0f} %"
                        for x in (m, r)
                    ]
                    + [""],
                ),
            ]
    if with_calls:
        for title, figs in ((f"at {args.cpu_rate:,} calls/s", fixed), ("sustained", best)):
            cm, cr = figs["memory"], figs["redis"]
            lines += [
                _row(
                    f"SBC CPU per call, {title} (signalling + media worker)",
                    [_ms(cm.sbc), _ms(cr.sbc), _ratio(cr.sbc, cm.sbc)],
                ),
                _row(
                    f"SBC signalling CPU per call, {title}",
                    [_ms(cm.signalling), _ms(cr.signalling), _ratio(cr.signalling, cm.signalling)],
                ),
                _row(f"Redis commands per call, {title}", [cm.commands(), cr.commands(), ""]),
                _row(
                    f"Redis socket reads per call (≥ 1 per pipeline), {title}",
                    [cm.reads(), cr.reads(), ""],
                ),
                _row(
                    f"redis-server CPU per call / per command, {title}",
                    [f"{_us(x.redis_cpu)} / {_per_command(x.counts)}" for x in (cm, cr)] + [""],
                ),
                _row(f"The run, {title}", [cm.run_cell(), cr.run_cell(), ""]),
            ]
    verdicts = [
        (name, r / m) for name, (m, r) in rates.items() if m is not None and r is not None and m > 0
    ]
    missed = [name for name, ratio in verdicts if ratio < TARGET]
    lines += [
        "",
        "Target (the store costs at most 15 % of a rate: redis ÷ memory ≥ "
        f"{TARGET:.2f}): "
        + (
            ", ".join(f"{name} {ratio:.2f}" for name, ratio in verdicts)
            + f": **{'met' if not missed else 'not met'}**"
            + (f" ({', '.join(missed)})" if missed else "")
            if verdicts
            else "no rates to compare"
        )
        + ".",
    ]
    for paragraph in summary(regs, calls_, args):
        lines += ["", paragraph]
    if with_calls:
        lines += [
            "",
            "Short runs (calls/s asked; ✓ passed, ✗ failed) and long runs: "
            + "; ".join(
                f"{s}: {calls._ladder(calls_[s].setup)}; long: {calls._long(calls_[s].setup)}"
                for s in SETUPS
            )
            + ".",
        ]
    lines += ["", "Checks:", ""]
    for part, results in (("registrations", regs), ("calls", calls_)):
        if part not in args.parts:
            continue
        for s in SETUPS:
            c = results[s].checks
            kinds = ", ".join(f"{n}× `{k}`" for k, n in c.log_lines.most_common(4)) or "none"
            status = "all held" if not c.failed else f"**failed: {'; '.join(c.failed)}**"
            codes = ", ".join(str(x) for x in c.exit_codes)
            lines.append(
                f"- {part}, {s}: {status}; `sbc run` exit codes {codes}; SBC log "
                f"errors and warnings: {kinds}."
            )
            if s == "redis":
                lines += [f"  - {line}" for line in c.lines]
    lines += [
        "",
        "How it is measured: rates are SIPp's (REGISTER transactions or calls over its own "
        "first-to-last statistics timestamps; for calls less one mean call length); CPU is "
        "taken over the SIPp run, per REGISTER transaction or call of the run: the SBC's "
        "utime + stime from /proc/PID/stat (`sbc run`, for calls with its media worker), "
        "redis-server's run time from /proc/PID/task/*/schedstat (all its threads, in "
        "nanoseconds: its microseconds per REGISTER are below the clock tick of "
        "/proc/PID/stat over a short run; in the memory column, redis-server idle). Redis "
        "commands are the change of `INFO "
        "commandstats` (calls per command; the bench's own INFO left out), socket reads "
        "that of `INFO stats` `total_reads_processed` (at least one per pipeline, one per "
        "16 KB of it), both from just before SIPp starts until Redis's counts stop moving "
        "after it exits. The SBC's writer sends, each time it wakes, what changed since "
        "its last pipeline as one pipeline (one SET with PXAT, or DEL, per entry, the "
        "latest value of each; one PUBLISH of the shared events), so fewer reads than "
        "commands means several entries per pipeline. Other work: the machine's busy time "
        "(/proc/stat) less that of the SBC, Kamailio, redis-server, SIPp and the bench. "
        + (
            "The SBC has one core to itself; SIPp, Kamailio and redis-server share the "
            "other, so a peers' core near 100 % limits the rate, not the SBC."
            if env["pinned"]
            else "Not pinned: every process shares every core."
        ),
    ]
    return "\n".join(lines) + "\n"


def summary(
    regs: dict[str, RegResult], calls_: dict[str, CallResult], args: argparse.Namespace
) -> list[str]:
    """What the store added to the SBC's CPU, in a few sentences from the figures."""
    out: list[str] = []
    if "registrations" in args.parts:
        added = []
        for phase, title in (("initial", "initial REGISTER"), ("refresh", "re-REGISTER")):
            m, r = reg_figures(regs["memory"], phase), reg_figures(regs["redis"], phase)
            cpu_m, cpu_r = m.per(m.sbc_cpu), r.per(r.sbc_cpu)
            if cpu_m is not None and cpu_r is not None:
                added.append(
                    f"{1e6 * (cpu_r - cpu_m):+,.0f} µs per {title} ({_us(cpu_m)} → "
                    f"{_us(cpu_r)}; {r.counts.total / max(1, r.registers):.2f} Redis commands "
                    f"and {r.counts.reads / max(1, r.registers):.3f} socket reads each)"
                )
        if added:
            out.append("With the store, the SBC's CPU: " + "; ".join(added) + ".")
    if "calls" in args.parts:
        added = []
        mem, red = calls_["memory"], calls_["redis"]
        for title, steps in (
            (f"at {args.cpu_rate:,} calls/s", (mem.fixed, red.fixed)),
            ("in the sustained long runs", (mem.setup.best, red.setup.best)),
        ):
            cm, cr = call_figures(mem, steps[0]), call_figures(red, steps[1])
            if cm.sbc is not None and cr.sbc is not None and cr.counts is not None:
                added.append(
                    f"{1000 * (cr.sbc - cm.sbc):+.2f} ms per call {title} ({_ms(cm.sbc)} → "
                    f"{_ms(cr.sbc)}; {cr.reads()} socket reads per call)"
                )
        if added:
            out.append("Per call, the store added " + "; ".join(added) + ".")
        runs = [s.run_dir for s in (red.fixed, *red.setup.long_runs) if s and s.run_dir]
        counts = sum((red.store.get(run, NO_COUNTS) for run in runs), NO_COUNTS)
        sets, dels = counts.commands.get("set", 0), counts.commands.get("del", 0)
        if dels > sets > 0:
            out.append(
                f"Of the {dels:,} DELs of the redis setup's fixed-rate and long runs, "
                f"at least {dels - sets:,} ({(dels - sets) / dels:.0%}) were for `call:` keys "
                "never SET (the core marks a call kept when it answers, and deletes it at its "
                "end): a call answered and ended while the writer's previous pipeline was in "
                "flight leaves only its deletion to write. The bench's calls end right after "
                "their ACK; calls that last longer each get their SET (and its pipeline)."
            )
    return out


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run of about a minute")
    ap.add_argument(
        "--parts",
        default="registrations,calls",
        help="comma-separated: registrations, calls (both)",
    )
    # Registrations (bench/register.py's options)
    ap.add_argument("--users", type=int, help="users per round and setup (2000; quick 500)")
    ap.add_argument("--refreshes", type=int, help="re-REGISTERs per user (4; quick 2)")
    ap.add_argument("--rounds", type=int, help="registration rounds (3; quick 1)")
    ap.add_argument(
        "--reg-rate", dest="rate", type=int, default=20000, help="SIPp -r for REGISTERs (20000)"
    )
    ap.add_argument("--limit", type=int, default=100, help="SIPp -l for REGISTERs (100)")
    ap.add_argument("--sipp-timeout", type=int, help="bound on a registration SIPp run, s")
    # Calls (bench/calls.py's and bench/engines.py's options)
    add_call_options(ap)
    ap.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    ap.add_argument("--out", type=Path, help="rewrite the bench/state.py section of FILE")
    args = ap.parse_args(argv)
    q = args.quick
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if not args.parts or not set(args.parts) <= {"registrations", "calls"}:
        ap.error("--parts: registrations, calls")
    args.users = args.users or (500 if q else 2000)
    args.refreshes = args.refreshes or (2 if q else 4)
    args.rounds = args.rounds or (1 if q else 3)
    if args.sipp_timeout is None:
        args.sipp_timeout = max(30, args.users * args.refreshes // 500)
    call_defaults(ap, args)
    if min(args.users, args.refreshes, args.rounds, args.rate, args.limit) < 1:
        ap.error("--users, --refreshes, --rounds, --reg-rate and --limit must be >= 1")

    t0 = time.monotonic()
    try:
        regs, calls_, env = run(args)
    except BenchError as exc:
        print(f"bench/state.py: {exc}", file=sys.stderr)
        return 1
    section = render(regs, calls_, args, env)
    print(f"({time.monotonic() - t0:.0f} s)")
    publish("bench/state.py", section, args.out)
    failed = [
        f"{part} {s}: {f}"
        for part, results in (("registrations", regs), ("calls", calls_))
        for s in SETUPS
        for f in results[s].checks.failed
    ]
    if failed:
        print("bench/state.py: checks failed:\n" + "\n".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
