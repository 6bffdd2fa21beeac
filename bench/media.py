#!/usr/bin/env python3
"""Media relay throughput and latency: RTP and SRTP calls direct, through the SBC's media
workers and through rtpengine, in one run.

    .venv/bin/python bench/media.py [--quick] [--out docs/performance.md]

The load (bench/media_load.py): ``--procs`` processes, each playing the callers and the
callees of a share of the calls, over loopback UDP. A call is two streams, caller -> callee and
callee -> caller, of one G.711 packet (20 ms, 172 bytes of RTP) every 20 ms: 100 packets/s
per call, so 1,000 calls are 100,000 packets/s through the relay. In SRTP mode each party
sends with its own SDES key and the relay re-keys: it decrypts with the sending leg's key and
encrypts with its own key towards the other leg (the SBC: ``control.Party.recv_key`` /
``send_key``; rtpengine: the a=crypto it writes into the SDP it returns). The caller's leg
uses AES_CM_128_HMAC_SHA1_80, the callee's AES_CM_128_HMAC_SHA1_32: with one suite on both
legs rtpengine hands each side the other side's key and relays SRTP untouched. Packets are
built and encrypted before each step and sent in 1 ms slots with ``sendmmsg``; what comes
back is read with ``recvmmsg``, each packet stamped by the kernel (SO_TIMESTAMPNS).

Setups, each with its own calls (as many as the top rate needs: 2,500):

  direct     the load's callers send straight to its callees: the latency baseline and, at
             the top rate only, what the load offers with the machine to itself;
  sbc        ``sbc.io.media_worker.MediaWorkers`` with ``--workers`` worker processes, one
             ``control.Update`` per call as the signalling side sends it, round-robin;
  rtpengine  rtpengine (Debian package) in userspace (``table = -1``), ``num-threads`` =
             ``--workers``, driven over its ng control protocol (bencode over UDP: ``offer``,
             ``answer``, ``delete``).

Per setup and mode (RTP, SRTP): ``--latency-runs`` runs at ``--latency-rate`` packets/s (20,000:
200 calls) in which every packet's one-way time is taken (each percentile reported is the
median of the runs': one run's p99 hangs on a few stalls), then a ladder of rates, ``--step``
seconds each, until a step fails, then ``--refine`` bisection steps. A step passes with under
1 % of its packets lost or late (not back within 0.3 s of the last send) and the load on pace
(its last packet sent at most 5 % of the step's length late). After a failed step rtpengine
gets new calls (it stops relaying for good on ports whose queue overflowed). CPU shares come
from /proc/PID/stat and /proc/stat. The machine may be shared: each step first waits up to
5 s for other work to fall under 10 % of a core, and a failed step or a latency run that
other work disturbed anyway is run again, ``--retries`` times at most and only within
``--budget`` seconds of the start.

Every process started here is stopped by its PID at the end, also on error. Packets go to
127.0.0.1 only. Every step is bounded in packets and time; ``--quick`` takes about a
minute and a half, the default about five. ``--out FILE`` rewrites the section between the
bench/media.py markers.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime as dt
import multiprocessing as mp
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import media_load
from media_load import LATE_MAX, PACKETS_PER_CALL_S, PAYLOAD, CallSpec, srtp_session
from report import (
    command_line,
    cpu_model,
    dist_version,
    git_rev,
    machine_busy_seconds,
    stop_process,
    tool_version,
    write_section,
)

from sbc.media import ng  # rtpengine's ng messages: the SBC's own codec

HOST = "127.0.0.1"
# The caller's leg uses the 80-bit tag, the callee's the 32-bit one (RFC 4568 6.2.1, 6.2.2):
# with one suite on both legs rtpengine hands each side the other's key (SRTP passthrough, no
# crypto at all); with two suites it must decrypt and re-encrypt, as the SBC always does.
SUITE_A = "AES_CM_128_HMAC_SHA1_80"
SUITE_B = "AES_CM_128_HMAC_SHA1_32"
LADDER = (40_000, 60_000, 80_000, 100_000, 130_000, 160_000, 200_000, 250_000)
QUICK_LADDER = (50_000, 100_000, 150_000, 200_000)
MAX_LOSS = 0.01
MAX_LATE = 0.05  # a step's sending may end at most 5 % of its length late
GRACE = 0.3  # seconds of reading after the last packet of a step
MAX_OTHER = 0.10  # other processes busier than this (share of a core): the step is disturbed
QUIET_WAIT = 5.0  # seconds a step waits at most for the machine to be quiet
# The SBC's relay ports: below the ephemeral range (32768-60999), below the ranges the
# interop tests give their SBCs (20000-31999), above SIPp's media ports (6000...); taken ports
# are skipped.
SBC_PORTS = (8000, 19999)
RTPENGINE_PORTS = (33000, 60000)  # it skips ports that are taken
CLK_TCK = os.sysconf("SC_CLK_TCK")
RTPENGINE = shutil.which("rtpengine") or "/usr/bin/rtpengine"


class BenchError(Exception):
    pass


# ---------------------------------------------------------------------------------------
# /proc helpers
# ---------------------------------------------------------------------------------------


def proc_cpu(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds; 0 if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_snapshot() -> dict[int, tuple[int, bool]]:
    """Per PID: utime + stime in ticks, and whether it is a kernel thread (ksoftirqd: the
    network stack's deferred work)."""
    out = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rindex(b")") + 2 :].split()
            pid = int(entry.name)
            out[pid] = (int(fields[11]) + int(fields[12]), int(fields[1]) == 2 or pid == 2)
    return out


def cpu_delta(
    before: dict[int, tuple[int, bool]], after: dict[int, tuple[int, bool]]
) -> tuple[float, float]:
    """CPU seconds between two snapshots of the processes alive at both: (processes, kernel
    threads)."""
    procs = kthreads = 0
    for pid, (ticks, kthread) in after.items():
        if pid in before:
            d = ticks - before[pid][0]
            if kthread:
                kthreads += d
            else:
                procs += d
    return procs / CLK_TCK, kthreads / CLK_TCK


def children_of(pid: int) -> list[int]:
    """PIDs whose parent is ``pid``."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
            out.append(int(entry.name))
    return out


def bound_udp_ports() -> set[int]:
    ports = set()
    for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
        local = line.split()[1]
        ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


def percentile(sorted_values: list[int], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return float(sorted_values[k])


# ---------------------------------------------------------------------------------------
# The load processes
# ---------------------------------------------------------------------------------------


class Load:
    """The load processes (bench/media_load.py ``serve``), started with multiprocessing's
    spawn method; a call belongs to process ``call % procs``."""

    def __init__(self, procs: int) -> None:
        ctx = mp.get_context("spawn")
        self.conns = []
        self.procs = []
        self.ports: list[tuple[int, int]] = []
        self.pids: list[int] = []
        for i in range(procs):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=media_load.serve, args=(i, child), daemon=True)
            p.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(p)
        for conn in self.conns:
            if not conn.poll(30):
                raise BenchError("a load process did not start in 30 s")
            _, ports, pid = conn.recv()
            self.ports.append(ports)
            self.pids.append(pid)

    def owner(self, call: int) -> int:
        return call % len(self.conns)

    def endpoints(self, call: int) -> tuple[int, int]:
        """(caller port, callee port) of a call."""
        return self.ports[self.owner(call)]

    def command(self, kind: str, args: list[Any], timeout: float) -> list[Any]:
        for conn, arg in zip(self.conns, args, strict=True):
            conn.send((kind, arg))
        out = []
        for conn in self.conns:
            if not conn.poll(timeout):
                raise BenchError(f"a load process did not answer {kind!r} in {timeout:.0f} s")
            status, value = conn.recv()
            if status != "ok":
                raise BenchError(f"load process, {kind}: {value}")
            out.append(value)
        return out

    def set_calls(self, specs: list[CallSpec]) -> None:
        per: list[list[CallSpec]] = [[] for _ in self.conns]
        for spec in specs:
            per[self.owner(spec.call)].append(spec)
        self.command("calls", per, 60)

    def cpu_seconds(self) -> float:
        return sum(proc_cpu(pid) for pid in self.pids)

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(("quit", None))
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive() and p.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
                p.join(timeout=5)


# ---------------------------------------------------------------------------------------
# The relays
# ---------------------------------------------------------------------------------------


@dataclass
class Route:
    """One call through a relay: where its caller and callee send, their SRTP keys, and the
    relay's keys towards them (to check the re-keying)."""

    dest_a: int
    dest_b: int
    key_a: bytes | None = None  # the caller encrypts with it
    key_b: bytes | None = None
    out_a: bytes | None = None  # the relay encrypts towards the caller with it
    out_b: bytes | None = None
    suite_a: str = SUITE_A  # the caller's leg
    suite_b: str = SUITE_B


class Relay:
    name = ""
    srtp = True
    fresh_after_failure = False  # set up new calls after a failed step

    async def start(self) -> None:
        pass

    async def open(self, calls: int, srtp: bool, load: Load) -> list[Route]:
        raise NotImplementedError

    async def close_calls(self) -> str:
        """Tear the calls down; a note on what the relay counted, or ""."""
        return ""

    def cpu_seconds(self) -> float:
        return 0.0

    async def stop(self) -> None:
        pass

    def describe(self) -> str:
        return ""


class Direct(Relay):
    name = "direct"
    srtp = False

    async def open(self, calls: int, srtp: bool, load: Load) -> list[Route]:
        routes = []
        for c in range(calls):
            caller, callee = load.endpoints(c)
            routes.append(Route(dest_a=callee, dest_b=caller))
        return routes


def new_key() -> bytes:
    return secrets.token_bytes(30)  # 128-bit master key || 112-bit salt (RFC 3711 8.2)


class SbcRelay(Relay):
    """The SBC's media workers, driven as the signalling side drives them."""

    name = "sbc"

    def __init__(self, workers: int) -> None:
        self.count = workers
        self.workers: Any = None
        self.events: list[Any] = []
        self.sessions: list[str] = []
        self.pids: list[int] = []

    async def start(self) -> None:
        from sbc.io.media_worker import MediaWorkers

        before = set(children_of(os.getpid()))
        self.workers = await MediaWorkers.start(
            self.count, timeout=3600.0, latch_window=5.0, on_event=self.events.append
        )
        self.pids = worker_pids(self.workers) or sorted(set(children_of(os.getpid())) - before)
        if not self.pids:
            raise BenchError("cannot find the media worker processes")

    async def open(self, calls: int, srtp: bool, load: Load) -> list[Route]:
        from sbc.media import control

        low, high = SBC_PORTS
        taken = bound_udp_ports()
        bases = [p for p in range(low, high - 2, 4) if not taken & set(range(p, p + 4))]
        if len(bases) < calls:
            raise BenchError(f"{calls} calls need more free ports than {low}-{high} has")
        routes, expect = [], set()
        self.sessions = []
        for c in range(calls):
            caller, callee = load.endpoints(c)
            pa, pb = bases[c], bases[c] + 2
            r = Route(dest_a=pa, dest_b=pb)
            if srtp:
                r.key_a, r.key_b, r.out_a, r.out_b = new_key(), new_key(), new_key(), new_key()

            def key(k: bytes | None, suite: str) -> control.SrtpKey | None:
                return None if k is None else control.SrtpKey(suite=suite, key_salt=k)

            session = f"bench-{c}"
            update = control.Update(
                session=session,
                streams=(
                    control.Stream(
                        index=0,
                        a=control.Party(
                            bind=HOST, port=pa, remote=(HOST, caller),
                            remote_rtcp=(HOST, caller), recv_key=key(r.key_a, SUITE_A),
                            send_key=key(r.out_a, SUITE_A),
                        ),
                        b=control.Party(
                            bind=HOST, port=pb, remote=(HOST, callee),
                            remote_rtcp=(HOST, callee), recv_key=key(r.key_b, SUITE_B),
                            send_key=key(r.out_b, SUITE_B),
                        ),
                    ),
                ),
            )  # fmt: skip
            self.workers.send(c % self.count, update)
            self.sessions.append(session)
            routes.append(r)
            expect |= {pa, pb}
        await wait_ports(expect, 60.0)
        return routes

    async def close_calls(self) -> str:
        from sbc.media import control

        self.events.clear()
        for c, session in enumerate(self.sessions):
            self.workers.send(c % self.count, control.Delete(session=session))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if sum(isinstance(e, control.Stats) for e in self.events) >= len(self.sessions):
                break
            await asyncio.sleep(0.05)
        stats = [e for e in self.events if isinstance(e, control.Stats)]
        self.sessions = []
        if not stats:
            return "no Stats came back"
        parties = [p for s in stats for st in s.streams for p in (st.a, st.b)]
        return (
            f"Stats of {len(stats)} sessions: {sum(p.packets_in for p in parties):,} packets "
            f"in, {sum(p.packets_out for p in parties):,} out, "
            f"{sum(p.srtp_failures for p in parties):,} SRTP failures, "
            f"{sum(p.dropped_source for p in parties):,} dropped for their source"
        )

    def cpu_seconds(self) -> float:
        return sum(proc_cpu(pid) for pid in self.pids)

    async def stop(self) -> None:
        if self.workers is not None:
            await asyncio.wait_for(self.workers.close(), 30)
            self.workers = None

    def describe(self) -> str:
        return f"{self.count} worker processes"


def worker_pids(workers: Any) -> list[int]:
    """The worker processes' PIDs, if MediaWorkers shows them."""
    for attr in ("pids", "_pids"):
        value = getattr(workers, attr, None)
        if value:
            return [int(p) for p in value]
    for attr in ("processes", "_processes", "procs", "_procs", "workers", "_workers"):
        value = getattr(workers, attr, None)
        if value:
            pids = [getattr(p, "pid", None) for p in value]
            pids = [getattr(p, "pid", p) if not isinstance(p, int) else p for p in pids]
            if all(isinstance(p, int) for p in pids):
                return pids  # type: ignore[return-value]
    return []


async def wait_ports(ports: set[int], timeout: float) -> None:
    """Until every port in ``ports`` is bound on UDP (the workers have taken the Updates)."""
    deadline = time.monotonic() + timeout
    while True:
        missing = ports - bound_udp_ports()
        if not missing:
            return
        if time.monotonic() > deadline:
            raise BenchError(f"{len(missing)} relay ports not bound after {timeout:.0f} s")
        await asyncio.sleep(0.1)


class Rtpengine(Relay):
    """rtpengine in userspace; calls set up with ng offer + answer, torn down with delete."""

    name = "rtpengine"
    # "UDP receive queue exceeded 5 times: discarding packet": after an overload it drops
    # every packet of the ports whose queue overflowed, also at lower rates.
    fresh_after_failure = True

    def __init__(self, threads: int, workdir: Path) -> None:
        self.threads = threads
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.ng_port = 0
        self.sock: socket.socket | None = None
        self.calls: list[tuple[str, str]] = []
        self.version = tool_version([RTPENGINE, "--version"], r"Version:\s*(\S+)")

    async def start(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((HOST, 0))
            self.ng_port = s.getsockname()[1]
        low, high = RTPENGINE_PORTS
        conf = self.workdir / "rtpengine.conf"
        conf.write_text(
            f"""\
[rtpengine]
table = -1
interface = {HOST}
listen-ng = {HOST}:{self.ng_port}
port-min = {low}
port-max = {high}
num-threads = {self.threads}
timeout = 3600
silent-timeout = 3600
delete-delay = 0
log-level = 4
"""
        )
        log = (self.workdir / "rtpengine.log").open("wb")
        self.proc = subprocess.Popen(
            [
                RTPENGINE, "--config-file", str(conf), "--config-section", "rtpengine",
                "--foreground", "--log-stderr", "--pidfile", str(self.workdir / "rtpengine.pid"),
            ],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
        )  # fmt: skip
        log.close()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, 0))
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"rtpengine exited:\n{self.log()[-2000:]}")
            with contextlib.suppress(BenchError):
                if self.ng({"command": "ping"}, timeout=0.3).get("result") == "pong":
                    return
            await asyncio.sleep(0.2)
        raise BenchError(f"rtpengine did not answer ping:\n{self.log()[-2000:]}")

    def log(self) -> str:
        path = self.workdir / "rtpengine.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def ng(self, message: dict[str, Any], timeout: float = 2.0) -> dict[str, Any]:
        """One ng request and its answer (cookie, space, bencoded dictionary)."""
        assert self.sock is not None
        cookie = secrets.token_hex(8)
        data = ng.encode(cookie, message)
        for _ in range(3):
            self.sock.sendto(data, (HOST, self.ng_port))
            self.sock.settimeout(timeout)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    reply = self.sock.recv(65535)
                except (TimeoutError, ConnectionRefusedError):
                    break
                try:
                    got, answer = ng.decode(reply)
                except ng.NgError as exc:
                    raise BenchError(f"ng: {exc}") from None
                if got == cookie:
                    return answer
        raise BenchError(f"ng: no answer to {message.get('command')}")

    @staticmethod
    def sdp(port: int, key: bytes | None, session: int, crypto: str = f"1 {SUITE_A}") -> str:
        proto = "RTP/AVP" if key is None else "RTP/SAVP"
        lines = [
            "v=0",
            f"o=- {session} 1 IN IP4 {HOST}",
            "s=-",
            f"c=IN IP4 {HOST}",
            "t=0 0",
            f"m=audio {port} {proto} 0",
            "a=rtpmap:0 PCMU/8000",
            "a=sendrecv",
        ]
        if key is not None:
            lines.append(f"a=crypto:{crypto} inline:{base64.b64encode(key).decode()}")
        return "\r\n".join(lines) + "\r\n"

    @staticmethod
    def parse_sdp(sdp: str, suite: str) -> tuple[int, str, bytes | None]:
        """(RTP port, crypto tag, key) of rtpengine's SDP for ``suite`` ("", None: none)."""
        m = re.search(r"^m=audio (\d+) ", sdp, re.M)
        if m is None:
            raise BenchError(f"rtpengine SDP without m=audio:\n{sdp}")
        k = re.search(rf"^a=crypto:(\d+) {suite} inline:([A-Za-z0-9+/]+)", sdp, re.M)
        if k is None:
            return int(m.group(1)), "", None
        b64 = k.group(2)
        return int(m.group(1)), k.group(1), base64.b64decode(b64 + "=" * (-len(b64) % 4))

    async def open(self, calls: int, srtp: bool, load: Load) -> list[Route]:
        routes = []
        self.calls = []
        for c in range(calls):
            caller, callee = load.endpoints(c)
            key_a = new_key() if srtp else None
            key_b = new_key() if srtp else None
            call_id, from_tag, to_tag = f"bench-{c}-{secrets.token_hex(4)}", f"a{c}", f"b{c}"
            self.calls.append((call_id, from_tag))
            offer = self.ng({
                "command": "offer", "call-id": call_id, "from-tag": from_tag,
                "sdp": self.sdp(caller, key_a, 2 * c + 1), "ICE": "remove",
                "replace": ["origin", "session-connection"],
            })  # fmt: skip
            if offer.get("result") != "ok":
                raise BenchError(f"rtpengine offer: {offer}")
            dest_b, tag_b, out_b = self.parse_sdp(offer["sdp"], SUITE_B)
            if srtp and out_b is None:
                raise BenchError(f"rtpengine offered no {SUITE_B}:\n{offer['sdp']}")
            answer = self.ng({
                "command": "answer", "call-id": call_id, "from-tag": from_tag,
                "to-tag": to_tag, "sdp": self.sdp(callee, key_b, 2 * c + 2, f"{tag_b} {SUITE_B}"),
                "ICE": "remove", "replace": ["origin", "session-connection"],
            })  # fmt: skip
            if answer.get("result") != "ok":
                raise BenchError(f"rtpengine answer: {answer}")
            dest_a, _, out_a = self.parse_sdp(answer["sdp"], SUITE_A)
            if srtp and out_a is None:
                raise BenchError(f"rtpengine answered no {SUITE_A}:\n{answer['sdp']}")
            routes.append(Route(dest_a, dest_b, key_a, key_b, out_a, out_b))
        return routes

    async def close_calls(self) -> str:
        failed = 0
        for call_id, from_tag in self.calls:
            try:
                answer = self.ng({"command": "delete", "call-id": call_id, "from-tag": from_tag})
                if answer.get("result") != "ok":
                    failed += 1
            except BenchError:
                failed += 1
        n, self.calls = len(self.calls), []
        return f"{n - failed} of {n} calls deleted" if failed else ""

    def cpu_seconds(self) -> float:
        return proc_cpu(self.proc.pid) if self.proc is not None else 0.0

    async def stop(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        code = stop_process(self.proc)
        if self.proc is not None and code not in (0, -signal.SIGTERM):
            print(f"--- rtpengine exit code {code}; log ---\n{self.log()[-2000:]}")
        self.proc = None

    def describe(self) -> str:
        return f"{self.threads} threads"


# ---------------------------------------------------------------------------------------
# Steps, ladders, setups
# ---------------------------------------------------------------------------------------


@dataclass
class Step:
    rate: int  # nominal packets/s: calls x 100
    seconds: float
    sent: int
    received: int  # within GRACE of the last send
    late: int  # after that
    send_span: float
    relay_cpu: float  # seconds over the sending time
    load_cpu: float
    other_cpu: float  # every other process (other work on the machine)
    kernel_cpu: float  # kernel threads
    drops: int  # dropped at the load's own receive sockets
    errors: int
    late_max: float
    latencies: list[int] = field(default_factory=list)  # ns, sorted
    unmatched: int = 0
    tries: int = 1

    @property
    def span(self) -> float:
        return max(self.seconds, self.send_span)

    @property
    def offered(self) -> float:
        return self.sent / self.span

    @property
    def relayed(self) -> float:
        return self.received / self.span

    @property
    def loss(self) -> float:
        """Lost or late: not received within GRACE of the step's last send."""
        return 1 - self.received / self.sent if self.sent else 1.0

    @property
    def lost(self) -> int:
        return max(0, self.sent - self.received - self.late)

    @property
    def on_pace(self) -> bool:
        return self.send_span <= self.seconds * (1 + MAX_LATE)

    @property
    def passed(self) -> bool:
        return self.loss < MAX_LOSS and self.on_pace

    @property
    def relay_busy(self) -> float:
        return self.relay_cpu / self.seconds

    @property
    def load_busy(self) -> float:
        return self.load_cpu / self.seconds

    @property
    def other_busy(self) -> float:
        return self.other_cpu / self.seconds

    @property
    def kernel_busy(self) -> float:
        return self.kernel_cpu / self.seconds

    @property
    def disturbed(self) -> bool:
        return self.other_busy > MAX_OTHER

    def verdict(self) -> str:
        if self.passed:
            return "pass"
        why = []
        if self.loss >= MAX_LOSS:
            why.append(f"{100 * self.loss:.1f} % lost or late")
        if not self.on_pace:
            why.append(f"load behind: sending took {self.send_span:.2f} s")
        return "fail: " + ", ".join(why)


@dataclass
class Result:
    relay: str
    mode: str  # RTP | SRTP
    steps: list[Step] = field(default_factory=list)
    latency: list[Step] = field(default_factory=list)  # the latency runs
    checked: str = ""
    note: str = ""
    resets: int = 0  # new calls set up after failed steps

    @property
    def best(self) -> Step | None:
        passing = [s for s in self.steps if s.passed]
        return max(passing, key=lambda s: s.rate) if passing else None

    @property
    def extra(self) -> int:
        """Packets received beyond those sent (duplicates or strays), over all runs."""
        runs = [*self.steps, *self.latency]
        return sum(max(0, s.received + s.late - s.sent) for s in runs)

    def lat(self, q: float) -> float:
        """The ``q`` quantile of the one-way times: the median over the latency runs."""
        values = [percentile(s.latencies, q) for s in self.latency if s.latencies]
        return statistics.median(values) if values else float("nan")

    def lat_range(self, q: float) -> tuple[float, float]:
        values = [percentile(s.latencies, q) for s in self.latency if s.latencies]
        return (min(values), max(values)) if values else (float("nan"), float("nan"))

    @property
    def first_failure(self) -> Step | None:
        """The failed step just above the best one."""
        best = self.best
        above = [s for s in self.steps if not s.passed and (best is None or s.rate > best.rate)]
        return min(above, key=lambda s: s.rate) if above else None

    @property
    def load_limited(self) -> bool:
        """The ladder ended because the load fell behind, with nothing lost or late."""
        fail = self.first_failure
        return fail is not None and fail.loss < MAX_LOSS

    @property
    def top_passed(self) -> bool:
        return bool(self.steps) and all(s.passed for s in self.steps)


async def run_step(
    load: Load, relay: Relay, rate: int, seconds: float, detail: bool
) -> tuple[Step, list[list[list[bytes]]]]:
    active = max(1, round(rate / PACKETS_PER_CALL_S))
    arg = {"active": active, "seconds": seconds, "detail": detail}
    await asyncio.to_thread(load.command, "prepare", [arg] * len(load.conns), 300)
    start_at = time.monotonic() + 0.2
    go = asyncio.create_task(
        asyncio.to_thread(
            load.command, "go", [{"start_at": start_at, "grace": GRACE}] * len(load.conns),
            seconds * 3 + 60,
        )
    )  # fmt: skip
    await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    r0, l0, a0 = relay.cpu_seconds(), load.cpu_seconds(), cpu_snapshot()
    m0 = machine_busy_seconds()
    await asyncio.sleep(max(0.0, start_at + seconds - time.monotonic()))
    r1, l1, a1 = relay.cpu_seconds(), load.cpu_seconds(), cpu_snapshot()
    m1 = machine_busy_seconds()
    ours = (r1 - r0) + (l1 - l0)
    procs, kthreads = cpu_delta(a0, a1)
    results = await go
    latencies: list[int] = []
    if detail:
        for r in results:
            latencies.extend(r["latencies"])
        latencies.sort()
    step = Step(
        rate=active * int(PACKETS_PER_CALL_S),
        seconds=seconds,
        sent=sum(r["sent"] for r in results),
        received=sum(r["received"] for r in results),
        late=sum(r["late"] for r in results),
        send_span=max(r["send_span"] for r in results),
        relay_cpu=r1 - r0,
        load_cpu=l1 - l0,
        # Other processes: those alive now, or all the machine's busy time less ours.
        other_cpu=max(0.0, procs - ours, m1 - m0 - ours - kthreads),
        kernel_cpu=kthreads,
        drops=sum(r["drops"] for r in results),
        errors=sum(r["errors"] for r in results),
        late_max=max(r["late_max"] for r in results),
        latencies=latencies,
        unmatched=sum(r.get("unmatched", 0) for r in results),
    )
    return step, [r["samples"] for r in results]


def check_samples(samples: list[list[list[bytes]]], routes: list[Route], srtp: bool) -> str:
    """The packets kept by the load: plain RTP with the payload sent, or SRTP that decrypts
    with the relay's key towards the receiving party (not with the sender's)."""
    ok = total = 0
    problems: list[str] = []
    for per_proc in samples:
        for sock_index, packets in enumerate(per_proc):
            for pkt in packets:
                total += 1
                ssrc = int.from_bytes(pkt[8:12], "big")
                call, direction = (ssrc & 0xFFFFFF) >> 1, ssrc & 1
                if call >= len(routes) or direction == sock_index:
                    problems.append(f"unexpected SSRC {ssrc:#x} at socket {sock_index}")
                    continue
                route = routes[call]
                if not srtp:
                    if pkt[12:] == PAYLOAD:
                        ok += 1
                    else:
                        problems.append("RTP payload changed")
                    continue
                relay_key = route.out_b if direction == 0 else route.out_a
                suite = route.suite_b if direction == 0 else route.suite_a
                sender_key = route.key_a if direction == 0 else route.key_b
                assert relay_key is not None and sender_key is not None
                if relay_key == sender_key:
                    problems.append("the relay's key is the sender's: no re-keying")
                    continue
                try:
                    plain = srtp_session(relay_key, suite, outbound=False).unprotect(pkt)
                except Exception as exc:
                    problems.append(f"SRTP does not decrypt with the relay's key: {exc}")
                    continue
                if plain[12:] == PAYLOAD:
                    ok += 1
                else:
                    problems.append("SRTP payload changed")
    text = f"{ok} of {total} packets checked"
    if problems:
        text += "; " + "; ".join(sorted(set(problems))[:3])
    return text


async def quiet_machine(relay: Relay, load: Load, wait: float) -> float:
    """Until other work on the machine uses under MAX_OTHER of a core (over 0.3 s), at most
    ``wait`` seconds; the share it used last."""
    deadline = time.monotonic() + wait
    while True:
        m0, ours0 = machine_busy_seconds(), relay.cpu_seconds() + load.cpu_seconds()
        t0 = time.monotonic()
        await asyncio.sleep(0.3)
        other = machine_busy_seconds() - m0 - (relay.cpu_seconds() + load.cpu_seconds() - ours0)
        share = max(0.0, other / (time.monotonic() - t0))
        if share < MAX_OTHER or time.monotonic() > deadline:
            return share


async def run_setup(load: Load, relay: Relay, srtp: bool, args: argparse.Namespace) -> Result:
    mode = "SRTP" if srtp else "RTP"
    result = Result(relay.name, mode)
    top = max(args.rates)
    calls = max(round(top / PACKETS_PER_CALL_S), round(args.latency_rate / PACKETS_PER_CALL_S))
    routes: list[Route] = []

    async def set_up() -> None:
        nonlocal routes
        t0 = time.monotonic()
        routes = await relay.open(calls, srtp, load)
        load.set_calls([
            CallSpec(call=c, dest_a=r.dest_a, dest_b=r.dest_b, key_a=r.key_a, key_b=r.key_b,
                     suite_a=r.suite_a, suite_b=r.suite_b)
            for c, r in enumerate(routes)
        ])  # fmt: skip
        print(
            f"{relay.name} {mode}: {calls} calls set up in {time.monotonic() - t0:.1f} s",
            flush=True,
        )

    await set_up()
    try:
        warm, samples = await run_step(load, relay, 10_000, 0.5, False)
        result.checked = check_samples(samples, routes, srtp)
        print(
            f"  warm-up: {warm.received:,}/{warm.sent:,} packets back; {result.checked}",
            flush=True,
        )

        async def measured(rate: int, seconds: float, detail: bool) -> Step:
            """A step, after waiting a little for the machine to be quiet; again
            (``--retries`` times at most, within the time budget) while other processes on
            the machine disturbed it and it failed or timed latencies; the passing or the
            least disturbed run."""
            tries: list[Step] = []
            while True:
                await quiet_machine(relay, load, QUIET_WAIT)
                step, _ = await run_step(load, relay, rate, seconds, detail)
                tries.append(step)
                report_step(result, step, latency=detail)
                if not step.passed and relay.fresh_after_failure:
                    # rtpengine discards packets for good on a port whose queue overflowed
                    # repeatedly: the next steps get new calls.
                    result.resets += 1
                    await relay.close_calls()
                    await set_up()
                if not step.disturbed or (step.passed and not detail):
                    break
                if len(tries) > args.retries or time.monotonic() > args.deadline:
                    break
                print(f"  (other processes used {100 * step.other_busy:.0f} % of a core: again)")
            passed = [s for s in tries if s.passed]
            best = min(passed or tries, key=lambda s: s.other_busy)
            best.tries = len(tries)
            return best

        for _ in range(args.latency_runs):
            result.latency.append(await measured(args.latency_rate, args.latency_seconds, True))

        async def one(rate: int) -> bool:
            step = await measured(rate, args.step, False)
            result.steps.append(step)
            return step.passed

        low, high = 0, 0
        # Direct, only the top rate: what the load can offer with the machine to itself.
        for rate in args.rates if relay.name != "direct" else args.rates[-1:]:
            if not await one(rate):
                high = rate
                break
            low = rate
        for _ in range(args.refine if high and low else 0):
            mid = int(round((low + high) / 2, -3))
            if mid <= low or mid >= high:
                break
            if await one(mid):
                low = mid
            else:
                high = mid
    finally:
        result.note = await relay.close_calls()
        if result.note:
            print(f"  {result.note}", flush=True)
    return result


def report_step(result: Result, s: Step, latency: bool = False) -> None:
    lat = ""
    if s.latencies:
        lat = (
            f", one-way p50 {percentile(s.latencies, 0.5) / 1000:.0f} us p99 "
            f"{percentile(s.latencies, 0.99) / 1000:.0f} us"
        )
    print(
        f"  {'latency' if latency else 'step':7} {s.rate:7,} pps: sent {s.sent:,} received "
        f"{s.received:,} (late {s.late:,}, lost {s.lost:,}, {s.drops} of them at the load), "
        f"relayed {s.relayed:,.0f}/s; CPU relay {100 * s.relay_busy:.0f} %, load "
        f"{100 * s.load_busy:.0f} %, kernel threads {100 * s.kernel_busy:.0f} %, other "
        f"{100 * s.other_busy:.0f} %{lat} -> {s.verdict()}",
        flush=True,
    )


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def fmt_us(ns: float) -> str:
    return f"{ns / 1000:,.0f} µs" if ns == ns else "—"


def render(results: list[Result], args: argparse.Namespace, env: dict[str, str]) -> str:
    by = {(r.relay, r.mode): r for r in results}
    direct = by.get(("direct", "RTP"))
    lines = [
        "## Media relay: RTP and SRTP packets per second, added latency (bench/media.py)",
        "",
        f"- Date: {env['date']}",
        f"- CPU: {env['cpu']}; {env['cpus']}",
        f"- Versions: sbc {env['sbc']}, {env['python']}, pylibsrtp {env['pylibsrtp']}, "
        f"rtpengine {env['rtpengine']}",
        f"- Command: `{env['command']}`",
        f"- Relays: the SBC's media workers ({env['sbc_relay']}); rtpengine in userspace "
        f"(`table = -1`, {env['rtpengine_relay']}); direct: no relay. Load: {args.procs} "
        "processes (bench/media_load.py), not pinned: load and relay share the 2 cores.",
        f"- Streams: G.711, 20 ms packets, 100 packets/s per call (both directions); RTP 172 "
        f"bytes; SRTP re-keyed by the relay, {SUITE_A} (182 bytes) on the caller's leg and "
        f"{SUITE_B} (176 bytes) on the callee's. Steps of {args.step:g} s, "
        f"latency: {args.latency_runs} runs of {args.latency_seconds:g} s at "
        f"{args.latency_rate:,} packets/s, each percentile the median of the runs'.",
        "",
        "| Relay | Mode | Max packets/s at < 1 % loss | Relay CPU at that rate | "
        "Packets/s per relay core | Added latency p50 / p99 at "
        f"{args.latency_rate // 1000}k pps | Max pps vs rtpengine | Per core vs rtpengine |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        best = r.best
        ref = by.get(("rtpengine", r.mode))
        ref_best = ref.best if ref else None
        if best is None:
            rate = "none passed"
        else:
            rate = f"{best.rate:,}"
            if r.top_passed:
                rate = f"≥ {rate} (top step)"
            elif r.load_limited:
                rate = f"≥ {rate} (load limit)"
        cpu = per_core = "—"
        if best is not None and r.relay != "direct":
            cpu = f"{100 * best.relay_busy:.0f} %"
            per_core = f"{best.rate / best.relay_busy:,.0f}" if best.relay_busy else "—"
        added = "—"
        if r.relay != "direct" and r.latency and direct and direct.latency:
            added = (
                f"{fmt_us(r.lat(0.5) - direct.lat(0.5))} / {fmt_us(r.lat(0.99) - direct.lat(0.99))}"
            )
        ratio = ratio_core = "—"
        if r.relay == "sbc" and ref is not None and best and ref_best:
            ratio = f"{best.rate / ref_best.rate:.2f}"
            if ref.top_passed or ref.load_limited:
                ratio = f"≤ {ratio}"
            if best.relay_busy and ref_best.relay_busy:
                ours = best.rate / best.relay_busy
                ratio_core = f"{ours / (ref_best.rate / ref_best.relay_busy):.2f}"
        lines.append(
            f"| {r.relay} | {r.mode} | {rate} | {cpu} | {per_core} | {added} | {ratio} | "
            f"{ratio_core} |"
        )
    lines += ["", targets(by, args), "", "What ended each ladder:", ""]
    lines += [f"- {r.relay} {r.mode}: {limit(r)}" for r in results if r.relay != "direct"]
    lines += [""]
    lines += [
        f"One-way times at {args.latency_rate:,} packets/s ({args.latency_rate // 100} calls): "
        f"each percentile the median of {args.latency_runs} runs, every packet of a run timed "
        "(p99 range: lowest–highest run):",
        "",
        "| Relay | Mode | Packets timed | p50 | p90 | p99 | p99 range | p99.9 | max | Lost or "
        "late | CPU relay / load / kernel threads / other, last run | Runs (with repeats) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if not r.latency:
            continue
        s = r.latency[-1]
        low, high = r.lat_range(0.99)
        timed = sum(len(x.latencies) for x in r.latency)
        sent = sum(x.sent for x in r.latency)
        lost = max(0, sum(x.sent - x.received for x in r.latency)) / max(1, sent)
        lines.append(
            f"| {r.relay} | {r.mode} | {timed:,} | {fmt_us(r.lat(0.5))} | {fmt_us(r.lat(0.9))} | "
            f"{fmt_us(r.lat(0.99))} | {fmt_us(low)}–{fmt_us(high)} | {fmt_us(r.lat(0.999))} | "
            f"{fmt_us(r.lat(1.0))} | {100 * lost:.2f} % | {cpu_shares(r, s)} | "
            f"{len(r.latency)} ({sum(x.tries for x in r.latency)}) |"
        )
    lines += ["", "Every step (offered = nominal rate; relayed = packets received / s):", ""]
    lines += [
        "| Relay | Mode | Offered pps | Relayed pps | Late | Lost | CPU relay / load / "
        "kernel threads / other | Runs | Result |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        for s in r.steps:
            lines.append(
                f"| {r.relay} | {r.mode} | {s.rate:,} | {s.relayed:,.0f} | "
                f"{100 * s.late / s.sent:.2f} % | {100 * s.lost / s.sent:.2f} % | "
                f"{cpu_shares(r, s)} | {s.tries} | {s.verdict()} |"
            )
    lines += ["", "Checks: " + "; ".join(
        f"{r.relay} {r.mode}: {r.checked}" + (f" ({r.note})" if r.note else "")
        + (f"; new calls set up after {r.resets} failed steps" if r.resets else "")
        + (f"; {r.extra:,} packets more received than sent" if r.extra else "")
        for r in results
    ) + "."]  # fmt: skip
    lines += ["", *method(args)]
    return "\n".join(lines) + "\n"


def limit(r: Result) -> str:
    """Why the ladder of a setup ended, from its first failing step."""
    fail = r.first_failure
    if fail is None:
        top = max(r.steps, key=lambda s: s.rate) if r.steps else None
        if top is None:
            return "no step ran."
        return (
            f"nothing: the top step ({top.rate:,} packets/s) passed, so its limit is higher; "
            f"CPU there: relay {100 * top.relay_busy:.0f} %, load {100 * top.load_busy:.0f} %, "
            f"other {100 * top.other_busy:.0f} %."
        )
    cpu = (
        f"CPU: relay {100 * fail.relay_busy:.0f} %, load {100 * fail.load_busy:.0f} %, other "
        f"{100 * fail.other_busy:.0f} %"
    )
    busy = fail.relay_busy + fail.load_busy + fail.kernel_busy + fail.other_busy
    if busy >= 0.95 * (os.cpu_count() or 1):
        cpu += f": the {os.cpu_count()} cores were full"
    if fail.loss < MAX_LOSS:
        return (
            f"at {fail.rate:,} packets/s the load fell behind (sending took "
            f"{fail.send_span:.2f} s for {fail.seconds:g} s) with nothing lost; {cpu}."
        )
    what = []
    if fail.late:
        what.append(f"{100 * fail.late / fail.sent:.1f} % late (the relay fell behind)")
    if fail.lost:
        what.append(f"{100 * fail.lost / fail.sent:.1f} % lost ({fail.drops:,} at the load)")
    return f"at {fail.rate:,} packets/s {' and '.join(what)}; {cpu}."


def cpu_shares(r: Result, s: Step) -> str:
    relay = "—" if r.relay == "direct" else f"{100 * s.relay_busy:.0f}"
    return (
        f"{relay} / {100 * s.load_busy:.0f} / {100 * s.kernel_busy:.0f} / "
        f"{100 * s.other_busy:.0f} %"
    )


def targets(by: dict[tuple[str, str], Result], args: argparse.Namespace) -> str:
    out = []
    srtp = by.get(("sbc", "SRTP"))
    if srtp is not None:
        best = srtp.best
        rate = best.rate if best else 0
        met = "**met**" if rate >= 100_000 else "**not met**"
        out.append(
            f"Target of issue 5, SRTP re-keying of at least 100,000 packets/s on this machine: "
            f"{met} ({rate:,} packets/s, with the load on the same two cores)."
        )
    lat_results = [by.get(("sbc", m)) for m in ("RTP", "SRTP")]
    direct = by.get(("direct", "RTP"))
    if direct and direct.latency:
        base = direct.lat(0.99)
        parts = []
        for r in lat_results:
            if r and r.latency:
                parts.append(f"{r.mode} {(r.lat(0.99) - base) / 1000:,.0f} µs")
        if parts and args.latency_rate == 20_000:
            ok = all(
                r is None or not r.latency or r.lat(0.99) - base < 1_000_000 for r in lat_results
            )
            out.append(
                "Target of issue 5, p99 added latency under 1 ms at 20,000 packets/s: "
                f"{'**met**' if ok else '**not met**'} ({', '.join(parts)})."
            )
    return " ".join(out)


def method(args: argparse.Namespace) -> list[str]:
    return [
        "How it is measured:",
        "",
        "- Load: each call is played by one load process, caller and callee; a step's packets "
        "are built (for SRTP encrypted with each party's key) before it starts, then sent in "
        "1 ms slots with `sendmmsg` (the streams spread evenly over the 20 ms period, a "
        "call's two directions 10 ms apart) and read with `recvmmsg`, both through ctypes. "
        "SRTP sequence numbers go on increasing from step to step.",
        "- A rate is a number of calls (100 packets/s each: the first N of the calls set up). "
        f"A step passes when under 1 % of its packets are lost or late (not received within "
        f"{GRACE:g} s of its last send; late ones are counted until none came for 0.3 s, "
        f"{LATE_MAX:g} s at most) and "
        "the load sent its last packet on time (within 5 % of the step's length). The ladder "
        f"stops at the first step that fails, then bisects {args.refine} times; direct runs "
        "only the top step (what the load offers with the machine to itself). Max packets/s "
        'is the rate of the highest passing step; "load limit" means the load, not the '
        "relay, fell behind first, so the relay's own limit is higher.",
        "- Latency: the kernel stamps each packet as it is queued to the receiving socket "
        "(SO_TIMESTAMPNS, CLOCK_REALTIME); the send time is read around the `sendmmsg` that "
        "sent it (interpolated within the batch, up to a few dozen packets). Added latency is "
        "the relay's percentile minus the direct one's. It includes the relay's queueing at "
        "its socket, its processing and its send, not the receiving process's wake-up.",
        "- CPU: utime + stime from /proc/PID/stat over the sending time of a step, 100 % = one "
        "core: the relay (the SBC's worker processes; rtpengine's process, all threads), the "
        "load processes, kernel threads (ksoftirqd: network work deferred out of the "
        "senders), and other processes: whatever else ran on the machine (the larger of the "
        "other processes alive at both ends of the step and the machine's busy time in "
        "/proc/stat less ours). This kernel has no IRQ time accounting, so the loopback "
        "delivery done in softirq is charged to the process that sent. Packets/s per relay "
        "core = rate / relay CPU share: the fairest figure on two cores that the load "
        "shares with the relay.",
        "- Near its limit a relay shares the two cores with the load, and an event-loop relay "
        "gets cheaper per packet once it falls slightly behind (one wake-up reads several "
        "packets), so the limit found moves between runs on the same machine (the SBC's by "
        "tens of percent); compare relays within one run.",
        f"- Other work on the machine (other processes above {100 * MAX_OTHER:.0f} % of a core) "
        f"disturbs a step: a disturbed step that failed, and a disturbed latency run, are run "
        f"again, {args.retries} times at most, and the least disturbed run is kept (Runs "
        "counts them); a passing run is kept even if disturbed.",
        "- The SBC: `MediaWorkers` (sbc/io/media_worker.py) with one Update per call, as the "
        "signalling side sends it (the parties' addresses from their SDP, so packets are "
        "accepted from the first one; `latch_window` 5 s), calls spread round-robin over the "
        "workers. rtpengine: ng `offer` and `answer` per call (RTP/AVP or RTP/SAVP, PCMU), "
        "`delete` after each setup; after a failed step rtpengine gets new calls (once its "
        "queue on a port overflowed repeatedly it drops that port's packets for good: \"UDP "
        'receive queue exceeded 5 times: discarding packet"), the SBC keeps its calls. '
        "rtpengine passes SDES keys through when both legs use the "
        "same crypto-suite, and then relays SRTP untouched; answering with the suite it added "
        f"itself ({SUITE_B}) makes it decrypt and re-encrypt with its own keys, so both legs "
        "use different suites here, for both relays. Checks: some relayed packets of each "
        "setup are decrypted with the relay's key towards the receiver (not the sender's) "
        "and their payload compared with what was sent.",
    ]


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> tuple[list[Result], dict[str, str]]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-media-"))
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the workers' many ports
    load = Load(args.procs)
    results: list[Result] = []
    relays: list[Relay] = [Direct()]
    if "sbc" in args.relays:
        relays.append(SbcRelay(args.workers))
    if "rtpengine" in args.relays:
        relays.append(Rtpengine(args.workers, workdir))
    started: list[Relay] = []
    try:
        for relay in relays:
            await relay.start()
            started.append(relay)
            for srtp in (False, True) if relay.srtp else (False,):
                results.append(await run_setup(load, relay, srtp, args))
            await relay.stop()
    finally:
        for relay in started:
            with contextlib.suppress(Exception):
                await relay.stop()
        load.close()
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    sbc = next((r for r in relays if isinstance(r, SbcRelay)), None)
    rtpe = next((r for r in relays if isinstance(r, Rtpengine)), None)
    env = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cpus": f"{os.cpu_count()} CPUs",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "sbc": dist_version("sbc") + git_rev(),
        "pylibsrtp": dist_version("pylibsrtp"),
        "rtpengine": rtpe.version if rtpe else "not run",
        "command": command_line(),
        "sbc_relay": sbc.describe() if sbc else "not run",
        "rtpengine_relay": rtpe.describe() if rtpe else "not run",
    }
    return results, env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="about a minute: fewer, shorter steps")
    ap.add_argument(
        "--rates",
        type=lambda s: [int(x) for x in s.split(",")],
        help="comma-separated packets/s of the ladder",
    )
    ap.add_argument("--step", type=float, help="seconds per ladder step (3; quick 1)")
    ap.add_argument("--refine", type=int, help="bisection steps after a failure (2; quick 0)")
    ap.add_argument("--latency-rate", type=int, default=20_000, help="packets/s (20000)")
    ap.add_argument("--latency-seconds", type=float, help="length of a latency run (5; quick 2)")
    ap.add_argument("--latency-runs", type=int, help="latency runs per setup (3; quick 1)")
    ap.add_argument("--procs", type=int, default=2, help="load processes (2)")
    ap.add_argument(
        "--retries", type=int, help="repeats of a step other processes disturbed (2; quick 0)"
    )
    ap.add_argument("--workers", type=int, default=2, help="SBC workers / rtpengine threads (2)")
    ap.add_argument(
        "--relays", default="sbc,rtpengine", help="comma-separated: sbc, rtpengine (both)"
    )
    ap.add_argument(
        "--budget", type=float, help="seconds after which no step is repeated (240; quick 90)"
    )
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    ap.add_argument("--out", type=Path, help="rewrite the bench/media.py section of FILE")
    args = ap.parse_args(argv)
    q = args.quick
    args.rates = sorted(set(args.rates or (QUICK_LADDER if q else LADDER)))
    args.step = args.step or (1.0 if q else 3.0)
    args.refine = args.refine if args.refine is not None else (0 if q else 2)
    args.latency_seconds = args.latency_seconds or (2.0 if q else 5.0)
    args.latency_runs = args.latency_runs or (1 if q else 3)
    args.retries = args.retries if args.retries is not None else (0 if q else 2)
    args.deadline = time.monotonic() + (args.budget or (90.0 if q else 240.0))
    args.relays = [r.strip() for r in args.relays.split(",") if r.strip()]
    if min(args.rates) < 100 or args.procs < 1 or args.workers < 1:
        ap.error("rates must be >= 100, --procs and --workers >= 1")
    if "rtpengine" in args.relays and not os.path.exists(RTPENGINE):
        ap.error("rtpengine not installed (apt-get install rtpengine)")
    t0 = time.monotonic()
    try:
        results, env = asyncio.run(run(args))
    except BenchError as exc:
        print(f"bench/media.py: {exc}", file=sys.stderr)
        return 1
    section = render(results, args, env)
    print()
    print(section)
    print(f"({time.monotonic() - t0:.0f} s)")
    if args.out:
        write_section(args.out, "bench/media.py", section)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
