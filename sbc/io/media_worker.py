"""Media worker processes and the signalling side's handle on them.

Each worker is a child process (``python -m sbc.io.media_worker``) with its own event loop
(uvloop when importable) and one ``RelayEngine``. The signalling process talks to it over an
AF_UNIX socketpair, one JSON line per message (``sbc.media.control``): ``Update`` and
``Delete`` (and ``SendDtmf``) go down, ``Stats`` (the answer to a Delete), ``Timeout``,
``Dtmf`` and, every
``TOTALS_INTERVAL`` seconds, ``Totals`` (for the metrics) come back. The worker
binds and closes the UDP ports the engine's ``PortChanges`` name, one datagram endpoint per
port, and moves packets: ``datagram_received`` -> ``engine.receive`` -> ``sendto`` on the
socket of the port the engine names. A worker exits when its control socket closes, so it
never outlives the signalling process.

This module and ``sip_transport`` are the only places with sockets; every relay decision is
in ``sbc.media.relay``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, Protocol

from sbc.media import control
from sbc.media.relay import Burst, PortChanges, RelayEngine

log = logging.getLogger("sbc.media.worker")

SOCKET_BUFFER = 4 * 1024 * 1024  # SO_RCVBUF / SO_SNDBUF of each relay port
CONTROL_LINE_LIMIT = 16 * 1024 * 1024  # one control message (an Update of many streams)
TIMEOUT_CHECK = 1.0  # seconds between media timeout checks (at most; less for short timeouts)
TOTALS_INTERVAL = 2.0  # seconds between two Totals reports of a worker (metrics)
STOP_GRACE = 2.0  # seconds a worker has to exit after its control socket closed
BIND_RETRIES = 20  # a port just closed may still be closing: retry its bind this often
BIND_RETRY_DELAY = 0.005


class _Datagrams(Protocol):
    """What the worker uses of a datagram transport (uvloop's is not an asyncio subclass)."""

    def sendto(self, data: bytes, addr: Any = None, /) -> None: ...
    def close(self) -> None: ...


# -- the worker process ----------------------------------------------------------------------


class _Port(asyncio.DatagramProtocol):
    """One relay port: every datagram goes through the engine (the per-packet hot path)."""

    __slots__ = ("_clock", "_out", "_receive", "_worker", "port")

    def __init__(self, worker: _Worker, port: int) -> None:
        self.port = port
        self._worker = worker
        self._receive = worker.engine.receive
        self._out = worker.transports
        self._clock = time.monotonic

    def datagram_received(self, data: bytes, addr: Any) -> None:
        out = self._receive(self.port, data, addr, self._clock())
        if out is None:
            return
        if type(out) is tuple:  # one packet: the hot path
            transport = self._out.get(out[0])
            if transport is not None:
                transport.sendto(out[1], out[2])
            return
        assert isinstance(out, Burst)  # transcoding: several packets, DTMF for SIP INFO
        for port, packet, dest in out.packets:
            transport = self._out.get(port)
            if transport is not None:
                transport.sendto(packet, dest)
        for event in out.dtmf:
            self._worker.send_event(event)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from a party that stopped listening: nothing to do.
        log.debug("port %d: %s", self.port, exc)


class _Port6(_Port):
    """An IPv6 port: the source address comes as (host, port, flowinfo, scope_id)."""

    __slots__ = ()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        super().datagram_received(data, (addr[0], addr[1]))


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
        self.transports: dict[int, _Datagrams] = {}
        self.check_every = min(TIMEOUT_CHECK, timeout / 2)
        self.writer: asyncio.StreamWriter | None = None
        self.dtmf_task: asyncio.Task[None] | None = None

    def send_event(self, event: control.Dtmf) -> None:
        """DTMF the engine saw, for the signalling process (SIP INFO)."""
        self._send(event)

    async def _send_dtmf(self) -> None:
        """The SBC's own RFC 4733 packets, each when it is due."""
        while (due := self.engine.next_dtmf()) is not None:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            for port, packet, dest in self.engine.dtmf_due(time.monotonic()):
                transport = self.transports.get(port)
                if transport is not None:
                    transport.sendto(packet, dest)

    async def run(self) -> None:
        reader, self.writer = await asyncio.open_connection(
            sock=self.conn, limit=CONTROL_LINE_LIMIT
        )
        timer = asyncio.create_task(self._timeouts())
        totals = asyncio.create_task(self._totals())
        try:
            while line := await reader.readline():
                try:
                    msg = control.decode(line)
                except (ValueError, KeyError, TypeError) as exc:
                    log.error("bad control message: %s", exc)
                    continue
                await self._apply(msg)
        finally:
            timer.cancel()
            totals.cancel()
            if self.dtmf_task is not None:
                self.dtmf_task.cancel()
            for transport in self.transports.values():
                transport.close()
            self.transports.clear()
            self.writer.close()

    async def _apply(self, msg: control.Command | control.Event | control.Totals) -> None:
        now = time.monotonic()
        if isinstance(msg, control.Update):
            await self._ports(self.engine.update(msg, now))
        elif isinstance(msg, control.Delete):
            stats, changes = self.engine.delete(msg.session)
            self._send(stats)
            await self._ports(changes)
        elif isinstance(msg, control.SendDtmf):
            if self.engine.send_dtmf(msg, now) and (
                self.dtmf_task is None or self.dtmf_task.done()
            ):
                self.dtmf_task = asyncio.create_task(self._send_dtmf())
        else:
            log.error("unexpected control message %s", type(msg).__name__)

    def _send(self, event: control.Event | control.Totals) -> None:
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(control.encode(event))

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
        for port, packet, dest in self.engine.reports(now, time.time()):
            transport = self.transports.get(port)
            if transport is not None:
                transport.sendto(packet, dest)

    async def _totals(self) -> None:
        """The engine's counters for the metrics: at once, then every ``totals_every`` s."""
        while True:
            self._send(self.engine.totals())
            await asyncio.sleep(self.totals_every)

    async def _ports(self, changes: PortChanges) -> None:
        for _bind, port in changes.close:
            transport = self.transports.pop(port, None)
            if transport is not None:
                transport.close()
        for bind, port in changes.open:
            await self._open(bind, port)

    async def _open(self, bind: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in bind else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
            for attempt in range(BIND_RETRIES):
                try:
                    sock.bind((bind, port))
                    break
                except OSError as exc:
                    # A port this worker just closed is released on the next loop turn.
                    if exc.errno != errno.EADDRINUSE or attempt == BIND_RETRIES - 1:
                        raise
                    await asyncio.sleep(BIND_RETRY_DELAY)
            proto = _Port6(self, port) if family == socket.AF_INET6 else _Port(self, port)
            transport, _ = await loop.create_datagram_endpoint(lambda: proto, sock=sock)
        except OSError as exc:
            sock.close()
            log.error("cannot bind media port %s:%d: %s", bind, port, exc.strerror or exc)
            return
        if port in self.transports:  # a port the engine closed and reopened meanwhile
            self.transports[port].close()
        self.transports[port] = transport


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

    def __init__(self, on_event: Callable[[control.Event], None]) -> None:
        self._on_event = on_event
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
    ) -> MediaWorkers:
        """Start ``count`` worker processes; events of any of them go to ``on_event``."""
        self = cls(on_event)
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
                reader, writer = await asyncio.open_connection(sock=ours, limit=CONTROL_LINE_LIMIT)
                self._writers.append(writer)
                self._pending.append([])
                self.totals.append(None)
                self._readers.append(asyncio.create_task(self._read(index, reader)))
        except BaseException:
            await self.close()
            raise
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
        try:
            while line := await reader.readline():
                try:
                    event = control.decode(line)
                except (ValueError, KeyError, TypeError) as exc:
                    log.error("media worker %d: bad event: %s", index, exc)
                    continue
                if isinstance(event, control.Totals):
                    self.totals[index] = event
                elif isinstance(event, control.Stats | control.Timeout | control.Dtmf):
                    self._on_event(event)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
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
