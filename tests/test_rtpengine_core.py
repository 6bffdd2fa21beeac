"""[media] engine = "rtpengine" in the core: every SDP goes to the call's node before the
B2BUA passes it on (the message waits for the node's answer), the call's end deletes it
there, and what the node refuses or never answers is refused (sans-I/O, a fake node)."""

from __future__ import annotations

from typing import Any

from test_b2bua import (
    ALICE,
    ANSWER_SDP,
    B1,
    SDP,
    Lab,
    ack_for,
    alice_hangs_up,
    backend_request,
    invite,
    media_policy,
    only,
    reply,
)

from sbc.actions import SendData
from sbc.media import ng
from sbc.media.ng import Node, NodePool
from sbc.media.rtpengine import Rtpengine
from sbc.sip.flow import Flow
from sbc.sip.message import Request, Response
from sbc.sip.parser import parse_message

NODE = ("127.0.0.9", 2223)
NG_LOCAL = ("10.1.0.1", 40000)  # the SBC's ng socket
NODE_SDP = "v=0\r\no=- 9 9 IN IP4 127.0.0.9\r\ns=-\r\nc=IN IP4 127.0.0.9\r\nt=0 0\r\nm=audio {port} RTP/AVP 0\r\n"


class NodeLab(Lab):
    """The B2BUA lab with its media on one fake rtpengine node."""

    def __init__(self, *, up: bool = True) -> None:
        self.engine = Rtpengine(
            NodePool([Node("udp://127.0.0.9:2223", NODE)], ping_interval=5.0, down_after=2),
            media_policy().sides,
        )
        self.engine.local = NG_LOCAL
        self.ng: list[tuple[str, dict[str, Any]]] = []  # what the node received
        super().__init__(rtpengine=self.engine)
        if up:
            self.answer_pings()

    def _sent(self, actions: list[object]) -> list[tuple[Flow, Any]]:
        sip = []
        for a in self._effects(actions):
            assert isinstance(a, SendData)
            if a.flow.local == NG_LOCAL:
                assert a.flow.remote == NODE
                self.ng.append(ng.decode(a.data))
                continue
            sip.append(a)
        out = []
        for a in sip:
            msg = parse_message(a.data)
            out.append((a.flow, msg))
            side = "access" if a.flow.local == ALICE.local else "core"
            self.seen.append((side, msg)) if hasattr(self, "seen") else None
        return out

    def node_says(
        self, result: dict[str, Any], cookie: str | None = None
    ) -> list[tuple[Flow, Any]]:
        """The node answers the last request it got (or ``cookie``'s)."""
        cookie = cookie or self.ng[-1][0]
        self.tick()
        flow = Flow("udp", NG_LOCAL, NODE)
        return self._sent(self.core.receive_datagram(ng.encode(cookie, result), flow, self.now))

    def answer_pings(self) -> None:
        self._sent(self.core.handle_timer(self.now))
        for cookie, message in list(self.ng):
            if message["command"] == "ping":
                self.node_says({"result": "pong"}, cookie)

    def last(self, command: str) -> dict[str, Any]:
        return next(m for _, m in reversed(self.ng) if m["command"] == command)

    def cookie(self, command: str) -> str:
        return next(c for c, m in reversed(self.ng) if m["command"] == command)


def sdp_of(msg: Any) -> str:
    return msg.body.decode()


def test_a_call_s_sdps_go_through_its_node_and_its_end_deletes_it() -> None:
    lab = NodeLab()
    assert lab.engine.pool.nodes["udp://127.0.0.9:2223"].up
    # The INVITE waits for the node: nothing goes out yet (the transaction's own 100
    # Trying follows in 200 ms, RFC 3261 17.2.1, if the node is slower).
    assert lab.from_client(invite()) == []
    offer = lab.last("offer")
    assert offer["from-tag"] == "caller" and offer["sdp"] == SDP
    assert offer["replace"] == ["origin", "session-connection"] and offer["ICE"] == "remove"
    assert offer["transport-protocol"] == "RTP/AVP"  # core_srtp = off
    assert offer["received-from"] == ["IP4", ALICE.remote[0]]
    to_core, fwd = only(
        lab.node_says({"result": "ok", "sdp": NODE_SDP.format(port=50000)}), Request
    )
    assert to_core.remote == B1 and sdp_of(fwd) == NODE_SDP.format(port=50000)
    # The backend's answer waits for the node too, then reaches alice rewritten.
    assert lab.from_backend(reply(fwd, 200, sdp=ANSWER_SDP)) == []
    answer = lab.last("answer")
    assert (answer["from-tag"], answer["to-tag"]) == ("caller", "callee")
    assert answer["call-id"] == offer["call-id"] and answer["sdp"] == ANSWER_SDP
    _, got = only(lab.node_says({"result": "ok", "sdp": NODE_SDP.format(port=50002)}), Response)
    assert got.status == 200 and sdp_of(got) == NODE_SDP.format(port=50002)
    only(lab.from_client(ack_for(got)), Request)
    alice_hangs_up(lab, got, 2)
    # With the caller's tag the node answers with the call's counters (for the record).
    assert lab.last("delete") == {
        "command": "delete", "call-id": offer["call-id"], "from-tag": "caller",
    }  # fmt: skip
    assert lab.engine.pool.node_of(offer["call-id"]) is None


def test_what_the_node_refuses_or_never_answers_is_refused() -> None:
    lab = NodeLab()
    lab.from_client(invite(1))
    _, resp = only(lab.node_says({"result": "error", "error-reason": "Failed to parse SDP"}))
    assert isinstance(resp, Response) and resp.status == 488
    call = lab.last("offer")["call-id"]
    assert lab.last("delete")["call-id"] == call  # whatever the node kept of it goes
    # No answer at all: the ng request is sent 3 times, then 503.
    lab.from_client(invite(2))
    sent = [m for _, m in lab.ng if m.get("call-id") != call and m["command"] == "offer"]
    assert len(sent) == 1
    out = lab.run_until(lab.now + 4.0)
    # The first call's offer, then the second's sent 3 times (2 retransmissions).
    assert len([m for _, m in lab.ng if m["command"] == "offer"]) == 4
    finals = {m.status for _, m in out
              if isinstance(m, Response) and m.call_id == "call2@10.0.0.7" and m.status >= 200}  # fmt: skip
    assert finals == {503}


def test_no_node_up_is_503_at_once() -> None:
    lab = NodeLab(up=False)
    _, resp = only(lab.from_client(invite()))
    assert isinstance(resp, Response) and resp.status == 503
    assert not [m for _, m in lab.ng if m["command"] == "offer"]


def test_responses_keep_their_order_behind_one_that_waits() -> None:
    lab = NodeLab()
    lab.from_client(invite())
    _, fwd = only(lab.node_says({"result": "ok", "sdp": NODE_SDP.format(port=50000)}))
    # A 183 with SDP waits for the node; the 180 after it waits behind it.
    assert lab.from_backend(reply(fwd, 183, sdp=ANSWER_SDP)) == []
    assert lab.from_backend(reply(fwd, 180)) == []
    out = lab.node_says({"result": "ok", "sdp": NODE_SDP.format(port=50002)})
    assert [m.status for _, m in out if isinstance(m, Response)] == [183, 180]


def test_a_cancel_while_the_node_works_ends_the_call_there() -> None:
    lab = NodeLab()
    lab.from_client(invite())
    cancel = invite().replace(b"INVITE sip:", b"CANCEL sip:", 1).replace(b"1 INVITE", b"1 CANCEL")
    cancel = cancel.split(b"Content-Type")[0] + b"Content-Length: 0\r\n\r\n"
    statuses = sorted(m.status for _, m in lab.from_client(cancel) if isinstance(m, Response))
    assert statuses == [200, 487]
    assert lab.node_says({"result": "ok", "sdp": NODE_SDP.format(port=50000)}) == []
    assert lab.last("delete")["call-id"] == lab.last("offer")["call-id"]
    assert not [m for side, m in lab.seen if side == "core" and isinstance(m, Request)]


def test_a_re_invite_from_the_callee_goes_through_the_node_in_its_direction() -> None:
    lab = NodeLab()
    lab.from_client(invite())
    _, fwd = only(lab.node_says({"result": "ok", "sdp": NODE_SDP.format(port=50000)}))
    ok = reply(fwd, 200, sdp=ANSWER_SDP)
    lab.from_backend(ok)
    _, got = only(lab.node_says({"result": "ok", "sdp": NODE_SDP.format(port=50002)}))
    only(lab.from_client(ack_for(got)), Request)
    # bob holds: his re-INVITE is an offer from the callee (from-tag callee) to alice.
    hold = backend_request("INVITE", fwd, ok, 7)
    hold.set_body(ANSWER_SDP.replace("t=0 0", "t=0 0\r\na=sendonly").encode(), "application/sdp")
    assert lab.from_backend(hold) == []
    offer = lab.last("offer")
    assert offer["from-tag"] == "callee" and "a=sendonly" in offer["sdp"]
    assert "transport-protocol" not in offer  # access_srtp = optional: as offered
    _, re = only(lab.node_says({"result": "ok", "sdp": NODE_SDP.format(port=50002)}), Request)
    assert re.method == "INVITE" and sdp_of(re) == NODE_SDP.format(port=50002)
    # alice's answer goes back through the node the other way.
    assert lab.from_client(reply(re, 200, sdp=SDP)) == []
    answer = lab.last("answer")
    assert (answer["from-tag"], answer["to-tag"]) == ("callee", "caller")
    _, ok2 = only(lab.node_says({"result": "ok", "sdp": NODE_SDP.format(port=50000)}), Response)
    assert ok2.status == 200 and sdp_of(ok2) == NODE_SDP.format(port=50000)


def established(lab: NodeLab) -> tuple[str, Any]:
    """alice -> bob through the node; the call's id and alice's 200."""
    lab.from_client(invite())
    _, fwd = only(lab.node_says({"result": "ok", "sdp": NODE_SDP.format(port=50000)}))
    lab.from_backend(reply(fwd, 200, sdp=ANSWER_SDP))
    _, got = only(lab.node_says({"result": "ok", "sdp": NODE_SDP.format(port=50002)}))
    only(lab.from_client(ack_for(got)), Request)
    return lab.last("offer")["call-id"], got


def byes_sent(out: list[tuple[Flow, Any]]) -> list[str]:
    return sorted(side for side, m in [("alice" if f == ALICE else "bob", m) for f, m in out]
                  if isinstance(m, Request) and m.method == "BYE")  # fmt: skip


def test_a_call_without_media_at_its_node_ends_with_bye_on_both_legs() -> None:
    lab = NodeLab()
    lab.engine.timeout = 8.0  # queried every 2 s
    call, _ = established(lab)
    lab.engine.wall_offset = 1_000_000.0
    lab.run_until(lab.now + 2.5)
    query = lab.last("query")
    assert query == {"command": "query", "call-id": call}
    # Media flowed 1 s ago: the call goes on.
    recent = int(lab.engine.wall_offset + lab.now) - 1  # rtpengine reports whole seconds
    answer = {"result": "ok", "created": recent - 5, "tags": {"caller": {"medias": [
        {"streams": [{"last packet": recent}]}]}}}  # fmt: skip
    assert byes_sent(lab.node_says(answer, lab.cookie("query"))) == []
    # Nothing for longer than the timeout: BYE to both (Reason 408, as the built-in relay).
    lab.run_until(lab.now + 2.5)
    stale = dict(answer, tags={"caller": {"medias": [{"streams": [{"last packet": recent - 20}]}]}},
                 created=recent - 30)  # fmt: skip
    out = lab.node_says(stale, lab.cookie("query"))
    assert byes_sent(out) == ["alice", "bob"]
    assert all("cause=408" in str(m.get("reason")) for _, m in out if isinstance(m, Request))


def test_a_call_its_node_forgot_ends_and_a_dead_node_loses_its_calls() -> None:
    lab = NodeLab()
    lab.engine.timeout = 8.0
    established(lab)
    lab.run_until(lab.now + 2.5)
    out = lab.node_says({"result": "error", "error-reason": "Unknown call-id"}, lab.cookie("query"))
    assert byes_sent(out) == ["alice", "bob"]
    # Another call; then its node stops answering pings.
    lab2 = NodeLab()
    lab2.engine.timeout = 8.0
    established(lab2)
    out = lab2.run_until(lab2.now + 15.0)  # two pings missed (each 3 tries): down
    node = lab2.engine.pool.nodes["udp://127.0.0.9:2223"]
    assert not node.up and byes_sent(out) == []
    out = lab2.run_until(lab2.now + 8.0)
    assert sorted(set(byes_sent(out))) == ["alice", "bob"]  # (and their UDP retransmissions)


def test_the_call_record_has_the_node_s_counters() -> None:
    import json

    lab = NodeLab()
    call, got = established(lab)
    alice_hangs_up(lab, got, 2)
    delete = lab.cookie("delete")
    totals = {"RTP": {"packets": 500, "bytes": 86000}, "RTCP": {"packets": 4, "bytes": 320}}
    lab.node_says({"result": "ok", "totals": totals}, delete)
    [record] = [json.loads(line) for line in lab.records]
    assert record["media"] == [{"engine": "rtpengine", "node": "udp://127.0.0.9:2223",
                                "totals": totals}]  # fmt: skip
    assert call
