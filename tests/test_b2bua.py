"""Calls through the B2BUA, driven through the sans-I/O core with a fake clock.

The client ("alice", behind NAT at 192.0.2.7) and the backend (B1) are played by the test:
every message each side receives is parsed and checked, and every test ends with no call,
dialog or transaction state left once the timers have run out.
"""

from __future__ import annotations

import dataclasses
import json

from sipdata import sip

from sbc.actions import CallRecord, Drained, Persist, SendData, Share, ToMediaWorker
from sbc.calls import CallPolicy, PeerRoute
from sbc.core import CoreSettings, SbcCore
from sbc.features.balancer import BackendSpec, HealthPolicy
from sbc.media.control import Command, Delete, PartyStats, Stats, StreamStats, Timeout, Update
from sbc.media.rtpengine import Rtpengine
from sbc.media.session import MediaController, MediaPolicy, SideMedia
from sbc.sides import Side
from sbc.sip.flow import Flow
from sbc.sip.message import Message, Request, Response, make_response
from sbc.sip.parser import parse_message

ACCESS = ("203.0.113.1", 5060)
CORE = ("10.1.0.1", 5080)
B1 = ("10.1.0.10", 5070)
ALICE = Flow("udp", ACCESS, ("192.0.2.7", 40000))
FROM_B1 = Flow("udp", CORE, B1)
CORE_TLS = ("10.1.0.1", 5081)
CORE_HOSTS = ("10.1.0.", "backend.core.internal", "kamailio")

SDP = "v=0\r\no=- 1 1 IN IP4 10.0.0.7\r\ns=-\r\nc=IN IP4 10.0.0.7\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n"
ANSWER_SDP = "v=0\r\no=- 2 2 IN IP4 10.1.0.50\r\ns=-\r\nc=IN IP4 10.1.0.50\r\nt=0 0\r\nm=audio 5000 RTP/AVP 0\r\n"


def invite(n: int = 1, cseq: int = 1, extra: str = "", body: str = SDP, branch: str = "") -> bytes:
    head = (
        f"INVITE sip:bob@example.com SIP/2.0\n"
        f"Via: SIP/2.0/UDP 10.0.0.7:5060;branch=z9hG4bK-inv{n}-{cseq}{branch};rport\n"
        "Max-Forwards: 70\n"
        f'From: "Alice" <sip:alice@example.com>;tag=a{n}\n'
        "To: <sip:bob@example.com>\n"
        f"Call-ID: call{n}@10.0.0.7\n"
        f"CSeq: {cseq} INVITE\n"
        "Contact: <sip:alice@10.0.0.7:5060>\n"
        "User-Agent: softphone/1.0\n"
        "X-Custom: kept\n"
        f"{extra}"
        "Content-Type: application/sdp\n"
        f"Content-Length: {len(body)}\n\n"
    )
    return sip(head) + body.encode()


def media_policy(access_srtp: str = "optional") -> MediaPolicy:
    return MediaPolicy(
        sides={
            "access": SideMedia(bind=ACCESS[0], advertise=ACCESS[0], srtp=access_srtp),
            "core": SideMedia(bind=CORE[0], advertise=CORE[0], srtp="off"),
            "peer": SideMedia(bind=CORE[0], advertise=CORE[0], srtp="optional"),
        },
        ports=(30000, 30999),
    )


# Every call of these tests is anchored, and every test ends with no relay port
# or media session left (``assert_clean``).
MEDIA = media_policy()


class Lab:
    """One SBC core with one backend, the clock, and what each side received."""

    def __init__(
        self,
        policy: CallPolicy | None = None,
        backends: tuple[tuple[str, int], ...] = (B1,),
        peers: tuple[PeerRoute, ...] = (),
        request_timeout: float = 4.0,
        failures: int = 3,
        public_address: str | None = None,
        media: MediaPolicy | None = None,
        worker_answers: bool = True,
        worker: int = 0,
        workers: int = 1,
        rtpengine: Rtpengine | None = None,
        persist: bool = False,
    ) -> None:
        media = media or MEDIA
        self.persisted: dict[str, Persist] = {}  # the state store's entries ([state] url)
        self.media_commands: list[tuple[int, Command]] = []
        # With rtpengine nodes the core keeps no media of its own.
        self.media: MediaController | None = MediaController(media) if rtpengine is None else None
        self.records: list[str] = []  # the call records the core returned (CallRecord)
        self.worker_answers = worker_answers  # a Delete is answered with Stats, as a worker does
        self._deleted: list[str] = []
        self.drained = 0  # Drained actions seen
        specs = tuple(
            BackendSpec(name=f"sip:b{i}", host=h, port=p, transport="udp")
            for i, (h, p) in enumerate(backends, start=1)
        )
        self.core = SbcCore(
            CoreSettings(
                local_hosts=frozenset({ACCESS[0], CORE[0]}),
                backends=specs,
                health=HealthPolicy(
                    probe_interval=3600.0, probe_failures=failures, probe_successes=1
                ),
                calls=policy or CallPolicy(),
                peers=peers,
                request_timeout=request_timeout,
                public_address=public_address,
            ),
            media=self.media,
            worker=worker,
            workers=workers,
            rtpengine=rtpengine,
            persist=persist,
        )
        self.core.add_listener(Side.ACCESS, "udp", ACCESS)
        self.core.add_listener(Side.CORE, "udp", CORE)
        self.core.add_listener(Side.CORE, "tls", CORE_TLS)
        self.now = 0.0
        for flow, probe in self._sent(self.core.handle_timer(0.0)):
            assert isinstance(probe, Request)
            self.core.receive_datagram(bytes(make_response(probe, 200)), flow, 0.0)
        self.seen: list[tuple[str, Message]] = []

    def _to_worker(self, worker: int, command: Command) -> None:
        self.media_commands.append((worker, command))
        if isinstance(command, Delete) and self.worker_answers:
            self._deleted.append(command.session)

    def _sent(self, actions: list[object]) -> list[tuple[Flow, Message]]:
        actions = self._effects(actions)
        while self._deleted:  # the worker's answer to Delete, after the SBC's turn
            session = self._deleted.pop()
            after = self._effects(
                self.core.media_event(Stats(session=session, streams=()), self.now)
            )
            assert after == [], after
        out = []
        engine = self.core.rtpengine if hasattr(self, "core") else None
        for a in actions:
            assert isinstance(a, SendData)
            if engine is not None and a.flow.local == engine.local:
                continue  # to an rtpengine node (test_rtpengine_core.py plays one)
            msg = parse_message(a.data)
            out.append((a.flow, msg))
            side = "access" if a.flow.local == ACCESS else "core"
            self.seen.append((side, msg)) if hasattr(self, "seen") else None
        return out

    def _effects(self, actions: list[object]) -> list[object]:
        """The core's actions other than sends: media commands go to the fake worker,
        call records to ``records``, Drained is counted; the sends are returned."""
        sends = []
        for a in actions:
            if isinstance(a, ToMediaWorker):
                self._to_worker(a.worker, a.command)
            elif isinstance(a, CallRecord):
                self.records.append(a.line)
            elif isinstance(a, Drained):
                self.drained += 1
            elif isinstance(a, Persist):
                if a.value is None:
                    self.persisted.pop(a.key, None)
                else:
                    self.persisted[a.key] = a
            elif isinstance(a, Share):
                pass  # for other workers or instances
            else:
                sends.append(a)
        return sends

    def tick(self, dt: float = 0.01) -> None:
        self.now += dt

    def from_client(self, data: bytes | Message, flow: Flow = ALICE) -> list[tuple[Flow, Message]]:
        self.tick()
        raw = data if isinstance(data, bytes) else bytes(data)
        return self._sent(self.core.receive_datagram(raw, flow, self.now))

    def from_backend(self, msg: Message) -> list[tuple[Flow, Message]]:
        self.tick()
        return self._sent(self.core.receive_datagram(bytes(msg), FROM_B1, self.now))

    def run_until(self, t: float) -> list[tuple[Flow, Message]]:
        out = []
        while (d := self.core.next_deadline()) is not None and d <= t:
            self.now = max(self.now, d)
            out += self._sent(self.core.handle_timer(self.now))
        self.now = t
        return out

    def assert_clean(self) -> None:
        """No dialog or transaction state outlives its call."""
        self.run_until(self.now + 40.0)
        assert self.core.calls.state_size() == dict.fromkeys(self.core.calls.state_size(), 0)
        if self.media is not None:
            assert self.media.state_size() == {"media_sessions": 0, "media_ports": 0}
        layer = self.core.transactions
        mine = [
            tx
            for tx in layer._clients.values()
            if not (self.core.registration.owns(tx) or self.core.backends.owns(tx))
        ]
        assert mine == [] and not layer._servers, (mine, layer._servers)

    def assert_hidden(self) -> None:
        """No header the client received names the core; with the media
        relay no SDP either."""
        for side, msg in self.seen:
            if side != "access":
                continue
            text = bytes(msg).decode()
            if self.media is None:
                text = text.partition("\r\n\r\n")[0]
            for host in CORE_HOSTS:
                assert host not in text, f"{host} leaked to the client:\n{text}"


def byes(out: list[tuple[Flow, Message]]) -> list[tuple[Flow, Request]]:
    """The BYEs sent, once each (UDP retransmissions of the same transaction left out)."""
    seen: dict[str | None, tuple[Flow, Request]] = {}
    for flow, msg in out:
        if isinstance(msg, Request) and msg.method == "BYE":
            seen.setdefault(msg.via[0].branch, (flow, msg))
    return list(seen.values())


def only(items: list[tuple[Flow, Message]], kind: type = Message) -> tuple[Flow, Message]:
    assert len(items) == 1, items
    flow, msg = items[0]
    assert isinstance(msg, kind)
    return flow, msg


def reply(
    req: Message, status: int, tag: str | None = "b-tag", *, sdp: str = "", rr: bool = True
) -> Response:
    """The backend's answer: Record-Route, Contact and Server of the core, a Warning."""
    assert isinstance(req, Request)
    resp = make_response(req, status, to_tag=tag)
    if rr and 100 < status < 300:
        resp.add("Record-Route", "<sip:10.1.0.10:5070;lr;did=backend.core.internal>")
    if 100 < status < 300:
        resp.add("Contact", "<sip:bob@10.1.0.50:5062>")
    resp.add("Server", "kamailio (5.6.3)")
    resp.add("Warning", '399 backend.core.internal "core detail"')
    resp.add("P-Charging-Vector", "icid-value=1")
    if sdp:
        resp.set_body(sdp.encode(), "application/sdp")
    return resp


def ack_for(resp: Message, cseq: int = 1, n: int = 1) -> bytes:
    """Alice's ACK for a 2xx: in the dialog, sent to the SBC's Contact."""
    assert isinstance(resp, Response) and resp.to is not None
    contact = resp.contact[0].uri_text
    return sip(
        f"ACK {contact} SIP/2.0\n"
        f"Via: SIP/2.0/UDP 10.0.0.7:5060;branch=z9hG4bK-ack{n}-{cseq};rport\n"
        "Max-Forwards: 70\n"
        f'From: "Alice" <sip:alice@example.com>;tag=a{n}\n'
        f"To: {resp.get('to')}\n"
        f"Call-ID: call{n}@10.0.0.7\n"
        f"CSeq: {cseq} ACK\n"
        "Content-Length: 0\n\n"
    )


def in_dialog(method: str, resp: Message, cseq: int, n: int = 1, extra: str = "") -> bytes:
    assert isinstance(resp, Response)
    contact = resp.contact[0].uri_text
    return sip(
        f"{method} {contact} SIP/2.0\n"
        f"Via: SIP/2.0/UDP 10.0.0.7:5060;branch=z9hG4bK-{method}{n}-{cseq};rport\n"
        "Max-Forwards: 70\n"
        f'From: "Alice" <sip:alice@example.com>;tag=a{n}\n'
        f"To: {resp.get('to')}\n"
        f"Call-ID: call{n}@10.0.0.7\n"
        f"CSeq: {cseq} {method}\n"
        f"{extra}"
        "Content-Length: 0\n\n"
    )


def alice_hangs_up(lab: Lab, resp: Message, cseq: int, n: int = 1) -> Request:
    """alice's BYE: answered 200 by the SBC at once (RFC 3261 15.1.2); the backend gets a
    BYE of its own, which the backend answers. Returns that BYE."""
    out = lab.from_client(in_dialog("BYE", resp, cseq, n=n))
    [ok] = [m for f, m in out if isinstance(m, Response) and f == ALICE]
    assert ok.status == 200 and ok.get("cseq") == f"{cseq} BYE"  # type: ignore[union-attr]
    [(flow, bye)] = [(f, m) for f, m in out if isinstance(m, Request)]
    assert isinstance(bye, Request) and bye.method == "BYE" and flow.remote != ALICE.remote
    lab.tick()
    assert lab._sent(lab.core.receive_datagram(bytes(make_response(bye, 200)), flow, lab.now)) == []
    return bye


def backend_request(method: str, leg_req: Message, leg_resp: Message, cseq: int) -> Request:
    """A request from the backend within the core leg (it plays the callee's side)."""
    assert isinstance(leg_req, Request) and isinstance(leg_resp, Response)
    contact = leg_req.contact[0].uri_text
    req = Request(method, contact or "")
    req.add("Via", f"SIP/2.0/UDP 10.1.0.10:5070;branch=z9hG4bK-core-{method}-{cseq}")
    req.add("Max-Forwards", "70")
    req.add("From", leg_resp.get("to") or "")
    req.add("To", leg_req.get("from") or "")
    req.add("Call-ID", leg_req.call_id or "")
    req.add("CSeq", f"{cseq} {method}")
    req.add("Content-Length", "0")
    return req


def establish(lab: Lab, n: int = 1) -> tuple[Request, Response, Response]:
    """alice -> SBC -> backend: INVITE, 180, 200, ACK. Returns the core-leg INVITE, the
    backend's 200 and the 200 alice got."""
    to_core, fwd = only(lab.from_client(invite(n)), Request)
    assert to_core.remote == B1 and to_core.local == CORE
    only(lab.from_backend(reply(fwd, 180)), Response)
    ok = reply(fwd, 200, sdp=ANSWER_SDP)
    _, got = only(lab.from_backend(ok), Response)
    assert isinstance(fwd, Request) and isinstance(got, Response)
    _, ack = only(lab.from_client(ack_for(got, n=n)), Request)
    assert ack.method == "ACK"
    return fwd, ok, got


def test_basic_call_both_legs_independent_and_hidden() -> None:
    lab = Lab()
    to_core, fwd = only(lab.from_client(invite()), Request)
    assert isinstance(fwd, Request)
    # The core leg is the SBC's own: Call-ID, From tag, one Via, Contact, CSeq space.
    assert fwd.method == "INVITE" and str(fwd.uri) == "sip:bob@example.com"  # R-URI kept
    assert fwd.call_id != "call1@10.0.0.7" and "10.0.0.7" not in (fwd.call_id or "")
    assert fwd.from_ is not None and fwd.from_.tag not in (None, "a1")
    assert fwd.from_.uri_text == "sip:alice@example.com"
    assert (fwd.get("from") or "").startswith('"Alice"')
    assert len(fwd.via) == 1 and fwd.via[0].host == CORE[0] and fwd.via[0].port == CORE[1]
    assert fwd.contact[0].sip_uri is not None and fwd.contact[0].sip_uri.host == CORE[0]
    assert fwd.max_forwards == 69 and f"c=IN IP4 {CORE[0]}".encode() in fwd.body
    assert fwd.get("x-custom") == "kept" and fwd.get("user-agent") == "softphone/1.0"
    # The backend sees the SBC, not the client's (private) addresses.
    head = bytes(fwd).decode().partition("\r\n\r\n")[0]
    assert "10.0.0.7" not in head and "192.0.2.7" not in head, head

    # 100 Trying to alice from her own server transaction, then 180 and 200 mapped.
    trying = [m for _, m in lab.run_until(lab.now + 0.3) if isinstance(m, Response)]
    assert [m.status for m in trying] == [100]
    to_alice, ringing = only(lab.from_backend(reply(fwd, 180)), Response)
    assert to_alice == ALICE and isinstance(ringing, Response) and ringing.status == 180
    assert ringing.call_id == "call1@10.0.0.7" and len(ringing.via) == 1
    assert ringing.via[0].branch == "z9hG4bK-inv1-1"
    assert ringing.to is not None and ringing.to.tag not in (None, "b-tag")
    assert ringing.contact[0].sip_uri is not None and ringing.contact[0].sip_uri.host == ACCESS[0]
    assert "record-route" not in ringing and "warning" not in ringing
    assert ringing.get("server") == "sbc/0.1.0"
    ok = reply(fwd, 200, sdp=ANSWER_SDP)
    _, got = only(lab.from_backend(ok), Response)
    assert isinstance(got, Response) and got.status == 200
    assert f"c=IN IP4 {ACCESS[0]}".encode() in got.body and b"10.1.0.50" not in got.body
    assert got.to is not None and ringing.to.tag == got.to.tag  # same early dialog

    # ACK: hop by hop per leg; the core leg's ACK follows its route set (the Record-Route).
    to_core, ack = only(lab.from_client(ack_for(got)), Request)
    assert isinstance(ack, Request) and ack.method == "ACK" and to_core.remote == B1
    assert str(ack.uri) == "sip:bob@10.1.0.50:5062"
    assert ack.get("route") == "<sip:10.1.0.10:5070;lr;did=backend.core.internal>"
    assert ack.cseq is not None and fwd.cseq is not None and ack.cseq.seq == fwd.cseq.seq
    assert ack.to is not None and ack.to.tag == "b-tag" and ack.call_id == fwd.call_id

    # The callee hangs up: BYE from the backend becomes alice's BYE, answers come back.
    bye = backend_request("BYE", fwd, ok, 5)
    out = lab.from_backend(bye)
    [ok_bye] = [m for f, m in out if isinstance(m, Response)]  # answered at once
    assert ok_bye.status == 200 and ok_bye.via[0].branch == "z9hG4bK-core-BYE-5"  # type: ignore[union-attr]
    to_alice, bye_a = only([(f, m) for f, m in out if isinstance(m, Request)], Request)
    assert isinstance(bye_a, Request) and bye_a.method == "BYE" and to_alice == ALICE
    assert str(bye_a.uri) == "sip:alice@10.0.0.7:5060" and bye_a.call_id == "call1@10.0.0.7"
    assert bye_a.from_ is not None and bye_a.from_.tag == got.to.tag
    assert lab.from_client(make_response(bye_a, 200)) == []  # alice's 200 ends her BYE
    [record] = [json.loads(r) for r in lab.records]
    assert record["status"] == 200 and record["cause"] == "BYE from callee"
    assert record["backend"] == "sip:b1" and record["answer"] is not None
    lab.assert_hidden()
    lab.assert_clean()


def test_caller_hangs_up_and_2xx_is_retransmitted_until_acked() -> None:
    lab = Lab()
    _to_core, fwd = only(lab.from_client(invite()), Request)
    _, got = only(lab.from_backend(reply(fwd, 200, sdp=ANSWER_SDP)), Response)
    # No ACK yet: the SBC re-sends the 2xx to alice at T1, 2*T1 ... (RFC 3261 13.3.1.4).
    again = [m for _, m in lab.run_until(lab.now + 1.6) if isinstance(m, Response)]
    assert [m.status for m in again] == [200, 200]
    _, ack = only(lab.from_client(ack_for(got)), Request)
    assert lab.run_until(lab.now + 10) == []  # ACKed: no more retransmissions
    # A retransmitted 2xx from the backend gets the same ACK again (RFC 6026 7.2).
    _, ack2 = only(lab.from_backend(reply(fwd, 200, sdp=ANSWER_SDP)), Request)
    assert bytes(ack2) == bytes(ack)
    bye = alice_hangs_up(lab, got, 2)
    assert bye.cseq is not None and bye.cseq.seq == 2  # the core leg's own CSeq space
    assert json.loads(lab.records[0])["cause"] == "BYE from caller"
    lab.assert_hidden()
    lab.assert_clean()


def test_no_ack_ends_the_call_with_bye_on_both_legs() -> None:
    lab = Lab()
    _, fwd = only(lab.from_client(invite()), Request)
    _, _got = only(lab.from_backend(reply(fwd, 200, sdp=ANSWER_SDP)), Response)
    out = lab.run_until(lab.now + 33)
    sent_byes = byes(out)
    # The backend's 2xx is ACKed before the BYE (RFC 3261 15), alice is sent BYE too.
    acks = [m for f, m in out if isinstance(m, Request) and m.method == "ACK"]
    assert len(acks) == 1 and sorted(f.remote for f, _ in sent_byes) == sorted([B1, ALICE.remote])
    for flow, bye in sent_byes:
        answer = make_response(bye, 200)
        if flow.remote == B1:
            lab.from_backend(answer)
        else:
            lab.from_client(answer)
    assert lab.core.calls.stats["ack_timeout"] == 1
    lab.assert_clean()


def test_digest_challenge_passes_and_retry_keeps_the_core_call_id() -> None:
    lab = Lab()
    _, fwd = only(lab.from_client(invite()), Request)
    challenge = make_response(fwd, 407, to_tag="c1")  # type: ignore[arg-type]
    challenge.add("Proxy-Authenticate", 'Digest realm="example.com", nonce="n1"')
    out = lab.from_backend(challenge)
    [ack407] = [m for f, m in out if isinstance(m, Request) and f.remote == B1]
    assert ack407.method == "ACK"  # type: ignore[attr-defined]  # RFC 3261 17.1.1.3
    _, got = only([(f, m) for f, m in out if isinstance(m, Response)], Response)
    assert isinstance(got, Response) and got.status == 407
    assert got.get("proxy-authenticate") == 'Digest realm="example.com", nonce="n1"'
    # Alice ACKs the 407 (absorbed by her transaction) and retries with credentials.
    ack = sip(
        "ACK sip:bob@example.com SIP/2.0\n"
        "Via: SIP/2.0/UDP 10.0.0.7:5060;branch=z9hG4bK-inv1-1;rport\nMax-Forwards: 70\n"
        f'From: "Alice" <sip:alice@example.com>;tag=a1\nTo: {got.get("to")}\n'
        "Call-ID: call1@10.0.0.7\nCSeq: 1 ACK\nContent-Length: 0\n\n"
    )
    assert lab.from_client(ack) == []
    auth = 'Proxy-Authorization: Digest username="alice", realm="example.com", nonce="n1", uri="sip:bob@example.com", response="0123456789abcdef0123456789abcdef"\n'
    _, retry = only(lab.from_client(invite(cseq=2, extra=auth)), Request)
    assert isinstance(retry, Request) and str(retry.uri) == "sip:bob@example.com"
    assert retry.get("proxy-authorization") == auth.split(": ", 1)[1].strip()
    assert retry.call_id == fwd.call_id and retry.cseq is not None and retry.cseq.seq == 2
    assert retry.from_ is not None and fwd.from_ is not None and retry.from_.tag == fwd.from_.tag
    out = lab.from_backend(reply(retry, 486))
    _, busy = only([(f, m) for f, m in out if isinstance(m, Response)], Response)
    assert isinstance(busy, Response) and busy.status == 486
    assert [json.loads(r)["status"] for r in lab.records] == [407, 486]
    lab.assert_clean()


def test_cancel_before_answer_and_the_200_that_crosses_it() -> None:
    lab = Lab()
    _, fwd = only(lab.from_client(invite()), Request)
    only(lab.from_backend(reply(fwd, 180)), Response)
    cancel = invite().replace(b"INVITE sip:", b"CANCEL sip:").replace(b"1 INVITE", b"1 CANCEL")
    out = lab.from_client(cancel)
    statuses = sorted(m.status for _, m in out if isinstance(m, Response))
    assert statuses == [200, 487]  # RFC 3261 9.2
    [(to_core, c)] = [(f, m) for f, m in out if isinstance(m, Request)]
    assert isinstance(c, Request) and c.method == "CANCEL" and to_core.remote == B1
    assert c.via[0].branch == fwd.via[0].branch  # RFC 3261 9.1: matches the INVITE
    lab.from_backend(make_response(c, 200))
    # The race: the callee answered before the CANCEL reached it. ACK + BYE, alice sees nothing.
    out = lab.from_backend(reply(fwd, 200, sdp=ANSWER_SDP))
    assert sorted(m.method for _, m in out if isinstance(m, Request)) == ["ACK", "BYE"]
    assert all(f.remote == B1 for f, _ in out)
    [bye] = [m for _, m in out if isinstance(m, Request) and m.method == "BYE"]
    lab.from_backend(make_response(bye, 200))
    record = json.loads(lab.records[0])
    assert record["cause"] == "487 Request Terminated" and record["answer"] is None
    lab.assert_clean()


def test_cancel_waits_for_a_provisional_response() -> None:
    lab = Lab()
    _, fwd = only(lab.from_client(invite()), Request)
    cancel = invite().replace(b"INVITE sip:", b"CANCEL sip:").replace(b"1 INVITE", b"1 CANCEL")
    out = lab.from_client(cancel)
    assert all(isinstance(m, Response) for _, m in out)  # RFC 3261 9.1: no CANCEL yet
    _, c = only(lab.from_backend(reply(fwd, 183)), Request)
    assert isinstance(c, Request) and c.method == "CANCEL"
    lab.from_backend(make_response(c, 200))
    lab.from_backend(reply(fwd, 487))
    lab.assert_clean()


def test_forked_early_dialogs_and_the_losing_2xx() -> None:
    lab = Lab()
    _, fwd = only(lab.from_client(invite()), Request)
    _, e1 = only(lab.from_backend(reply(fwd, 183, "fork1", sdp=ANSWER_SDP)), Response)
    _, e2 = only(lab.from_backend(reply(fwd, 183, "fork2", sdp=ANSWER_SDP)), Response)
    assert isinstance(e1, Response) and isinstance(e2, Response)
    assert e1.to is not None and e2.to is not None and e1.to.tag != e2.to.tag  # two dialogs
    _, ok = only(lab.from_backend(reply(fwd, 200, "fork2", sdp=ANSWER_SDP)), Response)
    assert isinstance(ok, Response) and ok.to is not None and ok.to.tag == e2.to.tag
    # fork1 answers too late: ACKed and ended by the SBC (RFC 3261 13.2.2.4); alice sees none.
    out = lab.from_backend(reply(fwd, 200, "fork1", sdp=ANSWER_SDP))
    assert sorted(m.method for _, m in out if isinstance(m, Request)) == ["ACK", "BYE"]
    assert all(f.remote == B1 for f, _ in out)
    for _, m in out:
        if isinstance(m, Request) and m.method == "BYE":
            assert m.to is not None and m.to.tag == "fork1"
            lab.from_backend(make_response(m, 200))
    _, ack = only(lab.from_client(ack_for(ok)), Request)
    assert isinstance(ack, Request) and ack.to is not None and ack.to.tag == "fork2"
    alice_hangs_up(lab, ok, 2)
    lab.assert_clean()


def test_reinvite_hold_glare_and_update() -> None:
    lab = Lab()
    fwd, ok, got = establish(lab)
    hold = in_dialog("INVITE", got, 2, extra="Content-Type: application/sdp\n")
    hold = hold.replace(
        b"Content-Length: 0\r\n\r\n", f"Content-Length: {len(SDP)}\r\n\r\n{SDP}".encode()
    )
    _to_core, re = only(lab.from_client(hold), Request)
    assert isinstance(re, Request) and re.method == "INVITE" and b"m=audio" in re.body
    assert re.cseq is not None and fwd.cseq is not None and re.cseq.seq == fwd.cseq.seq + 1
    assert re.get("route") is not None and str(re.uri) == "sip:bob@10.1.0.50:5062"
    # Glare: the backend sends its own re-INVITE meanwhile; 491 (RFC 3261 14.2).
    theirs = backend_request("INVITE", fwd, ok, 7)
    _, glare = only(lab.from_backend(theirs), Response)
    assert isinstance(glare, Response) and glare.status == 491
    _, ok2 = only(lab.from_backend(reply(re, 200, sdp=ANSWER_SDP)), Response)
    assert isinstance(ok2, Response) and ok2.status == 200 and ok2.get("cseq") == "2 INVITE"
    _, ack = only(lab.from_client(ack_for(ok2, cseq=2)), Request)
    assert isinstance(ack, Request) and ack.cseq is not None and ack.cseq.seq == re.cseq.seq
    # UPDATE passes too (RFC 3311), in the next CSeq of each leg.
    _, upd = only(lab.from_client(in_dialog("UPDATE", got, 3)), Request)
    assert isinstance(upd, Request) and upd.method == "UPDATE" and upd.cseq is not None
    assert upd.cseq.seq == re.cseq.seq + 1
    _, upd_ok = only(lab.from_backend(reply(upd, 200)), Response)
    assert isinstance(upd_ok, Response) and upd_ok.status == 200
    # An out-of-order CSeq is refused (RFC 3261 12.2.2).
    _, bad = only(lab.from_client(in_dialog("INFO", got, 1)), Response)
    assert isinstance(bad, Response) and bad.status == 500
    alice_hangs_up(lab, got, 4)
    lab.assert_hidden()
    lab.assert_clean()


def test_prack_maps_rack_to_the_other_legs_invite() -> None:
    lab = Lab()
    _, fwd = only(lab.from_client(invite(cseq=10, extra="Supported: 100rel\n")), Request)
    assert isinstance(fwd, Request) and fwd.cseq is not None
    rel = reply(fwd, 183, sdp=ANSWER_SDP)
    rel.add("Require", "100rel")
    rel.add("RSeq", "1")
    _, got = only(lab.from_backend(rel), Response)
    assert isinstance(got, Response) and got.get("rseq") == "1" and got.get("require") == "100rel"
    prack = in_dialog("PRACK", got, 11, extra="RAck: 1 10 INVITE\n")
    _, fwd_prack = only(lab.from_client(prack), Request)
    assert isinstance(fwd_prack, Request) and fwd_prack.get("rack") == f"1 {fwd.cseq.seq} INVITE"
    _, prack_ok = only(lab.from_backend(reply(fwd_prack, 200)), Response)
    assert isinstance(prack_ok, Response) and prack_ok.get("cseq") == "11 PRACK"
    _, final = only(lab.from_backend(reply(fwd, 200, sdp=ANSWER_SDP)), Response)
    _, _ack = only(lab.from_client(ack_for(final, cseq=10)), Request)
    alice_hangs_up(lab, final, 12)
    lab.assert_clean()


def test_in_dialog_requests_pass_and_unknown_dialogs_get_481() -> None:
    lab = Lab()
    fwd, ok, got = establish(lab)
    for i, method in enumerate(["INFO", "OPTIONS", "REFER", "MESSAGE"], start=2):
        _, out = only(lab.from_client(in_dialog(method, got, i)), Request)
        assert isinstance(out, Request) and out.method == method and out.call_id == fwd.call_id
        _, back = only(lab.from_backend(reply(out, 202 if method == "REFER" else 200)), Response)
        assert isinstance(back, Response) and back.get("cseq") == f"{i} {method}"
    notify = backend_request("NOTIFY", fwd, ok, 20)
    notify.add("Event", "refer")
    notify.add("Subscription-State", "active")
    _, n = only(lab.from_backend(notify), Request)
    assert isinstance(n, Request) and n.method == "NOTIFY" and n.get("event") == "refer"
    lab.from_client(make_response(n, 200))
    stray = in_dialog("BYE", got, 9, n=2)
    _, nope = only(lab.from_client(stray), Response)
    assert isinstance(nope, Response) and nope.status == 481
    alice_hangs_up(lab, got, 10)
    lab.assert_clean()


def test_limits_no_answer_and_max_duration() -> None:
    lab = Lab(CallPolicy(max_calls_per_source=1, no_answer_timeout=30.0, max_duration=60.0))
    _, fwd = only(lab.from_client(invite(1)), Request)
    _, busy = only(lab.from_client(invite(2)), Response)
    assert isinstance(busy, Response) and busy.status == 503 and busy.get("retry-after") == "5"
    only(lab.from_backend(reply(fwd, 180)), Response)
    out = lab.run_until(lab.now + 31)
    assert 408 in [m.status for _, m in out if isinstance(m, Response)]
    [c] = {m.via[0].branch: m for _, m in out if isinstance(m, Request)}.values()
    assert c.method == "CANCEL"  # type: ignore[attr-defined]
    lab.from_backend(make_response(c, 200))  # type: ignore[arg-type]
    lab.from_backend(reply(fwd, 487))
    # The next call is admitted, answered, and ended by the SBC at max_duration.
    _fwd3, _, _got3 = establish(lab, n=3)
    out = lab.run_until(lab.now + 61)
    sent_byes = byes(out)
    assert sorted(f.remote for f, _ in sent_byes) == sorted([B1, ALICE.remote])
    for flow, bye in sent_byes:
        (lab.from_backend if flow.remote == B1 else lab.from_client)(make_response(bye, 200))  # type: ignore[operator]
    lab.assert_clean()


def test_session_timer_expiry_ends_the_call() -> None:
    lab = Lab()
    _, fwd = only(
        lab.from_client(invite(extra="Supported: timer\nSession-Expires: 120\n")), Request
    )
    assert isinstance(fwd, Request) and fwd.get("session-expires") == "120"
    ok = reply(fwd, 200, sdp=ANSWER_SDP)
    ok.add("Session-Expires", "120;refresher=uac")
    ok.add("Require", "timer")
    _, got = only(lab.from_backend(ok), Response)
    assert isinstance(got, Response) and got.get("session-expires") == "120;refresher=uac"
    lab.from_client(ack_for(got))
    out = lab.run_until(lab.now + 100)  # no refresh: ended before the interval runs out
    sent_byes = byes(out)
    assert len(sent_byes) == 2
    for flow, bye in sent_byes:
        (lab.from_backend if flow.remote == B1 else lab.from_client)(make_response(bye, 200))  # type: ignore[operator]
    assert lab.core.calls.stats["calls_session_expired"] == 1
    lab.assert_clean()


def test_call_from_the_backend_reaches_the_registered_client_over_its_flow() -> None:
    lab = Lab()
    register = sip(
        "REGISTER sip:example.com SIP/2.0\n"
        "Via: SIP/2.0/UDP 10.0.0.7:5060;branch=z9hG4bK-r1;rport\nMax-Forwards: 70\n"
        "From: <sip:alice@example.com>;tag=r1\nTo: <sip:alice@example.com>\n"
        "Call-ID: reg1@10.0.0.7\nCSeq: 1 REGISTER\nContact: <sip:alice@10.0.0.7:5060>\n"
        "Expires: 3600\nContent-Length: 0\n\n"
    )
    _, fwd = only(lab.from_client(register), Request)
    assert isinstance(fwd, Request)
    path = fwd.get("path")
    ok = make_response(fwd, 200, to_tag="reg")
    ok.add("Contact", "<sip:alice@10.0.0.7:5060>;expires=3600")
    lab.from_backend(ok)
    # Kamailio's lookup(): R-URI = the contact, Route = the Path, its Via and Record-Route.
    inv = Request("INVITE", "sip:alice@10.0.0.7:5060")
    inv.add("Via", "SIP/2.0/UDP 10.1.0.10:5070;branch=z9hG4bK-kam1")
    inv.add("Via", "SIP/2.0/UDP 10.1.0.77:5060;branch=z9hG4bK-caller1")
    inv.add("Record-Route", "<sip:10.1.0.10:5070;lr>")
    inv.add("Route", path or "")
    inv.add("Max-Forwards", "69")
    inv.add("From", "<sip:carol@example.com>;tag=c1")
    inv.add("To", "<sip:alice@example.com>")
    inv.add("Call-ID", "core-call-1@backend.core.internal")
    inv.add("CSeq", "1 INVITE")
    inv.add("Contact", "<sip:carol@10.1.0.77:5060>")
    inv.set_body(ANSWER_SDP.encode(), "application/sdp")
    to_alice, got = only(lab.from_backend(inv), Request)
    assert to_alice == ALICE and isinstance(got, Request)
    assert str(got.uri) == "sip:alice@10.0.0.7:5060" and len(got.via) == 1 and "route" not in got
    assert got.call_id != inv.call_id and "record-route" not in got
    ring = make_response(got, 180, to_tag="alice-t")
    ring.add("Contact", "<sip:alice@10.0.0.7:5060>")
    to_core, r = only(lab.from_client(ring), Response)
    assert to_core.remote == B1 and isinstance(r, Response) and r.status == 180
    assert len(r.via) == 2 and r.call_id == inv.call_id
    answer = make_response(got, 200, to_tag="alice-t")
    answer.add("Contact", "<sip:alice@10.0.0.7:5060>")
    answer.set_body(SDP.encode(), "application/sdp")
    _, r = only(lab.from_client(answer), Response)
    assert isinstance(r, Response) and r.contact[0].sip_uri is not None
    assert r.contact[0].sip_uri.host == CORE[0]
    # Carol's ACK arrives through the backend (its Record-Route) and reaches alice.
    ack = Request("ACK", r.contact[0].uri_text or "")
    ack.add("Via", "SIP/2.0/UDP 10.1.0.10:5070;branch=z9hG4bK-kamack")
    ack.add("Max-Forwards", "69")
    ack.add("From", "<sip:carol@example.com>;tag=c1")
    ack.add("To", r.get("to") or "")
    ack.add("Call-ID", inv.call_id or "")
    ack.add("CSeq", "1 ACK")
    ack.add("Content-Length", "0")
    to_alice, a = only(lab.from_backend(ack), Request)
    assert to_alice == ALICE and isinstance(a, Request) and a.method == "ACK"
    # Alice hangs up: her BYE reaches the backend along the route set.
    bye = Request("BYE", "sip:" + (got.contact[0].uri_text or "").split(":", 1)[1])
    bye.add("Via", "SIP/2.0/UDP 10.0.0.7:5060;branch=z9hG4bK-abye;rport")
    bye.add("Max-Forwards", "70")
    bye.add("From", got.get("to") + ";tag=alice-t")  # type: ignore[operator]
    bye.add("To", got.get("from") or "")
    bye.add("Call-ID", got.call_id or "")
    bye.add("CSeq", "1 BYE")
    bye.add("Content-Length", "0")
    out = lab.from_client(bye)
    assert [m.status for _, m in out if isinstance(m, Response)] == [200]
    to_core, b = only([(f, m) for f, m in out if isinstance(m, Request)], Request)
    assert isinstance(b, Request) and b.get("route") == "<sip:10.1.0.10:5070;lr>"
    assert str(b.uri) == "sip:carol@10.1.0.77:5060"
    lab.from_backend(make_response(b, 200))
    lab.assert_hidden()
    lab.assert_clean()


def test_invite_fails_over_when_the_backend_is_silent() -> None:
    """No answer at all within request_timeout (4 s) from the
    AOR's backend: the INVITE goes to the next backend, with the same ids."""
    b2 = ("10.1.0.11", 5070)
    lab = Lab(backends=(B1, b2))
    first_flow, first = only(lab.from_client(invite()), Request)
    out = lab.run_until(lab.now + 4.5)
    resent = [(f, m) for f, m in out if isinstance(m, Request) and m.method == "INVITE"]
    other = {m.via[0].branch: (f, m) for f, m in resent if f.remote != first_flow.remote}
    assert len(other) == 1, resent  # one new transaction (and its timer A retransmissions)
    [(flow, fwd)] = other.values()
    assert isinstance(fwd, Request) and isinstance(first, Request)
    assert fwd.call_id == first.call_id and fwd.via[0].branch != first.via[0].branch
    ok = reply(fwd, 200, sdp=ANSWER_SDP)
    lab.tick()
    answered = lab._sent(lab.core.receive_datagram(bytes(ok), flow, lab.now))
    _, got = only(answered, Response)
    assert isinstance(got, Response) and got.status == 200
    assert lab.core.calls.stats["failover"] == 1
    record_backend = flow.remote
    _, _ack = only(lab.from_client(ack_for(got)), Request)
    alice_hangs_up(lab, got, 2)
    [record] = [json.loads(r) for r in lab.records]
    assert record["backend"] == ("sip:b2" if record_backend == b2 else "sip:b1")
    lab.assert_clean()


def test_calls_for_a_peer_domain_or_prefix_go_to_the_peer_over_tls() -> None:
    peer = PeerRoute(
        name="partner", host="198.51.100.20", port=5061, domains=frozenset({"partner.example"}),
        prefixes=("+4930",),
    )  # fmt: skip
    lab = Lab(peers=(peer,))
    call = invite().replace(b"sip:bob@example.com SIP", b"sip:bob@partner.example SIP")
    flow, fwd = only(lab.from_client(call), Request)
    assert flow.transport == "tls" and flow.remote == ("198.51.100.20", 5061)
    assert flow.local == CORE_TLS and flow.conn_id == 0  # the I/O layer connects
    assert isinstance(fwd, Request) and str(fwd.uri) == "sip:bob@partner.example"
    assert fwd.via[0].transport == "TLS" and fwd.contact[0].uri_text.endswith(";transport=tls")
    number = invite(2).replace(b"sip:bob@example.com SIP", b"sip:+493012345@example.com SIP")
    flow2, _ = only(lab.from_client(number), Request)
    assert flow2.remote == ("198.51.100.20", 5061)
    # Towards a peer the core's topology is hidden as towards a client.
    ok = reply(fwd, 200, sdp=ANSWER_SDP)
    _, got = only(lab._sent(lab.core.receive_datagram(bytes(ok), FROM_B1, lab.now)), Response)
    # (answered from the wrong flow on purpose: responses match by branch, not by flow)
    assert isinstance(got, Response) and got.status == 200
    # A call from the peer is routed like a client's: to the backend.
    from_peer = Flow("tls", CORE_TLS, ("198.51.100.20", 40001), conn_id=9)
    flow3, fwd3 = only(lab.from_client(invite(3), from_peer), Request)
    assert flow3.remote == B1 and isinstance(fwd3, Request)
    _, warned = only(lab.from_backend(reply(fwd3, 180)), Response)
    assert "warning" not in warned and "record-route" not in warned


def test_random_call_traffic_never_crashes_and_leaves_nothing_behind() -> None:
    """Seeded random traffic on both sides (new calls, answers with random statuses and
    tags, ACK, BYE, re-INVITE, CANCEL, mutated copies of all of them, time passing): the
    core never raises, and once the calls' limits and timers have run out no call, dialog or
    transaction state is left."""
    import random

    rng = random.Random(3261)
    # The backend answers at random: it is never failed over or taken down for it.
    lab = Lab(
        CallPolicy(max_duration=120.0, no_answer_timeout=60.0),
        request_timeout=1000.0,
        failures=1_000_000,
    )
    to_backend: list[Request] = []  # requests the backend received
    to_client: list[Response] = []  # responses alice received
    history: list[bytes] = []
    for step in range(3000):
        op = rng.random()
        out: list[tuple[Flow, Message]] = []
        if op < 0.15 or not to_backend:
            n = rng.randrange(40)
            data = invite(n, cseq=rng.randint(1, 3), branch=f"-{step}")
            out = lab.from_client(data)
            history.append(data)
        elif op < 0.45:
            req = rng.choice(to_backend)
            status = rng.choice([100, 180, 183, 200, 200, 202, 401, 486, 487, 491, 500, 503])
            tag = rng.choice(["t1", "t2", "t3"])
            resp = reply(req, status, tag, sdp=ANSWER_SDP if status in (183, 200) else "")
            out = lab.from_backend(resp)
            history.append(bytes(resp))
        elif op < 0.7 and to_client:
            resp = rng.choice(to_client)
            cseq = resp.cseq.seq if resp.cseq is not None else 1
            n = int((resp.call_id or "call0@").split("@")[0][4:] or 0)
            kind = rng.choice(["ACK", "BYE", "INVITE", "UPDATE", "INFO", "CANCEL"])
            if kind == "ACK":
                data = ack_for(resp, cseq=cseq, n=n)
            elif kind == "CANCEL":
                data = invite(n).replace(b"INVITE sip:", b"CANCEL sip:")
                data = data.replace(b"1 INVITE", b"1 CANCEL")
            else:
                data = in_dialog(kind, resp, cseq + rng.randint(0, 2), n=n)
            out = lab.from_client(data)
            history.append(data)
        elif op < 0.85 and history:
            data = bytearray(rng.choice(history))
            for _ in range(rng.randint(1, 4)):
                pos = rng.randrange(len(data))
                data[pos : pos + rng.randint(0, 3)] = rng.choice(
                    [b"", b";", b",", b"<", b"\r\n", b" ", b"0", b"tag=x"]
                )
            if rng.random() < 0.5:
                out = lab.from_client(bytes(data))
            else:
                lab.tick()
                out = lab._sent(lab.core.receive_datagram(bytes(data), FROM_B1, lab.now))
        else:
            out = lab.run_until(lab.now + rng.choice([0.1, 0.6, 2.0, 5.0, 40.0]))
        for flow, msg in out:
            if flow.remote == B1 and isinstance(msg, Request) and msg.method != "ACK":
                to_backend.append(msg)
            elif flow == ALICE and isinstance(msg, Response) and "contact" in msg:
                to_client.append(msg)
                cseq = msg.cseq
                invite_ok = msg.status == 200 and cseq is not None and cseq.method == "INVITE"
                if invite_ok and cseq is not None and rng.random() < 0.7:  # most ACK at once
                    n = int((msg.call_id or "call0@").split("@")[0][4:] or 0)
                    lab.from_client(ack_for(msg, cseq=cseq.seq, n=n))
        del to_backend[:-50], to_client[:-50], history[:-50]
        assert step >= 0
    stats = lab.core.calls.stats
    assert stats["calls_started"] > 300 and stats["ack_relayed"] > 20, stats
    assert stats["in_dialog:BYE"] >= 1 and stats["in_dialog:INVITE"] >= 2, stats
    # Everything ends: max_duration BYEs, their timeouts, timers B/H/J ...
    lab.run_until(lab.now + 300)
    lab.assert_clean()


def test_total_call_limit_counts_every_source() -> None:
    lab = Lab(CallPolicy(max_calls=1))
    _, fwd = only(lab.from_client(invite(1)), Request)
    other = Flow("udp", ACCESS, ("198.51.100.9", 5062))
    _, busy = only(lab.from_client(invite(2), other), Response)
    assert isinstance(busy, Response) and (busy.status, busy.reason) == (503, "Too Many Calls")
    assert lab.core.calls.active_calls == 1
    out = lab.from_backend(reply(fwd, 486))
    assert [m.status for _, m in out if isinstance(m, Response)] == [486]
    assert lab.core.calls.active_calls == 0
    _, fwd3 = only(lab.from_client(invite(3), other), Request)  # admitted again
    lab.from_backend(reply(fwd3, 486))
    lab.assert_clean()


def test_clients_are_told_the_public_address() -> None:
    """[sbc] public_address (e.g. the SBC behind a 1:1 NAT, or listening on 0.0.0.0) is the
    host of every Contact and Via the SBC puts towards clients; the core side keeps its own."""
    lab = Lab(public_address="sbc.example.net")
    _, fwd = only(lab.from_client(invite()), Request)
    assert isinstance(fwd, Request) and fwd.via[0].host == CORE[0]
    _, ok = only(lab.from_backend(reply(fwd, 200, sdp=ANSWER_SDP)), Response)
    assert isinstance(ok, Response)
    assert ok.contact[0].uri_text.endswith("@sbc.example.net:5060")  # type: ignore[union-attr]
    lab.from_client(ack_for(ok))
    bye = backend_request("BYE", fwd, reply(fwd, 200), 3)
    out = lab.from_backend(bye)
    _, to_alice = only([(f, m) for f, m in out if isinstance(m, Request)], Request)
    assert isinstance(to_alice, Request) and to_alice.via[0].host == "sbc.example.net"
    lab.from_client(make_response(to_alice, 200))
    lab.assert_clean()


def test_client_address_header_only_when_configured_and_never_from_clients() -> None:
    lab = Lab(CallPolicy(client_address_header="X-Client-Address"))
    spoofed = invite(extra="X-Client-Address: 6.6.6.6:1\n")
    _, fwd = only(lab.from_client(spoofed), Request)
    assert isinstance(fwd, Request)
    assert fwd.values("x-client-address") == ["192.0.2.7:40000;transport=udp"]
    lab.from_backend(reply(fwd, 486))
    lab.assert_clean()


def subscribe(cseq: int, to_tag: str = "", expires: int = 600) -> bytes:
    to = "<sip:alice@example.com>" + (f";tag={to_tag}" if to_tag else "")
    return sip(
        "SUBSCRIBE sip:alice@example.com SIP/2.0\n"
        f"Via: SIP/2.0/UDP 10.0.0.7:5060;branch=z9hG4bK-sub{cseq};rport\n"
        "Max-Forwards: 70\n"
        "From: <sip:alice@example.com>;tag=s1\n"
        f"To: {to}\n"
        "Call-ID: sub1@10.0.0.7\n"
        f"CSeq: {cseq} SUBSCRIBE\n"
        "Contact: <sip:alice@10.0.0.7:5060>\n"
        "Event: message-summary\n"
        f"Expires: {expires}\n"
        "Content-Length: 0\n\n"
    )


def test_mwi_subscription_with_an_early_notify_refresh_and_termination() -> None:
    lab = Lab()
    _, fwd = only(lab.from_client(subscribe(1)), Request)
    assert isinstance(fwd, Request) and fwd.method == "SUBSCRIBE" and fwd.get("event")
    # RFC 6665 4.1.2.4: the NOTIFY may come before the 200; it creates the dialog.
    notify = Request("NOTIFY", fwd.contact[0].uri_text or "")
    notify.add("Via", "SIP/2.0/UDP 10.1.0.10:5070;branch=z9hG4bK-n1")
    notify.add("Max-Forwards", "70")
    notify.add("From", "<sip:alice@example.com>;tag=vm1")
    notify.add("To", fwd.get("from") or "")
    notify.add("Call-ID", fwd.call_id or "")
    notify.add("CSeq", "1 NOTIFY")
    notify.add("Contact", "<sip:vm@10.1.0.60:5060>")
    notify.add("Event", "message-summary")
    notify.add("Subscription-State", "active;expires=600")
    notify.set_body(b"Messages-Waiting: yes\r\n", "application/simple-message-summary")
    _, n = only(lab.from_backend(notify), Request)
    assert isinstance(n, Request) and n.method == "NOTIFY" and n.call_id == "sub1@10.0.0.7"
    assert n.body == b"Messages-Waiting: yes\r\n" and str(n.uri) == "sip:alice@10.0.0.7:5060"
    _, n_ok = only(lab.from_client(make_response(n, 200)), Response)
    assert isinstance(n_ok, Response) and n_ok.status == 200
    ok = make_response(fwd, 200, to_tag="vm1")
    ok.add("Contact", "<sip:vm@10.1.0.60:5060>")
    ok.add("Expires", "600")
    _, got = only(lab.from_backend(ok), Response)
    assert isinstance(got, Response) and got.status == 200 and got.to is not None
    assert got.to.tag == n.from_.tag  # type: ignore[union-attr]  # one dialog
    # A refresh within the dialog, 500 s later: it keeps the subscription past 632 s.
    lab.run_until(lab.now + 500)
    _, refresh = only(lab.from_client(subscribe(2, to_tag=got.to.tag or "")), Request)
    assert isinstance(refresh, Request) and refresh.to is not None and refresh.to.tag == "vm1"
    ok2 = make_response(refresh, 200)
    ok2.add("Expires", "600")
    lab.from_backend(ok2)
    lab.run_until(lab.now + 400)
    assert len(lab.core.calls.calls) == 1
    # The notifier ends it: NOTIFY terminated, then nothing is left.
    notify.set("CSeq", "2 NOTIFY")
    notify.set("Via", "SIP/2.0/UDP 10.1.0.10:5070;branch=z9hG4bK-n2")
    notify.set("To", refresh.get("from") or "")
    notify.set("Subscription-State", "terminated;reason=timeout")
    _, last = only(lab.from_backend(notify), Request)
    lab.from_client(make_response(last, 200))
    assert len(lab.core.calls.calls) == 0
    lab.assert_clean()


def test_replaces_names_the_dialog_by_the_far_legs_ids() -> None:
    """Attended transfer (RFC 3891): alice talks to the backend's user; bob's INVITE with
    Replaces names that call by alice's ids (to-tag = the callee's tag as alice knows it);
    the backend gets the core leg's ids (to-tag = the callee's own tag, b-tag)."""
    lab = Lab()
    fwd, _ok, got = establish(lab)
    assert got.to is not None and fwd.from_ is not None
    replaces = f"Replaces: call1@10.0.0.7;to-tag={got.to.tag};from-tag=a1\n"
    bob = Flow("udp", ACCESS, ("198.51.100.3", 5062))
    _, inv = only(lab.from_client(invite(7, extra=replaces), bob), Request)
    assert isinstance(inv, Request)
    assert inv.get("replaces") == f"{fwd.call_id};to-tag=b-tag;from-tag={fwd.from_.tag}"
    assert lab.core.calls.stats["replaces_mapped"] == 1
    unknown = "Replaces: nope@x;to-tag=1;from-tag=2;early-only\n"
    _, inv2 = only(lab.from_client(invite(8, extra=unknown), bob), Request)
    assert isinstance(inv2, Request) and inv2.get("replaces") == unknown[10:].strip()


def test_forked_branches_from_the_backend_get_their_own_call_ids() -> None:
    """Kamailio forks one INVITE to two contacts (same Call-ID and From tag, two branches):
    each access leg is a request of its own with its own Call-ID and From tag (RFC 3261
    8.1.1.4), so one UA reached twice does not see a merged request (8.2.2.2)."""
    lab = Lab()
    flows = [ALICE, Flow("udp", ACCESS, ("192.0.2.8", 40002))]
    paths = []
    for i, flow in enumerate(flows):
        register = sip(
            "REGISTER sip:example.com SIP/2.0\n"
            f"Via: SIP/2.0/UDP 10.0.0.{7 + i}:5060;branch=z9hG4bK-rf{i};rport\n"
            "Max-Forwards: 70\nFrom: <sip:alice@example.com>;tag=r1\n"
            f"To: <sip:alice@example.com>\nCall-ID: regf{i}@x\nCSeq: 1 REGISTER\n"
            f"Contact: <sip:alice@10.0.0.{7 + i}:5060>\nExpires: 3600\nContent-Length: 0\n\n"
        )
        _, fwd = only(lab.from_client(register, flow), Request)
        assert isinstance(fwd, Request)
        paths.append(fwd.get("path") or "")
        ok = make_response(fwd, 200, to_tag="reg")
        ok.add("Contact", f"<sip:alice@10.0.0.{7 + i}:5060>;expires=3600")
        lab.from_backend(ok)
    got = []
    for i, path in enumerate(paths):
        inv = Request("INVITE", f"sip:alice@10.0.0.{7 + i}:5060")
        inv.add("Via", f"SIP/2.0/UDP 10.1.0.10:5070;branch=z9hG4bK-fork{i}")
        inv.add("Route", path)
        inv.add("Max-Forwards", "69")
        inv.add("From", "<sip:carol@example.com>;tag=c1")
        inv.add("To", "<sip:alice@example.com>")
        inv.add("Call-ID", "forked@core")
        inv.add("CSeq", "1 INVITE")
        inv.add("Contact", "<sip:carol@10.1.0.77:5060>")
        inv.set_body(ANSWER_SDP.encode(), "application/sdp")
        flow, out = only(lab.from_backend(inv), Request)
        assert flow == flows[i] and isinstance(out, Request)
        got.append(out)
    assert got[0].call_id != got[1].call_id
    assert got[0].from_ is not None and got[1].from_ is not None
    assert got[0].from_.tag != got[1].from_.tag


def test_strip_list_removes_headers_both_ways() -> None:
    lab = Lab(CallPolicy(strip_headers=("p-*", "x-custom")))
    _, fwd = only(lab.from_client(invite()), Request)
    assert isinstance(fwd, Request) and "x-custom" not in fwd and "user-agent" in fwd
    _, ring = only(lab.from_backend(reply(fwd, 180)), Response)
    assert isinstance(ring, Response) and "p-charging-vector" not in ring
    lab.from_backend(reply(fwd, 486))
    lab.assert_clean()
    # Without a strip list both pass (unknown headers pass through by default).
    lab = Lab()
    _, fwd = only(lab.from_client(invite()), Request)
    _, ring = only(lab.from_backend(reply(fwd, 180)), Response)
    assert fwd.get("x-custom") == "kept" and ring.get("p-charging-vector") == "icid-value=1"


def test_an_ended_call_is_freed_without_the_cyclic_collector() -> None:
    """64*T1 after a call ends its reference cycles are broken: with the cyclic garbage
    collector off, the Call object is freed by reference counting alone. (Found among the
    objects the collector tracks, not by a weak reference: a compiled Call has none.)"""
    import gc

    from sbc.calls import Call

    def calls_alive() -> list[object]:
        return [o for o in gc.get_objects() if type(o) is Call]

    lab = Lab()
    lab.seen = []  # the test's own record of messages holds no call objects
    gc.collect()
    gc.disable()
    try:
        assert not calls_alive()
        _, _ok, got = establish(lab)
        assert len(calls_alive()) == 1
        alice_hangs_up(lab, got, 2)
        lab.run_until(lab.now + 40)
        assert not lab.core.calls.calls
        alive = calls_alive()
        assert not alive, gc.get_referrers(*alive)
    finally:
        gc.enable()


def test_a_lost_client_connection_ends_its_calls_and_an_active_one_is_not_idle_closed() -> None:
    """A TCP client's call; the connection is kept past the idle timeout
    while the call lives (the SBC cannot open one back to a client behind NAT), and when it
    is lost the other leg gets BYE at once."""
    from sbc.actions import Close

    lab = Lab()
    lab.core.settings = dataclasses.replace(lab.core.settings, tcp_idle_timeout=30.0)
    tcp = Flow("tcp", ACCESS, ("192.0.2.7", 40010), conn_id=5)
    _, fwd = only(lab._sent(lab.core.receive_stream(invite(extra=""), tcp, lab.now)), Request)
    assert isinstance(fwd, Request)
    ok = reply(fwd, 200, sdp=ANSWER_SDP)
    lab.tick()
    [(to, got)] = lab._sent(lab.core.receive_datagram(bytes(ok), FROM_B1, lab.now))
    assert to == tcp and isinstance(got, Response)
    lab.core.receive_stream(ack_for(got), tcp, lab.now)
    # 100 s of silence on the connection: not closed, a call uses it.
    out = lab.core.handle_timer(lab.now + 100)
    assert not any(isinstance(a, Close) for a in out)
    actions = lab.core.connection_lost(tcp, lab.now + 101)
    [(flow, bye)] = lab._sent(actions)
    assert flow.remote == B1 and isinstance(bye, Request) and bye.method == "BYE"
    assert bye.get("reason") == 'SIP;cause=480;text="flow failed"'
    assert not lab.core.calls.calls
    lab.now += 101
    lab.core.receive_datagram(bytes(make_response(bye, 200)), FROM_B1, lab.now)
    lab.assert_clean()


def test_cancel_of_a_reinvite() -> None:
    """RFC 3261 9.2 within a dialog: alice CANCELs her re-INVITE; she gets 200 and 487, the
    re-INVITE on the core leg is CANCELed, and the call goes on."""
    lab = Lab()
    _, _ok, got = establish(lab)
    reinvite = in_dialog("INVITE", got, 2)
    _, re = only(lab.from_client(reinvite), Request)
    assert isinstance(re, Request) and re.method == "INVITE"
    lab.from_backend(reply(re, 180))
    cancel = reinvite.replace(b"INVITE sip:", b"CANCEL sip:").replace(b"2 INVITE", b"2 CANCEL")
    out = lab.from_client(cancel)
    assert sorted(m.status for _, m in out if isinstance(m, Response)) == [200, 487]
    [(to_core, c)] = [(f, m) for f, m in out if isinstance(m, Request)]
    assert to_core.remote == B1 and c.method == "CANCEL"  # type: ignore[attr-defined]
    assert c.via[0].branch == re.via[0].branch
    lab.from_backend(make_response(c, 200))  # type: ignore[arg-type]
    assert [m.method for _, m in lab.from_backend(reply(re, 487))] == ["ACK"]  # type: ignore[union-attr]
    assert len(lab.core.calls.calls) == 1  # the call itself goes on
    alice_hangs_up(lab, got, 3)
    lab.assert_clean()


def media_lab(access_srtp: str = "optional", *, worker_answers: bool = True) -> Lab:
    return Lab(media=media_policy(access_srtp), worker_answers=worker_answers)


def test_sdp_is_anchored_on_both_legs_and_the_relay_follows_the_call() -> None:
    """Each side's SDP names only the SBC's side; the
    worker gets the session, its changes, and its end."""
    lab = media_lab(worker_answers=False)
    _, fwd = only(lab.from_client(invite()), Request)
    assert isinstance(fwd, Request)
    body = fwd.body.decode()
    assert "10.0.0.7" not in body and f"c=IN IP4 {CORE[0]}" in body
    [call_id] = lab.core.calls.calls
    early = reply(fwd, 183, sdp=ANSWER_SDP)
    _, got = only(lab.from_backend(early), Response)
    assert isinstance(got, Response) and got.status == 183
    assert f"c=IN IP4 {ACCESS[0]}" in got.body.decode() and b"10.1.0.50" not in got.body
    # The callee answers from another address than the early media came from.
    ok = reply(fwd, 200, sdp=ANSWER_SDP.replace("10.1.0.50", "10.1.0.51"))
    _, got = only(lab.from_backend(ok), Response)
    assert isinstance(got, Response) and b"10.1.0.51" not in got.body
    lab.from_client(ack_for(got))
    updates = [c for _, c in lab.media_commands if isinstance(c, Update)]
    assert [u.streams[0].b.remote for u in updates] == [
        None, ("10.1.0.50", 5000), ("10.1.0.51", 5000),
    ]  # fmt: skip
    assert all(u.session == call_id for u in updates)
    assert updates[0].streams[0].a.remote == ("10.0.0.7", 4000)

    # A re-INVITE the relay cannot take (SRTP with no suite it supports): 488, and the
    # call goes on as it was.
    srtp = SDP.replace("RTP/AVP", "RTP/SAVP") + (
        "a=crypto:1 F8_128_HMAC_SHA1_80 inline:PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR\r\n"
    )
    extra = "Contact: <sip:alice@10.0.0.7:5060>\nContent-Type: application/sdp\n"
    reinvite = (
        in_dialog("INVITE", got, 2, extra=extra).replace(
            b"Content-Length: 0\r\n\r\n", f"Content-Length: {len(srtp)}\r\n\r\n".encode()
        )
        + srtp.encode()
    )
    out = lab.from_client(reinvite)
    [refused] = [m for _, m in out if isinstance(m, Response) and m.status != 100]
    assert isinstance(refused, Response) and refused.status == 488
    assert refused.reason == "No Usable Crypto: unsupported crypto suite F8_128_HMAC_SHA1_80"
    assert [c for _, c in lab.media_commands][-1] == updates[-1]  # the state before it
    assert lab.core.calls.calls[call_id].state == "confirmed"

    # The relay's statistics, once the call is over, go into its record.
    alice_hangs_up(lab, got, 3)
    assert (0, Delete(session=call_id)) in lab.media_commands
    assert lab.records == []  # waiting for the worker's statistics
    stats = Stats(
        session=call_id,
        streams=(StreamStats(index=0, a=PartyStats(packets_in=50), b=PartyStats(packets_in=49)),),
    )
    lab._sent(lab.core.media_event(stats, lab.now))
    [record] = [json.loads(r) for r in lab.records]
    assert record["media"][0]["caller"]["packets_in"] == 50
    assert record["media"][0]["callee"]["packets_in"] == 49
    lab.assert_hidden()
    lab.assert_clean()


def test_an_offer_against_the_media_policy_gets_488_and_nothing_reaches_the_core() -> None:
    lab = media_lab(access_srtp="mandatory")
    out = lab.from_client(invite())
    [(flow, resp)] = [(f, m) for f, m in out if isinstance(m, Response) and m.status != 100]
    assert flow == ALICE and isinstance(resp, Response)
    assert (resp.status, resp.reason) == (488, "SRTP Required")
    assert not [m for f, m in out if f.remote == B1]
    [record] = [json.loads(r) for r in lab.records] or [None]
    assert record is None  # refused before a call existed
    lab.assert_clean()


def test_no_media_ends_the_call_with_bye_on_both_legs_and_stats_may_never_come() -> None:
    lab = media_lab(worker_answers=False)
    establish(lab)
    [call_id] = lab.core.calls.calls
    out = lab._sent(lab.core.media_event(Timeout(session=call_id, idle=60.0), lab.now))
    assert sorted(f.remote for f, _ in byes(out)) == sorted([ALICE.remote, B1])
    assert all((m.get("reason") or "").startswith("SIP;cause=408") for _, m in byes(out))
    lab.run_until(lab.now + 3.0)  # no statistics from the worker: written without them
    [record] = [json.loads(r) for r in lab.records]
    assert record["cause"] == "media timeout" and record["media"] is None
    lab.assert_clean()
