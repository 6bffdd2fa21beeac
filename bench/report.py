"""What every benchmark report needs: the machine, the code's version, the command that ran,
and rewriting one benchmark's section of docs/performance.md between its markers."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def git_rev() -> str:
    """`` (git abc1234)``, plus a note if sbc/ has uncommitted changes; "" outside git."""
    try:
        rev = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "sbc"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
    return f" (git {rev}{', sbc/ modified' if dirty else ''})"


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    return m.group(1).strip() if m else platform.machine()


def command_line() -> str:
    """The command that is running, with paths relative to the repository."""
    exe = Path(sys.executable)
    try:
        exe_s = str(exe.relative_to(ROOT)) if exe.is_absolute() else str(exe)
    except ValueError:
        exe_s = str(exe)
    script = Path(sys.argv[0])
    try:
        script_s = str(script.resolve().relative_to(ROOT))
    except ValueError:
        script_s = sys.argv[0]
    return shlex.join([exe_s, script_s, *sys.argv[1:]])


def write_section(path: Path, name: str, section: str, intro: str = "# Performance\n\n") -> None:
    """Put ``section`` between ``<!-- name -->`` and ``<!-- /name -->`` in ``path``."""
    begin, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    block = f"{begin}\n{section}{end}\n"
    if path.exists():
        text = path.read_text()
        start, stop = text.find(begin), text.find(end)
        if start >= 0 and stop > start:
            text = text[:start] + block + text[stop + len(end) :].lstrip("\n")
        else:
            text = text.rstrip("\n") + "\n\n" + block
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        text = intro + block
    path.write_text(text)


def publish(name: str, section: str, out: Path | None) -> None:
    """Print a benchmark's report ``section``; with ``out``, also write it there between the
    benchmark's markers (``name``: bench/NAME.py)."""
    print()
    print(section)
    if out:
        write_section(out, name, section)
        print(f"wrote {out}")


def dist_version(name: str) -> str:
    """The installed version of a Python distribution."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def compiled_line() -> str:
    """How the SBC under test runs: the modules mypyc compiled, or why pure Python."""
    from sbc._compiled import status

    st = status()
    if st["compiled"] and st["reason"] is None:
        return f"{len(st['compiled'])} modules compiled by mypyc"
    return f"pure Python: {st['reason']}"


def tool_version(cmd: list[str], pattern: str) -> str:
    """A program's version: ``pattern``'s first group in what ``cmd`` prints, or "?"."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    m = re.search(pattern, out.stdout + out.stderr)
    return m.group(1) if m else "?"


def sipp_stamp(value: str) -> float:
    """Seconds since the epoch from a SIPp statistics time stamp."""
    return float(value.split()[-1])  # "2026-11-26 16:29:12.300567 1795710552.300567"


def _machine_ticks() -> list[int]:
    """user, nice, system, idle, iowait, irq, softirq, steal: the first line of /proc/stat."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    return [int(x) for x in fields[:8]]


def machine_busy_seconds() -> float:
    """Busy CPU seconds of the whole machine (user, nice, system, irq, softirq, steal: the
    first line of /proc/stat); also counts processes that ended meanwhile."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = _machine_ticks()
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def interrupt_seconds() -> float:
    """CPU seconds the machine spent in interrupts and softirqs (irq, softirq of /proc/stat):
    mostly the network stack's work, charged to no process."""
    ticks = _machine_ticks()
    return (ticks[5] + ticks[6]) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    """CPU time (user + system) of this process's waited-for children (SIPp runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def choose_cpus(
    no_pin: bool, target: int | None, peers: int | None, *, target_is: str, peers_are: str
) -> tuple[int | None, int | None, str]:
    """(CPU for the system under test, CPU for the load, description): the first two
    allowed CPUs unless given; this script moves to the load's CPU (it mostly waits)."""
    allowed = sorted(os.sched_getaffinity(0))
    if no_pin or len(allowed) < 2 or shutil.which("taskset") is None:
        why = "--no-pin" if no_pin else "fewer than 2 CPUs or no taskset"
        return None, None, f"{len(allowed)} CPUs, not pinned ({why})"
    target_cpu = allowed[0] if target is None else target
    peer_cpu = allowed[1] if peers is None else peers
    os.sched_setaffinity(0, {peer_cpu})
    return (
        target_cpu,
        peer_cpu,
        f"{len(allowed)} CPUs; {target_is} pinned to CPU {target_cpu}, {peers_are} + this "
        f"script to CPU {peer_cpu} (taskset -c)",
    )


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> int | None:
    """SIGTERM by PID, wait, then SIGKILL; the exit code, None if it had to be killed."""
    if proc is None:
        return None
    if proc.poll() is not None:
        return proc.returncode
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)
    return None
