"""Calls between two users registered through the SBC, behind a real Kamailio that does not
record-route (docker/kamailio/kamailio-no-rr.cfg) and, for comparison, behind the lab's one
that does (kamailio.cfg).

Without Record-Route the call alice -> SBC -> Kamailio -> SBC -> bob leaves Kamailio out of
the dialog: each of the SBC's two core legs has the other's core Contact as its remote
target (RFC 3261 12.2.1.1), so what one leg sends within the dialog (ACK, re-INVITE, INFO,
BYE, and their answers) must reach the other leg inside the SBC. Before that was so, the
SBC sent those requests to Kamailio with no Route, which answered 404 (and dropped the
ACK): the callee never got the ACK nor the caller's BYE. Each test runs with both
backends; ``looped_in_dialog`` in the SBC's metrics shows which path the requests took.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from .conftest import RegistrarFactory, SbcFactory, wait_until
from .phones import (  # noqa: F401 - phones and sox are fixtures
    ALICE_HZ,
    BOB_HZ,
    CALL_TIMEOUT,
    DOMAIN,
    PhoneFactory,
    account,
    assert_heard,
    phones,
    sox,
)
from .test_baresip import _backends
from .test_calls import (
    Lab,
    LabFactory,
    Message,
    assert_hidden,
    lab_factory,  # noqa: F401 - a fixture
    labels,
    passed,
    received,
    scrape,
    sent,
)
from .test_matrix import direction, invite_answers

pytestmark = pytest.mark.interop

ROUTES = [True, False]
ROUTE_IDS = ["record-route", "no-record-route"]
T1_64 = 32.0  # RFC 3261 17.1.1.2: 64*T1, how long the SBC re-sends a 2xx that gets no ACK
SECOND = 1.0  # a BYE reaches the other side within this


@pytest.fixture(params=ROUTES, ids=ROUTE_IDS)
def routed(request: pytest.FixtureRequest, lab_factory: LabFactory) -> Lab:  # noqa: F811
    return lab_factory(record_route=request.param)


def looped(lab: Lab) -> float:
    """In-dialog requests the SBC handed from one of its core legs to the other."""
    return scrape(lab.sbc).get(("sbc_call_events_total", (("event", "looped_in_dialog"),)), 0)


def assert_path(lab: Lab) -> None:
    """Behind the record-routing Kamailio the requests went through it (its Record-Route is
    the route set); behind the other one they were handed over inside the SBC."""
    if lab.registrar.record_route:
        assert looped(lab) == 0
    else:
        assert looped(lab) > 0


def crossing(sender: list[Message], receiver: list[Message], method: str) -> float:
    """Seconds between the first ``method`` request one SIPp sent and the other received."""
    out = next(m for m in sent(sender) if m.status is None and m.method == method)
    got = next(m for m in received(receiver) if m.status is None and m.method == method)
    return got.at - out.at


def test_basic_call_ack_and_bye_reach_the_callee(routed: Lab) -> None:
    bob = routed.callee("call_basic_uas.xml")
    alice = routed.caller("call_basic_uac.xml")
    a_msgs, b_msgs = passed(alice, bob)
    # bob got the ACK (before: never, and his leg ended "no ACK") and alice's BYE, at once.
    assert labels(received(b_msgs)) == ["INVITE", "ACK", "BYE"]
    assert crossing(a_msgs, b_msgs, "BYE") < SECOND
    assert labels(received(a_msgs))[-1] == "200 BYE"
    assert_hidden(routed, a_msgs, b_msgs)
    records = routed.wait_records(2)
    assert [r["cause"] for r in records] == ["BYE from caller"] * 2, records
    assert_path(routed)
    routed.assert_no_calls_left()


def test_bye_from_the_callee_reaches_the_caller(routed: Lab) -> None:
    bob = routed.callee("call_bye_callee_uas.xml")
    alice = routed.caller("call_bye_callee_uac.xml")
    a_msgs, b_msgs = passed(alice, bob)
    assert labels(received(b_msgs)) == ["INVITE", "ACK", "200 BYE"]
    assert labels(received(a_msgs))[-1] == "BYE"
    assert crossing(b_msgs, a_msgs, "BYE") < SECOND
    assert [r["cause"] for r in routed.wait_records(2)] == ["BYE from callee"] * 2
    assert_path(routed)
    routed.assert_no_calls_left()


def test_hold_and_resume_by_reinvite(routed: Lab) -> None:
    bob = routed.callee("call_hold_uas.xml")
    alice = routed.caller("call_hold_uac.xml")
    a_msgs, b_msgs = passed(alice, bob)
    assert labels(received(b_msgs)) == ["INVITE", "ACK", "INVITE", "ACK", "INVITE", "ACK", "BYE"]
    reinvites = [m for m in received(b_msgs) if m.method == "INVITE"][1:]
    assert ["a=sendonly" in m.body for m in reinvites] == [True, False]
    assert [m.status for m in received(a_msgs) if m.method == "INVITE"][-2:] == [200, 200]
    assert_hidden(routed, a_msgs, b_msgs)
    assert_path(routed)
    routed.assert_no_calls_left()


def test_info_in_the_middle_of_a_call(routed: Lab) -> None:
    bob = routed.callee("call_info_dtmf_uas.xml")
    alice = routed.caller("call_info_uac.xml")
    a_msgs, b_msgs = passed(alice, bob)
    assert labels(received(b_msgs)) == ["INVITE", "ACK", "INFO", "BYE"]
    assert "200 INFO" in labels(received(a_msgs))
    assert_path(routed)
    routed.assert_no_calls_left()


def test_a_call_longer_than_64_t1(routed: Lab) -> None:
    """The SBC re-sends its 2xx to the callee until the ACK, for 64*T1 at most, and then
    ends the call (RFC 3261 13.3.1.4). With the ACK delivered, a call outlives that."""
    hold_ms = int((T1_64 + 3) * 1000)
    timeout = T1_64 + 20
    bob = routed.callee("call_basic_uas.xml", timeout=timeout)
    alice = routed.start(
        "alice", "call_long_uac.xml", service="bob", timeout=timeout, extra=("-d", str(hold_ms))
    )
    a_msgs, b_msgs = passed(alice, bob)
    assert labels(received(b_msgs)) == ["INVITE", "ACK", "BYE"]
    # The only 200 bob sent to the INVITE, once (no retransmission: the ACK came).
    assert [m.label() for m in sent(b_msgs)].count("200 INVITE") == 1
    assert crossing(a_msgs, b_msgs, "BYE") < SECOND
    records = routed.wait_records(2)
    assert [r["cause"] for r in records] == ["BYE from caller"] * 2, records
    assert all(r["duration"] > T1_64 for r in records), records
    assert_path(routed)
    routed.assert_no_calls_left()


@pytest.mark.parametrize("record_route", ROUTES, ids=ROUTE_IDS)
def test_softphones_hold_resume_dtmf_and_hang_up(
    record_route: bool,
    kamailio_registrars: RegistrarFactory,
    sbc_factory: SbcFactory,
    phones: PhoneFactory,  # noqa: F811 - the fixture imported above
    sox: str,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
) -> None:
    """Two baresips registered through the SBC: alice calls bob, each hears the other, bob
    puts alice on hold and back (re-INVITEs from the callee's side), alice then sends a
    digit (RFC 4733 events through the relay), bob hangs up and alice's phone knows within
    a second."""
    (registrar,) = kamailio_registrars(1, record_route=record_route)
    sbc = sbc_factory(extra=_backends(registrar.uri))
    proxy = f"127.0.0.1:{sbc.udp4}"
    alice = phones("alice", hz=ALICE_HZ)
    bob = phones("bob", hz=BOB_HZ)
    bob.command("uanew", account("bob", proxy, "udp", answer=True))
    bob.wait_event("REGISTER_OK")
    alice.command("uanew", account("alice", proxy, "udp"))
    alice.wait_event("REGISTER_OK")
    alice.command("dial", f"sip:bob@{DOMAIN}")
    alice.wait_event("CALL_ESTABLISHED", timeout=CALL_TIMEOUT)
    bob.wait_event("CALL_ESTABLISHED", timeout=CALL_TIMEOUT)
    # baresip 1.0 records what it decodes until the first re-INVITE: the tones are checked
    # on this part; after the resume, the digit shows that media flows again.
    time.sleep(3.0)

    bob.command("hold")
    wait_until(
        "alice's answer to the hold",
        lambda: len(invite_answers(bob)) >= 2 and direction(invite_answers(bob)[1]) == "recvonly",
        CALL_TIMEOUT,
        bob.explain,
    )
    bob.command("resume")
    wait_until(
        "alice's answer to the resume",
        lambda: len(invite_answers(bob)) >= 3 and direction(invite_answers(bob)[2]) == "sendrecv",
        CALL_TIMEOUT,
        bob.explain,
    )
    alice.command("sndcode", "5")
    time.sleep(0.3)
    alice.command("sndcode", "")
    bob.wait_event("CALL_DTMF_START", timeout=5.0)

    bob.command("hangup")
    hung_up = time.monotonic()
    alice.wait_event("CALL_CLOSED", timeout=CALL_TIMEOUT)
    assert time.monotonic() - hung_up < SECOND + 0.5, alice.explain()
    bob.wait_event("CALL_CLOSED", timeout=CALL_TIMEOUT)
    assert_heard(sox, alice, BOB_HZ)
    assert_heard(sox, bob, ALICE_HZ)
    metrics = scrape(sbc)
    looped_in_dialog = metrics.get(("sbc_call_events_total", (("event", "looped_in_dialog"),)), 0)
    assert (looped_in_dialog > 0) is not record_route, metrics
    assert metrics[("sbc_calls_active", ())] == 0
