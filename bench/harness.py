"""What the SIPp benchmarks (bench/register.py, bench/calls.py, bench/workers.py) share: free
loopback ports, one SIP request over UDP, the CPU time of processes (one, a process group,
or the SBC's whole process tree split into signalling and media), and the processes
themselves (Kamailio, ``sbc run`` with one or more signalling workers, SIPp), each pinned to
a CPU when asked (``taskset -c``) and stopped by its PID; the SBC's admin endpoint
(/readyz, /metrics); SIPp's statistics file; the versions every report names."""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import http.client
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from report import ROOT, command_line, cpu_model, dist_version, git_rev, stop_process, tool_version

SCENARIOS = ROOT / "bench" / "scenarios"
KAMAILIO_CFG = ROOT / "docker" / "kamailio" / "kamailio.cfg"
HOST = "127.0.0.1"
DOMAIN = "example.com"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
SIPP = shutil.which("sipp") or "sipp"


class BenchError(RuntimeError):
    """Something did not start, a SIPp run failed, or a check did not hold."""


# ---------------------------------------------------------------------------------------
# Small helpers: ports, SIP over UDP, CPU time, stopping processes
# ---------------------------------------------------------------------------------------


def _free_udp_tcp(port: int) -> bool:
    """Whether 127.0.0.1:``port`` can be bound for UDP and for TCP (right now)."""
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind((HOST, port))
            except OSError:
                return False
    return True


def free_port_block(count: int, taken: set[int]) -> int:
    """The first of ``count`` consecutive ports free on 127.0.0.1 for UDP and TCP, none in
    ``taken`` (they are added to it): the core ports of ``count`` signalling workers."""
    for _ in range(50):
        base = free_port(taken=set(taken))
        block = range(base, base + count)
        free = base + count <= 65536 and not taken.intersection(block)
        if free and all(_free_udp_tcp(port) for port in block[1:]):
            taken.update(block)
            return base
    raise BenchError(f"no {count} consecutive free ports on 127.0.0.1")


def free_port(kind: int = socket.SOCK_DGRAM, taken: set[int] | None = None) -> int:
    """A port free on 127.0.0.1 for UDP and TCP (bind port 0), not in ``taken``."""
    taken = taken if taken is not None else set()
    for _ in range(50):
        with socket.socket(socket.AF_INET, kind) as first:
            first.bind((HOST, 0))
            port = int(first.getsockname()[1])
            other = socket.SOCK_STREAM if kind == socket.SOCK_DGRAM else socket.SOCK_DGRAM
            try:
                with socket.socket(socket.AF_INET, other) as second:
                    second.bind((HOST, port))
            except OSError:
                continue
        if port not in taken:
            taken.add(port)
            return port
    raise BenchError("no free port on 127.0.0.1")


def sip_exchange(
    port: int,
    method: str,
    user: str | None,
    timeout: float = 1.0,
    *,
    local_port: int = 0,
    uri: str | None = None,
    expires: int = 3600,
) -> int | None:
    """One OPTIONS (no user) or REGISTER (``user``, Contact the address it is sent from)
    over UDP from ``local_port`` (0: any) to 127.0.0.1:``port``, Request-URI ``uri``
    (default: that address); the final status, or None. The socket is closed after, so
    another program (SIPp UAS) can take the port."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((HOST, local_port))
        local = f"{HOST}:{sock.getsockname()[1]}"
        tag = secrets.token_hex(6)
        aor = f"sip:{user or 'bench'}@{DOMAIN}"
        lines = [
            f"{method} {uri or f'sip:{HOST}:{port}'} SIP/2.0",
            f"Via: SIP/2.0/UDP {local};branch=z9hG4bK{tag};rport",
            "Max-Forwards: 70",
            f"From: <{aor}>;tag={tag}",
            f"To: <{aor}>",
            f"Call-ID: {tag}@bench",
            f"CSeq: 1 {method}",
        ]
        if method == "REGISTER":
            lines += [f"Contact: <sip:{user}@{local}>", f"Expires: {expires}"]
        lines.append("Content-Length: 0")
        sock.sendto(("\r\n".join(lines) + "\r\n\r\n").encode(), (HOST, port))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data = sock.recv(65535)
            except (TimeoutError, ConnectionRefusedError):
                return None
            m = re.match(rb"SIP/2\.0 (\d{3}) ", data)
            if m and int(m.group(1)) >= 200:
                return int(m.group(1))
    return None


@dataclass(frozen=True, slots=True)
class ProcStat:
    """What /proc/PID/stat says of one process."""

    ppid: int
    pgid: int
    ticks: int  # utime + stime, clock ticks
    started: int  # start time after boot, clock ticks: with the PID, names the process


def _proc_stat(pid: int) -> ProcStat | None:
    """/proc/PID/stat of one process, or None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # fields[0] is field 3 (state)
    return ProcStat(
        int(fields[1]), int(fields[2]), int(fields[11]) + int(fields[12]), int(fields[19])
    )


def _all_stats() -> dict[int, ProcStat]:
    """Every live process."""
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _proc_stat(int(entry))) is not None:
            stats[int(entry)] = stat
    return stats


def process_tree(root: int) -> dict[int, ProcStat]:
    """``root`` and every live descendant of it (by their parent PIDs in /proc; this kernel
    has no /proc/PID/task/TID/children)."""
    stats = _all_stats()
    children: dict[int, list[int]] = {}
    for pid, stat in stats.items():
        children.setdefault(stat.ppid, []).append(pid)
    tree, todo = {}, [root] if root in stats else []
    while todo:
        pid = todo.pop()
        tree[pid] = stats[pid]
        todo += children.get(pid, [])
    return tree


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) of one process."""
    stat = _proc_stat(pid)
    return 0.0 if stat is None else stat.ticks / CLK_TCK


def group_cpu_seconds(pgid: int) -> float:
    """CPU time of every live process in a process group (Kamailio and its children)."""
    ticks = sum(s.ticks for s in _all_stats().values() if s.pgid == pgid)
    return ticks / CLK_TCK


def pinned(cmd: list[str], cpu: int | None) -> list[str]:
    return cmd if cpu is None else ["taskset", "-c", str(cpu), *cmd]


def sbc_command() -> list[str]:
    """The installed console script next to this interpreter, else ``python -m sbc``."""
    script = Path(sys.executable).with_name("sbc")
    return [str(script)] if script.exists() else [sys.executable, "-m", "sbc"]


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to a process that leads its own group (start_new_session), wait for it and
    then for the rest of its group, SIGKILL to the group if that takes longer than
    STOP_TIMEOUT."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT)
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline:  # its children must be gone too
            os.killpg(proc.pid, 0)
            time.sleep(0.02)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=STOP_TIMEOUT)


def wait_ready(
    proc: subprocess.Popen[bytes], name: str, ready: Callable[[], bool], log: Callable[[], str]
) -> None:
    """Until ``ready()``; BenchError with the ``log()`` if the process exits first or
    START_TIMEOUT passes."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{name} exited with {proc.returncode}:\n{log()}")
        if ready():
            return
        time.sleep(0.05)
    raise BenchError(f"{name} not ready within {START_TIMEOUT} s:\n{log()}")


# ---------------------------------------------------------------------------------------
# The systems under test: Kamailio, the SBC
# ---------------------------------------------------------------------------------------


class Kamailio:
    """One Kamailio registrar on 127.0.0.1 (UDP), in the foreground in its own session;
    ``shm_mb``: its shared memory (-m), else Kamailio's default."""

    def __init__(
        self, name: str, port: int, rundir: Path, cpu: int | None, shm_mb: int | None = None
    ) -> None:
        self.name, self.port, self.rundir, self.cpu, self.shm_mb = name, port, rundir, cpu, shm_mb
        rundir.mkdir(parents=True)
        self.ctl = rundir / "ctl.sock"  # a Unix socket path must stay under 108 bytes
        self.log_path = rundir / "kamailio.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [
            shutil.which("kamailio") or "kamailio",
            "-f", str(KAMAILIO_CFG),
            "-DD", "-E",
            *(["-m", str(self.shm_mb)] if self.shm_mb else []),
            "-Y", str(self.rundir),
            "-P", str(self.rundir / "kamailio.pid"),
            "-l", f"udp:{HOST}:{self.port}",
            "-A", f'CTL_SOCKET="unix:{self.ctl}"',
        ]  # fmt: skip
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                pinned(cmd, self.cpu),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # its children share its process group
            )

    def wait_ready(self) -> None:
        """Until its control socket is there and it answers OPTIONS with a 200."""
        assert self.proc is not None
        wait_ready(
            self.proc,
            f"kamailio {self.name}",
            lambda: self.ctl.exists() and sip_exchange(self.port, "OPTIONS", None, 0.5) == 200,
            self.log,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def errors(self) -> list[str]:
        return [line for line in self.log().splitlines() if "ERROR" in line]

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)

    def cpu_seconds(self) -> float:
        return 0.0 if self.proc is None else group_cpu_seconds(self.proc.pid)

    def stats(self, group: str) -> dict[str, int]:
        proc = subprocess.run(
            ["kamcmd", "-s", f"unix:{self.ctl}", "stats.get_statistics", f"{group}:"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if proc.returncode != 0 or proc.stdout.startswith("error:"):
            raise BenchError(f"kamcmd on kamailio {self.name}: {proc.stdout}{proc.stderr}")
        return {k: int(v) for k, v in re.findall(r"^(\S+) = (-?\d+)\s*$", proc.stdout, re.M)}

    def registers_received(self) -> int:
        return self.stats("core")["core:rcv_requests_register"]

    def registered_users(self) -> int:
        return self.stats("usrloc")["usrloc:registered_users"]


@dataclass(frozen=True, slots=True)
class SbcCpu:
    """CPU seconds of the SBC's process tree: signalling (``sbc run``, its ``sbc worker``
    processes) and media (the ``sbc.io.media_worker`` processes)."""

    signalling: float
    media: float

    def __sub__(self, other: SbcCpu) -> SbcCpu:
        return SbcCpu(self.signalling - other.signalling, self.media - other.media)

    def __add__(self, other: SbcCpu) -> SbcCpu:
        return SbcCpu(self.signalling + other.signalling, self.media + other.media)

    def __mul__(self, factor: float) -> SbcCpu:
        return SbcCpu(self.signalling * factor, self.media * factor)

    @property
    def total(self) -> float:
        return self.signalling + self.media


MEDIA_WORKER = b"sbc.io.media_worker"


class Sbc:
    """``sbc run``, UDP only, on free loopback ports (none in ``taken``), logging at warning
    so that logging does not dominate, the load's address on its allow list (unless
    ``allow_load`` is False: then ``security`` says what the load may do). ``backend``:
    the port of its only backend on 127.0.0.1, if any; ``tables``: more of its
    configuration (TOML tables); ``security``: more [security] settings; ``profile``: run
    it under cProfile, its statistics to that file. ``workers``: ``[sbc] workers`` (worker
    i listens on the core port + i: a block of free ports) and ``[media] workers`` (one
    media worker each); ``media``: more [media] keys (with either, the [media] table is
    written here, not in ``tables``)."""

    def __init__(
        self,
        workdir: Path,
        cpu: int | None,
        taken: set[int],
        *,
        client_expires: int,
        backend_expires: int,
        backend: int | None = None,
        tables: str = "",
        security: str = "",
        allow_load: bool = True,
        profile: Path | None = None,
        workers: int = 1,
        media: str | None = None,
    ) -> None:
        self.cpu, self.profile, self.workers = cpu, profile, workers
        self.port = free_port(taken=taken)
        self.core_port = free_port_block(workers, taken)
        self.admin_port = free_port(socket.SOCK_STREAM, taken=taken)
        self.config = workdir / "sbc.toml"
        self.log_path = workdir / "sbc.log"
        backends = f'\n[[core.backends]]\nuri = "sip:{HOST}:{backend}"\n' if backend else ""
        if media is not None or workers > 1:
            tables = f"\n[media]\nworkers = {workers}\n{media or ''}\n{tables}"
        self.config.write_text(
            f"""\
[sbc]
name = "bench"
workers = {workers}

[access]
listen = ["udp://{HOST}:{self.port}"]

[core]
listen = ["udp://{HOST}:{self.core_port}"]
{backends}
[admin]
listen = "{HOST}:{self.admin_port}"

[log]
level = "warning"

[registration]
backend_expires = {backend_expires}

[registration.client_expires]
udp = {client_expires}
{tables}
[security]
allow = [{f'"{HOST}"' if allow_load else ""}]
{security}"""
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.exit_code: int | None = None
        self.killed: list[str] = []  # processes of its tree still there after it stopped

    def start(self) -> None:
        cmd = [*sbc_command(), "run", "--config", str(self.config)]
        if self.profile is not None:
            cmd = [sys.executable, "-m", "cProfile", "-o", str(self.profile), "-m", "sbc"]
            cmd += ["run", "--config", str(self.config)]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                pinned(cmd, self.cpu), stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )

    def wait_ready(self) -> None:
        """Until it answers OPTIONS (logging at warning, it does not say "ready"); with
        several workers, until its /readyz says all of them are (a backend up in each)."""
        assert self.proc is not None

        def ready() -> bool:
            if sip_exchange(self.port, "OPTIONS", None, 0.5) is None:
                return False
            return self.workers == 1 or self.admin("/readyz")[0] == 200

        wait_ready(self.proc, "sbc run", ready, self.log)

    def admin(self, path: str) -> tuple[int, str]:
        """GET ``path`` from its ``[admin] listen``: (status, body); (0, why) on no answer."""
        conn = http.client.HTTPConnection(HOST, self.admin_port, timeout=5.0)
        try:
            conn.request("GET", path)
            answer = conn.getresponse()
            return answer.status, answer.read().decode(errors="replace")
        except OSError as exc:
            return 0, str(exc)
        finally:
            conn.close()

    def metrics(self) -> dict[tuple[str, str], float]:
        """Its /metrics (the supervisor's: merged, plus the per-worker families) as
        (sample name, labels as written) -> value."""
        status, body = self.admin("/metrics")
        if status != 200:
            raise BenchError(f"sbc /metrics: {status} {body[:300]}")
        return {
            (m[1], m[2] or ""): float(m[3])
            for m in re.finditer(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$", body, re.M)
        }

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """SIGTERM by its PID (the supervisor passes it on to the workers, they stop their
        media workers); then SIGKILL, by PID, to any process of its tree still there after
        STOP_TIMEOUT (named in ``killed``)."""
        if self.proc is None or self.exit_code is not None:
            return
        tree = process_tree(self.proc.pid)
        self.exit_code = stop_process(self.proc, STOP_TIMEOUT)
        deadline = time.monotonic() + STOP_TIMEOUT

        def left() -> list[int]:
            return [
                pid
                for pid, stat in tree.items()
                if (now := _proc_stat(pid)) is not None and now.started == stat.started
            ]

        while left() and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in left():
            self.killed.append(_cmdline(pid).decode(errors="replace") or str(pid))
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def cpu_seconds(self) -> float:
        return 0.0 if self.proc is None else cpu_seconds(self.proc.pid)

    def cpu_split(self) -> SbcCpu:
        """CPU time of its whole live process tree, signalling and media apart."""
        if self.proc is None:
            return SbcCpu(0.0, 0.0)
        signalling = media = 0
        for pid, stat in process_tree(self.proc.pid).items():
            if MEDIA_WORKER in _cmdline(pid):
                media += stat.ticks
            else:
                signalling += stat.ticks
        return SbcCpu(signalling / CLK_TCK, media / CLK_TCK)


def _cmdline(pid: int) -> bytes:
    """A process's command line, its arguments separated by spaces; b"" if gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").strip()
    except OSError:
        return b""


def print_sbc_logs(started: Iterable[object]) -> None:
    """On a failed run: the end of the log of every SBC started, on standard error."""
    for proc in started:
        if isinstance(proc, Sbc) and proc.proc is not None and proc.log().strip():
            print(f"--- sbc run log ---\n{proc.log()[-3000:]}", file=sys.stderr)


# ---------------------------------------------------------------------------------------
# SIPp: its command line and its statistics
# ---------------------------------------------------------------------------------------


def sipp_command(
    scenario: str,
    local_port: int,
    run_dir: Path,
    *options: str,
    target: int | None = None,
    transport: str = "u1",
) -> list[str]:
    """SIPp over UDP from 127.0.0.1:``local_port`` running bench/scenarios/``scenario``
    (a UAC calling 127.0.0.1:``target``; a UAS without one), without its interactive
    screen, its errors in ``run_dir``/errors.log; then ``options``. ``transport``: SIPp's
    ``-t`` (u1: one socket; un: a socket, so a source port, per call)."""
    return [
        SIPP,
        *([] if target is None else [f"{HOST}:{target}"]),
        "-sf", str(SCENARIOS / scenario),
        "-t", transport,
        "-i", HOST,
        "-p", str(local_port),
        "-nostdin",
        "-trace_err", "-error_file", str(run_dir / "errors.log"),
        *options,
    ]  # fmt: skip


def sipp_stats(path: Path) -> list[dict[str, str]]:
    """The rows of SIPp's ``-stf`` file (``;``-separated, header row first); [] if none."""
    if not path.exists():
        return []
    with path.open(newline="") as f:
        rows = [row for row in csv.reader(f, delimiter=";") if row]
    return [dict(zip(rows[0], row, strict=False)) for row in rows[1:]]


def sipp_ms(value: str) -> float:
    """SIPp's ``HH:MM:SS:usec`` (a statistics duration) in milliseconds."""
    h, m, s, us = (int(x) for x in value.split(":"))
    return (h * 3600 + m * 60 + s) * 1000 + us / 1000


# ---------------------------------------------------------------------------------------
# The report's environment
# ---------------------------------------------------------------------------------------


def environment(pinning: str) -> dict[str, str]:
    """What a report says of the run: when, the machine, the versions, the command."""
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "pinning": pinning,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "sbc": dist_version("sbc") + git_rev(),
        "uvloop": dist_version("uvloop"),
        "sipp": tool_version([SIPP, "-v"], r"SIPp v(\S+?)\.?\s"),
        "kamailio": tool_version(["kamailio", "-v"], r"kamailio (\S+)"),
        "command": command_line(),
    }
