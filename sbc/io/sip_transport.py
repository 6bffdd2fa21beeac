"""asyncio edges of the SIP core: UDP sockets, TCP, TLS and WebSocket listeners (the
WebSocket connection itself is sbc/io/websocket.py), one re-armed timer.

This module only moves bytes between sockets and ``SbcCore`` and executes the actions the
core returns; every SIP decision lives in the core.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import itertools
import logging
import os
import secrets
import socket
import ssl
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sbc.actions import (
    Action,
    CallRecord,
    Close,
    Drained,
    HandOver,
    Persist,
    SendData,
    Share,
    ToMediaWorker,
)
from sbc.config import ListenUrl
from sbc.core import SbcCore
from sbc.features import peer_tls
from sbc.io.state_store import StateStore
from sbc.io.websocket import DEFAULT_SETTINGS, WebSocketConnection, WebSocketSettings
from sbc.io.worker_link import WorkerLink
from sbc.media.control import Command as MediaCommand
from sbc.ownership import conn_id as make_conn_id
from sbc.ownership import conn_owner
from sbc.registration.shared import decode_flow, encode_flow, shift_times
from sbc.sip.flow import Address, Flow, format_address

log = logging.getLogger("sbc.io")

CONNECT_TIMEOUT = 5.0  # seconds to open a connection to a backend
HANDSHAKE_TIMEOUT = 10.0  # seconds a TLS client has to finish its handshake
LAG_INTERVAL = 0.25  # seconds between two measures of the event loop's lateness
PROBE_LOST = 5.0  # seconds after which a queue probe not received is forgotten
# A probe that waited this long behind this many queued bytes measures the rate the queue
# drains at (behind a few datagrams its wait is the event loop's turn, not the queue's).
PROBE_MIN_WAIT = 0.005
PROBE_MIN_AHEAD = 16384
SO_MEMINFO = 55  # Linux <asm-generic/socket.h>; not in Python's socket module
# A queue probe's payload starts with a NUL, which no SIP message does (STUN may: the
# rest of the prefix and the process's random token tell them apart).
PROBE_PREFIX = b"\x00sbc-queue-probe "
TLS_CHECK_INTERVAL = 3.0  # seconds between two looks at the certificate files' mtimes


class StartupError(Exception):
    """A listener or certificate problem that stops the SBC from starting (one line)."""


def _addr(sockaddr: Any) -> Address:
    return (str(sockaddr[0]), int(sockaddr[1]))


class TlsFiles:
    """A TLS context and the files it was built from (certificate and key
    reloaded without a restart). ``check()`` rebuilds the context when a file changed;
    new handshakes take ``context``, connections already up keep theirs. A context that
    fails to build (a bad certificate, a key that does not fit) is logged and the old one
    kept."""

    def __init__(
        self, name: str, build: Callable[[], ssl.SSLContext], files: tuple[Path | str | None, ...]
    ) -> None:
        self.name = name
        self._build = build
        self._files = tuple(str(f) for f in files if f)
        self._stamps = self._stat()
        self.context = build()  # StartupError at start: the SBC does not start

    @classmethod
    def fixed(cls, name: str, context: ssl.SSLContext) -> TlsFiles:
        """A context without files to watch."""
        return cls(name, lambda: context, ())

    def _stat(self) -> tuple[tuple[int, int, int] | None, ...]:
        stamps: list[tuple[int, int, int] | None] = []
        for path in self._files:
            try:
                st = os.stat(path)
            except OSError:
                stamps.append(None)
            else:
                stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(stamps)

    def check(self) -> bool:
        """Reload if a file changed since the last look; True if a new context is in use.
        A failed attempt is not repeated until a file changes again (one log line)."""
        stamps = self._stat()
        if stamps == self._stamps:
            return False
        self._stamps = stamps
        return self.reload()

    def adopt(self, other: TlsFiles) -> None:
        """Take ``other``'s files and context (a reloaded config named other files or
        settings); listeners holding this object use them from the next
        handshake."""
        self._build, self._files = other._build, other._files
        self._stamps, self.context = other._stamps, other.context
        log.info("%s: TLS settings reloaded", self.name)

    def reload(self) -> bool:
        try:
            context = self._build()
        except StartupError as exc:
            log.error("%s: keeping the certificate in use: %s", self.name, exc)
            return False
        self.context = context
        log.info("%s: certificate reloaded", self.name)
        return True


class SipTransports:
    """Owns every SIP socket and connection of the SBC and drives one ``SbcCore``."""

    def __init__(
        self,
        core: SbcCore,
        *,
        clock: Callable[[], float] | None = None,
        client_tls: TlsFiles | ssl.SSLContext | None = None,
        to_media: Callable[[int, MediaCommand], None] | None = None,
        to_records: Callable[[str], None] | None = None,
        store: StateStore | None = None,
    ) -> None:
        self.core = core
        # [state] url: where the core's Persist actions and shared events go.
        self.store = store
        # The other signalling workers of the SBC (attach_link), if there are any.
        self.link: WorkerLink | None = None
        self.synced = asyncio.Event()  # the shared state came from a live worker
        # Where the core's other actions go: the media workers, the call records file.
        self._to_media = to_media
        self._to_records = to_records
        if isinstance(client_tls, ssl.SSLContext):
            client_tls = TlsFiles.fixed("client TLS", client_tls)
        self._client_tls = client_tls  # for the connections the SBC opens over TLS
        self._tls_files: list[TlsFiles] = [client_tls] if client_tls is not None else []
        # Peer SBCs by address: the names their certificates must carry (mutual TLS), and
        # the name to verify when the SBC connects to one (RFC 5922 7).
        self._peer_names: dict[str, set[str]] = {}
        self._server_names: dict[tuple[str, Address], str] = {}
        self.set_peers()
        self._loop = asyncio.get_running_loop()
        self._clock = clock or self._loop.time
        # The core returned Drained: draining, its last call and transaction are over.
        self.drained = asyncio.Event()
        self._udp: dict[Address, asyncio.DatagramTransport] = {}
        # Connections by id: TCP and TLS ones, and WebSocket ones (ws, wss), which the
        # core sees as flows of their own transport and the same kind of id.
        self._conns: dict[int, _StreamProtocol | WebSocketConnection] = {}
        self._servers: list[asyncio.Server] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        # From a random start: a restarted worker's new connections must not take the ids
        # of its old ones, which the other workers may still hold in registrations.
        self._conn_ids = itertools.count(secrets.randbelow(1 << 40) + 1)
        self._outgoing: dict[tuple[str, Address], _StreamProtocol] = {}  # connections we opened
        self._pending: dict[tuple[str, Address], list[bytes]] = {}  # data waiting for connect
        self._tasks: set[asyncio.Task[None]] = set()
        self.bound: list[tuple[ListenUrl, Address]] = []  # (configured url, actual address)
        self._closing = False
        self.probes = QueueProbes(self._loop.time)
        self._lag_due = self._loop.time() + LAG_INTERVAL
        self._lag_timer = self._loop.call_at(self._lag_due, self._measure_lag)
        self._tls_timer = self._loop.call_later(TLS_CHECK_INTERVAL, self._check_tls)

    async def listen_ng(self, host: str) -> Address:
        """The SBC's socket to its rtpengine nodes (ng protocol, sbc/media/ng.py): a UDP
        socket on ``host`` whose datagrams go to the core as any other's (it tells a
        node's reply by the socket's address)."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        transport, _ = await self._loop.create_datagram_endpoint(
            lambda: _DatagramProtocol(self), local_addr=(host, 0), family=family
        )
        local = _addr(transport.get_extra_info("sockname"))
        self._udp[local] = transport
        return local

    def set_peers(self) -> None:
        """The peers' certificate names from the core's settings (at start and after a
        reload): who may connect as a peer, and the name to verify when connecting."""
        self._peer_names.clear()
        self._server_names.clear()
        for peer in self.core.settings.peers:
            name = peer.tls_name or peer.host
            self._peer_names.setdefault(peer.host.lower(), set()).add(name)
            self._server_names[(peer.transport, (peer.host, peer.port))] = name

    @property
    def client_tls(self) -> ssl.SSLContext | None:
        return self._client_tls.context if self._client_tls is not None else None

    @property
    def client_tls_files(self) -> TlsFiles | None:
        return self._client_tls

    # -- housekeeping ------------------------------------------------------------------------
    def _measure_lag(self) -> None:
        """How late this callback runs is how late the event loop runs everything; how long
        the queue probes waited is how late a datagram is read. The larger goes to the
        core, whose overload control refuses a share of new requests while it is too
        large."""
        now = self._loop.time()
        lag = max(0.0, now - self._lag_due)
        try:
            self.core.report_lag(max(lag, self.probes.tick()), self._clock())
        except Exception:
            log.exception("overload report failed")
        if lag > LAG_INTERVAL:
            log.debug("event loop %.3f s late", lag)
        self._lag_due = now + LAG_INTERVAL
        self._lag_timer = self._loop.call_at(self._lag_due, self._measure_lag)

    def _check_tls(self) -> None:
        self.reload_tls(only_changed=True)
        self._tls_timer = self._loop.call_later(TLS_CHECK_INTERVAL, self._check_tls)

    def reload_tls(self, *, only_changed: bool = False) -> int:
        """Load the certificates and keys of every TLS context again (the SIGHUP of a
        reload calls this; a timer calls it with ``only_changed`` every few seconds).
        New handshakes use them; open connections keep theirs. Returns how many contexts
        were replaced; one that fails to load is logged and keeps the old certificate."""
        done = 0
        for files in self._tls_files:
            if files.check() if only_changed else files.reload():
                done += 1
        return done

    # -- listeners ---------------------------------------------------------------------------
    async def listen(
        self,
        url: ListenUrl,
        tls: TlsFiles | ssl.SSLContext | None = None,
        *,
        shared: bool = False,
        websocket: WebSocketSettings = DEFAULT_SETTINGS,
    ) -> Address:
        """Bind one listener. TLS and WSS listeners accept plain TCP and start TLS on each
        connection themselves, after the per-source limits. ``shared``: the signalling
        workers of one SBC all bind it (SO_REUSEPORT): the kernel picks a worker per UDP
        source address and port, and per TCP connection. ``websocket``: the settings of
        a ws or wss listener (SIP over WebSocket, RFC 7118)."""
        if isinstance(tls, ssl.SSLContext):
            tls = TlsFiles.fixed(f"{url}", tls)
        secure = url.transport == "tls" or url.transport == "wss"
        if tls is not None and secure and tls not in self._tls_files:
            self._tls_files.append(tls)
        family = socket.AF_INET6 if ":" in url.host else socket.AF_INET
        try:
            if url.transport == "udp":
                transport, _ = await self._loop.create_datagram_endpoint(
                    lambda: _DatagramProtocol(self),
                    local_addr=(url.host, url.port),
                    family=family,
                    reuse_port=shared or None,
                )
                local = _addr(transport.get_extra_info("sockname"))
                _large_receive_buffer(transport.get_extra_info("socket"))
                self._udp[local] = transport
                if not shared:
                    # A probe to a shared address lands at whichever worker the kernel
                    # picks for it, always the same one: it cannot measure this queue.
                    self.probes.watch(local, transport)
            else:
                if secure and tls is None:
                    raise StartupError(f"{url}: TLS listener without a TLS context")
                files, name = tls if secure else None, url.transport

                def connection() -> _StreamProtocol | WebSocketConnection:
                    if name == "ws" or name == "wss":
                        return WebSocketConnection(self, name, websocket)
                    return _StreamProtocol(self, name, accepted=True)

                def factory() -> asyncio.Protocol:
                    if files is not None:
                        return _TlsGate(self, files, connection)
                    return connection()

                server = await self._loop.create_server(
                    factory,
                    host=url.host,
                    port=url.port,
                    family=family,
                    reuse_address=True,
                    reuse_port=shared or None,
                )
                self._servers.append(server)
                local = _addr(server.sockets[0].getsockname())
        except OSError as exc:
            # uvloop wraps the errno-carrying OSError ("Address already in use") as the cause.
            cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
            raise StartupError(f"cannot listen on {url}: {cause.strerror or cause}") from None
        self.bound.append((url, local))
        log.info("listening on %s://%s", url.transport, format_address(local))
        if url.transport in ("ws", "wss") and not websocket.allowed_origins and self.worker == 0:
            _warn_any_origin(url.transport, local)  # once per SBC, not per signalling worker
        return local

    async def close(self) -> None:
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
        self._lag_timer.cancel()
        self._tls_timer.cancel()
        for server in self._servers:
            server.close()
        for conn in list(self._conns.values()):
            conn.close()
        for transport in self._udp.values():
            transport.close()
        for server in self._servers:
            await server.wait_closed()

    # -- core plumbing -----------------------------------------------------------------------
    def run_actions(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, SendData):
                self._send(action.flow, action.data)
            elif isinstance(action, Close):
                conn = self._conns.get(action.flow.conn_id)
                if conn is not None:
                    conn.close()
            elif isinstance(action, ToMediaWorker):
                if self._to_media is not None:
                    self._to_media(action.worker, action.command)
            elif isinstance(action, CallRecord):
                if self._to_records is not None:
                    self._to_records(action.line)
            elif isinstance(action, Share):
                if self.link is not None:
                    self.link.broadcast(("share", action.event))
                if self.store is not None and self.store.shares:
                    self.store.publish(shift_times(action.event, self.core.wall_offset))
            elif isinstance(action, Persist):
                if self.store is not None:
                    self.store.persist(action)
            elif isinstance(action, HandOver):
                if self.link is not None:
                    kind = "in" if action.received else "out"
                    self.link.send(action.worker, (kind, encode_flow(action.flow), action.data))
            elif isinstance(action, Drained):
                self.drained.set()
        self._arm_timer()

    # -- the other workers -------------------------------------------------------------------
    def attach_link(self, link: WorkerLink, *, sync: bool) -> None:
        """Serve the link to the other workers; with ``sync`` (a restarted worker), ask one
        of them for the shared state."""
        self.link = link
        if not sync:
            return
        for peer in range(link.count):
            if peer != link.index:
                link.send(peer, ("sync", link.index))
                break

    def from_worker(self, peer: int, item: tuple[Any, ...]) -> None:
        """An item of the link (sbc/io/worker_link.py) from worker ``peer``."""
        kind = item[0]
        now = self._clock()
        if kind == "share":
            self.run_actions(self.core.apply_shared(item[1], now))
        elif kind == "in":
            self.run_actions(self.core.receive_handed(item[2], decode_flow(item[1]), now))
        elif kind == "out":
            self._send(decode_flow(item[1]), item[2])
        elif kind == "sync" and self.link is not None:
            self.run_actions(self.core.worker_restarted(int(item[1]), now))
            for event in self.core.snapshot():
                self.link.send(int(item[1]), ("share", event))
            self.link.send(int(item[1]), ("synced",))
        elif kind == "synced":
            self.synced.set()

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
        owner = conn_owner(flow.conn_id)
        if owner != self.worker and self.link is not None:
            # Another worker's connection (a user registered through it): it writes.
            self.link.send(owner, ("out", encode_flow(flow), data))
            return
        conn = self._conns.get(flow.conn_id)
        if conn is not None and conn.flow != flow:
            conn = None  # the id of another connection: never write to the wrong client
        if conn is None or not conn.send(data):
            # Connection reuse only (RFC 3261 18.2.2): a gone connection loses the message.
            log.info("connection %s gone, dropping %d bytes", flow, len(data))

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
                    lambda: _StreamProtocol(self, transport_name, accepted=False),
                    host=host,
                    port=port,
                    ssl=tls,
                    # RFC 5922 7: a peer SBC is verified by its configured name.
                    server_hostname=self._server_names.get(key, host) if tls is not None else None,
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
        """Octets of a TCP/TLS stream: the core frames them by Content-Length."""
        self._from_connection(conn, self.core.receive_stream, data)

    def message_data(self, conn: WebSocketConnection, data: bytes) -> None:
        """One whole WebSocket message: one SIP message (RFC 7118 5), or a CRLFCRLF
        keep-alive that gets its CRLF answer (RFC 5626 4.4.1)."""
        self._from_connection(conn, self.core.receive_message, data)

    def _from_connection(
        self,
        conn: _StreamProtocol | WebSocketConnection,
        receive: Callable[[bytes, Flow, float], list[Action]],
        data: bytes,
    ) -> None:
        assert conn.flow is not None
        try:
            actions = receive(data, conn.flow, self._clock())
        except Exception:
            log.exception("error handling data from %s; closing it", conn.flow)
            conn.close()
            return
        self.run_actions(actions)

    @property
    def worker(self) -> int:
        return self.core.worker

    def register(self, conn: _StreamProtocol | WebSocketConnection) -> int:
        conn_id = make_conn_id(next(self._conn_ids), self.worker)
        self._conns[conn_id] = conn
        return conn_id

    def new_flow(
        self, conn: _StreamProtocol | WebSocketConnection, transport: asyncio.BaseTransport
    ) -> Flow:
        """The flow of a connection, registered under a new id of this worker."""
        local = _addr(transport.get_extra_info("sockname"))
        remote = _addr(transport.get_extra_info("peername"))
        return Flow(conn.name, local, remote, self.register(conn))

    def admit_data(self, conn: WebSocketConnection) -> bool:
        """Whatever a WebSocket connection read (an HTTP request, data or control frames):
        the guard's packet count and ban list, as for a TCP read (``SbcCore.receive_stream``).
        False: the connection is to be dropped unread."""
        assert conn.flow is not None
        try:
            if self.core.admit_data(conn.flow, self._clock()):
                return True
            log.debug("connection dropped (source banned or not allowed): %s", conn.flow)
        except Exception:
            log.exception("admission of data from %s failed; closing it", conn.flow)
        return False

    def admit(self, conn: _StreamProtocol | WebSocketConnection) -> bool:
        """A connection accepted on a listener (still plain TCP for TLS and WSS
        listeners): the per-source connection limit and ban list, then for TLS and WSS
        the per-source handshake bucket, all before any byte of it is read."""
        assert conn.flow is not None
        now = self._clock()
        try:
            if not self.core.connection_opened(conn.flow, now):
                log.debug("connection refused (source limit or ban): %s", conn.flow)
                return False
            if conn.flow.secure and not self.core.guard.handshake_allowed(conn.flow.remote[0], now):
                log.debug("TLS handshake refused (source over its rate): %s", conn.flow)
                return False
        except Exception:
            log.exception("admission of %s failed; closing it", conn.flow)
            return False
        return True

    def accept_tls(
        self, raw: asyncio.Transport, tls: TlsFiles, conn: _StreamProtocol | WebSocketConnection
    ) -> None:
        """A TCP connection accepted on a TLS or WSS listener, before any byte of it is
        read: the per-source limits decide whether a handshake starts at all.
        The socket then leaves this plain transport (which never read from it) for a TLS
        one whose handshake is bounded by HANDSHAKE_TIMEOUT; ``conn`` (SIP over TLS, or a
        WebSocket) takes the connection then."""
        conn.flow = self.new_flow(conn, raw)
        if not self.admit(conn):
            raw.abort()
            self.unregister(conn)
            return
        try:
            sock = socket.socket(fileno=os.dup(raw.get_extra_info("socket").fileno()))
        except OSError as exc:
            log.warning("cannot take over the connection of %s: %s", conn.flow, exc)
            raw.abort()
            self.unregister(conn)
            return
        raw.abort()  # closes only its descriptor: the connection lives on in ``sock``
        task = self._loop.create_task(self._handshake(conn, sock, tls.context))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handshake(
        self,
        conn: _StreamProtocol | WebSocketConnection,
        sock: socket.socket,
        context: ssl.SSLContext,
    ) -> None:
        try:
            await self._loop.connect_accepted_socket(
                lambda: conn, sock, ssl=context, ssl_handshake_timeout=HANDSHAKE_TIMEOUT
            )
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            # The loop owns the socket now and has closed it.
            log.info("TLS handshake with %s failed: %s", conn.flow, str(exc) or repr(exc))
            self.unregister(conn)

    def _peer_certificate_ok(self, flow: Flow, transport: asyncio.BaseTransport) -> bool:
        """A TLS connection from a peer SBC's address is its only if the certificate, which
        the handshake verified against [core.tls] ca, names the peer ([[peers]] tls_name);
        else it is closed before a request on it is read."""
        names = self._peer_names.get(flow.remote[0].lower())
        if names is None:
            return True
        cert = transport.get_extra_info("peercert")
        if peer_tls.matches(cert, names):
            return True
        shown = sorted(peer_tls.certificate_names(cert)) if cert else "no certificate"
        log.warning(
            "closing TLS connection from peer address %s: certificate names %s, expected %s",
            flow, shown, " or ".join(sorted(names)),
        )  # fmt: skip
        self.core.stats["rejected:peer_certificate"] += 1
        return False

    def unregister(self, conn: _StreamProtocol | WebSocketConnection) -> None:
        for key in [k for k, c in self._outgoing.items() if c is conn]:
            del self._outgoing[key]
        if conn.flow is not None:
            if self._conns.pop(conn.flow.conn_id, None) is None:
                return  # already done (an aborted handshake reports its loss twice)
            if self._closing:  # shutting down: nothing more is sent
                self.core.connection_closed(conn.flow)
            else:
                self.run_actions(self.core.connection_lost(conn.flow, self._clock()))


class QueueProbes:
    """How long a datagram waits now in each UDP listener's receive queue before the SBC
    reads it (RFC 6357 5 names queue delay as the measure of overload). The event loop's
    lag alone misses a deep queue: the loop reads a batch of datagrams per wake-up and runs
    its timers on time between batches while the queue grows.

    The kernel tells the bytes queued now (SO_MEMINFO); what they are worth in time comes
    from probes: at every tick each listener sends a small datagram to itself (no socket
    or port of its own), and the bytes that were queued ahead of it over the time it took
    to come out is the rate the SBC drains its queue at (as PIE, RFC 8033 5.2, divides the
    queue by the departure rate: the delay of now, not that of a datagram that entered the
    queue a while ago). Until a probe has waited long enough to measure that rate, the
    probes' own waits are the measure."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._token = PROBE_PREFIX + os.urandom(8).hex().encode()
        # listener -> (its transport, its socket, the address it is reached at)
        self._targets: dict[Address, tuple[asyncio.DatagramTransport, Any, Address]] = {}
        # listener -> the probes on their way, oldest first: (payload, sent at, bytes ahead)
        self._sent: dict[Address, collections.deque[tuple[bytes, float, int]]] = {}
        self._rate: dict[Address, float] = {}  # listener -> bytes drained per second
        self._seq = itertools.count(1)
        # listener -> the longest wait of a probe received there since the last tick
        self._waited: dict[Address, float] = {}

    def watch(self, local: Address, transport: asyncio.DatagramTransport) -> None:
        """A UDP listener to probe; a wildcard address is reached on loopback."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(local[0], local[0])
        self._targets[local] = (transport, transport.get_extra_info("socket"), (host, local[1]))
        self._sent[local] = collections.deque()

    def received(self, local: Address, data: bytes) -> bool:
        """A datagram beginning with a NUL came to ``local``: True if it is a probe (taken
        here). Probes come out in the order they were sent: older ones still listed were
        dropped by a full queue."""
        if not data.startswith(self._token):
            # Another process's probe (a worker before its restart): not SIP, dropped.
            return data.startswith(PROBE_PREFIX)
        sent = self._sent.get(local)
        while sent:
            payload, when, ahead = sent.popleft()
            if payload == data:
                waited = self._clock() - when
                self._waited[local] = max(self._waited.get(local, 0.0), waited)
                if waited >= PROBE_MIN_WAIT and ahead >= PROBE_MIN_AHEAD:
                    rate = ahead / waited
                    old = self._rate.get(local)
                    self._rate[local] = rate if old is None else old + (rate - old) / 4
                break
        return True

    def tick(self) -> float:
        """How long a datagram queued now waits, at the listener where it waits longest;
        one more probe to each listener."""
        now = self._clock()
        worst = 0.0
        for local, (transport, sock, target) in self._targets.items():
            sent = self._sent[local]
            while sent and now - sent[0][1] > PROBE_LOST:
                sent.popleft()  # dropped by a full queue: its successors carry on
            queued = _queued_bytes(sock)
            rate = self._rate.get(local)
            waited = self._waited.pop(local, 0.0)
            if rate is not None and queued is not None:
                worst = max(worst, queued / rate)
            else:  # the probes' waits; one still on its way has waited at least its age
                worst = max(worst, waited, now - sent[0][1] if sent else 0.0)
            if transport.is_closing():
                continue
            payload = self._token + b" %d" % next(self._seq)
            transport.sendto(payload, target)
            sent.append((payload, now, queued or 0))
        return worst


def _warn_any_origin(transport: str, local: Address) -> None:
    """A ws/wss listener reachable from other hosts without [access.websocket]
    allowed_origins: any page a browser shows may open SIP WebSockets to it, from the
    browser's address (the guard knows sources by address only; RFC 6455 10.2)."""
    try:
        loopback = ipaddress.ip_address(local[0]).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        log.warning(
            "any web page can open SIP WebSockets to %s://%s; set [access.websocket] "
            "allowed_origins", transport, format_address(local),
        )  # fmt: skip


def _queued_bytes(sock: Any) -> int | None:
    """The bytes in a socket's receive queue (Linux SO_MEMINFO: the kernel's accounting,
    payload and buffer overhead); None where the system does not tell."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 4 * 9)
    except (OSError, AttributeError):
        return None
    return int(struct.unpack_from("I", raw)[0])


class _DatagramProtocol(asyncio.DatagramProtocol):
    def __init__(self, owner: SipTransports) -> None:
        self.owner = owner
        self.local: Address = ("", 0)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.local = _addr(transport.get_extra_info("sockname"))

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if data[:1] == b"\x00" and self.owner.probes.received(self.local, data):
            return
        self.owner.datagram(data, self.local, _addr(addr))

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and friends: UDP has no connection to fail.
        log.debug("UDP error on %s: %s", format_address(self.local), exc)


class _StreamProtocol(asyncio.Protocol):
    """One TCP or TLS connection. The SBC's own connections (``accepted`` False) and TCP
    ones get their flow in ``connection_made``; on a TLS listener the flow is made (and
    admitted) when the TCP connection is accepted, and ``connection_made`` comes with the
    TLS transport once the handshake is done."""

    def __init__(self, owner: SipTransports, transport_name: str, *, accepted: bool) -> None:
        self.owner = owner
        self.name = transport_name
        self.accepted = accepted
        self.transport: asyncio.Transport | None = None
        self.flow: Flow | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        if self.flow is not None:  # TLS on a listener: admitted at accept, handshake done
            if not self.owner._peer_certificate_ok(self.flow, transport):
                self._refused = True
                transport.close()
            return
        self.flow = self.owner.new_flow(self, transport)
        log.debug("connection from %s", self.flow)
        if self.accepted and not self.owner.admit(self):
            self._refused = True
            transport.close()

    def data_received(self, data: bytes) -> None:
        if not self._refused:
            self.owner.stream_data(self, data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.unregister(self)

    def send(self, data: bytes) -> bool:
        """Write ``data``; False if the connection is gone or going."""
        if self.transport is None or self.transport.is_closing():
            return False
        self.transport.write(data)
        return True

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class _TlsGate(asyncio.Protocol):
    """The protocol of a TLS or WSS listener's plain TCP connection: it lives only for
    the ``connection_made`` call that admits the source and hands the socket over to the
    connection ``make`` gives (SIP over TLS, or a WebSocket)."""

    def __init__(
        self,
        owner: SipTransports,
        tls: TlsFiles,
        make: Callable[[], _StreamProtocol | WebSocketConnection],
    ) -> None:
        self.owner = owner
        self.tls = tls
        self.make = make

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        try:
            self.owner.accept_tls(transport, self.tls, self.make())  # type: ignore[arg-type]
        except Exception:
            log.exception("accepting a TLS connection failed")
            transport.abort()  # type: ignore[attr-defined]


def tls_context(certificate: str, private_key: str, ca: str | None, *, verify: bool,
                min_version: str, ciphers: str | None,
                ask_client_certificate: bool = False) -> ssl.SSLContext:  # fmt: skip
    """Server-side TLS context: TLS 1.2 minimum unless configured higher. ``verify``
    requires a client certificate from ``ca``; ``ask_client_certificate`` asks for one and
    verifies it if given (peer SBCs must show theirs; other clients need none)."""
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
    if verify:
        ctx.verify_mode = ssl.CERT_REQUIRED
    elif ask_client_certificate:
        ctx.verify_mode = ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
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
