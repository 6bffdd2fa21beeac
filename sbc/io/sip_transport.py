"""asyncio edges of the SIP core: UDP sockets, TCP and TLS listeners, one re-armed timer.

This module only moves bytes between sockets and ``SbcCore`` and executes the actions the
core returns; every SIP decision lives in the core.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

from sbc.config import ListenUrl
from sbc.core import Action, Close, SbcCore, SendData
from sbc.sip.flow import Address, Flow, format_address

log = logging.getLogger("sbc.io")

CONNECT_TIMEOUT = 5.0  # seconds to open a connection to a backend


class StartupError(Exception):
    """A listener or certificate problem that stops the SBC from starting (one line)."""


def _addr(sockaddr: Any) -> Address:
    return (str(sockaddr[0]), int(sockaddr[1]))


class SipTransports:
    """Owns every SIP socket and connection of the SBC and drives one ``SbcCore``."""

    def __init__(
        self,
        core: SbcCore,
        *,
        clock: Callable[[], float] | None = None,
        client_tls: ssl.SSLContext | None = None,
    ) -> None:
        self.core = core
        self.client_tls = client_tls  # for the connections the SBC opens over TLS
        self._loop = asyncio.get_running_loop()
        self._clock = clock or self._loop.time
        # The only wall-clock read: the core's Date headers are "now" plus this offset.
        core.backends.wall_offset = time.time() - self._clock()
        self._udp: dict[Address, asyncio.DatagramTransport] = {}
        self._conns: dict[int, _StreamProtocol] = {}
        self._servers: list[asyncio.Server] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._conn_ids = itertools.count(1)
        self._outgoing: dict[tuple[str, Address], _StreamProtocol] = {}  # connections we opened
        self._pending: dict[tuple[str, Address], list[bytes]] = {}  # data waiting for connect
        self._tasks: set[asyncio.Task[None]] = set()
        self.bound: list[tuple[ListenUrl, Address]] = []  # (configured url, actual address)
        self._closing = False

    # -- listeners ------------------------------------------------------------------------
    async def listen(self, url: ListenUrl, tls: ssl.SSLContext | None = None) -> Address:
        family = socket.AF_INET6 if ":" in url.host else socket.AF_INET
        try:
            if url.transport == "udp":
                transport, _ = await self._loop.create_datagram_endpoint(
                    lambda: _DatagramProtocol(self),
                    local_addr=(url.host, url.port),
                    family=family,
                )
                local = _addr(transport.get_extra_info("sockname"))
                _large_receive_buffer(transport.get_extra_info("socket"))
                self._udp[local] = transport
            else:
                if url.transport == "tls" and tls is None:
                    raise StartupError(f"{url}: TLS listener without a TLS context")
                server = await self._loop.create_server(
                    lambda: _StreamProtocol(self, url.transport),
                    host=url.host,
                    port=url.port,
                    family=family,
                    ssl=tls if url.transport == "tls" else None,
                    reuse_address=True,
                )
                self._servers.append(server)
                local = _addr(server.sockets[0].getsockname())
        except OSError as exc:
            # uvloop wraps the errno-carrying OSError ("Address already in use") as the cause.
            cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
            raise StartupError(f"cannot listen on {url}: {cause.strerror or cause}") from None
        self.bound.append((url, local))
        log.info("listening on %s://%s", url.transport, format_address(local))
        return local

    async def close(self) -> None:
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
        for server in self._servers:
            server.close()
        for conn in list(self._conns.values()):
            conn.close()
        for transport in self._udp.values():
            transport.close()
        for server in self._servers:
            await server.wait_closed()

    # -- core plumbing --------------------------------------------------------------------
    def run_actions(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, SendData):
                self._send(action.flow, action.data)
            elif isinstance(action, Close):
                conn = self._conns.get(action.flow.conn_id)
                if conn is not None:
                    conn.close()
        self._arm_timer()

    def _send(self, flow: Flow, data: bytes) -> None:
        if flow.transport == "udp":
            udp = self._udp.get(flow.local)
            if udp is None:
                log.warning("no UDP socket for %s", format_address(flow.local))
                return
            udp.sendto(data, flow.remote)
            return
        if flow.conn_id == 0:
            self._send_outgoing(flow, data)
            return
        conn = self._conns.get(flow.conn_id)
        if conn is None or conn.transport is None or conn.transport.is_closing():
            # Connection reuse only (RFC 3261 18.2.2): a gone connection loses the message.
            log.info("connection %s gone, dropping %d bytes", flow, len(data))
            return
        conn.transport.write(data)

    def _send_outgoing(self, flow: Flow, data: bytes) -> None:
        """A stream flow without a connection (conn_id 0): the SBC's own connection to that
        address (a TCP backend), opened on first use and then reused (RFC 3261 18.1.1)."""
        key = (flow.transport, flow.remote)
        conn = self._outgoing.get(key)
        if conn is not None and conn.transport is not None and not conn.transport.is_closing():
            conn.transport.write(data)
            return
        pending = self._pending.get(key)
        if pending is not None:
            pending.append(data)  # still connecting
            return
        self._pending[key] = [data]
        task = self._loop.create_task(self._connect(key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, key: tuple[str, Address]) -> None:
        transport_name, (host, port) = key
        tls = self.client_tls if transport_name == "tls" else None
        if transport_name == "tls" and tls is None:
            log.warning("no TLS client context for %s", format_address((host, port)))
            self._pending.pop(key, None)
            return
        try:
            _, conn = await asyncio.wait_for(
                self._loop.create_connection(
                    lambda: _StreamProtocol(self, transport_name),
                    host=host,
                    port=port,
                    ssl=tls,
                    server_hostname=host if tls is not None else None,
                ),
                timeout=CONNECT_TIMEOUT,
            )
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            # The transaction times out and the backend's health counts it (RFC 3261 17.1.4).
            log.info(
                "cannot connect to %s:%s: %s", transport_name, format_address((host, port)), exc
            )
            self._pending.pop(key, None)
            return
        self._outgoing[key] = conn
        assert conn.transport is not None
        for data in self._pending.pop(key, []):
            conn.transport.write(data)

    def rearm(self) -> None:
        """Re-read the core's next deadline (after the core was changed from outside)."""
        self._arm_timer()

    def _arm_timer(self) -> None:
        deadline = self.core.next_deadline()
        if deadline == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = deadline
        if deadline is not None:
            delay = max(0.0, deadline - self._clock())
            self._timer = self._loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        try:
            self.run_actions(self.core.handle_timer(self._clock()))
        except Exception:  # never let one bad timer stop the SBC
            log.exception("timer handling failed")
            self._arm_timer()

    def datagram(self, data: bytes, local: Address, remote: Address) -> None:
        flow = Flow("udp", local, remote)
        try:
            actions = self.core.receive_datagram(data, flow, self._clock())
        except Exception:
            log.exception("error handling datagram from %s", format_address(remote))
            return
        self.run_actions(actions)

    def stream_data(self, conn: _StreamProtocol, data: bytes) -> None:
        assert conn.flow is not None
        try:
            actions = self.core.receive_stream(data, conn.flow, self._clock())
        except Exception:
            log.exception("error handling data from %s; closing it", conn.flow)
            conn.close()
            return
        self.run_actions(actions)

    def register(self, conn: _StreamProtocol) -> int:
        conn_id = next(self._conn_ids)
        self._conns[conn_id] = conn
        return conn_id

    def unregister(self, conn: _StreamProtocol) -> None:
        for key in [k for k, c in self._outgoing.items() if c is conn]:
            del self._outgoing[key]
        if conn.flow is not None:
            self._conns.pop(conn.flow.conn_id, None)
            if self._closing:  # shutting down: nothing more is sent
                self.core.connection_closed(conn.flow)
            else:
                self.run_actions(self.core.connection_lost(conn.flow, self._clock()))


class _DatagramProtocol(asyncio.DatagramProtocol):
    def __init__(self, owner: SipTransports) -> None:
        self.owner = owner
        self.local: Address = ("", 0)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.local = _addr(transport.get_extra_info("sockname"))

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.owner.datagram(data, self.local, _addr(addr))

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and friends: UDP has no connection to fail.
        log.debug("UDP error on %s: %s", format_address(self.local), exc)


class _StreamProtocol(asyncio.Protocol):
    def __init__(self, owner: SipTransports, transport_name: str) -> None:
        self.owner = owner
        self.name = transport_name
        self.transport: asyncio.Transport | None = None
        self.flow: Flow | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        conn_id = self.owner.register(self)
        local = _addr(transport.get_extra_info("sockname"))
        remote = _addr(transport.get_extra_info("peername"))
        self.flow = Flow(self.name, local, remote, conn_id)
        log.debug("connection from %s", self.flow)

    def data_received(self, data: bytes) -> None:
        self.owner.stream_data(self, data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.unregister(self)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


def tls_context(certificate: str, private_key: str, ca: str | None, *, verify: bool,
                min_version: str, ciphers: str | None) -> ssl.SSLContext:  # fmt: skip
    """Server-side TLS context: TLS 1.2 minimum unless configured higher."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(certificate, private_key)
        if ca:
            ctx.load_verify_locations(ca)
        if ciphers:
            ctx.set_ciphers(ciphers)
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(f"cannot load TLS certificate {certificate}: {exc}") from None
    ctx.verify_mode = ssl.CERT_REQUIRED if verify else ssl.CERT_NONE
    return ctx


def client_tls_context(certificate: str | None, private_key: str | None, ca: str | None, *,
                       min_version: str, ciphers: str | None) -> ssl.SSLContext:  # fmt: skip
    """TLS context for connections the SBC opens (peers, TLS backends): the server is
    verified against ``ca`` (else the system's trust store) and its name or IP address
    (RFC 5922 7); our certificate is presented for mutual TLS when configured."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    try:
        if ca:
            ctx.load_verify_locations(ca)
        else:
            ctx.load_default_certs()
        if certificate and private_key:
            ctx.load_cert_chain(certificate, private_key)
        if ciphers:
            ctx.set_ciphers(ciphers)
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(f"cannot load TLS client settings: {exc}") from None
    return ctx


UDP_RECEIVE_BUFFER = 8 * 1024 * 1024


def _large_receive_buffer(sock: Any) -> None:
    """A receive buffer that holds about a second of datagrams at full load, so a pause of
    the event loop (a garbage collection, a burst) queues packets instead of dropping them.
    The kernel default (net.core.rmem_default, about 208 KB) overflows in tens of
    milliseconds at a few thousand packets per second. SO_RCVBUFFORCE passes
    net.core.rmem_max when the process may (CAP_NET_ADMIN); otherwise SO_RCVBUF up to it."""
    if sock is None:
        return
    force = getattr(socket, "SO_RCVBUFFORCE", None)
    for option in (force, socket.SO_RCVBUF):
        if option is None:
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, UDP_RECEIVE_BUFFER)
            return
        except OSError:
            continue
