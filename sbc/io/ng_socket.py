"""The asyncio side of rtpengine's ng protocol: one UDP socket to every node.

``NgSocket`` moves the datagrams of a ``sbc.media.ng.NgClient`` (which keeps the cookies,
retransmissions and timeouts) and of its ``NodePool``'s pings: ``request`` sends a command to
a node and returns its reply (``NgFailed`` when the node refused it or never answered);
``start_pings`` keeps pinging every node so the pool knows which are up. Replies are
accepted only from the node's own address.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from sbc.media.ng import NgClient, NgReply, NgTimeout, Node, NodePool

log = logging.getLogger("sbc.io.ng")


class NgFailed(Exception):
    """A request that got no reply, or an error reply (str(): why)."""


class NgSocket(asyncio.DatagramProtocol):
    def __init__(self, pool: NodePool, client: NgClient | None = None) -> None:
        self.pool = pool
        self.client = client or NgClient()
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.DatagramTransport | None = None
        self._by_address = {node.address: node for node in pool.nodes.values()}
        self._waiting: dict[str, asyncio.Future[NgReply]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._pinger: asyncio.Task[None] | None = None
        self._pings_in_flight: set[asyncio.Task[None]] = set()

    @classmethod
    async def open(cls, pool: NodePool, *, local: str = "127.0.0.1") -> NgSocket:
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_datagram_endpoint(lambda: cls(pool), local_addr=(local, 0))
        return protocol

    # -- asyncio -------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        node = self._by_address.get((addr[0], addr[1]))
        if node is None:
            return  # not from a node: dropped
        reply = self.client.receive(node.name, data, self._loop.time())
        if reply is None:
            return
        waiter = self._waiting.pop(reply.cookie, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(reply)

    def error_received(self, exc: Exception) -> None:
        log.debug("ng socket: %s", exc)  # ICMP port unreachable: the retransmissions go on

    # -- requests ------------------------------------------------------------------------------
    async def request(self, node: Node, message: dict[str, Any]) -> NgReply:
        """Send ``message`` to ``node`` and wait for its reply; NgFailed if it timed out
        or the node answered with an error."""
        reply = await self._send(node, message)
        if not reply.ok:
            raise NgFailed(f"{node.name}: {reply.command}: {reply.error}")
        return reply

    def _send(self, node: Node, message: dict[str, Any]) -> asyncio.Future[NgReply]:
        assert self._transport is not None, "the socket is not open"
        cookie, data = self.client.request(node.name, message, self._loop.time())
        future: asyncio.Future[NgReply] = self._loop.create_future()
        self._waiting[cookie] = future
        self._transport.sendto(data, node.address)
        self._arm()
        return future

    def _arm(self) -> None:
        due = self.client.next_deadline()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if due is not None:
            self._timer = self._loop.call_at(due, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        resend, expired = self.client.handle_timer(self._loop.time())
        for name, data in resend:
            node = self.pool.nodes.get(name)
            if node is not None and self._transport is not None:
                self._transport.sendto(data, node.address)
        for timeout in expired:
            self._expire(timeout)
        self._arm()

    def _expire(self, timeout: NgTimeout) -> None:
        waiter = self._waiting.pop(timeout.cookie, None)
        if waiter is not None and not waiter.done():
            waiter.set_exception(NgFailed(f"{timeout.node}: {timeout.command}: no reply"))

    # -- health --------------------------------------------------------------------------------
    def start_pings(self) -> None:
        """Ping every node every ``pool.ping_interval`` seconds from now on."""
        if self._pinger is None:
            self._pinger = asyncio.create_task(self._pings())

    async def _pings(self) -> None:
        while True:
            for node in self.pool.pings_due(self._loop.time()):
                task = asyncio.create_task(self._ping(node))
                self._pings_in_flight.add(task)
                task.add_done_callback(self._pings_in_flight.discard)
            due = self.pool.next_ping()
            await asyncio.sleep(max(0.05, (due or self._loop.time() + 1) - self._loop.time()))

    async def _ping(self, node: Node) -> None:
        future = self._send(node, {"command": "ping"})
        node.ping = "in flight"
        try:
            reply = await future
        except NgFailed:
            self.pool.missed_ping(node)
            return
        if reply.result.get("result") == "pong":
            self.pool.pong(node, reply.rtt)
        else:
            self.pool.missed_ping(node)

    def close(self) -> None:
        if self._pinger is not None:
            self._pinger.cancel()
            self._pinger = None
        if self._timer is not None:
            self._timer.cancel()
        for waiter in self._waiting.values():
            if not waiter.done():
                waiter.set_exception(NgFailed("closed"))
        self._waiting.clear()
        if self._transport is not None:
            with contextlib.suppress(Exception):
                self._transport.close()
