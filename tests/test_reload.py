"""Reload and drain in the sans-I/O core: a reloaded config changes
backends, limits and lists without dropping calls, registrations or bans; a drain refuses
new calls and ends the rest with BYE. The real process: tests/interop/test_reload.py."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

import pytest
from test_b2bua import ALICE, B1, Lab, byes, establish, in_dialog, invite, only

from sbc.actions import Drained
from sbc.app import restart_needed
from sbc.calls import CallPolicy
from sbc.config import parse_config
from sbc.features.balancer import BackendSpec, Balancer, HealthPolicy
from sbc.features.guard import Guard, GuardPolicy
from sbc.sides import ACCESS
from sbc.sides import CORE as CORE_SIDE
from sbc.sip.message import Request, Response, make_response

B2 = ("10.1.0.11", 5070)


def spec(name: str, host: str, port: int = 5070, weight: int = 1) -> BackendSpec:
    return BackendSpec(name=name, host=host, port=port, transport="udp", weight=weight)


def test_balancer_reconfigure_keeps_the_state_of_kept_backends() -> None:
    balancer = Balancer([spec("sip:a", "10.0.0.1"), spec("sip:b", "10.0.0.2")])
    a, _ = balancer.backends
    a.up, a.active_dialogs = False, 3
    balancer.reconfigure(
        [spec("sip:a", "10.0.0.1", weight=5), spec("sip:c", "10.0.0.3")],
        policy=HealthPolicy(),
        algorithm="least-calls",
        now=10.0,
    )
    kept, added = balancer.backends
    assert kept is a and not kept.up and kept.active_dialogs == 3 and kept.weight == 5
    assert added.name == "sip:c" and added.up and added.next_probe == 10.0
    assert balancer.by_address("10.0.0.2", 5070) is None  # b is gone
    assert balancer.by_address("10.0.0.3", 5070) is added
    assert balancer.algorithm == "least-calls"
    # A backend whose name now resolves elsewhere starts afresh.
    balancer.reconfigure([spec("sip:a", "10.0.0.9")], policy=HealthPolicy(), algorithm="aor-hash", now=11.0)  # fmt: skip
    assert balancer.backends[0] is not a and balancer.backends[0].up
    with pytest.raises(ValueError, match="duplicate"):
        balancer.reconfigure([spec("sip:a", "1.1.1.1"), spec("sip:a", "1.1.1.2")],
                             policy=HealthPolicy(), algorithm="aor-hash", now=0.0)  # fmt: skip


def test_guard_set_policy_keeps_bans_unless_the_source_is_now_trusted() -> None:
    g = Guard(GuardPolicy(pike_density=2, ban_time=100.0))
    for ip in ("192.0.2.1", "192.0.2.2"):
        for _ in range(3):
            g.admit(ip, ACCESS, 0.0)
    assert g.banned("192.0.2.1", 1.0) and g.banned("192.0.2.2", 1.0)
    g.set_policy(
        GuardPolicy(
            pike_density=2,
            ban_time=100.0,
            allow=(ipaddress.ip_network("192.0.2.1/32"),),
            access_deny=(ipaddress.ip_network("198.51.100.0/24"),),
        )
    )
    assert not g.banned("192.0.2.1", 1.0) and g.admit("192.0.2.1", ACCESS, 1.0)
    assert g.banned("192.0.2.2", 1.0)  # a ban in force stays
    g.admit("198.51.100.7", ACCESS, 1.0)
    assert not g.admit("198.51.100.7", ACCESS, 1.0)  # the new deny list applies


def test_restart_needed_names_what_a_reload_cannot_change() -> None:
    old = parse_config({})
    same = parse_config({"core": {"backends": [{"uri": "sip:10.0.0.1"}]},
                         "calls": {"max_calls": 10}, "security": {"pike_density": 5},
                         "log": {"level": "debug"}})  # fmt: skip
    assert restart_needed(old, same) == []
    moved = parse_config({"access": {"listen": ["udp://127.0.0.1:5062"]},
                          "media": {"ports": "40000-40100"}, "log": {"format": "json"}})  # fmt: skip
    assert restart_needed(old, moved) == ["access.listen", "media", "log.format"]


def test_reconfigure_applies_limits_and_backends_without_dropping_the_call() -> None:
    lab = Lab()
    _, _, got = establish(lab, n=1)
    core = lab.core
    settings = core.settings
    new_backend = replace(settings.backends[0], name="sip:b2", host=B2[0], port=B2[1])
    core.reconfigure(
        replace(
            settings,
            backends=(replace(settings.backends[0], weight=0), new_backend),
            calls=CallPolicy(max_calls=2, strip_headers=("x-custom",)),
        ),
        lab.now,
    )
    assert core.calls.active_calls == 1
    # New calls go to the added backend (the first drained), without the stripped header.
    flow, fwd = only(lab.from_client(invite(2)), Request)
    assert flow.remote == B2 and fwd.get("x-custom") is None
    # The call from before the reload still ends normally through the first backend.
    out = lab.from_client(in_dialog("BYE", got, 2))
    assert [f.remote for f, m in out if isinstance(m, Request)] == [B1]
    # The new limit counts the calls in progress.
    only(lab.from_client(invite(3)), Request)
    _, busy = only(lab.from_client(invite(4)), Response)
    assert isinstance(busy, Response) and busy.status == 503


def test_drain_refuses_new_calls_and_end_all_sends_bye_on_both_legs() -> None:
    lab = Lab()
    establish(lab, n=1)
    assert not any(isinstance(a, Drained) for a in lab.core.drain(lab.now))
    assert lab.core.draining
    _, refused = only(lab.from_client(invite(2)), Response)
    assert isinstance(refused, Response)
    assert (refused.status, refused.reason, refused.get("retry-after")) == (
        503,
        "Shutting Down",
        "5",
    )
    out = lab._sent(lab.core.end_all_calls(lab.now))
    sent_byes = byes(out)
    assert sorted(f.remote for f, _ in sent_byes) == sorted([B1, ALICE.remote])
    for flow, bye in sent_byes:
        assert bye.get("reason") == 'SIP;cause=503;text="shutdown"'
        (lab.from_backend if flow.remote == B1 else lab.from_client)(make_response(bye, 200))  # type: ignore[operator]
    assert lab.core.calls.active_calls == 0
    lab.assert_clean()
    # The last BYE answered: the core said once that the drain is over.
    assert lab.drained == 1


def test_drain_without_calls_is_over_at_once() -> None:
    lab = Lab()
    assert [a for a in lab.core.drain(lab.now) if isinstance(a, Drained)] == [Drained()]
    assert not any(isinstance(a, Drained) for a in lab.core.handle_timer(lab.now + 1))


def test_a_backend_removed_by_a_reload_is_still_heard_on_the_core_side() -> None:
    """Its calls end through it (BYE, 200): the guard keeps taking its packets."""
    lab = Lab()
    core = lab.core
    settings = core.settings
    guard = GuardPolicy(core_sources=frozenset({B1[0]}), restrict_core=True, pike_density=1000)
    core.reconfigure(replace(settings, security=guard), lab.now)
    assert core.guard.admit(B1[0], CORE_SIDE, lab.now)
    new_backend = replace(settings.backends[0], name="sip:b2", host=B2[0], port=B2[1])
    moved = replace(guard, core_sources=frozenset({B2[0]}))
    core.reconfigure(replace(settings, backends=(new_backend,), security=moved), lab.now)
    assert core.guard.admit(B1[0], CORE_SIDE, lab.now) and core.guard.admit(
        B2[0], CORE_SIDE, lab.now
    )
    assert not core.guard.admit("10.9.9.9", CORE_SIDE, lab.now)
