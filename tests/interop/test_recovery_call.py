"""A call to a user whose backend died, after the SBC recovered his registration.

Two real Kamailio registrars behind the real SBC. bob (a SIPp UAS) registers through the
SBC with test_calls.py's port trick and lands on the backend his AOR hashes to, X. X is
stopped; the SBC's probes mark it down (probe_interval x probe_failures) and it re-registers
bob on the survivor Y from its cache. A SIPp UAC then calls bob through the SBC: the call
must go through Y and reach bob over the flow of his REGISTER.

The caller's INVITE goes to the backend the caller's AOR hashes to. Callers are picked (by
registering candidates through the SBC while both backends are up) so that one test has the
caller hashing to the dead X (the SBC avoids it once it is marked down) and one to Y. A third
test calls before X is marked down: the INVITE to X goes unanswered, and the SBC fails over
to Y after ``[core] request_timeout``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .conftest import (
    Registrar,
    RegistrarFactory,
    SbcFactory,
    SbcProcess,
    backends_config,
    register_udp,
    require,
)
from .test_calls import (
    Lab,
    Message,
    Sipp,
    assert_hidden,
    labels,
    media_ports,
    passed,
    received,
    sdp_port,
    sent,
)

pytestmark = pytest.mark.interop

HOST = "127.0.0.1"
PROBE_INTERVAL = 0.5
PROBE_FAILURES = 2
REQUEST_TIMEOUT = 1.0
# Detection (interval x failures) plus a margin for the recovery REGISTER and its answer.
RECOVERY_DEADLINE = PROBE_INTERVAL * PROBE_FAILURES + 4.0
CALL_TIMEOUT = 12.0  # each SIPp's -timeout (a kill follows a few seconds later)
CANDIDATES = [f"caller{i:02d}" for i in range(40)]


def holder(user: str, registrars: list[Registrar]) -> Registrar:
    """The one registrar that holds ``user``."""
    holding = [r for r in registrars if user in r.aors()]
    assert len(holding) == 1, {r.uri: r.aors() for r in registrars}
    return holding[0]


def caller_on(target: Registrar, sbc: SbcProcess, registrars: list[Registrar]) -> str:
    """A caller name whose AOR hashes to ``target``, found by registering candidates through
    the SBC while every backend is up (the INVITE goes where the AOR's REGISTER goes)."""
    for name in CANDIDATES:
        assert register_udp(sbc.host4, sbc.udp4, name, expires=600).status == 200
        if holder(name, registrars) is target:
            return name
    pytest.fail(f"none of {len(CANDIDATES)} candidates hashes to {target.uri}")


def wait_recovered(user: str, survivor: Registrar, sbc: SbcProcess, seconds: float) -> float:
    """Seconds until the survivor holds ``user`` with a Path through the SBC's core side."""
    start = time.monotonic()
    while user not in survivor.aors():
        assert time.monotonic() - start < seconds, (
            f"{user} not recovered on {survivor.uri} within {seconds} s\n{sbc.log()[-4000:]}"
        )
        time.sleep(0.05)
    took = time.monotonic() - start
    (binding,) = survivor.bindings()[user]
    assert str(binding["path"]).endswith(f"@{HOST}:{sbc.extra_ports['core']};lr>"), binding
    return took


def invites(registrar: Registrar) -> int:
    return registrar.stat("core:rcv_requests_invite")


def assert_hidden_both(
    lab: Lab, dead: Registrar, a_msgs: list[Message], b_msgs: list[Message]
) -> None:
    """test_calls.py's topology hiding (ids, the survivor, the SBC's core side), and the dead
    backend's port in no header either side received."""
    assert_hidden(lab, a_msgs, b_msgs)
    for message in received(a_msgs) + received(b_msgs):
        assert f":{dead.port}" not in message.head, (dead.port, message.text)


LabFactory = Callable[..., tuple[Lab, list[Registrar]]]


@pytest.fixture
def lab_factory(
    kamailio_registrars: RegistrarFactory, sbc_factory: SbcFactory, tmp_path: Path
) -> Iterator[LabFactory]:
    """``lab_factory(probe_interval=, probe_failures=)``: two Kamailio registrars behind the
    SBC (short request timeout, call records on). ``Lab.registrar`` is the first; a test sets
    it to the survivor. Every SIPp started through it is stopped at teardown."""
    binary = require("sipp")
    labs: list[Lab] = []

    def make(
        *, probe_interval: float = PROBE_INTERVAL, probe_failures: int = PROBE_FAILURES
    ) -> tuple[Lab, list[Registrar]]:
        registrars = kamailio_registrars(2)
        records = tmp_path / f"calls-{len(labs)}.jsonl"
        sbc = sbc_factory(
            core=f"probe_interval = {probe_interval}\nprobe_failures = {probe_failures}\n"
            f"probe_successes = 2\nrequest_timeout = {REQUEST_TIMEOUT}",
            extra=backends_config(*(r.uri for r in registrars))
            + f'\n[calls]\nrecords = "{records}"\n',
        )
        lab = Lab(sbc, registrars[0], records, tmp_path, binary)
        labs.append(lab)
        return lab, registrars

    try:
        yield make
    finally:
        for lab in labs:
            for sipp in lab.running:
                sipp.stop()


def assert_through(lab: Lab, survivor: Registrar, dead: Registrar, caller: str) -> None:
    """The SBC's call records: both calls (caller -> Kamailio, Kamailio -> bob) answered; the
    one towards the backends went to the survivor, over its address, and none to the dead."""
    records = lab.wait_records(2)
    assert len(records) == 2, records
    assert [r["status"] for r in records] == [200, 200], records
    assert {r["from"] for r in records} == {f"sip:{caller}@example.com"}, records
    to_backend = [r for r in records if r["backend"] is not None]
    assert [r["backend"] for r in to_backend] == [survivor.uri], records
    legs = [leg for r in to_backend for leg in r["legs"]]  # type: ignore[attr-defined]
    core_flows = [leg["flow"] for leg in legs if leg["side"] == "core"]
    assert core_flows == [f"udp:{HOST}:{survivor.port}"], records
    assert dead.uri not in str(records) and f":{dead.port}" not in str(records), records


def call_bob(lab: Lab, bob: Sipp, caller: str) -> tuple[list[Message], list[Message], float]:
    """``caller`` calls bob through the SBC (basic call); both sides' messages, and the
    seconds from the caller's INVITE to the 180 it received."""
    alice = lab.start(
        "alice",
        "recovery_call_uac.xml",
        service="bob",
        timeout=CALL_TIMEOUT,
        extra=("-key", "caller", caller),
    )
    a_msgs, b_msgs = passed(alice, bob)
    assert labels(received(b_msgs)) == ["INVITE", "ACK", "BYE"]
    assert labels(received(a_msgs))[-3:] == ["180 INVITE", "200 INVITE", "200 BYE"]
    invite = received(b_msgs)[0]
    # bob is reached at the contact he registered, over the flow of his REGISTER.
    assert invite.first_line == f"INVITE sip:bob@{HOST}:{bob.port} SIP/2.0"
    assert invite.header("From").startswith(f"<sip:{caller}@example.com>")
    # The SDP crossed anchored: the SBC's relay port and origin, alice's codecs first (the
    # ones the SBC can transcode to appended behind them, docs/media.md).
    assert sdp_port(invite) in media_ports(lab) and "o=- " in invite.body
    [offered] = re.findall(r"^m=audio \d+ (.*)$", sent(a_msgs)[0].body, re.M)
    [got] = re.findall(r"^m=audio \d+ (.*)$", invite.body, re.M)
    assert got.startswith(offered + " "), (got, offered)
    ringing = next(m for m in received(a_msgs) if m.status == 180)
    return a_msgs, b_msgs, ringing.at - sent(a_msgs)[0].at


def _call_after_recovery(lab: Lab, registrars: list[Registrar], caller_hashes_to: str) -> None:
    bob = lab.callee("call_basic_uas.xml", timeout=CALL_TIMEOUT + RECOVERY_DEADLINE)
    dead = holder("bob", registrars)
    (survivor,) = [r for r in registrars if r is not dead]
    lab.registrar = survivor
    caller = caller_on(dead if caller_hashes_to == "dead" else survivor, lab.sbc, registrars)
    before = invites(survivor)

    dead.stop()
    took = wait_recovered("bob", survivor, lab.sbc, RECOVERY_DEADLINE)
    log = lab.sbc.log()
    assert re.search(rf"backend down: .*backend={re.escape(dead.uri)}\b", log), log[-4000:]
    assert "registration recovered" in log, log[-4000:]
    print(f"bob recovered on {survivor.uri} {took:.2f} s after {dead.uri} was stopped")

    a_msgs, b_msgs, setup = call_bob(lab, bob, caller)
    print(f"call {caller} -> bob: 180 {setup:.2f} s after the INVITE")
    assert_hidden_both(lab, dead, a_msgs, b_msgs)
    # Through the survivor: it saw the INVITE, and the SBC's records say so.
    assert invites(survivor) > before
    assert_through(lab, survivor, dead, caller)
    # X was already marked down: nothing was sent to it, nothing waited for it.
    assert "failed over" not in lab.sbc.log(), lab.sbc.log()[-4000:]
    assert setup < REQUEST_TIMEOUT, setup
    lab.assert_no_calls_left()


def test_call_to_a_recovered_user_caller_hashing_to_the_dead_backend(
    lab_factory: LabFactory,
) -> None:
    """The caller's own backend is the dead one: the SBC, having marked it down, sends the
    INVITE to the survivor straight away (no request_timeout wait)."""
    _call_after_recovery(*lab_factory(), caller_hashes_to="dead")


def test_call_to_a_recovered_user_caller_hashing_to_the_survivor(
    lab_factory: LabFactory,
) -> None:
    _call_after_recovery(*lab_factory(), caller_hashes_to="survivor")


def test_invite_to_a_dead_backend_not_yet_marked_down_fails_over(
    lab_factory: LabFactory,
) -> None:
    """Slow probes (X cannot be marked down during the test): bob is on Y, the caller hashes
    to X, X is stopped and the call placed at once. The INVITE to X goes unanswered; after
    ``request_timeout`` the SBC sends it to Y with the same ids, and the call goes through."""
    lab, registrars = lab_factory(probe_interval=10.0, probe_failures=3)
    bob = lab.callee("call_basic_uas.xml", timeout=CALL_TIMEOUT)
    survivor = holder("bob", registrars)
    (dead,) = [r for r in registrars if r is not survivor]
    lab.registrar = survivor
    caller = caller_on(dead, lab.sbc, registrars)
    before = invites(survivor)

    dead.stop()
    a_msgs, b_msgs, setup = call_bob(lab, bob, caller)
    print(f"call {caller} -> bob: 180 {setup:.2f} s after the INVITE")
    log = lab.sbc.log()
    assert "backend down" not in log, "X was marked down: this test means the timeout path"
    assert re.search(rf"INVITE failed over .*backend={re.escape(survivor.uri)}\b", log), log
    # The caller waited request_timeout for X, not timer B (32 s), and not much longer.
    assert REQUEST_TIMEOUT - 0.1 <= setup <= REQUEST_TIMEOUT + 1.0, setup
    assert_hidden_both(lab, dead, a_msgs, b_msgs)
    assert invites(survivor) > before
    assert_through(lab, survivor, dead, caller)
    lab.assert_no_calls_left()
