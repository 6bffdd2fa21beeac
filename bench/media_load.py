"""The load generator of bench/media.py: processes that play both ends of many RTP or SRTP
calls at once, over loopback.

Each process (``serve``, started by bench/media.py through multiprocessing) owns a share of
the calls and two UDP sockets: one for the callers (they send to the relay's port facing the
caller and receive what the relay sends back), one for the callees. Every call has two
streams, caller -> callee and callee -> caller, each one G.711 packet every 20 ms (172 bytes
of RTP, 182 of SRTP): 100 packets/s per call.

Packets are made before a step starts (``prepare``): for SRTP each stream's packets are
encrypted with its own key (pylibsrtp), with sequence numbers that go on increasing from one
step to the next, as the relay's replay protection requires (RFC 3711 3.3.2). During the step
(``go``) nothing is built: the packets of one 1 ms slot leave in one ``sendmmsg`` call, and
what comes back is read with ``recvmmsg`` (both through ctypes: the kernel's work per packet
stays, Python's goes). A stream's 20 ms period is split in 20 slots and the streams are spread
evenly over them (a call's two streams 10 ms apart), as calls that did not start in the same
millisecond are: the load is smooth, not 20 ms bursts.

Latency (``detail``): each socket has SO_TIMESTAMPNS, so the kernel stamps every packet when it
is queued to the socket (CLOCK_REALTIME), however late the process reads it; the send time of
a packet is interpolated between ``time.time_ns()`` before and after its ``sendmmsg``. A packet
is known by its SSRC and sequence number, which the relay leaves unchanged and SRTP leaves in
the clear. Without ``detail`` only packets are counted.

Linux x86-64 only (the layouts of ``struct mmsghdr`` and ``struct cmsghdr`` are written here).
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import os
import socket
import struct
import sys
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pylibsrtp

HOST = "127.0.0.1"
PTIME = 0.020  # seconds per packet of a stream
PHASES = 20  # slots per PTIME: one slot is 1 ms
PACKETS_PER_CALL_S = 2 / PTIME  # two streams
PAYLOAD = b"mediabench" + b"\xff" * 150  # 160 bytes: 20 ms of G.711 (0xFF: PCMU silence)
SSRC_BASE = 0x5B000000  # SSRC = base | call << 1 | direction
SLOT = 192  # send buffer bytes per packet (RTP 172, SRTP 182)
RSLOT = 256  # receive buffer bytes per datagram
CSLOT = 64  # control (cmsg) bytes per datagram
VLEN = 256  # datagrams per recvmmsg
MAX_SEND = 1024  # UIO_MAXIOV: datagrams per sendmmsg at most
SOCK_BUF = 16 << 20
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
MSG_DONTWAIT = 0x40
MSGHDR_WORDS = 8  # struct mmsghdr on x86-64: 64 bytes, 8 words
KEEP = 3  # datagrams kept per socket and step, for bench/media.py to check
QUIET = 0.3  # after the grace period, read late datagrams until none came for this long
LATE_MAX = 10.0  # ... or this long after the last send (a relay's queues can hold seconds)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
_libc.sendmmsg.restype = ctypes.c_int
_libc.recvmmsg.argtypes = [
    ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p
]  # fmt: skip
_libc.recvmmsg.restype = ctypes.c_int


PROFILES = {  # SDES crypto-suite (RFC 4568 6.2) -> libsrtp profile
    "AES_CM_128_HMAC_SHA1_80": pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80,
    "AES_CM_128_HMAC_SHA1_32": pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_32,
}


def srtp_session(key_salt: bytes, suite: str, outbound: bool) -> pylibsrtp.Session:
    """An SRTP session of ``suite`` for any SSRC."""
    policy = pylibsrtp.Policy(
        key=key_salt,
        ssrc_type=(
            pylibsrtp.Policy.SSRC_ANY_OUTBOUND if outbound else pylibsrtp.Policy.SSRC_ANY_INBOUND
        ),
        srtp_profile=PROFILES[suite],
    )
    return pylibsrtp.Session(policy)


def ssrc_of(call: int, direction: int) -> int:
    return SSRC_BASE | call << 1 | direction


def rtp_packet(seq: int, ssrc: int) -> bytes:
    """RTP (RFC 3550 5.1), version 2, PCMU (payload type 0), 20 ms of payload."""
    return struct.pack("!BBHII", 0x80, 0, seq & 0xFFFF, (seq * 160) & 0xFFFFFFFF, ssrc) + PAYLOAD


def sockaddr_in(port: int) -> bytes:
    return struct.pack("<HH4s8x", socket.AF_INET, socket.htons(port), socket.inet_aton(HOST))


def udp_drops(ports: set[int]) -> int:
    """Datagrams the kernel dropped for the sockets on 127.0.0.1:``ports`` (receive buffer
    full): the last column of /proc/net/udp."""
    wanted = {f"0100007F:{p:04X}" for p in ports}
    total = 0
    for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] in wanted:
            total += int(fields[-1])
    return total


def _address(buf: Any) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


@dataclass
class CallSpec:
    """One call as a load process plays it: where its caller and callee send (the relay's
    ports facing each), and their SRTP send keys (master key || salt; None for RTP) with the
    crypto-suite of each leg."""

    call: int
    dest_a: int  # the caller sends here
    dest_b: int  # the callee sends here
    key_a: bytes | None = None
    key_b: bytes | None = None
    suite_a: str = "AES_CM_128_HMAC_SHA1_80"
    suite_b: str = "AES_CM_128_HMAC_SHA1_80"


@dataclass
class _Stream:
    call: int
    direction: int  # 0: caller -> callee (leaves the caller socket), 1: callee -> caller
    ssrc: int
    dest: int  # index into the sockaddr table
    srtp: pylibsrtp.Session | None
    seq: int = 1


@dataclass
class _Batch:
    """The packets of one direction for one step, laid out for sendmmsg."""

    count: int
    data: bytearray
    iov: array.array[int]
    hdr: array.array[int]
    slot_start: array.array[int]  # message index where each 1 ms slot starts; +1 entry
    keys: dict[int, int] = field(default_factory=dict)  # ssrc << 16 | seq -> message (detail)


class _Receiver:
    """recvmmsg into fixed buffers; each datagram with its kernel receive time stamp."""

    def __init__(self) -> None:
        self.data = bytearray(VLEN * RSLOT)
        self.ctrl = bytearray(VLEN * CSLOT)
        self.iov = array.array("Q")
        self.hdr = array.array("Q")
        data, ctrl = _address(self.data), _address(self.ctrl)
        for i in range(VLEN):
            self.iov.extend((data + i * RSLOT, RSLOT))
        iov = self.iov.buffer_info()[0]
        for i in range(VLEN):
            self.hdr.extend((0, 0, iov + 16 * i, 1, ctrl + i * CSLOT, CSLOT, 0, 0))
        self.pristine = bytes(self.hdr)
        self.hdr_addr = self.hdr.buffer_info()[0]

    def drain(self, fd: int, detail: list[tuple[int, int]] | None, keep: list[bytes]) -> int:
        """Read until the socket is empty; the number of datagrams. With ``detail``, append
        (ssrc << 16 | seq, receive time in ns) per datagram; the first datagrams are copied
        into ``keep`` until it holds KEEP."""
        total = 0
        while True:
            ctypes.memmove(self.hdr_addr, self.pristine, len(self.pristine))
            n = int(_libc.recvmmsg(fd, self.hdr_addr, VLEN, MSG_DONTWAIT, None))
            if n <= 0:
                return total
            total += n
            if detail is not None:
                data, ctrl = self.data, self.ctrl
                for i in range(n):
                    seq, ssrc = struct.unpack_from("!2xH4xI", data, i * RSLOT)
                    level, kind, sec, nsec = struct.unpack_from("iiqq", ctrl, i * CSLOT + 8)
                    if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                        detail.append((ssrc << 16 | seq, sec * 1_000_000_000 + nsec))
            if len(keep) < KEEP:
                hdr = self.hdr
                for i in range(min(n, KEEP - len(keep))):
                    length = hdr[i * MSGHDR_WORDS + 7] & 0xFFFFFFFF
                    keep.append(bytes(self.data[i * RSLOT : i * RSLOT + length]))
            if n < VLEN:
                return total


class Endpoints:
    """The callers and callees of one load process."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.socks = []
        for _ in range(2):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((HOST, 0))
            try:
                s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, SOCK_BUF)
            except OSError:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCK_BUF)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            s.setblocking(False)
            self.socks.append(s)
        self.ports = (self.socks[0].getsockname()[1], self.socks[1].getsockname()[1])
        self.streams: list[_Stream] = []
        self.addrs = bytearray()
        self.batches: list[_Batch] = []
        self.detail = False
        self.seconds = 0.0
        self.receiver = _Receiver()

    def set_calls(self, calls: list[CallSpec]) -> None:
        """The calls of the next steps (a new relay or mode): sequence numbers start again."""
        self.batches = []
        self.streams = []
        addrs = bytearray()
        for spec in calls:
            legs = ((0, spec.dest_a, spec.key_a, spec.suite_a),
                    (1, spec.dest_b, spec.key_b, spec.suite_b))  # fmt: skip
            for direction, dest, key, suite in legs:
                addrs += sockaddr_in(dest)
                self.streams.append(
                    _Stream(
                        call=spec.call,
                        direction=direction,
                        ssrc=ssrc_of(spec.call, direction),
                        dest=len(addrs) // 16 - 1,
                        srtp=None if key is None else srtp_session(key, suite, outbound=True),
                    )
                )
        self.addrs = addrs

    def prepare(self, active: int, seconds: float, detail: bool) -> float:
        """Build the packets of a step of ``seconds`` in which the calls numbered below
        ``active`` send; the seconds it took."""
        t0 = time.monotonic()
        self.batches = []
        self.detail, self.seconds = detail, seconds
        ticks = max(1, round(seconds / PTIME))
        addr_base = _address(self.addrs) if self.addrs else 0
        for direction in (0, 1):
            streams = [s for s in self.streams if s.direction == direction and s.call < active]
            # Spread over the slots by their order in this process; the other direction
            # half a period later.
            phases: list[list[_Stream]] = [[] for _ in range(PHASES)]
            for i, s in enumerate(streams):
                phases[(i + direction * PHASES // 2) % PHASES].append(s)
            count = ticks * len(streams)
            data = bytearray(max(1, count) * SLOT)
            base = _address(data)
            iov = array.array("Q", bytes(16 * count))
            hdr = array.array("Q", bytes(64 * count))
            iov_base = iov.buffer_info()[0] if count else 0
            slot_start = array.array("q")
            keys: dict[int, int] = {}
            m = 0
            for _tick in range(ticks):
                for group in phases:
                    slot_start.append(m)
                    for s in group:
                        pkt = rtp_packet(s.seq, s.ssrc)
                        if s.srtp is not None:
                            pkt = s.srtp.protect(pkt)
                        if detail:
                            keys[s.ssrc << 16 | (s.seq & 0xFFFF)] = m
                        s.seq += 1
                        off = m * SLOT
                        data[off : off + len(pkt)] = pkt
                        iov[2 * m] = base + off
                        iov[2 * m + 1] = len(pkt)
                        w = m * MSGHDR_WORDS
                        hdr[w] = addr_base + 16 * s.dest
                        hdr[w + 1] = 16
                        hdr[w + 2] = iov_base + 16 * m
                        hdr[w + 3] = 1
                        m += 1
            slot_start.append(m)
            self.batches.append(_Batch(count, data, iov, hdr, slot_start, keys))
        return time.monotonic() - t0

    def _send(self, direction: int, first: int, last: int) -> tuple[int, int]:
        """Send messages [first, last) of a direction; (sent, errors)."""
        batch = self.batches[direction]
        fd = self.socks[direction].fileno()
        hdr = batch.hdr.buffer_info()[0]
        sent = errors = 0
        i = first
        while i < last:
            n = int(_libc.sendmmsg(fd, hdr + 64 * i, min(MAX_SEND, last - i), 0))
            if n <= 0:  # skip the one that failed (ENOBUFS, ECONNREFUSED after ICMP...)
                errors += 1
                i += 1
                continue
            sent += n
            i += n
        return sent, errors

    def go(self, start_at: float, grace: float) -> dict[str, Any]:
        """Run the prepared step from ``start_at`` (time.monotonic, the same in every
        process); read what comes back until ``grace`` seconds after the last send."""
        ports = set(self.ports)
        keep: list[list[bytes]] = [[], []]  # per socket
        detail: list[tuple[int, int]] | None = [] if self.detail else None
        fds = [s.fileno() for s in self.socks]
        for fd in fds:  # leftovers of the last step
            self.receiver.drain(fd, None, [])
        drops0 = udp_drops(ports)
        received = [0, 0]  # per socket: [0] callers (direction 1 arrives), [1] callees
        sent = [0, 0]
        errors = 0
        late_max = 0.0
        late_slots = 0
        records: list[tuple[int, int, int, int, int]] = []  # direction, first, last, t1, t2
        nslots = len(self.batches[0].slot_start) - 1
        step = PTIME / PHASES
        cpu0 = time.process_time()
        while (wait := start_at - time.monotonic()) > 0:
            time.sleep(min(wait, 0.05))
        for slot in range(nslots):
            deadline = start_at + slot * step
            late = time.monotonic() - deadline
            if late < 0:
                time.sleep(-late)
            else:
                late_max = max(late_max, late)
                if late > step:
                    late_slots += 1
            for direction in (0, 1):
                starts = self.batches[direction].slot_start
                first, last = starts[slot], starts[slot + 1]
                if first == last:
                    continue
                if detail is not None:
                    t1 = time.time_ns()
                    n, e = self._send(direction, first, last)
                    records.append((direction, first, last, t1, time.time_ns()))
                else:
                    n, e = self._send(direction, first, last)
                sent[direction] += n
                errors += e
            for i, fd in enumerate(fds):
                received[i] += self.receiver.drain(fd, detail, keep[i])
        send_end = time.monotonic()
        cpu_send = time.process_time() - cpu0
        stop_at = send_end + grace
        while time.monotonic() < stop_at:
            time.sleep(0.005)
            for i, fd in enumerate(fds):
                received[i] += self.receiver.drain(fd, detail, keep[i])
        # What still comes is late (a relay working off its queues): counted apart, until
        # nothing came for QUIET seconds, LATE_MAX at most.
        late = 0
        quiet_since = time.monotonic()
        stop_at = send_end + LATE_MAX
        while (now := time.monotonic()) < stop_at and now - quiet_since < QUIET:
            time.sleep(0.01)
            n = sum(self.receiver.drain(fd, None, []) for fd in fds)
            if n:
                late += n
                quiet_since = time.monotonic()
        result: dict[str, Any] = {
            "sent": sum(sent),
            "received": sum(received),
            "late": late,
            "errors": errors,
            "send_span": send_end - start_at,
            "late_max": late_max,
            "late_slots": late_slots,
            "slots": nslots,
            "cpu_send": cpu_send,
            "drops": udp_drops(ports) - drops0,
            "samples": keep,
        }
        if detail is not None:
            result.update(self._latencies(records, detail))
        return result

    def _latencies(
        self, records: list[tuple[int, int, int, int, int]], detail: list[tuple[int, int]]
    ) -> dict[str, Any]:
        """One-way times in ns of the packets received, matched to their send times."""
        sent_ns = [array.array("q", bytes(8 * b.count)) for b in self.batches]
        for direction, first, last, t1, t2 in records:
            times = sent_ns[direction]
            n = last - first
            for j in range(n):
                times[first + j] = t1 + (t2 - t1) * (2 * j + 1) // (2 * n)
        latencies = array.array("q")
        unmatched = 0
        for key, rx in detail:
            direction = (key >> 16) & 1
            m = self.batches[direction].keys.get(key)
            if m is None:
                unmatched += 1
                continue
            latencies.append(rx - sent_ns[direction][m])
        return {"latencies": latencies, "unmatched": unmatched}


def serve(index: int, conn: Connection) -> None:
    """A load process: answers bench/media.py's commands on ``conn`` until "quit"."""
    with contextlib.suppress(OSError):
        os.nice(0)
    endpoints = Endpoints(index)
    conn.send(("ports", endpoints.ports, os.getpid()))
    while True:
        try:
            kind, arg = conn.recv()
        except EOFError:
            return
        try:
            if kind == "calls":
                endpoints.set_calls(arg)
                conn.send(("ok", None))
            elif kind == "prepare":
                conn.send(("ok", endpoints.prepare(**arg)))
            elif kind == "go":
                conn.send(("ok", endpoints.go(**arg)))
            elif kind == "quit":
                conn.send(("ok", None))
                return
            else:
                conn.send(("error", f"unknown command {kind!r}"))
        except Exception:
            conn.send(("error", traceback.format_exc()))


assert struct.calcsize("P") == 8 and sys.byteorder == "little", "x86-64 Linux only"
