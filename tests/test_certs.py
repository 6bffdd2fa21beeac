"""Dev certificates: the chain verifies in a real TLS handshake (in memory, both directions)."""

from __future__ import annotations

import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509

from sbc.certs import CERT_FILES, generate_dev_certs


def handshake(server: ssl.SSLContext, client: ssl.SSLContext, server_hostname: str) -> None:
    """Run a TLS handshake between two SSLObjects over memory BIOs."""
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    s = server.wrap_bio(s_in, s_out, server_side=True)
    c = client.wrap_bio(c_in, c_out, server_hostname=server_hostname)
    done = {"s": False, "c": False}
    for _ in range(20):
        for name, obj in (("c", c), ("s", s)):
            if not done[name]:
                try:
                    obj.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        if c_out.pending:
            s_in.write(c_out.read())
        if s_out.pending:
            c_in.write(s_out.read())
        if all(done.values()) and not c_out.pending and not s_out.pending:
            break
    assert all(done.values())
    c.write(b"OPTIONS")
    s_in.write(c_out.read())
    assert s.read() == b"OPTIONS"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("certs")
    return generate_dev_certs(out, hostnames=["sbc.test"], ips=["192.0.2.7"], days=30)


def server_context(certs: dict[str, Path], *, verify_clients: bool = False) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certs["server_cert"], certs["server_key"])
    if verify_clients:
        ctx.load_verify_locations(certs["ca_cert"])
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(certs: dict[str, Path], *, with_cert: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs["ca_cert"]))
    if with_cert:
        ctx.load_cert_chain(certs["client_cert"], certs["client_key"])
    return ctx


def test_files_written(certs: dict[str, Path]) -> None:
    assert set(certs) == set(CERT_FILES)
    for key, path in certs.items():
        assert path.name == CERT_FILES[key] and path.is_file()
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o600 if key.endswith("_key") else 0o644), (key, oct(mode))


@pytest.mark.parametrize("name", ["localhost", "sbc.test", "127.0.0.1", "::1", "192.0.2.7"])
def test_server_certificate_verifies(certs: dict[str, Path], name: str) -> None:
    handshake(server_context(certs), client_context(certs), name)


def test_wrong_name_is_rejected(certs: dict[str, Path]) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(server_context(certs), client_context(certs), "other.test")


def test_mutual_tls_with_client_certificate(certs: dict[str, Path]) -> None:
    handshake(
        server_context(certs, verify_clients=True),
        client_context(certs, with_cert=True),
        "localhost",
    )


def test_key_type_and_validity(certs: dict[str, Path]) -> None:
    cert = x509.load_pem_x509_certificate(certs["server_cert"].read_bytes())
    assert cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
    assert days == 30  # 30 days plus the 1 hour of clock-skew allowance
    ca = x509.load_pem_x509_certificate(certs["ca_cert"].read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_no_overwrite_without_force(tmp_path: Path) -> None:
    first = generate_dev_certs(tmp_path, hostnames=[], ips=[])
    before = first["ca_cert"].read_bytes()
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        generate_dev_certs(tmp_path, hostnames=[], ips=[])
    assert first["ca_cert"].read_bytes() == before
    generate_dev_certs(tmp_path, hostnames=[], ips=[], force=True)
    assert first["ca_cert"].read_bytes() != before
    assert stat.S_IMODE(first["server_key"].stat().st_mode) == 0o600


def test_bad_ip_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        generate_dev_certs(tmp_path, hostnames=[], ips=["not-an-ip"])
    assert list(tmp_path.iterdir()) == []
