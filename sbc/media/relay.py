"""The media relay's data plane: sans-I/O, one per worker.

Why one module of about 900 lines: it is the per-packet path (latching, SRTP, RTCP,
statistics, transcoding hand-off, timeouts); kept together so that the hot loop reads in
one place and pays no lookups across modules for each packet.

``RelayEngine`` applies the control messages (``control.Update`` / ``control.Delete``) and
relays packets: ``receive(port, data, src, now)`` returns ``(local port, bytes, destination)``
to send, a ``Burst``, or None. Sockets are the caller's: ``update`` and ``delete`` say which
local ports to open and close.

Forwarding. Each stream has two parties; a packet that arrives on party X's RTP port, on its
RTCP port (RTP port + 1, RFC 3550 11) or, when X uses rtcp-mux, on its RTP port with a
payload type byte in 192..223 (RFC 5761 4: it is RTCP) comes from X. It leaves through the
other party Y's port of the same kind (RTCP through Y's RTP port if Y uses rtcp-mux) towards
Y's latched address, or else the address Y's SDP gave (RTCP: a=rtcp, RFC 3605, or RTP port
+ 1). The relay sends nowhere else: no reflection to the source, no open relay.

Latching (symmetric RTP, RFC 4961). A party's RTP and its RTCP (unless
rtcp-mux: one address for both) each have a latched source address:
- a packet from the latched address is accepted;
- before anything is latched, a packet from exactly the address of the party's SDP (RTCP:
  its RTCP address, or RTP latched address port + 1) is accepted and latches;
- within ``latch_window`` seconds of the Update that created the stream or changed the
  address of either of its parties, a packet from any other address latches (the last one
  wins while the window is open: a NAT may rebind while the call starts);
- on an SRTP leg a packet latches only if it authenticates (RFC 3711 3.3), and after the
  window a packet from a new address that authenticates with an SSRC the party had not used
  re-latches: a verified SSRC change (a phone that restarted its stream behind a new NAT
  binding); a packet with a known SSRC from a new address stays dropped;
- everything else is dropped and counted (``dropped_source``); a packet from one of the
  relay's own ports is never accepted (no loops through a forged SDP address).
A changed SDP address clears the party's latch (the new address is the destination).

SRTP (RFC 3711, SDES re-keying per leg, RFC 4568): what X sends is unprotected with X's key
(``recv_key``); a failure drops the packet (``srtp_failures``) and never latches; what goes
to Y is protected with the SBC's key towards Y (``send_key``). Either side may be plain
(RTP<->SRTP interworking). ``passthrough`` streams (keys end to end: DTLS-SRTP, MIKEY, ZRTP)
have no crypto: the bytes, including DTLS and STUN, pass unchanged.

WebRTC parties (``Party.webrtc``, RFC 8827). The relay terminates the browser's media: its
port (rtcp-mux) carries STUN, DTLS and SRTP, told apart by the first byte (RFC 7983 7: 0-3
STUN, 20-63 DTLS, 128-191 RTP/RTCP; anything else is ``invalid``). The relay is an ICE-lite
agent (RFC 8445 2.5, sbc/media/ice.py): it answers each Binding request that carries the
party's credentials from the same port to its source; a valid check latches the party on its
source when it nominates the pair (USE-CANDIDATE, RFC 8445 7.3.1.5) or when nothing is
latched yet, and a later nomination from another address moves the latch (bad checks are
answered with an error and counted as ``invalid``). The SDP address is never a destination:
only the ICE-selected one is. DTLS records (RFC 5764, sbc/media/dtls.py) and SRTP are
accepted only from the latched address (else ``dropped_source``); the DTLS endpoint is the
server or, when the SBC wrote a=setup:active, the client, which starts the handshake when the
first valid check latched. When the handshake ends and the party's certificate matches a
fingerprint of its SDP, the leg's SRTP contexts are made from the exported keys (RFC 5764
4.2) and the leg relays as an SRTP leg; a failed handshake counts one ``srtp_failures``.
Until then nothing is sent to the party but STUN and DTLS (what the other party sends it
counts as ``no_destination``; SRTP from it as ``srtp_failures``). An Update with the same
ufrag/pwd/role/fingerprints keeps the association, the keys and the latch (a re-INVITE for
hold); any change starts over. The DTLS retransmission timers (RFC 6347 4.2.4) are
deadlines: ``next_dtls`` (also in ``next_deadline``) and ``dtls_due``. ``set_identity``
gives the engine the SBC's certificate (control.Identity); without it a WebRTC party relays
nothing (logged, its packets ``srtp_failures``). STUN answers come back from ``receive`` as
a ``Burst``; DTLS records are queued (``dtls_backlog``, at most ``DTLS_BACKLOG``) and each
``dtls_step`` handles one and returns what to send back: a handshake step's public-key
work (0.1-0.4 ms) then sits between two rounds of the worker's port reads instead of in
front of every packet that arrived with it. Other parties never reach this code.

Statistics: per party, packets and bytes in (accepted, as received) and out
(as sent), RTP loss (RFC 3550 A.3) and interarrival jitter (RFC 3550 6.4.1, A.8) of the RTP
it sent. The RTP clock rate for the jitter comes from the static payload type of the first
packet of each SSRC (RFC 3551 6); dynamic payload types count as 8000 Hz. ``totals()`` sums
the counters of the engine's whole life for the metrics: those of parties gone (kept when
a session or a stream ends) plus the live ones, so it costs nothing per packet.

Transcoding. A stream whose parties carry a ``codec`` (their legs share none)
sends what X sends through a ``Transcoder`` (sbc/media/transcode.py) from X's codec to Y's:
decoded, resampled, re-framed to Y's packet time and encoded, as the SBC's own RTP source
towards Y (its SSRC, sequence and timestamps; RFC 4733 telephone-events mapped to Y's
payload type). A translator that changes the payload terminates RTCP (RFC 3550 7.2): what
X's RTCP says is of no use to Y, so it is counted and dropped, and the relay sends each
party a sender report (with SDES CNAME, RFC 3550 6.4.1, 6.5.1) of what it sent that party,
every ``RTCP_INTERVAL`` seconds (``reports``). One packet in may give several out (re-framing
to a shorter packet time): ``receive`` then returns a ``Burst`` of them, to be sent at once.

DTMF interworking. On a transcoded stream whose receiving party has no
telephone-event, the events the other party sends are reported (in the ``Burst`` that
``receive`` returns, control.Dtmf, once per event) for SIP INFO; ``send_dtmf``
(control.SendDtmf, a digit that came as INFO) sends a party RFC 4733 events in the output
stream of the transcoder towards it, packet by packet as they fall due (``next_dtmf`` /
``dtmf_due``).

Timeouts: every accepted packet of a session, and every Update, refreshes
its last-activity time; a session in which some party ``sends`` and that saw nothing for
``timeout`` seconds is reported once (again only after another Update). A session whose
parties are all on hold (none ``sends``) never times out.
"""

from __future__ import annotations

import logging
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from sbc.media import control, ice
from sbc.media.control import Address
from sbc.media.dtls import DtlsContext, DtlsEndpoint, DtlsError
from sbc.media.srtp import SrtpError, SrtpReceiver, SrtpSender
from sbc.media.transcode import Transcoder

log = logging.getLogger("sbc.media.relay")

Out = tuple[int, bytes, Address]  # (local port to send from, datagram, destination)
DTLS_BACKLOG = 1000  # DTLS records queued for ``RelayEngine.dtls_step`` at most


@dataclass(frozen=True, slots=True)
class Burst:
    """What one received packet gave besides a single ``Out`` (transcoded streams and
    the STUN/DTLS of WebRTC parties): several packets (re-framing to a shorter packet time;
    STUN answers and DTLS flights), to be sent in order, and the DTMF digits detected in it
    for SIP INFO (control.Dtmf, for the signalling process). After one, a worker looks at
    ``next_dtls`` (a DTLS flight went out: its retransmission timer runs)."""

    packets: tuple[Out, ...]
    dtmf: tuple[control.Dtmf, ...] = ()


Result = Out | Burst | None  # what ``receive`` returns; one Out is the hot path
Handler = Callable[[bytes, Address, float], Result]
LocalPort = tuple[str, int]  # (bind address, port)

MAX_DROPOUT = 3000  # RFC 3550 A.1: a larger sequence jump is a restart
RTCP_INTERVAL = 5.0  # seconds between the relay's own sender reports (RFC 3550 6.2 minimum)
# The SBC's own RFC 4733 events (a digit that came as SIP INFO): an update
# every 50 ms while the event lasts (RFC 4733 2.5.1.2), the end three times (2.5.1.4);
# durations outside these bounds are brought into them; successive digits are this far apart.
DTMF_INTERVAL = 0.05
DTMF_MIN_MS = 40
DTMF_MAX_MS = 5000
DTMF_GAP = 0.05
NTP_EPOCH = 2208988800  # seconds from 1900 (NTP) to 1970 (Unix), RFC 3550 4
SEEN_SSRCS = 64  # how many past SSRCs of a party are remembered for the SSRC-change rule

# RFC 3551 6 table 4 and 5: clock rates of the static payload types that are not 8000 Hz.
_CLOCK_RATES = {
    10: 44100, 11: 44100, 14: 90000, 25: 90000, 26: 90000, 28: 90000, 31: 90000, 32: 90000,
    33: 90000, 34: 90000, 6: 16000, 16: 11025, 17: 22050,
}  # fmt: skip


# The per-party counters that control.Totals sums (same names there and on _Leg).
_LEG_COUNTERS = (
    "packets_in", "bytes_in", "packets_out", "bytes_out", "dropped_source", "srtp_failures",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class PortChanges:
    """Local ports the caller must close (first) and open; ``close`` holds only ports that
    no other party uses any more."""

    open: tuple[LocalPort, ...] = ()
    close: tuple[LocalPort, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.open or self.close)


class _Sender(Protocol):
    def protect(self, packet: bytes) -> bytes: ...
    def protect_rtcp(self, packet: bytes) -> bytes: ...


class _Unusable:
    """Stands for a key libsrtp refused: nothing is sent with it (never plain instead)."""

    def protect(self, packet: bytes) -> bytes:
        raise SrtpError("no usable SRTP key")

    protect_rtcp = protect


class _Mute:
    """Stands for a transcoder that could not be made: nothing passes (never the other
    codec's payload under a wrong payload type)."""

    def push(self, packet: bytes, now: float) -> list[bytes]:
        return []

    def sender_info(self) -> tuple[int, int, int, int]:
        return (0, 0, 0, 0)


class _DtmfJob:
    """One digit the SBC sends as RFC 4733 events (2.5.1): from ``start``, an event packet
    every DTMF_INTERVAL with the duration so far (the first marked, 2.5.1.2), then at
    ``start + length`` the end packet three times with the whole duration (2.5.1.4). All
    carry the event's start timestamp (2.3), taken when the first is sent."""

    __slots__ = ("code", "done", "length", "next", "sent", "start", "target", "ticks",
                 "transcoder")  # fmt: skip

    def __init__(
        self, target: _Leg, transcoder: Transcoder, code: int, length: float, start: float
    ) -> None:
        self.target = target  # the party the events go to
        self.transcoder = transcoder  # the output stream towards it
        self.code = code
        self.length = length  # seconds
        self.start = start
        self.next = start  # when the next packet is due
        self.sent = 0  # update packets sent
        self.ticks: int | None = None  # the event's timestamp on the output timeline
        self.done = False

    def step(self, now: float) -> list[bytes]:
        tr = self.transcoder
        clock = tr.dst.dtmf_clock
        if self.ticks is None:
            self.ticks = tr.dtmf_start(now)
        total = round(self.length * clock)
        end = self.start + self.length
        if self.next < end:
            duration = min(round((self.sent + 1) * DTMF_INTERVAL * clock), total)
            packet = tr.dtmf_packet(self.code, self.ticks, duration, end=False,
                                    first=self.sent == 0)  # fmt: skip
            self.sent += 1
            self.next = min(self.start + self.sent * DTMF_INTERVAL, end)
            return [packet]
        self.done = True
        return [tr.dtmf_packet(self.code, self.ticks, total, end=True, first=False)
                for _ in range(3)]  # fmt: skip


class _Latch:
    """Where one party's RTP (or RTCP) comes from and goes to."""

    __slots__ = ("addr", "default", "dest", "seen", "ssrc", "trusted", "until")

    def __init__(self) -> None:
        self.addr: Address | None = None  # latched source
        self.default: Address | None = None  # from SDP
        self.dest: Address | None = None  # addr or default: where the relay sends
        self.trusted: tuple[Address, ...] = ()  # accepted before anything latched
        self.until = 0.0  # end of the latch window
        self.ssrc: bytes | None = None  # last accepted SSRC (RTCP latches)
        self.seen: set[bytes] = set()  # SSRCs the party used on this latch

    def set_default(self, default: Address | None, trusted: tuple[Address, ...]) -> None:
        self.default = default
        self.trusted = trusted
        self.dest = self.addr or default

    def latch(self, addr: Address | None) -> None:
        self.addr = addr
        self.dest = addr or self.default

    def see(self, ssrc: bytes) -> None:
        if len(self.seen) >= SEEN_SSRCS:
            self.seen.clear()
        self.seen.add(ssrc)


class _WebRtc:
    """What the relay holds of a WebRTC party: its ICE credentials and DTLS role
    (control.WebRtc) and its DTLS association (made on the first record it sends, or on
    the first valid check when the SBC is the client). The ICE-selected address is the
    party's RTP latch (``_Leg.rtp.addr``); until the keys exist nothing is sent to it
    but STUN and DTLS (``rtp.dest`` stays None)."""

    __slots__ = ("config", "dtls")

    def __init__(self, config: control.WebRtc) -> None:
        self.config = config
        self.dtls: DtlsEndpoint | None = None


class _Session:
    __slots__ = ("can_timeout", "last", "name", "ports", "reported", "streams")

    def __init__(self, name: str, now: float) -> None:
        self.name = name
        self.streams: dict[int, tuple[_Leg, _Leg]] = {}
        self.ports: dict[int, tuple[str, Handler]] = {}  # port -> (bind, handler)
        self.last = now
        self.reported = False
        self.can_timeout = False


class _Leg:
    """One party of a stream: its ports, latches, SRTP contexts and statistics."""

    __slots__ = (
        "base_seq", "bind", "bytes_in", "bytes_out", "clock", "codecs", "cycles",
        "dropped_source", "engine", "jitter", "last_arrival", "last_ts", "local", "lost_before",
        "max_seq", "next_report", "packets_in", "packets_out", "party", "passthrough", "peer",
        "port", "received", "receiver", "rtcp", "rtcp_port", "rtp", "sender", "session",
        "srtp_failures", "ssrc", "strict", "transcoder", "webrtc", "where",
    )  # fmt: skip

    def __init__(self, session: _Session, local: set[LocalPort], engine: RelayEngine) -> None:
        self.session = session
        self.local = local  # the relay's own (bind, port)s: never a source
        self.engine = engine
        self.peer: _Leg = self
        self.party: control.Party | None = None
        self.passthrough = False
        self.strict = True  # drop what is not RTP/RTCP version 2 (not on passthrough)
        self.bind = ""
        self.port = 0
        self.rtcp_port = 0
        self.rtp = _Latch()
        self.rtcp = _Latch()
        self.receiver: SrtpReceiver | None = None
        self.sender: _Sender | None = None
        self.webrtc: _WebRtc | None = None  # a WebRTC party: ICE-lite and DTLS-SRTP
        # Transcoding: from this party's codec to the peer's, and when the relay
        # next sends this party a sender report of what it sent it.
        self.transcoder: Transcoder | _Mute | None = None
        self.where: tuple[int, str] = (0, "a")  # (stream index, "a"/"b"): for control.Dtmf
        self.codecs: tuple[control.CodecSpec, control.CodecSpec] | None = None
        self.next_report = 0.0
        self.packets_in = self.bytes_in = self.packets_out = self.bytes_out = 0
        self.dropped_source = self.srtp_failures = 0
        # RFC 3550 A.1 / A.3 / A.8 receiver state of the current SSRC
        self.ssrc: bytes | None = None
        self.clock = 8000
        self.base_seq = self.max_seq = self.cycles = self.received = self.lost_before = 0
        self.last_ts = 0
        self.last_arrival = 0.0
        self.jitter = 0.0

    # -- control -----------------------------------------------------------------------------
    def configure(self, party: control.Party, passthrough: bool, window_until: float) -> bool:
        """Apply the party's description; True if its keys are usable."""
        old = self.party
        if party.webrtc is not None:
            return self._configure_webrtc(party, old)
        if self.webrtc is not None:  # no longer WebRTC: SDES or plain from now on
            self._end_webrtc()
            old = None
        self.party = party
        self.bind, self.port = party.bind, party.port
        self.rtcp_port = party.port if party.rtcp_mux else party.port + 1
        mux_changed = old is not None and old.rtcp_mux != party.rtcp_mux
        if old is None or mux_changed:
            self.rtcp = self.rtp if party.rtcp_mux else _Latch()
        if old is not None and (old.remote != party.remote or mux_changed):
            self.rtp.latch(None)
        if old is not None and (old.remote_rtcp != party.remote_rtcp or old.remote != party.remote):
            self.rtcp.latch(None)
        self.rtp.until = window_until
        self.rtcp.until = window_until
        remote = party.remote
        self.rtp.set_default(remote, (remote,) if remote else ())
        if not party.rtcp_mux:
            rtcp = party.remote_rtcp
            if rtcp is None and remote is not None:
                rtcp = (remote[0], remote[1] + 1)
            self.rtcp.set_default(rtcp, (rtcp,) if rtcp else ())
        ok = party.accept  # not answered yet: dropped until the answer says how it sends
        crypto_changed = old is None or passthrough != self.passthrough
        self.passthrough = passthrough
        self.strict = not passthrough
        if passthrough:
            self.receiver = None
            self.sender = None
            return ok
        if crypto_changed or old is None or old.recv_key != party.recv_key:
            self.receiver = None
            if party.recv_key is not None:
                try:
                    self.receiver = SrtpReceiver(party.recv_key)
                except SrtpError as exc:
                    log.error("session %s port %d: %s", self.session.name, self.port, exc)
                    ok = False
        if crypto_changed or old is None or old.send_key != party.send_key:
            self.sender = None
            if party.send_key is not None:
                try:
                    self.sender = SrtpSender(party.send_key)
                except SrtpError as exc:
                    log.error("session %s port %d: %s", self.session.name, self.port, exc)
                    self.sender = _Unusable()
        return ok

    def _configure_webrtc(self, party: control.Party, old: control.Party | None) -> bool:
        """A WebRTC party: one port (rtcp-mux, RFC 8843 / RFC 5761), latched by ICE, keyed
        by DTLS. The same role and fingerprints (a re-INVITE for hold, a codec change, an
        ICE restart) keep the association, its keys and the latch; a new certificate or
        role starts over."""
        self.party = party
        self.bind, self.port = party.bind, party.port
        self.rtcp_port = party.port
        self.passthrough = False
        self.strict = True
        config = party.webrtc
        assert config is not None
        state = self.webrtc
        before = state.config if state is not None and old is not None else None
        learned = before is not None and not before.fingerprints and bool(config.fingerprints)
        if (
            state is not None and before is not None and old is not None
            and old.webrtc == before and before.client == config.client
            and (learned or before.fingerprints == config.fingerprints)
        ):  # fmt: skip
            # The same DTLS association: new ICE credentials are an ICE restart (RFC 8445
            # 9), which keeps it (RFC 8842 5.5) and the pair until a new nomination; the
            # answer to the SBC's offer may bring the browser's fingerprints (its handshake
            # may have ended already: checked now).
            state.config = config
            endpoint = state.dtls
            if learned and endpoint is not None:
                had_keys = endpoint.keys is not None
                endpoint.learn(config.fingerprints)
                if not had_keys and endpoint.keys is not None:
                    self._keyed(endpoint)
                elif endpoint.failed:
                    self.srtp_failures += 1
                    log.warning("session %s port %d: DTLS: %s", self.session.name, self.port,
                                endpoint.error)  # fmt: skip
        else:
            self._end_webrtc()
            self.webrtc = _WebRtc(config)
            self.rtp = self.rtcp = _Latch()  # ICE decides where the party is, not its SDP
            self.receiver = None
            self.sender = _Unusable()  # never in the clear before the keys
        if self.engine.dtls is None:
            log.error(
                "session %s port %d: WebRTC party without a DTLS certificate (no Identity)",
                self.session.name, self.port,
            )  # fmt: skip
            return False
        return party.accept

    def _end_webrtc(self) -> None:
        """Forget the DTLS association, its keys and the ICE latch."""
        if self.webrtc is not None:
            self.engine.dtls_legs.discard(self)
            self.webrtc = None
            self.receiver = None
            self.sender = None
            self.rtp = _Latch()
            self.rtcp = _Latch()

    def unlink(self) -> None:
        """The session is gone: drop the reference to the other party, so that the two
        legs, their session and its handlers die by reference counting instead of waiting
        for the cyclic collector (the media worker runs full collections rarely)."""
        del self.peer

    def handlers(self, usable: bool) -> dict[int, Handler]:
        if not usable:
            drop = self.on_unusable
            return {self.port: drop} if self.rtcp_port == self.port else {
                self.port: drop, self.rtcp_port: drop
            }  # fmt: skip
        if self.webrtc is not None:
            return {self.port: self.on_webrtc}
        if self.rtcp_port == self.port:
            return {self.port: self.on_mux}
        return {self.port: self.on_rtp, self.rtcp_port: self.on_rtcp}

    def stats(self) -> control.PartyStats:
        expected = self.cycles + self.max_seq - self.base_seq + 1 if self.ssrc else 0
        return control.PartyStats(
            packets_in=self.packets_in, bytes_in=self.bytes_in,
            packets_out=self.packets_out, bytes_out=self.bytes_out,
            lost=self.lost_before + max(0, expected - self.received),
            jitter_ms=round(self.jitter * 1000.0 / self.clock, 3),
            dropped_source=self.dropped_source, srtp_failures=self.srtp_failures,
            latched=self.rtp.addr,
        )  # fmt: skip

    # -- packets -----------------------------------------------------------------------------
    def on_unusable(self, data: bytes, src: Address, now: float) -> Result:
        self.srtp_failures += 1
        return None

    def on_webrtc(self, data: bytes, src: Address, now: float) -> Result:
        """The port of a WebRTC party: STUN, DTLS and SRTP/SRTCP told apart by the first
        byte (RFC 7983 7: 0-3 STUN, 20-63 DTLS, 128-191 RTP/RTCP; anything else dropped)."""
        first = data[0] if data else 255
        if 127 < first < 192:
            if src != self.rtp.addr:
                self.dropped_source += 1  # only from the pair ICE selected
                return None
            if self.receiver is None:
                self.srtp_failures += 1  # before the DTLS handshake gave the keys
                return None
            return self.on_mux(data, src, now)
        if first < 4:
            return self._stun(data, src, now)
        if 19 < first < 64:
            return self._dtls(data, src, now)
        self.engine.invalid += 1
        return None

    def _stun(self, data: bytes, src: Address, now: float) -> Result:
        """A connectivity check (RFC 8445 7.3): answered from this port to its source. A
        valid one latches the party on its source when it nominates the pair (USE-CANDIDATE,
        RFC 8445 7.3.1.5; a later nomination from elsewhere moves the pair) or when nothing
        is latched yet; the SBC as DTLS client then starts the handshake."""
        state = self.webrtc
        assert state is not None
        check = ice.answer_check(data, src, ufrag=state.config.ufrag, pwd=state.config.pwd)
        if check is None:
            self.engine.invalid += 1  # not STUN, a bad FINGERPRINT, not a request
            return None
        out: list[Out] = [(self.port, check.response, src)]
        if not check.valid:
            self.engine.invalid += 1  # a bad check (400, 401, 420, 487)
            if len(check.response) > len(data):
                # Not answered: the source is unverified (it may be forged), and an answer
                # larger than the request would make the relay an amplifier.
                return None
            return Burst(tuple(out))
        latch = self.rtp
        if latch.addr != src and (check.use_candidate or latch.addr is None):
            if latch.addr is not None:
                log.info(
                    "session %s port %d: ICE moves the pair from %s to %s",
                    self.session.name, self.port, latch.addr, src,
                )  # fmt: skip
            latch.latch(src)
            if self.receiver is None:
                latch.dest = None  # no media before the keys
        if state.config.client and latch.addr is not None:
            endpoint = self._endpoint(state)
            if endpoint is not None and not endpoint.started:
                out.extend((self.port, d, latch.addr) for d in endpoint.start(now))
                self._timer(endpoint)
        return Burst(tuple(out))

    def _endpoint(self, state: _WebRtc) -> DtlsEndpoint | None:
        if state.dtls is None:
            context = self.engine.dtls
            if context is None:
                return None
            state.dtls = DtlsEndpoint(
                context, client=state.config.client, fingerprints=state.config.fingerprints
            )
        return state.dtls

    def _dtls(self, data: bytes, src: Address, now: float) -> Result:
        """A DTLS record (RFC 5764 5.1.2) from the ICE-selected address: queued for the
        engine's ``dtls_step`` (see RelayEngine.dtls_backlog), not handled here."""
        state = self.webrtc
        assert state is not None
        if src != self.rtp.addr:
            self.dropped_source += 1
            return None
        backlog = self.engine.dtls_backlog
        if len(backlog) >= DTLS_BACKLOG:
            self.engine.dtls_dropped += 1  # the peer retransmits its flight (RFC 6347 4.2.4)
            return None
        backlog.append((self, state, data, src))
        return None

    def dtls_record(self, state: _WebRtc, data: bytes, src: Address, now: float) -> list[Out]:
        """A queued DTLS record through the leg's DTLS endpoint; what it answers goes back
        to the record's source (nothing if the leg's association changed meanwhile)."""
        if self.webrtc is not state:
            return []
        endpoint = self._endpoint(state)
        if endpoint is None:
            return []
        had_keys = endpoint.keys is not None
        was_failed = endpoint.failed
        datagrams = endpoint.receive(data, now)
        self._timer(endpoint)
        if not had_keys and endpoint.keys is not None:
            self._keyed(endpoint)
        if endpoint.failed and not was_failed:
            self.srtp_failures += 1
            log.warning(
                "session %s port %d: DTLS with %s: %s",
                self.session.name, self.port, src, endpoint.error,
            )  # fmt: skip
        return [(self.port, d, src) for d in datagrams]

    def _keyed(self, endpoint: DtlsEndpoint) -> None:
        """The handshake gave the keys (RFC 5764 4.2): SRTP from now on, both ways."""
        keys = endpoint.keys
        assert keys is not None
        try:
            self.receiver = SrtpReceiver(keys.recv)
            self.sender = SrtpSender(keys.send)
        except SrtpError as exc:
            log.error("session %s port %d: %s", self.session.name, self.port, exc)
            self.receiver = None
            self.sender = _Unusable()
            self.srtp_failures += 1
            return
        self.rtp.dest = self.rtp.addr
        log.info(
            "session %s port %d: DTLS-SRTP with %s (%s)",
            self.session.name, self.port, self.rtp.addr, keys.send.suite,
        )  # fmt: skip

    def _timer(self, endpoint: DtlsEndpoint) -> None:
        if endpoint.deadline() is None:
            self.engine.dtls_legs.discard(self)
        else:
            self.engine.dtls_legs.add(self)

    def dtls_timer(self, now: float) -> list[Out]:
        """Run this leg's DTLS retransmission timer: the flight again to the latched address."""
        state = self.webrtc
        endpoint = state.dtls if state is not None else None
        if endpoint is None:
            self.engine.dtls_legs.discard(self)
            return []
        datagrams = endpoint.handle_timer(now)
        self._timer(endpoint)
        if endpoint.failed:
            self.srtp_failures += 1
            log.warning("session %s port %d: DTLS: %s", self.session.name, self.port,
                        endpoint.error)  # fmt: skip
        dest = self.rtp.addr
        if dest is None:
            return []
        return [(self.port, d, dest) for d in datagrams]

    def on_mux(self, data: bytes, src: Address, now: float) -> Result:
        # RFC 5761 4: an RTP/RTCP packet (first byte 128..191) whose second byte is in
        # 192..223 is RTCP (RTCP packet types 192..223 = RTP payload types 64..95 + marker).
        if len(data) > 1 and 191 < data[1] < 224 and 127 < data[0] < 192:
            return self.on_rtcp(data, src, now)
        return self.on_rtp(data, src, now)

    def on_rtp(self, data: bytes, src: Address, now: float) -> Result:
        size = len(data)
        if src == self.rtp.addr:
            receiver = self.receiver
            if receiver is not None:
                try:
                    data = receiver.unprotect(data)
                except SrtpError:
                    self.srtp_failures += 1
                    return None
            elif self.strict and (size < 12 or data[0] & 0xC0 != 0x80):
                self.engine.invalid += 1  # RFC 3550 5.1: not RTP version 2
                return None
        else:
            admitted = self._admit(self.rtp, data, src, now, False)
            if admitted is None:
                return None
            data = admitted
        self.packets_in += 1
        self.bytes_in += size
        self.session.last = now
        # RFC 3550 A.1, A.8: sequence and jitter of RTP (not DTLS/STUN on a passthrough)
        if len(data) >= 12 and data[0] & 0xC0 == 0x80:
            ssrc = data[8:12]
            seq = (data[2] << 8) | data[3]
            ts = int.from_bytes(data[4:8], "big")
            if ssrc != self.ssrc:
                self._new_ssrc(ssrc, seq, data[1] & 0x7F)
            else:
                delta = (seq - self.max_seq) & 0xFFFF
                if 0 < delta < MAX_DROPOUT:
                    if seq < self.max_seq:
                        self.cycles += 0x10000  # RFC 3550 A.1: wrapped
                    self.max_seq = seq
                elif MAX_DROPOUT <= delta < 0xFFFF - 100:
                    self._restart(seq)  # RFC 3550 A.1: a jump is a restart of the sequence
                # RFC 3550 A.8: D(i-1, i) in timestamp units, timestamps modulo 2^32
                tsd = (ts - self.last_ts) & 0xFFFFFFFF
                if tsd & 0x80000000:
                    tsd -= 0x100000000
                d = (now - self.last_arrival) * self.clock - tsd
                self.jitter += ((d if d > 0 else -d) - self.jitter) * 0.0625
            self.received += 1
            self.last_ts = ts
            self.last_arrival = now
        peer = self.peer
        dest = peer.rtp.dest
        if dest is None:
            self.engine.no_destination += 1
            return None
        if self.transcoder is not None:
            return self._transcode(data, peer, dest, now)
        sender = peer.sender
        if sender is not None:
            try:
                data = sender.protect(data)
            except SrtpError:
                self.engine.protect_failures += 1
                return None
        peer.packets_out += 1
        peer.bytes_out += len(data)
        return (peer.port, data, dest)

    def _transcode(self, data: bytes, peer: _Leg, dest: Address, now: float) -> Result:
        """The packets the transcoder makes of ``data`` for the peer: one alone as it is,
        several (or DTMF detected) as a Burst."""
        transcoder = self.transcoder
        assert transcoder is not None
        sender = peer.sender
        packets = transcoder.push(data, now)
        dtmf: list[control.Dtmf] = []
        if isinstance(transcoder, Transcoder) and transcoder.detected:
            # RFC 4733 events towards a party without them: SIP INFO.
            index, party = self.where
            for code, ms in transcoder.detected:
                digit = control.DTMF_DIGITS.get(code)
                if digit is not None:
                    dtmf.append(control.Dtmf(
                        session=self.session.name, index=index, party=party, digit=digit,
                        duration_ms=ms,
                    ))  # fmt: skip
            transcoder.detected.clear()
        outs: list[Out] = []
        for packet in packets:
            if sender is not None:
                try:
                    packet = sender.protect(packet)
                except SrtpError:
                    self.engine.protect_failures += 1
                    continue
            peer.packets_out += 1
            peer.bytes_out += len(packet)
            outs.append((peer.port, packet, dest))
        if dtmf or len(outs) > 1:
            return Burst(tuple(outs), tuple(dtmf))
        return outs[0] if outs else None

    def send(self, packet: bytes) -> Out | None:
        """A plain RTP packet of the relay's own to this party (SRTP-protected on an SRTP
        leg), or None if it has no address or protection failed."""
        dest = self.rtp.dest
        if dest is None:
            self.engine.no_destination += 1
            return None
        if self.sender is not None:
            try:
                packet = self.sender.protect(packet)
            except SrtpError:
                self.engine.protect_failures += 1
                return None
        self.packets_out += 1
        self.bytes_out += len(packet)
        return (self.port, packet, dest)

    def report(self, now: float, wall: float) -> Out | None:
        """RFC 3550 6.4.1: the relay's sender report to this party of what it sent it (a
        transcoded stream: its RTCP is the relay's own), with SDES CNAME (6.5.1) in one
        compound packet (6.1); None when not due or nowhere to send."""
        source = self.peer.transcoder  # what the relay sends this party
        if source is None or now < self.next_report:
            return None
        self.next_report = now + RTCP_INTERVAL
        dest = self.rtcp.dest
        if dest is None:
            return None
        ssrc, packets, octets, rtp_ts = source.sender_info()
        if not packets:
            return None
        ntp = wall + NTP_EPOCH
        seconds = int(ntp)
        fraction = int((ntp - seconds) * (1 << 32)) & 0xFFFFFFFF
        sr = struct.pack(
            "!BBHIIIIII", 0x80, 200, 6, ssrc, seconds & 0xFFFFFFFF, fraction,
            rtp_ts & 0xFFFFFFFF, packets & 0xFFFFFFFF, octets & 0xFFFFFFFF,
        )  # fmt: skip
        cname = b"sbc@" + self.bind.encode()
        item = bytes((1, len(cname))) + cname + b"\x00"  # CNAME, then the list's end
        item += b"\x00" * (-len(item) % 4)
        sdes = struct.pack("!BBHI", 0x81, 202, (4 + len(item)) // 4, ssrc) + item
        packet = sr + sdes
        if self.sender is not None:
            try:
                packet = self.sender.protect_rtcp(packet)
            except SrtpError:
                self.engine.protect_failures += 1
                return None
        self.packets_out += 1
        self.bytes_out += len(packet)
        return (self.rtcp_port, packet, dest)

    def transcode_dropped(self) -> int:
        """Input this leg's transcoder could not use (undecodable, late, unknown payload
        type, events the peer cannot take): the metrics' view of a failing transcoder."""
        t = self.transcoder
        return t.dropped if isinstance(t, Transcoder) else 0

    def set_transcoder(self) -> None:
        """After an Update: a transcoder from this party's codec to the peer's when both
        have one (kept while neither codec changes: its SSRC and sequence go on)."""
        mine = self.party.codec if self.party is not None else None
        theirs = self.peer.party.codec if self.peer.party is not None else None
        if mine is None or theirs is None or self.passthrough:
            self.engine.transcode_dropped += self.transcode_dropped()
            self.transcoder = None
            self.codecs = None
            return
        if self.transcoder is not None and self.codecs == (mine, theirs):
            return
        self.engine.transcode_dropped += self.transcode_dropped()  # the one replaced
        self.codecs = (mine, theirs)
        try:
            self.transcoder = Transcoder(mine, theirs)
        except Exception as exc:  # a codec the SDP side should not have chosen: never crash
            log.error(
                "session %s port %d: cannot transcode %s to %s: %s",
                self.session.name, self.port, mine.name, theirs.name, exc,
            )  # fmt: skip
            self.transcoder = _Mute()

    def on_rtcp(self, data: bytes, src: Address, now: float) -> Result:
        size = len(data)
        latch = self.rtcp
        if src == latch.addr:
            receiver = self.receiver
            if receiver is not None:
                try:
                    data = receiver.unprotect_rtcp(data)
                except SrtpError:
                    self.srtp_failures += 1
                    return None
        else:
            admitted = self._admit(latch, data, src, now, True)
            if admitted is None:
                return None
            data = admitted
        if len(data) >= 8:
            ssrc = data[4:8]
            if ssrc != latch.ssrc:
                latch.ssrc = ssrc
                latch.see(ssrc)
        self.packets_in += 1
        self.bytes_in += size
        self.session.last = now
        if self.transcoder is not None:
            return None  # RFC 3550 7.2: a translator that re-encodes terminates RTCP
        peer = self.peer
        dest = peer.rtcp.dest
        if dest is None:
            self.engine.no_destination += 1
            return None
        sender = peer.sender
        if sender is not None:
            try:
                data = sender.protect_rtcp(data)
            except SrtpError:
                self.engine.protect_failures += 1
                return None
        peer.packets_out += 1
        peer.bytes_out += len(data)
        return (peer.rtcp_port, data, dest)

    def _admit(
        self, latch: _Latch, data: bytes, src: Address, now: float, rtcp: bool
    ) -> bytes | None:
        """A packet from an address other than the latched one: the latching rules."""
        if src in self.local and (src not in latch.trusted or src[1] in self.session.ports):
            # The relay's own port is a source only when the party's SDP names it: a call
            # that left the SBC for a backend and came back to it (the core legs of the two
            # calls meet between relay ports). Never a port of the same session (a loop).
            self.dropped_source += 1
            return None
        rtp_addr = self.rtp.addr
        trusted = latch.addr is None and (
            src in latch.trusted
            or (rtcp and rtp_addr is not None and src == (rtp_addr[0], rtp_addr[1] + 1))
        )
        in_window = now <= latch.until
        receiver = self.receiver
        if receiver is None:
            if not (trusted or in_window):
                self.dropped_source += 1
                return None
            if self.strict and (len(data) < (8 if rtcp else 12) or data[0] & 0xC0 != 0x80):
                self.engine.invalid += 1
                return None
            latch.latch(src)
            return data
        if not (trusted or in_window):
            # After the window only a verified SSRC change re-latches. The SSRC is in the
            # clear (RFC 3711 3.1, 3.4) and authenticated: a known one is dropped unverified.
            ssrc = data[4:8] if rtcp else data[8:12]
            if len(ssrc) < 4 or ssrc in latch.seen or (not rtcp and ssrc == self.ssrc):
                self.dropped_source += 1
                return None
        try:
            plain = receiver.unprotect_rtcp(data) if rtcp else receiver.unprotect(data)
        except SrtpError:
            self.srtp_failures += 1
            return None
        if not (trusted or in_window):
            # RFC 3711 3.2.1, 3.3.2: only the key holder makes a packet that authenticates,
            # and a replay fails: a new SSRC from a new address is a restarted stream.
            log.info(
                "session %s port %d: SSRC change %s from %s re-latches",
                self.session.name, self.port, ssrc.hex(), src,
            )  # fmt: skip
        latch.latch(src)
        return plain

    def _new_ssrc(self, ssrc: bytes, seq: int, pt: int) -> None:
        if self.ssrc is not None:
            expected = self.cycles + self.max_seq - self.base_seq + 1
            self.lost_before += max(0, expected - self.received)
        self.ssrc = ssrc
        self.rtp.see(ssrc)
        self.clock = _CLOCK_RATES.get(pt, 8000)
        self.base_seq = self.max_seq = seq
        self.cycles = self.received = 0

    def _restart(self, seq: int) -> None:
        expected = self.cycles + self.max_seq - self.base_seq + 1
        self.lost_before += max(0, expected - self.received)
        self.base_seq = self.max_seq = seq
        self.cycles = self.received = 0


class RelayEngine:
    """All relay sessions of one worker; see the module docstring for the rules."""

    def __init__(self, *, timeout: float = 60.0, latch_window: float = 5.0) -> None:
        self.timeout = timeout
        self.latch_window = latch_window
        self._sessions: dict[str, _Session] = {}
        self._ports: dict[int, Handler] = {}
        self._local: set[LocalPort] = set()
        # drops that belong to no party's statistics
        self.no_session = 0  # a port without a session
        self.no_destination = 0  # the other party has no address yet (or is on hold)
        self.invalid = 0  # not RTP/RTCP on a non-passthrough stream
        self.protect_failures = 0  # SRTP protect refused (a duplicate, RFC 3711 9.1)
        self.transcode_dropped = 0  # what transcoders gone could not use (live: per leg)
        self._dtmf: list[_DtmfJob] = []  # the SBC's own events being sent (send_dtmf)
        # the party counters (_LEG_COUNTERS) of legs gone, for totals()
        self._retired = [0] * len(_LEG_COUNTERS)
        self.dtls: DtlsContext | None = None  # the SBC's certificate (set_identity)
        # DTLS records waiting for ``dtls_step``. A handshake step costs 0.1-0.4 ms of
        # public-key work (ECDHE, ECDSA, the peer's certificate); done as each record
        # arrives, 50 browsers setting up at once held every other call's packets for tens
        # of milliseconds (bench/webrtc.py). The worker runs one step between two rounds of
        # reading its ports, so a packet waits for one step at most.
        self.dtls_backlog: deque[tuple[_Leg, _WebRtc, bytes, Address]] = deque()
        self.dtls_dropped = 0  # records dropped for a full backlog
        self.dtls_legs: set[_Leg] = set()  # WebRTC legs whose DTLS timer is running

    def set_identity(self, identity: control.Identity) -> bool:
        """The SBC's DTLS certificate (control.Identity) for its WebRTC parties; False
        (logged) if it cannot be used: WebRTC parties then relay nothing."""
        try:
            self.dtls = DtlsContext(identity)
        except DtlsError as exc:
            log.error("media: %s", exc)
            self.dtls = None
            return False
        return True

    @property
    def sessions(self) -> int:
        return len(self._sessions)

    @property
    def ports(self) -> int:
        return len(self._ports)

    def local_ports(self) -> set[LocalPort]:
        return set(self._local)

    def totals(self) -> control.Totals:
        """Every counter since the engine started, and the sessions and ports it holds
        (O(streams), for the periodic metrics report; nothing is added per packet)."""
        sums = list(self._retired)
        transcode = self.transcode_dropped
        for session in self._sessions.values():
            for legs in session.streams.values():
                for leg in legs:
                    for i, name in enumerate(_LEG_COUNTERS):
                        sums[i] += getattr(leg, name)
                    transcode += leg.transcode_dropped()
        return control.Totals(
            **dict(zip(_LEG_COUNTERS, sums, strict=True)),
            no_session=self.no_session, no_destination=self.no_destination,
            invalid=self.invalid, protect_failures=self.protect_failures,
            transcode_dropped=transcode, dtls_dropped=self.dtls_dropped,
            sessions=len(self._sessions), ports=len(self._ports),
        )  # fmt: skip

    def _retire(self, legs: tuple[_Leg, _Leg]) -> None:
        for leg in legs:
            leg.webrtc = None  # its queued DTLS records are skipped
            self.dtls_legs.discard(leg)
            for i, name in enumerate(_LEG_COUNTERS):
                self._retired[i] += getattr(leg, name)
            self.transcode_dropped += leg.transcode_dropped()

    # -- packets -----------------------------------------------------------------------------
    def receive(self, port: int, data: bytes, src: Address, now: float) -> Result:
        """A datagram ``data`` from ``src`` arrived on local ``port``: what to send, if any,
        as (local port to send from, bytes, destination), or a Burst (transcoding)."""
        handler = self._ports.get(port)
        if handler is None:
            self.no_session += 1
            return None
        return handler(data, src, now)

    # -- control -----------------------------------------------------------------------------
    def update(self, update: control.Update, now: float) -> PortChanges:
        session = self._sessions.get(update.session)
        if session is None:
            session = self._sessions[update.session] = _Session(update.session, now)
        session.last = now
        session.reported = False
        window = now + self.latch_window
        streams: dict[int, tuple[_Leg, _Leg]] = {}
        wanted: dict[int, tuple[str, Handler]] = {}
        for spec in update.streams:
            legs = session.streams.get(spec.index)
            if legs is None:
                legs = (
                    _Leg(session, self._local, self),
                    _Leg(session, self._local, self),
                )
                legs[0].peer, legs[1].peer = legs[1], legs[0]
                legs[0].where, legs[1].where = (spec.index, "a"), (spec.index, "b")
                changed = True
            else:
                a, b = legs[0].party, legs[1].party
                changed = (
                    a is None or b is None or a.remote != spec.a.remote
                    or b.remote != spec.b.remote or a.remote_rtcp != spec.a.remote_rtcp
                    or b.remote_rtcp != spec.b.remote_rtcp
                )  # fmt: skip
            streams[spec.index] = legs
            for leg, party in ((legs[0], spec.a), (legs[1], spec.b)):
                until = window if changed else leg.rtp.until
                usable = leg.configure(party, spec.passthrough, until)
                for port, handler in leg.handlers(usable).items():
                    owner = self._ports.get(port)
                    if port in wanted or (owner is not None and port not in session.ports):
                        log.error(
                            "session %s: port %d is already in use; stream %d not relayed",
                            session.name, port, spec.index,
                        )  # fmt: skip
                        continue
                    wanted[port] = (party.bind, handler)
        for legs in streams.values():
            for leg in legs:
                leg.set_transcoder()
        for index, legs in session.streams.items():
            if streams.get(index) is not legs:
                self._retire(legs)  # a stream the Update closed: its counts stay in totals()
        session.streams = streams
        session.can_timeout = any(
            leg.party is not None and leg.party.sends for legs in streams.values() for leg in legs
        )
        return self._set_ports(session, wanted)

    def delete(self, session: str) -> tuple[control.Stats, PortChanges]:
        """Forget the session: its statistics and the ports to close."""
        stats = self.stats(session)
        found = self._sessions.pop(session, None)
        if found is None:
            return stats, PortChanges()
        for legs in found.streams.values():
            self._retire(legs)
            for leg in legs:
                leg.unlink()
        changes = self._set_ports(found, {})
        found.streams = {}
        return stats, changes

    def stats(self, session: str) -> control.Stats:
        found = self._sessions.get(session)
        if found is None:
            return control.Stats(session=session, streams=())
        return control.Stats(
            session=session,
            streams=tuple(
                control.StreamStats(index=index, a=a.stats(), b=b.stats())
                for index, (a, b) in sorted(found.streams.items())
            ),
        )

    # -- timers ------------------------------------------------------------------------------
    def reports(self, now: float, wall: float) -> list[Out]:
        """The relay's own RTCP sender reports due now on transcoded streams (``wall``:
        the time of day, for the NTP timestamp). O(streams); the worker calls it about
        once a second."""
        out: list[Out] = []
        for session in self._sessions.values():
            for legs in session.streams.values():
                for leg in legs:
                    if leg.peer.transcoder is not None:
                        report = leg.report(now, wall)
                        if report is not None:
                            out.append(report)
        return out

    # -- DTMF from SIP INFO ------------------------------------------------------------------
    def send_dtmf(self, command: control.SendDtmf, now: float) -> bool:
        """Start sending a digit as RFC 4733 events to ``command.party`` in the output
        stream of the transcoder towards it (its SSRC, sequence numbers and timeline), after
        the digits still being sent to that party; the packets come from ``dtmf_due``.
        False (logged) if the stream has no such transcoder or the digit is not one."""
        session = self._sessions.get(command.session)
        legs = session.streams.get(command.index) if session is not None else None
        code = control.DTMF_EVENTS.get(command.digit)
        target = None if legs is None else legs[1] if command.party == "b" else legs[0]
        transcoder = None if target is None else target.peer.transcoder
        if (
            target is None or code is None or not isinstance(transcoder, Transcoder)
            or transcoder.dst.dtmf_pt is None
        ):  # fmt: skip
            log.warning(
                "session %s stream %d: cannot send DTMF %r to party %s",
                command.session, command.index, command.digit, command.party,
            )  # fmt: skip
            return False
        ms = min(max(command.duration_ms, DTMF_MIN_MS), DTMF_MAX_MS)
        start = now
        for job in self._dtmf:
            if job.target is target:
                start = max(start, job.start + job.length + DTMF_GAP)
        self._dtmf.append(_DtmfJob(target, transcoder, code, ms / 1000.0, start))
        return True

    def dtmf_due(self, now: float) -> list[Out]:
        """The packets of the SBC's own events due by ``now`` (the worker calls it at
        ``next_dtmf``)."""
        out: list[Out] = []
        for job in self._dtmf:
            target = job.target
            live = (
                self._sessions.get(target.session.name) is target.session
                and target.peer.transcoder is job.transcoder
            )
            while live and not job.done and job.next <= now:
                for packet in job.step(now):
                    sent = target.send(packet)
                    if sent is not None:
                        out.append(sent)
            if not live:
                job.done = True  # the stream changed or ended: the rest is not sent
        self._dtmf = [job for job in self._dtmf if not job.done]
        return out

    def next_dtmf(self) -> float | None:
        """When ``dtmf_due`` next has something to send."""
        return min((job.next for job in self._dtmf), default=None)

    def check_timeouts(self, now: float) -> list[control.Timeout]:
        """Sessions idle for ``timeout`` seconds, each reported once."""
        out: list[control.Timeout] = []
        limit = now - self.timeout
        for s in self._sessions.values():
            if s.can_timeout and not s.reported and s.last <= limit:
                s.reported = True
                out.append(control.Timeout(session=s.name, idle=now - s.last))
        return out

    def next_deadline(self) -> float | None:
        """When ``check_timeouts`` may next report something or ``dtls_due`` has a flight
        to retransmit (O(sessions))."""
        due = [
            s.last + self.timeout
            for s in self._sessions.values()
            if s.can_timeout and not s.reported
        ]
        dtls = self.next_dtls()
        if dtls is not None:
            due.append(dtls)
        return min(due) if due else None

    # -- DTLS (WebRTC parties) ----------------------------------------------------------------
    def dtls_step(self, now: float) -> list[Out]:
        """Handle the oldest queued DTLS record: what its endpoint sends back. The worker
        calls it while ``dtls_backlog`` is not empty, between rounds of reading its ports;
        afterwards ``next_dtls`` may be sooner (a flight went out)."""
        if not self.dtls_backlog:
            return []
        leg, state, data, src = self.dtls_backlog.popleft()
        return leg.dtls_record(state, data, src, now)

    def next_dtls(self) -> float | None:
        """When ``dtls_due`` next has a handshake flight to retransmit (RFC 6347 4.2.4)."""
        due: float | None = None
        for leg in self.dtls_legs:
            state = leg.webrtc
            deadline = state.dtls.deadline() if state is not None and state.dtls else None
            if deadline is not None and (due is None or deadline < due):
                due = deadline
        return due

    def dtls_due(self, now: float) -> list[Out]:
        """The DTLS flights to retransmit by ``now`` (the worker calls it at ``next_dtls``)."""
        out: list[Out] = []
        for leg in list(self.dtls_legs):
            state = leg.webrtc
            deadline = state.dtls.deadline() if state is not None and state.dtls else None
            if deadline is None:
                self.dtls_legs.discard(leg)
            elif deadline <= now:
                out.extend(leg.dtls_timer(now))
        return out

    # -- ports -------------------------------------------------------------------------------
    def _set_ports(self, session: _Session, wanted: dict[int, tuple[str, Handler]]) -> PortChanges:
        opened: list[LocalPort] = []
        closed: list[LocalPort] = []
        for port, (bind, _) in session.ports.items():
            new = wanted.get(port)
            if new is None or new[0] != bind:
                closed.append((bind, port))
                self._local.discard((bind, port))
                del self._ports[port]
        for port, (bind, handler) in wanted.items():
            old = session.ports.get(port)
            if old is None or old[0] != bind:
                opened.append((bind, port))
                self._local.add((bind, port))
            self._ports[port] = handler
        session.ports = wanted
        return PortChanges(open=tuple(opened), close=tuple(closed))
