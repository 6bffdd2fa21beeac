"""The TLS side of the front door: peer certificate names (sans-I/O), SIPS on every hop
(RFC 5630), the core's per-source connection count, and the asyncio edge in-process: per-
source connection and handshake limits acting before the handshake, mutual TLS with peer
SBCs, certificate reload, and the event loop's lateness reported as overload."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import shutil
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path

import pytest
from cryptography import x509
from test_b2bua import ALICE, CORE_TLS, Lab, invite, only

from sbc.calls import PeerRoute
from sbc.certs import generate_dev_certs
from sbc.config import ListenUrl
from sbc.core import CoreSettings, SbcCore
from sbc.features import peer_tls
from sbc.features.guard import Bucket, GuardPolicy
from sbc.io import sip_transport
from sbc.io.sip_transport import SipTransports, TlsFiles, tls_context
from sbc.sip.flow import Flow
from sbc.sip.message import Response

# -- peer certificate names (sans-I/O) -----------------------------------------------------
PEER_CERT = {
    "subject": ((("organizationName", "x"),), (("commonName", "sbc.partner.example"),)),
    "subjectAltName": (
        ("DNS", "Edge.Partner.example"),
        ("IP Address", "2001:DB8:0:0:0:0:0:1\n"),
        ("IP Address", "192.0.2.20"),
        ("URI", "sip:partner.example;transport=tls"),
    ),
}


def test_certificate_names_cover_every_san_kind_and_the_cn_only_without_sans() -> None:
    assert peer_tls.certificate_names(PEER_CERT) == {
        "edge.partner.example", "2001:db8::1", "192.0.2.20", "partner.example",
    }  # fmt: skip
    # RFC 6125 6.4.4: the CN is a fallback for a certificate without SAN identities.
    cn_only = {"subject": PEER_CERT["subject"]}
    assert peer_tls.certificate_names(cn_only) == {"sbc.partner.example"}
    assert peer_tls.certificate_names(None) == set()
    assert peer_tls.certificate_names({}) == set()


@pytest.mark.parametrize(
    ("expected", "ok"),
    [
        ("sbc.partner.example", False),  # subject CN: not beside SANs (RFC 6125 6.4.4)
        ("EDGE.partner.example.", True),  # SAN DNS, any case, trailing dot
        ("[2001:db8::1]", True),  # SAN IP, another spelling
        ("192.0.2.20", True),
        ("partner.example", True),  # the host of a SIP URI SAN (RFC 5922 7.1)
        ("other.example", False),
        ("192.0.2.21", False),
        ("*.partner.example", False),  # no wildcards
        ("example", False),
    ],
)
def test_peer_name_matching(expected: str, ok: bool) -> None:
    assert peer_tls.matches(PEER_CERT, [expected]) is ok


def test_no_certificate_matches_nothing() -> None:
    assert not peer_tls.matches(None, ["192.0.2.20"])


# -- SIPS: TLS on every hop (RFC 5630) -----------------------------------------------------
def sips_invite(n: int, extra: str = "") -> bytes:
    return invite(n, extra=extra).replace(b"INVITE sip:bob@", b"INVITE sips:bob@")


def test_sips_request_over_udp_is_refused_with_416() -> None:
    lab = Lab()
    _, resp = only(lab.from_client(sips_invite(1)), Response)
    assert isinstance(resp, Response) and (resp.status, resp.reason) == (416, "SIPS Requires TLS")
    assert lab.core.stats["rejected:sips_without_tls"] == 1


def test_sips_top_route_over_udp_is_refused_too() -> None:
    lab = Lab()
    data = invite(2, extra="Route: <sips:203.0.113.1;lr>\n")
    _, resp = only(lab.from_client(data), Response)
    assert isinstance(resp, Response) and resp.status == 416


def test_sips_request_over_tls_to_a_udp_backend_gets_480_sips_not_allowed() -> None:
    lab = Lab()  # its backend is reached over UDP
    tls = Flow("tls", ("203.0.113.1", 5061), ("192.0.2.7", 40001), conn_id=3)
    out = lab.from_client(sips_invite(3), tls)
    finals = [m for _, m in out if isinstance(m, Response) and m.status >= 200]
    assert len(finals) == 1, out
    (resp,) = finals
    assert isinstance(resp, Response) and (resp.status, resp.reason) == (480, "SIPS Not Allowed")
    assert resp.get("warning") == '380 sbc "SIPS Not Allowed"'
    # The plain sip: call over the same hop still goes to the backend.
    assert any(not isinstance(m, Response) for _, m in lab.from_client(invite(4), tls))


def test_sips_request_over_tls_to_a_peer_over_tls_goes_on() -> None:
    peer = PeerRoute(
        name="partner", host="198.51.100.20", port=5061, domains=frozenset({"partner.example"})
    )
    lab = Lab(peers=(peer,))
    tls = Flow("tls", ("203.0.113.1", 5061), ("192.0.2.7", 40001), conn_id=3)
    call = sips_invite(5).replace(b"sips:bob@example.com SIP", b"sips:bob@partner.example SIP")
    out = lab.from_client(call, tls)
    sent = [(f, m) for f, m in out if not isinstance(m, Response)]
    assert len(sent) == 1 and sent[0][0].transport == "tls" and sent[0][0].local == CORE_TLS


def test_plain_sip_over_udp_is_untouched() -> None:
    lab = Lab()
    assert ALICE.transport == "udp"
    assert not any(
        isinstance(m, Response) and m.status >= 400 for _, m in lab.from_client(invite(6))
    )


# -- the core's connection count ------------------------------------------------------------
def guarded_core(**policy: object) -> SbcCore:
    return SbcCore(
        CoreSettings(
            local_hosts=frozenset({"127.0.0.1"}),
            security=GuardPolicy(**policy),  # type: ignore[arg-type]
            tcp_idle_timeout=30.0,
        )
    )


def test_connections_that_never_send_are_counted_and_released() -> None:
    core = guarded_core(max_connections_per_source=2)
    flows = [Flow("tcp", ("127.0.0.1", 5060), ("192.0.2.9", 40000 + n), n) for n in range(4)]
    assert core.connection_opened(flows[0], 0.0)
    assert core.connection_opened(flows[1], 0.0)
    assert not core.connection_opened(flows[2], 0.0)  # over the limit
    core.connection_closed(flows[2])  # a refused one releases nothing
    assert not core.connection_opened(flows[3], 0.0)
    # Closed without ever sending a byte, and reported twice (closed by us, then lost).
    core.connection_closed(flows[0])
    core.connection_lost(flows[0], 1.0)
    assert core.connection_opened(flows[3], 1.0)
    assert not core.connection_opened(flows[2], 1.0)


def test_a_silent_connection_meets_the_idle_timeout() -> None:
    core = guarded_core(max_connections_per_source=1)
    flow = Flow("tcp", ("127.0.0.1", 5060), ("192.0.2.9", 40000), 1)
    assert core.connection_opened(flow, 0.0)
    deadline = core.next_deadline()
    assert deadline is not None and deadline <= 30.0
    actions = core.handle_timer(30.0)
    assert [type(a).__name__ for a in actions] == ["Close"]
    assert core.connection_opened(Flow("tcp", flow.local, ("192.0.2.9", 40001), 2), 31.0)


# -- the asyncio edge, in-process ------------------------------------------------------------
LOOPS = pytest.mark.parametrize("loop", ["asyncio", "uvloop"])


def run(loop: str, coro: Coroutine[object, object, None]) -> None:
    """Every I/O test runs on both loops: the SBC runs uvloop, whose TLS differs in detail
    (it starts reading a connection right after ``connection_made``)."""
    if loop == "uvloop":
        import uvloop  # a dependency of the SBC (pyproject.toml): never skipped

        uvloop.run(coro)
    else:
        asyncio.run(coro)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return generate_dev_certs(tmp_path_factory.mktemp("certs"), hostnames=[], ips=[])


def server_ctx(certs: dict[str, Path], **kw: object) -> ssl.SSLContext:
    return tls_context(
        str(certs["server_cert"]), str(certs["server_key"]), str(certs["ca_cert"]),
        verify=False, min_version="1.2", ciphers=None, **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def client_ctx(certs: dict[str, Path], cert: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs["ca_cert"]))
    if cert is not None:
        ctx.load_cert_chain(str(certs[f"{cert}_cert"]), str(certs[f"{cert}_key"]))
    return ctx


@contextlib.asynccontextmanager
async def running(
    core: SbcCore, transport: str, tls: TlsFiles | ssl.SSLContext | None = None
) -> AsyncIterator[tuple[SipTransports, int]]:
    transports = SipTransports(core)
    try:
        _, port = await transports.listen(
            ListenUrl(transport=transport, host="127.0.0.1", port=0), tls
        )
        yield transports, port
    finally:
        await transports.close()


async def eventually(
    what: str, check: Callable[[], bool | Awaitable[bool]], timeout: float = 5.0
) -> None:
    """Until ``check()`` (a coroutine's result awaited) holds, the event loop running the
    SBC's side meanwhile; fails naming ``what`` if it does not within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        held = check()
        if inspect.isawaitable(held):
            held = await held
        if held:
            return
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.01)


def open_from(transports: SipTransports, source: str) -> int:
    """The connections from ``source`` the SBC holds."""
    return sum(
        1 for c in transports._conns.values() if c.flow is not None and c.flow.remote[0] == source
    )


async def connect_from(source: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def closed_at_once(reader: asyncio.StreamReader, wait: float = 0.5) -> bool:
    """True if the SBC closed the connection without sending anything; False if it still
    waits for us (a TLS listener waiting for the ClientHello)."""
    try:
        data = await asyncio.wait_for(reader.read(100), wait)
    except TimeoutError:
        return False
    except ConnectionError:
        return True
    return data == b""


OPTIONS = (
    b"OPTIONS sip:127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TLS 127.0.0.1:1;branch=z9hG4bK-o1\r\n"
    b"From: <sip:a@example.com>;tag=1\r\nTo: <sip:127.0.0.1>\r\nCall-ID: o1@x\r\n"
    b"CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
)


@LOOPS
def test_tcp_connections_over_the_per_source_limit_are_closed(loop: str) -> None:
    run(loop, _tcp_connections_over_the_per_source_limit_are_closed())


async def _tcp_connections_over_the_per_source_limit_are_closed() -> None:
    core = guarded_core(max_connections_per_source=3)
    async with running(core, "tcp") as (transports, port):
        conns = [await connect_from("127.0.0.2", port) for _ in range(4)]
        verdicts = [await closed_at_once(r, 0.3) for r, _ in conns]
        assert verdicts == [False, False, False, True]
        assert core.guard.stats["rejected:connections"] == 1
        # Another source is not affected; a slot freed by closing is free again.
        other = await connect_from("127.0.0.3", port)
        assert not await closed_at_once(other[0], 0.2)
        conns[0][1].close()
        await eventually(
            "the closed connection's slot given back",
            lambda: open_from(transports, "127.0.0.2") == 2,
        )
        again = await connect_from("127.0.0.2", port)
        assert not await closed_at_once(again[0], 0.2)
        for _, w in [*conns, other, again]:
            w.close()


@LOOPS
def test_tls_handshakes_over_the_bucket_are_refused_before_the_handshake(
    loop: str, certs: dict[str, Path]
) -> None:
    run(loop, _tls_handshakes_over_the_bucket_are_refused_before_the_handshake(certs))


async def _tls_handshakes_over_the_bucket_are_refused_before_the_handshake(
    certs: dict[str, Path],
) -> None:
    core = guarded_core(tls_handshakes=Bucket(rate=0.01, burst=2))
    async with running(core, "tls", server_ctx(certs)) as (_, port):
        raws = [await connect_from("127.0.0.2", port) for _ in range(4)]
        # The first two wait for a ClientHello; the others are closed before one is read.
        assert [await closed_at_once(r, 0.3) for r, _ in raws] == [False, False, True, True]
        assert core.guard.stats["rejected:tls_handshakes"] == 2
        for _, w in raws:
            w.close()
        # Out of tokens: a real handshake from that source fails, another source's works.
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_ctx(certs), server_hostname="localhost",
                local_addr=("127.0.0.2", 0),
            )  # fmt: skip
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_ctx(certs), server_hostname="localhost",
            local_addr=("127.0.0.3", 0),
        )  # fmt: skip
        writer.write(OPTIONS)
        assert (await asyncio.wait_for(reader.readline(), 2)).startswith(b"SIP/2.0 200")
        writer.close()


@LOOPS
def test_a_stalled_handshake_is_closed_after_the_timeout(
    loop: str,
    certs: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    run(loop, _a_stalled_handshake_is_closed_after_the_timeout(certs, monkeypatch, caplog))


async def _a_stalled_handshake_is_closed_after_the_timeout(
    certs: dict[str, Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(sip_transport, "HANDSHAKE_TIMEOUT", 0.3)
    core = guarded_core(max_connections_per_source=1)
    caplog.set_level("INFO", "sbc.io")
    async with running(core, "tls", server_ctx(certs)) as (transports, port):
        reader, writer = await connect_from("127.0.0.2", port)
        assert await closed_at_once(reader, 2.0)  # nothing sent: closed by the timeout
        await eventually("the timed-out connection forgotten", lambda: transports._conns == {})
        failed = [r for r in caplog.records if "TLS handshake" in r.getMessage()]
        assert len(failed) == 1 and failed[0].levelname == "INFO"
        # Its connection slot was given back.
        again, w2 = await connect_from("127.0.0.2", port)
        assert not await closed_at_once(again, 0.1)
        writer.close()
        w2.close()


def peer_core(tls_name: str) -> SbcCore:
    peer = PeerRoute(
        name="home", host="127.0.0.1", port=5999, tls_name=tls_name,
        domains=frozenset({"home.example"}),
    )  # fmt: skip
    return SbcCore(CoreSettings(local_hosts=frozenset({"127.0.0.1"}), peers=(peer,)))


async def peer_options(port: int, ctx: ssl.SSLContext) -> bytes:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
    )
    try:
        writer.write(OPTIONS)
        return await asyncio.wait_for(reader.readline(), 2)
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("tls_name", "cert", "answered"),
    [
        ("localhost", "server", True),  # the right CA and the right name (CN / SAN)
        ("127.0.0.1", "server", True),  # SAN IP address
        ("127.0.0.1", "client", False),  # the right CA, the wrong name
        ("127.0.0.1", None, False),  # no certificate at all
    ],
)
@LOOPS
def test_a_peer_address_needs_a_certificate_naming_the_peer(
    loop: str, certs: dict[str, Path], tls_name: str, cert: str | None, answered: bool
) -> None:
    run(loop, _a_peer_address_needs_a_certificate_naming_the_peer(certs, tls_name, cert, answered))


async def _a_peer_address_needs_a_certificate_naming_the_peer(
    certs: dict[str, Path], tls_name: str, cert: str | None, answered: bool
) -> None:
    core = peer_core(tls_name)
    ctx = server_ctx(certs, ask_client_certificate=True)
    async with running(core, "tls", ctx) as (transports, port):
        try:
            line = await peer_options(port, client_ctx(certs, cert))
        except (ConnectionError, ssl.SSLError):
            line = b""
        assert line.startswith(b"SIP/2.0 200") is answered, line
        assert (core.stats["rejected:peer_certificate"] == 0) is answered
        if not answered:
            await eventually(
                "the refused peer's connection forgotten", lambda: transports._conns == {}
            )


@LOOPS
def test_a_peer_certificate_from_another_ca_fails_the_handshake(
    loop: str, certs: dict[str, Path], tmp_path: Path
) -> None:
    run(loop, _a_peer_certificate_from_another_ca_fails_the_handshake(certs, tmp_path))


async def _a_peer_certificate_from_another_ca_fails_the_handshake(
    certs: dict[str, Path], tmp_path: Path
) -> None:
    other = generate_dev_certs(tmp_path / "other", hostnames=[], ips=[])
    core = peer_core("127.0.0.1")
    async with running(core, "tls", server_ctx(certs, ask_client_certificate=True)) as (_, port):
        ctx = client_ctx(certs)
        ctx.load_cert_chain(str(other["server_cert"]), str(other["server_key"]))
        with pytest.raises((ConnectionError, ssl.SSLError, asyncio.IncompleteReadError)):
            line = await peer_options(port, ctx)
            if not line:  # TLS 1.3: the alert arrives after the client's handshake
                raise ConnectionError("closed")
        assert core.stats["rejected:peer_certificate"] == 0  # refused by the handshake


def cert_serial(der: bytes | None) -> int:
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


async def served_serial(port: int) -> int:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        return cert_serial(ssl_object.getpeercert(binary_form=True))
    finally:
        writer.close()


async def served_is(port: int, serial: int) -> bool:
    return await served_serial(port) == serial


@LOOPS
def test_certificate_and_key_reload_without_restart(
    loop: str,
    certs: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    run(loop, _certificate_and_key_reload_without_restart(certs, tmp_path, monkeypatch, caplog))


async def _certificate_and_key_reload_without_restart(
    certs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    monkeypatch.setattr(sip_transport, "TLS_CHECK_INTERVAL", 0.1)
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "server.pem", live / "server.key"
    shutil.copy(certs["server_cert"], cert)
    shutil.copy(certs["server_key"], key)
    files = TlsFiles(
        "[access.tls]",
        lambda: tls_context(
            str(cert), str(key), None, verify=False, min_version="1.2", ciphers=None
        ),
        (cert, key),
    )
    first = cert_serial(ssl.PEM_cert_to_DER_cert(certs["server_cert"].read_text()))
    core = guarded_core()
    async with running(core, "tls", files) as (transports, port):
        assert await served_serial(port) == first
        # An open connection keeps its certificate across the reload.
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_ctx(certs), server_hostname="localhost"
        )
        new = generate_dev_certs(tmp_path / "new", hostnames=[], ips=[])
        os.replace(new["server_key"], key)  # key first: a moment with a mismatched pair
        os.replace(new["server_cert"], cert)
        second = cert_serial(ssl.PEM_cert_to_DER_cert(cert.read_text()))
        await eventually("the new certificate served", lambda: served_is(port, second))
        writer.write(OPTIONS)
        assert (await asyncio.wait_for(reader.readline(), 2)).startswith(b"SIP/2.0 200")
        writer.close()
        # A broken certificate is logged and the one in use kept.
        caplog.set_level("INFO", "sbc.io")
        cert.write_text("-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n")

        def errors() -> list[logging.LogRecord]:
            return [r for r in caplog.records if "keeping the certificate in use" in r.getMessage()]

        await eventually("the broken certificate logged", lambda: bool(errors()))
        # Part of what is tested: a few more looks at the same broken file log nothing more.
        await asyncio.sleep(3 * sip_transport.TLS_CHECK_INTERVAL)
        assert await served_serial(port) == second
        assert len(errors()) == 1 and errors()[0].levelname == "ERROR"
        # The method a reload (SIGHUP) calls: nothing changed that loads, nothing replaced.
        assert transports.reload_tls() == 0


@LOOPS
def test_a_late_event_loop_is_reported_as_overload(loop: str) -> None:
    run(loop, _a_late_event_loop_is_reported_as_overload())


async def _a_late_event_loop_is_reported_as_overload() -> None:
    core = guarded_core(overload_lag=0.1)
    transports = SipTransports(core)
    try:
        # Part of what is tested: the lag timer runs for a while on a loop that keeps up,
        # and reports nothing.
        await asyncio.sleep(0.3)
        assert not core.guard.overloaded(transports._clock())
        time.sleep(0.5)  # part of what is tested: the loop is stuck once, the timer late
        await eventually("the late timer reported", lambda: core.guard.delay >= 0.2)
        assert not core.guard.overloaded(transports._clock())  # a burst, not overload
        for _ in range(4):  # a loop that stays late: each time, the timer 0.35 s late
            time.sleep(0.6)
            await asyncio.sleep(0.001)
        assert core.guard.overloaded(transports._clock())
        assert core.guard.stats["overload"] == 1
    finally:
        await transports.close()


@LOOPS
def test_the_wait_in_a_udp_receive_queue_is_measured(loop: str) -> None:
    run(loop, _the_wait_in_a_udp_receive_queue_is_measured())


async def _the_wait_in_a_udp_receive_queue_is_measured() -> None:
    core = guarded_core(overload_lag=0.1)
    transports = SipTransports(core)
    try:
        await transports.listen(ListenUrl.parse("udp://0.0.0.0:0"))
        transports._lag_timer.cancel()  # the probes are ticked here, not by the lag timer
        probes = transports.probes
        assert probes.tick() == 0.0  # nothing measured yet; a probe sent (to 127.0.0.1)
        time.sleep(0.4)  # part of what is tested: the probe waits in the queue, unread
        await eventually("the probe read", lambda: not any(probes._sent.values()))
        assert 0.35 <= probes.tick() < 2.0  # the loop clock: millisecond steps
        # The probe is the I/O layer's own: the core saw no datagram at all.
        assert not core.stats and not core.guard.stats
        await asyncio.sleep(0.05)
        assert probes.tick() < 0.4  # the next probe: a queue that is read at once
        await asyncio.sleep(0.05)
        # A queue that takes 0.3 s to drain (the loop stuck meanwhile): from then on, the
        # bytes queued are worth their time.
        [(_, port)] = [address for _, address in transports.bound]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            for _ in range(200):
                client.sendto(b"\r\n" * 200, ("127.0.0.1", port))
            probes.tick()  # this probe has the 200 datagrams ahead of it
            time.sleep(0.3)
            await eventually("the probes read", lambda: not any(probes._sent.values()))
            assert core.stats["keepalive"] == 200
            assert probes.tick() == 0.0  # nothing queued now: no wait, whatever the probes'
            for _ in range(200):
                client.sendto(b"\r\n" * 200, ("127.0.0.1", port))
            assert 0.15 < probes.tick() < 0.6  # the same bytes queued: about 0.3 s
    finally:
        await transports.close()


@LOOPS
def test_tls_connections_leave_no_descriptor_behind(loop: str, certs: dict[str, Path]) -> None:
    run(loop, _tls_connections_leave_no_descriptor_behind(certs))


async def _tls_connections_leave_no_descriptor_behind(certs: dict[str, Path]) -> None:
    """The socket goes from the plain transport to the TLS one as a duplicate descriptor:
    after accepted, refused and failed handshakes none is left open."""
    core = guarded_core(tls_handshakes=Bucket(rate=0.01, burst=3))
    async with running(core, "tls", server_ctx(certs)) as (transports, port):
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(2):
            _, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_ctx(certs), server_hostname="localhost",
                local_addr=("127.0.0.2", 0),
            )  # fmt: skip
            writer.close()
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await asyncio.open_connection(  # no CA: the client gives up the handshake
                "127.0.0.1", port, ssl=ssl.create_default_context(), local_addr=("127.0.0.2", 0)
            )
        for _ in range(2):  # over the bucket
            reader, writer = await connect_from("127.0.0.2", port)
            assert await closed_at_once(reader, 0.3)
            writer.close()
        await eventually("every connection forgotten", lambda: transports._conns == {})
        await eventually(
            "no descriptor left open", lambda: len(os.listdir("/proc/self/fd")) == before
        )
