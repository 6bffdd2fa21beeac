"""Start-up failures of the real ``sbc`` process: exit 1 with a one-line error, no traceback."""

from __future__ import annotations

import re
import socket
import subprocess
from pathlib import Path

import pytest

from .conftest import TCP, UDP, Certs, PortPool, sbc_command

pytestmark = pytest.mark.interop

# A structured log line (docs/configuration.md [log]): "2026-11-26T15:00:00.123Z INFO ..."
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z [A-Z]+ ")


def sbc(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*sbc_command(), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=20,
    )


# What a build whose compiled modules are older than their sources says at import (they then
# run from source): not about the config.
STALE_BUILD = re.compile(r"sbc\.[\w.]+: source changed since it was compiled; ")


def problem_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    """What the process said besides its log lines (and a stale build's notices); asserts it
    did not crash."""
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, out
    return [
        line
        for line in proc.stderr.splitlines()
        if not LOG_LINE.match(line) and not STALE_BUILD.match(line)
    ]


def run_with_port_taken(tmp_path: Path, busy: str) -> tuple[str, list[str]]:
    """``sbc run`` whose second listener's port is held by us; (its URL, problem lines)."""
    pool = PortPool()
    first = pool.port("127.0.0.1", UDP, TCP)
    core = pool.port("127.0.0.1", UDP)
    admin = pool.port("127.0.0.1", TCP)
    pool.release()
    kind = UDP if busy == "udp" else TCP
    with socket.socket(socket.AF_INET, kind) as holder:
        holder.bind(("127.0.0.1", 0))
        if kind == TCP:
            holder.listen()
        url = f"{busy}://127.0.0.1:{holder.getsockname()[1]}"
        config = tmp_path / "busy.toml"
        config.write_text(
            f'[access]\nlisten = ["tcp://127.0.0.1:{first}", "{url}"]\n'
            f'[core]\nlisten = ["udp://127.0.0.1:{core}"]\n'
            f'[admin]\nlisten = "127.0.0.1:{admin}"\n'
        )
        proc = sbc("run", "--config", str(config))
    assert proc.returncode == 1, proc.stderr
    return url, problem_lines(proc)


@pytest.mark.parametrize("busy", ["udp", "tcp"])
def test_run_port_taken(tmp_path: Path, busy: str) -> None:
    """The second listener's port is taken: one ``sbc: error: cannot listen on`` line, exit 1.

    The first listener has been bound by then, so this also proves the SBC releases what it
    already opened and stops without a traceback.
    """
    url, lines = run_with_port_taken(tmp_path, busy)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"sbc: error: cannot listen on {url}: "), lines


@pytest.mark.parametrize("busy", ["udp", "tcp"])
def test_run_port_taken_says_why(tmp_path: Path, busy: str) -> None:
    """The one line gives the operating system's reason (EADDRINUSE), not just "failed"."""
    _, lines = run_with_port_taken(tmp_path, busy)
    assert "address already in use" in lines[-1].lower(), lines


@pytest.mark.parametrize("key", ["certificate", "private_key"])
def test_run_missing_tls_file(tmp_path: Path, certs: Certs, key: str) -> None:
    """A missing certificate or key file is named with its key path before anything starts."""
    files = {"certificate": certs.server_cert, "private_key": certs.server_key}
    missing = tmp_path / "nowhere" / f"{key}.pem"
    files[key] = missing
    config = tmp_path / "tls.toml"
    config.write_text(
        '[access]\nlisten = ["tls://127.0.0.1:0"]\n'
        f'[access.tls]\ncertificate = "{files["certificate"]}"\n'
        f'private_key = "{files["private_key"]}"\n'
        '[core]\nlisten = ["udp://127.0.0.1:0"]\n'
        '[admin]\nlisten = "127.0.0.1:0"\n'
    )
    proc = sbc("run", "--config", str(config))
    assert proc.returncode == 1, proc.stderr
    assert problem_lines(proc) == [f"{config}: access.tls.{key}: file not found: {missing}"]


def test_run_unusable_certificate(tmp_path: Path, certs: Certs) -> None:
    """A certificate file that is not PEM: one line naming the file, exit 1."""
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("this is not a certificate\n")
    config = tmp_path / "tls.toml"
    config.write_text(
        '[access]\nlisten = ["tls://127.0.0.1:0"]\n'
        f'[access.tls]\ncertificate = "{garbage}"\nprivate_key = "{certs.server_key}"\n'
        '[core]\nlisten = ["udp://127.0.0.1:0"]\n'
        '[admin]\nlisten = "127.0.0.1:0"\n'
    )
    proc = sbc("run", "--config", str(config))
    assert proc.returncode == 1, proc.stderr
    lines = problem_lines(proc)
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("sbc: error: "), lines
    assert str(garbage) in lines[0], lines


BAD_CONFIGS = {
    "wrong-type": ('[sip]\nt1 = "fast"\n', ["sip.t1: "]),
    "bad-listen": (
        '[access]\nlisten = ["udp://127.0.0.1:5060", "carrier-pigeon://x"]\n',
        ["access.listen[1]: "],
    ),
    "two-faults": (
        '[media]\nports = "30000-20000"\n[log]\nlevel = "loud"\n',
        ["media.ports: ", "log.level: "],
    ),
    "unknown-key": ("[sbc]\nnmae = 'typo'\n", ["sbc.nmae: unknown key"]),
    "not-toml": ("[sbc\n", ["invalid TOML: "]),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_check_config_bad_file(tmp_path: Path, case: str) -> None:
    """``sbc check-config``: exit 1, one ``FILE: key.path: reason`` line per problem."""
    text, expected = BAD_CONFIGS[case]
    config = tmp_path / "bad.toml"
    config.write_text(text)
    proc = sbc("check-config", str(config))
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == "", proc.stdout
    lines = problem_lines(proc)
    assert len(lines) == len(expected), lines
    for line, start in zip(lines, expected, strict=True):
        assert line.startswith(f"{config}: {start}"), lines
        assert len(line) > len(f"{config}: {start}"), f"no reason given: {line!r}"


def test_check_config_ok(tmp_path: Path) -> None:
    config = tmp_path / "ok.toml"
    config.write_text('[access]\nlisten = ["udp://127.0.0.1:0"]\n')
    proc = sbc("check-config", str(config))
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"{config}: ok\n", "")
