"""What the admin API shows: Prometheus metrics and the ``/status`` report.

Both read the core's live state when asked (a scrape, a ``sbc status``): nothing is counted
on the signalling path for them. The core keeps its own counters anyway (``stats`` Counters
of the core, the B2BUA, the registration proxy and the guard; the balancer's backend states;
the registration stores); the media workers report their totals every few seconds
(``control.Totals``), kept per worker by ``MediaWorkers``. The core is single-threaded:
``collect`` and ``status_report`` run on its event loop, between two of its turns.

docs/operations.md lists every metric and what it means.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sbc import __version__
from sbc.core import SbcCore
from sbc.media.control import Totals

__all__ = ["SbcCollector", "readiness", "status_report"]

MediaTotals = Callable[[], Sequence[Totals | None]]

# B2BUA counters with a metric of their own; the others go to sbc_call_events_total.
_CALL_COUNTERS = {
    "calls_started": ("sbc_calls_started", "INVITE calls started (the caller's INVITE relayed "
                      "to a backend, a client or a peer); rate() is the call setup rate"),
    "calls_answered": ("sbc_calls_answered", "INVITE calls answered (2xx relayed to the caller)"),
    "calls_ended": ("sbc_calls_ended", "INVITE calls ended, answered or not"),
}  # fmt: skip
_CALL_REFUSED = {"calls_refused": "limit", "calls_refused_media": "media"}
# REGISTER handling by the registration proxy; the rest: sbc_registrar_events_total.
_REGISTERS = {
    "register_forwarded": "forwarded",
    "register_offloaded": "offloaded",
    "register_local": "local",
}
# Guard counters that are packets or connections dropped unanswered.
_GUARD_DROPS = {
    "dropped_banned": "banned",
    "denied_address": "denied_address",
    "blocked_user_agent": "blocked_user_agent",
}
_MEDIA_DROPS = {
    "dropped_source": "source",
    "no_session": "no_session",
    "no_destination": "no_destination",
    "invalid": "invalid",
    "protect_failures": "srtp_protect",
    "transcode_dropped": "transcode",
    "dtls_dropped": "dtls_backlog",
}


def _prefixed(stats: Counter[str], prefix: str) -> Iterator[tuple[str, int]]:
    for key, value in stats.items():
        if key.startswith(prefix):
            yield key[len(prefix) :], value


def readiness(core: SbcCore, listening: bool) -> tuple[bool, str]:
    """/readyz: the listeners are bound and a backend is up (or none is configured: the
    embedded registrar serves). The reason, either way; ready but "degraded" while the
    state store ([state] url) is unreachable (the SBC serves from memory)."""
    ready, reason = _readiness(core, listening)
    health = core.state_health
    if ready and health is not None and not health.up:
        return True, f"degraded: the state store is unreachable, serving from memory; {reason}"
    return ready, reason


def _readiness(core: SbcCore, listening: bool) -> tuple[bool, str]:
    if not listening:
        return False, "listeners not bound"
    if core.draining:
        return False, "draining: shutting down, no new calls"
    backends = core.backends.balancer.backends
    if not backends:
        return True, "ready (embedded registrar, no backends)"
    up = sum(b.up for b in backends)
    if not up:
        return False, f"no backend up (0 of {len(backends)})"
    return True, f"ready ({up} of {len(backends)} backends up)"


class SbcCollector(Collector):
    """A Prometheus collector that reads the core (and the media workers' totals) at
    scrape time."""

    def __init__(
        self,
        core: SbcCore,
        *,
        clock: Callable[[], float],
        media: MediaTotals = tuple,
        name: str = "sbc",
        listening: Callable[[], bool] = lambda: True,
    ) -> None:
        self.core = core
        self.clock = clock  # the core's clock (the event loop's time)
        self.media = media
        self.name = name
        self.listening = listening

    def describe(self) -> list[Metric]:
        # No describe-time collect: the registry must not read the core when registering.
        return []

    def collect(self) -> Iterator[Metric]:
        core, now = self.core, self.clock()
        info = GaugeMetricFamily(
            "sbc_info", "The SBC's name and version (always 1)", labels=["name", "version"]
        )
        info.add_metric([self.name, __version__], 1)
        yield info
        yield GaugeMetricFamily(
            "sbc_ready",
            "1 when /readyz answers 200: listeners bound and a backend up (or none configured)",
            value=int(readiness(core, self.listening())[0]),
        )

        # -- registrations -------------------------------------------------------------------
        regs = GaugeMetricFamily(
            "sbc_registrations",
            "Client registrations the SBC holds: relayed (to a backend registrar; cached for "
            "offload) or local (the embedded registrar, without backends)",
            labels=["mode"],
        )
        regs.add_metric(["relayed"], len(core.registration.registrations))
        regs.add_metric(["local"], core.registration.location.live(now))
        yield regs
        register_stats = core.registration.stats
        registers = CounterMetricFamily(
            "sbc_register_requests",
            "Client REGISTERs by how they were handled: forwarded to a backend, answered by "
            "the SBC from its cache (offloaded), or by the embedded registrar (local)",
            labels=["handling"],
        )
        for key, handling in _REGISTERS.items():
            registers.add_metric([handling], register_stats[key])
        yield registers
        events = CounterMetricFamily(
            "sbc_registrar_events",
            "Other events of the registration proxy (failover, expiry, recovery, dead NAT "
            "keep-alive ...), by the core's counter name",
            labels=["event"],
        )
        for key, value in sorted(register_stats.items()):
            if key not in _REGISTERS:
                events.add_metric([key], value)
        yield events

        # -- calls ---------------------------------------------------------------------------
        calls = core.calls
        yield GaugeMetricFamily(
            "sbc_calls_active", "INVITE calls in progress (ringing or answered)",
            value=calls.active_calls,
        )  # fmt: skip
        for key, (metric, doc) in _CALL_COUNTERS.items():
            yield CounterMetricFamily(metric, doc, value=calls.stats[key])
        refused = CounterMetricFamily(
            "sbc_calls_refused",
            "INVITEs refused before a call started: limit (max_calls, per-source limit) or "
            "media (no relay port, unusable SDP: 488)",
            labels=["reason"],
        )
        for key, reason in _CALL_REFUSED.items():
            refused.add_metric([reason], calls.stats[key])
        yield refused
        call_events = CounterMetricFamily(
            "sbc_call_events",
            "Other B2BUA events by the core's counter name: how calls ended (calls_cancelled, "
            "calls_no_answer, calls_media_timeout, calls_max_duration ...), failover, "
            "in-dialog requests (in_dialog:<METHOD>), ACKs",
            labels=["event"],
        )
        for key, value in sorted(calls.stats.items()):
            if key not in _CALL_COUNTERS and key not in _CALL_REFUSED:
                call_events.add_metric([key], value)
        yield call_events

        # -- backends ------------------------------------------------------------------------
        backends = core.backends.balancer.backends
        up = GaugeMetricFamily(
            "sbc_backend_up", "1 while the backend is up (health probes)", labels=["backend"]
        )
        dialogs = GaugeMetricFamily(
            "sbc_backend_dialogs", "INVITE calls in progress on the backend", labels=["backend"]
        )
        rtt = GaugeMetricFamily(
            "sbc_backend_probe_rtt_seconds",
            "Round-trip time of the backend's last answered OPTIONS probe",
            labels=["backend"],
        )
        failures = GaugeMetricFamily(
            "sbc_backend_consecutive_failures",
            "Probes or requests in a row the backend failed (down at probe_failures)",
            labels=["backend"],
        )
        for b in backends:
            up.add_metric([b.name], int(b.up))
            dialogs.add_metric([b.name], b.active_dialogs)
            failures.add_metric([b.name], b.failures)
            if b.last_rtt is not None:
                rtt.add_metric([b.name], b.last_rtt)
        yield from (up, dialogs, rtt, failures)

        # -- rejections and the guard --------------------------------------------------------
        rejected = CounterMetricFamily(
            "sbc_rejected",
            "Requests answered with an error instead of being relayed, by the filter that "
            "refused them (sip: parser and sanity checks; guard: rate limits, lock-outs, "
            "overload) and its reason",
            labels=["filter", "reason"],
        )
        for reason, value in sorted(_prefixed(core.stats, "rejected:")):
            rejected.add_metric(["sip", reason], value)
        guard = core.guard.stats
        for reason, value in sorted(_prefixed(guard, "rejected:")):
            rejected.add_metric(["guard", reason], value)
        yield rejected
        dropped = CounterMetricFamily(
            "sbc_dropped",
            "Packets or connections dropped unanswered by the guard: from a banned source, "
            "from an address the access lists deny, with a blocked User-Agent",
            labels=["reason"],
        )
        for key, reason in _GUARD_DROPS.items():
            dropped.add_metric([reason], guard[key])
        yield dropped
        responses = CounterMetricFamily(
            "sbc_responses_dropped",
            "Responses dropped as malformed (by reason) or matching no transaction (stray)",
            labels=["reason"],
        )
        for reason, value in sorted(_prefixed(core.stats, "dropped_response:")):
            responses.add_metric([reason], value)
        responses.add_metric(["stray"], core.stats["stray_response"])
        yield responses
        bans = CounterMetricFamily(
            "sbc_bans", "Sources banned, by reason (flood: pike; auth: failed authentication)",
            labels=["reason"],
        )  # fmt: skip
        reasons = {"flood": 0, "auth": 0} | dict(_prefixed(guard, "ban:"))
        for reason, value in sorted(reasons.items()):
            bans.add_metric([reason], value)
        yield bans
        yield GaugeMetricFamily(
            "sbc_banned_sources", "Sources banned now",
            value=sum(until > now for until in core.guard.bans.values()),
        )  # fmt: skip
        yield GaugeMetricFamily(
            "sbc_receive_delay_seconds",
            "How late the SBC serves what it receives: the larger of the event loop's lag and "
            "the time a datagram waited in a socket's receive queue (last measure)",
            value=core.guard.delay,
        )
        yield GaugeMetricFamily(
            "sbc_overload_shed_ratio",
            "Share of new out-of-dialog requests refused with 503 for overload now",
            value=core.guard.shed_ratio,
        )
        guard_events = CounterMetricFamily(
            "sbc_guard_events",
            "Other events of the security guard (auth_failure, user_locked, overload, "
            "sources_evicted), by the guard's counter name",
            labels=["event"],
        )
        for key, value in sorted(guard.items()):
            if not key.startswith(("rejected:", "ban:")) and key not in _GUARD_DROPS:
                guard_events.add_metric([key], value)
        yield guard_events
        open_connections = GaugeMetricFamily(
            "sbc_connections_open",
            "Client and backend connections open now, by transport (tcp, tls, ws, wss)",
            labels=["transport"],
        )
        for transport, count in sorted(core.open_connections().items()):
            open_connections.add_metric([transport], count)
        yield open_connections
        sip_events = CounterMetricFamily(
            "sbc_sip_events",
            "Other events of the SIP core: STUN and CRLF keep-alives answered, idle "
            "connections closed",
            labels=["event"],
        )
        for key, value in sorted(core.stats.items()):
            if not key.startswith(("rejected:", "dropped_response:")) and key != "stray_response":
                sip_events.add_metric([key], value)
        yield sip_events

        # -- media ---------------------------------------------------------------------------
        yield from self._media()
        yield from self._rtpengine()
        yield from self._state()

    def _rtpengine(self) -> Iterator[Metric]:
        nodes = rtpengine_nodes(self.core)
        if not nodes:
            return
        up = GaugeMetricFamily(
            "sbc_rtpengine_up", "1 if the rtpengine node answers its pings", labels=["node"]
        )
        calls = GaugeMetricFamily(
            "sbc_rtpengine_calls", "Calls whose media is on the rtpengine node", labels=["node"]
        )
        rtt = GaugeMetricFamily(
            "sbc_rtpengine_rtt_seconds", "Round trip of the node's last ping", labels=["node"]
        )
        for n in nodes:
            up.add_metric([n["url"]], 1.0 if n["up"] else 0.0)
            calls.add_metric([n["url"]], n["calls"])
            if n["rtt_ms"] is not None:
                rtt.add_metric([n["url"]], n["rtt_ms"] / 1000.0)
        yield from (up, calls, rtt)

    def _state(self) -> Iterator[Metric]:
        health = self.core.state_health
        if health is None:
            return
        yield GaugeMetricFamily(
            "sbc_state_up", "1 if the state store ([state] url) answers",
            value=1.0 if health.up else 0.0,
        )  # fmt: skip
        yield CounterMetricFamily(
            "sbc_state_errors", "Writes and reads of the state store that failed",
            value=health.errors,
        )  # fmt: skip
        yield CounterMetricFamily(
            "sbc_state_writes", "Entries written to or deleted from the state store",
            value=health.writes,
        )  # fmt: skip
        events = CounterMetricFamily(
            "sbc_state_events", "Shared-state events exchanged with the other instances",
            labels=["direction"],
        )  # fmt: skip
        events.add_metric(["sent"], health.published)
        events.add_metric(["received"], health.received)
        yield events
        yield GaugeMetricFamily(
            "sbc_state_pending", "Entries waiting to be written (the store down or slow)",
            value=health.pending,
        )  # fmt: skip

    def _media(self) -> Iterator[Metric]:
        reports = self.media()
        yield GaugeMetricFamily(
            "sbc_media_workers", "Media worker processes that reported their totals",
            value=sum(r is not None for r in reports),
        )  # fmt: skip
        packets = CounterMetricFamily(
            "sbc_media_packets",
            "RTP and RTCP packets relayed: in (accepted from a party), out (sent to one)",
            labels=["worker", "direction"],
        )
        octets = CounterMetricFamily(
            "sbc_media_bytes",
            "Bytes of the packets relayed: in (as received), out (as sent)",
            labels=["worker", "direction"],
        )
        drops = CounterMetricFamily(
            "sbc_media_dropped",
            "Media packets dropped: source (not from the call's latched or SDP address), "
            "no_session, no_destination (other party without an address or on hold), "
            "invalid (not RTP), srtp_protect (SRTP protect refused), transcode (input a "
            "transcoder could not use: undecodable, late, unknown payload type), "
            "dtls_backlog (a WebRTC party's DTLS record while the worker's queue was full)",
            labels=["worker", "reason"],
        )
        srtp = CounterMetricFamily(
            "sbc_media_srtp_failures",
            "SRTP/SRTCP packets that failed to authenticate or decrypt (dropped)",
            labels=["worker"],
        )
        sessions = GaugeMetricFamily(
            "sbc_media_sessions", "Media relay sessions (calls) the worker holds",
            labels=["worker"],
        )  # fmt: skip
        ports = GaugeMetricFamily(
            "sbc_media_ports", "Relay ports the worker has open", labels=["worker"]
        )
        for index, t in enumerate(reports):
            if t is None:
                continue
            w = str(index)
            packets.add_metric([w, "in"], t.packets_in)
            packets.add_metric([w, "out"], t.packets_out)
            octets.add_metric([w, "in"], t.bytes_in)
            octets.add_metric([w, "out"], t.bytes_out)
            for field, reason in _MEDIA_DROPS.items():
                drops.add_metric([w, reason], getattr(t, field))
            srtp.add_metric([w], t.srtp_failures)
            sessions.add_metric([w], t.sessions)
            ports.add_metric([w], t.ports)
        yield from (packets, octets, drops, srtp, sessions, ports)
        # Transcoding, as the signalling process decided it (docs/media.md).
        counts = self.core.calls.media.transcoding()
        yield GaugeMetricFamily(
            "sbc_transcoding_streams",
            "Media streams transcoded now (the two legs have different codecs)",
            value=counts.streams,
        )
        yield CounterMetricFamily(
            "sbc_transcoded_streams",
            "Media streams that were transcoded, since the start",
            value=counts.streams_total,
        )
        yield GaugeMetricFamily(
            "sbc_transcoding_calls",
            "Calls holding a place under [media] max_transcoded_calls now",
            value=counts.calls,
        )


def status_report(
    core: SbcCore,
    *,
    now: float,
    name: str = "sbc",
    listening: bool = True,
    media: Sequence[Totals | None] = (),
    reload: dict[str, object] | None = None,
    pid: int | None = None,
) -> dict[str, Any]:
    """The ``/status`` JSON: what ``sbc status`` prints (and ``sbc reload`` reads: the
    process id to signal and the last reload's outcome)."""
    ready, reason = readiness(core, listening)
    stats = core.calls.stats
    bans = sorted(
        ((ip, until - now) for ip, until in core.guard.bans.items() if until > now),
        key=lambda item: -item[1],
    )
    reports = [t for t in media if t is not None]
    return {
        "name": name,
        "version": __version__,
        "pid": pid,
        "reload": reload,
        "ready": ready,
        "reason": reason,
        "registrations": {
            "relayed": len(core.registration.registrations),
            "local": core.registration.location.live(now),
        },
        "calls": {
            "active": core.calls.active_calls,
            "started": stats["calls_started"],
            "answered": stats["calls_answered"],
            "ended": stats["calls_ended"],
            "refused": stats["calls_refused"] + stats["calls_refused_media"],
        },
        "backends": [
            {
                "name": b.name,
                "address": f"{b.address[0]}:{b.address[1]}",
                "transport": b.transport,
                "up": b.up,
                "dialogs": b.active_dialogs,
                "rtt_ms": None if b.last_rtt is None else round(b.last_rtt * 1000.0, 3),
            }
            for b in core.backends.balancer.backends
        ],
        "bans": {
            "active": len(bans),
            # the 100 longest still to run (a flood may ban many)
            "sources": [{"source": ip, "remaining": round(left, 1)} for ip, left in bans[:100]],
        },
        "media": {
            "workers": len(reports),
            "sessions": sum(t.sessions for t in reports),
            "packets_in": sum(t.packets_in for t in reports),
            "packets_out": sum(t.packets_out for t in reports),
            "srtp_failures": sum(t.srtp_failures for t in reports),
        },
        "rtpengine": rtpengine_nodes(core),
        "state": None if core.state_health is None else dataclasses.asdict(core.state_health),
    }


def rtpengine_nodes(core: SbcCore) -> list[dict[str, Any]]:
    """The rtpengine nodes ([media] engine = "rtpengine"): up, weight, calls, round trip."""
    engine = core.rtpengine
    if engine is None:
        return []
    return [
        {
            "url": n.name,
            "up": n.up,
            "weight": n.weight,
            "calls": len(n.calls),
            "rtt_ms": None if n.rtt is None else round(n.rtt * 1000.0, 3),
        }
        for n in engine.pool.nodes.values()
    ]
