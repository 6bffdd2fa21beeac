"""Calls through the real SBC and a real Kamailio, between SIPp user agents.

alice is a SIPp UAC sending to the SBC's access side; bob is a SIPp UAS. bob's REGISTER goes
through the SBC to Kamailio from the UDP port the UAS then listens on, so the SBC sends
calls for bob there (the flow of his REGISTER). A call alice -> bob crosses the SBC twice:

    alice -> SBC access -> SBC core -> Kamailio -> SBC core -> SBC access -> bob

Each side's SIPp scenario (scenarios/call_*.xml) fails on any message it does not expect;
each side's message log (``-trace_msg``) is then parsed to check what crossed: bob never
sees alice's Call-ID or tags, and neither side sees anything of the core (Kamailio's port,
the SBC's core port) in a header, and every SDP names only the SBC's relay ports (topology
hiding; media anchoring). At the end of each test the SBC holds no call: every call it
started is logged as ended, and its call records say how.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
import tomllib
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from . import sipwire
from .conftest import (
    SCENARIOS,
    UDP,
    PortPool,
    Registrar,
    RegistrarFactory,
    SbcFactory,
    SbcProcess,
    SippResult,
    require,
    sbc_command,
    udp_bound,
)

pytestmark = pytest.mark.interop

HOST = "127.0.0.1"
DOMAIN = "example.com"
SIPP_TIMEOUT = 15.0  # every SIPp run: -timeout, and a kill a few seconds after it


# -- SIPp message logs ----------------------------------------------------------------------
@dataclass(frozen=True)
class Message:
    """One SIP message from a SIPp ``-trace_msg`` log, as SIPp sent or received it."""

    direction: str  # "sent" or "received"
    text: str
    at: float  # when SIPp logged it (seconds since the epoch, local time)

    @property
    def first_line(self) -> str:
        return self.text.split("\n", 1)[0].strip()

    @property
    def head(self) -> str:
        return self.text.split("\n\n", 1)[0]

    @property
    def body(self) -> str:
        parts = self.text.split("\n\n", 1)
        return parts[1] if len(parts) == 2 else ""

    @property
    def status(self) -> int | None:
        match = re.match(r"SIP/2\.0 (\d{3})", self.first_line)
        return int(match[1]) if match else None

    @property
    def method(self) -> str:
        """The request's method, or the CSeq method of a response."""
        if self.status is None:
            return self.first_line.split(" ", 1)[0]
        return self.header("CSeq").split()[-1]

    def headers(self, name: str) -> list[str]:
        compact = {"via": "v", "from": "f", "to": "t", "call-id": "i", "contact": "m"}
        names = {name.lower(), compact.get(name.lower(), name.lower())}
        out = []
        for line in self.head.split("\n")[1:]:
            key, sep, value = line.partition(":")
            if sep and key.strip().lower() in names:
                out.append(value.strip())
        return out

    def header(self, name: str) -> str:
        values = self.headers(name)
        assert values, f"no {name} in:\n{self.text}"
        return values[0]

    def tag(self, name: str) -> str | None:
        match = re.search(r";\s*tag=([^;>\s]+)", self.header(name))
        return match[1] if match else None

    def label(self) -> str:
        """``INVITE``, ``180 INVITE``...: what the scenario steps are named by."""
        return self.method if self.status is None else f"{self.status} {self.method}"


_SEPARATOR = re.compile(r"^-{10,} (\d{4}-\d\d-\d\d\s+\d\d:\d\d:\d\d\.\d+)\s*$", re.M)
_DIRECTION = re.compile(r"^\S+ message (sent|received)\b.*$", re.M)


def parse_messages(log: str) -> list[Message]:
    """Every SIP message in a SIPp ``-trace_msg`` file, in order.

    Each message follows a line of dashes and a time stamp, then "UDP message sent (N
    bytes):" or "UDP message received [N] bytes :", and an empty line.
    """
    messages = []
    parts = _SEPARATOR.split(log)
    for stamp, chunk in zip(parts[1::2], parts[2::2], strict=True):
        match = _DIRECTION.search(chunk)
        if match is None:
            continue
        text = chunk[match.end() :].replace("\r\n", "\n").strip("\n")
        at = datetime.strptime(re.sub(r"\s+", " ", stamp), "%Y-%m-%d %H:%M:%S.%f").timestamp()
        if text:
            messages.append(Message(match[1], text + "\n", at))
    return messages


# -- SIPp processes -------------------------------------------------------------------------
@dataclass
class Sipp:
    """One SIPp process started in the background (bounded by -m, -timeout and a kill)."""

    name: str
    proc: subprocess.Popen[str]
    workdir: Path
    port: int
    timeout: float

    def wait(self) -> SippResult:
        try:
            out, err = self.proc.communicate(timeout=self.timeout + 5)
        except subprocess.TimeoutExpired:
            self.stop()
            out, err = self.proc.communicate(timeout=5)
            pytest.fail(f"sipp {self.name} did not finish within {self.timeout + 5} s:\n{out}")
        return SippResult(
            returncode=self.proc.returncode,
            stats=_stats(self.workdir / "stat.csv"),
            output=out + err,
            errors=_read(self.workdir / "err.log"),
            messages=_read(self.workdir / "msg.log"),
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=3)

    def messages(self) -> list[Message]:
        return parse_messages(_read(self.workdir / "msg.log"))


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _stats(path: Path) -> dict[str, str]:
    rows = [line.split(";") for line in _read(path).splitlines() if line.strip()]
    return dict(zip(rows[0], rows[-1], strict=False)) if len(rows) >= 2 else {}


def register_via(
    sbc: SbcProcess, user: str, port: int, *, source: str = HOST, expires: int = 600
) -> sipwire.Response:
    """A REGISTER for ``user`` through the SBC's UDP access port from ``source:port`` (where
    the user's UAS will listen): the SBC sends the user's calls back there. Its final
    response."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, port))
        local = f"{source}:{port}"
        tag = f"reg{port}"
        lines = [
            f"REGISTER sip:{DOMAIN} SIP/2.0",
            f"Via: SIP/2.0/UDP {local};branch=z9hG4bK{tag}{time.monotonic_ns()};rport",
            "Max-Forwards: 70",
            f"From: <sip:{user}@{DOMAIN}>;tag={tag}",
            f"To: <sip:{user}@{DOMAIN}>",
            f"Call-ID: {tag}-{user}@interop",
            "CSeq: 1 REGISTER",
            f"Contact: <sip:{user}@{local}>",
            f"Expires: {expires}",
            "Content-Length: 0",
        ]
        sock.sendto(("\r\n".join(lines) + "\r\n\r\n").encode(), (sbc.host4, sbc.udp4))
        deadline = time.monotonic() + 5.0
        while True:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            response = sipwire.parse_response(sock.recvfrom(65535)[0])
            if response.status >= 200:
                return response


@dataclass
class Lab:
    """Kamailio behind the SBC, and the SIPp user agents of one test."""

    sbc: SbcProcess
    registrar: Registrar
    records: Path
    tmp: Path
    binary: str
    running: list[Sipp] = field(default_factory=list)

    def free_port(self) -> int:
        pool = PortPool()
        port = pool.port(HOST, UDP)
        pool.release()
        return port

    def media_port(self) -> int:
        pool = PortPool()
        port = pool.block(HOST, 4)
        pool.release()
        return port

    def register(self, user: str, port: int, *, expires: int = 600) -> sipwire.Response:
        """bob's REGISTER through the SBC from ``127.0.0.1:port`` (the port his UAS will
        listen on): the SBC sends his calls back to the address the REGISTER came from."""
        return register_via(self.sbc, user, port, expires=expires)

    def start(
        self,
        name: str,
        scenario: str,
        *,
        port: int | None = None,
        service: str | None = None,
        timeout: float = SIPP_TIMEOUT,
        extra: tuple[str, ...] = (),
        calls: int = 1,
        transport: str = "u1",
    ) -> Sipp:
        """SIPp with ``scenario`` in the background: a UAS on ``port`` (no remote), or a UAC
        calling ``service`` through the SBC's access UDP port; ``calls`` of them, over
        ``transport`` (SIPp -t: un is a socket, so a source port, per call)."""
        workdir = self.tmp / f"sipp-{name}"
        workdir.mkdir()
        port = port or self.free_port()
        args = [
            self.binary,
            "-sf", str(SCENARIOS / scenario),
            "-t", transport,
            "-i", HOST,
            "-mi", HOST,
            "-mp", str(self.media_port()),  # not SIPp's fixed 6000: another program may hold it
            "-p", str(port),
            "-m", str(calls),
            "-timeout", f"{timeout:g}",
            "-timeout_error",
            "-nostdin",
            "-trace_stat", "-stf", str(workdir / "stat.csv"),
            "-trace_err", "-error_file", str(workdir / "err.log"),
            "-trace_msg", "-message_file", str(workdir / "msg.log"),
            *extra,
        ]  # fmt: skip
        if service is not None:
            args += ["-s", service, sipwire.hostport(HOST, self.sbc.udp4)]
        proc = subprocess.Popen(
            args,
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
        )
        sipp = Sipp(name, proc, workdir, port, timeout)
        self.running.append(sipp)
        deadline = time.monotonic() + 5.0
        while not udp_bound(HOST, port):
            if proc.poll() is not None or time.monotonic() > deadline:
                out, err = proc.communicate(timeout=5)
                pytest.fail(f"sipp {name} did not start on port {port}:\n{out}{err}")
            time.sleep(0.01)
        return sipp

    def callee(
        self,
        scenario: str,
        user: str = "bob",
        name: str | None = None,
        timeout: float = SIPP_TIMEOUT,
    ) -> Sipp:
        """A UAS registered as ``user`` through the SBC, listening where it registered from."""
        port = self.free_port()
        response = self.register(user, port)
        assert response.status == 200, response.raw
        return self.start(name or user, scenario, port=port, timeout=timeout)

    def caller(
        self,
        scenario: str,
        callee: str = "bob",
        name: str = "alice",
        timeout: float = SIPP_TIMEOUT,
    ) -> Sipp:
        """A UAC calling ``callee``@example.com through the SBC's access UDP port."""
        return self.start(name, scenario, service=callee, timeout=timeout)

    def calls(self) -> list[dict[str, object]]:
        """The SBC's call records (one JSON line per ended INVITE call)."""
        text = _read(self.records)
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def wait_records(self, count: int, timeout: float = 3.0) -> list[dict[str, object]]:
        """The call records once ``count`` are written (they are flushed every 0.5 s)."""
        deadline = time.monotonic() + timeout
        while len(self.calls()) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.calls()

    def assert_no_calls_left(self) -> None:
        """Every call the SBC logged as started is logged as ended: it holds none."""
        log = self.sbc.log()
        started = set(re.findall(r"INVITE to \w+.*?\bcall=(\w+)", log))
        ended = set(re.findall(r"call ended: .*?\bcall=(\w+)", log))
        assert started, log
        assert started <= ended, f"calls not ended: {started - ended}\n{log}"
        assert self.sbc.proc.poll() is None, log
        assert self.sbc.options_udp().status == 200, log  # and it still answers


LabFactory = Callable[..., Lab]


@pytest.fixture
def lab_factory(
    kamailio_registrars: RegistrarFactory, sbc_factory: SbcFactory, tmp_path: Path
) -> Iterator[LabFactory]:
    """``lab_factory(extra="...", media="...", record_route=True, workers=1)``: one Kamailio
    behind a real SBC (``extra`` adds config sections, ``media`` [media] keys;
    ``record_route=False``: kamailio-no-rr.cfg; ``workers``: [sbc] workers), with call
    records on; every SIPp started through it is stopped at teardown."""
    binary = require("sipp")
    labs: list[Lab] = []

    def make(
        *, extra: str = "", media: str = "", record_route: bool = True, workers: int = 1
    ) -> Lab:
        (registrar,) = kamailio_registrars(1, record_route=record_route)
        records = tmp_path / f"calls-{len(labs)}.jsonl"
        sbc = sbc_factory(
            extra=f'\n[[core.backends]]\nuri = "{registrar.uri}"\n'
            f'\n[calls]\nrecords = "{records}"\n{extra}',
            media=media,
            workers=workers,
        )
        lab = Lab(sbc, registrar, records, tmp_path, binary)
        labs.append(lab)
        return lab

    try:
        yield make
    finally:
        for lab in labs:
            for sipp in lab.running:
                sipp.stop()


@pytest.fixture
def lab(lab_factory: LabFactory) -> Lab:
    return lab_factory()


# -- checks ---------------------------------------------------------------------------------
def passed(*sipps: Sipp) -> list[list[Message]]:
    """Wait for every SIPp given; each one's call must have passed. Their messages."""
    results = [(sipp, sipp.wait()) for sipp in sipps]
    failed = [
        f"=== {sipp.name}: {result.explain()}"
        for sipp, result in results
        if result.returncode != 0 or result.stats.get("SuccessfulCall(C)") != "1"
    ]
    if failed:
        everyone = "\n".join(f"=== {sipp.name} messages:\n{r.messages}" for sipp, r in results)
        pytest.fail("\n".join(failed) + "\n" + everyone)
    return [parse_messages(result.messages) for _, result in results]


def received(messages: list[Message]) -> list[Message]:
    return [m for m in messages if m.direction == "received"]


def sent(messages: list[Message]) -> list[Message]:
    return [m for m in messages if m.direction == "sent"]


def labels(messages: list[Message]) -> list[str]:
    return [m.label() for m in messages]


def media_ports(lab: Lab) -> range:
    """The SBC's [media] port range (from its config)."""
    low, high = tomllib.loads(lab.sbc.config.read_text())["media"]["ports"].split("-")
    return range(int(low), int(high) + 1)


def sdp_port(message: Message) -> int:
    return int(message.body.split("m=audio ", 1)[1].split()[0])


def assert_hidden(lab: Lab, caller: list[Message], callee: list[Message]) -> None:
    """Topology hiding: bob never sees alice's Call-ID or tags, nor alice
    bob's; neither sees Kamailio or the SBC's core side in any header; every SDP either
    receives has its m= ports in the SBC's relay range."""
    core = [f"{HOST}:{lab.registrar.port}", f"{HOST}:{lab.sbc.extra_ports['core']}"]
    core_ports = [f":{lab.registrar.port}", f":{lab.sbc.extra_ports['core']}"]
    for own, other in ((caller, callee), (callee, caller)):
        secrets_ = set()
        for message in sent(own):
            secrets_.add(message.header("Call-ID"))
            for name in ("From", "To"):
                tag = message.tag(name)
                if tag is not None and message.status is None:
                    secrets_.add(tag)
        # The tag a side puts in its own responses' To is its own too.
        for message in sent(own):
            if message.status is not None:
                tag = message.tag("To")
                if tag:
                    secrets_.add(tag)
        for message in received(other):
            for secret in secrets_:
                assert secret not in message.head, (secret, message.text)
    for message in received(caller) + received(callee):
        for needle in core + core_ports:
            assert needle not in message.head, (needle, message.text)
        assert "kamailio" not in message.head.lower(), message.text
        for m_line in re.findall(r"^m=\S+ (\d+)", message.body, re.M):
            assert int(m_line) == 0 or int(m_line) in media_ports(lab), message.text


def admin_get(sbc: SbcProcess, path: str) -> tuple[int, str]:
    """GET ``path`` from the SBC's admin endpoint ([admin] listen): status and body."""
    url = f"http://{HOST}:{sbc.extra_ports['admin']}{path}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=5.0) as response:
        return response.status, response.read().decode()


def scrape(sbc: SbcProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics of the running SBC: every sample by (name, sorted labels)."""
    status, text = admin_get(sbc, "/metrics")
    assert status == 200, text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


# -- the calls ------------------------------------------------------------------------------
def test_basic_call(lab: Lab) -> None:
    bob = lab.callee("call_basic_uas.xml")
    alice = lab.caller("call_basic_uac.xml")
    a_msgs, b_msgs = passed(alice, bob)
    assert labels(received(b_msgs)) == ["INVITE", "ACK", "BYE"]
    assert labels(received(a_msgs))[-3:] == ["180 INVITE", "200 INVITE", "200 BYE"]
    invite = received(b_msgs)[0]
    # bob is reached at the contact he registered, from the caller's identity.
    assert invite.first_line == f"INVITE sip:bob@{HOST}:{bob.port} SIP/2.0"
    assert invite.header("From").startswith('"Alice" <sip:alice@example.com>')
    assert invite.header("To") == "<sip:bob@example.com>"
    assert int(invite.header("Max-Forwards")) < 70  # decremented, loops stay detectable
    # The SDP is anchored both ways: each side sees the SBC's relay port
    # and origin, with the other side's codecs.
    offer = sent(a_msgs)[0]
    answer = next(m for m in sent(b_msgs) if m.status == 200)
    answered = next(m for m in received(a_msgs) if m.status == 200)
    for original, rewritten in ((offer, invite), (answer, answered)):
        assert sdp_port(rewritten) in media_ports(lab)
        assert sdp_port(original) not in media_ports(lab)
        m_line = re.compile(r"^m=audio \d+ (.*)$", re.M)
        if original is offer:
            # alice's PCMU first, then the codecs the SBC can transcode to appended (the
            # default lists: docs/media.md); bob answers PCMU, passed as it was.
            assert m_line.findall(rewritten.body) == ["RTP/AVP 0 96 9 8"]
        else:
            assert m_line.findall(rewritten.body) == m_line.findall(original.body)  # RTP/AVP 0
        assert "a=crypto" not in rewritten.body  # plain RTP offered: plain RTP passed on
        assert "o=- " in rewritten.body
    assert_hidden(lab, a_msgs, b_msgs)
    records = lab.wait_records(2)
    assert len(records) == 2, records
    assert [r["status"] for r in records] == [200, 200], records
    lab.assert_no_calls_left()
    # The metrics of the running SBC show this test's registration (bob's,
    # relayed to Kamailio) and its two calls (alice -> Kamailio, Kamailio -> bob), ended.
    metrics = scrape(lab.sbc)
    assert metrics[("sbc_registrations", (("mode", "relayed"),))] == 1, metrics
    assert metrics[("sbc_register_requests_total", (("handling", "forwarded"),))] == 1
    assert metrics[("sbc_calls_started_total", ())] == 2, metrics
    assert metrics[("sbc_calls_answered_total", ())] == 2, metrics
    assert metrics[("sbc_calls_ended_total", ())] == 2, metrics
    assert metrics[("sbc_calls_active", ())] == 0, metrics
    assert metrics[("sbc_backend_up", (("backend", lab.registrar.uri),))] == 1, metrics
    assert metrics[("sbc_backend_dialogs", (("backend", lab.registrar.uri),))] == 0
    assert metrics[("sbc_media_workers", ())] >= 1, metrics  # their totals are reported
    assert admin_get(lab.sbc, "/readyz")[0] == 200
    # ... and so does `sbc status`, reading the admin address from the SBC's config.
    status = subprocess.run(
        [*sbc_command(), "status", "--config", str(lab.sbc.config)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert "registrations: 1 relayed, 0 local" in lines, status.stdout
    assert "calls: 0 active; 2 started, 2 answered, 2 ended, 0 refused" in lines, status.stdout
    assert "backends: 1 of 1 up" in lines, status.stdout


def test_busy(lab: Lab) -> None:
    bob = lab.callee("call_busy_uas.xml")
    alice = lab.caller("call_busy_uac.xml")
    a_msgs, b_msgs = passed(alice, bob)
    assert labels(received(b_msgs)) == ["INVITE", "ACK"]
    assert labels(received(a_msgs)) in (["486 INVITE"], ["100 INVITE", "486 INVITE"])
    assert_hidden(lab, a_msgs, b_msgs)
    records = lab.wait_records(2)
    assert [r["status"] for r in records] == [486, 486], records
    lab.assert_no_calls_left()


def test_cancel_before_answer(lab: Lab) -> None:
    bob = lab.callee("call_cancel_uas.xml")
    alice = lab.caller("call_cancel_uac.xml")
    a_msgs, b_msgs = passed(alice, bob)
    assert labels(received(b_msgs)) == ["INVITE", "CANCEL", "ACK"]
    assert labels(received(a_msgs))[-3:] == ["180 INVITE", "200 CANCEL", "487 INVITE"]
    assert_hidden(lab, a_msgs, b_msgs)
    invite, cancel = received(b_msgs)[:2]
    # RFC 3261 9.1: the CANCEL names the INVITE's transaction.
    assert cancel.header("Via") == invite.header("Via")
    assert cancel.first_line.split()[1] == invite.first_line.split()[1]
    records = lab.wait_records(2)
    assert [r["cause"] for r in records] == ["487 Request Terminated"] * 2, records
    assert [r["answer"] for r in records] == [None, None], records
    lab.assert_no_calls_left()


def test_early_media_then_a_different_answer(lab: Lab) -> None:
    bob = lab.callee("call_early_media_uas.xml")
    alice = lab.caller("call_early_media_uac.xml")
    a_msgs, b_msgs = passed(alice, bob)
    assert labels(received(b_msgs)) == ["INVITE", "ACK", "BYE"]
    got = [m for m in received(a_msgs) if m.status in (183, 200) and m.method == "INVITE"]
    answers = [m for m in sent(b_msgs) if m.status in (183, 200) and m.method == "INVITE"]
    assert [m.status for m in got] == [183, 200]
    # The answer changes between 183 and 200 (another port and codec): alice sees the same
    # relay port in both, the new codec, and a new o= version (RFC 3264 8).
    assert [sdp_port(m) for m in answers[:2]] == [42000, 42002]
    assert sdp_port(got[0]) == sdp_port(got[1]) and sdp_port(got[0]) in media_ports(lab)
    assert "RTP/AVP 0" in got[0].body and "RTP/AVP 8" in got[1].body
    assert got[0].body != got[1].body
    # Both responses belong to one early-then-confirmed dialog (the same To tag).
    assert got[0].tag("To") == got[1].tag("To")
    assert_hidden(lab, a_msgs, b_msgs)
    assert [r["status"] for r in lab.wait_records(2)] == [200, 200]
    lab.assert_no_calls_left()


def test_hold_and_unhold(lab: Lab) -> None:
    bob = lab.callee("call_hold_uas.xml")
    alice = lab.caller("call_hold_uac.xml")
    a_msgs, b_msgs = passed(alice, bob)
    assert labels(received(b_msgs)) == ["INVITE", "ACK", "INVITE", "ACK", "INVITE", "ACK", "BYE"]
    invites = [m for m in received(b_msgs) if m.method in ("INVITE", "ACK", "BYE")]
    # One dialog on bob's side: one Call-ID, From tag and To tag; CSeq rising in it.
    assert len({m.header("Call-ID") for m in invites}) == 1
    assert len({m.tag("From") for m in invites}) == 1
    seqs = [int(m.header("CSeq").split()[0]) for m in invites if m.method != "ACK"]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), seqs
    reinvites = [m for m in received(b_msgs) if m.method == "INVITE"][1:]
    assert ["a=sendonly" in m.body for m in reinvites] == [True, False]
    assert ["a=sendrecv" in m.body for m in reinvites] == [False, True]
    assert_hidden(lab, a_msgs, b_msgs)
    assert [r["status"] for r in lab.wait_records(2)] == [200, 200]
    lab.assert_no_calls_left()


def test_prack(lab: Lab) -> None:
    bob = lab.callee("call_prack_uas.xml")
    alice = lab.caller("call_prack_uac.xml")
    a_msgs, b_msgs = passed(alice, bob)
    assert labels(received(b_msgs)) == ["INVITE", "PRACK", "ACK", "BYE"]
    assert labels(received(a_msgs))[-4:] == ["183 INVITE", "200 PRACK", "200 INVITE", "200 BYE"]
    (reliable,) = [m for m in received(a_msgs) if m.status == 183]
    assert reliable.header("Require") == "100rel"
    assert reliable.header("RSeq") == "7001"
    assert_hidden(lab, a_msgs, b_msgs)
    assert [r["status"] for r in lab.wait_records(2)] == [200, 200]
    lab.assert_no_calls_left()


def test_bye_from_callee(lab: Lab) -> None:
    bob = lab.callee("call_bye_callee_uas.xml")
    alice = lab.caller("call_bye_callee_uac.xml")
    a_msgs, b_msgs = passed(alice, bob)
    assert labels(received(b_msgs)) == ["INVITE", "ACK", "200 BYE"]
    assert labels(received(a_msgs))[-3:] == ["180 INVITE", "200 INVITE", "BYE"]
    (bye,) = [m for m in received(a_msgs) if m.method == "BYE"]
    (ok,) = [m for m in received(a_msgs) if m.status == 200 and m.method == "INVITE"]
    # In alice's dialog: her Call-ID, her tag as To, the SBC's tag as From.
    assert bye.header("Call-ID") == ok.header("Call-ID")
    assert bye.tag("To") == ok.tag("From")
    assert bye.tag("From") == ok.tag("To")
    assert_hidden(lab, a_msgs, b_msgs)
    records = lab.wait_records(2)
    assert [r["cause"] for r in records] == ["BYE from callee"] * 2, records
    lab.assert_no_calls_left()


def test_cancel_crossing_the_answer(lab: Lab) -> None:
    bob = lab.callee("call_race_uas.xml")
    alice = lab.caller("call_cancel_uac.xml")
    a_msgs, b_msgs = passed(alice, bob)
    # alice's call was cancelled: she got 200 to the CANCEL and 487, nothing of bob's 200.
    assert labels(received(a_msgs))[-3:] == ["180 INVITE", "200 CANCEL", "487 INVITE"]
    # bob's 200 crossed the CANCEL: the SBC ACKed it and ended his dialog with BYE.
    assert labels(received(b_msgs)) == ["INVITE", "CANCEL", "ACK", "BYE"]
    invite, cancel, ack, bye = received(b_msgs)
    assert cancel.header("Via") == invite.header("Via")
    ok = next(m for m in sent(b_msgs) if m.status == 200 and m.method == "INVITE")
    for request in (ack, bye):
        assert request.header("Call-ID") == ok.header("Call-ID")
        assert request.tag("To") == ok.tag("To")
    assert ack.header("CSeq").split()[0] == ok.header("CSeq").split()[0]
    # RFC 3326: the BYE says why the SBC ended a dialog nobody asked it to end.
    assert bye.headers("Reason"), bye.text
    assert_hidden(lab, a_msgs, b_msgs)
    records = lab.wait_records(2)
    assert len(records) == 2, records
    lab.assert_no_calls_left()


def _forked_call(lab: Lab) -> tuple[list[Message], list[Message], list[Message]]:
    """bob registered twice (bob1, bob2); Kamailio forks alice's call to both through the
    SBC; bob1 answers after 500 ms, bob2 rings and is cancelled. The three message logs."""
    bob1 = lab.callee("call_fork_answer_uas.xml", name="bob1")
    bob2 = lab.callee("call_fork_cancel_uas.xml", name="bob2")
    assert len(lab.registrar.bindings()["bob"]) == 2
    alice = lab.caller("call_fork_uac.xml")
    a_msgs, b1_msgs, b2_msgs = passed(alice, bob1, bob2)
    return a_msgs, b1_msgs, b2_msgs


def test_forked_call(lab: Lab) -> None:
    a_msgs, b1_msgs, b2_msgs = _forked_call(lab)
    assert labels(received(b1_msgs)) == ["INVITE", "ACK", "BYE"]
    assert labels(received(b2_msgs)) == ["INVITE", "CANCEL", "ACK"]
    ringing = [m for m in received(a_msgs) if m.status == 180]
    (ok,) = [m for m in received(a_msgs) if m.status == 200 and m.method == "INVITE"]
    # Two early dialogs towards alice, each with its own To tag; the 200 confirms one.
    tags = [m.tag("To") for m in ringing]
    assert len(tags) == 2 and len(set(tags)) == 2 and None not in tags, tags
    assert ok.tag("To") in tags
    # Kamailio cancelled the other fork; the CANCEL names bob2's INVITE transaction.
    invite, cancel, _ = received(b2_msgs)
    assert cancel.header("Via") == invite.header("Via")
    assert_hidden(lab, a_msgs, b1_msgs)
    assert_hidden(lab, a_msgs, b2_msgs)
    records = lab.wait_records(3)
    # alice -> Kamailio, and one call per fork from Kamailio to each contact.
    assert sorted(str(r["cause"]) for r in records) == sorted(
        ["BYE from caller", "BYE from caller", "487 Request Terminated"]
    ), records
    lab.assert_no_calls_left()


def test_forks_are_separate_calls_with_their_own_ids(lab: Lab) -> None:
    """Each fork's access leg is a new request of the SBC as UAC: its own Call-ID and From
    tag (RFC 3261 8.1.1.4), or one UA reached over two flows would see a merged request
    (8.2.2.2) and answer 482."""
    _, b1_msgs, b2_msgs = _forked_call(lab)
    (invite1,) = [m for m in received(b1_msgs) if m.method == "INVITE"]
    (invite2,) = [m for m in received(b2_msgs) if m.method == "INVITE"]
    assert invite1.header("Call-ID") != invite2.header("Call-ID")
    assert invite1.tag("From") != invite2.tag("From")


# RFC 4028 sets the smallest Session-Expires at 90 s, and the SBC ends an unrefreshed call
# 90 - min(32, 90 / 3) = 60 s after the last answer: this test takes about 95 s.
SESSION_EXPIRES = 90.0
SBC_SESSION_END = SESSION_EXPIRES - min(32.0, SESSION_EXPIRES / 3)


def test_session_timer(lab_factory: LabFactory) -> None:
    """Two calls at once: alice1 -> bob refreshes (re-INVITE at 20 s, UPDATE at 45 s) and
    hangs up at about 91 s; alice2 -> carol never refreshes, and the SBC ends it with BYE
    on both sides about 60 s after its 200."""
    # Registrations outlive the calls (the default 60 s would lapse during them).
    lab = lab_factory(extra="\n[registration.client_expires]\nudp = 300\n")
    long = 110.0
    bob = lab.callee("call_timer_refresh_uas.xml", "bob", timeout=long)
    carol = lab.callee("call_timer_idle_uas.xml", "carol", timeout=long)
    alice1 = lab.caller("call_timer_refresh_uac.xml", "bob", "alice1", timeout=long)
    alice2 = lab.caller("call_timer_idle_uac.xml", "carol", "alice2", timeout=long)
    a2_msgs, c_msgs = passed(alice2, carol)
    # The unrefreshed call: the SBC's BYE to both sides, once the interval (less the margin)
    # has passed since the 200, and not much later.
    assert labels(received(c_msgs)) == ["INVITE", "ACK", "BYE"]
    assert labels(received(a2_msgs))[-2:] == ["200 INVITE", "BYE"]
    for messages in (a2_msgs, c_msgs):
        ok = next(m for m in messages if m.status == 200 and m.method == "INVITE")
        bye = next(m for m in received(messages) if m.method == "BYE")
        assert SBC_SESSION_END - 1 <= bye.at - ok.at <= SBC_SESSION_END + 3, (ok.at, bye.at)
        assert bye.headers("Reason"), bye.text
    a1_msgs, b_msgs = passed(alice1, bob)
    # The refreshed call went on: its refreshes crossed, and alice's own BYE ended it.
    assert labels(received(b_msgs)) == ["INVITE", "ACK", "INVITE", "ACK", "UPDATE", "BYE"]
    refreshes = [m for m in received(b_msgs) if m.method in ("INVITE", "UPDATE")]
    assert all(m.header("Session-Expires") == "90;refresher=uac" for m in refreshes)
    first_ok = next(m for m in received(a1_msgs) if m.status == 200)
    bye = next(m for m in sent(a1_msgs) if m.method == "BYE")
    assert bye.at - first_ok.at > SESSION_EXPIRES, "the call did not outlive the interval"
    assert_hidden(lab, a1_msgs, b_msgs)
    assert_hidden(lab, a2_msgs, c_msgs)
    records = lab.wait_records(4)
    causes = sorted(str(r["cause"]) for r in records)
    assert causes.count("BYE from caller") == 2, records
    lab.assert_no_calls_left()


MEDIA_TIMEOUT = 3.0


def test_media_timeout_ends_a_silent_call(lab_factory: LabFactory) -> None:
    """The SIPp calls send no RTP, so with [media] timeout = 3 s the relay
    reports the call silent and the SBC ends it with BYE on both sides (Reason: cause 408,
    "media timeout"), about 3 s after the answer (the workers look once a second)."""
    lab = lab_factory(media=f"timeout = {MEDIA_TIMEOUT:g}")
    bob = lab.callee("call_timer_idle_uas.xml", "bob")
    alice = lab.caller("call_timer_idle_uac.xml", "bob", "alice")
    a_msgs, b_msgs = passed(alice, bob)
    assert labels(received(b_msgs)) == ["INVITE", "ACK", "BYE"]
    assert labels(received(a_msgs))[-2:] == ["200 INVITE", "BYE"]
    for messages in (a_msgs, b_msgs):
        ok = next(m for m in messages if m.status == 200 and m.method == "INVITE")
        bye = next(m for m in received(messages) if m.method == "BYE")
        assert MEDIA_TIMEOUT - 0.5 <= bye.at - ok.at <= MEDIA_TIMEOUT + 3, (ok.at, bye.at)
        assert bye.header("Reason") == 'SIP;cause=408;text="media timeout"', bye.text
    records = lab.wait_records(2)
    assert "media timeout" in [r["cause"] for r in records], records
    for record in records:  # the relay's statistics, with nothing received
        assert [s["caller"]["packets_in"] for s in record["media"]] == [0], record
    assert_hidden(lab, a_msgs, b_msgs)
    lab.assert_no_calls_left()
