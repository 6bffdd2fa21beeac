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

On the wire each message is one JSON object per line (``encode`` / ``decode``); keys are
base64. Nothing here does I/O.
"""

from __future__ import annotations

import base64
import json
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
        {"index": s.index, "caller": _pstats_out(s.a), "callee": _pstats_out(s.b)}
        for s in stats.streams
    ]


Command = Update | Delete | SendDtmf
Event = Stats | Timeout | Dtmf


# -- wire format -----------------------------------------------------------------------------


def _addr(value: Any) -> Address | None:
    return None if value is None else (str(value[0]), int(value[1]))


def _key_out(key: SrtpKey | None) -> dict[str, str] | None:
    if key is None:
        return None
    return {"suite": key.suite, "key": base64.b64encode(key.key_salt).decode("ascii")}


def _key_in(value: Any) -> SrtpKey | None:
    if value is None:
        return None
    return SrtpKey(suite=str(value["suite"]), key_salt=base64.b64decode(value["key"]))


def _codec_out(c: CodecSpec | None) -> dict[str, Any] | None:
    if c is None:
        return None
    return {
        "name": c.name, "pt": c.pt, "clock": c.clock, "channels": c.channels,
        "ptime": c.ptime, "fmtp": c.fmtp, "dtmf_pt": c.dtmf_pt, "dtmf_clock": c.dtmf_clock,
    }  # fmt: skip


def _codec_in(d: Any) -> CodecSpec | None:
    if d is None:
        return None
    return CodecSpec(
        name=str(d["name"]), pt=int(d["pt"]), clock=int(d["clock"]),
        channels=int(d["channels"]), ptime=int(d["ptime"]), fmtp=str(d["fmtp"]),
        dtmf_pt=None if d["dtmf_pt"] is None else int(d["dtmf_pt"]),
        dtmf_clock=int(d["dtmf_clock"]),
    )  # fmt: skip


def _party_out(p: Party) -> dict[str, Any]:
    return {
        "bind": p.bind, "port": p.port, "rtcp_mux": p.rtcp_mux,
        "remote": p.remote, "remote_rtcp": p.remote_rtcp,
        "recv_key": _key_out(p.recv_key), "send_key": _key_out(p.send_key), "sends": p.sends,
        "accept": p.accept, "codec": _codec_out(p.codec),
    }  # fmt: skip


def _party_in(d: dict[str, Any]) -> Party:
    return Party(
        bind=str(d["bind"]), port=int(d["port"]), rtcp_mux=bool(d["rtcp_mux"]),
        remote=_addr(d["remote"]), remote_rtcp=_addr(d["remote_rtcp"]),
        recv_key=_key_in(d["recv_key"]), send_key=_key_in(d["send_key"]), sends=bool(d["sends"]),
        accept=bool(d.get("accept", True)), codec=_codec_in(d.get("codec")),
    )  # fmt: skip


def _pstats_out(s: PartyStats) -> dict[str, Any]:
    return {
        "packets_in": s.packets_in, "bytes_in": s.bytes_in, "packets_out": s.packets_out,
        "bytes_out": s.bytes_out, "lost": s.lost, "jitter_ms": s.jitter_ms,
        "dropped_source": s.dropped_source, "srtp_failures": s.srtp_failures,
        "latched": s.latched,
    }  # fmt: skip


def _pstats_in(d: dict[str, Any]) -> PartyStats:
    return PartyStats(
        packets_in=int(d["packets_in"]), bytes_in=int(d["bytes_in"]),
        packets_out=int(d["packets_out"]), bytes_out=int(d["bytes_out"]), lost=int(d["lost"]),
        jitter_ms=float(d["jitter_ms"]), dropped_source=int(d["dropped_source"]),
        srtp_failures=int(d["srtp_failures"]), latched=_addr(d["latched"]),
    )  # fmt: skip


def encode(msg: Command | Event | Totals) -> bytes:
    """One message as a JSON line."""
    body: dict[str, Any]
    if isinstance(msg, Update):
        body = {
            "type": "update", "session": msg.session,
            "streams": [
                {"index": s.index, "a": _party_out(s.a), "b": _party_out(s.b),
                 "passthrough": s.passthrough}
                for s in msg.streams
            ],
        }  # fmt: skip
    elif isinstance(msg, Delete):
        body = {"type": "delete", "session": msg.session}
    elif isinstance(msg, Stats):
        body = {
            "type": "stats", "session": msg.session,
            "streams": [
                {"index": s.index, "a": _pstats_out(s.a), "b": _pstats_out(s.b)}
                for s in msg.streams
            ],
        }  # fmt: skip
    elif isinstance(msg, Dtmf | SendDtmf):
        body = {
            "type": "dtmf" if isinstance(msg, Dtmf) else "send_dtmf", "session": msg.session,
            "index": msg.index, "party": msg.party, "digit": msg.digit,
            "duration_ms": msg.duration_ms,
        }  # fmt: skip
    elif isinstance(msg, Totals):
        body = {"type": "totals", **{name: getattr(msg, name) for name in TOTALS_FIELDS}}
    else:
        body = {"type": "timeout", "session": msg.session, "idle": msg.idle}
    return json.dumps(body, separators=(",", ":")).encode("ascii") + b"\n"


def decode(line: bytes) -> Command | Event | Totals:
    """A JSON line back into its message; ValueError (or KeyError) if it is not one."""
    d = json.loads(line)
    kind = d["type"]
    if kind == "update":
        return Update(
            session=str(d["session"]),
            streams=tuple(
                Stream(index=int(s["index"]), a=_party_in(s["a"]), b=_party_in(s["b"]),
                       passthrough=bool(s["passthrough"]))
                for s in d["streams"]
            ),
        )  # fmt: skip
    if kind == "delete":
        return Delete(session=str(d["session"]))
    if kind == "stats":
        return Stats(
            session=str(d["session"]),
            streams=tuple(
                StreamStats(index=int(s["index"]), a=_pstats_in(s["a"]), b=_pstats_in(s["b"]))
                for s in d["streams"]
            ),
        )
    if kind == "timeout":
        return Timeout(session=str(d["session"]), idle=float(d["idle"]))
    if kind in ("dtmf", "send_dtmf"):
        party = str(d["party"])
        if party not in ("a", "b"):
            raise ValueError(f"bad party {party!r}")
        cls = Dtmf if kind == "dtmf" else SendDtmf
        return cls(
            session=str(d["session"]), index=int(d["index"]), party=party,
            digit=str(d["digit"]), duration_ms=int(d["duration_ms"]),
        )  # fmt: skip
    if kind == "totals":
        return Totals(**{name: int(d[name]) for name in TOTALS_FIELDS})
    raise ValueError(f"unknown media control message type {kind!r}")
