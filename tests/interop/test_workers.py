"""Two signalling workers behind the same addresses ([sbc] workers = 2), with real peers.

The supervisor starts two ``sbc worker`` processes; both bind the access listeners with
SO_REUSEPORT, so the kernel hands each client (UDP source address and port, TCP connection)
to one of them; each has its own core port (the configured one plus its index). What the
tests check is that the two look like one SBC:

- SIPp REGISTERs from many source ports (``-t un``: a socket per registration) reach both
  workers, each at least a quarter (the supervisor's /metrics, per worker), every user lands
  at Kamailio with a Path naming one of the workers' core ports, and the refreshes are
  answered by the SBC (registration offload, whichever worker a refresh reaches);
- SIPp calls from many source ports through Kamailio all pass, and both workers carry calls;
- users registered over UDP, TCP and TLS to the embedded registrar, spread over the two
  workers, call each other: a call from one worker to a user whose flow is the other's (a
  TCP or TLS connection above all) is handed over between the workers;
- baresip over TLS with SRTP calls across the workers, audio both ways;
- kill -9 of one worker: the supervisor starts it again within a second (logged, counted),
  calls held by the other worker go on, and a user who registered through the dead one is
  still reachable.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from . import sipwire
from .conftest import (
    Certs,
    RegistrarFactory,
    SbcFactory,
    SbcProcess,
    SippRunner,
    backends_config,
    sbc_command,
    wait_until,
    write_users_csv,
)
from .phones import (  # noqa: F401 - phones and sox are fixtures
    ALICE_HZ,
    BOB_HZ,
    MediaPhone,
    PhoneFactory,
    account,
    assert_heard,
    phones,
    sox,
    srtp_suite,
    talk,
)
from .test_calls import LabFactory, lab_factory, scrape  # noqa: F401 - a fixture
from .test_reload import sbc_reload, status

pytestmark = pytest.mark.interop

WORKERS = 2
# SIPp -t un opens a socket per call; its default ceiling (50,000) is above the open files
# allowed here, which it refuses to start with.
MANY_PORTS = ("-max_socket", "1000")
# The benchmarks' caller and callee: built for many calls at once (the callee waits 10 ms
# between its 180 and 200 so that Kamailio's workers do not swap them; the caller holds
# the call for -d ms).
BENCH_SCENARIOS = Path(__file__).resolve().parents[2] / "bench" / "scenarios"
UAC = str(BENCH_SCENARIOS / "call_uac.xml")
UAS = str(BENCH_SCENARIOS / "call_uas.xml")
HOST = "127.0.0.1"
DOMAIN = "example.com"


def per_worker(sbc: SbcProcess, name: str) -> list[float]:
    """A per-worker family of the supervisor's /metrics, by worker index."""
    samples = scrape(sbc)
    return [samples.get((name, (("worker", str(i)),)), 0.0) for i in range(WORKERS)]


def registrations_per_worker(sbc: SbcProcess) -> list[int]:
    """The registrations each worker knows (the supervisor's /status)."""
    workers = status(sbc)["workers"]
    assert isinstance(workers, list)
    return [int(w["registrations"]) for w in workers]


def worker_pids(sbc: SbcProcess) -> list[int]:
    workers = status(sbc)["workers"]
    assert isinstance(workers, list)
    return [int(w["pid"]) for w in workers]


def test_registrations_from_many_ports_reach_both_workers(
    kamailio_registrars: RegistrarFactory,
    sbc_factory: SbcFactory,
    sipp: SippRunner,
    tmp_path: Path,
) -> None:
    (registrar,) = kamailio_registrars(1)
    sbc = sbc_factory(
        extra=backends_config(registrar.uri)
        + "\n[registration]\nbackend_expires = 3600\n\n[registration.client_expires]\nudp = 60\n",
        workers=WORKERS,
    )
    users = [f"user{i:04d}" for i in range(1, 201)]
    csv = write_users_csv(tmp_path / "users.csv", users)
    result = sipp(
        "register_offload.xml", sbc.host4, sbc.udp4, transport="un", calls=len(users),
        rate=100, extra=("-inf", str(csv), *MANY_PORTS), timeout=30.0,
    )  # fmt: skip
    result.assert_all_passed(len(users))

    # Each worker took at least a quarter of the REGISTERs (first ones and refreshes).
    counts = per_worker(sbc, "sbc_worker_register_requests_total")
    assert min(counts) >= sum(counts) / 4, counts
    # Every user is at Kamailio once, with a Path naming one of the two workers' core ports.
    bindings = registrar.bindings()
    assert sorted(bindings) == users
    core = sbc.extra_ports["core"]
    ports = {int(str(c[0]["path"]).rsplit(":", 1)[1].split(";")[0]) for c in bindings.values()}
    assert ports == {core, core + 1}, ports
    # The refreshes were answered by the SBC, by whichever worker they reached.
    samples = scrape(sbc)
    offloaded = samples[("sbc_register_requests_total", (("handling", "offloaded"),))]
    assert offloaded >= len(users) * 3, samples
    report = status(sbc)
    assert report["ready"] is True and len(report["workers"]) == WORKERS, report  # type: ignore[arg-type]


def test_calls_from_many_ports_through_both_workers(lab_factory: LabFactory) -> None:  # noqa: F811
    lab = lab_factory(workers=WORKERS)
    calls = 40
    port = lab.free_port()
    assert lab.register("bob", port).status == 200
    bob = lab.start("bob", UAS, port=port, calls=calls)
    alice = lab.start(
        "alice", UAC, service="bob", calls=calls, transport="un",
        extra=("-r", "10", *MANY_PORTS),
    )  # fmt: skip
    for sipp in (alice, bob):
        result = sipp.wait()
        assert result.returncode == 0, result.explain()
        assert result.count("SuccessfulCall(C)") == calls, result.explain()
    started = per_worker(lab.sbc, "sbc_worker_calls_started_total")
    # Each call is two B2BUA calls: the caller's leg where alice's port landed, bob's where
    # his registration did. Both workers carried calls.
    assert sum(started) == 2 * calls and min(started) >= calls / 4, started


# -- the embedded registrar: users of both workers call each other ------------------------
class RawUser:
    """A user agent on a socket of its own (UDP, TCP or TLS to the SBC's access port): it
    registers, and answers an INVITE with 200 and a BYE with 200."""

    def __init__(self, name: str, transport: str, sbc: SbcProcess, certs: Certs) -> None:
        self.name, self.transport = name, transport
        port = sbc.tls4 if transport == "tls" else sbc.udp4
        if transport == "udp":
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.sock.bind((HOST, 0))
            self.sock.connect((HOST, port))
        else:
            raw = socket.create_connection((HOST, port), timeout=5.0)
            if transport == "tls":
                ctx = ssl.create_default_context(cafile=str(certs.ca))
                raw = ctx.wrap_socket(raw, server_hostname="localhost")
            self.sock = raw
        self.sock.settimeout(5.0)
        self.local = self.sock.getsockname()[:2]
        self.reader = sipwire.StreamReader(self.sock) if transport != "udp" else None
        self.seq = 0

    def send(self, data: str) -> None:
        self.sock.sendall(data.encode())

    def receive(self, timeout: float = 5.0) -> str:
        self.sock.settimeout(timeout)
        if self.reader is not None:
            return self.reader.message(timeout).decode()
        return self.sock.recv(65535).decode()

    def request(self, method: str, uri: str, *, to: str, extra: list[str], body: str = "") -> str:
        self.seq += 1
        tr = self.transport.upper()
        lines = [
            f"{method} {uri} SIP/2.0",
            f"Via: SIP/2.0/{tr} {HOST}:{self.local[1]};branch=z9hG4bK{self.name}{self.seq}"
            f"{time.monotonic_ns()};rport",
            "Max-Forwards: 70",
            f"From: <sip:{self.name}@{DOMAIN}>;tag={self.name}tag",
            f"To: {to}",
            f"Call-ID: {self.name}-{method}-{self.seq}@test",
            f"CSeq: {self.seq} {method}",
            *extra,
            f"Content-Length: {len(body.encode())}",
        ]
        return "\r\n".join(lines) + "\r\n\r\n" + body

    def contact(self) -> str:
        t = "" if self.transport == "udp" else f";transport={self.transport}"
        return f"<sip:{self.name}@{HOST}:{self.local[1]}{t}>"

    def register(self) -> None:
        self.send(self.request("REGISTER", f"sip:{DOMAIN}", to=f"<sip:{self.name}@{DOMAIN}>",
                               extra=[f"Contact: {self.contact()}", "Expires: 600"]))  # fmt: skip
        answer = self.final()
        assert answer.startswith("SIP/2.0 200"), answer

    def final(self) -> str:
        while True:
            message = self.receive()
            if not message.startswith("SIP/2.0 1"):
                return message


SDP = (
    "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    "m=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
)


def _header(message: str, name: str) -> str:
    for line in message.split("\r\n"):
        if line.lower().startswith(name.lower() + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {name} in {message}")


def answer_call(callee: RawUser) -> str:
    """The INVITE ``callee`` receives, answered 200 with SDP; its Contact (the SBC's)."""
    invite = callee.receive()
    while invite.startswith("SIP/2.0"):
        invite = callee.receive()
    assert invite.startswith("INVITE "), invite
    heads = [f"{n}: {_header(invite, n)}" for n in ("Via", "From", "Call-ID", "CSeq")]
    to = _header(invite, "To") + ";tag=callee"
    body = SDP.format(port=40000)
    callee.send(
        "\r\n".join(["SIP/2.0 200 OK", *heads, f"To: {to}", f"Contact: {callee.contact()}",
                     "Content-Type: application/sdp", f"Content-Length: {len(body)}"])
        + "\r\n\r\n" + body
    )  # fmt: skip
    return invite


def call(caller: RawUser, callee: RawUser) -> None:
    """caller INVITEs callee through the SBC; callee answers; caller ACKs and hangs up."""
    body = SDP.format(port=40002)
    caller.send(caller.request(
        "INVITE", f"sip:{callee.name}@{DOMAIN}", to=f"<sip:{callee.name}@{DOMAIN}>",
        extra=[f"Contact: {caller.contact()}", "Content-Type: application/sdp"], body=body,
    ))  # fmt: skip
    try:
        answer_call(callee)
    except TimeoutError:
        pytest.fail(
            f"{caller.name} -> {callee.name}: no INVITE; the caller got {caller.receive()!r}"
        )
    ok = caller.final()
    assert ok.startswith("SIP/2.0 200"), ok
    # ACK and BYE within the dialog, to the SBC's Contact (the call's worker marks it).
    target = _header(ok, "Contact").strip("<>").split(">")[0]
    to = _header(ok, "To")
    cseq = caller.seq
    for method, seq in (("ACK", cseq), ("BYE", cseq + 1)):
        lines = caller.request(method, target, to=to, extra=[]).split("\r\n")
        lines = [
            f"Call-ID: {caller.name}-INVITE-{cseq}@test" if line.startswith("Call-ID:")
            else f"CSeq: {seq} {method}" if line.startswith("CSeq:") else line
            for line in lines
        ]  # fmt: skip
        caller.send("\r\n".join(lines))
    bye = callee.receive()
    while not bye.startswith("BYE "):
        bye = callee.receive()
    heads = [f"{n}: {_header(bye, n)}" for n in ("Via", "From", "To", "Call-ID", "CSeq")]
    callee.send("\r\n".join(["SIP/2.0 200 OK", *heads, "Content-Length: 0"]) + "\r\n\r\n")
    done = caller.final()
    assert done.startswith("SIP/2.0 200"), done


def test_users_over_udp_tcp_tls_on_both_workers_call_each_other(
    sbc_factory: SbcFactory, certs: Certs
) -> None:
    sbc = sbc_factory(workers=WORKERS)  # no backend: the embedded registrar
    users = []
    # Connections and source ports land on either worker; register until each transport
    # has a user on each worker (the supervisor's /status tells which worker has whom).
    for transport in ("udp", "tcp", "tls"):
        placed: dict[int, RawUser] = {}
        for attempt in range(16):
            known = registrations_per_worker(sbc)
            counted = per_worker(sbc, "sbc_worker_register_requests_total")
            user = RawUser(f"{transport}{attempt}", transport, sbc, certs)
            user.register()
            # Every worker knows every binding (shared): the count grows in both.
            expected = [known[0] + 1] * WORKERS
            wait_until(
                "the binding in both workers",
                lambda expected=expected: registrations_per_worker(sbc) == expected,  # type: ignore[misc]
                2.0,
                lambda expected=expected: f"expected {expected}: {status(sbc)}",  # type: ignore[misc]
            )
            # The worker that took the REGISTER counted it.
            grew = [
                b - a
                for a, b in zip(
                    counted, per_worker(sbc, "sbc_worker_register_requests_total"), strict=True
                )
            ]
            worker = grew.index(1.0)
            placed.setdefault(worker, user)
            if len(placed) == WORKERS:
                break
        assert len(placed) == WORKERS, f"{transport}: all users on one worker"
        users += [placed[0], placed[1]]
    # Every user calls every user of another transport on the other worker.
    for caller in users:
        for callee in users:
            if caller.transport != callee.transport:
                call(caller, callee)
    samples = scrape(sbc)
    assert samples[("sbc_calls_active", ())] == 0


def test_baresip_tls_srtp_call_across_workers(
    sbc_factory: SbcFactory,
    phones: PhoneFactory,  # noqa: F811 - the fixture imported above
    certs: Certs,
    sox: str,  # noqa: F811 - the fixture imported above
) -> None:
    sbc = sbc_factory(media='access_srtp = "mandatory"', workers=WORKERS)
    proxy = f"127.0.0.1:{sbc.tls4}"

    def registered(name: str, user: str, hz: float, *, answer: bool) -> tuple[MediaPhone, int]:
        """A phone registered over TLS, and the worker that holds its connection."""
        before = per_worker(sbc, "sbc_worker_register_requests_total")
        phone = phones(name, hz=hz, cafile=certs.ca)
        phone.command("uanew", account(user, proxy, "tls", srtp=True, answer=answer))
        phone.wait_event("REGISTER_OK")
        grew: list[float] = []

        def counted() -> bool:
            # Both workers answered the supervisor's scrape, and one counted the REGISTER.
            nonlocal grew
            after = per_worker(sbc, "sbc_worker_register_requests_total")
            grew = [b - a for a, b in zip(before, after, strict=True)]
            return per_worker(sbc, "sbc_worker_up") == [1.0] * WORKERS and max(grew) >= 1

        wait_until(f"{name}'s REGISTER counted", counted, 5.0, lambda: str(scrape(sbc)))
        print(f"{name}: REGISTERs per worker grew {grew}")
        return phone, grew.index(max(grew))

    alice, alice_worker = registered("alice", "alice", ALICE_HZ, answer=False)
    # bob's connection must land on the other worker: the kernel picks by its source port,
    # so a new phone (a new connection) until it does (1 in 2 each time; all 16 on alice's
    # worker: 1 run in 65,000).
    for attempt in range(16):
        bob, bob_worker = registered(f"bob{attempt}", "bob", BOB_HZ, answer=True)
        if bob_worker != alice_worker:
            break
        assert bob.stop() is None
    assert bob_worker != alice_worker, "every connection of bob landed on alice's worker"
    talk(alice, bob)
    assert srtp_suite(alice) and srtp_suite(bob)
    assert_heard(sox, bob, ALICE_HZ)
    assert_heard(sox, alice, BOB_HZ)
    # The call went through the hand-over between the two workers.
    samples = scrape(sbc)
    assert samples.get(("sbc_sip_events_total", (("event", "handed_over"),)), 0) > 0, samples


def test_kill_one_worker(lab_factory: LabFactory) -> None:  # noqa: F811 - a fixture
    lab = lab_factory(workers=WORKERS)
    sbc = lab.sbc
    held, after = 10, 8  # long calls across the kill; short calls after it
    before = per_worker(sbc, "sbc_worker_register_requests_total")
    port = lab.free_port()
    assert lab.register("bob", port).status == 200
    now = per_worker(sbc, "sbc_worker_register_requests_total")
    grew = [b - a for a, b in zip(before, now, strict=True)]
    bob_worker = grew.index(max(grew))  # bob's Path names it: his legs are its
    victim = 1 - bob_worker
    lab.start("bob", UAS, port=port, calls=held + after)
    alice = lab.start(
        "alice", UAC, service="bob", calls=held, transport="un",
        extra=("-d", "6000", "-r", "50", *MANY_PORTS),
    )  # fmt: skip
    wait_until(
        "every call up",
        lambda: scrape(sbc).get(("sbc_calls_active", ()), 0) == 2 * held,
        10.0,
        lambda: str(scrape(sbc)),
    )
    active = per_worker(sbc, "sbc_worker_calls_active")
    survivors = int(active[bob_worker]) - held  # callers' legs on bob's worker
    pids = worker_pids(sbc)
    os.kill(pids[victim], signal.SIGKILL)
    killed = time.monotonic()
    wait_until(
        f"worker {victim} restarted",
        lambda: (
            worker_pids(sbc)[victim] != pids[victim]
            and per_worker(sbc, "sbc_worker_up")[victim] == 1
        ),
        5.0,
        sbc.log,
    )
    back = time.monotonic() - killed
    print(f"worker {victim} back after {back:.2f} s; {survivors} of {held} calls on the other")
    assert f"worker {victim} (pid {pids[victim]}) ended (signal 9); restarting it" in sbc.log()
    restarts = per_worker(sbc, "sbc_worker_restarts_total")
    assert restarts[victim] == 1 and restarts[bob_worker] == 0, restarts
    # The calls whose every leg the other worker held went on to their BYE; those of the
    # killed worker were lost with it.
    result = alice.wait()
    assert result.count("SuccessfulCall(C)") == survivors, result.explain()
    assert worker_pids(sbc)[bob_worker] == pids[bob_worker]  # the other never stopped
    # After the restart: calls from many source ports reach both workers, bob still known.
    short = lab.start(
        "alice-after", UAC, service="bob", calls=after, transport="un",
        extra=("-r", "20", *MANY_PORTS),
    )  # fmt: skip
    result = short.wait()
    assert result.returncode == 0 and result.count("SuccessfulCall(C)") == after, result.explain()
    assert per_worker(sbc, "sbc_worker_calls_started_total")[victim] > 0


def test_status_reload_and_shutdown_cover_every_worker(sbc_factory: SbcFactory) -> None:
    sbc = sbc_factory(workers=WORKERS, extra="\n[calls]\nmax_calls = 100\n")
    shown = subprocess.run(
        [*sbc_command(), "status", "--admin", f"{HOST}:{sbc.extra_ports['admin']}"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert "workers: 2, restarted 0 time(s)" in shown.stdout, shown.stdout
    assert shown.stdout.count("  worker ") == WORKERS, shown.stdout
    # sbc reload: the supervisor passes SIGHUP on; done once both workers took it.
    original = sbc.config.read_text()
    sbc.config.write_text(original.replace("max_calls = 100", "max_calls = 50"))
    done = sbc_reload(sbc.config, sbc)
    assert done.returncode == 0, done.stdout + done.stderr
    log = sbc.log()
    assert "config reloaded sbc=interop worker=0" in log and "worker=1" in log, log
    # A change that needs a restart is refused by the workers, with the reason.
    sbc.config.write_text(original.replace('name = "interop"', 'name = "renamed"'))
    refused = sbc_reload(sbc.config, sbc)
    assert refused.returncode == 1 and "sbc changed: needs a restart" in refused.stderr, (
        refused.stderr
    )
    sbc.config.write_text(original)
    # SIGTERM (the fixture's teardown): every worker stops, the supervisor exits 0.
