"""sipsak (a second, independent SIP stack: C and GnuTLS) sends OPTIONS to the real SBC.

sipsak 0.9.8 quirks seen here, none of them the SBC's:
- it truncates a 5-digit port in the Request-URI and To it builds (sip:127.0.0.1:2506 for
  port 25060); the host is still the SBC's, so the OPTIONS is still addressed to it;
- it cannot parse an IPv6 reference in ``-s`` ("'[' is unresolvable"): IPv6 is SIPp's job;
- over TLS it checks the certificate against "HOST:PORT" (port included), which no
  certificate matches, so ``--tls-ignore-cert-failure`` is needed (test_transport.py
  verifies the certificate with Python's ssl instead);
- over TLS 1.3 it gives up with "select returned error" when the server's NewSessionTicket
  arrives before the response, so its GnuTLS is limited to TLS 1.2 through a priority
  override file (the SBC's own defaults stay as they are: min_version = "1.2").
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from .conftest import SERVER_HEADER, Certs, SbcProcess

pytestmark = pytest.mark.interop


def run_sipsak(
    sipsak: str, uri: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    # -vv prints the whole reply; sipsak's own retransmissions stop after a few seconds.
    return subprocess.run(
        [sipsak, "-vv", "-s", uri, *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=15,
        env=env,
    )


def check_reply(proc: subprocess.CompletedProcess[str]) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out  # sipsak: 0 = a 200 came back
    assert "SIP/2.0 200 OK" in out, out
    assert f"Server: {SERVER_HEADER}" in out, out


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_sipsak_options(sbc: SbcProcess, sipsak: str, transport: str) -> None:
    uri = f"sip:{sbc.host4}:{sbc.udp4}"
    args = () if transport == "udp" else ("--transport=tcp",)
    check_reply(run_sipsak(sipsak, uri, *args))


def test_sipsak_options_tls(sbc: SbcProcess, sipsak: str, certs: Certs, tmp_path: Path) -> None:
    priority = tmp_path / "gnutls-tls12.conf"
    priority.write_text("[overrides]\ndisabled-version = tls1.3\n")
    env = {**os.environ, "GNUTLS_SYSTEM_PRIORITY_FILE": str(priority)}
    proc = run_sipsak(
        sipsak,
        f"sip:{sbc.host4}:{sbc.tls4}",
        "--transport=tls",
        f"--tls-ca-cert={certs.ca}",
        "--tls-ignore-cert-failure",
        env=env,
    )
    check_reply(proc)
