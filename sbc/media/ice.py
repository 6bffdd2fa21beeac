"""The STUN side of an ICE-lite agent (RFC 8445 2.5): answering connectivity checks (sans-I/O).

An ICE-lite agent gathers only host candidates, sends no checks of its own and is always
the controlled agent (RFC 8445 6.1.1); it answers the Binding requests of the full agent on
the other side (RFC 8445 7.3) with the STUN short-term credential mechanism (RFC 8489 9.1):
the request's USERNAME is "<our ufrag>:<their ufrag>" (RFC 8445 7.2.2) and its
MESSAGE-INTEGRITY is an HMAC-SHA1 keyed with our ICE password (RFC 8489 14.5). The
full agent nominates the pair it picked by USE-CANDIDATE (RFC 8445 7.3.1.5, 8.1.1).

``parse`` reads any STUN message (RFC 8489 5, 14); ``answer_check`` turns a datagram into
the response to send back to its source (a ``Check``) or None when it is to be silently
discarded (not STUN, a bad FINGERPRINT, not a request). Nothing here does I/O.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import ipaddress
import struct
from dataclasses import dataclass

Address = tuple[str, int]

MAGIC_COOKIE = 0x2112A442  # RFC 8489 5
HEADER_SIZE = 20
_HEADER = struct.Struct("!HHI12s")  # type, length, magic cookie, transaction id
_COOKIE = struct.pack("!I", MAGIC_COOKIE)
FINGERPRINT_XOR = 0x5354554E  # RFC 8489 14.7

# Message types (RFC 8489 5, 18.2): Binding request, indication, success and error response.
BINDING_REQUEST = 0x0001
BINDING_INDICATION = 0x0011
BINDING_SUCCESS = 0x0101
BINDING_ERROR = 0x0111

# Attributes (RFC 8489 14, 18.3; RFC 8445 16.1).
MAPPED_ADDRESS = 0x0001
USERNAME = 0x0006
MESSAGE_INTEGRITY = 0x0008
ERROR_CODE = 0x0009
UNKNOWN_ATTRIBUTES = 0x000A
XOR_MAPPED_ADDRESS = 0x0020
PRIORITY = 0x0024
USE_CANDIDATE = 0x0025
SOFTWARE = 0x8022
FINGERPRINT = 0x8028
ICE_CONTROLLED = 0x8029
ICE_CONTROLLING = 0x802A
# The comprehension-required attributes (0x0000-0x7FFF, RFC 8489 14) this agent knows: any
# other one in a request gets 420 (RFC 8489 7.3.1). MESSAGE-INTEGRITY-SHA256 (0x001C) and
# USERHASH (0x001E) are not used by ICE (RFC 8445 7.2.2 uses MESSAGE-INTEGRITY).
_KNOWN_REQUIRED = frozenset(
    {MAPPED_ADDRESS, USERNAME, MESSAGE_INTEGRITY, ERROR_CODE, UNKNOWN_ATTRIBUTES,
     XOR_MAPPED_ADDRESS, PRIORITY, USE_CANDIDATE, 0x001C, 0x001D, 0x001E}
)  # fmt: skip

# Error codes (RFC 8489 14.8, RFC 8445 16.1).
BAD_REQUEST = 400
UNAUTHENTICATED = 401
UNKNOWN_ATTRIBUTE = 420
ROLE_CONFLICT = 487
_REASONS = {
    BAD_REQUEST: "Bad Request", UNAUTHENTICATED: "Unauthenticated",
    UNKNOWN_ATTRIBUTE: "Unknown Attribute", ROLE_CONFLICT: "Role Conflict",
}  # fmt: skip

_MI_SIZE = 24  # MESSAGE-INTEGRITY attribute: 4-byte header + 20-byte HMAC-SHA1
_FP_SIZE = 8  # FINGERPRINT attribute: 4-byte header + CRC-32


class StunError(ValueError):
    """Not a well-formed STUN message."""


@dataclass(frozen=True, slots=True)
class Message:
    """A parsed STUN message (RFC 8489 5, 14). ``attributes`` are (type, value) in wire
    order, values without padding; ``integrity_at`` and ``fingerprint_at`` are the offsets
    of the MESSAGE-INTEGRITY and FINGERPRINT attributes (-1: absent). Attributes after
    MESSAGE-INTEGRITY other than FINGERPRINT are left out (RFC 8489 14.5)."""

    type: int
    transaction: bytes  # 12 bytes (RFC 8489 5)
    attributes: tuple[tuple[int, bytes], ...]
    raw: bytes
    integrity_at: int = -1
    fingerprint_at: int = -1

    def get(self, attribute: int) -> bytes | None:
        """The value of the first ``attribute`` (RFC 8489 14: later duplicates are ignored)."""
        for kind, value in self.attributes:
            if kind == attribute:
                return value
        return None

    def has(self, attribute: int) -> bool:
        return any(kind == attribute for kind, _ in self.attributes)

    def integrity_ok(self, key: bytes) -> bool:
        """RFC 8489 14.5: the HMAC-SHA1 over the message up to MESSAGE-INTEGRITY, with the
        header's length counting up to the end of that attribute."""
        at = self.integrity_at
        if at < 0:
            return False
        raw = self.raw
        head = raw[:2] + struct.pack("!H", at + _MI_SIZE - HEADER_SIZE) + raw[4:at]
        expected = hmac.new(key, head, hashlib.sha1).digest()
        return hmac.compare_digest(expected, raw[at + 4 : at + _MI_SIZE])

    def fingerprint_ok(self) -> bool:
        """RFC 8489 14.7: the CRC-32 of the message up to FINGERPRINT, xor 0x5354554e."""
        at = self.fingerprint_at
        if at < 0:
            return False
        raw = self.raw
        crc = (binascii.crc32(raw[:at]) ^ FINGERPRINT_XOR) & 0xFFFFFFFF
        return raw[at + 4 : at + 8] == struct.pack("!I", crc)


def is_stun(data: bytes) -> bool:
    """The header of a STUN message: the two top bits zero, the magic cookie and a length
    that is the rest of the datagram, a multiple of 4 (RFC 8489 5, 6.3)."""
    return (
        len(data) >= HEADER_SIZE
        and data[0] < 0x40
        and data[4:8] == _COOKIE
        and (data[2] << 8 | data[3]) == len(data) - HEADER_SIZE
        and not data[3] & 3
    )


def parse(data: bytes) -> Message:
    """One STUN message; StunError if its header or attributes are malformed."""
    if not is_stun(data):
        raise StunError("not a STUN message")
    msg_type, _, _, transaction = _HEADER.unpack_from(data)
    attributes: list[tuple[int, bytes]] = []
    integrity_at = fingerprint_at = -1
    pos = HEADER_SIZE
    end = len(data)
    while pos < end:
        if end - pos < 4:
            raise StunError("truncated attribute header")
        kind, length = struct.unpack_from("!HH", data, pos)
        value_end = pos + 4 + length
        if value_end > end:
            raise StunError(f"attribute 0x{kind:04x} runs past the message")
        value = data[pos + 4 : value_end]
        if fingerprint_at >= 0:
            raise StunError("an attribute after FINGERPRINT")  # RFC 8489 14.7: it is last
        if kind == FINGERPRINT:
            if length != 4:
                raise StunError("FINGERPRINT is not 4 bytes")
            fingerprint_at = pos
            attributes.append((kind, value))
        elif integrity_at >= 0:
            pass  # RFC 8489 14.5: only FINGERPRINT counts after MESSAGE-INTEGRITY
        else:
            if kind == MESSAGE_INTEGRITY:
                if length != 20:
                    raise StunError("MESSAGE-INTEGRITY is not 20 bytes")
                integrity_at = pos
            attributes.append((kind, value))
        pos = value_end + (-length % 4)  # RFC 8489 14: values are padded to 4 bytes
    if pos != end:
        raise StunError("padding runs past the message")
    return Message(
        type=msg_type, transaction=transaction, attributes=tuple(attributes), raw=bytes(data),
        integrity_at=integrity_at, fingerprint_at=fingerprint_at,
    )  # fmt: skip


# -- building messages -----------------------------------------------------------------------


def xor_address(addr: Address, transaction: bytes) -> bytes:
    """The value of XOR-MAPPED-ADDRESS for ``addr`` (RFC 8489 14.2): the port xor the top
    16 bits of the magic cookie; an IPv4 address xor the cookie, an IPv6 one xor the cookie
    and the transaction id."""
    host, port = addr
    ip = ipaddress.ip_address(host.strip("[]"))
    xport = port ^ (MAGIC_COOKIE >> 16)
    if ip.version == 4:
        return struct.pack("!BBHI", 0, 0x01, xport, int(ip) ^ MAGIC_COOKIE)
    mask = int.from_bytes(_COOKIE + transaction, "big")
    return struct.pack("!BBH", 0, 0x02, xport) + (int(ip) ^ mask).to_bytes(16, "big")


def read_xor_address(value: bytes, transaction: bytes) -> Address:
    """The address in an XOR-MAPPED-ADDRESS value (RFC 8489 14.2); StunError if malformed."""
    if len(value) < 4:
        raise StunError("short XOR-MAPPED-ADDRESS")
    _, family, xport = struct.unpack_from("!BBH", value)
    port = xport ^ (MAGIC_COOKIE >> 16)
    if family == 0x01 and len(value) == 8:
        return (str(ipaddress.IPv4Address(struct.unpack_from("!I", value, 4)[0] ^ MAGIC_COOKIE)),
                port)  # fmt: skip
    if family == 0x02 and len(value) == 20:
        mask = int.from_bytes(_COOKIE + transaction, "big")
        return (str(ipaddress.IPv6Address(int.from_bytes(value[4:], "big") ^ mask)), port)
    raise StunError("bad XOR-MAPPED-ADDRESS family or length")


def _attribute(kind: int, value: bytes) -> bytes:
    return struct.pack("!HH", kind, len(value)) + value + b"\x00" * (-len(value) % 4)


def encode(
    msg_type: int,
    transaction: bytes,
    attributes: list[tuple[int, bytes]],
    *,
    key: bytes | None = None,
    fingerprint: bool = True,
) -> bytes:
    """A STUN message with ``attributes``, then MESSAGE-INTEGRITY keyed with ``key`` (RFC
    8489 14.5) if given, then FINGERPRINT (RFC 8489 14.7) if asked."""
    body = b"".join(_attribute(kind, value) for kind, value in attributes)
    if key is not None:
        head = struct.pack("!HHI", msg_type, len(body) + _MI_SIZE, MAGIC_COOKIE) + transaction
        mac = hmac.new(key, head + body, hashlib.sha1).digest()
        body += _attribute(MESSAGE_INTEGRITY, mac)
    if fingerprint:
        head = struct.pack("!HHI", msg_type, len(body) + _FP_SIZE, MAGIC_COOKIE) + transaction
        crc = (binascii.crc32(head + body) ^ FINGERPRINT_XOR) & 0xFFFFFFFF
        return head + body + _attribute(FINGERPRINT, struct.pack("!I", crc))
    return struct.pack("!HHI", msg_type, len(body), MAGIC_COOKIE) + transaction + body


def error_code(code: int, reason: str | None = None) -> bytes:
    """The value of ERROR-CODE (RFC 8489 14.8): class and number, then the reason phrase."""
    text = (reason if reason is not None else _REASONS.get(code, "")).encode()
    return struct.pack("!HBB", 0, code // 100, code % 100) + text


# -- answering connectivity checks -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Check:
    """The outcome of a Binding request: ``response`` goes back to the request's source
    from the port it came to. ``valid`` means it authenticated and was answered with
    success (a valid check, RFC 8445 7.3.1); ``use_candidate`` that it nominated the pair
    (RFC 8445 7.3.1.5); ``error`` is the error code answered, if any."""

    response: bytes
    valid: bool
    use_candidate: bool = False
    error: int | None = None


def _error(request: Message, code: int, key: bytes | None, extra: bytes = b"") -> Check:
    attributes = [(ERROR_CODE, error_code(code))]
    if extra:
        attributes.append((UNKNOWN_ATTRIBUTES, extra))
    response = encode(BINDING_ERROR, request.transaction, attributes, key=key)
    return Check(response=response, valid=False, error=code)


def answer_check(data: bytes, src: Address, *, ufrag: str, pwd: str) -> Check | None:
    """Answer a connectivity check from ``src`` to the agent whose ICE credentials are
    ``ufrag``/``pwd``; None when the datagram is to be silently discarded (not a STUN
    message, a FINGERPRINT that does not match, a response or an indication)."""
    if not is_stun(data):
        return None  # RFC 8489 6.3: silently discarded
    msg_type = data[0] << 8 | data[1]
    if msg_type & 0x0110 != 0:
        return None  # an indication or a response: an ICE-lite agent sends no requests
    transaction = data[8:20]
    try:
        request = parse(data)
    except StunError:
        bare = Message(type=msg_type, transaction=transaction, attributes=(), raw=b"")
        return _error(bare, BAD_REQUEST, None)  # RFC 8489 6.3, 7.3.1
    if request.fingerprint_at >= 0 and not request.fingerprint_ok():
        return None  # RFC 8489 7.3: a bad FINGERPRINT is silently discarded
    if msg_type != BINDING_REQUEST:
        return _error(request, BAD_REQUEST, None)  # ICE uses only Binding (RFC 8445 7.2)
    # RFC 8489 9.1.3: without USERNAME and MESSAGE-INTEGRITY, 400; a USERNAME that is not
    # ours or an integrity that does not verify, 401; neither response is authenticated.
    username = request.get(USERNAME)
    if username is None or request.integrity_at < 0:
        return _error(request, BAD_REQUEST, None)
    ours, colon, theirs = username.partition(b":")  # RFC 8445 7.2.2: "LFRAG:RFRAG"
    if not colon or not theirs or ours != ufrag.encode():
        return _error(request, UNAUTHENTICATED, None)
    key = pwd.encode()  # RFC 8489 9.1.1: the short-term key is the password (OpaqueString)
    if not request.integrity_ok(key):
        return _error(request, UNAUTHENTICATED, None)
    # RFC 8489 7.3.1: comprehension-required attributes we do not know get 420.
    unknown = [kind for kind, _ in request.attributes
               if kind < 0x8000 and kind not in _KNOWN_REQUIRED]  # fmt: skip
    if unknown:
        return _error(
            request, UNKNOWN_ATTRIBUTE, key, b"".join(struct.pack("!H", k) for k in unknown)
        )
    # RFC 8445 7.3.1.1: the lite agent is always controlled (6.1.1) and cannot switch, so a
    # peer that also claims the controlled role is told to switch: 487 (it then retries as
    # the controlling agent). ICE-CONTROLLING is the expected case.
    if request.has(ICE_CONTROLLED):
        return _error(request, ROLE_CONFLICT, key)
    try:
        mapped = xor_address(src, request.transaction)
    except ValueError:
        return _error(request, BAD_REQUEST, key)
    response = encode(
        BINDING_SUCCESS, request.transaction, [(XOR_MAPPED_ADDRESS, mapped)], key=key
    )  # RFC 8445 7.3.1.4 (success response), RFC 8489 14.5, 14.7
    return Check(response=response, valid=True, use_candidate=request.has(USE_CANDIDATE))


def binding_request(
    transaction: bytes,
    *,
    username: str,
    pwd: str,
    use_candidate: bool = False,
    controlling: bool = True,
    tie_breaker: int = 0,
    priority: int = 0x6E0001FF,
) -> bytes:
    """A connectivity check as a full agent sends it (RFC 8445 7.2.2, 7.2.5.1): PRIORITY,
    ICE-CONTROLLING or ICE-CONTROLLED, USE-CANDIDATE if nominating, USERNAME, then
    MESSAGE-INTEGRITY keyed with the peer's password and FINGERPRINT. For tests and tools."""
    attributes = [
        (USERNAME, username.encode()),
        (PRIORITY, struct.pack("!I", priority)),
        (ICE_CONTROLLING if controlling else ICE_CONTROLLED, struct.pack("!Q", tie_breaker)),
    ]
    if use_candidate:
        attributes.append((USE_CANDIDATE, b""))
    return encode(BINDING_REQUEST, transaction, attributes, key=pwd.encode())
