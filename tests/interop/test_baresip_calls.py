"""Two real softphones call each other through the real SBC and a real Kamailio.

alice and bob are baresip 1.0 processes (see test_baresip.py for how they are driven), each
registered through the SBC to one Kamailio. alice dials bob: her INVITE reaches the SBC's
access side, its core leg goes to Kamailio, whose lookup sends it back along bob's Path to
the SBC, whose access leg reaches bob over the flow his REGISTER came on. bob answers by
itself (answermode=auto); alice hangs up. Both phones' SIP traces are read: neither sees the
other's Call-ID or tags, nor anything of the core (Kamailio's port, the SBC's core port) in
a header. The SBC's call records show both legs of both calls, answered and ended by BYE.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from .conftest import Certs, RegistrarFactory, SbcFactory
from .test_baresip import (  # noqa: F401 - the fixture is used by name
    Baresip,
    BaresipFactory,
    _backends,
    _header,
    baresip,
)

pytestmark = pytest.mark.interop

DOMAIN = "example.com"
CALL_TIMEOUT = 10.0


def _account(
    user: str, sbc_port: int, transport: str, *, answer: bool, password: str | None
) -> str:
    param = f";transport={transport}" if transport != "udp" else ""
    auto = ";answermode=auto" if answer else ""
    auth = f";auth_pass={password}" if password else ""
    outbound = f'outbound="sip:127.0.0.1:{sbc_port}{param}"'
    return f"<sip:{user}@{DOMAIN}{param}>;{outbound};regint=600{auto}{auth}"


def _calls(phone: Baresip, start: str) -> list[str]:
    """The SIP messages of calls in ``phone``'s trace (REGISTERs left out)."""
    return [m for m in phone.trace(start) if "REGISTER" not in _header(m, "CSeq")]


def _headers_only(message: str) -> str:
    return message.split("\n\n", 1)[0]


@pytest.mark.parametrize(
    ("transport", "password", "backend"),
    [
        ("udp", None, True),
        ("tls", None, True),
        ("udp", "s3cret-pw", True),
        ("udp", None, False),  # make run's default: the embedded registrar, nothing else
    ],
)
def test_baresip_alice_calls_bob_through_the_sbc(
    kamailio_registrars: RegistrarFactory,
    sbc_factory: SbcFactory,
    baresip: BaresipFactory,  # noqa: F811 - the fixture imported above
    certs: Certs,
    tmp_path: Path,
    transport: str,
    password: str | None,
    backend: bool,
) -> None:
    """With a password, Kamailio challenges (401 to REGISTER, 407 to INVITE) and the
    credentials pass through the SBC unchanged. Without a backend the SBC
    is the registrar and the call is one B2BUA call between two access legs (two
    softphones call each other with nothing else installed)."""
    registrar = kamailio_registrars(1, auth_password=password)[0] if backend else None
    records = tmp_path / "calls.jsonl"
    backends = _backends(registrar.uri) if registrar is not None else ""
    sbc = sbc_factory(extra=backends + f'\n[calls]\nrecords = "{records}"\n')
    port = sbc.tls4 if transport == "tls" else sbc.udp4
    alice, bob = baresip(cafile=certs.ca), baresip(cafile=certs.ca)
    bob.command("uanew", _account("bob", port, transport, answer=True, password=password))
    bob.wait_event("REGISTER_OK")
    alice.command("uanew", _account("alice", port, transport, answer=False, password=password))
    alice.wait_event("REGISTER_OK")
    if registrar is not None:
        assert sorted(registrar.aors()) == ["alice", "bob"]

    alice.command("dial", f"sip:bob@{DOMAIN}")
    alice.wait_event("CALL_ESTABLISHED", timeout=CALL_TIMEOUT)
    bob.wait_event("CALL_ESTABLISHED", timeout=CALL_TIMEOUT)
    time.sleep(0.5)  # a moment of the call (media flows directly until the relay exists)
    alice.command("hangup")
    alice.wait_event("CALL_CLOSED", timeout=CALL_TIMEOUT)
    bob.wait_event("CALL_CLOSED", timeout=CALL_TIMEOUT)

    if password:
        # Kamailio challenged alice's INVITE through the SBC; her second INVITE (same
        # Call-ID, CSeq + 1, Proxy-Authorization) got through.
        invites = _calls(alice, "INVITE sip:")
        assert any(m.startswith("SIP/2.0 407") for m in _received_raw(alice)), alice.explain()
        assert any("Proxy-Authorization:" in m for m in invites), invites
        assert len({_header(m, "Call-ID") for m in invites}) == 1, invites
    # Each phone saw its own leg only: the Call-IDs differ, the INVITE bob got is the SBC's.
    (invite_sent,) = {_header(m, "Call-ID"): m for m in _calls(alice, "INVITE sip:")}.values()
    (invite_got,) = {_header(m, "Call-ID"): m for m in _calls(bob, "INVITE sip:")}.values()
    assert _header(invite_sent, "Call-ID") != _header(invite_got, "Call-ID")
    alice_tag = re.search(r"tag=([^;>\s]+)", _header(invite_sent, "From"))
    assert alice_tag and alice_tag.group(1) not in invite_got
    # Nothing of the core in any header either phone received.
    core_port = sbc.extra_ports["core"]
    kam_port = registrar.port if registrar is not None else core_port
    for phone in (alice, bob):
        for message in _received(phone):
            head = _headers_only(message)
            assert f":{core_port}" not in head, head
            assert f":{kam_port}" not in head, head
            assert "kamailio" not in head.lower(), head
    # The SBC's records: two calls (alice -> Kamailio, Kamailio -> bob), both answered, BYE.
    deadline = time.monotonic() + 3.0
    # One call per SBC crossing (two through Kamailio, one without a backend); with auth,
    # first the INVITE that got the 407.
    expected = (2 if backend else 1) + (1 if password else 0)
    while time.monotonic() < deadline and len(_records(records)) < expected:
        time.sleep(0.1)
    lines = _records(records)
    assert len(lines) == expected, lines
    if password:
        assert lines[0]["status"] == 407 and lines[0]["answer"] is None, lines
        lines = lines[1:]
    assert all(r["status"] == 200 and r["answer"] is not None for r in lines), lines
    # alice hung up: her BYE ends the first call, and reaches the second through Kamailio
    # on its caller's side too.
    assert [r["cause"] for r in lines] == ["BYE from caller"] * len(lines), lines
    sides = sorted((r["legs"][0]["side"], r["legs"][1]["side"]) for r in lines)
    if backend:
        assert sides == [("access", "core"), ("core", "access")], lines
    else:
        assert sides == [("access", "access")], lines


def _received(phone: Baresip) -> list[str]:
    """Every SIP message of a call that ``phone`` received (its trace line is ``X -> ME``)."""
    out = []
    for message in phone.trace(""):
        first, _, rest = message.partition("\n")
        if "REGISTER" in _cseq_line(rest):
            continue
        local = first.split(" -> ")[-1]
        if local.startswith("127.0.0.1:") and _is_ours(phone, local):
            out.append(rest)
    return out


def _received_raw(phone: Baresip) -> list[str]:
    return [m.partition("\n")[2] for m in phone.trace("SIP/2.0 ")]


def _cseq_line(message: str) -> str:
    match = re.search(r"^CSeq:.*$", message, re.M | re.I)
    return match.group(0) if match else ""


def _is_ours(phone: Baresip, address: str) -> bool:
    """Whether ``address`` is one of the phone's own SIP sockets (the receiving side)."""
    return address in {
        line.split(" -> ")[0].split(" ", 1)[1]
        for line in (m.split("\n", 1)[0] for m in phone.trace("REGISTER sip:"))
    }


def _records(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
