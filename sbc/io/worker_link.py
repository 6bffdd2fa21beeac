"""The link between the signalling workers of one SBC: a Unix datagram socket each.

Every worker binds ``worker-<index>.link`` in the supervisor's runtime directory (mode
0700) and sends to the others' (docs/architecture.md, "Signalling workers"). What travels:

- ``("share", event)``: a change of the shared state (``actions.Share``), to every other
  worker; applied there with ``SbcCore.apply_shared``;
- ``("in", flow, data)``: a message received here that is another worker's
  (``actions.HandOver``): it goes in there as if received on ``flow``;
- ``("out", flow, data)``: data to send on a connection the other worker holds;
- ``("sync", index)``: a (re)started worker asks a live one for the whole shared state,
  which comes back as ``share`` items, then ``("synced",)``.

Items are batched per turn of the event loop: one datagram per peer, the sender's index and
a marshalled list (as the media control messages are), cut to stay under
``MAX_DATAGRAM``, on a socket connected to the peer's. Unix datagrams are reliable and
ordered; when the peer's queue is full (``net.unix.max_dgram_qlen``, 10 datagrams on
Debian) they wait in a backlog, in order, until it has room (up to ``MAX_BACKLOG``). A peer
that is not there (restarting) loses them, counted in ``stats["peer_absent"]``: it asks
for the whole state when it is back.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import marshal
import os
import socket
from collections import Counter
from collections.abc import Callable
from typing import Any

__all__ = ["WorkerLink"]

log = logging.getLogger("sbc.io.link")

MAX_DATAGRAM = 60_000  # bytes of one datagram between workers
BUFFER = 4 << 20  # receive buffer: a snapshot of many registrations arrives at once
READ_BATCH = 64  # datagrams read per wake-up, before other work gets a turn
# A datagram holds one item at least: a handed-over message may be up to the [sip]
# max_message_size (any size the config allows) with its flow.
MAX_RECEIVE = 1 << 22
MAX_BACKLOG = 4096  # datagrams waiting for a peer that does not read; beyond, dropped

Item = tuple[Any, ...]


class WorkerLink:
    """Worker ``index``'s end of the link; ``deliver`` gets every item from the others."""

    def __init__(
        self, runtime: str, index: int, count: int, deliver: Callable[[int, Item], None]
    ) -> None:
        self.runtime = runtime
        self.index = index
        self.count = count
        self._deliver = deliver
        self._loop = asyncio.get_running_loop()
        self._pending: dict[int, list[Item]] = {}
        self._flush_scheduled = False
        self._buffer = bytearray(MAX_RECEIVE)  # one, for every datagram read
        self._view = memoryview(self._buffer)
        self._peers: dict[int, socket.socket] = {}  # connected to each other worker's
        # Datagrams waiting for room in a peer's queue, oldest first, with their item count.
        self._backlog: dict[int, collections.deque[tuple[bytes, int]]] = {}
        self.stats: Counter[str] = Counter()
        path = self.path(index)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # the socket of this worker before its restart
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            with contextlib.suppress(OSError):
                self._sock.setsockopt(socket.SOL_SOCKET, option, BUFFER)
        self._sock.bind(path)
        self._sock.setblocking(False)
        self._loop.add_reader(self._sock.fileno(), self._read)

    async def wait_for_peers(self, timeout: float) -> bool:
        """Until every other worker's socket is there (all workers start together: a
        change shared before a peer's socket exists would be lost to it); False if one is
        still missing after ``timeout`` seconds."""
        deadline = self._loop.time() + timeout
        while not all(os.path.exists(self.path(i)) for i in range(self.count) if i != self.index):
            if self._loop.time() > deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    def path(self, index: int) -> str:
        return os.path.join(self.runtime, f"worker-{index}.link")

    def close(self) -> None:
        self._flush()
        for worker in list(self._peers):
            self._forget_peer(worker)
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path(self.index))

    # -- sending -----------------------------------------------------------------------------
    def send(self, worker: int, item: Item) -> None:
        """Queue ``item`` for ``worker``; sent at the end of this turn of the loop."""
        self._pending.setdefault(worker, []).append(item)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def broadcast(self, item: Item) -> None:
        for worker in range(self.count):
            if worker != self.index:
                self.send(worker, item)

    def _flush(self) -> None:
        self._flush_scheduled = False
        pending, self._pending = self._pending, {}
        for worker, items in pending.items():
            self._send_items(worker, items)

    def _send_items(self, worker: int, items: list[Item]) -> None:
        data = marshal.dumps((self.index, items))
        if len(data) > MAX_DATAGRAM and len(items) > 1:
            half = len(items) // 2
            self._send_items(worker, items[:half])
            self._send_items(worker, items[half:])
            return
        backlog = self._backlog.get(worker)
        if backlog is not None:  # still waiting for room: after those, in order
            if len(backlog) >= MAX_BACKLOG:
                self.stats["peer_busy"] += len(items)
                return
            backlog.append((data, len(items)))
            return
        self._send_datagram(worker, data, len(items))

    def _peer(self, worker: int) -> socket.socket | None:
        """The socket connected to ``worker``'s (a connected Unix datagram socket reports
        room in the peer's queue to poll, which an unconnected one cannot)."""
        sock = self._peers.get(worker)
        if sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFFER)
            try:
                sock.connect(self.path(worker))
            except OSError:
                sock.close()
                return None
            self._peers[worker] = sock
        return sock

    def _send_datagram(self, worker: int, data: bytes, count: int, *, retry: bool = True) -> bool:
        """Send one datagram; False if it has to wait for room (it is then in the
        backlog, sent when the peer's queue has room again)."""
        sock = self._peer(worker)
        if sock is None:
            self.stats["peer_absent"] += count  # restarting: it syncs when it is back
            return True
        try:
            sock.send(data)
        except BlockingIOError:
            # The peer's queue is full (net.unix.max_dgram_qlen datagrams): wait for room
            # rather than lose a change of the shared state.
            self.stats["waited"] += 1
            self._backlog.setdefault(worker, collections.deque()).append((data, count))
            self._loop.add_writer(sock.fileno(), self._drain_backlog, worker)
            return False
        except OSError as exc:
            # The peer's socket is gone (ECONNREFUSED: it restarted, or is restarting):
            # connect again, to its successor's, and send once more.
            self._forget_peer(worker)
            if not retry:
                self.stats["peer_absent"] += count
                log.debug("worker %d not reachable: %s", worker, exc)
                return True
            return self._send_datagram(worker, data, count, retry=False)
        return True

    def _drain_backlog(self, worker: int) -> None:
        backlog = self._backlog.pop(worker, None)
        sock = self._peers.get(worker)
        if sock is not None:
            self._loop.remove_writer(sock.fileno())
        while backlog:
            data, count = backlog.popleft()
            if not self._send_datagram(worker, data, count):
                # Full again: the rest goes behind the one just queued, in order.
                self._backlog[worker].extend(backlog)
                return

    def _forget_peer(self, worker: int) -> None:
        sock = self._peers.pop(worker, None)
        if sock is not None:
            self._loop.remove_writer(sock.fileno())
            sock.close()
        backlog = self._backlog.pop(worker, None)
        if backlog:
            self.stats["peer_absent"] += sum(count for _, count in backlog)

    # -- receiving ---------------------------------------------------------------------------
    def _read(self) -> None:
        for _ in range(READ_BATCH):
            try:
                size = self._sock.recv_into(self._buffer)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("link receive failed: %s", exc)
                return
            try:
                peer, items = marshal.loads(self._view[:size])
            except (ValueError, EOFError, TypeError):
                self.stats["bad"] += 1
                continue
            for item in items:
                try:
                    self._deliver(peer, item)
                except Exception:
                    log.exception("link item from worker %d failed", peer)
