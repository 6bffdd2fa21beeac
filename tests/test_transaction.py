"""RFC 3261 section 17 transactions (with RFC 6026) driven by explicit ``now`` values."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import pytest

from sbc.sip.message import Request, Response, make_response
from sbc.sip.parser import parse_message
from sbc.sip.transaction import (
    ClientTransaction,
    Event,
    InviteClientTransaction,
    InviteServerTransaction,
    NonInviteClientTransaction,
    NonInviteServerTransaction,
    Output,
    RequestDisposition,
    ResponseReceived,
    Send,
    ServerTransaction,
    TimerName,
    Timers,
    TransactionLayer,
    TransactionState,
    TransactionTerminated,
    TransactionTimeout,
    cancel_request,
    new_branch,
    non2xx_ack,
)

DATA = Path(__file__).parent / "data" / "rfc4475"
DEST = ("192.0.2.10", 5060)
S = TransactionState
D = RequestDisposition

REQUEST = (
    "{method} sip:bob@example.com SIP/2.0\r\n"
    "Via: SIP/2.0/UDP {sent_by};branch={branch}\r\n"
    "{extra}"
    "Max-Forwards: 70\r\n"
    "From: Alice <sip:alice@example.com>;tag=a1\r\n"
    "To: Bob <sip:bob@example.com>{to_tag}\r\n"
    "Call-ID: call-1@192.0.2.10\r\n"
    "CSeq: {cseq} {cseq_method}\r\n"
    "Contact: <sip:alice@192.0.2.10>\r\n"
    "Content-Length: 0\r\n"
    "\r\n"
)


def request(
    method: str = "INVITE",
    *,
    branch: str = "z9hG4bK-1",
    sent_by: str = "192.0.2.10:5060",
    cseq: int = 1,
    cseq_method: str | None = None,
    to_tag: str | None = None,
    extra: str = "",
) -> Request:
    data = REQUEST.format(
        method=method,
        branch=branch,
        sent_by=sent_by,
        cseq=cseq,
        cseq_method=cseq_method or method,
        to_tag="" if to_tag is None else f";tag={to_tag}",
        extra=extra,
    ).encode()
    msg = parse_message(data)
    assert isinstance(msg, Request)
    return msg


def response(req: Request, status: int, *, to_tag: str | None = "b1") -> Response:
    """A response as the far end would send it (Via copied from the request)."""
    return make_response(req, status, to_tag=to_tag)


def ack_for(req: Request, resp: Response) -> Request:
    """The ACK a client would send for a non-2xx final (same branch)."""
    return non2xx_ack(req, resp)


def run(layer: TransactionLayer, until: float) -> list[tuple[float, Output]]:
    """A fake clock: fire every deadline up to ``until`` exactly at its time."""
    out: list[tuple[float, Output]] = []
    while (deadline := layer.next_deadline()) is not None and deadline <= until:
        out.extend((deadline, o) for o in layer.handle_timer(deadline))
    return out


def sends(events: list[tuple[float, Output]]) -> list[tuple[float, object]]:
    return [(t, o.message) for t, o in events if isinstance(o, Send)]


def state(tx: ClientTransaction | ServerTransaction) -> TransactionState:
    """The current state, read through a call so that mypy does not narrow it across steps."""
    return tx.state


def only(outputs: list[Output], kind: type) -> list[Output]:
    return [o for o in outputs if isinstance(o, kind)]


# -- timers and helpers --------------------------------------------------------------------


def test_timer_values() -> None:
    t = Timers()
    assert (t.t1, t.t2, t.t4, t.trying_delay) == (0.5, 4.0, 5.0, 0.2)
    assert t.timer_b == t.timer_f == t.timer_h == t.timer_l == t.timer_m == 32.0
    assert t.timer_d(False) == 32.0 and t.timer_d(True) == 0.0
    assert t.timer_i(False) == t.timer_k(False) == 5.0
    assert t.timer_i(True) == t.timer_k(True) == t.timer_j(True) == 0.0
    assert t.timer_j(False) == 32.0
    slow = Timers(t1=1.0, t2=8.0, t4=10.0)
    assert slow.timer_d(False) == 64.0  # RFC 3261 17.1.1.2: D >= 32 s and >= 64*T1
    assert Timers(t1=0.1).timer_d(False) == 32.0
    with pytest.raises(ValueError):
        Timers(t1=0)
    with pytest.raises(ValueError):
        Timers(t1=1.0, t2=0.5)


def test_new_branch() -> None:
    a, b = new_branch(), new_branch()
    assert a != b
    req = request(branch=a)
    via = req.top_via
    assert via is not None and via.rfc3261_branch and via.branch == a


# -- INVITE client ---------------------------------------------------------------------------


def test_invite_client_timer_a_doubles_until_timer_b() -> None:
    layer = TransactionLayer()
    inv = request()
    tx, out = layer.send_request(inv, dest=DEST, reliable=False, now=0.0)
    assert isinstance(tx, InviteClientTransaction) and state(tx) is S.CALLING
    assert out == [Send(message=inv, dest=DEST)]
    assert layer.next_deadline() == 0.5
    assert tx.pending_timers() == {"A": 0.5, "B": 32.0}
    events = run(layer, 40.0)
    # RFC 3261 17.1.1.2: retransmits at T1, 2T1, 4T1 ... intervals; the identical object.
    assert [t for t, _ in sends(events)] == [0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
    assert all(m is inv for _, m in sends(events))
    assert events[-2:] == [
        (32.0, TransactionTimeout(transaction=tx)),
        (32.0, TransactionTerminated(transaction=tx)),
    ]
    assert state(tx) is S.TERMINATED
    assert layer.next_deadline() is None
    assert len(layer) == 0


def test_invite_client_next_deadline_exact_steps() -> None:
    layer = TransactionLayer()
    layer.send_request(request(), dest=DEST, reliable=False, now=10.0)
    assert layer.next_deadline() == 10.5
    assert layer.handle_timer(10.4) == []
    assert len(layer.handle_timer(10.5)) == 1
    assert layer.next_deadline() == 11.5
    assert len(layer.handle_timer(11.5)) == 1
    assert layer.next_deadline() == 13.5
    # Late firing: the next interval counts from the time the timer was handled.
    assert len(layer.handle_timer(14.0)) == 1
    assert layer.next_deadline() == 18.0
    run(layer, 100.0)
    assert len(layer) == 0


def test_invite_client_provisional_stops_a_then_non_2xx_acked() -> None:
    layer = TransactionLayer()
    inv = request(extra="Route: <sip:edge.example.com;lr>\r\n")
    tx, _ = layer.send_request(inv, dest=DEST, reliable=False, now=0.0)
    assert isinstance(tx, InviteClientTransaction)
    ringing = response(inv, 180)
    found, out = layer.receive_response(ringing, now=0.2)
    assert found is tx and state(tx) is S.PROCEEDING
    assert out == [ResponseReceived(transaction=tx, response=ringing)]
    # RFC 3261 17.1.1.2: a provisional stops A; B only applies in Calling.
    assert layer.next_deadline() is None
    assert run(layer, 100.0) == []
    busy = response(inv, 486)
    found, out = layer.receive_response(busy, now=5.0)
    assert found is tx and state(tx) is S.COMPLETED
    ack = tx.ack
    assert ack is not None
    assert out == [
        Send(message=ack, dest=DEST),
        ResponseReceived(transaction=tx, response=busy),
    ]
    assert layer.next_deadline() == 37.0  # timer D: 32 s
    # A retransmitted final is ACKed again (same ACK object) and not passed to the TU.
    found, out = layer.receive_response(response(inv, 486), now=6.0)
    assert found is tx and out == [Send(message=ack, dest=DEST)]
    # Provisional responses and 2xx are absorbed in Completed.
    assert layer.receive_response(response(inv, 180), now=6.1) == (tx, [])
    assert layer.receive_response(response(inv, 200), now=6.2) == (tx, [])
    assert repr(tx) == "<InviteClientTransaction INVITE Completed>"
    assert layer.handle_timer(36.9) == []
    assert layer.handle_timer(37.0) == [TransactionTerminated(transaction=tx)]
    assert len(layer) == 0
    # After termination the transaction is gone: a late final is stray.
    assert layer.receive_response(response(inv, 486), now=40.0) == (None, [])


def test_non_2xx_ack_contents() -> None:
    # RFC 3261 17.1.1.3
    inv = request(
        extra=(
            "Via: SIP/2.0/UDP 198.51.100.1;branch=z9hG4bKlower\r\n"
            "Route: <sip:edge.example.com;lr>\r\n"
            "Route: <sip:core.example.com;lr>\r\n"
        ),
        cseq=7,
    )
    resp = response(inv, 404, to_tag="far")
    ack = non2xx_ack(inv, resp)
    again = parse_message(bytes(ack))
    assert isinstance(again, Request)
    assert again.method == "ACK" and again.uri_text == inv.uri_text
    assert again.values("via") == ["SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK-1"]
    assert again.values("route") == ["<sip:edge.example.com;lr>", "<sip:core.example.com;lr>"]
    assert again.get("call-id") == inv.get("call-id")
    assert again.get("from") == inv.get("from")
    assert again.to is not None and again.to.tag == "far"
    assert str(again.cseq) == "7 ACK"
    assert again.max_forwards == 70
    assert again.get("content-length") == "0"
    assert "contact" not in again


def test_invite_client_final_in_calling_cancels_a_and_b() -> None:
    layer = TransactionLayer()
    inv = request()
    tx, _ = layer.send_request(inv, dest=DEST, reliable=False, now=0.0)
    layer.handle_timer(0.5)  # one retransmission
    _, out = layer.receive_response(response(inv, 302), now=0.7)
    assert state(tx) is S.COMPLETED and len(only(out, Send)) == 1
    assert tx.pending_timers() == {"D": 32.7}
    assert run(layer, 32.6) == []
    assert run(layer, 32.7) == [(32.7, TransactionTerminated(transaction=tx))]
    assert len(layer) == 0


def test_invite_client_reliable_no_retransmits_and_d_zero() -> None:
    layer = TransactionLayer()
    inv = request(branch="z9hG4bK-tcp")
    tx, out = layer.send_request(inv, dest=DEST, reliable=True, now=0.0)
    assert out == [Send(message=inv, dest=DEST)]
    assert tx.pending_timers() == {"B": 32.0}  # no timer A
    assert layer.next_deadline() == 32.0
    resp = response(inv, 503)
    _, out = layer.receive_response(resp, now=1.0)
    assert isinstance(tx, InviteClientTransaction) and tx.ack is not None
    # RFC 3261 17.1.1.2: timer D is zero on reliable transports.
    assert out == [
        Send(message=tx.ack, dest=DEST),
        ResponseReceived(transaction=tx, response=resp),
        TransactionTerminated(transaction=tx),
    ]
    assert layer.next_deadline() is None
    assert len(layer) == 0


def test_invite_client_reliable_timer_b() -> None:
    layer = TransactionLayer()
    tx, _ = layer.send_request(request(), dest=DEST, reliable=True, now=0.0)
    events = run(layer, 100.0)
    assert events == [
        (32.0, TransactionTimeout(transaction=tx)),
        (32.0, TransactionTerminated(transaction=tx)),
    ]
    assert len(layer) == 0


def test_invite_client_2xx_accepted_and_timer_m() -> None:
    layer = TransactionLayer()
    inv = request()
    tx, _ = layer.send_request(inv, dest=DEST, reliable=False, now=0.0)
    layer.receive_response(response(inv, 100, to_tag=None), now=0.1)
    ok = response(inv, 200)
    _, out = layer.receive_response(ok, now=2.0)
    # RFC 6026 7.2: Accepted; no ACK from the transaction (the TU sends the 2xx ACK).
    assert out == [ResponseReceived(transaction=tx, response=ok)]
    assert state(tx) is S.ACCEPTED
    assert layer.next_deadline() == 34.0  # timer M = 64*T1
    # Every further 2xx (retransmission or another fork) goes to the TU.
    ok2 = response(inv, 200, to_tag="fork2")
    assert layer.receive_response(ok2, now=3.0) == (
        tx,
        [ResponseReceived(transaction=tx, response=ok2)],
    )
    ok3 = response(inv, 200)
    assert layer.receive_response(ok3, now=4.0)[1] == [
        ResponseReceived(transaction=tx, response=ok3)
    ]
    # Provisional and non-2xx responses are absorbed in Accepted.
    assert layer.receive_response(response(inv, 180), now=5.0) == (tx, [])
    assert layer.receive_response(response(inv, 486), now=5.0) == (tx, [])
    assert run(layer, 33.9) == []
    assert run(layer, 34.0) == [(34.0, TransactionTerminated(transaction=tx))]
    assert len(layer) == 0


def test_invite_client_2xx_directly_in_calling() -> None:
    layer = TransactionLayer()
    inv = request()
    tx, _ = layer.send_request(inv, dest=DEST, reliable=True, now=0.0)
    _, out = layer.receive_response(response(inv, 200), now=0.3)
    assert state(tx) is S.ACCEPTED and len(out) == 1
    assert tx.pending_timers() == {"M": 32.3}  # timer M also on reliable transports
    run(layer, 32.3)
    assert len(layer) == 0


def test_response_matching() -> None:
    # RFC 3261 17.1.3: top Via branch and CSeq method.
    layer = TransactionLayer()
    inv = request(branch="z9hG4bK-match")
    tx, _ = layer.send_request(inv, dest=DEST, reliable=False, now=0.0)
    other = request(branch="z9hG4bK-other")
    assert layer.receive_response(response(other, 200), now=0.1) == (None, [])
    cancel_method = request("CANCEL", branch="z9hG4bK-match")
    assert layer.receive_response(response(cancel_method, 200), now=0.1) == (None, [])
    no_via = Response(200, "OK")
    assert layer.receive_response(no_via, now=0.1) == (None, [])
    found, _ = layer.receive_response(response(inv, 180), now=0.2)
    assert found is tx
    layer.terminate(tx)
    assert len(layer) == 0


# -- non-INVITE client -----------------------------------------------------------------------


def test_non_invite_client_timer_e_capped_at_t2_until_f() -> None:
    layer = TransactionLayer()
    opt = request("OPTIONS")
    tx, out = layer.send_request(opt, dest=DEST, reliable=False, now=0.0)
    assert isinstance(tx, NonInviteClientTransaction) and state(tx) is S.TRYING
    assert out == [Send(message=opt, dest=DEST)]
    assert tx.pending_timers() == {"E": 0.5, "F": 32.0}
    events = run(layer, 40.0)
    # RFC 3261 17.1.2.2: intervals T1, 2T1, 4T1, then T2 (4 s).
    times = [t for t, _ in sends(events)]
    assert times == [0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
    assert all(m is opt for _, m in sends(events))
    assert events[-2:] == [
        (32.0, TransactionTimeout(transaction=tx)),
        (32.0, TransactionTerminated(transaction=tx)),
    ]
    assert len(layer) == 0


def test_non_invite_client_timer_e_is_t2_in_proceeding() -> None:
    layer = TransactionLayer()
    reg = request("REGISTER")
    tx, _ = layer.send_request(reg, dest=DEST, reliable=False, now=0.0)
    trying = response(reg, 100, to_tag=None)
    _, out = layer.receive_response(trying, now=0.1)
    assert out == [ResponseReceived(transaction=tx, response=trying)]
    assert state(tx) is S.PROCEEDING
    assert layer.next_deadline() == 0.5  # the running E is kept
    assert layer.handle_timer(0.5) == [Send(message=reg, dest=DEST)]
    assert layer.next_deadline() == 4.5  # RFC 3261 17.1.2.2: E = T2 in Proceeding
    assert layer.handle_timer(4.5) == [Send(message=reg, dest=DEST)]
    assert layer.next_deadline() == 8.5
    # Timer F still applies in Proceeding.
    events = run(layer, 32.0)
    assert events[-2:] == [
        (32.0, TransactionTimeout(transaction=tx)),
        (32.0, TransactionTerminated(transaction=tx)),
    ]
    assert len(layer) == 0


def test_non_invite_client_timer_k() -> None:
    layer = TransactionLayer()
    opt = request("OPTIONS")
    tx, _ = layer.send_request(opt, dest=DEST, reliable=False, now=0.0)
    ok = response(opt, 200)
    _, out = layer.receive_response(ok, now=1.0)
    assert out == [ResponseReceived(transaction=tx, response=ok)]
    assert state(tx) is S.COMPLETED
    assert tx.pending_timers() == {"K": 6.0}  # T4, E and F stopped
    assert layer.next_deadline() == 6.0
    # RFC 3261 17.1.2.2: retransmitted finals are absorbed in Completed.
    assert layer.receive_response(response(opt, 200), now=2.0) == (tx, [])
    assert layer.handle_timer(6.0) == [TransactionTerminated(transaction=tx)]
    assert len(layer) == 0


def test_non_invite_client_reliable() -> None:
    layer = TransactionLayer()
    opt = request("OPTIONS")
    tx, _ = layer.send_request(opt, dest=DEST, reliable=True, now=0.0)
    assert tx.pending_timers() == {"F": 32.0}  # no timer E
    ok = response(opt, 404)
    _, out = layer.receive_response(ok, now=1.0)
    assert out == [
        ResponseReceived(transaction=tx, response=ok),
        TransactionTerminated(transaction=tx),
    ]  # K = 0
    assert layer.next_deadline() is None
    assert len(layer) == 0


def test_non_invite_client_reliable_timer_f() -> None:
    layer = TransactionLayer()
    tx, _ = layer.send_request(request("BYE"), dest=DEST, reliable=True, now=3.0)
    assert run(layer, 100.0) == [
        (35.0, TransactionTimeout(transaction=tx)),
        (35.0, TransactionTerminated(transaction=tx)),
    ]
    assert len(layer) == 0


def test_send_request_validation() -> None:
    layer = TransactionLayer()
    with pytest.raises(ValueError):
        layer.send_request(request("ACK"), dest=DEST, reliable=False, now=0.0)
    with pytest.raises(ValueError):
        layer.send_request(request(branch="1234"), dest=DEST, reliable=False, now=0.0)
    with pytest.raises(ValueError):
        layer.send_request(request(branch="z9hG4bK"), dest=DEST, reliable=False, now=0.0)
    tx, _ = layer.send_request(request(), dest=DEST, reliable=False, now=0.0)
    with pytest.raises(ValueError):
        layer.send_request(request(), dest=DEST, reliable=False, now=0.0)
    assert layer.terminate(tx) == [TransactionTerminated(transaction=tx)]
    assert layer.terminate(tx) == []
    assert len(layer) == 0 and layer.next_deadline() is None


# -- INVITE server ---------------------------------------------------------------------------


def test_invite_server_trying_after_200ms() -> None:
    layer = TransactionLayer()
    inv = request()
    disp, tx, out = layer.receive_request(inv, dest=DEST, reliable=False, now=0.0)
    assert disp is D.NEW and isinstance(tx, InviteServerTransaction)
    assert state(tx) is S.PROCEEDING and out == []
    assert layer.next_deadline() == 0.2
    assert layer.handle_timer(0.19) == []
    out = layer.handle_timer(0.2)
    assert len(out) == 1 and isinstance(out[0], Send) and out[0].dest == DEST
    trying = out[0].message
    assert isinstance(trying, Response) and trying.status == 100
    assert trying.to is not None and trying.to.tag is None
    assert trying.values("via") == inv.values("via")
    assert layer.next_deadline() is None
    # RFC 3261 17.2.1: a retransmitted INVITE re-sends the most recent provisional.
    disp, again, out = layer.receive_request(request(), dest=DEST, reliable=False, now=0.5)
    assert disp is D.RETRANSMISSION and again is tx
    assert out == [Send(message=trying, dest=DEST)]
    # Clean up: reject, ACK.
    rej = make_response(inv, 486, to_tag="t")
    tx.respond(rej, 1.0)
    disp, _, _ = layer.receive_request(ack_for(inv, rej), dest=DEST, reliable=False, now=1.1)
    assert disp is D.ACK_ABSORBED
    run(layer, 100.0)
    assert len(layer) == 0


def test_invite_server_answered_before_trying_timer() -> None:
    layer = TransactionLayer()
    inv = request()
    _, tx, _ = layer.receive_request(inv, dest=DEST, reliable=False, now=0.0)
    assert tx is not None
    ringing = make_response(inv, 180, to_tag="t")
    assert tx.respond(ringing, 0.1) == [Send(message=ringing, dest=DEST)]
    assert layer.next_deadline() is None  # trying timer cancelled
    assert layer.handle_timer(0.2) == []
    disp, _, out = layer.receive_request(request(), dest=DEST, reliable=False, now=0.5)
    assert disp is D.RETRANSMISSION and out == [Send(message=ringing, dest=DEST)]
    ok = make_response(inv, 200, to_tag="t")
    tx.respond(ok, 1.0)
    run(layer, 100.0)
    assert len(layer) == 0


def test_invite_server_retransmission_before_any_response() -> None:
    layer = TransactionLayer(Timers(trying_delay=1.0))
    inv = request()
    _, tx, _ = layer.receive_request(inv, dest=DEST, reliable=False, now=0.0)
    disp, again, out = layer.receive_request(request(), dest=DEST, reliable=False, now=0.5)
    assert disp is D.RETRANSMISSION and again is tx and out == []
    assert layer.next_deadline() == 1.0
    assert tx is not None
    tx.respond(make_response(inv, 200, to_tag="t"), 0.6)
    assert layer.next_deadline() == 32.6  # trying timer gone, timer L armed
    run(layer, 100.0)
    assert len(layer) == 0


def test_invite_server_trying_delay_zero_sends_at_once() -> None:
    layer = TransactionLayer(Timers(trying_delay=0.0))
    disp, tx, out = layer.receive_request(request(), dest=DEST, reliable=True, now=0.0)
    assert disp is D.NEW and tx is not None
    assert len(out) == 1 and isinstance(out[0], Send)
    assert isinstance(out[0].message, Response) and out[0].message.status == 100
    assert layer.next_deadline() is None
    assert layer.terminate(tx) == [TransactionTerminated(transaction=tx)]
    assert len(layer) == 0


def test_invite_server_non_2xx_timer_g_until_ack_then_timer_i() -> None:
    layer = TransactionLayer()
    inv = request()
    _, tx, _ = layer.receive_request(inv, dest=DEST, reliable=False, now=0.0)
    assert tx is not None
    busy = make_response(inv, 486, to_tag="t")
    assert tx.respond(busy, 0.1) == [Send(message=busy, dest=DEST)]
    assert state(tx) is S.COMPLETED
    assert tx.pending_timers() == {"G": 0.6, "H": 32.1}
    events = run(layer, 8.0)
    # RFC 3261 17.2.1: G at T1, 2T1, 4T1, capped at T2; the identical response object.
    assert [t for t, _ in sends(events)] == [0.6, 1.6, 3.6, 7.6]
    assert all(m is busy for _, m in sends(events))
    assert layer.next_deadline() == 11.6
    # A retransmitted INVITE re-sends the final response.
    disp, _, out = layer.receive_request(request(), dest=DEST, reliable=False, now=9.0)
    assert disp is D.RETRANSMISSION and out == [Send(message=busy, dest=DEST)]
    disp, found, out = layer.receive_request(
        ack_for(inv, busy), dest=DEST, reliable=False, now=10.0
    )
    assert disp is D.ACK_ABSORBED and found is tx and out == []
    assert state(tx) is S.CONFIRMED
    assert tx.pending_timers() == {"I": 15.0}  # G and H stopped, I = T4
    assert layer.next_deadline() == 15.0
    # Confirmed absorbs further ACKs and INVITE retransmissions.
    disp, _, out = layer.receive_request(ack_for(inv, busy), dest=DEST, reliable=False, now=11.0)
    assert disp is D.ACK_ABSORBED and out == []
    disp, _, out = layer.receive_request(request(), dest=DEST, reliable=False, now=11.0)
    assert disp is D.RETRANSMISSION and out == []
    # No further responses from the TU in Confirmed.
    assert tx.respond(make_response(inv, 500, to_tag="t"), 12.0) == []
    assert run(layer, 15.0) == [(15.0, TransactionTerminated(transaction=tx))]
    assert len(layer) == 0


def test_invite_server_timer_h_without_ack() -> None:
    layer = TransactionLayer()
    inv = request()
    _, tx, _ = layer.receive_request(inv, dest=DEST, reliable=False, now=0.0)
    assert tx is not None
    busy = make_response(inv, 603, to_tag="t")
    tx.respond(busy, 1.0)
    events = run(layer, 100.0)
    times = [t for t, _ in sends(events)]
    assert times == [1.5, 2.5, 4.5, 8.5, 12.5, 16.5, 20.5, 24.5, 28.5, 32.5]
    assert events[-2:] == [
        (33.0, TransactionTimeout(transaction=tx)),
        (33.0, TransactionTerminated(transaction=tx)),
    ]
    assert len(layer) == 0


def test_invite_server_reliable_no_g_and_i_zero() -> None:
    layer = TransactionLayer()
    inv = request()
    _, tx, _ = layer.receive_request(inv, dest=DEST, reliable=True, now=0.0)
    assert tx is not None
    busy = make_response(inv, 404, to_tag="t")
    tx.respond(busy, 0.1)
    assert tx.pending_timers() == {"H": 32.1}  # no timer G
    disp, found, out = layer.receive_request(ack_for(inv, busy), dest=DEST, reliable=True, now=0.2)
    assert disp is D.ACK_ABSORBED and found is tx
    assert out == [TransactionTerminated(transaction=tx)]  # I = 0
    assert len(layer) == 0 and layer.next_deadline() is None


def test_invite_server_reliable_timer_h() -> None:
    layer = TransactionLayer()
    inv = request()
    _, tx, _ = layer.receive_request(inv, dest=DEST, reliable=True, now=0.0)
    assert tx is not None
    tx.respond(make_response(inv, 486, to_tag="t"), 0.0)
    assert run(layer, 100.0) == [
        (32.0, TransactionTimeout(transaction=tx)),
        (32.0, TransactionTerminated(transaction=tx)),
    ]
    assert len(layer) == 0


def test_invite_server_2xx_accepted_timer_l() -> None:
    layer = TransactionLayer()
    inv = request()
    _, tx, _ = layer.receive_request(inv, dest=DEST, reliable=False, now=0.0)
    assert tx is not None
    ok = make_response(inv, 200, to_tag="t")
    assert tx.respond(ok, 0.1) == [Send(message=ok, dest=DEST)]
    assert state(tx) is S.ACCEPTED
    assert tx.pending_timers() == {"L": 32.1}  # RFC 6026 7.1: timer L, no retransmit timer
    # Retransmitted INVITEs are absorbed in Accepted (RFC 6026 7.1).
    disp, found, out = layer.receive_request(request(), dest=DEST, reliable=False, now=0.5)
    assert disp is D.RETRANSMISSION and found is tx and out == []
    # The TU (UAS core) retransmits the 2xx itself; it goes out in Accepted.
    assert tx.respond(ok, 0.6) == [Send(message=ok, dest=DEST)]
    assert tx.respond(make_response(inv, 500, to_tag="t"), 0.7) == []
    # The 2xx ACK has its own branch: it matches nothing and goes to the TU.
    ack2xx = request("ACK", branch="z9hG4bK-ack", to_tag="t")
    assert layer.receive_request(ack2xx, dest=DEST, reliable=False, now=1.0) == (
        D.ACK_TO_TU,
        None,
        [],
    )
    # An ACK with the INVITE's branch in Accepted is passed to the TU too.
    same = request("ACK", to_tag="t")
    assert layer.receive_request(same, dest=DEST, reliable=False, now=1.1) == (
        D.ACK_TO_TU,
        tx,
        [],
    )
    assert state(tx) is S.ACCEPTED
    assert run(layer, 32.0) == []
    assert run(layer, 32.1) == [(32.1, TransactionTerminated(transaction=tx))]
    assert len(layer) == 0


def test_invite_server_ack_before_final_is_stray() -> None:
    layer = TransactionLayer()
    _, tx, _ = layer.receive_request(request(), dest=DEST, reliable=False, now=0.0)
    disp, found, out = layer.receive_request(request("ACK"), dest=DEST, reliable=False, now=0.1)
    assert disp is D.STRAY and found is tx and out == []
    assert tx is not None and layer.terminate(tx) == [TransactionTerminated(transaction=tx)]
    assert len(layer) == 0 and layer.next_deadline() is None


# -- non-INVITE server -----------------------------------------------------------------------


def test_non_invite_server_retransmissions_and_timer_j() -> None:
    layer = TransactionLayer()
    opt = request("OPTIONS")
    disp, tx, out = layer.receive_request(opt, dest=DEST, reliable=False, now=0.0)
    assert disp is D.NEW and isinstance(tx, NonInviteServerTransaction)
    assert state(tx) is S.TRYING and out == [] and layer.next_deadline() is None
    # RFC 3261 17.2.2: absorbed in Trying, no output.
    disp, found, out = layer.receive_request(request("OPTIONS"), dest=DEST, reliable=False, now=0.5)
    assert (disp, found, out) == (D.RETRANSMISSION, tx, [])
    trying = make_response(opt, 100)
    assert tx.respond(trying, 0.6) == [Send(message=trying, dest=DEST)]
    assert state(tx) is S.PROCEEDING
    _, _, out = layer.receive_request(request("OPTIONS"), dest=DEST, reliable=False, now=1.0)
    assert out == [Send(message=trying, dest=DEST)]
    ok = make_response(opt, 200, to_tag="t")
    assert tx.respond(ok, 2.0) == [Send(message=ok, dest=DEST)]
    assert state(tx) is S.COMPLETED
    assert layer.next_deadline() == 34.0  # timer J = 64*T1
    _, _, out = layer.receive_request(request("OPTIONS"), dest=DEST, reliable=False, now=3.0)
    assert out == [Send(message=ok, dest=DEST)]
    # Further finals from the TU are discarded in Completed.
    assert tx.respond(make_response(opt, 500, to_tag="t"), 4.0) == []
    _, _, out = layer.receive_request(request("OPTIONS"), dest=DEST, reliable=False, now=5.0)
    assert out == [Send(message=ok, dest=DEST)]
    assert run(layer, 33.9) == []
    assert run(layer, 34.0) == [(34.0, TransactionTerminated(transaction=tx))]
    assert len(layer) == 0
    # After termination the same request starts a new transaction.
    disp, new_tx, _ = layer.receive_request(request("OPTIONS"), dest=DEST, reliable=True, now=35.0)
    assert disp is D.NEW and new_tx is not tx
    assert new_tx is not None
    new_tx.respond(make_response(opt, 200, to_tag="t"), 35.0)
    assert len(layer) == 0


def test_non_invite_server_reliable_j_zero() -> None:
    layer = TransactionLayer()
    bye = request("BYE", to_tag="t")
    _, tx, _ = layer.receive_request(bye, dest=DEST, reliable=True, now=0.0)
    assert tx is not None
    ok = make_response(bye, 200)
    assert tx.respond(ok, 0.1) == [
        Send(message=ok, dest=DEST),
        TransactionTerminated(transaction=tx),
    ]
    assert state(tx) is S.TERMINATED
    assert len(layer) == 0 and layer.next_deadline() is None
    assert tx.respond(make_response(bye, 500), 0.2) == []  # gone: discarded


def test_non_invite_server_final_directly_from_trying() -> None:
    layer = TransactionLayer()
    opt = request("OPTIONS")
    _, tx, _ = layer.receive_request(opt, dest=DEST, reliable=False, now=0.0)
    assert tx is not None
    tx.respond(make_response(opt, 200, to_tag="t"), 1.0)
    assert state(tx) is S.COMPLETED and tx.pending_timers() == {"J": 33.0}
    run(layer, 33.0)
    assert len(layer) == 0


def test_server_matching_uses_sent_by_and_method() -> None:
    # RFC 3261 17.2.3: branch + sent-by + method.
    layer = TransactionLayer()
    _, a, _ = layer.receive_request(request(), dest=DEST, reliable=True, now=0.0)
    disp, b, _ = layer.receive_request(
        request(sent_by="192.0.2.10:5070"), dest=DEST, reliable=True, now=0.0
    )
    assert disp is D.NEW and b is not a
    disp, c, _ = layer.receive_request(request("OPTIONS"), dest=DEST, reliable=True, now=0.0)
    assert disp is D.NEW and c is not a
    assert len(layer) == 3
    for tx in (a, b, c):
        assert tx is not None
        layer.terminate(tx)
    assert len(layer) == 0


# -- CANCEL ----------------------------------------------------------------------------------


def test_cancel_request_contents() -> None:
    # RFC 3261 9.1
    inv = request(
        extra=(
            "Via: SIP/2.0/UDP 198.51.100.1;branch=z9hG4bKlower\r\n"
            "Route: <sip:edge.example.com;lr>\r\n"
        ),
        cseq=42,
    )
    cancel = parse_message(bytes(cancel_request(inv)))
    assert isinstance(cancel, Request)
    assert cancel.method == "CANCEL" and cancel.uri_text == inv.uri_text
    assert cancel.values("via") == ["SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK-1"]
    assert cancel.values("route") == ["<sip:edge.example.com;lr>"]
    for name in ("call-id", "from", "to"):
        assert cancel.get(name) == inv.get(name)
    assert str(cancel.cseq) == "42 CANCEL"
    assert cancel.max_forwards == 70
    assert cancel.get("content-length") == "0"


def test_cancel_matching_server_side() -> None:
    layer = TransactionLayer()
    inv = request()
    _, inv_tx, _ = layer.receive_request(inv, dest=DEST, reliable=False, now=0.0)
    assert isinstance(inv_tx, InviteServerTransaction)
    cancel = cancel_request(inv)
    disp, cancel_tx, _ = layer.receive_request(cancel, dest=DEST, reliable=False, now=0.1)
    assert disp is D.NEW and isinstance(cancel_tx, NonInviteServerTransaction)
    assert layer.find_cancel_target(cancel) is inv_tx
    assert layer.find_cancel_target(request("CANCEL", branch="z9hG4bK-2")) is None
    assert layer.find_cancel_target(request("CANCEL", sent_by="192.0.2.99")) is None
    # The TU answers the CANCEL and then the INVITE with 487.
    cancel_tx.respond(make_response(cancel, 200, to_tag="t"), 0.1)
    terminated = make_response(inv, 487, to_tag="t")
    inv_tx.respond(terminated, 0.1)
    disp, _, _ = layer.receive_request(ack_for(inv, terminated), dest=DEST, reliable=False, now=0.2)
    assert disp is D.ACK_ABSORBED
    run(layer, 100.0)
    assert len(layer) == 0


def test_cancel_client_side_is_its_own_transaction() -> None:
    layer = TransactionLayer()
    inv = request(branch=new_branch())
    inv_tx, _ = layer.send_request(inv, dest=DEST, reliable=False, now=0.0)
    layer.receive_response(response(inv, 180), now=0.1)
    cancel = cancel_request(inv)
    cancel_tx, out = layer.send_request(cancel, dest=DEST, reliable=False, now=1.0)
    assert isinstance(cancel_tx, NonInviteClientTransaction) and out[0] == Send(
        message=cancel, dest=DEST
    )
    assert len(layer) == 2
    cancel_ok = response(cancel, 200)
    found, _ = layer.receive_response(cancel_ok, now=1.1)
    assert found is cancel_tx
    found, out = layer.receive_response(response(inv, 487), now=1.2)
    assert found is inv_tx and state(inv_tx) is S.COMPLETED
    assert isinstance(inv_tx, InviteClientTransaction) and inv_tx.ack is not None
    assert out[0] == Send(message=inv_tx.ack, dest=DEST)
    run(layer, 100.0)
    assert len(layer) == 0


# -- RFC 2543 matching -----------------------------------------------------------------------


def test_rfc2543_request_matching() -> None:
    data = (DATA / "inv2543.dat").read_bytes()
    inv = parse_message(data)
    assert isinstance(inv, Request)
    via = inv.top_via
    assert via is not None and via.branch is None
    layer = TransactionLayer()
    disp, tx, _ = layer.receive_request(inv, dest=DEST, reliable=False, now=0.0)
    assert disp is D.NEW and isinstance(tx, InviteServerTransaction)
    assert tx.key[0] == "2543"
    # RFC 3261 17.2.3: Request-URI, tags, Call-ID, CSeq, top Via.
    retrans = parse_message(data)
    assert isinstance(retrans, Request)
    disp, found, _ = layer.receive_request(retrans, dest=DEST, reliable=False, now=0.5)
    assert disp is D.RETRANSMISSION and found is tx
    # A different CSeq is a different transaction.
    other = parse_message(data.replace(b"CSeq: 56 INVITE", b"CSeq: 57 INVITE"))
    assert isinstance(other, Request)
    disp, other_tx, _ = layer.receive_request(other, dest=DEST, reliable=False, now=0.5)
    assert disp is D.NEW and other_tx is not tx and other_tx is not None
    layer.terminate(other_tx)
    # RFC 3261 9.2: CANCEL matching without the magic cookie.
    assert layer.find_cancel_target(cancel_request(inv)) is tx
    busy = make_response(inv, 486, to_tag="uas")
    tx.respond(busy, 1.0)
    # The ACK's To tag must equal the tag of the response sent.
    wrong = non2xx_ack(inv, make_response(inv, 486, to_tag="someone-else"))
    assert layer.receive_request(wrong, dest=DEST, reliable=False, now=1.1) == (
        D.ACK_TO_TU,
        None,
        [],
    )
    assert state(tx) is S.COMPLETED
    disp, found, out = layer.receive_request(
        non2xx_ack(inv, busy), dest=DEST, reliable=False, now=1.2
    )
    assert (disp, found, out) == (D.ACK_ABSORBED, tx, [])
    assert state(tx) is S.CONFIRMED
    # The TU may edit the request afterwards (e.g. stamp received=); removal still cleans up.
    tx.request.set("Via", "SIP/2.0/UDP iftgw.example.com;received=192.0.2.7")
    run(layer, 100.0)
    assert len(layer) == 0
    assert layer._acks_2543 == {}


def test_rfc2543_ack_in_accepted_goes_to_tu() -> None:
    inv = parse_message((DATA / "inv2543.dat").read_bytes())
    assert isinstance(inv, Request)
    layer = TransactionLayer()
    _, tx, _ = layer.receive_request(inv, dest=DEST, reliable=True, now=0.0)
    assert tx is not None
    ok = make_response(inv, 200, to_tag="uas")
    tx.respond(ok, 0.1)
    ack = non2xx_ack(inv, ok)  # an RFC 2543 2xx ACK looks the same on the wire
    assert layer.receive_request(ack, dest=DEST, reliable=True, now=0.2) == (
        D.ACK_TO_TU,
        tx,
        [],
    )
    run(layer, 100.0)
    assert len(layer) == 0


def test_bare_magic_cookie_branch_does_not_crash() -> None:
    # RFC 4475 3.1.2.? badbranch: the branch is exactly "z9hG4bK" (falls back to RFC 2543 keys).
    opt = parse_message((DATA / "badbranch.dat").read_bytes())
    assert isinstance(opt, Request)
    layer = TransactionLayer()
    disp, tx, _ = layer.receive_request(opt, dest=DEST, reliable=False, now=0.0)
    assert disp is D.NEW and isinstance(tx, ServerTransaction)
    disp, again, _ = layer.receive_request(opt, dest=DEST, reliable=False, now=0.1)
    assert disp is D.RETRANSMISSION and again is tx
    tx.respond(make_response(opt, 400, "Bad Branch", to_tag="t"), 0.2)
    run(layer, 100.0)
    assert len(layer) == 0


def test_request_without_via_does_not_crash() -> None:
    req = request("OPTIONS")
    req.remove("via")
    layer = TransactionLayer()
    disp, tx, _ = layer.receive_request(req, dest=DEST, reliable=True, now=0.0)
    assert disp is D.NEW and tx is not None
    ack = request("ACK")
    ack.remove("via")
    assert layer.receive_request(ack, dest=DEST, reliable=True, now=0.0)[0] is D.ACK_TO_TU
    tx.respond(make_response(req, 200), 0.0)
    assert len(layer) == 0


# -- the timer heap at scale -----------------------------------------------------------------


def test_many_transactions_next_deadline_is_the_minimum() -> None:
    layer = TransactionLayer()
    clients: list[ClientTransaction] = []
    for i in range(3000):
        req = request("OPTIONS", branch=f"z9hG4bK-{i}")
        tx, _ = layer.send_request(req, dest=DEST, reliable=False, now=i * 0.001)
        clients.append(tx)
    assert len(layer) == 3000
    assert layer.next_deadline() == 0.5
    # Answer all but a few: each leaves stale E/F entries behind (heap compaction kicks in).
    for i, tx in enumerate(clients):
        if i % 1000 != 999:
            layer.receive_response(response(tx.request, 200), now=3.1)
    live = [tx for tx in clients if state(tx) is not S.TERMINATED]
    expected = min(d for tx in live for d in tx.pending_timers().values())
    assert layer.next_deadline() == expected == 0.5 + 0.999
    events = run(layer, 1000.0)
    terminated = only([o for _, o in events], TransactionTerminated)
    timeouts = only([o for _, o in events], TransactionTimeout)
    assert len(terminated) == 3000 and len(timeouts) == 3
    assert len(layer) == 0 and layer.next_deadline() is None


# -- the transition tables against the RFC figures --------------------------------------------

E = Event
# Every arc of each figure: (state, event) -> next state. RFC 3261 figure 5 as replaced by
# RFC 6026 8.4 (INVITE client), figure 6, figure 7 as replaced by RFC 6026 8.7 (INVITE
# server), figure 8. "200-699" arcs of figures 6 and 8 are the 2xx and the 300-699 events.
RFC_ARCS: dict[type, dict[tuple[TransactionState, Event], TransactionState]] = {
    InviteClientTransaction: {
        (S.CALLING, E.TIMER_A): S.CALLING,
        (S.CALLING, E.TIMER_B): S.TERMINATED,
        (S.CALLING, E.TRANSPORT_ERROR): S.TERMINATED,
        (S.CALLING, E.RECV_1XX): S.PROCEEDING,
        (S.CALLING, E.RECV_2XX): S.ACCEPTED,
        (S.CALLING, E.RECV_300_699): S.COMPLETED,
        (S.PROCEEDING, E.RECV_1XX): S.PROCEEDING,
        (S.PROCEEDING, E.RECV_2XX): S.ACCEPTED,
        (S.PROCEEDING, E.RECV_300_699): S.COMPLETED,
        (S.COMPLETED, E.RECV_300_699): S.COMPLETED,
        (S.COMPLETED, E.TRANSPORT_ERROR): S.TERMINATED,
        (S.COMPLETED, E.TIMER_D): S.TERMINATED,
        (S.ACCEPTED, E.RECV_2XX): S.ACCEPTED,
        (S.ACCEPTED, E.TIMER_M): S.TERMINATED,
    },
    NonInviteClientTransaction: {
        **{
            (state, event): target
            for state in (S.TRYING, S.PROCEEDING)
            for event, target in (
                (E.TIMER_E, state),
                (E.TIMER_F, S.TERMINATED),
                (E.TRANSPORT_ERROR, S.TERMINATED),
                (E.RECV_1XX, S.PROCEEDING),
                (E.RECV_2XX, S.COMPLETED),
                (E.RECV_300_699, S.COMPLETED),
            )
        },
        (S.COMPLETED, E.TIMER_K): S.TERMINATED,
    },
    InviteServerTransaction: {
        (S.PROCEEDING, E.REQUEST): S.PROCEEDING,
        (S.PROCEEDING, E.TU_1XX): S.PROCEEDING,
        (S.PROCEEDING, E.TU_2XX): S.ACCEPTED,
        (S.PROCEEDING, E.TU_300_699): S.COMPLETED,
        (S.PROCEEDING, E.TRANSPORT_ERROR): S.PROCEEDING,  # RFC 6026: inform the TU, stay
        (S.COMPLETED, E.REQUEST): S.COMPLETED,
        (S.COMPLETED, E.TIMER_G): S.COMPLETED,
        (S.COMPLETED, E.ACK): S.CONFIRMED,
        (S.COMPLETED, E.TIMER_H): S.TERMINATED,
        (S.COMPLETED, E.TRANSPORT_ERROR): S.COMPLETED,  # RFC 6026: inform the TU, stay
        (S.CONFIRMED, E.TIMER_I): S.TERMINATED,
        (S.ACCEPTED, E.REQUEST): S.ACCEPTED,
        (S.ACCEPTED, E.ACK): S.ACCEPTED,
        (S.ACCEPTED, E.TU_2XX): S.ACCEPTED,
        (S.ACCEPTED, E.TRANSPORT_ERROR): S.ACCEPTED,  # RFC 6026: inform the TU, stay
        (S.ACCEPTED, E.TIMER_L): S.TERMINATED,
    },
    NonInviteServerTransaction: {
        (S.TRYING, E.TU_1XX): S.PROCEEDING,
        (S.TRYING, E.TU_2XX): S.COMPLETED,
        (S.TRYING, E.TU_300_699): S.COMPLETED,
        (S.PROCEEDING, E.REQUEST): S.PROCEEDING,
        (S.PROCEEDING, E.TU_1XX): S.PROCEEDING,
        (S.PROCEEDING, E.TU_2XX): S.COMPLETED,
        (S.PROCEEDING, E.TU_300_699): S.COMPLETED,
        (S.PROCEEDING, E.TRANSPORT_ERROR): S.TERMINATED,
        (S.COMPLETED, E.REQUEST): S.COMPLETED,
        (S.COMPLETED, E.TRANSPORT_ERROR): S.TERMINATED,
        (S.COMPLETED, E.TIMER_J): S.TERMINATED,
    },
}

# What the tables do beyond the figures, each for a reason in the RFC's text or the TU's
# needs. TRANSPORT_ERROR is also how the TU gives a transaction up
# (TransactionLayer.terminate: request_timeout failover, RFC 3261 9.1), so it leads to
# Terminated from every state, where RFC 6026 8.7 keeps an INVITE server transaction alive.
EXTRA_ARCS: dict[type, dict[tuple[TransactionState, Event], TransactionState]] = {
    InviteClientTransaction: {
        (S.PROCEEDING, E.TRANSPORT_ERROR): S.TERMINATED,
        (S.ACCEPTED, E.TRANSPORT_ERROR): S.TERMINATED,
    },
    NonInviteClientTransaction: {(S.COMPLETED, E.TRANSPORT_ERROR): S.TERMINATED},
    InviteServerTransaction: {
        (S.PROCEEDING, E.TIMER_TRYING): S.PROCEEDING,  # RFC 3261 17.2.1: 100 Trying
        (S.CONFIRMED, E.ACK): S.CONFIRMED,  # RFC 3261 17.2.1: absorbs further ACKs
        (S.PROCEEDING, E.TRANSPORT_ERROR): S.TERMINATED,
        (S.COMPLETED, E.TRANSPORT_ERROR): S.TERMINATED,
        (S.CONFIRMED, E.TRANSPORT_ERROR): S.TERMINATED,
        (S.ACCEPTED, E.TRANSPORT_ERROR): S.TERMINATED,
    },
    NonInviteServerTransaction: {(S.TRYING, E.TRANSPORT_ERROR): S.TERMINATED},
}

KINDS = list(RFC_ARCS)


def arcs(kind: type) -> dict[tuple[TransactionState, Event], TransactionState]:
    """The kind's compiled table as (state, event) -> next state."""
    return {
        (state, event): target
        for state, row in kind._rows.items()
        for event, (target, _, _) in row.items()
    }


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
def test_table_has_every_arc_of_the_rfc_figure_and_nothing_else(kind: type) -> None:
    table = arcs(kind)
    rfc, extra = RFC_ARCS[kind], EXTRA_ARCS[kind]
    missing = set(rfc) - set(table)
    assert not missing, f"arcs of the RFC figure not in the table: {missing}"
    unexplained = set(table) - set(rfc) - set(extra)
    assert not unexplained, f"arcs in the table the RFC figure does not have: {unexplained}"
    expected = {**rfc, **extra}
    assert {pair: table[pair] for pair in expected} == expected


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
def test_table_states_are_reachable_and_terminated_is_final(kind: type) -> None:
    rows = kind._rows
    # Terminated has no way out; every row entry points at the row of its next state.
    assert rows[S.TERMINATED] == {}
    for row in rows.values():
        for target, target_row, effect in row.values():
            assert target_row is rows[target]
            assert getattr(kind, effect.__name__) is effect  # an effect of this kind
    used = {s for s, row in rows.items() if row} | {t for (_, _), t in arcs(kind).items()}
    reached, todo = {kind._INITIAL}, [kind._INITIAL]
    while todo:
        for target, _, _ in rows[todo.pop()].values():
            if target not in reached:
                reached.add(target)
                todo.append(target)
    assert reached == used, f"unreachable: {used - reached}"
    # And every state leads to Terminated.
    for start in used:
        seen, todo = {start}, [start]
        while todo:
            for target, _, _ in rows[todo.pop()].values():
                if target not in seen:
                    seen.add(target)
                    todo.append(target)
        assert S.TERMINATED in seen, start


def test_initial_states_and_timer_events() -> None:
    layer = TransactionLayer()
    for method, reliable in (("INVITE", False), ("OPTIONS", True)):
        client, _ = layer.send_request(request(method), dest=DEST, reliable=reliable, now=0.0)
        _, server, _ = layer.receive_request(request(method), dest=DEST, reliable=True, now=0.0)
        assert server is not None
        for tx in (client, server):
            assert state(tx) is type(tx)._INITIAL
            layer.terminate(tx)
    assert len(layer) == 0
    # A timer's event carries the timer's name, as pending_timers() shows it.
    timers = {e.value for e in Event if e.name.startswith("TIMER_")}
    assert timers == set(get_args(TimerName))
