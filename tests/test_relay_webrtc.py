"""RelayEngine with a WebRTC party (sbc.media.relay): ICE-lite checks, DTLS-SRTP and the
relay to a plain RTP or SDES-SRTP party. The test plays the browser: connectivity checks
built by hand (sbc.media.ice.binding_request), its own pyOpenSSL DTLS client with its own
certificate, and SRTP made with pylibsrtp from keys it exports itself (RFC 5764 4.2).
Fake clock, no sockets."""

from __future__ import annotations

import os
import struct

import pylibsrtp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL

from sbc.media import control, dtls, ice, relay
from sbc.media.control import Address, Party, SrtpKey, Stream, Update, WebRtc
from sbc.media.relay import Burst, RelayEngine, Result
from sbc.media.srtp import KEY_SALT_LENGTHS, SrtpReceiver, SrtpSender

BIND = "10.0.0.1"
PA, PB = 20000, 20002
BROWSER = ("192.0.2.50", 54321)  # the browser's host candidate
OTHER = ("192.0.2.50", 54999)  # another candidate of the browser
EVIL = ("203.0.113.66", 6666)
B = ("198.51.100.20", 5000)
UFRAG, PWD = "sbcU", "sbcpasswordsbcpassword"  # the SBC's ICE credentials (its SDP)

_PROFILES = {  # RFC 5764 4.1.2, RFC 7714 14.2: (suite, key length, salt length)
    b"SRTP_AEAD_AES_256_GCM": ("AEAD_AES_256_GCM", 32, 12),
    b"SRTP_AEAD_AES_128_GCM": ("AEAD_AES_128_GCM", 16, 12),
    b"SRTP_AES128_CM_SHA1_80": ("AES_CM_128_HMAC_SHA1_80", 16, 14),
}
_LIBSRTP = {
    "AEAD_AES_256_GCM": pylibsrtp.Policy.SRTP_PROFILE_AEAD_AES_256_GCM,
    "AEAD_AES_128_GCM": pylibsrtp.Policy.SRTP_PROFILE_AEAD_AES_128_GCM,
    "AES_CM_128_HMAC_SHA1_80": pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80,
}


class Browser:
    """The browser's DTLS side: pyOpenSSL on memory BIOs, its own self-signed certificate."""

    def __init__(self, *, client: bool = True, profiles: bytes = b"SRTP_AEAD_AES_128_GCM") -> None:
        identity, self.fingerprint = dtls.make_identity()
        ctx = SSL.Context(SSL.DTLS_METHOD)
        ctx.use_certificate(x509.load_pem_x509_certificate(identity.certificate))
        ctx.use_privatekey(serialization.load_pem_private_key(identity.private_key, None))  # type: ignore[arg-type]
        ctx.set_verify(SSL.VERIFY_PEER, lambda *args: True)
        ctx.set_tlsext_use_srtp(profiles)
        self.conn = SSL.Connection(ctx, None)
        self.client = client
        if client:
            self.conn.set_connect_state()
        else:
            self.conn.set_accept_state()
        self.done = False
        self.peer_cert: x509.Certificate | None = None

    def fingerprints(self) -> tuple[tuple[str, str], ...]:
        name, value = self.fingerprint.split(" ")
        return ((name, value),)

    def step(self, data: bytes | None = None) -> list[bytes]:
        if data is not None:
            self.conn.bio_write(data)
        if not self.done:
            try:
                self.conn.do_handshake()
                self.done = True
                self.peer_cert = self.conn.get_peer_certificate(as_cryptography=True)
            except SSL.WantReadError:
                pass
        out = b""
        while True:
            try:
                out += self.conn.bio_read(65536)
            except SSL.WantReadError:
                break
        return [out] if out else []

    def srtp(self) -> tuple[pylibsrtp.Session, pylibsrtp.Session, str]:
        """Its own SRTP sessions from the keys it exports (RFC 5764 4.2): (send, receive)."""
        suite, k, s = _PROFILES[self.conn.get_selected_srtp_profile()]
        m = self.conn.export_keying_material(b"EXTRACTOR-dtls_srtp", 2 * (k + s))
        client = m[:k] + m[2 * k : 2 * k + s]
        server = m[k : 2 * k] + m[2 * k + s :]
        mine, theirs = (client, server) if self.client else (server, client)
        profile = _LIBSRTP[suite]
        send = pylibsrtp.Session(
            pylibsrtp.Policy(
                key=mine, ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND, srtp_profile=profile
            )
        )
        recv = pylibsrtp.Session(pylibsrtp.Policy(
            key=theirs, ssrc_type=pylibsrtp.Policy.SSRC_ANY_INBOUND, srtp_profile=profile))  # fmt: skip
        return send, recv, suite


@pytest.fixture(scope="module")
def sbc_identity() -> tuple[control.Identity, str]:
    return dtls.make_identity()


def rtp(seq: int, ssrc: int = 0x1111, pt: int = 0) -> bytes:
    return struct.pack("!BBHII", 0x80, pt, seq, seq * 160, ssrc) + bytes(range(160))


def rtcp(ssrc: int = 0x1111) -> bytes:
    return struct.pack("!BBHIIIIII", 0x80, 200, 6, ssrc, 1, 2, 3, 4, 5)


def sdes_key() -> SrtpKey:
    suite = "AES_CM_128_HMAC_SHA1_80"
    return SrtpKey(suite=suite, key_salt=os.urandom(KEY_SALT_LENGTHS[suite]))


def webrtc_party(fingerprints: tuple[tuple[str, str], ...], *, client: bool = False,
                 ufrag: str = UFRAG, remote: Address | None = BROWSER) -> Party:  # fmt: skip
    return Party(
        bind=BIND, port=PA, rtcp_mux=True, remote=remote,
        webrtc=WebRtc(ufrag=ufrag, pwd=PWD, client=client, fingerprints=fingerprints),
    )  # fmt: skip


def plain_party(**kw: object) -> Party:
    return Party(bind=BIND, port=PB, remote=B, **kw)  # type: ignore[arg-type]


def update(a: Party, b: Party) -> Update:
    return Update(session="s1", streams=(Stream(index=0, a=a, b=b),))


def outs(result: Result) -> list[tuple[int, bytes, Address]]:
    if result is None:
        return []
    if isinstance(result, Burst):
        return list(result.packets)
    return [result]


def check(engine: RelayEngine, src: Address, *, use: bool = True, now: float = 0.0,
          pwd: str = PWD, ufrag: str = UFRAG) -> list[tuple[int, bytes, Address]]:  # fmt: skip
    request = ice.binding_request(
        os.urandom(12), username=f"{ufrag}:brws", pwd=pwd, use_candidate=use,
        tie_breaker=0x1234,
    )  # fmt: skip
    return outs(engine.receive(PA, request, src, now))


def drain(engine: RelayEngine, now: float) -> list[tuple[int, bytes, Address]]:
    """What the worker does between rounds of port reads: the queued DTLS records."""
    out: list[tuple[int, bytes, Address]] = []
    while engine.dtls_backlog:
        out += engine.dtls_step(now)
    return out


def handshake(engine: RelayEngine, browser: Browser, src: Address = BROWSER,
              first: list[bytes] | None = None, now: float = 0.0) -> None:  # fmt: skip
    """Move DTLS datagrams between the browser and the relay until both are quiet."""
    pending = first if first is not None else browser.step()
    for _ in range(10):
        if not pending:
            return
        back: list[bytes] = []
        for datagram in pending:
            assert engine.receive(PA, datagram, src, now) is None  # queued, not handled
            for port, data, dest in drain(engine, now):
                assert port == PA and dest == src
                back.extend(browser.step(data))
        pending = back


def setup(sbc_identity: tuple[control.Identity, str], b: Party | None = None,
          **kw: object) -> tuple[RelayEngine, Browser]:  # fmt: skip
    engine = RelayEngine()
    assert engine.set_identity(sbc_identity[0])
    browser = Browser()
    engine.update(update(webrtc_party(browser.fingerprints(), **kw), b or plain_party()), 0.0)  # type: ignore[arg-type]
    return engine, browser


def connected(sbc_identity: tuple[control.Identity, str], b: Party | None = None):  # type: ignore[no-untyped-def]
    engine, browser = setup(sbc_identity, b)
    check(engine, BROWSER)
    handshake(engine, browser)
    assert browser.done
    send, recv, _ = browser.srtp()
    return engine, browser, send, recv


def stats(engine: RelayEngine, side: str = "a") -> control.PartyStats:
    stream = engine.stats("s1").streams[0]
    return stream.a if side == "a" else stream.b


# -- ICE ---------------------------------------------------------------------------------------


def test_a_check_is_answered_from_the_port_and_latches(sbc_identity) -> None:  # type: ignore[no-untyped-def]
    engine, _ = setup(sbc_identity)
    ((port, response, dest),) = check(engine, BROWSER, use=False)
    assert (port, dest) == (PA, BROWSER)
    msg = ice.parse(response)
    assert msg.type == ice.BINDING_SUCCESS
    assert msg.integrity_ok(PWD.encode()) and msg.fingerprint_ok()
    value = msg.get(ice.XOR_MAPPED_ADDRESS)
    assert value is not None and ice.read_xor_address(value, msg.transaction) == BROWSER
    assert stats(engine).latched == BROWSER  # the first valid check latches


def test_bad_checks_get_errors_and_latch_nothing(sbc_identity) -> None:  # type: ignore[no-untyped-def]
    engine, _ = setup(sbc_identity)
    ((_, response, dest),) = check(engine, EVIL, pwd="wrongwrongwrongwrong")
    assert dest == EVIL and ice.parse(response).type == ice.BINDING_ERROR
    ((_, response, _),) = check(engine, EVIL, ufrag="nope")
    assert ice.parse(response).type == ice.BINDING_ERROR
    assert stats(engine).latched is None
    assert engine.totals().invalid == 2
    assert engine.receive(PA, b"\x00\x01garbage", EVIL, 0.0) is None  # not STUN: dropped
    assert engine.receive(PA, b"\x64" + bytes(20), EVIL, 0.0) is None  # RFC 7983: no range
    assert engine.receive(PA, b"", EVIL, 0.0) is None
    assert engine.totals().invalid == 5
    # A bare Binding request (20 bytes, maybe from a forged source) would get a larger 400:
    # not answered, so the relay amplifies nothing.
    bare = struct.pack("!HHI", ice.BINDING_REQUEST, 0, ice.MAGIC_COOKIE) + os.urandom(12)
    assert engine.receive(PA, bare, EVIL, 0.0) is None
    assert engine.totals().invalid == 6


def test_use_candidate_moves_the_pair(sbc_identity) -> None:  # type: ignore[no-untyped-def]
    engine, _browser, send, recv = connected(sbc_identity)
    check(engine, OTHER, use=False)  # answered, but not nominated: no move
    assert stats(engine).latched == BROWSER
    assert check(engine, OTHER, use=True)
    assert stats(engine).latched == OTHER
    # media now flows with the new address, both ways, keys kept
    assert outs(engine.receive(PA, send.protect(rtp(1)), OTHER, 1.0)) == [(PB, rtp(1), B)]
    ((port, data, dest),) = outs(engine.receive(PB, rtp(7, ssrc=0x2222), B, 1.0))
    assert (port, dest) == (PA, OTHER) and recv.unprotect(data) == rtp(7, ssrc=0x2222)
    assert engine.receive(PA, send.protect(rtp(2)), BROWSER, 1.0) is None  # the old one


# -- DTLS-SRTP ---------------------------------------------------------------------------------


def test_handshake_then_srtp_both_ways_with_plain_rtp(sbc_identity) -> None:  # type: ignore[no-untyped-def]
    engine, browser, send, recv = connected(sbc_identity)
    assert browser.peer_cert is not None
    assert dtls.matches(browser.peer_cert, (tuple(sbc_identity[1].split(" ")),))  # type: ignore[arg-type]
    # browser -> b: decrypted
    assert outs(engine.receive(PA, send.protect(rtp(1)), BROWSER, 1.0)) == [(PB, rtp(1), B)]
    assert outs(engine.receive(PA, send.protect_rtcp(rtcp()), BROWSER, 1.0)) == [
        (PB + 1, rtcp(), (B[0], B[1] + 1))
    ]
    # b -> browser: protected, to the latched address
    ((port, data, dest),) = outs(engine.receive(PB, rtp(5, ssrc=0x2222), B, 1.0))
    assert (port, dest) == (PA, BROWSER) and data != rtp(5, ssrc=0x2222)
    assert recv.unprotect(data) == rtp(5, ssrc=0x2222)
    ((port, data, dest),) = outs(engine.receive(PB + 1, rtcp(0x2222), (B[0], B[1] + 1), 1.0))
    assert (port, dest) == (PA, BROWSER) and recv.unprotect_rtcp(data) == rtcp(0x2222)
    s = stats(engine)
    assert s.packets_in == 2 and s.packets_out == 2 and s.srtp_failures == 0


def test_sdes_srtp_party(sbc_identity) -> None:  # type: ignore[no-untyped-def]
    recv_key, send_key = sdes_key(), sdes_key()
    engine, _browser, send, recv = connected(
        sbc_identity, plain_party(recv_key=recv_key, send_key=send_key)
    )
    ((port, data, dest),) = outs(engine.receive(PA, send.protect(rtp(1)), BROWSER, 1.0))
    assert (port, dest) == (PB, B)
    assert SrtpReceiver(send_key).unprotect(data) == rtp(1)
    phone = SrtpSender(recv_key)
    ((port, data, dest),) = outs(engine.receive(PB, phone.protect(rtp(9, ssrc=0x3333)), B, 1.0))
    assert dest == BROWSER and recv.unprotect(data) == rtp(9, ssrc=0x3333)


def test_media_from_an_unlatched_address_is_dropped(sbc_identity) -> None:  # type: ignore[no-untyped-def]
    engine, _browser, send, _ = connected(sbc_identity)
    assert engine.receive(PA, send.protect(rtp(1)), EVIL, 1.0) is None
    assert stats(engine).dropped_source == 1
    # and DTLS from elsewhere is not answered
    assert engine.receive(PA, b"\x16\xfe\xfd" + bytes(40), EVIL, 1.0) is None
    assert stats(engine).dropped_source == 2


def test_nothing_goes_to_the_browser_before_the_handshake(sbc_identity) -> None:  # type: ignore[no-untyped-def]
    engine, browser = setup(sbc_identity)
    assert engine.receive(PB, rtp(1), B, 0.0) is None  # nothing latched
    check(engine, BROWSER)
    assert engine.receive(PB, rtp(2), B, 0.0) is None  # latched, but no keys yet
    assert engine.totals().no_destination == 2
    assert stats(engine).packets_out == 0
    # SRTP from the browser before the keys: dropped
    assert engine.receive(PA, rtp(3), BROWSER, 0.0) is None
    handshake(engine, browser)
    assert engine.receive(PB, rtp(4), B, 0.0) is not None


def test_identical_update_keeps_the_keys(sbc_identity) -> None:  # type: ignore[no-untyped-def]
    engine, browser, send, recv = connected(sbc_identity)
    party = webrtc_party(browser.fingerprints())
    # a re-INVITE for hold: the same WebRTC parameters, the party now sendonly
    changes = engine.update(update(party, plain_party(sends=False)), 5.0)
    assert not changes
    assert outs(engine.receive(PA, send.protect(rtp(1)), BROWSER, 5.0)) == [(PB, rtp(1), B)]
    ((_, data, dest),) = outs(engine.receive(PB, rtp(2, ssrc=0x2222), B, 5.0))
    assert dest == BROWSER and recv.unprotect(data) == rtp(2, ssrc=0x2222)


def test_an_ice_restart_keeps_the_dtls_association(sbc_identity) -> None:  # type: ignore[no-untyped-def]
    engine, browser, send, recv = connected(sbc_identity)
    restarted = webrtc_party(browser.fingerprints(), ufrag="sbcV")  # new SBC credentials
    engine.update(update(restarted, plain_party()), 5.0)
    # The keys and the pair stay; checks now need the new credentials, and a nomination
    # from the browser's new candidate moves the pair.
    assert outs(engine.receive(PA, send.protect(rtp(1)), BROWSER, 5.0)) == [(PB, rtp(1), B)]
    ((_, response, _),) = check(engine, OTHER, ufrag="sbcU", now=5.0)
    assert ice.parse(response).type == ice.BINDING_ERROR
    assert check(engine, OTHER, ufrag="sbcV", now=5.0)
    ((_, data, dest),) = outs(engine.receive(PB, rtp(2, ssrc=0x2222), B, 5.1))
    assert dest == OTHER and recv.unprotect(data) == rtp(2, ssrc=0x2222)


def test_changed_fingerprint_restarts(sbc_identity) -> None:  # type: ignore[no-untyped-def]
    engine, _browser, send, _ = connected(sbc_identity)
    other = Browser()
    engine.update(update(webrtc_party(other.fingerprints()), plain_party()), 5.0)
    assert engine.receive(PA, send.protect(rtp(1)), BROWSER, 5.0) is None  # no latch, no keys
    assert engine.receive(PB, rtp(2), B, 5.0) is None
    assert stats(engine).latched is None
    # the new browser (new certificate) checks and shakes hands afresh
    check(engine, BROWSER, now=6.0)
    handshake(engine, other, now=6.0)
    send2, _recv2, _ = other.srtp()
    assert outs(engine.receive(PA, send2.protect(rtp(3)), BROWSER, 6.0)) == [(PB, rtp(3), B)]


def test_wrong_fingerprint_gives_no_keys(sbc_identity) -> None:  # type: ignore[no-untyped-def]
    engine = RelayEngine()
    engine.set_identity(sbc_identity[0])
    browser = Browser()
    wrong = (("sha-256", ":".join(["AB"] * 32)),)
    engine.update(update(webrtc_party(wrong), plain_party()), 0.0)
    check(engine, BROWSER)
    handshake(engine, browser)
    assert stats(engine).srtp_failures == 1  # the failed handshake
    assert engine.receive(PB, rtp(1), B, 1.0) is None  # still nothing to the browser
    assert engine.totals().no_destination == 1


def test_fingerprints_that_come_after_the_handshake_are_checked_then(sbc_identity) -> None:  # type: ignore[no-untyped-def]
    """The SBC's offer to a browser: the browser answers and starts ICE and DTLS at once,
    so the handshake may end before the answer's fingerprints reach the worker."""
    engine = RelayEngine()
    engine.set_identity(sbc_identity[0])
    browser = Browser()
    engine.update(update(webrtc_party(()), plain_party()), 0.0)  # the SBC's offer
    check(engine, BROWSER)
    handshake(engine, browser)
    assert browser.done and stats(engine).srtp_failures == 0
    assert engine.receive(PB, rtp(1), B, 0.1) is None  # not verified yet: nothing sent
    # The answer: the same parameters and now the fingerprints; the association stays.
    engine.update(update(webrtc_party(browser.fingerprints()), plain_party()), 0.2)
    send, recv, _ = browser.srtp()
    assert outs(engine.receive(PA, send.protect(rtp(2)), BROWSER, 0.3)) == [(PB, rtp(2), B)]
    ((_, data, dest),) = outs(engine.receive(PB, rtp(3, ssrc=0x2222), B, 0.3))
    assert dest == BROWSER and recv.unprotect(data) == rtp(3, ssrc=0x2222)
    # Another browser's answer (wrong fingerprints) fails the association, nothing leaks.
    engine = RelayEngine()
    engine.set_identity(sbc_identity[0])
    engine.update(update(webrtc_party(()), plain_party()), 0.0)
    check(engine, BROWSER)
    handshake(engine, Browser())
    engine.update(update(webrtc_party(browser.fingerprints()), plain_party()), 0.2)
    assert stats(engine).srtp_failures == 1
    assert engine.receive(PB, rtp(4), B, 0.3) is None


def test_sbc_as_dtls_client(sbc_identity) -> None:  # type: ignore[no-untyped-def]
    engine = RelayEngine()
    engine.set_identity(sbc_identity[0])
    browser = Browser(client=False)
    engine.update(update(webrtc_party(browser.fingerprints(), client=True), plain_party()), 0.0)
    assert engine.next_dtls() is None
    sent = check(engine, BROWSER, now=10.0)
    assert len(sent) == 2  # the STUN answer, then the ClientHello to the latched address
    (_, hello, dest) = sent[1]
    assert dest == BROWSER and hello[0] == 22
    due = engine.next_dtls()
    assert due is not None and 10.5 < due <= 11.0  # RFC 6347 4.2.4.1
    assert engine.next_deadline() == due  # no media timeout is nearer
    assert engine.dtls_due(10.2) == []
    assert len(check(engine, BROWSER, now=10.3)) == 1  # started once
    handshake(engine, browser, first=browser.step(hello), now=10.4)
    assert browser.done
    assert engine.next_dtls() is None
    send, recv, _ = browser.srtp()
    assert outs(engine.receive(PA, send.protect(rtp(1)), BROWSER, 11.0)) == [(PB, rtp(1), B)]
    ((_, data, _),) = outs(engine.receive(PB, rtp(2, ssrc=0x2222), B, 11.0))
    assert recv.unprotect(data) == rtp(2, ssrc=0x2222)


def test_dtls_timer_goes_when_the_session_does(sbc_identity) -> None:  # type: ignore[no-untyped-def]
    engine = RelayEngine()
    engine.set_identity(sbc_identity[0])
    browser = Browser(client=False)
    engine.update(update(webrtc_party(browser.fingerprints(), client=True), plain_party()), 0.0)
    check(engine, BROWSER)
    assert engine.next_dtls() is not None
    engine.delete("s1")
    assert engine.next_dtls() is None and engine.dtls_due(100.0) == []


def test_without_identity_a_webrtc_party_relays_nothing() -> None:
    engine = RelayEngine()
    browser = Browser()
    engine.update(update(webrtc_party(browser.fingerprints()), plain_party()), 0.0)
    request = ice.binding_request(os.urandom(12), username=f"{UFRAG}:x", pwd=PWD)
    assert engine.receive(PA, request, BROWSER, 0.0) is None
    assert stats(engine).srtp_failures == 1
    assert not engine.set_identity(control.Identity(certificate=b"x", private_key=b"y"))


def test_party_that_stops_being_webrtc(sbc_identity) -> None:  # type: ignore[no-untyped-def]
    engine, _browser, _send, _ = connected(sbc_identity)
    plain_a = Party(bind=BIND, port=PA, remote=BROWSER, rtcp_mux=True)
    engine.update(update(plain_a, plain_party()), 2.0)
    assert outs(engine.receive(PA, rtp(1), BROWSER, 2.0)) == [(PB, rtp(1), B)]
    assert outs(engine.receive(PB, rtp(2), B, 2.0)) == [(PA, rtp(2), BROWSER)]


def test_control_round_trip_of_identity_and_webrtc(sbc_identity) -> None:  # type: ignore[no-untyped-def]
    identity = sbc_identity[0]
    assert control.decode(control.encode(identity)) == identity
    msg = update(webrtc_party((("sha-256", "AB:CD"), ("sha-1", "01:02")), client=True),
                 plain_party())  # fmt: skip
    assert control.decode(control.encode(msg)) == msg


def test_dtls_records_wait_in_a_bounded_queue(sbc_identity) -> None:  # type: ignore[no-untyped-def]
    """The handshakes' public-key work is done in steps between rounds of port reads
    (bench/webrtc.py): a DTLS record is queued, not handled where it arrives, and media
    of other calls is relayed meanwhile; a full queue drops records (the peer retransmits)."""
    engine, browser = setup(sbc_identity)
    check(engine, BROWSER)
    hello = browser.step()
    assert engine.receive(PA, hello[0], BROWSER, 0.0) is None
    assert len(engine.dtls_backlog) == 1
    # The server's answer to the ClientHello comes from the step, sent to the latched pair.
    ((port, data, dest),) = drain(engine, 0.0)
    assert (port, dest) == (PA, BROWSER) and data[0] == 22  # the server's flight
    for _ in range(relay.DTLS_BACKLOG + 5):
        engine.receive(PA, hello[0], BROWSER, 0.1)
    assert len(engine.dtls_backlog) == relay.DTLS_BACKLOG
    assert engine.totals().dtls_dropped == 5
    # A record of a leg whose session is gone is skipped.
    engine.delete("s1")
    assert drain(engine, 0.2) == [] and not engine.dtls_backlog
