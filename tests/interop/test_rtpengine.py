"""The SBC's ng client (sbc/media/ng.py, sbc/io/ng_socket.py) against a real rtpengine
(Debian's rtpengine-daemon, userspace: ``table = -1``) on loopback: node health by ping
(a live node up, a dead one down), and a call's offer (SDES-SRTP in, plain RTP out),
answer (plain in, SDES-SRTP out: rtpengine makes the key), query and delete; a request
sent twice with the same cookie gets the same reply (no second call)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sbc.io.ng_socket import NgFailed, NgSocket
from sbc.media import ng
from sbc.media.ng import Node, NodePool

from .conftest import UDP, Certs, PortPool, RegistrarFactory, SbcFactory, require
from .phones import (  # noqa: F401 - phones and sox are fixtures
    ALICE_HZ,
    BOB_HZ,
    CallSdps,
    PhoneFactory,
    account,
    assert_heard,
    phones,
    sox,
    talk,
)
from .test_baresip import _backends

HOST = "127.0.0.1"
KEY = "PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR"


@contextlib.contextmanager
def rtpengine(tmp_path: Path) -> Iterator[tuple[int, tuple[int, int]]]:
    """A userspace rtpengine on loopback: its ng port and its media port range."""
    binary = require("rtpengine")
    pool = PortPool()
    ng_port = pool.port(HOST, UDP)
    low = pool.block(HOST, 64)
    pool.release()
    conf = tmp_path / "rtpengine.conf"
    conf.write_text(
        f"[rtpengine]\ntable = -1\ninterface = {HOST}\nlisten-ng = {HOST}:{ng_port}\n"
        f"port-min = {low}\nport-max = {low + 63}\nnum-threads = 1\ntimeout = 60\n"
        "delete-delay = 0\nlog-level = 6\n"
    )
    log = (tmp_path / "rtpengine.log").open("wb")
    proc = subprocess.Popen(
        [binary, "--config-file", str(conf), "--config-section", "rtpengine", "--foreground",
         "--log-stderr", "--pidfile", str(tmp_path / "rtpengine.pid")],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
    )  # fmt: skip
    log.close()
    try:
        yield ng_port, (low, low + 63)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)


def sdp(port: int, proto: str, *extra: str) -> str:
    return "\r\n".join([
        "v=0", f"o=- 1 1 IN IP4 {HOST}", "s=-", f"c=IN IP4 {HOST}", "t=0 0",
        f"m=audio {port} {proto} 0 101", "a=rtpmap:0 PCMU/8000",
        "a=rtpmap:101 telephone-event/8000", *extra, "a=sendrecv", "",
    ])  # fmt: skip


async def test_ng_against_a_real_rtpengine(tmp_path: Path) -> None:
    with rtpengine(tmp_path) as (ng_port, (low, high)):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((HOST, 0))
            dead_port = s.getsockname()[1]  # closed again below: nothing answers there
        live = Node(f"udp://{HOST}:{ng_port}", (HOST, ng_port))
        dead = Node(f"udp://{HOST}:{dead_port}", (HOST, dead_port))
        pool = NodePool([live, dead], ping_interval=0.2, down_after=2)
        sock = await NgSocket.open(pool)
        sock.client.first_timeout = 0.1
        try:
            sock.start_pings()
            deadline = time.monotonic() + 15
            while not live.up and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert live.up, (tmp_path / "rtpengine.log").read_text()[-2000:]
            await asyncio.sleep(1.2)  # the dead node's pings time out (3 tries each)
            # The round trip of the last pong (the first may have waited for a
            # retransmission while rtpengine started).
            assert live.rtt is not None and live.rtt < 0.05
            assert not dead.up and dead.missed >= 1
            assert pool.assign("call-1") is live

            # Offer: SDES-SRTP from the caller, plain RTP towards the callee.
            offer = await sock.request(live, {
                "command": "offer", "call-id": "call-1", "from-tag": "ft1",
                "sdp": sdp(40000, "RTP/SAVP", f"a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:{KEY}"),
                "transport-protocol": "RTP/AVP", "replace": ["origin", "session-connection"],
                "flags": ["trust-address"], "ICE": "remove",
            })  # fmt: skip
            out = offer.result["sdp"]
            assert "RTP/AVP" in out and "a=crypto" not in out, out
            port = int(out.split("m=audio ")[1].split()[0])
            assert low <= port <= high

            # Answer: plain RTP from the callee, SDES-SRTP with rtpengine's key back.
            answer = await sock.request(live, {
                "command": "answer", "call-id": "call-1", "from-tag": "ft1", "to-tag": "tt1",
                "sdp": sdp(40002, "RTP/AVP"), "transport-protocol": "RTP/SAVP",
                "replace": ["origin", "session-connection"], "flags": ["trust-address"],
            })  # fmt: skip
            back = answer.result["sdp"]
            assert "RTP/SAVP" in back and "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:" in back
            assert KEY not in back  # a key of rtpengine's own on the caller's leg

            query = await sock.request(live, {"command": "query", "call-id": "call-1"})
            assert {"ft1", "tt1"} <= set(query.result.get("tags", {}))

            # The same request again under the same cookie: the same reply, no new call.
            cookie, data = sock.client.request(live.name, {
                "command": "offer", "call-id": "call-2", "from-tag": "x",
                "sdp": sdp(40004, "RTP/AVP"), "replace": ["origin"],
            }, 0.0)  # fmt: skip
            sock.client.cancel(cookie)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
                raw.settimeout(2)
                replies = []
                for _ in range(2):
                    raw.sendto(data, live.address)
                    replies.append(ng.decode(raw.recv(65535)))
            assert replies[0] == replies[1] and replies[0][0] == cookie

            await sock.request(live, {"command": "delete", "call-id": "call-1"})
            with pytest.raises(NgFailed, match="Unknown call-id"):
                await sock.request(live, {"command": "query", "call-id": "call-1"})
            with pytest.raises(NgFailed, match="no reply"):
                await sock.request(dead, {"command": "ping"})
        finally:
            sock.close()


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
