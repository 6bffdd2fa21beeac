"""The control interface between the signalling process and the media workers.

It has the shape of rtpengine's "ng" protocol: the signalling side tells a worker what each
call's streams are (``Update``: it covers offer and answer, sent again whenever an SDP
changes them), removes a call (``Delete``), and hears back ``Timeout`` (no media for
``[media] timeout`` seconds), ``Stats`` (the answer to ``Delete``) and, every few seconds,
``Totals`` (the worker's counters since it started, for the metrics). DTMF interworking
adds ``SendDtmf`` (send a digit as RFC 4733 events to a party) and ``Dtmf`` (a digit a
party sent as RFC 4733 events, for SIP INFO). The signalling side decides everything
(ports, addresses, keys); a worker only binds the ports it is told and moves packets, so
another media engine can sit behind the same messages.

On the wire each message is one length-prefixed frame of marshalled built-in values
(``encode`` / ``decode``, ``Frames``; see "wire format" below). Nothing here does I/O.
"""

from __future__ import annotations

import marshal
import struct
from dataclasses import dataclass
from typing import Any

Address = tuple[str, int]


@dataclass(frozen=True, slots=True, kw_only=True)
class SrtpKey:
    """An SDES master key (RFC 4568 6.1): the crypto-suite name and master key || salt."""

    suite: str  # e.g. "AES_CM_128_HMAC_SHA1_80" (RFC 4568 6.2, RFC 7714 14.2)
    key_salt: bytes


# The codecs the workers transcode between, by their a=rtpmap encoding names
# upper-cased (RFC 3551 6; RFC 7587 for OPUS): sbc/media/codecs.py implements each.
TRANSCODABLE = frozenset({"PCMU", "PCMA", "G722", "OPUS"})


@dataclass(frozen=True, slots=True, kw_only=True)
class CodecSpec:
    """The codec a party sends and wants to receive on a transcoded stream, as
    its SDP negotiated it: the payload type and clock rate of its a=rtpmap (RFC 4566 6,
    RFC 3551 6), the packet time it wants (a=ptime, default 20 ms) and its a=fmtp; and its
    RFC 4733 telephone-event payload type, if it has one."""

    name: str  # upper case: "PCMU", "PCMA", "G722", "OPUS"
    pt: int
    clock: int  # RTP clock rate: 8000 (PCMU, PCMA, G722: RFC 3551 4.5.2), 48000 (OPUS)
    channels: int = 1
    ptime: int = 20  # milliseconds of audio per packet sent to this party
    fmtp: str = ""
    dtmf_pt: int | None = None  # telephone-event payload type (RFC 4733 7.1.1)
    dtmf_clock: int = 8000  # its clock rate (a=rtpmap:<pt> telephone-event/<rate>)


@dataclass(frozen=True, slots=True, kw_only=True)
class WebRtc:
    """A WebRTC party (RFC 8827, RFC 8829): on its port the relay is an ICE-lite agent (RFC
    8445 2.5) and a DTLS-SRTP endpoint (RFC 5763, RFC 5764); the leg's SRTP keys come from
    the DTLS handshake, not from SDP, and RTP and RTCP share the port (rtcp-mux)."""

    ufrag: str  # the SBC's ICE username fragment towards this party (RFC 8839 5.4)
    pwd: str  # the SBC's ICE password: the STUN short-term credential (RFC 8489 9.1)
    client: bool  # the SBC is the DTLS client (its a=setup:active); else the server
    # The party's certificate fingerprints from its SDP (RFC 8122 5): (hash function as
    # written, e.g. "sha-256", upper-case hex pairs joined by ":"); its certificate must
    # match one of them.
    fingerprints: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Identity:
    """The SBC's DTLS certificate and its private key (PEM), which every WebRTC party of a
    worker sees; sent to each worker before anything else. Its fingerprint is in the SBC's
    SDP towards WebRTC parties (RFC 8122 5)."""

    certificate: bytes
    private_key: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class Party:
    """One party of a stream as the relay sees it: the local ports facing it, where its SDP
    says it receives, and the keys of that leg."""

    bind: str  # local IP address of the ports facing this party
    port: int  # local RTP port facing this party; RTCP on port + 1 unless rtcp_mux
    rtcp_mux: bool = False  # RFC 5761: RTP and RTCP share ``port``
    remote: Address | None = None  # RTP address from the party's SDP; None: unknown/on hold
    remote_rtcp: Address | None = None  # RTCP address (a=rtcp, RFC 3605, or RTP port + 1)
    recv_key: SrtpKey | None = None  # decrypts what the party sends (its own a=crypto)
    send_key: SrtpKey | None = None  # encrypts what the relay sends it (the SBC's a=crypto)
    sends: bool = True  # the party may send (sendrecv/sendonly): its silence is a timeout
    # False: the party was offered SRTP and has not answered yet, so how it protects what it
    # sends is unknown: its packets are dropped (never relayed as if they were plain RTP).
    accept: bool = True
    # Transcoded streams: the codec of this party's leg; None on a stream whose
    # legs share a codec (the payload passes untouched, payload types included).
    codec: CodecSpec | None = None
    # A WebRTC party (ICE-lite, DTLS-SRTP, rtcp-mux); recv_key and send_key are then None.
    webrtc: WebRtc | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Stream:
    """One m-line of a call: ``a`` is the caller's party, ``b`` the callee's."""

    index: int  # m-line position in the SDP
    a: Party
    b: Party
    passthrough: bool = False  # keys are end to end (MIKEY/ZRTP/DTLS): relay bytes unchanged


@dataclass(frozen=True, slots=True, kw_only=True)
class Update:
    """Create or change a call's media session; streams absent from ``streams`` are closed."""

    session: str
    streams: tuple[Stream, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Delete:
    """End a call's media session: close its ports; the worker answers with ``Stats``."""

    session: str


@dataclass(frozen=True, slots=True, kw_only=True)
class PartyStats:
    """What the relay saw of one party: packets and bytes from it and to it (RTP and RTCP),
    RTP loss and interarrival jitter (RFC 3550 6.4.1, A.3, A.8) of what it sent, packets
    dropped (wrong source, bad SRTP) and the address latched to, if any."""

    packets_in: int = 0
    bytes_in: int = 0
    packets_out: int = 0
    bytes_out: int = 0
    lost: int = 0
    jitter_ms: float = 0.0
    dropped_source: int = 0  # from an address the call did not establish
    srtp_failures: int = 0  # failed to authenticate or decrypt
    latched: Address | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamStats:
    index: int
    a: PartyStats
    b: PartyStats


@dataclass(frozen=True, slots=True, kw_only=True)
class Stats:
    session: str
    streams: tuple[StreamStats, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Timeout:
    """No media from a sending party of the session for ``idle`` seconds."""

    session: str
    idle: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Totals:
    """A worker's counters since it started (every party of every session, ended or not)
    and what it holds now; sent periodically for the metrics (docs/operations.md)."""

    packets_in: int = 0  # accepted from parties (RTP and RTCP)
    bytes_in: int = 0
    packets_out: int = 0  # sent to parties
    bytes_out: int = 0
    dropped_source: int = 0  # from an address the call did not establish
    srtp_failures: int = 0  # failed to authenticate or decrypt
    no_session: int = 0  # on a port without a session
    no_destination: int = 0  # the other party had no address (yet, or on hold)
    invalid: int = 0  # not RTP/RTCP on a relayed (not passthrough) stream
    protect_failures: int = 0  # SRTP protect refused
    transcode_dropped: int = 0  # input a transcoder could not use (undecodable, late, ...)
    dtls_dropped: int = 0  # DTLS records of WebRTC parties dropped for a full queue
    sessions: int = 0  # sessions now
    ports: int = 0  # relay ports open now


TOTALS_FIELDS = tuple(Totals.__dataclass_fields__)


@dataclass(frozen=True, slots=True, kw_only=True)
class Dtmf:
    """A DTMF event the relay saw end in a party's RFC 4733 telephone-events on a stream
    whose other party has none: the signalling side sends it on as SIP
    INFO. ``digit`` is "0"-"9", "*", "#", "A"-"D" or "16" (flash), RFC 4733 3.2."""

    session: str
    index: int  # m-line of the stream
    party: str  # "a" or "b": who sent the events
    digit: str
    duration_ms: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SendDtmf:
    """Send a DTMF digit as RFC 4733 telephone-events to ``party`` of a transcoded stream
    (it arrived from the other party as SIP INFO)."""

    session: str
    index: int
    party: str  # "a" or "b": who receives the events
    digit: str
    duration_ms: int


# RFC 4733 3.2, table 3: the DTMF event codes.
DTMF_EVENTS = {**{str(d): d for d in range(10)}, "*": 10, "#": 11, "A": 12, "B": 13, "C": 14,
               "D": 15, "16": 16}  # fmt: skip
DTMF_DIGITS = {code: digit for digit, code in DTMF_EVENTS.items()}


def stats_record(stats: Stats) -> list[dict[str, Any]]:
    """A session's statistics as the call record shows them."""
    return [
        {"index": s.index, "caller": _pstats_record(s.a), "callee": _pstats_record(s.b)}
        for s in stats.streams
    ]


Command = Update | Delete | SendDtmf | Identity
Event = Stats | Timeout | Dtmf


# -- wire format -----------------------------------------------------------------------------
#
# Each message is one frame: a 4-byte big-endian length, then the message as a tuple of
# built-in values (str, int, float, bool, bytes, None, tuples) serialized by ``marshal``, the
# first item a tag naming the message type. The peer is always our own process (the
# signalling process and its worker children, same interpreter, so same marshal format) over
# an AF_UNIX socketpair nobody else holds: marshal is not meant for untrusted input, and
# nothing else ever reaches this decoder. Unlike pickle it builds only built-in values and
# calls no constructor; the dataclasses are built here, field by field. It replaced one JSON
# line per message, whose decoding (dicts, base64 keys, per-field conversions) cost a worker
# about 25 us per Update.

_UPDATE, _DELETE, _SEND_DTMF, _STATS, _TIMEOUT, _DTMF, _TOTALS, _IDENTITY = range(8)
_MARSHAL_VERSION = 4
HEADER = struct.Struct("!I")  # the length of the frame's body
MAX_FRAME = 16 * 1024 * 1024  # one message (an Update of many streams)

_Wire = tuple[Any, ...]


def _key_out(key: SrtpKey | None) -> tuple[str, bytes] | None:
    return None if key is None else (key.suite, key.key_salt)


def _key_in(value: Any) -> SrtpKey | None:
    if value is None:
        return None
    suite, key_salt = value
    return SrtpKey(suite=suite, key_salt=bytes(key_salt))


def _codec_out(c: CodecSpec | None) -> _Wire | None:
    if c is None:
        return None
    return (c.name, c.pt, c.clock, c.channels, c.ptime, c.fmtp, c.dtmf_pt, c.dtmf_clock)


def _codec_in(value: Any) -> CodecSpec | None:
    if value is None:
        return None
    name, pt, clock, channels, ptime, fmtp, dtmf_pt, dtmf_clock = value
    return CodecSpec(
        name=name, pt=pt, clock=clock, channels=channels, ptime=ptime, fmtp=fmtp,
        dtmf_pt=dtmf_pt, dtmf_clock=dtmf_clock,
    )  # fmt: skip


def _addr(value: Any) -> Address | None:
    return None if value is None else (value[0], value[1])


def _party_out(p: Party) -> _Wire:
    return (
        p.bind, p.port, p.rtcp_mux, p.remote, p.remote_rtcp, _key_out(p.recv_key),
        _key_out(p.send_key), p.sends, p.accept, _codec_out(p.codec), _webrtc_out(p.webrtc),
    )  # fmt: skip


def _party_in(value: Any) -> Party:
    bind, port, rtcp_mux, remote, remote_rtcp, recv_key, send_key, sends, accept, codec, webrtc = (
        value
    )
    return Party(
        bind=bind, port=port, rtcp_mux=rtcp_mux, remote=_addr(remote),
        remote_rtcp=_addr(remote_rtcp), recv_key=_key_in(recv_key), send_key=_key_in(send_key),
        sends=sends, accept=accept, codec=_codec_in(codec), webrtc=_webrtc_in(webrtc),
    )  # fmt: skip


def _webrtc_out(w: WebRtc | None) -> _Wire | None:
    return None if w is None else (w.ufrag, w.pwd, w.client, w.fingerprints)


def _webrtc_in(value: Any) -> WebRtc | None:
    if value is None:
        return None
    ufrag, pwd, client, fingerprints = value
    return WebRtc(
        ufrag=ufrag, pwd=pwd, client=bool(client),
        fingerprints=tuple((str(h), str(f)) for h, f in fingerprints),
    )  # fmt: skip


def _pstats_out(s: PartyStats) -> _Wire:
    return (
        s.packets_in, s.bytes_in, s.packets_out, s.bytes_out, s.lost, s.jitter_ms,
        s.dropped_source, s.srtp_failures, s.latched,
    )  # fmt: skip


def _pstats_in(value: Any) -> PartyStats:
    packets_in, bytes_in, packets_out, bytes_out, lost, jitter, dropped, failures, latched = value
    return PartyStats(
        packets_in=packets_in, bytes_in=bytes_in, packets_out=packets_out,
        bytes_out=bytes_out, lost=lost, jitter_ms=jitter, dropped_source=dropped,
        srtp_failures=failures, latched=_addr(latched),
    )  # fmt: skip


def _pstats_record(s: PartyStats) -> dict[str, Any]:
    return {
        "packets_in": s.packets_in, "bytes_in": s.bytes_in, "packets_out": s.packets_out,
        "bytes_out": s.bytes_out, "lost": s.lost, "jitter_ms": s.jitter_ms,
        "dropped_source": s.dropped_source, "srtp_failures": s.srtp_failures,
        "latched": s.latched,
    }  # fmt: skip


def _wire(msg: Command | Event | Totals) -> _Wire:
    if isinstance(msg, Update):
        return (
            _UPDATE, msg.session,
            tuple((s.index, _party_out(s.a), _party_out(s.b), s.passthrough)
                  for s in msg.streams),
        )  # fmt: skip
    if isinstance(msg, Delete):
        return (_DELETE, msg.session)
    if isinstance(msg, Identity):
        return (_IDENTITY, msg.certificate, msg.private_key)
    if isinstance(msg, Stats):
        return (
            _STATS, msg.session,
            tuple((s.index, _pstats_out(s.a), _pstats_out(s.b)) for s in msg.streams),
        )  # fmt: skip
    if isinstance(msg, Dtmf | SendDtmf):
        tag = _DTMF if isinstance(msg, Dtmf) else _SEND_DTMF
        return (tag, msg.session, msg.index, msg.party, msg.digit, msg.duration_ms)
    if isinstance(msg, Totals):
        return (_TOTALS, *(getattr(msg, name) for name in TOTALS_FIELDS))
    return (_TIMEOUT, msg.session, msg.idle)


def encode(msg: Command | Event | Totals) -> bytes:
    """One message as a frame (length, then its marshalled tuple)."""
    body = marshal.dumps(_wire(msg), _MARSHAL_VERSION)
    return HEADER.pack(len(body)) + body


def decode(frame: bytes) -> Command | Event | Totals:
    """One whole frame (as ``encode`` makes it) back into its message; ValueError (or
    TypeError) if it is not one."""
    if len(frame) < HEADER.size or HEADER.unpack_from(frame)[0] != len(frame) - HEADER.size:
        raise ValueError("truncated media control frame")
    return decode_body(memoryview(frame)[HEADER.size :])


def decode_body(body: bytes | memoryview) -> Command | Event | Totals:
    """The body of one frame (``Frames.feed``) back into its message; ValueError (or
    TypeError, EOFError) if it is not one."""
    d = marshal.loads(body)
    if type(d) is not tuple or not d:
        raise ValueError("a media control message is a tuple")
    kind = d[0]
    if kind == _UPDATE:
        _, session, streams = d
        return Update(
            session=session,
            streams=tuple(
                Stream(index=index, a=_party_in(a), b=_party_in(b), passthrough=passthrough)
                for index, a, b, passthrough in streams
            ),
        )
    if kind == _DELETE:
        _, session = d
        return Delete(session=session)
    if kind == _IDENTITY:
        _, certificate, private_key = d
        return Identity(certificate=certificate, private_key=private_key)
    if kind == _STATS:
        _, session, streams = d
        return Stats(
            session=session,
            streams=tuple(
                StreamStats(index=index, a=_pstats_in(a), b=_pstats_in(b))
                for index, a, b in streams
            ),
        )
    if kind == _TIMEOUT:
        _, session, idle = d
        return Timeout(session=session, idle=idle)
    if kind in (_DTMF, _SEND_DTMF):
        _, session, index, party, digit, duration_ms = d
        if party not in ("a", "b"):
            raise ValueError(f"bad party {party!r}")
        cls = Dtmf if kind == _DTMF else SendDtmf
        return cls(session=session, index=index, party=party, digit=digit, duration_ms=duration_ms)
    if kind == _TOTALS:
        return Totals(**dict(zip(TOTALS_FIELDS, d[1:], strict=True)))
    raise ValueError(f"unknown media control message type {kind!r}")


class Frames:
    """Cuts a byte stream into frame bodies (for ``decode_body``)."""

    __slots__ = ("_rest",)

    def __init__(self) -> None:
        self._rest = b""

    def feed(self, data: bytes) -> list[memoryview]:
        """The bodies of the frames ``data`` completes, in order; ValueError if a frame is
        longer than ``MAX_FRAME`` (the stream cannot be resynchronized)."""
        if self._rest:
            data = self._rest + data
        view = memoryview(data)
        bodies: list[memoryview] = []
        size = len(data)
        pos = 0
        unpack = HEADER.unpack_from
        while size - pos >= 4:
            (length,) = unpack(data, pos)
            if length > MAX_FRAME:
                raise ValueError(f"media control frame of {length} bytes")
            end = pos + 4 + length
            if end > size:
                break
            bodies.append(view[pos + 4 : end])
            pos = end
        self._rest = data[pos:] if pos < size else b""
        return bodies
