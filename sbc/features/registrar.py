"""Registration through the SBC: flow tokens in Path, AORs, the client-facing expiry.

RFC 3327 (Path): the SBC puts a Path URI naming itself in every REGISTER it forwards, so the
registrar routes requests for the user back through the SBC. The URI's user part is a flow
token (RFC 5626 5.2): it names the client's flow (transport, SBC socket, client address,
connection) and carries an HMAC so that nobody can make the SBC send to an address of their
choosing by forging a Route.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from sbc.sip.flow import Flow
from sbc.sip.headers import NameAddr
from sbc.sip.uri import SipUri

_MAC_LEN = 8


class FlowTokens:
    """Encode a flow into a token usable as a SIP URI user part, and back."""

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key or secrets.token_bytes(32)

    def encode(self, flow: Flow) -> str:
        (lh, lp), (rh, rp) = flow.local, flow.remote
        data = f"{flow.transport}|{lh}|{lp}|{rh}|{rp}|{flow.conn_id}".encode()
        mac = hmac.new(self._key, data, hashlib.sha256).digest()[:_MAC_LEN]
        # base32: letters and digits only, valid in a SIP URI user part (RFC 3261 25.1).
        return base64.b32encode(mac + data).decode().rstrip("=").lower()

    def decode(self, token: str) -> Flow | None:
        """The flow a token names, or None if it is not one of ours (bad MAC or format)."""
        try:
            padded = token.upper() + "=" * (-len(token) % 8)
            raw = base64.b32decode(padded)
        except (ValueError, UnicodeEncodeError):
            return None
        mac, data = raw[:_MAC_LEN], raw[_MAC_LEN:]
        good = hmac.new(self._key, data, hashlib.sha256).digest()[:_MAC_LEN]
        if len(mac) != _MAC_LEN or not hmac.compare_digest(mac, good):
            return None
        try:
            transport, lh, lp, rh, rp, conn = data.decode().split("|")
            return Flow(transport, (lh, int(lp)), (rh, int(rp)), int(conn))
        except ValueError:
            return None


def aor_of(to: NameAddr) -> str | None:
    """The address-of-record of a REGISTER's To (RFC 3261 10.3 step 5): scheme, user and
    host, lower-case host, no port default games, no parameters. None if not a SIP URI."""
    uri = to.uri
    if not isinstance(uri, SipUri):
        return None
    user = f"{uri.user_unescaped}@" if uri.user is not None else ""
    port = f":{uri.port}" if uri.port is not None else ""
    return f"{uri.scheme.lower()}:{user}{uri.host_bare}{port}"


def client_expires_for(transport: str, udp: int, tcp: int, tls: int) -> int:
    return udp if transport == "udp" else tls if transport == "tls" else tcp
