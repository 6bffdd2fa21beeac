"""The front door: access lists, flood bans, rate limits, failed-authentication
bans, the User-Agent block list, connection limits, overload and the backends' REGISTER
ceiling; the guard alone and through the sans-I/O core (fake clock)."""

from __future__ import annotations

import ipaddress

import pytest
from sipdata import sip
from test_registration import sent

from sbc.actions import Close
from sbc.app import guard_policy
from sbc.config import ConfigError, parse_config
from sbc.core import CoreSettings, SbcCore
from sbc.features.balancer import BackendSpec
from sbc.features.guard import (
    INVITE,
    OTHER,
    REGISTER,
    Bucket,
    Guard,
    GuardPolicy,
    credentials_user,
)
from sbc.sides import ACCESS, CORE
from sbc.sip.flow import Flow
from sbc.sip.message import Request, Response, make_response

SBC_ACCESS = ("127.0.0.1", 5060)
SBC_CORE = ("127.0.0.1", 5080)
BACKEND = ("10.9.0.1", 5070)
ATTACKER = "192.0.2.66"
HONEST = "192.0.2.7"


def net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


def policy(**kw: object) -> GuardPolicy:
    base: dict[str, object] = {
        "core_sources": frozenset({BACKEND[0]}),
        "restrict_core": True,
        "user_agent_block": ("friendly-scanner", "sipvicious"),
    }
    base.update(kw)
    return GuardPolicy(**base)  # type: ignore[arg-type]


def make_core(security: GuardPolicy, *, backend: bool = True) -> SbcCore:
    specs = (
        (BackendSpec(name="sip:10.9.0.1:5070", host=BACKEND[0], port=BACKEND[1], transport="udp"),)
        if backend
        else ()
    )
    core = SbcCore(
        CoreSettings(local_hosts=frozenset({"127.0.0.1"}), backends=specs, security=security)
    )
    core.add_listener(ACCESS, "udp", SBC_ACCESS)
    core.add_listener(CORE, "udp", SBC_CORE)
    return core


def client(ip: str, port: int = 40000) -> Flow:
    return Flow("udp", SBC_ACCESS, (ip, port))


OPTIONS = """
OPTIONS sip:127.0.0.1:5060 SIP/2.0
Via: SIP/2.0/UDP {ip}:5060;branch=z9hG4bK-o{n};rport
Max-Forwards: 70
To: <sip:127.0.0.1>
From: <sip:probe@example.com>;tag=o{n}
Call-ID: opt-{n}@{ip}
CSeq: 1 OPTIONS
User-Agent: {ua}
Content-Length: 0

"""

REGISTER_MSG = """
REGISTER sip:example.com SIP/2.0
Via: SIP/2.0/UDP {ip}:5060;branch=z9hG4bK-r{n};rport
Max-Forwards: 70
From: <sip:{user}@example.com>;tag=r{n}
To: <sip:{user}@example.com>
Call-ID: reg-{n}@{ip}
CSeq: {n} REGISTER
Contact: <sip:{user}@{ip}:5060>
Expires: 3600
{auth}Content-Length: 0

"""

INVITE_MSG = """
INVITE sip:bob@example.com SIP/2.0
Via: SIP/2.0/UDP {ip}:5060;branch=z9hG4bK-i{n};rport
Max-Forwards: 70
From: <sip:alice@example.com>;tag=i{n}
To: <sip:bob@example.com>
Call-ID: inv-{n}@{ip}
CSeq: 1 INVITE
Contact: <sip:alice@{ip}:5060>
Content-Length: 0

"""


def options(ip: str, n: int, ua: str = "softphone/1.0") -> bytes:
    return sip(OPTIONS.format(ip=ip, n=n, ua=ua))


def register(ip: str, n: int, user: str = "alice", password: str | None = None) -> bytes:
    auth = (
        f'Authorization: Digest username="{user}", realm="example.com", nonce="abc", '
        f'uri="sip:example.com", response="{password}"\n'
        if password is not None
        else ""
    )
    return sip(REGISTER_MSG.format(ip=ip, n=n, user=user, auth=auth))


def invite(ip: str, n: int) -> bytes:
    return sip(INVITE_MSG.format(ip=ip, n=n))


def statuses(actions: list[object]) -> list[int]:
    return [m.status for _, m in sent(actions) if isinstance(m, Response)]


def to_backend(actions: list[object]) -> list[Request]:
    return [m for f, m in sent(actions) if isinstance(m, Request) and f.remote == BACKEND]


# -- the guard alone ------------------------------------------------------------------------


def test_pike_density_bans_for_ban_time_then_forgives() -> None:
    g = Guard(policy(pike_window=2.0, pike_density=10, ban_time=60.0))
    assert all(g.admit(ATTACKER, ACCESS, 0.01 * i) for i in range(10))
    assert not g.admit(ATTACKER, ACCESS, 0.2)  # the 11th packet within the window
    assert g.banned(ATTACKER, 0.3) and ATTACKER in g.bans
    assert not g.admit(ATTACKER, ACCESS, 30.0)  # dropped all through the ban
    assert g.admit(HONEST, ACCESS, 30.0)  # others are not affected
    assert g.admit(ATTACKER, ACCESS, 61.0)  # the ban is over
    assert ATTACKER not in g.bans
    assert g.stats["ban:flood"] == 1 and g.stats["dropped_banned"] == 1


def test_pike_counts_per_window_so_a_steady_honest_rate_is_never_banned() -> None:
    g = Guard(policy(pike_window=2.0, pike_density=10))
    # 4 packets/s for a minute: 8 per 2 s window, under the density of 10.
    assert all(g.admit(HONEST, ACCESS, i * 0.25) for i in range(240))


def test_the_allow_list_is_never_banned_or_limited() -> None:
    g = Guard(
        policy(
            allow=(net("192.0.2.0/28"),),
            pike_density=2,
            rates={REGISTER: Bucket(1.0, 1)},
            auth_failures=1,
        )
    )
    assert all(g.admit(HONEST, ACCESS, 0.0) for _ in range(100))
    assert all(g.check_request(HONEST, REGISTER, 0.0, credentials=None) is None for _ in range(100))
    g.check_request(HONEST, REGISTER, 0.0, credentials=("k1", "alice"))
    g.auth_answer("k1", 401, 0.0)
    assert not g.banned(HONEST, 1.0)


def test_backends_and_peers_are_never_flood_banned() -> None:
    g = Guard(policy(pike_density=5))
    assert all(g.admit(BACKEND[0], CORE, 0.0) for _ in range(100))
    assert not g.banned(BACKEND[0], 0.0)


def test_token_bucket_per_method_class_with_retry_after() -> None:
    g = Guard(policy(rates={REGISTER: Bucket(2.0, 3), INVITE: Bucket(1.0, 1)}))
    assert [g.check_request(ATTACKER, REGISTER, 0.0, credentials=None) for _ in range(3)] == [
        None
    ] * 3
    limited = g.check_request(ATTACKER, REGISTER, 0.0, credentials=None)
    assert limited is not None
    assert (limited.status, limited.reason, limited.retry_after) == (503, "Rate Limit Exceeded", 1)
    # Other classes have their own buckets; a class without one is not limited.
    assert g.check_request(ATTACKER, INVITE, 0.0, credentials=None) is None
    assert g.check_request(ATTACKER, INVITE, 0.0, credentials=None) is not None
    assert all(g.check_request(ATTACKER, OTHER, 0.0, credentials=None) is None for _ in range(50))
    # Two tokens a second come back.
    assert g.check_request(ATTACKER, REGISTER, 0.5, credentials=None) is None
    assert g.check_request(ATTACKER, REGISTER, 0.5, credentials=None) is not None
    # Another source has its own bucket.
    assert g.check_request(HONEST, REGISTER, 0.5, credentials=None) is None
    assert g.stats["rejected:rate_register"] == 2


def test_failed_authentications_ban_the_source_and_success_forgives() -> None:
    g = Guard(policy(auth_failures=3, auth_window=60.0, ban_time=100.0))
    for i in range(2):
        assert g.check_request(ATTACKER, REGISTER, i, credentials=(f"k{i}", "alice")) is None
        g.auth_answer(f"k{i}", 401, i)
    assert not g.banned(ATTACKER, 2.0)
    g.check_request(ATTACKER, REGISTER, 3.0, credentials=("ok", "alice"))
    g.auth_answer("ok", 200, 3.0)  # the right password: the count starts again
    for i in range(2):
        g.check_request(ATTACKER, REGISTER, 4.0 + i, credentials=(f"m{i}", "alice"))
        g.auth_answer(f"m{i}", 403, 4.0 + i)
    assert not g.banned(ATTACKER, 6.0)
    g.check_request(ATTACKER, REGISTER, 7.0, credentials=("m2", "alice"))
    g.auth_answer("m2", 407, 7.0)
    assert g.banned(ATTACKER, 7.5) and not g.admit(ATTACKER, ACCESS, 8.0)
    assert g.stats["ban:auth"] == 1 and g.stats["auth_failure"] == 5


def test_failures_outside_the_window_do_not_add_up() -> None:
    g = Guard(policy(auth_failures=3, auth_window=10.0))
    for i in range(10):
        g.check_request(ATTACKER, REGISTER, i * 6.0, credentials=(f"k{i}", "bob"))
        g.auth_answer(f"k{i}", 401, i * 6.0)
    assert not g.banned(ATTACKER, 60.0)


def test_a_user_attacked_from_many_sources_is_locked_out() -> None:
    g = Guard(policy(auth_user_failures=4, ban_time=50.0))
    for i in range(4):
        ip = f"198.51.100.{i + 1}"
        assert g.check_request(ip, REGISTER, float(i), credentials=(f"k{i}", "carol")) is None
        g.auth_answer(f"k{i}", 401, float(i))
    locked = g.check_request("198.51.100.9", REGISTER, 5.0, credentials=("k9", "carol"))
    assert locked is not None and (locked.status, locked.label) == (403, "user_locked")
    # Other users, and requests without credentials (the first try), still pass.
    assert g.check_request("198.51.100.9", REGISTER, 5.0, credentials=("kx", "dave")) is None
    assert g.check_request("198.51.100.9", REGISTER, 5.0, credentials=None) is None
    # The lock ends after ban_time.
    assert g.check_request("198.51.100.9", REGISTER, 60.0, credentials=("ky", "carol")) is None


def test_access_lists_per_side() -> None:
    g = Guard(
        policy(
            access_allow=(net("192.0.2.0/24"), net("2001:db8::/32")),
            access_deny=(net("192.0.2.64/26"),),
            core_allow=(net("10.10.0.0/16"),),
        )
    )
    assert g.admit(HONEST, ACCESS, 0.0)
    assert not g.admit(ATTACKER, ACCESS, 0.0)  # 192.0.2.66 is in the denied /26
    assert not g.admit("203.0.113.5", ACCESS, 0.0)  # not in access_allow
    assert g.admit("2001:db8::5", ACCESS, 0.0)
    # The core side: only backends, peers and core_allow.
    assert g.admit(BACKEND[0], CORE, 0.0)
    assert g.admit("10.10.3.4", CORE, 0.0)
    assert not g.admit(HONEST, CORE, 0.0)
    assert g.stats["denied_address"] == 3


def test_user_agent_block_list_is_a_case_insensitive_substring() -> None:
    g = Guard(policy())
    assert g.blocked_agent("friendly-scanner")
    assert g.blocked_agent("SIPVicious 0.3.4")
    assert not g.blocked_agent("baresip v1.0.0 (x86_64/linux)")
    assert not g.blocked_agent(None)


def test_connection_limit_per_source() -> None:
    g = Guard(policy(max_connections_per_source=2))
    assert g.connection_opened(ATTACKER, 0.0) and g.connection_opened(ATTACKER, 0.0)
    assert not g.connection_opened(ATTACKER, 0.0)
    g.connection_gone(ATTACKER)
    assert g.connection_opened(ATTACKER, 1.0)
    assert g.connection_opened(HONEST, 1.0)


def test_tls_handshakes_per_source() -> None:
    g = Guard(policy(tls_handshakes=Bucket(1.0, 2)))
    assert [g.handshake_allowed(ATTACKER, 0.0) for _ in range(3)] == [True, True, False]
    assert g.handshake_allowed(ATTACKER, 1.0)


def test_overload_refuses_a_share_of_new_requests_and_recovers() -> None:
    g = Guard(
        policy(overload_lag=0.1, retry_after=7, allow=(ipaddress.ip_network("192.0.2.99/32"),))
    )
    g.report_lag(0.04, 0.0)  # well under the target: nothing refused
    assert not g.overloaded(0.0) and g.shed(HONEST, 0.0) is None
    g.report_lag(0.35, 0.25)  # once over the target: a burst, nothing refused yet
    assert not g.overloaded(0.25)
    g.report_lag(0.35, 0.5)
    assert g.overloaded(0.5) and 0.1 < g.shed_ratio < 0.2 and g.stats["overload"] == 1
    g.report_lag(0.6, 0.75)
    assert 0.5 < g.shed_ratio < 0.7
    verdicts = [g.shed(HONEST, 0.8) for _ in range(100)]
    refused = [v for v in verdicts if v is not None]
    # Spread evenly: the share refused is the ratio, to one request.
    assert abs(len(refused) - 100 * g.shed_ratio) <= 1
    assert {(v.status, v.reason, v.retry_after) for v in refused} == {(503, "Server Overloaded", 7)}
    assert g.stats["rejected:overload"] == len(refused)
    assert all(g.shed("192.0.2.99", 0.8) is None for _ in range(20))  # trusted: never
    now = 0.75
    while g.overloaded(now):  # the load went away: back to normal within seconds
        now += 0.25
        g.report_lag(0.0, now)
        assert now < 4.0
    assert g.shed(HONEST, now) is None


def test_overload_control_holds_the_delay_and_the_throughput() -> None:
    """A simulated SBC that serves 100 new calls/s (each admitted 10 ms of work, each refused
    0.5 ms) offered 200/s for 20 s: the queue's delay settles near the target and the
    calls admitted stay close to what it can serve, then all is admitted again once the
    load is gone."""
    g = Guard(policy(overload_lag=0.1))
    tick, backlog, admitted = 0.25, 0.0, []
    for n in range(120):
        now = n * tick
        offered = 50 if now < 20 else 10  # per tick: 200/s, then 40/s
        took = sum(g.shed(HONEST, now) is None for _ in range(offered))
        backlog = max(0.0, backlog + took * 0.010 + (offered - took) * 0.0005 - tick)
        g.report_lag(backlog, now + tick)
        if 5 <= now < 20:
            admitted.append(took)
            assert backlog < 0.4  # no request waits near T1 (500 ms)
    rate = sum(admitted) / (len(admitted) * tick)
    assert 85 <= rate <= 100, rate
    assert not g.overloaded(120 * tick)


def test_backend_register_ceiling() -> None:
    g = Guard(policy(backend_register_rate=Bucket(10.0, 5)))
    assert [g.backend_register(0.0) for _ in range(6)] == [0, 0, 0, 0, 0, 1]
    assert g.backend_register(0.1) == 0  # a token came back after 0.1 s


def test_state_is_bounded_and_idle_sources_are_forgotten() -> None:
    g = Guard(policy(max_sources=100, idle_after=60.0, pike_density=5, ban_time=1000.0))
    for _ in range(6):
        g.admit("198.51.100.200", ACCESS, 0.0)  # banned: kept whatever happens
    for i in range(1000):
        g.admit(f"10.{i // 250}.{i % 250}.1", ACCESS, 1.0)
    assert g.state_size()["guard_sources"] <= 100
    assert g.banned("198.51.100.200", 2.0)
    g.handle_timer(100.0)
    assert g.state_size()["guard_sources"] == 1  # only the banned one
    assert g.next_deadline() is not None


def test_credentials_user() -> None:
    assert credentials_user('Digest username="alice", realm="x"') == "alice"
    assert credentials_user('Digest realm="x",username = "a\\"b" ,nonce="n"') == 'a\\"b'
    assert credentials_user("Digest username=bob,realm=x") == "bob"
    assert credentials_user('Digest realm="x"') == ""


# -- through the core -----------------------------------------------------------------------


def test_a_banned_source_gets_no_answer_and_others_are_served() -> None:
    core = make_core(policy(pike_density=5, ban_time=30.0))
    answered = [statuses(core.receive_datagram(options(ATTACKER, n), client(ATTACKER), 0.0))
                for n in range(8)]  # fmt: skip
    assert answered == [[200]] * 5 + [[]] * 3
    assert statuses(core.receive_datagram(options(HONEST, 99), client(HONEST), 0.1)) == [200]
    assert core.guard.banned(ATTACKER, 1.0)
    # Over TCP, a banned source's connection is closed.
    tcp = Flow("tcp", SBC_ACCESS, (ATTACKER, 40001), conn_id=3)
    assert core.receive_stream(options(ATTACKER, 50), tcp, 1.0) == [Close(tcp)]
    assert not core.connection_opened(tcp, 1.0)


def test_scanner_user_agent_is_dropped_silently() -> None:
    core = make_core(policy())
    assert core.receive_datagram(options(ATTACKER, 1, ua="friendly-scanner"), client(ATTACKER), 0.0) == []  # fmt: skip
    assert core.guard.stats["blocked_user_agent"] == 1


def test_core_side_takes_only_backends() -> None:
    core = make_core(policy())
    stranger = Flow("udp", SBC_CORE, ("198.51.100.1", 5060))
    assert core.receive_datagram(options("198.51.100.1", 1), stranger, 0.0) == []
    backend = Flow("udp", SBC_CORE, BACKEND)
    assert statuses(core.receive_datagram(options(BACKEND[0], 2), backend, 0.0)) == [200]


def test_rate_limited_register_gets_503_with_retry_after_and_is_not_relayed() -> None:
    core = make_core(policy(rates={REGISTER: Bucket(1.0, 2)}))
    out = [core.receive_datagram(register(ATTACKER, n, user=f"u{n}"), client(ATTACKER), 0.0)
           for n in range(1, 4)]  # fmt: skip
    assert [len(to_backend(a)) for a in out] == [1, 1, 0]
    [(_, resp)] = sent(out[2])
    assert isinstance(resp, Response)
    assert (resp.status, resp.reason, resp.get("retry-after")) == (503, "Rate Limit Exceeded", "1")
    # A retransmission of the refused REGISTER gets the same answer from its transaction.
    again = core.receive_datagram(register(ATTACKER, 3, user="u3"), client(ATTACKER), 0.1)
    assert statuses(again) == [503]


def test_failed_authentications_through_the_relay_ban_the_source() -> None:
    core = make_core(policy(auth_failures=3, ban_time=120.0))
    now = 0.0
    for n in range(1, 4):
        now += 1.0
        actions = core.receive_datagram(
            register(ATTACKER, n, password=f"guess{n}"), client(ATTACKER), now
        )
        [fwd] = to_backend(actions)
        challenge = make_response(fwd, 401, to_tag="b1")
        challenge.add("WWW-Authenticate", 'Digest realm="example.com", nonce="n2"')
        back = core.receive_datagram(bytes(challenge), Flow("udp", SBC_CORE, BACKEND), now)
        assert statuses(back) == [401]  # relayed to the client unchanged
    assert core.guard.banned(ATTACKER, now + 1)
    assert core.receive_datagram(register(ATTACKER, 9, password="secret"), client(ATTACKER), now + 1) == []  # fmt: skip
    # An honest client still registers.
    assert len(to_backend(core.receive_datagram(register(HONEST, 1), client(HONEST), now + 1))) == 1


def test_parallel_guesses_under_one_call_id_and_cseq_are_each_counted() -> None:
    """svcrack reuses its Call-ID and CSeq for every guess: the branch tells them apart."""
    core = make_core(policy(auth_failures=3))
    forwarded = []
    for n in range(3):
        guess = register(ATTACKER, 2, password=f"guess{n}").replace(
            b"branch=z9hG4bK-r2", f"branch=z9hG4bK-g{n}".encode()
        )
        [fwd] = to_backend(core.receive_datagram(guess, client(ATTACKER), 1.0))
        forwarded.append(fwd)
    for fwd in forwarded:  # the three challenges come back after all three were sent
        challenge = make_response(fwd, 401, to_tag="b1")
        core.receive_datagram(bytes(challenge), Flow("udp", SBC_CORE, BACKEND), 1.5)
    assert core.guard.banned(ATTACKER, 2.0)


def test_backend_register_ceiling_through_the_relay() -> None:
    core = make_core(policy(backend_register_rate=Bucket(1.0, 2)))
    out = [core.receive_datagram(register(f"192.0.2.{n}", n, user=f"u{n}"), client(f"192.0.2.{n}"), 0.0)
           for n in range(1, 4)]  # fmt: skip
    assert [len(to_backend(a)) for a in out] == [1, 1, 0]
    [(_, resp)] = sent(out[2])
    assert isinstance(resp, Response)
    assert (resp.status, resp.reason, resp.get("retry-after")) == (503, "Registrar Busy", "1")


def test_overload_refuses_new_calls_with_503_statelessly() -> None:
    core = make_core(policy(overload_lag=0.2, retry_after=3))
    # A call taken before the overload: its INVITE's retransmission is not refused.
    assert len(to_backend(core.receive_datagram(invite(HONEST, 1), client(HONEST), 0.0))) == 1
    core.report_lag(1.0, 0.1)
    core.report_lag(1.0, 0.1)
    assert core.guard.shed_ratio == pytest.approx(0.4)
    core.report_lag(2.0, 0.1)
    assert core.guard.shed_ratio == pytest.approx(0.98)
    held = len(core.transactions)
    assert 503 not in statuses(core.receive_datagram(invite(HONEST, 1), client(HONEST), 0.2))
    [(dest, resp)] = sent(core.receive_datagram(invite(HONEST, 2), client(HONEST), 0.5))
    assert isinstance(resp, Response) and dest.remote == (HONEST, 40000)
    assert (resp.status, resp.reason, resp.get("retry-after")) == (503, "Server Overloaded", "3")
    assert resp.to is not None and resp.to.tag == core._shed_tag
    assert len(core.transactions) == held  # no transaction kept for it (RFC 3261 8.2.7)
    # Its ACK is dropped before it is parsed.
    ack = sip(
        INVITE_MSG.format(ip=HONEST, n=2)
        .replace("INVITE sip:bob@example.com", "ACK sip:bob@example.com")
        .replace("CSeq: 1 INVITE", "CSeq: 1 ACK")
        .replace("To: <sip:bob@example.com>", f"To: <sip:bob@example.com>;tag={core._shed_tag}")
    )
    assert core.receive_datagram(ack, client(HONEST), 0.6) == []
    assert core.stats["shed_ack"] == 1
    # A request within a dialog is never refused (481 here: the dialog is not known).
    bye = sip(
        INVITE_MSG.format(ip=HONEST, n=3)
        .replace("INVITE sip:bob@example.com", "BYE sip:bob@example.com")
        .replace("CSeq: 1 INVITE", "CSeq: 2 BYE")
        .replace("To: <sip:bob@example.com>", "To: <sip:bob@example.com>;tag=b3")
    )
    assert statuses(core.receive_datagram(bye, client(HONEST), 0.7)) == [481]


def test_a_core_without_a_policy_checks_nothing() -> None:
    core = make_core(GuardPolicy(), backend=False)
    assert not core.guard.active
    for n in range(500):
        assert statuses(core.receive_datagram(options(ATTACKER, n), client(ATTACKER), 0.0)) == [200]
    assert core.guard.state_size()["guard_sources"] == 0


# -- from the config ------------------------------------------------------------------------


def test_config_defaults_make_a_production_policy() -> None:
    config = parse_config({})
    p = guard_policy(config, {"10.0.0.1"})
    assert p.restrict_core and p.core_sources == {"10.0.0.1"}
    assert p.pike_density == 200 and p.ban_time == 300.0
    assert p.rates[REGISTER] == Bucket(20.0, 60) and p.rates[INVITE] == Bucket(10.0, 30)
    assert "friendly-scanner" in p.user_agent_block and "vaxsipuseragent" in p.user_agent_block
    assert p.auth_failures == 5 and p.backend_register_rate == Bucket(500.0, 1000)


def test_each_worker_enforces_its_share_of_the_per_source_limits() -> None:
    config = parse_config({"sbc": {"workers": 3}, "access": {"listen": ["udp://127.0.0.1:5060"]}})
    one, three = guard_policy(config, set()), guard_policy(config, set(), 3)
    assert three.pike_density == 67 and one.pike_density == 200  # rounded up
    assert three.rates[REGISTER] == Bucket(20.0 / 3, 20) and three.rates[INVITE].burst == 10
    assert three.auth_failures == 2 and three.backend_register_rate == Bucket(500.0 / 3, 334)
    assert three.ban_time == one.ban_time and three.pike_window == one.pike_window


def test_config_takes_networks_and_buckets() -> None:
    config = parse_config(
        {
            "security": {
                "allow": ["192.0.2.10", "2001:db8::/48"],
                "register": {"rate": 5, "burst": 10},
                "backend_register": {"rate": 0},
            }
        }
    )
    p = guard_policy(config, set())
    assert p.allow == (net("192.0.2.10/32"), net("2001:db8::/48"))
    assert p.rates[REGISTER] == Bucket(5.0, 10)
    assert p.backend_register_rate.rate == 0


@pytest.mark.parametrize(
    ("security", "error"),
    [
        ({"allow": ["10.0.0.1/8"]}, "security.allow[0]: not an address or network"),
        ({"access_deny": "10.0.0.0/8"}, "security.access_deny: must be an array"),
        ({"register": {"rate": -1}}, "security.register.rate: must be a number >= 0, got -1"),
        ({"pike_density": "many"}, 'security.pike_density: must be an integer >= 0, got "many"'),
        ({"ban": 5}, "security.ban: unknown key"),
    ],
)
def test_bad_security_config_names_the_key(security: dict[str, object], error: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"security": security}, source="sbc.toml")
    assert any(error in e for e in info.value.errors), info.value.errors


def test_ipv4_senders_on_a_dual_stack_socket_are_judged_as_ipv4() -> None:
    """RFC 4291 2.5.5.2: an IPv4 sender on a socket bound to :: arrives IPv4-mapped."""
    g = Guard(policy(access_deny=(net("192.0.2.64/26"),)))
    assert g.admit(f"::ffff:{BACKEND[0]}", CORE, 0.0)  # the backend, mapped
    assert not g.admit(f"::ffff:{ATTACKER}", ACCESS, 0.0)  # the deny list still applies
    assert g.admit(f"::ffff:{HONEST}", ACCESS, 0.0)


def test_failure_records_of_made_up_user_names_are_swept() -> None:
    g = Guard(policy(auth_user_failures=50, auth_window=60.0))
    for i in range(500):
        g.check_request(ATTACKER, REGISTER, 1.0, credentials=(f"k{i}", f"user{i}"))
        g.auth_answer(f"k{i}", 401, 1.0)
    assert g.state_size()["guard_users"] == 500
    g.handle_timer(100.0)
    assert g.state_size()["guard_users"] == 0


def test_eviction_keeps_memory_bounded_even_when_every_source_is_banned() -> None:
    g = Guard(policy(max_sources=100, pike_density=1, ban_time=1000.0))
    for i in range(300):
        ip = f"10.1.{i // 250}.{i % 250}"
        g.admit(ip, ACCESS, 0.0)
        g.admit(ip, ACCESS, 0.0)  # the second packet bans it
    assert g.state_size()["guard_sources"] <= 100
    assert len(g.bans) <= 100


def test_a_stale_nonce_challenge_is_not_a_failed_authentication() -> None:
    """RFC 2617 3.2.1: stale=true says the password was right and the nonce old: phones
    behind one NAT re-authenticating at nonce expiry must not get their NAT banned."""
    core = make_core(policy(auth_failures=2))
    for n in range(1, 5):
        [fwd] = to_backend(
            core.receive_datagram(
                register(ATTACKER, n, password="right"), client(ATTACKER), float(n)
            )
        )
        challenge = make_response(fwd, 401, to_tag="b1")
        challenge.add("WWW-Authenticate", 'Digest realm="example.com", nonce="n9", stale=TRUE')
        core.receive_datagram(bytes(challenge), Flow("udp", SBC_CORE, BACKEND), float(n))
    assert not core.guard.banned(ATTACKER, 10.0) and core.guard.stats["auth_failure"] == 0
