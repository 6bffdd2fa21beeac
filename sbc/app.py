"""Wires the SBC from its config: core, listeners, signals. ``run`` blocks until stopped."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import logging
import os
import signal
import socket
import ssl
from pathlib import Path

from sbc.b2bua import CallPolicy, PeerRoute
from sbc.config import Config, Peer, RateConfig, TlsConfig
from sbc.core import CoreSettings, SbcCore
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
from sbc.media.control import Command as MediaCommand
from sbc.media.control import Event as MediaEvent
from sbc.media.session import MediaController, MediaPolicy, SideMedia
from sbc.relay import OffloadPolicy
from sbc.sip.parser import Limits
from sbc.sip.transaction import Timers
from sbc.sip.uri import SipUri, parse_uri

__all__ = ["StartupError", "core_settings", "run", "serve"]

log = logging.getLogger("sbc.app")


def core_settings(config: Config) -> CoreSettings:
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
            config, {b.host.lower() for b in backends} | {p.host.lower() for p in peers}
        ),
    )


def _bucket(cfg: RateConfig) -> Bucket:
    return Bucket(rate=cfg.rate, burst=cfg.burst)


def guard_policy(config: Config, core_sources: set[str]) -> GuardPolicy:
    """[security] as the guard's policy (issue 6); ``core_sources``: backend and peer IPs."""
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
        pike_density=sec.pike_density,
        ban_time=sec.ban_time,
        rates={cls: _bucket(getattr(sec, cls)) for cls in CLASSES},
        retry_after=sec.retry_after,
        auth_failures=sec.auth_failures,
        auth_user_failures=sec.auth_user_failures,
        auth_window=sec.auth_window,
        max_connections_per_source=sec.max_connections_per_source,
        tls_handshakes=_bucket(sec.tls_handshakes),
        overload_lag=sec.overload_lag,
        backend_register_rate=_bucket(sec.backend_register),
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
    must show one that names them (issue 6 item 1)."""
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


def media_policy(config: Config, workers: int) -> MediaPolicy:
    """The relay's addresses and SRTP policy per side (issue 5 item 4)."""
    m = config.media
    access = m.access_address or m.address
    core = m.core_address or m.address
    return MediaPolicy(
        sides={
            "access": SideMedia(bind=access, advertise=m.advertise_address or access,
                                srtp=m.access_srtp),
            "core": SideMedia(bind=core, advertise=core, srtp=m.core_srtp),
            "peer": SideMedia(bind=core, advertise=core, srtp=m.peer_srtp),
        },
        ports=m.ports,
        workers=workers,
        suites=m.srtp_suites,
        srtp_passthrough=m.srtp_passthrough,
    )  # fmt: skip


def media_workers(config: Config) -> int:
    """[media] workers, or one per core (as many as the port range has room for)."""
    if config.media.workers:
        return config.media.workers
    low, high = config.media.ports
    return max(1, min(os.cpu_count() or 1, (high - low + 1) // 4))


async def serve(config: Config, stop: asyncio.Event) -> None:
    """Start the media workers and every listener, run until ``stop`` is set, then close
    everything."""
    count = media_workers(config)
    loop = asyncio.get_running_loop()
    workers: MediaWorkers | None = None

    def to_worker(worker: int, command: MediaCommand) -> None:
        if workers is not None:
            workers.send(worker, command)

    core = SbcCore(
        core_settings(config), media=MediaController(media_policy(config, count), to_worker)
    )
    transports = SipTransports(core, client_tls=_client_tls(config.core.tls))

    def on_media_event(event: MediaEvent) -> None:
        transports.run_actions(core.media_event(event, loop.time()))
        transports.rearm()

    writer: asyncio.Task[None] | None = None
    admin: AdminServer | None = None
    try:
        workers = await MediaWorkers.start(
            count, timeout=config.media.timeout, latch_window=config.media.latch_window,
            on_event=on_media_event,
        )  # fmt: skip
        media_totals = workers.totals
        admin = await AdminServer.start(
            config.admin.listen.host, config.admin.listen.port, core, name=config.sbc.name,
            media=lambda: media_totals,
        )  # fmt: skip
        access_tls = _tls(config.access.tls, "[access.tls]")
        core_tls = _tls(config.core.tls, "[core.tls]", peers=bool(config.peers))
        if config.peers and config.core.tls.ca is None:
            log.warning("[[peers]] without [core.tls] ca: no peer certificate can be verified")
        for url in config.access.listen:
            core.add_listener("access", url.transport, await transports.listen(url, access_tls))
        for url in config.core.listen:
            core.add_listener("core", url.transport, await transports.listen(url, core_tls))
        transports.rearm()  # the first backend probes are due now
        admin.listening = True  # /readyz
        log.info("ready", extra={"sbc": config.sbc.name})
        if config.calls.records is not None:
            writer = asyncio.create_task(_write_records(core, config.calls.records, stop))
        await stop.wait()
    finally:
        if writer is not None:
            await writer
        if admin is not None:
            await admin.close()
        await transports.close()
        if workers is not None:
            await workers.close()
        log.info("sbc stopped")


async def _write_records(core: SbcCore, path: Path, stop: asyncio.Event) -> None:
    """Append the call records (one JSON line per call, issue 4 item 6) every half second,
    off the signalling path, and once more when stopping."""
    records = core.calls.records
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


def _tune_gc() -> None:
    """The SBC's per-message objects die by reference counting (calls break their cycles
    when they end), so the cyclic collector only has to catch strays: everything loaded at
    start is frozen out of its scans, and full collections, whose pause grows with every
    live transaction, run at most every 1,000 second-generation collections instead of 10."""
    gc.collect()
    gc.freeze()
    gen0, gen1, _ = gc.get_threshold()
    gc.set_threshold(gen0, gen1, 1000)


def run(config: Config) -> int:
    """Run the SBC until SIGTERM or SIGINT; returns the process exit code."""
    _tune_gc()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await serve(config, stop)

    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; the stdlib loop also works
        asyncio.run(main())
    else:
        uvloop.run(main())
    return 0
