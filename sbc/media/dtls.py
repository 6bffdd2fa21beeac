"""A DTLS-SRTP endpoint (RFC 5763, RFC 5764) on OpenSSL memory BIOs (pyOpenSSL), sans-I/O.

The relay terminates the media of a WebRTC party: the SRTP keys of that leg come from a DTLS
handshake on the media port (RFC 5764 4), in which the SBC is the server (the party wrote
a=setup:active) or the client (RFC 5763 5). Both sides present self-signed certificates;
each is checked against the fingerprints the other put in its SDP (RFC 8122 5, RFC 5763 5),
which is what authenticates the handshake.

``DtlsEndpoint`` takes datagrams (``receive``) and returns the datagrams to send back; its
retransmission timer (RFC 6347 4.2.4) is a deadline (``deadline``) to be run by
``handle_timer``. When the handshake ends and the certificate matches, ``keys`` holds the
leg's SRTP master keys exported per RFC 5764 4.2. Garbage, alerts and close_notify never
raise out of it: a failed handshake sets ``failed`` (and ``error``), a close sets ``closed``.

OpenSSL keeps its DTLS timer on the real monotonic clock; ``handle_timer(now)`` runs it
when the endpoint's own deadline (on the caller's clock) has passed, and re-arms from
OpenSSL's remaining time if OpenSSL did not see it expire yet.

``make_identity`` makes the SBC's certificate (ECDSA P-256, self-signed, RFC 8827 6.5),
``fingerprint`` gives the a=fingerprint value of a certificate.
"""

from __future__ import annotations

import contextlib
import datetime
import secrets
import struct
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto

from sbc.media.control import Identity, SrtpKey
from sbc.media.srtp import PROFILES
from sbc.sdp.sdes import SUITES

MTU = 1200  # the largest datagram sent (handshake messages are fragmented to fit, RFC 6347 4.1.1)
EXPORTER_LABEL = b"EXTRACTOR-dtls_srtp"  # RFC 5764 4.2

# RFC 5764 4.1.2 and RFC 7714 14.2 protection profile names (as OpenSSL names them) -> the
# SRTP crypto-suite names of sbc/media/srtp.py, best first: the order offered (the client's
# order is its preference, RFC 5764 4.1.1). Chrome picks one of the AEAD ones.
_PROFILES = {
    b"SRTP_AEAD_AES_256_GCM": "AEAD_AES_256_GCM",
    b"SRTP_AEAD_AES_128_GCM": "AEAD_AES_128_GCM",
    b"SRTP_AES128_CM_SHA1_80": "AES_CM_128_HMAC_SHA1_80",
}
assert all(suite in PROFILES for suite in _PROFILES.values())
SRTP_PROFILES = b":".join(_PROFILES)

# RFC 8122 5 hash function names (RFC 3279, RFC 4055), as a=fingerprint writes them.
_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha-1": hashes.SHA1, "sha-224": hashes.SHA224, "sha-256": hashes.SHA256,
    "sha-384": hashes.SHA384, "sha-512": hashes.SHA512,
}  # fmt: skip

_RECORD_HEADER = 13  # RFC 6347 4.1: type, version, epoch, sequence number, length
_ALERT = 21  # RFC 5246 6.2.1 ContentType alert


class DtlsError(Exception):
    """An identity that cannot be used."""


# -- certificates ----------------------------------------------------------------------------


def make_identity(*, days: int = 365) -> tuple[Identity, str]:
    """A fresh self-signed ECDSA P-256 certificate (RFC 8827 6.5: a new one per run, not
    tied to a name), valid from a day ago for ``days`` days, and its a=fingerprint value.
    Only the fingerprint authenticates it (browsers do not look at its dates); the year
    keeps a stricter peer content while the SBC runs."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sbc-" + secrets.token_hex(4))])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    identity = Identity(
        certificate=pem,
        private_key=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    return identity, fingerprint(pem)


def _digest(cert: x509.Certificate, hash_name: str) -> str | None:
    algorithm = _HASHES.get(hash_name.lower())
    if algorithm is None:
        return None
    return cert.fingerprint(algorithm()).hex(":").upper()  # RFC 8122 5: UHEX pairs


def fingerprint(cert_pem: bytes, hash_name: str = "sha-256") -> str:
    """The a=fingerprint value of a PEM certificate (RFC 8122 5): "sha-256 AB:CD:..."."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    value = _digest(cert, hash_name)
    if value is None:
        raise ValueError(f"unknown fingerprint hash function {hash_name!r}")
    return f"{hash_name.lower()} {value}"


def matches(cert: x509.Certificate, fingerprints: tuple[tuple[str, str], ...]) -> bool:
    """Whether ``cert`` has one of ``fingerprints`` (hash name, hex pairs), compared
    without regard to case (RFC 8122 5); hash functions not known here are skipped."""
    for hash_name, value in fingerprints:
        mine = _digest(cert, hash_name)
        if mine is not None and mine == value.strip().upper():
            return True
    return False


# -- the endpoint ----------------------------------------------------------------------------


def _accept_any(conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int) -> bool:
    # The certificate is self-signed: it is checked against the SDP fingerprints when the
    # handshake ends (RFC 5763 5), not against a CA.
    return True


class DtlsContext:
    """The SBC's certificate in an OpenSSL DTLS context, shared by every endpoint of a
    worker (server and client roles)."""

    def __init__(self, identity: Identity) -> None:
        try:
            ctx = SSL.Context(SSL.DTLS_METHOD)
            ctx.use_certificate(x509.load_pem_x509_certificate(identity.certificate))
            key = serialization.load_pem_private_key(identity.private_key, None)
            if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
                raise ValueError(f"a {type(key).__name__} key is not usable for DTLS here")
            ctx.use_privatekey(key)
            ctx.check_privatekey()
            # RFC 5763 5: both sides present a certificate; the server asks for the client's.
            ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, _accept_any)
            ctx.set_tlsext_use_srtp(SRTP_PROFILES)  # RFC 5764 4.1.1
            # A memory BIO has no path MTU to ask: keep the one set on each connection.
            ctx.set_options(SSL.OP_NO_QUERY_MTU)
        except (SSL.Error, ValueError, TypeError) as exc:
            raise DtlsError(f"cannot use the DTLS certificate: {exc}") from None
        self.context = ctx
        self.fingerprint = fingerprint(identity.certificate)


@dataclass(frozen=True, slots=True)
class SrtpKeys:
    """The SRTP master keys of a leg from the DTLS handshake (RFC 5764 4.2): ``send``
    protects what this endpoint sends, ``recv`` unprotects what its peer sends."""

    send: SrtpKey
    recv: SrtpKey


def _records(data: bytes) -> list[bytes]:
    """The DTLS records of a byte string (RFC 6347 4.1); a partial record is kept whole."""
    out: list[bytes] = []
    pos = 0
    while pos < len(data):
        end = pos + _RECORD_HEADER
        if end <= len(data):
            end += struct.unpack_from("!H", data, pos + 11)[0]
        out.append(data[pos:end])
        pos = end
    return out


class DtlsEndpoint:
    """One DTLS-SRTP association (see the module docstring)."""

    __slots__ = ("_conn", "_deadline", "closed", "error", "failed", "fingerprints", "is_client",
                 "keys", "pending", "started")  # fmt: skip

    def __init__(
        self,
        context: DtlsContext,
        *,
        client: bool,
        fingerprints: tuple[tuple[str, str], ...],
        mtu: int = MTU,
    ) -> None:
        conn = SSL.Connection(context.context, None)  # None: memory BIOs
        if client:
            conn.set_connect_state()
        else:
            conn.set_accept_state()
        conn.set_ciphertext_mtu(mtu)
        self._conn = conn
        self.is_client = client
        self.fingerprints = fingerprints
        self.keys: SrtpKeys | None = None
        # The handshake ended before the peer's fingerprints were known (the SBC's offer
        # to a browser: its answer and its ClientHello race): checked when they come.
        self.pending = False
        self.failed = False
        self.closed = False
        self.started = False
        self.error = ""
        self._deadline: float | None = None

    @property
    def connected(self) -> bool:
        return self.keys is not None

    def deadline(self) -> float | None:
        """When ``handle_timer`` is next due (a handshake flight to retransmit), or None."""
        return self._deadline

    def start(self, now: float) -> list[bytes]:
        """The client's first flight (ClientHello); nothing for a server or when started."""
        if self.started or not self.is_client or self.failed:
            return []
        self.started = True
        self._handshake()
        return self._flush(now)

    def receive(self, data: bytes, now: float) -> list[bytes]:
        """A datagram from the peer: the datagrams to send back."""
        if self.failed or self.closed:
            return []
        self.started = True
        try:
            self._conn.bio_write(data)
        except SSL.Error:
            return []
        if self.keys is None:
            self._handshake()
        if self.keys is not None and not self.failed:
            self._read()
        return self._flush(now)

    def learn(self, fingerprints: tuple[tuple[str, str], ...]) -> None:
        """The peer's fingerprints, from an SDP that came after the endpoint was made (the
        answer to the SBC's offer); a handshake that already ended is checked now."""
        self.fingerprints = fingerprints
        if self.pending and fingerprints and not self.failed:
            self.pending = False
            self._finish()

    def handle_timer(self, now: float) -> list[bytes]:
        """Run the retransmission timer (RFC 6347 4.2.4) if it is due: the flight again."""
        due = self._deadline
        if due is None or now < due or self.failed or self.closed:
            return []
        try:
            self._conn.DTLSv1_handle_timeout()
        except SSL.Error as exc:  # too many retransmissions (RFC 6347 4.2.4.1)
            self._fail(f"handshake timed out: {exc}")
        return self._flush(now)

    def close(self, now: float) -> list[bytes]:
        """Send close_notify (RFC 5246 7.2.1) and stop."""
        if self.closed or self.failed or not self.started:
            self.closed = True
            return []
        self.closed = True
        with contextlib.suppress(SSL.Error):
            self._conn.shutdown()
        return self._flush(now)

    # -- inside ------------------------------------------------------------------------------
    def _handshake(self) -> None:
        try:
            self._conn.do_handshake()
        except SSL.WantReadError:
            return
        except SSL.Error as exc:
            self._fail(f"handshake failed: {exc}")
            return
        self._finish()

    def _finish(self) -> None:
        """RFC 5763 5: the certificate must match a fingerprint of the peer's SDP; then the
        keys of RFC 5764 4.2."""
        if not self.fingerprints:
            self.pending = True  # ``learn`` checks it when the peer's SDP comes
            return
        cert = self._conn.get_peer_certificate(as_cryptography=True)
        if cert is None or not matches(cert, self.fingerprints):
            self._fail("the peer's certificate matches no fingerprint of its SDP")
            self._alert()
            return
        profile = self._conn.get_selected_srtp_profile()
        suite = _PROFILES.get(profile)
        if suite is None:
            self._fail(f"no SRTP protection profile agreed ({profile!r})")
            self._alert()
            return
        spec = SUITES[suite]
        k, s = spec.key_len, spec.salt_len
        try:
            material = self._conn.export_keying_material(EXPORTER_LABEL, 2 * (k + s))
        except SSL.Error as exc:
            self._fail(f"keying material export failed: {exc}")
            return
        # RFC 5764 4.2: client_write_SRTP_master_key | server_write_SRTP_master_key |
        # client_write_SRTP_master_salt | server_write_SRTP_master_salt
        client = material[:k] + material[2 * k : 2 * k + s]
        server = material[k : 2 * k] + material[2 * k + s :]
        mine, theirs = (client, server) if self.is_client else (server, client)
        self.keys = SrtpKeys(
            send=SrtpKey(suite=suite, key_salt=mine), recv=SrtpKey(suite=suite, key_salt=theirs)
        )

    def _read(self) -> None:
        """Records after the handshake: alerts (close_notify, RFC 5246 7.2.1), a retransmitted
        flight (answered by OpenSSL), application data (not used: dropped)."""
        for _ in range(16):
            try:
                self._conn.recv(65536)
            except SSL.WantReadError:
                return
            except SSL.ZeroReturnError:
                self.closed = True
                return
            except SSL.Error:
                return  # a record that does not decrypt is dropped (RFC 6347 4.1.2.7)

    def _fail(self, error: str) -> None:
        self.failed = True
        self.error = error
        self._deadline = None

    def _alert(self) -> None:
        with contextlib.suppress(SSL.Error):
            self._conn.shutdown()  # tell the peer (an alert) rather than let it wait

    def _flush(self, now: float) -> list[bytes]:
        """What OpenSSL wrote, cut into datagrams of whole records up to the MTU, and the
        deadline of the retransmission timer on the caller's clock."""
        chunks: list[bytes] = []
        while True:
            try:
                chunk = self._conn.bio_read(65536)
            except SSL.WantReadError:
                break
            except SSL.Error:
                break
            if not chunk:
                break
            chunks.append(chunk)
        if not self.failed and not self.closed:
            try:
                timeout = self._conn.DTLSv1_get_timeout()
            except SSL.Error:
                timeout = None
            self._deadline = None if timeout is None else now + max(timeout, 0.001)
        else:
            self._deadline = None
        if not chunks:
            return []
        out: list[bytes] = []
        current = b""
        for record in _records(b"".join(chunks)):
            if current and len(current) + len(record) > MTU:
                out.append(current)
                current = b""
            current += record
        if current:
            out.append(current)
        return out
