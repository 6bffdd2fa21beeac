"""The state the signalling workers share (sbc/registration/shared.py): several real cores,
the Share actions of each applied by the others as the link between workers does it."""

from __future__ import annotations

import marshal

import pytest
from sipdata import sip
from test_core import options as options_to
from test_guard import ATTACKER, client, options
from test_registration import B1, B2, CLIENT, REGISTER, answer, make_core, sent

from sbc.actions import Action, SendData, Share
from sbc.core import SbcCore
from sbc.features.guard import GuardPolicy
from sbc.registration import OffloadPolicy
from sbc.registration.shared import VERSION, stored_event
from sbc.sip.flow import Flow
from sbc.sip.message import Request, Response, make_response
from sbc.sip.parser import parse_message
from sbc.sip.transaction import Send

FLOOD = GuardPolicy(pike_window=2.0, pike_density=5, ban_time=60.0)


class Sbc:
    """The signalling workers of one SBC, linked: each Share action of one is marshalled
    (what the link carries) and applied by every other worker."""

    def __init__(self, cores: list[SbcCore]) -> None:
        self.cores = cores
        self.shared: list[tuple[object, ...]] = []  # every event shared, in order
        self.applied: list[list[Action]] = [[] for _ in cores]  # what applying gave each

    def run(self, index: int, actions: list[Action], now: float) -> list[Action]:
        """Worker ``index``'s actions but its Share actions, which the others apply."""
        rest: list[Action] = []
        for action in actions:
            if not isinstance(action, Share):
                rest.append(action)
                continue
            event = marshal.loads(marshal.dumps(action.event))
            assert event == action.event  # plain values only
            self.shared.append(event)
            for i, core in enumerate(self.cores):
                if i != index:
                    out = core.apply_shared(event, now)
                    assert not any(isinstance(a, Share) for a in out)  # never shared again
                    self.applied[i] += out
        return rest

    def receive(self, index: int, data: bytes, flow: Flow, now: float) -> list[Action]:
        return self.run(index, self.cores[index].receive_datagram(data, flow, now), now)

    def timer(self, index: int, now: float) -> list[Action]:
        return self.run(index, self.cores[index].handle_timer(now), now)


def workers(count: int, *backends: tuple[str, int], **kw: object) -> Sbc:
    return Sbc([make_core(*backends, worker=i, workers=count, **kw) for i in range(count)])  # type: ignore[arg-type]


def register_via(sbc: Sbc, index: int, user: str, n: int, now: float) -> None:
    """REGISTER ``user`` from CLIENT through worker ``index``; the backend answers 200."""
    req = sip(REGISTER.format(n=n, user=user))
    [(flow, fwd)] = sent(sbc.receive(index, req, CLIENT, now))
    assert isinstance(fwd, Request) and fwd.method == "REGISTER"
    ok = make_response(fwd, 200, to_tag="reg")
    ok.add("Contact", f"<sip:{user}@10.0.0.7:5060>;expires=3600")
    [(to, resp)] = sent(sbc.receive(index, bytes(ok), flow, now))
    assert to == CLIENT and isinstance(resp, Response) and resp.status == 200


def backend_registers(actions: list[Action]) -> list[Request]:
    return [m for _, m in to_backends(actions) if m.method == "REGISTER"]


def to_backends(actions: list[Action]) -> list[tuple[Flow, Request]]:
    return [(f, m) for f, m in sent(actions) if isinstance(m, Request) and f.remote in (B1, B2)]


def test_a_refresh_answered_by_another_worker_moves_the_owners_expiry_on() -> None:
    sbc = workers(2, B1)
    register_via(sbc, 0, "dave", 1, 0.0)
    [reg0] = sbc.cores[0].registration.registrations
    [reg1] = sbc.cores[1].registration.registrations
    assert reg1 is not reg0 and stored_event(reg1) == stored_event(reg0)
    assert (reg0.owner, reg1.owner) == (0, 0)
    # The refresh reaches worker 1 (a UDP flow is the same in every worker: one socket
    # address), which answers it from the shared record.
    [(to, resp)] = sent(sbc.receive(1, sip(REGISTER.format(n=2, user="dave")), CLIENT, 50.0))
    assert to == CLIENT and isinstance(resp, Response) and resp.status == 200
    assert sbc.cores[1].registration.stats["register_offloaded"] == 1
    assert (reg0.cseq, reg0.client_expires_at, reg0.owner) == (2, 110.0, 0)
    assert (reg1.cseq, reg1.client_expires_at, reg1.owner) == (2, 110.0, 0)
    # The first expiry (60 s) has moved on in both: nobody de-registers.
    assert not backend_registers(sbc.timer(0, 60.0)) and not backend_registers(sbc.timer(1, 60.0))
    assert all(len(core.registration.registrations) == 1 for core in sbc.cores)
    # The next refresh is answered from worker 1's template: shared too.
    [(_, resp)] = sent(sbc.receive(1, sip(REGISTER.format(n=3, user="dave")), CLIENT, 100.0))
    assert isinstance(resp, Response) and resp.status == 200
    assert sbc.cores[1].registration.stats["register_templated"] == 1
    assert (reg0.cseq, reg0.client_expires_at) == (3, 160.0)
    # A refresh seen already (a later one was applied) changes nothing.
    stale = sbc.shared[1]
    sbc.cores[0].apply_shared(stale, 101.0)
    assert (reg0.cseq, reg0.client_expires_at) == (3, 160.0)
    assert sbc.cores[0].registration.stats["shared_stale"] == 1


@pytest.mark.parametrize("owner", [0, 2])
def test_an_expired_registration_is_de_registered_by_its_owner_alone(owner: int) -> None:
    sbc = workers(3, B1)
    register_via(sbc, owner, "frank", 1, 0.0)
    assert len(sbc.shared) == 1
    assert [r.owner for c in sbc.cores for r in c.registration.registrations] == [owner] * 3
    dereg = [
        [(f, m) for f, m in to_backends(sbc.timer(i, 60.0)) if m.method == "REGISTER"]
        for i in range(3)
    ]
    assert [len(sent) for sent in dereg] == [int(i == owner) for i in range(3)]
    [(flow, req)] = dereg[owner]
    assert req.get("expires") == "0" and req.call_id == "reg-frank@10.0.0.7"
    assert sbc.receive(owner, bytes(make_response(req, 200, to_tag="b1")), flow, 60.1) == []
    # Every worker dropped it (the owner's drop, shared, found nothing left to drop); nothing
    # is sent again.
    assert [event[0] for event in sbc.shared] == ["reg", "unreg"]
    assert all(len(core.registration.registrations) == 0 for core in sbc.cores)
    assert not any(backend_registers(sbc.timer(i, 120.0)) for i in range(3))


def test_a_refresh_that_reaches_the_owner_after_the_expiry_is_dropped_everywhere() -> None:
    sbc = workers(2, B1)
    register_via(sbc, 0, "dave", 1, 0.0)
    # Worker 1 answers a refresh at the last moment; its news reaches worker 0 only after
    # worker 0 found the registration expired and de-registered it.
    late = sbc.cores[1].receive_datagram(sip(REGISTER.format(n=2, user="dave")), CLIENT, 59.99)
    assert len(sbc.cores[1].registration.registrations) == 1
    assert len(backend_registers(sbc.timer(0, 60.0))) == 1
    assert len(sbc.cores[1].registration.registrations) == 0  # no record without its binding
    sent(sbc.run(1, late, 60.0))
    assert sbc.cores[0].registration.stats["shared_stale"] == 1
    assert all(len(core.registration.registrations) == 0 for core in sbc.cores)
    # The client's next refresh goes to the backend again.
    [(flow, fwd)] = sent(sbc.receive(1, sip(REGISTER.format(n=3, user="dave")), CLIENT, 70.0))
    assert isinstance(fwd, Request) and flow.remote == B1


def test_a_de_registration_through_another_worker_removes_the_record_everywhere() -> None:
    sbc = workers(2, B1)
    register_via(sbc, 0, "dave", 1, 0.0)
    bye = sip(REGISTER.format(n=2, user="dave")).replace(b"Expires: 3600", b"Expires: 0")
    [(flow, fwd)] = sent(sbc.receive(1, bye, CLIENT, 10.0))
    assert isinstance(fwd, Request) and fwd.method == "REGISTER" and flow.remote == B1
    [(to, resp)] = sent(sbc.receive(1, bytes(make_response(fwd, 200, to_tag="reg")), flow, 10.0))
    assert to == CLIENT and isinstance(resp, Response) and resp.status == 200
    assert all(len(core.registration.registrations) == 0 for core in sbc.cores)
    assert not backend_registers(sbc.timer(0, 60.0))  # the owner has nothing to de-register


def test_the_owner_alone_recovers_a_dead_backends_registration_and_shares_it() -> None:
    sbc = workers(2, B1, B2, failures=1)
    on_b1 = [
        f"r{i}" for i in range(50) if _backend_of(sbc.cores[1], f"r{i}") == "sip:127.0.0.1:5070"
    ]
    user = on_b1[0]
    register_via(sbc, 1, user, 1, 0.0)
    recovery: list[list[Send]] = []
    for core in sbc.cores:  # each worker finds B1 down by its own probes
        [b1] = [b for b in core.backends.balancer.backends if b.name == "sip:127.0.0.1:5070"]
        out = core.backends.report_failure(b1, "probe timed out", 1.0)
        recovery.append([o for o in out if isinstance(o, Send)])
    assert recovery[0] == []
    [send] = recovery[1]
    assert isinstance(send.message, Request) and send.message.method == "REGISTER"
    assert isinstance(send.dest, Flow) and send.dest.remote == B2
    ok = make_response(send.message, 200, to_tag="rec")
    ok.add("Contact", f"<sip:{user}@10.0.0.7:5060>;expires=3600")
    assert sbc.receive(1, bytes(ok), send.dest, 1.1) == []
    [reg0] = sbc.cores[0].registration.registrations
    [reg1] = sbc.cores[1].registration.registrations
    assert reg0.backend == reg1.backend == "sip:127.0.0.1:5071" and reg0.owner == 1
    assert reg0.backend_call_id == reg1.backend_call_id == send.message.call_id


def _backend_of(core: SbcCore, user: str) -> str | None:
    backend = core.backends.balancer.pick_for_aor(f"sip:{user}@example.com")
    return backend.name if backend is not None else None


@pytest.mark.parametrize("backends", [(B1,), ()], ids=["relayed", "embedded"])
def test_a_dead_client_flow_is_dropped_by_every_worker(backends: tuple[tuple[str, int]]) -> None:
    # A long client expiry, so that only the keep-alives (worker 0's) find the client gone.
    sbc = workers(2, *backends, offload=OffloadPolicy(client_udp=600))
    if backends:
        register_via(sbc, 0, "alice", 1, 0.0)
    else:
        sbc.receive(0, sip(REGISTER.format(n=1, user="alice")), CLIENT, 0.0)
    assert CLIENT in sbc.cores[0].registration.keepalives
    assert CLIENT not in sbc.cores[1].registration.keepalives
    assert all(core.registration.has_flow(CLIENT) for core in sbc.cores)
    dereg: list[Request] = []
    now = 0.0
    while not sbc.cores[1].registration.failed_flows and now < 200.0:
        deadline = sbc.cores[0].next_deadline()
        assert deadline is not None
        now = deadline
        for flow, msg in sent(sbc.timer(0, now)):
            if isinstance(msg, Request) and msg.method == "OPTIONS" and flow.remote == B1:
                answer(sbc.cores[0], msg, 200, now, B1)  # the backend stays up
            elif isinstance(msg, Request) and msg.method == "REGISTER":
                dereg.append(msg)
        if not sbc.cores[0].registration.has_flow(CLIENT):
            break
    assert now <= 81.0  # three keep-alives unanswered (at 20, 40 and 60 s)
    assert not any(core.registration.has_flow(CLIENT) for core in sbc.cores)
    call = parse_message(options_to("alice@example.com"))
    assert isinstance(call, Request)
    assert sbc.cores[1].registration.local_target(call, now) is None
    # The owner de-registered its record at the backend; the other worker sent nothing.
    assert len(dereg) == len(backends) and sbc.applied[1] == []


def test_a_user_registered_with_one_worker_is_found_by_the_others() -> None:
    sbc = workers(3)  # no backends: the embedded registrar
    [(_, resp)] = sent(sbc.receive(0, sip(REGISTER.format(n=1, user="alice")), CLIENT, 0.0))
    assert isinstance(resp, Response) and resp.status == 200
    call = parse_message(options_to("alice@example.com"))
    assert isinstance(call, Request)
    for core in sbc.cores[1:]:
        found = core.registration.local_target(call, 1.0)
        assert found is not None and found[0] == CLIENT
        assert str(found[1]) == "sip:alice@10.0.0.7:5060"
    # The client removes its binding through worker 2: gone in every worker.
    bye = sip(REGISTER.format(n=2, user="alice")).replace(b"Expires: 3600", b"Expires: 0")
    [(_, resp)] = sent(sbc.receive(2, bye, CLIENT, 2.0))
    assert isinstance(resp, Response) and resp.status == 200
    assert all(core.registration.local_target(call, 3.0) is None for core in sbc.cores)
    assert [core.stats["shared_applied"] for core in sbc.cores] == [1, 2, 1]


def test_a_source_banned_by_one_worker_is_banned_by_all() -> None:
    sbc = workers(2, security=FLOOD)
    for n in range(6):  # the 6th packet within the window is over the density of 5
        sbc.receive(0, options(ATTACKER, n), client(ATTACKER), 0.01 * n)
    guard0, guard1 = sbc.cores[0].guard, sbc.cores[1].guard
    assert guard0.bans == guard1.bans == {ATTACKER: 60.05}
    assert sbc.receive(1, options(ATTACKER, 9), client(ATTACKER), 1.0) == []
    assert guard1.stats["dropped_banned"] == 1
    # Counted as a ban by the worker that banned, as a shared one by the other.
    assert (guard0.stats["ban:flood"], guard0.stats["shared_ban"]) == (1, 0)
    assert (guard1.stats["ban:flood"], guard1.stats["shared_ban"]) == (0, 1)
    assert not guard1.banned(ATTACKER, 60.1)  # over at the same time


def _rebuilt(source: SbcCore, fresh: SbcCore, now: float) -> None:
    """``fresh`` (a restarted worker) applies the snapshot of ``source``."""
    for event in source.snapshot():
        assert fresh.apply_shared(marshal.loads(marshal.dumps(event)), now) == []
    assert sorted(map(repr, fresh.snapshot())) == sorted(map(repr, source.snapshot()))


def test_a_restarted_worker_is_rebuilt_from_a_snapshot() -> None:
    sbc = workers(2, B1, security=FLOOD)
    register_via(sbc, 0, "dave", 1, 0.0)
    register_via(sbc, 1, "erin", 1, 0.0)
    sent(sbc.receive(1, sip(REGISTER.format(n=2, user="dave")), CLIENT, 50.0))  # offloaded
    for n in range(6):
        sbc.receive(0, options(ATTACKER, n), client(ATTACKER), 50.0)
    fresh = make_core(B1, worker=1, workers=2, security=FLOOD)
    _rebuilt(sbc.cores[0], fresh, 51.0)
    owners = {r.aor: (r.owner, r.client_expires_at) for r in fresh.registration.registrations}
    assert owners == {"sip:dave@example.com": (0, 110.0), "sip:erin@example.com": (1, 60.0)}
    assert fresh.guard.banned(ATTACKER, 51.0) and fresh.guard.stats["shared_ban"] == 1
    # The restarted worker owns erin's registration again: it de-registers it, alone.
    sbc.cores[1] = fresh
    [req] = backend_registers(sbc.timer(1, 60.0))
    assert req.to is not None and str(req.to.uri) == "sip:erin@example.com"
    assert not backend_registers(sbc.timer(0, 60.0))
    assert [r.aor for r in sbc.cores[0].registration.registrations] == ["sip:dave@example.com"]


def test_a_restarted_worker_gets_the_embedded_registrars_bindings() -> None:
    sbc = workers(2)
    sbc.receive(0, sip(REGISTER.format(n=1, user="alice")), CLIENT, 0.0)
    sbc.receive(0, sip(REGISTER.format(n=2, user="bob")), CLIENT, 1.0)
    fresh = make_core(worker=1, workers=2)
    _rebuilt(sbc.cores[0], fresh, 2.0)
    call = parse_message(options_to("bob@example.com"))
    assert isinstance(call, Request)
    found = fresh.registration.local_target(call, 2.0)
    assert found is not None and found[0] == CLIENT
    # A binding already over when the snapshot arrives is not taken.
    late = make_core(worker=1, workers=2)
    for event in sbc.cores[0].snapshot():
        late.apply_shared(event, 61.0)
    assert late.registration.location.bindings() == []


def test_an_event_of_another_version_is_ignored_and_counted() -> None:
    sbc = workers(2, B1)
    register_via(sbc, 0, "dave", 1, 0.0)
    [event] = sbc.shared
    fresh = make_core(B1, worker=1, workers=2)
    assert fresh.apply_shared((event[0], VERSION + 1, *event[2:]), 1.0) == []
    assert fresh.stats["shared_ignored:version"] == 1
    assert fresh.apply_shared(("teleport", VERSION), 1.0) == []
    assert fresh.stats["shared_ignored:kind"] == 1
    broken = [
        event[:-1],
        (*event[:6], ("<sip:dave@",), *event[7:]),
        (*event[:3], "udp", *event[4:]),
    ]
    for bad in broken:
        assert fresh.apply_shared(bad, 1.0) == []
    assert fresh.stats["shared_ignored:malformed"] == 3
    assert len(fresh.registration.registrations) == 0 and fresh.stats["shared_applied"] == 0
    fresh.apply_shared(event, 1.0)  # the event itself is good
    assert len(fresh.registration.registrations) == 1 and fresh.stats["shared_applied"] == 1


def test_one_worker_shares_nothing() -> None:
    core = make_core(B1, security=FLOOD)
    actions: list[Action] = []
    req = sip(REGISTER.format(n=1, user="dave"))
    [fwd] = core.receive_datagram(req, CLIENT, 0.0)
    assert isinstance(fwd, SendData)
    forwarded = parse_message(fwd.data)
    assert isinstance(forwarded, Request)
    ok = make_response(forwarded, 200, to_tag="reg")
    ok.add("Contact", "<sip:dave@10.0.0.7:5060>;expires=3600")
    actions += core.receive_datagram(bytes(ok), fwd.flow, 0.0)
    for n, now in ((2, 50.0), (3, 100.0)):  # offloaded, then from the template
        actions += core.receive_datagram(sip(REGISTER.format(n=n, user="dave")), CLIENT, now)
    assert core.registration.stats["register_templated"] == 1
    for n in range(6):
        actions += core.receive_datagram(options(ATTACKER, n), client(ATTACKER), 101.0)
    assert core.guard.banned(ATTACKER, 101.0)
    actions += core.handle_timer(200.0)  # expired: de-registered
    assert core.registration.stats["register_expired"] == 1
    assert not any(isinstance(a, Share) for a in actions)
    assert core.registration.shared == [] and core.guard.shared_bans == []
