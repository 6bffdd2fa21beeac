"""Flows: which transport, local socket and peer a message came from or goes to.

A flow is the sans-I/O name for "this UDP socket and that peer address" or "this TCP/TLS
connection" (RFC 5626 uses the same word). The I/O layer maps flows to sockets.
"""

from __future__ import annotations

from dataclasses import dataclass

Address = tuple[str, int]  # (host without brackets, port)


@dataclass(frozen=True, slots=True)
class Flow:
    """``transport`` is "udp", "tcp" or "tls"; ``conn_id`` names a stream connection (0 for UDP)."""

    transport: str
    local: Address
    remote: Address
    conn_id: int = 0

    @property
    def reliable(self) -> bool:
        return self.transport != "udp"

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
