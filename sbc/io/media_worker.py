"""Media worker processes and the signalling side's handle on them.

Each worker is a child process (``python -m sbc.io.media_worker``) with its own event loop
(uvloop when importable) and one ``RelayEngine``. The signalling process talks to it over an
AF_UNIX socketpair, one length-prefixed frame per message (``sbc.media.control``):
``Update`` and ``Delete`` (and ``SendDtmf``) go down, ``Stats`` (the answer to a Delete),
``Timeout``, ``Dtmf`` and, every ``TOTALS_INTERVAL`` seconds, ``Totals`` (for the metrics)
come back. The worker applies each command as it arrives, binds and closes at once the UDP
ports the engine's ``PortChanges`` name (a non-blocking socket per port that the event loop
watches), and moves packets: ``recvfrom`` -> ``engine.receive`` -> ``sendto`` on the socket
of the port the engine names. A worker exits when its control socket closes, so it
never outlives the signalling process.

This module and ``sip_transport`` are the only places with sockets; every relay decision is
in ``sbc.media.relay``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from sbc.media import control
from sbc.media.relay import Burst, Out, PortChanges, RelayEngine

log = logging.getLogger("sbc.media.worker")

SOCKET_BUFFER = 4 * 1024 * 1024  # SO_RCVBUF / SO_SNDBUF of each relay port
RECV_SIZE = 65536  # the largest UDP payload
READ_BATCH = 32  # datagrams read from one port per wake-up at most (as libuv's UDP handles)
POLL_EVENTS = 256  # ports reported by one epoll_wait
# A non-blocking UDP socket in one system call where the platform allows it (Linux).
_NONBLOCKING_DGRAM = socket.SOCK_DGRAM | getattr(socket, "SOCK_NONBLOCK", 0)
# Commands applied per turn of the event loop (each about 30-60 us), and how many may wait
# before the worker stops reading its control socket until it has caught up.
CONTROL_BATCH = 16
CONTROL_BACKLOG = 10000
READ_CHUNK = 1024 * 1024  # bytes read from the control socket at once (signalling side)
TIMEOUT_CHECK = 1.0  # seconds between media timeout checks (at most; less for short timeouts)
TOTALS_INTERVAL = 2.0  # seconds between two Totals reports of a worker (metrics)
STOP_GRACE = 2.0  # seconds a worker has to exit after its control socket closed


class _Stream(Protocol):
    """What the worker uses of its control transport (uvloop's is not an asyncio subclass)."""

    def write(self, data: bytes, /) -> None: ...
    def close(self) -> None: ...
    def is_closing(self) -> bool: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...


# -- the worker process ----------------------------------------------------------------------


class _Port:
    """One relay port: a non-blocking UDP socket that the worker's epoll watches (the event
    loop's ``add_reader`` where there is no epoll); every datagram goes through the engine
    (the per-packet hot path). Opening and closing one is a few system calls, done at once:
    an asyncio datagram transport cost three times as much, and a turn of the event loop to
    open and another to close."""

    __slots__ = ("_clock", "_out", "_receive", "_recvfrom", "_worker", "port", "sock")

    def __init__(self, worker: _Worker, port: int, sock: socket.socket) -> None:
        self.port = port
        self.sock = sock
        self._worker = worker
        self._receive = worker.engine.receive
        self._recvfrom = sock.recvfrom
        self._out = worker.sockets
        self._clock = time.monotonic

    def read_one(self) -> bool:
        """Read one datagram (the port is readable); False if none was queued."""
        try:
            data, addr = self._recvfrom(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:  # an ICMP error queued on the socket: nothing to do
            log.debug("port %d: %s", self.port, exc)
            return True
        self.received(data, addr)
        return True

    def readable(self) -> None:
        """Read what is queued, up to ``READ_BATCH`` datagrams (then the loop comes back:
        one busy port does not hold up the others); without the worker's epoll."""
        for _ in range(READ_BATCH):
            if not self.read_one():
                break
        if self._worker.engine.dtls_backlog:
            self._worker.dtls_soon()

    def received(self, data: bytes, addr: Any) -> None:
        out = self._receive(self.port, data, addr, self._clock())
        if out is None:
            return
        if type(out) is tuple:  # one packet: the hot path
            sock = self._out.get(out[0])
            if sock is not None:
                try:
                    sock.sendto(out[1], out[2])
                except OSError as exc:
                    log.debug("port %d: send to %s: %s", out[0], out[2], exc)
            return
        assert isinstance(out, Burst)  # transcoding, STUN/DTLS: several packets, DTMF
        worker = self._worker
        worker.send_packets(out.packets)
        for event in out.dtmf:
            worker.send_event(event)
        if worker.engine.dtls_legs:
            worker.arm_dtls()  # a DTLS flight went out: its retransmission timer


class _Port6(_Port):
    """An IPv6 port: the source address comes as (host, port, flowinfo, scope_id)."""

    __slots__ = ()

    def received(self, data: bytes, addr: Any) -> None:
        super().received(data, (addr[0], addr[1]))


class _Control(asyncio.Protocol):
    """The worker's end of the control socket: frames in, applied in order,
    ``CONTROL_BATCH`` at most per turn of the event loop, so that a burst of commands does
    not hold up the packets of the calls already up (the ports are served in between)."""

    def __init__(self, worker: _Worker) -> None:
        self._worker = worker
        self._frames = control.Frames()
        self._backlog: deque[memoryview] = deque()  # frames received, not yet applied
        self._scheduled = False
        self._paused = False
        self._loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[None] = self._loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._worker.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            bodies = self._frames.feed(data)
        except ValueError as exc:
            log.error("bad control stream: %s", exc)
            if self._worker.transport is not None:
                self._worker.transport.close()
            return
        self._backlog.extend(bodies)
        transport = self._worker.transport
        if len(self._backlog) > CONTROL_BACKLOG and not self._paused and transport is not None:
            self._paused = True
            transport.pause_reading()
        if not self._scheduled:
            self._apply()

    def _apply(self) -> None:
        self._scheduled = False
        backlog = self._backlog
        worker = self._worker
        worker.holding = True  # the Stats wait until the backlog is done: one write
        try:
            for _ in range(CONTROL_BATCH):
                if not backlog:
                    break
                try:
                    msg = control.decode_body(backlog.popleft())
                except (ValueError, KeyError, TypeError, EOFError) as exc:
                    log.error("bad control message: %s", exc)
                    continue
                worker.apply(msg)
        finally:
            worker.holding = False
        if backlog:
            self._scheduled = True
            self._loop.call_soon(self._apply)
            return
        worker.flush()
        if self._paused and worker.transport is not None and not self.closed.done():
            self._paused = False
            worker.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


class _Worker:
    def __init__(
        self,
        conn: socket.socket,
        *,
        timeout: float,
        latch_window: float,
        totals_every: float = TOTALS_INTERVAL,
    ) -> None:
        self.conn = conn
        self.totals_every = totals_every
        self.engine = RelayEngine(timeout=timeout, latch_window=latch_window)
        self.sockets: dict[int, socket.socket] = {}  # port -> its socket, for sending
        self.ports: dict[int, _Port] = {}
        self.by_fd: dict[int, _Port] = {}  # socket's file descriptor -> its port
        # The relay ports are watched by an epoll of the worker's own, which the event loop
        # watches: adding and removing a socket is one system call each (the event loop's
        # add_reader and remove_reader cost three times as much). Without epoll (not Linux),
        # the event loop watches each port.
        self._epoll = select.epoll() if hasattr(select, "epoll") else None
        self.check_every = min(TIMEOUT_CHECK, timeout / 2)
        self.transport: _Stream | None = None
        self.dtmf_task: asyncio.Task[None] | None = None
        # the DTLS retransmission timer (WebRTC parties): armed for engine.next_dtls()
        self._dtls_timer: asyncio.TimerHandle | None = None
        self._dtls_scheduled = False  # dtls_soon: a turn for the DTLS backlog is queued
        self._dtls_at = 0.0
        self._events: list[bytes] = []  # encoded events not yet written
        self._flush_scheduled = False
        self.holding = False  # commands are being applied: their events go out after them
        self._loop: asyncio.AbstractEventLoop | None = None

    def send_event(self, event: control.Dtmf) -> None:
        """DTMF the engine saw, for the signalling process (SIP INFO)."""
        self._send(event)

    def send_packets(self, packets: Iterable[Out]) -> None:
        sockets = self.sockets
        for port, packet, dest in packets:
            sock = sockets.get(port)
            if sock is not None:
                try:
                    sock.sendto(packet, dest)
                except OSError as exc:
                    log.debug("port %d: send to %s: %s", port, dest, exc)

    async def _send_dtmf(self) -> None:
        """The SBC's own RFC 4733 packets, each when it is due."""
        while (due := self.engine.next_dtmf()) is not None:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            self.send_packets(self.engine.dtmf_due(time.monotonic()))

    def arm_dtls(self) -> None:
        """Run the engine's DTLS timers (``dtls_due``) at ``next_dtls``, if that is sooner
        than the timer already armed."""
        due = self.engine.next_dtls()
        if due is None or self._loop is None:
            return
        if self._dtls_timer is not None:
            if self._dtls_at <= due:
                return
            self._dtls_timer.cancel()
        self._dtls_at = due
        self._dtls_timer = self._loop.call_later(max(0.0, due - time.monotonic()), self._run_dtls)

    def dtls_one(self) -> None:
        """One queued DTLS record through its endpoint (RelayEngine.dtls_step): the
        handshakes' public-key work goes in steps between rounds of port reads."""
        try:
            self.send_packets(self.engine.dtls_step(time.monotonic()))
        except Exception:  # one bad record must not stop the others
            log.exception("media worker DTLS step failed")
        if self.engine.dtls_legs:
            self.arm_dtls()

    def dtls_soon(self) -> None:
        """Run the queued DTLS records, one per turn of the event loop (the ports are read
        in between), until none is left."""
        if not self._dtls_scheduled and self._loop is not None:
            self._dtls_scheduled = True
            self._loop.call_soon(self._dtls_turn)

    def _dtls_turn(self) -> None:
        self._dtls_scheduled = False
        self.dtls_one()
        if self.engine.dtls_backlog:
            self.dtls_soon()

    def _run_dtls(self) -> None:
        self._dtls_timer = None
        try:
            self.send_packets(self.engine.dtls_due(time.monotonic()))
        except Exception:  # one bad round must not stop the timers of the other legs
            log.exception("media worker DTLS timer failed")
        self.arm_dtls()

    async def run(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        if self._epoll is not None:
            loop.add_reader(self._epoll.fileno(), self._poll)
        _, proto = await loop.create_connection(lambda: _Control(self), sock=self.conn)
        timer = asyncio.create_task(self._timeouts())
        totals = asyncio.create_task(self._totals())
        try:
            await proto.closed
        finally:
            timer.cancel()
            totals.cancel()
            if self.dtmf_task is not None:
                self.dtmf_task.cancel()
            if self._dtls_timer is not None:
                self._dtls_timer.cancel()
            for port in list(self.ports):
                self._close(port)
            if self._epoll is not None:
                loop.remove_reader(self._epoll.fileno())
                self._epoll.close()
            self.flush()
            if self.transport is not None:
                self.transport.close()

    def apply(self, msg: control.Command | control.Event | control.Totals) -> None:
        now = time.monotonic()
        if isinstance(msg, control.Update):
            self._ports(self.engine.update(msg, now))
        elif isinstance(msg, control.Delete):
            stats, changes = self.engine.delete(msg.session)
            self._send(stats)
            self._ports(changes)
        elif isinstance(msg, control.Identity):
            self.engine.set_identity(msg)  # the SBC's DTLS certificate, before any Update
        elif isinstance(msg, control.SendDtmf):
            if self.engine.send_dtmf(msg, now) and (
                self.dtmf_task is None or self.dtmf_task.done()
            ):
                self.dtmf_task = asyncio.create_task(self._send_dtmf())
        else:
            log.error("unexpected control message %s", type(msg).__name__)

    def _send(self, event: control.Event | control.Totals) -> None:
        """Queue an event: they go out together once per turn of the event loop (one
        write, not one per call's Stats)."""
        self._events.append(control.encode(event))
        if not self._flush_scheduled and not self.holding and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        if self._events:
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(b"".join(self._events))
            self._events.clear()

    async def _timeouts(self) -> None:
        while True:
            await asyncio.sleep(self.check_every)
            try:
                self._periodic(time.monotonic())
            except Exception:  # one bad round must not end timeouts and RTCP for good
                log.exception("media worker timer failed")

    def _periodic(self, now: float) -> None:
        for event in self.engine.check_timeouts(now):
            self._send(event)
        # The relay's own RTCP on transcoded streams (RFC 3550 6.4.1, 7.2).
        self.send_packets(self.engine.reports(now, time.time()))

    async def _totals(self) -> None:
        """The engine's counters for the metrics: at once, then every ``totals_every`` s."""
        while True:
            self._send(self.engine.totals())
            await asyncio.sleep(self.totals_every)

    def _ports(self, changes: PortChanges) -> None:
        for _bind, port in changes.close:
            self._close(port)
        for bind, port in changes.open:
            self._open(bind, port)

    def _close(self, port: int) -> None:
        sock = self.sockets.pop(port, None)
        self.ports.pop(port, None)
        if sock is not None:
            fd = sock.fileno()
            del self.by_fd[fd]
            if self._epoll is not None:
                self._epoll.unregister(fd)
            else:
                assert self._loop is not None
                self._loop.remove_reader(fd)
            sock.close()  # released at once: the port can be bound again right away

    def _open(self, bind: str, port: int) -> None:
        assert self._loop is not None
        if port in self.sockets:  # a port the engine closed and reopened meanwhile
            self._close(port)
        family = socket.AF_INET6 if ":" in bind else socket.AF_INET
        try:
            sock = socket.socket(family, _NONBLOCKING_DGRAM)
        except OSError as exc:
            log.error("cannot open media port %s:%d: %s", bind, port, exc.strerror or exc)
            return
        try:
            if not _NONBLOCKING_DGRAM & getattr(socket, "SOCK_NONBLOCK", 0):
                sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
            sock.bind((bind, port))
        except OSError as exc:
            sock.close()
            log.error("cannot bind media port %s:%d: %s", bind, port, exc.strerror or exc)
            return
        handler = _Port6(self, port, sock) if family == socket.AF_INET6 else _Port(self, port, sock)
        fd = sock.fileno()
        if self._epoll is not None:
            self._epoll.register(fd, select.EPOLLIN)
        else:
            self._loop.add_reader(fd, handler.readable)
        self.sockets[port] = sock
        self.ports[port] = handler
        self.by_fd[fd] = handler

    def _poll(self) -> None:
        """The worker's epoll has ports with datagrams: one from each readable port, then
        ask again, ``READ_BATCH`` times at most before the event loop has its turn (epoll
        is level-triggered: what is left is reported again). Asking epoll once per round
        costs less than reading each port until it fails with EAGAIN (an exception per
        port per wake-up)."""
        assert self._epoll is not None
        by_fd = self.by_fd
        poll = self._epoll.poll
        backlog = self.engine.dtls_backlog
        for _ in range(READ_BATCH):
            events = poll(0, POLL_EVENTS)
            if not events:
                break
            for fd, _ in events:
                handler = by_fd.get(fd)
                if handler is not None:
                    handler.read_one()
            if backlog:
                self.dtls_one()  # one handshake step per round: the ports come first
        if backlog:
            self.dtls_soon()


def worker_main(
    conn_fd: int,
    *,
    timeout: float,
    latch_window: float,
    log_level: str = "info",
    log_format: str = "text",
) -> None:
    """The body of a worker process: serve the control socket ``conn_fd`` until it closes."""
    from sbc.log import setup_logging

    setup_logging(log_level, log_format)
    # Ctrl-C reaches the whole process group: the parent stops the workers by closing their
    # control sockets, so a worker does not die half-way on SIGINT.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # As the signalling process does (sbc.app.tune_gc): what the imports made (codec tables,
    # PyAV) is frozen out of the cyclic collector's scans, which otherwise went over it
    # again and again as calls came and went (a fifth of the CPU of setting calls up), and
    # full collections run at most every 1,000 second-generation collections.
    gc.collect()
    gc.freeze()
    gen0, gen1, _ = gc.get_threshold()
    gc.set_threshold(gen0, gen1, 1000)
    conn = socket.socket(fileno=conn_fd)
    worker = _Worker(conn, timeout=timeout, latch_window=latch_window)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; the stdlib loop also works
        asyncio.run(worker.run())
    else:
        uvloop.run(worker.run())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sbc.io.media_worker")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--timeout", type=float, required=True)
    parser.add_argument("--latch-window", type=float, required=True)
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--log-format", default="text")
    args = parser.parse_args(argv)
    worker_main(
        args.fd, timeout=args.timeout, latch_window=args.latch_window,
        log_level=args.log_level, log_format=args.log_format,
    )  # fmt: skip


# -- the signalling side ---------------------------------------------------------------------


def _log_settings() -> tuple[str, str]:
    """The parent's log level and format, for the workers."""
    from sbc.log import JsonFormatter

    root = logging.getLogger()
    level = logging.getLevelName(root.getEffectiveLevel()).lower()
    if level not in ("debug", "info", "warning", "error"):
        level = "warning"
    json = any(isinstance(h.formatter, JsonFormatter) for h in root.handlers)
    return level, "json" if json else "text"


class MediaWorkers:
    """The worker processes, seen from the signalling process's event loop."""

    def __init__(
        self,
        on_event: Callable[[control.Event], None],
        *,
        identity: control.Identity | None = None,
    ) -> None:
        self._on_event = on_event
        self._identity = identity  # sent first to each worker started
        self._procs: list[subprocess.Popen[bytes]] = []
        self._writers: list[asyncio.StreamWriter] = []
        self._readers: list[asyncio.Task[None]] = []
        self._closing = False
        self._pending: list[list[bytes]] = []  # per worker: encoded commands not yet written
        # per worker: its latest Totals report (None until the first), for the metrics
        self.totals: list[control.Totals | None] = []
        self._flush_scheduled = False

    @classmethod
    async def start(
        cls,
        count: int,
        *,
        timeout: float,
        latch_window: float,
        on_event: Callable[[control.Event], None],
        identity: control.Identity | None = None,
    ) -> MediaWorkers:
        """Start ``count`` worker processes; events of any of them go to ``on_event``.
        ``identity`` (the SBC's DTLS certificate, for WebRTC parties) is each worker's
        first command."""
        self = cls(on_event, identity=identity)
        level, fmt = _log_settings()
        try:
            for index in range(count):
                ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    proc = subprocess.Popen(
                        [
                            sys.executable, "-m", "sbc.io.media_worker",
                            "--fd", str(theirs.fileno()), "--timeout", repr(timeout),
                            "--latch-window", repr(latch_window),
                            "--log-level", level, "--log-format", fmt,
                        ],
                        pass_fds=(theirs.fileno(),),
                        stdin=subprocess.DEVNULL,
                    )  # fmt: skip
                finally:
                    theirs.close()
                self._procs.append(proc)
                reader, writer = await asyncio.open_connection(sock=ours)
                self._writers.append(writer)
                self._pending.append(
                    [] if identity is None else [control.encode(identity)]
                )  # the Identity goes out before any Update (it is queued first)
                self.totals.append(None)
                self._readers.append(asyncio.create_task(self._read(index, reader)))
        except BaseException:
            await self.close()
            raise
        self._flush()  # the Identity, at once
        log.info("media workers started", extra={"workers": count, "pids": self.pids})
        return self

    @property
    def count(self) -> int:
        return len(self._procs)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def running(self, worker: int) -> bool:
        """Whether ``worker``'s control socket is still open (it exits when it closes)."""
        return not self._writers[worker].is_closing()

    def send(self, worker: int, command: control.Command) -> None:
        """Queue ``command`` for ``worker`` (never blocks). Commands go out together once
        per turn of the event loop: a write per command cost a system call and woke the
        worker each time (a fifth of the signalling process's time at 300 calls/s)."""
        if self._writers[worker].is_closing():
            log.error("media worker %d is gone; %s dropped", worker, type(command).__name__)
            return
        self._pending[worker].append(control.encode(command))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        for worker, pending in enumerate(self._pending):
            if pending:
                writer = self._writers[worker]
                if not writer.is_closing():
                    writer.write(b"".join(pending))
                pending.clear()

    async def _read(self, index: int, reader: asyncio.StreamReader) -> None:
        frames = control.Frames()
        try:
            while data := await reader.read(READ_CHUNK):
                for body in frames.feed(data):
                    try:
                        event = control.decode_body(body)
                    except (ValueError, KeyError, TypeError, EOFError) as exc:
                        log.error("media worker %d: bad event: %s", index, exc)
                        continue
                    if isinstance(event, control.Totals):
                        self.totals[index] = event
                    elif isinstance(event, control.Stats | control.Timeout | control.Dtmf):
                        self._on_event(event)
        except (ConnectionError, ValueError) as exc:
            log.error("media worker %d: control socket: %s", index, exc)
        if not self._closing:
            log.error("media worker %d (pid %d) exited", index, self._procs[index].pid)
            self._writers[index].close()

    async def close(self) -> None:
        """Close the control sockets (the workers exit), wait for the processes, and kill by
        PID those that are still there after ``STOP_GRACE`` seconds."""
        self._closing = True
        self._flush()
        for writer in self._writers:
            writer.close()
        for writer in self._writers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), STOP_GRACE)
        deadline = time.monotonic() + STOP_GRACE
        while any(p.poll() is None for p in self._procs) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for proc in self._procs:
            if proc.poll() is None:
                log.error("media worker pid %d did not stop; killed", proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        for task in self._readers:
            task.cancel()
        for task in self._readers:
            with contextlib.suppress(asyncio.CancelledError):
                await task


if __name__ == "__main__":
    main()
