"""One direction of a transcoded RTP stream, sans-I/O: plain RTP packets in, plain
RTP packets out; SRTP, sockets and RTCP stay with the relay.

The transcoder is an RTP source of its own (RFC 3550 7.1: a translator that changes the
encoding is the source of what it sends, here under its own SSRC): it decodes what the
sending party sends (``src``), converts the sample rate where the codecs differ, cuts the
audio into frames of the receiving party's packet time and encodes them as ``dst``.

Timing comes from the input timestamps, not the clock: the output keeps a timeline in
``dst.clock`` units that advances by the samples of each frame sent and jumps forward by the
same time as the input when the input has a gap (a lost packet, a silence period of a
sender using voice activity detection, RFC 3551 4.1). A gap shorter than the room left in a
partly filled frame is filled with silence; a longer one completes the frame with silence,
sends it and restarts framing after the gap. Input that overlaps what was already sent (a
late or duplicated packet) is cut off. The wall clock (``now``) only bridges a change of the
sender's SSRC or a timestamp discontinuity, where the input timestamps mean nothing.

RFC 4733 telephone-events are not decoded: they are renumbered into the output stream.
Towards a party without telephone-event they are dropped and each event is noted once in
``detected`` (the relay reports it for SIP INFO); ``dtmf_start`` / ``dtmf_packet`` make
the SBC's own events towards the receiver in the output stream (a digit that came as SIP
INFO). Between two parties of the same codec (a stream transcoded only for that DTMF
interworking) the payload is copied, not decoded.
"""

from __future__ import annotations

import secrets
import struct

from . import codecs
from .control import CodecSpec

_HEADER = struct.Struct("!BBHII")
_SEQ_MASK = 0xFFFF
_TS_MASK = 0xFFFFFFFF
_TS_HALF = 1 << 31
# A jump of the input timestamps larger than this (in seconds, backwards) or exceeding the
# wall-clock time since the previous packet by more than _FORWARD_SLACK is a discontinuity
# (RFC 3550 5.1: timestamps of a source advance with its sampling clock).
_BACKWARD_LIMIT = 1.0
_FORWARD_SLACK = 10.0


class RtpError(ValueError):
    pass


def parse_rtp(packet: bytes) -> tuple[bool, int, int, int, int, bytes]:
    """(marker, payload type, sequence number, timestamp, SSRC, payload) of an RTP packet:
    the fixed header, CSRCs, header extension and padding (RFC 3550 5.1, 5.3.1)."""
    if len(packet) < 12:
        raise RtpError("shorter than the RTP header")
    b0, b1, seq, ts, ssrc = _HEADER.unpack_from(packet)
    if b0 >> 6 != 2:
        raise RtpError("RTP version is not 2")
    start = 12 + 4 * (b0 & 0x0F)  # CC: CSRC identifiers
    end = len(packet)
    if b0 & 0x10:  # X: a header extension, its length in 32-bit words (RFC 3550 5.3.1)
        if end < start + 4:
            raise RtpError("truncated header extension")
        start += 4 + 4 * int.from_bytes(packet[start + 2 : start + 4], "big")
    if b0 & 0x20:  # P: the last octet counts the padding octets, itself included
        pad = packet[-1]
        if pad == 0:
            raise RtpError("padding count of zero")
        end -= pad
    if start > end:
        raise RtpError("header, extension or padding longer than the packet")
    return bool(b1 & 0x80), b1 & 0x7F, seq, ts, ssrc, packet[start:end]


class Transcoder:
    """One direction of a transcoded stream: plain RTP from a party whose codec is
    ``src`` to a party whose codec is ``dst``."""

    def __init__(self, src: CodecSpec, dst: CodecSpec, *, ssrc: int | None = None) -> None:
        self.src = src
        self.dst = dst
        # RFC 3550 5.1: SSRC, initial sequence number and initial timestamp are random.
        self.ssrc = secrets.randbits(32) if ssrc is None else ssrc & _TS_MASK
        self._seq = secrets.randbits(16)
        self._ts0 = secrets.randbits(32)
        self._ptime = codecs.packet_ms(dst)
        # The same codec on both sides (a stream run only for DTMF interworking, RFC 4733
        # events on one side, SIP INFO on the other): the payload is copied, only the RTP
        # header is the SBC's own.
        self.copy = (src.name, src.clock, src.channels) == (dst.name, dst.clock, dst.channels)
        rate = src.clock if self.copy else codecs.work_rate(src, dst)
        direct = None if self.copy else codecs.g711_direct(src.name, dst.name)
        # The samples in flight: 16-bit PCM, or between PCMU and PCMA dst's G.711 codes
        # straight from a 256-entry table (one octet a sample; silence is its code for 0).
        self._decoder: codecs.Decoder | None = None
        self._encoder: codecs.Encoder | None = None
        if self.copy:
            self._width, self._silence = 1, b""
        elif direct is not None:
            self._decoder, self._encoder = direct.decoder, direct.encoder
            self._width, self._silence = 1, direct.silence
        else:
            self._decoder = codecs.CODECS[src.name].new_decoder(src)
            self._encoder = codecs.CODECS[dst.name].new_encoder(dst, rate, self._ptime)
            self._width, self._silence = 2, b"\0\0"
        self._resampler = (
            codecs.Resampler(self._decoder.rate, rate)
            if self._decoder is not None and self._decoder.rate != rate
            else None
        )
        self._rate = rate
        self._frame_bytes = self._width * rate * self._ptime // 1000
        # Output timeline, in dst.clock ticks from _ts0 (unbounded): where the first sample
        # of ``_buf`` (PCM at ``rate`` not yet sent) goes.
        self._anchor = 0
        self._buf = bytearray()
        self._marker = True  # RFC 3550 5.1, RFC 3551 4.1: the first packet is marked
        # Input timeline, in src.clock ticks (unbounded): the end of the audio fed so far,
        # which corresponds to the end of ``_buf`` on the output timeline.
        self._src_end: int | None = None
        self._in_ssrc: int | None = None
        self._in_last = 0  # last input timestamp (32 bits) and its unbounded value
        self._in_ext = 0
        self._in_now = 0.0
        self._event: tuple[int, int] | None = None  # (input timestamp, output ticks)
        # DTMF interworking: events of a sender whose receiver has no
        # telephone-event, as (event code, duration in ms), once each; the relay takes them.
        self.detected: list[tuple[int, int]] = []
        self._reported: tuple[int, int] | None = None  # (SSRC, timestamp) of the last one
        # What was sent: for RTCP SR (RFC 3550 6.4.1).
        self.packets_sent = 0
        self.octets_sent = 0
        self._last_ts = self._ts0
        # Dropped input packets, by reason.
        self.malformed = 0  # not RTP
        self.unknown_pt = 0  # neither src.pt nor src.dtmf_pt
        self.undecodable = 0  # the codec refused the payload (or a bad telephone-event)
        self.late = 0  # wholly before what was already sent (late, duplicated)
        self.dtmf_dropped = 0  # telephone-events towards a party without them
        self.failed = 0  # anything else that went wrong inside push()

    # -- the API -----------------------------------------------------------------------------

    def push(self, packet: bytes, now: float) -> list[bytes]:
        """One plain RTP packet (RFC 3550 5.1 header parsed here, CSRCs/extension/padding
        handled) from the sender; returns the plain RTP packets to send to the receiver
        (0 or more: re-framing holds audio back or releases several)."""
        try:
            marker, pt, _seq, ts, ssrc, payload = parse_rtp(packet)
        except RtpError:
            self.malformed += 1
            return []
        try:
            if pt == self.src.pt:
                if self.copy:
                    return self._copy(marker, ts, ssrc, payload, now)
                return self._audio(marker, ts, ssrc, payload, now)
            if self.src.dtmf_pt is not None and pt == self.src.dtmf_pt:
                return self._telephone_event(marker, ts, ssrc, payload, now)
            self.unknown_pt += 1
            return []
        except Exception:  # never out of the media worker's loop: counted
            self.failed += 1
            return []

    def sender_info(self) -> tuple[int, int, int, int]:
        """(ssrc, packets sent, payload octets sent, RTP timestamp of the last packet sent):
        what an RTCP SR for this direction reports (RFC 3550 6.4.1)."""
        return self.ssrc, self.packets_sent, self.octets_sent, self._last_ts

    @property
    def dropped(self) -> int:
        """Input packets that produced nothing for a reason other than re-framing."""
        return (
            self.malformed + self.unknown_pt + self.undecodable + self.late
            + self.dtmf_dropped + self.failed
        )  # fmt: skip

    # -- input timeline ----------------------------------------------------------------------

    def _unwrap(self, ts: int, ssrc: int, now: float) -> int:
        """The input timestamp on the unbounded input timeline (RFC 3550 A.1's extension of
        sequence numbers, applied to timestamps); a new SSRC or a discontinuity is placed
        after the previous input by the wall-clock time between them."""
        if self._in_ssrc is None:
            self._in_ssrc, self._in_last, self._in_ext, self._in_now = ssrc, ts, ts, now
            return ts
        delta = (ts - self._in_last) & _TS_MASK
        if delta >= _TS_HALF:
            delta -= 1 << 32
        elapsed = max(0.0, now - self._in_now)
        clock = self.src.clock
        if ssrc != self._in_ssrc or not (
            -_BACKWARD_LIMIT * clock <= delta <= (elapsed + _FORWARD_SLACK) * clock
        ):
            # A new source (RFC 3550 8.2) or a jump: its timestamps start afresh.
            new = self._in_ext + round(elapsed * clock)
            if self._src_end is not None:
                new = max(new, self._src_end)
            delta = new - self._in_ext
            self._in_ssrc = ssrc
            self._marker = True
        self._in_last, self._in_ext, self._in_now = ts, self._in_ext + delta, now
        return self._in_ext

    def _out_ticks(self, samples: int) -> int:
        return samples * self.dst.clock // self._rate

    def _map(self, u: int) -> int:
        """The output tick of input tick ``u``, by the current correspondence of the end of
        the input fed with the end of the buffered output."""
        if self._src_end is None:
            self._src_end = u
        end = self._anchor + self._out_ticks(len(self._buf) // self._width)
        return end + (u - self._src_end) * self.dst.clock // self.src.clock

    # -- audio -------------------------------------------------------------------------------

    def _audio(self, marker: bool, ts: int, ssrc: int, payload: bytes, now: float) -> list[bytes]:
        u = self._unwrap(ts, ssrc, now)
        assert self._decoder is not None
        try:
            pcm = self._decoder.decode(payload)
        except codecs.CodecError:
            self.undecodable += 1
            return []
        if not pcm:
            self.undecodable += 1
            return []
        src_rate = self._decoder.rate
        out: list[bytes] = []
        if self._src_end is None:
            self._src_end = u
        diff = u - self._src_end  # input ticks between the end of the last input and this
        if diff < 0:  # overlaps audio already taken: keep only what is new
            skip = -diff * src_rate // self.src.clock
            if self._width * skip >= len(pcm):
                self.late += 1
                return []
            pcm = pcm[self._width * skip :]
            u = self._src_end
        elif diff > 0 or marker:
            gap = diff * self.dst.clock // self.src.clock  # output ticks
            gap_samples = gap * self._rate // self.dst.clock
            filled = len(self._buf) // self._width
            room = self._frame_bytes // self._width - filled if filled else 0
            if not marker and gap_samples <= room:
                # A short gap inside the frame being filled: silence keeps the timing.
                self._buf += self._silence * gap_samples
            else:
                end = self._anchor + self._out_ticks(filled)
                if filled:  # complete the frame before the gap with silence and send it
                    self._buf += self._silence * room
                    out += self._emit()
                # Framing restarts after the gap (RFC 3550 5.1: the timestamp jumps by it).
                self._anchor = max(self._anchor, end + gap)
        if marker:  # RFC 3551 4.1: the first packet of a talkspurt
            self._marker = True
        self._src_end = u + (len(pcm) // self._width) * self.src.clock // src_rate
        if self._resampler is not None:
            pcm = self._resampler.resample(pcm)
        self._buf += pcm
        out += self._emit()
        return out

    def _copy(self, marker: bool, ts: int, ssrc: int, payload: bytes, now: float) -> list[bytes]:
        """The same codec both ways: the payload as it came, under the SBC's SSRC and
        sequence numbers, its timestamp moved onto the output timeline (a gap stays a gap,
        RFC 3550 5.1; a late packet keeps its earlier timestamp)."""
        if not payload:
            self.undecodable += 1
            return []
        u = self._unwrap(ts, ssrc, now)
        if self._src_end is None:
            self._src_end = u
        ticks = self._anchor + (u - self._src_end)  # the same clock on both sides
        if marker:
            self._marker = True
        span = _span(self.src, payload)
        out = [self._packet(self.dst.pt, ticks, payload)]
        if ticks + span > self._anchor:
            self._anchor = ticks + span
            self._src_end = u + span
        return out

    def _emit(self) -> list[bytes]:
        """Every whole frame in the buffer, encoded and wrapped (RFC 3550 5.1)."""
        out: list[bytes] = []
        size = self._frame_bytes
        while len(self._buf) >= size:
            frame = bytes(self._buf[:size])
            del self._buf[:size]
            assert self._encoder is not None
            try:
                payloads = self._encoder.encode(frame)
            except codecs.CodecError:
                self.failed += 1
                self._anchor += self._out_ticks(size // self._width)
                continue
            for payload, samples in payloads:
                out.append(self._packet(self.dst.pt, self._anchor, payload))
                self._anchor += self._out_ticks(samples)
        return out

    def _packet(self, pt: int, ticks: int, payload: bytes, marker: bool | None = None) -> bytes:
        if marker is None:
            marker, self._marker = self._marker, False
        ts = (self._ts0 + ticks) & _TS_MASK
        header = _HEADER.pack(0x80, (0x80 if marker else 0) | pt, self._seq, ts, self.ssrc)
        self._seq = (self._seq + 1) & _SEQ_MASK
        self.packets_sent += 1
        self.octets_sent += len(payload)
        self._last_ts = ts
        return header + payload

    # -- RFC 4733 telephone-events -----------------------------------------------------------

    def _telephone_event(
        self, marker: bool, ts: int, ssrc: int, payload: bytes, now: float
    ) -> list[bytes]:
        """RFC 4733 2.3: an event's packets share the timestamp of its start; 2.5.1.4: its
        end is sent three times. Renumbered into the output stream: dst's payload type, our
        SSRC and sequence numbers, the timestamp on the output timeline and the duration
        (2.3.5, in timestamp units of the event's clock) in dst's telephone-event clock."""
        if not payload or len(payload) % 4:  # 4 octets per event (RFC 4733 2.3)
            self.undecodable += 1
            return []
        if self.dst.dtmf_pt is None:
            # DTMF interworking: the receiver has no telephone-event, so
            # the digit goes on as SIP INFO. RFC 4733 2.3, 2.5.1.4: all packets of an
            # event share its start timestamp and its end (E bit) is sent three times;
            # it is reported once, at the first end packet, with its whole duration.
            self.dtmf_dropped += 1
            if payload[1] & 0x80 and (ssrc, ts) != self._reported:
                self._reported = (ssrc, ts)
                duration = int.from_bytes(payload[2:4], "big")
                self.detected.append((payload[0], duration * 1000 // (self.src.dtmf_clock or 8000)))
            return []
        u = self._unwrap(ts, ssrc, now)
        out: list[bytes] = []
        if self._event is None or self._event[0] != u:
            # A new event: audio held back for framing goes first (with silence to a whole
            # frame), so output timestamps keep the order of sequence numbers.
            filled = len(self._buf) // self._width
            if filled:
                room = self._frame_bytes // self._width - filled
                self._buf += self._silence * room
                assert self._src_end is not None
                self._src_end += room * self.src.clock // self._rate
                out += self._emit()
            self._event = (u, self._map(u))
        ticks = self._event[1]
        scale_num, scale_den = self.dst.dtmf_clock, self.src.dtmf_clock
        body = bytearray(payload)
        for i in range(0, len(body), 4):
            duration = int.from_bytes(body[i + 2 : i + 4], "big")
            body[i + 2 : i + 4] = min(0xFFFF, duration * scale_num // scale_den).to_bytes(2, "big")
        out.append(self._packet(self.dst.dtmf_pt, ticks, bytes(body), marker=marker))
        return out

    # -- events of the SBC's own (SIP INFO -> RFC 4733) --------------------------------------

    def dtmf_start(self, now: float) -> int:
        """The output timeline tick at which an event starting ``now`` goes: where the audio
        sent so far ends, moved on by the time since the last input (RFC 4733 2.3: the
        event's timestamp is its start, on the stream's own timeline)."""
        end = self._anchor + self._out_ticks(len(self._buf) // self._width)
        if self._src_end is None:
            return end
        guess = self._in_ext + round(max(0.0, now - self._in_now) * self.src.clock)
        return max(end, self._map(guess))

    def dtmf_packet(
        self, event: int, ticks: int, duration: int, *, end: bool, first: bool
    ) -> bytes:
        """One RFC 4733 2.3 event packet towards the receiver, in the output stream (the
        SBC's SSRC, the next sequence number, 2.5.1.6): event code, E bit, volume 10
        (-10 dBm0), ``duration`` in the receiver's telephone-event clock, the timestamp of
        the event's start ``ticks``; the first packet of the event is marked (2.5.1.2)."""
        assert self.dst.dtmf_pt is not None
        flags = (0x80 if end else 0) | 10
        payload = bytes((event & 0xFF, flags)) + min(duration, 0xFFFF).to_bytes(2, "big")
        return self._packet(self.dst.dtmf_pt, ticks, payload, marker=first)


def _span(codec: CodecSpec, payload: bytes) -> int:
    """RTP clock ticks of audio in a payload of ``codec`` (RFC 3551 4.5.14: G.711 one octet
    a sample and channel; 4.5.2: G.722 one octet a tick of its 8000 Hz clock; RFC 6716 3.1:
    Opus by its TOC octet), else its packet time."""
    name = codec.name
    if name in ("PCMU", "PCMA"):
        return len(payload) // max(1, codec.channels)
    if name == "G722":
        return len(payload)
    if name == "OPUS" and payload:
        toc = payload[0]
        config = toc >> 3
        if config < 12:  # SILK: 10, 20, 40, 60 ms
            frame = (480, 960, 1920, 2880)[config & 3]
        elif config < 16:  # hybrid: 10, 20 ms
            frame = (480, 960)[config & 1]
        else:  # CELT: 2.5, 5, 10, 20 ms
            frame = (120, 240, 480, 960)[config & 3]
        code = toc & 3
        frames = (
            1 if code == 0 else 2 if code < 3 else (payload[1] & 0x3F if len(payload) > 1 else 1)
        )
        return frames * frame * codec.clock // 48000
    return codec.clock * codec.ptime // 1000
