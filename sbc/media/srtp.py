"""SRTP and SRTCP contexts of one relay leg over libsrtp (pylibsrtp).

The relay re-keys per leg (RFC 4568 SDES): what a party sends is checked and
decrypted with its own master key (``SrtpReceiver``), and what the relay sends to a party is
encrypted with the key the SBC offered it (``SrtpSender``). A context covers every SSRC of its
direction: libsrtp's "any inbound"/"any outbound" templates clone a per-SSRC stream on the
first packet that authenticates (RFC 3711 3.2.1: one cryptographic context per SSRC), and each
stream keeps its own rollover counter (RFC 3711 3.3.1) and replay list (RFC 3711 3.3.2).

The master key is the SDES key||salt in that order (RFC 4568 6.1), as libsrtp takes it.
Nothing here does I/O. A context is not thread-safe (workers are single-threaded).
"""

from __future__ import annotations

import pylibsrtp

from sbc.media.control import SrtpKey
from sbc.sdp.sdes import SUITES, SUPPORTED_SUITES

# RFC 4568 6.2 and RFC 7714 14.2 crypto-suite names -> libsrtp profiles, for the suites
# sdes.SUPPORTED_SUITES names.
PROFILES: dict[str, int] = {
    "AES_CM_128_HMAC_SHA1_80": pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80,
    "AES_CM_128_HMAC_SHA1_32": pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_32,
    "AEAD_AES_128_GCM": pylibsrtp.Policy.SRTP_PROFILE_AEAD_AES_128_GCM,
    "AEAD_AES_256_GCM": pylibsrtp.Policy.SRTP_PROFILE_AEAD_AES_256_GCM,
}
assert tuple(PROFILES) == SUPPORTED_SUITES

# Master key || master salt lengths in bytes (RFC 3711 8.2, RFC 7714 12).
KEY_SALT_LENGTHS: dict[str, int] = {
    name: SUITES[name].key_len + SUITES[name].salt_len for name in SUPPORTED_SUITES
}

# pylibsrtp copies each packet into a 1,500-byte buffer per Session and refuses to protect a
# packet longer than 1,500 - 144 bytes, too little for video. The relay's contexts share one
# buffer as large as any UDP payload plus the longest trailer (SRTCP index + tag + MKI); a
# worker is single-threaded and pylibsrtp returns a copy of the buffer's bytes.
_BUFFER_SIZE = 65536 + pylibsrtp.SRTP_MAX_SRTCP_TRAILER_LEN
_ffi = pylibsrtp.ffi  # type: ignore[attr-defined]
_shared_cdata = _ffi.new("char[]", _BUFFER_SIZE)
_shared_buffer = _ffi.buffer(_shared_cdata)


class SrtpError(Exception):
    """An unsupported suite or key, or a packet that failed to protect, authenticate or
    decrypt (including replays, RFC 3711 3.3.2)."""


def _session(key: SrtpKey, ssrc_type: int, allow_repeat_tx: bool) -> pylibsrtp.Session:
    profile = PROFILES.get(key.suite)
    if profile is None:
        raise SrtpError(f"unsupported SRTP crypto suite {key.suite!r}")
    if len(key.key_salt) != KEY_SALT_LENGTHS[key.suite]:
        raise SrtpError(
            f"{key.suite}: master key||salt is {len(key.key_salt)} bytes, "
            f"expected {KEY_SALT_LENGTHS[key.suite]}"
        )
    policy = pylibsrtp.Policy(key=key.key_salt, ssrc_type=ssrc_type, srtp_profile=profile)
    policy.allow_repeat_tx = allow_repeat_tx
    try:
        session = pylibsrtp.Session(policy)
    except pylibsrtp.Error as exc:
        raise SrtpError(f"{key.suite}: {exc}") from None
    session._cdata = _shared_cdata
    session._buffer = _shared_buffer
    return session


class SrtpSender:
    """Protects what the relay sends to one party (RFC 3711 3.3, 3.4), any SSRC.

    ``allow_repeat_tx`` is off: protecting a second packet with an index already used would
    encrypt it with the same keystream (RFC 3711 9.1), so a duplicate (same SSRC and sequence
    number) raises ``SrtpError`` instead; reordered packets within the replay window pass.
    """

    __slots__ = ("_protect", "_protect_rtcp", "suite")

    def __init__(self, key: SrtpKey, *, allow_repeat_tx: bool = False) -> None:
        session = _session(key, pylibsrtp.Policy.SSRC_ANY_OUTBOUND, allow_repeat_tx)
        self.suite = key.suite
        self._protect = session.protect
        self._protect_rtcp = session.protect_rtcp

    def protect(self, packet: bytes) -> bytes:
        """RTP -> SRTP (RFC 3711 3.3)."""
        try:
            return self._protect(packet)
        except (pylibsrtp.Error, ValueError, TypeError) as exc:
            raise SrtpError(f"SRTP protect: {exc}") from None

    def protect_rtcp(self, packet: bytes) -> bytes:
        """RTCP -> SRTCP (RFC 3711 3.4): adds the E flag, SRTCP index and tag."""
        try:
            return self._protect_rtcp(packet)
        except (pylibsrtp.Error, ValueError, TypeError) as exc:
            raise SrtpError(f"SRTCP protect: {exc}") from None


class SrtpReceiver:
    """Authenticates and decrypts what one party sends (RFC 3711 3.3, 3.4), any SSRC; a
    packet that fails authentication or the replay check raises ``SrtpError`` and changes
    no state (libsrtp creates a new SSRC's stream only after its first packet verifies)."""

    __slots__ = ("_unprotect", "_unprotect_rtcp", "suite")

    def __init__(self, key: SrtpKey) -> None:
        session = _session(key, pylibsrtp.Policy.SSRC_ANY_INBOUND, False)
        self.suite = key.suite
        self._unprotect = session.unprotect
        self._unprotect_rtcp = session.unprotect_rtcp

    def unprotect(self, packet: bytes) -> bytes:
        """SRTP -> RTP (RFC 3711 3.3)."""
        try:
            return self._unprotect(packet)
        except (pylibsrtp.Error, ValueError, TypeError) as exc:
            raise SrtpError(f"SRTP unprotect: {exc}") from None

    def unprotect_rtcp(self, packet: bytes) -> bytes:
        """SRTCP -> RTCP (RFC 3711 3.4)."""
        try:
            return self._unprotect_rtcp(packet)
        except (pylibsrtp.Error, ValueError, TypeError) as exc:
            raise SrtpError(f"SRTCP unprotect: {exc}") from None
