"""SIP over WebSocket (RFC 7118) on the access side: the static files and handshake rules
(sans-I/O), and the asyncio edge in-process on loopback sockets: the Upgrade with the
"sip" subprotocol, Origin checks, malformed HTTP, one SIP message per WebSocket message
to the core as a ws/wss flow and back as a text frame, 1009 for an oversized message,
ping and idle timeout, the guard's limits (every read counts, pings and HTTP requests too),
a client that does not read, HTTP keep-alive for the page's files, and a call from a UDP
phone to a browser registered over ws and over wss."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from test_admin import scrape, value
from websockets.asyncio.client import ClientConnection, connect
from websockets.client import ClientProtocol
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, InvalidMessage, InvalidStatus
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.uri import parse_uri

from sbc.certs import generate_dev_certs
from sbc.config import ListenUrl
from sbc.core import CoreSettings, SbcCore
from sbc.features.guard import Bucket, GuardPolicy
from sbc.io import websocket
from sbc.io.sip_transport import SipTransports, tls_context
from sbc.io.websocket import (
    CONTENT_TYPES,
    STATIC_ROOT,
    WRITE_BUFFER_LIMIT,
    WebSocketConnection,
    WebSocketSettings,
    handshake_refusal,
    static_response,
    wants_websocket,
)
from sbc.metrics import SbcCollector
from sbc.sip.flow import Flow

# -- static files (sans-I/O) -----------------------------------------------------------------


@pytest.fixture
def site(tmp_path: Path) -> Path:
    root = tmp_path / "static"
    (root / "vendor").mkdir(parents=True)
    (root / "index.html").write_text("<!doctype html><title>phone</title>")
    (root / "phone.js").write_text("export const x = 1;\n")
    (root / "vendor" / "sip.mjs").write_text("export {};\n")
    (tmp_path / "secret.txt").write_text("no")
    (root / "out").symlink_to(tmp_path / "secret.txt")
    (root / "inside").symlink_to(root / "phone.js")
    return root


def headers_of(fields: list[tuple[str, str]]) -> dict[str, str]:
    return {k.lower(): v for k, v in fields}


def test_root_is_index_html_with_cache_and_csp_headers(site: Path) -> None:
    status, fields, body = static_response("GET", "/", site, host="127.0.0.1:8080")
    h = headers_of(fields)
    assert (status, body) == (200, b"<!doctype html><title>phone</title>")
    assert h["content-type"] == "text/html; charset=utf-8"
    assert h["content-length"] == str(len(body))
    assert h["cache-control"] == "no-cache"
    csp = h["content-security-policy"]
    assert "default-src 'self'" in csp
    assert "connect-src 'self' ws://127.0.0.1:8080;" in csp
    assert "media-src 'self' blob:" in csp
    # Over wss the page's WebSocket is wss; a Host that could inject is not written.
    _, fields, _ = static_response("GET", "/", site, host="a.example:443", secure=True)
    assert (
        "connect-src 'self' wss://a.example:443;" in headers_of(fields)["content-security-policy"]
    )
    _, fields, _ = static_response("GET", "/", site, host="x; script-src *")
    assert "connect-src 'self';" in headers_of(fields)["content-security-policy"]


def test_javascript_and_modules_by_extension_and_head_without_body(site: Path) -> None:
    status, fields, body = static_response("GET", "/phone.js?v=2", site)
    assert status == 200 and body == b"export const x = 1;\n"
    assert headers_of(fields)["content-type"] == "text/javascript; charset=utf-8"
    status, fields, body = static_response("HEAD", "/vendor/sip.mjs", site)
    assert (status, body) == (200, b"")
    assert headers_of(fields)["content-length"] == "11"
    assert headers_of(fields)["content-type"].startswith("text/javascript")
    assert CONTENT_TYPES[".svg"] == "image/svg+xml"
    # A symbolic link inside the directory is served.
    assert static_response("GET", "/inside", site)[0] == 200


@pytest.mark.parametrize(
    "target",
    [
        "/../secret.txt", "/%2e%2e/secret.txt", "/vendor/../../secret.txt", "/vendor/%2E%2E/%2e%2e/secret.txt",
        "//etc/passwd", "/%2fetc/passwd", "/out", "/vendor", "/nothing.html", "/a\\..\\b",
        "http://evil/", "*", "/index.html%00.js", "/vendor//sip.mjs", "/%ff", "/%c3%28.js",
    ],
)  # fmt: skip
def test_paths_out_of_the_directory_or_not_files_are_404(site: Path, target: str) -> None:
    status, fields, _ = static_response("GET", target, site)
    assert status == 404
    assert headers_of(fields)["content-type"] == "text/plain; charset=utf-8"


def test_other_methods_are_405_with_allow(site: Path) -> None:
    status, fields, _ = static_response("POST", "/", site)
    assert status == 405
    assert headers_of(fields)["allow"] == "GET, HEAD"


def test_connection_header_says_whether_the_connection_stays() -> None:
    for target in ("/", "/nothing"):
        _, fields, _ = static_response("GET", target, STATIC_ROOT)
        assert headers_of(fields)["connection"] == "close"
        _, fields, _ = static_response("GET", target, STATIC_ROOT, keep_alive=True)
        assert headers_of(fields)["connection"] == "keep-alive"


def test_the_packaged_softphone_directory_exists() -> None:
    assert (STATIC_ROOT / "index.html").is_file()


def test_origin_rules_and_what_counts_as_an_upgrade() -> None:
    def request(**fields: str) -> Request:
        return Request("/", Headers([(k.replace("_", "-"), v) for k, v in fields.items()]))

    allowed = ("https://phone.example.com",)
    assert handshake_refusal(request(Origin="https://Phone.example.com"), allowed) is None
    assert handshake_refusal(request(Origin="https://evil.example"), allowed) == 403
    assert handshake_refusal(request(), allowed) == 403  # no Origin: no page of ours
    assert handshake_refusal(request(Origin="https://evil.example"), ()) is None  # any
    assert handshake_refusal(request(), ()) is None  # nor is its absence checked
    assert wants_websocket(request(Upgrade="WebSocket"))
    assert wants_websocket(request(Upgrade="h2c, websocket"))
    assert not wants_websocket(request())


# -- the asyncio edge, in-process --------------------------------------------------------------

ROOT_HOSTS = frozenset({"127.0.0.1", "localhost"})


def make_core(**policy: object) -> SbcCore:
    security = GuardPolicy(**policy) if policy else GuardPolicy()
    return SbcCore(CoreSettings(local_hosts=ROOT_HOSTS, security=security))


@contextlib.asynccontextmanager
async def running(
    core: SbcCore,
    settings: WebSocketSettings,
    *,
    transport: str = "ws",
    tls: ssl.SSLContext | None = None,
) -> AsyncIterator[tuple[SipTransports, int, int]]:
    """The SBC's transports with a WebSocket listener and a UDP one on loopback."""
    transports = SipTransports(core)
    try:
        _, port = await transports.listen(
            ListenUrl(transport=transport, host="127.0.0.1", port=0),
            tls,
            websocket=settings,
        )
        udp = ListenUrl(transport="udp", host="127.0.0.1", port=0)
        _, udp_port = await transports.listen(udp)
        yield transports, port, udp_port
    finally:
        await transports.close()


async def eventually(what: str, check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.01)


def ws_settings(root: Path | None = None, **kw: object) -> WebSocketSettings:
    return WebSocketSettings(static_root=root, **kw)


async def http(port: int, raw: bytes) -> bytes:
    """Send ``raw``, then the end of the stream, and read until the SBC closes the
    connection (an answer that keeps it open is followed by the close the end asks for)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    writer.write_eof()
    try:
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


def register(user: str = "bob", *, transport: str = "WS", cseq: int = 1) -> str:
    """A REGISTER as sip.js sends it (PEERS.md: Via host and Contact host ``.invalid``)."""
    return (
        "REGISTER sip:127.0.0.1 SIP/2.0\r\n"
        f"Via: SIP/2.0/{transport} abcd.invalid;branch=z9hG4bK{user}{cseq}\r\n"
        "Max-Forwards: 70\r\n"
        f"To: <sip:{user}@127.0.0.1>\r\n"
        f"From: <sip:{user}@127.0.0.1>;tag=ws{user}\r\n"
        f"Call-ID: reg-{user}@abcd.invalid\r\n"
        f"CSeq: {cseq} REGISTER\r\n"
        f"Contact: <sip:xyz{user}@abcd.invalid;transport=ws>;+sip.ice;reg-id=1;"
        f'+sip.instance="<urn:uuid:00000000-0000-4000-8000-00000000000{len(user)}>";expires=300\r\n'
        "Expires: 300\r\n"
        "Allow: ACK,CANCEL,INVITE,MESSAGE,BYE,OPTIONS,INFO,NOTIFY,REFER\r\n"
        "Supported: path, gruu, outbound\r\n"
        "User-Agent: SIP.js/0.21.2\r\n"
        "Content-Length: 0\r\n\r\n"
    )


async def recv_text(ws: ClientConnection, timeout: float = 5.0) -> str:
    message = await asyncio.wait_for(ws.recv(), timeout)
    assert isinstance(message, str), "SIP goes out as text frames (RFC 7118 4.2)"
    return message


async def test_upgrade_with_sip_subprotocol_gets_101_and_the_protocol_header() -> None:
    async with (
        running(make_core(), ws_settings()) as (_, port, _),
        connect(f"ws://127.0.0.1:{port}/any/path", subprotocols=["sip"]) as ws,
    ):
        assert ws.subprotocol == "sip"
        assert ws.response is not None
        assert ws.response.status_code == 101
        assert ws.response.headers["Sec-WebSocket-Protocol"] == "sip"


async def test_upgrade_without_sip_is_400_and_a_foreign_origin_403() -> None:
    settings = ws_settings(allowed_origins=("https://phone.example.com",))
    async with running(make_core(), settings) as (transports, port, _):
        with pytest.raises(InvalidStatus) as refused:
            async with connect(f"ws://127.0.0.1:{port}/", origin="https://phone.example.com"):
                pass
        assert refused.value.response.status_code == 400
        with pytest.raises(InvalidStatus) as refused:
            async with connect(
                f"ws://127.0.0.1:{port}/",
                subprotocols=["sip"],
                origin="https://evil.example",
            ):
                pass
        assert refused.value.response.status_code == 403
        async with connect(
            f"ws://127.0.0.1:{port}/",
            subprotocols=["sip"],
            origin="https://phone.example.com",
        ) as ws:
            assert ws.subprotocol == "sip"
        await eventually("every connection released", lambda: not transports._conns)


async def test_malformed_http_gets_400_and_never_an_exception(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with running(make_core(), ws_settings()) as (transports, port, _):
        for junk in (
            b"NOT HTTP AT ALL\r\n\r\n",
            b"GET / HTTP/9.9\r\n\r\n",
            b"\x16\x03\x01\x00\x05hello\r\n\r\n",
        ):
            answer = await http(port, junk)
            assert answer.startswith(b"HTTP/1.1 400 "), answer
        await eventually("every connection released", lambda: not transports._conns)
    assert "Traceback" not in caplog.text


async def test_plain_get_serves_the_softphone_and_traversal_is_404(site: Path) -> None:
    async with running(make_core(), ws_settings(site)) as (_, port, _):
        answer = await http(port, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"\r\nContent-Type: text/html; charset=utf-8\r\n" in head
        assert b"\r\nCache-Control: no-cache\r\n" in head
        assert (
            b"\r\nContent-Security-Policy: default-src 'self'; connect-src 'self' ws://127.0.0.1;"
            in head
        )
        assert body == (site / "index.html").read_bytes()
        answer = await http(port, b"HEAD /phone.js HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\n")
        assert b"Content-Type: text/javascript" in answer
        for target in (b"/../secret.txt", b"/%2e%2e/secret.txt", b"/out"):
            answer = await http(port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 404 "), target
        answer = await http(port, b"DELETE / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 405 ") and b"Allow: GET, HEAD" in answer


async def test_an_undecodable_path_is_404_without_a_traceback(
    site: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with running(make_core(), ws_settings(site)) as (_, port, _):
        answer = await http(port, b"GET /%ff HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 404 "), answer[:40]
    assert "Traceback" not in caplog.text and "UnicodeDecodeError" not in caplog.text


async def test_each_message_reaches_the_core_as_a_ws_flow_and_the_answer_is_a_text_frame() -> None:
    core = make_core()
    async with running(core, ws_settings()) as (transports, port, _):
        async with connect(f"ws://127.0.0.1:{port}/", subprotocols=["sip"]) as ws:
            await ws.send(register())
            answer = await recv_text(ws)
            assert answer.startswith("SIP/2.0 200 OK\r\n")
            # RFC 3261 18.2.1: the source in received; the Via keeps its WS transport.
            assert "Via: SIP/2.0/WS abcd.invalid;branch=z9hG4bKbob1;received=127.0.0.1" in answer
            assert "sip:xyzbob@abcd.invalid;transport=ws" in answer
            bindings = core.registration.location.lookup("sip:bob@127.0.0.1", 0.0)
            assert len(bindings) == 1
            flow = bindings[0].flow
            assert flow.transport == "ws" and flow.reliable and not flow.secure
            assert flow.conn_id in transports._conns
            # A message in two fragments is still one message (RFC 6455 5.4).
            await ws.send(iter([register(cseq=2)[:40], register(cseq=2)[40:]]))
            assert (await recv_text(ws)).startswith("SIP/2.0 200 OK\r\n")
            # A CRLFCRLF keep-alive message gets its CRLF answer (RFC 5626 4.4.1).
            await ws.send("\r\n\r\n")
            assert await recv_text(ws) == "\r\n"
            # /metrics counts it among the open connections, by transport.
            assert (
                value(
                    scrape(SbcCollector(core, clock=time.monotonic)),
                    "sbc_connections_open",
                    transport="ws",
                )
                == 1
            )
        # Closed: the core is told, as for a TCP connection (connection_lost).
        await eventually("the connection gone", lambda: flow.conn_id not in transports._conns)
        assert not core._alive(flow)
        assert core.open_connections() == {}


async def test_a_message_is_whole_without_content_length_and_a_bad_one_keeps_the_link() -> None:
    """RFC 7118 5: one SIP message per WebSocket message, so Content-Length may be absent;
    a malformed message is answered 400 (RFC 3261 21.4.1) and the connection stays up."""
    core = make_core()
    async with (
        running(core, ws_settings()) as (_transports, port, _),
        connect(f"ws://127.0.0.1:{port}/", subprotocols=["sip"]) as ws,
    ):
        await ws.send(register().replace("Content-Length: 0\r\n", ""))
        assert (await recv_text(ws)).startswith("SIP/2.0 200 OK\r\n")
        await ws.send(register(cseq=2).replace("CSeq: 2 REGISTER", "CSeq: two REGISTER"))
        assert (await recv_text(ws)).startswith("SIP/2.0 400 ")
        await ws.send(register(cseq=3))
        assert (await recv_text(ws)).startswith("SIP/2.0 200 OK\r\n")


async def test_an_oversized_message_closes_with_1009() -> None:
    async with running(make_core(), ws_settings(max_message_size=2048)) as (transports, port, _):
        async with connect(f"ws://127.0.0.1:{port}/", subprotocols=["sip"], max_size=None) as ws:
            await ws.send("x" * 4096)
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 5)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
        await eventually("the connection gone", lambda: not transports._conns)


async def test_a_silent_client_is_pinged_then_closed_when_idle() -> None:
    """A raw client that never answers: it sees a ping, then a Close (1001) at the idle
    limit, and the connection ends."""
    settings = ws_settings(ping_interval=0.1, idle_timeout=0.4)
    async with running(make_core(), settings) as (transports, port, _):
        client = ClientProtocol(parse_uri(f"ws://127.0.0.1:{port}/"), subprotocols=["sip"])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client.send_request(client.connect())
        for chunk in client.data_to_send():
            writer.write(chunk)
        frames: list[Frame] = []
        start = time.monotonic()
        while True:
            data = await asyncio.wait_for(reader.read(4096), 5)
            if not data:
                break
            client.receive_data(data)
            frames += [e for e in client.events_received() if isinstance(e, Frame)]
            client.data_to_send()  # never answered: no pong, no close
        elapsed = time.monotonic() - start
        opcodes = [f.opcode for f in frames]
        assert Opcode.PING in opcodes
        assert opcodes[-1] is Opcode.CLOSE
        assert int.from_bytes(frames[-1].data[:2], "big") == 1001
        assert 0.35 < elapsed < 3.5
        writer.close()
        await eventually("the connection gone", lambda: not transports._conns)


async def test_pongs_keep_a_live_client_open() -> None:
    settings = ws_settings(ping_interval=0.1, idle_timeout=0.3)
    async with (
        running(make_core(), settings) as (_, port, _),
        connect(f"ws://127.0.0.1:{port}/", subprotocols=["sip"], ping_interval=None) as ws,
    ):
        await asyncio.sleep(0.8)  # the client's library answers the pings
        await ws.send(register())
        assert (await recv_text(ws)).startswith("SIP/2.0 200 OK")


async def test_the_guard_limits_websocket_connections_per_source() -> None:
    core = make_core(max_connections_per_source=1)
    async with running(core, ws_settings()) as (_, port, _):
        async with connect(f"ws://127.0.0.1:{port}/", subprotocols=["sip"]) as first:
            # Closed before any byte is read: no HTTP answer at all.
            with pytest.raises(InvalidMessage):
                async with connect(f"ws://127.0.0.1:{port}/", subprotocols=["sip"], open_timeout=2):
                    pass
            await first.send(register())
            assert (await recv_text(first)).startswith("SIP/2.0 200 OK")
        assert core.guard.stats["rejected:connections"] == 1


async def read_answer(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One HTTP answer: its head and its body (by Content-Length)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = re.search(rb"\r\nContent-Length: ([0-9]+)\r\n", head, re.I)
    assert length is not None, head
    return head, await asyncio.wait_for(reader.readexactly(int(length.group(1))), 5)


async def closed_by_the_sbc(reader: asyncio.StreamReader) -> bool:
    """True once the SBC closed the connection (end of stream, or reset)."""
    try:
        return await asyncio.wait_for(reader.read(), 5) == b""
    except ConnectionError:
        return True


async def upgrade(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int
) -> ClientProtocol:
    """A WebSocket Upgrade ("sip") on an open connection, until its 101."""
    client = ClientProtocol(parse_uri(f"ws://127.0.0.1:{port}/"), subprotocols=["sip"])
    client.send_request(client.connect())
    writer.write(b"".join(client.data_to_send()))
    client.receive_data(await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5))
    (response,) = client.events_received()
    assert response.status_code == 101, response  # type: ignore[union-attr]
    return client


async def test_a_flood_of_pings_gets_the_source_banned_and_its_connection_closed() -> None:
    """Every read of a WebSocket connection is a packet for the guard's flood count (as a
    TCP read is), control frames too: more than pike_density pings in the window ban the
    source, which loses its connection and cannot open another."""
    core = make_core(pike_density=20, pike_window=30.0)
    async with running(core, ws_settings()) as (transports, port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = await upgrade(reader, writer, port)
        with contextlib.suppress(ConnectionError):
            for _ in range(60):
                client.send_ping(b"flood")
                writer.write(b"".join(client.data_to_send()))
                await writer.drain()
                await asyncio.sleep(0.005)  # one read each
        await eventually("the source banned", lambda: core.guard.stats["ban:flood"] == 1)
        assert core.guard.banned("127.0.0.1", asyncio.get_running_loop().time())
        assert await closed_by_the_sbc(reader)
        await eventually("the connection gone", lambda: not transports._conns)
        writer.close()
        with pytest.raises(InvalidMessage):  # banned: closed before a byte is read
            async with connect(f"ws://127.0.0.1:{port}/", subprotocols=["sip"], open_timeout=2):
                pass


async def test_http_requests_count_for_the_guard_too(site: Path) -> None:
    core = make_core(pike_density=20, pike_window=30.0)
    async with running(core, ws_settings(site)) as (transports, port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        answers = 0
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            for _ in range(60):
                writer.write(b"GET /phone.js HTTP/1.1\r\nHost: x\r\n\r\n")
                await read_answer(reader)
                answers += 1
        assert answers == 19  # the admission of the connection was the first packet
        assert core.guard.stats["ban:flood"] == 1
        await eventually("the connection gone", lambda: not transports._conns)
        writer.close()


async def raw_client_that_does_not_read(
    port: int,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP connection with a small receive buffer (the kernel holds little for it)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return await asyncio.open_connection(sock=sock)


async def test_a_client_that_sends_pings_and_never_reads_is_not_read_either() -> None:
    """Each ping is answered by a pong: a client that never reads them fills the SBC's
    write buffer. Above the transport's high-water mark the SBC stops reading from it
    (pause_writing), so the buffer stays below WRITE_BUFFER_LIMIT and the client's own
    sending stalls."""
    async with running(make_core(), ws_settings()) as (transports, port, _):
        reader, writer = await raw_client_that_does_not_read(port)
        client = await upgrade(reader, writer, port)
        (conn,) = transports._conns.values()
        assert isinstance(conn, WebSocketConnection) and conn.transport is not None
        for _ in range(128):
            client.send_ping(b"p" * 125)  # the largest control frame (RFC 6455 5.5)
        batch = b"".join(client.data_to_send())
        sent, peak, limit = 0, 0, 16 * 1024 * 1024
        while sent < limit:
            writer.write(batch)
            try:
                await asyncio.wait_for(writer.drain(), 0.5)
            except (TimeoutError, ConnectionError):
                break  # the SBC reads no more
            sent += len(batch)
            peak = max(peak, conn.transport.get_write_buffer_size())
        await asyncio.sleep(0.2)
        peak = max(peak, conn.transport.get_write_buffer_size())
        assert peak <= WRITE_BUFFER_LIMIT, peak
        assert sent < limit, "the SBC read everything"
        writer.close()


async def test_a_client_that_leaves_too_much_unread_is_dropped() -> None:
    """SIP sent to a client that does not read: past WRITE_BUFFER_LIMIT bytes waiting for
    it, the connection is dropped (as lost: its calls end)."""
    async with running(make_core(), ws_settings()) as (transports, port, _):
        reader, writer = await raw_client_that_does_not_read(port)
        await upgrade(reader, writer, port)
        (conn,) = transports._conns.values()
        assert isinstance(conn, WebSocketConnection) and conn.transport is not None
        message = b"x" * 60000
        peak, sent = 0, 0
        while sent < 400 and conn.send(message):
            sent += 1
            peak = max(peak, conn.transport.get_write_buffer_size())
        assert peak <= WRITE_BUFFER_LIMIT, peak
        assert sent < 400 and not conn.send(message)
        await eventually("the connection gone", lambda: not transports._conns)
        writer.close()


async def test_the_page_s_files_come_over_one_kept_alive_tls_connection(
    certs: dict[str, Path],
) -> None:
    """HTTP/1.1 keep-alive (RFC 9112 9.3): the softphone's ~130 module files over one wss
    connection, so that the per-source TLS handshake limit of the default [security]
    (10/s, burst 20) does not refuse them; then an Upgrade on the same connection."""
    tls = tls_context(
        str(certs["server_cert"]), str(certs["server_key"]), None,
        verify=False, min_version="1.2", ciphers=None,
    )  # fmt: skip
    client_tls = ssl.create_default_context(cafile=str(certs["ca_cert"]))
    core = make_core(
        tls_handshakes=Bucket(rate=10.0, burst=20), pike_density=200, max_connections_per_source=64
    )
    files = sorted(
        "/" + str(f.relative_to(STATIC_ROOT)) for f in STATIC_ROOT.rglob("*.js") if f.is_file()
    )
    assert len(files) >= 100
    async with running(core, ws_settings(STATIC_ROOT), transport="wss", tls=tls) as (
        transports,
        port,
        _,
    ):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_tls, server_hostname="localhost"
        )
        for i in range(150):
            target = files[i % len(files)]
            writer.write(f"GET {target} HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n".encode())
            head, body = await read_answer(reader)
            assert head.startswith(b"HTTP/1.1 200 OK\r\n"), (i, target, head)
            assert b"\r\nConnection: keep-alive\r\n" in head
            assert body == (STATIC_ROOT / target[1:]).read_bytes()
        assert len(transports._conns) == 1
        client = await upgrade(reader, writer, port)
        client.send_text(register(transport="WSS").encode())
        writer.write(b"".join(client.data_to_send()))
        while not (frames := [e for e in client.events_received() if isinstance(e, Frame)]):
            client.receive_data(await asyncio.wait_for(reader.read(65536), 5))
        assert frames[0].data.startswith(b"SIP/2.0 200 OK\r\n")
        assert core.guard.stats["rejected:tls_handshakes"] == 0
        writer.close()


async def test_an_idle_kept_alive_connection_is_closed(
    site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(websocket, "UPGRADE_TIMEOUT", 0.3)
    async with running(make_core(), ws_settings(site)) as (transports, port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _ = await read_answer(reader)
        assert head.startswith(b"HTTP/1.1 200 ")
        start = time.monotonic()
        assert await closed_by_the_sbc(reader)
        assert 0.2 < time.monotonic() - start < 3
        await eventually("the connection gone", lambda: not transports._conns)
        writer.close()


@pytest.mark.parametrize("case", ["limit", "close", "pipeline", "post"])
async def test_when_the_connection_is_not_kept(
    site: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    """The last request a connection may carry (MAX_REQUESTS), a client's Connection: close
    (RFC 9112 9.6), requests pipelined in one read (not read: browsers never send them) and
    methods other than GET and HEAD: answered with Connection: close, then closed."""
    monkeypatch.setattr(websocket, "MAX_REQUESTS", 3)
    get = b"GET /phone.js HTTP/1.1\r\nHost: x\r\n\r\n"
    async with running(make_core(), ws_settings(site)) as (transports, port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        before = {"limit": 2, "close": 1, "pipeline": 1, "post": 1}[case]
        for _ in range(before):
            writer.write(get)
            head, _ = await read_answer(reader)
            assert b"\r\nConnection: keep-alive\r\n" in head
        last = {
            "limit": get,
            "close": get.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"),
            "pipeline": get + get,
            "post": get.replace(b"GET", b"POST"),
        }[case]
        writer.write(last)
        head, _ = await read_answer(reader)
        assert head.startswith(b"HTTP/1.1 405 " if case == "post" else b"HTTP/1.1 200 ")
        assert b"\r\nConnection: close\r\n" in head
        assert await closed_by_the_sbc(reader)
        await eventually("the connection gone", lambda: not transports._conns)
        writer.close()


async def test_a_connection_without_origin_is_refused_only_when_origins_are_listed() -> None:
    """A non-browser client sends no Origin: any is accepted while allowed_origins is empty
    (the default), none then; it could send any Origin it likes, so the check stops pages
    of other sites in browsers, not such clients (the guard does)."""
    async with (
        running(make_core(), ws_settings()) as (_, port, _),
        connect(f"ws://127.0.0.1:{port}/", subprotocols=["sip"]) as ws,
    ):
        assert ws.request is not None and "Origin" not in ws.request.headers
    settings = ws_settings(allowed_origins=("https://phone.example.com",))
    async with running(make_core(), settings) as (_, port, _):
        with pytest.raises(InvalidStatus) as refused:
            async with connect(f"ws://127.0.0.1:{port}/", subprotocols=["sip"]):
                pass
        assert refused.value.response.status_code == 403


@pytest.mark.parametrize(
    ("host", "origins", "warned"),
    [("0.0.0.0", (), True), ("127.0.0.1", (), False), ("0.0.0.0", ("https://a.example",), False)],
)
async def test_a_listener_beyond_loopback_open_to_any_origin_is_warned_about(
    caplog: pytest.LogCaptureFixture, host: str, origins: tuple[str, ...], warned: bool
) -> None:
    caplog.set_level(logging.WARNING, logger="sbc.io")
    transports = SipTransports(make_core())
    try:
        await transports.listen(
            ListenUrl(transport="ws", host=host, port=0),
            websocket=ws_settings(allowed_origins=origins),
        )
    finally:
        await transports.close()
    lines = [r.getMessage() for r in caplog.records if "any web page" in r.getMessage()]
    assert len(lines) == (1 if warned else 0)
    if warned:
        assert lines[0].startswith("any web page can open SIP WebSockets to ws://0.0.0.0:")
        assert lines[0].endswith("; set [access.websocket] allowed_origins")


# -- a call from a UDP phone to a browser over ws and wss --------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return generate_dev_certs(tmp_path_factory.mktemp("certs"), hostnames=[], ips=[])


class UdpPhone(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: object) -> None:
        self.received.put_nowait(data)


def udp_invite(port: int, sbc_port: int) -> bytes:
    sdp = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n"
    return (
        "INVITE sip:bob@127.0.0.1 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bKcall1;rport\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:alice@127.0.0.1>;tag=alice1\r\nTo: <sip:bob@127.0.0.1>\r\n"
        "Call-ID: call1@127.0.0.1\r\nCSeq: 1 INVITE\r\n"
        f"Contact: <sip:alice@127.0.0.1:{port}>\r\nContent-Type: application/sdp\r\n"
        f"Content-Length: {len(sdp)}\r\n\r\n{sdp}"
    ).encode()


@pytest.mark.parametrize("scheme", ["ws", "wss"])
async def test_a_udp_phone_calls_a_browser_registered_over_websocket(
    scheme: str, certs: dict[str, Path]
) -> None:
    tls = None
    client_tls = None
    if scheme == "wss":
        tls = tls_context(
            str(certs["server_cert"]), str(certs["server_key"]), None,
            verify=False, min_version="1.2", ciphers=None,
        )  # fmt: skip
        client_tls = ssl.create_default_context(cafile=str(certs["ca_cert"]))
    core = make_core()
    async with running(core, ws_settings(), transport=scheme, tls=tls) as (
        transports,
        port,
        udp_port,
    ):
        url = f"{scheme}://localhost:{port}/"
        async with connect(url, subprotocols=["sip"], ssl=client_tls) as ws:
            await ws.send(register(transport=scheme.upper()))
            assert (await recv_text(ws)).startswith("SIP/2.0 200 OK")
            (flow,) = {b.flow for b in core.registration.location.lookup("sip:bob@127.0.0.1", 0.0)}
            assert flow.transport == scheme and flow.secure is (scheme == "wss")
            loop = asyncio.get_running_loop()
            phone_transport, phone = await loop.create_datagram_endpoint(
                UdpPhone, local_addr=("127.0.0.1", 0)
            )
            try:
                phone_port = phone_transport.get_extra_info("sockname")[1]
                phone_transport.sendto(udp_invite(phone_port, udp_port), ("127.0.0.1", udp_port))
                invite = await recv_text(ws)
                # To the browser's Contact, over its own WebSocket (RFC 7118 5.2.2 transport=ws
                # whether WS or WSS); the SBC's Via names the transport (WS or WSS).
                assert invite.startswith("INVITE sip:xyzbob@abcd.invalid;transport=ws SIP/2.0\r\n")
                via = re.search(r"^Via: (.*)$", invite, re.M)
                assert via is not None
                assert via.group(1).startswith(f"SIP/2.0/{scheme.upper()} 127.0.0.1:{port};branch=")
                assert ";transport=ws>" in re.search(r"^Contact: (.*)$", invite, re.M).group(1)  # type: ignore[union-attr]
                assert "alice1" not in invite and "call1@127.0.0.1" not in invite  # two legs
                trying = await asyncio.wait_for(phone.received.get(), 5)
                assert trying.startswith(b"SIP/2.0 100 ")
            finally:
                phone_transport.close()
        await eventually("the connection gone", lambda: flow.conn_id not in transports._conns)
        # The browser is gone: a new call to it fails at once. The SBC is the registrar
        # here, so 480 (430 Flow Failed is a proxy's, RFC 5626 11.6).
        phone_transport, phone = await loop.create_datagram_endpoint(
            UdpPhone, local_addr=("127.0.0.1", 0)
        )
        try:
            phone_port = phone_transport.get_extra_info("sockname")[1]
            again = udp_invite(phone_port, udp_port).replace(b"call1@", b"call2@")
            phone_transport.sendto(
                again.replace(b"z9hG4bKcall1", b"z9hG4bKcall2"), ("127.0.0.1", udp_port)
            )
            answers = [await asyncio.wait_for(phone.received.get(), 5) for _ in range(1)]
            while answers[-1].startswith(b"SIP/2.0 100 "):
                answers.append(await asyncio.wait_for(phone.received.get(), 5))
            assert answers[-1].startswith(b"SIP/2.0 480 "), answers[-1][:40]
        finally:
            phone_transport.close()


def test_flows_say_which_transports_are_secure() -> None:
    ws = Flow("ws", ("127.0.0.1", 80), ("192.0.2.1", 5000), 7)
    wss = Flow("wss", ("127.0.0.1", 443), ("192.0.2.1", 5000), 8)
    assert ws.reliable and wss.reliable
    assert not ws.secure and wss.secure and Flow("tls", ws.local, ws.remote, 1).secure
    assert ws.uri_transport == "ws" and wss.uri_transport == "ws"
