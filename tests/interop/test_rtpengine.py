"""The SBC's media on real rtpengines (Debian's rtpengine-daemon 10.5, userspace:
``table = -1``) on loopback.

- The ng client (sbc/media/ng.py, sbc/media/rtpengine.py) alone: node health by ping (a live
  node up, a dead one down), a call's offer (SDES-SRTP in, plain RTP out), answer (plain
  in, SDES-SRTP out: rtpengine makes the key), query and delete; a request sent twice with
  the same cookie gets the same reply (no second call).
- ``[media] engine = "rtpengine"`` through the real SBC: baresip TLS+SRTP <-> baresip UDP
  through Kamailio; a PCMU-only baresip <-> a PCMA-only one, the node transcoding; SIPp
  calls without RTP ended for media timeout (cause 408); two nodes, one killed -9: its calls
  end (cause 503, "media relay lost") [media] timeout after it is seen down, new calls go
  to the other, whose calls go on; ``sbc status`` and /metrics list the nodes; two
  baresips keyed by DTLS-SRTP without ICE (end-to-end keys) through either engine.

Where a test must send RTP on its own terms (the two-node test) the user agents are
hand-made (``Ua``: SIP over UDP to the SBC's embedded registrar, RTP from a thread).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sbc.media import ng
from sbc.media.ng import NgClient, NgReply, Node, NodePool
from sbc.media.rtpengine import Rtpengine

from .conftest import (
    UDP,
    Certs,
    PortPool,
    RegistrarFactory,
    SbcFactory,
    SbcProcess,
    require,
    sbc_command,
    wait_until,
)
from .phones import (  # noqa: F401 - phones and sox are fixtures
    ALICE_HZ,
    BOB_HZ,
    MEDIA_SECONDS,
    CallSdps,
    PhoneFactory,
    Sdp,
    account,
    assert_heard,
    phones,
    read_records,
    sox,
    talk,
)
from .test_baresip import _backends
from .test_calls import (  # noqa: F401 - lab_factory is a fixture
    LabFactory,
    lab_factory,
    labels,
    passed,
    received,
    scrape,
    sdp_port,
)
from .test_reload import status

HOST = "127.0.0.1"
DOMAIN = "example.com"
KEY = "PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR"


@dataclass
class RtpengineNode:
    """A userspace rtpengine on loopback (``table = -1``): its ng port, media ports, process."""

    name: str
    ng_port: int
    ports: tuple[int, int]  # its media port range, inclusive
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"udp://{HOST}:{self.ng_port}"

    def owns(self, port: int) -> bool:
        return self.ports[0] <= port <= self.ports[1]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """kill -9: no goodbye to anyone."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(5)


@contextlib.contextmanager
def rtpengine_nodes(
    tmp_path: Path, count: int, *, timeout: int = 60
) -> Iterator[list[RtpengineNode]]:
    """``count`` userspace rtpengines on loopback, each with its own ng port and 64 media
    ports (all held at once while chosen, so no two overlap); ``timeout``: rtpengine's own
    (it deletes a call without media that long). Named rtpengine, rtpengine1, ...: the
    first one's log is ``tmp_path / "rtpengine.log"``."""
    binary = require("rtpengine")
    pool = PortPool()
    plan = [(pool.port(HOST, UDP), pool.block(HOST, 64)) for _ in range(count)]
    pool.release()
    nodes: list[RtpengineNode] = []
    try:
        for i, (ng_port, low) in enumerate(plan):
            name = "rtpengine" if i == 0 else f"rtpengine{i}"
            conf = tmp_path / f"{name}.conf"
            conf.write_text(
                f"[rtpengine]\ntable = -1\ninterface = {HOST}\nlisten-ng = {HOST}:{ng_port}\n"
                f"port-min = {low}\nport-max = {low + 63}\nnum-threads = 1\n"
                f"timeout = {timeout}\ndelete-delay = 0\nlog-level = 6\n"
            )
            log_path = tmp_path / f"{name}.log"
            with log_path.open("wb") as log:
                proc = subprocess.Popen(
                    [binary, "--config-file", str(conf), "--config-section", "rtpengine",
                     "--foreground", "--log-stderr", "--pidfile", str(tmp_path / f"{name}.pid")],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                )  # fmt: skip
            nodes.append(RtpengineNode(name, ng_port, (low, low + 63), proc, log_path))
        yield nodes
    finally:
        for node in nodes:
            if node.proc.poll() is not None:
                continue
            node.proc.terminate()
            try:
                node.proc.wait(5)
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait(5)


@contextlib.contextmanager
def rtpengine(tmp_path: Path) -> Iterator[tuple[int, tuple[int, int]]]:
    """A userspace rtpengine on loopback: its ng port and its media port range."""
    with rtpengine_nodes(tmp_path, 1) as (node,):
        yield node.ng_port, node.ports


def media_config(*nodes: RtpengineNode, timeout: float = 60, extra: str = "") -> str:
    """[media] keys for ``engine = "rtpengine"`` with these nodes (weight 1 each); ``extra``:
    more [media] keys (before the node tables)."""
    tables = "".join(f'\n[[media.rtpengine]]\nurl = "{n.url}"\nweight = 1\n' for n in nodes)
    return f'engine = "rtpengine"\ntimeout = {timeout:g}\n{extra}\n{tables}'


def sdp(port: int, proto: str, *extra: str) -> str:
    return "\r\n".join([
        "v=0", f"o=- 1 1 IN IP4 {HOST}", "s=-", f"c=IN IP4 {HOST}", "t=0 0",
        f"m=audio {port} {proto} 0 101", "a=rtpmap:0 PCMU/8000",
        "a=rtpmap:101 telephone-event/8000", *extra, "a=sendrecv", "",
    ])  # fmt: skip


class NgDriver:
    """The SBC's ng side (sbc.media.rtpengine.Rtpengine, what the core drives) over a
    blocking socket: its timers (pings, retransmissions) run while the test waits."""

    def __init__(self, engine: Rtpengine) -> None:
        self.engine = engine
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, 0))
        engine.local = self.sock.getsockname()
        self.replies: dict[str, NgReply] = {}
        self.expired: set[str] = set()

    def run(self, seconds: float) -> None:
        """Move datagrams and run the timers for ``seconds``."""
        end = time.monotonic() + seconds
        while (now := time.monotonic()) < end:
            sends, expired = self.engine.timers(now)
            for address, data in sends:
                self.sock.sendto(data, address)
            self.expired |= {t.cookie for t in expired}
            due = self.engine.next_deadline() or end
            self.sock.settimeout(max(0.001, min(due, end) - time.monotonic()))
            try:
                data, source = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            reply = self.engine.receive(source, data, time.monotonic())
            if reply is not None:
                self.replies[reply.cookie] = reply

    def request(self, node: Node, message: dict[str, Any]) -> NgReply | None:
        """One request and its reply (None: no reply after every retransmission)."""
        cookie, data = self.engine.client.request(node.name, message, time.monotonic())
        self.sock.sendto(data, node.address)
        deadline = time.monotonic() + 10
        while cookie not in self.replies and cookie not in self.expired:
            assert time.monotonic() < deadline
            self.run(0.02)
        return self.replies.pop(cookie, None)


def test_ng_against_a_real_rtpengine(tmp_path: Path) -> None:
    with rtpengine(tmp_path) as (ng_port, (low, high)):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((HOST, 0))
            dead_port = s.getsockname()[1]  # closed again below: nothing answers there
        live = Node(f"udp://{HOST}:{ng_port}", (HOST, ng_port))
        dead = Node(f"udp://{HOST}:{dead_port}", (HOST, dead_port))
        pool = NodePool([live, dead], ping_interval=0.2, down_after=2)
        driver = NgDriver(Rtpengine(pool, {}, NgClient(first_timeout=0.1)))
        try:
            deadline = time.monotonic() + 15
            while not live.up and time.monotonic() < deadline:
                driver.run(0.05)
            assert live.up, (tmp_path / "rtpengine.log").read_text()[-2000:]
            driver.run(1.2)  # the dead node's pings time out (3 tries each)
            # The round trip of the last pong (the first may have waited for a
            # retransmission while rtpengine started).
            assert live.rtt is not None and live.rtt < 0.05
            assert not dead.up and dead.missed >= 1
            assert pool.assign("call-1") is live

            # Offer: SDES-SRTP from the caller, plain RTP towards the callee.
            offer = driver.request(live, {
                "command": "offer", "call-id": "call-1", "from-tag": "ft1",
                "sdp": sdp(40000, "RTP/SAVP", f"a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:{KEY}"),
                "transport-protocol": "RTP/AVP", "replace": ["origin", "session-connection"],
                "flags": ["trust-address"], "ICE": "remove",
            })  # fmt: skip
            assert offer is not None and offer.ok, offer
            out = offer.result["sdp"]
            assert "RTP/AVP" in out and "a=crypto" not in out, out
            port = int(out.split("m=audio ")[1].split()[0])
            assert low <= port <= high

            # Answer: plain RTP from the callee, SDES-SRTP with rtpengine's key back.
            answer = driver.request(live, {
                "command": "answer", "call-id": "call-1", "from-tag": "ft1", "to-tag": "tt1",
                "sdp": sdp(40002, "RTP/AVP"), "transport-protocol": "RTP/SAVP",
                "replace": ["origin", "session-connection"], "flags": ["trust-address"],
            })  # fmt: skip
            assert answer is not None and answer.ok, answer
            back = answer.result["sdp"]
            assert "RTP/SAVP" in back and "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:" in back
            assert KEY not in back  # a key of rtpengine's own on the caller's leg

            query = driver.request(live, {"command": "query", "call-id": "call-1"})
            assert query is not None and {"ft1", "tt1"} <= set(query.result.get("tags", {}))

            # The same request again under the same cookie: the same reply, no new call.
            cookie, data = driver.engine.client.request(live.name, {
                "command": "offer", "call-id": "call-2", "from-tag": "x",
                "sdp": sdp(40004, "RTP/AVP"), "replace": ["origin"],
            }, 0.0)  # fmt: skip
            driver.engine.client.cancel(cookie)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
                raw.settimeout(2)
                replies = []
                for _ in range(2):
                    raw.sendto(data, live.address)
                    replies.append(ng.decode(raw.recv(65535)))
            assert replies[0] == replies[1] and replies[0][0] == cookie

            deleted = driver.request(live, {"command": "delete", "call-id": "call-1"})
            assert deleted is not None and deleted.ok
            gone = driver.request(live, {"command": "query", "call-id": "call-1"})
            assert gone is not None and "Unknown call-id" in gone.error
            assert driver.request(dead, {"command": "ping"}) is None  # no reply at all
        finally:
            driver.sock.close()


def test_a_call_through_the_sbc_with_its_media_on_rtpengine(
    kamailio_registrars: RegistrarFactory,
    sbc_factory: SbcFactory,
    phones: PhoneFactory,  # noqa: F811 - the fixture imported above
    certs: Certs,
    sox: str,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
) -> None:
    """[media] engine = "rtpengine": alice (TLS, SRTP mandatory) calls bob (UDP, plain RTP)
    through a Kamailio registrar (alice -> SBC -> Kamailio -> SBC -> bob, plain RTP on the
    core side); the SDPs each phone gets name rtpengine's address and ports (SRTP with a
    key of the node's own for alice, plain RTP for bob), both hear each other, and the
    node forgets the calls at the hang-up."""
    (registrar,) = kamailio_registrars(1)
    with rtpengine(tmp_path) as (ng_port, (low, high)):
        sbc = sbc_factory(
            media=(
                'access_srtp = "optional"\ncore_srtp = "off"\nengine = "rtpengine"\n'
                f'timeout = 60\n[[media.rtpengine]]\nurl = "udp://{HOST}:{ng_port}"\n'
            ),
            extra=_backends(registrar.uri),
        )
        alice = phones("alice", hz=ALICE_HZ, cafile=certs.ca)
        bob = phones("bob", hz=BOB_HZ, cafile=certs.ca)
        bob.command("uanew", account("bob", f"{HOST}:{sbc.udp4}", "udp", answer=True))
        bob.wait_event("REGISTER_OK")
        alice.command("uanew", account("alice", f"{HOST}:{sbc.tls4}", "tls", srtp=True))
        alice.wait_event("REGISTER_OK")
        talk(alice, bob)
        sdps = CallSdps.of(alice, bob)
        # What each phone was told: rtpengine's ports, SRTP to alice (its key, not bob's
        # or alice's own), plain RTP to bob.
        for sdp in (sdps.alice_answer, sdps.bob_offer):
            assert sdp.address == HOST and low <= sdp.port <= high, sdp
        assert sdps.alice_answer.proto == "RTP/SAVP" and sdps.bob_offer.proto == "RTP/AVP"
        assert not sdps.bob_offer.cryptos
        assert sdps.alice_answer.key()[1] not in {k[1] for k in sdps.alice_offer.cryptos.values()}
        assert_heard(sox, bob, ALICE_HZ)
        assert_heard(sox, alice, BOB_HZ)
        # The hang-up deleted the call at the node.
        log = tmp_path / "rtpengine.log"
        deadline = time.monotonic() + 5
        while "Received command 'delete'" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "Received command 'delete'" in log.read_text(), log.read_text()[-3000:]


@pytest.mark.parametrize("engine", ["builtin", "rtpengine"])
def test_dtls_srtp_keys_of_two_phones_pass_the_relay_end_to_end(
    engine: str,
    kamailio_registrars: RegistrarFactory,
    sbc_factory: SbcFactory,
    phones: PhoneFactory,  # noqa: F811 - the fixture imported above
    sox: str,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
) -> None:
    """Two baresips keying their media with DTLS-SRTP without ICE (RFC 5763: end-to-end
    keys the SBC cannot take part in): the media is anchored on the relay (the built-in
    one, or rtpengine with ``passthrough``), each phone gets the other's fingerprint
    unchanged, their handshake goes through the relay, and both hear each other."""
    (registrar,) = kamailio_registrars(1)
    with contextlib.ExitStack() as stack:
        keys = 'access_srtp = "optional"\ncore_srtp = "optional"\n'
        if engine == "rtpengine":
            (node,) = stack.enter_context(rtpengine_nodes(tmp_path, 1))
            media, low, high = media_config(node, extra=keys), *node.ports
        else:
            media, (low, high) = keys, (0, 65535)
        sbc = sbc_factory(media=media, extra=_backends(registrar.uri))
        alice = phones("alice", hz=ALICE_HZ, modules=("dtls_srtp.so",))
        bob = phones("bob", hz=BOB_HZ, modules=("dtls_srtp.so",))
        for phone, answer in ((bob, True), (alice, False)):
            phone.command(
                "uanew",
                account(phone.name, f"{HOST}:{sbc.udp4}", "udp", answer=answer,
                        mediaenc="dtls_srtp"),
            )  # fmt: skip
            phone.wait_event("REGISTER_OK")
        talk(alice, bob, seconds=MEDIA_SECONDS + 2)  # the DTLS handshake comes first
        sdps = CallSdps.of(alice, bob)
        texts = {
            "alice_offer": alice.sent("INVITE sip:", "INVITE"),
            "bob_offer": bob.sent("INVITE sip:", "INVITE"),
            "bob_answer": bob.sent("SIP/2.0 200", "INVITE"),
            "alice_answer": alice.sent("SIP/2.0 200", "INVITE"),
        }
        prints = {k: re.findall(r"^a=fingerprint:(.+?)\s*$", v, re.M) for k, v in texts.items()}
        assert all(prints.values()), prints
        # The fingerprints cross the SBC unchanged; the media does not bypass the relay.
        assert prints["bob_offer"] == prints["alice_offer"], prints
        assert prints["alice_answer"] == prints["bob_answer"], prints
        assert sdps.bob_offer.proto == sdps.alice_offer.proto == "UDP/TLS/RTP/SAVPF"
        for relayed, own in (
            (sdps.bob_offer, sdps.alice_offer),
            (sdps.alice_answer, sdps.bob_answer),
        ):
            assert relayed.rtp != own.rtp and low <= relayed.port <= high, (relayed, own)
        for phone in (alice, bob):
            menc = [e for e in phone.events if e.get("type") == "CALL_MENC"]
            assert menc, f"{phone.name}: no DTLS-SRTP on its leg\n{phone.explain()}"
        assert_heard(sox, bob, ALICE_HZ)
        assert_heard(sox, alice, BOB_HZ)


# -- helpers of the SBC tests --------------------------------------------------------------
def nodes_status(sbc: SbcProcess) -> dict[str, dict[str, Any]]:
    """The SBC's rtpengine nodes (/status) by url."""
    nodes = status(sbc).get("rtpengine")
    assert isinstance(nodes, list), status(sbc)
    return {str(n["url"]): n for n in nodes}


def sbc_status_text(sbc: SbcProcess) -> str:
    """What ``sbc status`` prints for the running SBC."""
    done = subprocess.run(
        [*sbc_command(), "status", "--admin", f"{HOST}:{sbc.extra_ports['admin']}"],
        capture_output=True, text=True, timeout=15,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def pcmu_packet(ssrc: int, seq: int) -> bytes:
    """One RTP packet of 20 ms of PCMU silence (payload type 0)."""
    header = struct.pack("!BBHII", 0x80, 0, seq & 0xFFFF, (seq * 160) & 0xFFFFFFFF, ssrc)
    return header + b"\xff" * 160


def header(message: str, name: str) -> str:
    for line in message.split("\r\n\r\n", 1)[0].split("\r\n")[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == name.lower():
            return value.strip()
    raise AssertionError(f"no {name} in\n{message}")


def sdp_media(message: str) -> tuple[str, int]:
    """The c= address and m=audio port of a message's SDP."""
    text = message.split("\r\n\r\n", 1)[1]
    conn = re.search(r"^c=IN IP4 (\S+)", text, re.M)
    media = re.search(r"^m=audio (\d+) ", text, re.M)
    assert conn and media, message
    return conn[1], int(media[1])


class Ua:
    """A hand-made SIP user agent over UDP (no SIPp: a test must send RTP on its own terms):
    it registers with the SBC's embedded registrar, makes or answers one call whose SDP names
    its own RTP socket, sends RTP (PCMU, every 20 ms, while ``talking``) to the address the
    SBC's SDP names (the rtpengine node), counts the RTP it gets, and answers a BYE."""

    def __init__(self, name: str, sbc: SbcProcess) -> None:
        self.name = name
        self.server = (HOST, sbc.udp4)
        self.sip = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sip.bind((HOST, 0))
        self.rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.rtp.bind((HOST, 0))
        self.rtp.setblocking(False)
        self.port = self.sip.getsockname()[1]
        self.rtp_port = self.rtp.getsockname()[1]
        self.tag = f"{name}-{secrets.token_hex(4)}"
        self.call_id = f"{name}-{secrets.token_hex(6)}@test"
        self.cseq = 0
        self.media: tuple[str, int] | None = None  # where its RTP goes (the node's port)
        self.talking = False
        self.watching = False  # the pump answers its SIP (once its call is set up)
        self.rtp_seq = 0
        self.received = 0  # RTP packets got
        self.dialog: tuple[str, str, str] | None = None  # remote target, To, From of its requests
        self.bye: str | None = None
        self.bye_at: float | None = None  # time.monotonic() of the first BYE

    def close(self) -> None:
        self.sip.close()
        self.rtp.close()

    def send(self, text: str) -> None:
        self.sip.sendto(text.encode(), self.server)

    def receive(self, timeout: float = 5.0) -> str:
        self.sip.settimeout(timeout)
        return self.sip.recv(65535).decode(errors="replace")

    def request(self, method: str, uri: str, headers: list[str], body: str = "") -> str:
        self.cseq += 1 if method != "ACK" else 0
        lines = [
            f"{method} {uri} SIP/2.0",
            f"Via: SIP/2.0/UDP {HOST}:{self.port};branch=z9hG4bK{secrets.token_hex(8)};rport",
            "Max-Forwards: 70",
            *headers,
            f"Call-ID: {self.call_id}",
            f"CSeq: {self.cseq} {method}",
            f"Contact: <sip:{self.name}@{HOST}:{self.port}>",
        ]
        if body:
            lines.append("Content-Type: application/sdp")
        lines.append(f"Content-Length: {len(body.encode())}")
        return "\r\n".join(lines) + "\r\n\r\n" + body

    def final(self, method: str, timeout: float = 5.0) -> str:
        """The final response to this UA's ``method`` (other messages are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            message = self.receive(max(0.01, deadline - time.monotonic()))
            final = message.startswith("SIP/2.0 ") and not message.startswith("SIP/2.0 1")
            if final and header(message, "CSeq").split()[-1] == method:
                return message

    def register(self) -> None:
        aor = f"<sip:{self.name}@{DOMAIN}>"
        self.send(self.request("REGISTER", f"sip:{DOMAIN}",
                               [f"From: {aor};tag={self.tag}", f"To: {aor}", "Expires: 600"]))  # fmt: skip
        ok = self.final("REGISTER")
        assert ok.startswith("SIP/2.0 200"), ok
        self.call_id = f"{self.name}-{secrets.token_hex(6)}@test"  # the call's own

    def sdp(self) -> str:
        return (
            f"v=0\r\no=- 1 1 IN IP4 {HOST}\r\ns=-\r\nc=IN IP4 {HOST}\r\nt=0 0\r\n"
            f"m=audio {self.rtp_port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=sendrecv\r\n"
        )

    def invite(self, callee: str) -> None:
        to = f"<sip:{callee}@{DOMAIN}>"
        self.dialog = ("", to, f"<sip:{self.name}@{DOMAIN}>;tag={self.tag}")
        self.send(self.request("INVITE", f"sip:{callee}@{DOMAIN}",
                               [f"From: {self.dialog[2]}", f"To: {to}"], self.sdp()))  # fmt: skip

    def answer(self, timeout: float = 5.0) -> str:
        """The INVITE that comes, answered 200 with this UA's SDP; the INVITE."""
        deadline = time.monotonic() + timeout
        invite = self.receive(timeout)
        while not invite.startswith("INVITE "):
            invite = self.receive(max(0.01, deadline - time.monotonic()))
        self.media = sdp_media(invite)
        to = f"{header(invite, 'To')};tag={self.tag}"
        body = self.sdp()
        self.dialog = (
            header(invite, "Contact").strip("<>").split(">")[0],
            header(invite, "From"),
            to,
        )
        self.call_id = header(invite, "Call-ID")
        lines = [
            "SIP/2.0 200 OK",
            *(f"{n}: {header(invite, n)}" for n in ("Via", "From")),
            f"To: {to}",
            f"Call-ID: {self.call_id}",
            f"CSeq: {header(invite, 'CSeq')}",
            f"Contact: <sip:{self.name}@{HOST}:{self.port}>",
            "Content-Type: application/sdp",
            f"Content-Length: {len(body)}",
        ]
        self.send("\r\n".join(lines) + "\r\n\r\n" + body)
        return invite

    def answered(self) -> str:
        """The 200 to this UA's INVITE, ACKed; the 200."""
        ok = self.final("INVITE")
        assert ok.startswith("SIP/2.0 200"), ok
        self.media = sdp_media(ok)
        assert self.dialog is not None
        target = header(ok, "Contact").strip("<>").split(">")[0]
        self.dialog = (target, header(ok, "To"), self.dialog[2])
        self.send(self.request("ACK", target, [f"From: {self.dialog[2]}", f"To: {self.dialog[1]}"]))
        return ok

    def pump(self) -> None:
        """One turn of the pump: an RTP packet out if talking, whatever came in read (RTP
        counted, a BYE answered 200 if watching)."""
        if self.talking and self.media is not None:
            self.rtp_seq += 1
            with contextlib.suppress(OSError):  # a dead node's port: ICMP unreachable
                self.rtp.sendto(pcmu_packet(self.port, self.rtp_seq), self.media)
        while True:
            try:
                self.rtp.recv(2048)
            except (BlockingIOError, OSError):
                break
            self.received += 1
        if not self.watching:
            return
        while True:
            try:
                message = self.sip.recv(65535).decode(errors="replace")
            except (BlockingIOError, OSError):
                return
            if not message.startswith("BYE "):
                continue  # a 200 retransmitted, an ACK, the 200 to our own BYE
            if self.bye is None:
                self.bye, self.bye_at = message, time.monotonic()
                self.talking = False
            heads = [f"{n}: {header(message, n)}" for n in ("Via", "From", "To", "Call-ID", "CSeq")]
            self.send("\r\n".join(["SIP/2.0 200 OK", *heads, "Content-Length: 0"]) + "\r\n\r\n")

    def hang_up(self) -> None:
        """A BYE of its own (the pump takes the 200)."""
        assert self.dialog is not None
        target, to, own = self.dialog
        self.talking = False
        self.send(self.request("BYE", target, [f"From: {own}", f"To: {to}"]))


class Pump:
    """A thread that turns every UA's pump every 20 ms."""

    def __init__(self) -> None:
        self.uas: list[Ua] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            for ua in list(self.uas):
                ua.pump()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for ua in self.uas:
            ua.close()


@dataclass
class RawCall:
    caller: Ua
    callee: Ua

    @property
    def port(self) -> int:
        """The node port the caller's SDP names: which node holds the call."""
        assert self.caller.media is not None
        return self.caller.media[1]

    @property
    def uas(self) -> tuple[Ua, Ua]:
        return (self.caller, self.callee)


def raw_call(sbc: SbcProcess, pump: Pump, index: int) -> RawCall:
    """caller{index} calls callee{index} (registered at the SBC's embedded registrar: the
    call is one B2BUA call, so on one node); both talk once it is set up."""
    caller, callee = Ua(f"caller{index}", sbc), Ua(f"callee{index}", sbc)
    callee.register()
    caller.invite(callee.name)
    try:
        callee.answer()
    except TimeoutError:
        pytest.fail(
            f"call {index}: no INVITE for the callee\n{caller.receive(1.0)}\n{sbc.log()[-3000:]}"
        )
    caller.answered()
    for ua in (caller, callee):
        assert ua.media is not None and ua.media[0] == HOST
        ua.sip.setblocking(False)  # the pump reads it from now on
        ua.talking = ua.watching = True
        pump.uas.append(ua)
    return RawCall(caller, callee)


@pytest.fixture
def pump() -> Iterator[Pump]:
    p = Pump()
    try:
        yield p
    finally:
        p.stop()


# -- sbc status and /metrics ------------------------------------------------------------------
def test_status_and_metrics_show_the_nodes(
    sbc_factory: SbcFactory, pump: Pump, tmp_path: Path
) -> None:
    """Two nodes configured, one running and one not (nothing on its port): ``sbc status``
    has an ``rtpengine:`` block with both (up and down, weight, calls), /metrics the three
    families with a ``node`` label; a call on the live node is counted there."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((HOST, 0))
        dead_url = f"udp://{HOST}:{s.getsockname()[1]}"  # closed again: nothing answers
    with rtpengine_nodes(tmp_path, 1) as (node,):
        sbc = sbc_factory(
            media=media_config(node) + f'\n[[media.rtpengine]]\nurl = "{dead_url}"\nweight = 2\n'
        )
        wait_until("the node up", lambda: nodes_status(sbc)[node.url]["up"], 10,
                   lambda: f"{status(sbc)}\n{node.log()[-2000:]}")  # fmt: skip
        call = raw_call(sbc, pump, 0)
        assert node.owns(call.port), (call.port, node.ports)
        text = sbc_status_text(sbc)
        print(text)
        assert "rtpengine: 1 of 2 node(s) up" in text, text
        live = next(line for line in text.splitlines() if node.url in line)
        dead = next(line for line in text.splitlines() if dead_url in line)
        assert re.search(r"\bup\s+weight 1\s+calls 1\s+rtt \d+\.\d ms", live), live
        assert re.search(r"\bdown\s+weight 2\s+calls 0\s+rtt -", dead), dead

        samples = scrape(sbc)
        assert samples[("sbc_rtpengine_up", (("node", node.url),))] == 1.0
        assert samples[("sbc_rtpengine_up", (("node", dead_url),))] == 0.0
        assert samples[("sbc_rtpengine_calls", (("node", node.url),))] == 1.0
        assert samples[("sbc_rtpengine_calls", (("node", dead_url),))] == 0.0
        rtt = samples[("sbc_rtpengine_rtt_seconds", (("node", node.url),))]
        # The SBC times its pings with the event loop's clock: uvloop's loop.time() is
        # libuv's uv_now(), in whole milliseconds (and cached per loop turn), so a
        # loopback round trip (~0.1 ms) reads 0.0 or 0.001 s, never in between.
        assert 0 <= rtt < 0.05, rtt
        # No pong ever from the dead node: no round trip to show.
        assert ("sbc_rtpengine_rtt_seconds", (("node", dead_url),)) not in samples

        call.caller.hang_up()
        wait_until("the callee's BYE", lambda: call.callee.bye is not None, 5, sbc.log)
        wait_until("the node's call count back to 0",
                   lambda: nodes_status(sbc)[node.url]["calls"] == 0, 5, lambda: str(status(sbc)))  # fmt: skip


# -- media timeout ----------------------------------------------------------------------------
MEDIA_TIMEOUT = 4.0
QUERY_INTERVAL = max(1.0, MEDIA_TIMEOUT / 4)  # how often the SBC asks the node about a call


def test_a_call_without_media_ends_with_bye_on_both_legs(
    lab_factory: LabFactory,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
) -> None:
    """SIPp alice -> SBC -> Kamailio -> SBC -> SIPp bob, and neither sends a packet of RTP;
    [media] timeout = 4: the node's answers to the SBC's queries (every second) show no
    packet since the answer (its "last signal"), so 4 to 5 s after the 200 the SBC ends both
    B2BUA calls with BYE both ways (Reason: cause 408, "media timeout"); the call records
    say why and carry the node's totals (no packet)."""
    with rtpengine_nodes(tmp_path, 1) as (node,):
        lab = lab_factory(media=media_config(node, timeout=MEDIA_TIMEOUT))
        wait_until("the node up", lambda: nodes_status(lab.sbc)[node.url]["up"], 10,
                   lambda: f"{status(lab.sbc)}\n{node.log()[-2000:]}")  # fmt: skip
        bob = lab.callee("call_basic_uas.xml", "bob")
        alice = lab.caller("call_idle_uac.xml", "bob", "alice")
        a_msgs, b_msgs = passed(alice, bob)
        assert labels(received(b_msgs)) == ["INVITE", "ACK", "BYE"]
        assert labels(received(a_msgs))[-2:] == ["200 INVITE", "BYE"]
        for name, messages in (("alice", a_msgs), ("bob", b_msgs)):
            ok = next(m for m in messages if m.status == 200 and m.method == "INVITE")
            bye = next(m for m in received(messages) if m.method == "BYE")
            # What each SIPp was told: the node's address and one of its ports.
            port = sdp_port(next(m for m in received(messages) if m.body.strip()))
            assert node.owns(port), (port, node.ports)
            took = bye.at - ok.at
            print(f"{name}: BYE {took:.2f} s after the 200")
            # SIPp logs in milliseconds; the SBC's verdict comes with the first query
            # answer past the timeout (every QUERY_INTERVAL), and up to a second more:
            # rtpengine's times are whole seconds.
            assert MEDIA_TIMEOUT - 0.5 <= took <= MEDIA_TIMEOUT + QUERY_INTERVAL + 1.5, took
            assert bye.header("Reason") == 'SIP;cause=408;text="media timeout"', bye.text
        records: list[dict[str, Any]] = lab.wait_records(2)
        assert len(records) == 2, records
        causes = [r["cause"] for r in records]
        # Each B2BUA call is queried on its own: both time out, or one does and the BYE
        # it sends through Kamailio ends the other first.
        assert "media timeout" in causes, records
        for record in records:
            (media,) = record["media"]
            assert media["engine"] == "rtpengine" and media["node"] == node.url, record
        lab.assert_no_calls_left()
        # The node forgot both calls (the SBC's deletes).
        log = node.log()
        assert log.count("Received command 'delete'") >= 2, log[-3000:]
        assert_totals(records, lambda packets: packets == 0)


def assert_totals(records: list[dict[str, Any]], check: Callable[[int], bool]) -> None:
    """Each record's media has the node's totals (its answer to the delete), and ``check``
    holds for its RTP packet count. rtpengine 10.5 puts the call's statistics in its answer
    to a ``delete`` only if the delete names a from-tag (``{"call-id": ...}`` alone gets
    ``{"result": "ok"}`` and nothing else)."""
    for record in records:
        for media in record["media"]:
            assert "totals" in media, f"no totals from the node's delete answer: {record}"
            assert check(media["totals"]["RTP"]["packets"]), record


# -- two nodes, one killed --------------------------------------------------------------------
LOSS_TIMEOUT = 6.0
# A node is down after 2 pings (every 5 s) without answer, each tried over 3.5 s: killed just
# after a pong, it is seen down 5 + 3.5 + 5 s later at the latest.
DOWN_WITHIN = 5.0 + 5.0 + 3.5 + 1.0


def test_a_killed_node_loses_its_calls_and_new_calls_go_to_the_other(
    sbc_factory: SbcFactory, pump: Pump, tmp_path: Path
) -> None:
    """Two rtpengines of weight 1; hand-made UAs call each other through the SBC's embedded
    registrar (one B2BUA call, so one node, per call) and send RTP both ways all along, until
    each node holds two calls at least; kill -9 of one node: ``sbc status`` shows it down
    within DOWN_WITHIN s, new calls all go to the other and carry media both ways, and
    [media] timeout (6 s) after it went down the dead node's calls end with BYE on both legs
    (Reason: cause 503, "media relay lost") while the live node's calls go on."""
    with rtpengine_nodes(tmp_path, 2) as nodes:
        sbc = sbc_factory(media=media_config(*nodes, timeout=LOSS_TIMEOUT))
        wait_until("both nodes up",
                   lambda: all(n["up"] for n in nodes_status(sbc).values()), 10,
                   lambda: str(status(sbc)))  # fmt: skip

        def on(node: RtpengineNode, calls: list[RawCall]) -> list[RawCall]:
            return [c for c in calls if node.owns(c.port)]

        calls: list[RawCall] = []
        while min(len(on(n, calls)) for n in nodes) < 2:
            assert len(calls) < 16, "16 calls and a node with fewer than 2 of them"
            calls.append(raw_call(sbc, pump, len(calls)))
        for call in calls:
            assert any(n.owns(call.port) for n in nodes), call.port
            assert call.callee.media is not None and node_of(nodes, call.callee.media[1]) is (
                node_of(nodes, call.port)
            )  # both legs on the call's one node
        counts = {url: n["calls"] for url, n in nodes_status(sbc).items()}
        assert counts == {n.url: len(on(n, calls)) for n in nodes}, counts
        samples = scrape(sbc)
        for n in nodes:
            assert samples[("sbc_rtpengine_calls", (("node", n.url),))] == len(on(n, calls))
        # Media flows both ways through each node.
        wait_until("RTP both ways on every call",
                   lambda: all(ua.received > 20 for c in calls for ua in c.uas), 5,
                   lambda: str([(ua.name, ua.received) for c in calls for ua in c.uas]))  # fmt: skip

        live, dead = nodes
        doomed, spared = on(dead, calls), on(live, calls)
        print(f"{len(calls)} calls: {len(spared)} on {live.url}, {len(doomed)} on {dead.url}")
        dead.kill()
        killed = time.monotonic()
        took = wait_until("the dead node down in sbc status",
                          lambda: f"{dead.url}  down" in sbc_status_text(sbc), DOWN_WITHIN,
                          lambda: str(status(sbc)))  # fmt: skip
        print(f"{dead.url} down in sbc status {took:.1f} s after kill -9")
        text = sbc_status_text(sbc)
        assert "rtpengine: 1 of 2 node(s) up" in text, text
        assert scrape(sbc)[("sbc_rtpengine_up", (("node", dead.url),))] == 0.0

        # New calls while it is down: all on the live node, media both ways.
        fresh = [raw_call(sbc, pump, len(calls) + i) for i in range(3)]
        for call in fresh:
            assert live.owns(call.port), (call.port, live.ports)
        wait_until("RTP both ways on the new calls",
                   lambda: all(ua.received > 20 for c in fresh for ua in c.uas), 5,
                   lambda: str([(ua.name, ua.received) for c in fresh for ua in c.uas]))  # fmt: skip

        # The dead node's calls end: BYE on both legs, [media] timeout after it went down.
        wait_until("BYE on both legs of the dead node's calls",
                   lambda: all(ua.bye is not None for c in doomed for ua in c.uas),
                   DOWN_WITHIN + LOSS_TIMEOUT + 2 - (time.monotonic() - killed),
                   lambda: sbc.log()[-4000:])  # fmt: skip
        ended = max(ua.bye_at or 0.0 for c in doomed for ua in c.uas) - killed
        print(f"the dead node's calls ended {ended:.1f} s after kill -9")
        # [media] timeout after the SBC saw it down (the status poll is ~0.3 s coarse).
        assert LOSS_TIMEOUT - 1.0 <= ended - took <= LOSS_TIMEOUT + 2.0, (took, ended)
        for call in doomed:
            for ua in call.uas:
                assert ua.bye is not None
                assert header(ua.bye, "Reason") == 'SIP;cause=503;text="media relay lost"', ua.bye
        # The live node's calls, old and new, go on with media: none got a BYE, and the
        # packets keep coming.
        before = {ua.name: ua.received for c in spared + fresh for ua in c.uas}
        time.sleep(1.0)
        for call in spared + fresh:
            for ua in call.uas:
                assert ua.bye is None, ua.bye
                assert ua.received > before[ua.name] + 20, (ua.name, ua.received, before)
        nodes_now = nodes_status(sbc)
        assert nodes_now[dead.url]["calls"] == 0 and not nodes_now[dead.url]["up"], nodes_now
        assert nodes_now[live.url]["calls"] == len(spared + fresh), nodes_now
        # They end as they were made: the callers hang up.
        for call in spared + fresh:
            call.caller.hang_up()
        wait_until("the callees' BYEs",
                   lambda: all(c.callee.bye is not None for c in spared + fresh), 5,
                   lambda: sbc.log()[-4000:])  # fmt: skip
        for call in spared + fresh:
            assert call.callee.bye is not None and "Reason:" not in call.callee.bye, call.callee.bye
        log = sbc.log()
        assert log.count("call ended: media relay lost") == len(doomed), log[-4000:]


def node_of(nodes: list[RtpengineNode], port: int) -> RtpengineNode | None:
    return next((n for n in nodes if n.owns(port)), None)


# -- transcoding --------------------------------------------------------------------------------
def test_pcmu_caller_and_pcma_callee_talk_through_rtpengine_transcoding(
    kamailio_registrars: RegistrarFactory,
    sbc_factory: SbcFactory,
    phones: PhoneFactory,  # noqa: F811 - the fixture imported above
    sox: str,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
) -> None:
    """alice (baresip, PCMU only) calls bob (baresip, PCMA only), alice -> SBC -> Kamailio
    -> SBC -> bob, with the media on rtpengine and ``core_codecs = ["PCMA"]`` (a core that
    takes only A-law): the offer towards the core asks the node to transcode to PCMA
    (``codec: {transcode: ["PCMA"]}``), so the core and bob are offered PCMA, bob answers
    PCMA and alice gets PCMU back; the node transcodes between the two. Each hears the
    other's tone (sox), and the SDPs show PCMU on alice's leg and PCMA on bob's. Debian's
    rtpengine-daemon 10.5 is built with its codec library (``rtpengine --codecs``: PCMA and
    PCMU "fully supported"), so it transcodes here."""
    (registrar,) = kamailio_registrars(1)
    records = tmp_path / "calls.jsonl"
    with rtpengine_nodes(tmp_path, 1) as (node,):
        sbc = sbc_factory(
            media=media_config(node, extra='core_codecs = ["PCMA"]'),
            extra=_backends(registrar.uri) + f'\n[calls]\nrecords = "{records}"\n',
        )
        wait_until("the node up", lambda: nodes_status(sbc)[node.url]["up"], 10,
                   lambda: f"{status(sbc)}\n{node.log()[-2000:]}")  # fmt: skip
        proxy = f"{HOST}:{sbc.udp4}"
        alice = phones("alice", hz=ALICE_HZ, codecs=("pcmu",))
        bob = phones("bob", hz=BOB_HZ, codecs=("pcma",))
        bob.command(
            "uanew", account("bob", proxy, "udp", answer=True) + ";audio_codecs=PCMA/8000/1"
        )
        bob.wait_event("REGISTER_OK")
        alice.command("uanew", account("alice", proxy, "udp") + ";audio_codecs=PCMU/8000/1")
        alice.wait_event("REGISTER_OK")
        setup = talk(alice, bob)
        print(f"PCMU -> PCMA call through rtpengine set up in {setup:.2f} s")

        sdps = CallSdps.of(alice, bob)

        def audio(sdp: Sdp) -> list[int]:  # telephone-event (dynamic) left out
            return [pt for pt in sdp.payload_types if pt < 96]

        # alice offered PCMU alone and got PCMU back; bob was offered PCMA among others (the
        # node adds the side's codecs to the offer, ``codec transcode``, and keeps what was
        # offered) and answered PCMA alone.
        assert audio(sdps.alice_offer) == [0], sdps.alice_offer
        assert audio(sdps.alice_answer) == [0], sdps.alice_answer
        assert 8 in audio(sdps.bob_offer), sdps.bob_offer
        assert audio(sdps.bob_answer) == [8], sdps.bob_answer
        for sdp in (sdps.alice_answer, sdps.bob_offer):  # the node's address and ports
            assert sdp.address == HOST and node.owns(sdp.port), (sdp, node.ports)

        # Each heard the other's tone through the node's transcoder.
        assert_heard(sox, bob, ALICE_HZ)
        assert_heard(sox, alice, BOB_HZ)

        # The node's own account at the delete ("Final packet stats"): alice's B2BUA call
        # has PCMU on its caller monologue and PCMA on its callee (core) one:
        # it transcoded; bob's B2BUA call is PCMA on both.
        codecs = node_codecs(node.log())
        print("codecs per monologue at the node:", codecs)
        assert sorted(codecs.values()) == [
            ["PCMA/8000", "PCMA/8000"],
            ["PCMU/8000", "PCMA/8000"],
        ], node.log()[-5000:]
        lines = read_records(records, 2)
        assert len(lines) == 2 and all(r["status"] == 200 for r in lines), lines
        for record in lines:
            (media,) = record["media"]
            assert media["engine"] == "rtpengine" and media["node"] == node.url, record
        assert_totals(lines, lambda packets: packets > 100)


def node_codecs(log: str) -> dict[str, list[str]]:
    """The codec of each monologue (caller, callee) of every call in rtpengine's "Final packet
    stats" (``[CALL-ID]: [core] ------ Media #1 (audio over RTP/AVP) using PCMU/8000``)."""
    codecs: dict[str, list[str]] = {}
    for call, codec in re.findall(
        r"\[(\w+)\]: \[core\] -+ Media #1 \(audio[^)]*\) using (\S+)", log
    ):
        codecs.setdefault(call, []).append(codec)
    return codecs
