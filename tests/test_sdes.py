"""SDES a=crypto (RFC 4568): parse/str round trips of real lines, errors, key generation."""

from __future__ import annotations

import base64

import pytest

from sbc.sdp import SUITES, Crypto, SdpError, Session, find_suite

# RFC 4568 9.1 / 6 examples
RFC_80 = "1 AES_CM_128_HMAC_SHA1_80 inline:PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR|2^20|1:32"
RFC_32 = "2 AES_CM_128_HMAC_SHA1_32 inline:NzB4d1BINUAvLEw6UzF3WSJ+PSdFcGdUJShpX1Zj|2^20|1:32"
KEY30 = "PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR"


@pytest.mark.parametrize(
    "line",
    [
        RFC_80,
        RFC_32,
        # baresip, linphone: no lifetime, no MKI
        "1 AES_CM_128_HMAC_SHA1_32 inline:e2FUGZTmuX5w4JQji+oZQFWGipAiP7geW+IO6Jam",
        "2 AES_CM_128_HMAC_SHA1_80 inline:tjjtBR/TiF/PYi6bDQHW9RiaEMc9TAZkVsdH8nnw",
        # Asterisk / Cisco
        "1 AES_CM_128_HMAC_SHA1_80 inline:BF0tjFOOCYtSRxvQdMM6WZo4mhx+5osl1sNIb+QZ|2^31|1:1",
        "3 AES_CM_128_HMAC_SHA1_80 inline:BF0tjFOOCYtSRxvQdMM6WZo4mhx+5osl1sNIb+QZ UNENCRYPTED_SRTCP",
        "4 AES_CM_128_HMAC_SHA1_80 inline:BF0tjFOOCYtSRxvQdMM6WZo4mhx+5osl1sNIb+QZ KDR=1 FEC_ORDER=FEC_SRTP",
        # RFC 6188 (46 bytes: padded base64)
        "5 AES_256_CM_HMAC_SHA1_80 inline:DEXI95x3LekVCvMfUlYg4+thIA/GBS+3vvnGjzciyyV9G0c587HN43MjKdWZeg==",
        # RFC 4568 9.1: several key-params with MKI
        f"6 AES_CM_128_HMAC_SHA1_80 inline:{KEY30}|2^20|1:4;inline:BF0tjFOOCYtSRxvQdMM6WZo4mhx+5osl1sNIb+QZ|2^20|2:4",
        # unknown suite: parses, length not checked
        "7 NEW_SUITE_9000 inline:AAAA",
    ],
)
def test_round_trip(line: str) -> None:
    assert str(Crypto.parse(line)) == line


def test_rfc_example_fields() -> None:
    c = Crypto.parse(RFC_80)
    assert c == Crypto(
        tag=1,
        suite="AES_CM_128_HMAC_SHA1_80",
        key_salt=base64.b64decode(KEY30),
        lifetime=1 << 20,
        mki=(1, 32),
        keys=1,
        session_params=(),
    )
    assert len(c.key_salt) == 30
    assert c.suite_info == SUITES["AES_CM_128_HMAC_SHA1_80"]
    multi = Crypto.parse(f"6 AES_CM_128_HMAC_SHA1_80 inline:{KEY30}|1:4;inline:{KEY30}|2:4")
    assert (multi.keys, multi.mki, multi.lifetime) == (2, (1, 4), None)


def test_lenient_forms() -> None:
    unpadded = Crypto.parse(
        "5 AES_256_CM_HMAC_SHA1_80 inline:DEXI95x3LekVCvMfUlYg4+thIA/GBS+3vvnGjzciyyV9G0c587HN43MjKdWZeg"
    )
    assert len(unpadded.key_salt) == 46
    assert str(unpadded).endswith("Zeg==")  # rendered padded, as phones do
    decimal = Crypto.parse(f"1 AES_CM_128_HMAC_SHA1_80 inline:{KEY30}|1048576")
    assert decimal.lifetime == 1048576 and decimal.mki is None
    assert str(decimal) == f"1 AES_CM_128_HMAC_SHA1_80 inline:{KEY30}|2^20"
    odd = Crypto.parse(f"1 AES_CM_128_HMAC_SHA1_80 INLINE:{KEY30}|1000")
    assert str(odd) == f"1 AES_CM_128_HMAC_SHA1_80 inline:{KEY30}|1000"
    mki_only = Crypto.parse(f"1 aes_cm_128_hmac_sha1_80 inline:{KEY30}|7:2")
    assert (mki_only.lifetime, mki_only.mki, mki_only.suite) == (
        None,
        (7, 2),
        "aes_cm_128_hmac_sha1_80",
    )
    assert mki_only.suite_info is SUITES["AES_CM_128_HMAC_SHA1_80"]
    assert find_suite("nope") is None


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("1 AES_CM_128_HMAC_SHA1_80", "a=crypto: needs tag, suite and key-params"),
        ("", "a=crypto: needs tag, suite and key-params"),
        (f"0 AES_CM_128_HMAC_SHA1_80 inline:{KEY30}", "a=crypto: tag must be 1-999999999"),
        (f"1000000000 AES_CM_128_HMAC_SHA1_80 inline:{KEY30}", "a=crypto: tag must be 1-999999999"),
        (f"x AES_CM_128_HMAC_SHA1_80 inline:{KEY30}", "a=crypto: tag must be 1-999999999"),
        (f"-1 AES_CM_128_HMAC_SHA1_80 inline:{KEY30}", "a=crypto: tag must be 1-999999999"),
        (f"1 AES_CM_128_HMAC_SHA1_80 uri:{KEY30}", "a=crypto: key method must be inline"),
        (f"1 AES_CM_128_HMAC_SHA1_80 {KEY30}", "a=crypto: key method must be inline"),
        (
            "1 AES_CM_128_HMAC_SHA1_80 inline:PS1uQCVe*CFCanVmcjkpPywjNWhcYD0mXXtxaVBR",
            "a=crypto: bad base64 key",
        ),
        ("1 AES_CM_128_HMAC_SHA1_80 inline:PS1uQ", "a=crypto: bad base64 key"),
        ("1 AES_CM_128_HMAC_SHA1_80 inline:PS=uQCVe", "a=crypto: bad base64 key"),
        ("1 AES_CM_128_HMAC_SHA1_80 inline:|2^20", "a=crypto: bad base64 key"),
        (
            "1 AES_CM_128_HMAC_SHA1_80 inline:PS1uQCVeeCFCanVmcjkpPywjNWh",
            "a=crypto: key length 20 for AES_CM_128_HMAC_SHA1_80, expected 30",
        ),
        (
            f"1 AEAD_AES_256_GCM inline:{KEY30}",
            "a=crypto: key length 30 for AEAD_AES_256_GCM, expected 44",
        ),
        (f"1 AES_CM_128_HMAC_SHA1_80 inline:{KEY30}|2^99", "a=crypto: bad lifetime"),
        (f"1 AES_CM_128_HMAC_SHA1_80 inline:{KEY30}|2^", "a=crypto: bad lifetime"),
        (f"1 AES_CM_128_HMAC_SHA1_80 inline:{KEY30}|0", "a=crypto: bad lifetime"),
        (f"1 AES_CM_128_HMAC_SHA1_80 inline:{KEY30}|1:0", "a=crypto: bad MKI"),
        (f"1 AES_CM_128_HMAC_SHA1_80 inline:{KEY30}|1:129", "a=crypto: bad MKI"),
        (f"1 AES_CM_128_HMAC_SHA1_80 inline:{KEY30}|256:1", "a=crypto: bad MKI"),
        (f"1 AES_CM_128_HMAC_SHA1_80 inline:{KEY30}|1:4|2^20", "a=crypto: bad MKI"),
        (f"1 AES_CM_128_HMAC_SHA1_80 inline:{KEY30}|1:4|2:4", "a=crypto: bad MKI"),
        (
            f"1 AES_CM_128_HMAC_SHA1_80 inline:{KEY30}|2^20|1:4|x",
            "a=crypto: too many key-info fields",
        ),
        (
            f"1 AES_CM_128_HMAC_SHA1_80 inline:{KEY30}|1:4;inline:AAAA|2:4",
            "a=crypto: key-params differ in length",
        ),
        (
            f"1 AES_CM_128_HMAC_SHA1_80 inline:{KEY30}|1:4;uri:x",
            "a=crypto: key method must be inline",
        ),
    ],
)
def test_errors(line: str, reason: str) -> None:
    with pytest.raises(SdpError) as info:
        Crypto.parse(line)
    assert str(info.value) == reason


@pytest.mark.parametrize("suite", sorted(SUITES))
def test_generate(suite: str) -> None:
    info = SUITES[suite]
    a = Crypto.generate(1, suite)
    b = Crypto.generate(1, suite)
    assert len(a.key_salt) == len(b.key_salt) == info.key_len + info.salt_len
    assert a.key_salt != b.key_salt
    assert (a.tag, a.suite, a.lifetime, a.mki, a.keys, a.session_params) == (
        1,
        suite,
        None,
        None,
        1,
        (),
    )
    assert Crypto.parse(str(a)) == a


def test_generate_rejects() -> None:
    with pytest.raises(ValueError, match="unknown SRTP crypto-suite"):
        Crypto.generate(1, "NULL_CIPHER")
    with pytest.raises(ValueError, match="out of range"):
        Crypto.generate(0, "AES_CM_128_HMAC_SHA1_80")


def test_suite_table() -> None:
    assert {n: (s.key_len, s.salt_len, s.auth_tag_len) for n, s in SUITES.items()} == {
        "AES_CM_128_HMAC_SHA1_80": (16, 14, 10),
        "AES_CM_128_HMAC_SHA1_32": (16, 14, 4),
        "F8_128_HMAC_SHA1_80": (16, 14, 10),
        "AES_256_CM_HMAC_SHA1_80": (32, 14, 10),
        "AES_256_CM_HMAC_SHA1_32": (32, 14, 4),
        "AEAD_AES_128_GCM": (16, 12, 16),
        "AEAD_AES_256_GCM": (32, 12, 16),
    }


def test_crypto_from_sdp() -> None:
    sdp = b"v=0\r\no=- 1 1 IN IP4 h\r\ns=-\r\nt=0 0\r\nm=audio 4000 RTP/SAVP 0\r\n"
    session = Session.parse(sdp + f"a=crypto:{RFC_80}\r\na=crypto:{RFC_32}\r\n".encode())
    cryptos = [Crypto.parse(v) for v in session.media[0].attributes("crypto")]
    assert [(c.tag, c.suite) for c in cryptos] == [
        (1, "AES_CM_128_HMAC_SHA1_80"),
        (2, "AES_CM_128_HMAC_SHA1_32"),
    ]
