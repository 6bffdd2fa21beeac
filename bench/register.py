#!/usr/bin/env python3
"""Registration throughput and offload: SIPp registering directly at Kamailio and via the SBC.

    .venv/bin/python bench/register.py [--users N] [--refreshes K] [--out docs/performance.md]

One run, two targets, the same SIPp load on each:

  direct   SIPp -> Kamailio A (docker/kamailio/kamailio.cfg), the yardstick;
  via SBC  SIPp -> ``sbc run`` (UDP access port) -> Kamailio B (a fresh instance, the only
           backend), with ``[registration] backend_expires = 3600`` and
           ``[registration.client_expires] udp = 60`` (registration offload) and log level
           warning, so logging does not dominate.

On each target, in each of ``--rounds`` rounds (new users every round), two phases, each
one SIPp run (bench/scenarios/):

  initial  register.xml: one REGISTER (CSeq 1) per user, N users;
  refresh  refresh.xml: per user K re-REGISTERs one after the other, unchanged (same
           Call-ID, From tag, Contact and source address:port, CSeq 2..K+1): the ones the
           SBC answers itself.

Both SIPp runs of a target use the same local port and ``-cid_str`` (a Call-ID made from the
call number), so call i of the refresh run continues the registration of call i of the
initial run. SIPp starts calls at ``--rate`` per second with at most ``--limit`` in progress
(``-r RATE -l LIMIT``): a closed loop that keeps the target saturated without flooding its
socket buffer. Every call must succeed (every 200 checked: CSeq echoed, Contact granted a
non-zero expiry), or the benchmark fails: lower --rate or --limit then.

Rates are reported as the median (and range) over the rounds. Measured per phase: the
achieved REGISTERs/s (SIPp's own start and end timestamps from its
``-trace_stat`` file), SIPp retransmissions, the REGISTERs the backend received (Kamailio's
``core:rcv_requests_register`` through kamcmd, before and after), and the CPU time of the
SBC (/proc/PID/stat utime+stime), of Kamailio (its whole process group) and of SIPp
(getrusage of waited children). With two or more CPUs the SBC is pinned to one CPU and
SIPp, both Kamailios and this script to another (``taskset -c``).

Every process started here (Kamailio, the SBC, SIPp) is stopped by its PID at the end, also
on error, and the temporary directory is removed. Ports are free loopback ports found by
binding port 0. ``--out`` rewrites the section between the bench/register.py markers of the
file (created, or appended if the markers are missing).
"""

from __future__ import annotations

import argparse
import secrets
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from harness import (
    DOMAIN,
    START_TIMEOUT,
    BenchError,
    Kamailio,
    Sbc,
    environment,
    free_port,
    pinned,
    print_sbc_logs,
    sip_exchange,
    sipp_command,
    sipp_stats,
)
from report import children_cpu_seconds, choose_cpus, publish, sipp_stamp

CLIENT_EXPIRES = 60
BACKEND_EXPIRES = 3600


def warm_up(port: int, what: str) -> None:
    """One REGISTER that must get a 200 (the SBC: once it has probed its backend up)."""
    deadline = time.monotonic() + START_TIMEOUT
    status = None
    while time.monotonic() < deadline:
        status = sip_exchange(port, "REGISTER", "warmup", 1.0, expires=BACKEND_EXPIRES)
        if status == 200:
            return
        time.sleep(0.2)
    raise BenchError(f"no 200 to a REGISTER sent to {what} (last status {status})")


@dataclass
class SippRun:
    calls: int
    registers: int  # REGISTER transactions (not counting retransmissions)
    elapsed: float  # SIPp's first to last statistics timestamp
    wall: float  # around the process, for CPU shares
    retransmissions: int
    sipp_cpu: float

    @property
    def rate(self) -> float:
        return self.registers / self.elapsed


def sipp(
    workdir: Path,
    name: str,
    *,
    port: int,
    local_port: int,
    cid: str,
    scenario: str,
    users_csv: Path,
    users: int,
    per_call: int,
    args: argparse.Namespace,
    cpu: int | None,
    extra: tuple[str, ...] = (),
    transport: str = "u1",
) -> SippRun:
    """One SIPp run; every call must succeed. ``transport``: SIPp's -t (u1: one socket;
    un: one per call)."""
    run_dir = workdir / name
    run_dir.mkdir()
    stf, err = run_dir / "stat.csv", run_dir / "errors.log"
    cmd = sipp_command(
        scenario, local_port, run_dir,
        "-inf", str(users_csv),
        "-cid_str", f"%u-{cid}@bench",
        "-m", str(users),
        "-r", str(args.rate),
        "-rp", "1000",
        "-l", str(args.limit),
        "-timeout", str(args.sipp_timeout),
        "-timeout_error",
        "-trace_stat", "-stf", str(stf),
        *extra,
        target=port,
        transport=transport,
    )  # fmt: skip
    cpu0 = children_cpu_seconds()
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(  # kills SIPp (by its PID) on timeout or any exception
            pinned(cmd, cpu),
            cwd=run_dir,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=args.sipp_timeout + 10,
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"sipp {name} did not finish within {args.sipp_timeout + 10} s") from exc
    wall = time.perf_counter() - t0
    sipp_cpu = children_cpu_seconds() - cpu0
    rows = sipp_stats(stf)
    stats = rows[-1] if rows else {}
    ok = int(stats.get("SuccessfulCall(C)", -1))
    failed = int(stats.get("FailedCall(C)", -1))
    if proc.returncode != 0 or ok != users or failed != 0:
        errors = err.read_text(errors="replace")[-3000:] if err.exists() else ""
        raise BenchError(
            f"sipp {name}: exit {proc.returncode}, {ok} of {users} calls successful, "
            f"{failed} failed, {stats.get('Retransmissions(C)')} retransmissions at "
            f"-r {args.rate} -l {args.limit}; lower --rate or --limit, or raise --sipp-timeout."
            "\n"
            f"command: {shlex.join(cmd)}\n--- errors ---\n{errors}\n"
            f"--- screen ---\n{(proc.stdout + proc.stderr)[-3000:]}"
        )
    return SippRun(
        calls=users,
        registers=users * per_call,
        elapsed=sipp_stamp(stats["CurrentTime"]) - sipp_stamp(stats["StartTime"]),
        wall=wall,
        retransmissions=int(stats["Retransmissions(C)"]),
        sipp_cpu=sipp_cpu,
    )


# ---------------------------------------------------------------------------------------
# One target: the initial phase, then the refresh phase
# ---------------------------------------------------------------------------------------


@dataclass
class Phase:
    run: SippRun
    backend_registers: int
    sbc_cpu: float | None
    kamailio_cpu: float


@dataclass
class Round:
    initial: Phase
    refresh: Phase


@dataclass
class Target:
    name: str
    rounds: list[Round]
    registered_users: int = 0

    def phases(self, phase: str) -> list[Phase]:
        return [getattr(r, phase) for r in self.rounds]


def measure_round(
    name: str,
    workdir: Path,
    round_no: int,
    *,
    port: int,
    backend: Kamailio,
    sbc: Sbc | None,
    users_csv: Path,
    args: argparse.Namespace,
    cpu: int | None,
) -> Round:
    """The initial phase, then the refresh phase, for this round's users."""
    local_port = free_port(taken={port, backend.port})
    cid = f"{name}-{round_no}-{secrets.token_hex(4)}"
    phases: list[Phase] = []
    for phase, scenario, per_call, extra in (
        ("initial", "register.xml", 1, ()),
        (
            "refresh",
            "refresh.xml",
            args.refreshes,
            ("-set", "refreshes", str(args.refreshes), "-base_cseq", "2"),
        ),
    ):
        received = backend.registers_received()
        kam0 = backend.cpu_seconds()
        sbc0 = sbc.cpu_seconds() if sbc else 0.0
        run = sipp(
            workdir,
            f"{name}-{round_no}-{phase}",
            port=port,
            local_port=local_port,
            cid=cid,
            scenario=scenario,
            users_csv=users_csv,
            users=args.users,
            per_call=per_call,
            args=args,
            cpu=cpu,
            extra=extra,
        )
        sbc_cpu = sbc.cpu_seconds() - sbc0 if sbc else None
        kam_cpu = backend.cpu_seconds() - kam0
        phases.append(Phase(run, backend.registers_received() - received, sbc_cpu, kam_cpu))
        print(
            f"round {round_no} {name:8} {phase:8} {run.registers:6} REGISTERs in "
            f"{run.elapsed:6.3f} s = {run.rate:8,.0f}/s, {run.retransmissions} "
            f"retransmissions, backend received {phases[-1].backend_registers}",
            flush=True,
        )
    return Round(phases[0], phases[1])


# ---------------------------------------------------------------------------------------
# Environment and report
# ---------------------------------------------------------------------------------------


def _n(x: float) -> str:
    return f"{x:,.0f}"


def _rate(phases: list[Phase]) -> float:
    return statistics.median(p.run.rate for p in phases)


def _rate_cell(phases: list[Phase]) -> str:
    rates = [p.run.rate for p in phases]
    spread = f" ({_n(min(rates))}–{_n(max(rates))})" if len(rates) > 1 else ""
    return _n(statistics.median(rates)) + spread


def _busy(phases: list[Phase], what: str) -> str:
    wall = sum(p.run.wall for p in phases)
    if what == "sbc":
        if phases[0].sbc_cpu is None:
            return "—"
        cpu = sum(p.sbc_cpu or 0.0 for p in phases)
    elif what == "kamailio":
        cpu = sum(p.kamailio_cpu for p in phases)
    else:
        cpu = sum(p.run.sipp_cpu for p in phases)
    return f"{100 * cpu / wall:.0f} %"


def _busy_cell(phases: list[Phase]) -> str:
    return " / ".join(_busy(phases, w) for w in ("sbc", "kamailio", "sipp"))


def _per_register(phases: list[Phase]) -> str:
    cpu = sum(p.sbc_cpu or 0.0 for p in phases)
    return f"{1e6 * cpu / sum(p.run.registers for p in phases):,.0f} µs"


def _total(phases: list[Phase], attr: str) -> int:
    return sum(getattr(p, attr) if hasattr(p, attr) else getattr(p.run, attr) for p in phases)


def render(direct: Target, via: Target, args: argparse.Namespace, env: dict[str, str]) -> str:
    n, k, rounds = args.users, args.refreshes, args.rounds
    d_i, d_r = direct.phases("initial"), direct.phases("refresh")
    s_i, s_r = via.phases("initial"), via.phases("refresh")
    sent_r = rounds * n * k
    offloaded = _total(s_r, "backend_registers")
    share = offloaded / sent_r
    per_round = f"{rounds} × " if rounds > 1 else ""
    profiled = " **The SBC ran under cProfile: its figures are slowed.**" if args.profile else ""
    lines = [
        "## Registration throughput and offload (bench/register.py)",
        "",
        f"- Date: {env['date']}",
        f"- CPU: {env['cpu']}; {env['pinning']}",
        f"- Versions: sbc {env['sbc']}, {env['python']}, uvloop {env['uvloop']}, "
        f"SIPp {env['sipp']}, Kamailio {env['kamailio']}",
        f"- Command: `{env['command']}`",
        f"- Load: {rounds} round{'s' if rounds > 1 else ''}, each with {n:,} new users, "
        "over UDP on loopback, all from one SIPp socket (one flow). SIPp "
        f"`-r {args.rate} -l {args.limit}`: calls started at up to {args.rate:,}/s, at most "
        f"{args.limit} in progress. Initial phase: one REGISTER per user "
        f"(bench/scenarios/register.xml). Refresh phase: {k} re-REGISTERs per user, one "
        "after the other, unchanged but for CSeq+1 (same Call-ID, From tag, Contact and "
        "source port; bench/scenarios/refresh.xml). Every 200 checked (CSeq, Contact with a "
        "non-zero expiry); every call succeeded.",
        "- Direct: SIPp to Kamailio A (docker/kamailio/kamailio.cfg, 2 UDP workers). Via "
        "SBC: SIPp to `sbc run` (UDP) with Kamailio B, a fresh instance of the same config, "
        f"as its only backend; `[registration] backend_expires = {BACKEND_EXPIRES}`, "
        f"`[registration.client_expires] udp = {CLIENT_EXPIRES}`, "
        f'`[log] level = "warning"`, `[security] allow` the load\'s address and '
        f"`backend_register = {{ rate = 0 }}` (the load is trusted and the backend's "
        f"REGISTER ceiling is off: this measures the SBC, not its limits).{profiled}",
        "",
        "| | Direct to Kamailio | Via SBC | Via SBC / direct |",
        "|---|---:|---:|---:|",
        f"| Initial REGISTERs/s, median (range) of {rounds} | {_rate_cell(d_i)} | "
        f"{_rate_cell(s_i)} | {_rate(s_i) / _rate(d_i):.2f} |",
        f"| Re-REGISTERs/s, median (range) of {rounds}; via SBC answered by the SBC | "
        f"{_rate_cell(d_r)} | {_rate_cell(s_r)} | {_rate(s_r) / _rate(d_r):.2f} |",
        f"| REGISTERs received by the backend in the initial phases ({per_round}{n:,} sent) | "
        f"{_n(_total(d_i, 'backend_registers'))} | {_n(_total(s_i, 'backend_registers'))} | |",
        f"| REGISTERs received by the backend in the refresh phases "
        f"({per_round}{n * k:,} sent) | {_n(_total(d_r, 'backend_registers'))} | "
        f"{_n(offloaded)} | {offloaded / max(_total(d_r, 'backend_registers'), 1):.3f} |",
        f"| Users registered at the backend at the end (+1 warm-up user) | "
        f"{_n(direct.registered_users)} | {_n(via.registered_users)} | |",
        f"| SIPp retransmissions, initial / refresh phases | "
        f"{_total(d_i, 'retransmissions')} / {_total(d_r, 'retransmissions')} | "
        f"{_total(s_i, 'retransmissions')} / {_total(s_r, 'retransmissions')} | |",
        f"| SBC CPU time per initial REGISTER | — | {_per_register(s_i)} | |",
        f"| SBC CPU time per re-REGISTER | — | {_per_register(s_r)} | |",
        f"| CPU busy, initial phases: SBC / Kamailio / SIPp | {_busy_cell(d_i)} | "
        f"{_busy_cell(s_i)} | |",
        f"| CPU busy, refresh phases: SBC / Kamailio / SIPp | {_busy_cell(d_r)} | "
        f"{_busy_cell(s_r)} | |",
        "",
        f"Offload: the backend received {offloaded:,} of the {sent_r:,} re-REGISTERs sent "
        f"through the SBC ({100 * share:.2f} %); sent directly, it receives every one. "
        "Target of issue 3 (the backend receives at most 1/50 = 2 % of the re-REGISTERs): "
        f"**{'met' if share <= 0.02 else 'not met'}**.",
        "",
        "How it is measured: REGISTERs/s are REGISTER transactions (retransmissions not "
        "counted) over SIPp's own first-to-last statistics timestamps of each run; backend "
        "REGISTERs are Kamailio's `core:rcv_requests_register` (kamcmd) before and after "
        "each phase; CPU time is utime+stime from /proc (the SBC process; Kamailio's whole "
        "process group) and getrusage for SIPp, over the wall time of the SIPp runs "
        "(100 % = one core busy). Rounds run the four phases in turn (direct initial, "
        "direct refresh, via SBC initial, via SBC refresh), on the same processes.",
    ]
    saturated = [
        name
        for name, phases in (("initial", s_i), ("refresh", s_r))
        if _busy(phases, "sbc") != "—" and int(_busy(phases, "sbc").split()[0]) >= 85
    ]
    if saturated:
        lines += [
            "",
            f"Via the SBC, its core was saturated in the {' and '.join(saturated)} phases: "
            "there the SBC is the limit, not SIPp or Kamailio.",
        ]
    retrans = {
        name: _total(phases, "retransmissions")
        for name, phases in (
            ("direct initial", d_i),
            ("direct refresh", d_r),
            ("via SBC initial", s_i),
            ("via SBC refresh", s_r),
        )
    }
    if any(retrans.values()):
        lines += [
            "",
            "SIPp retransmitted a REGISTER when no answer came within 500 ms (RFC 3261 timer "
            "E, T1): the target stalled at times in the "
            + ", ".join(f"{name} phases ({count})" for name, count in retrans.items() if count)
            + ". A retransmission through the SBC can reach the backend if the SBC itself "
            "retransmitted towards it, which is why the backend can count a few more "
            "REGISTERs than were sent.",
        ]
    if env["shared"]:
        lines += [
            "",
            "SIPp and Kamailio share one core in both runs; via the SBC, the SBC has another "
            "core to itself. The direct figures are the limit of SIPp and Kamailio together "
            "on one core (see their CPU shares), not of Kamailio alone.",
        ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> tuple[Target, Target, dict[str, str]]:
    for tool in ("sipp", "kamailio", "kamcmd"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} not installed (make peers installs it)")
    sbc_cpu, peer_cpu, pinning = choose_cpus(
        args.no_pin,
        args.sbc_cpu,
        args.peer_cpu,
        target_is="SBC",
        peers_are="SIPp + both Kamailios",
    )
    workdir = Path(tempfile.mkdtemp(prefix="bench-reg-"))  # short: holds the ctl sockets
    started: list[Kamailio | Sbc] = []
    try:
        taken: set[int] = set()
        kam_direct = Kamailio("A", free_port(taken=taken), workdir / "kA", peer_cpu)
        kam_backend = Kamailio("B", free_port(taken=taken), workdir / "kB", peer_cpu)
        for kam in (kam_direct, kam_backend):
            started.append(kam)
            kam.start()
        for kam in (kam_direct, kam_backend):
            kam.wait_ready()
        sbc = Sbc(
            workdir,
            sbc_cpu,
            {kam_backend.port},
            client_expires=CLIENT_EXPIRES,
            backend_expires=BACKEND_EXPIRES,
            backend=kam_backend.port,
            security="backend_register = { rate = 0 }\n",
            profile=args.profile,
        )
        started.append(sbc)
        sbc.start()
        sbc.wait_ready()
        warm_up(kam_direct.port, "Kamailio A")
        warm_up(sbc.port, "the SBC")

        direct, via = Target("direct", []), Target("via SBC", [])
        for round_no in range(1, args.rounds + 1):
            users_csv = workdir / f"users-{round_no}.csv"
            users_csv.write_text(
                "SEQUENTIAL\n"
                + "".join(f"r{round_no}u{i:06d};{DOMAIN}\n" for i in range(args.users))
            )
            for target, kam, port, with_sbc in (
                (direct, kam_direct, kam_direct.port, None),
                (via, kam_backend, sbc.port, sbc),
            ):
                target.rounds.append(
                    measure_round(
                        "direct" if with_sbc is None else "via-sbc",
                        workdir,
                        round_no,
                        port=port,
                        backend=kam,
                        sbc=with_sbc,
                        users_csv=users_csv,
                        args=args,
                        cpu=peer_cpu,
                    )
                )
        direct.registered_users = kam_direct.registered_users()
        via.registered_users = kam_backend.registered_users()
        sbc.stop()
        log = sbc.log()
        if sbc.exit_code != 0 or "Traceback" in log:
            raise BenchError(f"sbc run exit code {sbc.exit_code} after SIGTERM:\n{log[-3000:]}")
        if log.strip():
            print(f"--- sbc run log (warnings) ---\n{log[-2000:]}")
    except BaseException:
        print_sbc_logs(started)
        raise
    finally:
        for proc in reversed(started):
            proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    env = environment(pinning) | {"shared": "yes" if peer_cpu is not None else ""}
    return direct, via, env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, default=2000, help="users registered (2000)")
    ap.add_argument("--refreshes", type=int, default=4, help="re-REGISTERs per user (4)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds, each with --users new users (3)")
    ap.add_argument("--rate", type=int, default=20000, help="SIPp -r: calls/s offered (20000)")
    ap.add_argument("--limit", type=int, default=100, help="SIPp -l: calls in progress (100)")
    ap.add_argument(
        "--sipp-timeout",
        type=int,
        help="bound on each SIPp run, s (default: 30, or users x refreshes / 500 if more)",
    )
    ap.add_argument("--sbc-cpu", type=int, help="CPU for the SBC (default: first allowed)")
    ap.add_argument("--peer-cpu", type=int, help="CPU for SIPp + Kamailio (default: second)")
    ap.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    ap.add_argument("--profile", type=Path, help="run the SBC under cProfile, stats to FILE")
    ap.add_argument("--out", type=Path, help="rewrite the bench/register.py section of FILE")
    args = ap.parse_args(argv)
    if min(args.users, args.refreshes, args.rounds, args.rate, args.limit) < 1:
        ap.error("--users, --refreshes, --rounds, --rate and --limit must be >= 1")
    if args.sipp_timeout is None:
        args.sipp_timeout = max(30, args.users * args.refreshes // 500)

    try:
        direct, via, env = run(args)
    except BenchError as exc:
        print(f"bench/register.py: {exc}", file=sys.stderr)
        return 1
    publish("bench/register.py", render(direct, via, args, env), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
