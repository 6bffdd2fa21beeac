"""Backend balancer driven by explicit ``now`` values."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from sbc.features.balancer import (
    DEFAULT_REPLY_CODES,
    BackendDown,
    BackendSpec,
    BackendState,
    BackendUp,
    Balancer,
    HealthPolicy,
)

AORS = [f"sip:user{i}@example.com" for i in range(10_000)]


def spec(name: str, weight: int = 1, *, host: str = "127.0.0.1", port: int = 0) -> BackendSpec:
    port = port or 5070 + ord(name[-1]) % 100
    return BackendSpec(
        name=f"sip:{name}.example.net;transport=udp",
        host=host,
        port=port,
        transport="udp",
        weight=weight,
    )


def balancer(*weights: int, algorithm: str = "aor-hash", **kw: object) -> Balancer:
    specs = [spec(chr(ord("a") + i), w) for i, w in enumerate(weights)]
    return Balancer(specs, algorithm=algorithm, **kw)  # type: ignore[arg-type]


def assignment(bal: Balancer) -> dict[str, BackendState | None]:
    return {aor: bal.pick_for_aor(aor) for aor in AORS}


def take_down(bal: Balancer, backend: BackendState, now: float = 0.0) -> None:
    for _ in range(bal.policy.probe_failures):
        bal.probe_result(backend, ok=False, now=now, reason="timeout")
    assert not backend.up


def bring_up(bal: Balancer, backend: BackendState, now: float = 0.0) -> None:
    for _ in range(bal.policy.probe_successes):
        bal.probe_result(backend, ok=True, now=now)
    assert backend.up


# -- value types ---------------------------------------------------------------------------


def test_backend_state_properties() -> None:
    s = BackendSpec(name="sip:[::1]:5070;transport=tcp", host="::1", port=5070, transport="tcp")
    b = BackendState(s, next_probe=7.0)
    assert (b.name, b.address, b.transport, b.weight) == (s.name, ("::1", 5070), "tcp", 1)
    assert b.up and b.failures == 0 and b.successes == 0 and b.active_dialogs == 0
    assert b.last_rtt is None and b.next_probe == 7.0 and not b.probe_in_flight
    with pytest.raises(AttributeError):
        b.other = 1  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"host": "[::1]"},
        {"host": ""},
        {"port": 0},
        {"port": 65536},
        {"transport": "sctp"},
        {"transport": "UDP"},
        {"weight": -1},
        {"name": ""},
    ],
)
def test_backend_spec_rejects_bad_values(kwargs: dict[str, object]) -> None:
    base: dict[str, object] = {
        "name": "sip:b",
        "host": "127.0.0.1",
        "port": 5070,
        "transport": "udp",
    }
    with pytest.raises(ValueError):
        BackendSpec(**(base | kwargs))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs", [{"probe_interval": 0}, {"probe_failures": 0}, {"probe_successes": 0}]
)
def test_health_policy_rejects_bad_values(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        HealthPolicy(**kwargs)  # type: ignore[arg-type]


def test_balancer_rejects_unknown_algorithm_and_duplicate_names() -> None:
    with pytest.raises(ValueError, match="unknown balancing algorithm"):
        Balancer([spec("a")], algorithm="random")
    with pytest.raises(ValueError, match="duplicate backend names"):
        Balancer([spec("a"), spec("a", port=6000)])


def test_every_backend_starts_up_with_first_probe_due_at_start() -> None:
    bal = balancer(1, 1, now=100.0)
    assert bal.up_backends() == list(bal.backends)
    assert [b.next_probe for b in bal.backends] == [100.0, 100.0]
    assert bal.next_deadline() == 100.0


def test_default_reply_codes() -> None:
    bal = balancer(1)
    assert bal.is_alive_reply(200) and bal.is_alive_reply(202) and bal.is_alive_reply(299)
    assert bal.is_alive_reply(404) and bal.is_alive_reply(401) and bal.is_alive_reply(407)
    assert bal.is_alive_reply(409) and bal.is_alive_reply(499)
    for code in (100, 180, 302, 408, 500, 503, 603):
        assert not bal.is_alive_reply(code), code
    assert len(DEFAULT_REPLY_CODES) == 100 + 99
    custom = balancer(1, policy=HealthPolicy(reply_codes=frozenset({200})))
    assert custom.is_alive_reply(200) and not custom.is_alive_reply(404)


# -- AOR hash (weighted rendezvous) --------------------------------------------------------


def test_aor_hash_is_deterministic() -> None:
    one, two = balancer(1, 1, 2), balancer(1, 1, 2)
    for aor in AORS[:500]:
        first = one.pick_for_aor(aor)
        assert first is not None
        assert one.pick_for_aor(aor) is first
        assert two.backends.index(two.pick_for_aor(aor)) == one.backends.index(first)


def test_aor_hash_is_stable_across_processes() -> None:
    # blake2b, not hash(): a fresh interpreter with another PYTHONHASHSEED picks the same.
    bal = balancer(1, 1, 2)
    local = [bal.backends.index(bal.pick_for_aor(aor)) for aor in AORS[:50]]
    code = (
        "from sbc.features.balancer import BackendSpec, Balancer\n"
        "specs = [BackendSpec(name=f'sip:{n}.example.net;transport=udp', host='127.0.0.1',"
        " port=5070 + ord(n) % 100, transport='udp', weight=w) for n, w in zip('abc', (1, 1, 2))]\n"
        "bal = Balancer(specs)\n"
        "print([bal.backends.index(bal.pick_for_aor(f'sip:user{i}@example.com')) for i in range(50)])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parent.parent,
        env={"PYTHONHASHSEED": "12345"},
    )
    assert out.stdout.strip() == str(local)


def test_aor_hash_distribution_is_proportional_to_weight() -> None:
    bal = balancer(1, 1, 2)
    counts = Counter(b.name for b in assignment(bal).values() if b is not None)
    expected = {"a": 2500, "b": 2500, "c": 5000}
    for backend in bal.backends:
        want = expected[backend.name[4]]
        assert abs(counts[backend.name] - want) <= 0.05 * want, (backend.name, counts)


def test_aor_hash_only_users_of_a_failed_backend_move_and_exactly_they_return() -> None:
    bal = balancer(1, 1, 2)
    a, b, c = bal.backends
    before = assignment(bal)
    take_down(bal, b)
    during = assignment(bal)
    for aor in AORS:
        if before[aor] is b:
            assert during[aor] in (a, c)
        else:
            assert during[aor] is before[aor]
    # The moved users spread over the survivors by weight (1:2), not all onto one.
    moved = Counter(during[aor] for aor in AORS if before[aor] is b)
    assert moved[a] + moved[c] == sum(1 for aor in AORS if before[aor] is b)
    assert 0.25 < moved[a] / (moved[a] + moved[c]) < 0.42
    bring_up(bal, b)
    assert assignment(bal) == before


def test_aor_hash_skips_weight_zero_and_returns_none_when_nothing_is_up() -> None:
    bal = balancer(1, 0, 1)
    a, drained, c = bal.backends
    assert drained not in set(assignment(bal).values())
    assert drained in bal.up_backends()  # drained, not down
    take_down(bal, a)
    take_down(bal, c)
    assert bal.pick_for_aor("sip:alice@example.com") is None
    for algorithm in Balancer.ALGORITHMS:
        other = balancer(1, 0, algorithm=algorithm)
        take_down(other, other.backends[0])
        assert other.pick_for_dialog("x") is None, algorithm
    assert Balancer([]).pick_for_aor("sip:alice@example.com") is None


def test_aor_hash_with_one_backend_up_sends_everyone_there() -> None:
    bal = balancer(1, 1)
    take_down(bal, bal.backends[0])
    assert set(assignment(bal).values()) == {bal.backends[1]}


def test_pick_for_dialog_aor_hash_is_pick_for_aor() -> None:
    bal = balancer(1, 1, 2)
    for aor in AORS[:200]:
        assert bal.pick_for_dialog(aor) is bal.pick_for_aor(aor)


# -- weighted round robin and least calls --------------------------------------------------


def test_smooth_weighted_round_robin_5_1_1() -> None:
    # nginx's example for smooth WRR: weights {a:5, b:1, c:1} -> a a b a c a a, repeating.
    bal = balancer(5, 1, 1, algorithm="weighted-round-robin")
    picks = [bal.pick_for_dialog(f"call-{i}") for i in range(14)]
    names = "".join(b.name[4] if b else "-" for b in picks)
    assert names == "aabacaa" * 2


def test_weighted_round_robin_skips_down_and_drained_backends() -> None:
    bal = balancer(1, 1, 0, algorithm="weighted-round-robin")
    a, b, _ = bal.backends
    assert [bal.pick_for_dialog("") for _ in range(4)] == [a, b, a, b]
    take_down(bal, a)
    assert [bal.pick_for_dialog("") for _ in range(3)] == [b, b, b]
    bring_up(bal, a)
    picks = [bal.pick_for_dialog("") for _ in range(4)]
    assert Counter(picks) == {a: 2, b: 2}


def test_least_calls_follows_dialog_counts_relative_to_weight() -> None:
    bal = balancer(1, 1, 2, algorithm="least-calls")
    a, b, c = bal.backends
    assert bal.pick_for_dialog("") is a  # all at 0: lowest index
    bal.dialog_started(a)
    assert bal.pick_for_dialog("") is b
    bal.dialog_started(b)
    assert bal.pick_for_dialog("") is c  # 0/2
    bal.dialog_started(c)
    assert bal.pick_for_dialog("") is c  # 1/2 < 1/1
    bal.dialog_started(c)
    assert bal.pick_for_dialog("") is a  # 1/1 == 1/1 == 2/2: lowest index
    bal.dialog_ended(b)
    assert bal.pick_for_dialog("") is b  # 0/1
    take_down(bal, b)
    assert bal.pick_for_dialog("") is a
    bal.dialog_ended(b)
    bal.dialog_ended(b)  # never below zero
    assert b.active_dialogs == 0


def test_least_calls_fills_backends_in_proportion_to_weight() -> None:
    bal = balancer(1, 1, 2, algorithm="least-calls")
    for _ in range(400):
        chosen = bal.pick_for_dialog("")
        assert chosen is not None
        bal.dialog_started(chosen)
    assert [b.active_dialogs for b in bal.backends] == [100, 100, 200]


# -- health state machine ------------------------------------------------------------------


def test_three_failures_give_exactly_one_backend_down() -> None:
    bal = balancer(1, 1)
    b = bal.backends[0]
    assert bal.probe_result(b, ok=False, now=0.0, reason="timeout") is None
    assert bal.probe_result(b, ok=False, now=5.0, reason="timeout") is None
    event = bal.probe_result(b, ok=False, now=10.0, reason="503 Service Unavailable")
    assert event == BackendDown(backend=b, reason="503 Service Unavailable")
    assert not b.up and bal.up_backends() == [bal.backends[1]]
    for t in (15.0, 20.0, 25.0):
        assert bal.probe_result(b, ok=False, now=t) is None
    assert b.failures == 6 and not b.up


def test_two_successes_bring_a_down_backend_up() -> None:
    bal = balancer(1)
    b = bal.backends[0]
    take_down(bal, b)
    assert bal.probe_result(b, ok=True, now=20.0, rtt=0.012) is None
    assert not b.up and b.successes == 1 and b.last_rtt == 0.012
    assert bal.probe_result(b, ok=True, now=25.0, rtt=0.010) == BackendUp(backend=b)
    assert b.up and b.failures == 0 and b.last_rtt == 0.010
    assert bal.probe_result(b, ok=True, now=30.0) is None  # no event while staying up


def test_a_failure_between_successes_restarts_recovery() -> None:
    bal = balancer(1)
    b = bal.backends[0]
    take_down(bal, b)
    assert bal.probe_result(b, ok=True, now=0.0) is None
    assert bal.probe_result(b, ok=False, now=5.0) is None
    assert bal.probe_result(b, ok=True, now=10.0) is None
    assert isinstance(bal.probe_result(b, ok=True, now=15.0), BackendUp)


def test_a_success_resets_the_failure_count() -> None:
    bal = balancer(1)
    b = bal.backends[0]
    bal.probe_result(b, ok=False, now=0.0)
    bal.probe_result(b, ok=False, now=5.0)
    assert bal.probe_result(b, ok=True, now=10.0) is None
    assert b.failures == 0
    assert bal.probe_result(b, ok=False, now=15.0) is None
    assert bal.probe_result(b, ok=False, now=20.0) is None
    assert b.up
    assert isinstance(bal.probe_result(b, ok=False, now=25.0), BackendDown)


def test_request_timeouts_count_as_failures() -> None:
    bal = balancer(1)
    b = bal.backends[0]
    assert bal.request_failed(b, now=1.0, reason="REGISTER timeout") is None
    assert bal.probe_result(b, ok=False, now=2.0, reason="probe timeout") is None
    event = bal.request_failed(b, now=3.0, reason="INVITE timeout")
    assert event == BackendDown(backend=b, reason="INVITE timeout")
    assert bal.request_failed(b, now=4.0, reason="INVITE timeout") is None


def test_policy_thresholds_are_honoured() -> None:
    policy = HealthPolicy(probe_failures=1, probe_successes=1)
    bal = balancer(1, policy=policy)
    b = bal.backends[0]
    assert isinstance(bal.probe_result(b, ok=False, now=0.0), BackendDown)
    assert isinstance(bal.probe_result(b, ok=True, now=1.0), BackendUp)


def test_failure_reason_defaults() -> None:
    bal = balancer(1, policy=HealthPolicy(probe_failures=1))
    event = bal.probe_result(bal.backends[0], ok=False, now=0.0)
    assert isinstance(event, BackendDown) and event.reason == "probe failed"


# -- probe timing --------------------------------------------------------------------------


def test_probes_due_timing_and_next_deadline() -> None:
    bal = balancer(1, 1, now=10.0)
    a, b = bal.backends
    assert bal.probes_due(9.999) == []
    assert bal.next_deadline() == 10.0
    assert bal.probes_due(10.0) == [a, b]
    assert a.probe_in_flight and b.probe_in_flight
    assert a.next_probe == b.next_probe == 15.0
    assert bal.next_deadline() is None  # both in flight: nothing for the timer
    assert bal.probes_due(20.0) == []  # no second probe while one is in flight

    bal.probe_result(a, ok=True, now=10.02, rtt=0.02)
    assert bal.next_deadline() == 15.0
    assert bal.probes_due(14.999) == []
    assert bal.probes_due(15.0) == [a]
    assert a.next_probe == 20.0 and bal.next_deadline() is None

    # b's outcome comes late (after its next probe was due): it is due at once.
    bal.probe_result(b, ok=False, now=16.0, reason="timeout")
    assert bal.next_deadline() == 15.0
    assert bal.probes_due(16.0) == [b]
    assert b.next_probe == 21.0
    bal.probe_result(a, ok=True, now=15.01)
    bal.probe_result(b, ok=True, now=16.01)
    assert bal.next_deadline() == 20.0


def test_down_and_drained_backends_are_still_probed() -> None:
    bal = balancer(1, 0)
    a, drained = bal.backends
    take_down(bal, a)
    assert bal.probes_due(0.0) == [a, drained]


def test_no_backends_no_deadline() -> None:
    bal = Balancer([])
    assert bal.next_deadline() is None and bal.probes_due(0.0) == [] and bal.up_backends() == []


# -- addresses -----------------------------------------------------------------------------


def test_by_address() -> None:
    specs = [
        BackendSpec(
            name="sip:core1.example.net", host="Core1.Example.NET", port=5060, transport="udp"
        ),
        BackendSpec(name="sip:[2001:db8::1]:5070", host="2001:DB8::1", port=5070, transport="udp"),
        BackendSpec(name="sip:192.0.2.7:5080", host="192.0.2.7", port=5080, transport="udp"),
        BackendSpec(
            name="sip:192.0.2.7:5080;transport=tcp", host="192.0.2.7", port=5080, transport="tcp"
        ),
    ]
    bal = Balancer(specs)
    host, v6, udp, tcp = bal.backends
    assert bal.by_address("core1.example.net", 5060) is host
    assert bal.by_address("core1.example.net", 5061) is None
    assert bal.by_address("2001:db8::1", 5070) is v6
    assert bal.by_address("2001:db8:0:0::1", 5070) is v6
    assert bal.by_address("[2001:db8::1]", 5070) is v6
    assert bal.by_address("::ffff:192.0.2.7", 5080) is udp  # dual-stack socket source
    assert bal.by_address("192.0.2.7", 5080) is udp
    assert bal.by_address("192.0.2.7", 5080, transport="tcp") is tcp
    assert bal.by_address("192.0.2.7", 5080, transport="tls") is None
    assert bal.by_address("192.0.2.8", 5080) is None
