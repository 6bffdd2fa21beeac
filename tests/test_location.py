"""The embedded registrar used when no backend is configured (RFC 3261 10.3)."""

from __future__ import annotations

import pytest
from sipdata import sip
from test_registration import ACCESS, CLIENT, REGISTER, sent

from sbc.core import CoreSettings, SbcCore
from sbc.features.registrar import LocationService, RegisterRefused
from sbc.sides import Side
from sbc.sip.flow import Flow
from sbc.sip.headers import parse_name_addr, parse_name_addr_list
from sbc.sip.message import Request, Response, make_response
from sbc.sip.parser import parse_message

A = parse_name_addr("<sip:alice@10.0.0.7:5060>")
B = parse_name_addr("<sip:alice@10.0.0.8:5060>;expires=30")
AOR = "sip:alice@example.com"


def register(
    loc: LocationService,
    *contacts: object,
    cseq: int,
    expires: int = 3600,
    call_id: str = "c1",
    now: float = 0.0,
) -> list[tuple[str, int]]:
    got = loc.register(
        aor=AOR,
        contacts=contacts,
        flow=CLIENT,
        call_id=call_id,
        cseq=cseq,
        expires=expires,
        now=now,
    )  # type: ignore[arg-type]
    return sorted((str(c.uri), s) for c, s in got)


def test_bindings_are_added_refreshed_and_removed() -> None:
    loc = LocationService()
    assert register(loc, A, B, cseq=1, expires=60) == [
        ("sip:alice@10.0.0.7:5060", 60),
        ("sip:alice@10.0.0.8:5060", 30),
    ]
    assert register(loc, A, cseq=2, expires=60, now=20.0) == [
        ("sip:alice@10.0.0.7:5060", 60),
        ("sip:alice@10.0.0.8:5060", 10),
    ]
    assert register(loc, cseq=3, now=40.0) == [("sip:alice@10.0.0.7:5060", 40)]  # B expired
    assert register(loc, A, cseq=4, expires=0, now=41.0) == []
    assert len(loc) == 0


def test_out_of_order_cseq_and_star() -> None:
    loc = LocationService()
    register(loc, A, cseq=5)
    with pytest.raises(RegisterRefused) as err:
        register(loc, A, cseq=5)  # RFC 3261 10.3 step 7: same Call-ID, CSeq not higher
    assert err.value.status == 500
    register(loc, A, cseq=1, call_id="other")  # another Call-ID: updated
    (star,) = parse_name_addr_list("*")
    with pytest.raises(RegisterRefused):
        register(loc, star, cseq=9, expires=60)  # step 6: * needs Expires 0
    assert register(loc, star, cseq=9, expires=0, call_id="z") == []


def test_make_run_style_core_registers_and_delivers_messages() -> None:
    core = SbcCore(CoreSettings(local_hosts=frozenset({"127.0.0.1"})))
    core.add_listener(Side.ACCESS, "udp", ACCESS)
    [(to, resp)] = sent(core.receive_datagram(sip(REGISTER.format(n=1, user="alice")), CLIENT, 0.0))
    assert isinstance(resp, Response) and resp.status == 200 and to == CLIENT
    [contact] = resp.contact
    assert str(contact.uri) == "sip:alice@10.0.0.7:5060" and contact.param("expires") == "60"
    assert resp.get("date")
    bob = Flow("udp", ACCESS, ("198.51.100.3", 5062))
    message = (
        b"MESSAGE sip:alice@example.com SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP 198.51.100.3:5062;branch=z9hG4bK-m1;rport\r\n"
        b"Max-Forwards: 70\r\nFrom: <sip:bob@example.com>;tag=b\r\nTo: <sip:alice@example.com>\r\n"
        b"Call-ID: m1@bob\r\nCSeq: 1 MESSAGE\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nhi"
    )
    [(flow, fwd)] = sent(core.receive_datagram(message, bob, 1.0))
    # Over alice's NAT flow, to her contact (RFC 3261 16.5), never to 10.0.0.7 directly.
    assert flow == CLIENT and isinstance(fwd, Request) and str(fwd.uri) == "sip:alice@10.0.0.7:5060"
    [(back, ok)] = sent(
        core.receive_datagram(bytes(make_response(fwd, 200, to_tag="a")), CLIENT, 1.1)
    )
    assert back.remote == ("198.51.100.3", 5062) and isinstance(ok, Response) and ok.status == 200
    [(_, nobody)] = sent(
        core.receive_datagram(
            message.replace(b"sip:alice@", b"sip:zoe@", 1).replace(b"-m1", b"-m2"), bob, 1.2
        )
    )
    assert isinstance(nobody, Response) and nobody.status == 404


def test_embedded_registrar_never_leaks_on_mutated_traffic() -> None:
    """Seeded mutations of REGISTERs and MESSAGEs to registered users, over UDP and TCP:
    what reaches the registered client parses, and no transaction is left behind."""
    import random

    from sbc.actions import Close, SendData

    rng = random.Random(5626)
    core = SbcCore(CoreSettings(local_hosts=frozenset({"127.0.0.1"})))
    core.add_listener(Side.ACCESS, "udp", ACCESS)
    register = sip(REGISTER.format(n=1, user="alice"))
    message = (
        b"MESSAGE sip:alice@example.com SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP 198.51.100.3:5062;branch=z9hG4bK-m1;rport\r\n"
        b"Max-Forwards: 70\r\nFrom: <sip:bob@example.com>;tag=b\r\nTo: <sip:alice@example.com>\r\n"
        b"Call-ID: m1@bob\r\nCSeq: 1 MESSAGE\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nhi"
    )
    bob = Flow("udp", ACCESS, ("198.51.100.3", 5062))
    tcp = Flow("tcp", ACCESS, ("198.51.100.4", 40000), conn_id=1)
    now = 0.0
    for i in range(2000):
        now += 0.05
        data = bytearray(rng.choice([register, message]))
        for _ in range(rng.randint(0, 4)):
            pos = rng.randrange(len(data))
            if rng.random() < 0.6:
                data[pos] = rng.randrange(32, 127)
            else:
                data[pos:pos] = rng.choice([b";", b",", b"<", b"\r\n", b" ", b":"])
        if i % 3 == 0:
            actions = core.receive_stream(bytes(data), tcp, now)
            if any(isinstance(a, Close) for a in actions):
                core.connection_closed(tcp)
        else:
            actions = core.receive_datagram(
                bytes(data), CLIENT if data.startswith(b"REG") else bob, now
            )
        for a in actions + core.handle_timer(now):
            # the registered client answers what reaches it, sometimes
            if (
                isinstance(a, SendData)
                and a.flow == CLIENT
                and a.data.startswith(b"MESSAGE")
                and rng.random() < 0.5
            ):
                # What the registrar relays is well-formed SIP whatever it received: it
                # parses (a ParseError here fails the test).
                req = parse_message(a.data)
                if isinstance(req, Request):
                    core.receive_datagram(bytes(make_response(req, 200, to_tag="a")), CLIENT, now)
    for t in (now + 100.0, now + 200.0, now + 400.0):
        core.handle_timer(t)
    # Left: keep-alive OPTIONS to the NATed client at most.
    assert len(core.transactions) <= 1
