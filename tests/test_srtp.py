"""SRTP contexts (sbc.media.srtp): RFC 3711 appendix B vectors, libsrtp's known answer, an
independent model of AES_CM_128_HMAC_SHA1_80 (RFC 3711 4.1.1, 4.2, 4.3) built from
`cryptography`, and round trips of every supported suite."""

from __future__ import annotations

import hashlib
import hmac
import os
import struct

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from sbc.media.control import SrtpKey
from sbc.media.srtp import (
    KEY_SALT_LENGTHS,
    PROFILES,
    SrtpError,
    SrtpReceiver,
    SrtpSender,
)
from sbc.sdp.sdes import SUPPORTED_SUITES

# RFC 3711 B.3 master key and salt; libsrtp's srtp_driver.c uses the same key||salt.
MASTER_KEY = bytes.fromhex("E1F97A0D3E018BE0D64FA32C06DE4139")
MASTER_SALT = bytes.fromhex("0EC675AD498AFEEBB6960B3AABE6")
KEY_80 = SrtpKey(suite="AES_CM_128_HMAC_SHA1_80", key_salt=MASTER_KEY + MASTER_SALT)


def aes_ctr(key: bytes, iv: bytes, length: int) -> bytes:
    encryptor = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()
    return encryptor.update(bytes(length)) + encryptor.finalize()


def prf(master_key: bytes, master_salt: bytes, label: int, length: int) -> bytes:
    """RFC 3711 4.3.1 with key_derivation_rate 0 (r = 0) and the AES-CM PRF of 4.3.3:
    x = (label || r) XOR master_salt, keystream from IV = x * 2^16."""
    x = int.from_bytes(master_salt, "big") ^ (label << 48)
    return aes_ctr(master_key, (x << 16).to_bytes(16, "big"), length)


def rtp(seq: int, ssrc: int = 0xDECAFBAD, payload: bytes = b"\xab" * 16, ts: int = 0) -> bytes:
    return struct.pack("!BBHII", 0x80, 0x0F, seq, ts, ssrc) + payload


def rtcp_sr(ssrc: int = 0xDECAFBAD) -> bytes:
    """An RTCP sender report (RFC 3550 6.4.1) without report blocks."""
    return struct.pack("!BBHIIIIII", 0x80, 200, 6, ssrc, 1, 2, 3, 4, 5)


def model_protect(
    packet: bytes, roc: int, key: bytes = MASTER_KEY, salt: bytes = MASTER_SALT
) -> bytes:
    """AES_CM_128_HMAC_SHA1_80 SRTP of an RTP packet with a 12-byte header (RFC 3711 3.3)."""
    k_e = prf(key, salt, 0x00, 16)
    k_a = prf(key, salt, 0x01, 20)
    k_s = prf(key, salt, 0x02, 14)
    seq, ssrc = struct.unpack_from("!H", packet, 2)[0], struct.unpack_from("!I", packet, 8)[0]
    index = (roc << 16) | seq
    # RFC 3711 4.1.1: IV = (k_s * 2^16) XOR (SSRC * 2^64) XOR (i * 2^16)
    iv = (int.from_bytes(k_s, "big") << 16) ^ (ssrc << 64) ^ (index << 16)
    payload = packet[12:]
    stream = aes_ctr(k_e, iv.to_bytes(16, "big"), len(payload))
    body = packet[:12] + bytes(a ^ b for a, b in zip(payload, stream, strict=True))
    # RFC 3711 4.2: tag = HMAC-SHA1(k_a, header || ciphertext || ROC), 80 bits
    tag = hmac.new(k_a, body + struct.pack("!I", roc), hashlib.sha1).digest()[:10]
    return body + tag


def model_protect_rtcp(packet: bytes, srtcp_index: int) -> bytes:
    """AES_CM_128_HMAC_SHA1_80 SRTCP (RFC 3711 3.4): the first 8 bytes stay clear, the rest is
    encrypted; E=1 || 31-bit index and the tag follow."""
    k_e = prf(MASTER_KEY, MASTER_SALT, 0x03, 16)
    k_a = prf(MASTER_KEY, MASTER_SALT, 0x04, 20)
    k_s = prf(MASTER_KEY, MASTER_SALT, 0x05, 14)
    ssrc = struct.unpack_from("!I", packet, 4)[0]
    iv = (int.from_bytes(k_s, "big") << 16) ^ (ssrc << 64) ^ (srtcp_index << 16)
    stream = aes_ctr(k_e, iv.to_bytes(16, "big"), len(packet) - 8)
    body = packet[:8] + bytes(a ^ b for a, b in zip(packet[8:], stream, strict=True))
    body += struct.pack("!I", 0x80000000 | srtcp_index)
    return body + hmac.new(k_a, body, hashlib.sha1).digest()[:10]


# -- suites ------------------------------------------------------------------------------------


def test_supported_suites_and_key_lengths() -> None:
    assert (
        set(PROFILES)
        == set(SUPPORTED_SUITES)
        == {
            "AES_CM_128_HMAC_SHA1_80",
            "AES_CM_128_HMAC_SHA1_32",
            "AEAD_AES_128_GCM",
            "AEAD_AES_256_GCM",
        }
    )
    assert KEY_SALT_LENGTHS == {
        "AES_CM_128_HMAC_SHA1_80": 30,  # RFC 3711 8.2
        "AES_CM_128_HMAC_SHA1_32": 30,
        "AEAD_AES_128_GCM": 28,  # RFC 7714 12
        "AEAD_AES_256_GCM": 44,
    }


def test_unsupported_suite_and_bad_key_length_are_refused() -> None:
    with pytest.raises(SrtpError, match="unsupported"):
        SrtpSender(SrtpKey(suite="AES_256_CM_HMAC_SHA1_80", key_salt=bytes(46)))
    with pytest.raises(SrtpError, match="unsupported"):
        SrtpReceiver(SrtpKey(suite="F8_128_HMAC_SHA1_80", key_salt=bytes(30)))
    with pytest.raises(SrtpError, match="expected 30"):
        SrtpReceiver(SrtpKey(suite="AES_CM_128_HMAC_SHA1_80", key_salt=bytes(31)))
    with pytest.raises(SrtpError, match="expected 44"):
        SrtpSender(SrtpKey(suite="AEAD_AES_256_GCM", key_salt=bytes(28)))


# -- RFC 3711 appendix B: our reading of the key format ----------------------------------------


def test_rfc3711_b2_aes_cm_keystream() -> None:
    key = bytes.fromhex("2B7E151628AED2A6ABF7158809CF4F3C")
    salt = bytes.fromhex("F0F1F2F3F4F5F6F7F8F9FAFBFCFD")  # 112-bit session salt
    iv = (int.from_bytes(salt, "big") << 16).to_bytes(16, "big")  # SSRC 0, index 0
    assert iv.hex().upper() == "F0F1F2F3F4F5F6F7F8F9FAFBFCFD0000"
    stream = aes_ctr(key, iv, 0xFF02 * 16)
    assert stream[:48].hex().upper() == (
        "E03EAD0935C95E80E166B16DD92B4EB4"
        "D23513162B02D0F72A43A2FE4A5F97AB"
        "41E95B3BB0A2E8DD477901E4FCA894C0"
    )
    assert stream[0xFEFF * 16 :].hex().upper() == (
        "EC8CDF7398607CB0F2D21675EA9EA1E4"
        "362B7C3C6773516318A077D7FC5073AE"
        "6A2CC3787889374FBEB4C81B17BA6C44"
    )


def test_rfc3711_b3_key_derivation() -> None:
    assert prf(MASTER_KEY, MASTER_SALT, 0x00, 16).hex().upper() == (
        "C61E7A93744F39EE10734AFE3FF7A087"
    )
    assert prf(MASTER_KEY, MASTER_SALT, 0x02, 14).hex().upper() == "30CBBC08863D8C85D49DB34A9AE1"
    assert prf(MASTER_KEY, MASTER_SALT, 0x01, 20).hex().upper() == (
        "CEBE321F6FF7716B6FD4AB49AF256A156D38BAA4"
    )


# -- known answers -----------------------------------------------------------------------------


def test_libsrtp_known_answer_aes_cm_128_hmac_sha1_80() -> None:
    """libsrtp test/srtp_driver.c, srtp_validate(): key||salt e1f97a...aabe6."""
    plain = bytes.fromhex("800f1234decafbadcafebabe" + "abababab" * 4)
    cipher = bytes.fromhex(
        "800f1234decafbadcafebabe4e55dc4ce79978d88ca4d215949d2402b78d6acc99ea179b8dbb"
    )
    assert SrtpSender(KEY_80).protect(plain) == cipher
    assert SrtpReceiver(KEY_80).unprotect(cipher) == plain
    assert model_protect(plain, roc=0) == cipher


def test_protect_matches_the_rfc3711_model_across_a_sequence_wrap() -> None:
    """RFC 3711 3.3.1: the sender's ROC goes to 1 when the sequence number wraps, and the
    receiver estimates it (RFC 3711 3.3.1, appendix A)."""
    sender, receiver = SrtpSender(KEY_80), SrtpReceiver(KEY_80)
    payload = os.urandom(160)
    for seq, roc in ((65534, 0), (65535, 0), (0, 1), (1, 1), (2, 1)):
        packet = rtp(seq, ssrc=0x11223344, payload=payload)
        protected = sender.protect(packet)
        assert protected == model_protect(packet, roc=roc), (seq, roc)
        assert receiver.unprotect(protected) == packet


def test_protect_rtcp_matches_the_rfc3711_model() -> None:
    sender, receiver = SrtpSender(KEY_80), SrtpReceiver(KEY_80)
    for index in range(3):
        report = rtcp_sr()
        protected = sender.protect_rtcp(report)
        assert protected == model_protect_rtcp(report, index + 1)  # libsrtp starts at 1
        assert receiver.unprotect_rtcp(protected) == report


# -- round trips of every suite ----------------------------------------------------------------


@pytest.mark.parametrize("suite", sorted(SUPPORTED_SUITES))
def test_round_trip_rtp_and_rtcp(suite: str) -> None:
    key = SrtpKey(suite=suite, key_salt=os.urandom(KEY_SALT_LENGTHS[suite]))
    sender, receiver = SrtpSender(key), SrtpReceiver(key)
    for seq in range(100, 110):
        packet = rtp(seq, payload=os.urandom(172))
        protected = sender.protect(packet)
        assert protected != packet and protected[:12] == packet[:12]
        assert receiver.unprotect(protected) == packet
    report = rtcp_sr()
    protected = sender.protect_rtcp(report)
    assert receiver.unprotect_rtcp(protected) == report


@pytest.mark.parametrize("suite", sorted(SUPPORTED_SUITES))
def test_tampered_replayed_and_wrongly_keyed_packets_fail(suite: str) -> None:
    key = SrtpKey(suite=suite, key_salt=os.urandom(KEY_SALT_LENGTHS[suite]))
    other = SrtpKey(suite=suite, key_salt=os.urandom(KEY_SALT_LENGTHS[suite]))
    sender, receiver = SrtpSender(key), SrtpReceiver(key)
    first = sender.protect(rtp(1))
    tampered = bytearray(first)
    tampered[20] ^= 1
    with pytest.raises(SrtpError):
        receiver.unprotect(bytes(tampered))
    with pytest.raises(SrtpError):
        SrtpReceiver(other).unprotect(first)
    assert receiver.unprotect(first) == rtp(1)  # the failures changed nothing
    with pytest.raises(SrtpError):  # RFC 3711 3.3.2 replay
        receiver.unprotect(first)
    report = sender.protect_rtcp(rtcp_sr())
    assert receiver.unprotect_rtcp(report) == rtcp_sr()
    with pytest.raises(SrtpError):
        receiver.unprotect_rtcp(report)
    bad_report = bytearray(sender.protect_rtcp(rtcp_sr()))
    bad_report[10] ^= 0x80
    with pytest.raises(SrtpError):
        receiver.unprotect_rtcp(bytes(bad_report))
    # garbage that is not even an RTP header
    with pytest.raises(SrtpError):
        receiver.unprotect(b"\x80\x00")
    with pytest.raises(SrtpError):
        receiver.unprotect_rtcp(b"\x80\xc8\x00")


def test_a_new_ssrc_gets_its_own_context() -> None:
    sender, receiver = SrtpSender(KEY_80), SrtpReceiver(KEY_80)
    for seq, ssrc in ((5000, 1), (5000, 2), (5001, 1), (5000, 3)):
        assert receiver.unprotect(sender.protect(rtp(seq, ssrc=ssrc))) == rtp(seq, ssrc=ssrc)
    # the same sequence number under a new SSRC is not a replay
    assert receiver.unprotect(sender.protect(rtp(5001, ssrc=4))) == rtp(5001, ssrc=4)


def test_a_duplicate_is_not_protected_twice_with_the_same_keystream() -> None:
    sender = SrtpSender(KEY_80)
    sender.protect(rtp(7))
    sender.protect(rtp(9))
    sender.protect(rtp(8))  # reordered within the window: fine
    with pytest.raises(SrtpError):
        sender.protect(rtp(7, payload=b"\x00" * 16))  # RFC 3711 9.1: no keystream reuse
    repeating = SrtpSender(KEY_80, allow_repeat_tx=True)
    assert repeating.protect(rtp(7)) == repeating.protect(rtp(7))


def test_video_sized_packets_fit() -> None:
    """pylibsrtp's own buffer would refuse more than 1,356 bytes of plain RTP."""
    sender, receiver = SrtpSender(KEY_80), SrtpReceiver(KEY_80)
    for size in (1356, 1460, 8000):
        packet = rtp(size, payload=os.urandom(size - 12))
        assert receiver.unprotect(sender.protect(packet)) == packet
