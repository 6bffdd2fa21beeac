"""Transcoded streams in the relay engine: packets go through the transcoder
towards the peer (SRTP on either leg as on any other stream), extra packets of re-framing
come back as one ``Burst``, the parties' RTCP is terminated and the relay sends its own sender
reports. The transcoder itself: tests/test_transcode.py."""

from __future__ import annotations

import struct

from test_media_relay import BIND, PA, PB, A, B, key, party, rtcp, rtp, update

from sbc.media.control import CodecSpec
from sbc.media.relay import RTCP_INTERVAL, Burst, RelayEngine
from sbc.media.srtp import SrtpReceiver

PCMU = CodecSpec(name="PCMU", pt=0, clock=8000)
PCMA = CodecSpec(name="PCMA", pt=8, clock=8000)
PCMA_10 = CodecSpec(name="PCMA", pt=8, clock=8000, ptime=10)


def header(packet: bytes) -> tuple[int, int, int, int]:
    """(payload type, sequence, timestamp, SSRC) of an RTP packet."""
    _, pt, seq, ts, ssrc = struct.unpack("!BBHII", packet[:12])
    return pt & 0x7F, seq, ts, ssrc


def transcoding(a: CodecSpec = PCMU, b: CodecSpec = PCMA, **kw: object) -> RelayEngine:
    engine = RelayEngine()
    engine.update(update(party(PA, A, codec=a, **kw), party(PB, B, codec=b)), now=0.0)
    return engine


def test_a_transcoded_packet_is_the_relays_own_in_the_peers_codec() -> None:
    engine = transcoding()
    outs = [engine.receive(PA, rtp(n, ssrc=0x1111, pt=0), A, 1.0 + n * 0.02) for n in range(1, 6)]
    sent = [o for o in outs if o is not None]
    assert sent, "nothing came out"
    ports = {o[0] for o in sent}
    dests = {o[2] for o in sent}
    assert ports == {PB} and dests == {B}
    heads = [header(o[1]) for o in sent]
    assert {h[0] for h in heads} == {8}  # PCMA's payload type
    assert len({h[3] for h in heads}) == 1 and heads[0][3] != 0x1111  # the relay's own SSRC
    seqs = [h[1] for h in heads]
    assert seqs == [(seqs[0] + i) & 0xFFFF for i in range(len(seqs))]
    assert all(len(o[1]) == 12 + 160 for o in sent)  # 20 ms of G.711
    # The other direction transcodes too, with its own SSRC.
    back = engine.receive(PB, rtp(1, ssrc=0x2222, pt=8), B, 1.2)
    assert back is not None and back[0] == PA and back[2] == A
    assert header(back[1])[0] == 0 and header(back[1])[3] not in (0x2222, heads[0][3])


def test_reframing_to_a_shorter_packet_time_returns_a_burst() -> None:
    engine = transcoding(PCMU, PCMA_10)
    out = engine.receive(PA, rtp(1, pt=0), A, 1.0)
    assert isinstance(out, Burst) and out.dtmf == ()
    assert [(port, len(data), dest) for port, data, dest in out.packets] == [
        (PB, 12 + 80, B),  # 10 ms each
        (PB, 12 + 80, B),
    ]
    first, second = (header(data) for _, data, _ in out.packets)
    assert second[1] == (first[1] + 1) & 0xFFFF and second[2] == first[2] + 80


def test_srtp_on_the_receiving_leg_protects_transcoded_packets() -> None:
    k = key()
    engine = RelayEngine()
    engine.update(update(party(PA, A, codec=PCMU), party(PB, B, codec=PCMA, send_key=k)), now=0.0)
    out = engine.receive(PA, rtp(1, pt=0), A, 1.0)
    assert out is not None
    plain = SrtpReceiver(k).unprotect(out[1])
    assert header(plain)[0] == 8


def test_rtcp_is_terminated_and_the_relay_reports_what_it_sent() -> None:
    engine = transcoding()
    for n in range(1, 11):
        engine.receive(PA, rtp(n, pt=0), A, 1.0 + n * 0.02)
    # A's RTCP does not reach B: it describes a stream B never gets.
    assert engine.receive(PA + 1, rtcp(0x1111), (A[0], A[1] + 1), 1.3) is None
    reports = engine.reports(2.0, 1_700_000_000.0)
    # B got packets from the relay: B gets a sender report; A got none yet: nothing to A.
    assert [(port, dest) for port, _, dest in reports] == [(PB + 1, (B[0], B[1] + 1))]
    packet = reports[0][1]
    v, pt, length, ssrc, ntp_s, _frac, _ts, packets, octets = struct.unpack(
        "!BBHIIIIII", packet[:28]
    )
    assert (v, pt, length) == (0x80, 200, 6)
    assert packets == 10 and octets == 10 * 160
    assert ntp_s == 1_700_000_000 + 2208988800
    sdes = packet[28:]
    assert sdes[1] == 202 and struct.unpack("!I", sdes[4:8])[0] == ssrc
    assert f"sbc@{BIND}".encode() in sdes and len(packet) % 4 == 0
    assert engine.reports(2.0 + RTCP_INTERVAL / 2, 1_700_000_002.5) == []  # not due yet
    assert len(engine.reports(2.0 + RTCP_INTERVAL, 1_700_000_005.0)) == 1


def test_srtcp_reports_on_a_protected_leg() -> None:
    k = key()
    engine = RelayEngine()
    engine.update(update(party(PA, A, codec=PCMU), party(PB, B, codec=PCMA, send_key=k)), now=0.0)
    engine.receive(PA, rtp(1, pt=0), A, 1.0)
    [(_, packet, _)] = engine.reports(2.0, 1_700_000_000.0)
    assert SrtpReceiver(k).unprotect_rtcp(packet)[1] == 200


def test_a_stream_without_codecs_is_untouched_and_has_no_reports() -> None:
    engine = RelayEngine()
    engine.update(update(party(PA, A), party(PB, B)), now=0.0)
    assert engine.receive(PA, rtp(1), A, 1.0) == (PB, rtp(1), B)
    assert engine.receive(PA + 1, rtcp(), (A[0], A[1] + 1), 1.0) is not None
    assert engine.reports(10.0, 1_700_000_000.0) == []


def test_the_transcoder_survives_an_update_with_the_same_codecs() -> None:
    engine = transcoding()
    first = engine.receive(PA, rtp(1, pt=0), A, 1.0)
    engine.update(update(party(PA, A, codec=PCMU), party(PB, B, codec=PCMA)), now=1.5)
    second = engine.receive(PA, rtp(2, pt=0), A, 1.02)
    assert first is not None and second is not None
    h1, h2 = header(first[1]), header(second[1])
    assert h2[3] == h1[3] and h2[1] == (h1[1] + 1) & 0xFFFF  # same source, sequence goes on
    # A codec change makes a new source.
    engine.update(update(party(PA, A, codec=PCMA), party(PB, B, codec=PCMU)), now=2.0)
    third = engine.receive(PA, rtp(3, pt=8), A, 2.1)
    assert third is not None and header(third[1])[0] == 0 and header(third[1])[3] != h1[3]


def test_a_codec_the_relay_cannot_do_mutes_the_stream_instead_of_failing() -> None:
    engine = transcoding(PCMU, CodecSpec(name="AMR", pt=96, clock=8000))
    assert engine.receive(PA, rtp(1, pt=0), A, 1.0) is None  # nothing under a wrong codec
    assert engine.reports(10.0, 1_700_000_000.0) == []


def test_what_a_transcoder_cannot_use_is_counted_in_the_totals() -> None:
    engine = transcoding()
    engine.receive(PA, rtp(1, pt=0), A, 1.0)
    engine.receive(PA, rtp(2, pt=96), A, 1.02)  # a payload type of neither codec
    assert engine.totals().transcode_dropped == 1
    engine.delete("s1")  # gone with its session, still in the totals
    assert engine.totals().transcode_dropped == 1
