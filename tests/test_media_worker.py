"""Media worker processes (sbc.io.media_worker) over loopback: a real child process relays
SRTP from one test "phone" socket to a plain one and back, answers Delete with Stats, reports
a Timeout, and closes its ports."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from sbc.io.media_worker import MediaWorkers
from sbc.media import control
from sbc.media.control import Party, SrtpKey, Stream, Update
from sbc.media.srtp import SrtpReceiver, SrtpSender

HOST = "127.0.0.1"
Start = Callable[..., Awaitable[tuple[MediaWorkers, list[control.Event]]]]


def rtp(seq: int, ssrc: int = 0x1234) -> bytes:
    return struct.pack("!BBHII", 0x80, 0, seq, seq * 160, ssrc) + bytes([seq & 0xFF]) * 160


def key() -> SrtpKey:
    return SrtpKey(suite="AES_CM_128_HMAC_SHA1_80", key_salt=os.urandom(30))


def free_pairs(count: int) -> list[int]:
    """Even ports p with p and p + 1 free, in a high range."""
    found: list[int] = []
    while len(found) < count:
        port = random.randrange(40000, 60000, 2)
        if port in found:
            continue
        socks = []
        try:
            for p in (port, port + 1):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(s)
                s.bind((HOST, p))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        found.append(port)
    return found


def is_bound(port: int) -> bool:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind((HOST, port))
    except OSError:
        return True
    finally:
        s.close()
    return False


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("timed out waiting")
        await asyncio.sleep(0.01)


class Phone:
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, 0))
        self.sock.setblocking(False)
        self.addr: tuple[str, int] = self.sock.getsockname()

    def send(self, data: bytes, port: int) -> None:
        self.sock.sendto(data, (HOST, port))

    async def recv(self, timeout: float = 2.0) -> tuple[bytes, tuple[str, int]]:
        loop = asyncio.get_running_loop()
        data, addr = await asyncio.wait_for(loop.sock_recvfrom(self.sock, 4096), timeout)
        return data, addr


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    started: list[MediaWorkers] = []

    async def _start(
        count: int = 1, timeout: float = 30.0
    ) -> tuple[MediaWorkers, list[control.Event]]:
        events: list[control.Event] = []
        workers = await MediaWorkers.start(
            count, timeout=timeout, latch_window=5.0, on_event=events.append
        )
        started.append(workers)
        return workers, events

    yield _start
    for workers in started:
        await workers.close()
        for pid in workers.pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)


def test_control_frames_round_trip_split_anywhere() -> None:
    """Every message survives encode / decode, and a stream of frames cut at any byte
    gives the same messages back (the control sockets are byte streams)."""
    codec = control.CodecSpec(name="OPUS", pt=111, clock=48000, channels=2, ptime=40,
                              fmtp="useinbandfec=1", dtmf_pt=101, dtmf_clock=48000)  # fmt: skip
    stats = control.PartyStats(packets_in=3, bytes_in=500, jitter_ms=1.25, latched=(HOST, 9))
    msgs: list[control.Command | control.Event | control.Totals] = [
        Update(session="s-é", streams=(
            Stream(index=0, a=Party(bind=HOST, port=40000, remote=(HOST, 9), remote_rtcp=(HOST, 7),
                                    recv_key=key(), send_key=key(), codec=codec),
                   b=Party(bind="::1", port=40002, rtcp_mux=True, sends=False, accept=False)),
            Stream(index=2, a=Party(bind=HOST, port=40004), b=Party(bind=HOST, port=40006),
                   passthrough=True),
        )),
        control.Delete(session="s"),
        control.SendDtmf(session="s", index=0, party="a", digit="#", duration_ms=100),
        control.Stats(session="s", streams=(control.StreamStats(index=0, a=stats,
                                                                b=control.PartyStats()),)),
        control.Timeout(session="s", idle=61.5),
        control.Dtmf(session="s", index=1, party="b", digit="16", duration_ms=40),
        control.Totals(packets_in=1, ports=4, sessions=2),
    ]  # fmt: skip
    for msg in msgs:
        assert control.decode(control.encode(msg)) == msg
    stream = b"".join(control.encode(m) for m in msgs)
    for cut in range(0, len(stream), 7):
        frames = control.Frames()
        bodies = frames.feed(stream[:cut]) + frames.feed(stream[cut:])
        assert [control.decode_body(b) for b in bodies] == msgs
    with pytest.raises(ValueError):
        control.Frames().feed((control.MAX_FRAME + 1).to_bytes(4, "big"))
    with pytest.raises(ValueError):
        control.decode(control.encode(msgs[1])[:-1])


async def test_srtp_to_plain_relay_stats_and_ports(start: Start) -> None:
    workers, events = await start()
    pa, pb = free_pairs(2)
    phone_a, phone_b = Phone(), Phone()
    ka_in, ka_out = key(), key()
    workers.send(
        0,
        Update(
            session="call-1",
            streams=(
                Stream(
                    index=0,
                    a=Party(
                        bind=HOST, port=pa, remote=phone_a.addr, recv_key=ka_in, send_key=ka_out
                    ),
                    b=Party(bind=HOST, port=pb, remote=phone_b.addr),
                ),
            ),
        ),
    )
    await until(lambda: all(is_bound(p) for p in (pa, pa + 1, pb, pb + 1)))

    a_send, a_recv = SrtpSender(ka_in), SrtpReceiver(ka_out)
    for seq in range(1, 6):
        phone_a.send(a_send.protect(rtp(seq)), pa)
        data, src = await phone_b.recv()
        assert (data, src) == (rtp(seq), (HOST, pb))  # plain, from B's relay port
    for seq in range(100, 103):
        phone_b.send(rtp(seq, ssrc=99), pb)
        data, src = await phone_a.recv()
        assert src == (HOST, pa)
        assert a_recv.unprotect(data) == rtp(seq, ssrc=99)
    # a stranger's plain packet on A's SRTP leg does not authenticate: dropped, not latched
    stranger = Phone()
    stranger.send(rtp(50), pa)
    phone_a.send(a_send.protect(rtp(6)), pa)  # the same socket: after the stranger's
    assert await phone_b.recv() == (rtp(6), (HOST, pb))

    workers.send(0, control.Delete(session="call-1"))
    await until(lambda: any(isinstance(e, control.Stats) for e in events))
    (stats,) = [e for e in events if isinstance(e, control.Stats)]
    a, b = stats.streams[0].a, stats.streams[0].b
    assert (a.packets_in, a.packets_out, b.packets_in, b.packets_out) == (6, 3, 3, 6)
    assert a.bytes_in == 6 * (172 + 10) and b.bytes_out == 6 * 172
    assert a.bytes_out == 3 * (172 + 10) and b.bytes_in == 3 * 172
    assert (a.latched, b.latched) == (phone_a.addr, phone_b.addr)
    assert (a.srtp_failures, a.lost, a.dropped_source) == (1, 0, 0)
    # the worker's periodic totals (the metrics) keep the ended session's counts
    await until(lambda: (t := workers.totals[0]) is not None and t.packets_in == 9, 6.0)
    totals = workers.totals[0]
    assert totals is not None
    assert (totals.packets_out, totals.srtp_failures, totals.sessions) == (9, 1, 0)
    assert workers.running(0)
    # the ports are closed: the test can bind them again
    await until(lambda: not any(is_bound(p) for p in (pa, pa + 1, pb, pb + 1)))
    for phone in (phone_a, phone_b, stranger):
        phone.sock.close()


async def test_a_silent_session_times_out(start: Start) -> None:
    workers, events = await start(timeout=0.5)
    pa, pb = free_pairs(2)
    workers.send(
        0,
        Update(
            session="quiet",
            streams=(
                Stream(
                    index=0,
                    a=Party(bind=HOST, port=pa, remote=(HOST, 9)),
                    b=Party(bind=HOST, port=pb, remote=(HOST, 9)),
                ),
            ),
        ),
    )
    await until(lambda: any(isinstance(e, control.Timeout) for e in events), timeout=3.0)
    (timeout,) = events
    assert isinstance(timeout, control.Timeout)
    assert timeout.session == "quiet" and timeout.idle >= 0.5
    workers.send(0, control.Delete(session="quiet"))
    await until(lambda: len(events) == 2)
    await until(lambda: not any(is_bound(p) for p in (pa, pa + 1, pb, pb + 1)))


async def test_a_port_in_use_is_logged_and_the_rest_works(start: Start) -> None:
    workers, events = await start(count=2)
    pa, pb, pc = free_pairs(3)
    blocker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    blocker.bind((HOST, pa + 1))  # A's RTCP port is taken by someone else
    phone_a, phone_b = Phone(), Phone()
    workers.send(
        1,
        Update(
            session="s",
            streams=(
                Stream(
                    index=0,
                    a=Party(bind=HOST, port=pa, remote=phone_a.addr),
                    b=Party(bind=HOST, port=pb, remote=phone_b.addr),
                ),
            ),
        ),
    )
    await until(lambda: all(is_bound(p) for p in (pa, pb, pb + 1)))
    phone_a.send(rtp(1), pa)
    assert await phone_b.recv() == (rtp(1), (HOST, pb))
    # the same session again with A moved: the worker closes and reopens ports in order
    workers.send(
        1,
        Update(
            session="s",
            streams=(
                Stream(
                    index=0,
                    a=Party(bind=HOST, port=pc, remote=phone_a.addr),
                    b=Party(bind=HOST, port=pb, remote=phone_b.addr),
                ),
            ),
        ),
    )
    await until(lambda: is_bound(pc) and not is_bound(pa))
    phone_a.send(rtp(2), pc)
    assert await phone_b.recv() == (rtp(2), (HOST, pb))
    workers.send(1, control.Delete(session="s"))
    await until(lambda: len(events) == 1)
    await until(lambda: not any(is_bound(p) for p in (pc, pc + 1, pb, pb + 1)))
    for s in (blocker, phone_a.sock, phone_b.sock):
        s.close()


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(
    not ipv6_loopback() and os.environ.get("CI") != "true",
    reason="no IPv6 loopback (under CI=true this fails instead)",
)
async def test_ipv6_ports(start: Start) -> None:
    assert ipv6_loopback(), "no IPv6 loopback (::1) on this machine"
    workers, events = await start()
    port = free_pairs(1)[0]  # an IPv4-free pair is very likely IPv6-free too
    phones = []
    for _ in range(2):
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        s.bind(("::1", 0))
        s.setblocking(False)
        phones.append(s)
    a_addr, b_addr = phones[0].getsockname()[:2], phones[1].getsockname()[:2]
    workers.send(
        0,
        Update(
            session="v6",
            streams=(
                Stream(
                    index=0,
                    a=Party(bind="::1", port=port, remote=a_addr),
                    b=Party(bind="::1", port=port + 2, remote=b_addr),
                ),
            ),
        ),
    )
    loop = asyncio.get_running_loop()
    for seq in range(1, 50):  # until the worker has bound the ports
        phones[0].sendto(rtp(seq), ("::1", port))
        try:
            data, src = await asyncio.wait_for(loop.sock_recvfrom(phones[1], 4096), 0.1)
        except TimeoutError:
            continue
        assert data == rtp(seq) and src[:2] == ("::1", port + 2)
        break
    else:
        raise AssertionError("nothing relayed over IPv6")
    workers.send(0, control.Delete(session="v6"))
    await until(lambda: len(events) == 1)
    stats = events[0]
    assert isinstance(stats, control.Stats) and stats.streams[0].a.latched == a_addr
    for s in phones:
        s.close()


async def test_dtmf_both_ways_through_a_real_worker(start: Start) -> None:
    """A has telephone-event, B not (PCMU both). A's events come back as
    one control.Dtmf; a SendDtmf to A arrives as RFC 4733 packets in A's stream."""
    workers, events = await start()
    pa, pb = free_pairs(2)
    phone_a, phone_b = Phone(), Phone()
    with_te = control.CodecSpec(name="PCMU", pt=0, clock=8000, dtmf_pt=101)
    without = control.CodecSpec(name="PCMU", pt=0, clock=8000)
    workers.send(0, Update(session="call-d", streams=(Stream(
        index=0,
        a=Party(bind=HOST, port=pa, remote=phone_a.addr, codec=with_te),
        b=Party(bind=HOST, port=pb, remote=phone_b.addr, codec=without),
    ),)))  # fmt: skip
    await until(lambda: all(is_bound(p) for p in (pa, pb)))
    phone_a.send(rtp(1), pa)
    data, _ = await phone_b.recv()
    assert data[12:] == rtp(1)[12:] and data[8:12] != rtp(1)[8:12]  # copied, the SBC's SSRC
    for n, (dur, end) in enumerate([(160, False), (640, True), (640, True), (640, True)]):
        ev = bytes([7, (0x80 if end else 0) | 10]) + dur.to_bytes(2, "big")
        phone_a.send(struct.pack("!BBHII", 0x80, 101, 2 + n, 320, 0x1234) + ev, pa)
    await until(lambda: any(isinstance(e, control.Dtmf) for e in events))
    assert [e for e in events if isinstance(e, control.Dtmf)] == [
        control.Dtmf(session="call-d", index=0, party="a", digit="7", duration_ms=80)
    ]
    phone_b.send(rtp(1, ssrc=77), pb)
    await phone_a.recv()
    workers.send(0, control.SendDtmf(session="call-d", index=0, party="a", digit="4",
                                     duration_ms=100))  # fmt: skip
    got = [await phone_a.recv() for _ in range(5)]  # updates at 0, 50 ms; the end x3
    payloads = [d[12:] for d, _ in got]
    assert {d[1] & 0x7F for d, _ in got} == {101}
    assert [p[0] for p in payloads] == [4] * 5 and [p[1] >> 7 for p in payloads] == [0, 0, 1, 1, 1]
    assert int.from_bytes(payloads[-1][2:4], "big") == 800
    workers.send(0, control.Delete(session="call-d"))
    await until(lambda: any(isinstance(e, control.Stats) for e in events))
    for phone in (phone_a, phone_b):
        phone.sock.close()


class _FakeControl:
    """The worker's control transport, in process: what it wrote, whether it is paused."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.paused = False
        self.pauses = 0

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        self.paused = True
        self.pauses += 1

    def resume_reading(self) -> None:
        self.paused = False


async def test_a_burst_of_commands_is_applied_in_order_a_batch_per_loop_turn() -> None:
    """Commands are applied ``CONTROL_BATCH`` per turn of the event loop (the ports are
    served in between), in order; a backlog longer than ``CONTROL_BACKLOG`` stops the
    reading of the control socket until the worker caught up."""
    from sbc.io import media_worker

    ours, theirs = socket.socketpair()
    worker = media_worker._Worker(ours, timeout=60.0, latch_window=5.0)
    worker._loop = asyncio.get_running_loop()
    fake = _FakeControl()
    proto = media_worker._Control(worker)
    proto.connection_made(fake)  # type: ignore[arg-type]
    count = media_worker.CONTROL_BACKLOG + 100
    stream = b"".join(control.encode(control.Delete(session=f"s{i}")) for i in range(count))
    proto.data_received(stream[:-3])  # the last frame is not whole yet
    assert fake.paused and fake.pauses == 1
    await asyncio.sleep(0)
    worker.flush()
    assert 0 < len(control.Frames().feed(bytes(fake.written))) < count
    proto.data_received(stream[-3:])
    await until(lambda: not fake.paused)
    await asyncio.sleep(0)
    worker.flush()
    events = [control.decode_body(b) for b in control.Frames().feed(bytes(fake.written))]
    assert [e.session for e in events if isinstance(e, control.Stats)] == [
        f"s{i}" for i in range(count)
    ]
    ours.close()
    theirs.close()
