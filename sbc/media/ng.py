"""rtpengine's "ng" control protocol, sans-I/O: the client side and a pool of relay nodes.

The protocol (rtpengine's documentation, "ng Control Protocol"): each request is one UDP
datagram, a cookie, one space and a bencoded dictionary (``"command": "ping" | "offer" |
"answer" | "delete" | "query" | ...`` and the command's keys); the reply is the same cookie,
a space and a bencoded dictionary with ``"result"`` (``"ok"``, ``"pong"``, ``"error"`` with
``"error-reason"``, ``"load limit"``). rtpengine keeps its replies by cookie for a while and
answers a request it has seen again with the same reply, so a retransmission with the same
cookie is idempotent: an ``offer`` sent twice does not make two calls.

``NgClient`` makes requests (``request``), matches replies by cookie (``receive``) and
retransmits the same bytes on its timer (``next_deadline`` / ``handle_timer``) with a
doubling interval, up to ``tries`` sends, then reports the request as timed out. A reply
to a cookie it does not wait for (a late duplicate) is dropped.

``NodePool`` is the set of ``[[media.rtpengine]]`` nodes: a new call goes to one of the
nodes that are up, chosen at random in proportion to their ``weight`` (weight 0: a standby,
used only when no weighted node is up), and sticks to it for its life (``node_of``); each
node is pinged every ``ping_interval`` seconds and is down after ``down_after`` pings
without a pong, up again at the first pong; its round-trip time is that of its last pong.

Bencoding is the ``bencode.py`` package's (``bencodepy``): it reads dictionaries whose keys
are not sorted, as rtpengine writes them (``fastbencode``, the faster one, refuses those),
and bounds the nesting depth of what it reads.
"""

from __future__ import annotations

import itertools
import logging
import random
import secrets
from dataclasses import dataclass, field
from typing import Any

import bencodepy  # type: ignore[import-untyped, import-not-found, unused-ignore]

log = logging.getLogger("sbc.media.ng")

Address = tuple[str, int]

# A request is sent at most this many times, the first retransmission after FIRST_TIMEOUT
# seconds, each next one after twice the previous interval (0.5 + 1 + 2 = 3.5 s in all).
FIRST_TIMEOUT = 0.5
TRIES = 3
MAX_DATAGRAM = 65535  # an ng message is one UDP datagram


class NgError(ValueError):
    """A datagram that is not an ng message."""


def encode(cookie: str, message: dict[str, Any]) -> bytes:
    """One ng message: the cookie, a space, the bencoded dictionary. Text values are
    encoded as UTF-8 byte strings (bencode has only byte strings)."""
    body: bytes = bencodepy.encode(_to_bytes(message))
    return cookie.encode() + b" " + body


def decode(data: bytes) -> tuple[str, dict[str, Any]]:
    """The cookie and the dictionary of an ng message, byte strings as text (UTF-8, with
    undecodable bytes escaped); NgError if it is not one."""
    cookie, space, body = data.partition(b" ")
    if not space or not cookie:
        raise NgError("no cookie")
    try:
        value = bencodepy.decode(body)
    except (bencodepy.BencodeDecodeError, ValueError, TypeError, RecursionError) as exc:
        raise NgError(f"bad bencoding: {exc}") from None
    if not isinstance(value, dict):
        raise NgError("not a dictionary")
    return cookie.decode(errors="replace"), _to_text(value)


def _to_bytes(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, dict):
        return {_to_bytes(k): _to_bytes(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_bytes(v) for v in value]
    if isinstance(value, bool):
        return int(value)
    return value


def _to_text(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode(errors="surrogateescape")
    if isinstance(value, dict):
        return {_to_text(k): _to_text(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_text(v) for v in value]
    return value


@dataclass(frozen=True, slots=True)
class NgReply:
    """The reply to a request: ``result`` is its dictionary; ``rtt`` the time from the
    request's first send (a retransmitted request's reply may answer any of its sends)."""

    cookie: str
    node: str
    command: str
    result: dict[str, Any]
    rtt: float

    @property
    def ok(self) -> bool:
        return self.result.get("result") in ("ok", "pong")

    @property
    def error(self) -> str:
        """Why the node refused the request ("" if it did not)."""
        if self.ok:
            return ""
        reason = self.result.get("error-reason") or self.result.get("result") or "no result"
        return str(reason)


@dataclass(frozen=True, slots=True)
class NgTimeout:
    """No reply to a request after ``TRIES`` sends."""

    cookie: str
    node: str
    command: str


@dataclass(slots=True)
class _Pending:
    node: str
    command: str
    data: bytes
    first: float
    due: float
    interval: float
    sent: int = 1


class NgClient:
    """Requests to ng nodes and their replies, by cookie (see the module docstring)."""

    def __init__(self, *, first_timeout: float = FIRST_TIMEOUT, tries: int = TRIES) -> None:
        self.first_timeout = first_timeout
        self.tries = tries
        self._pending: dict[str, _Pending] = {}
        # Cookies: a random prefix per client (so a restarted SBC's cookies never meet the
        # replies rtpengine kept for the last one) and a counter.
        self._prefix = secrets.token_hex(4)
        self._serial = itertools.count(1)
        self.retransmissions = 0
        self.timeouts = 0

    @property
    def pending(self) -> int:
        return len(self._pending)

    def request(self, node: str, message: dict[str, Any], now: float) -> tuple[str, bytes]:
        """A new request to ``node``: its cookie and the datagram to send there now."""
        cookie = f"{self._prefix}{next(self._serial):x}"
        data = encode(cookie, message)
        if len(data) > MAX_DATAGRAM:
            raise NgError(f"ng {message.get('command')} of {len(data)} bytes")
        due = now + self.first_timeout
        command = str(message.get("command", ""))
        self._pending[cookie] = _Pending(node, command, data, now, due, self.first_timeout)
        return cookie, data

    def receive(self, node: str, data: bytes, now: float) -> NgReply | None:
        """A datagram from ``node``: the reply it completes, or None (not ng, from another
        node, or for no request waiting: a late duplicate)."""
        try:
            cookie, result = decode(data)
        except NgError as exc:
            log.warning("ng: from %s: %s", node, exc)
            return None
        pending = self._pending.get(cookie)
        if pending is None or pending.node != node:
            return None
        del self._pending[cookie]
        return NgReply(cookie, node, pending.command, result, now - pending.first)

    def cancel(self, cookie: str) -> None:
        self._pending.pop(cookie, None)

    def next_deadline(self) -> float | None:
        """When ``handle_timer`` next has a retransmission or a timeout (O(pending))."""
        return min((p.due for p in self._pending.values()), default=None)

    def handle_timer(self, now: float) -> tuple[list[tuple[str, bytes]], list[NgTimeout]]:
        """Due retransmissions (node, the same datagram) and requests that timed out."""
        resend: list[tuple[str, bytes]] = []
        expired: list[NgTimeout] = []
        for cookie, p in list(self._pending.items()):
            if p.due > now:
                continue
            if p.sent >= self.tries:
                del self._pending[cookie]
                self.timeouts += 1
                expired.append(NgTimeout(cookie, p.node, p.command))
                continue
            p.sent += 1
            p.interval *= 2
            p.due = now + p.interval
            self.retransmissions += 1
            resend.append((p.node, p.data))
        return resend, expired


# -- nodes -------------------------------------------------------------------------------------


@dataclass(slots=True)
class Node:
    """One rtpengine node of ``[[media.rtpengine]]``."""

    name: str  # its url as configured: "udp://127.0.0.1:2223"
    address: Address
    weight: int = 1
    up: bool = False  # until its first pong
    rtt: float | None = None  # seconds, of its last pong
    missed: int = 0  # pings without a pong in a row
    calls: set[str] = field(default_factory=set)  # calls it holds
    next_ping: float = 0.0
    ping: str | None = None  # the cookie of the ping in flight
    retired: bool = False  # a reload removed it: no new calls; gone with its last call


class NoNode(Exception):
    """No node is up to take a new call."""


class NodePool:
    """The nodes, their health and which call is on which (see the module docstring)."""

    def __init__(
        self,
        nodes: list[Node],
        *,
        ping_interval: float = 5.0,
        down_after: int = 2,
        rng: random.Random | None = None,
    ) -> None:
        self.nodes = {node.name: node for node in nodes}
        self.ping_interval = ping_interval
        self.down_after = down_after
        self._rng = rng or random.Random()
        self._call_node: dict[str, str] = {}

    def node_of(self, call: str) -> Node | None:
        name = self._call_node.get(call)
        return None if name is None else self.nodes.get(name)

    def assign(self, call: str) -> Node:
        """The node of ``call``: the one it has, else one chosen for it (NoNode if none is
        up)."""
        node = self.node_of(call)
        if node is not None:
            return node
        up = [n for n in self.nodes.values() if n.up and not n.retired]
        weighted = [n for n in up if n.weight > 0]
        if weighted:
            node = self._rng.choices(weighted, weights=[n.weight for n in weighted])[0]
        elif up:
            node = self._rng.choice(up)  # only standbys are up
        else:
            raise NoNode("no rtpengine node is up")
        node.calls.add(call)
        self._call_node[call] = node.name
        return node

    def release(self, call: str) -> None:
        name = self._call_node.pop(call, None)
        node = self.nodes.get(name) if name is not None else None
        if node is not None:
            node.calls.discard(call)
            if node.retired and not node.calls:
                del self.nodes[node.name]

    def set_nodes(self, nodes: list[Node]) -> None:
        """A reload's nodes: those kept keep their health and calls (their weight is the
        new one); new ones are pinged from now on; those gone take no new call and leave
        the pool with their last call (no call is dropped)."""
        wanted = {node.name: node for node in nodes}
        for name, node in list(self.nodes.items()):
            new = wanted.pop(name, None)
            if new is not None:
                node.weight, node.retired = new.weight, False
            elif node.calls:
                node.retired = True
            else:
                del self.nodes[name]
        self.nodes.update(wanted)

    def pings_due(self, now: float) -> list[Node]:
        """Nodes to ping now (their last ping answered or timed out)."""
        due = [n for n in self.nodes.values() if n.ping is None and n.next_ping <= now]
        for node in due:
            node.next_ping = now + self.ping_interval
        return due

    def next_ping(self) -> float | None:
        return min((n.next_ping for n in self.nodes.values() if n.ping is None), default=None)

    def pong(self, node: Node, rtt: float) -> bool:
        """A ping answered; True if the node came up with it."""
        node.ping = None
        node.missed = 0
        node.rtt = rtt
        came_up = not node.up
        node.up = True
        if came_up:
            log.info("rtpengine %s is up (%.1f ms)", node.name, rtt * 1000)
        return came_up

    def missed_ping(self, node: Node) -> bool:
        """A ping not answered; True if the node went down with it."""
        node.ping = None
        node.missed += 1
        if node.up and node.missed >= self.down_after:
            node.up = False
            log.warning("rtpengine %s is down (%d pings unanswered)", node.name, node.missed)
            return True
        return False
