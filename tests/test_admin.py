"""The admin API: the Prometheus collector reads the core's live state, the
HTTP server answers /metrics, /healthz, /readyz and /status and refuses everything else, and
``sbc status`` prints what /status says (or fails in one line when nothing answers)."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sipdata import sip
from test_b2bua import ALICE, ANSWER_SDP, Lab, alice_hangs_up, establish, invite, only
from test_registration import REGISTER

from sbc.cli import main
from sbc.core import CoreSettings, SbcCore
from sbc.features.guard import GuardPolicy
from sbc.io.admin import MAX_REQUEST, AdminServer
from sbc.media import control
from sbc.media.control import Totals
from sbc.metrics import SbcCollector, readiness, status_report
from sbc.sip.flow import Flow
from sbc.sip.message import Request, make_response

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(collector: SbcCollector) -> Samples:
    """Every sample the collector yields, by (name, sorted labels)."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return parse(generate_latest(registry).decode())


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, metric: str, /, **labels: str) -> float:
    return samples[(metric, tuple(sorted(labels.items())))]


def collector(lab: Lab, media: list[Totals | None] | None = None) -> SbcCollector:
    return SbcCollector(lab.core, clock=lambda: lab.now, media=lambda: media or [], name="t1")


# -- the collector ---------------------------------------------------------------------------
def test_a_call_moves_the_call_and_backend_metrics() -> None:
    lab = Lab()
    c = collector(lab)
    before = scrape(c)
    assert value(before, "sbc_info", name="t1", version="0.1.0") == 1
    assert value(before, "sbc_calls_active") == 0
    assert value(before, "sbc_calls_started_total") == 0
    assert value(before, "sbc_backend_up", backend="sip:b1") == 1
    assert value(before, "sbc_backend_dialogs", backend="sip:b1") == 0
    assert value(before, "sbc_backend_probe_rtt_seconds", backend="sip:b1") == 0.0
    assert value(before, "sbc_ready") == 1

    _, _, got = establish(lab)
    during = scrape(c)
    assert value(during, "sbc_calls_active") == 1
    assert value(during, "sbc_calls_started_total") == 1
    assert value(during, "sbc_calls_answered_total") == 1
    assert value(during, "sbc_calls_ended_total") == 0
    assert value(during, "sbc_backend_dialogs", backend="sip:b1") == 1
    assert value(during, "sbc_call_events_total", event="ack_relayed") == 1

    alice_hangs_up(lab, got, 2)
    after = scrape(c)
    assert value(after, "sbc_calls_active") == 0
    assert value(after, "sbc_calls_ended_total") == 1
    assert value(after, "sbc_backend_dialogs", backend="sip:b1") == 0
    assert value(after, "sbc_call_events_total", event="in_dialog:BYE") == 1
    lab.assert_clean()


def test_calls_started_counts_invite_calls_whatever_their_target() -> None:
    """An INVITE from the backend to a registered client is a call started; a MESSAGE to
    the backend is not."""
    lab = Lab()
    c = collector(lab)
    _, fwd = only(lab.from_client(sip(REGISTER.format(n=1, user="alice"))), Request)
    assert isinstance(fwd, Request)
    ok = make_response(fwd, 200, to_tag="reg")
    ok.add("Contact", "<sip:alice@10.0.0.7:5060>;expires=3600")
    lab.from_backend(ok)
    message = sip(
        "MESSAGE sip:bob@example.com SIP/2.0\n"
        "Via: SIP/2.0/UDP 10.0.0.7:5060;branch=z9hG4bK-m1;rport\nMax-Forwards: 70\n"
        "From: <sip:alice@example.com>;tag=m1\nTo: <sip:bob@example.com>\n"
        "Call-ID: msg1@10.0.0.7\nCSeq: 1 MESSAGE\nContent-Length: 0\n\n"
    )
    _, to_b1 = only(lab.from_client(message), Request)
    lab.from_backend(make_response(to_b1, 200, to_tag="m"))
    assert value(scrape(c), "sbc_calls_started_total") == 0
    inv = Request("INVITE", "sip:alice@10.0.0.7:5060")
    inv.add("Via", "SIP/2.0/UDP 10.1.0.10:5070;branch=z9hG4bK-kam1")
    inv.add("Route", fwd.get("path") or "")
    inv.add("Max-Forwards", "69")
    inv.add("From", "<sip:carol@example.com>;tag=c1")
    inv.add("To", "<sip:alice@example.com>")
    inv.add("Call-ID", "core-call-1@backend.core.internal")
    inv.add("CSeq", "1 INVITE")
    inv.add("Contact", "<sip:carol@10.1.0.77:5060>")
    inv.set_body(ANSWER_SDP.encode(), "application/sdp")
    to_alice, got = only(lab.from_backend(inv), Request)
    assert to_alice == ALICE
    samples = scrape(c)
    assert value(samples, "sbc_calls_started_total") == 1
    assert value(samples, "sbc_calls_active") == 1
    lab.from_client(make_response(got, 486, to_tag="busy"))
    samples = scrape(c)
    assert value(samples, "sbc_calls_active") == 0
    assert value(samples, "sbc_calls_ended_total") == 1
    assert value(samples, "sbc_calls_answered_total") == 0
    lab.from_client(b"MESSAGE sip:bob@example.com SIP/2.0\r\nVia: x\r\n\r\n")  # malformed
    samples = scrape(c)
    assert sum(v for (n, labels), v in samples.items() if n == "sbc_rejected_total") >= 1
    lab.assert_clean()


def test_refused_calls_are_counted_by_reason() -> None:
    from sbc.calls import CallPolicy

    lab = Lab(policy=CallPolicy(max_calls=1))
    c = collector(lab)
    establish(lab, n=1)
    out = lab.from_client(invite(2))
    assert any(m.status == 503 for _, m in out if not isinstance(m, Request))  # type: ignore[union-attr]
    samples = scrape(c)
    assert value(samples, "sbc_calls_refused_total", reason="limit") == 1
    assert value(samples, "sbc_calls_refused_total", reason="media") == 0


def test_registrations_relayed_and_offloaded() -> None:
    lab = Lab()
    c = collector(lab)
    assert value(scrape(c), "sbc_registrations", mode="relayed") == 0
    [(_, req)] = lab.from_client(sip(REGISTER.format(n=1, user="carol")))
    assert isinstance(req, Request) and req.method == "REGISTER"
    ok = make_response(req, 200, to_tag="r1")
    ok.add("Contact", f"{req.get('contact')};expires=3600")
    [(_, answer)] = lab.from_backend(ok)
    assert answer.status == 200  # type: ignore[union-attr]
    samples = scrape(c)
    assert value(samples, "sbc_registrations", mode="relayed") == 1
    assert value(samples, "sbc_registrations", mode="local") == 0
    assert value(samples, "sbc_register_requests_total", handling="forwarded") == 1
    # the client's refresh is answered by the SBC from its cache (registration offload)
    [(_, again)] = lab.from_client(sip(REGISTER.format(n=2, user="carol")))
    assert again.status == 200  # type: ignore[union-attr]
    assert value(scrape(c), "sbc_register_requests_total", handling="offloaded") == 1


def test_embedded_registrar_bindings_expire_from_the_metric() -> None:
    core = SbcCore(CoreSettings(local_hosts=frozenset({"127.0.0.1"})))
    now = [0.0]
    c = SbcCollector(core, clock=lambda: now[0])
    flow = Flow("udp", ("127.0.0.1", 5060), ("192.0.2.7", 40000))
    reg = REGISTER.format(n=1, user="dave").replace("Expires: 3600", "Expires: 60")
    core.receive_datagram(sip(reg), flow, 0.0)
    assert value(scrape(c), "sbc_registrations", mode="local") == 1
    now[0] = 61.0  # expired, not yet purged: no longer counted
    assert value(scrape(c), "sbc_registrations", mode="local") == 0
    # no backends: ready (the embedded registrar serves)
    assert readiness(core, True) == (True, "ready (embedded registrar, no backends)")


def test_bans_and_guard_rejections() -> None:
    core = SbcCore(
        CoreSettings(
            local_hosts=frozenset({"127.0.0.1"}),
            security=GuardPolicy(pike_density=5, pike_window=2.0, ban_time=60.0),
        )
    )
    c = SbcCollector(core, clock=lambda: 1.0)
    flow = Flow("udp", ("127.0.0.1", 5060), ("192.0.2.66", 5060))
    for _ in range(10):
        core.receive_datagram(b"\r\n", flow, 0.5)
    samples = scrape(c)
    assert value(samples, "sbc_bans_total", reason="flood") == 1
    assert value(samples, "sbc_banned_sources") == 1
    assert value(samples, "sbc_dropped_total", reason="banned") >= 1
    report = status_report(core, now=1.0)
    assert report["bans"] == {"active": 1, "sources": [{"source": "192.0.2.66", "remaining": 59.5}]}
    later = scrape(SbcCollector(core, clock=lambda: 100.0))
    assert value(later, "sbc_banned_sources") == 0  # the ban ran out


def test_backend_down_is_not_ready() -> None:
    lab = Lab(request_timeout=1.0, failures=1)
    backend = lab.core.backends.balancer.backends[0]
    backend.up = False
    c = collector(lab)
    samples = scrape(c)
    assert value(samples, "sbc_backend_up", backend="sip:b1") == 0
    assert value(samples, "sbc_ready") == 0
    assert readiness(lab.core, True) == (False, "no backend up (0 of 1)")
    assert readiness(lab.core, False) == (False, "listeners not bound")
    backend.up = True
    assert readiness(lab.core, True) == (True, "ready (1 of 1 backends up)")


def test_media_totals_per_worker() -> None:
    lab = Lab()
    totals = Totals(
        packets_in=10, bytes_in=1720, packets_out=9, bytes_out=1548, dropped_source=2,
        srtp_failures=3, no_session=1, no_destination=4, invalid=5, protect_failures=6,
        sessions=1, ports=4,
    )  # fmt: skip
    samples = scrape(collector(lab, [totals, None]))
    assert value(samples, "sbc_media_workers") == 1  # the second has not reported yet
    assert value(samples, "sbc_media_packets_total", worker="0", direction="in") == 10
    assert value(samples, "sbc_media_packets_total", worker="0", direction="out") == 9
    assert value(samples, "sbc_media_bytes_total", worker="0", direction="out") == 1548
    assert value(samples, "sbc_media_srtp_failures_total", worker="0") == 3
    assert value(samples, "sbc_media_dropped_total", worker="0", reason="source") == 2
    assert value(samples, "sbc_media_dropped_total", worker="0", reason="srtp_protect") == 6
    assert value(samples, "sbc_media_sessions", worker="0") == 1
    assert value(samples, "sbc_media_ports", worker="0") == 4
    assert ("sbc_media_sessions", (("worker", "1"),)) not in samples


def test_totals_round_trip_on_the_wire() -> None:
    totals = Totals(packets_in=1, bytes_in=2, packets_out=3, bytes_out=4, sessions=5, ports=6)
    assert control.decode(control.encode(totals)) == totals


def test_every_metric_has_help_and_the_sbc_prefix() -> None:
    lab = Lab()
    establish(lab)
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector(lab, [Totals()]))
    families = list(text_string_to_metric_families(generate_latest(registry).decode()))
    assert len(families) > 20
    for family in families:
        assert family.name.startswith("sbc_"), family.name
        assert family.documentation, family.name
        assert family.type in ("counter", "gauge"), family.name


# -- the HTTP server -------------------------------------------------------------------------
@pytest.fixture
async def admin() -> AsyncIterator[tuple[AdminServer, Lab]]:
    lab = Lab()
    server = await AdminServer.start(
        "127.0.0.1", 0, lab.core, name="t1", media=lambda: [Totals(packets_in=7)],
        clock=lambda: lab.now,
    )  # fmt: skip
    server.listening = True
    try:
        yield server, lab
    finally:
        await server.close()


async def http(server: AdminServer, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection(*server.address)
    writer.write(raw)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5.0)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


async def get(server: AdminServer, path: str, extra: str = "") -> tuple[int, dict[str, str], bytes]:
    return await http(server, f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())


async def test_metrics_over_http_follow_a_call(admin: tuple[AdminServer, Lab]) -> None:
    server, lab = admin
    status, headers, body = await get(server, "/metrics")
    assert status == 200 and headers["connection"] == "close"
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = parse(body.decode())
    assert value(samples, "sbc_calls_active") == 0
    assert value(samples, "sbc_media_packets_total", worker="0", direction="in") == 7
    assert ("process_cpu_seconds_total", ()) in samples  # the process collector
    establish(lab)
    samples = parse((await get(server, "/metrics"))[2].decode())
    assert value(samples, "sbc_calls_active") == 1
    assert value(samples, "sbc_calls_started_total") == 1
    # OpenMetrics when asked
    status, headers, body = await get(
        server, "/metrics", "Accept: application/openmetrics-text; version=1.0.0\r\n"
    )
    assert headers["content-type"].startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")


async def test_health_ready_and_status(admin: tuple[AdminServer, Lab]) -> None:
    server, lab = admin
    assert (await get(server, "/healthz"))[::2] == (200, b"ok\n")
    assert (await get(server, "/readyz"))[::2] == (200, b"ready (1 of 1 backends up)\n")
    server.listening = False
    assert (await get(server, "/readyz"))[::2] == (503, b"listeners not bound\n")
    server.listening = True
    lab.core.backends.balancer.backends[0].up = False
    assert (await get(server, "/readyz"))[::2] == (503, b"no backend up (0 of 1)\n")
    lab.core.backends.balancer.backends[0].up = True
    establish(lab)
    status, headers, body = await get(server, "/status?x=1")
    assert status == 200 and headers["content-type"] == "application/json"
    report = json.loads(body)
    assert report["name"] == "t1" and report["ready"] is True
    assert report["calls"] == {"active": 1, "started": 1, "answered": 1, "ended": 0, "refused": 0}
    assert report["registrations"] == {"relayed": 0, "local": 0}
    assert report["backends"] == [
        {"name": "sip:b1", "address": "10.1.0.10:5070", "transport": "udp", "up": True,
         "dialogs": 1, "rtt_ms": 0.0}
    ]  # fmt: skip
    assert report["media"]["packets_in"] == 7
    # HEAD: the headers only
    status, headers, body = await http(server, b"HEAD /healthz HTTP/1.0\r\n\r\n")
    assert status == 200 and headers["content-length"] == "3" and body == b""


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET /nope HTTP/1.1\r\n\r\n", 404),
        (b"GET / HTTP/1.1\r\n\r\n", 404),
        (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405),
        (b"DELETE /status HTTP/1.1\r\n\r\n", 405),
        (b"GET /metrics\r\n\r\n", 400),  # HTTP/0.9
        (b"GET /metrics SPDY/3\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\n", 400),  # the client stops half-way
        (b"GET /metrics HTTP/1.1\r\nX: " + b"a" * MAX_REQUEST + b"\r\n\r\n", 431),
    ],
)
async def test_bad_requests(admin: tuple[AdminServer, Lab], raw: bytes, status: int) -> None:
    server, _ = admin
    reader, writer = await asyncio.open_connection(*server.address)
    writer.write(raw)
    if raw.endswith(b"HTTP/1.1\r\n"):
        writer.write_eof()
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5.0)
    writer.close()
    assert data.startswith(f"HTTP/1.1 {status} ".encode()), data
    assert b"\r\nConnection: close\r\n" in data
    if status == 405:
        assert b"\r\nAllow: GET, HEAD\r\n" in data
    # the server still serves
    assert (await get(server, "/healthz"))[0] == 200


async def test_a_client_that_says_nothing_is_dropped(
    admin: tuple[AdminServer, Lab], monkeypatch: pytest.MonkeyPatch
) -> None:
    import sbc.io.admin as admin_module

    monkeypatch.setattr(admin_module, "REQUEST_TIMEOUT", 0.2)
    server, _ = admin
    reader, writer = await asyncio.open_connection(*server.address)
    data = await asyncio.wait_for(reader.read(), 5.0)
    writer.close()
    assert data.startswith(b"HTTP/1.1 408 "), data


async def test_the_port_in_use_is_a_startup_error(admin: tuple[AdminServer, Lab]) -> None:
    from sbc.io.sip_transport import StartupError

    server, lab = admin
    host, port = server.address
    with pytest.raises(StartupError, match=f"cannot listen on admin http://127.0.0.1:{port}"):
        await AdminServer.start(host, port, lab.core)


# -- sbc status ------------------------------------------------------------------------------
async def test_sbc_status_prints_registrations_calls_and_backends(
    admin: tuple[AdminServer, Lab], capsys: pytest.CaptureFixture[str]
) -> None:
    server, lab = admin
    establish(lab)
    host, port = server.address
    code = await asyncio.to_thread(main, ["status", "--admin", f"{host}:{port}"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.splitlines() == [
        "t1 (sbc 0.1.0): ready",
        "registrations: 0 relayed, 0 local",
        "calls: 1 active; 1 started, 1 answered, 0 ended, 0 refused",
        "backends: 1 of 1 up",
        "  sip:b1  up    dialogs 1      rtt 0.0 ms",
        "bans: 0 source(s) banned now",
    ]
    code = await asyncio.to_thread(main, ["status", "--admin", f"{host}:{port}", "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out)["calls"]["active"] == 1


async def test_sbc_status_reads_the_admin_address_from_the_config(
    admin: tuple[AdminServer, Lab], capsys: pytest.CaptureFixture[str], tmp_path: object
) -> None:
    from pathlib import Path

    server, _ = admin
    host, port = server.address
    config = Path(str(tmp_path)) / "sbc.toml"
    config.write_text(f'[admin]\nlisten = "{host}:{port}"\n')
    code = await asyncio.to_thread(main, ["status", "--config", str(config)])
    assert code == 0
    assert "registrations: 0 relayed, 0 local" in capsys.readouterr().out


def test_sbc_status_without_an_sbc_is_one_line_and_exit_1(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["status", "--admin", f"127.0.0.1:{port}"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(
        f"sbc: error: no answer from the SBC's admin API at http://127.0.0.1:{port}"
    )
    assert main(["status", "--admin", "not-an-address"]) == 1
    assert len(capsys.readouterr().err.splitlines()) == 1


# -- logs ------------------------------------------------------------------------------------
def test_every_log_line_about_a_call_names_its_ids(caplog: pytest.LogCaptureFixture) -> None:
    """The SBC's call id (``call``) and the caller's Call-ID (``call_id``) on each line."""
    import logging

    from sbc.log import JsonFormatter

    lab = Lab()
    with caplog.at_level(logging.INFO, logger="sbc"):
        _, _, got = establish(lab)
        alice_hangs_up(lab, got, 2)
        lab.assert_clean()
    lines = [r for r in caplog.records if r.name == "sbc.calls"]
    assert [r.getMessage() for r in lines] == [
        "INVITE to core",
        "call answered",
        "call ended: BYE from caller",
    ]
    for record in lines:
        out = json.loads(JsonFormatter().format(record))
        assert out["call_id"] == "call1@10.0.0.7", out
        assert out["call"] == lines[0].call, out  # type: ignore[attr-defined]


def test_docs_list_every_metric_and_no_other() -> None:
    """docs/operations.md names each metric the collector yields (and the supervisor of
    several workers adds), and only those."""
    import re
    from pathlib import Path

    from prometheus_client import CollectorRegistry, generate_latest

    from sbc.media.ng import Node, NodePool
    from sbc.media.rtpengine import Rtpengine
    from sbc.state import StateHealth
    from sbc.workers_report import WorkerState, merge_metrics

    names: set[str] = set()
    # The built-in relay, media on an rtpengine node, and a state store (their families).
    node = Rtpengine(NodePool([Node("udp://127.0.0.1:2223", ("127.0.0.1", 2223))]), {})
    stored = Lab()
    stored.core.state_health = StateHealth()
    for lab in (Lab(), Lab(rtpengine=node), stored):
        registry = CollectorRegistry(auto_describe=False)
        registry.register(collector(lab, [Totals()]))
        text = generate_latest(registry).decode()
        state = WorkerState(index=0, pid=1, running=True, restarts=0, started_at=0.0)
        merged = merge_metrics([(0, text)], [state])
        names |= {
            f.name + ("_total" if f.type == "counter" else "")
            for f in text_string_to_metric_families(merged)
        }
    doc = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()
    for name in names:
        assert f"`{name}" in doc, f"docs/operations.md misses {name}"
    assert set(re.findall(r"\bsbc_[a-z_]+[a-z]", doc)) <= names
