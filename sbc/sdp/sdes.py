"""SDES: SRTP master keys carried in SDP a=crypto attributes (RFC 4568).

``Crypto.parse`` takes what follows ``a=crypto:`` and ``str()`` renders it back. Nothing here
does I/O.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from dataclasses import dataclass

from sbc.sdp.sdp import SdpError

MAX_TAG = 999_999_999  # RFC 4568 9.1: tag = 1*9DIGIT
MAX_LIFETIME_EXP = 64  # 2^N lifetimes beyond this are nonsense (SRTP: 2^48, SRTCP: 2^31)


@dataclass(frozen=True, slots=True)
class Suite:
    """An SRTP crypto-suite and its master key, master salt and auth tag lengths in bytes."""

    name: str
    key_len: int
    salt_len: int
    auth_tag_len: int


SUITES: dict[str, Suite] = {
    s.name: s
    for s in (
        # RFC 4568 6.2.1-6.2.3
        Suite("AES_CM_128_HMAC_SHA1_80", 16, 14, 10),
        Suite("AES_CM_128_HMAC_SHA1_32", 16, 14, 4),
        Suite("F8_128_HMAC_SHA1_80", 16, 14, 10),
        # RFC 6188 7.1
        Suite("AES_256_CM_HMAC_SHA1_80", 32, 14, 10),
        Suite("AES_256_CM_HMAC_SHA1_32", 32, 14, 4),
        # RFC 7714 14.2
        Suite("AEAD_AES_128_GCM", 16, 12, 16),
        Suite("AEAD_AES_256_GCM", 32, 12, 16),
    )
}


# The suites the media relay encrypts and decrypts (libsrtp through pylibsrtp, which has no
# AES_256_CM_HMAC_SHA1_* of RFC 6188 and no F8 profile): the only ones offered or accepted.
SUPPORTED_SUITES: tuple[str, ...] = (
    "AES_CM_128_HMAC_SHA1_80",
    "AES_CM_128_HMAC_SHA1_32",
    "AEAD_AES_128_GCM",
    "AEAD_AES_256_GCM",
)


def find_suite(name: str) -> Suite | None:
    """The known suite of that name; ABNF literals are case-insensitive (RFC 5234 2.3)."""
    return SUITES.get(name.upper())


def _b64decode(text: str) -> bytes:
    """RFC 4568 6.1: base64 (RFC 4648 4) key||salt; padding optional on input."""
    if not text or not text.isascii():
        raise SdpError("a=crypto: bad base64 key")
    stripped = text.rstrip("=")
    if len(stripped) % 4 == 1 or "=" in stripped:
        raise SdpError("a=crypto: bad base64 key")
    try:
        return base64.b64decode(stripped + "=" * (-len(stripped) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise SdpError("a=crypto: bad base64 key") from None


def _digits(text: str, max_len: int) -> int | None:
    if text.isascii() and text.isdigit() and len(text) <= max_len:
        return int(text)
    return None


def _parse_key_param(param: str) -> tuple[bytes, int | None, tuple[int, int] | None]:
    """RFC 4568 9.1: "inline:" key-salt ["|" lifetime] ["|" mki-value ":" mki-length]."""
    method, colon, info = param.partition(":")
    if not colon or method.lower() != "inline":
        raise SdpError("a=crypto: key method must be inline")
    key_text, *rest = info.split("|")
    key_salt = _b64decode(key_text)
    if len(rest) > 2:
        raise SdpError("a=crypto: too many key-info fields")
    lifetime: int | None = None
    mki: tuple[int, int] | None = None
    for i, part in enumerate(rest):
        if ":" in part:  # mki = mki-value ":" mki-length
            value_text, _, length_text = part.partition(":")
            value = _digits(value_text, 39)
            length = _digits(length_text, 3)
            # RFC 4568 6.1: MKI length 1..128 bytes, the value must fit
            if value is None or length is None or not 1 <= length <= 128 or value >= 256**length:
                raise SdpError("a=crypto: bad MKI")
            if mki is not None:
                raise SdpError("a=crypto: bad MKI")
            mki = (value, length)
        elif i == 0:  # lifetime = ["2^"] 1*(DIGIT)
            if part.startswith("2^"):
                exp = _digits(part[2:], 2)
                if exp is None or exp > MAX_LIFETIME_EXP:
                    raise SdpError("a=crypto: bad lifetime")
                lifetime = 1 << exp
            else:
                lifetime = _digits(part, 20)
                if lifetime is None or lifetime == 0:
                    raise SdpError("a=crypto: bad lifetime")
        else:
            raise SdpError("a=crypto: bad MKI")
    return key_salt, lifetime, mki


def _render_lifetime(lifetime: int) -> str:
    if lifetime & (lifetime - 1) == 0:
        return f"2^{lifetime.bit_length() - 1}"
    return str(lifetime)


@dataclass(frozen=True, slots=True)
class Crypto:
    """RFC 4568 9.1: a=crypto:<tag> <crypto-suite> <key-params> [<session-params>]."""

    tag: int
    suite: str  # as written; unknown suites parse (the caller skips them, RFC 4568 7.1.1)
    key_salt: bytes  # master key || master salt of the first key-param
    lifetime: int | None  # master key lifetime in packets
    mki: tuple[int, int] | None  # (MKI value, MKI length in bytes)
    keys: int  # number of key-params (several need an MKI, RFC 4568 6.1)
    session_params: tuple[str, ...]  # e.g. ("UNENCRYPTED_SRTCP",), as written
    more_key_params: tuple[str, ...] = ()  # the key-params after the first, as written

    @classmethod
    def parse(cls, value: str) -> Crypto:
        fields = value.split()
        if len(fields) < 3:
            raise SdpError("a=crypto: needs tag, suite and key-params")
        tag_text, suite, key_params, *session_params = fields
        tag = _digits(tag_text, 9)
        if tag is None or tag < 1:
            raise SdpError("a=crypto: tag must be 1-999999999")
        params = key_params.split(";")  # key-params = key-param *(";" key-param)
        key_salt, lifetime, mki = _parse_key_param(params[0])
        known = find_suite(suite)
        for param in params[1:]:
            other = _parse_key_param(param)[0]
            if len(other) != len(key_salt):
                raise SdpError("a=crypto: key-params differ in length")
        if known is not None and len(key_salt) != known.key_len + known.salt_len:
            raise SdpError(
                f"a=crypto: key length {len(key_salt)} for {suite}, "
                f"expected {known.key_len + known.salt_len}"
            )
        return cls(
            tag=tag,
            suite=suite,
            key_salt=key_salt,
            lifetime=lifetime,
            mki=mki,
            keys=len(params),
            session_params=tuple(session_params),
            more_key_params=tuple(params[1:]),
        )

    def __str__(self) -> str:
        key = "inline:" + base64.b64encode(self.key_salt).decode("ascii")
        if self.lifetime is not None:
            key += "|" + _render_lifetime(self.lifetime)
        if self.mki is not None:
            key += f"|{self.mki[0]}:{self.mki[1]}"
        key = ";".join([key, *self.more_key_params])
        return " ".join([str(self.tag), self.suite, key, *self.session_params])

    @property
    def suite_info(self) -> Suite | None:
        """The known suite, None if this crypto-suite is not one of SUITES."""
        return find_suite(self.suite)

    @classmethod
    def generate(cls, tag: int, suite: str) -> Crypto:
        """A fresh random master key||salt for ``suite``: no lifetime, no MKI."""
        known = find_suite(suite)
        if known is None:
            raise ValueError(f"unknown SRTP crypto-suite {suite!r}")
        if not 1 <= tag <= MAX_TAG:
            raise ValueError(f"a=crypto tag {tag} out of range 1-{MAX_TAG}")
        return cls(
            tag=tag,
            suite=known.name,
            key_salt=secrets.token_bytes(known.key_len + known.salt_len),
            lifetime=None,
            mki=None,
            keys=1,
            session_params=(),
        )
