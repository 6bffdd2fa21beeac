#!/usr/bin/env python3
"""WebRTC set-up bursts on a media worker: does terminating ICE and DTLS-SRTP for 50
browsers at once stall the media of the calls the worker already relays?

    .venv/bin/python bench/webrtc.py [--quick] [--out docs/performance.md]

One SBC media worker (``sbc.io.media_worker.MediaWorkers``, ``--workers`` 1, started with a
certificate from ``sbc.media.dtls.make_identity``) relays ``--calls`` plain RTP calls (200:
G.711, 20 ms packets both ways, 20,000 packets/s), played by bench/media.py's load processes
(bench/media_load.py: ``sendmmsg`` in 1 ms slots, every packet stamped by the kernel as it is
queued to the receiving socket, SO_TIMESTAMPNS). Each round has three latency runs of
``--seconds`` each, with the same calls:

  direct  the load's callers send straight to its callees: the baseline one-way time that
          the relay's "added latency" is taken against (as bench/media.py does);
  A       through the worker, nothing else happening;
  B       through the worker, and ``--burst-at`` seconds into the run ``--legs`` (50) WebRTC
          legs are set up at once on the same worker: the bench sends one ``control.Update``
          per leg (party a WebRTC: ICE-lite, DTLS server; party b plain RTP; ports from a
          range the calls do not use), waits for the worker to bind the ports, then a
          separate process (multiprocessing spawn: the browsers do not share this process's
          GIL) plays all the browsers at once: a STUN Binding request with USE-CANDIDATE
          (sbc.media.ice.binding_request, answered with MESSAGE-INTEGRITY keyed by the
          leg's ICE password), then a DTLS client handshake (pyOpenSSL on memory BIOs over
          a UDP socket, its own self-signed certificate whose fingerprint is in the Update,
          flights retransmitted on pyOpenSSL's DTLSv1 timer), the SBC's certificate checked
          against the SBC's fingerprint, SRTP keys exported (RFC 5764 4.2), then a few SRTP
          packets from the browser (the worker decrypts them towards party b's socket) and
          plain RTP from party b (the worker encrypts them towards the browser) to prove the
          keys both ways. Each leg's setup time runs from its first STUN request to its keys.

Per run: the one-way times of every packet of the calls (p50, p99, p99.9, max); for B also
the handshake window (the first STUN request to the last leg's keys), the packets sent
inside it (and, for comparison, those sent in the same seconds of run A), the worker's CPU
seconds over the burst (/proc/PID/stat, from the browsers' start to their report), the
worst stall (the longest a packet waited beyond the run's median one-way time) and the
longest gap between two packets out of the relay. ``--rounds`` rounds (3); each figure
reported is the median over the rounds. Before the rounds, a 3 s warm-up run with a first
burst (the worker's and the browsers' first handshakes cost more) is reported apart. The
machine may be shared: each run first waits up to 5 s (``--quiet-wait``) for other work to
fall under 10 % of a core (bench/media.py's ``quiet_machine``) and a run that other work
disturbed anyway is run again, ``--retries`` times at most and only within ``--budget``
seconds.

Every process started here (load processes, the media worker, the browsers' process) is
stopped by its PID at the end, also on error. Packets go to 127.0.0.1 only. Every run and
every loop is bounded in packets and time; ``--quick`` takes about 30 s, the default about
two minutes. ``--out FILE`` rewrites the section between the bench/webrtc.py markers.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import bisect
import contextlib
import datetime as dt
import itertools
import multiprocessing as mp
import os
import platform
import resource
import secrets
import selectors
import signal
import socket
import statistics
import struct
import sys
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import media_load
from media import (
    GRACE,
    HOST,
    MAX_OTHER,
    QUIET_WAIT,
    BenchError,
    Direct,
    Load,
    Relay,
    Route,
    SbcRelay,
    bound_udp_ports,
    cpu_delta,
    cpu_snapshot,
    percentile,
    proc_cpu,
    quiet_machine,
    wait_ports,
)
from media_load import PACKETS_PER_CALL_S, CallSpec
from report import command_line, cpu_model, dist_version, git_rev, machine_busy_seconds, publish

# The WebRTC legs' relay ports: inside bench/media.py's SBC range (8000-19999) but above the
# ports its calls take (from 8000 up, 4 per call); taken ports are skipped.
WEBRTC_PORTS = (18000, 19999)
STUN_RTO = 0.1  # seconds between retransmissions of a connectivity check
STUN_TRIES = 8
AFTER = 0.5  # seconds after the last keys still counted as around the burst
SLOW_MS = 5  # a packet slower than this (ms, one way) counts as delayed
PROOF = 5  # SRTP packets each way per leg once keyed
BROWSER_TIMEOUT = 30.0  # seconds the browsers have for all their legs
PROOF_SSRC = 0x7E000000  # | leg << 1 | direction: apart from the load's 0x5B...
MTU = 1200  # the largest DTLS datagram the browsers send (records packed up to it)
# The browsers' SRTP protection profiles, best first (Chrome offers the AEAD ones first):
# RFC 5764 4.1.2 / RFC 7714 14.2 name -> (pylibsrtp profile, key length, salt length).
BROWSER_PROFILES: dict[bytes, tuple[str, int, int]] = {
    b"SRTP_AEAD_AES_128_GCM": ("SRTP_PROFILE_AEAD_AES_128_GCM", 16, 12),
    b"SRTP_AES128_CM_SHA1_80": ("SRTP_PROFILE_AES128_CM_SHA1_80", 16, 14),
}


# ---------------------------------------------------------------------------------------
# The load: bench/media.py's processes, also reporting each packet's receive time
# ---------------------------------------------------------------------------------------


class TimedEndpoints(media_load.Endpoints):
    """bench/media_load.py's endpoints; the latencies come with their packets' kernel
    receive times (``received_ns``, ns since the epoch, in the same order)."""

    def _latencies(
        self, records: list[tuple[int, int, int, int, int]], detail: list[tuple[int, int]]
    ) -> dict[str, Any]:
        out = super()._latencies(records, detail)
        batches = self.batches
        out["received_ns"] = array.array(
            "q", (rx for key, rx in detail if batches[(key >> 16) & 1].keys.get(key) is not None)
        )
        return out


def serve_timed(index: int, conn: Connection) -> None:
    """A load process (bench/media_load.py ``serve``) with ``TimedEndpoints``."""
    media_load.Endpoints = TimedEndpoints  # type: ignore[misc]
    media_load.serve(index, conn)


class TimedLoad(Load):
    """bench/media.py's ``Load`` whose processes run ``serve_timed``."""

    def __init__(self, procs: int) -> None:
        serve = media_load.serve
        media_load.serve = serve_timed
        try:
            super().__init__(procs)
        finally:
            media_load.serve = serve


class WebRtcSbc(SbcRelay):
    """bench/media.py's ``SbcRelay`` with the SBC's DTLS certificate given to its workers."""

    def __init__(self, workers: int) -> None:
        super().__init__(workers)
        from sbc.media import dtls

        self.identity, self.fingerprint = dtls.make_identity()

    async def start(self) -> None:
        from sbc.io.media_worker import MediaWorkers

        self.workers = await MediaWorkers.start(
            self.count, timeout=3600.0, latch_window=5.0, on_event=self.events.append,
            identity=self.identity,
        )  # fmt: skip
        self.pids = list(self.workers.pids)


# ---------------------------------------------------------------------------------------
# The browsers (a process of their own)
# ---------------------------------------------------------------------------------------


def _now() -> int:
    return time.time_ns()


def _rtp(seq: int, ssrc: int) -> bytes:
    return struct.pack("!BBHII", 0x80, 0, seq, seq * 160, ssrc) + b"webrtcbench" + bytes(149)


class BrowserLeg:
    """One browser: its ICE socket (the host candidate), the plain party's socket, its
    certificate and, per run, a DTLS client connection."""

    def __init__(self, index: int) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        from OpenSSL import SSL

        from sbc.media import dtls

        self.index = index
        identity, self.fingerprint = dtls.make_identity()
        ctx = SSL.Context(SSL.DTLS_METHOD)
        ctx.use_certificate(x509.load_pem_x509_certificate(identity.certificate))
        ctx.use_privatekey(serialization.load_pem_private_key(identity.private_key, None))  # type: ignore[arg-type]
        ctx.set_verify(SSL.VERIFY_PEER, lambda *_: True)  # checked by fingerprint, below
        ctx.set_tlsext_use_srtp(b":".join(BROWSER_PROFILES))
        ctx.set_options(SSL.OP_NO_QUERY_MTU)
        self.ctx = ctx
        self.sock = self._socket()
        self.bsock = self._socket()
        self.port = self.sock.getsockname()[1]
        self.bport = self.bsock.getsockname()[1]
        self.reset((0, 0, "", ""), "")

    @staticmethod
    def _socket() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((HOST, 0))
        s.setblocking(False)
        return s

    def reset(self, leg: tuple[int, int, str, str], sbc_fingerprint: str) -> None:
        """A new run: the relay's ports and ICE credentials of this leg."""
        from OpenSSL import SSL

        self.relay_a, self.relay_b, self.ufrag, self.pwd = leg
        self.sbc_fingerprint = sbc_fingerprint
        self.conn = SSL.Connection(self.ctx, None)
        self.conn.set_connect_state()
        self.conn.set_ciphertext_mtu(MTU)
        self.transaction = b""
        self.stun_tries = 0
        self.stun_next = 0.0
        self.dtls_started = False
        self.dtls_datagrams = 0
        self.dtls_timeouts = 0
        self.keyed = False
        self.done = False
        self.error = ""
        self.t_stun = self.t_stun_ok = self.t_keys = self.t_proved = 0
        self.srtp_send: Any = None
        self.srtp_recv: Any = None
        self.suite = ""
        self.proof_b = 0  # plain RTP that reached party b from the browser's SRTP
        self.proof_browser = 0  # SRTP that reached the browser from party b's RTP

    # -- STUN -------------------------------------------------------------------------------
    def check(self, now: float) -> None:
        from sbc.media import ice

        if self.stun_tries >= STUN_TRIES:
            self.fail(f"no answer to {STUN_TRIES} connectivity checks")
            return
        if not self.transaction:  # a retransmission keeps its transaction (RFC 8489 6.2.1)
            self.transaction = secrets.token_bytes(12)
        request = ice.binding_request(
            self.transaction, username=f"{self.ufrag}:brw{self.index}", pwd=self.pwd,
            use_candidate=True, tie_breaker=0x5EED0000 + self.index,
        )  # fmt: skip
        if not self.t_stun:
            self.t_stun = _now()
        self.stun_tries += 1
        self.stun_next = now + STUN_RTO
        self.send(request)

    def on_stun(self, data: bytes, now: float) -> None:
        from sbc.media import ice

        if self.dtls_started or data[8:20] != self.transaction:
            return  # a late answer to a retransmission
        try:
            msg = ice.parse(data)
        except ice.StunError as exc:
            self.fail(f"bad STUN answer: {exc}")
            return
        if msg.type != ice.BINDING_SUCCESS or not msg.integrity_ok(self.pwd.encode()):
            self.fail(f"STUN answer {msg.type:#06x} or its integrity not ok")
            return
        self.t_stun_ok = _now()
        self.dtls_started = True
        self.handshake(now)

    # -- DTLS -------------------------------------------------------------------------------
    def handshake(self, now: float) -> None:
        from OpenSSL import SSL

        try:
            self.conn.do_handshake()
        except SSL.WantReadError:
            pass
        except SSL.Error as exc:
            self.flush()
            self.fail(f"handshake: {exc}")
            return
        else:
            self.flush()
            self.finished()
            return
        self.flush()

    def on_dtls(self, data: bytes, now: float) -> None:
        from OpenSSL import SSL

        if not self.dtls_started or self.done:
            return
        try:
            self.conn.bio_write(data)
        except SSL.Error:
            return
        if not self.keyed:
            self.handshake(now)

    def timer(self, now: float) -> float | None:
        """Run the DTLS retransmission timer or the STUN one; when it is next due."""
        from OpenSSL import SSL

        if self.done:
            return None
        if not self.dtls_started:
            if now >= self.stun_next:
                self.check(now)
            return None if self.done else self.stun_next
        if self.keyed:
            return None
        timeout = self.conn.DTLSv1_get_timeout()
        if timeout is None:
            return None
        if timeout <= 0:
            try:
                if self.conn.DTLSv1_handle_timeout():
                    self.dtls_timeouts += 1
            except SSL.Error as exc:
                self.fail(f"handshake timed out: {exc}")
                return None
            self.flush()
            timeout = self.conn.DTLSv1_get_timeout()
            if timeout is None:
                return None
        return now + max(timeout, 0.001)

    def flush(self) -> None:
        """What OpenSSL wrote, as datagrams of whole records up to MTU bytes."""
        from OpenSSL import SSL

        data = b""
        while True:
            try:
                chunk = self.conn.bio_read(65536)
            except SSL.WantReadError:
                break
            if not chunk:
                break
            data += chunk
        current = b""
        pos = 0
        while pos < len(data):
            end = min(len(data), pos + 13 + int.from_bytes(data[pos + 11 : pos + 13], "big"))
            record = data[pos:end]
            pos = end
            if current and len(current) + len(record) > MTU:
                self.send(current)
                current = b""
            current += record
        if current:
            self.send(current)

    def finished(self) -> None:
        """The handshake is done: the SBC's certificate against its fingerprint, the keys
        (RFC 5764 4.2), then the proof packets both ways."""
        import pylibsrtp

        from sbc.media import dtls

        cert = self.conn.get_peer_certificate(as_cryptography=True)
        name, value = self.sbc_fingerprint.split(" ", 1)
        if cert is None or not dtls.matches(cert, ((name, value),)):
            self.fail("the SBC's certificate does not match its fingerprint")
            return
        profile = self.conn.get_selected_srtp_profile()
        if profile not in BROWSER_PROFILES:
            self.fail(f"no SRTP profile agreed ({profile!r})")
            return
        libsrtp, k, s = BROWSER_PROFILES[profile]
        m = self.conn.export_keying_material(b"EXTRACTOR-dtls_srtp", 2 * (k + s))
        client = m[:k] + m[2 * k : 2 * k + s]
        server = m[k : 2 * k] + m[2 * k + s :]
        policy = getattr(pylibsrtp.Policy, libsrtp)
        self.srtp_send = pylibsrtp.Session(
            pylibsrtp.Policy(
                key=client, ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND, srtp_profile=policy
            )
        )
        self.srtp_recv = pylibsrtp.Session(
            pylibsrtp.Policy(
                key=server, ssrc_type=pylibsrtp.Policy.SSRC_ANY_INBOUND, srtp_profile=policy
            )
        )
        self.suite = profile.decode()
        self.keyed = True
        self.t_keys = _now()
        for seq in range(1, PROOF + 1):
            self.send(self.srtp_send.protect(_rtp(seq, PROOF_SSRC | self.index << 1)))
            with contextlib.suppress(OSError):
                self.bsock.sendto(_rtp(seq, PROOF_SSRC | self.index << 1 | 1), (HOST, self.relay_b))

    # -- media ------------------------------------------------------------------------------
    def on_srtp(self, data: bytes) -> None:
        if self.srtp_recv is None:
            return
        try:
            plain = self.srtp_recv.unprotect(data)
        except Exception:  # pylibsrtp.Error: not ours, or not decryptable
            return
        if plain[8:12] == struct.pack("!I", PROOF_SSRC | self.index << 1 | 1):
            self.proof_browser += 1
            self.proved()

    def on_plain(self, data: bytes) -> None:
        if data[8:12] == struct.pack("!I", PROOF_SSRC | self.index << 1) and data[12:23] == (
            b"webrtcbench"
        ):
            self.proof_b += 1
            self.proved()

    def proved(self) -> None:
        if self.proof_b >= PROOF and self.proof_browser >= PROOF and not self.done:
            self.t_proved = _now()
            self.done = True

    def send(self, data: bytes) -> None:
        if data[:1] and 19 < data[0] < 64:
            self.dtls_datagrams += 1
        with contextlib.suppress(OSError):
            self.sock.sendto(data, (HOST, self.relay_a))

    def fail(self, error: str) -> None:
        if not self.done:
            self.error = error
            self.done = True

    def result(self) -> dict[str, Any]:
        return {
            "ok": self.keyed and not self.error,
            "proved": self.proof_b >= PROOF and self.proof_browser >= PROOF,
            "error": self.error or ("" if self.keyed else "no keys before the deadline"),
            "t_stun": self.t_stun, "t_stun_ok": self.t_stun_ok, "t_keys": self.t_keys,
            "t_proved": self.t_proved, "stun_tries": self.stun_tries,
            "dtls_datagrams": self.dtls_datagrams, "dtls_timeouts": self.dtls_timeouts,
            "proof_b": self.proof_b, "proof_browser": self.proof_browser, "suite": self.suite,
        }  # fmt: skip


def play(legs: list[BrowserLeg], timeout: float) -> dict[str, Any]:
    """All the browsers at once, until every leg is done or ``timeout`` seconds passed."""
    sel = selectors.DefaultSelector()
    for leg in legs:
        sel.register(leg.sock, selectors.EVENT_READ, (leg, False))
        sel.register(leg.bsock, selectors.EVENT_READ, (leg, True))
    cpu0 = time.process_time()
    start = time.monotonic()
    deadline = start + timeout
    for leg in legs:  # at once: every leg's first check
        leg.check(start)
    try:
        rounds = 0
        while rounds < 1_000_000 and (now := time.monotonic()) < deadline:
            rounds += 1
            dues = [d for leg in legs if (d := leg.timer(now)) is not None]
            if all(leg.done for leg in legs):
                break
            wait = max(0.0, min([deadline, *dues]) - time.monotonic())
            for key, _ in sel.select(min(wait, 0.05)):
                leg, plain = key.data
                for _ in range(64):
                    try:
                        data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        continue  # an ICMP error queued on the socket
                    now = time.monotonic()
                    if plain:
                        leg.on_plain(data)
                    elif not data:
                        continue
                    elif data[0] < 4:
                        leg.on_stun(data, now)
                    elif 19 < data[0] < 64:
                        leg.on_dtls(data, now)
                    elif 127 < data[0] < 192:
                        leg.on_srtp(data)
    finally:
        sel.close()
    return {
        "legs": [leg.result() for leg in legs],
        "cpu": time.process_time() - cpu0,
        "seconds": time.monotonic() - start,
    }


def browsers_main(conn: Connection, count: int) -> None:
    """The browsers' process: ``count`` browsers; runs them on each "go" until "quit"."""
    try:
        legs = [BrowserLeg(i) for i in range(count)]
        conn.send(("ready", os.getpid(), [(b.fingerprint, b.port, b.bport) for b in legs]))
    except Exception:
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        try:
            kind, arg = conn.recv()
        except EOFError:
            return
        try:
            if kind == "go":
                for leg, spec in zip(legs, arg["legs"], strict=True):
                    leg.reset(spec, arg["sbc_fingerprint"])
                conn.send(("ok", play(legs, arg["timeout"])))
            elif kind == "quit":
                conn.send(("ok", None))
                return
            else:
                conn.send(("error", f"unknown command {kind!r}"))
        except Exception:
            conn.send(("error", traceback.format_exc()))


class Browsers:
    """The browsers' process (multiprocessing spawn), seen from the bench."""

    def __init__(self, count: int) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=browsers_main, args=(child, count), daemon=True)
        self.proc.start()
        child.close()
        if not self.conn.poll(60):
            raise BenchError("the browsers' process did not start in 60 s")
        status, *rest = self.conn.recv()
        if status != "ready":
            raise BenchError(f"browsers' process: {rest[0]}")
        self.pid, self.legs = rest[0], rest[1]

    def go(self, arg: dict[str, Any], timeout: float) -> dict[str, Any]:
        self.conn.send(("go", arg))
        if not self.conn.poll(timeout):
            raise BenchError(f"the browsers did not report in {timeout:.0f} s")
        status, value = self.conn.recv()
        if status != "ok":
            raise BenchError(f"browsers: {value}")
        return value  # type: ignore[no-any-return]

    def cpu_seconds(self) -> float:
        return proc_cpu(self.pid)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(("quit", None))
        self.proc.join(timeout=5)
        if self.proc.is_alive() and self.proc.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.join(timeout=5)


# ---------------------------------------------------------------------------------------
# The WebRTC burst
# ---------------------------------------------------------------------------------------


@dataclass
class Burst:
    """One burst of WebRTC legs: when (ns since the epoch), what the browsers saw, what the
    worker did."""

    updates_ns: int  # the Updates sent
    go_ns: int  # the ports bound, the browsers told to start
    start_ns: int  # the first STUN request
    end_ns: int  # the last leg's keys
    legs: list[dict[str, Any]]
    worker_cpu: float  # seconds, from "go" to the browsers' report
    worker_span: float  # seconds of that
    browser_cpu: float
    stats: str = ""  # what the worker's Stats said of the legs

    @property
    def ok(self) -> int:
        return sum(1 for leg in self.legs if leg["ok"])

    @property
    def proved(self) -> int:
        return sum(1 for leg in self.legs if leg["proved"])

    @property
    def setup_ms(self) -> list[float]:
        return sorted((leg["t_keys"] - leg["t_stun"]) / 1e6 for leg in self.legs if leg["ok"])

    @property
    def window(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9


def webrtc_updates(
    browsers: Browsers, tag: str
) -> tuple[list[Any], list[tuple[int, int, str, str]], set[int]]:
    """The Updates of the legs (sessions "webrtc-TAG-N"), the browsers' view of each (relay
    port facing the browser, relay port facing party b, ICE ufrag and password) and the
    relay ports they bind."""
    from sbc.media import control

    low, high = WEBRTC_PORTS
    taken = bound_udp_ports()
    bases = [p for p in range(low, high - 2, 4) if not taken & set(range(p, p + 4))]
    if len(bases) < len(browsers.legs):
        raise BenchError(f"{len(browsers.legs)} WebRTC legs need more free ports in {low}-{high}")
    updates, specs, ports = [], [], set()
    for i, (fp, bport, partyb) in enumerate(browsers.legs):
        pa, pb = bases[i], bases[i] + 2
        ufrag, pwd = secrets.token_hex(4), secrets.token_hex(12)
        name, value = fp.split(" ", 1)
        updates.append(
            control.Update(
                session=f"webrtc-{tag}-{i}",
                streams=(
                    control.Stream(
                        index=0,
                        a=control.Party(
                            bind=HOST, port=pa, rtcp_mux=True, remote=(HOST, bport),
                            webrtc=control.WebRtc(
                                ufrag=ufrag, pwd=pwd, client=False,
                                fingerprints=((name, value),),
                            ),
                        ),
                        b=control.Party(
                            bind=HOST, port=pb, remote=(HOST, partyb),
                            remote_rtcp=(HOST, partyb + 1),
                        ),
                    ),
                ),
            )
        )  # fmt: skip
        specs.append((pa, pb, ufrag, pwd))
        ports |= {pa, pb, pb + 1}
    return updates, specs, ports


async def burst(sbc: WebRtcSbc, browsers: Browsers, tag: str) -> Burst:
    """Set up every browser's leg at once on worker 0, then delete them (after the run)."""
    updates, specs, ports = webrtc_updates(browsers, tag)
    updates_ns = time.time_ns()
    for update in updates:
        sbc.workers.send(0, update)
    await wait_ports(ports, 30.0)
    go_ns = time.time_ns()
    w0, b0, t0 = sbc.cpu_seconds(), browsers.cpu_seconds(), time.monotonic()
    arg = {"legs": specs, "sbc_fingerprint": sbc.fingerprint, "timeout": BROWSER_TIMEOUT}
    report = await asyncio.to_thread(browsers.go, arg, BROWSER_TIMEOUT + 30)
    w1, b1, t1 = sbc.cpu_seconds(), browsers.cpu_seconds(), time.monotonic()
    legs = report["legs"]
    starts = [leg["t_stun"] for leg in legs if leg["t_stun"]]
    ends = [leg["t_keys"] for leg in legs if leg["t_keys"]]
    return Burst(
        updates_ns=updates_ns,
        go_ns=go_ns,
        start_ns=min(starts) if starts else go_ns,
        end_ns=max(ends) if ends else go_ns,
        legs=legs,
        worker_cpu=w1 - w0,
        worker_span=t1 - t0,
        browser_cpu=b1 - b0,
    )


async def delete_legs(sbc: WebRtcSbc, b: Burst, tag: str) -> str:
    """Delete the burst's sessions; what the worker's Stats say of them."""
    from sbc.media import control

    sbc.events.clear()
    names = [f"webrtc-{tag}-{i}" for i in range(len(b.legs))]
    for name in names:
        sbc.workers.send(0, control.Delete(session=name))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if sum(isinstance(e, control.Stats) for e in sbc.events) >= len(names):
            break
        await asyncio.sleep(0.05)
    stats = [e for e in sbc.events if isinstance(e, control.Stats) and e.session in names]
    if not stats:
        return "no Stats came back"
    a = [st.a for s in stats for st in s.streams]
    bb = [st.b for s in stats for st in s.streams]
    return (
        f"{sum(1 for p in a if p.packets_in)} of {len(stats)} WebRTC parties sent SRTP the "
        f"worker decrypted ({sum(p.packets_in for p in a)} packets in, "
        f"{sum(p.packets_out for p in a)} out, {sum(p.srtp_failures for p in a)} SRTP or DTLS "
        f"failures); party b: {sum(p.packets_in for p in bb)} in, "
        f"{sum(p.packets_out for p in bb)} out"
    )


# ---------------------------------------------------------------------------------------
# Latency runs
# ---------------------------------------------------------------------------------------


@dataclass
class Run:
    kind: str  # direct | A | B
    seconds: float
    start_ns: int  # the load's start, ns since the epoch
    sent: int
    received: int
    late: int
    latencies: list[int]  # ns, sorted
    sent_ns: list[int]  # per packet received: when it was sent (ns since the epoch)
    lat_by_sent: list[int]  # the same packets' one-way times (ns), in that order
    gap_ns: int  # the longest time between two packets out of the relay (ns)
    relay_cpu: float
    load_cpu: float
    kernel_cpu: float
    other_cpu: float
    burst: Burst | None = None
    tries: int = 1

    @property
    def lost(self) -> int:
        return max(0, self.sent - self.received)

    @property
    def other_busy(self) -> float:
        return self.other_cpu / self.seconds

    @property
    def disturbed(self) -> bool:
        return self.other_busy > MAX_OTHER

    def q(self, quantile: float) -> float:
        return percentile(self.latencies, quantile)

    def over(self, ns: int) -> int:
        """How many packets took longer than ``ns``."""
        return len(self.latencies) - bisect.bisect_right(self.latencies, ns)

    def window(self, start_ns: int, end_ns: int) -> list[int]:
        """The sorted one-way times of the packets sent from ``start_ns`` to ``end_ns``."""
        return sorted(
            lat
            for sent, lat in zip(self.sent_ns, self.lat_by_sent, strict=True)
            if start_ns <= sent <= end_ns
        )

    def burst_window(self) -> tuple[int, int]:
        """The burst's handshake window, as offsets (ns) from this run's start."""
        assert self.burst is not None
        return self.burst.start_ns - self.start_ns, self.burst.end_ns - self.start_ns


async def latency_run(
    load: Load,
    relay: Relay,
    seconds: float,
    calls: int,
    extra_pids: list[int],
    during: Any = None,
    at: float = 0.0,
) -> Run:
    """One latency run of ``calls`` calls for ``seconds``; ``during`` (a coroutine function)
    runs ``at`` seconds into it."""
    arg = {"active": calls, "seconds": seconds, "detail": True}
    await asyncio.to_thread(load.command, "prepare", [arg] * len(load.conns), 300)
    start_at = time.monotonic() + 0.2
    start_ns = time.time_ns() + round((start_at - time.monotonic()) * 1e9)
    go = asyncio.create_task(
        asyncio.to_thread(
            load.command, "go", [{"start_at": start_at, "grace": GRACE}] * len(load.conns),
            seconds * 3 + 60,
        )
    )  # fmt: skip
    try:
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))

        def ours() -> float:
            return relay.cpu_seconds() + load.cpu_seconds() + sum(proc_cpu(p) for p in extra_pids)

        r0, l0, o0, a0, m0 = (
            relay.cpu_seconds(), load.cpu_seconds(), ours(), cpu_snapshot(), machine_busy_seconds()
        )  # fmt: skip
        result: Burst | None = None
        if during is not None:
            await asyncio.sleep(max(0.0, start_at + at - time.monotonic()))
            result = await during()
        await asyncio.sleep(max(0.0, start_at + seconds - time.monotonic()))
        r1, l1, o1, a1, m1 = (
            relay.cpu_seconds(), load.cpu_seconds(), ours(), cpu_snapshot(), machine_busy_seconds()
        )  # fmt: skip
    finally:
        results = await go
    procs, kthreads = cpu_delta(a0, a1)
    mine = o1 - o0
    latencies: list[int] = []
    sent_ns: list[int] = []
    received: list[int] = []
    for r in results:
        latencies.extend(r["latencies"])
        received.extend(r["received_ns"])
        sent_ns.extend(rx - lat for rx, lat in zip(r["received_ns"], r["latencies"], strict=True))
    by_rx = sorted(received)
    gap = max((b - a for a, b in itertools.pairwise(by_rx)), default=0)
    lat_by_sent = [lat for r in results for lat in r["latencies"]]
    return Run(
        kind="",
        seconds=seconds,
        start_ns=start_ns,
        sent=sum(r["sent"] for r in results),
        received=sum(r["received"] for r in results),
        late=sum(r["late"] for r in results),
        latencies=sorted(latencies),
        sent_ns=sent_ns,
        lat_by_sent=lat_by_sent,
        gap_ns=gap,
        relay_cpu=r1 - r0,
        load_cpu=l1 - l0,
        kernel_cpu=kthreads,
        # Other processes: those alive at both ends, or the machine's busy time less ours
        # (this process and the browsers' count as ours).
        other_cpu=max(0.0, procs - mine, m1 - m0 - mine - kthreads),
        burst=result,
    )


@dataclass
class Round:
    direct: Run
    a: Run
    b: Run


@dataclass
class Bench:
    rounds: list[Round] = field(default_factory=list)
    checked: str = ""
    stats: list[str] = field(default_factory=list)
    first: Run | None = None  # the worker's first burst (the warm-up run)


async def measured(args: argparse.Namespace, relay: Relay, load: Load, kind: str, make: Any) -> Run:
    """A run after waiting for the machine to be quiet; again while other work disturbed it
    (``--retries`` times at most, within the budget); the least disturbed one."""
    tries: list[Run] = []
    while True:
        await quiet_machine(relay, load, args.quiet_wait)
        run = await make()
        run.kind = kind
        tries.append(run)
        report_run(run)
        if not run.disturbed or len(tries) > args.retries or time.monotonic() > args.deadline:
            break
        print(f"  (other processes used {100 * run.other_busy:.0f} % of a core: again)")
    best = min(tries, key=lambda r: r.other_busy)
    best.tries = len(tries)
    return best


def report_run(run: Run) -> None:
    line = (
        f"  {run.kind or 'run':6} sent {run.sent:,} received {run.received:,} (late "
        f"{run.late:,}); one-way p50 {run.q(0.5) / 1e3:.0f} us p99 {run.q(0.99) / 1e3:.0f} us "
        f"p99.9 {run.q(0.999) / 1e3:.0f} us max {run.q(1.0) / 1e3:.0f} us; longest gap "
        f"{run.gap_ns / 1e6:.1f} ms; CPU relay {100 * run.relay_cpu / run.seconds:.0f} %, "
        f"load {100 * run.load_cpu / run.seconds:.0f} %, other {100 * run.other_busy:.0f} %"
    )
    b = run.burst
    if b is not None:
        s = b.setup_ms
        inside = run.window(b.start_ns, b.end_ns)
        line += (
            f"\n         burst: {b.ok}/{len(b.legs)} keyed, {b.proved} proved; window "
            f"{1000 * b.window:.0f} ms; setup p50 {percentile_f(s, 0.5):.0f} ms max "
            f"{percentile_f(s, 1.0):.0f} ms; worker CPU {b.worker_cpu:.2f} s over "
            f"{b.worker_span:.2f} s; in the window {len(inside):,} packets, p99 "
            f"{percentile(inside, 0.99) / 1e3:.0f} us max {percentile(inside, 1.0) / 1e3:.0f} us"
        )
        errors = sorted({leg["error"] for leg in b.legs if leg["error"]})
        if errors:
            line += f"\n         errors: {'; '.join(errors[:3])}"
    print(line, flush=True)


def percentile_f(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    k = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
    return values[k]


async def run(args: argparse.Namespace) -> tuple[Bench, dict[str, str]]:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    bench = Bench()
    load: Load | None = None
    sbc: WebRtcSbc | None = None
    browsers: Browsers | None = None
    try:
        load = TimedLoad(args.procs)
        browsers = Browsers(args.legs)
        sbc = WebRtcSbc(args.workers)
        await sbc.start()
        extra = [browsers.pid, os.getpid()]
        t0 = time.monotonic()
        direct_routes = await Direct().open(args.calls, False, load)
        sbc_routes = await sbc.open(args.calls, False, load)
        print(f"{args.calls} calls set up in {time.monotonic() - t0:.1f} s", flush=True)

        def use(routes: list[Route]) -> None:
            assert load is not None
            load.set_calls([
                CallSpec(call=c, dest_a=r.dest_a, dest_b=r.dest_b) for c, r in enumerate(routes)
            ])  # fmt: skip

        # Warm-up: the worker's first packets, the load's first steps and the first
        # handshakes of the worker and of the browsers cost more; reported apart.
        use(sbc_routes)
        first = await latency_run(
            load, sbc, 3.0, args.calls, extra, during=lambda: burst(sbc, browsers, "warm"),
            at=1.0,
        )  # fmt: skip
        assert first.burst is not None
        first.burst.stats = await delete_legs(sbc, first.burst, "warm")
        first.kind = "first"
        report_run(first)
        bench.first = first
        for n in range(args.rounds):
            print(f"round {n + 1} of {args.rounds}", flush=True)
            use(direct_routes)
            direct = await measured(
                args, sbc, load, "direct",
                lambda: latency_run(load, sbc, args.seconds, args.calls, extra),
            )  # fmt: skip
            use(sbc_routes)
            a = await measured(
                args, sbc, load, "A",
                lambda: latency_run(load, sbc, args.seconds, args.calls, extra),
            )  # fmt: skip
            tags = iter(f"{n}-{t}" for t in range(args.retries + 2))

            async def with_burst(tags: Any = tags) -> Run:
                assert sbc is not None and browsers is not None and load is not None
                tag = next(tags)
                r = await latency_run(
                    load, sbc, args.seconds, args.calls, extra,
                    during=lambda: burst(sbc, browsers, tag), at=args.burst_at,
                )  # fmt: skip
                assert r.burst is not None
                r.burst.stats = await delete_legs(sbc, r.burst, tag)
                print(f"  {r.burst.stats}", flush=True)
                return r

            b = await measured(args, sbc, load, "B", with_burst)
            assert b.burst is not None
            bench.stats.append(b.burst.stats)
            bench.rounds.append(Round(direct, a, b))
        bench.checked = await sbc.close_calls()
    finally:
        if sbc is not None:
            with contextlib.suppress(Exception):
                await sbc.stop()
        if browsers is not None:
            browsers.close()
        if load is not None:
            load.close()
    from OpenSSL import SSL

    env = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cpus": f"{os.cpu_count()} CPUs",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "sbc": dist_version("sbc") + git_rev(),
        "pyopenssl": dist_version("pyOpenSSL"),
        "openssl": SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode(),
        "pylibsrtp": dist_version("pylibsrtp"),
        "uvloop": dist_version("uvloop"),
        "command": command_line(),
    }
    return bench, env


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def ms(ns: float) -> str:
    """A time in ns as µs below 1 ms, else as ms."""
    if ns != ns:
        return "—"
    if abs(ns) < 1e6:
        return f"{ns / 1e3:,.0f} µs"
    return f"{ns / 1e6:,.2f} ms" if abs(ns) < 10e6 else f"{ns / 1e6:,.1f} ms"


def med(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def around_stall(r: Round, run: Run) -> float:
    """The longest a packet of ``run`` sent around round ``r``'s burst (from the Updates to
    AFTER seconds after the last keys, as offsets from the run's start) waited beyond the
    run's p50."""
    b = r.b.burst
    assert b is not None
    lo, hi = b.updates_ns - r.b.start_ns, b.end_ns + int(AFTER * 1e9) - r.b.start_ns
    return percentile(run.window(run.start_ns + lo, run.start_ns + hi), 1.0) - run.q(0.5)


def render(bench: Bench, args: argparse.Namespace, env: dict[str, str]) -> str:
    rounds = bench.rounds
    n = len(rounds)

    def q(kind: str, quantile: float) -> float:
        return med([getattr(r, kind).q(quantile) for r in rounds])

    def added(kind: str, quantile: float) -> float:
        return q(kind, quantile) - q("direct", quantile)

    def inside(kind: str, quantile: float) -> float:
        """The quantile of the packets sent in round r's burst window (run B's; for run A
        the same offsets from its start)."""
        values = []
        for r in rounds:
            lo, hi = r.b.burst_window()
            run = getattr(r, kind)
            values.append(percentile(run.window(run.start_ns + lo, run.start_ns + hi), quantile))
        return med(values)

    def inside_count(kind: str) -> float:
        values = []
        for r in rounds:
            lo, hi = r.b.burst_window()
            run = getattr(r, kind)
            values.append(len(run.window(run.start_ns + lo, run.start_ns + hi)))
        return med(values)

    def updating(quantile: float) -> float:
        """The quantile of run B's packets sent while the Updates were applied."""
        values = []
        for r in rounds:
            b = r.b.burst
            assert b is not None
            values.append(percentile(r.b.window(b.updates_ns, b.go_ns), quantile))
        return med(values)

    def stall(kind: str) -> float:
        """The longest a packet sent around the burst (from the Updates to AFTER seconds
        after the last keys; for run A the same offsets) waited beyond the run's p50."""
        return med([around_stall(r, getattr(r, kind)) for r in rounds])

    def gap(kind: str) -> float:
        return med([getattr(r, kind).gap_ns for r in rounds])

    def over(kind: str) -> float:
        return med([getattr(r, kind).over(SLOW_MS * 1_000_000) for r in rounds])

    def lost(kind: str) -> str:
        runs = [getattr(r, kind) for r in rounds]
        sent = sum(x.sent for x in runs)
        return f"{100 * sum(x.lost for x in runs) / max(1, sent):.2f} %"

    bursts = [r.b.burst for r in rounds if r.b.burst is not None]
    setups = sorted(s for b in bursts for s in b.setup_ms)
    legs = sum(len(b.legs) for b in bursts)
    ok = sum(b.ok for b in bursts)
    proved = sum(b.proved for b in bursts)
    window = med([b.window * 1000 for b in bursts])
    worker_cpu = med([b.worker_cpu for b in bursts])
    span = med([b.worker_span for b in bursts])
    relay_rate = med([r.a.relay_cpu / r.a.seconds for r in rounds])  # the calls' own share
    burst_only = med([b.worker_cpu - relay_rate * b.worker_span for b in bursts])
    browser_cpu = med([b.browser_cpu for b in bursts])
    updates_ms = med([(b.go_ns - b.updates_ns) / 1e6 for b in bursts])
    suites = sorted({leg["suite"] for b in bursts for leg in b.legs if leg["suite"]})
    retrans = sum(leg["dtls_timeouts"] for b in bursts for leg in b.legs)
    stun_retries = sum(max(0, leg["stun_tries"] - 1) for b in bursts for leg in b.legs)
    rate = args.calls * int(PACKETS_PER_CALL_S)

    lines = [
        f"## WebRTC set-up burst: the relay's latency while {args.legs} browsers connect "
        "(bench/webrtc.py)",
        "",
        f"- Date: {env['date']}",
        f"- CPU: {env['cpu']}; {env['cpus']}, nothing pinned",
        f"- Versions: sbc {env['sbc']}, {env['python']}, uvloop {env['uvloop']}, pyOpenSSL "
        f"{env['pyopenssl']} ({env['openssl']}), pylibsrtp {env['pylibsrtp']}",
        f"- Command: `{env['command']}`",
        f"- Setup: {args.workers} media worker (`MediaWorkers` with the SBC's ECDSA P-256 "
        f"certificate) relaying {args.calls} plain RTP calls (G.711, 20 ms, both ways: "
        f"{rate:,} packets/s) played by {args.procs} load processes (bench/media_load.py); "
        f"{n} rounds, each a direct run (no relay: the baseline), run A (the calls alone) and "
        f"run B (the calls, and {args.burst_at:g} s in, {args.legs} WebRTC legs set up at "
        f"once on the same worker), {args.seconds:g} s each; every figure is the median of "
        "the rounds'. The browsers are one process of their own (STUN check with "
        "USE-CANDIDATE, DTLS client handshake with its own certificate, SRTP keys exported, "
        f"{PROOF} SRTP packets each way); load, worker and browsers share the 2 cores.",
        "",
        f"| One-way time of the calls' packets | p50 | p99 | p99.9 | max | Over {SLOW_MS} ms "
        "| Lost |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, label in (
        ("direct", "direct (baseline)"),
        ("a", "run A: relay, no WebRTC"),
        ("b", f"run B: relay, {args.legs} WebRTC legs set up"),
    ):
        lines.append(
            f"| {label} | {ms(q(kind, 0.5))} | {ms(q(kind, 0.99))} | {ms(q(kind, 0.999))} | "
            f"{ms(q(kind, 1.0))} | {over(kind):,.0f} | {lost(kind)} |"
        )
    for kind, label in (("a", "added by the relay, run A"), ("b", "added by the relay, run B")):
        lines.append(
            f"| {label} | {ms(added(kind, 0.5))} | {ms(added(kind, 0.99))} | "
            f"{ms(added(kind, 0.999))} | — | | |"
        )
    lines += [
        "",
        "| During the handshake window | Run A (same seconds) | Run B |",
        "|---|---:|---:|",
        f"| Packets sent in it | {inside_count('a'):,.0f} | {inside_count('b'):,.0f} |",
        f"| One-way p50 | {ms(inside('a', 0.5))} | {ms(inside('b', 0.5))} |",
        f"| One-way p99 | {ms(inside('a', 0.99))} | {ms(inside('b', 0.99))} |",
        f"| One-way max | {ms(inside('a', 1.0))} | {ms(inside('b', 1.0))} |",
        f"| Worst stall around the burst (max − the run's p50; from the Updates to {AFTER:g} s "
        f"after the last keys) | {ms(stall('a'))} | {ms(stall('b'))} |",
        f"| Longest gap between relayed packets, run | {ms(gap('a'))} | {ms(gap('b'))} |",
        f"| Before the window, while the {args.legs} Updates were applied and their ports "
        f"bound: one-way p99 / max | | {ms(updating(0.99))} / {ms(updating(1.0))} |",
        "",
        "| The burst | |",
        "|---|---:|",
        f"| Legs keyed (SRTP proved both ways), all rounds | {ok} of {legs} ({proved}) |",
        f"| Setup time, first STUN → keys: p50 / p99 / max | {percentile_f(setups, 0.5):.0f} / "
        f"{percentile_f(setups, 0.99):.0f} / {percentile_f(setups, 1.0):.0f} ms |",
        f"| Handshake window (first STUN → last keys) | {window:.0f} ms |",
        f"| {args.legs} Updates applied and ports bound (seen by the bench) | "
        f"{updates_ms:.0f} ms |",
        f"| Worker CPU from the browsers' start to their report ({span:.2f} s) | "
        f"{worker_cpu:.2f} s |",
        f"| … less the calls' relaying at run A's rate ({100 * relay_rate:.0f} % of a core) | "
        f"{burst_only:.2f} s, {1000 * burst_only / max(1, args.legs):.1f} ms per leg |",
        f"| Browsers' process CPU | {browser_cpu:.2f} s |",
        f"| STUN retransmissions / DTLS retransmission timeouts, all rounds | {stun_retries} / "
        f"{retrans} |",
        "",
        f"SRTP profile agreed: {', '.join(suites) or 'none'}. Worker's Stats of the WebRTC "
        f"sessions, last round: {bench.stats[-1] if bench.stats else '—'}. The calls: "
        f"{bench.checked or '—'}.",
        "",
        "Per round (run B; window, setup p99 and stall in ms; CPU in seconds; other = other "
        "processes' share of a core during the run):",
        "",
        "| Round | A p99 | B p99 | Window | In-window p99 / max | Setup p99 | Keyed | Worker "
        "CPU | B stall | Other A / B | Runs (with repeats) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, r in enumerate(rounds, 1):
        b = r.b.burst
        assert b is not None
        w = r.b.window(b.start_ns, b.end_ns)
        lines.append(
            f"| {i} | {ms(r.a.q(0.99))} | {ms(r.b.q(0.99))} | {1000 * b.window:.0f} | "
            f"{ms(percentile(w, 0.99))} / {ms(percentile(w, 1.0))} | "
            f"{percentile_f(b.setup_ms, 0.99):.0f} | {b.ok}/{len(b.legs)} | "
            f"{b.worker_cpu:.2f} | {ms(around_stall(r, r.b))} | "
            f"{100 * r.a.other_busy:.0f} % / {100 * r.b.other_busy:.0f} % | "
            f"3 ({r.direct.tries + r.a.tries + r.b.tries}) |"
        )
    if bench.first is not None and bench.first.burst is not None:
        f, fb = bench.first, bench.first.burst
        w = f.window(fb.start_ns, fb.end_ns)
        lines += [
            "",
            f"The worker's first burst (a {f.seconds:g} s warm-up run right after it started, "
            f"not in the figures above): {fb.ok} of {len(fb.legs)} legs keyed, window "
            f"{1000 * fb.window:.0f} ms, setup p50 {percentile_f(fb.setup_ms, 0.5):.0f} ms and "
            f"max {percentile_f(fb.setup_ms, 1.0):.0f} ms, worker CPU {fb.worker_cpu:.2f} s, "
            f"in-window p99 {ms(percentile(w, 0.99))} and max {ms(percentile(w, 1.0))}, "
            f"other processes {100 * f.other_busy:.0f} % of a core.",
        ]
    share = med(
        [
            (r.b.over(SLOW_MS * 1_000_000) - r.a.over(SLOW_MS * 1_000_000)) / max(1, r.b.received)
            for r in rounds
        ]
    )
    lines += ["", interpretation(args, added, inside, stall, burst_only, setups, share), ""]
    lines += method(args)
    return "\n".join(lines) + "\n"


def interpretation(
    args: argparse.Namespace,
    added: Any,
    inside: Any,
    stall: Any,
    burst_only: float,
    setups: list[float],
    share: float,
) -> str:
    """Two to four sentences on what the figures say."""
    a99, b99 = added("a", 0.99), added("b", 0.99)
    per_leg = burst_only / max(1, args.legs)  # seconds
    worst = stall("b")
    few = b99 - a99 < 3e6
    verdict = (
        f"{'stays' if few else 'does not stay'} within a few ms with the burst ({ms(a99)} in "
        f"run A, {ms(b99)} in run B): the packets the burst delays beyond {SLOW_MS} ms are "
        f"{100 * share:.1f} % of the run's, {'under' if share < 0.01 else 'over'} the 1 % a "
        "p99 leaves out, so the whole-run figure depends on the run's length"
    )
    longer = ""
    if worst > args.legs * per_leg * 1e9:
        longer = (
            "; the stall outlasts that CPU, likely because the worker also waits for a core, "
            "which it shares with the browsers' process and the load on this 2-core machine"
        )
    text = [
        f"What it means: over a whole {args.seconds:g} s run the relay's added p99 {verdict}; "
        f"inside the handshake window the calls' packets took {ms(inside('b', 0.5))} at the "
        f"median, {ms(inside('b', 0.99))} at p99 and {ms(inside('b', 1.0))} at most "
        f"(run A, the same seconds: {ms(inside('a', 0.5))}, {ms(inside('a', 0.99))}, "
        f"{ms(inside('a', 1.0))}).",
        f"The handshakes' public-key work on the worker's one thread is "
        f"{1000 * per_leg:.1f} ms of CPU per leg beyond the relaying (ECDHE key generation "
        f"and the ECDSA signature of the ServerKeyExchange for each ClientHello; the ECDH, the "
        f"check of the browser's certificate and signature, the fingerprint and the key "
        f"export for each client Finished; all {args.legs} legs: "
        f"{1000 * args.legs * per_leg:.0f} ms). The worker queues DTLS records and handles "
        f"one between two rounds of reading its ports (RelayEngine.dtls_step), so a call's "
        f"packet waits for one handshake step at most, not for every flight that arrived "
        f"with it (handled as they came, the same burst held packets for 29-73 ms); the "
        f"worst single stall: {ms(worst)} in run B, {ms(stall('a'))} in run A{longer}.",
        f"Each leg was keyed {percentile_f(setups, 0.5):.0f} ms after its first STUN check at "
        f"the median and {percentile_f(setups, 1.0):.0f} ms at worst.",
    ]
    if a99 > 2e6:
        text.append(
            f"Run A's own added p99 ({ms(a99)}) shows stalls that have nothing to do with "
            "WebRTC (other work on the shared machine; see the per-round table), so the "
            "figures to go by are those of the window, against the same seconds of run A."
        )
    return " ".join(text)


def method(args: argparse.Namespace) -> list[str]:
    return [
        "How it is measured:",
        "",
        "- One-way times as in bench/media.py: the kernel stamps each packet as it is queued "
        "to the receiving socket (SO_TIMESTAMPNS); the send time is read around the "
        "`sendmmsg` that sent it. Added latency is the relay's percentile minus the direct "
        f"run's (medians of the rounds). Over {SLOW_MS} ms: packets whose one-way time "
        "was longer, per run. The worst stall around the burst is the longest one-way time "
        f"of the packets sent from the Updates to {AFTER:g} s after the last keys, less the "
        "run's p50 (run A: the same offsets from its start); the "
        "longest gap is the largest interval between two consecutive packets received by "
        "the load (all sockets), which is about 1 ms when nothing stalls (the load sends in "
        "1 ms slots).",
        "- The handshake window runs from the first STUN request of the burst to the last "
        "leg's keys, both stamped by the browsers' process (CLOCK_REALTIME, as the kernel "
        'stamps); "in the window" means packets sent in it. Run A\'s column takes the same '
        "offsets from its own start. Before the window the bench sent the Updates and waited "
        "for the worker to bind the legs' ports (polling /proc/net/udp).",
        "- Worker CPU: utime + stime of the worker process from /proc/PID/stat, read when "
        "the browsers are told to start and when they report (after the last leg's SRTP "
        "proof or failure); \"less the calls' relaying\" subtracts run A's CPU rate over "
        "that time.",
        f"- A leg counts as keyed when the browser's handshake finished, the SBC's "
        f"certificate matched the SBC's fingerprint and the SRTP keys were exported; proved "
        f"when {PROOF} SRTP packets from the browser reached party b decrypted and {PROOF} RTP "
        f"packets from party b reached the browser and decrypted with its keys. STUN checks "
        f"are retransmitted every {1000 * STUN_RTO:.0f} ms ({STUN_TRIES} at most), DTLS "
        f"flights on pyOpenSSL's DTLSv1 timer; the browsers give up after "
        f"{BROWSER_TIMEOUT:.0f} s. The legs' sessions are deleted after each run B.",
        f"- Other work on the machine (other processes above {100 * MAX_OTHER:.0f} % of a "
        f"core; the bench and the browsers' process count as ours) disturbs a run: it is run "
        f"again, {args.retries} times at most, and the least disturbed run is kept; each run "
        f"first waits up to {args.quiet_wait:g} s for the machine to be quiet.",
    ]


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="about 30 s: one round of short runs")
    ap.add_argument("--rounds", type=int, help="rounds of direct, A and B (3; quick 1)")
    ap.add_argument("--seconds", type=float, help="length of each run (10; quick 5)")
    ap.add_argument("--burst-at", type=float, help="seconds into run B (2.5; quick 2)")
    ap.add_argument("--legs", type=int, default=50, help="WebRTC legs set up at once (50)")
    ap.add_argument("--calls", type=int, default=200, help="plain RTP calls (200: 20,000 pps)")
    ap.add_argument("--procs", type=int, default=2, help="load processes (2)")
    ap.add_argument("--workers", type=int, default=1, help="media workers (1)")
    ap.add_argument("--retries", type=int, help="repeats of a disturbed run (1; quick 0)")
    ap.add_argument(
        "--quiet-wait", type=float, default=QUIET_WAIT,
        help=f"seconds a run waits at most for other work to stop ({QUIET_WAIT:g})",
    )  # fmt: skip
    ap.add_argument("--budget", type=float, help="seconds after which no run is repeated")
    ap.add_argument("--out", type=Path, help="rewrite the bench/webrtc.py section of FILE")
    args = ap.parse_args(argv)
    q = args.quick
    args.rounds = args.rounds or (1 if q else 3)
    args.seconds = args.seconds or (5.0 if q else 10.0)
    args.burst_at = args.burst_at if args.burst_at is not None else (2.0 if q else 2.5)
    args.retries = args.retries if args.retries is not None else (0 if q else 1)
    args.deadline = time.monotonic() + (args.budget or (60.0 if q else 240.0))
    if args.workers != 1:
        ap.error("the legs and the calls go to worker 0: --workers 1 only")
    if not (0 < args.burst_at < args.seconds) or args.legs < 1 or args.calls < 1:
        ap.error("--burst-at must be inside the run; --legs and --calls >= 1")
    if args.rounds < 1 or args.procs < 1:
        ap.error("--rounds and --procs >= 1")
    t0 = time.monotonic()
    try:
        bench, env = asyncio.run(run(args))
    except BenchError as exc:
        print(f"bench/webrtc.py: {exc}", file=sys.stderr)
        return 1
    publish("bench/webrtc.py", render(bench, args, env), args.out)
    print(f"({time.monotonic() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
