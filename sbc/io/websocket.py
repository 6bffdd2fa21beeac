"""SIP over WebSocket (RFC 7118) on the access side, and the browser softphone's files.

A ws:// or wss:// access listener speaks HTTP/1.1 first. A request to upgrade to WebSocket
with the "sip" subprotocol (RFC 7118 4.1) opens a SIP connection: each WebSocket message
is one whole SIP message (RFC 7118 4.2), handed to the core as received on a reliable flow
whose transport is "ws" or "wss"; what the core sends on that flow goes out as one
message. Any other GET or HEAD is answered from the static files of ``sbc/static/`` (the
browser softphone), so that the page and its WebSocket share one origin; the connection
then stays open for the next request (HTTP/1.1 persistence, RFC 9112 9.3), so that the
page's ~130 module files do not cost a connection (and over wss a TLS handshake) each.

Every read of a connection (an HTTP request, a data or control frame) is a packet of its
source for the guard (``SipTransports.admit_data``), as a TCP read is; a client that does
not read what it is sent is not read from either, and is dropped when WRITE_BUFFER_LIMIT
bytes wait for it.

The WebSocket and HTTP wire formats are the ``websockets`` package's sans-I/O
``ServerProtocol`` (bytes in, events and bytes out); this module decides what to answer
(``static_response``, ``handshake_refusal``: pure functions) and moves the bytes
(``WebSocketConnection``, an asyncio protocol like the TCP one of sip_transport.py).
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Final

from websockets.datastructures import Headers
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from sbc.sip.flow import Flow

if TYPE_CHECKING:
    from sbc.config.schema import WebSocketConfig
    from sbc.io.sip_transport import SipTransports

log = logging.getLogger("sbc.io")
# websockets' own lines (each connection opened and closed) only at debug level.
_protocol_log = logging.getLogger("sbc.io.websocket")
_protocol_log.setLevel(logging.WARNING)

SUBPROTOCOL: Final = "sip"  # RFC 7118 4.1 (IANA WebSocket Subprotocol Name Registry)
# Seconds a client has to complete its HTTP Upgrade, or its next HTTP request on a
# kept-alive connection (an idle one is closed then).
UPGRADE_TIMEOUT: Final = 10.0
MAX_REQUESTS: Final = 1000  # HTTP requests on one connection; the last is answered with close
# Bytes waiting for a client that does not read (its pongs, the SIP sent to it) at most:
# above, the connection is dropped. Above the largest single answer (a static file of the
# softphone, a SIP message), which is written whole to an empty buffer in any case.
WRITE_BUFFER_LIMIT: Final = 256 * 1024
CLOSE_TIMEOUT: Final = 2.0  # seconds a client has to answer our Close before we drop it
# The softphone's files (index.html, phone.js, vendor/...), shipped as package data.
STATIC_ROOT: Final = Path(__file__).resolve().parent.parent / "static"
CONTENT_TYPES: Final[dict[str, str]] = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",  # RFC 9239 3
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".json": "application/json",
    ".txt": "text/plain; charset=utf-8",
    ".map": "application/json",
}
# A Host header that may be written back into the Content-Security-Policy.
_HOST: Final = re.compile(r"[A-Za-z0-9.-]+(?::[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](?::[0-9]{1,5})?")


@dataclass(frozen=True, slots=True, kw_only=True)
class WebSocketSettings:
    """[access.websocket]: who may connect, how large a message, how to find dead
    connections; and where the static files are (tests give their own)."""

    allowed_origins: tuple[str, ...] = ()  # lower-case; empty: any origin
    max_message_size: int = 65535
    ping_interval: float = 30.0  # 0: no pings
    idle_timeout: float = 120.0
    static_root: Path | None = STATIC_ROOT

    @classmethod
    def of(cls, config: WebSocketConfig) -> WebSocketSettings:
        return cls(
            allowed_origins=tuple(o.lower() for o in config.allowed_origins),
            max_message_size=config.max_message_size,
            ping_interval=config.ping_interval,
            idle_timeout=config.idle_timeout,
        )


DEFAULT_SETTINGS: Final = WebSocketSettings()


# -- what to answer (sans-I/O) -----------------------------------------------------------------


def wants_websocket(request: Request) -> bool:
    """An HTTP request asking to upgrade to WebSocket (RFC 6455 4.2.1 item 3); anything
    else on the listener is a plain HTTP request for the static files."""
    return any(
        token.strip().lower() == "websocket"
        for value in request.headers.get_all("Upgrade")
        for token in value.split(",")
    )


def handshake_refusal(request: Request, allowed_origins: tuple[str, ...]) -> int | None:
    """The HTTP status refusing an upgrade before ``ServerProtocol.accept`` looks at it, or
    None: 403 for an Origin that is not allowed (RFC 6455 4.2.2, 10.2; a client without
    Origin is no browser page, and is refused too when origins are listed). The "sip"
    subprotocol (RFC 7118 4.1) is checked by ``accept``, which answers 400 without it."""
    if not allowed_origins:
        return None
    origins = request.headers.get_all("Origin")
    if len(origins) != 1 or origins[0].strip().lower() not in allowed_origins:
        return 403
    return None


def content_security_policy(host: str | None, secure: bool) -> str:
    """What the softphone page may load and connect to: its own origin only (and its
    WebSocket, on the same host and port; CSP 3 'self' covers ws: only in newer browsers),
    media from blob: URLs (recorded or remote streams)."""
    connect = "'self'"
    if host is not None and _HOST.fullmatch(host):
        connect += f" {'wss' if secure else 'ws'}://{host}"
    return (
        f"default-src 'self'; connect-src {connect}; media-src 'self' blob:; "
        "img-src 'self' data:; style-src 'self' 'unsafe-inline'; object-src 'none'; "
        "base-uri 'self'; frame-ancestors 'none'"
    )


def static_response(
    method: str,
    target: str,
    root: Path | None,
    *,
    host: str | None = None,
    secure: bool = False,
    keep_alive: bool = False,
) -> tuple[int, list[tuple[str, str]], bytes]:
    """The answer to a plain HTTP request: (status, headers, body). GET and HEAD of a file
    under ``root`` ("/" is index.html); the path is percent-decoded (as UTF-8), and one
    naming anything outside ``root`` (``..``, an absolute path, a symbolic link leading
    out), not a regular file or not decodable is 404. Other methods: 405 (RFC 9110
    15.5.6, with Allow). ``keep_alive``: the connection stays open after it (RFC 9112
    9.3; else ``Connection: close``, RFC 9112 9.6)."""
    connection = ("Connection", "keep-alive" if keep_alive else "close")
    if method not in ("GET", "HEAD"):
        return _text(405, "Method Not Allowed\n", [("Allow", "GET, HEAD"), connection], method)
    path = _resolve(target, root)
    if path is None:
        return _text(404, "Not Found\n", [connection], method)
    try:
        body = path.read_bytes()
    except OSError:
        return _text(404, "Not Found\n", [connection], method)
    headers = [
        ("Content-Type", CONTENT_TYPES.get(path.suffix.lower(), "application/octet-stream")),
        ("Content-Length", str(len(body))),
        ("Cache-Control", "no-cache"),
        ("X-Content-Type-Options", "nosniff"),
        ("Content-Security-Policy", content_security_policy(host, secure)),
        connection,
    ]
    return 200, headers, body if method == "GET" else b""


def _text(
    status: int, text: str, extra: list[tuple[str, str]], method: str
) -> tuple[int, list[tuple[str, str]], bytes]:
    body = text.encode()
    headers = [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Length", str(len(body))),
        *extra,
    ]
    return status, headers, body if method != "HEAD" else b""


def _resolve(target: str, root: Path | None) -> Path | None:
    """The file under ``root`` that a request target names, or None."""
    if root is None or not target.startswith("/"):
        return None  # an absolute-form or asterisk target names no file here
    try:
        path = urllib.parse.unquote(target.partition("?")[0].partition("#")[0], errors="strict")
    except UnicodeDecodeError:
        return None  # "/%ff": no file name of ours is other than UTF-8
    if path.endswith("/"):
        path += "index.html"
    parts = path[1:].split("/")
    if any(p in ("", ".", "..") or "\\" in p or "\x00" in p for p in parts):
        return None
    try:
        base = root.resolve(strict=True)
        found = base.joinpath(*parts).resolve(strict=True)
    except (OSError, RuntimeError, ValueError):
        return None
    if not found.is_relative_to(base) or not found.is_file():
        return None  # a symbolic link out of the directory, or a directory
    return found


def _response(status: int, headers: list[tuple[str, str]], body: bytes) -> Response:
    fields = Headers([("Date", email.utils.formatdate(usegmt=True)), *headers])
    return Response(status, HTTPStatus(status).phrase, fields, body)


# -- the connection (asyncio) ------------------------------------------------------------------


class WebSocketConnection(asyncio.Protocol):
    """One connection on a ws:// or wss:// listener. Its flow is made and admitted (the
    guard's per-source limits) as a TCP connection's is: on ws in ``connection_made``, on
    wss when the TCP connection is accepted, before the TLS handshake
    (``SipTransports.accept_tls``). It carries SIP only after a successful Upgrade; before,
    it may serve any number of plain HTTP requests (up to MAX_REQUESTS), each with a
    ``ServerProtocol`` of its own."""

    def __init__(
        self, owner: SipTransports, transport_name: str, settings: WebSocketSettings
    ) -> None:
        self.owner = owner
        self.name = transport_name  # "ws" or "wss"
        self.settings = settings
        self.transport: asyncio.Transport | None = None
        self.flow: Flow | None = None
        self.protocol = self._new_protocol()
        self._loop = asyncio.get_running_loop()
        self._refused = False
        self._answered = False  # the protocol object wrote something (an HTTP answer at least)
        self._requests = 0  # plain HTTP requests answered on this connection
        self._parts: list[bytes] = []  # a fragmented message so far (RFC 6455 5.4)
        self._last = self._loop.time()  # when the client last sent anything
        self._timer: asyncio.TimerHandle | None = None

    # -- asyncio -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        self._last = self._loop.time()
        self._arm(UPGRADE_TIMEOUT)
        if self.flow is not None:  # wss: admitted when accepted, TLS handshake done
            return
        self.flow = self.owner.new_flow(self, transport)
        log.debug("connection from %s", self.flow)
        if not self.owner.admit(self):
            self._refused = True
            transport.close()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        # The guard sees every read, as on TCP: HTTP requests and control frames count
        # towards the source's flood limit like SIP messages; a banned source loses the
        # connection here, unread.
        if not self.owner.admit_data(self):
            self._refused = True
            self._abort()
            return
        self._last = self._loop.time()
        try:
            self.protocol.receive_data(data)
            for event in self.protocol.events_received():
                if isinstance(event, Request):
                    self._request(event)
                elif isinstance(event, Frame):
                    self._frame(event)
        except Exception:  # never let one client's bytes stop the SBC
            log.exception("WebSocket error on %s; closing it", self.flow)
            self._abort()
            return
        self._flush()

    def eof_received(self) -> bool | None:
        if self.protocol.state is State.CONNECTING:
            return None  # between HTTP requests, or in one: nothing to answer, closed
        self.protocol.receive_eof()
        self._flush()
        return None  # the transport closes itself

    def pause_writing(self) -> None:
        """The transport's buffer is above its high-water mark: the client does not read
        what it is sent. It is not read from until it does (whatever it sends would be
        answered into the same buffer: a pong per ping, a response per request)."""
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.pause_reading()

    def resume_writing(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.owner.unregister(self)

    # -- what the SBC does with it -------------------------------------------------------
    @property
    def open(self) -> bool:
        """Upgraded and not closing: SIP messages may be sent."""
        return self.protocol.state is State.OPEN

    def send(self, data: bytes) -> bool:
        """One SIP message as one WebSocket message (RFC 7118 4.2): a text frame when it
        is UTF-8, else binary. False if the connection cannot carry it."""
        transport = self.transport
        if not self.open or transport is None or transport.is_closing():
            return False
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            self.protocol.send_binary(data)
        else:
            self.protocol.send_text(data)
        self._flush()
        return True

    def close(self) -> None:
        """Close from our side: a Close frame (RFC 6455 7.1.2) if upgraded, the TCP
        connection after the client's answer or CLOSE_TIMEOUT."""
        self._close(1001, "going away")

    # -- inside --------------------------------------------------------------------------
    def _new_protocol(self) -> ServerProtocol:
        return ServerProtocol(
            subprotocols=[Subprotocol(SUBPROTOCOL)],
            max_size=self.settings.max_message_size,
            logger=_protocol_log,
        )

    def _request(self, request: Request) -> None:
        """The HTTP request: an Upgrade, or a request for the static files."""
        proto = self.protocol
        if not wants_websocket(request):
            self._static(request)
            return
        refusal = handshake_refusal(request, self.settings.allowed_origins)
        if refusal is not None:
            log.info("WebSocket from %s refused: origin not allowed", self.flow)
            response = proto.reject(refusal, "Origin not allowed.\n")
        else:
            response = proto.accept(request)  # 400 without the "sip" subprotocol
        if response.status_code != 101:
            log.info(
                "WebSocket from %s refused: %d %s",
                self.flow, response.status_code, proto.handshake_exc,
            )  # fmt: skip
        proto.send_response(response)
        if response.status_code == 101:
            log.debug("WebSocket open: %s", self.flow)
            self._arm(self._next_check())

    def _static(self, request: Request) -> None:
        """A plain HTTP request, answered from the static files. A GET or HEAD keeps the
        connection (RFC 9112 9.3: HTTP/1.1 connections persist unless either side says
        close) for a next request, read by a new ``ServerProtocol`` (one handles one
        request) within UPGRADE_TIMEOUT; that one may be an Upgrade. Browsers do not
        pipeline (send a request before the previous answer): bytes that came behind the
        request in the same read are such a pipeline, and the connection is closed after
        this answer instead (RFC 9112 9.3.2: the client retries the rest)."""
        proto = self.protocol
        self._requests += 1
        keep = (
            request.method in ("GET", "HEAD")
            and self._requests < MAX_REQUESTS
            and not any(
                token.strip().lower() == "close"
                for value in request.headers.get_all("Connection")
                for token in value.split(",")
            )  # RFC 9112 9.6
            and proto.parser_exc is None  # nothing behind the request was read as a frame
            and not proto.reader.buffer
        )
        host = request.headers.get_all("Host")
        status, headers, body = static_response(
            request.method, request.path, self.settings.static_root,
            host=host[0] if len(host) == 1 else None, secure=self.name == "wss",
            keep_alive=keep,
        )  # fmt: skip
        log.debug("HTTP %s %s from %s: %d", request.method, request.path, self.flow, status)
        # What the protocol object has to send: nothing, or (a pipeline it read as a
        # frame, and failed on) the end of the stream, which closes below.
        proto.data_to_send()
        self._write(_response(status, headers, body).serialize())
        if not keep:
            if self.transport is not None:
                self.transport.close()  # once the answer is written (RFC 9112 9.6)
            return
        self.protocol = self._new_protocol()
        self._answered = False
        self._arm(UPGRADE_TIMEOUT)

    def _frame(self, frame: Frame) -> None:
        """A data frame: a whole message goes to the core (RFC 7118 4.2); control
        frames are answered by the protocol object (ping: pong, close: close)."""
        opcode = frame.opcode
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            if frame.fin:
                self._message(frame.data)
            else:
                self._parts = [bytes(frame.data)]
        elif opcode is Opcode.CONT:
            self._parts.append(bytes(frame.data))
            if frame.fin:
                data, self._parts = b"".join(self._parts), []
                self._message(data)

    def _message(self, data: bytes | bytearray | memoryview) -> None:
        if self.flow is not None and self.open:
            self.owner.message_data(self, bytes(data))

    def _flush(self) -> None:
        """Write what the protocol object has for the client; its end-of-stream marker
        (after an HTTP answer that is not 101, or a close) closes the connection."""
        proto = self.protocol
        chunks = proto.data_to_send()
        if (
            proto.state is State.CONNECTING
            and proto.handshake_exc is not None
            and not any(chunks)
            and not self._answered
        ):
            # Not an HTTP request at all: websockets only closes; the client learns why.
            chunks.insert(0, proto.reject(400, "Bad Request.\n").serialize())
        transport = self.transport
        for chunk in chunks:
            if transport is None or transport.is_closing():
                return
            if chunk:
                self._answered = True
                self._write(chunk)
            else:
                transport.close()  # after the data written before it

    def _write(self, data: bytes) -> None:
        """Write to the client; one that leaves more than WRITE_BUFFER_LIMIT bytes unread
        loses the connection (a single answer to an empty buffer always goes)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        before = transport.get_write_buffer_size()
        transport.write(data)
        queued = transport.get_write_buffer_size()
        if before and queued > WRITE_BUFFER_LIMIT:
            log.info("%s does not read: %d bytes wait for it; dropping it", self.flow, queued)
            self._abort()

    def _close(self, code: int, reason: str) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if not self.open:
            transport.close()
            return
        self.protocol.send_close(code, reason)
        self._flush()
        self._arm(CLOSE_TIMEOUT, closing=True)

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _next_check(self) -> float:
        """Seconds until the next look at the connection: a ping due, or the idle limit."""
        s = self.settings
        due = self._last + s.idle_timeout
        if s.ping_interval:
            due = min(due, self._last + s.ping_interval)
        return max(0.0, due - self._loop.time())

    def _arm(self, delay: float, *, closing: bool = False) -> None:
        if self._timer is not None:
            self._timer.cancel()
        callback: Callable[[], None] = self._abort if closing else self._check
        self._timer = self._loop.call_later(delay, callback)

    def _check(self) -> None:
        """The timer: an Upgrade not done in time, an idle client (RFC 6455 7.1.1 close
        it), or a quiet one to ping (RFC 6455 5.5.2; its pong counts as a frame)."""
        self._timer = None
        state = self.protocol.state
        if state is State.CONNECTING:
            if self._requests:
                # A kept-alive HTTP connection without a whole next request (RFC 9112 9.5).
                log.debug("HTTP connection %s idle; closing", self.flow)
                if self.transport is not None:
                    self.transport.close()
                return
            log.info("WebSocket Upgrade from %s not done in time; closing", self.flow)
            self._abort()
            return
        if state is not State.OPEN:
            return
        s = self.settings
        now = self._loop.time()
        if now - self._last >= s.idle_timeout:
            log.info("WebSocket %s idle for %g s; closing", self.flow, s.idle_timeout)
            self._close(1001, "idle")
            return
        if s.ping_interval and now - self._last >= s.ping_interval:
            self.protocol.send_ping(b"")
            self._flush()
            # The next look: the idle limit, unless the pong comes first (counted there).
            self._arm(min(s.ping_interval, self._last + s.idle_timeout - now))
            return
        self._arm(self._next_check())
