"""The sans-I/O core: what the SBC answers, where it sends it, and when (fake clock)."""

from __future__ import annotations

import random

import pytest
from sipdata import rfc4475, rfc4475_names, rfc5118, rfc5118_names, sip

from sbc import __version__
from sbc.actions import Close, SendData
from sbc.core import CoreSettings, SbcCore
from sbc.sides import Side
from sbc.sip.flow import Flow
from sbc.sip.message import ParseError, Response, make_response
from sbc.sip.parser import Limits, parse_message

SBC = ("127.0.0.1", 5060)
CLIENT = ("192.0.2.1", 40000)
UDP = Flow("udp", SBC, CLIENT)
TCP = Flow("tcp", SBC, CLIENT, conn_id=7)

# What the SBC answers to each RFC 4475 message (None: dropped, no answer possible or allowed).
# The SBC has no backend here: REGISTERs go to its embedded registrar; other requests for
# example.com users nobody registered cannot be routed: "404 Not Found".
RFC4475_ANSWERS: dict[str, int | None] = {
    "wsinv": 481,  # valid; has a To tag, so it is in-dialog for a dialog the SBC lacks
    "intmeth": 501,  # 3.1.1.2: endpoint answers 501 to the unknown method
    "esc01": 404,
    "escnull": 200,  # REGISTER: the embedded registrar (no backend) binds it
    "esc02": 501,  # 3.1.1.5: unknown method
    "lwsdisp": 404,
    "longreq": 404,
    "dblreq": 200,  # REGISTER: the embedded registrar (no backend) binds it
    "semiuri": 404,
    "transports": 404,
    "mpart01": 404,
    "unreason": None,  # responses matching no transaction are discarded
    "noreason": None,
    "badinv01": 400,
    "clerr": 400,
    "ncl": 400,
    "scalar02": 400,
    "scalarlg": None,  # 3.1.2.5: a malformed response is dropped
    "quotbal": 400,
    "ltgtruri": 400,
    "lwsruri": 400,
    "lwsstart": 400,
    "trws": 400,
    "escruri": 400,
    "baddate": 404,  # 3.1.2.12: the Date value does not matter to the SBC
    "regbadct": 400,
    "badaspec": 400,
    "baddn": 400,
    "badvers": 505,
    "mismatch01": 400,
    "mismatch02": 501,
    "bigcode": None,
    "badbranch": 400,
    "insuf": 400,
    "unkscm": 416,
    "novelsc": 416,
    "unksm2": 400,  # 3.3.4: a registrar answers 400, the To is not a SIP AOR
    "bext01": 420,
    "invut": 415,
    "regaut01": 200,  # REGISTER: the embedded registrar (no backend) binds it
    "multi01": 400,
    "mcl01": 400,
    "bcast": None,  # 3.3.10: never forwarded, no transaction: dropped
    "zeromf": 200,  # 3.3.11: OPTIONS with Max-Forwards 0 answered by the SBC itself
    "cparam01": 200,  # REGISTER: the embedded registrar (no backend) binds it
    "cparam02": 200,  # REGISTER: the embedded registrar (no backend) binds it
    "regescrt": 200,  # REGISTER: the embedded registrar (no backend) binds it
    "sdp01": 406,
    "inv2543": 404,
    "test": None,  # not an RFC case; garbage without Via: nothing to answer to
}


def make_core(**kw: object) -> SbcCore:
    return SbcCore(CoreSettings(local_hosts=frozenset({"127.0.0.1", "sbc.example.net"}), **kw))  # type: ignore[arg-type]


def responses(actions: list[object]) -> list[Response]:
    out = []
    for a in actions:
        assert isinstance(a, SendData | Close)
        if isinstance(a, SendData) and a.data.startswith(b"SIP/2.0"):
            msg = parse_message(a.data)
            assert isinstance(msg, Response)
            out.append(msg)
    return out


def test_every_rfc4475_message_is_covered() -> None:
    assert sorted(RFC4475_ANSWERS) == rfc4475_names()


@pytest.mark.parametrize("name", sorted(RFC4475_ANSWERS))
def test_rfc4475_answers(name: str) -> None:
    core = make_core()
    actions = core.receive_datagram(rfc4475(name), UDP, 0.0)
    got = responses(actions)
    expected = RFC4475_ANSWERS[name]
    if expected is None:
        assert got == []
        return
    assert [r.status for r in got] == [expected]
    resp = got[0]
    try:
        request = parse_message(rfc4475(name))
    except ParseError as exc:
        assert exc.message is not None
        request = exc.message
    assert resp.get("call-id") == request.get("call-id")
    assert resp.get("cseq") == request.get("cseq")
    assert resp.reason  # for a rejection: a reason phrase naming the fault
    assert resp.get("server") == f"sbc/{__version__}"


@pytest.mark.parametrize(
    ("name", "reason", "extra"),
    [
        ("insuf", "Missing To Header", None),
        ("mismatch01", "CSeq Method Does Not Match", None),
        ("badinv01", "Bad Via: malformed Via", None),
        ("scalar02", "Bad CSeq: malformed CSeq", None),
        ("multi01", "Bad CSeq: more than one CSeq header", None),
        ("badbranch", "Via Branch Is Only The Magic Cookie", None),
        ("escruri", "Headers In Request-URI", None),
        ("bext01", "Bad Extension", ("unsupported", "nothingSupportsThis")),
        ("mismatch02", "Not Implemented", ("allow", "INVITE")),
        ("invut", "Unsupported Media Type", ("accept", "application/sdp")),
    ],
)
def test_rejections_name_the_fault(name: str, reason: str, extra: tuple[str, str] | None) -> None:
    core = make_core()
    [resp] = responses(core.receive_datagram(rfc4475(name), UDP, 0.0))
    assert resp.reason == reason
    if extra is not None:
        assert extra[1] in (resp.get(extra[0]) or "")
    assert sum(v for k, v in core.stats.items() if k.startswith("rejected:")) == 1


def test_bext01_lists_every_unsupported_option() -> None:
    [resp] = responses(make_core().receive_datagram(rfc4475("bext01"), UDP, 0.0))
    assert resp.values("unsupported") == [
        "nothingSupportsThis",
        "nothingSupportsThisEither",
        "noProxiesSupportThis",
        "norDoAnyProxiesSupportThis",
    ]


@pytest.mark.parametrize("name", rfc5118_names())
def test_rfc5118_answers(name: str) -> None:
    [resp] = responses(make_core().receive_datagram(rfc5118(name), UDP, 0.0))
    if name == "ipv6-bad":
        assert (resp.status, resp.reason) == (400, "Bad Request-URI: malformed sip URI")
    else:
        # parsed and processed: REGISTERs bound by the embedded registrar, others not routable
        assert resp.status in (200, 404, 481)


OPTIONS = """
OPTIONS sip:{target} SIP/2.0
Via: SIP/2.0/UDP 10.0.0.5:5062;branch=z9hG4bK-{branch}{rport}
Max-Forwards: {mf}
To: <sip:{target}>
From: <sip:monitor@example.com>;tag=mon1
Call-ID: opt-{branch}@10.0.0.5
CSeq: 1 OPTIONS
Content-Length: 0

"""


def options(
    target: str = "127.0.0.1:5060", branch: str = "1", rport: str = "", mf: int = 70
) -> bytes:
    return sip(OPTIONS.format(target=target, branch=branch, rport=rport, mf=mf))


def test_options_to_the_sbc_is_answered_200() -> None:
    core = make_core()
    actions = core.receive_datagram(options(), UDP, 0.0)
    [resp] = responses(actions)
    assert resp.status == 200
    assert "OPTIONS" in (resp.get("allow") or "") and resp.get("accept") == "application/sdp"
    assert resp.to is not None and resp.to.tag  # RFC 3261 8.2.6.2
    # RFC 3261 18.2.1: the client's private sent-by differs from the source: received is added.
    assert resp.via[0].received == "192.0.2.1"
    # RFC 3261 18.2.2: no rport, so the answer goes to the source address at the Via port.
    assert isinstance(actions[0], SendData) and actions[0].flow.remote == ("192.0.2.1", 5062)
    for i, target in enumerate(("sbc.example.net", "anyone@127.0.0.1", "SBC.Example.NET")):
        [resp] = responses(core.receive_datagram(options(target, branch=f"t{i}"), UDP, 0.0))
        assert resp.status == 200


def test_a_client_whose_udp_port_is_a_tcp_listeners_gets_its_answer() -> None:
    """UDP and TCP ports are two spaces: a client on 127.0.0.1 whose UDP port happens to
    be the port of the SBC's core TLS listener is answered over UDP, not taken for the SBC
    itself (a loop back)."""
    core = make_core()
    core.add_listener(Side.CORE, "tls", ("127.0.0.1", 5081))
    client = Flow("udp", ("127.0.0.1", 5060), ("127.0.0.1", 5081))
    actions = core.receive_datagram(options(rport=";rport"), client, 0.0)
    [resp] = responses(actions)
    assert resp.status == 200
    assert isinstance(actions[0], SendData) and actions[0].flow.remote == ("127.0.0.1", 5081)


def test_rport_sends_the_response_to_the_source_port() -> None:
    actions = make_core().receive_datagram(options(rport=";rport"), UDP, 0.0)
    [resp] = responses(actions)
    assert isinstance(actions[0], SendData) and actions[0].flow.remote == CLIENT
    via = resp.via[0]
    assert via.rport == 40000 and via.received == "192.0.2.1"  # RFC 3581 4


def test_retransmitted_request_gets_the_same_response() -> None:
    core = make_core()
    first = core.receive_datagram(options(), UDP, 0.0)
    again = core.receive_datagram(options(), UDP, 0.3)
    assert isinstance(first[0], SendData) and isinstance(again[0], SendData)
    assert again[0].data == first[0].data  # absorbed by the server transaction, re-sent
    assert core.stats.get("rejected:bad_via") is None


def test_options_elsewhere_and_max_forwards() -> None:
    core = make_core()
    [resp] = responses(core.receive_datagram(options("bob@example.com"), UDP, 0.0))
    assert (resp.status, resp.reason) == (404, "Not Found")
    zero = options("bob@example.com", branch="2", mf=0)
    [resp] = responses(core.receive_datagram(zero, UDP, 0.0))
    assert resp.status == 200  # RFC 3261 16.3 item 2: OPTIONS may be answered at Max-Forwards 0
    invite = zero.replace(b"OPTIONS", b"INVITE").replace(b"branch=z9hG4bK-2", b"branch=z9hG4bK-3")
    [resp] = responses(core.receive_datagram(invite, UDP, 0.0))
    assert resp.status == 483


INVITE = """
INVITE sip:bob@example.com SIP/2.0
Via: SIP/2.0/UDP 192.0.2.1:40000;branch=z9hG4bK-inv1;rport
Max-Forwards: 70
To: <sip:bob@example.com>
From: <sip:alice@example.com>;tag=a1
Call-ID: inv1@192.0.2.1
CSeq: 1 INVITE
Contact: <sip:alice@192.0.2.1:40000>
Content-Length: 0

"""


def test_unroutable_invite_final_is_retransmitted_until_ack() -> None:
    core = make_core()
    invite = sip(INVITE)
    [resp] = responses(core.receive_datagram(invite, UDP, 0.0))
    assert resp.status == 404
    # RFC 3261 17.2.1: Timer G retransmits the final response over UDP.
    assert core.next_deadline() == pytest.approx(0.5)
    [again] = responses(core.handle_timer(0.5))
    assert again.status == 404 and again.to is not None and again.to.tag == resp.to.tag  # type: ignore[union-attr]
    assert core.next_deadline() == pytest.approx(1.5)
    to_tag = resp.to.tag  # type: ignore[union-attr]
    ack = (
        invite.replace(b"INVITE sip", b"ACK sip")
        .replace(b"CSeq: 1 INVITE", b"CSeq: 1 ACK")
        .replace(b"To: <sip:bob@example.com>", f"To: <sip:bob@example.com>;tag={to_tag}".encode())
    )
    assert core.receive_datagram(ack, UDP, 0.8) == []  # absorbed, never answered
    assert responses(core.handle_timer(1.5)) == []
    # Timer I (T4 = 5 s) ends the transaction.
    core.handle_timer(0.8 + 5.0)
    assert len(core.transactions) == 0 and core.next_deadline() is None


def test_unanswered_final_stops_at_timer_h() -> None:
    core = make_core()
    core.receive_datagram(sip(INVITE), UDP, 0.0)
    sent = 0
    while (deadline := core.next_deadline()) is not None:
        sent += len(responses(core.handle_timer(deadline)))
    assert sent == 10  # G at 0.5, 1.5, 3.5, 7.5 then every T2 until H at 32 s
    assert len(core.transactions) == 0


def test_cancel_and_in_dialog_requests_without_state() -> None:
    core = make_core()
    cancel = (
        sip(INVITE)
        .replace(b"INVITE sip", b"CANCEL sip")
        .replace(b"CSeq: 1 INVITE", b"CSeq: 1 CANCEL")
        .replace(b"z9hG4bK-inv1", b"z9hG4bK-other")
    )
    [resp] = responses(core.receive_datagram(cancel, UDP, 0.0))
    assert resp.status == 481  # RFC 3261 9.2: no matching transaction
    bye = (
        sip(INVITE)
        .replace(b"INVITE sip", b"BYE sip")
        .replace(b"CSeq: 1 INVITE", b"CSeq: 2 BYE")
        .replace(b"To: <sip:bob@example.com>", b"To: <sip:bob@example.com>;tag=b1")
    )
    [resp] = responses(core.receive_datagram(bye, UDP, 0.0))
    assert resp.status == 481


def test_ack_is_never_answered_even_when_malformed() -> None:
    ack = sip(INVITE).replace(b"INVITE sip", b"ACK sip").replace(b"CSeq: 1 INVITE", b"CSeq: x ACK")
    assert make_core().receive_datagram(ack, UDP, 0.0) == []


def test_oversized_datagram_gets_413() -> None:
    core = make_core(limits=Limits(max_message_size=1024))
    big = options().replace(b"Content-Length: 0", b"Content-Length: 2000") + b"z" * 2000
    [resp] = responses(core.receive_datagram(big, UDP, 0.0))
    assert resp.status == 413
    [resp] = responses(core.receive_datagram(options(branch="9"), UDP, 0.1))
    assert resp.status == 200


def test_keepalives_are_absorbed() -> None:
    core = make_core()
    assert core.receive_datagram(b"\r\n\r\n", UDP, 0.0) == []
    assert core.receive_stream(b"\r\n\r\n", TCP, 0.0) == [SendData(TCP, b"\r\n")]


def test_stream_responses_use_the_same_connection() -> None:
    core = make_core()
    req = options(rport=";rport").replace(b"SIP/2.0/UDP", b"SIP/2.0/TCP")
    actions = core.receive_stream(req[:50], TCP, 0.0) + core.receive_stream(req[50:], TCP, 0.0)
    assert len(actions) == 1 and isinstance(actions[0], SendData) and actions[0].flow == TCP
    # reliable transport: no retransmission timer, transaction gone at once (Timer J = 0)
    assert len(core.transactions) == 0


def test_stream_framing_error_closes_only_that_connection() -> None:
    core = make_core()
    other = Flow("tcp", SBC, ("192.0.2.2", 40001), conn_id=8)
    bad = options().replace(b"Content-Length: 0", b"Content-Length: -5")
    actions = core.receive_stream(bad, TCP, 0.0)
    assert [r.status for r in responses(actions)] == [400]
    assert actions[-1] == Close(TCP)
    good = core.receive_stream(options(branch="x"), other, 0.0)
    assert [r.status for r in responses(good)] == [200]


def test_idle_connections_are_closed() -> None:
    core = make_core(tcp_idle_timeout=30.0)
    core.receive_stream(b"\r\n\r\n", TCP, 0.0)
    other = Flow("tcp", SBC, ("192.0.2.2", 40001), conn_id=8)
    core.receive_stream(b"\r\n\r\n", other, 10.0)
    core.receive_stream(b"\r\n\r\n", TCP, 20.0)  # activity moves TCP to the back
    assert core.next_deadline() == 40.0
    assert core.handle_timer(40.0) == [Close(other)]
    assert core.handle_timer(50.0) == [Close(TCP)]
    assert core.next_deadline() is None


def test_core_never_crashes_on_mutated_input() -> None:
    """Seeded mutations of every corpus message (bounded): the core answers or drops, never raises."""
    rng = random.Random(4475)
    corpus = [rfc4475(n) for n in rfc4475_names()] + [rfc5118(n) for n in rfc5118_names()]
    core = make_core()
    for i in range(3000):
        data = bytearray(rng.choice(corpus))
        for _ in range(rng.randint(1, 8)):
            op = rng.random()
            pos = rng.randrange(len(data))
            if op < 0.4:
                data[pos] = rng.randrange(256)
            elif op < 0.6:
                del data[pos : pos + rng.randint(1, 20)]
            elif op < 0.8:
                data[pos:pos] = rng.choice([b"\r\n", b";", b",", b"<", b'"', b":", b" ", b"%"])
            else:
                data = data[:pos]
            if not data:
                break
        flow = UDP if i % 2 else TCP
        if flow is UDP:
            core.receive_datagram(bytes(data), flow, i * 0.01)
        else:
            core.receive_stream(bytes(data), flow, i * 0.01)
            core.connection_closed(flow)
        core.handle_timer(i * 0.01)
    now = 1e6
    for _ in range(10_000):  # every timer path to its end (calls: timer B, then H)
        deadline = core.next_deadline()
        if deadline is None or deadline > now + 3600:
            break
        now = max(now, deadline)
        core.handle_timer(now)
    assert len(core.transactions) == 0
    assert not any(core.calls.state_size().values())


def test_registered_connections_are_not_closed_as_idle() -> None:
    from test_registration import B1, CORE, REGISTER, make_core

    from sbc.registration import OffloadPolicy

    core = make_core(B1, offload=OffloadPolicy(client_tcp=3000, backend_expires=7200))
    tcp = Flow("tcp", SBC, ("192.0.2.7", 40000), conn_id=3)
    req = sip(REGISTER.format(n=1, user="tina")).replace(b"SIP/2.0/UDP", b"SIP/2.0/TCP")
    [fwd_action] = core.receive_stream(req, tcp, 0.0)
    fwd = parse_message(fwd_action.data)  # type: ignore[union-attr]
    ok = make_response(fwd, 200, to_tag="r")  # type: ignore[arg-type]
    ok.add("Contact", "<sip:tina@10.0.0.7:5060>;expires=3600")
    core.receive_datagram(bytes(ok), Flow("udp", CORE, B1), 0.0)
    assert core.registration.registrations.has_flow(tcp)
    closes = [a for a in core.handle_timer(400.0) if isinstance(a, Close)]
    assert closes == []  # past tcp_idle_timeout (300 s), but the client is registered on it
