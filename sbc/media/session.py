"""Media anchoring: every offer and answer is rewritten so that all media flows through the
SBC's relay. Sans-I/O.

Why one module of about 820 lines: an offer and its answer rewrite the same per-stream
state (ports, keys, codecs, the state to restore if the offer is refused, RFC 3264 8); the
codec decisions themselves are in codec_policy.py.

Each call has a ``MediaSession``: per m-line a ``_Stream`` with two parties, ``a`` on the
caller's leg and ``b`` on the callee's. For each party the SBC holds a pair of relay ports
(RTP on an even port, RTCP on the next, RFC 3550 11) on the side facing it, the address the
party's SDP gave, and the SRTP keys of that leg: the party's own a=crypto (what it sends is
decrypted with it) and a fresh one of the SBC's (what the relay sends it is encrypted with
it; RFC 4568 6.1: each side's key protects what that side sends). The other leg's key is
never forwarded. What the workers must do becomes a ``control.Update`` (``Delete``,
``SendDtmf``) that the core takes (``take_commands``) and returns as an action; which worker
owns a call follows from the port subrange its ports come from.

Offer/answer (RFC 3264): an offer from one party is rewritten towards the other with the
SBC's ports, address and keys on that side; the answer comes back rewritten likewise. The
B2BUA says which is which (``offer`` / ``answer``) and when an offer was refused
(``rejected``: the previous state comes back, RFC 3264 8: a failed re-offer changes
nothing).
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sbc.media import codec_policy
from sbc.media.codec_policy import DEFAULT_CODECS, Offered
from sbc.media.control import (
    CodecSpec,
    Command,
    Delete,
    Party,
    SendDtmf,
    SrtpKey,
    Stream,
    Update,
    WebRtc,
)
from sbc.sdp.sdes import SUPPORTED_SUITES, Crypto
from sbc.sdp.sdp import Media, Origin, SdpError, Session

log = logging.getLogger("sbc.media")

SRTP_POLICIES = ("mandatory", "optional", "off")
# Attributes that name end-to-end keying: the SBC then relays the packets untouched:
# DTLS-SRTP (RFC 5763 5), MIKEY (RFC 4567), ZRTP (RFC 6189 8).
END_TO_END_KEYING = frozenset({"fingerprint", "key-mgmt", "zrtp-hash"})
# ICE (RFC 8839 5) is removed: the parties are to use the relay, not each other.
ICE_ATTRIBUTES = frozenset({
    "candidate", "ice-ufrag", "ice-pwd", "ice-options", "ice-lite", "ice-mismatch",
    "remote-candidates", "end-of-candidates", "ice-pacing",
})  # fmt: skip
# What names the far party's network in a media description: ICE, and a=rtcp with its
# address (the SBC's RTCP port is RTP + 1, the RFC 3550 default).
_FAR_NETWORK = ICE_ATTRIBUTES | {"rtcp"}
RTP_PROTOS = frozenset({"RTP/AVP", "RTP/AVPF", "RTP/SAVP", "RTP/SAVPF"})
# WebRTC media (RFC 8829 5.1.2, RFC 5764 8): SRTP keyed by DTLS over ICE. The SBC terminates
# it on the browser's leg (ICE-lite, DTLS-SRTP in the relay) and speaks SDES-SRTP or RTP on
# the other; DTLS-SRTP without ICE is a SIP phone's end-to-end keying and passes untouched.
WEBRTC_PROTO = "UDP/TLS/RTP/SAVPF"
WEBRTC_PROTOS = frozenset({WEBRTC_PROTO, "UDP/TLS/RTP/SAVP"})
# What only the WebRTC leg means (RFC 8829 5.2.1): DTLS (RFC 8122, RFC 8842), BUNDLE and
# mid (RFC 8843, RFC 5888), RTP header extensions and SSRC signalling (RFC 8285, RFC 5576,
# RFC 8830), RTCP feedback and reduced-size RTCP (RFC 4585, RFC 5506) of the browser.
_WEBRTC_MEDIA = frozenset({
    "fingerprint", "setup", "tls-id", "mid", "extmap", "extmap-allow-mixed", "msid", "ssrc",
    "ssrc-group", "rtcp-fb", "rtcp-rsize", "connection",
})  # fmt: skip
_WEBRTC_SESSION = frozenset({
    "fingerprint", "setup", "tls-id", "group", "msid-semantic", "extmap-allow-mixed",
})  # fmt: skip
# RFC 8445 5.1.2.1: priority of a host candidate (type preference 126, local preference
# 65535, component 1).
_HOST_PRIORITY = (1 << 24) * 126 + (1 << 8) * 65535 + 256 - 1


@dataclass(frozen=True, slots=True, kw_only=True)
class TranscodeCounts:
    calls: int = 0  # calls holding a place under max_transcoded_calls now
    streams: int = 0  # streams transcoded now
    streams_total: int = 0  # streams that were transcoded, since the start


class MediaRefused(Exception):
    """An offer the SBC cannot take (488 Not Acceptable Here, RFC 3261 21.4.26); str() is
    the reason phrase."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SideMedia:
    """How media is done facing one side (access, core, peer)."""

    bind: str  # local address of the relay ports on this side
    advertise: str  # the address written into SDP c= and o= towards this side
    srtp: str = "off"  # mandatory | optional | off
    # Transcodable codecs this side may be offered, in order of preference (names
    # of control.TRANSCODABLE). Other codecs pass as offered.
    codecs: tuple[str, ...] = DEFAULT_CODECS


@dataclass(frozen=True, slots=True, kw_only=True)
class MediaPolicy:
    sides: dict[str, SideMedia]
    ports: tuple[int, int] = (20000, 30000)
    workers: int = 1
    # Suites the SBC offers, in order of preference (RFC 4568 6.2, RFC 7714 14.2).
    suites: tuple[str, ...] = ("AES_CM_128_HMAC_SHA1_80", "AES_CM_128_HMAC_SHA1_32")
    # SDES offers keep their keys end to end: SRTP is relayed unchanged (addresses only).
    srtp_passthrough: bool = False
    # Calls with a transcoded stream at once; 0: no transcoding at all.
    max_transcoded_calls: int = 100
    # The fingerprint of the media workers' DTLS certificate as a=fingerprint writes it
    # ("sha-256 AB:CD:...", RFC 8122 5); empty: no WebRTC (such offers are refused).
    dtls_fingerprint: str = ""


class PortPool:
    """Even RTP ports (RTCP on the next one) of ``[media] ports``, split into one contiguous
    subrange per worker; the worker owning a port is the one that binds it."""

    def __init__(self, first: int, last: int, workers: int) -> None:
        first += first % 2
        pairs = (last - first + 1) // 2
        if workers < 1 or pairs < workers:
            raise ValueError(f"port range {first}-{last} too small for {workers} workers")
        per = pairs // workers
        self._free: list[deque[int]] = []
        for w in range(workers):
            lo = first + 2 * per * w
            # First in, first out: a port comes back into use only after all the others of
            # its worker, so late packets of the call that had it (a phone still sending
            # after BYE) cannot meet the next call's latch window on it.
            self._free.append(deque(range(lo, lo + 2 * per, 2)))
        self.in_use = 0
        self._next = 0

    def pick_worker(self) -> int:
        """Round-robin over the workers with free ports."""
        n = len(self._free)
        for i in range(n):
            w = (self._next + i) % n
            if self._free[w]:
                self._next = (w + 1) % n
                return w
        raise MediaRefused("No Media Ports Available")

    def take(self, worker: int) -> int:
        free = self._free[worker]
        if not free:
            raise MediaRefused("No Media Ports Available")
        self.in_use += 1
        return free.popleft()

    def give(self, worker: int, port: int) -> None:
        self.in_use -= 1
        self._free[worker].append(port)

    def claim(self, port: int) -> int:
        """Take ``port`` itself (a session kept across a restart binds its ports again);
        the worker whose share it is. MediaRefused if it is not free in any."""
        for worker, free in enumerate(self._free):
            if port in free:
                free.remove(port)
                self.in_use += 1
                return worker
        raise MediaRefused(f"Media Port {port} Not Free")


@dataclass(slots=True)
class _Party:
    side: str
    port: int | None = None
    remote: tuple[str, int] | None = None
    remote_rtcp: tuple[str, int] | None = None
    rtcp_mux: bool = False
    sends: bool = True
    recv_key: SrtpKey | None = None  # the party's own key (its a=crypto)
    send_key: SrtpKey | None = None  # the SBC's key towards it
    offered: dict[int, Crypto] = field(default_factory=dict)  # our offer's crypto by tag
    proto: str = "RTP/AVP"  # the transport protocol of the party's last offer
    awaiting: bool = False  # offered SRTP, not answered yet: its packets are dropped
    codec: CodecSpec | None = None  # this leg's codec while the stream is transcoded
    # A WebRTC party (a browser): the relay is its ICE-lite agent and DTLS-SRTP peer.
    webrtc: bool = False
    ice_ufrag: str = ""  # the SBC's ICE credentials towards it (kept: no ICE restart)
    ice_pwd: str = ""
    fingerprints: tuple[tuple[str, str], ...] = ()  # its certificate's, from its SDP
    dtls_client: bool = False  # the SBC's DTLS role towards it (RFC 5763 5)
    mid: str = ""  # the m-line's a=mid (RFC 5888): echoed in the SBC's answer
    remote_ufrag: str = ""  # the browser's ICE username fragment (a change: ICE restart)
    webrtc_up: bool = False  # an offer or answer of the browser set its DTLS and ICE

    def spec(self, bind: str) -> Party:
        assert self.port is not None
        webrtc = None
        if self.webrtc:
            webrtc = WebRtc(
                ufrag=self.ice_ufrag, pwd=self.ice_pwd, client=self.dtls_client,
                fingerprints=self.fingerprints,
            )  # fmt: skip
        return Party(
            bind=bind, port=self.port, rtcp_mux=self.rtcp_mux or self.webrtc,
            remote=self.remote, remote_rtcp=self.remote_rtcp, recv_key=self.recv_key,
            send_key=self.send_key, sends=self.sends, accept=not self.awaiting,
            codec=self.codec, webrtc=webrtc,
        )  # fmt: skip


@dataclass(slots=True)
class _Stream:
    index: int
    a: _Party
    b: _Party
    passthrough: bool = False
    active: bool = True  # false: rejected (port 0), no ports
    offered: Offered | None = None  # the last offer's codecs, for its answer

    def clone(self) -> _Stream:
        """A copy to restore if the offer is refused (cheaper than copy.deepcopy)."""
        a = dataclasses.replace(self.a, offered=dict(self.a.offered))
        b = dataclasses.replace(self.b, offered=dict(self.b.offered))
        return dataclasses.replace(self, a=a, b=b)


@dataclass(slots=True)
class _Origin:
    """The SBC's o= line towards one party (RFC 4566 5.2, RFC 3264 8: the version grows
    with every change of what the SBC sends it)."""

    session_id: str
    version: int
    last: bytes = b""


# The o= session id and first version towards each party: (a id, a version, b id, b version).
OriginIds = tuple[int, int, int, int]


class MediaSession:
    def __init__(
        self, call: str, worker: int, a_side: str, b_side: str, origin_ids: OriginIds
    ) -> None:
        self.call = call
        self.worker = worker
        self.sides = (a_side, b_side)
        self.streams: list[_Stream] = []
        self.saved: list[_Stream] | None = None  # state before the pending offer
        # Holds one of [media] max_transcoded_calls: a stream is transcoded, or the pending
        # offer can only be met by a codec the SBC added.
        self.transcoding = False
        self.transcoded: set[int] = set()  # m-line indices transcoded at some time
        a_id, a_version, b_id, b_version = origin_ids
        self.origins = {"a": _Origin(str(a_id), a_version), "b": _Origin(str(b_id), b_version)}


def _origin_ids() -> OriginIds:
    """The o= session id and first version towards each party (RFC 4566 5.2: a session id
    unique enough, a version that only grows), from one read of the random source."""
    r = int.from_bytes(os.urandom(21), "big")  # 2 x (62 + 20) bits
    return r & _ID_MASK, (r >> 62) & _VERSION_MASK, (r >> 82) & _ID_MASK, r >> 144


_ID_MASK = 2**62 - 1
_VERSION_MASK = 2**20 - 1


def _is_sdp(content_type: str | None) -> bool:
    return content_type is not None and content_type.split(";", 1)[0].strip().lower() == (
        "application/sdp"
    )


def _is_null(address: str) -> bool:
    """RFC 3264 8.4 (and RFC 2543 hold): c=0.0.0.0 means "do not send to me"."""
    return address in ("0.0.0.0", "::")


def _savp(proto: str) -> str:
    return proto.replace("RTP/AVP", "RTP/SAVP") if "SAVP" not in proto else proto


def _avp(proto: str) -> str:
    return proto.replace("RTP/SAVP", "RTP/AVP")


class MediaController:
    """The B2BUA's media seam: rewrites SDP, keeps the sessions, drives the workers."""

    def __init__(
        self, policy: MediaPolicy, *, origin_ids: Callable[[], OriginIds] | None = None
    ) -> None:
        self.policy = policy
        self.pool = PortPool(policy.ports[0], policy.ports[1], policy.workers)
        self._origin_ids = origin_ids or _origin_ids  # tests give predictable ones
        # Commands for the workers, (worker, command) in order, until the core takes them
        # (``take_commands``) and returns them with the actions of the call that caused them.
        self._outbox: list[tuple[int, Command]] = []
        self.sessions: dict[str, MediaSession] = {}
        self.transcoded_calls = 0  # sessions holding a place under max_transcoded_calls
        self.transcoded_streams_total = 0  # streams that were transcoded, since the start

    def state_size(self) -> dict[str, int]:
        """For leak checks: all zero when no call is up."""
        return {"media_sessions": len(self.sessions), "media_ports": self.pool.in_use}

    def take_commands(self) -> list[tuple[int, Command]]:
        """The commands for the workers since the last call, in order."""
        out, self._outbox = self._outbox, []
        return out

    # -- the seam ----------------------------------------------------------------------------
    def offer(
        self,
        call: str,
        sides: tuple[str, str],
        toward_caller: bool,
        body: bytes,
        content_type: str | None,
        webrtc: bool = False,
    ) -> bytes:
        """An offer from one party, rewritten for the other; MediaRefused if it cannot be
        met (the B2BUA answers 488). ``webrtc``: the party the offer goes to is a browser
        (reached over a WebSocket, RFC 7118): it gets WebRTC-shaped SDP (RFC 8829)."""
        if not _is_sdp(content_type):
            return body
        try:
            sdp = Session.parse(body)
        except SdpError as exc:
            raise MediaRefused(f"Bad SDP: {exc}") from None
        session = self.sessions.get(call)
        if session is None:
            session = MediaSession(call, self.pool.pick_worker(), *sides, self._origin_ids())
            self.sessions[call] = session
        src, dst = ("b", "a") if toward_caller else ("a", "b")
        session.saved = [stream.clone() for stream in session.streams]
        try:
            out = self._rewrite_offer(session, sdp, src, dst, webrtc)
        except MediaRefused:
            self.rejected(call)
            raise
        self._update(session)
        return out

    def answer(
        self,
        call: str,
        sides: tuple[str, str],
        toward_caller: bool,
        body: bytes,
        content_type: str | None,
    ) -> bytes:
        """The answer to the pending (or last) offer, rewritten for the offerer. An answer
        the SBC cannot use is passed with its streams rejected (port 0), never with an
        address of the far side."""
        if not _is_sdp(content_type):
            return body
        session = self.sessions.get(call)
        src, dst = ("b", "a") if toward_caller else ("a", "b")
        if session is None:
            # No offer seen (it was not SDP): take this as an offer instead.
            try:
                return self.offer(call, sides, toward_caller, body, content_type)
            except MediaRefused as exc:
                log.warning("media answer without offer refused: %s", exc, extra={"call": call})
                return b""
        try:
            sdp = Session.parse(body)
        except SdpError as exc:
            log.warning("bad SDP answer: %s", exc, extra={"call": call})
            sdp = None
        out = self._rewrite_answer(session, sdp, src, dst)
        session.saved = None
        self._hold_slot(session, self._transcodes(session))
        for stream in session.streams:
            if (
                stream.active and stream.index not in session.transcoded
                and codec_policy.transcodes(stream.a.codec, stream.b.codec)
            ):  # fmt: skip
                session.transcoded.add(stream.index)
                self.transcoded_streams_total += 1
        self._update(session)
        return out

    def rejected(self, call: str) -> None:
        """The pending offer got no answer (a non-2xx final response): the state before it
        comes back, and ports taken for it are returned (RFC 3264 8)."""
        session = self.sessions.get(call)
        if session is None or session.saved is None:
            return
        before = {p for s in session.saved for p in (s.a.port, s.b.port) if p is not None}
        for stream in session.streams:
            for party in (stream.a, stream.b):
                if party.port is not None and party.port not in before:
                    self.pool.give(session.worker, party.port)
        session.streams = session.saved
        session.saved = None
        self._hold_slot(session, self._transcodes(session))
        if any(s.active for s in session.streams):
            self._update(session)
        else:
            self.release(call)

    def release(self, call: str) -> bool:
        """The call is over: its ports go back to the pool, the worker deletes the session
        and answers with its statistics (True: they will follow)."""
        session = self.sessions.pop(call, None)
        if session is None:
            return False
        self._hold_slot(session, False)
        for stream in session.streams:
            for party in (stream.a, stream.b):
                if party.port is not None:
                    self.pool.give(session.worker, party.port)
                    party.port = None
        self._outbox.append((session.worker, Delete(session=call)))
        return True

    def keeps(self, call: str) -> bool:
        """Whether the call's media can be taken over by a restarted SBC: not with a browser
        party (its ICE and DTLS state is the worker's, and its WebSocket dies anyway)."""
        session = self.sessions.get(call)
        return session is None or not any(s.a.webrtc or s.b.webrtc for s in session.streams)

    def export(self, call: str) -> dict[str, Any] | None:
        """The call's session as plain values (sbc/calls/persist.py), as the last answer
        left it (an offer pending is not in it); None without one."""
        session = self.sessions.get(call)
        if session is None:
            return None
        streams = session.saved if session.saved is not None else session.streams
        return {
            "sides": list(session.sides),
            "origins": {k: [o.session_id, o.version] for k, o in session.origins.items()},
            "transcoding": session.transcoding,
            "transcoded": sorted(session.transcoded),
            "streams": [
                {"index": s.index, "passthrough": s.passthrough, "active": s.active,
                 "a": _party_value(s.a), "b": _party_value(s.b)}
                for s in streams
            ],
        }  # fmt: skip

    def restore(self, call: str, value: dict[str, Any]) -> None:
        """Take back a session ``export`` gave: its ports (from whichever worker now has
        them in its share), keys and addresses, sent to that worker to bind again.
        MediaRefused if a port is not free, ValueError (KeyError, TypeError) for values
        that are not an export's."""
        streams = [
            _Stream(int(v["index"]), _party_of(v["a"]), _party_of(v["b"]),
                    passthrough=bool(v["passthrough"]), active=bool(v["active"]))
            for v in value["streams"]
        ]  # fmt: skip
        ports = [p.port for s in streams for p in (s.a, s.b) if p.port is not None]
        claimed: list[tuple[int, int]] = []  # (worker, port)
        try:
            for port in ports:
                claimed.append((self.pool.claim(port), port))
            if len({w for w, _ in claimed}) > 1:
                raise MediaRefused("Media Ports In Several Workers' Shares")
        except MediaRefused:
            for worker, port in claimed:
                self.pool.give(worker, port)
            raise
        a_side, b_side = value["sides"]
        worker = claimed[0][0] if claimed else 0
        session = MediaSession(call, worker, str(a_side), str(b_side), self._origin_ids())
        for key, (session_id, version) in value["origins"].items():
            session.origins[str(key)] = _Origin(str(session_id), int(version))
        session.streams = streams
        session.transcoded = {int(i) for i in value["transcoded"]}
        self.sessions[call] = session
        self._hold_slot(session, bool(value["transcoding"]))
        self._update(session)

    def transcoded(self, call: str) -> int:
        """How many of the call's streams were transcoded at some time (its record)."""
        session = self.sessions.get(call)
        return 0 if session is None else len(session.transcoded)

    def transcoding(self) -> TranscodeCounts:
        """What /metrics shows of transcoding now and since the start."""
        streams = sum(
            1 for session in self.sessions.values() for s in session.streams
            if s.active and codec_policy.transcodes(s.a.codec, s.b.codec)
        )  # fmt: skip
        total = self.transcoded_streams_total
        return TranscodeCounts(calls=self.transcoded_calls, streams=streams, streams_total=total)

    def refused_warning(self, call: str) -> str | None:
        """Why an answerer may have refused the pending offer with 488 or 606: a Warning
        value with warn-code 305, Incompatible media format (RFC 3261 20.43, 21.4.26), or
        None if the call has no pending offer the codec policy looked at."""
        session = self.sessions.get(call)
        if session is None or session.saved is None:
            return None
        for stream in session.streams:
            offered = stream.offered
            if offered is None:
                continue
            names = [_token(f.name or str(f.pt)) for f in offered.formats if not f.auxiliary]
            if not any(f.transcodable for f in offered.formats):
                why = f"no offered codec ({' '.join(names)}) is one the SBC transcodes"
            elif offered.at_cap:
                why = f"transcoding capacity reached (offered: {' '.join(names)})"
            else:
                tried = names + [f.name for f in offered.added]
                why = f"the answerer takes none of {' '.join(tried)}"
            return f'305 sbc "Incompatible media format: {why}"'
        return None

    # -- offers ------------------------------------------------------------------------------
    def _rewrite_offer(
        self, session: MediaSession, sdp: Session, src: str, dst: str, webrtc: bool
    ) -> bytes:
        sides = dict(zip(("a", "b"), session.sides, strict=True))
        src_side = self.policy.sides[sides[src]]
        dst_side = self.policy.sides[sides[dst]]
        session_keying = bool(sdp.attribute_names() & END_TO_END_KEYING)
        usable = 0
        for i, m in enumerate(sdp.media):
            if i >= len(session.streams):
                session.streams.append(_Stream(i, _Party(sides["a"]), _Party(sides["b"])))
            stream = session.streams[i]
            me: _Party = getattr(stream, src)
            other: _Party = getattr(stream, dst)
            if m.port == 0 or not self._relayable(m):
                self._close_stream(session, stream)
                m.port = 0
                _strip(m)
                continue
            if webrtc:
                other.webrtc = True
            me.webrtc = _is_webrtc(sdp, m)
            # Keys end to end: keying the SBC cannot take part in, or SDES
            # keys the policy leaves to the parties (srtp_passthrough).
            names = m.attribute_names()
            end_to_end = session_keying or bool(names & END_TO_END_KEYING)
            if other.webrtc and not me.webrtc and end_to_end:
                # DTLS-SRTP without ICE, MIKEY or ZRTP keys cannot reach a browser, which
                # keys its media with the SBC's DTLS (RFC 8827 6.5); nor can the SBC take
                # part in them.
                raise MediaRefused("End-To-End Keys Not Possible Towards A Browser")
            stream.passthrough = not (me.webrtc or other.webrtc) and (
                end_to_end or (self.policy.srtp_passthrough and "crypto" in names)
            )
            stream.offered = None
            if not stream.passthrough and _transcodable_media(m):
                self._offer_codecs(session, stream, m, src, dst_side)
            self._learn(sdp, m, me)
            me.rtcp_mux = m.has("rtcp-mux")
            me.proto = m.proto
            # The offerer's leg: its key, or a refusal its side's policy demands.
            if me.webrtc:
                self._take_webrtc(sdp, m, me, offer=True)
                m.remove_all(_WEBRTC_MEDIA)
                m.proto = "RTP/SAVP"  # what follows treats it as an SRTP offer
            elif not stream.passthrough and m.proto in RTP_PROTOS:
                self._take_offer_crypto(m, me, src_side, stream)
            # The answerer's leg: the SBC's own offer.
            self._ports(session, stream)
            assert other.port is not None
            conn = sdp.media_connection(m)
            held = conn is not None and _is_null(conn[1])
            _strip(m)
            if other.webrtc:
                self._webrtc_sdp(m, other, dst_side, "actpass", i)
                other.recv_key = other.send_key = None
                other.offered = {}
                other.awaiting = False
                other.rtcp_mux = True
                # ICE needs an address to check: hold is the direction attribute alone.
                if held and sdp.media_direction(m) == "sendrecv":
                    m.set_direction("inactive")
                held = False
            elif not stream.passthrough and m.proto in RTP_PROTOS:
                # A re-offer on an SRTP leg keeps the SBC's keys (RFC 4568 7.1.4: the
                # session goes on with the same crypto when nothing changed), and the
                # leg stays usable until the answer: a phone that keeps its own key (as
                # baresip does) must still decrypt what the relay sends after a hold.
                previous = other.offered
                established = other.send_key is not None and other.recv_key is not None
                other.offered = {}
                other.awaiting = False
                m.remove("crypto")
                # mandatory: RTP/SAVP; optional: what the offerer used (SRTP, best-effort
                # SDES in RTP/AVP, or plain RTP); off: plain RTP.
                mirror = dst_side.srtp == "optional" and (me.recv_key is not None or me.webrtc)
                if dst_side.srtp == "off" or not (dst_side.srtp == "mandatory" or mirror):
                    m.proto = _avp(m.proto)
                    other.send_key = None
                else:
                    secure = dst_side.srtp == "mandatory" or "SAVP" in me.proto
                    m.proto = _savp(m.proto) if secure else _avp(m.proto)
                    for tag, suite in enumerate(self.policy.suites, start=1):
                        old = previous.get(tag)
                        same = old is not None and old.suite.upper() == suite.upper()
                        crypto = old if same and old is not None else Crypto.generate(tag, suite)
                        other.offered[tag] = crypto
                        m.add("crypto", str(crypto))
                    if not established:
                        other.send_key = None
                        other.awaiting = True
            stream.active = True
            usable += 1
            m.port = other.port
            _connect(sdp, m, dst_side.advertise, held)
        if usable == 0 and sdp.media:
            raise MediaRefused("No Acceptable Media")
        for stream in session.streams[len(sdp.media) :]:
            self._close_stream(session, stream)
        return self._finish(session, sdp, dst, dst_side)

    def _take_offer_crypto(self, m: Media, me: _Party, side: SideMedia, stream: _Stream) -> None:
        """RFC 4568 7.1.1 (answerer): pick the first offered crypto line the SBC supports;
        the SBC answers it later with the same tag and suite and a key of its own."""
        offers = m.attributes("crypto")
        secure = "SAVP" in m.proto
        chosen: Crypto | None = None
        reason = ""
        for value in offers:
            try:
                crypto = Crypto.parse(value)
            except SdpError as exc:
                reason = str(exc)
                continue
            if crypto.suite.upper() not in SUPPORTED_SUITES:
                reason = f"unsupported crypto suite {crypto.suite}"
                continue
            if crypto.mki is not None or crypto.keys != 1:
                reason = "MKI not supported"  # RFC 4568 6.1: one key, no MKI, here
                continue
            chosen = crypto
            break
        if side.srtp == "off":
            if secure:
                raise MediaRefused("SRTP Not Allowed")
            chosen = None
        elif chosen is None and (secure or side.srtp == "mandatory"):
            if offers and reason:
                raise MediaRefused(f"No Usable Crypto: {reason}"[:100])
            raise MediaRefused("SRTP Required")
        if chosen is None:
            me.recv_key = None
            me.send_key = None
            me.offered = {}
            return
        key = SrtpKey(suite=chosen.suite.upper(), key_salt=chosen.key_salt)
        me.recv_key = key
        # Our answer key towards the offerer: kept across re-offers with the same suite.
        ours = me.offered.get(chosen.tag)
        if ours is None or ours.suite != key.suite or me.send_key is None:
            ours = Crypto.generate(chosen.tag, chosen.suite)
        me.offered = {chosen.tag: ours}
        me.send_key = SrtpKey(suite=ours.suite, key_salt=ours.key_salt)

    def _offer_codecs(
        self, session: MediaSession, stream: _Stream, m: Media, src: str, side: SideMedia
    ) -> None:
        """The offer's codecs filtered by the answerer's side list, with that side's codecs
        the offer lacks appended when the SBC can transcode from one of the offerer's (RFC
        3264 5.1, 6.1); the transcoding cap decides whether it may."""
        formats = codec_policy.formats_of(m)
        if formats is None:
            return
        other: _Party = stream.b if src == "a" else stream.a
        add = codec_policy.to_add(formats, side.codecs, other.codec)
        only_transcoding = codec_policy.needs_transcoding(formats, side.codecs)
        cap = self.policy.max_transcoded_calls
        at_cap = not session.transcoding and self.transcoded_calls >= cap
        if add and at_cap:
            # Over the cap the SBC adds nothing; an offer that only transcoding could meet
            # is refused (488, RFC 3261 21.4.26) rather than degrading every call.
            if only_transcoding:
                raise MediaRefused("Transcoding Capacity Reached" if cap else "No Common Codec")
            add = []
        added = codec_policy.rewrite_offer(m, formats, side.codecs, add, other.codec)
        if added and only_transcoding:
            # The answer can only be transcoded: the slot is held while it is pending. An
            # offer that keeps a shared codec holds none until an answer picks an added one.
            self._hold_slot(session, True)
        stream.offered = Offered(
            offerer=src, formats=tuple(formats), ptime=codec_policy.ptime_of(m), added=added,
            at_cap=bool(at_cap and cap),
        )  # fmt: skip

    def _answer_codecs(
        self, stream: _Stream, m: Media, me: _Party, other: _Party, dst: str, dst_side: str
    ) -> None:
        """RFC 3264 6.1: the answerer's codec is the first of its m-line. One
        the offerer offered: the payload passes untouched (no codec on either party). One
        the SBC added: the stream is transcoded between it and the offerer's best codec,
        and the offerer is answered with its own codec."""
        offered = stream.offered
        formats = codec_policy.formats_of(m)
        chosen = next((f for f in formats or () if not f.auxiliary), None)
        if (
            offered is not None and chosen is not None and offered.offerer == dst
            and offered.has(chosen.name) and not stream.passthrough and _transcodable_media(m)
        ):  # fmt: skip
            # A shared codec, telephone-event on one side only: DTMF interworking.
            dtmf = codec_policy.dtmf_interworking(offered, formats or (), chosen)
            if dtmf is not None:
                shared, offered_dtmf, answered_dtmf = dtmf
                ptime = codec_policy.ptime_of(m)
                chosen = dataclasses.replace(chosen, clock=chosen.clock or shared.clock)
                me.codec = codec_policy.spec(chosen, answered_dtmf, ptime)
                other.codec = codec_policy.spec(shared, offered_dtmf, offered.ptime)
                codec_policy.rewrite_answer(m, shared, offered_dtmf, ptime)
                return
        ours = None
        if offered is not None and offered.offerer == dst and chosen is not None:
            ours = next((f for f in offered.added if f.name == chosen.name), None)
        if (
            ours is None or chosen is None or offered is None or stream.passthrough
            or offered.has(chosen.name) or not _transcodable_media(m)
        ):  # fmt: skip
            me.codec = other.codec = None
            if (
                chosen is not None and offered is not None and offered.offerer == dst
                and offered.added and not stream.passthrough and offered.has(chosen.name)
            ):  # fmt: skip
                codec_policy.drop_added(m, offered)
            return
        if not chosen.clock:  # no a=rtpmap (RFC 4566 6 wants one): what the SBC offered
            chosen = dataclasses.replace(chosen, clock=ours.clock, channels=ours.channels)
        keep = other.codec.name if other.codec is not None else None
        codec = codec_policy.best(offered.formats, self.policy.sides[dst_side].codecs, keep)
        assert codec is not None  # the SBC adds codecs only for an offerer it transcodes
        # RFC 4733: events on the legs that have them; the relay maps PTs and clocks where
        # both do, and interworks with SIP INFO where one does.
        answered_dtmf = codec_policy.dtmf_for(formats or (), chosen.clock)
        offered_dtmf = codec_policy.dtmf_for(offered.formats, codec.clock)
        me.codec = codec_policy.spec(chosen, answered_dtmf, codec_policy.ptime_of(m))
        other.codec = codec_policy.spec(codec, offered_dtmf, offered.ptime)
        codec_policy.rewrite_answer(m, codec, offered_dtmf, offered.ptime)

    # -- answers -----------------------------------------------------------------------------
    def _rewrite_answer(
        self, session: MediaSession, sdp: Session | None, src: str, dst: str
    ) -> bytes:
        sides = dict(zip(("a", "b"), session.sides, strict=True))
        dst_side = self.policy.sides[sides[dst]]
        if sdp is None:
            return b""  # nothing of it can be passed on
        for i, m in enumerate(sdp.media):
            stream = session.streams[i] if i < len(session.streams) else None
            if stream is None or not stream.active or m.port == 0:
                if stream is not None:
                    self._close_stream(session, stream)
                m.port = 0
                _strip(m)
                m.remove("crypto")
                continue
            me: _Party = getattr(stream, src)
            other: _Party = getattr(stream, dst)
            self._answer_codecs(stream, m, me, other, dst, sides[dst])
            self._learn(sdp, m, me)
            me.rtcp_mux = m.has("rtcp-mux")
            conn = sdp.media_connection(m)
            held = conn is not None and _is_null(conn[1])
            if me.webrtc and m.proto.upper() in WEBRTC_PROTOS:
                try:
                    self._take_webrtc(sdp, m, me, offer=False)
                except MediaRefused as exc:
                    # An answer the SBC cannot key (no fingerprint): the stream is refused
                    # on both legs, as for any unusable answer.
                    log.warning("WebRTC answer refused: %s", exc, extra={"call": session.call})
                    self._close_stream(session, stream)
                    m.port = 0
                    _strip(m)
                    m.remove_all(_WEBRTC_MEDIA | {"crypto"})
                    continue
                m.remove_all(_WEBRTC_MEDIA)
                m.proto = "RTP/SAVP"
            elif not stream.passthrough and m.proto in RTP_PROTOS:
                self._take_answer_crypto(m, me)
            _strip(m)
            if other.webrtc:
                m.remove("crypto")
                m.proto = other.proto
                # RFC 5763 5: the answerer's role, the opposite of the offerer's wish.
                setup = "active" if other.dtls_client else "passive"
                self._webrtc_sdp(m, other, dst_side, setup, i)
                if held and sdp.media_direction(m) == "sendrecv":
                    m.set_direction("inactive")
                held = False
            elif not stream.passthrough and m.proto in RTP_PROTOS:
                m.remove("crypto")
                # RFC 3264 6.1: the answer's protocol is the offer's.
                m.proto = other.proto
                if other.send_key is not None:
                    m.add("crypto", str(next(iter(other.offered.values()))))
            if other.rtcp_mux:
                if not m.has("rtcp-mux"):
                    m.add("rtcp-mux")  # RFC 5761 5.1.1: the SBC can multiplex
            else:
                m.remove("rtcp-mux")
            assert other.port is not None
            m.port = other.port
            _connect(sdp, m, dst_side.advertise, held)
        return self._finish(session, sdp, dst, dst_side)

    def _take_answer_crypto(self, m: Media, me: _Party) -> None:
        """RFC 4568 7.1.2 / 7.5: the answer names one of the tags the SBC offered, with the
        answerer's own key; without one, that leg is plain RTP (best-effort SRTP was
        declined) or unusable (a mandatory offer; counted and logged)."""
        me.awaiting = False
        for value in m.attributes("crypto"):
            try:
                crypto = Crypto.parse(value)
            except SdpError:
                continue
            ours = me.offered.get(crypto.tag)
            suite = crypto.suite.upper()  # RFC 4568 9.1: the ABNF is case-insensitive
            if ours is None or ours.suite != suite or crypto.mki is not None:
                continue
            me.recv_key = SrtpKey(suite=suite, key_salt=crypto.key_salt)
            me.send_key = SrtpKey(suite=ours.suite, key_salt=ours.key_salt)
            me.offered = {crypto.tag: ours}
            return
        me.recv_key = None
        me.send_key = None
        me.offered = {}

    # -- WebRTC ------------------------------------------------------------------------------
    def _take_webrtc(self, sdp: Session, m: Media, party: _Party, *, offer: bool) -> None:
        """What a browser's offer or answer says of its DTLS and ICE: its certificate's
        fingerprints (media level, else session level, RFC 8122 5), the DTLS role it
        leaves the SBC (RFC 5763 5, RFC 4145 4: no a=setup in an answer means active), its
        mid; the SBC's own ICE credentials towards it are made once."""
        if not self.policy.dtls_fingerprint:
            raise MediaRefused("WebRTC Not Available")
        values = m.attributes("fingerprint") or sdp.attributes("fingerprint")
        fingerprints: list[tuple[str, str]] = []
        for value in values:
            algorithm, _, digest = value.strip().partition(" ")
            if algorithm and digest.strip():
                fingerprints.append((algorithm.lower(), digest.strip().upper()))
        if not fingerprints:
            raise MediaRefused("No DTLS Fingerprint")
        same_certificate = party.fingerprints == tuple(fingerprints)
        party.fingerprints = tuple(fingerprints)
        setups = m.attributes("setup") or sdp.attributes("setup")
        setup = setups[0].strip().lower() if setups else ("actpass" if offer else "active")
        # An offer's actpass or active leaves the SBC passive (the DTLS server); passive
        # makes it the client. An answer to the SBC's actpass chose likewise. A re-offer's
        # actpass with the same certificate keeps the roles of the association (RFC 8842
        # 5.5: no new DTLS association without a reason).
        if not (offer and setup == "actpass" and same_certificate and party.webrtc_up):
            party.dtls_client = setup == "passive"
        mids = m.attributes("mid")
        if mids:
            party.mid = mids[0].strip()
        # RFC 8445 9, RFC 8839 4.4.1.1.1: new ICE credentials from the browser are an ICE
        # restart, which the SBC's answer joins with new credentials of its own.
        ufrags = m.attributes("ice-ufrag") or sdp.attributes("ice-ufrag")
        remote_ufrag = ufrags[0].strip() if ufrags else ""
        restart = bool(party.remote_ufrag) and remote_ufrag != party.remote_ufrag
        party.remote_ufrag = remote_ufrag
        if not party.ice_ufrag or (offer and restart):
            party.ice_ufrag, party.ice_pwd = _ice_credentials()
        party.webrtc_up = True

    def _webrtc_sdp(self, m: Media, party: _Party, side: SideMedia, setup: str, index: int) -> None:
        """The m-line towards a browser as WebRTC wants it (RFC 8829 5.2, 5.3): DTLS-SRTP
        with the SBC's fingerprint and ``setup``, its ICE credentials and its one host
        candidate on the relay port (ICE-lite, RFC 8445 2.5), rtcp-mux (RFC 8843 and
        browsers require it), the mid; no SDES keys, nothing only a SIP phone means."""
        if not self.policy.dtls_fingerprint:
            raise MediaRefused("WebRTC Not Available")
        if not party.ice_ufrag:
            party.ice_ufrag, party.ice_pwd = _ice_credentials()
        party.mid = party.mid or str(index)
        m.remove_all(_WEBRTC_MEDIA | {"crypto", "rtcp-mux"})
        m.proto = WEBRTC_PROTO if party.proto.upper() not in WEBRTC_PROTOS else party.proto
        assert party.port is not None
        m.add("mid", party.mid)
        m.add("ice-ufrag", party.ice_ufrag)
        m.add("ice-pwd", party.ice_pwd)
        m.add("fingerprint", self.policy.dtls_fingerprint)
        m.add("setup", setup)
        m.add("rtcp-mux")
        m.add("candidate", f"1 1 udp {_HOST_PRIORITY} {side.advertise} {party.port} typ host")
        m.add("end-of-candidates")

    # -- shared ------------------------------------------------------------------------------
    @staticmethod
    def _relayable(m: Media) -> bool:
        """UDP media only: RTP profiles and UDPTL (T.38); TCP media (RFC 4145) is refused,
        and so are WebRTC data channels (SCTP over DTLS, RFC 8841), which the relay does
        not terminate."""
        proto = m.proto.upper()
        if proto.endswith("/SCTP"):
            return False
        return proto in RTP_PROTOS or proto.startswith("UDP/") or proto == "UDPTL"

    @staticmethod
    def _learn(sdp: Session, m: Media, party: _Party) -> None:
        """Where the party receives: c= and m= port, a=rtcp (RFC 3605) or port + 1."""
        conn = sdp.media_connection(m)
        direction = sdp.media_direction(m)
        if conn is None or _is_null(conn[1]):
            party.remote = None
            party.remote_rtcp = None
        else:
            host = conn[1]
            party.remote = (host, m.port)
            party.remote_rtcp = (host, m.port + 1)
            for value in m.attributes("rtcp"):
                parts = value.split()
                if parts and parts[0].isdigit():
                    addr = parts[3] if len(parts) >= 4 else host
                    party.remote_rtcp = (addr, int(parts[0]))
        party.sends = direction in ("sendrecv", "sendonly") and m.port != 0

    @staticmethod
    def _transcodes(session: MediaSession) -> bool:
        return any(s.active and codec_policy.transcodes(s.a.codec, s.b.codec)
                   for s in session.streams)  # fmt: skip

    def _hold_slot(self, session: MediaSession, hold: bool) -> None:
        """Take or give back the session's place under max_transcoded_calls."""
        if hold != session.transcoding:
            session.transcoding = hold
            self.transcoded_calls += 1 if hold else -1

    def _ports(self, session: MediaSession, stream: _Stream) -> None:
        for party in (stream.a, stream.b):
            if party.port is None:
                party.port = self.pool.take(session.worker)

    def _close_stream(self, session: MediaSession, stream: _Stream) -> None:
        for party in (stream.a, stream.b):
            if party.port is not None:
                self.pool.give(session.worker, party.port)
                party.port = None
            party.codec = None
        stream.active = False
        stream.offered = None

    def _finish(self, session: MediaSession, sdp: Session, dst: str, side: SideMedia) -> bytes:
        """The SBC's o=, s= and session-level c= towards ``dst``; no session-level ICE but
        a=ice-lite towards a browser (RFC 8839 5.3), and a browser's session-level DTLS and
        BUNDLE lines only where the SBC relays them untouched."""
        sdp.remove_all(ICE_ATTRIBUTES)
        terminated = [s for s in session.streams if s.active and (s.a.webrtc or s.b.webrtc)]
        if terminated:
            sdp.remove_all(_WEBRTC_SESSION)
            if any(getattr(s, dst).webrtc for s in terminated):
                sdp.add("ice-lite")
        family = "IP6" if ":" in side.advertise else "IP4"
        conn = sdp.connection
        if conn is not None and not _is_null(conn[1]):
            sdp.connection = (family, side.advertise)
        # s= may name the far side's product (s=Asterisk): the SBC's own session name.
        sdp.lines = [("s", "-") if kind == "s" else (kind, v) for kind, v in sdp.lines]
        origin = session.origins[dst]
        sdp.origin = Origin(
            username="-", session_id=origin.session_id, version=origin.version,
            nettype="IN", addrtype=family, address=side.advertise,
        )  # fmt: skip
        body = bytes(sdp)
        if origin.last and body != origin.last:
            origin.version += 1  # RFC 3264 8: a changed session description
            sdp.origin = Origin(
                username="-", session_id=origin.session_id, version=origin.version,
                nettype="IN", addrtype=family, address=side.advertise,
            )  # fmt: skip
            body = bytes(sdp)
        origin.last = body
        return body

    def dtmf_info(self, call: str, from_caller: bool, digit: str, duration_ms: int) -> bool:
        """A DTMF digit came as SIP INFO from one party: True if a stream
        of the call gives it to the other party as RFC 4733 events (that party has
        telephone-event, the sender has none: the worker is told, control.SendDtmf); False
        if the INFO is to be relayed as it is."""
        session = self.sessions.get(call)
        if session is None:
            return False
        src, dst = ("a", "b") if from_caller else ("b", "a")
        for s in session.streams:
            mine: CodecSpec | None = getattr(s, src).codec
            theirs: CodecSpec | None = getattr(s, dst).codec
            if (
                s.active and mine is not None and theirs is not None
                and mine.dtmf_pt is None and theirs.dtmf_pt is not None
            ):  # fmt: skip
                command = SendDtmf(
                    session=call, index=s.index, party=dst, digit=digit, duration_ms=duration_ms
                )
                self._outbox.append((session.worker, command))
                return True
        return False

    def _update(self, session: MediaSession) -> None:
        a_bind = self.policy.sides[session.sides[0]].bind
        b_bind = self.policy.sides[session.sides[1]].bind
        streams = tuple(
            Stream(index=s.index, a=s.a.spec(a_bind), b=s.b.spec(b_bind),
                   passthrough=s.passthrough)
            for s in session.streams
            if s.active and s.a.port is not None and s.b.port is not None
        )  # fmt: skip
        self._outbox.append((session.worker, Update(session=session.call, streams=streams)))


def _party_value(p: _Party) -> dict[str, Any]:
    """A party of a session as plain values (JSON: keys in base64)."""
    return {
        "side": p.side, "port": p.port, "remote": p.remote, "remote_rtcp": p.remote_rtcp,
        "rtcp_mux": p.rtcp_mux, "sends": p.sends, "proto": p.proto, "awaiting": p.awaiting,
        "recv_key": _key_value(p.recv_key), "send_key": _key_value(p.send_key),
        "codec": None if p.codec is None else dataclasses.asdict(p.codec),
    }  # fmt: skip


def _party_of(v: dict[str, Any]) -> _Party:
    codec = v["codec"]
    return _Party(
        side=str(v["side"]), port=None if v["port"] is None else int(v["port"]),
        remote=_address_of(v["remote"]), remote_rtcp=_address_of(v["remote_rtcp"]),
        rtcp_mux=bool(v["rtcp_mux"]), sends=bool(v["sends"]), proto=str(v["proto"]),
        awaiting=bool(v["awaiting"]), recv_key=_key_of(v["recv_key"]),
        send_key=_key_of(v["send_key"]), codec=None if codec is None else CodecSpec(**codec),
    )  # fmt: skip


def _address_of(v: Any) -> tuple[str, int] | None:
    return None if v is None else (str(v[0]), int(v[1]))


def _key_value(key: SrtpKey | None) -> list[str] | None:
    return None if key is None else [key.suite, base64.b64encode(key.key_salt).decode()]


def _key_of(v: Any) -> SrtpKey | None:
    return None if v is None else SrtpKey(suite=str(v[0]), key_salt=base64.b64decode(v[1]))


def _token(name: str) -> str:
    """A codec name as it may appear in a Warning's quoted text (RFC 3261 25.1 qdtext)."""
    return "".join(c for c in name if c.isascii() and (c.isalnum() or c in "-._/"))[:32]


def _connect(sdp: Session, m: Media, address: str, held: bool) -> None:
    """The media's c=: the SBC's address (0.0.0.0 kept for hold, RFC 3264 8.4), at the
    level where the party put it (the session-level c= is rewritten in ``_finish``)."""
    family = "IP6" if ":" in address else "IP4"
    session_conn = sdp.connection
    if session_conn is None or m.connection is not None:
        m.connection = (family, "0.0.0.0" if held else address)
    elif held != _is_null(session_conn[1]):
        # This m-line's hold state differs from the session-level address: its own c=.
        m.connection = (family, "0.0.0.0" if held else address)


def _transcodable_media(m: Media) -> bool:
    """Audio over RTP (WebRTC's included): what the codec policy applies to; video, T.38
    and the like pass as offered."""
    proto = m.proto.upper()
    return m.kind.lower() == "audio" and (proto in RTP_PROTOS or proto in WEBRTC_PROTOS)


def from_browser(sdp: Session) -> bool:
    """Whether an offer or answer has a browser's media (DTLS-SRTP over ICE)."""
    return any(_is_webrtc(sdp, m) for m in sdp.media if m.port != 0)


def keys_end_to_end(sdp: Session, *, srtp_passthrough: bool) -> bool:
    """Whether an offer or answer keys some stream end to end, for the relay to pass its
    packets untouched: DTLS-SRTP without ICE, MIKEY or ZRTP, or SDES keys the policy leaves
    to the parties (``srtp_passthrough``). A browser's media never is (the SBC keys it)."""
    session_keying = bool(sdp.attribute_names() & END_TO_END_KEYING)
    for m in sdp.media:
        if m.port == 0 or _is_webrtc(sdp, m):
            continue
        names = m.attribute_names()
        if session_keying or names & END_TO_END_KEYING or (srtp_passthrough and "crypto" in names):
            return True
    return False


def _is_webrtc(sdp: Session, m: Media) -> bool:
    """A browser's media (RFC 8829 5.1.2): SRTP keyed by DTLS over ICE. DTLS-SRTP without
    ICE credentials is a SIP phone's end-to-end keying (relayed untouched)."""
    if m.proto.upper() not in WEBRTC_PROTOS:
        return False
    names = m.attribute_names() | sdp.attribute_names()
    return "fingerprint" in names and "ice-ufrag" in names and "ice-pwd" in names


def _ice_credentials() -> tuple[str, str]:
    """A fresh ICE username fragment and password (RFC 8839 5.4: ice-chars, at least 4
    and 22 characters, with at least 24 and 128 bits of randomness)."""
    raw = base64.b64encode(os.urandom(24)).decode()  # 32 ice-chars (ALPHA DIGIT + /)
    return raw[:8], raw[8:]


def _strip(m: Media) -> None:
    """What names the far party's network is not passed on: ICE, a=rtcp with its address
    (the SBC's RTCP port is RTP + 1, the RFC 3550 default), and ptime-neutral extras stay."""
    m.remove_all(_FAR_NETWORK)
