"""Wires the SBC from its config: core, listeners, signals. ``run`` blocks until stopped."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl

from sbc.config import Config, TlsConfig
from sbc.core import CoreSettings, SbcCore
from sbc.io.sip_transport import SipTransports, StartupError, tls_context
from sbc.sip.parser import Limits
from sbc.sip.transaction import Timers

__all__ = ["StartupError", "core_settings", "run", "serve"]

log = logging.getLogger("sbc.app")


def core_settings(config: Config) -> CoreSettings:
    sip = config.sip
    hosts = {url.host.lower() for url in (*config.access.listen, *config.core.listen)}
    hosts |= {"localhost", config.sbc.name.lower()}
    if config.sbc.public_address:
        hosts.add(config.sbc.public_address.strip("[]").lower())
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
    )


def _tls(cfg: TlsConfig) -> ssl.SSLContext | None:
    if cfg.certificate is None or cfg.private_key is None:
        return None
    return tls_context(
        str(cfg.certificate),
        str(cfg.private_key),
        str(cfg.ca) if cfg.ca else None,
        verify=cfg.verify_clients,
        min_version=cfg.min_version,
        ciphers=cfg.ciphers,
    )


async def serve(config: Config, stop: asyncio.Event) -> None:
    """Start every listener, run until ``stop`` is set, then close everything."""
    core = SbcCore(core_settings(config))
    transports = SipTransports(core)
    try:
        access_tls = _tls(config.access.tls)
        core_tls = _tls(config.core.tls)
        for url in config.access.listen:
            await transports.listen(url, access_tls)
        for url in config.core.listen:
            await transports.listen(url, core_tls)
        log.info("ready", extra={"sbc": config.sbc.name})
        await stop.wait()
    finally:
        await transports.close()
        log.info("sbc stopped")


def run(config: Config) -> int:
    """Run the SBC until SIGTERM or SIGINT; returns the process exit code."""

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
