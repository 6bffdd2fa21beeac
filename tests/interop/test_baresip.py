"""A real softphone (baresip 1.0) registers through the real SBC to a real Kamailio.

baresip runs as a subprocess with its own config dir (``-f``), no audio device (the ``aufile``
source/player on /dev/null, no audio driver module loaded), a bounded life (``-t``) and the
``ctrl_tcp`` module on a free loopback port. The test talks to it over that socket: JSON in
netstrings (``LEN:{...},``), commands answered with ``"response": true`` and the same token,
events (REGISTERING, REGISTER_OK, REGISTER_FAIL, UNREGISTERING, ...) pushed unasked.

The account is added with the ``uanew`` command (menu module) once the control socket is
connected, not read from the ``accounts`` file: baresip registers its accounts as soon as it
is ready, and over loopback the REGISTER_OK can come before anybody is connected to hear it.

baresip's own SIP trace (``-s``) is its log: it shows which transport and address each
REGISTER went to, which is how these tests tell UDP from TLS on the client's side.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from .conftest import (
    TCP,
    Certs,
    PortPool,
    Registrar,
    RegistrarFactory,
    SbcFactory,
    SbcProcess,
    require,
)

MODULES = Path("/usr/lib/baresip/modules")
START_TIMEOUT = 5.0  # until its control socket accepts
REGISTER_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0  # a graceful quit un-registers first: about 1 s
LIFETIME = 30  # -t: baresip quits by itself after this even if the test never stops it
USER = "alice"
DOMAIN = "example.com"
READY = "baresip is ready."
CTRL_FAILED = "ctrl_tcp: failed to listen"


class BaresipError(AssertionError):
    pass


@dataclass
class Baresip:
    """One baresip process and the test's connection to its ctrl_tcp socket."""

    proc: subprocess.Popen[bytes]
    confdir: Path
    log_path: Path
    ctrl_port: int
    sock: socket.socket | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    _buffer: bytes = b""
    _tokens: Iterator[int] = field(default_factory=lambda: iter(range(1, 1_000_000)))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def explain(self) -> str:
        events = "\n".join(json.dumps(e) for e in self.events)
        return f"--- baresip events ---\n{events}\n--- baresip log ---\n{self.log()[-8000:]}"

    # -- control socket
    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Until baresip says it is ready (its modules are loaded by then). A ctrl_tcp that
        could not listen does not stop baresip: that is an error here, or the test would
        talk to whoever holds the port."""
        deadline = time.monotonic() + timeout
        while READY not in self.log():
            if self.proc.poll() is not None:
                raise BaresipError(f"baresip exited with {self.proc.returncode}\n{self.explain()}")
            if time.monotonic() >= deadline:
                raise BaresipError(f"baresip not ready within {timeout} s\n{self.explain()}")
            time.sleep(0.02)
        if CTRL_FAILED in self.log():
            raise BaresipError(f"ctrl_tcp could not listen on {self.ctrl_port}\n{self.explain()}")

    def connect(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise BaresipError(f"baresip exited with {self.proc.returncode}\n{self.explain()}")
            try:
                self.sock = socket.create_connection(("127.0.0.1", self.ctrl_port), timeout=0.5)
                return
            except OSError as exc:
                if time.monotonic() >= deadline:
                    raise BaresipError(
                        f"ctrl_tcp on port {self.ctrl_port} not up within {timeout} s: {exc}"
                        f"\n{self.explain()}"
                    ) from exc
                time.sleep(0.05)

    def _read_message(self, deadline: float) -> dict[str, Any] | None:
        """The next netstring's JSON, or None at the deadline or when baresip closed it."""
        assert self.sock is not None
        while True:
            length, colon, rest = self._buffer.partition(b":")
            if colon:
                if not length.isdigit():
                    raise BaresipError(f"not a netstring from ctrl_tcp: {self._buffer[:80]!r}")
                size = int(length)
                if len(rest) > size:
                    assert rest[size : size + 1] == b",", self._buffer[:80]
                    self._buffer = rest[size + 1 :]
                    message: dict[str, Any] = json.loads(rest[:size])
                    if message.get("event"):
                        self.events.append(message)
                    return message
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return None
            if not data:
                return None
            self._buffer += data

    def command(self, command: str, params: str = "", timeout: float = 3.0) -> dict[str, Any]:
        """Send one command; its response (events that come meanwhile are kept)."""
        assert self.sock is not None
        token = str(next(self._tokens))
        body = json.dumps({"command": command, "params": params, "token": token}).encode()
        self.sock.sendall(b"%d:%s," % (len(body), body))
        deadline = time.monotonic() + timeout
        while (message := self._read_message(deadline)) is not None:
            if message.get("response") and message.get("token") == token:
                if not message.get("ok"):
                    raise BaresipError(f"{command} {params!r} failed: {message}\n{self.explain()}")
                return message
        raise BaresipError(f"no response to {command} within {timeout} s\n{self.explain()}")

    def wait_event(self, kind: str, timeout: float = REGISTER_TIMEOUT, count: int = 1) -> float:
        """Until ``count`` events of this type were seen in all; the time it took. A
        REGISTER_FAIL fails at once."""
        start = time.monotonic()
        deadline = start + timeout
        while True:
            if sum(e.get("type") == kind for e in self.events) >= count:
                return time.monotonic() - start
            failed = [e for e in self.events if e.get("type") == "REGISTER_FAIL"]
            if failed and kind != "REGISTER_FAIL":
                raise BaresipError(f"REGISTER_FAIL: {failed[0].get('param')}\n{self.explain()}")
            if self._read_message(deadline) is None and time.monotonic() >= deadline:
                raise BaresipError(f"no {count} x {kind} within {timeout} s\n{self.explain()}")

    def count(self, kind: str) -> int:
        return sum(e.get("type") == kind for e in self.events)

    # -- the SIP trace (-s)
    def trace(self, start: str) -> list[str]:
        """The SIP messages in baresip's trace whose start line begins with ``start``, each
        with the trace's transport line first (``UDP 127.0.0.1:A -> 127.0.0.1:B``)."""
        log = re.sub(r"\x1b\[[0-9;]*m", "", self.log()).replace("\r\n", "\n")
        blocks = (block.strip().split("\n", 2) for block in log.split("#\n"))
        return [
            "\n".join(lines)
            for lines in blocks
            if len(lines) > 1
            and re.fullmatch(r"(UDP|TCP|TLS) \S+ -> \S+", lines[0])
            and lines[1].startswith(start)
        ]

    def sent_registers(self) -> list[str]:
        """Each REGISTER once (a UDP retransmission, same CSeq, is left out)."""
        unique: dict[int, str] = {}
        for register in self.trace("REGISTER sip:"):
            unique.setdefault(_cseq(register), register)
        return list(unique.values())

    def final_responses(self) -> list[str]:
        return [m for m in self.trace("SIP/2.0 ") if not m.split("\n")[1].startswith("SIP/2.0 1")]

    # -- life cycle
    def stop(self, timeout: float = STOP_TIMEOUT) -> str | None:
        """SIGTERM (baresip un-registers, then exits), wait; SIGKILL if it takes longer.
        A complaint if it had to be killed or did not exit 0."""
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)
                return f"baresip not gone {timeout} s after SIGTERM; killed"
        if self.proc.returncode != 0:
            return f"baresip exited with {self.proc.returncode}"
        return None


def _config(ctrl_port: int, cafile: Path | None) -> str:
    # No audio driver module: aufile reads/writes files, /dev/null is enough for registration.
    # sip_listen on port 0: each transport listens on a free port of its own (with a port N,
    # UDP/TCP take N and TLS N+1, two ports to find free).
    return f"""\
poll_method		epoll
sip_listen		127.0.0.1:0
{f"sip_cafile		{cafile}" if cafile else ""}
net_interface		127.0.0.1
call_max_calls		1
audio_player		aufile,/dev/null
audio_source		aufile,/dev/null
audio_alert		aufile,/dev/null
module_path		{MODULES}
module			g711.so
module_tmp		uuid.so
module_tmp		account.so
module_app		menu.so
module_app		ctrl_tcp.so
ctrl_tcp_listen		127.0.0.1:{ctrl_port}
"""


BaresipFactory = Callable[..., Baresip]


def came_up(phone: Baresip, attempt: int, attempts: int = 3) -> bool:
    """Whether a freshly started baresip answers on its control socket: True, or False to
    start it again on another port (the free port was taken between the probe and its bind);
    any other failure, or the last attempt, fails the test."""
    try:
        phone.wait_ready()
        phone.connect()
        return True
    except BaresipError as exc:
        phone.stop()
        if CTRL_FAILED not in phone.log() or attempt == attempts - 1:
            pytest.fail(str(exc))
        return False


def stop_all(phones: list[Baresip]) -> None:
    """Stop each by its PID, print its events and log, and fail on any that misbehaved."""
    problems = []
    for phone in phones:
        problem = phone.stop()
        name = getattr(phone, "name", "")
        print(f"--- baresip {name} ({phone.log_path}) ---\n{phone.explain()}")
        if problem:
            problems.append(f"{name}: {problem}" if name else problem)
    assert not problems, "\n".join(problems)


@pytest.fixture
def baresip(tmp_path: Path) -> Iterator[BaresipFactory]:
    """``baresip(cafile=None)`` starts a baresip with no account, connected to its control
    socket; ``.command("uanew", ACCOUNT)`` adds one. Each is stopped by its PID at teardown."""
    binary = require("baresip")
    started: list[Baresip] = []

    def start(*, cafile: Path | None = None) -> Baresip:
        n = len(started)
        confdir = tmp_path / f"baresip-{n}"
        confdir.mkdir()
        for attempt in range(3):
            pool = PortPool()
            ctrl_port = pool.port("127.0.0.1", TCP)
            pool.release()  # baresip binds it now
            (confdir / "config").write_text(_config(ctrl_port, cafile))
            (confdir / "accounts").write_text("")  # none: see the module docstring
            log_path = confdir / f"baresip-{attempt}.log"
            with log_path.open("wb") as log:
                proc = subprocess.Popen(
                    [binary, "-f", str(confdir), "-t", str(LIFETIME), "-s"],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                )
            phone = Baresip(proc=proc, confdir=confdir, log_path=log_path, ctrl_port=ctrl_port)
            started.append(phone)
            if came_up(phone, attempt):
                return phone
        raise AssertionError("unreachable")

    try:
        yield start
    finally:
        stop_all(started)


def _backends(*uris: str) -> str:
    return "".join(f'\n[[core.backends]]\nuri = "{uri}"\n' for uri in uris)


def _account(sbc_port: int, transport: str, regint: int = 3600) -> str:
    """alice's account, registering through the SBC: the outbound proxy becomes the Route of
    her REGISTER (whose Request-URI stays sip:example.com).

    baresip 1.0 takes the transport from the outbound URI's ;transport (none: UDP), and puts
    it in its Contact. The account URI's ;transport does not count once there is an outbound
    proxy (its REGISTER to a TLS port then goes out over UDP); it is set to say the same.
    Without regint baresip asks for 3600 s plus a random 0-255 s: the tests give it."""
    param = f";transport={transport}" if transport != "udp" else ""
    return (
        f'<sip:{USER}@{DOMAIN}{param}>;outbound="sip:127.0.0.1:{sbc_port}{param}";regint={regint}'
    )


def _header(message: str, name: str) -> str:
    match = re.search(rf"^{name}: *(.*)$", message, re.M | re.I)
    assert match, f"no {name} in\n{message}"
    return match.group(1).strip()


def _cseq(message: str) -> int:
    return int(_header(message, "CSeq").split()[0])


def _binding(registrar: Registrar, sbc: SbcProcess) -> dict[str, object]:
    """alice's one binding at Kamailio, checked: Path names the SBC core port with a flow
    token user part, and the backend got the long expiry."""
    bindings = registrar.bindings()
    assert USER in bindings, bindings
    (binding,) = bindings[USER]
    core = sbc.extra_ports["core"]
    assert re.fullmatch(rf"<sip:[a-z2-7]+@127\.0\.0\.1:{core};lr>", str(binding["path"])), binding
    # baresip's Contact user is the account user plus a suffix (alice-0x...).
    assert str(binding["contact"]).startswith(f"sip:{USER}-"), binding
    # The SBC asked for backend_expires (3600 less up to 10 % spread), not the client's.
    assert 3240 - 10 <= int(str(binding["expires"])) <= 3600, binding
    return binding


def _registers(registrar: Registrar) -> int:
    return registrar.stat("core:rcv_requests_register")


def _register_once(phone: Baresip, account: str, sbc_port: int, transport: str) -> str:
    """Add the account, wait for REGISTER_OK; the one REGISTER baresip sent, checked to have
    gone to the SBC's ``sbc_port`` over ``transport``."""
    phone.command("uanew", account)
    phone.wait_event("REGISTER_OK")
    (register,) = phone.sent_registers()
    first = register.split("\n", 1)[0]
    assert re.fullmatch(rf"{transport.upper()} 127\.0\.0\.1:\d+ -> 127\.0\.0\.1:{sbc_port}", first)
    return register


def _response_to(phone: Baresip, register: str) -> str:
    """The final response baresip received to one of its REGISTERs (the first, if the
    SBC answered a retransmission again)."""
    responses = [r for r in phone.final_responses() if _cseq(r) == _cseq(register)]
    assert responses, f"no final response to CSeq {_cseq(register)}\n{phone.explain()}"
    return responses[0]


def _granted(phone: Baresip, register: str) -> int:
    """The expiry the 200 to ``register`` gave baresip's contact."""
    ok = _response_to(phone, register)
    assert ok.split("\n")[1].startswith("SIP/2.0 200"), ok
    match = re.search(r";expires=(\d+)", _header(ok, "Contact"))
    assert match, ok
    return int(match.group(1))


def _quit_and_check_unregistered(phone: Baresip, registrar: Registrar, before: int) -> None:
    """A graceful quit (SIGTERM) sends REGISTER with expires=0 and waits for its answer; the
    SBC relays it (the backend counts one more REGISTER) and the binding is gone at Kamailio."""
    assert phone.stop() is None, phone.explain()
    unregister = phone.sent_registers()[-1]
    assert re.search(r";expires=0\b", _header(unregister, "Contact")), unregister
    assert _response_to(phone, unregister).split("\n")[1].startswith("SIP/2.0 200")
    deadline = time.monotonic() + 3.0
    while USER in registrar.aors():
        assert time.monotonic() < deadline, registrar.bindings()
        time.sleep(0.1)
    assert _registers(registrar) == before + 1


def _registers_and_unregisters(
    registrar: Registrar, sbc: SbcProcess, phone: Baresip, transport: str, granted: int
) -> None:
    port = sbc.tls4 if transport == "tls" else sbc.udp4
    before = _registers(registrar)
    register = _register_once(phone, _account(port, transport), port, transport)
    # Offload: baresip asked for 3600 s and was given the SBC's short expiry for its
    # transport; Kamailio was asked for the long one (checked by _binding).
    assert re.search(r";expires=3600\b", _header(register, "Contact")), register
    assert _granted(phone, register) == granted
    binding = _binding(registrar, sbc)
    contact = str(binding["contact"])
    if transport == "udp":
        assert ";transport=" not in contact, binding
    else:
        assert contact.endswith(f";transport={transport}"), binding
    assert _registers(registrar) == before + 1
    _quit_and_check_unregistered(phone, registrar, before + 1)


def test_baresip_registers_over_udp(
    kamailio_registrars: RegistrarFactory, sbc_factory: SbcFactory, baresip: BaresipFactory
) -> None:
    (registrar,) = kamailio_registrars(1)
    sbc = sbc_factory(extra=_backends(registrar.uri))
    # [registration.client_expires] udp: 60 by default.
    _registers_and_unregisters(registrar, sbc, baresip(), "udp", granted=60)


def test_baresip_registers_over_tcp(
    kamailio_registrars: RegistrarFactory, sbc_factory: SbcFactory, baresip: BaresipFactory
) -> None:
    (registrar,) = kamailio_registrars(1)
    sbc = sbc_factory(extra=_backends(registrar.uri))
    _registers_and_unregisters(registrar, sbc, baresip(), "tcp", granted=300)


def test_baresip_registers_over_tls(
    kamailio_registrars: RegistrarFactory,
    sbc_factory: SbcFactory,
    baresip: BaresipFactory,
    certs: Certs,
) -> None:
    """TLS to the SBC's TLS port by IP address (127.0.0.1 is in the dev cert's SAN; baresip
    1.0 resolves names with its own DNS client, not /etc/hosts, so "localhost" fails with
    "Destination address required"). baresip is given the dev CA but does not enforce it: it
    registers with no CA or a wrong one too, so this shows TLS interop, not that baresip
    checked the SBC's certificate."""
    (registrar,) = kamailio_registrars(1)
    sbc = sbc_factory(extra=_backends(registrar.uri))
    _registers_and_unregisters(registrar, sbc, baresip(cafile=certs.ca), "tls", granted=300)


# baresip refreshes at 90 % of the granted expiry: about every 3.6 s. baresip 1.0 takes any
# regint; the SBC grants min(asked, client_expires) and has no Min-Expires (no 423 Interval
# Too Brief): if it gets one, this test must ask for at least that.
REFRESH_REGINT = 4


def test_baresip_refreshes_are_offloaded(
    kamailio_registrars: RegistrarFactory, sbc_factory: SbcFactory, baresip: BaresipFactory
) -> None:
    """Baresip asks for a short expiry and refreshes on its
    own; the SBC answers the unchanged refreshes itself, so Kamailio sees only the first
    REGISTER (and the final de-REGISTER)."""
    (registrar,) = kamailio_registrars(1)
    sbc = sbc_factory(extra=_backends(registrar.uri))
    phone = baresip()
    before = _registers(registrar)
    account = _account(sbc.udp4, "udp", regint=REFRESH_REGINT)
    first = _register_once(phone, account, sbc.udp4, "udp")
    assert _granted(phone, first) == REFRESH_REGINT
    # Two refreshes: baresip sends each about 3.6 s after the last 200.
    took = phone.wait_event("REGISTER_OK", timeout=2 * REFRESH_REGINT + 2, count=3)
    assert took >= 2 * 0.8 * REFRESH_REGINT, took  # refreshes, not retries
    sent = phone.sent_registers()
    assert len(sent) == 3, sent
    # Same Call-ID, rising CSeq, same Contact: refreshes the SBC may answer itself.
    assert len({_header(r, "Call-ID") for r in sent}) == 1, sent
    assert len({_header(r, "Contact") for r in sent}) == 1, sent
    assert [_cseq(r) for r in sent] == [_cseq(first) + i for i in range(3)], sent
    assert all(_granted(phone, r) == REFRESH_REGINT for r in sent)
    binding = _binding(registrar, sbc)
    assert int(str(binding["cseq"])) == _cseq(first), binding  # Kamailio saw only the first
    assert _registers(registrar) == before + 1
    _quit_and_check_unregistered(phone, registrar, before + 1)
