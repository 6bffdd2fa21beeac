"""Development certificates: a local CA, a server and a client certificate (EC P-256)."""

from __future__ import annotations

import datetime
import ipaddress
import os
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CERT_FILES", "generate_dev_certs"]

# Result key -> file name.
CERT_FILES: dict[str, str] = {
    "ca_cert": "ca.pem",
    "ca_key": "ca.key",
    "server_cert": "server.pem",
    "server_key": "server.key",
    "client_cert": "client.pem",
    "client_key": "client.key",
}

_DEFAULT_HOSTNAMES = ["localhost"]
_DEFAULT_IPS = ["127.0.0.1", "::1"]


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sbc development"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _builder(
    subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey, days: int
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))  # tolerate clock skew
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )


def _leaf(
    common_name: str,
    key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    days: int,
    usages: list[x509.ObjectIdentifier],
    san: list[x509.GeneralName],
) -> x509.Certificate:
    builder = (
        _builder(_name(common_name), ca_cert.subject, key, days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def _write(path: Path, data: bytes, *, private: bool) -> None:
    """Atomic write; private keys get mode 0600 from the start."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600 if private else 0o644)
        with os.fdopen(fd, "wb") as fp:
            fp.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def generate_dev_certs(
    out_dir: Path,
    *,
    hostnames: list[str],
    ips: list[str],
    days: int = 825,
    force: bool = False,
) -> dict[str, Path]:
    """Write a dev CA, a server and a client certificate with their keys into ``out_dir``.

    The server SAN holds ``hostnames`` plus localhost and ``ips`` plus 127.0.0.1 and ::1.
    Returns CERT_FILES keys -> paths. Raises FileExistsError if any file exists and not
    ``force``; ValueError for a bad IP address or ``days``.
    """
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")
    names = list(dict.fromkeys([*hostnames, *_DEFAULT_HOSTNAMES]))
    addresses = list(
        dict.fromkeys(ipaddress.ip_address(ip) for ip in [*ips, *_DEFAULT_IPS])
    )  # ValueError on a bad address
    out_dir = Path(out_dir)
    paths = {key: out_dir / name for key, name in CERT_FILES.items()}
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not force:
        raise FileExistsError(f"refusing to overwrite {', '.join(existing)}")
    out_dir.mkdir(parents=True, exist_ok=True)

    curve = ec.SECP256R1()
    ca_key = ec.generate_private_key(curve)
    ca_cert = (
        _builder(_name("sbc development CA"), _name("sbc development CA"), ca_key, days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(curve)
    san: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    san += [x509.IPAddress(a) for a in addresses]
    server_cert = _leaf(
        names[0],
        server_key,
        ca_cert,
        ca_key,
        days,
        # clientAuth too: the same cert serves SBC-to-SBC peering over mutual TLS.
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        san,
    )

    client_key = ec.generate_private_key(curve)
    client_cert = _leaf(
        "sbc development client",
        client_key,
        ca_cert,
        ca_key,
        days,
        [ExtendedKeyUsageOID.CLIENT_AUTH],
        [],
    )

    _write(paths["ca_cert"], _cert_pem(ca_cert), private=False)
    _write(paths["ca_key"], _key_pem(ca_key), private=True)
    _write(paths["server_cert"], _cert_pem(server_cert), private=False)
    _write(paths["server_key"], _key_pem(server_key), private=True)
    _write(paths["client_cert"], _cert_pem(client_cert), private=False)
    _write(paths["client_key"], _key_pem(client_key), private=True)
    return paths
