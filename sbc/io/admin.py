"""The admin HTTP endpoint on ``[admin] listen``: a small asyncio server.

    GET /metrics   Prometheus text format (OpenMetrics when the scraper asks for it)
    GET /healthz   200 while the process and its event loop run
    GET /readyz    200 when the listeners are bound and a backend is up (or none is
                   configured); 503 otherwise; the reason in the body either way
    GET /status    JSON: registrations, calls, backends, bans, media (``sbc status``)
    GET /audit     JSON: the security matrix of the running config (``sbc audit``,
                   sbc/audit.py); live checks are the command's (they send probes)

GET (and HEAD) only: another method is answered 405, another path 404, a request that is not
HTTP/1.x or whose head is over ``MAX_REQUEST`` bytes 400 / 431. One request per connection
(``Connection: close``); a client gets ``REQUEST_TIMEOUT`` seconds to send its request, and
at most ``MAX_CONNECTIONS`` are served at once. Everything runs on the core's event loop:
prometheus-client's own server would read the core from another thread, and the core is
single-threaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Callable, Sequence
from http import HTTPStatus

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.process_collector import ProcessCollector

from sbc.core import SbcCore
from sbc.io.sip_transport import StartupError
from sbc.media.control import Totals
from sbc.metrics import SbcCollector, readiness, status_report

__all__ = ["AdminHttp", "AdminServer"]

log = logging.getLogger("sbc.admin")

MAX_REQUEST = 8192  # bytes of request line and headers
REQUEST_TIMEOUT = 5.0  # seconds to send the request head
MAX_CONNECTIONS = 32
PATHS = ("/metrics", "/healthz", "/readyz", "/status", "/audit")


class _BadRequest(Exception):
    def __init__(self, status: HTTPStatus, detail: str) -> None:
        super().__init__(detail)
        self.status = status


class AdminHttp:
    """The HTTP side of an admin endpoint: one request per connection, GET/HEAD of
    ``PATHS``; what each path answers is the subclass's (``readyz``, ``status``,
    ``metrics``). ``listening`` is set by the app once every SIP listener is bound."""

    def __init__(self) -> None:
        self.listening = False
        self._server: asyncio.Server | None = None
        # /audit: the matrix of the config in use (set by the app); None: 404.
        self.audit: Callable[[], dict[str, object]] | None = None
        self._connections = 0
        self._unix: str | None = None

    async def _bind(self, host: str, port: int, unix: str | None) -> None:
        """Listen on ``host:port``, or on the Unix socket ``unix`` (a worker's, which only
        the SBC's supervisor reads); StartupError if it cannot be bound."""
        try:
            if unix is not None:
                self._server = await asyncio.start_unix_server(
                    self._serve, path=unix, limit=MAX_REQUEST
                )
                self._unix = unix
            else:
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                self._server = await asyncio.start_server(
                    self._serve, host, port, family=family, reuse_address=True, limit=MAX_REQUEST
                )
        except OSError as exc:
            # uvloop wraps the errno-carrying OSError as the cause (as in sip_transport).
            cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
            where = unix or (f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
            raise StartupError(
                f"cannot listen on admin http://{where}: {cause.strerror or cause}"
            ) from None
        log.info("admin listening on %s", unix or f"http://{self.address_text}")

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None and self._server.sockets
        sockname = self._server.sockets[0].getsockname()
        return str(sockname[0]), int(sockname[1])

    @property
    def address_text(self) -> str:
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None
        if self._unix is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._unix)
            self._unix = None

    # -- what the paths answer ---------------------------------------------------------------
    async def readyz(self) -> tuple[bool, str]:
        raise NotImplementedError

    async def status(self) -> dict[str, object]:
        raise NotImplementedError

    async def metrics(self, accept: str) -> tuple[bytes, str]:
        """The exposition (encoded as ``accept`` asks) and its content type."""
        raise NotImplementedError

    # -- HTTP --------------------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._connections >= MAX_CONNECTIONS:
            writer.close()
            return
        self._connections += 1
        try:
            try:
                method, path, accept = await asyncio.wait_for(
                    self._request(reader), REQUEST_TIMEOUT
                )
            except _BadRequest as exc:
                self._write(writer, exc.status, f"{exc}\n".encode(), "text/plain")
                await self._discard(reader)  # unread input would reset the connection
            except TimeoutError:
                self._write(writer, HTTPStatus.REQUEST_TIMEOUT, b"", "text/plain")
            else:
                status, body, ctype, extra = await self._answer(method, path, accept)
                self._write(writer, status, body, ctype, extra, head=method == "HEAD")
            with contextlib.suppress(ConnectionError, TimeoutError):
                await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._connections -= 1
            writer.close()

    @staticmethod
    async def _discard(reader: asyncio.StreamReader) -> None:
        """Read what the client still sends (a bounded amount, briefly) before closing."""
        with contextlib.suppress(TimeoutError, ConnectionError):
            for _ in range(16):
                if not await asyncio.wait_for(reader.read(MAX_REQUEST), 0.2):
                    return

    @staticmethod
    async def _request(reader: asyncio.StreamReader) -> tuple[str, str, str]:
        """(method, path, Accept) of the request; _BadRequest if it is not one we read."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            raise _BadRequest(
                HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request head too large"
            ) from None
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                raise
            raise _BadRequest(HTTPStatus.BAD_REQUEST, "incomplete request") from None
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise _BadRequest(HTTPStatus.BAD_REQUEST, "not an HTTP/1.x request line")
        accept = ""
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if line and not sep:
                raise _BadRequest(HTTPStatus.BAD_REQUEST, "malformed header line")
            if name.strip().lower() == "accept":
                accept = value.strip()
        return parts[0], parts[1], accept

    async def _answer(
        self, method: str, target: str, accept: str
    ) -> tuple[HTTPStatus, bytes, str, dict[str, str]]:
        path = target.split("?", 1)[0]
        if path not in PATHS:
            return HTTPStatus.NOT_FOUND, b"not found\n", "text/plain", {}
        if method not in ("GET", "HEAD"):
            return (
                HTTPStatus.METHOD_NOT_ALLOWED, b"GET only\n", "text/plain",
                {"Allow": "GET, HEAD"},
            )  # fmt: skip
        if path == "/healthz":
            return HTTPStatus.OK, b"ok\n", "text/plain", {}
        if path == "/readyz":
            ready, reason = await self.readyz()
            status = HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE
            return status, f"{reason}\n".encode(), "text/plain", {}
        if path == "/status":
            body = json.dumps(await self.status(), indent=1).encode() + b"\n"
            return HTTPStatus.OK, body, "application/json", {}
        if path == "/audit":
            if self.audit is None:
                return HTTPStatus.NOT_FOUND, b"not found\n", "text/plain", {}
            body = json.dumps(self.audit(), indent=1).encode() + b"\n"
            return HTTPStatus.OK, body, "application/json", {}
        body, content_type = await self.metrics(accept)
        return HTTPStatus.OK, body, content_type, {}

    @staticmethod
    def _write(
        writer: asyncio.StreamWriter,
        status: HTTPStatus,
        body: bytes,
        content_type: str,
        extra: dict[str, str] | None = None,
        *,
        head: bool = False,
    ) -> None:
        lines = [
            f"HTTP/1.1 {status.value} {status.phrase}",
            f"Content-Type: {content_type}"
            + ("; charset=utf-8" if content_type == "text/plain" else ""),
            f"Content-Length: {len(body)}",
            "Connection: close",
            "Cache-Control: no-store",
            *(f"{k}: {v}" for k, v in (extra or {}).items()),
        ]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        if not head:
            writer.write(body)


class AdminServer(AdminHttp):
    """The admin endpoint of one SBC core."""

    def __init__(
        self,
        core: SbcCore,
        *,
        name: str = "sbc",
        media: Callable[[], Sequence[Totals | None]] = tuple,
        clock: Callable[[], float] | None = None,
        reload: Callable[[], dict[str, object]] | None = None,
    ) -> None:
        super().__init__()
        self.core = core
        self.name = name
        self.media = media
        self.reload = reload  # the last reload's outcome, for /status
        self._clock = clock
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(
            SbcCollector(
                core, clock=self.now, media=media, name=name, listening=lambda: self.listening
            )
        )
        ProcessCollector(registry=self.registry)  # process_cpu_seconds_total, memory, fds

    def now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    @classmethod
    async def start(
        cls,
        host: str,
        port: int,
        core: SbcCore,
        *,
        name: str = "sbc",
        media: Callable[[], Sequence[Totals | None]] = tuple,
        clock: Callable[[], float] | None = None,
        reload: Callable[[], dict[str, object]] | None = None,
        unix: str | None = None,
    ) -> AdminServer:
        """Bind ``host:port`` (or the Unix socket ``unix``) and serve; StartupError if it
        cannot be bound. ``clock``: the core's (default: the event loop's time, as the SIP
        transports use)."""
        self = cls(core, name=name, media=media, clock=clock, reload=reload)
        await self._bind(host, port, unix)
        return self

    async def readyz(self) -> tuple[bool, str]:
        return readiness(self.core, self.listening)

    async def status(self) -> dict[str, object]:
        return status_report(
            self.core, now=self.now(), name=self.name, listening=self.listening,
            media=self.media(), reload=self.reload() if self.reload else None, pid=os.getpid(),
        )  # fmt: skip

    async def metrics(self, accept: str) -> tuple[bytes, str]:
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type
