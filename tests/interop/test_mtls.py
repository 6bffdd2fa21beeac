"""TLS against the real ``sbc run``: mutual TLS with a peer SBC,
per-source connection and handshake limits that act before the handshake, and the
certificate reloaded without a restart.

A peer is recognised by its address; on these loopback tests the peer "home" is 127.0.0.1,
so a test client on 127.0.0.1 is "a connection from the peer's address". A call between two
real SBCs over mutual TLS is test_peering.py (its peer's certificate names 127.0.0.1, the
default ``tls_name``); here each certificate case is shown on one raw connection.
"""

from __future__ import annotations

import re
import shutil
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from . import sipwire
from .conftest import Certs, SbcFactory, SbcProcess, _running_sbc, sbc_command, wait_until
from .phones import CALL_TIMEOUT

pytestmark = pytest.mark.interop

PEER_HOME = """
[[peers]]
name = "home"
uri = "sip:127.0.0.1:5061;transport=tls"
domains = ["home.example"]
tls_name = "localhost"
"""


def tls_client(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def options_over_tls(port: int, ctx: ssl.SSLContext, source: str = "127.0.0.1") -> bytes:
    """An OPTIONS over a new TLS connection; what came back before the SBC closed it (b""
    when nothing did). A failed handshake raises."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=3, source_address=(source, 0)) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as sock,
    ):
        data = sipwire.request(
            target=sipwire.hostport("127.0.0.1", port),
            transport="tls",
            local=sock.getsockname()[:2],
        )
        try:
            sock.sendall(data)
            return sock.recv(65535)
        except (ConnectionError, ssl.SSLError):
            return b""


def gen_certs(out: Path) -> Certs:
    """Another development CA with its server and client certificates (``sbc gen-certs``)."""
    import subprocess

    proc = subprocess.run(
        [*sbc_command(), "gen-certs", "--out", str(out)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return Certs(
        ca=out / "ca.pem", server_cert=out / "server.pem", server_key=out / "server.key",
        client_cert=out / "client.pem", client_key=out / "client.key",
    )  # fmt: skip


# -- mutual TLS with a peer SBC ----------------------------------------------------------------
def test_peer_with_a_certificate_naming_it_is_answered(
    sbc_factory: SbcFactory, certs: Certs
) -> None:
    partner = sbc_factory(extra=PEER_HOME)
    port = partner.extra_ports["core_tls"]
    # server.pem: the dev CA, CN and SAN "localhost" (= tls_name).
    answer = options_over_tls(port, tls_client(certs.ca, certs.server_cert, certs.server_key))
    assert answer.startswith(b"SIP/2.0 200"), answer
    assert "closing TLS connection from peer address" not in partner.log()


def test_peer_with_the_right_ca_but_the_wrong_name_is_closed_unread(
    sbc_factory: SbcFactory, certs: Certs
) -> None:
    partner = sbc_factory(extra=PEER_HOME)
    port = partner.extra_ports["core_tls"]
    # client.pem: the same CA, but named "sbc development client".
    answer = options_over_tls(port, tls_client(certs.ca, certs.client_cert, certs.client_key))
    assert answer == b""
    closing = "closing TLS connection from peer address"
    wait_until(
        f"the SBC logging {closing!r}", lambda: closing in partner.log(), CALL_TIMEOUT, partner.log
    )
    log = partner.log()
    assert "sbc development client" in log
    assert "OPTIONS" not in log.split("closing TLS connection from peer address", 1)[1], log


def test_peer_without_a_certificate_is_closed(sbc_factory: SbcFactory, certs: Certs) -> None:
    partner = sbc_factory(extra=PEER_HOME)
    answer = options_over_tls(partner.extra_ports["core_tls"], tls_client(certs.ca))
    assert answer == b""
    wait_until(
        "the SBC logging 'no certificate'",
        lambda: "no certificate" in partner.log(),
        CALL_TIMEOUT,
        partner.log,
    )


def test_peer_with_a_certificate_from_another_ca_fails_the_handshake(
    sbc_factory: SbcFactory, certs: Certs, tmp_path: Path
) -> None:
    other = gen_certs(tmp_path / "other-ca")
    partner = sbc_factory(extra=PEER_HOME)
    ctx = tls_client(certs.ca, other.server_cert, other.server_key)  # "localhost", wrong CA
    try:
        answer = options_over_tls(partner.extra_ports["core_tls"], ctx)
    except (ssl.SSLError, ConnectionError):
        answer = b""  # TLS 1.2: the server's alert ends the client's handshake
    assert answer == b""  # TLS 1.3: the alert comes after the client's side of it
    failed = re.compile(r"TLS handshake with tls:127\.0\.0\.1\S* failed")
    wait_until(
        "the SBC logging the failed handshake",
        lambda: bool(failed.search(partner.log())),
        CALL_TIMEOUT,
        partner.log,
    )
    assert "closing TLS connection from peer address" not in partner.log()  # never got that far


# -- per-source limits before the handshake ----------------------------------------------------
def closed_at_once(sock: socket.socket, wait: float = 0.5) -> bool:
    """True if the SBC closed the connection without a byte; False if it waits for us."""
    sock.settimeout(wait)
    try:
        return sock.recv(100) == b""
    except TimeoutError:
        return False
    except ConnectionError:
        return True


def test_connections_over_the_per_source_limit_are_closed(sbc_factory: SbcFactory) -> None:
    sbc = sbc_factory(security="allow = []\nmax_connections_per_source = 3")
    conns = [
        socket.create_connection((sbc.host4, sbc.tcp4), timeout=2, source_address=("127.0.0.2", 0))
        for _ in range(4)
    ]
    try:
        assert [closed_at_once(c, 0.3) for c in conns] == [False, False, False, True]
        # The first three still work.
        for conn in conns[:3]:
            conn.sendall(
                sipwire.request(
                    target=sipwire.hostport(sbc.host4, sbc.tcp4),
                    transport="tcp",
                    local=conn.getsockname()[:2],
                )
            )
            assert sipwire.StreamReader(conn).response().status == 200
        # A slot given back is free again (once the SBC has seen the close: until then a new
        # connection is closed at once), and the TLS listener counts the same source.
        conns[0].close()

        def accepted() -> bool:
            again = socket.create_connection(
                (sbc.host4, sbc.tcp4), timeout=2, source_address=("127.0.0.2", 0)
            )
            conns.append(again)
            return not closed_at_once(again, 0.3)

        wait_until(
            "a connection from 127.0.0.2 in the slot given back", accepted, CALL_TIMEOUT, sbc.log
        )
        tls = socket.create_connection(
            (sbc.host4, sbc.tls4), timeout=2, source_address=("127.0.0.2", 0)
        )
        conns.append(tls)
        assert closed_at_once(tls, 0.3)
    finally:
        for conn in conns:
            conn.close()


def test_tls_handshakes_over_the_rate_are_refused_before_the_handshake(
    sbc_factory: SbcFactory, certs: Certs
) -> None:
    sbc = sbc_factory(security="allow = []\ntls_handshakes = { rate = 0.1, burst = 3 }")
    ctx = tls_client(certs.ca)
    # Three handshakes within the burst complete.
    for _ in range(3):
        answer = options_over_tls(sbc.tls4, ctx, source="127.0.0.2")
        assert answer.startswith(b"SIP/2.0 200"), answer
    # The next connections are closed before the SBC reads a ClientHello.
    for _ in range(3):
        with socket.create_connection(
            (sbc.host4, sbc.tls4), timeout=2, source_address=("127.0.0.2", 0)
        ) as raw:
            assert closed_at_once(raw, 1.0)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        options_over_tls(sbc.tls4, ctx, source="127.0.0.2")
    # Another source is not affected.
    assert options_over_tls(sbc.tls4, ctx, source="127.0.0.3").startswith(b"SIP/2.0 200")
    assert "TLS handshake refused" in sbc.log()


# -- certificate reload ---------------------------------------------------------------------------
@pytest.fixture
def own_certs(certs: Certs, tmp_path: Path) -> Certs:
    """Copies of the dev certificates that this test's SBC uses and the test replaces."""
    live = tmp_path / "live"
    live.mkdir()
    copies = {}
    for name, path in vars(certs).items():
        copies[name] = live / path.name
        shutil.copy(path, copies[name])
    return Certs(**copies)


@pytest.fixture
def reloading_sbc(tmp_path: Path, own_certs: Certs) -> Iterator[SbcProcess]:
    yield from _running_sbc(tmp_path / "sbc", own_certs)


def served_certificate(port: int) -> x509.Certificate:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port), timeout=3) as raw,
        ctx.wrap_socket(raw) as sock,
    ):
        der = sock.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_certificate_and_key_are_reloaded_without_a_restart(
    reloading_sbc: SbcProcess, own_certs: Certs, tmp_path: Path
) -> None:
    """The files are looked at every 3 s; that open connections keep their certificate is
    shown in-process (tests/test_tls_security.py), here the idle timeout is 2 s."""
    sbc = reloading_sbc
    old = served_certificate(sbc.tls4)
    new = gen_certs(tmp_path / "new")
    # A bad certificate first: logged, the old one kept.
    own_certs.server_cert.write_text(
        "-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n"
    )
    kept = "keeping the certificate in use"
    wait_until(f"the SBC logging {kept!r}", lambda: kept in sbc.log(), CALL_TIMEOUT, sbc.log)
    assert served_certificate(sbc.tls4).serial_number == old.serial_number
    # Then the new pair (key first, as a deployment tool might write them).
    shutil.copy(new.server_key, own_certs.server_key)
    shutil.copy(new.server_cert, own_certs.server_cert)
    expected = x509.load_pem_x509_certificate(new.server_cert.read_bytes()).serial_number
    wait_until(
        "the new certificate served",
        lambda: served_certificate(sbc.tls4).serial_number == expected,
        CALL_TIMEOUT,
        sbc.log,
    )
    assert "certificate reloaded" in sbc.log()
