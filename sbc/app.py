"""Wires the SBC from its config: core, listeners, signals. ``run`` blocks until stopped."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import logging
import os
import secrets
import signal
import socket
import ssl
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

from redis.exceptions import RedisError

from sbc import audit, state
from sbc.calls import CallPolicy, PeerRoute
from sbc.config import Config, ConfigError, ListenUrl, Peer, RateConfig, TlsConfig, load_config
from sbc.config.values import ng_address
from sbc.core import SECRET_BYTES, CoreSettings, SbcCore
from sbc.features.balancer import BackendSpec, HealthPolicy
from sbc.features.guard import CLASSES, Bucket, GuardPolicy
from sbc.features.keepalive import NatPolicy
from sbc.io.admin import AdminServer
from sbc.io.media_worker import MediaWorkers
from sbc.io.sip_transport import (
    SipTransports,
    StartupError,
    TlsFiles,
    client_tls_context,
    tls_context,
)
from sbc.io.state_store import StateStore
from sbc.io.websocket import WebSocketSettings
from sbc.io.worker_link import WorkerLink
from sbc.media.control import Command as MediaCommand
from sbc.media.control import Event as MediaEvent
from sbc.media.dtls import make_identity
from sbc.media.ng import Node, NodePool
from sbc.media.rtpengine import Rtpengine
from sbc.media.session import MediaController, MediaPolicy, MediaRefused, SideMedia
from sbc.ownership import worker_tag
from sbc.registration import OffloadPolicy
from sbc.registration.shared import Unusable, shift_times
from sbc.sides import ACCESS, CORE, PEER
from sbc.sip.parser import Limits
from sbc.sip.transaction import Timers, mark_branches
from sbc.sip.uri import SipUri, parse_uri

__all__ = [
    "Signals", "StartupError", "WorkerRole", "core_settings", "restart_needed", "run",
    "run_worker", "serve",
]  # fmt: skip

log = logging.getLogger("sbc.app")

SYNC_TIMEOUT = 1.0  # s a restarted worker waits for the shared state before it serves


def core_settings(config: Config, workers: int = 1) -> CoreSettings:
    """The core's settings from the config; ``workers``: the signalling workers that share
    the load (each enforces its share of the per-source limits: ``guard_policy``)."""
    sip = config.sip
    reg = config.registration
    calls = config.calls
    hosts = {url.host.lower() for url in (*config.access.listen, *config.core.listen)}
    hosts |= {"localhost", config.sbc.name.lower()}
    if config.sbc.public_address:
        hosts.add(config.sbc.public_address.strip("[]").lower())
    backends = tuple(backend_spec(b.uri, b.weight) for b in config.core.backends)
    peers = tuple(peer_route(p) for p in config.peers)
    return CoreSettings(
        local_hosts=frozenset(hosts),
        server_header=sip.server_header,
        timers=Timers(t1=sip.t1, t2=sip.t2, t4=sip.t4),
        limits=Limits(
            max_message_size=sip.max_message_size,
            max_headers=sip.max_headers,
            max_header_line=sip.max_header_line,
        ),
        tcp_idle_timeout=sip.tcp_idle_timeout,
        backends=backends,
        health=HealthPolicy(
            probe_interval=config.core.probe_interval,
            probe_failures=config.core.probe_failures,
            probe_successes=config.core.probe_successes,
            reply_codes=config.core.alive_codes,
        ),
        balance=config.core.balance,
        request_timeout=config.core.request_timeout,
        offload=OffloadPolicy(
            client_udp=reg.client_expires.udp,
            client_tcp=reg.client_expires.tcp,
            client_tls=reg.client_expires.tls,
            backend_expires=reg.backend_expires,
            backend_spread=reg.backend_spread,
        ),
        nat=NatPolicy(
            interval=config.nat.keepalive_interval,
            method=config.nat.keepalive_method,
            failures=config.nat.keepalive_failures,
        ),
        calls=CallPolicy(
            max_calls=calls.max_calls,
            max_calls_per_source=calls.max_calls_per_source,
            no_answer_timeout=calls.no_answer_timeout,
            max_duration=calls.max_duration,
            retry_after=calls.retry_after,
            strip_headers=tuple(name.lower() for name in calls.strip_headers),
            keep_records=calls.records is not None,
            client_address_header=calls.client_address_header,
        ),
        peers=peers,
        public_address=(config.sbc.public_address or "").strip("[]") or None,
        security=guard_policy(
            config,
            {b.host.lower() for b in backends} | {p.host.lower() for p in peers},
            workers,
        ),
    )


def _bucket(cfg: RateConfig, workers: int = 1) -> Bucket:
    if workers == 1:
        return Bucket(rate=cfg.rate, burst=cfg.burst)
    return Bucket(rate=cfg.rate / workers, burst=_share(cfg.burst, workers))


def _share(limit: int, workers: int) -> int:
    """One worker's share of a count limit (0: no limit stays none)."""
    return -(-limit // workers) if limit else 0


def guard_policy(config: Config, core_sources: set[str], workers: int = 1) -> GuardPolicy:
    """[security] as the guard's policy; ``core_sources``: backend and peer IPs.

    With several signalling workers each enforces ``1/workers`` of every per-source limit
    and of the REGISTER ceiling towards the backends: the kernel spreads a source's ports
    (and connections) evenly over the workers, so a flood spread over them meets the
    configured limit in all, as one flood (a source that keeps to one port meets a
    worker's share). A ban is shared: the worker that bans tells the others."""
    sec = config.security
    return GuardPolicy(
        allow=tuple(c.network for c in sec.allow),
        access_allow=tuple(c.network for c in sec.access_allow),
        access_deny=tuple(c.network for c in sec.access_deny),
        core_allow=tuple(c.network for c in sec.core_allow),
        core_sources=frozenset(core_sources),
        restrict_core=True,
        user_agent_block=tuple(ua.lower() for ua in sec.user_agent_block if ua),
        pike_window=sec.pike_window,
        pike_density=_share(sec.pike_density, workers),
        ban_time=sec.ban_time,
        rates={cls: _bucket(getattr(sec, cls), workers) for cls in CLASSES},
        retry_after=sec.retry_after,
        auth_failures=_share(sec.auth_failures, workers),
        auth_user_failures=_share(sec.auth_user_failures, workers),
        auth_window=sec.auth_window,
        max_connections_per_source=_share(sec.max_connections_per_source, workers),
        tls_handshakes=_bucket(sec.tls_handshakes, workers),
        overload_lag=sec.overload_lag,
        backend_register_rate=_bucket(sec.backend_register, workers),
        max_sources=sec.max_sources,
    )


def _next_hop(uri_text: str, what: str) -> tuple[str, int, str]:
    """(address, port, transport) of a configured URI; a host name is resolved now."""
    uri = parse_uri(uri_text)
    assert isinstance(uri, SipUri)  # the config checked it
    transport = uri.transport or ("tls" if uri.secure else "udp")
    port = uri.port or (5061 if transport == "tls" else 5060)
    host = uri.host_bare
    try:
        ipaddress.ip_address(host)
    except ValueError:
        try:
            host = str(socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0][4][0])
        except OSError as exc:
            raise StartupError(f"cannot resolve {what} {uri_text}: {exc}") from None
    return host, port, transport


def backend_spec(uri_text: str, weight: int) -> BackendSpec:
    """A configured backend URI as the balancer's spec."""
    host, port, transport = _next_hop(uri_text, "backend")
    return BackendSpec(name=uri_text, host=host, port=port, transport=transport, weight=weight)


def peer_route(peer: Peer) -> PeerRoute:
    host, port, transport = _next_hop(peer.uri, "peer")
    uri = parse_uri(peer.uri)
    assert isinstance(uri, SipUri)
    return PeerRoute(
        name=peer.name, host=host, port=port, transport=transport,
        domains=frozenset(d.lower() for d in peer.domains), prefixes=peer.prefixes,
        tls_name=peer.tls_name or uri.host_bare,  # the host as written, not as resolved
    )  # fmt: skip


def _tls(cfg: TlsConfig, name: str, *, peers: bool = False) -> TlsFiles | None:
    """The server context of one side, rebuilt when its files change. With ``peers`` a
    client certificate is asked for (and verified against ``ca`` when given): peer SBCs
    must show one that names them."""
    if cfg.certificate is None or cfg.private_key is None:
        return None
    certificate, private_key = str(cfg.certificate), str(cfg.private_key)
    ca = str(cfg.ca) if cfg.ca else None

    def build() -> ssl.SSLContext:
        return tls_context(
            certificate,
            private_key,
            ca,
            verify=cfg.verify_clients,
            min_version=cfg.min_version,
            ciphers=cfg.ciphers,
            ask_client_certificate=peers,
        )

    return TlsFiles(name, build, (cfg.certificate, cfg.private_key, cfg.ca))


def _client_tls(cfg: TlsConfig) -> TlsFiles:
    def build() -> ssl.SSLContext:
        return client_tls_context(
            str(cfg.certificate) if cfg.certificate else None,
            str(cfg.private_key) if cfg.private_key else None,
            str(cfg.ca) if cfg.ca else None,
            min_version=cfg.min_version,
            ciphers=cfg.ciphers,
        )

    return TlsFiles("[core.tls] client", build, (cfg.certificate, cfg.private_key, cfg.ca))


def media_policy(
    config: Config, workers: int, ports: tuple[int, int] | None = None, dtls_fingerprint: str = ""
) -> MediaPolicy:
    """The relay's addresses, SRTP policy and codecs per side; ``ports``: the share of the
    [media] ports of this signalling worker (all of them by default); ``dtls_fingerprint``:
    that of the media workers' DTLS certificate (WebRTC legs; none: no WebRTC)."""
    m = config.media
    access = m.access_address or m.address
    core = m.core_address or m.address
    return MediaPolicy(
        sides={
            ACCESS: SideMedia(bind=access, advertise=m.advertise_address or access,
                                srtp=m.access_srtp, codecs=m.access_codecs),
            CORE: SideMedia(bind=core, advertise=core, srtp=m.core_srtp, codecs=m.core_codecs),
            PEER: SideMedia(bind=core, advertise=core, srtp=m.peer_srtp,
                              codecs=m.peer_codecs or m.core_codecs),
        },
        ports=ports or m.ports,
        workers=workers,
        suites=m.srtp_suites,
        srtp_passthrough=m.srtp_passthrough,
        max_transcoded_calls=m.max_transcoded_calls,
        dtls_fingerprint=dtls_fingerprint,
    )  # fmt: skip


async def _open_state(
    config: Config, role: WorkerRole | None, parts: Callable[[], tuple[SbcCore, SipTransports]]
) -> tuple[StateStore | None, bytes | None]:
    """The state store of [state] url (None without one), and the secret of the flow and
    dialog tokens: the store's, so that tokens outlive a restart and hold in every
    instance (the supervisor's for its workers, or the core's own, without a store or
    while it is down)."""
    secret = role.secret if role else None
    url = config.state.url
    if url is None:
        return None, secret

    def on_events(events: list[tuple[object, ...]]) -> None:
        core, transports = parts()
        now = asyncio.get_running_loop().time()
        for event in events:
            try:
                local = shift_times(event, -core.wall_offset)
            except Unusable as exc:
                core.stats[f"shared_ignored:{exc.why}"] += 1
                continue
            transports.run_actions(core.apply_shared(local, now))

    def on_recovered() -> None:
        core, _ = parts()
        for entry in core.persist_all(asyncio.get_running_loop().time()):
            store.persist(entry)

    # One name per SBC instance (its workers share it): its own messages come back to it.
    instance = f"{socket.gethostname()}:{os.getppid() if role else os.getpid()}"
    store = StateStore(
        url, config.state.key_prefix, instance=instance, on_events=on_events,
        on_recovered=on_recovered,
    )  # fmt: skip
    fresh = secret if secret is not None else secrets.token_bytes(SECRET_BYTES)
    store.keep_secret(fresh)  # the store gets it when it answers, if it has none
    if not await store.open():
        log.error("[state] url %s unreachable: starting from memory, retrying", url)
        return store, fresh
    try:
        return store, await store.secret(fresh)
    except (RedisError, OSError) as exc:
        store.health.up = False
        log.error("[state] url %s: %s; starting from memory, retrying", url, exc)
        return store, fresh


def _load_state(
    store: StateStore,
    core: SbcCore,
    transports: SipTransports,
    rows: list[tuple[str, bytes]],
    now: float,
) -> None:
    """Apply the kept entries (sbc/state.py) as another worker's snapshot is applied."""
    counts: Counter[str] = Counter()
    for key, value in rows:
        if key.startswith(state.CALL) and not key.startswith(state.call_key(core.node, "")):
            counts["others' calls"] += 1  # another instance's: its media is on its host
            continue
        try:
            events = state.decode(value, core.wall_offset)
        except Unusable as exc:
            counts[f"unusable:{exc.why}"] += 1
            continue
        counts[key.partition(":")[0]] += 1
        for event in events:
            if event[0] != state.CALL_EVENT:
                transports.run_actions(core.apply_shared(state.grace(event), now))
                continue
            try:
                transports.run_actions(core.restore_call(cast(dict[str, Any], event[2]), now))
            except (ValueError, KeyError, TypeError, IndexError, MediaRefused) as exc:
                counts["unusable:call"] += 1
                log.warning("kept call %s not restored: %s", key, exc)
    log.info(
        "state loaded: %d registrations, %d AORs with bindings, %d bans, %d calls%s",
        counts["reg"], counts["aor"], counts["ban"], counts["call"],
        "".join(f", {n} {why}" for why, n in counts.items() if why.startswith("unusable")),
    )  # fmt: skip


def rtpengine(config: Config, policy: MediaPolicy) -> Rtpengine | None:
    """The rtpengine nodes of [[media.rtpengine]] when [media] engine = "rtpengine"."""
    if config.media.engine != "rtpengine":
        return None
    return Rtpengine(
        NodePool(rtpengine_nodes(config)), policy.sides, timeout=config.media.timeout,
        srtp_passthrough=config.media.srtp_passthrough,
    )  # fmt: skip


def rtpengine_nodes(config: Config) -> list[Node]:
    nodes = []
    for node in config.media.rtpengine:
        address = ng_address(node.url)
        assert address is not None  # checked with the config
        nodes.append(Node(node.url, address, node.weight))
    return nodes


def media_workers(config: Config) -> int:
    """[media] workers, or one per core (as many as the port range has room for)."""
    if config.media.workers:
        return config.media.workers
    low, high = config.media.ports
    return max(1, min(os.cpu_count() or 1, (high - low + 1) // 4))


@dataclass(frozen=True, slots=True)
class WorkerRole:
    """What sets one signalling worker of several apart (docs/architecture.md, "Workers").
    The supervisor (sbc.io.supervisor) starts each with its index and the shared secret."""

    index: int
    count: int
    secret: bytes  # keys the flow tokens: one worker's Path is good in all, and after a restart
    runtime: str  # the supervisor's directory of the workers' sockets (mode 0700)
    ready_fd: int | None = None  # "ready" is written there once every listener is bound
    restarted: bool = False  # the others run: it asks one of them for the shared state

    @property
    def admin_socket(self) -> str:
        """Its admin endpoint, which the supervisor's merges."""
        return os.path.join(self.runtime, f"worker-{self.index}.admin")

    def core_url(self, url: ListenUrl) -> ListenUrl:
        """A core listener of this worker: the configured port plus the worker's index, so
        that the core's answers and in-dialog requests come back to it (a port of 0 is one
        of the OS's choosing in every worker)."""
        return replace(url, port=url.port + self.index) if url.port else url

    def media(self, config: Config) -> tuple[int, tuple[int, int]]:
        """This worker's media workers and its share of [media] ports: an even-aligned
        slice, so that no two signalling workers hand out the same relay port."""
        count = max(1, media_workers(config) // self.count)
        low, high = config.media.ports
        pairs = (high - low + 1) // 2 // self.count
        start = low + 2 * pairs * self.index
        return count, (start, start + 2 * pairs - 1)


# What a reload cannot change: sockets, worker processes, the wire's own
# rules and the log format; a new config that changes one of these is refused, and the
# running one stays. Everything else (backends, limits, block lists, peers, certificates,
# registration offload, log level) changes without dropping registrations or calls.
RESTART_KEYS = (
    "sbc", "access.listen", "access.websocket", "core.listen", "admin", "media", "sip", "nat",
    "log.format",
    "calls.records",
)  # fmt: skip
# ... but for [[media.rtpengine]], which a reload applies (nodes added, removed, reweighted).
RELOADABLE = {"media": ("rtpengine",)}


def _lookup(config: Config, key: str) -> object:
    value: object = config
    for part in key.split("."):
        value = getattr(value, part)
    reloadable = RELOADABLE.get(key)
    if reloadable:
        value = replace(cast(Any, value), **dict.fromkeys(reloadable, ()))
    return value


def restart_needed(old: Config, new: Config) -> list[str]:
    """The keys of ``RESTART_KEYS`` whose values differ between two configs."""
    return [key for key in RESTART_KEYS if _lookup(old, key) != _lookup(new, key)]


@dataclass
class Signals:
    """What the process's signals ask of a running SBC (set by ``run``'s handlers):
    SIGHUP reloads the config; the first SIGTERM drains (no new calls, the others go on
    up to [calls] drain_timeout, then BYE); a second SIGTERM, or SIGINT, stops at once."""

    wake: asyncio.Event = field(default_factory=asyncio.Event)
    reloads: int = 0
    terminate: int = 0

    def reload(self) -> None:
        self.reloads += 1
        self.wake.set()

    def term(self) -> None:
        self.terminate += 1
        self.wake.set()

    def interrupt(self) -> None:
        self.terminate += 2
        self.wake.set()


@dataclass
class ReloadResult:
    """The last reload, for /status and ``sbc reload``."""

    path: str | None = None  # the config file a reload re-reads (absolute)
    generation: int = 0  # reloads tried
    ok: bool = True
    error: str | None = None
    at: float | None = None  # wall clock
    applied: int = 0  # reloads that took effect

    def report(self) -> dict[str, object]:
        return {
            "path": self.path, "generation": self.generation, "ok": self.ok,
            "error": self.error, "at": self.at, "applied": self.applied,
        }  # fmt: skip


async def serve(
    config: Config,
    stop: asyncio.Event,
    *,
    path: str | Path | None = None,
    signals: Signals | None = None,
    role: WorkerRole | None = None,
) -> None:
    """Start the media workers and every listener, run until ``stop`` is set (or
    ``signals`` asks to terminate: drain first), then close everything. ``path`` is the
    config file a SIGHUP re-reads; ``role``: this process is one of several signalling
    workers."""
    count, ports = role.media(config) if role else (media_workers(config), config.media.ports)
    loop = asyncio.get_running_loop()
    workers: MediaWorkers | None = None
    signals = signals or Signals()

    def to_worker(worker: int, command: MediaCommand) -> None:
        if workers is not None:
            workers.send(worker, command)

    records: list[str] = []  # call records waiting for the writer (one JSON line each)
    keep = config.calls.records is not None
    # The DTLS certificate of this process's media workers towards browsers (WebRTC legs):
    # made at each start, as browsers expect (RFC 8827 6.5: a fresh self-signed one; only
    # its fingerprint in the SDP, carried over TLS or WSS, vouches for it).
    identity, fingerprint = make_identity()
    policy = media_policy(config, count, ports, fingerprint)
    # [media] engine = "rtpengine": the media goes to rtpengine nodes, not to workers.
    engine = rtpengine(config, policy)
    # [state] url: registrations, bindings and bans outlive the process and are shared
    # with the other instances on the same store (sbc/state.py, sbc/io/state_store.py).
    store, secret = await _open_state(config, role, lambda: (core, transports))
    core = SbcCore(
        core_settings(config, role.count if role else 1),
        media=MediaController(policy) if engine is None else None,
        rtpengine=engine,
        # The only wall-clock read: Date headers and call records are "now" plus this.
        wall_offset=time.time() - loop.time(),
        secret=secret,
        worker=role.index if role else 0,
        workers=role.count if role else 1,
        persist=store is not None,
    )
    if store is not None:
        core.state_health = store.health
        core.node = state.node_id(
            config.sbc.name, [str(u) for u in (*config.access.listen, *config.core.listen)]
        )
    transports = SipTransports(
        core,
        client_tls=_client_tls(config.core.tls),
        to_media=to_worker,
        to_records=records.append if keep else None,
        store=store,
    )

    def on_media_event(event: MediaEvent) -> None:
        transports.run_actions(core.media_event(event, loop.time()))
        transports.rearm()

    writer: asyncio.Task[None] | None = None
    admin: AdminServer | None = None
    link: WorkerLink | None = None
    result = ReloadResult(path=str(Path(path).absolute()) if path is not None else None)
    try:
        if engine is None:
            workers = await MediaWorkers.start(
                count, timeout=config.media.timeout, latch_window=config.media.latch_window,
                on_event=on_media_event, identity=identity,
            )  # fmt: skip
            media_totals = workers.totals
        else:
            engine.local = await transports.listen_ng(config.media.address)
            engine.wall_offset = time.time() - loop.time()
            media_totals = []
        admin = await AdminServer.start(
            config.admin.listen.host, config.admin.listen.port, core, name=config.sbc.name,
            media=lambda: media_totals, reload=result.report,
            unix=role.admin_socket if role else None,
        )  # fmt: skip
        # /audit: the security matrix of the config in use (a reload's, after one).
        admin.audit = lambda: audit.report(config, str(path) if path is not None else "")
        access_tls = _tls(config.access.tls, "[access.tls]")
        core_tls = _tls(config.core.tls, "[core.tls]", peers=bool(config.peers))
        if config.peers and config.core.tls.ca is None:
            log.warning("[[peers]] without [core.tls] ca: no peer certificate can be verified")
        m = config.media
        if (
            m.engine == "rtpengine"
            and not m.srtp_passthrough
            and "off" not in (m.access_srtp, m.core_srtp)
        ):
            # rtpengine relays SRTP untouched when both legs take the same SDES suite: it
            # hands the callee the caller's key and the caller the callee's (its SRTP
            # passthrough, which no flag of the ng protocol turns off).
            log.warning(
                '[media] engine = "rtpengine" with SRTP on both sides: calls whose legs '
                "take the same SDES suite keep the parties' own keys end to end"
            )
        shared = role is not None and role.count > 1
        if role is not None and shared:
            mark_branches(worker_tag(role.index))
            link = WorkerLink(role.runtime, role.index, role.count, transports.from_worker)
            transports.attach_link(link, sync=role.restarted)
            if not role.restarted:
                if not await link.wait_for_peers(SYNC_TIMEOUT * 5):
                    log.warning("not every worker's link is up; shared changes may be lost")
            else:
                # Registrations and bans from a live worker before the first client: up to
                # SYNC_TIMEOUT, then without (a snapshot that comes later is applied then).
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(transports.synced.wait(), SYNC_TIMEOUT)
        if store is not None:
            # The kept state before the first client: users reachable without a new
            # REGISTER, bans in force (subscribed first: no change of another instance
            # falls between the load and the subscription).
            store.start()
            if store.health.up:
                _load_state(store, core, transports, await store.load(), loop.time())
        websocket = WebSocketSettings.of(config.access.websocket)
        listens: list[tuple[str, str, int]] = []  # for the other instances (heartbeats)
        for url in config.access.listen:
            address = await transports.listen(url, access_tls, shared=shared, websocket=websocket)
            core.add_listener(ACCESS, url.transport, address)
            listens.append((url.transport, *address))
        if store is not None:
            store.announce(listens)
            core.peer_at = store.peer_at
        for url in config.core.listen:
            url = role.core_url(url) if role else url
            core.add_listener(CORE, url.transport, await transports.listen(url, core_tls))
        transports.rearm()  # the first backend probes are due now
        admin.listening = True  # /readyz
        if role is None:
            log.info("ready", extra={"sbc": config.sbc.name})
        else:
            # Not "ready": that word is the whole SBC's, which the supervisor logs.
            log.info("worker serving", extra={"sbc": config.sbc.name})
            if role.ready_fd is not None:
                os.write(role.ready_fd, b"ready\n")
        if config.calls.records is not None:
            writer = asyncio.create_task(_write_records(records, config.calls.records, stop))

        async def reload() -> None:
            # The status shows a reload once it is over (generation counts finished tries).
            nonlocal config
            started = time.time()
            servers = (access_tls, core_tls)
            try:
                ready = await loop.run_in_executor(
                    None, _prepare_reload, config, path, servers, role.count if role else 1
                )
                new = _apply_reload(ready, core, transports, servers, loop.time())
            except Exception as exc:  # whatever it is, the running config stays
                reason = "; ".join(exc.errors) if isinstance(exc, ConfigError) else str(exc)
                result.ok, result.error = False, reason or type(exc).__name__
                result.generation += 1
                result.at = started
                if isinstance(exc, ConfigError | StartupError | ValueError):
                    log.error("reload refused, the running config stays: %s", reason)
                else:
                    log.exception("reload failed, the running config stays")
                return
            config = new
            result.ok, result.error = True, None
            result.applied += 1
            result.generation += 1
            result.at = started
            log.info("config reloaded", extra={"sbc": config.sbc.name})

        done = 0
        while not stop.is_set() and not signals.terminate:
            await _either(stop, signals.wake)
            signals.wake.clear()
            while done < signals.reloads:
                done += 1
                await reload()
        if signals.terminate and not stop.is_set():
            await _drain(core, transports, signals, stop, config.calls.drain_timeout)
    finally:
        if writer is not None:
            stop.set()
            await writer
        if admin is not None:
            await admin.close()
        await transports.close()
        if store is not None:
            await store.close()
        if link is not None:
            link.close()
        if workers is not None:
            await workers.close()
        log.info("sbc stopped")


async def _either(a: asyncio.Event, b: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(a.wait()), asyncio.ensure_future(b.wait())]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in waits:
            task.cancel()


@dataclass(frozen=True, slots=True)
class _Reload:
    """A config read again and checked, with what it resolved and loaded: ready to apply."""

    config: Config
    settings: CoreSettings
    servers: tuple[TlsFiles | None, TlsFiles | None]  # access, core
    client: TlsFiles


def _prepare_reload(
    old: Config,
    path: str | Path | None,
    running: tuple[TlsFiles | None, TlsFiles | None],
    workers: int = 1,
) -> _Reload:
    """Read ``path`` again and do everything that can fail (the file, the check, the
    restart-only keys, resolving host names, loading certificates), or raise with the
    reason. Blocking (file reads, getaddrinfo): run off the event loop; touches nothing
    that is running."""
    if path is None:
        raise ValueError("the SBC was not started from a config file")
    new = load_config(path)
    restart = restart_needed(old, new)
    if restart:
        raise ValueError(f"{', '.join(restart)} changed: needs a restart")
    settings = core_settings(new, workers)
    access_tls = _tls(new.access.tls, "[access.tls]")
    core_tls = _tls(new.core.tls, "[core.tls]", peers=bool(new.peers))
    client_tls = _client_tls(new.core.tls)
    for current, fresh in zip(running, (access_tls, core_tls), strict=True):
        if current is not None and fresh is None:
            raise ValueError("a TLS listener needs its certificate and key")
    return _Reload(new, settings, (access_tls, core_tls), client_tls)


def _apply_reload(
    ready: _Reload,
    core: SbcCore,
    transports: SipTransports,
    running: tuple[TlsFiles | None, TlsFiles | None],
    now: float,
) -> Config:
    """Apply a prepared reload on the event loop (nothing here can fail or block)."""
    core.reconfigure(ready.settings, now)
    if core.rtpengine is not None:
        core.rtpengine.set_nodes(rtpengine_nodes(ready.config))
    transports.set_peers()
    for current, fresh in zip(running, ready.servers, strict=True):
        if current is not None and fresh is not None:
            current.adopt(fresh)
    client = transports.client_tls_files
    if client is not None:
        client.adopt(ready.client)
    logging.getLogger().setLevel(ready.config.log.level.upper())
    transports.rearm()  # new backends are probed now
    return ready.config


async def _drain(
    core: SbcCore,
    transports: SipTransports,
    signals: Signals,
    stop: asyncio.Event,
    timeout: float,
) -> None:
    """SIGTERM: no new calls (503 with Retry-After), the calls in progress go on until they
    end (the core returns ``Drained``) or ``timeout`` passes; then BYE to every call still
    up, and a moment for the BYEs to be answered. A second SIGTERM or SIGINT cuts it short."""
    loop = asyncio.get_running_loop()
    calls = core.calls.active_calls
    transports.run_actions(core.drain(loop.time()))
    if calls and timeout > 0:
        log.info("draining: no new calls; %d in progress, up to %g s", calls, timeout)
        deadline = loop.time() + timeout
        while not transports.drained.is_set() and signals.terminate < 2 and not stop.is_set():
            left = deadline - loop.time()
            if left <= 0:
                break
            signals.wake.clear()
            await _first_of(left, transports.drained, signals.wake, stop)
    if core.calls.active_calls:
        log.info("ending %d calls with BYE", core.calls.active_calls)
        transports.run_actions(core.end_all_calls(loop.time()))
    # The BYEs' transactions: answered, or given up after a short while.
    await _first_of(2.0, transports.drained)


async def _first_of(timeout: float, *events: asyncio.Event) -> None:
    """Until one of ``events`` is set, at most ``timeout`` seconds."""
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


async def _write_records(records: list[str], path: Path, stop: asyncio.Event) -> None:
    """Append the call records (one JSON line per call, returned by the core as
    ``CallRecord`` actions) every half second, off the signalling path, and once more when
    stopping."""
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)
        if records:
            lines, records[:] = list(records), []
            try:
                with path.open("a", encoding="utf-8") as out:
                    out.write("".join(line + "\n" for line in lines))
            except OSError as exc:
                log.error("cannot write call records to %s: %s", path, exc)
        if stop.is_set():
            return


def tune_gc() -> None:
    """The SBC's per-message objects die by reference counting (calls break their cycles
    when they end), so the cyclic collector only has to catch strays: everything loaded at
    start is frozen out of its scans, and full collections, whose pause grows with every
    live transaction, run at most every 1,000 second-generation collections instead of 10."""
    gc.collect()
    gc.freeze()
    gen0, gen1, _ = gc.get_threshold()
    gc.set_threshold(gen0, gen1, 1000)


def run(config: Config, path: str | Path | None = None) -> int:
    """Run the SBC until SIGTERM (drain, then stop) or SIGINT; SIGHUP re-reads ``path``.
    With [sbc] workers > 1 this process supervises that many worker processes, which
    serve. Returns the process exit code."""
    if config.sbc.workers > 1:
        if path is None:
            raise StartupError("[sbc] workers > 1 needs a config file (each worker reads it)")
        from sbc.io.supervisor import supervise

        return supervise(config, path)
    return run_worker(config, path)


def run_worker(config: Config, path: str | Path | None, role: WorkerRole | None = None) -> int:
    """Serve in this process: the whole SBC, or one worker of several (``role``)."""
    tune_gc()

    async def main() -> None:
        stop = asyncio.Event()
        signals = Signals()
        loop = asyncio.get_running_loop()
        for sig, handler in (
            (signal.SIGTERM, signals.term),
            (signal.SIGINT, signals.interrupt),
            (signal.SIGHUP, signals.reload),
        ):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, handler)
        await serve(config, stop, path=path, signals=signals, role=role)

    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; the stdlib loop also works
        asyncio.run(main())
    else:
        uvloop.run(main())
    return 0
