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

from sbc.media.control import TRANSCODABLE
from sbc.media.ng import NgClient, NgReply, NgTimeout, Node, NodePool
from sbc.media.session import MediaRefused, SideMedia, from_browser, keys_end_to_end
from sbc.sdp.sdp import SdpError, Session

log = logging.getLogger("sbc.media.rtpengine")

Address = tuple[str, int]
CALLER, CALLEE = "caller", "callee"
# The SBC's codec names (control.TRANSCODABLE) as rtpengine's codec flags name them.
_NG_CODECS = {"OPUS": "opus"}
QUERY_BATCH = 200  # queries sent per timer run at most (a node's calls are spread out)


@dataclass(frozen=True, slots=True)
class Sent:
    """A request made: its cookie (its reply comes back with it), and the datagram to send
    to its node's address from the SBC's ng socket."""

    cookie: str
    node: Node
    data: bytes


def sdp_flags(
    side: SideMedia,
    *,
    offer: bool,
    to_browser: bool = False,
    from_webrtc: bool = False,
    passthrough: bool = False,
) -> dict[str, Any]:
    """The ng keys of an offer or answer whose SDP goes to a side with this policy;
    ``to_browser``: to a party reached over a WebSocket (the node speaks WebRTC to it: ICE,
    DTLS-SRTP as the passive end, rtcp-mux, mids, no SDES); ``from_webrtc``: the SDP is a
    WebRTC one (UDP/TLS/RTP/SAVPF), which a SIP phone gets as RTP/SAVP or RTP/AVP;
    ``passthrough``: the SDP keys its media end to end (session.keys_end_to_end), which the
    node relays untouched, its keying attributes (fingerprint and setup, key-mgmt,
    zrtp-hash, or crypto) and transport protocol as the parties wrote them, no codec
    changed (as the built-in relay)."""
    message: dict[str, Any] = {"replace": ["origin", "session-connection"]}
    if passthrough and not to_browser and not from_webrtc:
        # DTLS and SDES off as well: else the node takes the parties' DTLS records for
        # its own and drops them (no handshake completes through it).
        return {**message, "ICE": "remove", "passthrough": "on", "DTLS": "off", "SDES": ["off"]}
    if to_browser:
        message.update({
            "ICE": "force", "transport-protocol": "UDP/TLS/RTP/SAVPF", "SDES": ["off"],
            "rtcp-mux": ["offer" if offer else "accept"], "flags": ["generate-mid"],
        })  # fmt: skip
        if offer:
            # The node is the passive end towards a browser it offers to. In an answer to a
            # browser's offer the node keeps the role it took at that offer (the active
            # end: it has already sent its ClientHello); asking for passive there leaves
            # the browser's handshake unanswered (tests/interop/test_webrtc.py).
            message["DTLS"] = "passive"
        return message
    # No ICE and no DTLS towards a SIP phone (the node would offer its own DTLS beside
    # SDES; a browser's a=setup and a=fingerprint mean nothing to a phone).
    message["ICE"] = "remove"
    message["DTLS"] = "off"
    if side.srtp == "mandatory" or (from_webrtc and side.srtp == "optional"):
        message["transport-protocol"] = "RTP/SAVP"
    elif side.srtp == "off":
        message["transport-protocol"] = "RTP/AVP"
        message["SDES"] = ["off"]
    if from_webrtc:
        message["rtcp-mux"] = ["demux"]  # a phone may not multiplex
        if message.get("transport-protocol") == "RTP/SAVP":
            # SDES towards the phone without the AEAD suites: baresip 1.0 took
            # AEAD_AES_256_GCM from the node and failed to decrypt every packet of it.
            message["SDES"] = ["no-AEAD_AES_256_GCM", "no-AEAD_AES_128_GCM"]
    if offer and side.codecs:
        # As the built-in relay: the side is offered its listed codecs only, those the
        # offer lacks added (and transcoded); the others the SBC could transcode are masked
        # (taken from the offerer, not offered on).
        listed = [_NG_CODECS.get(c, c) for c in side.codecs]
        masked = [_NG_CODECS.get(c, c) for c in sorted(TRANSCODABLE) if c not in side.codecs]
        message["codec"] = {"transcode": listed, **({"mask": masked} if masked else {})}
    return message


class Rtpengine:
    """The SBC's side of its rtpengine nodes: requests, replies, pings, which call is where."""

    def __init__(
        self,
        pool: NodePool,
        sides: dict[str, SideMedia],
        client: NgClient | None = None,
        *,
        timeout: float = 60.0,
        srtp_passthrough: bool = False,
    ) -> None:
        self.pool = pool
        self.sides = sides
        # [media] srtp_passthrough: SDES keys stay the parties' own (relayed untouched).
        self.srtp_passthrough = srtp_passthrough
        self.client = client or NgClient()
        # [media] timeout: a call without media that long ends (BYE both legs); its node
        # is asked about it (``query``) every quarter of that. A node that stays down that
        # long loses its calls.
        self.timeout = timeout
        self._next_query: dict[str, float] = {}  # call -> when to query its node next
        self._queries: dict[str, str] = {}  # cookie -> call of a query in flight
        self._down_since: dict[str, float] = {}  # node name -> when it went down
        self.timed_out: list[str] = []  # calls without media: for the core to end
        self._deletes: dict[str, str] = {}  # cookie -> call of a delete in flight
        # (call, node, the node's answer to its delete: its counters) for the call records
        self.deleted: list[tuple[str, str, dict[str, Any]]] = []
        self.wall_offset = 0.0  # Unix time minus ``now`` (the nodes report Unix times)
        self._pings: dict[str, Node] = {}  # cookie -> node pinged
        self.errors = 0  # error replies to offers and answers
        # The SBC's ng socket (set by the I/O layer when it is bound): datagrams on it are
        # the nodes' replies.
        self.local: Address = ("", 0)
        # The latest time seen (requests, replies, timers): a call's end reaches the core
        # without one, and its delete's retransmission timer starts from it (a stale one
        # only makes the first retransmission early; the cookie makes it harmless).
        self.now = 0.0

    def set_nodes(self, nodes: list[Node]) -> None:
        """A reload's [[media.rtpengine]] (NodePool.set_nodes)."""
        self.pool.set_nodes(nodes)

    def _node_at(self, source: Address) -> Node | None:
        for node in self.pool.nodes.values():
            if node.address == source:
                return node
        return None

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
        to_browser: bool = False,
    ) -> Sent:
        """An offer or answer of ``call``'s SDP that goes to ``to_side``; NoNode if no node
        is up for a new call, MediaRefused for end-to-end keys towards a browser."""
        try:
            parsed = Session.parse(sdp)
        except SdpError:
            parsed = None  # the node judges it (and answers with an error)
        passthrough = parsed is not None and keys_end_to_end(
            parsed, srtp_passthrough=self.srtp_passthrough
        )
        webrtc = parsed is not None and from_browser(parsed)
        if passthrough and to_browser:
            # As the built-in relay: a browser keys its media with DTLS to the SBC's
            # relay (RFC 8827 6.5); DTLS without ICE, MIKEY or ZRTP cannot reach it.
            raise MediaRefused("End-To-End Keys Not Possible Towards A Browser")
        node = self.pool.assign(call)
        self._next_query.setdefault(call, now + self.query_interval)
        sender, receiver = (CALLER, CALLEE) if from_caller else (CALLEE, CALLER)
        message: dict[str, Any] = {
            "command": "offer" if offer else "answer",
            "call-id": call,
            "sdp": sdp.decode(errors="surrogateescape"),
            **({"received-from": ["IP6" if ":" in source else "IP4", source]} if source else {}),
            **sdp_flags(
                self.sides[to_side],
                offer=offer,
                to_browser=to_browser,
                from_webrtc=webrtc,
                passthrough=passthrough,
            ),
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
        self._next_query.pop(call, None)
        if node is None:
            return None
        # With a from-tag the node answers with the call's counters (its "totals"); it
        # still deletes the whole call.
        message = {"command": "delete", "call-id": call, "from-tag": CALLER}
        sent = self._send(node, message, self.now)
        self._deletes[sent.cookie] = call
        return sent

    def _send(self, node: Node, message: dict[str, Any], now: float) -> Sent:
        self.now = max(self.now, now)
        cookie, data = self.client.request(node.name, message, now)
        return Sent(cookie, node, data)

    # -- replies and timers --------------------------------------------------------------------
    def receive(self, source: Address, data: bytes, now: float) -> NgReply | None:
        """A datagram on the ng socket: the reply it is (pings are handled here and give
        None), or None."""
        self.now = max(self.now, now)
        node = self._node_at(source)
        if node is None:
            return None  # not from a node
        reply = self.client.receive(node.name, data, now)
        if reply is None:
            return None
        pinged = self._pings.pop(reply.cookie, None)
        if pinged is not None:
            if reply.result.get("result") == "pong":
                self.pool.pong(pinged, reply.rtt)
                self._down_since.pop(pinged.name, None)
            else:
                self._missed(pinged, now)
            return None
        queried = self._queries.pop(reply.cookie, None)
        if queried is not None:
            self._query_answer(queried, reply, now)
            return None
        deleted = self._deletes.pop(reply.cookie, None)
        if deleted is not None:
            self.deleted.append((deleted, node.name, reply.result if reply.ok else {}))
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
                self._missed(pinged, now)
            elif self._queries.pop(timeout.cookie, None) is not None:
                pass  # a query without answer: the pings judge the node
            elif self._deletes.pop(timeout.cookie, None) is None:
                timeouts.append(timeout)  # a delete without answer: its record goes without
        for node in self.pool.pings_due(now):
            sent = self._send(node, {"command": "ping"}, now)
            self._pings[sent.cookie] = node
            node.ping = sent.cookie
            out.append((node.address, sent.data))

        out += self._query_due(now)
        return out, timeouts

    @property
    def query_interval(self) -> float:
        return max(1.0, self.timeout / 4)

    def _query_due(self, now: float) -> list[tuple[Address, bytes]]:
        """Ask the nodes about the calls whose turn it is (at most QUERY_BATCH per run)."""
        out: list[tuple[Address, bytes]] = []
        for call, due in list(self._next_query.items()):
            if len(out) >= QUERY_BATCH:
                break
            if due > now:
                continue
            self._next_query[call] = now + self.query_interval
            node = self.pool.node_of(call)
            if node is None or not node.up:
                continue
            sent = self._send(node, {"command": "query", "call-id": call}, now)
            self._queries[sent.cookie] = call
            out.append((node.address, sent.data))
        return out

    def _query_answer(self, call: str, reply: NgReply, now: float) -> None:
        """A call's media activity as its node reports it (the newest of its creation, its
        last offer or answer and every stream's last packet, in Unix time); a call the node
        does not know any more (its own timeout deleted it) is over."""
        if call not in self._next_query:
            return  # ended meanwhile
        if not reply.ok:
            if "call-id" in reply.error.lower():  # "Unknown call-id"
                self.timed_out.append(call)
            return
        newest = _newest(reply.result)
        wall = now + self.wall_offset
        if newest is not None and wall - newest > self.timeout:
            self.timed_out.append(call)

    def _missed(self, node: Node, now: float) -> None:
        if self.pool.missed_ping(node):
            self._down_since[node.name] = now

    def lost_calls(self, now: float) -> list[str]:
        """Calls of nodes down for ``timeout`` seconds and more: their media is gone."""
        lost: list[str] = []
        for name, since in list(self._down_since.items()):
            node = self.pool.nodes.get(name)
            if node is not None and not node.up and now - since >= self.timeout:
                lost.extend(node.calls)
                del self._down_since[name]  # once: it gets no new calls while down
        return lost

    def next_deadline(self) -> float | None:
        due = [t for t in (self.client.next_deadline(), self.pool.next_ping()) if t is not None]
        if self._next_query:
            due.append(min(self._next_query.values()))
        if self._down_since:
            due.extend(since + self.timeout for since in self._down_since.values())
        return min(due) if due else None


def _newest(result: dict[str, Any]) -> float | None:
    """The newest time in a query's answer: its creation, last signal, and each stream's
    last packet (rtpengine: "tags" -> "medias" -> "streams" -> "last packet")."""
    times: list[float] = []
    for key in ("created", "last signal"):
        value = result.get(key)
        if isinstance(value, int | float):
            times.append(float(value))
    tags = result.get("tags")
    for tag in tags.values() if isinstance(tags, dict) else ():
        for media in tag.get("medias", ()) if isinstance(tag, dict) else ():
            for stream in media.get("streams", ()) if isinstance(media, dict) else ():
                value = stream.get("last packet") if isinstance(stream, dict) else None
                if isinstance(value, int | float):
                    times.append(float(value))
    return max(times) if times else None
