"""Media on rtpengine nodes (``[media] engine = "rtpengine"``), sans-I/O.

What the built-in relay does for a call is asked of an rtpengine node over the ng protocol
(sbc/media/ng.py): the SDP of every offer and answer goes to the call's node, which
anchors it on its own address and ports and returns it rewritten; the call's end is a
``delete``. The SBC keeps no media state of its own beyond which node holds which call.

The flags per offer or answer follow the policy of the side the SDP goes to (as the
built-in relay's ``SideMedia``): ``replace`` origin and session-connection (the node's
address in o= and c=), ``ICE remove`` (no ICE towards SIP phones), the transport protocol
from the side's SRTP policy (``mandatory``: RTP/SAVP with the node's SDES keys; ``off``:
RTP/AVP; ``optional``: as offered), ``SDES-off`` towards a plain side, ``trust-address``
off (the node latches on what it receives: symmetric RTP, as the built-in relay), the
side's codec list as ``codec transcode`` (the node adds and transcodes the codecs the
offer lacks), and the SIP source of the message as ``received-from``.

ng call identity: the SBC's own call id (one per B2BUA call, so the forks of a call are
calls of their own), with the caller's monologue tagged ``caller`` and the callee's
``callee``: an offer from the caller is ``from-tag caller``, its answer ``to-tag callee``,
and the other way round for offers from the callee.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sbc.media.ng import NgClient, NgReply, NgTimeout, Node, NodePool
from sbc.media.session import SideMedia

log = logging.getLogger("sbc.media.rtpengine")

Address = tuple[str, int]
CALLER, CALLEE = "caller", "callee"


@dataclass(frozen=True, slots=True)
class Sent:
    """A request made: its cookie (its reply comes back with it), and the datagram to send
    to its node's address from the SBC's ng socket."""

    cookie: str
    node: Node
    data: bytes


def sdp_flags(side: SideMedia, *, offer: bool) -> dict[str, Any]:
    """The ng keys of an offer or answer whose SDP goes to a side with this policy."""
    message: dict[str, Any] = {
        "replace": ["origin", "session-connection"],
        "ICE": "remove",
    }
    flags: list[str] = []
    if side.srtp == "mandatory":
        message["transport-protocol"] = "RTP/SAVP"
    elif side.srtp == "off":
        message["transport-protocol"] = "RTP/AVP"
        message["SDES"] = ["off"]
    if offer and side.codecs:
        message["codec"] = {"transcode": list(side.codecs)}
    if flags:
        message["flags"] = flags
    return message


class Rtpengine:
    """The SBC's side of its rtpengine nodes: requests, replies, pings, which call is where."""

    def __init__(self, pool: NodePool, sides: dict[str, SideMedia], client: NgClient | None = None):
        self.pool = pool
        self.sides = sides
        self.client = client or NgClient()
        self._by_address = {node.address: node for node in pool.nodes.values()}
        self._pings: dict[str, Node] = {}  # cookie -> node pinged
        self.errors = 0  # error replies to offers and answers
        # The SBC's ng socket (set by the I/O layer when it is bound): datagrams on it are
        # the nodes' replies.
        self.local: Address = ("", 0)
        # The latest time seen (requests, replies, timers): a call's end reaches the core
        # without one, and its delete's retransmission timer starts from it (a stale one
        # only makes the first retransmission early; the cookie makes it harmless).
        self.now = 0.0

    # -- requests ------------------------------------------------------------------------------
    def sdp(
        self,
        call: str,
        *,
        offer: bool,
        from_caller: bool,
        to_side: str,
        sdp: bytes,
        source: str,
        now: float,
    ) -> Sent:
        """An offer or answer of ``call``'s SDP that goes to ``to_side``; NoNode if no node
        is up for a new call."""
        node = self.pool.assign(call)
        sender, receiver = (CALLER, CALLEE) if from_caller else (CALLEE, CALLER)
        message: dict[str, Any] = {
            "command": "offer" if offer else "answer",
            "call-id": call,
            "sdp": sdp.decode(errors="surrogateescape"),
            "received-from": ["IP6" if ":" in source else "IP4", source],
            **sdp_flags(self.sides[to_side], offer=offer),
        }
        if offer:
            message["from-tag"] = sender
        else:
            message["from-tag"], message["to-tag"] = receiver, sender
        return self._send(node, message, now)

    def delete(self, call: str) -> Sent | None:
        """The call is over: its node forgets it (nothing if it had none)."""
        node = self.pool.node_of(call)
        self.pool.release(call)
        if node is None:
            return None
        return self._send(node, {"command": "delete", "call-id": call}, self.now)

    def _send(self, node: Node, message: dict[str, Any], now: float) -> Sent:
        self.now = max(self.now, now)
        cookie, data = self.client.request(node.name, message, now)
        return Sent(cookie, node, data)

    # -- replies and timers --------------------------------------------------------------------
    def receive(self, source: Address, data: bytes, now: float) -> NgReply | None:
        """A datagram on the ng socket: the reply it is (pings are handled here and give
        None), or None."""
        self.now = max(self.now, now)
        node = self._by_address.get(source)
        if node is None:
            return None  # not from a node
        reply = self.client.receive(node.name, data, now)
        if reply is None:
            return None
        pinged = self._pings.pop(reply.cookie, None)
        if pinged is not None:
            if reply.result.get("result") == "pong":
                self.pool.pong(pinged, reply.rtt)
            else:
                self.pool.missed_ping(pinged)
            return None
        return reply

    def timers(self, now: float) -> tuple[list[tuple[Address, bytes]], list[NgTimeout]]:
        """Retransmissions, new pings, and requests that timed out (pings among them are
        handled here)."""
        self.now = max(self.now, now)
        resend, expired = self.client.handle_timer(now)
        out = [(self.pool.nodes[name].address, data) for name, data in resend]
        timeouts: list[NgTimeout] = []
        for timeout in expired:
            pinged = self._pings.pop(timeout.cookie, None)
            if pinged is not None:
                self.pool.missed_ping(pinged)
            else:
                timeouts.append(timeout)
        for node in self.pool.pings_due(now):
            sent = self._send(node, {"command": "ping"}, now)
            self._pings[sent.cookie] = node
            node.ping = sent.cookie
            out.append((node.address, sent.data))
        return out, timeouts

    def next_deadline(self) -> float | None:
        due = [t for t in (self.client.next_deadline(), self.pool.next_ping()) if t is not None]
        return min(due) if due else None
