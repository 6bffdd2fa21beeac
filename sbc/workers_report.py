"""One SBC made of several signalling workers: their metrics and ``/status`` merged.

With ``[sbc] workers = N`` the SBC runs N signalling worker processes; the supervisor serves
the admin HTTP endpoint and must show them as one SBC. It asks each worker for its own
``/metrics`` (Prometheus text, as ``SbcCollector`` and the process collector write it) and its
own ``/status`` (``status_report``), and this module merges the answers: the families of all
workers added up sample by sample (or the smallest or largest value where adding means
nothing), plus a few families per worker labelled ``worker`` so a dashboard can still tell
them apart, and one ``/status`` of the same shape with a ``workers`` list.

Pure: the supervisor does the asking; nothing here touches a socket or the event loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from sbc import __version__

__all__ = ["WorkerState", "merge_metrics", "merge_status", "merged_registry"]

Combine = Callable[[list[float]], float]

# How the samples of the workers combine into the SBC's, where adding them up is wrong (the
# default is the sum: counters, and gauges of things each worker holds on its own, such as
# calls, registrations, media sessions, CPU time or memory). A ratio, a delay or a state is not
# additive: the SBC is ready only if every worker is, and is as late or as overloaded as its
# worst worker. Backend probes and bans are kept by every worker alike (each probes every
# backend; a banned source is banned by all of them), so adding them would count each twice;
# so are registrations: every worker holds a copy of all of them.
_COMBINERS: dict[str, Combine] = {
    "sbc_ready": min,
    "sbc_registrations": max,
    "sbc_info": max,
    "sbc_receive_delay_seconds": max,
    "sbc_overload_shed_ratio": max,
    "sbc_backend_up": max,
    "sbc_backend_probe_rtt_seconds": max,
    "sbc_backend_consecutive_failures": max,
    "sbc_rtpengine_up": max,
    "sbc_rtpengine_rtt_seconds": max,
    "sbc_state_up": min,  # the store is up for the SBC only if every worker reaches it
    "sbc_banned_sources": max,
    "process_max_fds": max,
    "process_start_time_seconds": min,  # the SBC started with its first worker
}


def _combiner(sample: str) -> Combine:
    if sample.endswith("_created"):  # a merged counter exists since its oldest part
        return min
    return _COMBINERS.get(sample, sum)


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerState:
    """What the supervisor knows of one signalling worker process."""

    index: int
    pid: int | None
    running: bool  # the process is alive
    restarts: int  # times the supervisor started it again after it died
    started_at: float | None  # wall clock of its last start


LabelKey = tuple[tuple[str, str], ...]


class _Families(Collector):
    """A collector that yields families computed beforehand (one scrape's snapshot)."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return iter(self._families)


def _parse(text: str | None) -> list[Metric] | None:
    """The families of one worker's answer; None if it did not answer or answered garbage."""
    if text is None:
        return None
    try:
        return list(text_string_to_metric_families(text))
    except ValueError:
        return None


def merged_registry(
    texts: Sequence[tuple[int, str | None]], workers: Sequence[WorkerState]
) -> CollectorRegistry:
    """The workers' metrics as one SBC's, in a registry for any encoder (``choose_encoder``):
    every family of the workers, samples with the same name and labels combined, then the
    per-worker families (``sbc_workers``, ``sbc_worker_up{worker}``, ...)."""
    parsed = {index: _parse(text) for index, text in texts}
    merged: dict[str, Metric] = {}  # by family name, in the order first seen
    values: dict[str, dict[tuple[str, LabelKey], tuple[dict[str, str], list[float]]]] = {}
    totals: dict[int, dict[str, float]] = {}  # worker -> sample name -> sum over its labels
    for index, families in parsed.items():
        if families is None:
            continue
        own = totals.setdefault(index, {})
        for family in families:
            if family.name not in merged:
                merged[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
                values[family.name] = {}
            samples = values[family.name]
            for s in family.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                samples.setdefault(key, (s.labels, []))[1].append(s.value)
                own[s.name] = own.get(s.name, 0.0) + s.value
    out: list[Metric] = []
    for name, metric in merged.items():
        for (sample, _), (labels, parts) in values[name].items():
            metric.add_sample(sample, labels, _combiner(sample)(parts))
        out.append(metric)
    out.extend(_worker_families(workers, totals))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(out))
    return registry


def _worker_families(
    workers: Sequence[WorkerState], totals: dict[int, dict[str, float]]
) -> list[Metric]:
    count = GaugeMetricFamily(
        "sbc_workers", "Signalling worker processes configured", value=len(workers)
    )
    up = GaugeMetricFamily(
        "sbc_worker_up", "1 if the worker is running and answered this scrape", labels=["worker"]
    )
    restarts = CounterMetricFamily(
        "sbc_worker_restarts", "Times the supervisor restarted the worker", labels=["worker"]
    )
    cpu = CounterMetricFamily(
        "sbc_worker_cpu_seconds", "The worker's CPU time (user and system)", labels=["worker"]
    )
    started = CounterMetricFamily(
        "sbc_worker_calls_started", "INVITE calls the worker started", labels=["worker"]
    )
    registers = CounterMetricFamily(
        "sbc_worker_register_requests", "Client REGISTERs the worker handled", labels=["worker"]
    )
    active = GaugeMetricFamily(
        "sbc_worker_calls_active", "INVITE calls in progress on the worker", labels=["worker"]
    )
    for w in workers:
        label = [str(w.index)]
        own = totals.get(w.index)  # None: it did not answer
        up.add_metric(label, int(w.running and own is not None))
        restarts.add_metric(label, w.restarts)
        if own is None:
            continue
        for family, sample in (
            (cpu, "process_cpu_seconds_total"),
            (started, "sbc_calls_started_total"),
            (registers, "sbc_register_requests_total"),
            (active, "sbc_calls_active"),
        ):
            if sample in own:
                family.add_metric(label, own[sample])
    return [count, up, restarts, cpu, started, registers, active]


def merge_metrics(texts: Sequence[tuple[int, str | None]], workers: Sequence[WorkerState]) -> str:
    """``merged_registry`` in the Prometheus text format 0.0.4."""
    return generate_latest(merged_registry(texts, workers)).decode()


def _sums(parts: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, Any]:
    """The counts of several reports' sections added up key by key (``keys`` first, so an
    SBC with no answer still shows the whole section)."""
    names = dict.fromkeys([*keys, *(k for part in parts for k in part)])
    return {k: sum(part.get(k) or 0 for part in parts) for k in names}


def _most(parts: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, Any]:
    """The largest count of each key among several reports' sections (copies of one state)."""
    names = dict.fromkeys([*keys, *(k for part in parts for k in part)])
    return {k: max((part.get(k) or 0 for part in parts), default=0) for k in names}


def _probed(
    reports: list[dict[str, Any]], section: str, key: str, count: str
) -> list[dict[str, Any]]:
    """Backends (by name) or rtpengine nodes (by url), which every worker probes on its
    own, in the first worker's order: up if any worker sees it up, ``count`` (their
    calls) summed, the longest round-trip time known."""
    merged: dict[str, dict[str, Any]] = {}
    for report in reports:
        for item in report.get(section) or ():
            seen = merged.get(item[key])
            if seen is None:
                merged[item[key]] = dict(item)
                continue
            seen["up"] = bool(seen["up"] or item["up"])
            seen[count] += item[count]
            rtts = [r for r in (seen["rtt_ms"], item["rtt_ms"]) if r is not None]
            seen["rtt_ms"] = max(rtts) if rtts else None
    return list(merged.values())


def _bans(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Sources banned by any worker, each once with the longest time left; a worker lists
    only its 100 longest, so ``active`` is at least the largest count a worker gave."""
    remaining: dict[str, float] = {}
    active = 0
    for report in reports:
        bans = report.get("bans") or {}
        active = max(active, bans.get("active", 0))
        for ban in bans.get("sources") or ():
            remaining[ban["source"]] = max(ban["remaining"], remaining.get(ban["source"], 0.0))
    longest = sorted(remaining.items(), key=lambda item: -item[1])
    return {
        "active": max(active, len(remaining)),
        "sources": [{"source": ip, "remaining": left} for ip, left in longest[:100]],
    }


def _not_ready(w: WorkerState, report: dict[str, Any] | None) -> str | None:
    """Why the worker keeps the SBC from being ready, or None if it does not."""
    if not w.running:
        return f"worker {w.index} not running"
    if report is None:
        return f"worker {w.index} did not answer"
    if not report.get("ready"):
        return f"worker {w.index}: {report.get('reason')}"
    return None


def merge_status(
    reports: Sequence[tuple[int, dict[str, Any] | None]],
    workers: Sequence[WorkerState],
    *,
    name: str,
    pid: int,
    reload: dict[str, object] | None,
    now: float,
) -> dict[str, Any]:
    """One ``/status`` for the SBC, the shape of ``status_report`` plus a ``workers`` list:
    ``pid`` and ``reload`` are the supervisor's (the process ``sbc reload`` signals); ready
    when every worker is running, answered and ready. ``now`` is the wall clock."""
    by_index = dict(reports)
    answered = [r for r in (by_index.get(w.index) for w in workers) if r is not None]
    why = [r for w in workers if (r := _not_ready(w, by_index.get(w.index))) is not None]
    if not workers:
        ready, reason = False, "no workers"
    elif why:
        ready, reason = False, why[0]
    else:
        first = by_index[workers[0].index]
        ready, reason = True, f"{(first or {}).get('reason')} ({len(workers)} workers)"
    return {
        "name": name,
        "version": __version__,
        "pid": pid,
        "reload": reload,
        "ready": ready,
        "reason": reason,
        # Every worker holds all the registrations (shared): the most any one knows.
        "registrations": _most(
            [r.get("registrations") or {} for r in answered], ("relayed", "local")
        ),
        "calls": _sums(
            [r.get("calls") or {} for r in answered],
            ("active", "started", "answered", "ended", "refused"),
        ),
        "backends": _probed(answered, "backends", "name", "dialogs"),
        "bans": _bans(answered),
        "media": _sums(
            [r.get("media") or {} for r in answered],
            ("workers", "sessions", "packets_in", "packets_out", "srtp_failures"),
        ),
        "rtpengine": _probed(answered, "rtpengine", "url", "calls"),
        "state": _state([r.get("state") for r in answered]),
        "workers": [_worker(w, by_index.get(w.index), now) for w in workers],
    }


def _state(reports: list[Any]) -> dict[str, Any] | None:
    """The state store as every worker sees it: up if each reaches it, counts summed."""
    seen = [r for r in reports if isinstance(r, dict)]
    if not seen:
        return None
    merged: dict[str, Any] = {"up": all(r.get("up") for r in seen)}
    downs = [r["down_since"] for r in seen if r.get("down_since") is not None]
    merged["down_since"] = min(downs) if downs else None
    for key in ("errors", "writes", "published", "received", "dropped", "malformed", "loaded",
                "pending"):  # fmt: skip
        merged[key] = sum(int(r.get(key) or 0) for r in seen)
    return merged


def _worker(w: WorkerState, report: dict[str, Any] | None, now: float) -> dict[str, Any]:
    """One worker's line in ``/status``; its counts are None when it did not answer."""
    regs = (report or {}).get("registrations") or {}
    calls = (report or {}).get("calls") or {}
    started = w.started_at if w.running else None  # a dead process has no uptime
    return {
        "index": w.index,
        "pid": w.pid,
        "running": w.running,
        "ready": _not_ready(w, report) is None,
        "restarts": w.restarts,
        "uptime": None if started is None else round(max(0.0, now - started), 1),
        "registrations": None if report is None else sum(regs.values()),
        "calls_active": None if report is None else calls.get("active"),
        "calls_started": None if report is None else calls.get("started"),
    }
