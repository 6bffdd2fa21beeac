"""SBC-to-SBC peering over TLS between two real SBCs.

SBC "home" has a ``[[peers]]`` entry for partner.example pointing at SBC "partner"'s core TLS
port; "partner" runs without backends, so its embedded registrar holds bob, a SIPp UAS.
SIPp (alice) calls sip:bob@partner.example at home's access side: home routes the call to
its peer over TLS (verifying partner's certificate against the dev CA and presenting its own),
partner recognises a peer and delivers the call to bob. Both SBCs write a call record naming
the legs' sides; bob's messages name neither alice's Call-ID nor home's address.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
from pathlib import Path

import pytest

from .conftest import UDP, PortPool, SbcFactory, SippRunner, require, udp_bound, wait_until
from .phones import CALL_TIMEOUT

pytestmark = pytest.mark.interop


def _register_from(port: int, sbc_port: int, user: str, domain: str) -> str:
    """REGISTER user@domain at the SBC from 127.0.0.1:port (where the UAS will listen)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", port))
        sock.settimeout(3.0)
        lines = [
            f"REGISTER sip:{domain} SIP/2.0",
            f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK-peer-reg;rport",
            "Max-Forwards: 70",
            f"From: <sip:{user}@{domain}>;tag=reg1",
            f"To: <sip:{user}@{domain}>",
            "Call-ID: peer-reg@127.0.0.1",
            "CSeq: 1 REGISTER",
            f"Contact: <sip:{user}@127.0.0.1:{port}>",
            "Expires: 600",
            "Content-Length: 0",
        ]
        sock.sendto(("\r\n".join(lines) + "\r\n\r\n").encode(), ("127.0.0.1", sbc_port))
        while True:
            data = sock.recv(65535).decode()
            if not data.startswith("SIP/2.0 1"):
                return data


def _records(path: Path, count: int) -> list[dict[str, object]]:
    """The call records in ``path`` once ``count`` are written (they are flushed every
    0.5 s)."""

    def lines() -> list[str]:
        return path.read_text().splitlines() if path.exists() else []

    wait_until(
        f"{count} call record(s) in {path.name}",
        lambda: len(lines()) >= count,
        CALL_TIMEOUT,
        lambda: "\n".join(lines()),
    )
    return [json.loads(line) for line in lines()]


def test_call_to_a_peer_domain_crosses_to_the_peer_sbc_over_tls(
    sbc_factory: SbcFactory, sipp: SippRunner, tmp_path: Path
) -> None:
    binary = require("sipp")
    partner_records, home_records = tmp_path / "partner.jsonl", tmp_path / "home.jsonl"
    # partner takes TLS connections from 127.0.0.1 as from its peer (home).
    partner = sbc_factory(
        extra=f"""
[calls]
records = "{partner_records}"

[[peers]]
name = "home"
uri = "sip:127.0.0.1:5061;transport=tls"
domains = ["home.example"]
"""
    )
    home = sbc_factory(
        extra=f"""
[calls]
records = "{home_records}"

[[peers]]
name = "partner"
uri = "sip:127.0.0.1:{partner.extra_ports["core_tls"]};transport=tls"
domains = ["partner.example"]
"""
    )
    pool = PortPool()
    uas_port = pool.port("127.0.0.1", UDP)
    media_port = pool.block("127.0.0.1", 4)  # not SIPp's fixed 6000: another may hold it
    pool.release()
    answer = _register_from(uas_port, partner.udp4, "bob", "partner.example")
    assert answer.startswith("SIP/2.0 200"), answer
    uas_log = tmp_path / "uas-messages.log"
    uas = subprocess.Popen(
        [
            binary,
            "-sn",
            "uas",
            "-i",
            "127.0.0.1",
            "-p",
            str(uas_port),
            "-mp",
            str(media_port),
            "-t",
            "u1",
            "-m",
            "1",
            "-timeout",
            "20",
            "-timeout_error",
            "-nostdin",
            "-trace_msg",
            "-message_file",
            str(uas_log),
        ],
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(
            f"sipp UAS listening on 127.0.0.1:{uas_port}",
            lambda: udp_bound("127.0.0.1", uas_port) or uas.poll() is not None,
            CALL_TIMEOUT,
            lambda: uas_log.read_text() if uas_log.exists() else "",
        )
        assert uas.poll() is None, f"sipp UAS exited with {uas.returncode}"
        result = sipp("peer_uac.xml", "127.0.0.1", home.udp4, timeout=15)
        result.assert_all_passed(1)
        assert uas.wait(timeout=10) == 0, uas_log.read_text() if uas_log.exists() else ""
    finally:
        if uas.poll() is None:
            uas.kill()
            uas.wait(timeout=5)

    # What bob got: the partner SBC's leg, with nothing of alice's or home's ids.
    bob_saw = uas_log.read_text()
    alice_call_id = re.search(r"^Call-ID: *(\S+)", result.messages, re.M)
    assert alice_call_id and alice_call_id.group(1) not in bob_saw
    for port in (home.udp4, home.extra_ports["core"], home.extra_ports["core_tls"]):
        assert f"127.0.0.1:{port}" not in bob_saw, bob_saw
    # Both SBCs recorded the call: home access -> peer, partner peer -> access.
    (home_call,) = _records(home_records, 1)
    (partner_call,) = _records(partner_records, 1)
    for record in (home_call, partner_call):
        assert record["status"] == 200 and record["cause"] == "BYE from caller", record
    legs = home_call["legs"]
    assert isinstance(legs, list) and [leg["side"] for leg in legs] == ["access", "peer"]
    assert legs[1]["flow"].startswith("tls:127.0.0.1:")
    legs = partner_call["legs"]
    assert isinstance(legs, list) and [leg["side"] for leg in legs] == ["peer", "access"]
    assert legs[0]["flow"].startswith("tls:127.0.0.1:")
