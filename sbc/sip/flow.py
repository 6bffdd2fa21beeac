"""Flows: which transport, local socket and peer a message came from or goes to.

A flow is the sans-I/O name for "this UDP socket and that peer address" or "this TCP/TLS/
WebSocket connection" (RFC 5626 uses the same word). The I/O layer maps flows to sockets.
"""

from __future__ import annotations

from dataclasses import dataclass

Address = tuple[str, int]  # (host without brackets, port)


@dataclass(frozen=True, slots=True)
class Flow:
    """``transport`` is "udp", "tcp", "tls", "ws" or "wss" (SIP over WebSocket, RFC 7118:
    one SIP message per WebSocket message, a connection like TCP's; written in Via as WS
    and WSS, RFC 7118 5.2.1); ``conn_id`` names a connection (0 for UDP)."""

    transport: str
    local: Address
    remote: Address
    conn_id: int = 0

    @property
    def reliable(self) -> bool:
        """No retransmissions by the transaction layer (RFC 3261 17.1.1.2, 17.1.2.2): every
        transport but UDP (WebSocket runs over TCP, RFC 7118 5)."""
        return self.transport != "udp"

    @property
    def secure(self) -> bool:
        """TLS on this hop: SIP over TLS, or over secure WebSocket (WSS, RFC 7118 5.2.1;
        a SIPS request may use it, RFC 7118 5.2.2)."""
        return self.transport == "tls" or self.transport == "wss"

    @property
    def websocket(self) -> bool:
        """SIP over WebSocket (RFC 7118): a browser, as a rule, which speaks WebRTC."""
        return self.transport == "ws" or self.transport == "wss"

    @property
    def uri_transport(self) -> str:
        """The ``transport`` URI parameter naming this flow's transport: "ws" for both
        WS and WSS (RFC 7118 5.2.2; a sips: URI with it means WSS)."""
        return "ws" if self.transport == "wss" else self.transport

    def to(self, remote: Address) -> Flow:
        """Same local socket, another peer (UDP responses per RFC 3261 18.2.2)."""
        return Flow(self.transport, self.local, remote, self.conn_id)

    def __str__(self) -> str:
        return f"{self.transport}:{format_address(self.remote)}"


def format_address(addr: Address) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def format_host(host: str) -> str:
    """Host for a SIP header: IPv6 literals get brackets (RFC 3261 25.1 IPv6reference)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
