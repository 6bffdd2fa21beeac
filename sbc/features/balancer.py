"""Backend selection, health probing and load balancing.

Sans-I/O: the balancer sends nothing and reads no clock. The caller asks which backends are
due for an OPTIONS probe (``probes_due(now)``), sends them, and reports each outcome
(``probe_result``); it reports transaction timeouts of ordinary requests towards a backend
(``request_failed``), arms one timer at ``next_deadline()``, and acts on the ``BackendDown`` /
``BackendUp`` events (e.g. registration recovery when a backend goes down).

Selection:

* ``pick_for_aor``: REGISTER and anything else that must stick to one user. Kamailio
  dispatcher algorithm 2 (hash over the To URI) is the model for *what* is hashed; *how* is
  weighted rendezvous (highest-random-weight) hashing, so that when a backend goes down only
  its users move, and they spread over the survivors in proportion to weight instead of all
  landing on the next entry of the list as with dispatcher's modulo hash + failover.
* ``pick_for_dialog``: new dialogs, per ``[core] balance``: ``aor-hash`` (as above),
  ``weighted-round-robin`` (nginx's smooth weighted round robin; dispatcher has plain round
  robin as algorithm 4 and a random, weight-proportional choice as algorithm 9) or
  ``least-calls`` (dispatcher algorithm 10, call load distribution, with weights).

Health (dispatcher's ``ds_ping_interval``, ``ds_probing_threshold``, ``ds_inactive_threshold``
and ``ds_ping_reply_codes`` as ``probe_interval``, ``probe_failures``, ``probe_successes`` and
``reply_codes``): every backend is probed, up or down, every ``probe_interval`` seconds; a
backend goes down after ``probe_failures`` consecutive failures and comes back after
``probe_successes`` consecutive good probes. The caller must time a probe out well within
``probe_interval`` (a default RFC 3261 Timer F of 64*T1 = 32 s would stretch detection to
``probe_failures`` x 32 s), because no new probe is sent to a backend while one is in flight.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import ClassVar

__all__ = [
    "DEFAULT_REPLY_CODES",
    "BackendDown",
    "BackendSpec",
    "BackendState",
    "BackendUp",
    "Balancer",
    "HealthChange",
    "HealthPolicy",
]

# A final response of any kind proves the backend's SIP stack is running, so 2xx and 4xx
# (including 401/407 from a backend that challenges OPTIONS, RFC 3261 11.2, and 404/405/483)
# count as alive. Not 408: it is what a stack reports for a request that timed out
# (RFC 3261 8.1.3.1), i.e. nobody answered. Not 3xx (a redirecting box is not a registrar),
# 5xx (500/503: the server says it cannot serve, RFC 3261 21.5.4) nor 6xx. Dispatcher's
# default accepts 200 only and extends it through ds_ping_reply_codes; this is the
# [core] probe_reply_codes default ("200-299", "400-407", "409-499").
DEFAULT_REPLY_CODES: frozenset[int] = frozenset(range(200, 300)) | frozenset(
    code for code in range(400, 500) if code != 408
)

TRANSPORTS = frozenset({"udp", "tcp", "tls"})


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthPolicy:
    """Probe timing and thresholds (the ``[core] probe_*`` keys)."""

    probe_interval: float = 5.0  # seconds between OPTIONS probes to each backend
    probe_failures: int = 3  # consecutive failed probes before a backend is marked down
    probe_successes: int = 2  # consecutive good probes before a down backend is marked up
    # A probe answered with one of these counts as alive; anything else (incl. timeout) fails.
    reply_codes: frozenset[int] = field(default=DEFAULT_REPLY_CODES)

    def __post_init__(self) -> None:
        if not self.probe_interval > 0:
            raise ValueError(f"probe_interval must be positive, got {self.probe_interval}")
        if self.probe_failures < 1:
            raise ValueError(f"probe_failures must be at least 1, got {self.probe_failures}")
        if self.probe_successes < 1:
            raise ValueError(f"probe_successes must be at least 1, got {self.probe_successes}")


@dataclass(frozen=True, slots=True, kw_only=True)
class BackendSpec:
    """One configured backend; ``name`` is the backend URI text as configured."""

    name: str
    host: str  # no brackets around an IPv6 address
    port: int
    transport: str  # "udp" | "tcp" | "tls"
    weight: int = 1  # 0: never chosen for new work (drain); still probed

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("backend name must not be empty")
        if not self.host or self.host.startswith("["):
            raise ValueError(f"backend host must be given without brackets, got {self.host!r}")
        if not 0 < self.port < 65536:
            raise ValueError(f"backend port out of range: {self.port}")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"backend transport must be udp, tcp or tls, got {self.transport!r}")
        if self.weight < 0:
            raise ValueError(f"backend weight must not be negative, got {self.weight}")


class BackendState:
    """Mutable runtime state of one backend. Compared by identity."""

    __slots__ = (
        "active_dialogs",
        "failures",
        "last_rtt",
        "next_probe",
        "probe_in_flight",
        "spec",
        "successes",
        "up",
    )

    def __init__(self, spec: BackendSpec, *, next_probe: float = 0.0) -> None:
        self.spec = spec
        # Up from the start: traffic flows at once and probes take dead backends down
        # (dispatcher loads destinations active, ds_probing_mode 0 probes only failed ones;
        # here every backend is probed, as with ds_probing_mode 1).
        self.up = True
        self.failures = 0  # consecutive failures (probes or request timeouts)
        self.successes = 0  # consecutive good probes
        self.active_dialogs = 0
        self.last_rtt: float | None = None
        self.next_probe = next_probe
        self.probe_in_flight = False

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def address(self) -> tuple[str, int]:
        return (self.spec.host, self.spec.port)

    @property
    def transport(self) -> str:
        return self.spec.transport

    @property
    def weight(self) -> int:
        return self.spec.weight

    def __repr__(self) -> str:
        state = "up" if self.up else "down"
        return (
            f"<BackendState {self.name} {state} failures={self.failures} "
            f"successes={self.successes} dialogs={self.active_dialogs}>"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class BackendDown:
    """A backend crossed ``probe_failures``: no new work goes to it."""

    backend: BackendState
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class BackendUp:
    """A down backend answered ``probe_successes`` probes in a row: it takes work again."""

    backend: BackendState


HealthChange = BackendDown | BackendUp


def _address_key(host: str) -> str:
    """Canonical text of a host for address comparison.

    Hosts are case-insensitive (RFC 3261 19.1.4); IP addresses are compared by value, so
    "::1" matches "0:0::1" and an IPv4-mapped IPv6 source (dual-stack socket) matches the
    IPv4 backend.
    """
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host.lower().rstrip(".")
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _unit_hash(aor: str, name: str) -> float:
    """A stable pseudo-random number in the open interval (0, 1) for (aor, backend name).

    blake2b rather than ``hash()``: Python's string hash is salted per process
    (PYTHONHASHSEED), and users must land on the same backend after a restart.
    """
    h = hashlib.blake2b(digest_size=8, person=b"sbc-balancer-hrw")
    for part in (aor, name):
        data = part.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(4, "big"))  # length prefix: ("ab","c") != ("a","bc")
        h.update(data)
    top53 = int.from_bytes(h.digest(), "big") >> 11
    return (top53 + 0.5) / (1 << 53)  # never 0 or 1, so ln(u) is finite and negative


def hrw_score(aor: str, backend: BackendState) -> float:
    """Weighted rendezvous score of ``backend`` for ``aor``: -weight / ln(u).

    Logarithmic method of weighted rendezvous hashing (Schindelhauer and Schomaker,
    "Weighted distributed hash tables", SPAA 2005): -ln(u)/w is exponentially distributed
    with rate w, and the smallest of independent exponentials is backend i with
    probability w_i / sum(w), so the highest score wins in proportion to weight.
    """
    return -backend.weight / math.log(_unit_hash(aor, backend.name))


class Balancer:
    """Chooses backends and tracks their health; see the module docstring."""

    ALGORITHMS: ClassVar[tuple[str, ...]] = ("aor-hash", "weighted-round-robin", "least-calls")

    def __init__(
        self,
        specs: Sequence[BackendSpec],
        *,
        policy: HealthPolicy = HealthPolicy(),  # frozen, so one shared default is safe
        algorithm: str = "aor-hash",
        now: float = 0.0,
    ) -> None:
        if algorithm not in self.ALGORITHMS:
            raise ValueError(
                f"unknown balancing algorithm {algorithm!r}; one of {', '.join(self.ALGORITHMS)}"
            )
        names = [spec.name for spec in specs]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            # The AOR hash is keyed by name; two backends with one name would share a score.
            raise ValueError(f"duplicate backend names: {', '.join(duplicates)}")
        self.policy = policy
        self.algorithm = algorithm
        # First probe due at `now`: the first probes go out at start.
        self.backends: tuple[BackendState, ...] = tuple(
            BackendState(spec, next_probe=now) for spec in specs
        )
        self._index()

    def _index(self) -> None:
        # nginx smooth weighted round robin: current_weight per backend, by index.
        self._wrr_current = [0] * len(self.backends)
        self._by_address: dict[tuple[str, int], list[BackendState]] = {}
        for backend in self.backends:
            key = (_address_key(backend.spec.host), backend.spec.port)
            self._by_address.setdefault(key, []).append(backend)

    def reconfigure(
        self,
        specs: Sequence[BackendSpec],
        *,
        policy: HealthPolicy,
        algorithm: str,
        now: float,
    ) -> None:
        """A reloaded config: a backend kept by name keeps its state
        (up or down, dialogs, probe schedule) with its new spec (weight); a new one starts
        up and is probed now; a removed one takes no new work (calls already on it keep
        it until they end)."""
        if algorithm not in self.ALGORITHMS:
            raise ValueError(f"unknown balancing algorithm {algorithm!r}")
        names = [spec.name for spec in specs]
        if len(set(names)) != len(names):
            raise ValueError("duplicate backend names")
        old = {b.name: b for b in self.backends}
        backends = []
        for spec in specs:
            state = old.get(spec.name)
            where = (spec.host, spec.port, spec.transport)
            if state is None or (state.spec.host, state.spec.port, state.spec.transport) != where:
                state = BackendState(spec, next_probe=now)
            else:
                state.spec = spec
            backends.append(state)
        self.backends = tuple(backends)
        self.policy = policy
        self.algorithm = algorithm
        self._index()

    # -- selection ---------------------------------------------------------------------------

    def _candidates(self) -> list[tuple[int, BackendState]]:
        """UP backends that may take new work (weight > 0), with their index."""
        return [(i, b) for i, b in enumerate(self.backends) if b.up and b.weight > 0]

    def up_backends(self) -> list[BackendState]:
        """Backends currently up (including drained ones of weight 0), in config order."""
        return [b for b in self.backends if b.up]

    def pick_for_aor(self, aor: str, *, exclude: Collection[str] = ()) -> BackendState | None:
        """The backend for ``aor`` (pass it canonical, e.g. the To URI without parameters).

        Weighted rendezvous hashing over UP backends with weight > 0 (module docstring):
        a user keeps its backend while that backend is up; when it goes down only its
        users move, and when it returns exactly those users move back. None if no
        backend can take work. ``exclude`` names backends already tried for this request
        (failover): the next in the AOR's rendezvous order is chosen.
        """
        best: BackendState | None = None
        best_score = -math.inf
        for _, backend in self._candidates():
            if backend.name in exclude:
                continue
            score = hrw_score(aor, backend)
            # Strictly greater: an (astronomically unlikely) tie goes to the lowest index.
            if score > best_score:
                best, best_score = backend, score
        return best

    def pick_for_dialog(self, key: str) -> BackendState | None:
        """The backend for a new dialog per ``algorithm``; ``key`` feeds ``aor-hash`` only.

        Does not count the dialog: call ``dialog_started`` once it is sent there.
        """
        if self.algorithm == "aor-hash":
            return self.pick_for_aor(key)
        if self.algorithm == "weighted-round-robin":
            return self._pick_smooth_wrr()
        return self._pick_least_calls()

    def _pick_smooth_wrr(self) -> BackendState | None:
        # nginx ngx_http_upstream_get_peer() (smooth weighted round robin, nginx 1.3.1):
        # every eligible peer gains its weight, the largest current weight wins (first on a
        # tie) and loses the total. Weights 5:1:1 give a a b a c a a. Peers that are down
        # or drained are skipped and keep their current weight, as in nginx.
        best_index = -1
        total = 0
        for i, backend in self._candidates():
            self._wrr_current[i] += backend.weight
            total += backend.weight
            if best_index < 0 or self._wrr_current[i] > self._wrr_current[best_index]:
                best_index = i
        if best_index < 0:
            return None
        self._wrr_current[best_index] -= total
        return self.backends[best_index]

    def _pick_least_calls(self) -> BackendState | None:
        # Dispatcher algorithm 10 (call load distribution) with weights: the fewest active
        # dialogs per unit of weight, compared exactly; ties go to the lowest index.
        candidates = self._candidates()
        if not candidates:
            return None
        _, _, backend = min((Fraction(b.active_dialogs, b.weight), i, b) for i, b in candidates)
        return backend

    def dialog_started(self, backend: BackendState) -> None:
        backend.active_dialogs += 1

    def dialog_ended(self, backend: BackendState) -> None:
        backend.active_dialogs = max(0, backend.active_dialogs - 1)

    def by_address(
        self, host: str, port: int, *, transport: str | None = None
    ) -> BackendState | None:
        """The backend at ``host``:``port`` (a request's or response's source), or None.

        Hosts compare case-insensitively and IP addresses by value (brackets optional).
        A backend configured by hostname only matches that hostname: resolving it is the
        caller's job. Several backends on one address (e.g. UDP and TCP on one port) are
        told apart by ``transport``; without it the first configured wins.
        """
        for backend in self._by_address.get((_address_key(host), port), ()):
            if transport is None or backend.transport == transport:
                return backend
        return None

    # -- health ------------------------------------------------------------------------------

    def is_alive_reply(self, status: int) -> bool:
        """Whether a final response ``status`` to a probe counts as alive."""
        return status in self.policy.reply_codes

    def probes_due(self, now: float) -> list[BackendState]:
        """Backends to send an OPTIONS probe to now, marked in flight and rescheduled.

        Every backend is probed, up, down or drained: a down one needs probes to come back.
        The next probe is due ``probe_interval`` after this one was sent (dispatcher's
        ds_ping_interval), but is not sent before this one's outcome is reported.
        """
        due = [b for b in self.backends if not b.probe_in_flight and b.next_probe <= now]
        for backend in due:
            backend.probe_in_flight = True
            backend.next_probe = now + self.policy.probe_interval
        return due

    def probe_result(
        self,
        backend: BackendState,
        *,
        ok: bool,
        now: float,
        rtt: float | None = None,
        reason: str = "",
    ) -> HealthChange | None:
        """Record a probe's outcome; ``ok`` False for a timeout or a code not in reply_codes.

        Returns BackendDown or BackendUp exactly when the backend changes state.
        """
        backend.probe_in_flight = False
        if not ok:
            return self._failure(backend, reason or "probe failed")
        if rtt is not None:
            backend.last_rtt = rtt
        backend.failures = 0
        backend.successes += 1
        # Dispatcher's ds_inactive_threshold: consecutive good probes before it is active.
        if not backend.up and backend.successes >= self.policy.probe_successes:
            backend.up = True
            return BackendUp(backend=backend)
        return None

    def request_failed(
        self, backend: BackendState, *, now: float, reason: str
    ) -> HealthChange | None:
        """A transaction towards ``backend`` timed out (RFC 3261 17.1.1.2 Timer B,
        17.1.2.2 Timer F): one failure, as a failed probe."""
        return self._failure(backend, reason or "request timed out")

    def _failure(self, backend: BackendState, reason: str) -> HealthChange | None:
        backend.successes = 0
        backend.failures += 1
        # Dispatcher's ds_probing_threshold: consecutive failures before it is inactive.
        # Failures keep counting while down, without further events.
        if backend.up and backend.failures >= self.policy.probe_failures:
            backend.up = False
            return BackendDown(backend=backend, reason=reason)
        return None

    def next_deadline(self) -> float | None:
        """When ``probes_due`` next has work: the earliest ``next_probe`` among backends
        without a probe in flight (None if there is none)."""
        deadlines = [b.next_probe for b in self.backends if not b.probe_in_flight]
        return min(deadlines, default=None)
