"""The SBC's front door: who may talk to it, how fast, and who is banned.

Sans-I/O like the rest of the core: every method takes ``now`` and returns a verdict. One
``Guard`` holds, per source IP address:

- access control: CIDR allow/deny lists per side; the core side takes requests only from
  the configured backends and peers (and ``core_allow``);
- flood detection in the manner of Kamailio's pike module: packets counted per source in
  fixed sampling windows; a source above the density is banned for ``ban_time`` (the
  htable ban list), and a banned source's packets are dropped before they are parsed;
- token buckets per method class (REGISTER, INVITE, other out-of-dialog requests): a
  request over its bucket gets 503 with Retry-After (RFC 3261 21.5.4);
- brute-force protection: a request with credentials (RFC 3261 22.2/22.3) answered 401,
  407 or 403 is a failed authentication, counted per source and per user name; a source
  over the limit is banned, a user over it is locked for ``ban_time``;
- a User-Agent block list (scanners) whose requests are dropped without an answer;
- per-source limits on stream connections and on TLS handshakes;
- overload control (RFC 6357, RFC 7339's loss-based idea applied locally): the I/O layer
  reports how late the SBC serves what it receives (event loop lag, time waited in a socket
  queue); above the target delay a growing share of new out-of-dialog requests is
  answered 503 with Retry-After (RFC 3261 21.5.4) before any routing work, so that the
  calls admitted keep their pace instead of every request slowing down;
- a ceiling on the REGISTERs relayed to the backends (registrar protection).

A source on the ``allow`` list, a backend or a peer is never banned, rate limited or locked
out. State per
source is dropped once it is idle, so a scan from many addresses cannot grow it without
bound (``max_sources`` caps it even then: the oldest entries go first).
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field

from sbc.sides import ACCESS, Side

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

log = logging.getLogger("sbc.guard")

# The overload controller (``Guard.report_lag``), per report (a few per second): the share
# refused grows by _SHED_GAIN per second of delay over the target and by _SHED_TREND per
# second the delay grew since the last report; below half the target it is only multiplied
# by _SHED_DECAY; it stays within [_SHED_MIN, _SHED_MAX] (under _SHED_MIN: nothing refused).
_SHED_GAIN = 0.5
_SHED_TREND = 1.0
_SHED_DECAY = 0.7
_SHED_MIN = 0.01
_SHED_MAX = 0.98

# Method classes of the token buckets.
REGISTER = "register"
INVITE = "invite"
OTHER = "other"
CLASSES = (REGISTER, INVITE, OTHER)


@dataclass(frozen=True, slots=True)
class Bucket:
    """A token bucket: ``rate`` tokens per second, at most ``burst``; rate 0: no limit."""

    rate: float = 0.0
    burst: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class GuardPolicy:
    """[security] of the config. The defaults here limit nothing (unit tests build cores
    without a policy); the config's defaults are the production ones."""

    allow: tuple[Network, ...] = ()  # trusted: never banned, limited, locked out or shed
    access_allow: tuple[Network, ...] = ()  # empty: every address may use the access side
    access_deny: tuple[Network, ...] = ()
    core_allow: tuple[Network, ...] = ()  # beyond the backends and peers
    core_sources: frozenset[str] = frozenset()  # backend and peer addresses (filled in)
    restrict_core: bool = False  # the core side takes only core_sources and core_allow
    user_agent_block: tuple[str, ...] = ()  # lower-case substrings
    pike_window: float = 2.0  # sampling window, seconds
    pike_density: int = 0  # packets per window per source above which it is banned; 0: off
    ban_time: float = 300.0
    rates: dict[str, Bucket] = field(default_factory=dict)  # per method class
    retry_after: int = 5  # Retry-After of the 503s of overload (rate limits compute theirs)
    auth_failures: int = 0  # failed authentications per source within auth_window; 0: off
    auth_user_failures: int = 0  # the same per user name; 0: off
    auth_window: float = 60.0
    max_connections_per_source: int = 0  # open TCP/TLS connections; 0: no limit
    tls_handshakes: Bucket = Bucket()  # handshakes per source
    overload_lag: float = 0.0  # target delay (s) of the overload control; 0: off
    backend_register_rate: Bucket = Bucket()  # REGISTERs relayed to the backends, in all
    max_sources: int = 100_000  # sources tracked at most
    idle_after: float = 600.0  # a source quiet this long (and not banned) is forgotten


NO_POLICY = GuardPolicy()


class _Source:
    """What the guard knows about one source address."""

    __slots__ = (
        "access_ok",
        "auth_times",
        "ban_until",
        "buckets",
        "connections",
        "core_ok",
        "count",
        "last_seen",
        "trusted",
        "window_start",
    )

    def __init__(self, trusted: bool, access_ok: bool, core_ok: bool, now: float) -> None:
        self.trusted = trusted
        self.access_ok = access_ok
        self.core_ok = core_ok
        self.ban_until = 0.0
        self.window_start = now
        self.count = 0
        self.buckets: dict[str, list[float]] = {}  # class -> [tokens, last refill]
        self.connections = 0
        self.auth_times: list[float] = []
        self.last_seen = now


def _take(state: list[float] | None, bucket: Bucket, now: float) -> tuple[list[float], float]:
    """Take one token; returns the state and 0.0, or the seconds until a token is due."""
    if state is None:
        state = [float(bucket.burst), now]
    tokens = min(float(bucket.burst), state[0] + (now - state[1]) * bucket.rate)
    state[1] = now
    if tokens >= 1.0:
        state[0] = tokens - 1.0
        return state, 0.0
    state[0] = tokens
    return state, (1.0 - tokens) / bucket.rate


_USERNAME = re.compile(r'username\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))', re.IGNORECASE)


def credentials_user(value: str) -> str:
    """The user name of Authorization / Proxy-Authorization (RFC 3261 25.1 digest-response
    username); "" if it has none."""
    match = _USERNAME.search(value)
    if match is None:
        return ""
    return match.group(1) if match.group(1) is not None else match.group(2)


def _address(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A source address by value: an IPv4 sender on a dual-stack socket arrives as
    ``::ffff:a.b.c.d`` (RFC 4291 2.5.5.2) and is judged as the IPv4 address it is; a zone
    index is dropped. None if it is not an IP address."""
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _addresses(ips: frozenset[str]) -> frozenset[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    return frozenset(a for a in map(_address, ips) if a is not None)


def _in(address: ipaddress.IPv4Address | ipaddress.IPv6Address, nets: tuple[Network, ...]) -> bool:
    return any(address.version == net.version and address in net for net in nets)


@dataclass(frozen=True, slots=True)
class Limited:
    """A request over a limit: answer ``status`` with ``reason`` and Retry-After."""

    status: int
    reason: str
    retry_after: int
    label: str


DROP = "drop"  # the verdict for a request dropped without an answer


class Guard:
    def __init__(self, policy: GuardPolicy = NO_POLICY, *, sharing: bool = False) -> None:
        """``sharing``: the guard is one of several signalling workers', which ban a source
        together (sbc/registration/shared.py)."""
        self.policy = policy
        # Whether anything is checked at all (the cores of unit tests check nothing).
        self.active = policy != NO_POLICY
        self._core = _addresses(policy.core_sources)
        self._sources: dict[str, _Source] = {}  # by IP; oldest first seen first
        self._users: dict[str, list[float]] = {}  # user name -> failure times
        self._locked: dict[str, float] = {}  # user name -> locked until
        self._credentials: dict[str, tuple[str, str]] = {}  # request key -> (ip, user)
        # Overload control: the share of new out-of-dialog requests refused, and the
        # credit of the deterministic spreading of refusals (``shed``).
        self.shed_ratio = 0.0
        self._shed_credit = 0.0
        self.delay = 0.0  # the last delay reported (s)
        self._register_state: list[float] | None = None
        self._next_sweep = 0.0
        self.stats: Counter[str] = Counter()
        self.bans: dict[str, float] = {}  # banned source -> until (what `sbc status` shows)
        # With ``sharing``, the bans made here, (source, until, reason), until the core
        # takes them for the other workers.
        self.sharing = sharing
        self.shared_bans: list[tuple[str, float, str]] = []

    def set_policy(self, policy: GuardPolicy) -> None:
        """A reloaded [security]: what each known source may do is worked
        out again; bans in force stay, and so do the buckets' levels."""
        self.policy = policy
        self.active = policy != NO_POLICY
        self._core = _addresses(policy.core_sources)
        for ip, src in self._sources.items():
            fresh = self._judge(ip, src.last_seen)
            src.trusted, src.access_ok, src.core_ok = fresh.trusted, fresh.access_ok, fresh.core_ok
            if src.trusted and src.ban_until:
                src.ban_until = 0.0  # now on the allow list: never banned
                self.bans.pop(ip, None)

    # -- per packet --------------------------------------------------------------------------
    def _judge(self, ip: str, now: float) -> _Source:
        """A new source's standing under the policy: trusted, and allowed on each side."""
        p = self.policy
        address = _address(ip)
        if address is None:
            return _Source(False, False, False, now)
        # Backends and peers are trusted too: banning one for its traffic would be an
        # outage of everything behind it.
        trusted = _in(address, p.allow) or address in self._core
        access_ok = trusted or (
            (not p.access_allow or _in(address, p.access_allow)) and not _in(address, p.access_deny)
        )
        core_ok = not p.restrict_core or trusted or _in(address, p.core_allow)
        return _Source(trusted, access_ok, core_ok, now)

    def _source(self, ip: str, now: float) -> _Source:
        src = self._sources.get(ip)
        if src is not None:
            src.last_seen = now
            return src
        p = self.policy
        src = self._judge(ip, now)
        if len(self._sources) >= p.max_sources:
            self._evict(now)
        self._sources[ip] = src
        return src

    def admit(self, ip: str, side: Side, now: float) -> bool:
        """Whether a packet (a datagram, or data on a connection) from ``ip`` arriving on
        ``side`` is looked at; False: drop it unparsed."""
        src = self._source(ip, now)
        if not (src.access_ok if side == ACCESS else src.core_ok):
            self.stats["denied_address"] += 1
            return False
        if src.trusted:
            return True
        if src.ban_until:
            if now < src.ban_until:
                self.stats["dropped_banned"] += 1
                return False
            src.ban_until = 0.0
            self.bans.pop(ip, None)
        p = self.policy
        if p.pike_density:
            if now - src.window_start >= p.pike_window:
                src.window_start = now
                src.count = 0
            src.count += 1
            if src.count > p.pike_density:
                self._ban(ip, src, now, "flood")
                return False
        return True

    def _ban(self, ip: str, src: _Source, now: float, why: str) -> None:
        src.ban_until = now + self.policy.ban_time
        src.count = 0
        self.bans[ip] = src.ban_until
        self.stats[f"ban:{why}"] += 1
        if self.sharing:
            self.shared_bans.append((ip, src.ban_until, why))
        # One line per ban (a banned source's packets are dropped unread until it ends).
        log.warning(
            "banned %s for %g s: %s", ip, self.policy.ban_time, why,
            extra={"source": ip, "reason": why},
        )  # fmt: skip

    def apply_ban(self, ip: str, until: float, why: str, now: float) -> None:
        """Another worker banned ``ip`` until ``until``: its packets are dropped here too.
        Counted as ``shared_ban``, not as a ban of this worker's (``ban:``); a source
        trusted here (the same policy: none is) stays unbanned."""
        if until <= now:
            return
        src = self._source(ip, now)
        if src.trusted:
            return
        self.stats["shared_ban"] += 1
        if until > src.ban_until:
            src.ban_until = until
            src.count = 0
            self.bans[ip] = until
        log.debug("banned %s by another worker: %s", ip, why, extra={"source": ip})

    def banned(self, ip: str, now: float) -> bool:
        src = self._sources.get(ip)
        return src is not None and src.ban_until > now

    # -- per request -------------------------------------------------------------------------
    def blocked_agent(self, user_agent: str | None) -> bool:
        """A scanner's User-Agent (substring, case-insensitive): drop without an answer."""
        if not user_agent or not self.policy.user_agent_block:
            return False
        ua = user_agent.lower()
        if any(bad in ua for bad in self.policy.user_agent_block):
            self.stats["blocked_user_agent"] += 1
            return True
        return False

    def check_request(
        self, ip: str, method_class: str, now: float, *, credentials: tuple[str, str] | None
    ) -> Limited | None:
        """Rate limit and overload of an out-of-dialog request from ``ip``; ``credentials``
        is (key, user name) of a request with Authorization / Proxy-Authorization."""
        src = self._source(ip, now)
        if src.trusted:
            if credentials is not None:
                self._remember_credentials(credentials, ip)
            return None
        p = self.policy
        if credentials is not None:
            user = credentials[1]
            until = self._locked.get(user)
            if until is not None:
                if now < until:
                    self.stats["rejected:user_locked"] += 1
                    return Limited(403, "Too Many Failed Authentications", 0, "user_locked")
                del self._locked[user]
        bucket = p.rates.get(method_class)
        if bucket is not None and bucket.rate > 0:
            state, wait = _take(src.buckets.get(method_class), bucket, now)
            src.buckets[method_class] = state
            if wait:
                self.stats[f"rejected:rate_{method_class}"] += 1
                return Limited(503, "Rate Limit Exceeded", math.ceil(wait), f"rate_{method_class}")
        if credentials is not None:
            self._remember_credentials(credentials, ip)
        return None

    def _remember_credentials(self, credentials: tuple[str, str], ip: str) -> None:
        if not (self.policy.auth_failures or self.policy.auth_user_failures):
            return
        key, user = credentials
        if len(self._credentials) >= self.policy.max_sources:
            self._credentials.pop(next(iter(self._credentials)))
        self._credentials[key] = (ip, user)

    def auth_answer(self, key: str, status: int, now: float) -> None:
        """A final answer to a request that carried credentials: 401/407/403 count as a
        failed authentication of its source and its user name; a 2xx forgets them; any
        other status (0: a stale-nonce challenge) only closes the request's record."""
        who = self._credentials.pop(key, None)
        if who is None:
            return
        ip, user = who
        p = self.policy
        if 200 <= status < 300:
            self._users.pop(user, None)
            src = self._sources.get(ip)
            if src is not None:
                src.auth_times.clear()
            return
        if status not in (401, 403, 407):
            return
        self.stats["auth_failure"] += 1
        src = self._source(ip, now)
        if p.auth_failures and not src.trusted:
            times = [t for t in src.auth_times if now - t < p.auth_window]
            times.append(now)
            src.auth_times = times
            if len(times) >= p.auth_failures:
                self._ban(ip, src, now, "auth")
                src.auth_times = []
        if p.auth_user_failures and user:
            times = [t for t in self._users.get(user, ()) if now - t < p.auth_window]
            times.append(now)
            self._users[user] = times
            if len(times) >= p.auth_user_failures:
                self._locked[user] = now + p.ban_time
                self._users.pop(user, None)
                self.stats["user_locked"] += 1

    @property
    def expects_auth_answers(self) -> bool:
        return bool(self._credentials)

    # -- registrar protection ----------------------------------------------------------------
    def backend_register(self, now: float) -> int:
        """A REGISTER about to be relayed to a backend: 0 if it may go, else the seconds
        to put in Retry-After (the backends' REGISTER ceiling is reached)."""
        bucket = self.policy.backend_register_rate
        if bucket.rate <= 0:
            return 0
        self._register_state, wait = _take(self._register_state, bucket, now)
        if wait:
            self.stats["rejected:backend_register_ceiling"] += 1
            return math.ceil(wait)
        return 0

    # -- connections -------------------------------------------------------------------------
    def connection_opened(self, ip: str, now: float) -> bool:
        """A TCP/TLS connection accepted from ``ip``: False to close it at once."""
        src = self._source(ip, now)
        if src.trusted:
            src.connections += 1
            return True
        if src.ban_until > now:
            self.stats["dropped_banned"] += 1
            return False
        limit = self.policy.max_connections_per_source
        if limit and src.connections >= limit:
            self.stats["rejected:connections"] += 1
            return False
        src.connections += 1
        return True

    def connection_gone(self, ip: str) -> None:
        src = self._sources.get(ip)
        if src is not None and src.connections:
            src.connections -= 1

    def handshake_allowed(self, ip: str, now: float) -> bool:
        """A TLS handshake about to start with ``ip`` (its token bucket)."""
        bucket = self.policy.tls_handshakes
        src = self._source(ip, now)
        if src.trusted or bucket.rate <= 0:
            return True
        state, wait = _take(src.buckets.get("tls"), bucket, now)
        src.buckets["tls"] = state
        if wait:
            self.stats["rejected:tls_handshakes"] += 1
            return False
        return True

    # -- load --------------------------------------------------------------------------------
    def report_lag(self, lag: float, now: float) -> None:
        """How late the SBC serves what it receives, reported by the I/O layer a few times a
        second (the larger of its event loop's lateness and the time a datagram waited in a
        socket's receive queue). A proportional-integral controller in the manner of PIE
        (RFC 8033 4.2) moves ``shed_ratio`` so that the delay settles at the target: it
        grows with the excess over the target and with the delay's growth since the last
        report; below half the target it only decays, so the SBC is back to serving
        everyone within a few seconds of the load going away. It starts at the second
        measure over the target in a row (PIE's burst allowance, RFC 8033 4.4)."""
        target = self.policy.overload_lag
        previous, self.delay = self.delay, lag
        if not target:
            return
        before = self.shed_ratio
        if lag < target / 2:  # well under the target: only ever less
            ratio = before * _SHED_DECAY
        elif not before and previous <= target:
            ratio = 0.0  # one late measure is a burst (a collection, a reload), not overload
        else:
            ratio = before + _SHED_GAIN * (lag - target) + _SHED_TREND * (lag - previous)
        ratio = min(_SHED_MAX, ratio)
        self.shed_ratio = ratio if ratio >= _SHED_MIN else 0.0
        if self.shed_ratio and not before:
            self.stats["overload"] += 1
            log.warning("overloaded (%.3f s late): refusing some new requests with 503", lag)
        elif before and not self.shed_ratio:
            log.warning("overload over: every new request served again")

    def overloaded(self, now: float) -> bool:
        return self.shed_ratio > 0.0

    def shed(self, ip: str, now: float) -> Limited | None:
        """Whether a new out-of-dialog request from ``ip`` is refused for overload: the
        refusals are spread evenly (a credit, not a coin), and a trusted source is never
        refused."""
        if not self.shed_ratio or self._source(ip, now).trusted:
            return None
        self._shed_credit += 1.0 - self.shed_ratio
        if self._shed_credit >= 1.0:
            self._shed_credit -= 1.0
            return None
        self.stats["rejected:overload"] += 1
        return Limited(503, "Server Overloaded", self.policy.retry_after, "overload")

    # -- housekeeping ------------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        return self._next_sweep if self._sources else None

    def handle_timer(self, now: float) -> None:
        if now < self._next_sweep:
            return
        self._next_sweep = now + 10.0
        idle = self.policy.idle_after
        for ip in [
            ip
            for ip, src in self._sources.items()
            if now - src.last_seen > idle and src.ban_until <= now and not src.connections
        ]:
            del self._sources[ip]
        for ip in [ip for ip, until in self.bans.items() if until <= now]:
            del self.bans[ip]
        for user in [u for u, until in self._locked.items() if until <= now]:
            del self._locked[user]
        # Failure times per user name: a sender makes the names up, so they go once out of
        # the window (and the oldest first beyond max_sources).
        window = self.policy.auth_window
        for user in [u for u, t in self._users.items() if not t or now - t[-1] >= window]:
            del self._users[user]
        while len(self._users) > self.policy.max_sources:
            self._users.pop(next(iter(self._users)))

    def _evict(self, now: float) -> None:
        """At ``max_sources``: forget the tenth first seen longest ago, sparing banned and
        connected sources while there are others; when only those are left, the oldest of
        them go too (memory stays bounded whatever a flood of addresses does)."""
        target = max(1, len(self._sources) // 10)
        victims = []
        for ip, src in self._sources.items():
            if src.ban_until <= now and not src.connections:
                victims.append(ip)
                if len(victims) >= target:
                    break
        if not victims:
            victims = list(itertools.islice(self._sources, target))
        for ip in victims:
            del self._sources[ip]
            self.bans.pop(ip, None)
        self.stats["sources_evicted"] += len(victims)

    def state_size(self) -> dict[str, int]:
        return {
            "guard_sources": len(self._sources),
            "guard_credentials": len(self._credentials),
            "guard_users": len(self._users) + len(self._locked),
        }
