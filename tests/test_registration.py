"""REGISTERs through the SBC to the backends (the registration proxy) and the backends'
health probes, through the sans-I/O core (fake clock)."""

from __future__ import annotations

import pytest
from sipdata import sip

from sbc.actions import SendData
from sbc.core import CoreSettings, SbcCore
from sbc.features.balancer import BackendSpec, HealthPolicy
from sbc.features.guard import NO_POLICY, Bucket, GuardPolicy
from sbc.features.guard import REGISTER as REGISTER_CLASS
from sbc.features.registrar import FlowTokens, aor_of
from sbc.registration import OffloadPolicy
from sbc.registration.refresh import cut_request
from sbc.sides import Side
from sbc.sip.flow import Flow
from sbc.sip.headers import parse_name_addr
from sbc.sip.message import Request, Response, make_response
from sbc.sip.parser import parse_message

ACCESS = ("127.0.0.1", 5060)
CORE = ("127.0.0.1", 5080)
B1 = ("127.0.0.1", 5070)
B2 = ("127.0.0.1", 5071)
CLIENT = Flow("udp", ACCESS, ("192.0.2.7", 40000))

REGISTER = """
REGISTER sip:example.com SIP/2.0
Via: SIP/2.0/UDP 10.0.0.7:5060;branch=z9hG4bK-reg{n};rport
Max-Forwards: 70
From: <sip:{user}@example.com>;tag=f{n}
To: <sip:{user}@example.com>
Call-ID: reg-{user}@10.0.0.7
CSeq: {n} REGISTER
Contact: <sip:{user}@10.0.0.7:5060>
Expires: 3600
Content-Length: 0

"""


def make_core(
    *backends: tuple[str, int],
    failures: int = 3,
    offload: OffloadPolicy | None = None,
    security: GuardPolicy = NO_POLICY,
    worker: int = 0,
    workers: int = 1,
    persist: bool = False,
    wall_offset: float = 0.0,
    access: tuple[str, int] = ACCESS,
) -> SbcCore:
    """A core with UDP listeners on ``access`` and CORE (worker ``worker`` of ``workers``:
    each worker's core socket is its own, CORE's port plus its index); ``persist``: its
    state kept outside the process ([state] url)."""
    specs = tuple(
        BackendSpec(name=f"sip:{h}:{p}", host=h, port=p, transport="udp") for h, p in backends
    )
    core = SbcCore(
        CoreSettings(
            local_hosts=frozenset({"127.0.0.1"}),
            backends=specs,
            health=HealthPolicy(probe_interval=5.0, probe_failures=failures, probe_successes=2),
            offload=offload or OffloadPolicy(),
            security=security,
        ),
        worker=worker,
        workers=workers,
        persist=persist,
        wall_offset=wall_offset,
    )
    core.add_listener(Side.ACCESS, "udp", access)
    core.add_listener(Side.CORE, "udp", (CORE[0], CORE[1] + worker))
    return core


def sent(actions: list[object]) -> list[tuple[Flow, Request | Response]]:
    out = []
    for a in actions:
        assert isinstance(a, SendData)
        msg = parse_message(a.data)
        assert isinstance(msg, Request | Response)
        out.append((a.flow, msg))
    return out


def answer(
    core: SbcCore, req: Request, status: int, now: float, to: tuple[str, int]
) -> list[object]:
    resp = make_response(req, status, to_tag="b1")
    return core.receive_datagram(bytes(resp), Flow("udp", CORE, to), now)  # type: ignore[return-value]


def test_probes_go_to_every_backend_and_repeat() -> None:
    core = make_core(B1, B2)
    assert core.next_deadline() is not None
    probes = sent(core.handle_timer(0.0))
    assert sorted(f.remote for f, _ in probes) == [B1, B2]
    for flow, msg in probes:
        assert isinstance(msg, Request) and msg.method == "OPTIONS" and flow.local == CORE
        assert (
            msg.top_via is not None and msg.top_via.host == "127.0.0.1" and msg.top_via.port == 5080
        )
        answer(core, msg, 200, 0.01, flow.remote)
    assert sent(core.handle_timer(1.0)) == []  # next round only after probe_interval
    assert len(sent(core.handle_timer(5.0))) == 2


def test_unanswered_probes_take_a_backend_down_and_register_avoids_it() -> None:
    core = make_core(B1, failures=1)
    [_] = sent(core.handle_timer(0.0))
    # No answer: timer E retransmits, timer F (64*T1 = 32 s) times the probe out.
    now = 0.0
    while (deadline := core.next_deadline()) is not None and deadline <= 32.0:
        now = deadline
        core.handle_timer(now)
    assert not core.backends.balancer.backends[0].up
    reg = sip(REGISTER.format(n=1, user="alice"))
    [(to, resp)] = sent(core.receive_datagram(reg, CLIENT, now))
    assert isinstance(resp, Response) and resp.status == 503 and resp.get("retry-after") == "10"
    assert to.remote == ("192.0.2.7", 40000)


def test_register_is_forwarded_with_path_and_answer_comes_back() -> None:
    core = make_core(B1)
    for flow, probe in sent(core.handle_timer(0.0)):
        answer(core, probe, 200, 0.0, flow.remote)
    reg = sip(REGISTER.format(n=1, user="alice"))
    [(flow, fwd)] = sent(core.receive_datagram(reg, CLIENT, 1.0))
    assert isinstance(fwd, Request) and fwd.method == "REGISTER" and flow.remote == B1
    assert flow.local == CORE
    assert fwd.max_forwards == 69  # RFC 3261 16.6 step 3
    assert len(fwd.via) == 2 and fwd.via[0].port == 5080 and fwd.via[1].received == "192.0.2.7"
    [path] = fwd.name_addrs("path")
    assert path.sip_uri is not None and path.sip_uri.lr and path.sip_uri.port == 5080
    assert path.sip_uri.user is not None
    assert core.registration.tokens.decode(path.sip_uri.user) == CLIENT  # RFC 5626 flow token
    # Registration offload: the backend is asked for the long expiry, spread 3240-3600 s.
    [contact] = fwd.contact
    asked = int(contact.param("expires") or 0)
    assert str(contact.uri) == "sip:alice@10.0.0.7:5060" and 3240 <= asked <= 3600
    assert fwd.get("expires") == str(asked) and fwd.call_id == "reg-alice@10.0.0.7"
    ok = make_response(fwd, 200, to_tag="reg")
    ok.add("Contact", f"<sip:alice@10.0.0.7:5060>;expires={asked}")
    ok.add("Path", fwd.get("path") or "")
    back = sent(core.receive_datagram(bytes(ok), Flow("udp", CORE, B1), 1.1))
    [(to, resp)] = back
    assert isinstance(resp, Response) and resp.status == 200 and to.remote == ("192.0.2.7", 40000)
    assert len(resp.via) == 1 and resp.via[0].branch == "z9hG4bK-reg1"  # our Via removed
    assert "path" not in resp  # the SBC's core side is not shown to clients
    assert resp.contact[0].param("expires") == "60"  # the client is told the short expiry
    # A retransmitted REGISTER is absorbed and the 200 re-sent (server transaction).
    [(_, again)] = sent(core.receive_datagram(reg, CLIENT, 1.2))
    assert isinstance(again, Response) and again.status == 200


def test_challenge_is_passed_back_unchanged() -> None:
    core = make_core(B1)
    reg = sip(REGISTER.format(n=2, user="bob"))
    [(_, fwd)] = sent(core.receive_datagram(reg, CLIENT, 0.0))
    assert isinstance(fwd, Request)
    challenge = make_response(fwd, 401, to_tag="x")
    challenge.add("WWW-Authenticate", 'Digest realm="example.com", nonce="abc", algorithm=MD5')
    [(_, resp)] = sent(core.receive_datagram(bytes(challenge), Flow("udp", CORE, B1), 0.1))
    assert isinstance(resp, Response) and resp.status == 401
    assert resp.get("www-authenticate") == 'Digest realm="example.com", nonce="abc", algorithm=MD5'


def test_backend_timeout_gives_408() -> None:
    core = make_core(B1)
    reg = sip(REGISTER.format(n=3, user="carol"))
    sent(core.receive_datagram(reg, CLIENT, 0.0))
    statuses = []
    now = 0.0
    while (deadline := core.next_deadline()) is not None and deadline <= 40.0:
        now = deadline
        statuses += [m.status for _, m in sent(core.handle_timer(now)) if isinstance(m, Response)]
    assert 408 in statuses


def test_users_stick_to_one_backend() -> None:
    core = make_core(B1, B2)
    where: dict[str, tuple[str, int]] = {}
    for i in range(40):
        user = f"u{i}"
        [(flow, _)] = sent(
            core.receive_datagram(sip(REGISTER.format(n=i + 10, user=user)), CLIENT, 0.0)
        )
        where[user] = flow.remote
        [(again, _)] = sent(
            core.receive_datagram(sip(REGISTER.format(n=i + 100, user=user)), CLIENT, 0.0)
        )
        assert again.remote == flow.remote
    assert set(where.values()) == {B1, B2}


def test_flow_tokens() -> None:
    tokens = FlowTokens(b"k" * 32)
    flows = [CLIENT, Flow("tcp", ("::1", 5060), ("2001:db8::7", 51000), 42)]
    for flow in flows:
        token = tokens.encode(flow)
        assert token.isalnum() and token == token.lower()
        assert tokens.decode(token) == flow
    token = tokens.encode(CLIENT)
    assert tokens.decode(token[:-2] + ("aa" if token[-2:] != "aa" else "bb")) is None
    assert FlowTokens(b"x" * 32).decode(token) is None  # another key
    assert tokens.decode("not-base32!") is None


def test_aor() -> None:
    assert (
        aor_of(parse_name_addr("<sip:Alice@Example.COM;transport=tcp>;tag=1"))
        == "sip:Alice@example.com"
    )
    assert (
        aor_of(parse_name_addr("<sips:%61lice@example.com:5061>")) == "sips:alice@example.com:5061"
    )
    assert aor_of(parse_name_addr("<tel:+4930123>")) is None


def test_dead_backend_is_detected_within_interval_times_failures() -> None:
    """Unanswered probes fail after probe_interval, not after timer F."""
    core = make_core(B1, failures=3)
    down_at = None
    now = 0.0
    while (deadline := core.next_deadline()) is not None and deadline <= 60.0:
        now = deadline
        core.handle_timer(now)
        if down_at is None and not core.backends.balancer.backends[0].up:
            down_at = now
    assert down_at == 15.0  # probes at 0, 5, 10, each failed 5 s later
    assert len(core.transactions) <= 2  # timed-out probes were terminated, not left to timer F


def registered(core: SbcCore, user: str, n: int, now: float, backend_expires: int = 3600) -> None:
    """REGISTER ``user`` through the SBC and answer it at the backend with a 200."""
    [(flow, fwd)] = sent(core.receive_datagram(sip(REGISTER.format(n=n, user=user)), CLIENT, now))
    assert isinstance(fwd, Request) and fwd.method == "REGISTER"
    ok = make_response(fwd, 200, to_tag="reg")
    ok.add("Contact", f"<sip:{user}@10.0.0.7:5060>;expires={backend_expires}")
    ok.add("Service-Route", "<sip:orig@10.9.9.9;lr>")
    ok.add("Server", "kamailio-backend")
    [(_, resp)] = sent(core.receive_datagram(bytes(ok), Flow("udp", CORE, flow.remote), now))
    assert isinstance(resp, Response) and resp.status == 200
    # Topology hiding: the core's Service-Route and Server do not reach the client.
    assert "service-route" not in resp and resp.get("server") == "sbc/0.1.0"


def test_unchanged_refresh_is_answered_by_the_sbc() -> None:
    core = make_core(B1)
    registered(core, "dave", 1, 0.0)
    [(to, resp)] = sent(core.receive_datagram(sip(REGISTER.format(n=2, user="dave")), CLIENT, 50.0))
    assert to.remote == CLIENT.remote and isinstance(resp, Response) and resp.status == 200
    assert resp.get("cseq") == "2 REGISTER" and resp.via[0].branch == "z9hG4bK-reg2"
    assert (
        resp.contact[0].param("expires") == "60"
        and str(resp.contact[0].uri) == "sip:dave@10.0.0.7:5060"
    )
    assert "service-route" not in resp and resp.get("date")  # core topology stays hidden
    assert core.registration.stats["register_offloaded"] == 1


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (
            lambda r: r.replace(
                b"Contact: <sip:dave@10.0.0.7:5060>", b"Contact: <sip:dave@10.0.0.8:5060>"
            ),
            "new contact",
        ),
        (lambda r: r.replace(b"Expires: 3600", b"Expires: 0"), "de-registration"),
        (
            lambda r: r.replace(b"Call-ID: reg-dave@10.0.0.7", b"Call-ID: other@10.0.0.7"),
            "other Call-ID",
        ),
        (lambda r: r.replace(b"CSeq: 2 REGISTER", b"CSeq: 1 REGISTER"), "CSeq not higher"),
    ],
)
def test_changed_registers_go_to_the_backend(change: object, why: str) -> None:
    core = make_core(B1)
    registered(core, "dave", 1, 0.0)
    req = change(sip(REGISTER.format(n=2, user="dave")))  # type: ignore[operator]
    [(flow, msg)] = sent(core.receive_datagram(req, CLIENT, 50.0))
    assert isinstance(msg, Request) and flow.remote == B1, why


def test_refresh_from_another_flow_goes_to_the_backend() -> None:
    core = make_core(B1)
    registered(core, "dave", 1, 0.0)
    other = Flow("udp", ACCESS, ("192.0.2.7", 40001))  # the NAT gave a new port
    [(flow, msg)] = sent(core.receive_datagram(sip(REGISTER.format(n=2, user="dave")), other, 50.0))
    assert isinstance(msg, Request) and flow.remote == B1


def test_offload_ratio_over_two_hours() -> None:
    """Client_expires 60, backend_expires 3600: the backend sees at most 1/50."""
    core = make_core(B1)
    backend_registers = 0
    total = 0
    n = 1
    for minute in range(0, 120 * 60, 55):  # the client refreshes a little early
        n += 1
        total += 1
        [(flow, msg)] = sent(
            core.receive_datagram(sip(REGISTER.format(n=n, user="erin")), CLIENT, float(minute))
        )
        if isinstance(msg, Request):
            backend_registers += 1
            asked = msg.get("expires")
            ok = make_response(msg, 200, to_tag="reg")
            ok.add("Contact", f"<sip:erin@10.0.0.7:5060>;expires={asked}")
            sent(core.receive_datagram(bytes(ok), Flow("udp", CORE, flow.remote), float(minute)))
        else:
            assert isinstance(msg, Response) and msg.status == 200
    assert backend_registers >= 2  # the backend binding was refreshed before it expired
    # Re-REGISTERs (all but the first): at most 1 in 50 reaches the backend.
    assert (backend_registers - 1) * 50 <= total - 1, (backend_registers, total)


def test_client_that_stops_refreshing_is_deregistered_at_the_backend() -> None:
    core = make_core(B1)
    registered(core, "frank", 1, 0.0)
    assert core.next_deadline() is not None
    dereg = [
        m
        for _, m in sent(core.handle_timer(60.0))
        if isinstance(m, Request) and m.method == "REGISTER"
    ]
    [req] = dereg
    assert req.get("expires") == "0" and req.call_id == "reg-frank@10.0.0.7"
    assert req.cseq is not None and req.cseq.seq == 2
    assert (
        req.contact[0].param("expires") == "0"
        and str(req.contact[0].uri) == "sip:frank@10.0.0.7:5060"
    )
    assert len(core.registration.registrations) == 0


def test_registrations_of_a_dead_backend_are_recovered_on_another() -> None:
    """The SBC re-registers the bindings it cached on the surviving backend."""
    core = make_core(B1, B2, failures=1)
    for flow, probe in sent(core.handle_timer(0.0)):
        answer(core, probe, 200, 0.0, flow.remote)
    # Register users until one hashes to B1; every backend answers its REGISTERs.
    for i in range(50):
        user = f"r{i}"
        [(flow, fwd)] = sent(
            core.receive_datagram(sip(REGISTER.format(n=i + 1, user=user)), CLIENT, 1.0)
        )
        assert isinstance(fwd, Request)
        ok = make_response(fwd, 200, to_tag="reg")
        ok.add("Contact", f"<sip:{user}@10.0.0.7:5060>;expires=3600")
        sent(core.receive_datagram(bytes(ok), Flow("udp", CORE, flow.remote), 1.0))
        if flow.remote == B1:
            break
    # B1 stops answering: its next probe (at 5 s) times out at 10 s and B1 goes down.
    recovery: list[Request] = []
    now = 1.0
    while not recovery and (deadline := core.next_deadline()) is not None and deadline <= 12.0:
        now = deadline
        for flow, msg in sent(core.handle_timer(now)):
            if isinstance(msg, Request) and msg.method == "OPTIONS" and flow.remote == B2:
                answer(core, msg, 200, now, B2)
            elif isinstance(msg, Request) and msg.method == "REGISTER":
                assert flow.remote == B2
                recovery.append(msg)
    [req] = recovery
    assert req.to is not None and str(req.to.uri) == f"sip:{user}@example.com"
    assert req.call_id and req.cseq is not None and req.cseq.seq == 1  # fresh: no CSeq clash
    [contact] = req.contact
    assert (
        str(contact.uri) == f"sip:{user}@10.0.0.7:5060"
        and int(contact.param("expires") or 0) >= 3240
    )
    [path] = req.name_addrs("path")
    assert path.sip_uri is not None and path.sip_uri.user is not None
    assert core.registration.tokens.decode(path.sip_uri.user) == CLIENT
    ok = make_response(req, 200, to_tag="rec")
    ok.add("Contact", f"<sip:{user}@10.0.0.7:5060>;expires=3600")
    sent(core.receive_datagram(bytes(ok), Flow("udp", CORE, B2), now))
    [reg] = [r for r in core.registration.registrations if r.aor == f"sip:{user}@example.com"]
    assert reg.backend == "sip:127.0.0.1:5071"


MESSAGE = """
MESSAGE sip:alice@10.0.0.7:5060 SIP/2.0
Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-msg{n}
Route: {route}
Max-Forwards: 69
From: <sip:bob@example.com>;tag=m{n}
To: <sip:alice@example.com>
Call-ID: msg{n}@backend
CSeq: 1 {method}
Content-Type: text/plain
Content-Length: 2

hi"""


def test_requests_from_the_backend_reach_the_client_over_its_flow() -> None:
    """The Path's flow token routes a request to the client's NAT flow; the
    B2BUA sends it with its own ids, so nothing of the core reaches the client."""
    core = make_core(B1)
    registered(core, "alice", 1, 0.0)
    route = f"<sip:{core.registration.tokens.encode(CLIENT)}@127.0.0.1:5080;lr>"
    msg = sip(MESSAGE.format(n=1, route=route, method="MESSAGE"))
    [(flow, fwd)] = sent(core.receive_datagram(msg, Flow("udp", CORE, B1), 1.0))
    assert flow == CLIENT and isinstance(fwd, Request) and fwd.method == "MESSAGE"
    assert str(fwd.uri) == "sip:alice@10.0.0.7:5060"  # the Request-URI is left alone
    assert "route" not in fwd and fwd.max_forwards == 68 and fwd.body == b"hi"
    assert len(fwd.via) == 1 and fwd.via[0].port == 5060  # only the SBC's Via
    assert fwd.call_id != "msg1@backend" and "backend" not in bytes(fwd).decode()
    ok = make_response(fwd, 200, to_tag="a")
    [(to, resp)] = sent(core.receive_datagram(bytes(ok), CLIENT, 1.1))
    assert to.remote == B1 and isinstance(resp, Response) and resp.status == 200
    assert len(resp.via) == 1 and resp.via[0].branch == "z9hG4bK-msg1"
    assert resp.call_id == "msg1@backend"


def test_requests_for_a_gone_flow_get_430_and_forged_tokens_404() -> None:
    core = make_core(B1)
    registered(core, "alice", 1, 0.0)
    gone = Flow("udp", ACCESS, ("192.0.2.99", 1234))  # no registration uses it
    route = f"<sip:{core.registration.tokens.encode(gone)}@127.0.0.1:5080;lr>"
    [(_, resp)] = sent(
        core.receive_datagram(
            sip(MESSAGE.format(n=2, route=route, method="MESSAGE")), Flow("udp", CORE, B1), 1.0
        )
    )
    assert isinstance(resp, Response) and resp.status == 430  # RFC 5626 5.3
    forged = "<sip:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa@127.0.0.1:5080;lr>"
    [(_, resp)] = sent(
        core.receive_datagram(
            sip(MESSAGE.format(n=4, route=forged, method="MESSAGE")), Flow("udp", CORE, B1), 1.0
        )
    )
    assert isinstance(resp, Response) and resp.status == 404  # not our token: no open relay


def test_unanswered_register_fails_over_to_the_next_backend() -> None:
    """A REGISTER unanswered within request_timeout goes to the AOR's next backend at once."""
    core = make_core(B1, B2)
    reg = sip(REGISTER.format(n=1, user="gina"))
    [(first, fwd)] = sent(core.receive_datagram(reg, CLIENT, 0.0))
    assert isinstance(fwd, Request)
    other = B2 if first.remote == B1 else B1
    now = 0.0
    failover: list[tuple[Flow, Request | Response]] = []
    while not failover and (deadline := core.next_deadline()) is not None and deadline <= 5.0:
        now = deadline
        failover = [
            (f, m) for f, m in sent(core.handle_timer(now))
            if isinstance(m, Request) and m.method == "REGISTER" and f.remote == other
        ]  # fmt: skip
    [(_, again)] = failover
    assert now == 4.0 and isinstance(again, Request)  # request_timeout
    assert again.call_id == "reg-gina@10.0.0.7"
    ok = make_response(again, 200, to_tag="r")
    ok.add("Contact", "<sip:gina@10.0.0.7:5060>;expires=3600")
    [(to, resp)] = sent(core.receive_datagram(bytes(ok), Flow("udp", CORE, other), now))
    assert to.remote == CLIENT.remote and isinstance(resp, Response) and resp.status == 200
    assert core.registration.stats["register_failover"] == 1


def test_registration_never_crashes_on_mutated_traffic() -> None:
    """Seeded mutations of REGISTERs, backend answers and backend requests, on both sides:
    the core answers, relays or drops, never raises, sends the backends only what its own
    parser reads back, and leaves only its own periodic probes and keep-alives in flight."""
    import random

    rng = random.Random(3327)
    core = make_core(B1, B2, failures=2)
    route = f"<sip:{core.registration.tokens.encode(CLIENT)}@127.0.0.1:5080;lr>"
    seeds = [
        sip(REGISTER.format(n=1, user="fuzz")),
        sip(MESSAGE.format(n=1, route=route, method="MESSAGE")),
    ]
    backend_answers: list[bytes] = []
    now = 0.0
    for _ in range(2000):
        now += 0.05
        pick = rng.random()
        if pick < 0.3 and backend_answers:
            data = bytearray(rng.choice(backend_answers))
            flow = Flow("udp", CORE, rng.choice([B1, B2]))
        else:
            data = bytearray(rng.choice(seeds))
            flow = CLIENT if data.startswith(b"REGISTER") else Flow("udp", CORE, B1)
        for _ in range(rng.randint(0, 4)):
            pos = rng.randrange(len(data))
            op = rng.random()
            if op < 0.5:
                data[pos] = rng.randrange(32, 127)
            elif op < 0.8:
                data[pos:pos] = rng.choice([b";", b",", b"<", b">", b"\r\n", b" ", b"=", b"0"])
            else:
                del data[pos : pos + rng.randint(1, 10)]
        for action in core.receive_datagram(bytes(data), flow, now) + core.handle_timer(now):
            if isinstance(action, SendData) and action.flow.remote in (B1, B2):
                # Whatever the input, what the core sends is well-formed SIP: its own parser
                # reads it back (a ParseError here fails the test).
                msg = parse_message(action.data)
                if isinstance(msg, Request) and msg.method != "ACK":
                    answer_ = make_response(msg, rng.choice([100, 200, 401, 404, 500]), to_tag="t")
                    answer_.add("Contact", msg.get("contact") or "<sip:x@10.0.0.7>")
                    backend_answers.append(bytes(answer_))
                    backend_answers = backend_answers[-20:]
    core.handle_timer(now + 1000.0)
    core.handle_timer(now + 2000.0)
    # What is left: this round's OPTIONS probes (2 backends) and keep-alives (1 client flow).
    assert len(core.transactions) <= 3
    assert not core.registration._work  # no REGISTER of its own or a client's left


def test_a_tls_backend_is_reached_from_the_core_tls_listener() -> None:
    """Backends over TLS (optional): the flow names the core side's TLS
    listener and no connection yet (conn_id 0): the I/O layer connects with the client TLS
    context ([core.tls]: CA-verified, our certificate presented)."""
    spec = BackendSpec(name="sips:b1", host=B1[0], port=5061, transport="tls")
    core = SbcCore(CoreSettings(local_hosts=frozenset({"127.0.0.1"}), backends=(spec,)))
    core.add_listener(Side.ACCESS, "udp", ACCESS)
    core.add_listener(Side.CORE, "udp", CORE)
    core.add_listener(Side.CORE, "tls", ("127.0.0.1", 5081))
    [(flow, probe)] = sent(core.handle_timer(0.0))
    assert flow == Flow("tls", ("127.0.0.1", 5081), (B1[0], 5061))
    assert isinstance(probe, Request) and probe.via[0].transport == "TLS"
    assert probe.via[0].port == 5081


# -- refreshes answered from a template (sbc/registration/refresh.py) ----------------------


def refresh(core: SbcCore, n: int, now: float, *, user: str = "dave", data: bytes | None = None):  # type: ignore[no-untyped-def]
    """One refresh of ``user`` from CLIENT: what the SBC sent, parsed."""
    return sent(core.receive_datagram(data or sip(REGISTER.format(n=n, user=user)), CLIENT, now))


def templated(user: str = "dave") -> SbcCore:
    """``user`` registered through B1, and one refresh answered by the SBC: the template."""
    core = make_core(B1)
    registered(core, user, 1, 0.0)
    [(_, first)] = refresh(core, 2, 50.0, user=user)
    assert isinstance(first, Response) and first.status == 200
    assert core.registration.stats["register_templated"] == 0
    assert len(core.registration.refreshes) == 1
    return core


def test_later_refreshes_are_answered_from_the_template_without_parsing() -> None:
    core = templated()
    # The full path parses the request and answers through a server transaction, which
    # stays for Timer J (RFC 3261 17.2.2); the template answers without either. (Not by
    # replacing sbc.pipeline.parse_message: the compiled pipeline calls it directly.)
    transactions = len(core.transactions)
    [(to, resp)] = sent(
        core.receive_datagram(sip(REGISTER.format(n=3, user="dave")), CLIENT, 100.0)
    )
    assert len(core.transactions) == transactions
    assert to == CLIENT and isinstance(resp, Response) and resp.status == 200
    # What the full path answers (test_unchanged_refresh_is_answered_by_the_sbc), with this
    # request's branch, From tag and CSeq.
    assert resp.via[0].branch == "z9hG4bK-reg3" and resp.via[0].received == "192.0.2.7"
    assert resp.from_ is not None and resp.from_.tag == "f3"
    assert resp.get("cseq") == "3 REGISTER" and resp.get("call-id") == "reg-dave@10.0.0.7"
    assert resp.contact[0].param("expires") == "60" and resp.get("date")
    assert resp.get("server") == "sbc/0.1.0" and "service-route" not in resp
    stats = core.registration.stats
    assert (stats["register_templated"], stats["register_offloaded"]) == (1, 2)
    # The registration is refreshed as by the full path: its client expiry moved on.
    [reg] = list(core.registration.registrations)
    assert reg.cseq == 3 and reg.client_expires_at == 160.0


def test_a_retransmitted_refresh_gets_the_same_octets_and_changes_nothing() -> None:
    core = templated()
    data = sip(REGISTER.format(n=3, user="dave"))
    first = core.receive_datagram(data, CLIENT, 100.0)
    again = core.receive_datagram(data, CLIENT, 101.5)
    assert [a.data for a in first] == [a.data for a in again]  # type: ignore[attr-defined]
    [reg] = list(core.registration.registrations)
    assert reg.client_expires_at == 160.0 and core.registration.stats["register_templated"] == 1
    assert core.registration.stats["register_retransmitted"] == 1


@pytest.mark.parametrize(
    ("change", "outcome"),
    [
        (lambda r: r.replace(b"10.0.0.7:5060>", b"10.0.0.8:5060>"), "backend"),  # new contact
        (lambda r: r.replace(b"Expires: 3600", b"Expires: 0"), "backend"),  # de-registration
        (lambda r: r.replace(b"CSeq: 3 REGISTER", b"CSeq: 2 REGISTER"), "backend"),  # old CSeq
        # Another field changed: the full path parses it and answers (offload) itself.
        (lambda r: r.replace(b"Max-Forwards: 70", b"Max-Forwards: 69"), 200),
        (lambda r: r.replace(b"branch=z9hG4bK-reg3", b"branch=z9hG4bK"), 400),  # RFC 4475 3.2.1
    ],
)
def test_anything_but_a_plain_refresh_takes_the_full_path(change: object, outcome: object) -> None:
    core = templated()
    [(flow, msg)] = refresh(core, 3, 100.0, data=change(sip(REGISTER.format(n=3, user="dave"))))  # type: ignore[operator]
    assert core.registration.stats["register_templated"] == 0
    if outcome == "backend":
        assert isinstance(msg, Request) and flow.remote == B1
    else:
        assert isinstance(msg, Response) and msg.status == outcome


def test_digest_refreshes_with_new_credentials_use_the_template() -> None:
    """RFC 3261 22.4: each refresh carries a new nc and response; the SBC does not check
    them on an offloaded refresh (the backend did when the binding was made)."""
    core = make_core(B1)
    registered(core, "dave", 1, 0.0)
    for n in (2, 3, 4):
        auth = f'Authorization: Digest username="dave", realm="example.com", nonce="abc", uri="sip:example.com", response="{n:032x}", nc={n:08x}, cnonce="c{n}", qop=auth\n'
        data = sip(REGISTER.format(n=n, user="dave").replace("Expires:", auth + "Expires:"))
        [(_, resp)] = refresh(core, n, 50.0 * n, data=data)
        assert isinstance(resp, Response) and resp.status == 200
        assert resp.get("cseq") == f"{n} REGISTER"
    assert core.registration.stats["register_templated"] == 2


def test_an_expired_or_stale_registration_is_not_answered_from_its_template() -> None:
    core = templated()
    # The client stopped refreshing: its registration expired (de-registered at B1).
    core.handle_timer(200.0)
    assert not core.registration.refreshes
    [(flow, msg)] = refresh(core, 3, 201.0)
    assert isinstance(msg, Request) and flow.remote == B1
    # A backend binding about to expire is refreshed at the backend, not locally.
    core = make_core(B1)
    registered(core, "dave", 1, 0.0, backend_expires=400)
    refresh(core, 2, 50.0)  # answered locally: 400 - 50 >= 2 * 60
    [(flow, msg)] = refresh(core, 3, 300.0)
    assert isinstance(msg, Request) and flow.remote == B1
    assert core.registration.stats["register_templated"] == 0


def test_the_guard_limits_templated_refreshes_once() -> None:
    """The REGISTER rate limit holds for refreshes answered from a template: a limited one
    gets the guard's 503 from the full path, counted once."""
    core = make_core(B1, security=GuardPolicy(rates={REGISTER_CLASS: Bucket(0.001, 2)}))
    registered(core, "dave", 1, 0.0)  # one token
    [(_, first)] = refresh(core, 2, 50.0)  # the other: answered locally, the template
    assert isinstance(first, Response) and first.status == 200
    assert len(core.registration.refreshes) == 1
    [(_, limited)] = refresh(core, 3, 51.0)
    assert isinstance(limited, Response) and limited.status == 503
    assert limited.get("retry-after") is not None
    assert core.guard.stats["rejected:rate_register"] == 1
    assert core.registration.stats["register_templated"] == 0


def test_a_de_registration_drops_the_template() -> None:
    """Expires: 0 goes to the backend; its 200 ends the registration and its template, so a
    replay of the last refresh is no longer answered from it."""
    core = templated()
    bye = sip(REGISTER.format(n=3, user="dave").replace("Expires: 3600", "Expires: 0"))
    [(flow, fwd)] = refresh(core, 3, 60.0, data=bye)
    assert isinstance(fwd, Request) and flow.remote == B1
    sent(answer(core, fwd, 200, 60.0, flow.remote))
    assert not core.registration.refreshes
    assert not list(core.registration.registrations)


def test_a_retransmission_is_one_only_within_64_t1() -> None:
    core = templated()
    data = sip(REGISTER.format(n=3, user="dave"))
    [(_, first)] = refresh(core, 3, 60.0, data=data)
    assert isinstance(first, Response) and first.status == 200
    # 64*T1 later the same branch is a new request: the full path takes it (an old CSeq,
    # so it goes to the backend).
    [(flow, msg)] = refresh(core, 3, 60.0 + 33.0, data=data)
    assert isinstance(msg, Request) and flow.remote == B1
    assert core.registration.stats["register_retransmitted"] == 0


def test_users_of_a_pbx_sharing_one_call_id_over_one_flow_each_have_a_template() -> None:
    """RFC 3261 10.2: a UA uses one Call-ID for all its registrations with a registrar."""
    core = make_core(B1)
    users = ("ann", "bob", "cid")

    def same_call_id(user: str, n: int) -> bytes:
        request = REGISTER.format(n=n, user=user).replace(f"reg-{user}@", "pbx@")
        return sip(request.replace("branch=z9hG4bK-reg", f"branch=z9hG4bK-{user}-reg"))

    for user in users:
        [(flow, fwd)] = refresh(core, 1, 0.0, data=same_call_id(user, 1))
        assert isinstance(fwd, Request)
        ok = make_response(fwd, 200, to_tag="reg")
        ok.add("Contact", f"<sip:{user}@10.0.0.7:5060>;expires=3600")
        sent(core.receive_datagram(bytes(ok), Flow("udp", CORE, flow.remote), 0.0))
    for n in (2, 3):
        for user in users:
            [(_, resp)] = refresh(core, n, 50.0 * n, data=same_call_id(user, n))
            assert isinstance(resp, Response) and resp.status == 200
            assert resp.to is not None and resp.to.uri_text == f"sip:{user}@example.com"
    assert core.registration.stats["register_templated"] == len(users)
    assert len(core.registration.refreshes) == len(users)


def test_the_call_id_of_a_refresh_ignores_trailing_blanks() -> None:
    data = sip(REGISTER.format(n=2, user="dave")).replace(
        b"Call-ID: reg-dave@10.0.0.7\r\n", b"Call-ID: reg-dave@10.0.0.7" + b" " * 5000 + b"\r\n"
    )
    cut = cut_request(data)
    assert cut is not None and cut.call_id == b"reg-dave@10.0.0.7"


def _digest(n: int, extra: str = "") -> bytes:
    auth = (
        f'Authorization: Digest username="dave", realm="example.com", nonce="abc", '
        f'uri="sip:example.com", response="{n:032x}"{extra}, nc={n:08x}\n'
    )
    return sip(REGISTER.format(n=n, user="dave").replace("Expires:", auth + "Expires:"))


@pytest.mark.parametrize("digest", [False, True])
def test_a_template_finds_in_a_refresh_what_cut_request_finds(digest: bool) -> None:
    """Templates match a refresh by their own pieces, without searching it: the parts they
    find are those cut_request finds, and they match exactly when its shape is theirs."""
    core = make_core(B1)
    registered(core, "dave", 1, 0.0)
    [(_, first)] = refresh(core, 2, 50.0, data=_digest(2) if digest else None)
    assert isinstance(first, Response) and first.status == 200
    base = _digest(3) if digest else sip(REGISTER.format(n=3, user="dave"))
    variants = [
        base,
        base.replace(b"z9hG4bK-reg3", b"z9hG4bK-a.much-longer~branch!3"),
        base.replace(b"z9hG4bK-reg3", b"z9hG4bK"),  # RFC 4475 3.2.1: not a refresh
        base.replace(b"z9hG4bK-reg3", b"z9hG4bK-reg3 x"),
        base.replace(b"tag=f3", b"tag=another-tag"),
        base.replace(b"CSeq: 3 ", b"CSeq: 123456789 "),
        base.replace(b"CSeq: 3 ", b"CSeq: 1234567890 "),
        base.replace(b"CSeq: 3 ", b"CSeq: 3x "),
        base + b"extra",
        base[:-2],
        base.replace(b"nc=00000003", b'nc=00000003,\r\n cnonce="folded"'),
        base.replace(b"Authorization:", b"Proxy-Authorization:"),
        base.replace(b"Expires: 3600\r\n", b"Expires: 3600\r\nAuthorization: Digest x=1\r\n"),
    ]
    [template] = [t for ts in core.registration.refreshes._by_key.values() for t in ts]
    matched = 0
    for data in variants:
        cut = cut_request(data)
        expected = cut if cut is not None and cut.shape == template.shape else None
        found = core.registration.refreshes.match(data, CLIENT)
        assert (found[1] if found is not None else None) == expected, data
        matched += found is not None
    assert matched == 6
