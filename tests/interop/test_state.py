"""``[state] url``: the SBC's state in a real Redis (Debian's redis-server 7.0).

With ``[state] url`` the SBC writes through to Redis the embedded registrar's bindings
(``<prefix>aor:<aor>``), the relayed registrations of the registration offload
(``<prefix>reg:...``), the bans and the secret of its flow tokens, reads them back at start
before it binds a listener, shares them live with every instance on the same Redis and
prefix, and keeps serving from memory while Redis is away. What these tests prove, with the
real ``sbc run`` killed -9 (a crash: nothing written on the way out):

- two baresips registered before a crash are called after it (call set up, audio both
  ways) without registering again;
- 1,000 SIPp registrations are all back after a crash;
- a relayed registration survives a crash: the client's refresh is answered by the SBC
  itself (the backend sees nothing) and the backend still reaches the client through the
  Path it holds (its flow token, keyed by the secret kept in Redis);
- Redis killed and started again empty under a steady REGISTER load: no REGISTER fails,
  /readyz says degraded meanwhile, and Redis ends with every registration;
- SIGTERM while a write to Redis is under way stops the SBC as without [state];
- two SBCs on one Redis: one learns the other's binding live, and takes over its phone's
  calls when the other is killed;
- a call through an SBC killed -9 mid-call: the restarted SBC relays its RTP again within
  2 s (the same ports, the same keys), and either phone's hang-up ends it through the
  restored dialogs;
- a bad ``[state] url`` is refused before anything starts;
- an SBC whose Redis is not there yet starts degraded, and once Redis comes it says so,
  writes what it served, and keeps the secret of the flow tokens it handed out there.

Each Redis is the test's own (a free loopback port, its own dir, nothing saved), stopped
by its PID at teardown.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import re
import secrets
import signal
import socket
import subprocess
import time
import urllib.error
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from redis import Redis
from redis.exceptions import RedisError

from sbc.io.media_worker import TOTALS_INTERVAL
from sbc.io.state_store import HEARTBEAT

from . import sipwire
from .conftest import (
    TCP,
    PortPool,
    Registrar,
    RegistrarFactory,
    SbcFactory,
    SbcProcess,
    SippRunner,
    backends_config,
    register_udp,
    require,
    wait_until,
    write_users_csv,
)
from .phones import (  # noqa: F401 - phones and sox are fixtures
    ALICE_HZ,
    BOB_HZ,
    CALL_TIMEOUT,
    MEDIA_SECONDS,
    MediaPhone,
    PhoneFactory,
    account,
    assert_heard,
    phones,
    sox,
)
from .test_calls import admin_get, scrape
from .test_cli_errors import problem_lines
from .test_cli_errors import sbc as run_sbc
from .test_reload import status

HOST = "127.0.0.1"
DOMAIN = "example.com"
PREFIX = "sbc-test:"  # not the default: every key must carry the configured prefix
REDIS_START_TIMEOUT = 5.0
REDIS_STOP_TIMEOUT = 5.0
STOP_WAIT = 6.0  # what the fixture gives an SBC after SIGTERM (1 s, then 5 s after another)
# Loopback only, nothing saved (no RDB, no AOF), in the foreground, its log on stdout.
REDIS_OPTIONS = ("--bind", HOST, "--save", "", "--appendonly", "no", "--daemonize", "no",
                 "--logfile", "")  # fmt: skip


# -- Redis ------------------------------------------------------------------------------------
@dataclass
class RedisServer:
    """One redis-server on 127.0.0.1:``port``, nothing saved (``--save ""``, no AOF), in the
    foreground; ``start()`` again after ``kill()`` brings it back, empty, on the same port."""

    binary: str
    port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.workdir / "redis.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def client(self) -> Redis:
        return Redis(host=HOST, port=self.port, socket_timeout=2.0, socket_connect_timeout=2.0)

    def start(self) -> None:
        """Start it and wait until it answers PING; fails the test (with its log) if not."""
        assert self.proc is None or self.proc.poll() is not None, "redis-server already runs"
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"=== start {self.starts}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--dir", str(self.workdir), *REDIS_OPTIONS],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + REDIS_START_TIMEOUT
        with contextlib.closing(self.client()) as client:
            while True:
                if self.proc.poll() is not None:
                    pytest.fail(f"redis-server exited with {self.proc.returncode}:\n{self.log()}")
                try:
                    if client.ping():
                        return
                except (RedisError, OSError):
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    pytest.fail(f"redis-server not up in {REDIS_START_TIMEOUT} s:\n{self.log()}")
                time.sleep(0.02)

    def kill(self) -> None:
        """kill -9 by its PID: everything it held is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=REDIS_STOP_TIMEOUT)

    def stop(self) -> None:
        """SIGTERM by its PID, wait; SIGKILL if it stays."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=REDIS_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()

    def keys(self, kind: str) -> list[str]:
        """The keys of one kind (``aor:``, ``reg:``, ``ban:``) under PREFIX, without it."""
        with contextlib.closing(self.client()) as client:
            found = client.scan_iter(f"{PREFIX}{kind}*", count=1000)
            return sorted(k.decode().removeprefix(PREFIX) for k in found)

    def get(self, key: str) -> bytes | None:
        with contextlib.closing(self.client()) as client:
            value = client.get(PREFIX + key)
            assert value is None or isinstance(value, bytes)
            return value


@pytest.fixture
def redis_idle(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server not started yet: its port is chosen (free now, nothing listens on
    it) and ``start()`` starts it there. Stopped by its PID at teardown."""
    binary = require("redis-server")
    pool = PortPool()
    port = pool.port(HOST, TCP)
    pool.release()
    workdir = tmp_path / "redis"
    workdir.mkdir()
    server = RedisServer(binary, port, workdir)
    try:
        yield server
    finally:
        server.stop()
        print(f"--- redis-server ({server.log_path}) ---\n{server.log()[-3000:]}")


@pytest.fixture
def redis(redis_idle: RedisServer) -> RedisServer:
    """A running redis-server of the test's own (see ``RedisServer``)."""
    redis_idle.start()
    return redis_idle


def state_config(server: RedisServer, prefix: str = PREFIX) -> str:
    return f'\n[state]\nurl = "{server.url}"\nkey_prefix = "{prefix}"\n'


# -- the SBC's side ------------------------------------------------------------------------------


def readyz(sbc: SbcProcess) -> tuple[int, str]:
    """/readyz: status and reason (a 503 is an answer too)."""
    try:
        return admin_get(sbc, "/readyz")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def local_registrations(sbc: SbcProcess) -> int:
    registrations = status(sbc)["registrations"]
    assert isinstance(registrations, dict), registrations
    return int(registrations["local"])


def wait_for_local(sbc: SbcProcess, count: int, timeout: float) -> None:
    wait_until(
        f"{count} local registrations",
        lambda: local_registrations(sbc) == count,
        timeout,
        lambda: json.dumps(status(sbc), indent=1),
    )


def state_status(sbc: SbcProcess) -> dict[str, object]:
    state = status(sbc)["state"]
    assert isinstance(state, dict), f"no state in /status: {status(sbc)}"
    return state


def metric(sbc: SbcProcess, name: str, **labels: str) -> float:
    return scrape(sbc)[(name, tuple(sorted(labels.items())))]


def loaded_line(sbc: SbcProcess) -> str:
    """The "state loaded" line of the running process's log (what it read from Redis before
    it bound its listeners: "N registrations, M AORs with bindings, K bans")."""
    match = re.search(r"state loaded: .*$", sbc.log(), re.M)
    assert match, f"no 'state loaded' line:\n{sbc.log()}"
    return match.group(0)


def call(caller: MediaPhone, callee: MediaPhone, seconds: float = MEDIA_SECONDS) -> None:
    """``caller`` calls ``callee`` (who answers by himself), they talk ``seconds``, the
    caller hangs up."""
    caller.command("dial", f"sip:{callee.name}@{DOMAIN}")
    caller.wait_event("CALL_ESTABLISHED", timeout=CALL_TIMEOUT)
    callee.wait_event("CALL_ESTABLISHED", timeout=CALL_TIMEOUT)
    time.sleep(seconds)
    caller.command("hangup")
    caller.wait_event("CALL_CLOSED", timeout=CALL_TIMEOUT)
    callee.wait_event("CALL_CLOSED", timeout=CALL_TIMEOUT)


def register(phone: MediaPhone, sbc: SbcProcess, *, answer: bool) -> None:
    phone.command("uanew", account(phone.name, f"{HOST}:{sbc.udp4}", "udp", answer=answer))
    phone.wait_event("REGISTER_OK")


# -- a crash with phones registered ------------------------------------------------------------
def test_phones_registered_before_a_crash_are_called_after_it(
    redis: RedisServer,
    sbc_factory: SbcFactory,
    phones: PhoneFactory,  # noqa: F811 - the fixture imported above
    sox: str,  # noqa: F811 - the fixture imported above
) -> None:
    """alice and bob (baresip, UDP) register with the embedded registrar; the SBC is killed
    -9 and started again on the same config. The new process has both bindings from Redis
    before its first packet, and bob's call to alice is set up with audio both ways while
    neither phone registered again (baresip refreshes after 90 % of the 60 s granted)."""
    sbc = sbc_factory(extra=state_config(redis))
    alice = phones("alice", hz=ALICE_HZ)
    bob = phones("bob", hz=BOB_HZ)
    register(alice, sbc, answer=True)
    register(bob, sbc, answer=False)
    wanted = [f"aor:sip:{name}@{DOMAIN}" for name in ("alice", "bob")]
    wait_until(
        "both bindings in Redis",
        lambda: redis.keys("aor:") == wanted,
        3.0,
        lambda: f"{redis.keys('')}\n{sbc.log()[-3000:]}",
    )
    sent = {phone.name: len(phone.sent_registers()) for phone in (alice, bob)}

    sbc.restart()
    assert loaded_line(sbc).startswith(
        "state loaded: 0 registrations, 2 AORs with bindings, 0 bans"
    )
    assert local_registrations(sbc) == 2, status(sbc)
    call(bob, alice)
    assert_heard(sox, alice, BOB_HZ)
    assert_heard(sox, bob, ALICE_HZ)
    # No REGISTER in between: not sent by the phones, not handled by the new process.
    assert {phone.name: len(phone.sent_registers()) for phone in (alice, bob)} == sent
    assert metric(sbc, "sbc_register_requests_total", handling="local") == 0
    # alice was reached at her old flow: from the SBC's access port (the same after the
    # restart) to her own address, with no REGISTER of hers to the new process.
    (invite,) = alice.trace("INVITE sip:")
    assert invite.startswith(f"UDP {HOST}:{sbc.udp4} -> "), invite.split("\n", 1)[0]


# -- 1,000 registrations through a crash ----------------------------------------------------------
THOUSAND = [f"user{i:04d}" for i in range(1000)]


def test_a_thousand_registrations_survive_a_crash(
    redis: RedisServer, sbc_factory: SbcFactory, sipp: SippRunner, tmp_path: Path
) -> None:
    """SIPp registers 1,000 users with the embedded registrar; each is in Redis once it is
    answered; after kill -9 and a start on the same config the new process holds all 1,000
    (read back from Redis at start) and answers a query for one with its binding."""
    sbc = sbc_factory(extra=state_config(redis))
    csv = write_users_csv(tmp_path / "users.csv", THOUSAND)
    result = sipp(
        "register_honest.xml",
        sbc.host4,
        sbc.udp4,
        calls=len(THOUSAND),
        rate=500,
        extra=("-inf", str(csv)),
        timeout=20.0,
    )
    result.assert_all_passed(len(THOUSAND))
    wanted = sorted(f"aor:sip:{user}@{DOMAIN}" for user in THOUSAND)
    wait_until(
        "1,000 aor: keys in Redis",
        lambda: redis.keys("aor:") == wanted,
        5.0,
        lambda: f"{len(redis.keys('aor:'))} keys\n{status(sbc)}",
    )

    sbc.restart()
    assert loaded_line(sbc).startswith(
        "state loaded: 0 registrations, 1000 AORs with bindings, 0 bans"
    )
    assert local_registrations(sbc) == len(THOUSAND), status(sbc)
    assert state_status(sbc)["loaded"] == len(THOUSAND), state_status(sbc)
    assert redis.keys("aor:") == wanted
    # The binding itself came back, not only a count: a query (REGISTER without Contact,
    # RFC 3261 10.3 step 8) lists the Contact SIPp registered, with the time it has left.
    query = query_bindings(sbc, THOUSAND[500])
    assert query.status == 200, query
    contact = query.get("contact") or ""
    assert re.fullmatch(rf"<sip:{THOUSAND[500]}@{HOST}:\d+>;expires=\d+", contact), contact
    assert 50 <= int(contact.rpartition("=")[2]) <= 60, contact
    writes_settled(sbc)  # the query's own write: no SIGTERM in the middle of it


def register_request(
    local: str, user: str, *, call_id: str, cseq: int = 1, contact: bool = True
) -> bytes:
    """A REGISTER for ``user`` sent from ``local`` (host:port), its Contact that address and
    expires 600; without ``contact``, a query (no Contact: the bindings are listed)."""
    lines = [
        f"REGISTER sip:{DOMAIN} SIP/2.0",
        f"Via: SIP/2.0/UDP {local};branch=z9hG4bK{secrets.token_hex(6)};rport",
        "Max-Forwards: 70",
        f"From: <sip:{user}@{DOMAIN}>;tag={user}-tag",
        f"To: <sip:{user}@{DOMAIN}>",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} REGISTER",
        *([f"Contact: <sip:{user}@{local}>", "Expires: 600"] if contact else []),
        "Content-Length: 0",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def query_bindings(sbc: SbcProcess, user: str) -> sipwire.Response:
    with sipwire.udp_socket(HOST) as sock:
        local = sipwire.hostport(*sock.getsockname()[:2])
        data = register_request(local, user, call_id=f"{secrets.token_hex(6)}@query", contact=False)
        return sipwire.udp_exchange(sock, (HOST, sbc.udp4), data, 2.0)


def writes_settled(sbc: SbcProcess) -> None:
    """Until no write to Redis is pending or in flight (the count of writes done stays the
    same for 0.3 s): the test then ends with none under way (see
    test_sigterm_stops_an_sbc_that_is_writing_to_redis)."""
    deadline = time.monotonic() + 5.0
    last = state_status(sbc)
    while True:
        time.sleep(0.3)
        now = state_status(sbc)
        if now["writes"] == last["writes"] and now["pending"] == 0:
            return
        assert time.monotonic() < deadline, f"state writes still going: {now}"
        last = now


# -- registration offload through a crash ----------------------------------------------------------
def register_from(
    sock: socket.socket, sbc: SbcProcess, user: str, call_id: str, cseq: int
) -> sipwire.Response:
    """A REGISTER for ``user`` from ``sock`` (its Contact: the socket's address), expires
    600; the final response."""
    local = sipwire.hostport(*sock.getsockname()[:2])
    sock.settimeout(3.0)
    sock.sendto(register_request(local, user, call_id=call_id, cseq=cseq), (HOST, sbc.udp4))
    while True:  # a relayed REGISTER may get a 100 Trying first
        response = sipwire.parse_response(sock.recv(65535))
        if response.status >= 200:
            return response


def test_a_relayed_registration_survives_a_crash(
    redis: RedisServer, sbc_factory: SbcFactory, kamailio_registrars: RegistrarFactory
) -> None:
    """carol registers through the SBC to Kamailio (registration offload); the SBC is
    killed -9 and started again. Her refresh (same Call-ID, next CSeq, same Contact, from
    the same socket) is answered by the new process from the record it read back from
    Redis: Kamailio sees no REGISTER. A MESSAGE sent to Kamailio for carol still reaches
    her: Kamailio follows the Path it stored before the crash, whose flow token the new
    process can read (the token key is the secret kept in Redis)."""
    (registrar,) = kamailio_registrars(1)
    sbc = sbc_factory(
        extra=backends_config(registrar.uri)
        + "\n[registration]\nbackend_expires = 3600\n\n[registration.client_expires]\nudp = 60\n"
        + state_config(redis)
    )
    before = registrar.stat("core:rcv_requests_register")
    with sipwire.udp_socket(HOST) as carol, sipwire.udp_socket(HOST) as sender:
        call_id = f"{secrets.token_hex(8)}@carol"
        first = register_from(carol, sbc, "carol", call_id, 1)
        assert first.status == 200, first
        assert registrar.stat("core:rcv_requests_register") == before + 1
        assert "carol" in registrar.aors()
        wait_until(
            "carol's record in Redis",
            lambda: len(redis.keys("reg:")) == 1,
            3.0,
            lambda: str(redis.keys("")),
        )
        (key,) = redis.keys("reg:")
        assert key.startswith(f"reg:sip:carol@{DOMAIN}|{call_id}|udp|"), key
        assert redis.get("secret") is not None

        sbc.restart()
        assert loaded_line(sbc).startswith(
            "state loaded: 1 registrations, 0 AORs with bindings, 0 bans"
        )
        registrations = status(sbc)["registrations"]
        assert registrations == {"relayed": 1, "local": 0}, registrations
        refresh = register_from(carol, sbc, "carol", call_id, 2)
        assert refresh.status == 200, refresh
        assert re.search(r";expires=60\b", refresh.get("contact") or ""), refresh
        assert metric(sbc, "sbc_register_requests_total", handling="offloaded") == 1
        assert metric(sbc, "sbc_register_requests_total", handling="forwarded") == 0
        assert registrar.stat("core:rcv_requests_register") == before + 1  # not relayed

        # Kamailio -> SBC (the Path's flow token) -> carol's socket.
        data, source = message_through_path(registrar, sender, carol, sbc.log)
        assert source == (HOST, sbc.udp4), source
        assert data.endswith(b"still there?"), data[-100:]


def message_through_path(
    registrar: Registrar,
    sender: socket.socket,
    carol: socket.socket,
    explain: Callable[[], str],
) -> tuple[bytes, tuple[str, int]]:
    """A MESSAGE for carol sent to Kamailio, which sends it along the Path it holds (the
    SBC's flow token): what carol's socket gets, and from where."""
    message = sipwire.request(
        target=f"carol@{DOMAIN}",
        transport="udp",
        local=sender.getsockname()[:2],
        method="MESSAGE",
        extra=(("Content-Type", "text/plain"),),
        body=b"still there?",
    )
    sender.sendto(message, (registrar.host, registrar.port))
    carol.settimeout(3.0)
    try:
        data, source = carol.recvfrom(65535)
    except TimeoutError:
        pytest.fail(f"the MESSAGE along Kamailio's Path did not reach carol\n{explain()}")
    assert data.startswith(b"MESSAGE sip:carol@"), data[:100]
    return data, source


# -- Redis killed under load ---------------------------------------------------------------------
def test_redis_killed_and_back_empty_under_a_register_load(
    redis: RedisServer, sbc_factory: SbcFactory, sipp: SippRunner, tmp_path: Path
) -> None:
    """SIPp registers 1,000 users at 100/s; Redis is killed -9 after 3 s and started again,
    empty, 3 s later. Every REGISTER is answered 200 at once (SIPp: no failure, no
    retransmission), /readyz answers 200 "degraded" while Redis is away, and once it is
    back the SBC writes everything again: Redis ends with all 1,000 bindings."""
    sbc = sbc_factory(extra=state_config(redis))
    csv = write_users_csv(tmp_path / "users.csv", THOUSAND)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        start = time.monotonic()
        running = pool.submit(
            sipp,
            "register_honest.xml",
            sbc.host4,
            sbc.udp4,
            calls=len(THOUSAND),
            rate=100,
            extra=("-inf", str(csv)),
            timeout=30.0,
        )
        time.sleep(3.0)
        redis.kill()
        took = wait_until(
            "/readyz degraded",
            lambda: readyz(sbc)[1].startswith("degraded"),
            3.0,
            lambda: f"{readyz(sbc)}\n{sbc.log()[-3000:]}",
        )
        print(f"degraded {took:.2f} s after the kill")
        code, reason = readyz(sbc)
        assert code == 200, (code, reason)
        assert metric(sbc, "sbc_state_up") == 0
        assert state_status(sbc)["up"] is False
        registered_while_down = local_registrations(sbc)
        time.sleep(max(0.0, start + 6.0 - time.monotonic()))
        assert not running.done(), "SIPp finished before Redis came back: too fast a load"
        assert metric(sbc, "sbc_state_pending") > 0  # what changed meanwhile waits
        redis.start()  # empty: nothing was saved
        result = running.result(timeout=40)
    result.assert_all_passed(len(THOUSAND))
    # Answered at once: an event loop waiting on a dead Redis (2 s timeouts) would make SIPp
    # retransmit hundreds of REGISTERs (timer E, 500 ms); a few are left to a busy machine.
    assert result.count("Retransmissions(C)") <= 10, result.explain()
    assert local_registrations(sbc) > registered_while_down
    wanted = sorted(f"aor:sip:{user}@{DOMAIN}" for user in THOUSAND)
    wait_until(
        "1,000 aor: keys in Redis",
        lambda: redis.keys("aor:") == wanted,
        5.0,
        lambda: f"{len(redis.keys('aor:'))} keys\n{state_status(sbc)}",
    )
    assert metric(sbc, "sbc_state_errors_total") > 0
    assert metric(sbc, "sbc_state_up") == 1
    assert metric(sbc, "sbc_state_pending") == 0
    assert readyz(sbc) == (200, "ready (embedded registrar, no backends)\n")
    log = sbc.log()
    assert "state store unreachable" in log and "state store reachable again" in log, log
    assert redis.get("secret") is not None  # written back too


# -- two SBCs on one Redis -----------------------------------------------------------------------
def test_a_second_sbc_takes_over_the_calls_of_a_killed_one(
    redis: RedisServer,
    sbc_factory: SbcFactory,
    phones: PhoneFactory,  # noqa: F811 - the fixture imported above
    sox: str,  # noqa: F811 - the fixture imported above
) -> None:
    """SBC A and SBC B (both on 127.0.0.1, their own ports) share one Redis and prefix.
    alice registers with A, bob with B; each learns the other's binding live (pub/sub). A
    is killed -9; bob calls alice through B, which reaches her from its own access socket
    (her flow was A's socket), and they hear each other."""
    sbc_a = sbc_factory(extra=state_config(redis))
    sbc_b = sbc_factory(extra=state_config(redis))
    alice = phones("alice", hz=ALICE_HZ)
    bob = phones("bob", hz=BOB_HZ)
    register(alice, sbc_a, answer=True)
    register(bob, sbc_b, answer=False)
    wait_for_local(sbc_a, 2, 3.0)
    wait_for_local(sbc_b, 2, 3.0)
    assert state_status(sbc_b)["received"], state_status(sbc_b)

    sbc_a.kill()
    time.sleep(3 * HEARTBEAT + 0.5)  # A unheard of that long: dead for B (else B sends via A)
    call(bob, alice)
    assert_heard(sox, alice, BOB_HZ)
    assert_heard(sox, bob, ALICE_HZ)
    (invite,) = alice.trace("INVITE sip:")
    assert invite.startswith(f"UDP {HOST}:{sbc_b.udp4} -> "), invite.split("\n", 1)[0]
    assert len(alice.sent_registers()) == 1, alice.explain()  # she never registered with B
    # A comes back with both bindings (from Redis), and alice's un-REGISTER at the end of the
    # test (baresip's quit, through A) gets its answer.
    sbc_a.restart()
    assert loaded_line(sbc_a).startswith("state loaded: 0 registrations, 2 AORs with bindings")


def test_a_call_to_a_user_of_a_live_sbc_goes_through_it(
    redis: RedisServer,
    sbc_factory: SbcFactory,
    phones: PhoneFactory,  # noqa: F811 - the fixture imported above
    sox: str,  # noqa: F811 - the fixture imported above
) -> None:
    """alice registers with SBC A over TCP (a connection only A holds), bob with SBC B; both
    share one Redis. bob calls alice through B: B finds her binding, sees from A's
    heartbeats that A lives and listens where her flow is, and sends the INVITE to A, which
    sends it down her connection: they talk. Once A is killed (and unheard of for three
    heartbeats), her connection is gone with it: B answers a new call 480."""
    sbc_a = sbc_factory(extra=state_config(redis))
    sbc_b = sbc_factory(extra=state_config(redis))
    alice = phones("alice", hz=ALICE_HZ)
    bob = phones("bob", hz=BOB_HZ)
    alice.command("uanew", account("alice", f"{HOST}:{sbc_a.udp4}", "tcp", answer=True))
    alice.wait_event("REGISTER_OK")
    register(bob, sbc_b, answer=False)
    wait_for_local(sbc_b, 2, 3.0)
    wait_until(
        "A's heartbeat at B", lambda: state_status(sbc_b)["received"], 8.0,
        lambda: str(state_status(sbc_b)),
    )  # fmt: skip
    time.sleep(HEARTBEAT + 0.5)  # A's listeners are in its heartbeats (each HEARTBEAT s)
    call(bob, alice)
    assert_heard(sox, alice, BOB_HZ)
    assert_heard(sox, bob, ALICE_HZ)
    (invite,) = alice.trace("INVITE sip:")
    assert invite.startswith(f"TCP {HOST}:{sbc_a.udp4} -> "), invite.split("\n", 1)[0]

    sbc_a.kill()
    time.sleep(3 * HEARTBEAT + 0.5)  # A unheard of that long: dead for B
    bob.command("dial", f"sip:alice@{DOMAIN}")
    bob.wait_event("CALL_CLOSED", timeout=CALL_TIMEOUT, count=2)
    closed = [e for e in bob.events if e.get("type") == "CALL_CLOSED"][-1]
    assert "480" in str(closed.get("param")), closed
    # A comes back (alice's un-REGISTER at the end of the test gets an answer).
    sbc_a.restart()


# -- a crash mid-call -----------------------------------------------------------------------------
def media_packets(sbc: SbcProcess) -> tuple[int, int]:
    """The running process's media workers' packets in and out (/status)."""
    media = status(sbc)["media"]
    assert isinstance(media, dict), media
    return int(media["packets_in"]), int(media["packets_out"])


@pytest.mark.parametrize("hangs_up", ["caller", "callee"])
def test_a_call_goes_on_through_a_crash_of_the_sbc(
    hangs_up: str,
    redis: RedisServer,
    sbc_factory: SbcFactory,
    phones: PhoneFactory,  # noqa: F811 - the fixture imported above
    sox: str,  # noqa: F811 - the fixture imported above
) -> None:
    """alice calls bob through the SBC (its media on the built-in relay); the SBC is killed
    -9 mid-call and started again on the same config: it loads the call (both dialogs, the
    media session), its media worker binds the same ports with the same keys, and within
    2 s of being ready it relays the phones' RTP both ways again; after a few more seconds
    one of them hangs up, and the BYE reaches the other through the restored call."""
    sbc = sbc_factory(extra=state_config(redis))
    alice = phones("alice", hz=ALICE_HZ)
    bob = phones("bob", hz=BOB_HZ)
    register(bob, sbc, answer=True)
    register(alice, sbc, answer=False)
    alice.command("dial", f"sip:bob@{DOMAIN}")
    alice.wait_event("CALL_ESTABLISHED", timeout=CALL_TIMEOUT)
    bob.wait_event("CALL_ESTABLISHED", timeout=CALL_TIMEOUT)
    time.sleep(2.0)
    client = Redis.from_url(redis.url)
    try:
        assert [k for k in client.scan_iter(f"{PREFIX}call:*")], "the call was not written"
    finally:
        client.close()

    sbc.restart()
    assert ", 1 calls" in loaded_line(sbc), loaded_line(sbc)
    # Media again within 2 s: the new media worker reports its counters when it starts (just
    # before the SBC is ready) and then every TOTALS_INTERVAL (2 s). Its first report with
    # packets is the one of about 2 s after it started; the phones send about 50 packets a
    # second each, so 50 or more in and out by then means the relay took both phones' RTP
    # and sent it on from 1.5 s after the start at the latest.
    wait_until(
        "RTP counted by the restarted SBC's relay",
        lambda: media_packets(sbc)[0] > 0,
        TOTALS_INTERVAL + 2.0,
        lambda: f"{media_packets(sbc)}\n{sbc.log()}",
    )
    first_in, first_out = media_packets(sbc)
    print(f"the restarted relay's first report: {first_in} packets in, {first_out} out")
    assert first_in >= 50 and first_out >= 50, (first_in, first_out)
    time.sleep(3.0)
    packets_in, packets_out = media_packets(sbc)
    assert packets_in >= 250 and packets_out >= 250, (packets_in, packets_out)
    first, second = (alice, bob) if hangs_up == "caller" else (bob, alice)
    first.command("hangup")
    first.wait_event("CALL_CLOSED", timeout=CALL_TIMEOUT)
    second.wait_event("CALL_CLOSED", timeout=CALL_TIMEOUT)
    assert_heard(sox, alice, BOB_HZ)
    assert_heard(sox, bob, ALICE_HZ)
    # The call's entry is gone with the call.
    client = Redis.from_url(redis.url)
    try:
        wait_until(
            "the call's entry deleted",
            lambda: not list(client.scan_iter(f"{PREFIX}call:*")),
            2.0,
            sbc.log,
        )
    finally:
        client.close()


# -- a bad url ----------------------------------------------------------------------------------
BAD_URLS = {
    "http": "http://x",
    "db-not-a-number": "redis://127.0.0.1:6379/zero",
    "bad-port": "redis://127.0.0.1:notaport/0",
}


@pytest.mark.parametrize("case", BAD_URLS)
def test_a_bad_state_url_stops_check_config_and_run(tmp_path: Path, case: str) -> None:
    """``sbc check-config`` and ``sbc run``: exit 1 and one line naming ``state.url``; the
    run stops before it binds anything (its admin port stays free, no "ready")."""
    pool = PortPool()
    sip, admin = pool.port(HOST, TCP), pool.port(HOST, TCP)
    pool.release()
    config = tmp_path / "bad-state.toml"
    config.write_text(
        f'[access]\nlisten = ["udp://{HOST}:{sip}"]\n[admin]\nlisten = "{HOST}:{admin}"\n'
        f'[state]\nurl = "{BAD_URLS[case]}"\n'
    )
    for args in (["check-config", str(config)], ["run", "--config", str(config)]):
        proc = run_sbc(*args)
        assert proc.returncode == 1, (args, proc.stdout, proc.stderr)
        lines = problem_lines(proc)
        assert len(lines) == 1, (args, proc.stderr)
        assert lines[0].startswith(f"{config}: state.url: "), lines
        assert "ready" not in proc.stderr and "listening on" not in proc.stderr, proc.stderr


# -- Redis not there yet ---------------------------------------------------------------------------
def test_the_sbc_starts_without_redis_and_writes_once_it_comes(
    redis_idle: RedisServer, sbc_factory: SbcFactory
) -> None:
    """Nothing listens at the [state] url: the SBC starts anyway (degraded), answers a
    REGISTER, and once a redis-server is started there it writes that binding within a few
    seconds and is plainly ready again."""
    sbc = sbc_factory(extra=state_config(redis_idle))
    assert f"[state] url {redis_idle.url} unreachable" in sbc.log(), sbc.log()
    code, reason = readyz(sbc)
    assert code == 200 and reason.startswith("degraded"), (code, reason)
    assert metric(sbc, "sbc_state_up") == 0
    assert register_udp(HOST, sbc.udp4, "dora").status == 200
    assert local_registrations(sbc) == 1
    redis_idle.start()
    took = wait_until(
        "dora's binding in Redis",
        lambda: redis_idle.keys("aor:") == [f"aor:sip:dora@{DOMAIN}"],
        5.0,
        lambda: f"{redis_idle.keys('')}\n{state_status(sbc)}\n{sbc.log()[-3000:]}",
    )
    print(f"written {took:.2f} s after redis-server started")
    wait_until(
        "/readyz ready", lambda: readyz(sbc)[1].startswith("ready"), 3.0, lambda: str(readyz(sbc))
    )
    assert metric(sbc, "sbc_state_up") == 1
    assert "state store reachable again" in sbc.log()


def test_an_sbc_started_without_redis_sees_it_come_without_a_change(
    redis_idle: RedisServer, sbc_factory: SbcFactory
) -> None:
    """Started while nothing listens at the [state] url, nothing registered since: once a
    redis-server answers there, the SBC says so (it retries every second) instead of
    answering "degraded" and sbc_state_up 0 until something happens to change."""
    sbc = sbc_factory(extra=state_config(redis_idle))
    assert readyz(sbc)[1].startswith("degraded"), readyz(sbc)
    redis_idle.start()
    wait_until(
        "/readyz ready once Redis answers",
        lambda: readyz(sbc)[1].startswith("ready"),
        4.0,
        lambda: f"{readyz(sbc)}\n{state_status(sbc)}",
    )
    assert metric(sbc, "sbc_state_up") == 1


def test_the_token_secret_reaches_a_redis_that_comes_late(
    redis_idle: RedisServer, sbc_factory: SbcFactory, kamailio_registrars: RegistrarFactory
) -> None:
    """Started while nothing listens at the [state] url, the SBC relays carol's REGISTER to
    Kamailio with a Path whose flow token is keyed by the secret it uses. Once Redis comes,
    that secret must be stored with carol's record: after kill -9 and a start on the same
    config, the new process reads both, and a MESSAGE that Kamailio sends along the Path it
    holds still reaches carol."""
    (registrar,) = kamailio_registrars(1)
    sbc = sbc_factory(extra=backends_config(registrar.uri) + state_config(redis_idle))
    with sipwire.udp_socket(HOST) as carol, sipwire.udp_socket(HOST) as sender:
        call_id = f"{secrets.token_hex(8)}@carol"
        assert register_from(carol, sbc, "carol", call_id, 1).status == 200
        redis_idle.start()
        wait_until(
            "carol's record in Redis",
            lambda: len(redis_idle.keys("reg:")) == 1,
            5.0,
            lambda: str(redis_idle.keys("")),
        )
        sbc.restart()
        assert loaded_line(sbc).startswith("state loaded: 1 registrations")
        message_through_path(
            registrar, sender, carol,
            lambda: f"the secret in Redis: {redis_idle.get('secret')!r}\n{sbc.log()[-3000:]}",
        )  # fmt: skip


# -- a stop while writing ------------------------------------------------------------------------
def test_sigterm_stops_an_sbc_that_is_writing_to_redis(
    redis: RedisServer, sbc_factory: SbcFactory
) -> None:
    """A REGISTER answered, and SIGTERM right after it, while its write to Redis is under
    way: the SBC stops as it does without [state], exit 0 within the time the fixtures give
    it, instead of waiting forever for that write. Three times (a start each), as the
    SIGTERM must land during the write."""
    sbc = sbc_factory(extra=state_config(redis))
    for attempt in range(3):
        if attempt:
            sbc.restart()  # the same config (the process before exited by itself)
        assert register_udp(HOST, sbc.udp4, f"last{attempt}").status == 200
        sbc.stopped_by_test = True  # stopped and checked here
        sbc.proc.send_signal(signal.SIGTERM)
        try:
            code = sbc.proc.wait(timeout=STOP_WAIT)
        except subprocess.TimeoutExpired:
            sbc.kill()
            pytest.fail(
                f"sbc run still there {STOP_WAIT} s after SIGTERM (stop {attempt + 1})"
                f"\n{sbc.log()[-3000:]}"
            )
        assert code == 0, sbc.log()[-3000:]
        assert "sbc stopped" in sbc.log()
