"""The SBC as the provider's front door, attacked for real.

A real Kamailio registrar is the backend (with digest authentication where the attack is a
password guess); the attackers and the honest clients are real programs on loopback
addresses other than 127.0.0.1 (127.0.0.2 attacks, 127.0.0.3 and .4 are honest), and the SBC
runs with a [security] section of the test's own: nothing is on its allow list.

- SIPVicious (svmap, svwar, svcrack from PyPI) scans, enumerates and guesses passwords:
  svmap finds nothing, svwar enumerates no extension, svcrack is banned after
  ``auth_failures`` failed guesses and never finds the password, and Kamailio sees none of
  the scanners' requests.
- SIPp floods REGISTER and INVITE from 127.0.0.2 as fast as it can while honest SIPp clients
  register and call: they still succeed, the flooder is banned, the backend's REGISTER rate
  stays under the configured ceiling and the SBC's memory stays bounded.

Each test prints its figures as one JSON line (and appends it to the file named by the
environment variable SBC_SECURITY_FIGURES, if set): docs/security.md quotes them.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from . import sipwire
from .conftest import (
    SCENARIOS,
    TCP,
    UDP,
    PortPool,
    Registrar,
    RegistrarFactory,
    SbcFactory,
    SbcProcess,
    backends_config,
    require,
    udp_bound,
    wait_until,
)
from .phones import CALL_TIMEOUT
from .test_calls import register_via

pytestmark = pytest.mark.interop

ATTACKER = "127.0.0.2"
HONEST = "127.0.0.3"
CALLEE = "127.0.0.4"
MARKER_HOST = "127.0.0.9"  # nothing listens there: a marker for a capture goes nowhere
DOMAIN = "example.com"
PASSWORD = "secret"
AUTH_FAILURES = 5
USER = "1010"  # registered at Kamailio, the one svwar should find and svcrack crack
# The SBC probes its backend once at start, then not within a test: Kamailio's request
# counters and log then hold only what the clients sent through the SBC.
PROBES_OFF = "probe_interval = 3600"


# -- helpers ------------------------------------------------------------------------------
def security(*lines: str) -> str:
    """A [security] body with no allow list: every loopback source is a stranger."""
    return "\n".join(("allow = []", *lines))


def emit(figures: dict[str, object]) -> None:
    """The test's figures as one JSON line: stdout, and SBC_SECURITY_FIGURES if set."""
    line = json.dumps(figures, sort_keys=True)
    print(line)
    path = os.environ.get("SBC_SECURITY_FIGURES")
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.write(line + "\n")


# svwar and svcrack 0.3.8 accept -b but never pass it on to their scanner classes (svmap
# does): they would send from whatever address the kernel picks, 127.0.0.1 here. This runs
# the tool's own main() with the binding address given to the class, and nothing else changed.
_BOUND = """\
import sys
from sipvicious import {module} as tool
init = tool.{cls}.__init__
def bound(self, *args, **kwargs):
    kwargs["bindingip"] = {bind!r}
    init(self, *args, **kwargs)
tool.{cls}.__init__ = bound
sys.argv[0] = "sipvicious_{module}"
tool.main()
"""
_CLASSES = {"svwar": "TakeASip", "svcrack": "ASipOfRedWine"}


def sipvicious(tool: str, bind: str, *args: str) -> list[str]:
    """The command line of a SIPVicious tool sending from ``bind`` (and naming it in Via)."""
    script = Path(sys.executable).with_name(f"sipvicious_{tool}")
    if not script.exists():
        require(f"sipvicious_{tool}")  # fails under CI, skips elsewhere
    if tool not in _CLASSES:
        return [str(script), "-b", bind, *args]
    code = _BOUND.format(module=tool, cls=_CLASSES[tool], bind=bind)
    return [sys.executable, "-c", code, "-b", bind, "-x", bind, *args]


def run_tool(args: list[str], timeout: float) -> str:
    """Run a scanner to its end (bounded by ``timeout``); its output, stdout and stderr."""
    try:
        proc = subprocess.run(
            args,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:  # subprocess.run killed it (by its PID)
        pytest.fail(f"{args[0]} did not finish within {timeout} s: {exc.stdout!r}{exc.stderr!r}")
    return proc.stdout + proc.stderr


def kamailio_requests(registrar: Registrar) -> dict[str, int]:
    """Kamailio's counters of requests received, by method (core:rcv_requests*)."""
    return {k: v for k, v in registrar.stats("core").items() if k.startswith("core:rcv_requests")}


def xlog_lines(registrar: Registrar) -> list[str]:
    """Kamailio's WITH_XLOG lines: one per request received ("METHOD uri from ip:port")."""
    return re.findall(
        r"^.*\b[A-Z]+ sip:\S+ from \d+\.\d+\.\d+\.\d+:\d+ \(\w+\)$", registrar.log(), re.M
    )


def bans(sbc: SbcProcess) -> list[tuple[datetime, str, str]]:
    """The SBC's ban log lines: (when, source, reason)."""
    found = []
    for match in re.finditer(
        r"^(\S+Z) WARNING sbc\.guard banned (\S+) for \S+ s: (\w+)", sbc.log(), re.M
    ):
        when = datetime.strptime(match[1], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
        found.append((when, match[2], match[3]))
    return found


def wait_for_ban(sbc: SbcProcess, source: str, seconds: float) -> tuple[datetime, str]:
    deadline = time.monotonic() + seconds
    while True:
        for when, ip, why in bans(sbc):
            if ip == source:
                return when, why
        assert time.monotonic() < deadline, f"{source} not banned within {seconds} s:\n{sbc.log()}"
        time.sleep(0.05)


def options_from(source: str, sbc: SbcProcess, user_agent: str) -> sipwire.Response | None:
    """One OPTIONS from ``source`` to the SBC with this User-Agent; None if unanswered."""
    with sipwire.udp_socket(source) as sock:
        data = sipwire.request(
            target=sipwire.hostport(sbc.host4, sbc.udp4),
            transport="udp",
            local=sock.getsockname()[:2],
            extra=(("User-Agent", user_agent),),
        )
        try:
            return sipwire.udp_exchange(sock, (sbc.host4, sbc.udp4), data, 1.0)
        except TimeoutError:
            return None


def rss_kib(pid: int) -> int:
    """VmRSS of a process, KiB."""
    match = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    assert match, f"no VmRSS for {pid}"
    return int(match[1])


def free_port(host: str) -> int:
    pool = PortPool()
    port = pool.port(host, UDP, TCP)
    pool.release()
    return port


# -- SIPp in the background ---------------------------------------------------------------
@dataclass
class Sipp:
    """One SIPp process started in the background, bounded by -m, -timeout and a kill."""

    name: str
    proc: subprocess.Popen[str]
    workdir: Path
    timeout: float
    started: float  # time.time() at start

    def wait(self) -> dict[str, str]:
        """Its final statistics (the last row of its -stf file)."""
        try:
            out, err = self.proc.communicate(timeout=self.timeout + 10)
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"sipp {self.name} did not finish within {self.timeout + 10} s")
        self.output = out + err
        path = self.workdir / "stat.csv"
        rows = [line.split(";") for line in path.read_text().splitlines() if line.strip()]
        assert len(rows) >= 2, f"sipp {self.name} wrote no statistics:\n{self.output}"
        return dict(zip(rows[0], rows[-1], strict=False))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=3)

    def errors(self) -> str:
        path = self.workdir / "err.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""


class SippFleet:
    """The SIPp processes of one test; every one still running is stopped at teardown."""

    def __init__(self, binary: str, tmp: Path) -> None:
        self.binary = binary
        self.tmp = tmp
        self.running: list[Sipp] = []

    def start(
        self,
        name: str,
        scenario: str,
        source: str,
        *,
        remote: tuple[str, int] | None = None,
        port: int | None = None,
        calls: int = 1,
        rate: float = 1,
        timeout: float = 20.0,
        extra: tuple[str, ...] = (),
        trace: bool = True,
    ) -> Sipp:
        workdir = self.tmp / f"sipp-{name}"
        workdir.mkdir()
        pool = PortPool()
        media = pool.block(source, 4)
        pool.release()
        port = port or free_port(source)
        args = [
            self.binary,
            "-sf", str(SCENARIOS / scenario),
            "-t", "u1",
            "-i", source,
            "-mi", source,
            "-mp", str(media),
            "-p", str(port),
            "-m", str(calls),
            "-r", f"{rate:g}",
            "-timeout", f"{timeout:g}",
            "-nostdin",
            "-trace_stat", "-stf", str(workdir / "stat.csv"),
            *(["-trace_err", "-error_file", str(workdir / "err.log"),
               "-trace_msg", "-message_file", str(workdir / "msg.log")] if trace else []),
            *extra,
        ]  # fmt: skip
        if remote is not None:
            args.append(sipwire.hostport(*remote))
        started = time.time()
        proc = subprocess.Popen(
            args,
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
        )
        sipp = Sipp(name, proc, workdir, timeout, started)
        self.running.append(sipp)
        if remote is None:  # a UAS: it is started when it listens for the calls
            wait_until(
                f"sipp {name} listening on {source}:{port}",
                lambda: udp_bound(source, port) or proc.poll() is not None,
                CALL_TIMEOUT,
                sipp.errors,
            )
            assert proc.poll() is None, f"sipp {name} exited: {proc.communicate(timeout=5)}"
        return sipp

    def stop_all(self) -> None:
        for sipp in self.running:
            sipp.stop()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[SippFleet]:
    fleet = SippFleet(require("sipp"), tmp_path)
    try:
        yield fleet
    finally:
        fleet.stop_all()


# -- tshark: what reached the backend -------------------------------------------------------
class Capture:
    """tshark on loopback, UDP to or from one port, into a file; stopped by its PID."""

    def __init__(self, binary: str, port: int, path: Path) -> None:
        self.binary = binary
        self.port = port
        self.path = path
        self.log = path.with_suffix(".log")
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [binary, "-i", "lo", "-f", f"udp port {port}", "-w", str(path),
                 "-a", "duration:120", "-q"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )  # fmt: skip
        deadline = time.monotonic() + 10.0
        while "Capturing on" not in self.log.read_text(errors="replace"):
            assert self.proc.poll() is None, self.log.read_text(errors="replace")
            assert time.monotonic() < deadline, "tshark did not start capturing"
            time.sleep(0.05)
        # tshark says "Capturing on" a moment before its filter sees packets: it captures
        # once a marker datagram, sent until one is seen, is in the file (a busy machine
        # missed the first packets of a test otherwise).
        self.caught_up(resend=True)

    def caught_up(self, *, resend: bool = False) -> None:
        """Until the file holds every packet sent on the port so far: a marker datagram sent
        now to the port (on an address nothing listens on) is in it. The capture reaches the
        file in the order packets were sent, up to half a second late. ``resend``: the
        marker again every 0.2 s, for a capture that may not see packets yet."""
        marker = f"capture-marker-{secrets.token_hex(8)}".encode()
        sent = [0.0]

        def written() -> bool:
            if resend or not sent[0]:
                now = time.monotonic()
                if now - sent[0] >= 0.2:
                    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                        sock.sendto(marker, (MARKER_HOST, self.port))
                    sent[0] = now
            return self.path.exists() and marker in self.path.read_bytes()

        wait_until(
            "tshark writing the marker datagram", written,
            CALL_TIMEOUT, lambda: self.log.read_text(errors="replace"),
        )  # fmt: skip

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.caught_up()  # SIGINT loses what tshark has not written yet
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)

    def requests(self, display_filter: str) -> set[tuple[str, str]]:
        """(Call-ID, top Via branch) of the SIP requests matching the filter: each request
        once, whatever its retransmissions."""
        proc = subprocess.run(
            [self.binary, "-r", str(self.path), "-Y", display_filter,
             "-T", "fields", "-E", "occurrence=f", "-e", "sip.Call-ID", "-e", "sip.Via.branch"],
            capture_output=True,
            text=True,
            timeout=60,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        rows = (line.split("\t") for line in proc.stdout.splitlines())
        return {(row[0], row[1]) for row in rows if len(row) == 2}


@pytest.fixture
def capture(tmp_path: Path) -> Iterator[list[Capture]]:
    started: list[Capture] = []
    try:
        yield started
    finally:
        for cap in started:
            cap.stop()


def users_csv(path: Path, *rows: tuple[str, ...]) -> Path:
    """A SIPp -inf file: SEQUENTIAL, then one row per call."""
    path.write_text("SEQUENTIAL\n" + "".join(";".join(row) + "\n" for row in rows))
    return path


def register_honestly(fleet: SippFleet, sbc: SbcProcess, tmp: Path, name: str) -> dict[str, str]:
    """USER registers from HONEST with its password through the SBC (digest, 401 then 200)."""
    csv = users_csv(
        tmp / f"{name}.csv", (USER, DOMAIN, f"[authentication username={USER} password={PASSWORD}]")
    )
    sipp = fleet.start(
        name, "register_auth.xml", HONEST, remote=(sbc.host4, sbc.udp4),
        extra=("-inf", str(csv)), timeout=10,
    )  # fmt: skip
    stats = sipp.wait()
    assert stats["SuccessfulCall(C)"] == "1", f"{sipp.output}\n{sipp.errors()}\n{sbc.log()}"
    return stats


# =========================================================================================
# SIPVicious
# =========================================================================================
def start_guarded(
    kamailio_registrars: RegistrarFactory,
    sbc_factory: SbcFactory,
    monkeypatch: pytest.MonkeyPatch,
    *lines: str,
) -> tuple[Registrar, SbcProcess]:
    """Kamailio with digest auth (qop=auth challenges, one log line per request) behind an
    SBC whose [security] is ``lines`` and trusts nobody; its probes rare, so Kamailio's
    counters are the clients' requests only."""
    monkeypatch.setenv("KAMAILIO_XLOG", "1")
    if not getattr(Registrar.command, "qop", False):
        command = Registrar.command

        def with_qop(self: Registrar) -> list[str]:
            return [*command(self), "-A", 'AUTH_FLAGS="1"']

        with_qop.qop = True  # type: ignore[attr-defined]
        monkeypatch.setattr(Registrar, "command", with_qop)
    (registrar,) = kamailio_registrars(1, auth_password=PASSWORD)
    sbc = sbc_factory(
        core=PROBES_OFF,
        extra=backends_config(registrar.uri),
        security=security(*lines),
    )
    return registrar, sbc


def scan(tool: str, sbc: SbcProcess, *args: str, timeout: float = 30) -> str:
    return run_tool(sipvicious(tool, ATTACKER, "-p", str(sbc.udp4), *args, sbc.host4), timeout)


def test_scanners_with_their_own_user_agent_get_no_answer(
    kamailio_registrars: RegistrarFactory,
    sbc_factory: SbcFactory,
    monkeypatch: pytest.MonkeyPatch,
    fleet: SippFleet,
    tmp_path: Path,
) -> None:
    """svmap finds nothing and svwar enumerates nothing: with the default User-Agent block
    list the SBC drops their requests unanswered, and Kamailio never sees one."""
    registrar, sbc = start_guarded(kamailio_registrars, sbc_factory, monkeypatch)
    register_honestly(fleet, sbc, tmp_path, "honest")  # USER exists, from another address
    before, lines_before = kamailio_requests(registrar), xlog_lines(registrar)

    svmap = scan("svmap", sbc)
    assert "found nothing" in svmap, svmap
    assert "| SIP Device" not in svmap, svmap
    svwar = {
        method: scan("svwar", sbc, "-m", method, "-e", "1000-1020", "--force",
                     "--maximumtime", "2")
        for method in ("REGISTER", "INVITE", "OPTIONS")
    }  # fmt: skip
    for method, out in svwar.items():
        assert "found nothing" in out, (method, out)
        assert "| Extension" not in out, (method, out)
        assert "No server response" in out or "timed out" in out, (method, out)
    # Part of what is tested: that nothing reaches Kamailio can only be watched for a while
    # (the scanners ended; a request the SBC let through would arrive within milliseconds).
    time.sleep(0.3)

    # (d) Kamailio saw none of their requests: its counters and its request log unchanged.
    assert kamailio_requests(registrar) == before
    assert xlog_lines(registrar) == lines_before
    # Silence was the User-Agent block list, not a ban: the same address is answered when
    # it does not call itself a scanner, and the SBC banned nobody.
    answer = options_from(ATTACKER, sbc, "honest-phone")
    assert answer is not None and answer.status == 200, sbc.log()
    assert bans(sbc) == [], sbc.log()
    emit({
        "test": "scanners_user_agent_blocked",
        "svmap_found": 0,
        "svwar_extensions_found": 0,
        "backend_requests_from_scanners": 0,
    })  # fmt: skip


def test_svwar_learns_nothing_when_not_blocked(
    kamailio_registrars: RegistrarFactory,
    sbc_factory: SbcFactory,
    monkeypatch: pytest.MonkeyPatch,
    fleet: SippFleet,
    tmp_path: Path,
) -> None:
    """With the User-Agent block list empty svwar is answered, and still enumerates
    nothing: the registered user and the unknown ones get the same answer."""
    registrar, sbc = start_guarded(
        kamailio_registrars, sbc_factory, monkeypatch, "user_agent_block = []"
    )
    register_honestly(fleet, sbc, tmp_path, "honest")
    before = kamailio_requests(registrar)
    # REGISTER: every user, registered (USER is in the range) or not, is challenged alike.
    plain = scan("svwar", sbc, "-e", "1000-1020", "--maximumtime", "2")
    assert "authentication request for an unknown extension" in plain, plain
    assert "found nothing" in plain and "| Extension" not in plain, plain
    forced = scan("svwar", sbc, "-e", "1000-1020", "--force", "--maximumtime", "2")
    assert "found nothing" in forced and "| Extension" not in forced, forced
    assert "Bad user = SIP/2.0 401" in forced, forced  # what an unknown user gets...
    assert "SIP/2.0 401 Unauthorized" in forced, forced  # ...and what the next one got
    # The SBC answered nothing itself: the challenges are Kamailio's.
    after = kamailio_requests(registrar)
    reached = after["core:rcv_requests_register"] - before["core:rcv_requests_register"]
    assert reached >= 3, (before, after)
    # OPTIONS to users at the SBC's own address: the SBC answers them itself, alike for
    # every user; it is a fast scan, so it may end in a flood ban (never a finding).
    options = scan("svwar", sbc, "-m", "OPTIONS", "-e", "1000-1400", "--maximumtime", "2")
    assert "found nothing" in options and "| Extension" not in options, options
    assert (
        kamailio_requests(registrar)["core:rcv_requests_options"]
        == after["core:rcv_requests_options"]
    )
    emit({
        "test": "svwar_not_blocked",
        "svwar_extensions_found": 0,
        "options_scan_banned": any(ip == ATTACKER for _, ip, _ in bans(sbc)),
    })  # fmt: skip


def crack(sbc: SbcProcess, words: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        sipvicious("svcrack", ATTACKER, "-p", str(sbc.udp4), "-u", USER, "-d", str(words),
                   "--maximumtime", "2", sbc.host4),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )  # fmt: skip


def finish(proc: subprocess.Popen[str], timeout: float = 30) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate(timeout=5)
        pytest.fail(f"svcrack did not finish within {timeout} s:\n{out}")
    return out


GUESSES = 60  # wrong passwords before the right one in svcrack's dictionary


def test_svcrack_is_banned_before_it_finds_the_password(
    kamailio_registrars: RegistrarFactory,
    sbc_factory: SbcFactory,
    monkeypatch: pytest.MonkeyPatch,
    fleet: SippFleet,
    capture: list[Capture],
    tmp_path: Path,
) -> None:
    """svcrack guesses USER's password from a dictionary with the right one late in it.
    Without the brute-force protection it finds it (the control); with auth_failures it is
    banned after that many failed guesses, at most that many of its guesses reach Kamailio,
    and an honest client on another address registers USER meanwhile."""
    words = tmp_path / "passwords.txt"
    words.write_text("".join(f"guess{i:03d}\n" for i in range(GUESSES)) + PASSWORD + "\n")
    # The control: no brute-force protection, no rate limits, no flood bans.
    registrar, sbc = start_guarded(
        kamailio_registrars, sbc_factory, monkeypatch,
        "user_agent_block = []", "auth_failures = 0", "auth_user_failures = 0",
        "pike_density = 0", "register = { rate = 0, burst = 1 }",
    )  # fmt: skip
    control = finish(crack(sbc, words))
    assert f"The password for {USER} is {PASSWORD}" in control or (
        re.search(rf"\|\s*{USER}\s*\|\s*{PASSWORD}\s*\|", control)
    ), control

    # Protected (the defaults but for the block list, which svcrack would not get past).
    registrar, sbc = start_guarded(
        kamailio_registrars, sbc_factory, monkeypatch,
        "user_agent_block = []", f"auth_failures = {AUTH_FAILURES}",
    )  # fmt: skip
    register_honestly(fleet, sbc, tmp_path, "honest-before")
    wire = Capture(require("tshark"), registrar.port, tmp_path / "backend.pcap")
    capture.append(wire)
    started = time.time()
    proc = crack(sbc, words)
    when, why = wait_for_ban(sbc, ATTACKER, 10)
    assert why == "auth", sbc.log()
    # Meanwhile an honest client registers the same user from another address.
    register_honestly(fleet, sbc, tmp_path, "honest-meanwhile")
    out = finish(proc)
    wire.stop()
    assert PASSWORD not in out and "| Password" not in out, out
    assert "found nothing" in out, out

    # What reached Kamailio: REGISTERs with credentials, by the SBC's Via branch (once
    # each, whatever the retransmissions), the honest client's Call-IDs left out.
    guesses = {
        branch
        for call_id, branch in wire.requests(
            f'sip.Method == "REGISTER" && sip.Authorization && udp.dstport == {registrar.port}'
        )
        if not call_id.endswith(f"@{HONEST}")
    }
    assert 1 <= len(guesses) <= AUTH_FAILURES, (len(guesses), sbc.log())
    emit({
        "test": "svcrack",
        "auth_failures": AUTH_FAILURES,
        "guesses_reaching_backend": len(guesses),
        "seconds_to_ban": round(when.timestamp() - started, 3),
        "password_found": False,
        "control_password_found": True,
        "honest_registration_during_ban": "200",
    })  # fmt: skip


# =========================================================================================
# Flood
# =========================================================================================
FLOOD_SECONDS = 8.0
FLOOD_RATE = 20000  # calls/s asked of SIPp (two requests each): more than it can send
HONEST_CALLS = 60  # registrations, and calls, each at HONEST_RATE
HONEST_RATE = 5
CEILING_RATE, CEILING_BURST = 50, 100  # [security] backend_register
RSS_GROWTH_LIMIT_KIB = 64 * 1024


def _elapsed(stats: dict[str, str]) -> float:
    """Seconds from SIPp's StartTime to its CurrentTime (each "date time epoch")."""
    return float(stats["CurrentTime"].split()[-1]) - float(stats["StartTime"].split()[-1])


def test_flood_is_banned_and_honest_clients_keep_working(
    kamailio_registrars: RegistrarFactory,
    sbc_factory: SbcFactory,
    fleet: SippFleet,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """SIPp floods REGISTER and INVITE from ATTACKER as fast as it can for FLOOD_SECONDS
    while HONEST registers and calls CALLEE at HONEST_RATE each: at least 99 % of the
    honest transactions succeed, the flooder is banned, the backend's REGISTER rate stays
    under the ceiling and the SBC's memory stays bounded."""
    monkeypatch.setenv("KAMAILIO_XLOG", "1")  # its log tells where an honest call was lost
    (registrar,) = kamailio_registrars(1)
    sbc = sbc_factory(
        core=PROBES_OFF,
        extra=backends_config(registrar.uri),
        security=security(
            f"backend_register = {{ rate = {CEILING_RATE}, burst = {CEILING_BURST} }}"
        ),
    )
    pid = sbc.proc.pid
    # bob answers calls on CALLEE, where he registered from.
    bob_port = free_port(CALLEE)
    assert register_via(sbc, "bob", bob_port, source=CALLEE).status == 200, sbc.log()
    bob = fleet.start(
        "bob", "call_basic_uas.xml", CALLEE, port=bob_port, calls=HONEST_CALLS, timeout=25
    )

    samples: list[tuple[float, int, int]] = []  # (time, backend REGISTERs, SBC RSS KiB)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append((time.monotonic(), registrar.stat("core:rcv_requests_register"),
                            rss_kib(pid)))  # fmt: skip
            done.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    rss_before = rss_kib(pid)
    sampler.start()
    users = users_csv(
        tmp_path / "honest.csv", *((f"honest{i:03d}", DOMAIN) for i in range(HONEST_CALLS))
    )
    registering = fleet.start(
        "register", "register_honest.xml", HONEST, remote=(sbc.host4, sbc.udp4),
        calls=HONEST_CALLS, rate=HONEST_RATE, timeout=40, extra=("-inf", str(users)),
    )  # fmt: skip
    calling = fleet.start(
        "alice", "call_honest_uac.xml", HONEST, remote=(sbc.host4, sbc.udp4),
        calls=HONEST_CALLS, rate=HONEST_RATE, timeout=40, extra=("-s", "bob"),
    )  # fmt: skip
    time.sleep(1.0)  # part of the scenario: the flood starts with the honest load under way
    registers_before_flood = registrar.stat("core:rcv_requests_register")
    flood = fleet.start(
        "flood", "flood_uac.xml", ATTACKER, remote=(sbc.host4, sbc.udp4),
        calls=int(FLOOD_RATE * FLOOD_SECONDS), rate=FLOOD_RATE, timeout=FLOOD_SECONDS,
        extra=("-rate_increase", "0", "-l", "100000"), trace=False,
    )  # fmt: skip
    flood_stats = flood.wait()
    registers_in_flood = registrar.stat("core:rcv_requests_register") - registers_before_flood
    banned_at, why = wait_for_ban(sbc, ATTACKER, 1.0)
    reg_stats, call_stats, bob_stats = registering.wait(), calling.wait(), bob.wait()
    done.set()
    sampler.join(timeout=5)
    rss_after = rss_kib(pid)

    # The flood: what SIPp sent, and the ban.
    flood_requests = 2 * int(flood_stats["OutgoingCall(C)"])
    flood_seconds = _elapsed(flood_stats)
    assert why == "flood", sbc.log()
    assert {ip for _, ip, _ in bans(sbc)} == {ATTACKER}, sbc.log()
    # The honest clients: at least 99 % of their transactions succeeded.
    succeeded = int(reg_stats["SuccessfulCall(C)"]) + int(call_stats["SuccessfulCall(C)"])
    attempted = int(reg_stats["OutgoingCall(C)"]) + int(call_stats["OutgoingCall(C)"])
    assert attempted == 2 * HONEST_CALLS, (reg_stats, call_stats)
    honest_rate = succeeded / attempted
    assert honest_rate >= 0.99, (
        f"{succeeded}/{attempted}\n{registering.errors()}\n{calling.errors()}\n{bob.errors()}"
    )
    # The backend: REGISTERs received in any sampled interval within the ceiling's bucket.
    worst = 0.0
    for (t0, n0, _), (t1, n1, _) in itertools.pairwise(samples):
        allowed = CEILING_BURST + CEILING_RATE * (t1 - t0)
        assert n1 - n0 <= allowed, (n1 - n0, allowed, samples)
        worst = max(worst, (n1 - n0) / (t1 - t0))
    assert registers_in_flood <= CEILING_BURST + CEILING_RATE * flood_seconds
    # Memory: bounded while the flood lasted and after it.
    rss_peak = max(rss for _, _, rss in samples)
    assert rss_peak - rss_before < RSS_GROWTH_LIMIT_KIB, (rss_before, rss_peak)
    assert rss_after - rss_before < RSS_GROWTH_LIMIT_KIB, (rss_before, rss_after)
    emit({
        "test": "flood",
        "flood_requests_sent": flood_requests,
        "flood_seconds": round(flood_seconds, 2),
        "flood_rate_per_s": round(flood_requests / flood_seconds),
        "seconds_to_ban": round(banned_at.timestamp() - flood.started, 3),
        "bans_issued": len(bans(sbc)),
        "honest_transactions": attempted,
        "honest_succeeded": succeeded,
        "honest_success_rate": round(honest_rate, 4),
        "callee_calls_answered": int(bob_stats["SuccessfulCall(C)"]),
        "backend_register_ceiling": f"{CEILING_RATE}/s burst {CEILING_BURST}",
        "backend_registers_during_flood": registers_in_flood,
        "backend_register_rate_during_flood": round(registers_in_flood / flood_seconds, 1),
        "backend_register_rate_worst_half_second": round(worst, 1),
        "sbc_rss_kib_before": rss_before,
        "sbc_rss_kib_peak": rss_peak,
        "sbc_rss_kib_after": rss_after,
    })  # fmt: skip
