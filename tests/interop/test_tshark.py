"""tshark, an independent dissector, reads the SBC's answers off the wire."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import pytest

from .conftest import SERVER_HEADER, SbcProcess, SippRunner

pytestmark = pytest.mark.interop

CALLS = 5


def test_tshark_decodes_five_200s(
    sbc: SbcProcess, sipp: SippRunner, tshark: str, tmp_path: Path
) -> None:
    """5 OPTIONS from SIPp over UDP: on lo, tshark decodes 5 requests and 5 SIP 200s."""
    pcap = tmp_path / "sip.pcap"
    # Stops by itself after the 10 packets expected, or after 10 s at the latest. Not the
    # queue probes the SBC sends its listener from the listener itself (docs/operations.md).
    port = sbc.udp4
    probes = f"(udp src port {port} and udp dst port {port})"
    args = [tshark, "-i", "lo", "-f", f"udp port {port} and not {probes}", "-c", str(2 * CALLS)]
    capture = subprocess.Popen(
        [*args, "-a", "duration:10", "-w", str(pcap)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
    )
    lines: list[str] = []
    started = threading.Event()

    def read_stderr() -> None:
        assert capture.stderr is not None
        for line in capture.stderr:
            lines.append(line)
            if "Capturing on" in line:
                started.set()
        started.set()  # tshark ended: stop waiting either way

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        assert started.wait(10), "tshark did not start capturing within 10 s"
        assert capture.poll() is None, f"tshark exited early: {''.join(lines)}"
        result = sipp("options.xml", sbc.host4, sbc.udp4, transport="u1", calls=CALLS, rate=20)
        result.assert_all_passed(CALLS)
        capture.wait(timeout=15)
    finally:
        if capture.poll() is None:
            capture.terminate()
            try:
                capture.wait(timeout=5)
            except subprocess.TimeoutExpired:
                capture.kill()
                capture.wait(timeout=5)
        reader.join(timeout=5)
    assert capture.returncode == 0, "".join(lines)

    def decode(display_filter: str, *fields: str) -> list[str]:
        args = [tshark, "-r", str(pcap), "-d", f"udp.port=={sbc.udp4},sip"]
        args += ["-Y", display_filter, "-T", "fields"]
        for name in fields:
            args += ["-e", name]
        out = subprocess.run(args, capture_output=True, text=True, errors="replace", timeout=30)
        assert out.returncode == 0, out.stderr
        return out.stdout.splitlines()

    requests = decode('sip.Method == "OPTIONS"', "sip.Method", "udp.dstport")
    assert requests == [f"OPTIONS\t{sbc.udp4}"] * CALLS, requests
    answers = decode("sip.Status-Code == 200", "sip.Status-Code", "sip.CSeq.method", "sip.Server")
    assert answers == [f"200\tOPTIONS\t{SERVER_HEADER}"] * CALLS, answers
