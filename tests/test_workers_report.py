"""The supervisor shows its signalling workers as one SBC: the /metrics of real workers (the
SbcCollector and the process collector over real cores) merged sample by sample, with the
families per worker, and their /status reports merged into one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.process_collector import ProcessCollector
from sipdata import sip
from test_admin import Samples, parse, value
from test_b2bua import B1, Lab, establish, only
from test_registration import REGISTER

from sbc.core import CoreSettings, SbcCore
from sbc.features.guard import GuardPolicy
from sbc.media.control import Totals
from sbc.metrics import SbcCollector, status_report
from sbc.sip.flow import Flow
from sbc.sip.message import Request, make_response
from sbc.workers_report import WorkerState, merge_metrics, merge_status, merged_registry

B2 = ("10.1.0.11", 5070)
Report = dict[str, Any]


def worker_text(lab: Lab, media: list[Totals | None] | None = None) -> str:
    """What a worker's /metrics answers: its core's collector and the process collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SbcCollector(lab.core, clock=lambda: lab.now, media=lambda: media or []))
    ProcessCollector(registry=registry)
    return generate_latest(registry).decode()


def with_sample(text: str, sample: str, value: float) -> str:
    """The text with one unlabelled sample's value changed (as another process would have it)."""
    lines = [
        f"{sample} {value}" if line.startswith(f"{sample} ") else line for line in text.split("\n")
    ]
    assert lines != text.split("\n"), sample
    return "\n".join(lines)


def register(lab: Lab, user: str, n: int = 1) -> None:
    """A client registers through the worker (relayed to the backend, which accepts)."""
    _, fwd = only(lab.from_client(sip(REGISTER.format(n=n, user=user))), Request)
    assert isinstance(fwd, Request)
    ok = make_response(fwd, 200, to_tag=f"r{n}")
    ok.add("Contact", f"{fwd.get('contact')};expires=3600")
    lab.from_backend(ok)


def states(*running: bool, restarts: int = 0) -> list[WorkerState]:
    return [
        WorkerState(index=i, pid=1000 + i, running=up, restarts=restarts, started_at=100.0 + i)
        for i, up in enumerate(running)
    ]


def two_busy_workers() -> tuple[Lab, Lab]:
    """Worker 0: one call, one registration. Worker 1: two calls, a slower backend, a late
    event loop."""
    lab0, lab1 = Lab(), Lab()
    establish(lab0)
    register(lab0, "carol")
    establish(lab1, n=1)
    establish(lab1, n=2)
    lab1.core.backends.balancer.backends[0].last_rtt = 0.02
    lab1.core.guard.delay = 0.25
    return lab0, lab1


def test_counters_and_gauges_add_up_over_the_workers() -> None:
    lab0, lab1 = two_busy_workers()
    text0 = worker_text(lab0, [Totals(packets_in=10, sessions=1)])
    text1 = worker_text(lab1, [Totals(packets_in=5, sessions=2), Totals(packets_in=7)])
    # worker 1 is another process: started later, with another limit of file descriptors
    start = value(parse(text0), "process_start_time_seconds")
    text1 = with_sample(text1, "process_start_time_seconds", start + 5.0)
    text1 = with_sample(text1, "process_max_fds", 2.0**20)
    w0, w1 = parse(text0), parse(text1)
    merged = merge_metrics([(0, text0), (1, text1)], states(True, True))
    m = parse(merged)
    assert "sbc_calls_started_total 3.0\n" in merged
    assert "# TYPE sbc_calls_started_total counter\n" in merged
    assert value(m, "sbc_calls_started_total") == 3
    assert value(m, "sbc_calls_answered_total") == 3
    assert value(m, "sbc_calls_active") == 3
    assert value(m, "sbc_registrations", mode="relayed") == 1
    assert value(m, "sbc_register_requests_total", handling="forwarded") == 1
    assert value(m, "sbc_backend_dialogs", backend="sip:b1") == 3
    assert value(m, "sbc_call_events_total", event="ack_relayed") == 3
    # the media workers' own `worker` label: summed per media worker, kept as it was
    assert value(m, "sbc_media_packets_total", worker="0", direction="in") == 15
    assert value(m, "sbc_media_packets_total", worker="1", direction="in") == 7
    assert value(m, "sbc_media_sessions", worker="0") == 3
    assert value(m, "sbc_media_workers") == 3
    # the process metrics of the workers: CPU added up, the limits not
    cpu = value(w0, "process_cpu_seconds_total") + value(w1, "process_cpu_seconds_total")
    assert value(m, "process_cpu_seconds_total") == cpu
    assert value(m, "process_max_fds") == max(2.0**20, value(w0, "process_max_fds"))
    assert value(m, "process_start_time_seconds") == start  # worker 0's, the first


def test_what_does_not_add_up_takes_the_worst_or_the_first() -> None:
    lab0, lab1 = two_busy_workers()
    lab1.core.backends.balancer.backends[0].up = False  # worker 1 alone sees it down
    m = parse(merge_metrics([(0, worker_text(lab0)), (1, worker_text(lab1))], states(True, True)))
    assert value(m, "sbc_ready") == 0  # worker 1 is not ready
    assert value(m, "sbc_backend_up", backend="sip:b1") == 1
    assert value(m, "sbc_backend_probe_rtt_seconds", backend="sip:b1") == 0.02
    assert value(m, "sbc_receive_delay_seconds") == 0.25
    assert value(m, "sbc_info", name="sbc", version="0.1.0") == 1
    lab1.core.backends.balancer.backends[0].up = True
    m = parse(merge_metrics([(0, worker_text(lab0)), (1, worker_text(lab1))], states(True, True)))
    assert value(m, "sbc_ready") == 1


def test_a_source_banned_by_every_worker_counts_once() -> None:
    policy = GuardPolicy(pike_density=5, pike_window=2.0, ban_time=60.0)
    texts = []
    for index in range(2):
        core = SbcCore(CoreSettings(local_hosts=frozenset({"127.0.0.1"}), security=policy))
        flow = Flow("udp", ("127.0.0.1", 5060), ("192.0.2.66", 5060))
        for _ in range(10):
            core.receive_datagram(b"\r\n", flow, 0.5)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(SbcCollector(core, clock=lambda: 1.0))
        texts.append((index, generate_latest(registry).decode()))
    m = parse(merge_metrics(texts, states(True, True)))
    assert value(m, "sbc_banned_sources") == 1
    assert value(m, "sbc_bans_total", reason="flood") == 2  # each worker banned it


def test_the_merged_families_keep_their_names_types_and_help() -> None:
    lab0, lab1 = two_busy_workers()
    text0 = worker_text(lab0, [Totals()])
    registry = merged_registry([(0, text0), (1, worker_text(lab1))], states(True, True))
    families = {
        f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())
    }
    for family in text_string_to_metric_families(text0):
        got = families[family.name]
        assert (got.type, got.documentation) == (family.type, family.documentation)
        assert {s.name for s in got.samples} == {s.name for s in family.samples}
    # OpenMetrics, for a scraper that asks for it
    body = openmetrics.generate_latest(registry).decode()
    assert body.endswith("# EOF\n")
    om = {f.name: f for f in parse_openmetrics(body)}
    assert [s.value for s in om["sbc_calls_started"].samples] == [3.0]
    assert om["sbc_calls_started"].samples[0].name == "sbc_calls_started_total"


def per_worker(m: Samples, metric: str) -> dict[str, float]:
    return {dict(labels)["worker"]: v for (name, labels), v in m.items() if name == metric}


def test_the_families_per_worker() -> None:
    lab0, lab1 = two_busy_workers()
    text0, text1 = worker_text(lab0), worker_text(lab1)
    workers = states(True, True, restarts=2)
    m = parse(merge_metrics([(0, text0), (1, text1)], workers))
    assert value(m, "sbc_workers") == 2
    assert per_worker(m, "sbc_worker_up") == {"0": 1, "1": 1}
    assert per_worker(m, "sbc_worker_restarts_total") == {"0": 2, "1": 2}
    assert per_worker(m, "sbc_worker_calls_started_total") == {"0": 1, "1": 2}
    assert per_worker(m, "sbc_worker_calls_active") == {"0": 1, "1": 2}
    assert per_worker(m, "sbc_worker_register_requests_total") == {"0": 1, "1": 0}
    cpu = per_worker(m, "sbc_worker_cpu_seconds_total")
    assert cpu == {
        "0": value(parse(text0), "process_cpu_seconds_total"),
        "1": value(parse(text1), "process_cpu_seconds_total"),
    }


def test_a_worker_that_did_not_answer_is_down_and_not_counted() -> None:
    lab0, _ = two_busy_workers()
    text0 = worker_text(lab0)
    # worker 1 did not answer, worker 2 answered garbage, worker 3 is not running at all
    texts = [(0, text0), (1, None), (2, "sbc_calls_active{ 1\n")]
    m = parse(merge_metrics(texts, states(True, True, True, False)))
    assert value(m, "sbc_workers") == 4
    assert per_worker(m, "sbc_worker_up") == {"0": 1, "1": 0, "2": 0, "3": 0}
    assert per_worker(m, "sbc_worker_calls_started_total") == {"0": 1}
    assert value(m, "sbc_calls_started_total") == 1
    assert value(m, "sbc_calls_active") == 1
    # answered, but the supervisor saw it die since: down
    m = parse(merge_metrics([(0, text0)], states(False)))
    assert per_worker(m, "sbc_worker_up") == {"0": 0}
    # no worker answered: the SBC's families are gone, the workers' remain
    m = parse(merge_metrics([(0, None)], states(True)))
    assert ("sbc_calls_started_total", ()) not in m
    assert value(m, "sbc_workers") == 1


# -- /status ---------------------------------------------------------------------------------
def report(lab: Lab) -> Report:
    return status_report(lab.core, now=lab.now, name="w", pid=4242)


def test_status_sums_the_workers_and_lists_them() -> None:
    lab0, lab1 = two_busy_workers()
    workers = states(True, True, restarts=1)
    reload: dict[str, object] = {"ok": True, "at": 5.0}
    merged = merge_status(
        [(0, report(lab0)), (1, report(lab1))],
        workers,
        name="sbc1",
        pid=7,
        reload=reload,
        now=160.0,
    )
    assert (merged["name"], merged["pid"], merged["reload"]) == ("sbc1", 7, reload)
    assert merged["ready"] is True
    assert merged["reason"] == "ready (1 of 1 backends up) (2 workers)"
    assert merged["registrations"] == {"relayed": 1, "local": 0}
    assert merged["calls"] == {"active": 3, "started": 3, "answered": 3, "ended": 0, "refused": 0}
    assert merged["backends"] == [
        {"name": "sip:b1", "address": "10.1.0.10:5070", "transport": "udp", "up": True,
         "dialogs": 3, "rtt_ms": 20.0}
    ]  # fmt: skip
    assert merged["media"]["workers"] == 0
    assert merged["workers"] == [
        {"index": 0, "pid": 1000, "running": True, "ready": True, "restarts": 1,
         "uptime": 60.0, "registrations": 1, "calls_active": 1, "calls_started": 1},
        {"index": 1, "pid": 1001, "running": True, "ready": True, "restarts": 1,
         "uptime": 59.0, "registrations": 0, "calls_active": 2, "calls_started": 2},
    ]  # fmt: skip
    # the same keys as one worker's report, in the same order, plus the workers
    assert list(merged) == [*report(lab0), "workers"]


def test_status_is_ready_only_when_every_worker_is() -> None:
    lab0, lab1 = two_busy_workers()
    lab1.core.backends.balancer.backends[0].up = False
    reports = [(0, report(lab0)), (1, report(lab1))]

    def merged(running: list[WorkerState], got: Sequence[tuple[int, Report | None]]) -> Report:
        return merge_status(got, running, name="s", pid=1, reload=None, now=200.0)

    out = merged(states(True, True), reports)
    assert (out["ready"], out["reason"]) == (False, "worker 1: no backend up (0 of 1)")
    assert out["reload"] is None
    assert [w["ready"] for w in out["workers"]] == [True, False]
    assert out["backends"][0]["up"] is True  # worker 0 still reaches it
    out = merged(states(False, True), reports)
    assert (out["ready"], out["reason"]) == (False, "worker 0 not running")
    assert out["workers"][0]["uptime"] is None
    lab1.core.backends.balancer.backends[0].up = True
    out = merged(states(True, True), [(0, report(lab0)), (1, None)])
    assert (out["ready"], out["reason"]) == (False, "worker 1 did not answer")
    assert out["calls"]["started"] == 1  # worker 0's alone
    assert out["workers"][1] == {
        "index": 1, "pid": 1001, "running": True, "ready": False, "restarts": 0,
        "uptime": 99.0, "registrations": None, "calls_active": None, "calls_started": None,
    }  # fmt: skip
    out = merged(states(True, True), [(0, report(lab0)), (1, report(lab1))])
    assert (out["ready"], out["reason"]) == (True, "ready (1 of 1 backends up) (2 workers)")
    out = merged([], [])
    assert (out["ready"], out["calls"]["active"], out["workers"]) == (False, 0, [])


def test_status_merges_backends_by_name_and_bans_by_source() -> None:
    lab0, lab1 = Lab(), Lab(backends=(B1, B2))  # worker 1 also knows sip:b2
    lab0.core.backends.balancer.backends[0].last_rtt = 0.005
    lab1.core.backends.balancer.backends[0].up = False  # worker 1 sees sip:b1 down
    lab1.core.backends.balancer.backends[0].last_rtt = None
    lab0.core.guard.bans.update({"192.0.2.66": 60.0, "192.0.2.67": 30.0})
    lab1.core.guard.bans.update({"192.0.2.66": 90.0, "192.0.2.68": 10.0, "192.0.2.69": -1.0})
    out = merge_status(
        [(0, report(lab0)), (1, report(lab1))], states(True, True), name="s", pid=1,
        reload=None, now=0.0,
    )  # fmt: skip
    assert [(b["name"], b["address"], b["up"], b["rtt_ms"]) for b in out["backends"]] == [
        ("sip:b1", "10.1.0.10:5070", True, 5.0),
        ("sip:b2", "10.1.0.11:5070", True, 0.0),
    ]
    assert out["bans"] == {
        "active": 3,
        "sources": [
            {"source": "192.0.2.66", "remaining": 90.0},
            {"source": "192.0.2.67", "remaining": 30.0},
            {"source": "192.0.2.68", "remaining": 10.0},
        ],
    }
