"""Registration through the real SBC to two real Kamailio registrars.

SIPp registers users through ``sbc run``; the SBC spreads them over the backends by a hash
of the AOR, adds a Path with a flow token, tells clients a short expiry and the backends a
long one, and answers unchanged refreshes itself. A backend that dies is probed down and new
registrations go to the survivor, and the SBC re-registers the dead backend's users there
from its cache; when it returns it is probed up and takes new registrations back.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from . import sipwire
from .conftest import (
    RegistrarFactory,
    SbcFactory,
    SippRunner,
    backends_config,
    register_udp,
    write_users_csv,
)

USERS = [f"user{i:04d}" for i in range(1, 401)]
REFRESHES_PER_USER = 4  # register_offload.xml: one REGISTER, then four unchanged refreshes


def registers_received(registrar: object) -> int:
    return int(registrar.stat("core:rcv_requests_register"))  # type: ignore[attr-defined]


def test_registrations_spread_offloaded_and_pathed(
    kamailio_registrars: RegistrarFactory,
    sbc_factory: SbcFactory,
    sipp: SippRunner,
    tmp_path: Path,
) -> None:
    r0, r1 = kamailio_registrars(2)
    sbc = sbc_factory(
        core="probe_interval = 1.0",
        extra=backends_config(r0.uri, r1.uri)
        + "\n[registration]\nbackend_expires = 3600\n\n[registration.client_expires]\nudp = 60\n",
    )
    before = registers_received(r0) + registers_received(r1)  # the fixtures' own probes/tests
    csv = write_users_csv(tmp_path / "users.csv", USERS)
    result = sipp(
        "register_offload.xml",
        sbc.host4,
        sbc.udp4,
        calls=len(USERS),
        rate=200,
        extra=("-inf", str(csv)),
        timeout=30.0,
    )
    result.assert_all_passed(len(USERS))

    b0, b1 = r0.bindings(), r1.bindings()
    # Every user on exactly one backend, and the two halves even. The split is a fair coin
    # per user (rendezvous hashing over the backends' URIs, whose ports change from run to
    # run), so |b0 - b1| has a standard deviation of sqrt(N) = 20 here: 10 % of N (2 sigma)
    # failed about one run in twenty; a quarter of N is 5 sigma and still fails a balancer
    # that sends most users to one backend.
    assert not set(b0) & set(b1)
    assert sorted(set(b0) | set(b1)) == USERS
    assert abs(len(b0) - len(b1)) <= 0.25 * len(USERS), (len(b0), len(b1))
    core_port = sbc.extra_ports["core"]
    for contacts in (*b0.values(), *b1.values()):
        (binding,) = contacts
        # RFC 3327: the Path names the SBC's core side, with a flow token and ;lr.
        assert re.fullmatch(rf"<sip:[a-z2-7]+@127\.0\.0\.1:{core_port};lr>", str(binding["path"]))
        # The backend was asked for the long expiry (3600 less up to 10 % spread).
        assert 3240 - 10 <= int(binding["expires"]) <= 3600, binding
    # Offload: the backends saw the first REGISTER of each user, not the refreshes (a few
    # more if a slow answer made the SBC retransmit one: RFC 3261 timer E).
    received = registers_received(r0) + registers_received(r1) - before
    sent_by_clients = len(USERS) * (1 + REFRESHES_PER_USER)
    assert len(USERS) <= received <= len(USERS) * 1.05, (received, sent_by_clients)


def test_dead_backend_is_avoided_and_comes_back(
    kamailio_registrars: RegistrarFactory, sbc_factory: SbcFactory
) -> None:
    r0, r1 = kamailio_registrars(2)
    sbc = sbc_factory(
        core="probe_interval = 0.5\nprobe_failures = 2\nprobe_successes = 2",
        extra=backends_config(r0.uri, r1.uri),
    )
    # Find users that hash to r0 while both are up.
    for user in USERS[:40]:
        assert register_udp(sbc.host4, sbc.udp4, user).status == 200
    on_r0 = sorted(r0.aors())
    assert on_r0 and sorted(r1.aors())
    r0.stop()
    # probe_interval x probe_failures + a margin: the SBC marks r0 down by itself.
    wait_for_log(sbc, "backend down", 0.5 * 2 + 5.0)
    # Registration recovery: r0's users are registered on r1 by the SBC, from its cache,
    # without waiting for the clients to refresh.
    deadline = time.monotonic() + 3.0
    while not set(on_r0) <= set(r1.aors()):
        assert time.monotonic() < deadline, sorted(set(on_r0) - set(r1.aors()))
        time.sleep(0.1)
    for contacts in (r1.bindings()[user] for user in on_r0):
        assert any(str(c["path"]).endswith(f":{sbc.extra_ports['core']};lr>") for c in contacts)
    response = register_udp(sbc.host4, sbc.udp4, on_r0[0], expires=600, timeout=3.0)
    assert response.status == 200 and on_r0[0] in r1.aors()
    # r0 returns: after probe_successes good probes it takes its users again.
    r0.start()
    wait_for_log(sbc, "backend up", 0.5 * 2 + 5.0)
    response = register_udp(sbc.host4, sbc.udp4, on_r0[1], expires=600, timeout=3.0)
    assert response.status == 200 and on_r0[1] in r0.aors()


def wait_for_log(sbc: object, text: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while text not in sbc.log():  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, f"no {text!r} within {seconds} s"
        time.sleep(0.1)


def test_message_from_the_backend_reaches_the_registered_client(
    kamailio_registrars: RegistrarFactory, sbc_factory: SbcFactory
) -> None:
    """Kamailio routes by the stored Path; the SBC sends over the client's flow."""
    (registrar,) = kamailio_registrars(1)
    sbc = sbc_factory(extra=backends_config(registrar.uri))
    with sipwire.udp_socket(sbc.host4) as client, sipwire.udp_socket(sbc.host4) as sender:
        # The client registers from its socket with a Contact that is NOT where it listens
        # (as behind NAT): requests must come back over the flow, not to the Contact.
        local = sipwire.hostport(*client.getsockname()[:2])
        register = "\r\n".join(
            [
                f"REGISTER sip:{sipwire.hostport(sbc.host4, sbc.udp4)} SIP/2.0",
                f"Via: SIP/2.0/UDP {local};branch=z9hG4bK-carol1;rport",
                "Max-Forwards: 70",
                "From: <sip:carol@example.com>;tag=c1",
                "To: <sip:carol@example.com>",
                "Call-ID: carol-reg@interop",
                "CSeq: 1 REGISTER",
                "Contact: <sip:carol@192.168.1.50:5060>",
                "Expires: 600",
                "Content-Length: 0",
            ]
        )
        client.settimeout(3.0)
        client.sendto((register + "\r\n\r\n").encode(), (sbc.host4, sbc.udp4))
        assert sipwire.parse_response(client.recv(65535)).status == 200
        # Someone in the core sends a MESSAGE for carol to the registrar.
        message = sipwire.request(
            target="carol@example.com",
            transport="udp",
            local=sender.getsockname()[:2],
            method="MESSAGE",
            extra=(("Content-Type", "text/plain"),),
            body=b"hello carol",
        )
        sender.settimeout(3.0)
        sender.sendto(message, (registrar.host, registrar.port))
        data, source = client.recvfrom(65535)
        assert source == (sbc.host4, sbc.udp4), source  # from the SBC's access side
        assert data.startswith(b"MESSAGE sip:carol@192.168.1.50:5060 SIP/2.0\r\n"), data[:80]
        assert data.endswith(b"hello carol") and b"\r\nRoute:" not in data
        # The client answers over the same flow; the answer reaches the sender.
        head = data.split(b"\r\n\r\n", 1)[0].decode()
        keep = [
            line
            for line in head.split("\r\n")[1:]
            if line.split(":", 1)[0].lower() in ("via", "from", "to", "call-id", "cseq")
        ]
        ok = "\r\n".join(["SIP/2.0 200 OK", *keep, "Content-Length: 0"]) + "\r\n\r\n"
        client.sendto(ok.encode(), source)
        while True:
            response = sipwire.parse_response(sender.recv(65535))
            if response.status >= 200:
                break
        assert response.status == 200


def test_registration_relayed_over_tcp_to_the_backend(
    kamailio_registrars: RegistrarFactory, sbc_factory: SbcFactory
) -> None:
    """A backend URI with ;transport=tcp: probes and REGISTERs go over one TCP connection the
    SBC opens and reuses; the client still talks UDP to the SBC."""
    (registrar,) = kamailio_registrars(1)
    sbc = sbc_factory(extra=backends_config(f"{registrar.uri};transport=tcp"))
    for user in ("tina", "tom"):
        assert register_udp(sbc.host4, sbc.udp4, user).status == 200
    bindings = registrar.bindings()
    assert sorted(bindings) == ["tina", "tom"]
    for contacts in bindings.values():
        (binding,) = contacts
        assert str(binding.get("socket", "")).startswith("tcp:"), binding  # arrived over TCP
    assert "cannot connect" not in sbc.log()
