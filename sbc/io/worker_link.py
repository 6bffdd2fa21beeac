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

Items are batched per turn of the event loop: one datagram per peer, a marshalled list
(as the media control messages are), cut to stay under ``MAX_DATAGRAM``. Unix datagrams are
reliable and ordered; a peer that is not there (restarting) or whose queue is full loses
the datagram, counted in ``dropped``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import marshal
import os
import socket
from collections import Counter
from collections.abc import Callable
from typing import Any

from sbc.sip.flow import Flow

__all__ = ["WorkerLink", "flow_from", "flow_items"]

log = logging.getLogger("sbc.io.link")

MAX_DATAGRAM = 60_000  # bytes of one datagram between workers
BUFFER = 4 << 20  # receive buffer: a snapshot of many registrations arrives at once
READ_BATCH = 64  # datagrams read per wake-up, before other work gets a turn

Item = tuple[Any, ...]


def flow_items(flow: Flow) -> tuple[str, tuple[str, int], tuple[str, int], int]:
    return (flow.transport, flow.local, flow.remote, flow.conn_id)


def flow_from(value: Any) -> Flow:
    transport, local, remote, conn = value
    return Flow(str(transport), (str(local[0]), int(local[1])),
                (str(remote[0]), int(remote[1])), int(conn))  # fmt: skip


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

    def path(self, index: int) -> str:
        return os.path.join(self.runtime, f"worker-{index}.link")

    def close(self) -> None:
        self._flush()
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
        data = marshal.dumps(items)
        if len(data) > MAX_DATAGRAM and len(items) > 1:
            half = len(items) // 2
            self._send_items(worker, items[:half])
            self._send_items(worker, items[half:])
            return
        try:
            self._sock.sendto(data, self.path(worker))
        except (FileNotFoundError, ConnectionRefusedError):
            self.stats["peer_absent"] += len(items)  # restarting: it syncs when it is back
        except BlockingIOError:
            self.stats["peer_busy"] += len(items)
            log.warning("worker %d is not reading; %d items to it dropped", worker, len(items))
        except OSError as exc:
            self.stats["send_failed"] += len(items)
            log.warning("cannot send to worker %d: %s", worker, exc)

    # -- receiving ---------------------------------------------------------------------------
    def _read(self) -> None:
        for _ in range(READ_BATCH):
            try:
                data, sender = self._sock.recvfrom(MAX_DATAGRAM + 4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("link receive failed: %s", exc)
                return
            try:
                items = marshal.loads(data)
            except (ValueError, EOFError, TypeError):
                self.stats["bad"] += 1
                continue
            peer = _peer_index(sender)
            for item in items:
                try:
                    self._deliver(peer, item)
                except Exception:
                    log.exception("link item from worker %d failed", peer)


def _peer_index(sender: Any) -> int:
    """The index in the sender's socket name (``.../worker-<index>.link``), or -1."""
    name = sender.decode() if isinstance(sender, bytes) else str(sender or "")
    base = os.path.basename(name)
    digits = base.removeprefix("worker-").removesuffix(".link")
    return int(digits) if digits.isdigit() else -1
