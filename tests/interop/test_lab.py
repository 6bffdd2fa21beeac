"""`make lab` in CI: the lab driver (tests/interop/lab.py) run as `make lab` runs it,
its report checked; and stopped half-way, it leaves nothing behind."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import require
from .test_nat import require_netns

REPO = Path(__file__).resolve().parents[2]
LAB_TIMEOUT = 120  # the lab bounds itself to 90 s, teardown included


def lab_command(workdir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tests.interop.lab", "--workdir", str(workdir), *extra]


@pytest.fixture
def lab_peers() -> None:
    require_netns()
    for program in ("kamailio", "kamcmd", "baresip", "sox", "tshark"):
        require(program)


def leftovers(pid: int, workdir: Path) -> list[str]:
    """Namespaces named after the lab process, and processes still running from its work
    directory or on the lab's core addresses (Kamailio's command line names them)."""
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    left = [line for line in names.splitlines() if f"-{pid}-" in line]
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(workdir) in cmdline or "udp:10.200.2.1" in cmdline:
            left.append(f"pid {proc.name}: {cmdline}")
    return left


def test_make_lab(lab_peers: None, tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    workdir = tmp_path / "lab"
    started = time.monotonic()
    proc = subprocess.Popen(
        lab_command(workdir, "--json", str(report_path), "--keep"),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=LAB_TIMEOUT)
    finally:
        if proc.poll() is None:  # only if the lab broke its own bound
            proc.kill()
            proc.wait()
    took = time.monotonic() - started
    print(out)
    print(err[-8000:])
    assert proc.returncode == 0, out + err[-8000:]
    report = json.loads(report_path.read_text())
    assert report["ok"] and report["error"] is None, report
    assert took < 90, took

    # Both registered over TLS through the NAT, on one Kamailio each, copied to the other.
    assert set(report["registrations"]) == {"alice", "bob"}, report
    for reg in report["registrations"].values():
        assert reg["public"].startswith("203.0.113.1:"), reg
        assert {reg["backend"], reg["replicated"]} == {"kamailio1", "kamailio2"}, reg
    assert report["call"]["backend"] in ("kamailio1", "kamailio2"), report
    assert report["call"]["alice_suite"].startswith("AES_CM_128_HMAC_SHA1"), report

    # Each heard the other's tone (alice sends 1000 Hz, bob 1500 Hz: the compose file's).
    assert abs(report["audio"]["bob"]["frequency"] - 1000) <= 10, report["audio"]
    assert abs(report["audio"]["alice"]["frequency"] - 1500) <= 10, report["audio"]

    # Both phones' legs, both ways: SRTP (noise as G.711), the tone once decrypted.
    assert set(report["srtp"]) == {"alice->sbc", "sbc->alice", "bob->sbc", "sbc->bob"}
    for leg in report["srtp"].values():
        assert leg["packets"] >= 50 and leg["as_pcmu"] < 0.3 and leg["decrypted"] > 0.9, leg
    assert "result       PASS" in out, out
    assert not leftovers(proc.pid, workdir), leftovers(proc.pid, workdir)


def test_make_lab_stopped_half_way_leaves_nothing(lab_peers: None, tmp_path: Path) -> None:
    """SIGTERM while it builds (Kamailio and the SBC starting): it tears down and says so."""
    workdir = tmp_path / "lab"
    proc = subprocess.Popen(
        lab_command(workdir), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 20
        # Once the SBC's config is written, the namespaces and Kamailio are up.
        while not (workdir / "config" / "sbc.toml").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (workdir / "config" / "sbc.toml").exists(), "the lab never got to the SBC"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, (proc.returncode, out, err[-4000:])
    assert "result       FAIL" in out and "KeyboardInterrupt" in out, out
    assert not leftovers(proc.pid, workdir), leftovers(proc.pid, workdir)
