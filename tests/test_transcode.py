"""The transcoding engine: sbc/media/codecs.py and sbc/media/transcode.py."""

from __future__ import annotations

import math
import random
import struct
from array import array

import av
import pytest

from sbc.media import codecs
from sbc.media.control import TRANSCODABLE, CodecSpec
from sbc.media.transcode import RtpError, Transcoder, parse_rtp

PT = {"PCMU": 0, "PCMA": 8, "G722": 9, "OPUS": 111}


def spec(name: str, ptime: int = 20, **kw: object) -> CodecSpec:
    return CodecSpec(name=name, pt=PT[name], clock=codecs.CODECS[name].clock, ptime=ptime, **kw)  # type: ignore[arg-type]


def rtp(
    pt: int, seq: int, ts: int, payload: bytes, *, m: bool = False, ssrc: int = 0x1234
) -> bytes:
    return (
        struct.pack("!BBHII", 0x80, (0x80 if m else 0) | pt, seq & 0xFFFF, ts & 0xFFFFFFFF, ssrc)
        + payload
    )


def parse_all(packets: list[bytes]) -> list[tuple[bool, int, int, int, int, bytes]]:
    return [parse_rtp(p) for p in packets]


def tone(hz: float, rate: int, start: int, n: int, amp: float = 8000.0) -> bytes:
    return array(
        "h", (round(amp * math.sin(2 * math.pi * hz * (start + k) / rate)) for k in range(n))
    ).tobytes()


def samples(pcm: bytes) -> list[int]:
    return list(array("h", pcm))


def goertzel_power(x: list[int], rate: int, hz: float) -> float:
    w = 2 * math.cos(2 * math.pi * hz / rate)
    s1 = s2 = 0.0
    for v in x:
        s1, s2 = v + w * s1 - s2, s1
    return s1 * s1 + s2 * s2 - w * s1 * s2


def dominant(x: list[int], rate: int) -> float:
    """The strongest frequency of ``x`` in 200-3600 Hz: a 20 Hz Goertzel scan refined to 0.5 Hz."""
    best = max(range(200, 3600, 20), key=lambda f: goertzel_power(x, rate, f))
    return max((best + d / 2 for d in range(-40, 41)), key=lambda f: goertzel_power(x, rate, f))


def rms(x: list[int]) -> float:
    return math.sqrt(sum(v * v for v in x) / len(x))


def pcm_stream(src: CodecSpec, hz: float, packets: int, amp: float = 8000.0) -> list[bytes]:
    """``packets`` RTP packets of ``src`` carrying a tone, 20 ms each, contiguous."""
    codec = codecs.CODECS[src.name]
    enc = codec.new_encoder(src, codec.rate, src.ptime)
    n = codec.rate * src.ptime // 1000
    step = src.clock * src.ptime // 1000
    out = []
    for i in range(packets):
        ((payload, _),) = enc.encode(tone(hz, codec.rate, i * n, n, amp))
        out.append(rtp(src.pt, 100 + i, 5000 + i * step, payload, m=i == 0))
    return out


def decode_all(dst: CodecSpec, packets: list[bytes]) -> list[int]:
    """What the receiving party hears, resampled to 8 kHz for the analysis."""
    dec = codecs.CODECS[dst.name].new_decoder(dst)
    pcm = b"".join(dec.decode(p[5]) for p in parse_all(packets))
    if dec.rate != 8000:
        pcm = codecs.Resampler(dec.rate, 8000).resample(pcm)
    return samples(pcm)


# ---------------------------------------------------------------------------------------
# G.711 tables
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("av_name", "decode_table"),
    [("pcm_alaw", codecs.ALAW_DECODE), ("pcm_mulaw", codecs.ULAW_DECODE)],
)
def test_g711_decode_tables_match_ffmpeg(av_name: str, decode_table: tuple[bytes, ...]) -> None:
    ctx = av.CodecContext.create(av_name, "r")
    ctx.sample_rate = 8000
    ctx.layout = "mono"
    ctx.open()
    ref = b"".join(codecs.frame_pcm(f) for f in ctx.decode(av.Packet(bytes(range(256)))))
    assert codecs.G711Decoder(decode_table).decode(bytes(range(256))) == ref


@pytest.mark.parametrize(
    ("enc", "dec"),
    [
        (codecs.linear_to_alaw, codecs.alaw_to_linear),
        (codecs.linear_to_ulaw, codecs.ulaw_to_linear),
    ],
)
def test_g711_encoding_is_the_decision_interval(enc, dec) -> None:  # type: ignore[no-untyped-def]
    # Every code decodes to a value that encodes to itself, and encoding is monotonic.
    for code in range(256):
        assert enc(dec(code)) == code or dec(code) == 0  # +0 and -0 both decode to 0
    values = [dec(enc(x)) for x in range(-32768, 32768, 7)]
    assert values == sorted(values)


def test_g711_reference_codes() -> None:
    # G.711: silence is 0xFF (mu-law) / 0xD5 (A-law); full scale 0x80 / 0xAA.
    assert codecs.linear_to_ulaw(0) == 0xFF
    assert codecs.linear_to_alaw(0) == 0xD5
    assert codecs.linear_to_ulaw(32767) == 0x80
    assert codecs.linear_to_alaw(32767) == 0xAA
    assert codecs.linear_to_ulaw(-32768) == 0x00
    assert codecs.linear_to_alaw(-32768) == 0x2A


def test_g711_direct_tables() -> None:
    for src, dst, dec, enc in (
        ("PCMU", "PCMA", codecs.ulaw_to_linear, codecs.linear_to_alaw),
        ("PCMA", "PCMU", codecs.alaw_to_linear, codecs.linear_to_ulaw),
    ):
        direct = codecs.g711_direct(src, dst)
        assert direct is not None
        assert direct.decoder.decode(bytes(range(256))) == bytes(enc(dec(c)) for c in range(256))
        assert direct.silence == bytes([enc(0)])
    assert codecs.g711_direct("PCMA", "G722") is None


def test_registry_covers_transcodable() -> None:
    assert set(codecs.CODECS) == TRANSCODABLE
    assert (codecs.CODECS["G722"].rate, codecs.CODECS["G722"].clock) == (16000, 8000)
    assert (codecs.CODECS["OPUS"].rate, codecs.CODECS["OPUS"].clock) == (48000, 48000)


def test_codec_state_is_per_stream() -> None:
    a = codecs.CODECS["G722"].new_encoder(spec("G722"), 16000, 20)
    b = codecs.CODECS["G722"].new_encoder(spec("G722"), 16000, 20)
    pcm = tone(1000, 16000, 0, 320)
    first = a.encode(pcm)
    a.encode(pcm)
    assert b.encode(pcm) == first  # b's ADPCM state was not moved by a's frames


def test_opus_join_code3() -> None:
    enc = codecs.OpusEncoder(8000, 30, {})
    ((payload, n),) = enc.encode(tone(500, 8000, 0, 240))
    assert n == 240
    assert payload[0] & 0x03 == 3 and payload[1] & 0x3F == 3  # code 3, 3 frames (RFC 6716 3.2.5)
    dec = codecs.CODECS["OPUS"].new_decoder(spec("OPUS"))
    assert len(dec.decode(payload)) == 2 * 1440  # 30 ms at 48 kHz


def test_opus_join_length_coding() -> None:
    frames = [bytes([0x08]) + bytes(300), bytes([0x08]) + bytes(10)]
    joined = codecs.opus_join(frames)
    assert joined is not None
    # 300 = 252 + 0 + 4 * 12 (RFC 6716 3.2.1)
    assert joined[:4] == bytes([0x0B, 0x82, 252, 12]) and len(joined) == 4 + 310
    assert codecs.opus_join([bytes([0x08, 1]), bytes([0x10, 1])]) is None


def test_work_rate_avoids_resampling_into_opus() -> None:
    assert codecs.work_rate(spec("PCMA"), spec("OPUS")) == 8000
    assert codecs.work_rate(spec("G722"), spec("OPUS")) == 16000
    assert codecs.work_rate(spec("OPUS"), spec("PCMA")) == 8000
    assert codecs.work_rate(spec("PCMA"), spec("G722")) == 16000
    capped = spec("OPUS", fmtp="maxplaybackrate=8000; stereo=1")
    assert codecs.work_rate(spec("G722"), capped) == 8000


# ---------------------------------------------------------------------------------------
# RTP header
# ---------------------------------------------------------------------------------------


def test_parse_rtp_csrc_extension_padding() -> None:
    payload = b"\x11" * 5
    head = struct.pack("!BBHII", 0x80 | 0x20 | 0x10 | 2, 0x80 | 8, 7, 99, 5)
    csrcs = struct.pack("!II", 1, 2)
    ext = struct.pack("!HH", 0xBEDE, 1) + b"\x00" * 4
    pkt = head + csrcs + ext + payload + b"\x00\x00\x03"
    assert parse_rtp(pkt) == (True, 8, 7, 99, 5, payload)
    for bad in (
        b"\x80" * 11,
        b"\x40" + bytes(11),
        head + csrcs + ext[:2],
        head + csrcs + ext + b"\x00\x00\xff",
    ):
        with pytest.raises(RtpError):
            parse_rtp(bad)


# ---------------------------------------------------------------------------------------
# Re-framing, timestamps, sequence numbers, marker, SSRC
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("src_ms", "dst_ms", "inputs", "outputs"),
    [
        (20, 30, 6, 4),
        (30, 20, 4, 6),
        (20, 60, 6, 2),
        (10, 20, 8, 4),
        (20, 20, 5, 5),
        (60, 10, 1, 6),
    ],
)
def test_reframing_counts_and_steps(src_ms: int, dst_ms: int, inputs: int, outputs: int) -> None:
    src, dst = spec("PCMU", src_ms), spec("PCMA", dst_ms)
    t = Transcoder(src, dst, ssrc=77)
    got: list[tuple[bool, int, int, int, int, bytes]] = []
    per_push = []
    for i, pkt in enumerate(pcm_stream(src, 700, inputs)):
        out = parse_all(t.push(pkt, i * src_ms / 1000))
        per_push.append(len(out))
        got += out
    assert len(got) == outputs
    assert all(len(p[5]) == 8 * dst_ms for p in got)
    assert [p[3] - got[0][3] for p in got] == [8 * dst_ms * k for k in range(outputs)]
    assert [(p[2] - got[0][2]) & 0xFFFF for p in got] == list(range(outputs))
    assert {p[4] for p in got} == {77} and {p[1] for p in got} == {8}
    assert [p[0] for p in got] == [True] + [False] * (outputs - 1)
    if (src_ms, dst_ms) == (20, 60):
        assert per_push == [0, 0, 1, 0, 0, 1]
    if (src_ms, dst_ms) == (30, 20):
        assert per_push == [1, 2, 1, 2]
    assert t.dropped == 0


def test_reframing_keeps_the_audio() -> None:
    # PCMU -> PCMA re-framed 20 -> 30 ms: the same samples, give or take G.711 rounding.
    src, dst = spec("PCMU", 20), spec("PCMA", 30)
    t = Transcoder(src, dst)
    packets = pcm_stream(src, 440, 30)
    out = [p for i, pkt in enumerate(packets) for p in t.push(pkt, i * 0.02)]
    dec_in = codecs.CODECS["PCMU"].new_decoder(src)
    heard = decode_all(dst, out)
    sent = samples(b"".join(dec_in.decode(p[5]) for p in parse_all(packets)))
    assert len(heard) == 4800 == len(sent)
    assert max(abs(a - b) for a, b in zip(heard, sent, strict=True)) < 300


@pytest.mark.parametrize(
    ("src_name", "dst_name"),
    [("PCMU", "OPUS"), ("OPUS", "PCMA"), ("G722", "PCMA"), ("PCMA", "G722")],
)
def test_reframing_across_codecs(src_name: str, dst_name: str) -> None:
    src, dst = spec(src_name, 20), spec(dst_name, 30)
    t = Transcoder(src, dst)
    got = parse_all(
        [p for i, pkt in enumerate(pcm_stream(src, 700, 30)) for p in t.push(pkt, i * 0.02)]
    )
    step = dst.clock * 30 // 1000
    # 600 ms of input is 20 frames of 30 ms; the resampler holds back a few samples.
    assert len(got) in (19, 20)
    assert [p[3] - got[0][3] for p in got] == [step * k for k in range(len(got))]
    assert t.dropped == 0


def test_many_packets_wrap_sequence_and_timestamp() -> None:
    src, dst = spec("PCMA"), spec("PCMU")
    t = Transcoder(src, dst)
    t._seq = 0xFFF0  # start near the wrap (RFC 3550 5.1: modulo 2^16 / 2^32)
    t._ts0 = 0xFFFFF000
    prev = None
    n = 0
    for i in range(3000):
        ts = (0xFFFFFE00 + 160 * i) & 0xFFFFFFFF  # the input timestamps wrap too
        for p in parse_all(t.push(rtp(8, i, ts, bytes(160)), i * 0.02)):
            if prev is not None:
                assert p[2] == (prev[2] + 1) & 0xFFFF
                assert p[3] == (prev[3] + 160) & 0xFFFFFFFF
            prev = p
            n += 1
    assert n == 3000
    ssrc, packets, octets, last_ts = t.sender_info()
    assert (ssrc, packets, octets, last_ts) == (t.ssrc, 3000, 3000 * 160, prev[3])  # type: ignore[index]


def test_lost_packet_jumps_timestamp() -> None:
    src, dst = spec("PCMU"), spec("PCMA")
    t = Transcoder(src, dst)
    got = []
    for i in range(10):
        if i == 5:
            continue  # lost
        got += parse_all(t.push(rtp(0, i, 1000 + 160 * i, bytes(160), m=i == 0), i * 0.02))
    ts = [p[3] - got[0][3] for p in got]
    assert ts == [0, 160, 320, 480, 640, 960, 1120, 1280, 1440]
    assert [(p[2] - got[0][2]) & 0xFFFF for p in got] == list(range(9))  # no hole in seq
    assert [p[0] for p in got] == [True] + [False] * 8  # loss is not a talkspurt


def test_short_loss_inside_a_frame_is_filled_with_silence() -> None:
    # 20 -> 30 ms: a lost 20 ms packet fits the room left in the frame being filled.
    src, dst = spec("PCMU", 20), spec("PCMA", 30)
    t = Transcoder(src, dst)
    got = []
    for i in range(9):
        if i == 2:
            continue
        got += parse_all(t.push(rtp(0, i, 160 * i, bytes(160)), i * 0.02))
    assert [p[3] - got[0][3] for p in got] == [0, 240, 480, 720, 960, 1200]


def test_long_gap_with_reframing_keeps_input_timing() -> None:
    src, dst = spec("PCMU", 20), spec("PCMA", 30)
    t = Transcoder(src, dst)
    got = []
    for i in (0, 1, 5, 6, 7):  # 2, 3, 4 lost: 60 ms
        got += parse_all(t.push(rtp(0, i, 160 * i, bytes(160)), i * 0.02))
    # frame 0 (0-240), the partial frame padded (240-480), then framing restarts at the
    # input's own timestamp 800 (5 * 160).
    assert [p[3] - got[0][3] for p in got] == [0, 240, 800, 1040]
    assert got[1][5][80:] == b"\xd5" * 160  # A-law silence pads the frame (G.711 table 1)


def test_silence_period_and_marker() -> None:
    # A talkspurt, 1 s of silence suppression, a talkspurt with the marker (RFC 3551 4.1).
    src, dst = spec("PCMA", 20), spec("OPUS", 20)
    t = Transcoder(src, dst)
    got = []
    for i in list(range(5)) + list(range(55, 60)):
        got += parse_all(t.push(rtp(8, i, 160 * i, bytes(160), m=i in (0, 55)), i * 0.02))
    ts = [p[3] - got[0][3] for p in got]
    assert ts == [960 * k for k in range(5)] + [960 * k for k in range(55, 60)]
    assert [p[0] for p in got] == ([True] + [False] * 4) * 2
    assert all(p[1] == 111 for p in got)


def test_marker_without_gap_marks_next_packet() -> None:
    src, dst = spec("PCMU", 20), spec("PCMA", 20)
    t = Transcoder(src, dst)
    marks = [
        parse_all(t.push(rtp(0, i, 160 * i, bytes(160), m=i in (0, 3)), i * 0.02))[0][0]
        for i in range(5)
    ]
    assert marks == [True, False, False, True, False]


def test_ssrc_is_ours_and_survives_a_new_sender_ssrc() -> None:
    src, dst = spec("PCMU"), spec("PCMA")
    t = Transcoder(src, dst)
    t2 = Transcoder(src, dst)
    assert t.ssrc != t2.ssrc or t._seq != t2._seq  # random (RFC 3550 5.1, 8.1)
    got = []
    for i in range(5):
        got += parse_all(t.push(rtp(0, i, 160 * i, bytes(160), ssrc=1), i * 0.02))
    # The sender restarts with another SSRC and unrelated timestamps 100 ms later.
    for k, i in enumerate(range(10, 15)):
        got += parse_all(
            t.push(rtp(0, 9000 + k, 7_777_777 + 160 * k, bytes(160), ssrc=2), i * 0.02)
        )
    assert {p[4] for p in got} == {t.ssrc}
    ts = [p[3] - got[0][3] for p in got]
    assert ts == [0, 160, 320, 480, 640] + [1600 + 160 * k for k in range(5)]
    assert [p[0] for p in got] == ([True] + [False] * 4) * 2
    assert [(p[2] - got[0][2]) & 0xFFFF for p in got] == list(range(10))


def test_late_and_duplicate_packets_are_dropped() -> None:
    src, dst = spec("PCMU"), spec("PCMA")
    t = Transcoder(src, dst)
    got = []
    for i in (0, 1, 3, 2, 3, 4):  # 2 arrives after 3; 3 twice
        got += parse_all(t.push(rtp(0, i, 160 * i, bytes(160)), i * 0.02))
    assert [p[3] - got[0][3] for p in got] == [0, 160, 480, 640]
    assert t.late == 2


# ---------------------------------------------------------------------------------------
# RFC 4733 telephone-events
# ---------------------------------------------------------------------------------------


def event(digit: int, duration: int, end: bool = False) -> bytes:
    return bytes([digit, (0x80 if end else 0) | 10]) + duration.to_bytes(2, "big")


def test_telephone_event_mapping_8000_to_48000() -> None:
    src = spec("PCMA", dtmf_pt=101, dtmf_clock=8000)
    dst = spec("OPUS", dtmf_pt=110, dtmf_clock=48000)
    t = Transcoder(src, dst)
    audio = []
    for i in range(5):
        audio += parse_all(t.push(rtp(8, i, 1000 + 160 * i, bytes(160), m=i == 0), i * 0.02))
    events = []
    seq = 5
    for k, (dur, end) in enumerate(
        [(160, False), (320, False), (480, False), (640, True), (640, True), (640, True)]
    ):
        events += parse_all(
            t.push(rtp(101, seq, 1800, event(5, dur, end), m=k == 0), 0.1 + k * 0.02)
        )
        seq += 1
    assert len(events) == 6  # end-bit retransmissions kept (RFC 4733 2.5.1.4)
    assert {p[1] for p in events} == {110}
    assert {p[3] for p in events} == {audio[0][3] + 800 * 6}  # 8000 -> 48000 ticks
    assert [int.from_bytes(p[5][2:4], "big") for p in events] == [960, 1920, 2880, 3840, 3840, 3840]
    assert [(p[5][0], p[5][1] >> 7) for p in events] == [(5, 0)] * 3 + [(5, 1)] * 3
    assert [p[0] for p in events] == [True] + [False] * 5
    assert {p[4] for p in events} == {t.ssrc}
    assert [(p[2] - audio[0][2]) & 0xFFFF for p in audio + events] == list(range(11))
    # Audio after the event continues on the same timeline, as the next talkspurt.
    after = parse_all(t.push(rtp(8, seq, 2600, bytes(160), m=True), 0.3))
    assert after[0][3] == audio[0][3] + 1600 * 6 and after[0][0] and after[0][1] == 111
    assert t.sender_info()[1] == 12


def test_telephone_event_flushes_partial_frame_first() -> None:
    src = spec("PCMU", 20, dtmf_pt=101)
    dst = spec("PCMA", 30, dtmf_pt=96)
    t = Transcoder(src, dst)
    got = []
    for i in range(2):
        got += parse_all(t.push(rtp(0, i, 160 * i, bytes(160)), i * 0.02))
    assert len(got) == 1  # 40 ms in: one 30 ms frame, 10 ms held back
    got += parse_all(t.push(rtp(101, 2, 320, event(1, 160), m=True), 0.04))
    assert [(p[1], p[3] - got[0][3]) for p in got] == [(8, 0), (8, 240), (96, 320)]
    assert [int.from_bytes(got[-1][5][2:4], "big")] == [160]


def test_telephone_event_to_party_without_it_is_dropped() -> None:
    t = Transcoder(spec("PCMA", dtmf_pt=101), spec("OPUS"))
    for i in range(4):
        assert t.push(rtp(101, i, 0, event(1, 160 * (i + 1))), i * 0.02) == []
    assert t.dtmf_dropped == 4 and t.sender_info()[1] == 0


def test_unknown_payload_type_is_dropped() -> None:
    t = Transcoder(spec("PCMA", dtmf_pt=101), spec("PCMU", dtmf_pt=101))
    assert t.push(rtp(13, 0, 0, b"\x40"), 0.0) == []  # comfort noise (RFC 3389): not ours
    assert t.push(rtp(0, 1, 0, bytes(160)), 0.0) == []  # PCMU is the other party's codec
    assert t.unknown_pt == 2


# ---------------------------------------------------------------------------------------
# A tone through the codecs
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("src_name", "dst_name", "hz"),
    [("PCMU", "PCMA", 1000), ("PCMA", "G722", 770), ("G722", "OPUS", 1336), ("OPUS", "PCMU", 440)],
)
def test_tone_keeps_frequency_and_level(src_name: str, dst_name: str, hz: float) -> None:
    src, dst = spec(src_name), spec(dst_name)
    t = Transcoder(src, dst)
    amp = 8000.0
    out = [p for i, pkt in enumerate(pcm_stream(src, hz, 40, amp)) for p in t.push(pkt, i * 0.02)]
    assert t.dropped == 0 and len(out) >= 39
    heard = decode_all(dst, out)[1200:4000]  # skip 150 ms of codec start-up
    assert abs(dominant(heard, 8000) - hz) <= 3
    level = rms(heard) / (amp / math.sqrt(2))
    assert 0.7 < level < 1.3, level


# ---------------------------------------------------------------------------------------
# Garbage
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("src_name", sorted(TRANSCODABLE))
def test_garbage_never_raises(src_name: str) -> None:
    rnd = random.Random(8)
    src = spec(src_name, dtmf_pt=101)
    for dst_name in sorted(TRANSCODABLE - {src_name}):
        t = Transcoder(src, spec(dst_name, 30, dtmf_pt=100))
        for i in range(300):
            kind = i % 4
            size = rnd.choice((0, 1, 3, 7, 80, 160, 400, 1500))
            junk = rnd.randbytes(size)
            if kind == 0:
                pkt = junk  # anything at all
            elif kind == 1:
                pkt = rtp(src.pt, i, rnd.getrandbits(32), junk, m=rnd.random() < 0.1)
            elif kind == 2:
                pkt = rtp(101, i, rnd.getrandbits(32), junk)
            else:
                pkt = bytes([0x80 | rnd.getrandbits(6), rnd.getrandbits(8)]) + junk
            out = t.push(pkt, i * 0.02)
            for p in out:
                assert parse_rtp(p)[4] == t.ssrc
        assert t.failed == 0
        assert t.sender_info()[1] >= 0
