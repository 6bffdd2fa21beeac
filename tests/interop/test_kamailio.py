"""The Kamailio registrar harness against real Kamailio 5.6, with no SBC in between.

The SBC is shown to offload registrations and fail over between two real Kamailio registrars;
these tests prove the backends themselves first: docker/kamailio/kamailio.cfg registers,
stores Path, routes a request for a user along its Path, answers the health probe, restarts
on the same ports, and two instances keep separate bindings; and the fixture reads them back
(``bindings()`` through kamcmd, ``stat()`` from Kamailio's counters).
"""

from __future__ import annotations

import re
import secrets
import socket
from pathlib import Path

import pytest

from . import sipwire
from .conftest import (
    KAMAILIO_SERVER,
    Registrar,
    RegistrarFactory,
    SippRunner,
    register_udp,
    write_users_csv,
)

pytestmark = pytest.mark.interop

USERS = [f"user{n:04d}" for n in range(1, 51)]


def test_sipp_registers_50_users(
    kamailio_registrars: RegistrarFactory, sipp: SippRunner, tmp_path: Path
) -> None:
    """SIPp registers 50 users from a CSV; Kamailio holds exactly those 50 AORs for 3600 s."""
    (registrar,) = kamailio_registrars(1)
    csv = write_users_csv(tmp_path / "users.csv", USERS)
    result = sipp(
        "register.xml",
        registrar.host,
        registrar.port,
        calls=len(USERS),
        rate=100,
        extra=("-inf", str(csv)),
    )
    result.assert_all_passed(len(USERS))

    bindings = registrar.bindings()
    assert sorted(bindings) == USERS
    for user, contacts in bindings.items():
        assert len(contacts) == 1, contacts
        (binding,) = contacts
        assert re.fullmatch(rf"sip:{user}@127\.0\.0\.1:\d+", str(binding["contact"])), binding
        assert isinstance(binding["expires"], int), binding
        assert 3590 <= binding["expires"] <= 3600, binding
        assert binding["path"] is None, binding
        assert binding["received"] is None, binding
        assert binding["user_agent"] == "sipp-register", binding
    # Kamailio's own counters agree: one REGISTER per user (plus any SIPp retransmission).
    retransmissions = result.count("Retransmissions(C)")
    assert registrar.stat("registrar:accepted_regs") == len(USERS)
    assert registrar.stat("core:rcv_requests_register") == len(USERS) + retransmissions
    assert registrar.stat("usrloc:registered_users") == len(USERS)


def test_path_is_stored_and_routes_requests(kamailio_registrars: RegistrarFactory) -> None:
    """A Path (RFC 3327) is stored without "Supported: path"; a request for the user goes to
    the first Path hop with the Path as its Route set; an unknown user gets 404."""
    (registrar,) = kamailio_registrars(1)
    path = "<sip:127.0.0.1:5999;lr>"
    response = register_udp(registrar.host, registrar.port, "alice", extra=(("Path", path),))
    assert response.status == 200, response.raw
    assert response.get("path") is None, response.raw  # path_mode 1: echoed only on request
    binding = registrar.bindings()["alice"][0]
    assert binding["path"] == path, binding
    assert binding["expires"] in range(3590, 3601), binding

    # With "Supported: path" the 200 carries the Path back (RFC 3327 5.3).
    with sipwire.udp_socket(registrar.host) as hop:
        hop_port = hop.getsockname()[1]
        hop_path = f"<sip:127.0.0.1:{hop_port};lr;ob>"
        response = register_udp(
            registrar.host,
            registrar.port,
            "bob",
            contact="sip:bob@192.168.1.20:5060",  # private: only reachable through the hop
            extra=(("Path", hop_path), ("Supported", "path")),
        )
        assert response.status == 200, response.raw
        assert response.get("path") == hop_path, response.raw
        assert registrar.bindings()["bob"][0]["path"] == hop_path

        # A MESSAGE for bob goes to the hop (the SBC, later), not to the private Contact.
        with sipwire.udp_socket(registrar.host) as caller:
            message = sipwire.request(
                target="bob@example.com",
                transport="udp",
                local=caller.getsockname()[:2],
                method="MESSAGE",
                extra=(("Content-Type", "text/plain"),),
                body=b"hello",
            )
            caller.sendto(message, (registrar.host, registrar.port))
            hop.settimeout(2.0)
            relayed = hop.recv(65535).decode()
            request_line, headers = relayed.split("\r\n", 1)
            assert request_line == "MESSAGE sip:bob@192.168.1.20:5060 SIP/2.0", relayed
            assert f"\r\nRoute: {hop_path}\r\n" in f"\r\n{headers}", relayed
            assert relayed.endswith("\r\n\r\nhello"), relayed

            # Unknown user: 404 from the registrar itself.
            unknown = sipwire.request(
                target="nobody@example.com",
                transport="udp",
                local=caller.getsockname()[:2],
                method="MESSAGE",
            )
            response = sipwire.udp_exchange(caller, (registrar.host, registrar.port), unknown)
            assert response.status == 404, response.raw
            assert response.get("server") == KAMAILIO_SERVER


def test_expires_limits(kamailio_registrars: RegistrarFactory) -> None:
    """The asked Expires is kept within min_expires 10 and max_expires 7200; 0 removes."""
    (registrar,) = kamailio_registrars(1)
    for user, asked, granted in [("a", 120, 120), ("b", 100000, 7200), ("c", 3, 10)]:
        response = register_udp(registrar.host, registrar.port, user, expires=asked)
        assert response.status == 200, response.raw
        assert f";expires={granted}" in (response.get("contact") or ""), response.raw
        expires = registrar.bindings()[user][0]["expires"]
        assert isinstance(expires, int) and granted - 10 <= expires <= granted, (user, expires)
    response = register_udp(
        registrar.host, registrar.port, "a", expires=0, contact="sip:a@127.0.0.1:1"
    )
    assert response.status == 200, response.raw
    assert "a" in registrar.bindings()  # another contact: still bound
    bindings = registrar.bindings()
    contact = str(bindings["a"][0]["contact"])
    response = register_udp(registrar.host, registrar.port, "a", expires=0, contact=contact)
    assert response.status == 200, response.raw
    assert "a" not in registrar.bindings()


def test_stop_then_start(kamailio_registrars: RegistrarFactory) -> None:
    """stop() ends it (no answer, bindings gone with it); start() brings it back on the same
    ports, answering OPTIONS over UDP and TCP again with an empty location table."""
    (registrar,) = kamailio_registrars(1)
    assert register_udp(registrar.host, registrar.port, "carol").status == 200
    assert list(registrar.bindings()) == ["carol"]
    first_pid, port, uri = registrar.pid, registrar.port, registrar.uri

    registrar.stop()
    assert registrar.pid is None
    assert not registrar.running
    with pytest.raises(OSError):
        registrar.options("udp", timeout=0.5)
    with pytest.raises(OSError):
        registrar.options("tcp", timeout=0.5)

    registrar.start()
    assert registrar.pid is not None
    assert registrar.pid != first_pid
    assert (registrar.port, registrar.uri) == (port, uri)
    for transport in ("udp", "tcp"):
        response = registrar.options(transport)
        assert response.status == 200, response.raw
        assert response.get("server") == KAMAILIO_SERVER
    assert registrar.bindings() == {}  # usrloc is in memory only (db_mode 0)
    assert registrar.stat("registrar:accepted_regs") == 0
    assert register_udp(registrar.host, registrar.port, "carol").status == 200
    assert list(registrar.bindings()) == ["carol"]
    assert "=== start 2:" in registrar.log()


def test_two_registrars_side_by_side(registrars: list[Registrar]) -> None:
    """Two instances, own ports, processes, control sockets and location tables."""
    first, second = registrars
    assert len({first.port, second.port}) == 2
    assert len({first.pid, second.pid}) == 2
    assert first.ctl_socket != second.ctl_socket
    assert first.uri == f"sip:127.0.0.1:{first.port}"

    for user in ("alice", "bob"):
        assert register_udp(first.host, first.port, user).status == 200
    assert register_udp(second.host, second.port, "carol").status == 200

    assert sorted(first.bindings()) == ["alice", "bob"]
    assert sorted(second.bindings()) == ["carol"]
    assert first.stat("registrar:accepted_regs") == 2
    assert second.stat("registrar:accepted_regs") == 1

    # One going down leaves the other serving.
    first.stop()
    assert second.options().status == 200
    assert sorted(second.bindings()) == ["carol"]


def test_bindings_beyond_kamcmd_reply_limit(
    kamailio_registrars: RegistrarFactory, sipp: SippRunner, tmp_path: Path
) -> None:
    """400 users over TCP: a full ul.dump of them is over kamcmd's 128 KB reply limit
    ("ERROR: reply too big"), and bindings() still reads every one (ul.dump brief, then
    ul.lookup for each AOR, in one kamcmd session)."""
    (registrar,) = kamailio_registrars(1)
    users = [f"tcp{n:04d}" for n in range(400)]
    domain = f"{secrets.token_hex(3)}.example.com"
    csv = write_users_csv(tmp_path / "users.csv", users, domain)
    result = sipp(
        "register.xml",
        registrar.host,
        registrar.port,
        transport="t1",
        calls=len(users),
        rate=800,
        extra=("-inf", str(csv)),
    )
    result.assert_all_passed(len(users))
    bindings = registrar.bindings()
    assert sorted(bindings) == users
    assert all(len(contacts) == 1 for contacts in bindings.values())
    assert {str(contacts[0]["socket"]) for contacts in bindings.values()} == {
        f"tcp:127.0.0.1:{registrar.port}"
    }


def _header(message: str, name: str) -> list[str]:
    """Every value of header ``name`` in a raw SIP message (no compact forms needed here)."""
    head = message.split("\r\n\r\n", 1)[0]
    return [
        line.split(":", 1)[1].strip()
        for line in head.split("\r\n")[1:]
        if line.split(":", 1)[0].strip().lower() == name.lower()
    ]


def _recv(sock: socket.socket, timeout: float = 2.0) -> str:
    """The next datagram that is not a 100 Trying."""
    sock.settimeout(timeout)
    while True:
        data = sock.recv(65535).decode()
        if not data.startswith("SIP/2.0 100 "):
            return data


def test_dialog_is_record_routed(kamailio_registrars: RegistrarFactory) -> None:
    """INVITE to a registered user is record-routed; ACK and BYE follow the route set through
    the registrar (loose_route) to the callee, and the BYE's 200 comes back: no loop."""
    (registrar,) = kamailio_registrars(1)
    kam = (registrar.host, registrar.port)
    with sipwire.udp_socket(registrar.host) as alice, sipwire.udp_socket(registrar.host) as bob:
        a, b = (sipwire.hostport(*s.getsockname()[:2]) for s in (alice, bob))
        assert register_udp(*kam, "bob", contact=f"sip:bob@{b}").status == 200
        call_id, ftag = f"{secrets.token_hex(6)}@interop", secrets.token_hex(4)

        def request(method: str, uri: str, cseq: int, to_tag: str = "", route: str = "") -> str:
            lines = [
                f"{method} {uri} SIP/2.0",
                f"Via: SIP/2.0/UDP {a};branch=z9hG4bK{secrets.token_hex(6)};rport",
                "Max-Forwards: 70",
                f"From: <sip:alice@example.com>;tag={ftag}",
                f"To: <sip:bob@example.com>{f';tag={to_tag}' if to_tag else ''}",
                f"Call-ID: {call_id}",
                f"CSeq: {cseq} {method}",
                f"Contact: <sip:alice@{a}>",
                *([f"Route: {route}"] if route else []),
                "Content-Length: 0",
            ]
            return "\r\n".join(lines) + "\r\n\r\n"

        def answer(req: str, to_tag: str) -> str:
            # RFC 3261 8.2.6.2 / 12.1.1: Via, Record-Route, From, Call-ID, CSeq copied.
            lines = ["SIP/2.0 200 OK"]
            lines += [f"Via: {v}" for v in _header(req, "Via")]
            lines += [f"Record-Route: {r}" for r in _header(req, "Record-Route")]
            lines += [f"From: {_header(req, 'From')[0]}"]
            lines += [f"To: {_header(req, 'To')[0]};tag={to_tag}"]
            lines += [f"Call-ID: {call_id}", f"CSeq: {_header(req, 'CSeq')[0]}"]
            lines += [f"Contact: <sip:bob@{b}>", "Content-Length: 0"]
            return "\r\n".join(lines) + "\r\n\r\n"

        alice.sendto(request("INVITE", "sip:bob@example.com", 1).encode(), kam)
        invite = _recv(bob)
        assert invite.startswith(f"INVITE sip:bob@{b} SIP/2.0\r\n"), invite
        (record_route,) = _header(invite, "Record-Route")
        assert record_route.startswith(f"<sip:127.0.0.1:{registrar.port};lr"), invite
        bob.sendto(answer(invite, "bobtag").encode(), kam)
        ok = _recv(alice)
        assert ok.startswith("SIP/2.0 200 OK\r\n"), ok
        assert _header(ok, "Record-Route") == [record_route], ok

        # In-dialog: Request-URI is bob's Contact, the route set is the Record-Route.
        alice.sendto(request("ACK", f"sip:bob@{b}", 1, "bobtag", record_route).encode(), kam)
        ack = _recv(bob)
        assert ack.startswith(f"ACK sip:bob@{b} SIP/2.0\r\n"), ack
        assert _header(ack, "Route") == [], ack  # loose_route removed its own entry
        alice.sendto(request("BYE", f"sip:bob@{b}", 2, "bobtag", record_route).encode(), kam)
        bye = _recv(bob)
        assert bye.startswith(f"BYE sip:bob@{b} SIP/2.0\r\n"), bye
        bob.sendto(answer(bye, "bobtag").encode(), kam)
        bye_ok = _recv(alice)
        assert bye_ok.startswith("SIP/2.0 200 OK\r\n"), bye_ok
        assert _header(bye_ok, "CSeq") == ["2 BYE"], bye_ok
    assert registrar.stat("core:drop_requests") == 0
