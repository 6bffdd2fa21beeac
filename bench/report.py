"""What every benchmark report needs: the machine, the code's version, the command that ran,
and rewriting one benchmark's section of docs/performance.md between its markers."""

from __future__ import annotations

import platform
import re
import shlex
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
