"""The DTLS-SRTP endpoint (sbc.media.dtls): two endpoints shake hands over memory BIOs
with a fake clock; keys agree (RFC 5764 4.2), fingerprints are enforced (RFC 8122 5, RFC
5763 5), the retransmission timer is a deadline (RFC 6347 4.2.4), garbage never raises."""

from __future__ import annotations

import os
import struct

import pytest
from cryptography import x509

from sbc.media import control, dtls
from sbc.media.srtp import KEY_SALT_LENGTHS, SrtpReceiver, SrtpSender


def fp(text: str) -> tuple[tuple[str, str], ...]:
    name, value = text.split(" ")
    return ((name, value),)


@pytest.fixture(scope="module")
def identities() -> tuple[tuple[control.Identity, str], tuple[control.Identity, str]]:
    return dtls.make_identity(), dtls.make_identity()


def pair(
    identities: tuple[tuple[control.Identity, str], tuple[control.Identity, str]],
    *,
    server_expects: tuple[tuple[str, str], ...] | None = None,
    client_expects: tuple[tuple[str, str], ...] | None = None,
) -> tuple[dtls.DtlsEndpoint, dtls.DtlsEndpoint]:
    (ids, fps), (idc, fpc) = identities
    server = dtls.DtlsEndpoint(
        dtls.DtlsContext(ids), client=False, fingerprints=server_expects or fp(fpc)
    )
    client = dtls.DtlsEndpoint(
        dtls.DtlsContext(idc), client=True, fingerprints=client_expects or fp(fps)
    )
    return server, client


def run(server: dtls.DtlsEndpoint, client: dtls.DtlsEndpoint, now: float = 0.0) -> int:
    """Exchange flights until both are quiet; the number of rounds."""
    out = client.start(now)
    rounds = 0
    while out and rounds < 10:
        rounds += 1
        back = [d for datagram in out for d in server.receive(datagram, now)]
        out = [d for datagram in back for d in client.receive(datagram, now)]
    return rounds


def test_identity_and_fingerprint() -> None:
    identity, text = dtls.make_identity()
    name, value = text.split(" ")
    assert name == "sha-256" and len(value.split(":")) == 32 and value == value.upper()
    assert dtls.fingerprint(identity.certificate) == text
    cert = x509.load_pem_x509_certificate(identity.certificate)
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days == 366
    assert dtls.fingerprint(identity.certificate, "SHA-1").startswith("sha-1 ")
    with pytest.raises(ValueError):
        dtls.fingerprint(identity.certificate, "md5")
    assert b"PRIVATE KEY" in identity.private_key


def test_handshake_keys_agree(identities) -> None:  # type: ignore[no-untyped-def]
    server, client = pair(identities)
    assert not server.started and server.start(0.0) == []  # a server waits for ClientHello
    run(server, client)
    assert server.keys is not None and client.keys is not None
    assert server.keys.send == client.keys.recv and server.keys.recv == client.keys.send
    assert server.keys.send.suite == "AEAD_AES_256_GCM"  # the best profile offered
    assert len(server.keys.send.key_salt) == 44
    assert server.deadline() is None and client.deadline() is None
    # The keys work in libsrtp: what the client protects, the server's receiver opens.
    packet = struct.pack("!BBHII", 0x80, 0, 1, 160, 0x1234) + bytes(160)
    protected = SrtpSender(client.keys.send).protect(packet)
    assert SrtpReceiver(server.keys.recv).unprotect(protected) == packet


def test_fingerprint_case_insensitive_and_any_of_several(identities) -> None:  # type: ignore[no-untyped-def]
    (_, _fps), (idc, fpc) = identities
    name, value = fpc.split(" ")
    wrong = ("sha-256", ":".join(["00"] * 32))
    cert = x509.load_pem_x509_certificate(idc.certificate)
    assert dtls.matches(cert, (wrong, ("SHA-256", value.lower())))
    assert not dtls.matches(cert, (wrong, ("md5", value)))
    server, client = pair(identities, server_expects=(wrong, (name.upper(), value.lower())))
    run(server, client)
    assert server.keys is not None and client.keys is not None


@pytest.mark.parametrize("side", ["server", "client"])
def test_fingerprint_mismatch_fails(identities, side: str) -> None:  # type: ignore[no-untyped-def]
    wrong = (("sha-256", ":".join(["AB"] * 32)),)
    kw = {"server_expects": wrong} if side == "server" else {"client_expects": wrong}
    server, client = pair(identities, **kw)
    run(server, client)
    bad = server if side == "server" else client
    assert bad.failed and bad.keys is None and "fingerprint" in bad.error
    assert bad.receive(b"\x16" + bytes(40), 1.0) == []  # a failed endpoint stays quiet


def test_retransmission_deadline(identities) -> None:  # type: ignore[no-untyped-def]
    server, client = pair(identities)
    first = client.start(10.0)
    assert first and first[0][0] == 22  # a handshake record (RFC 6347 4.1)
    due = client.deadline()
    assert due is not None and 10.5 < due <= 11.0  # RFC 6347 4.2.4.1: 1 s initially
    assert client.handle_timer(10.5) == []  # not due yet
    assert client.start(10.6) == []  # started once
    # the server answers with its flight, and runs a timer of its own
    flight = [d for datagram in first for d in server.receive(datagram, 10.7)]
    assert flight and all(len(d) <= dtls.MTU for d in flight)
    assert server.deadline() is not None
    # OpenSSL keeps its timer on the real clock: run at our deadline before it expired
    # there, the endpoint re-arms from what is left (a retransmission is not early).
    client.handle_timer(due)
    again = client.deadline()
    assert again is not None and again > due - 1.0


def test_retransmits_when_openssl_timer_expired(identities, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """At the deadline the endpoint asks OpenSSL to retransmit and sends what it wrote."""
    _server, client = pair(identities)
    first = client.start(0.0)
    calls: list[int] = []

    def expired() -> bool:
        calls.append(1)
        return True

    conn = client._conn
    monkeypatch.setattr(type(conn), "DTLSv1_handle_timeout", lambda self: expired())
    due = client.deadline()
    assert due is not None
    client.handle_timer(due + 0.001)
    assert calls == [1]
    assert first


def test_garbage_and_alerts_do_not_raise(identities) -> None:  # type: ignore[no-untyped-def]
    server, client = pair(identities)
    for junk in (
        b"",
        b"\x16",
        b"\x17" + os.urandom(50),
        b"\x15\xfe\xfd" + bytes(20),
        os.urandom(300),
    ):
        assert isinstance(server.receive(junk, 0.0), list)
    run(server, client)
    assert server.keys is not None
    for junk in (os.urandom(80), b"\x17\xfe\xfd" + bytes(10) + b"\x00\x05hello"):
        assert isinstance(server.receive(junk, 1.0), list)
    assert server.keys is not None and not server.failed
    # close_notify from the client: closed, keys kept
    notify = client.close(2.0)
    assert notify and notify[0][0] == 21  # an alert record
    for datagram in notify:
        server.receive(datagram, 2.0)
    assert server.closed and server.keys is not None
    assert server.receive(b"\x16" + bytes(30), 3.0) == []


def test_bad_identity() -> None:
    with pytest.raises(dtls.DtlsError):
        dtls.DtlsContext(control.Identity(certificate=b"nope", private_key=b"nope"))


def test_offered_profiles_are_libsrtp_ones() -> None:
    # Best first (RFC 5764 4.1.1: the client's order is its preference), and each one has
    # a libsrtp policy the relay can make.
    offered = dtls.SRTP_PROFILES.split(b":")
    assert offered == [
        b"SRTP_AEAD_AES_256_GCM",
        b"SRTP_AEAD_AES_128_GCM",
        b"SRTP_AES128_CM_SHA1_80",
    ]
    for suite in ("AEAD_AES_256_GCM", "AEAD_AES_128_GCM", "AES_CM_128_HMAC_SHA1_80"):
        key = control.SrtpKey(suite=suite, key_salt=bytes(KEY_SALT_LENGTHS[suite]))
        SrtpSender(key).protect(bytes([0x80, 0]) + bytes(10))
