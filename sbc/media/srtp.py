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

from collections.abc import Callable

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


def _check(key: SrtpKey) -> int:
    """The libsrtp profile of ``key``'s suite; SrtpError if the suite or the key's length
    is not one libsrtp takes."""
    profile = PROFILES.get(key.suite)
    if profile is None:
        raise SrtpError(f"unsupported SRTP crypto suite {key.suite!r}")
    if len(key.key_salt) != KEY_SALT_LENGTHS[key.suite]:
        raise SrtpError(
            f"{key.suite}: master key||salt is {len(key.key_salt)} bytes, "
            f"expected {KEY_SALT_LENGTHS[key.suite]}"
        )
    return profile


def _session(
    key: SrtpKey, profile: int, ssrc_type: int, allow_repeat_tx: bool
) -> pylibsrtp.Session:
    policy = pylibsrtp.Policy(key=key.key_salt, ssrc_type=ssrc_type, srtp_profile=profile)
    policy.allow_repeat_tx = allow_repeat_tx
    try:
        session = pylibsrtp.Session(policy)
    except pylibsrtp.Error as exc:
        raise SrtpError(f"{key.suite}: {exc}") from None
    session._cdata = _shared_cdata
    session._buffer = _shared_buffer
    return session


# A context's libsrtp session (key derivation, RFC 3711 4.3, and its cipher and
# authentication state) is made when the first packet needs it, not with the context: a
# call's keys are checked when its Update comes, but a call that never sends media costs
# no libsrtp session (about a fifth of a worker's CPU to set a call up and tear it down).


class SrtpSender:
    """Protects what the relay sends to one party (RFC 3711 3.3, 3.4), any SSRC.

    ``allow_repeat_tx`` is off: protecting a second packet with an index already used would
    encrypt it with the same keystream (RFC 3711 9.1), so a duplicate (same SSRC and sequence
    number) raises ``SrtpError`` instead; reordered packets within the replay window pass.
    """

    __slots__ = ("_allow_repeat_tx", "_key", "_profile", "_protect", "_protect_rtcp", "suite")

    def __init__(self, key: SrtpKey, *, allow_repeat_tx: bool = False) -> None:
        self._profile = _check(key)
        self._key = key
        self._allow_repeat_tx = allow_repeat_tx
        self.suite = key.suite
        self._protect: Callable[[bytes], bytes] | None = None
        self._protect_rtcp: Callable[[bytes], bytes] | None = None

    def _start(self) -> None:
        session = _session(
            self._key, self._profile, pylibsrtp.Policy.SSRC_ANY_OUTBOUND, self._allow_repeat_tx
        )
        self._protect = session.protect
        self._protect_rtcp = session.protect_rtcp

    def protect(self, packet: bytes) -> bytes:
        """RTP -> SRTP (RFC 3711 3.3)."""
        protect = self._protect
        if protect is None:
            self._start()
            protect = self._protect
            assert protect is not None
        try:
            return protect(packet)
        except (pylibsrtp.Error, ValueError, TypeError) as exc:
            raise SrtpError(f"SRTP protect: {exc}") from None

    def protect_rtcp(self, packet: bytes) -> bytes:
        """RTCP -> SRTCP (RFC 3711 3.4): adds the E flag, SRTCP index and tag."""
        protect = self._protect_rtcp
        if protect is None:
            self._start()
            protect = self._protect_rtcp
            assert protect is not None
        try:
            return protect(packet)
        except (pylibsrtp.Error, ValueError, TypeError) as exc:
            raise SrtpError(f"SRTCP protect: {exc}") from None


class SrtpReceiver:
    """Authenticates and decrypts what one party sends (RFC 3711 3.3, 3.4), any SSRC; a
    packet that fails authentication or the replay check raises ``SrtpError`` and changes
    no state (libsrtp creates a new SSRC's stream only after its first packet verifies)."""

    __slots__ = ("_key", "_profile", "_unprotect", "_unprotect_rtcp", "suite")

    def __init__(self, key: SrtpKey) -> None:
        self._profile = _check(key)
        self._key = key
        self.suite = key.suite
        self._unprotect: Callable[[bytes], bytes] | None = None
        self._unprotect_rtcp: Callable[[bytes], bytes] | None = None

    def _start(self) -> None:
        session = _session(self._key, self._profile, pylibsrtp.Policy.SSRC_ANY_INBOUND, False)
        self._unprotect = session.unprotect
        self._unprotect_rtcp = session.unprotect_rtcp

    def unprotect(self, packet: bytes) -> bytes:
        """SRTP -> RTP (RFC 3711 3.3)."""
        unprotect = self._unprotect
        if unprotect is None:
            self._start()
            unprotect = self._unprotect
            assert unprotect is not None
        try:
            return unprotect(packet)
        except (pylibsrtp.Error, ValueError, TypeError) as exc:
            raise SrtpError(f"SRTP unprotect: {exc}") from None

    def unprotect_rtcp(self, packet: bytes) -> bytes:
        """SRTCP -> RTCP (RFC 3711 3.4)."""
        unprotect = self._unprotect_rtcp
        if unprotect is None:
            self._start()
            unprotect = self._unprotect_rtcp
            assert unprotect is not None
        try:
            return unprotect(packet)
        except (pylibsrtp.Error, ValueError, TypeError) as exc:
            raise SrtpError(f"SRTCP unprotect: {exc}") from None
