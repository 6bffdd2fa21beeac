"""Several signalling workers: the config, each worker's share, the marks that tell whose a
message is, the hand-over between workers (sans-I/O), and the link between them."""

from __future__ import annotations

import asyncio
import logging
import os
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from test_b2bua import ALICE, FROM_B1, Lab, backend_request, establish, in_dialog

from sbc.actions import HandOver, SendData
from sbc.app import WorkerRole
from sbc.config import ConfigError, ListenUrl, parse_config
from sbc.io.supervisor import merged_reload
from sbc.io.worker_link import WorkerLink
from sbc.log import setup_logging
from sbc.ownership import MAX_WORKERS, conn_id, conn_owner, marked_worker, worker_tag
from sbc.registration.shared import decode_flow, encode_flow, flow_lost_event
from sbc.sip.flow import Flow
from sbc.sip.headers import parse_name_addr
from sbc.sip.message import Request, Response, make_response
from sbc.sip.parser import parse_message
from sbc.sip.transaction import mark_branches

ACCESS_LISTEN = {"listen": ["udp://127.0.0.1:5060", "tcp://127.0.0.1:5060"]}


def errors(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value.errors


# -- config -------------------------------------------------------------------------------
def test_workers_is_a_count_or_auto() -> None:
    assert parse_config({}).sbc.workers == 1
    assert parse_config({"sbc": {"workers": 4}, "access": ACCESS_LISTEN}).sbc.workers == 4
    auto = parse_config({"sbc": {"workers": "auto"}, "access": ACCESS_LISTEN}).sbc.workers
    assert auto == len(os.sched_getaffinity(0))
    for bad in (0, -1, 257, "many", 2.5, True):
        (error,) = errors({"sbc": {"workers": bad}, "access": ACCESS_LISTEN})
        assert error.startswith("<config>: sbc.workers: must be an integer between 1 and 256")


def test_workers_need_fixed_access_ports_and_room_for_their_core_ports() -> None:
    problems = errors({"sbc": {"workers": 2}, "access": {"listen": ["udp://127.0.0.1:0"]}})
    assert problems == [
        "<config>: access.listen[0]: port 0 cannot be shared by 2 workers: give a port"
    ]
    problems = errors({
        "sbc": {"workers": 3}, "access": ACCESS_LISTEN,
        "core": {"listen": ["udp://127.0.0.1:65534"]},
    })  # fmt: skip
    assert problems == [
        "<config>: core.listen[0]: port 65534 + 3 workers goes past 65535 (worker i listens "
        "on the port + i)"
    ]
    # Worker 1's core port is the admin port: the same socket twice.
    problems = errors({
        "sbc": {"workers": 2}, "access": ACCESS_LISTEN,
        "core": {"listen": ["tcp://127.0.0.1:5080"]}, "admin": {"listen": "127.0.0.1:5081"},
    })  # fmt: skip
    assert problems == [
        "<config>: admin.listen: duplicate listen address tcp 127.0.0.1:5081, already used "
        "by core.listen[0]"
    ]
    problems = errors({
        "sbc": {"workers": 4}, "access": ACCESS_LISTEN, "media": {"ports": "20000-20013"},
    })  # fmt: skip
    assert problems == [
        "<config>: media.ports: range holds 7 RTP/RTCP port pairs; 4 workers need 8 at "
        "least (each has a share)"
    ]


def test_each_worker_has_its_core_port_and_a_share_of_the_media_ports() -> None:
    config = parse_config({
        "sbc": {"workers": 3}, "access": ACCESS_LISTEN,
        "core": {"listen": ["udp://127.0.0.1:5080", "udp://127.0.0.1:0"]},
        "media": {"ports": "20000-20999", "workers": 6},
    })  # fmt: skip
    roles = [WorkerRole(i, 3, b"k" * 48, "/run/x") for i in range(3)]
    assert [r.core_url(config.core.listen[0]).port for r in roles] == [5080, 5081, 5082]
    assert {r.core_url(config.core.listen[1]).port for r in roles} == {0}
    shares = [r.media(config) for r in roles]
    assert [count for count, _ in shares] == [2, 2, 2]
    ports = [share for _, share in shares]
    assert ports == [(20000, 20331), (20332, 20663), (20664, 20995)]
    for low, high in ports:
        assert low % 2 == 0 and high % 2 == 1  # whole RTP/RTCP pairs
    assert roles[1].admin_socket == "/run/x/worker-1.admin"
    assert ListenUrl.parse("udp://[::1]:5080") == roles[0].core_url(
        ListenUrl.parse("udp://[::1]:5080")
    )


# -- marks --------------------------------------------------------------------------------
def test_marks_name_a_worker_and_nothing_else() -> None:
    assert marked_worker(worker_tag(0)) == 0
    assert marked_worker(worker_tag(17) + "a9f") == 17
    assert marked_worker("z9hG4bK" + worker_tag(3) + "xyz", len("z9hG4bK")) == 3
    for unmarked in ("", "w", "w.", "wx.abc", "w12345.", "alice", "w1", "w١.x", "bob.w1."):
        assert marked_worker(unmarked) == -1, unmarked
    for index in (0, 1, 5, MAX_WORKERS - 1):
        for serial in (1, 2, 1000):
            assert conn_owner(conn_id(serial, index)) == index
            assert conn_id(serial, index) != 0


def test_a_branch_carries_the_mark_of_its_worker() -> None:
    from sbc.sip.transaction import new_branch

    try:
        mark_branches(worker_tag(1))
        assert new_branch().startswith("z9hG4bKw1.")
    finally:
        mark_branches("")
    assert new_branch().startswith("z9hG4bK") and marked_worker(new_branch(), 7) == -1


# -- hand-over ----------------------------------------------------------------------------
def test_a_request_of_another_workers_dialog_is_handed_over_as_it_came() -> None:
    w0, w1 = Lab(worker=0, workers=2), Lab(worker=1, workers=2)
    _, _, got = establish(w0)
    contact = got.contact[0].uri_text or ""
    assert contact.startswith(f"sip:{worker_tag(0)}"), contact
    bye = in_dialog("BYE", got, 2)
    # Worker 1 gets alice's BYE (her source port now lands there): it is worker 0's.
    [handed] = w1.core.receive_datagram(bye, ALICE, w1.now)
    assert handed == HandOver(0, ALICE, bytes(parse_message(bye)), True)
    assert w1.core.stats["handed_over"] == 1
    # Worker 0 takes it as if received on alice's flow: 200 to her, BYE to the backend.
    out = [a for a in w0.core.receive_handed(handed.data, handed.flow, w0.now)]
    sends = [a for a in out if isinstance(a, SendData)]
    to_alice = [parse_message(a.data) for a in sends if a.flow == ALICE]
    assert [m.status for m in to_alice if isinstance(m, Response)] == [200]
    assert any(isinstance(parse_message(a.data), Request) for a in sends if a.flow != ALICE)
    assert w0.core.stats["handed_in"] == 1
    assert not any(isinstance(a, HandOver) for a in out)  # never handed on again


def test_a_response_to_another_workers_request_is_handed_over() -> None:
    w0, w1 = Lab(worker=0, workers=2), Lab(worker=1, workers=2)
    try:
        mark_branches(worker_tag(0))
        fwd, ok, _ = establish(w0)
        # The backend hangs up: worker 0 sends alice a BYE, its branch marked.
        req = backend_request("BYE", fwd, ok, 2)
        out = w0.core.receive_datagram(bytes(req), FROM_B1, w0.now)
    finally:
        mark_branches("")
    [to_alice] = [parse_message(a.data) for a in out if isinstance(a, SendData) and a.flow == ALICE]
    assert isinstance(to_alice, Request) and to_alice.method == "BYE"
    answer = bytes(make_response(to_alice, 200))
    [handed] = w1.core.receive_datagram(answer, ALICE, w1.now)
    assert isinstance(handed, HandOver) and handed.worker == 0 and handed.received
    assert w0.core.receive_handed(handed.data, ALICE, w0.now) == []  # the BYE is answered


def test_one_worker_hands_nothing_over() -> None:
    alone = Lab()
    other = Lab(worker=0, workers=2)
    _, _, got = establish(other)
    bye = in_dialog("BYE", got, 2)
    out = alone.core.receive_datagram(bye, ALICE, alone.now)
    assert not any(isinstance(a, HandOver) for a in out)


def test_the_workers_reloads_add_up_to_one() -> None:
    def state(generation: int, ok: bool = True, error: str | None = None) -> dict[str, Any]:
        reload = {"path": "/etc/sbc.toml", "generation": generation, "ok": ok,
                  "error": error, "at": 100.0 + generation, "applied": generation}  # fmt: skip
        return {"reload": reload}

    assert merged_reload([]) is None
    both = merged_reload([state(2), state(1)])
    assert both is not None and both["generation"] == 1 and both["ok"] is True
    refused = merged_reload([state(2), state(2, False, "media changed: needs a restart")])
    assert refused is not None and refused["ok"] is False
    assert refused["error"] == "media changed: needs a restart"


def test_a_workers_log_lines_say_which_it_is() -> None:
    out = StringIO()
    setup_logging("info", "text", stream=out, worker=3)
    try:
        logging.getLogger("sbc.test").info("hello")
    finally:
        setup_logging("info", "text")
    assert out.getvalue().rstrip().endswith("hello worker=3")


# -- the link -----------------------------------------------------------------------------
def test_the_link_carries_batches_between_workers(tmp_path: Path) -> None:
    async def main() -> None:
        got: list[list[tuple[int, tuple[Any, ...]]]] = [[], [], []]
        links = [
            WorkerLink(str(tmp_path), i, 3, lambda peer, item, i=i: got[i].append((peer, item)))
            for i in range(3)
        ]
        flow = Flow("tcp", ("127.0.0.1", 5060), ("192.0.2.1", 4000), conn_id(7, 2))
        links[0].broadcast(("share", ("reg", 1, "alice")))
        links[0].send(2, ("out", encode_flow(flow), b"SIP/2.0 200 OK\r\n\r\n"))
        big = [("share", ("reg", n, "x" * 100)) for n in range(2000)]  # > one datagram
        for item in big:
            links[1].send(0, item)
        # One datagram each, more than a Unix datagram queue holds (max_dgram_qlen): the
        # rest waits for room, in order, and none is lost.
        many = [("share", ("refresh", n)) for n in range(300)]
        for item in many:
            links[1].send(0, item)
            links[1]._flush()
        big += many
        for _ in range(100):
            await asyncio.sleep(0.01)
            if len(got[0]) == len(big) and len(got[2]) == 2:
                break
        assert got[1] == [(0, ("share", ("reg", 1, "alice")))]
        assert got[2][0] == (0, ("share", ("reg", 1, "alice")))
        peer, (kind, items, data) = got[2][1]
        assert (peer, kind, decode_flow(items), data) == (0, "out", flow, b"SIP/2.0 200 OK\r\n\r\n")
        assert [item for _, item in got[0]] == big  # in order
        assert links[1].stats["peer_busy"] == 0 and links[1].stats["waited"] > 0
        links[2].close()  # a worker that is gone: its datagrams are counted, not an error
        links[0].send(2, ("share", ("x",)))
        await asyncio.sleep(0.02)
        assert links[0].stats["peer_absent"] == 1
        for link in links[:2]:
            link.close()
        assert not list(tmp_path.iterdir())

    asyncio.run(main())


def test_a_closed_connection_of_another_worker_fails_its_flow_here() -> None:
    w0, w1 = Lab(worker=0, workers=2), Lab(worker=1, workers=2)
    flow = Flow("tcp", ALICE.local, ("192.0.2.9", 40001), conn_id(3, 0))  # worker 0 holds it
    assert w1.core._alive(flow)  # worker 0 writes for worker 1
    assert not w0.core._alive(flow)  # worker 0 has no such connection open
    w1.core.apply_shared(flow_lost_event(flow), w1.now)
    assert not w1.core._alive(flow)
    assert w1.core.stats["shared_applied"] == 1


def test_a_restarted_peer_gets_the_first_datagram_sent_to_it(tmp_path: Path) -> None:
    async def main() -> None:
        got: list[tuple[Any, ...]] = []
        sender = WorkerLink(str(tmp_path), 0, 2, lambda peer, item: None)
        first = WorkerLink(str(tmp_path), 1, 2, lambda peer, item: got.append(item))
        sender.send(1, ("share", ("before",)))
        await asyncio.sleep(0.02)
        first.close()  # worker 1 dies; its successor binds the same path
        second = WorkerLink(str(tmp_path), 1, 2, lambda peer, item: got.append(item))
        sender.send(1, ("synced",))  # the answer to its sync: the first datagram after
        for _ in range(50):
            await asyncio.sleep(0.01)
            if len(got) == 2:
                break
        assert got == [("share", ("before",)), ("synced",)]
        assert sender.stats["peer_absent"] == 0
        sender.close()
        second.close()

    asyncio.run(main())


def test_registrations_are_copies_in_every_worker_not_added_up() -> None:
    from sbc.workers_report import WorkerState, merge_status

    states = [
        WorkerState(index=i, pid=100 + i, running=True, restarts=0, started_at=0.0)
        for i in range(2)
    ]
    report = {"ready": True, "reason": "ready", "registrations": {"relayed": 7, "local": 2}}
    merged = merge_status(
        [(0, report), (1, dict(report, registrations={"relayed": 6, "local": 2}))],
        states, name="sbc", pid=1, reload=None, now=10.0,
    )  # fmt: skip
    assert merged["registrations"] == {"relayed": 7, "local": 2}


def test_a_restarted_workers_connections_are_failed_in_the_others() -> None:
    w1 = Lab(worker=1, workers=2)
    held = Flow("tls", ALICE.local, ("192.0.2.9", 40001), conn_id(3, 0))  # worker 0's
    mine = Flow("tls", ALICE.local, ("192.0.2.9", 40002), conn_id(4, 1))
    for name, flow in (("carol", held), ("dave", mine)):
        w1.core.registration.location.register(
            aor=f"sip:{name}@example.com", contacts=(parse_name_addr(f"<sip:{name}@192.0.2.9>"),),
            flow=flow, call_id=f"{name}-1", cseq=1, expires=600, now=w1.now,
        )  # fmt: skip
    assert w1.core._alive(held)
    w1.core.worker_restarted(0, w1.now)
    assert not w1.core._alive(held)  # died with worker 0: 430 for carol
    assert w1.core.registration.has_flow(held)  # her binding stays until it expires
    assert mine not in w1.core._lost_flows
