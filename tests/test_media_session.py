"""Media anchoring: the SDP each party receives names only the
SBC, each leg has its own SRTP keys, and the workers are told exactly what to relay."""

from __future__ import annotations

import base64
import itertools
import secrets
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from sbc.media.control import Command, Delete, SrtpKey, Update
from sbc.media.session import MediaController, MediaPolicy, MediaRefused, OriginIds, SideMedia
from sbc.sdp.sdes import Crypto
from sbc.sdp.sdp import Session

ACCESS_IP = "203.0.113.1"
CORE_IP = "10.1.0.1"
KEY1 = "PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR"
KEY2 = "NzB4d1BINUAvLEw6UzF3WSJ+PSdFcGdUJShpX1Zj"


def policy(access: str = "optional", core: str = "off") -> MediaPolicy:
    return MediaPolicy(
        sides={
            "access": SideMedia(bind="0.0.0.0", advertise=ACCESS_IP, srtp=access),
            "core": SideMedia(bind=CORE_IP, advertise=CORE_IP, srtp=core),
        },
        ports=(30000, 30099),
        workers=2,
    )


def sdp(*lines: str) -> bytes:
    return ("\r\n".join(lines) + "\r\n").encode()


SRTP_OFFER = sdp(
    "v=0",
    "o=alice 2890844526 2890844526 IN IP4 192.168.1.20",
    "s=-",
    "c=IN IP4 192.168.1.20",
    "t=0 0",
    "m=audio 49170 RTP/SAVP 0 8 101",
    "a=rtpmap:0 PCMU/8000",
    "a=rtpmap:101 telephone-event/8000",
    f"a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:{KEY1}",
    f"a=crypto:2 AES_CM_128_HMAC_SHA1_32 inline:{KEY2}",
    "a=candidate:1 1 UDP 2130706431 192.168.1.20 49170 typ host",
    "a=ice-ufrag:abcd",
    "a=rtcp:49171 IN IP4 192.168.1.20",
    "a=sendrecv",
)
PLAIN_ANSWER = sdp(
    "v=0",
    "o=kam 1 1 IN IP4 10.1.0.50",
    "s=-",
    "c=IN IP4 10.1.0.50",
    "t=0 0",
    "m=audio 5000 RTP/AVP 0 101",
    "a=rtpmap:0 PCMU/8000",
    "a=rtpmap:101 telephone-event/8000",
    "a=sendrecv",
)
PLAIN_OFFER = sdp(
    "v=0",
    "o=- 1 1 IN IP4 192.168.1.20",
    "s=-",
    "c=IN IP4 192.168.1.20",
    "t=0 0",
    "m=audio 4000 RTP/AVP 0",
    "a=sendrecv",
)


class Harness:
    def __init__(self, pol: MediaPolicy | None = None) -> None:
        self._sent: list[tuple[int, Command]] = []
        self.ctl = MediaController(pol or policy())

    @property
    def sent(self) -> list[tuple[int, Command]]:
        """Every command for the workers so far (what the core would return as actions)."""
        self._sent += self.ctl.take_commands()
        return self._sent

    def last_update(self) -> Update:
        _worker, cmd = self.sent[-1]
        assert isinstance(cmd, Update)
        return cmd

    def offer(self, body: bytes, toward_caller: bool = False, call: str = "c1") -> Session:
        out = self.ctl.offer(call, ("access", "core"), toward_caller, body, "application/sdp")
        return Session.parse(out)

    def answer(self, body: bytes, toward_caller: bool = True, call: str = "c1") -> Session:
        out = self.ctl.answer(call, ("access", "core"), toward_caller, body, "application/sdp")
        return Session.parse(out)


def test_srtp_offer_from_a_client_becomes_plain_rtp_to_the_core_and_back() -> None:
    h = Harness()
    to_core = h.offer(SRTP_OFFER)
    [m] = to_core.media
    # Only the SBC's core address and port; no ICE, no a=rtcp naming alice.
    assert to_core.connection == ("IP4", CORE_IP) and m.connection in (None, ("IP4", CORE_IP))
    assert str(to_core.origin).endswith(f"IN IP4 {CORE_IP}")
    assert m.proto == "RTP/AVP" and not m.has("crypto")  # core_srtp = off (interworking)
    assert not m.has("candidate") and not m.has("ice-ufrag") and not m.has("rtcp")
    # alice's PCMU and PCMA, then Opus and G.722 appended (events at Opus's clock too).
    assert m.formats == ["0", "8", "96", "9", "101", "97"] and m.has("sendrecv")
    assert b"192.168.1.20" not in bytes(to_core)
    update = h.last_update()
    [stream] = update.streams
    assert stream.a.recv_key == SrtpKey(
        suite="AES_CM_128_HMAC_SHA1_80", key_salt=base64.b64decode(KEY1)
    )
    assert stream.a.remote == ("192.168.1.20", 49170)
    assert stream.a.remote_rtcp == ("192.168.1.20", 49171)
    assert stream.b.port == m.port and stream.b.bind == CORE_IP and stream.b.remote is None
    assert stream.b.recv_key is None and stream.b.send_key is None
    assert stream.a.port != stream.b.port and stream.a.port % 2 == 0

    to_alice = h.answer(PLAIN_ANSWER)
    [m] = to_alice.media
    assert to_alice.connection == ("IP4", ACCESS_IP) and b"10.1.0.50" not in bytes(to_alice)
    # RFC 3264 6.1 / RFC 4568 7.1.1: the offer's profile, the first usable tag and suite,
    # and a key of the SBC's own: never alice's (or anyone else's) key.
    assert m.proto == "RTP/SAVP" and m.port == stream.a.port
    [line] = m.attributes("crypto")
    crypto = Crypto.parse(line)
    assert crypto.tag == 1 and crypto.suite == "AES_CM_128_HMAC_SHA1_80"
    assert crypto.key_salt != base64.b64decode(KEY1)
    [stream] = h.last_update().streams
    assert stream.a.send_key == SrtpKey(suite=crypto.suite, key_salt=crypto.key_salt)
    assert stream.b.remote == ("10.1.0.50", 5000) and stream.b.remote_rtcp == ("10.1.0.50", 5001)

    assert h.ctl.release("c1") is True
    assert h.sent[-1][1] == Delete(session="c1")
    assert h.ctl.state_size() == {"media_sessions": 0, "media_ports": 0}


def test_mandatory_srtp_to_the_core_offers_fresh_keys_and_takes_the_answered_tag() -> None:
    h = Harness(policy(access="optional", core="mandatory"))
    to_core = h.offer(PLAIN_OFFER)
    [m] = to_core.media
    assert m.proto == "RTP/SAVP"
    offered = [Crypto.parse(v) for v in m.attributes("crypto")]
    assert [(c.tag, c.suite) for c in offered] == [
        (1, "AES_CM_128_HMAC_SHA1_80"),
        (2, "AES_CM_128_HMAC_SHA1_32"),
    ]
    # Until its answer names a key, what the core party sends is not relayed.
    assert h.last_update().streams[0].b.accept is False
    answer = PLAIN_ANSWER.replace(b"RTP/AVP", b"RTP/SAVP").replace(
        b"a=sendrecv", f"a=crypto:2 AES_CM_128_HMAC_SHA1_32 inline:{KEY2}\r\na=sendrecv".encode()
    )
    to_alice = h.answer(answer)
    [m] = to_alice.media
    assert m.proto == "RTP/AVP" and not m.has("crypto")  # alice offered plain RTP
    [stream] = h.last_update().streams
    assert stream.b.recv_key == SrtpKey(
        suite="AES_CM_128_HMAC_SHA1_32", key_salt=base64.b64decode(KEY2)
    )
    assert stream.b.send_key == SrtpKey(suite=offered[1].suite, key_salt=offered[1].key_salt)
    assert stream.b.accept is True
    assert stream.a.recv_key is None and stream.a.send_key is None


@pytest.mark.parametrize(
    ("access", "body", "reason"),
    [
        ("mandatory", PLAIN_OFFER, "SRTP Required"),
        ("off", SRTP_OFFER, "SRTP Not Allowed"),
        (
            "optional",
            SRTP_OFFER.replace(b"AES_CM_128_HMAC_SHA1_80", b"F8_128_HMAC_SHA1_80").replace(
                b"AES_CM_128_HMAC_SHA1_32", b"F8_128_HMAC_SHA1_80"
            ),
            "No Usable Crypto: unsupported crypto suite F8_128_HMAC_SHA1_80",
        ),
        ("optional", b"v=0\r\nm=audio\r\n", None),
    ],
)
def test_offers_the_policy_cannot_meet_are_refused(
    access: str, body: bytes, reason: str | None
) -> None:
    h = Harness(policy(access=access))
    with pytest.raises(MediaRefused) as exc:
        h.offer(body)
    if reason is not None:
        assert str(exc.value) == reason
    else:
        assert str(exc.value).startswith("Bad SDP: ")
    assert h.ctl.state_size() == {"media_sessions": 0, "media_ports": 0}


def test_reoffer_keeps_ports_and_keys_bumps_the_version_and_a_refused_one_changes_nothing() -> None:
    h = Harness()
    first = h.offer(SRTP_OFFER)
    h.answer(PLAIN_ANSWER)
    before = h.last_update()
    hold = SRTP_OFFER.replace(b"a=sendrecv", b"a=sendonly")
    second = h.offer(hold)
    [m] = second.media
    assert m.direction() == "sendonly" and m.port == first.media[0].port
    assert second.origin.session_id == first.origin.session_id
    assert second.origin.version == first.origin.version + 1  # RFC 3264 8
    [stream] = h.last_update().streams
    assert stream.a.sends and stream.a.send_key == before.streams[0].a.send_key
    # An identical re-offer keeps the version.
    third = h.offer(hold)
    assert third.origin.version == second.origin.version
    # The callee refuses a re-offer with new addresses (488): the old state comes back.
    h.offer(SRTP_OFFER.replace(b"49170", b"50000"))
    h.ctl.rejected("c1")
    assert h.last_update().streams[0].a.remote == ("192.168.1.20", 49170)
    assert h.ctl.state_size()["media_ports"] == 2


def test_a_reoffer_keeps_the_sbcs_keys_towards_an_srtp_answerer() -> None:
    """RFC 4568 7.1.4: hold and resume re-offer the keys in use; a phone that keeps its
    own key (baresip 1.0 does) goes on decrypting what the relay sends it, and the leg is
    never muted while the re-offer is pending (found by tests/interop/test_matrix.py)."""
    h = Harness(policy(access="optional", core="mandatory"))
    first = h.offer(PLAIN_OFFER)
    offered = {Crypto.parse(v).tag: Crypto.parse(v) for v in first.media[0].attributes("crypto")}
    answer = PLAIN_ANSWER.replace(b"RTP/AVP", b"RTP/SAVP").replace(
        b"a=sendrecv", f"a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:{KEY1}\r\na=sendrecv".encode()
    )
    h.answer(answer)
    before = h.last_update().streams[0].b
    hold = h.offer(PLAIN_OFFER.replace(b"a=sendrecv", b"a=sendonly"))
    again = {Crypto.parse(v).tag: Crypto.parse(v) for v in hold.media[0].attributes("crypto")}
    assert again[1] == offered[1]  # the answered tag: the same suite and key
    pending = h.last_update().streams[0].b
    assert pending.send_key == before.send_key and pending.recv_key == before.recv_key
    assert pending.accept is True  # its packets keep flowing while the re-offer is pending
    h.answer(answer.replace(b"a=sendrecv", b"a=recvonly"))
    assert h.last_update().streams[0].b.send_key == before.send_key


def test_rejected_and_added_streams_and_early_answer_changes() -> None:
    h = Harness()
    offer = PLAIN_OFFER + b"m=video 0 RTP/AVP 96\r\nm=application 9 TCP/BFCP *\r\n"
    out = h.offer(offer)
    assert [m.port for m in out.media][1:] == [0, 0]  # rejected / TCP: no ports
    assert h.ctl.state_size()["media_ports"] == 2
    early = PLAIN_ANSWER + b"m=video 0 RTP/AVP 96\r\nm=application 0 TCP/BFCP *\r\n"
    h.answer(early)
    assert h.last_update().streams[0].b.remote == ("10.1.0.50", 5000)
    # 183 from an announcement server, then the callee's 200 from elsewhere.
    final = early.replace(b"10.1.0.50", b"10.1.0.77").replace(b"5000", b"6000")
    to_alice = h.answer(final)
    assert h.last_update().streams[0].b.remote == ("10.1.0.77", 6000)
    assert b"10.1.0.77" not in bytes(to_alice)


def test_end_to_end_keys_pass_untouched_but_addresses_are_the_sbcs() -> None:
    h = Harness(policy(access="mandatory", core="off"))
    dtls = sdp(
        "v=0",
        "o=- 1 1 IN IP4 192.168.1.20",
        "s=-",
        "c=IN IP4 192.168.1.20",
        "t=0 0",
        "a=fingerprint:sha-256 AB:CD",
        "m=audio 4000 UDP/TLS/RTP/SAVPF 111",
        "a=setup:actpass",
    )
    out = h.offer(dtls)
    [m] = out.media
    assert m.proto == "UDP/TLS/RTP/SAVPF" and m.has("setup") and out.has("fingerprint")
    assert out.connection == ("IP4", CORE_IP)
    [stream] = h.last_update().streams
    assert stream.passthrough and stream.a.recv_key is None


def test_hold_with_a_null_address_is_kept_and_the_party_does_not_count_as_sending() -> None:
    h = Harness()
    h.offer(PLAIN_OFFER)
    h.answer(PLAIN_ANSWER)
    out = h.offer(PLAIN_OFFER.replace(b"c=IN IP4 192.168.1.20", b"c=IN IP4 0.0.0.0"))
    assert out.media_connection(out.media[0]) == ("IP4", "0.0.0.0")
    [stream] = h.last_update().streams
    assert stream.a.remote is None


def test_ports_spread_over_workers_and_run_out_with_a_clear_refusal() -> None:
    h = Harness(
        MediaPolicy(
            sides=policy().sides,
            ports=(30000, 30007),
            workers=2,  # 4 pairs: 2 per worker
        )
    )
    h.offer(PLAIN_OFFER, call="x")
    h.offer(PLAIN_OFFER, call="y")
    assert {w for w, _ in h.sent} == {0, 1}
    with pytest.raises(MediaRefused, match="No Media Ports Available"):
        h.offer(PLAIN_OFFER + b"m=audio 4002 RTP/AVP 0\r\n", call="x")
    h.ctl.release("x")
    h.ctl.release("y")
    assert h.ctl.state_size() == {"media_sessions": 0, "media_ports": 0}


# -- byte fixtures: offer in, offer out (tests/data/sdp/anchor/) ---------------------------
DATA = Path(__file__).parent / "data" / "sdp"


@pytest.fixture
def predictable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys and o= ids from counters, so the rewritten SDP can be compared byte for byte."""
    counter = itertools.count(1)
    ids = itertools.count(1000)
    monkeypatch.setattr(
        secrets, "token_bytes", lambda n: bytes((next(counter) * 7 + i) % 256 for i in range(n))
    )
    monkeypatch.setattr(
        sys.modules[__name__], "ORIGIN_IDS", lambda: (next(ids), next(ids), next(ids), next(ids))
    )


# The o= ids of the controllers fixture_controller makes (None: random ones).
ORIGIN_IDS: Callable[[], OriginIds] | None = None


def fixture_controller(core_srtp: str) -> MediaController:
    return MediaController(
        MediaPolicy(
            sides={
                "access": SideMedia(bind=ACCESS_IP, advertise=ACCESS_IP, srtp="optional"),
                "core": SideMedia(bind=CORE_IP, advertise=CORE_IP, srtp=core_srtp),
            },
            ports=(30000, 30099),
        ),
        origin_ids=ORIGIN_IDS,
    )


@pytest.mark.usefixtures("predictable")
def test_baresip_srtp_offer_and_the_cores_plain_answer_as_bytes() -> None:
    """baresip (SRTP, tags 1: _32 and 2: _80) to a plain-RTP core and back: crypto and the
    client's addresses gone towards the core; RTP/SAVP, tag 1 with the SBC's key, the SBC's
    address, s=- (not s=Asterisk) back to the client."""
    ctl = fixture_controller("off")
    out = ctl.offer(
        "c", ("access", "core"), False, (DATA / "baresip_offer.sdp").read_bytes(), "application/sdp"
    )
    assert out == (DATA / "anchor" / "baresip_offer_to_core.sdp").read_bytes()
    answer = (DATA / "anchor" / "core_answer.sdp").read_bytes()
    out = ctl.answer("c", ("access", "core"), True, answer, "application/sdp")
    assert out == (DATA / "anchor" / "core_answer_to_baresip.sdp").read_bytes()


@pytest.mark.usefixtures("predictable")
def test_linphone_offer_with_ice_and_rtcp_mux_to_a_mandatory_srtp_core_as_bytes() -> None:
    """ICE (session and media level) and a=rtcp removed, rtcp-mux kept, the SBC's own two
    crypto lines in place of linphone's."""
    ctl = fixture_controller("mandatory")
    out = ctl.offer(
        "c",
        ("access", "core"),
        False,
        (DATA / "linphone_offer.sdp").read_bytes(),
        "application/sdp",
    )
    assert out == (DATA / "anchor" / "linphone_offer_to_core.sdp").read_bytes()


def test_srtp_passthrough_policy_forwards_the_parties_keys_and_relays_srtp_unchanged() -> None:
    pol = policy(access="optional", core="off")
    h = Harness(
        MediaPolicy(sides=pol.sides, ports=pol.ports, workers=pol.workers, srtp_passthrough=True)
    )
    to_core = h.offer(SRTP_OFFER)
    [m] = to_core.media
    # The keys go end to end (the core's "off" does not apply); addresses are the SBC's.
    assert m.proto == "RTP/SAVP" and m.attributes("crypto") == [
        f"1 AES_CM_128_HMAC_SHA1_80 inline:{KEY1}",
        f"2 AES_CM_128_HMAC_SHA1_32 inline:{KEY2}",
    ]
    assert to_core.connection == ("IP4", CORE_IP) and not m.has("candidate")
    [stream] = h.last_update().streams
    assert stream.passthrough and stream.a.recv_key is None and stream.b.send_key is None
    answer = PLAIN_ANSWER.replace(b"RTP/AVP", b"RTP/SAVP").replace(
        b"a=sendrecv", f"a=crypto:2 AES_CM_128_HMAC_SHA1_32 inline:{KEY2}\r\na=sendrecv".encode()
    )
    [m] = h.answer(answer).media
    assert m.attributes("crypto") == [f"2 AES_CM_128_HMAC_SHA1_32 inline:{KEY2}"]
