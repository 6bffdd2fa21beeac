"""rtpengine's ng protocol: the message codec, the client's cookies, retransmissions and
timeouts, and the node pool's choice, stickiness and health."""

from __future__ import annotations

import random
from typing import Any

import pytest

from sbc.media import ng
from sbc.media.ng import NgClient, Node, NodePool, NoNode


def test_messages_round_trip_and_bad_ones_are_named() -> None:
    message = {"command": "offer", "call-id": "c1", "flags": ["trust-address"], "n": 3,
               "sdp": "v=0\r\n", "replace": ["origin", "session-connection"]}  # fmt: skip
    data = ng.encode("abc1", message)
    assert data.startswith(b"abc1 d")
    assert ng.decode(data) == ("abc1", message)
    # rtpengine's documentation's example reply
    assert ng.decode(b"5323_1 d6:result4:ponge") == ("5323_1", {"result": "pong"})
    for bad, why in ((b"nocookie", "no cookie"), (b"c1 i3e", "not a dictionary"),
                     (b"c1 d6:result", "bad bencoding")):  # fmt: skip
        with pytest.raises(ng.NgError, match=why):
            ng.decode(bad)


def reply(cookie: str, **fields: object) -> bytes:
    return ng.encode(cookie, dict(fields))


def test_a_reply_is_matched_by_cookie_and_node() -> None:
    client = NgClient()
    c1, d1 = client.request("n1", {"command": "ping"}, 10.0)
    c2, _ = client.request("n1", {"command": "query", "call-id": "x"}, 10.0)
    assert c1 != c2 and d1.startswith(c1.encode() + b" ")
    assert client.receive("n2", reply(c1, result="pong"), 10.1) is None  # another node
    got = client.receive("n1", reply(c1, result="pong"), 10.25)
    assert got is not None and got.ok and got.command == "ping" and got.rtt == pytest.approx(0.25)
    assert client.receive("n1", reply(c1, result="pong"), 10.3) is None  # a duplicate
    err = client.receive("n1", reply(c2, result="error", **{"error-reason": "Unknown call-id"}), 11)
    assert err is not None and not err.ok and err.error == "Unknown call-id"
    assert client.receive("n1", b"garbage", 11.0) is None
    assert client.pending == 0 and client.next_deadline() is None


def test_the_same_bytes_are_sent_again_then_the_request_times_out() -> None:
    client = NgClient(first_timeout=0.5, tries=3)
    cookie, data = client.request("n1", {"command": "offer", "call-id": "c"}, 0.0)
    assert client.next_deadline() == 0.5
    assert client.handle_timer(0.4) == ([], [])
    resend, expired = client.handle_timer(0.5)
    assert resend == [("n1", data)] and expired == []  # same cookie: idempotent at the node
    assert client.next_deadline() == pytest.approx(1.5)  # the interval doubles
    resend, _ = client.handle_timer(1.5)
    assert resend == [("n1", data)]
    resend, expired = client.handle_timer(3.5)
    assert resend == [] and [(t.cookie, t.node, t.command) for t in expired] == [
        (cookie, "n1", "offer")
    ]
    assert client.retransmissions == 2 and client.timeouts == 1 and client.pending == 0
    # A reply to a retransmitted request counts its round trip from the first send.
    cookie, _ = client.request("n1", {"command": "ping"}, 5.0)
    client.handle_timer(5.5)
    got = client.receive("n1", reply(cookie, result="pong"), 5.6)
    assert got is not None and got.rtt == pytest.approx(0.6)


def pool(*weights: int, seed: int = 1) -> NodePool:
    nodes = [Node(f"udp://127.0.0.1:{2223 + i}", ("127.0.0.1", 2223 + i), w)
             for i, w in enumerate(weights)]  # fmt: skip
    return NodePool(nodes, ping_interval=5.0, down_after=2, rng=random.Random(seed))


def test_new_calls_spread_by_weight_and_stick_to_their_node() -> None:
    p = pool(3, 1, 0)
    for node in p.nodes.values():
        p.pong(node, 0.001)
    counts = {name: 0 for name in p.nodes}
    for i in range(4000):
        counts[p.assign(f"c{i}").name] += 1
    a, b, standby = counts.values()
    assert 2800 < a < 3200 and 800 < b < 1200 and standby == 0
    first = p.assign("c7")
    assert p.assign("c7") is first and p.node_of("c7") is first
    p.release("c7")
    assert p.node_of("c7") is None and "c7" not in first.calls


def test_a_node_is_down_after_missed_pings_and_standbys_take_over() -> None:
    p = pool(1, 0)
    active, standby = p.nodes.values()
    with pytest.raises(NoNode):
        p.assign("c0")  # nothing answered a ping yet
    assert {n.name for n in p.pings_due(0.0)} == set(p.nodes)
    assert p.pings_due(1.0) == []  # the next round is ping_interval later
    assert p.pong(active, 0.002) and p.pong(standby, 0.003)
    assert p.assign("c1") is active  # weighted nodes first
    assert not p.missed_ping(active)  # one miss: still up
    assert p.missed_ping(active) and not active.up  # two: down
    assert p.assign("c2") is standby  # only the standby is up
    assert p.assign("c1") is active  # a call keeps its node (its media is there)
    assert p.pong(active, 0.001) and active.up and active.missed == 0
    assert p.next_ping() == 5.0


def test_a_reload_adds_reweights_and_retires_nodes_without_dropping_calls() -> None:
    p = pool(1, 1)
    a, b = p.nodes.values()
    for node in (a, b):
        p.pong(node, 0.001)
    calls_b = [c for c in (f"c{i}" for i in range(40)) if p.assign(c) is b]
    assert calls_b
    new = Node("udp://127.0.0.1:3000", ("127.0.0.1", 3000), 5)
    p.set_nodes([Node(a.name, a.address, 3), new])
    assert p.nodes[a.name] is a and a.weight == 3  # kept: its health and calls too
    assert b.retired and p.nodes[b.name] is b  # gone from the config, still holds calls
    assert new.name in p.nodes and not new.up  # pinged from now on
    assert all(p.assign(f"n{i}") is a for i in range(20))  # no new call on b; new not up
    assert p.node_of(calls_b[0]) is b  # b's calls stay there
    for call in calls_b:
        p.release(call)
    assert b.name not in p.nodes  # left with its last call


def test_a_reload_may_change_the_nodes_but_no_other_media_key() -> None:
    from sbc.app import restart_needed
    from sbc.config import parse_config

    def config(**media: object) -> object:
        return parse_config({"media": {"engine": "rtpengine", **media}}, source="t.toml")

    one = config(rtpengine=[{"url": "udp://127.0.0.1:2223"}])
    two = config(rtpengine=[{"url": "udp://127.0.0.1:2223"}, {"url": "udp://127.0.0.1:2224"}])
    assert restart_needed(one, two) == []  # type: ignore[arg-type]
    other = config(rtpengine=[{"url": "udp://127.0.0.1:2223"}], timeout=30)
    assert restart_needed(one, other) == ["media"]  # type: ignore[arg-type]


def test_the_flags_follow_the_policy_of_the_side_the_sdp_goes_to() -> None:
    from sbc.media.rtpengine import sdp_flags
    from sbc.media.session import SideMedia

    def side(srtp: str, codecs: tuple[str, ...] = ("PCMA",)) -> SideMedia:
        return SideMedia(bind="10.0.0.1", advertise="10.0.0.1", srtp=srtp, codecs=codecs)

    base = {"replace": ["origin", "session-connection"], "ICE": "remove", "DTLS": "off"}
    # mandatory: SRTP with the node's SDES keys; the side's codecs transcoded in offers.
    assert sdp_flags(side("mandatory"), offer=True) == {
        **base, "transport-protocol": "RTP/SAVP",
        # PCMA offered (added if missing); the other transcodable codecs masked.
        "codec": {"transcode": ["PCMA"], "mask": ["G722", "opus", "PCMU"]},
    }  # fmt: skip
    # off: plain RTP, no SDES at all; an answer asks for no codec.
    assert sdp_flags(side("off"), offer=False) == {
        **base, "transport-protocol": "RTP/AVP", "SDES": ["off"],
    }  # fmt: skip
    # optional: the protocol as offered.
    assert sdp_flags(side("optional", ()), offer=True) == base


def test_a_browser_gets_webrtc_from_the_node_and_a_phone_gets_its_sdp_without() -> None:
    from sbc.media.rtpengine import sdp_flags
    from sbc.media.session import SideMedia

    access = SideMedia(bind="10.0.0.1", advertise="10.0.0.1", srtp="optional", codecs=())
    # Towards a browser (ws/wss): ICE and DTLS-SRTP by the node, rtcp-mux, mids.
    assert sdp_flags(access, offer=True, to_browser=True) == {
        "replace": ["origin", "session-connection"], "ICE": "force", "DTLS": "passive",
        "transport-protocol": "UDP/TLS/RTP/SAVPF", "SDES": ["off"], "rtcp-mux": ["offer"],
        "flags": ["generate-mid"],
    }  # fmt: skip
    # Answering a browser's offer: the node keeps the DTLS role it took at the offer.
    answer = sdp_flags(access, offer=False, to_browser=True)
    assert "DTLS" not in answer and answer["rtcp-mux"] == ["accept"]
    # A browser's SDP towards a phone whose side follows the call: SRTP with SDES keys
    # (no AEAD suite), no ICE, no DTLS lines, RTCP on its own port if the phone wants.
    assert sdp_flags(access, offer=True, from_webrtc=True) == {
        "replace": ["origin", "session-connection"], "ICE": "remove",
        "transport-protocol": "RTP/SAVP", "rtcp-mux": ["demux"], "DTLS": "off",
        "SDES": ["no-AEAD_AES_256_GCM", "no-AEAD_AES_128_GCM"],
    }  # fmt: skip


def test_end_to_end_keys_pass_the_node_untouched_and_never_reach_a_browser() -> None:
    """DTLS-SRTP without ICE, MIKEY and ZRTP (and SDES with srtp_passthrough) are the
    parties' own keys: the node relays them with ``passthrough`` (keying attributes,
    protocol and codecs as written); towards a browser they are refused (488), as by the
    built-in relay."""
    from sbc.media.ng import decode
    from sbc.media.rtpengine import Rtpengine
    from sbc.media.session import MediaRefused, SideMedia

    head = "v=0\r\no=a 1 1 IN IP4 10.0.0.5\r\ns=-\r\nc=IN IP4 10.0.0.5\r\nt=0 0\r\n"
    offers = {
        "dtls": "m=audio 5000 UDP/TLS/RTP/SAVP 0\r\na=setup:actpass\r\n"
        "a=fingerprint:sha-256 AB:CD\r\n",
        "mikey": "m=audio 5000 RTP/SAVP 0\r\na=key-mgmt:mikey AQAFgM0X\r\n",
        "zrtp": "m=audio 5000 RTP/AVP 0\r\na=zrtp-hash:1.10 fe30efd0\r\n",
        "sdes": "m=audio 5000 RTP/SAVP 0\r\na=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:"
        + "A" * 40 + "\r\n",
        "webrtc": "m=audio 5000 UDP/TLS/RTP/SAVPF 111\r\na=ice-ufrag:abcd\r\n"
        "a=ice-pwd:0123456789012345678901\r\na=fingerprint:sha-256 AB:CD\r\n"
        "a=setup:actpass\r\n",
    }  # fmt: skip
    side = SideMedia(bind="10.0.0.1", advertise="10.0.0.1", srtp="mandatory", codecs=("PCMA",))

    def flags(kind: str, *, passthrough: bool = False, to_browser: bool = False) -> Any:
        pool = NodePool([Node("udp://127.0.0.9:2223", ("127.0.0.9", 2223))])
        pool.nodes["udp://127.0.0.9:2223"].up = True
        engine = Rtpengine(pool, {"core": side}, srtp_passthrough=passthrough)
        sent = engine.sdp(
            "c1", offer=True, from_caller=True, to_side="core",
            sdp=(head + offers[kind]).encode(), source="10.0.0.5", now=0.0,
            to_browser=to_browser,
        )  # fmt: skip
        message = decode(sent.data)[1]
        return {k: v for k, v in message.items() if k not in {"sdp", "call-id", "from-tag"}}

    for kind in ("dtls", "mikey", "zrtp"):
        assert flags(kind) == {
            "command": "offer", "received-from": ["IP4", "10.0.0.5"],
            "replace": ["origin", "session-connection"], "ICE": "remove", "passthrough": "on",
            "DTLS": "off", "SDES": ["off"],
        }, kind  # fmt: skip
        with pytest.raises(MediaRefused, match="End-To-End Keys Not Possible"):
            flags(kind, to_browser=True)
    # SDES: the node's own keys per leg unless the policy leaves them to the parties.
    assert "passthrough" not in flags("sdes")
    assert flags("sdes")["transport-protocol"] == "RTP/SAVP"
    assert flags("sdes", passthrough=True)["passthrough"] == "on"
    # A browser's DTLS over ICE is the SBC's to key (its node terminates it): no passthrough.
    assert "passthrough" not in flags("webrtc", passthrough=True)
