"""Interop fixtures: the real ``sbc run`` process on free loopback ports, and the peers.

Every process started here is stopped by its PID in a finalizer. The SBC must stop cleanly:
exit code 0 after SIGTERM and no traceback on its standard error.

A peer program that is missing skips its tests on a developer machine and fails them under
CI (``CI=true``): in CI a missing peer means `make peers` did not do its job.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import itertools
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from . import sipwire

HERE = Path(__file__).resolve().parent
SCENARIOS = HERE / "scenarios"
# The Server header value the test config sets ([sip] user_agent): a response carrying it
# comes from the SBC this fixture started, not from anything else on the machine.
SERVER_HEADER = "sbc-interop-test"
MAX_MESSAGE_SIZE = 4096
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
_READY = re.compile(r"\bready\b")


def wait_until(
    what: str,
    check: Callable[[], object],
    timeout: float = 5.0,
    explain: Callable[[], str] = lambda: "",
) -> float:
    """Poll ``check`` every 50 ms until it holds; how long it took. Fails the test after
    ``timeout`` seconds, with ``explain()``."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            pytest.fail(f"{what}: not within {timeout} s\n{explain()}")
        time.sleep(0.05)
    return time.monotonic() - start


def require(binary: str) -> str:
    """Path of a peer program; skip without it, or fail under CI (``CI=true``)."""
    path = shutil.which(binary)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{binary} missing: run make peers")
        pytest.skip(f"{binary} not installed (make peers installs it)")
    return path


def sbc_command() -> list[str]:
    """The installed console script next to this interpreter, else ``python -m sbc``."""
    script = Path(sys.executable).with_name("sbc")
    return [str(script)] if script.exists() else [sys.executable, "-m", "sbc"]


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


HAS_IPV6 = _ipv6_loopback()


def require_ipv6() -> None:
    if not HAS_IPV6:
        if os.environ.get("CI") == "true":
            pytest.fail("no IPv6 loopback (::1) on this machine")
        pytest.skip("no IPv6 loopback (::1) on this machine")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Everything in this directory drives real processes: `-m "not interop"` leaves it out.
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.interop)


# -- ports --------------------------------------------------------------------------------
class PortPool:
    """Free ports found by binding port 0; held until ``release()`` so none is given twice."""

    def __init__(self) -> None:
        self._held: list[socket.socket] = []

    def _hold(self, family: int, binds: list[tuple[int, tuple[str, int]]]) -> list[int] | None:
        """Bind a socket of each (kind, address) in turn; the ports bound, all held, or None
        (and nothing held) if one bind fails."""
        socks: list[socket.socket] = []
        try:
            for kind, addr in binds:
                sock = socket.socket(family, kind)
                socks.append(sock)
                sock.bind(addr)
        except OSError:
            for sock in socks:
                sock.close()
            return None
        self._held += socks
        return [int(sock.getsockname()[1]) for sock in socks]

    def port(self, host: str, *kinds: int) -> int:
        """A port free on ``host`` for every socket kind (SOCK_DGRAM / SOCK_STREAM) given."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        for _ in range(50):
            first = self._hold(family, [(kinds[0], (host, 0))])
            if first is None:
                continue
            if len(kinds) == 1 or self._hold(family, [(k, (host, first[0])) for k in kinds[1:]]):
                return first[0]
            self._held.pop().close()  # the first socket: that port is not free for all kinds
        raise RuntimeError(f"no free port on {host} for {kinds}")

    def block(self, host: str, count: int) -> int:
        """The first of ``count`` consecutive UDP ports free on ``host`` (SIPp's media port
        takes the next ones too: RTCP, video)."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        for _ in range(100):
            base = secrets.randbelow((60000 - 33000) // 2) * 2 + 33000
            if self._hold(family, [(UDP, (host, p)) for p in range(base, base + count)]):
                return base
        raise RuntimeError(f"no {count} free consecutive ports on {host}")

    def run(self, host: str, count: int, *kinds: int) -> int:
        """The first of ``count`` consecutive ports free on ``host`` for every socket kind
        given (the core ports of several SBC workers: the listen port plus the index)."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        for _ in range(100):
            base = secrets.randbelow(60000 - 33000) + 33000
            if self._hold(
                family, [(k, (host, p)) for p in range(base, base + count) for k in kinds]
            ):
                return base
        raise RuntimeError(f"no {count} free consecutive ports on {host} for {kinds}")

    def release(self) -> None:
        for sock in self._held:
            sock.close()
        self._held.clear()


UDP, TCP = socket.SOCK_DGRAM, socket.SOCK_STREAM


def udp_bound(host: str, port: int) -> bool:
    """Whether a socket is bound to UDP ``host``:``port`` (an IPv4 address, or any address
    on that port), from /proc/net/udp: a look that takes no port away from a program that is
    about to bind it, as a test bind would."""
    # The kernel prints the address as the hex of its 32-bit value in host byte order.
    packed = int.from_bytes(socket.inet_aton(host), sys.byteorder)
    wanted = {f"{packed:08X}:{port:04X}", f"00000000:{port:04X}"}
    table = Path("/proc/net/udp").read_text().splitlines()[1:]
    return any(row.split()[1] in wanted for row in table)


# -- certificates -------------------------------------------------------------------------
@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """Development certificates made by the real ``sbc gen-certs``."""
    out = tmp_path_factory.mktemp("certs")
    proc = subprocess.run(
        [*sbc_command(), "gen-certs", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    certs = Certs(
        ca=out / "ca.pem",
        server_cert=out / "server.pem",
        server_key=out / "server.key",
        client_cert=out / "client.pem",
        client_key=out / "client.key",
    )
    for path in vars(certs).values():
        assert path.is_file(), f"gen-certs did not write {path}"
    return certs


# -- the SBC process ------------------------------------------------------------------------
@dataclass
class SbcProcess:
    """A running ``sbc run``: its process, its ports and its log (standard error)."""

    proc: subprocess.Popen[bytes]
    config: Path
    stderr_path: Path
    udp4: int  # udp and tcp on 127.0.0.1 share this port
    tls4: int
    udp6: int | None  # udp and tcp on ::1 share this port (None without IPv6)
    extra_ports: dict[str, int] = field(default_factory=dict)
    # Stopped by the test (kill(), or a stop it checks itself): not a death at teardown.
    stopped_by_test: bool = False
    earlier_logs: list[Path] = field(default_factory=list)  # of the processes restart() ended

    host4 = "127.0.0.1"
    host6 = "::1"

    @property
    def tcp4(self) -> int:
        return self.udp4

    @property
    def tcp6(self) -> int | None:
        return self.udp6

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def options_udp(self, host: str | None = None, timeout: float = 2.0) -> sipwire.Response:
        """One OPTIONS over UDP from a fresh socket; the response."""
        host = host or self.host4
        port = self.udp4 if host == self.host4 else self.udp6
        assert port is not None
        with sipwire.udp_socket(host) as sock:
            data = sipwire.request(
                target=sipwire.hostport(host, port),
                transport="udp",
                local=sock.getsockname()[:2],
            )
            return sipwire.udp_exchange(sock, (host, port), data, timeout)

    def kill(self) -> None:
        """kill -9 by its PID (a crash: nothing flushed, no goodbye) and reap it; its media
        workers (their PIDs are in its log) exit when their control socket closes, and are
        waited for (killed by PID if they stay). The fixture's teardown takes that as the
        test's doing, not as a death."""
        self.stopped_by_test = True
        self.proc.kill()  # by its PID, unless it has exited already (no stray signal)
        self.proc.wait(timeout=STOP_TIMEOUT)
        groups = re.findall(r'media workers started .*pids="?\[([\d, ]+)\]', self.log())
        deadline = time.monotonic() + STOP_TIMEOUT
        for pid in (int(p) for group in groups for p in group.split(",")):
            while _media_worker_alive(pid):
                if time.monotonic() > deadline:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                time.sleep(0.02)

    def restart(self) -> None:
        """kill -9 (if it still runs), then ``sbc run`` again on the very same config file:
        same ports, same [media] range (its lock taken again and handed over). Returns once
        the new process is ready (log "ready", OPTIONS answered), or fails the test. The new
        process replaces ``proc`` (the fixture stops and checks it at teardown); its log is a
        new file, the earlier ones are kept in ``earlier_logs``."""
        self.kill()
        low = self.config.read_text().split('[media]\nports = "', 1)[1].split("-", 1)[0]
        range_lock = os.open(_MEDIA_RANGE_LOCKS / f"{low}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            # Free since the killed process is gone (unless another session took it since).
            fcntl.flock(range_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.earlier_logs.append(self.stderr_path)
            self.stderr_path = self.stderr_path.with_name(
                f"{self.stderr_path.stem}-restart{len(self.earlier_logs)}.stderr"
            )
            with self.stderr_path.open("wb") as stderr:
                self.proc = subprocess.Popen(
                    [*sbc_command(), "run", "--config", str(self.config)],
                    stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
                    pass_fds=(range_lock,),
                )  # fmt: skip
        finally:
            os.close(range_lock)
        self.stopped_by_test = False
        deadline = time.monotonic() + START_TIMEOUT
        while not _READY.search(self.log()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                _stop(self.proc)
                pytest.fail(f"sbc run not ready again within {START_TIMEOUT} s:\n{self.log()}")
            time.sleep(0.02)
        response = self.options_udp()
        assert response.status == 200, f"OPTIONS after the restart: {response.raw!r}"


def _media_worker_alive(pid: int) -> bool:
    try:
        return b"media_worker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # gone (a zombie's cmdline is empty)
        return False


# Short enough for a test to watch an idle connection being closed, long enough for the others.
TCP_IDLE_TIMEOUT = 2.0


# Each SBC started gets its own relay port range, below the kernel's ephemeral ports
# (32768-60999) so that no peer's socket takes one. Test sessions side by side (several
# pytest processes) share the 60 ranges through a lock file per range (flock): the SBC
# process is handed the locked descriptor, so its range is free again once it exits.
_media_ranges = itertools.count()
_MEDIA_RANGE_LOCKS = Path(tempfile.gettempdir()) / "sbc-interop-media-ranges"
_media_range_locks: dict[int, int] = {}  # low port -> locked descriptor, until handed over


def media_range() -> tuple[int, int]:
    _MEDIA_RANGE_LOCKS.mkdir(exist_ok=True)
    for _ in range(60):
        base = 20000 + (next(_media_ranges) % 60) * 200
        if base in _media_range_locks:
            continue
        fd = os.open(_MEDIA_RANGE_LOCKS / f"{base}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # an SBC of another session (or of this one) runs on it
            os.close(fd)
            continue
        _media_range_locks[base] = fd
        return base, base + 199
    raise RuntimeError("every [media] port range is held by a running test SBC")


# The [security] of the test SBCs: the tests' own peers on 127.0.0.1 and ::1 (SIPp at a few
# thousand calls/s, Kamailio) are trusted, so the flood and rate limits never get in the way
# of a functional test; the security tests (test_security.py) set their own and attack from
# other loopback addresses (127.0.0.2 and up).
TRUST_LOOPBACK = 'allow = ["127.0.0.1", "::1"]'


def _write_config(
    path: Path,
    certs: Certs,
    ports: dict[str, int],
    *,
    core: str = "",
    extra: str = "",
    media: str = "",
    security: str = TRUST_LOOPBACK,
    workers: int = 1,
) -> int:
    """The test config; ``core`` adds keys to [core], ``media`` to [media], ``security`` is
    the body of [security], ``extra`` adds sections at the end; ``workers``: [sbc] workers.
    Returns the locked descriptor of its [media] port range."""
    low, high = media_range()
    listen = [
        f'"tcp://127.0.0.1:{ports["udp4"]}"',
        f'"tls://127.0.0.1:{ports["tls4"]}"',
    ]
    if "udp6" in ports:
        listen += [f'"udp://[::1]:{ports["udp6"]}"', f'"tcp://[::1]:{ports["udp6"]}"']
    # udp on 127.0.0.1 last: once it answers, every access listener is bound.
    listen.append(f'"udp://127.0.0.1:{ports["udp4"]}"')
    path.write_text(
        f"""\
[sbc]
name = "interop"
workers = {workers}

[access]
listen = [{", ".join(listen)}]

[access.tls]
certificate = "{certs.server_cert}"
private_key = "{certs.server_key}"
ca = "{certs.ca}"

[core]
listen = [
    "udp://127.0.0.1:{ports["core"]}",
    "tcp://127.0.0.1:{ports["core"]}",
    "tls://127.0.0.1:{ports["core_tls"]}",
]
{core}

[core.tls]
certificate = "{certs.server_cert}"
private_key = "{certs.server_key}"
ca = "{certs.ca}"

[admin]
listen = "127.0.0.1:{ports["admin"]}"

[media]
ports = "{low}-{high}"
workers = {workers}
{media if "timeout" in media else media + chr(10) + "timeout = 600"}

[sip]
max_message_size = {MAX_MESSAGE_SIZE}
max_header_line = 2048
tcp_idle_timeout = {TCP_IDLE_TIMEOUT}
user_agent = "{SERVER_HEADER}"

[log]
level = "debug"
format = "text"

[security]
{security}
{extra}
"""
    )
    return _media_range_locks.pop(low)


def _start(
    tmp_path: Path,
    certs: Certs,
    attempt: int,
    *,
    core: str = "",
    extra: str = "",
    media: str = "",
    security: str = TRUST_LOOPBACK,
    workers: int = 1,
) -> SbcProcess | str:
    """Start the SBC; the process once ready, or the reason it did not start."""
    pool = PortPool()
    ports = {
        "udp4": pool.port("127.0.0.1", UDP, TCP),
        "tls4": pool.port("127.0.0.1", TCP),
        # Worker i listens on the core ports plus i.
        "core": pool.run("127.0.0.1", workers, UDP, TCP),
        "core_tls": pool.run("127.0.0.1", workers, TCP),
        "admin": pool.port("127.0.0.1", TCP),
    }
    if HAS_IPV6:
        ports["udp6"] = pool.port("::1", UDP, TCP)
    config = tmp_path / f"sbc-{attempt}.toml"
    range_lock = _write_config(
        config, certs, ports, core=core, extra=extra, media=media, security=security,
        workers=workers,
    )  # fmt: skip
    stderr_path = tmp_path / f"sbc-{attempt}.stderr"
    pool.release()  # the SBC binds them now
    try:
        with stderr_path.open("wb") as stderr:
            proc = subprocess.Popen(
                [*sbc_command(), "run", "--config", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                pass_fds=(range_lock,),  # it holds its media range's lock until it exits
            )
    finally:
        os.close(range_lock)
    sbc = SbcProcess(
        proc=proc,
        config=config,
        stderr_path=stderr_path,
        udp4=ports["udp4"],
        tls4=ports["tls4"],
        udp6=ports.get("udp6"),
        extra_ports={
            "core": ports["core"],
            "core_tls": ports["core_tls"],
            "admin": ports["admin"],
        },
    )
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"sbc run exited with {proc.returncode}:\n{sbc.log()}"
        if _READY.search(sbc.log()):
            break
        time.sleep(0.02)
    else:
        _stop(proc)
        return f"sbc run not ready within {START_TIMEOUT} s:\n{sbc.log()}"
    # The log says ready; the SBC must also answer as one.
    try:
        response = sbc.options_udp()
    except OSError as exc:
        _stop(proc)
        return f"no answer to OPTIONS over UDP after 'ready': {exc}\n{sbc.log()}"
    if response.status != 200:
        _stop(proc)
        return f"OPTIONS over UDP after 'ready' got {response.status}:\n{response.raw!r}"
    return sbc


def _stop(proc: subprocess.Popen[bytes]) -> str | None:
    """SIGTERM, wait, then SIGKILL; a complaint if it had to be killed. The first SIGTERM
    drains (calls still up go on, up to [calls] drain_timeout); the second, a second later,
    ends them at once: a test that leaves a call up must not wait for the drain."""
    if proc.poll() is not None:
        return None
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=1.0)
        return None
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=STOP_TIMEOUT)
        return f"did not exit within {STOP_TIMEOUT} s of SIGTERM; killed"
    return None


@pytest.fixture
def sbc(tmp_path: Path, certs: Certs) -> Iterator[SbcProcess]:
    """The real ``sbc run`` on free ports: udp/tcp/tls on 127.0.0.1, udp/tcp on ::1."""
    yield from _running_sbc(tmp_path, certs)


SbcFactory = Callable[..., SbcProcess]


@pytest.fixture
def sbc_factory(tmp_path: Path, certs: Certs) -> Iterator[SbcFactory]:
    """``sbc_factory(core="...", extra="...", media="...", security="...", workers=1)``
    starts an SBC with config additions (backends, [registration], [media] keys ...) and
    that many signalling workers; every SBC started is stopped and checked at teardown."""
    running: list[Iterator[SbcProcess]] = []

    def start(
        *,
        core: str = "",
        extra: str = "",
        media: str = "",
        security: str = TRUST_LOOPBACK,
        workers: int = 1,
    ) -> SbcProcess:
        gen = _running_sbc(
            tmp_path / f"sbc{len(running)}",
            certs,
            core=core,
            extra=extra,
            media=media,
            security=security,
            workers=workers,
        )
        running.append(gen)
        return next(gen)

    yield start
    for gen in running:
        for _ in gen:  # runs the generator's teardown and its checks
            pass


def _running_sbc(
    tmp_path: Path,
    certs: Certs,
    *,
    core: str = "",
    extra: str = "",
    media: str = "",
    security: str = TRUST_LOOPBACK,
    workers: int = 1,
) -> Iterator[SbcProcess]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    started: SbcProcess | str = ""
    for attempt in range(3):
        started = _start(
            tmp_path, certs, attempt, core=core, extra=extra, media=media, security=security,
            workers=workers,
        )  # fmt: skip
        # A free port can be taken by someone else between our probe and the SBC's bind.
        if isinstance(started, SbcProcess) or "cannot listen on" not in started:
            break
    if isinstance(started, str):
        pytest.fail(started)
    try:
        yield started
    finally:
        proc = started.proc  # the latest: a test may have restarted it (SbcProcess.restart)
        was_running = proc.poll() is None
        problem = _stop(proc)
        for earlier in started.earlier_logs:
            text = earlier.read_text(errors="replace")
            print(f"--- sbc run stderr ({earlier}, a process the test ended) ---\n{text}")
            assert "Traceback" not in text, text
        log = started.log()
        print(f"--- sbc run stderr ({started.stderr_path}) ---\n{log}")
        if not (started.stopped_by_test and not was_running):  # the test's to check
            assert was_running, f"the SBC died during the test (exit {proc.returncode}):\n{log}"
            assert problem is None, f"{problem}\n{log}"
            assert proc.returncode == 0, f"exit code {proc.returncode} after SIGTERM:\n{log}"
        assert "Traceback" not in log, log


# -- SIPp -----------------------------------------------------------------------------------
@dataclass
class SippResult:
    returncode: int
    stats: dict[str, str]
    output: str
    errors: str
    messages: str

    def count(self, name: str) -> int:
        return int(self.stats[name])

    def explain(self) -> str:
        return (
            f"sipp exit {self.returncode}\n--- errors ---\n{self.errors}\n"
            f"--- screen ---\n{self.output[-4000:]}\n--- messages ---\n{self.messages[-6000:]}"
        )

    def assert_all_passed(self, calls: int) -> None:
        assert self.returncode == 0, self.explain()
        assert self.count("OutgoingCall(C)") == calls, self.explain()
        assert self.count("SuccessfulCall(C)") == calls, self.explain()
        assert self.count("FailedCall(C)") == 0, self.explain()


def _read_stats(path: Path) -> dict[str, str]:
    """The last row of SIPp's ``-stf`` file (``;``-separated, header row first)."""
    if not path.exists():
        return {}
    rows = [row for row in csv.reader(path.open(), delimiter=";") if row]
    if len(rows) < 2:
        return {}
    return dict(zip(rows[0], rows[-1], strict=False))


SippRunner = Callable[..., SippResult]


@pytest.fixture
def sipsak() -> str:
    return require("sipsak")


@pytest.fixture
def tshark() -> str:
    return require("tshark")


@pytest.fixture
def sipp(tmp_path: Path, certs: Certs) -> SippRunner:
    """Run SIPp with one of our scenarios, bounded by ``-m``, ``-timeout`` and a kill."""
    binary = require("sipp")
    runs = iter(range(1000))

    def run(
        scenario: str,
        host: str,
        port: int,
        *,
        transport: str = "u1",
        calls: int = 1,
        rate: int = 10,
        extra: tuple[str, ...] = (),
        timeout: float = 10.0,
    ) -> SippResult:
        n = next(runs)
        workdir = tmp_path / f"sipp-{n}"
        workdir.mkdir()
        pool = PortPool()
        local_port = pool.port(host, UDP, TCP)
        media_port = pool.block(host, 4)  # not SIPp's fixed 6000: another program may hold it
        pool.release()
        stf, errors, messages = workdir / "stat.csv", workdir / "err.log", workdir / "msg.log"
        args = [
            binary,
            sipwire.hostport(host, port),
            "-sf", str(SCENARIOS / scenario),
            "-t", transport,
            "-i", host,
            "-p", str(local_port),
            "-mp", str(media_port),
            "-m", str(calls),
            "-r", str(rate),
            "-timeout", f"{timeout:g}",
            "-timeout_error",
            "-nostdin",
            "-trace_stat", "-stf", str(stf),
            "-trace_err", "-error_file", str(errors),
            "-trace_msg", "-message_file", str(messages),
            *extra,
        ]  # fmt: skip
        if transport.startswith("l"):
            args += ["-tls_cert", str(certs.client_cert), "-tls_key", str(certs.client_key)]
        try:
            proc = subprocess.run(
                args,
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=timeout + 5,
            )
        except subprocess.TimeoutExpired as exc:  # subprocess.run killed it (by its PID)
            pytest.fail(f"sipp did not finish within {timeout + 5} s: {exc.stdout!r}")
        return SippResult(
            returncode=proc.returncode,
            stats=_read_stats(stf),
            output=proc.stdout + proc.stderr,
            errors=errors.read_text(errors="replace") if errors.exists() else "",
            messages=messages.read_text(errors="replace") if messages.exists() else "",
        )

    return run


# =========================================================================================
# Kamailio registrars (registration offload and backend failover; the lab)
#
# Real Kamailio 5.6 instances on free loopback ports, all running docker/kamailio/kamailio.cfg
# (the same file the docker-compose lab mounts). Each instance has its own run dir (-Y), pid
# file (-P), binrpc control socket (for kamcmd) and log (stderr, -E) in tmp_path, runs in the
# foreground (-DD) in its own process group, and is stopped by its PID at teardown.
# KAMAILIO_XLOG=1 in the environment makes them log one line per request and reply.
# =========================================================================================
KAMAILIO_CFG = HERE.parents[1] / "docker" / "kamailio" / "kamailio.cfg"
KAMAILIO_NO_RR_CFG = KAMAILIO_CFG.with_name("kamailio-no-rr.cfg")
KAMAILIO_SERVER = "kamailio-backend"  # server_header in kamailio.cfg
KAMAILIO_START_TIMEOUT = 10.0
KAMAILIO_STOP_TIMEOUT = 10.0
KAMCMD_TIMEOUT = 10.0
_KAMCMD_NOT_SET = "[not set]"
FULL_DUMP_AORS = 50  # a full ul.dump of these stays under kamcmd's 128 KB reply limit


class RegistrarError(RuntimeError):
    """A Kamailio instance did not start, or kamcmd failed."""


def _binding_value(key: str, value: str) -> object:
    if value == _KAMCMD_NOT_SET:
        return None
    if key in ("Call-ID", "Address", "Path", "Received", "Instance", "User-Agent", "Ruid"):
        return value
    if re.fullmatch(r"-?\d+", value):
        return int(value)
    return value  # e.g. Expires "permanent" / "expired" / "deleted", Socket, State


def parse_ul_contacts(text: str) -> dict[str, list[dict[str, object]]]:
    """AOR -> contacts from kamcmd's printout of ``ul.dump`` or of ``ul.lookup`` (one or more).

    Every field of a Contact struct is kept under its name in snake case (``call_id``,
    ``user_agent``, ``reg_id``...), numbers as int and "[not set]" as None; ``contact`` is the
    contact URI (kamcmd's "Address"). ``expires`` is the seconds left (or "permanent").
    """
    bindings: dict[str, list[dict[str, object]]] = {}
    aor: str | None = None
    contact: dict[str, object] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("kamcmd> "):  # interactive mode echoes each command
            line = line.removeprefix("kamcmd> ").strip()
        if line == "Contact: {":
            contact = {}
            continue
        if contact is not None:
            if line == "}":
                assert aor is not None, f"a Contact outside an AoR in:\n{text}"
                contact["contact"] = contact.get("address")
                bindings.setdefault(aor, []).append(contact)
                contact = None
                continue
            key, sep, value = line.partition(": ")
            if sep:
                contact[key.lower().replace("-", "_")] = _binding_value(key, value.strip())
            continue
        if line.startswith("AoR: "):
            aor = line.removeprefix("AoR: ").strip()
            bindings.setdefault(aor, [])
    return bindings


class Registrar:
    """One Kamailio registrar on 127.0.0.1 (UDP and TCP on the same port), for one test.

    ``start()`` and ``stop()`` can be called again in a test (a restart keeps the ports), to
    kill a backend and bring it back.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        index: int,
        port: int,
        rundir: Path,
        log_path: Path,
        kamailio: str,
        kamcmd: str,
        auth_password: str | None = None,
        record_route: bool = True,
    ) -> None:
        self.index = index
        self.auth_password = auth_password  # digest auth on (kamailio.cfg WITH_AUTH)
        # False: kamailio-no-rr.cfg, a proxy that stays out of the dialogs it sets up.
        self.record_route = record_route
        self.port = port
        self.rundir = rundir  # short: a Unix socket path must stay under 108 bytes
        self.log_path = log_path
        self.kamailio = kamailio
        self.kamcmd_path = kamcmd
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.stopped_by_test = False
        rundir.mkdir(parents=True, exist_ok=True)

    # -- addresses
    @property
    def uri(self) -> str:
        return f"sip:{self.host}:{self.port}"

    @property
    def ctl_socket(self) -> Path:
        return self.rundir / "ctl.sock"

    @property
    def pid_file(self) -> Path:
        return self.rundir / "kamailio.pid"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    def command(self) -> list[str]:
        return [
            self.kamailio,
            "-f", str(KAMAILIO_CFG if self.record_route else KAMAILIO_NO_RR_CFG),
            "-DD", "-E",
            "-Y", str(self.rundir),
            "-P", str(self.pid_file),
            "-l", f"udp:{self.host}:{self.port}",
            "-l", f"tcp:{self.host}:{self.port}",
            "-A", f'CTL_SOCKET="unix:{self.ctl_socket}"',
            *(["-A", "WITH_XLOG"] if os.environ.get("KAMAILIO_XLOG") else []),
            *(["-A", "WITH_AUTH", "-A", f'AUTH_PASSWORD="{self.auth_password}"']
              if self.auth_password else []),
        ]  # fmt: skip

    def log(self) -> str:
        """Everything every start of this instance logged (each start begins with a marker)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- life cycle
    def start(self, timeout: float = KAMAILIO_START_TIMEOUT) -> None:
        """Start (or restart, on the same ports) and wait until it answers OPTIONS."""
        self.launch()
        self.wait_ready(timeout)

    def launch(self) -> None:
        """Start the process without waiting for it (``wait_ready()`` does)."""
        if self.running:
            raise RegistrarError(f"registrar {self.index} is already running (pid {self.pid})")
        self.starts += 1
        self.stopped_by_test = False
        with self.log_path.open("ab") as log:
            log.write(f"=== start {self.starts}: {' '.join(self.command())}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # its children share its process group: see stop()
            )

    def wait_ready(self, timeout: float = KAMAILIO_START_TIMEOUT) -> None:
        """Until it answers OPTIONS over UDP and TCP and its control socket is there; stopped
        and RegistrarError (with its log) if it exits or takes longer than ``timeout``."""
        try:
            self._wait_ready(timeout)
        except RegistrarError:
            self._terminate()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        problem = "no answer yet"
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RegistrarError(
                    f"kamailio {self.index} exited with {self.proc.returncode} while starting:"
                    f"\n{self.log()}"
                )
            try:
                for transport in ("udp", "tcp"):
                    response = self.options(transport, timeout=0.5)
                    if response.status != 200 or response.get("server") != KAMAILIO_SERVER:
                        raise RegistrarError(f"OPTIONS over {transport}: {response.raw!r}")
                if self.ctl_socket.exists():
                    return
                problem = f"no control socket {self.ctl_socket}"
            except (OSError, EOFError) as exc:
                problem = f"OPTIONS: {exc!r}"
            time.sleep(0.05)
        raise RegistrarError(
            f"kamailio {self.index} not ready within {timeout} s ({problem}):\n{self.log()}"
        )

    def _terminate(self) -> str | None:
        """SIGTERM to the main process, wait, then SIGKILL its process group; a complaint if
        it had to be killed."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return None
        proc.send_signal(signal.SIGTERM)  # the main process stops its children itself
        deadline = time.monotonic() + KAMAILIO_STOP_TIMEOUT
        try:
            proc.wait(timeout=KAMAILIO_STOP_TIMEOUT)
            # Its children must be gone too, or a restart finds its ports still bound.
            while time.monotonic() < deadline:
                os.killpg(proc.pid, 0)  # ProcessLookupError once the group is empty
                time.sleep(0.02)
        except ProcessLookupError:
            return None
        except subprocess.TimeoutExpired:
            pass
        # The group is this instance's own (start_new_session): its id is the main PID.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=KAMAILIO_STOP_TIMEOUT)
        return f"kamailio {self.index} not gone {KAMAILIO_STOP_TIMEOUT} s after SIGTERM; killed"

    def stop(self) -> None:
        """Stop it (SIGTERM, wait, SIGKILL); the bindings it held are gone with it."""
        self.stopped_by_test = True
        problem = self._terminate()
        if problem:
            print(problem)

    # -- SIP
    def options(self, transport: str = "udp", timeout: float = 2.0) -> sipwire.Response:
        """One OPTIONS (no user part: the health-probe case) over UDP or TCP; the response."""
        target = sipwire.hostport(self.host, self.port)
        if transport == "udp":
            with sipwire.udp_socket(self.host) as sock:
                # Connected: a port nobody listens on fails at once (ConnectionRefusedError).
                sock.connect((self.host, self.port))
                data = sipwire.request(target=target, transport="udp", local=sock.getsockname()[:2])
                return sipwire.udp_exchange(sock, (self.host, self.port), data, timeout)
        with socket.create_connection((self.host, self.port), timeout=timeout) as sock:
            data = sipwire.request(target=target, transport="tcp", local=sock.getsockname()[:2])
            sock.sendall(data)
            return sipwire.StreamReader(sock).response(timeout)

    # -- kamcmd
    def kamcmd(self, *args: str, stdin: str | None = None) -> str:
        """kamcmd's output for one command (or, with ``stdin``, for the commands in it)."""
        proc = subprocess.run(
            [self.kamcmd_path, "-s", f"unix:{self.ctl_socket}", *args],
            input=stdin if stdin is not None else "",
            capture_output=True,
            text=True,
            errors="replace",
            timeout=KAMCMD_TIMEOUT,
        )
        # kamcmd exits 0 after an RPC error; it prints "error: CODE - reason" instead.
        if proc.returncode != 0 or (stdin is None and proc.stdout.startswith("error:")):
            raise RegistrarError(
                f"kamcmd {' '.join(args)} on registrar {self.index}: exit {proc.returncode}"
                f"\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
            )
        return proc.stdout

    def aors(self) -> list[str]:
        """The AORs held (``ul.dump brief``: fits several thousand, the full dump 250)."""
        return re.findall(r"^\s*AoR: (\S+)\s*$", self.kamcmd("ul.dump", "brief"), re.M)

    def bindings(self) -> dict[str, list[dict[str, object]]]:
        """AOR -> contacts, each with at least contact, expires, path, received (see
        ``parse_ul_contacts``). The AOR is the user part (usrloc use_domain is 0)."""
        aors = self.aors()
        if len(aors) <= FULL_DUMP_AORS:
            try:
                return parse_ul_contacts(self.kamcmd("ul.dump"))
            except RegistrarError as exc:
                if "reply too big" not in str(exc):
                    raise
        # A full ul.dump over kamcmd's 128 KB reply limit (about 250 contacts) fails, after
        # a second, with "ERROR: reply too big": look each AOR up instead, all in one kamcmd
        # session (its interactive mode reads commands from stdin).
        text = self.kamcmd(stdin="".join(f"ul.lookup location {aor}\n" for aor in aors))
        # An AOR that expired between the two calls answers "error: 500 - AOR not found".
        return {aor: contacts for aor, contacts in parse_ul_contacts(text).items() if contacts}

    def stats(self, group: str) -> dict[str, int]:
        """Every counter of a statistics group (``registrar``, ``usrloc``, ``core``, ``tm``)."""
        text = self.kamcmd("stats.get_statistics", f"{group}:")
        return {name: int(value) for name, value in re.findall(r"^(\S+) = (-?\d+)\s*$", text, re.M)}

    def stat(self, name: str) -> int:
        """One counter, e.g. ``registrar:accepted_regs`` or ``core:rcv_requests_register``.

        (``stats.get_statistics group:name`` prints nothing in 5.6; the group is read whole.)
        """
        group, sep, _ = name.partition(":")
        assert sep, f"give the counter as group:name, not {name!r}"
        counters = self.stats(group)
        if name not in counters:
            raise KeyError(f"no counter {name}; {group} has {sorted(counters)}")
        return counters[name]


def register_udp(
    host: str,
    port: int,
    user: str,
    *,
    domain: str = "example.com",
    expires: int = 3600,
    contact: str | None = None,
    extra: tuple[tuple[str, str], ...] = (),
    timeout: float = 2.0,
) -> sipwire.Response:
    """One REGISTER for ``user@domain`` over UDP from a fresh socket; the final response.

    The Contact defaults to ``sip:USER@<the socket's address>``; ``extra`` adds headers
    (e.g. ``("Path", "<sip:127.0.0.1:5999;lr>")``).
    """
    with sipwire.udp_socket(host) as sock:
        local = sipwire.hostport(*sock.getsockname()[:2])
        tag = secrets.token_hex(4)
        lines = [
            f"REGISTER sip:{sipwire.hostport(host, port)} SIP/2.0",
            f"Via: SIP/2.0/UDP {local};branch=z9hG4bK{tag};rport",
            "Max-Forwards: 70",
            f"From: <sip:{user}@{domain}>;tag={tag}",
            f"To: <sip:{user}@{domain}>",
            f"Call-ID: {secrets.token_hex(8)}@interop",
            "CSeq: 1 REGISTER",
            f"Contact: <{contact or f'sip:{user}@{local}'}>",
            f"Expires: {expires}",
            *(f"{name}: {value}" for name, value in extra),
            "Content-Length: 0",
        ]
        data = ("\r\n".join(lines) + "\r\n\r\n").encode()
        sock.settimeout(timeout)
        sock.sendto(data, (host, port))
        deadline = time.monotonic() + timeout
        while True:  # skip provisional responses
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            response = sipwire.parse_response(sock.recvfrom(65535)[0])
            if response.status >= 200:
                return response


def write_users_csv(path: Path, users: list[str], domain: str = "example.com") -> Path:
    """A SIPp ``-inf`` file: SEQUENTIAL, then ``user;domain`` ([field0];[field1])."""
    path.write_text("SEQUENTIAL\n" + "".join(f"{user};{domain}\n" for user in users))
    return path


def backends_config(*uris: str) -> str:
    """The [[core.backends]] tables of a config, one per backend URI."""
    return "".join(f'\n[[core.backends]]\nuri = "{uri}"\n' for uri in uris)


RegistrarFactory = Callable[..., list[Registrar]]


@pytest.fixture
def kamailio_registrars(tmp_path: Path) -> Iterator[RegistrarFactory]:
    """A factory: ``kamailio_registrars(n)`` starts n more registrars and returns them, each
    ready (answers OPTIONS over UDP and TCP, control socket up). All are stopped at teardown;
    one that died during the test (not stopped by it) fails the test."""
    kamailio = require("kamailio")
    kamcmd = require("kamcmd")
    assert KAMAILIO_CFG.is_file(), KAMAILIO_CFG
    # Run dirs hold the control sockets: under /tmp, as tmp_path can be too long for one.
    root = Path(tempfile.mkdtemp(prefix="kam-"))
    started: list[Registrar] = []

    def new(
        index: int, attempt: int, auth_password: str | None = None, record_route: bool = True
    ) -> Registrar:
        pool = PortPool()
        port = pool.port("127.0.0.1", UDP, TCP)
        pool.release()  # Kamailio binds it now
        return Registrar(
            index,
            port,
            root / f"r{index}-{attempt}",
            tmp_path / f"kamailio-{index}-{attempt}.log",
            kamailio,
            kamcmd,
            auth_password,
            record_route,
        )

    def start(
        n: int = 2, *, auth_password: str | None = None, record_route: bool = True
    ) -> list[Registrar]:
        # All n start at once (each takes about 0.5 s to come up), then each is waited for.
        group = [new(len(started) + i, 0, auth_password, record_route) for i in range(n)]
        for registrar in group:
            registrar.launch()
        for i, registrar in enumerate(group):
            for attempt in range(1, 4):
                try:
                    registrar.wait_ready()
                    break
                except RegistrarError as exc:
                    # A free port can be taken by someone else between our probe and its bind.
                    if "Address already in use" not in str(exc) or attempt == 3:
                        for other in group[i + 1 :]:
                            other._terminate()
                        pytest.fail(str(exc))
                registrar = new(registrar.index, attempt, auth_password, record_route)
                registrar.launch()
            group[i] = registrar
            started.append(registrar)
        return group

    try:
        yield start
    finally:
        problems = []
        for registrar in started:
            died = not registrar.running and not registrar.stopped_by_test
            problem = registrar._terminate()
            print(f"--- kamailio {registrar.index} ({registrar.log_path}) ---")
            print("\n".join(registrar.log().splitlines()[-100:]))
            if died:
                problems.append(f"kamailio {registrar.index} died during the test")
            if problem:
                print(problem)
        shutil.rmtree(root, ignore_errors=True)
        assert not problems, "\n".join(problems)


@pytest.fixture
def registrars(kamailio_registrars: RegistrarFactory) -> list[Registrar]:
    """Two Kamailio registrars, side by side."""
    return kamailio_registrars(2)
