"""DTMF interworking: RFC 4733 telephone-events on one leg, SIP INFO
(application/dtmf-relay) on the other. The wire messages, the INFO bodies, the same-codec
transcoder, detection of events, the relay's own events, the codec policy and the B2BUA."""

from __future__ import annotations

import struct

import pytest
from test_b2bua import B1, Lab, ack_for, alice_hangs_up, in_dialog, invite, only, reply
from test_codec_policy import Harness, offer_sdp, policy
from test_media_relay import PA, PB, A, B, key, party, update

from sbc.media import dtmf
from sbc.media.control import (
    CodecSpec,
    Dtmf,
    SendDtmf,
    Update,
    decode,
    encode,
)
from sbc.media.relay import DTMF_INTERVAL, Burst, RelayEngine
from sbc.media.srtp import SrtpReceiver
from sbc.media.transcode import Transcoder, parse_rtp
from sbc.sip.message import Request, Response, make_response

PCMU = CodecSpec(name="PCMU", pt=0, clock=8000)
PCMU_TE = CodecSpec(name="PCMU", pt=0, clock=8000, dtmf_pt=101)


def rtp(
    pt: int, seq: int, ts: int, payload: bytes, *, m: bool = False, ssrc: int = 0x1111
) -> bytes:
    return struct.pack("!BBHII", 0x80, (0x80 if m else 0) | pt, seq & 0xFFFF, ts, ssrc) + payload


def event(code: int, duration: int, end: bool = False) -> bytes:
    return bytes([code, (0x80 if end else 0) | 10]) + duration.to_bytes(2, "big")


# -- the control wire ------------------------------------------------------------------------


def test_control_messages_round_trip() -> None:
    for msg in (
        Dtmf(session="s1", index=0, party="a", digit="5", duration_ms=160),
        SendDtmf(session="s1", index=1, party="b", digit="#", duration_ms=250),
    ):
        frame = encode(msg)
        assert int.from_bytes(frame[:4], "big") == len(frame) - 4
        assert decode(frame) == msg
    with pytest.raises(ValueError):
        decode(encode(Dtmf(session="s", index=0, party="c", digit="1", duration_ms=1)))


# -- INFO bodies -----------------------------------------------------------------------------


def test_info_bodies() -> None:
    assert dtmf.parse("application/dtmf-relay", b"Signal=5\r\nDuration=160\r\n") == ("5", 160)
    assert dtmf.parse("Application/DTMF-Relay; x=y", b"signal = *\nduration= 90") == ("*", 90)
    assert dtmf.parse("application/dtmf-relay", b"Signal=11\r\n") == ("#", dtmf.DEFAULT_MS)
    assert dtmf.parse("application/dtmf-relay", b"Signal=d\r\nDuration=99999\r\n") == (
        "D",
        dtmf.MAX_MS,
    )
    assert dtmf.parse("application/dtmf-relay", b"Signal=!\r\n")[0] == "16"  # type: ignore[index]
    assert dtmf.parse("application/dtmf", b"7\r\n") == ("7", dtmf.DEFAULT_MS)
    assert dtmf.parse("application/dtmf-relay", b"Signal=X\r\n") is None
    assert dtmf.parse("application/dtmf-relay", b"\xff") is None
    assert dtmf.parse("application/sdp", b"Signal=5") is None
    assert dtmf.body("5", 160) == b"Signal=5\r\nDuration=160\r\n"
    assert dtmf.is_dtmf("application/dtmf") and not dtmf.is_dtmf(None)


# -- the transcoder --------------------------------------------------------------------------


def test_same_codec_copies_the_payload_under_the_sbcs_header() -> None:
    t = Transcoder(PCMU_TE, PCMU)
    assert t.copy
    payloads = [bytes([i]) * 160 for i in range(4)]
    out = []
    for i, p in enumerate(payloads[:3]):
        out += [parse_rtp(x) for x in t.push(rtp(0, 7 + i, 5000 + 160 * i, p, m=i == 0), i * 0.02)]
    # a lost packet (ts 5480): the gap stays a gap
    out += [parse_rtp(x) for x in t.push(rtp(0, 11, 5640, payloads[3]), 0.08)]
    assert [p[5] for p in out] == payloads
    assert [p[0] for p in out] == [True, False, False, False]
    assert {p[4] for p in out} == {t.ssrc} and t.ssrc != 0x1111
    assert [(p[2] - out[0][2]) & 0xFFFF for p in out] == [0, 1, 2, 3]
    assert [(p[3] - out[0][3]) & 0xFFFFFFFF for p in out] == [0, 160, 320, 640]


def test_same_codec_opus_spans_come_from_the_toc() -> None:
    opus = CodecSpec(name="OPUS", pt=111, clock=48000, channels=2)
    t = Transcoder(opus, opus)
    assert t.copy
    # TOC config 15 (hybrid 20 ms), code 0: one frame; then config 31 (CELT 20 ms) code 1.
    first = parse_rtp(t.push(rtp(111, 1, 0, bytes([15 << 3, 1, 2])), 0.0)[0])
    assert first[3] == t.sender_info()[3] and t.dtmf_start(0.0) == 960
    t.push(rtp(111, 2, 960, bytes([(31 << 3) | 1, 1, 2])), 0.02)
    assert t.dtmf_start(0.02) == 960 + 1920


def test_events_towards_a_party_without_them_are_reported_once_per_digit() -> None:
    t = Transcoder(PCMU_TE, PCMU)
    for i in range(3):
        t.push(rtp(0, i, 160 * i, bytes(160)), i * 0.02)
    seq = 3
    for code, ts in ((5, 480), (11, 2080)):
        for k, (dur, end) in enumerate(
            [(160, False), (320, False), (640, True), (640, True), (640, True)]
        ):
            assert (
                t.push(rtp(101, seq, ts, event(code, dur, end), m=k == 0), 0.06 + seq * 0.02) == []
            )
            seq += 1
    assert t.detected == [(5, 80), (11, 80)]
    assert t.dtmf_dropped == 10 and t.sender_info()[1] == 3
    # A receiver with telephone-event gets them mapped, never reported.
    mapped = Transcoder(PCMU_TE, CodecSpec(name="PCMA", pt=8, clock=8000, dtmf_pt=96))
    mapped.push(rtp(101, 1, 0, event(5, 640, True)), 0.0)
    assert mapped.detected == []


def test_injected_event_packets() -> None:
    t = Transcoder(PCMU, PCMU_TE)
    audio = [
        parse_rtp(x) for i in range(3) for x in t.push(rtp(0, i, 160 * i, bytes(160)), i * 0.02)
    ]
    start = t.dtmf_start(0.045)
    assert start == audio[-1][3] - audio[0][3] + 160  # right after the audio sent
    a = parse_rtp(t.dtmf_packet(5, start, 400, end=False, first=True))
    b = parse_rtp(t.dtmf_packet(5, start, 1280, end=True, first=False))
    assert (a[0], a[1], a[2], a[4]) == (True, 101, (audio[-1][2] + 1) & 0xFFFF, t.ssrc)
    assert a[3] == b[3] == (audio[-1][3] + 160) & 0xFFFFFFFF
    assert a[5] == event(5, 400) and b[5] == event(5, 1280, True) and not b[0]


# -- the relay -------------------------------------------------------------------------------


def test_relay_reports_events_of_a_party_whose_peer_has_none() -> None:
    engine = RelayEngine()
    engine.update(update(party(PA, A, codec=PCMU_TE), party(PB, B, codec=PCMU)), now=0.0)
    assert engine.receive(PA, rtp(0, 1, 0, bytes(160)), A, 1.0) is not None
    results = [
        engine.receive(PA, rtp(101, 2 + k, 160, event(10, dur, end)), A, 1.02 + k * 0.02)
        for k, (dur, end) in enumerate([(160, False), (800, True), (800, True), (800, True)])
    ]
    # The event itself is not relayed; its end (once, not at each of the three ends) comes
    # back as a digit for SIP INFO.
    digit = Dtmf(session="s1", index=0, party="a", digit="*", duration_ms=100)
    assert results == [None, Burst(packets=(), dtmf=(digit,)), None, None]


def test_relay_sends_a_digit_as_rfc4733_events_in_the_output_stream() -> None:
    k = key()
    engine = RelayEngine()
    engine.update(
        update(party(PA, A, codec=PCMU), party(PB, B, codec=PCMU_TE, send_key=k)), now=0.0
    )
    rx = SrtpReceiver(k)
    audio = []
    for i in range(5):
        out = engine.receive(PA, rtp(0, i, 160 * i, bytes([i]) * 160), A, 1.0 + i * 0.02)
        assert out is not None and out[:1] == (PB,) and out[2] == B
        audio.append(parse_rtp(rx.unprotect(out[1])))
    # To a party without telephone-event (A), nothing can be sent.
    assert not engine.send_dtmf(
        SendDtmf(session="s1", index=0, party="a", digit="1", duration_ms=100), 1.09
    )
    assert not engine.send_dtmf(
        SendDtmf(session="s1", index=0, party="b", digit="Z", duration_ms=100), 1.09
    )
    assert engine.send_dtmf(
        SendDtmf(session="s1", index=0, party="b", digit="#", duration_ms=160), 1.09
    )
    got = []
    now = 1.09
    while (due := engine.next_dtmf()) is not None:
        now = max(now, due)
        got += [(now, parse_rtp(rx.unprotect(o[1]))) for o in engine.dtmf_due(now)]
        assert now < 2.0
    times = [round(t - 1.09, 3) for t, _ in got]
    packets = [p for _, p in got]
    # RFC 4733 2.5.1.2: updates every 50 ms while the event lasts; 2.5.1.4: the end three times.
    assert times == [
        0.0,
        DTMF_INTERVAL,
        2 * DTMF_INTERVAL,
        round(3 * DTMF_INTERVAL, 3),
        0.16,
        0.16,
        0.16,
    ]
    assert [p[5] for p in packets] == [
        event(11, 400), event(11, 800), event(11, 1200), event(11, 1280),
        *[event(11, 1280, True)] * 3,
    ]  # fmt: skip
    assert [p[0] for p in packets] == [True] + [False] * 6
    assert {p[1] for p in packets} == {101} and {p[4] for p in packets} == {audio[0][4]}
    # One timestamp for the event (RFC 4733 2.3): where the audio sent so far ends.
    assert {p[3] for p in packets} == {(audio[-1][3] + 160) & 0xFFFFFFFF}
    seqs = [p[2] for p in audio + packets]
    assert seqs == [(seqs[0] + i) & 0xFFFF for i in range(len(seqs))]
    # Audio goes on in the same sequence space.
    out = engine.receive(PA, rtp(0, 5, 800, bytes(160)), A, 1.3)
    assert out is not None and parse_rtp(rx.unprotect(out[1]))[2] == (seqs[-1] + 1) & 0xFFFF
    # A digit for a session that is gone is dropped with it.
    engine.send_dtmf(SendDtmf(session="s1", index=0, party="b", digit="1", duration_ms=100), 1.4)
    engine.delete("s1")
    assert engine.dtmf_due(1.5) == [] and engine.next_dtmf() is None


def test_successive_digits_do_not_overlap() -> None:
    engine = RelayEngine()
    engine.update(update(party(PA, A, codec=PCMU), party(PB, B, codec=PCMU_TE)), now=0.0)
    engine.receive(PA, rtp(0, 0, 0, bytes(160)), A, 1.0)
    for d in "12":
        assert engine.send_dtmf(
            SendDtmf(session="s1", index=0, party="b", digit=d, duration_ms=100), 1.0
        )
    starts = []
    now = 1.0
    while (due := engine.next_dtmf()) is not None:
        now = due
        for o in engine.dtmf_due(now):
            p = parse_rtp(o[1])
            if p[0]:
                starts.append((now, p[5][0], p[3]))
    assert [(round(t, 3), c) for t, c, _ in starts] == [(1.0, 1), (1.15, 2)]
    assert starts[1][2] != starts[0][2]


# -- the codec policy ------------------------------------------------------------------------

TE_OFFER = offer_sdp("audio 0 101", "a=rtpmap:0 PCMU/8000", "a=rtpmap:101 telephone-event/8000",
                     "a=fmtp:101 0-15", "a=ptime:20")  # fmt: skip
PLAIN_ANSWER = offer_sdp("audio 0", "a=rtpmap:0 PCMU/8000", host="10.1.0.50", port=5000)


def test_policy_gives_codecs_when_dtmf_support_differs() -> None:
    h = Harness(policy(core=("PCMU", "PCMA")))
    to_core = h.offer(TE_OFFER)
    assert to_core.formats == ["0", "8", "101"]  # PCMA appended behind the caller's PCMU
    to_caller = h.answer(PLAIN_ANSWER)
    # The caller is answered with its own telephone-event: it may send events (to INFO).
    assert to_caller.formats == ["0", "101"]
    caller, core = h.codecs()
    assert caller == CodecSpec(name="PCMU", pt=0, clock=8000, ptime=20, dtmf_pt=101)
    assert core == CodecSpec(name="PCMU", pt=0, clock=8000, ptime=20)
    # A same-codec stream does not count against max_transcoded_calls.
    assert h.ctl.transcoded_calls == 0 and not h.ctl.sessions["c1"].transcoding
    # INFO from the core (no events) goes to the caller as events; from the caller it does not.
    assert h.ctl.dtmf_info("c1", False, "5", 160)
    assert h.sent[-1][1] == SendDtmf(session="c1", index=0, party="a", digit="5", duration_ms=160)
    assert not h.ctl.dtmf_info("c1", True, "5", 160)
    h.assert_clean()


def test_policy_leaves_streams_alone_when_both_or_neither_have_events() -> None:
    h = Harness(policy(core=("PCMU", "PCMA")))
    h.offer(TE_OFFER)
    h.answer(offer_sdp("audio 0 101", "a=rtpmap:0 PCMU/8000", "a=rtpmap:101 telephone-event/8000",
                       host="10.1.0.50"))  # fmt: skip
    assert h.codecs() == (None, None) and not h.ctl.dtmf_info("c1", True, "1", 100)
    h.assert_clean()
    h = Harness(policy(core=("PCMU", "PCMA")))
    h.offer(offer_sdp("audio 0", "a=rtpmap:0 PCMU/8000"))
    h.answer(PLAIN_ANSWER)
    assert h.codecs() == (None, None)
    h.assert_clean()


# -- the B2BUA -------------------------------------------------------------------------------

CALLER_TE = TE_OFFER.decode().replace("192.168.1.20", "10.0.0.7")


def dtmf_call(lab: Lab) -> tuple[Request, Response, Response]:
    _, fwd = only(lab.from_client(invite(1, body=CALLER_TE)), Request)
    assert isinstance(fwd, Request)
    ok = reply(fwd, 200, sdp=PLAIN_ANSWER.decode())
    _, got = only(lab.from_backend(ok), Response)
    assert isinstance(got, Response)
    lab.from_client(ack_for(got))
    return fwd, ok, got


def test_b2bua_sends_info_for_events_and_absorbs_its_answer() -> None:
    lab = Lab()
    fwd, _ok, got = dtmf_call(lab)
    [upd] = [c for _, c in lab.media_commands if isinstance(c, Update)][-1:]
    assert upd.streams[0].a.codec is not None and upd.streams[0].a.codec.dtmf_pt == 101
    # The worker saw the caller's digit: an INFO on the core leg's dialog.
    session = upd.session
    lab.tick()
    out = lab._sent(lab.core.media_event(
        Dtmf(session=session, index=0, party="a", digit="5", duration_ms=160), lab.now))  # fmt: skip
    [(flow, info)] = out
    assert flow.remote == B1 and isinstance(info, Request) and info.method == "INFO"
    assert info.call_id == fwd.call_id and info.body == b"Signal=5\r\nDuration=160\r\n"
    assert info.content_type == "application/dtmf-relay"
    assert info.from_ is not None and fwd.from_ is not None and info.from_.tag == fwd.from_.tag
    assert info.to is not None and info.to.tag == "b-tag"
    assert info.field_values("route") == ["<sip:10.1.0.10:5070;lr;did=backend.core.internal>"]
    assert info.cseq is not None and fwd.cseq is not None and info.cseq.seq > fwd.cseq.seq
    assert lab.from_backend(make_response(info, 200)) == []  # absorbed
    # A second digit; the far end does not take INFO: counted, nothing relayed.
    out = lab._sent(lab.core.media_event(
        Dtmf(session=session, index=0, party="a", digit="#", duration_ms=100), lab.now))  # fmt: skip
    [(_, info2)] = out
    assert isinstance(info2, Request) and info2.cseq is not None and info.cseq is not None
    assert info2.cseq.seq == info.cseq.seq + 1
    assert lab.from_backend(make_response(info2, 415)) == []
    assert lab.core.calls.stats["dtmf_rtp_to_info"] == 2
    assert lab.core.calls.stats["dtmf_info_failed"] == 1
    alice_hangs_up(lab, got, 2)
    lab.assert_clean()


def test_b2bua_turns_info_into_events_or_relays_it() -> None:
    lab = Lab()
    fwd, ok, got = dtmf_call(lab)
    # The caller has telephone-event: its own INFO is relayed as before.
    body = "Content-Type: application/dtmf-relay\n"
    raw = in_dialog("INFO", got, 2, extra=body).replace(
        b"Content-Length: 0\r\n\r\n", b"Content-Length: 24\r\n\r\nSignal=1\r\nDuration=100\r\n"
    )
    out = lab.from_client(raw)
    [(flow, relayed)] = out
    assert flow.remote == B1 and isinstance(relayed, Request) and relayed.method == "INFO"
    assert relayed.body == b"Signal=1\r\nDuration=100\r\n"
    lab.from_backend(make_response(relayed, 200))
    # The core has none: its INFO is answered by the SBC and becomes events to the caller.
    req = _backend_info(fwd, ok, 5)
    before = len(lab.media_commands)
    out = lab.from_backend(req)
    [(flow, resp)] = out
    assert flow.remote == B1 and isinstance(resp, Response) and resp.status == 200
    [(_, cmd)] = lab.media_commands[before:]
    assert isinstance(cmd, SendDtmf) and (cmd.party, cmd.digit, cmd.duration_ms) == ("a", "9", 120)
    assert lab.core.calls.stats["dtmf_info_to_rtp"] == 1
    alice_hangs_up(lab, got, 3)
    lab.assert_clean()


def _backend_info(fwd: Request, ok: Response, cseq: int) -> Request:
    req = Request("INFO", fwd.contact[0].uri_text or "")
    req.add("Via", f"SIP/2.0/UDP 10.1.0.10:5070;branch=z9hG4bK-core-info-{cseq}")
    req.add("Max-Forwards", "70")
    req.add("From", ok.get("to") or "")
    req.add("To", fwd.get("from") or "")
    req.add("Call-ID", fwd.call_id or "")
    req.add("CSeq", f"{cseq} INFO")
    req.set_body(b"Signal=9\r\nDuration=120\r\n", "application/dtmf-relay")
    return req
