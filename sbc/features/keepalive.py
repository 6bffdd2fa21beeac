"""Keep-alives towards clients behind NAT, and STUN answers on the SIP port (sans-I/O).

RFC 5626 4.4 (keep-alive techniques), RFC 5389 (STUN binding). A UDP client behind NAT is
reachable only while its NAT keeps the mapping; the SBC refreshes it by sending to the
client every ``keepalive_interval`` (an OPTIONS that must be answered, or a CRLFCRLF
datagram) and gives up on a flow after ``keepalive_failures`` unanswered OPTIONS.
"""

from __future__ import annotations

import ipaddress
import struct

from sbc.deadlines import Deadlines
from sbc.media import ice
from sbc.sip.flow import Address, Flow

# -- NAT detection ---------------------------------------------------------------------------

# RFC 1918, RFC 6598 (CGN shared space), link-local, and the IPv6 equivalents (ULA, link-local).
_PRIVATE = tuple(
    ipaddress.ip_network(n)
    for n in (
        "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16",
        "fc00::/7", "fe80::/10",
    )
)  # fmt: skip


def is_private(host: str) -> bool:
    """True for an address in private, CGN or link-local space (not loopback)."""
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return any(ip in net for net in _PRIVATE if ip.version == net.version)


def behind_nat(
    source: Address, via_host: str, via_port: int | None, contact_hosts: list[str]
) -> bool:
    """A client is behind NAT if its packets come from another address than its Via says,
    or its Contact is another address than the source or in private space."""
    src_host, src_port = source
    if via_host.lower() != src_host.lower() or (via_port or 5060) != src_port:
        return True
    return any(is_private(h) or h.strip("[]").lower() != src_host.lower() for h in contact_hosts)


# -- keep-alive schedule ---------------------------------------------------------------------


class _FlowState:
    __slots__ = ("failures", "next_at", "target")

    def __init__(self, next_at: float, target: str) -> None:
        self.next_at = next_at
        self.failures = 0
        self.target = target  # Request-URI for OPTIONS keep-alives (a contact of the flow)


class KeepaliveTable:
    """Which flows get keep-alives and when; counts unanswered OPTIONS per flow."""

    def __init__(self, *, interval: float, failures: int) -> None:
        self.interval = interval
        self.max_failures = failures
        self._flows: dict[Flow, _FlowState] = {}
        self._deadlines: Deadlines[Flow] = Deadlines()  # each flow's next keep-alive

    def __len__(self) -> int:
        return len(self._flows)

    def __contains__(self, flow: Flow) -> bool:
        return flow in self._flows

    def watch(self, flow: Flow, target: str, now: float) -> None:
        """Start (or keep) sending keep-alives to ``flow``."""
        state = self._flows.get(flow)
        if state is None:
            state = self._flows[flow] = _FlowState(now + self.interval, target)
            self._deadlines.set(flow, state.next_at)
        state.target = target

    def unwatch(self, flow: Flow) -> None:
        self._flows.pop(flow, None)
        self._deadlines.cancel(flow)

    def target(self, flow: Flow) -> str | None:
        state = self._flows.get(flow)
        return None if state is None else state.target

    def due(self, now: float) -> list[Flow]:
        """Flows to send a keep-alive to now; each is rescheduled one interval later."""
        out: list[Flow] = []
        while (flow := self._deadlines.pop_due(now)) is not None:
            out.append(flow)
        for flow in out:
            state = self._flows[flow]
            state.next_at = now + self.interval
            self._deadlines.set(flow, state.next_at)
        return out

    def answered(self, flow: Flow) -> None:
        state = self._flows.get(flow)
        if state is not None:
            state.failures = 0

    def failed(self, flow: Flow) -> bool:
        """Count an unanswered keep-alive; True when the flow is to be given up."""
        state = self._flows.get(flow)
        if state is None:
            return False
        state.failures += 1
        return state.failures >= self.max_failures

    def next_deadline(self) -> float | None:
        return self._deadlines.next_deadline()


# -- STUN binding on the SIP port (RFC 5626 4.4.2, RFC 8489) ---------------------------------
# The STUN message format is sbc/media/ice.py's (the media relay's ICE-lite agent uses it too).

STUN_MAGIC = ice.MAGIC_COOKIE


def is_stun(data: bytes) -> bool:
    """A STUN message: first two bits zero and the magic cookie (RFC 8489 5); SIP starts
    with a letter, so the two never collide."""
    return len(data) >= 20 and data[0] < 0x40 and struct.unpack_from("!I", data, 4)[0] == STUN_MAGIC


def stun_binding_response(data: bytes, source: Address) -> bytes | None:
    """The Binding success response to a Binding request from ``source`` (its
    XOR-MAPPED-ADDRESS, RFC 8489 14.2), or None. Keep-alive requests carry no credentials
    (RFC 5626 4.4.2), so none are checked or added."""
    if not ice.is_stun(data) or struct.unpack_from("!H", data)[0] != ice.BINDING_REQUEST:
        return None
    txid = data[8:20]
    mapped = [(ice.XOR_MAPPED_ADDRESS, ice.xor_address(source, txid))]
    return ice.encode(ice.BINDING_SUCCESS, txid, mapped, fingerprint=False)


class NatPolicy:
    """[nat]: how keep-alives are sent."""

    __slots__ = ("failures", "interval", "method")

    def __init__(
        self, *, interval: float = 20.0, method: str = "options", failures: int = 3
    ) -> None:
        self.interval = interval
        self.method = method
        self.failures = failures
