"""Interop fixtures: the real ``sbc run`` process on free loopback ports, and the peers.

Every process started here is stopped by its PID in a finalizer. The SBC must stop cleanly:
exit code 0 after SIGTERM and no traceback on its standard error.

A peer program that is missing skips its tests on a developer machine and fails them under
CI (``CI=true``): in CI a missing peer means `make peers` did not do its job.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
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

    def port(self, host: str, *kinds: int) -> int:
        """A port free on ``host`` for every socket kind (SOCK_DGRAM / SOCK_STREAM) given."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        for _ in range(50):
            socks: list[socket.socket] = []
            try:
                first = socket.socket(family, kinds[0])
                socks.append(first)
                first.bind((host, 0))
                port = int(first.getsockname()[1])
                for kind in kinds[1:]:
                    sock = socket.socket(family, kind)
                    socks.append(sock)
                    sock.bind((host, port))
            except OSError:
                for sock in socks:
                    sock.close()
                continue
            self._held += socks
            return port
        raise RuntimeError(f"no free port on {host} for {kinds}")

    def release(self) -> None:
        for sock in self._held:
            sock.close()
        self._held.clear()


UDP, TCP = socket.SOCK_DGRAM, socket.SOCK_STREAM


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


# Short enough for a test to watch an idle connection being closed, long enough for the others.
TCP_IDLE_TIMEOUT = 2.0


def _write_config(path: Path, certs: Certs, ports: dict[str, int]) -> None:
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

[access]
listen = [{", ".join(listen)}]

[access.tls]
certificate = "{certs.server_cert}"
private_key = "{certs.server_key}"
ca = "{certs.ca}"

[core]
listen = ["udp://127.0.0.1:{ports["core"]}"]

[admin]
listen = "127.0.0.1:{ports["admin"]}"

[sip]
max_message_size = {MAX_MESSAGE_SIZE}
max_header_line = 2048
tcp_idle_timeout = {TCP_IDLE_TIMEOUT}
user_agent = "{SERVER_HEADER}"

[log]
level = "debug"
format = "text"
"""
    )


def _start(tmp_path: Path, certs: Certs, attempt: int) -> SbcProcess | str:
    """Start the SBC; the process once ready, or the reason it did not start."""
    pool = PortPool()
    ports = {
        "udp4": pool.port("127.0.0.1", UDP, TCP),
        "tls4": pool.port("127.0.0.1", TCP),
        "core": pool.port("127.0.0.1", UDP),
        "admin": pool.port("127.0.0.1", TCP),
    }
    if HAS_IPV6:
        ports["udp6"] = pool.port("::1", UDP, TCP)
    config = tmp_path / f"sbc-{attempt}.toml"
    _write_config(config, certs, ports)
    stderr_path = tmp_path / f"sbc-{attempt}.stderr"
    pool.release()  # the SBC binds them now
    with stderr_path.open("wb") as stderr:
        proc = subprocess.Popen(
            [*sbc_command(), "run", "--config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=stderr,
        )
    sbc = SbcProcess(
        proc=proc,
        config=config,
        stderr_path=stderr_path,
        udp4=ports["udp4"],
        tls4=ports["tls4"],
        udp6=ports.get("udp6"),
        extra_ports={"core": ports["core"], "admin": ports["admin"]},
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
    """SIGTERM, wait, then SIGKILL; a complaint if it had to be killed."""
    if proc.poll() is not None:
        return None
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
    started: SbcProcess | str = ""
    for attempt in range(3):
        started = _start(tmp_path, certs, attempt)
        # A free port can be taken by someone else between our probe and the SBC's bind.
        if isinstance(started, SbcProcess) or "cannot listen on" not in started:
            break
    if isinstance(started, str):
        pytest.fail(started)
    proc = started.proc
    try:
        yield started
    finally:
        was_running = proc.poll() is None
        problem = _stop(proc)
        log = started.log()
        print(f"--- sbc run stderr ({started.stderr_path}) ---\n{log}")
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
        pool.release()
        stf, errors, messages = workdir / "stat.csv", workdir / "err.log", workdir / "msg.log"
        args = [
            binary,
            sipwire.hostport(host, port),
            "-sf", str(SCENARIOS / scenario),
            "-t", transport,
            "-i", host,
            "-p", str(local_port),
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
