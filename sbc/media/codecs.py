"""The audio codecs the media workers transcode between, sans-I/O.

Each codec of ``control.TRANSCODABLE`` has an entry in ``CODECS``: its audio sample rate, its
RTP clock rate and a factory of encoders and decoders working on 16-bit mono linear PCM in
native byte order. Codec state is per direction, so a stream gets its own pair: G.722 is
ADPCM (its predictor lives in the codec context) and Opus keeps range-coder and
prediction state between frames.

- PCMU, PCMA (ITU-T G.711, RFC 3551 4.5.14): the companding tables below, computed at
  import from the G.711 segment rules (as in the ITU-T G.191 reference code);
- G722 (ITU-T G.722, RFC 3551 4.5.2): FFmpeg's g722 through PyAV, 64 kbit/s, 16 kHz audio
  on an 8000 Hz RTP clock (the RFC keeps the clock at 8000 for historical reasons);
- OPUS (RFC 6716, RFC 7587): libopus through PyAV; the RTP clock is always 48000 whatever
  the audio bandwidth (RFC 7587 4.1), the encoder takes 8, 12, 16, 24 or 48 kHz input.

Sample-rate conversion is FFmpeg's swresample (``Resampler``). Nothing here does I/O.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import av
from av.audio.codeccontext import AudioCodecContext
from av.audio.frame import AudioFrame

from .control import CodecSpec


class CodecError(Exception):
    """A payload that does not decode, or a frame that does not encode."""


class Decoder(Protocol):
    rate: int  # sample rate of the PCM it returns

    def decode(self, payload: bytes) -> bytes:
        """One RTP payload to native-endian 16-bit mono PCM (raises CodecError)."""
        ...


class Encoder(Protocol):
    rate: int  # sample rate of the PCM it takes

    def encode(self, pcm: bytes) -> list[tuple[bytes, int]]:
        """One frame of PCM (a whole packet time) to RTP payloads, each with the number of
        samples (at ``rate``) it carries: one payload, except where a packet time cannot be
        one payload of the codec (raises CodecError)."""
        ...


# ---------------------------------------------------------------------------------------
# G.711 (ITU-T G.711; the segment search of G.191's g711.c)
# ---------------------------------------------------------------------------------------

_SEG_AEND = (0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF)
_SEG_UEND = (0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF)
_ULAW_BIAS = 0x84
_ULAW_CLIP = 8159


def _segment(value: int, ends: tuple[int, ...]) -> int:
    for seg, end in enumerate(ends):
        if value <= end:
            return seg
    return 8


def linear_to_alaw(sample: int) -> int:
    """A 16-bit linear sample to its A-law code (G.711 table 1, even bits inverted)."""
    value = sample >> 3  # A-law carries 13 bits
    if value >= 0:
        mask = 0xD5  # sign bit 1 for positive, then the even-bit inversion (0x55)
    else:
        mask = 0x55
        value = -value - 1
    seg = _segment(value, _SEG_AEND)
    if seg >= 8:
        return 0x7F ^ mask
    code = seg << 4
    code |= (value >> 1 if seg < 2 else value >> seg) & 0x0F
    return code ^ mask


def alaw_to_linear(code: int) -> int:
    code ^= 0x55
    t = (code & 0x0F) << 4
    seg = (code & 0x70) >> 4
    if seg == 0:
        t += 8
    else:
        t = (t + 0x108) << (seg - 1)
    return t if code & 0x80 else -t


def linear_to_ulaw(sample: int) -> int:
    """A 16-bit linear sample to its mu-law code (G.711 table 2, all bits inverted)."""
    value = sample >> 2  # mu-law carries 14 bits
    if value < 0:
        value, mask = -value, 0x7F
    else:
        mask = 0xFF
    value = min(value, _ULAW_CLIP) + (_ULAW_BIAS >> 2)
    seg = _segment(value, _SEG_UEND)
    if seg >= 8:
        return 0x7F ^ mask
    return ((seg << 4) | ((value >> (seg + 1)) & 0x0F)) ^ mask


def ulaw_to_linear(code: int) -> int:
    code = ~code & 0xFF
    t = (((code & 0x0F) << 3) + _ULAW_BIAS) << ((code & 0x70) >> 4)
    return _ULAW_BIAS - t if code & 0x80 else t - _ULAW_BIAS


def _encode_table(fn: Callable[[int], int]) -> bytes:
    # Indexed by the sample's 16 bits read as unsigned (memoryview cast "H").
    return bytes(fn(i - 0x10000 if i >= 0x8000 else i) for i in range(0x10000))


def _decode_table(fn: Callable[[int], int]) -> tuple[bytes, ...]:
    return tuple(array("h", [fn(code)]).tobytes() for code in range(256))


ALAW_ENCODE = _encode_table(linear_to_alaw)
ULAW_ENCODE = _encode_table(linear_to_ulaw)
ALAW_DECODE = _decode_table(alaw_to_linear)
ULAW_DECODE = _decode_table(ulaw_to_linear)


class G711Decoder:
    def __init__(self, table: tuple[bytes, ...]) -> None:
        self.rate = 8000
        self._lookup = table.__getitem__

    def decode(self, payload: bytes) -> bytes:
        return b"".join(map(self._lookup, payload))  # one octet per sample


class G711Encoder:
    def __init__(self, table: bytes) -> None:
        self.rate = 8000
        self._lookup = table.__getitem__

    def encode(self, pcm: bytes) -> list[tuple[bytes, int]]:
        if len(pcm) % 2:
            raise CodecError("odd PCM length")
        out = bytes(map(self._lookup, memoryview(pcm).cast("H")))
        return [(out, len(out))]


class G711Translate:
    """PCMU <-> PCMA without linear PCM in between: each code mapped through a 256-entry
    table (the decoder) and passed on as it is (the encoder); "samples" are dst's codes."""

    def __init__(self, table: bytes) -> None:
        self.rate = 8000
        self._table = table

    def decode(self, payload: bytes) -> bytes:
        return payload.translate(self._table)

    def encode(self, pcm: bytes) -> list[tuple[bytes, int]]:
        return [(pcm, len(pcm))]


@dataclass(frozen=True, slots=True)
class G711Direct:
    decoder: Decoder
    encoder: Encoder
    silence: bytes  # dst's code for a zero sample


# Code to code through the linear value (decoded, then encoded by the tables above).
ULAW_TO_ALAW = bytes(linear_to_alaw(ulaw_to_linear(c)) for c in range(256))
ALAW_TO_ULAW = bytes(linear_to_ulaw(alaw_to_linear(c)) for c in range(256))


def g711_direct(src: str, dst: str) -> G711Direct | None:
    """The table path between PCMU and PCMA (one ``bytes.translate`` a packet), else None."""
    if (src, dst) == ("PCMU", "PCMA"):
        t = G711Translate(ULAW_TO_ALAW)
        return G711Direct(t, t, bytes([linear_to_alaw(0)]))
    if (src, dst) == ("PCMA", "PCMU"):
        t = G711Translate(ALAW_TO_ULAW)
        return G711Direct(t, t, bytes([linear_to_ulaw(0)]))
    return None


# ---------------------------------------------------------------------------------------
# PyAV (FFmpeg) codecs: G.722 and Opus
# ---------------------------------------------------------------------------------------


def pcm_frame(pcm: bytes, rate: int) -> AudioFrame:
    """Native-endian 16-bit mono PCM as a PyAV frame."""
    frame = AudioFrame(format="s16", layout="mono", samples=len(pcm) // 2, align=1)
    frame.planes[0].update(pcm)
    frame.sample_rate = rate
    return frame


def frame_pcm(frame: AudioFrame) -> bytes:
    """A PyAV s16 mono frame's samples (its plane may be padded beyond them)."""
    return bytes(frame.planes[0])[: 2 * frame.samples]


class AvDecoder:
    """An FFmpeg decoder giving s16 mono PCM at ``rate``."""

    def __init__(self, codec: str, rate: int) -> None:
        ctx = av.CodecContext.create(codec, "r")
        assert isinstance(ctx, AudioCodecContext)
        ctx.sample_rate = rate
        ctx.layout = "mono"  # libopus down-mixes a stereo stream (RFC 7587 3.4)
        ctx.open()
        self._ctx = ctx
        self.rate = rate

    def decode(self, payload: bytes) -> bytes:
        if not payload:
            raise CodecError("empty payload")
        try:
            frames = self._ctx.decode(av.Packet(payload))
        except (av.FFmpegError, ValueError) as exc:
            raise CodecError(str(exc)) from exc
        out = []
        for frame in frames:
            if frame.format.name != "s16" or frame.layout.nb_channels != 1:
                raise CodecError(f"decoder gave {frame.format.name}/{frame.layout.name}")
            if frame.sample_rate != self.rate:
                raise CodecError(f"decoder gave {frame.sample_rate} Hz")
            out.append(frame_pcm(frame))
        return b"".join(out)


class AvEncoder:
    """An FFmpeg encoder taking s16 mono PCM at ``rate``, ``frame`` samples a call."""

    def __init__(
        self, codec: str, rate: int, frame: int, *, bit_rate: int | None = None,
        options: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        ctx = av.CodecContext.create(codec, "w")
        assert isinstance(ctx, AudioCodecContext)
        ctx.sample_rate = rate
        ctx.layout = "mono"
        ctx.format = "s16"
        if bit_rate is not None:
            ctx.bit_rate = bit_rate
        if options:
            ctx.options = options
        ctx.open()
        if ctx.frame_size != frame:  # PyAV would re-chunk frames behind our back
            raise CodecError(f"{codec} frames of {ctx.frame_size} samples, not {frame}")
        self._ctx = ctx
        self.rate = rate
        self.frame = frame

    def encode_one(self, pcm: bytes) -> bytes:
        if len(pcm) != 2 * self.frame:
            raise CodecError(f"{len(pcm) // 2} samples, the encoder takes {self.frame}")
        try:
            packets = self._ctx.encode(pcm_frame(pcm, self.rate))
        except (av.FFmpegError, ValueError) as exc:
            raise CodecError(str(exc)) from exc
        if len(packets) != 1:
            raise CodecError(f"encoder gave {len(packets)} packets for one frame")
        return bytes(packets[0])

    def encode(self, pcm: bytes) -> list[tuple[bytes, int]]:
        return [(self.encode_one(pcm), self.frame)]


# Opus frame durations libopus encodes as one packet (RFC 6716 2.1.4; 80-120 ms are
# multi-frame packets it builds itself), in ms.
OPUS_DURATIONS = (10, 20, 40, 60, 80, 100, 120)
OPUS_RATES = (8000, 12000, 16000, 24000, 48000)  # input rates libopus encodes (RFC 6716 2)


def opus_join(frames: list[bytes]) -> bytes | None:
    """Several single-frame Opus packets as one code 3 packet (RFC 6716 3.2.5): VBR, frame
    lengths coded as in 3.2.1; None if their TOC configurations differ (they must not) or a
    frame is not a code 0 packet."""
    toc = frames[0][0]
    if len(frames) > 48 or any(not f or f[0] != toc or f[0] & 0x03 for f in frames):
        return None
    out = bytearray([(toc & 0xFC) | 0x03, 0x80 | len(frames)])  # v=1, p=0, M frames
    for f in frames[:-1]:
        n = len(f) - 1
        if n < 252:
            out.append(n)
        else:  # two octets: 252 + (n & 3), then (n - first) / 4 (RFC 6716 3.2.1)
            first = 252 + (n & 0x03)
            out += bytes([first, (n - first) >> 2])
    for f in frames:
        out += f[1:]
    return bytes(out)


class OpusEncoder:
    """libopus for one packet time: one encoder call when the duration is an Opus one,
    else several 10 or 20 ms frames joined into one code 3 packet (RFC 6716 3.2.5)."""

    def __init__(self, rate: int, ptime: int, fmtp: dict[str, str]) -> None:
        if ptime in OPUS_DURATIONS:
            sub, self._count = ptime, 1
        elif ptime % 20 == 0:
            sub, self._count = 20, ptime // 20
        else:
            sub, self._count = 10, ptime // 10
        # RFC 7587 6.1: maxaveragebitrate caps what we send; useinbandfec=1 asks for FEC.
        bit_rate = {8000: 16000, 12000: 20000, 16000: 24000}.get(rate, 32000)
        if fmtp.get("maxaveragebitrate", "").isdigit():
            bit_rate = max(6000, min(bit_rate, int(fmtp["maxaveragebitrate"])))
        options = {"application": "voip", "frame_duration": str(sub)}
        if fmtp.get("useinbandfec") == "1":
            options.update(fec="1", packet_loss="10")
        self._av = AvEncoder("libopus", rate, rate * sub // 1000, bit_rate=bit_rate,
                             options=options)  # fmt: skip
        self.rate = rate

    def encode(self, pcm: bytes) -> list[tuple[bytes, int]]:
        step = 2 * self._av.frame
        if not pcm or len(pcm) % step:
            raise CodecError(f"{len(pcm) // 2} samples is not whole Opus frames")
        parts = [self._av.encode_one(pcm[i : i + step]) for i in range(0, len(pcm), step)]
        if len(parts) == 1:
            return [(parts[0], self._av.frame)]
        joined = opus_join(parts)
        if joined is not None:
            return [(joined, len(pcm) // 2)]
        # The encoder changed mode or bandwidth inside the packet time: send the frames as
        # they are (a shorter ptime than asked, which an Opus receiver decodes anyway).
        return [(p, self._av.frame) for p in parts]


class Resampler:
    """swresample from one rate to another, s16 mono. It keeps a few samples of filter
    delay, so its output runs a constant fraction of a millisecond behind its input."""

    def __init__(self, src_rate: int, dst_rate: int) -> None:
        self._av = av.AudioResampler(format="s16", layout="mono", rate=dst_rate)
        self.src_rate = src_rate
        self.dst_rate = dst_rate

    def resample(self, pcm: bytes) -> bytes:
        if not pcm:
            return b""
        frames = self._av.resample(pcm_frame(pcm, self.src_rate))
        return b"".join(frame_pcm(f) for f in frames)


# ---------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------


def parse_fmtp(fmtp: str) -> dict[str, str]:
    """``a=fmtp`` parameters "k=v; k=v" (RFC 4566 6; RFC 7587 6.1 for Opus), keys lower-case."""
    out: dict[str, str] = {}
    for item in fmtp.split(";"):
        key, _, value = item.strip().partition("=")
        if key:
            out[key.strip().lower()] = value.strip()
    return out


@dataclass(frozen=True, slots=True)
class Codec:
    """One transcodable codec: ``rate`` is its audio sample rate, ``clock`` its RTP clock."""

    name: str
    rate: int
    clock: int
    new_decoder: Callable[[CodecSpec], Decoder]
    new_encoder: Callable[[CodecSpec, int, int], Encoder]  # (spec, PCM rate, ptime ms)
    encoder_rates: tuple[int, ...]  # input rates its encoder takes


def _opus_encoder(spec: CodecSpec, rate: int, ptime: int) -> Encoder:
    return OpusEncoder(rate, ptime, parse_fmtp(spec.fmtp))


def _g722_encoder(spec: CodecSpec, rate: int, ptime: int) -> Encoder:
    frame = rate * ptime // 1000  # G.722 codes sample pairs: any even frame size will do
    return AvEncoder("g722", rate, frame, options={"frame_size": str(frame)})


CODECS: dict[str, Codec] = {
    "PCMU": Codec(
        "PCMU", 8000, 8000, lambda s: G711Decoder(ULAW_DECODE),
        lambda s, r, p: G711Encoder(ULAW_ENCODE), (8000,),
    ),
    "PCMA": Codec(
        "PCMA", 8000, 8000, lambda s: G711Decoder(ALAW_DECODE),
        lambda s, r, p: G711Encoder(ALAW_ENCODE), (8000,),
    ),
    # RFC 3551 4.5.2: "even though the actual sampling rate for G.722 audio is 16,000 Hz,
    # the RTP clock rate for the G722 payload format is 8,000 Hz".
    "G722": Codec("G722", 16000, 8000, lambda s: AvDecoder("g722", 16000), _g722_encoder,
                  (16000,)),
    # RFC 7587 4.1: the RTP clock is 48000 whatever the audio; libopus decodes at 48 kHz here.
    "OPUS": Codec("OPUS", 48000, 48000, lambda s: AvDecoder("libopus", 48000), _opus_encoder,
                  OPUS_RATES),
}  # fmt: skip


def packet_ms(spec: CodecSpec) -> int:
    """The packet time sent to a party: its a=ptime as a multiple of 10 ms in 10-120 (every
    codec here frames in 10 ms steps; RFC 7587 4.3 caps Opus packets at 120 ms)."""
    return max(10, min(120, round(spec.ptime / 10) * 10))


def work_rate(src: CodecSpec, dst: CodecSpec) -> int:
    """The PCM rate a stream from ``src`` to ``dst`` is encoded at: ``dst``'s audio rate, or
    for an encoder that takes several rates (Opus) ``src``'s when it can, so nothing is
    resampled (capped by dst's maxplaybackrate, RFC 7587 6.1)."""
    out = CODECS[dst.name]
    rate = CODECS[src.name].rate
    if dst.name == "OPUS":
        limit = parse_fmtp(dst.fmtp).get("maxplaybackrate", "")
        if limit.isdigit():
            rate = min(rate, max([r for r in OPUS_RATES if r <= int(limit)] or [8000]))
    return rate if rate in out.encoder_rates else out.rate
