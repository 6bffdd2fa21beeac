"""State kept outside the process ([state] url, sbc/state.py): the stored values (versioned,
times in wall-clock seconds moved onto the reader's clock), the entries a core writes as its
state changes, and what another instance or a restarted SBC rebuilds from them."""

from __future__ import annotations

import json

import pytest
from sipdata import sip
from test_b2bua import (
    ALICE,
    ANSWER_SDP,
    Lab,
    ack_for,
    alice_hangs_up,
    backend_request,
    invite,
    media_policy,
    only,
    reply,
)
from test_core import options as options_to
from test_guard import ATTACKER, client, options
from test_registration import B1, CLIENT, REGISTER, make_core, sent
from test_shared_state import FLOOD

from sbc import state
from sbc.actions import Action, Persist, SendData, Share
from sbc.core import SbcCore
from sbc.features.registrar import CachedRegistration
from sbc.media.control import Update
from sbc.media.session import MediaRefused
from sbc.registration.shared import (
    VERSION,
    Stored,
    Unusable,
    ban_event,
    decode,
    refreshed_event,
    shift_times,
    stored_event,
)
from sbc.sip.flow import Flow
from sbc.sip.headers import parse_name_addr_list
from sbc.sip.message import Request, Response, make_response
from sbc.sip.parser import parse_message

WALL = 1_800_000_000.0  # the writer's epoch minus its monotonic clock
OTHER_WALL = WALL - 1000.0  # a reader whose monotonic clock is 1000 s ahead (another machine)


def replies(actions: list[Action]) -> list[int]:
    out = sent([a for a in actions if isinstance(a, SendData)])
    return [r.status for _, r in out if isinstance(r, Response)]


def entries(actions: list[Action]) -> dict[str, Persist]:
    return {a.key: a for a in actions if isinstance(a, Persist)}


def shares(actions: list[Action]) -> list[tuple[object, ...]]:
    return [a.event for a in actions if isinstance(a, Share)]


def a_registration() -> CachedRegistration:
    reg = CachedRegistration(
        aor="sip:dave@example.com", flow=CLIENT, call_id="c1", cseq=3,
        contacts=tuple(parse_name_addr_list("<sip:dave@10.0.0.7:5060>;+sip.instance=\"<urn:x>\"")),
        backend="sip:127.0.0.1:5070", backend_expires_at=3600.0, client_expires=60,
        client_expires_at=60.0, owner=1,
    )  # fmt: skip
    reg.backend_call_id = "own-1"
    return reg


def test_a_value_round_trips_onto_the_readers_clock() -> None:
    reg = a_registration()
    events = [stored_event(reg), ban_event("192.0.2.9", 90.0, "flood")]
    data = state.encode(events, WALL)
    # Stored as JSON with wall-clock times.
    stored = json.loads(data)
    assert stored["v"] == VERSION
    assert stored["events"][0][9:12] == [WALL + 3600.0, 60, WALL + 60.0]
    # A reader whose clock is 1000 s ahead sees the same instants 1000 s later.
    back = state.decode(data, OTHER_WALL)
    restored = decode(back[0])
    assert isinstance(restored, Stored)
    assert stored_event(restored.reg) == shift_times(events[0], 1000.0)
    assert restored.reg.client_expires_at == 1060.0
    assert restored.reg.backend_call_id == "own-1"
    assert back[1] == shift_times(events[1], 1000.0)
    # The same reader's clock: exactly what was written.
    assert state.decode(data, WALL) == events


def test_what_is_not_a_value_of_this_version_is_unusable() -> None:
    good = state.encode([refreshed_event(a_registration())], WALL)
    with pytest.raises(Unusable, match="version"):
        state.decode(good.replace(b'"v":1', b'"v":99'), WALL)
    for bad in (b"not json", b"[]", b'{"v":1}', b'{"v":1,"events":[5]}',
                b'{"v":1,"events":[["reg",1,"a"]]}', b"\xff"):  # fmt: skip
        with pytest.raises(Unusable, match="malformed"):
            state.decode(bad, WALL)


def test_an_embedded_registration_is_written_as_its_aors_bindings_and_shared() -> None:
    core = make_core(persist=True, wall_offset=WALL)
    out = core.receive_datagram(sip(REGISTER.format(n=1, user="alice")), CLIENT, 10.0)
    assert replies(out) == [200]
    [entry] = entries(out).values()
    assert entry.key == "aor:sip:alice@example.com"
    # It lasts as long as the binding: the embedded registrar granted 60 s.
    assert entry.expires_at == WALL + 10.0 + 60.0
    [binding] = state.decode(entry.value or b"", WALL)
    assert binding[0] == "binding" and binding[2] == "sip:alice@example.com"
    assert len(shares(out)) == 1  # for the other instances
    # Removed: the entry is deleted.
    bye = sip(REGISTER.format(n=2, user="alice")).replace(b"Expires: 3600", b"Expires: 0")
    out = core.receive_datagram(bye, CLIENT, 11.0)
    assert entries(out) == {
        "aor:sip:alice@example.com": Persist("aor:sip:alice@example.com", None, 0.0)
    }


def test_a_restarted_sbc_finds_its_users_and_bans_in_what_it_wrote() -> None:
    first = make_core(persist=True, wall_offset=WALL, security=FLOOD)
    written: dict[str, Persist] = {}
    written |= entries(first.receive_datagram(sip(REGISTER.format(n=1, user="bob")), CLIENT, 5.0))
    for n in range(6):
        written |= entries(first.receive_datagram(options(ATTACKER, n), client(ATTACKER), 5.0))
    assert set(written) == {"aor:sip:bob@example.com", f"ban:{ATTACKER}"}
    # A new process elsewhere (its monotonic clock 1000 s ahead) loads them 5 s later.
    second = make_core(persist=True, wall_offset=OTHER_WALL, security=FLOOD)
    for entry in written.values():
        for event in state.decode(entry.value or b"", OTHER_WALL):
            assert not entries(second.apply_shared(event, 1010.0))  # not written back
    call = parse_message(options_to("bob@example.com"))
    assert isinstance(call, Request)
    found = second.registration.local_target(call, 1010.0)
    assert found is not None and found[0] == CLIENT
    # Everything it holds, for a store that lost its data.
    assert set(entries(list(second.persist_all(1010.0)))) == set(written)
    # bob's binding runs out when it does for the old process: 5 + 60 there, 1065 here.
    assert second.registration.local_target(call, 1064.5) is not None
    assert second.registration.local_target(call, 1065.5) is None
    assert second.guard.banned(ATTACKER, 1064.0) and not second.guard.banned(ATTACKER, 1066.0)


def test_a_relayed_registration_is_written_refreshed_and_deleted_at_its_expiry() -> None:
    core = make_core(B1, persist=True, wall_offset=WALL)
    out = core.receive_datagram(sip(REGISTER.format(n=1, user="dave")), CLIENT, 0.0)
    [(flow, fwd)] = sent([a for a in out if isinstance(a, SendData)])
    assert isinstance(fwd, Request)
    ok = make_response(fwd, 200, to_tag="reg")
    ok.add("Contact", "<sip:dave@10.0.0.7:5060>;expires=3600")
    out = core.receive_datagram(bytes(ok), flow, 0.0)
    key = state.reg_key("sip:dave@example.com", "reg-dave@10.0.0.7", CLIENT)
    # The client's 60 s, and a period more for the key (refreshes are written every other
    # time at most).
    assert list(entries(out)) == [key] and entries(out)[key].expires_at == WALL + 120.0
    # A refresh answered by the SBC itself (offload): the entry written last covers it.
    out = core.receive_datagram(sip(REGISTER.format(n=2, user="dave")), CLIENT, 30.0)
    assert replies(out) == [200] and key not in entries(out)
    # The next one would leave it a period behind: written.
    out = core.receive_datagram(sip(REGISTER.format(n=3, user="dave")), CLIENT, 70.0)
    assert replies(out) == [200] and entries(out)[key].expires_at == WALL + 130.0 + 60.0
    [event] = state.decode(entries(out)[key].value or b"", WALL)
    assert event[5] == 3  # its CSeq
    # Read back at a start, the record gets that period back (a refresh may be unwritten).
    [restored] = [state.grace(e) for e in state.decode(entries(out)[key].value or b"", WALL)]
    assert restored[11] == 130.0 + 60.0 and event[11] == 130.0
    # The client stops refreshing: the record and its entry go.
    out = core.handle_timer(130.0)
    assert entries(out)[key].value is None


def test_a_binding_through_another_instance_goes_through_it_or_from_this_ones_socket() -> None:
    """Two instances on different addresses share their state: one finds a user who
    registered with the other, and reaches the user's UDP address from its own socket
    when the other is gone, or through the other while it lives."""
    a = make_core(persist=True, wall_offset=WALL)
    b = make_core(persist=True, wall_offset=WALL, access=("127.0.0.2", 5060))
    out = a.receive_datagram(sip(REGISTER.format(n=1, user="carol")), CLIENT, 1.0)
    for event in shares(out):
        b.apply_shared(event, 1.0)
    call = parse_message(options_to("carol@example.com"))
    assert isinstance(call, Request)
    found = b.registration.local_target(call, 2.0)
    assert found is not None
    assert found[0] == Flow("udp", ("127.0.0.2", 5060), CLIENT.remote)
    found_a = a.registration.local_target(call, 2.0)
    assert found_a is not None and found_a[0] == CLIENT  # its own flow as it is
    # While the instance that holds the flow lives (its heartbeats say where it listens),
    # the request goes through it, as to a proxy: to its UDP access address, with the
    # request's own URI (it finds carol's binding by it).
    b.peer_at = lambda address: ("127.0.0.1", 5060) if address == CLIENT.local else None
    assert b.registration.local_target(call, 2.0) == (
        Flow("udp", ("127.0.0.2", 5060), ("127.0.0.1", 5060)),
        None,
    )


def test_without_a_store_nothing_is_written() -> None:
    core: SbcCore = make_core()
    out = core.receive_datagram(sip(REGISTER.format(n=1, user="alice")), CLIENT, 1.0)
    assert not entries(out) and not shares(out)


# -- calls kept across a restart ----------------------------------------------------------------


# alice's offer with SDES-SRTP (RFC 4568): her key, which the SBC decrypts with.
SRTP_SDP = (
    "v=0\r\no=- 1 1 IN IP4 10.0.0.7\r\ns=-\r\nc=IN IP4 10.0.0.7\r\nt=0 0\r\n"
    "m=audio 4000 RTP/SAVP 0\r\n"
    "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR\r\n"
)


def established(lab: Lab, sdp: str = SRTP_SDP) -> tuple[Request, Response]:
    """alice calls bob through the backend; the call is answered and ACKed: the INVITE the
    backend got and the 200 alice got."""
    _, fwd = only(lab.from_client(invite(body=sdp)), Request)
    _, got = only(lab.from_backend(reply(fwd, 200, sdp=ANSWER_SDP)), Response)
    only(lab.from_client(ack_for(got)), Request)
    assert isinstance(fwd, Request) and isinstance(got, Response)
    return fwd, got


def updates(lab: Lab) -> list[Update]:
    return [c for _, c in lab.media_commands if isinstance(c, Update)]


def test_an_established_call_goes_on_in_a_restarted_sbc() -> None:
    """The call's entry (both dialogs, the media session) is written when it is answered;
    a new process restores it: the relay binds the same ports with the same keys, and
    either party's BYE is mapped onto the other leg, with a CSeq above any the old process
    may have used; the entry goes at the end."""
    lab = Lab(media=media_policy("mandatory"), persist=True)
    fwd, got = established(lab)
    [key] = [k for k in lab.persisted if k.startswith("call:")]
    entry = lab.persisted[key]
    # A store that lost everything gets the call again with the rest.
    assert [e.key for e in lab.core.persist_all(lab.now) if e.key.startswith("call:")] == [key]
    [(kind, version, value)] = state.decode(entry.value or b"", 0.0)
    assert (kind, version) == ("call", VERSION) and isinstance(value, dict)
    # The restarted SBC: a new core, its own media controller, the same store.
    again = Lab(media=media_policy("mandatory"), persist=True)
    again.now = lab.now + 5.0
    again._sent(again.core.restore_call(value, again.now))
    [before], [after] = updates(lab)[-1:], updates(again)
    assert after == before  # the same ports, keys and addresses, to be bound again
    # SRTP with alice: her key and the SBC's, kept.
    assert after.streams[0].a.send_key is not None and after.streams[0].a.recv_key is not None
    assert again.core.calls.active_calls == 1
    # alice hangs up on the new process: the backend gets a BYE in the core leg.
    bye = alice_hangs_up(again, got, 2)
    assert bye.call_id == fwd.call_id and bye.cseq is not None
    assert bye.cseq.seq > (fwd.cseq.seq if fwd.cseq else 0) + 1
    assert key not in again.persisted or again.persisted[key].value is None
    again.assert_clean()


def test_the_callee_may_hang_up_a_restored_call() -> None:
    lab = Lab(persist=True)
    fwd, _got = established(lab)
    [entry] = [e for k, e in lab.persisted.items() if k.startswith("call:")]
    [(_, _, value)] = state.decode(entry.value or b"", 0.0)
    again = Lab(persist=True)
    again._sent(again.core.restore_call(value, 1.0))  # type: ignore[arg-type]
    out = again.from_backend(backend_request("BYE", fwd, reply(fwd, 200), 7))
    [ok] = [m for f, m in out if isinstance(m, Response)]
    [(to, bye)] = [(f, m) for f, m in out if isinstance(m, Request)]
    assert ok.status == 200 and to == ALICE and bye.method == "BYE"  # type: ignore[attr-defined]
    assert bye.to is not None and bye.to.tag == "a1"  # type: ignore[attr-defined]
    again.from_client(make_response(bye, 200))  # type: ignore[arg-type]
    again.assert_clean()


def test_a_call_whose_ports_are_taken_is_not_restored() -> None:
    lab = Lab(persist=True)
    established(lab)
    [entry] = [e for k, e in lab.persisted.items() if k.startswith("call:")]
    [(_, _, value)] = state.decode(entry.value or b"", 0.0)
    again = Lab(persist=True)
    again._sent(again.core.restore_call(value, 1.0))  # type: ignore[arg-type]
    # The same call again (a second load): already there, nothing happens.
    assert again.core.restore_call(value, 1.0) == []  # type: ignore[arg-type]
    third = Lab(persist=True)
    value = dict(value)  # type: ignore[arg-type]
    value["id"] = "other"
    assert third.core.restore_call(value, 1.0) is not None
    with pytest.raises(MediaRefused):
        third.core.restore_call(value | {"id": "third"}, 1.0)  # its ports are the other's now
    assert third.media is not None and third.media.state_size()["media_ports"] == 2
