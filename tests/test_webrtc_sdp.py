"""The SDP of a WebRTC leg: a browser's offer (Chrome's shape through sip.js) is terminated
at the SBC (ICE-lite, DTLS-SRTP) and the SIP phone on the other leg gets SDES-SRTP or RTP;
an offer towards a browser is WebRTC-shaped; the relay is told each WebRTC party's ICE
credentials, DTLS role and fingerprints."""

from __future__ import annotations

import pytest
from test_media_session import sdp

from sbc.media.control import Update
from sbc.media.session import MediaController, MediaPolicy, MediaRefused, SideMedia
from sbc.sdp.sdes import Crypto
from sbc.sdp.sdp import Media, Session

ACCESS_IP = "203.0.113.1"
CORE_IP = "10.1.0.1"
OURS = "sha-256 " + ":".join(["5A"] * 32)
CHROME_FP = ":".join(["C3"] * 32)
KEY1 = "PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR"


def policy(access: str = "optional", core: str = "mandatory", fp: str = OURS) -> MediaPolicy:
    return MediaPolicy(
        sides={
            "access": SideMedia(bind="0.0.0.0", advertise=ACCESS_IP, srtp=access),
            "core": SideMedia(bind=CORE_IP, advertise=CORE_IP, srtp=core),
        },
        ports=(30000, 30099),
        workers=1,
        dtls_fingerprint=fp,
    )


# What Chrome offers through sip.js (../shared/PEERS.md): one audio m-line, BUNDLE, complete
# candidates, DTLS actpass, rtcp-mux and rtcp-rsize, its codecs and RTP extensions.
CHROME_OFFER = sdp(
    "v=0",
    "o=- 4611731400430051336 2 IN IP4 127.0.0.1",
    "s=-",
    "t=0 0",
    "a=group:BUNDLE 0",
    "a=extmap-allow-mixed",
    "a=msid-semantic: WMS 6b8a",
    "m=audio 50123 UDP/TLS/RTP/SAVPF 111 63 9 0 8 13 110 126",
    "c=IN IP4 127.0.0.1",
    "a=rtcp:9 IN IP4 0.0.0.0",
    "a=candidate:3442447574 1 udp 2122260223 127.0.0.1 50123 typ host generation 0",
    "a=candidate:2 1 tcp 1518280447 127.0.0.1 9 typ host tcptype active generation 0",
    "a=ice-ufrag:Xa3p",
    "a=ice-pwd:kR9cdq0PdD8JkRq2Cpd2xGEm",
    "a=ice-options:trickle",
    f"a=fingerprint:sha-256 {CHROME_FP}",
    "a=setup:actpass",
    "a=mid:0",
    "a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level",
    "a=sendrecv",
    "a=msid:6b8a 2f1c",
    "a=rtcp-mux",
    "a=rtcp-rsize",
    "a=rtpmap:111 opus/48000/2",
    "a=rtcp-fb:111 transport-cc",
    "a=fmtp:111 minptime=10;useinbandfec=1",
    "a=rtpmap:63 red/48000/2",
    "a=fmtp:63 111/111",
    "a=rtpmap:9 G722/8000",
    "a=rtpmap:0 PCMU/8000",
    "a=rtpmap:8 PCMA/8000",
    "a=rtpmap:13 CN/8000",
    "a=rtpmap:110 telephone-event/48000",
    "a=rtpmap:126 telephone-event/8000",
    "a=ssrc:1001 cname:abcd",
)
PHONE_ANSWER = sdp(
    "v=0",
    "o=bob 1 1 IN IP4 10.1.0.50",
    "s=-",
    "c=IN IP4 10.1.0.50",
    "t=0 0",
    "m=audio 5000 RTP/SAVP 0 126",
    "a=rtpmap:0 PCMU/8000",
    "a=rtpmap:126 telephone-event/8000",
    f"a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:{KEY1}",
    "a=sendrecv",
)
PHONE_OFFER = sdp(
    "v=0",
    "o=bob 1 1 IN IP4 10.1.0.50",
    "s=-",
    "c=IN IP4 10.1.0.50",
    "t=0 0",
    "m=audio 5000 RTP/SAVP 0 8 101",
    "a=rtpmap:0 PCMU/8000",
    "a=rtpmap:8 PCMA/8000",
    "a=rtpmap:101 telephone-event/8000",
    f"a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:{KEY1}",
    "a=sendrecv",
)
CHROME_ANSWER = sdp(
    "v=0",
    "o=- 99 2 IN IP4 127.0.0.1",
    "s=-",
    "t=0 0",
    "a=group:BUNDLE 0",
    "m=audio 50200 UDP/TLS/RTP/SAVPF 0 101",
    "c=IN IP4 127.0.0.1",
    "a=candidate:1 1 udp 2122260223 127.0.0.1 50200 typ host generation 0",
    "a=ice-ufrag:Yb4q",
    "a=ice-pwd:zzR9cdq0PdD8JkRq2Cpd2xGE",
    f"a=fingerprint:sha-256 {CHROME_FP}",
    "a=setup:active",
    "a=mid:0",
    "a=sendrecv",
    "a=rtcp-mux",
    "a=rtpmap:0 PCMU/8000",
    "a=rtpmap:101 telephone-event/8000",
)


class Harness:
    def __init__(self, pol: MediaPolicy | None = None, caller: str = "access") -> None:
        self.ctl = MediaController(pol or policy())
        # The caller's side and the callee's: a browser is always on the access side.
        self.sides = (caller, "core" if caller == "access" else "access")

    def last_update(self) -> Update:
        updates = [cmd for _w, cmd in self.ctl.take_commands() if isinstance(cmd, Update)]
        return updates[-1]

    def offer(self, body: bytes, *, toward_caller: bool = False, webrtc: bool = False) -> Session:
        out = self.ctl.offer("c1", self.sides, toward_caller, body, "application/sdp", webrtc)
        return Session.parse(out)

    def answer(self, body: bytes, *, toward_caller: bool = True) -> Session:
        out = self.ctl.answer("c1", self.sides, toward_caller, body, "application/sdp")
        return Session.parse(out)


def only(m: Media, name: str) -> str:
    [value] = m.attributes(name)
    return value


def test_a_browser_offer_reaches_the_phone_as_sdes_srtp_without_webrtc_lines() -> None:
    h = Harness()
    to_phone = h.offer(CHROME_OFFER)
    [m] = to_phone.media
    assert m.proto == "RTP/SAVP"  # core_srtp = mandatory: SDES-SRTP, no feedback profile
    assert m.connection in (None, ("IP4", CORE_IP)) and to_phone.connection in (
        None, ("IP4", CORE_IP),
    )  # fmt: skip
    assert Crypto.parse(m.attributes("crypto")[0]).suite == "AES_CM_128_HMAC_SHA1_80"
    for name in ("fingerprint", "setup", "mid", "ice-ufrag", "candidate", "extmap", "msid",
                 "ssrc", "rtcp-fb", "rtcp-rsize", "rtcp"):  # fmt: skip
        assert not m.has(name), name
    for name in ("group", "msid-semantic", "extmap-allow-mixed", "ice-lite"):
        assert not to_phone.has(name), name
    assert b"127.0.0.1" not in bytes(to_phone)
    assert "0" in m.formats and "111" in m.formats  # the codecs pass (Opus is transcodable)
    [stream] = h.last_update().streams
    assert not stream.passthrough
    browser = stream.a
    assert browser.webrtc is not None and browser.rtcp_mux
    assert browser.recv_key is None and browser.send_key is None
    assert browser.webrtc.fingerprints == (("sha-256", CHROME_FP),)
    assert not browser.webrtc.client  # Chrome's actpass: the SBC is the DTLS server
    assert len(browser.webrtc.ufrag) >= 4 and len(browser.webrtc.pwd) >= 22
    assert stream.b.webrtc is None


def test_the_browser_gets_an_ice_lite_dtls_answer_with_its_mid() -> None:
    h = Harness()
    h.offer(CHROME_OFFER)
    to_browser = h.answer(PHONE_ANSWER)
    [m] = to_browser.media
    [stream] = h.last_update().streams
    browser = stream.a
    assert browser.webrtc is not None
    assert m.proto == "UDP/TLS/RTP/SAVPF" and m.port == browser.port
    assert to_browser.has("ice-lite")
    assert only(m, "mid") == "0"
    assert only(m, "setup") == "passive"
    assert only(m, "fingerprint") == OURS
    assert only(m, "ice-ufrag") == browser.webrtc.ufrag
    assert only(m, "ice-pwd") == browser.webrtc.pwd
    assert only(m, "candidate").split() == [
        "1", "1", "udp", "2130706431", ACCESS_IP, str(browser.port), "typ", "host",
    ]  # fmt: skip
    assert m.has("end-of-candidates") and m.has("rtcp-mux") and not m.has("crypto")
    assert (to_browser.media_connection(m) or ("", ""))[1] == ACCESS_IP
    assert b"10.1.0.50" not in bytes(to_browser)
    # The phone's leg: its SDES key, and the SBC's own towards it.
    assert stream.b.recv_key is not None and stream.b.send_key is not None
    assert stream.b.remote == ("10.1.0.50", 5000)


def test_an_offer_to_a_browser_is_webrtc_shaped_and_its_answer_sets_the_dtls_role() -> None:
    h = Harness(caller="core")
    # The phone (on the core side here) calls a user registered over a WebSocket.
    to_browser = h.offer(PHONE_OFFER, webrtc=True)
    [m] = to_browser.media
    assert m.proto == "UDP/TLS/RTP/SAVPF" and not m.has("crypto")
    assert only(m, "setup") == "actpass" and only(m, "mid") == "0"
    assert only(m, "fingerprint") == OURS and m.has("rtcp-mux") and m.has("end-of-candidates")
    assert to_browser.has("ice-lite")
    assert [f for f in m.formats if f in ("0", "8", "101")] == ["0", "8", "101"]
    [stream] = h.last_update().streams
    assert stream.b.webrtc is not None and stream.b.webrtc.fingerprints == ()
    to_phone = h.answer(CHROME_ANSWER, toward_caller=True)
    [pm] = to_phone.media
    assert pm.proto == "RTP/SAVP" and pm.has("crypto")
    assert not (pm.has("fingerprint") or pm.has("setup") or pm.has("mid"))
    assert not to_phone.has("ice-lite") and not to_phone.has("group")
    [stream] = h.last_update().streams
    assert stream.b.webrtc is not None
    assert stream.b.webrtc.fingerprints == (("sha-256", CHROME_FP),)
    assert not stream.b.webrtc.client  # Chrome answered active
    assert stream.b.remote == ("127.0.0.1", 50200)
    # A re-offer (hold from the phone) keeps the SBC's ICE credentials and mid.
    creds = (stream.b.webrtc.ufrag, stream.b.webrtc.pwd)
    again = h.offer(PHONE_OFFER.replace(b"a=sendrecv", b"a=sendonly"))
    [m2] = again.media
    assert (only(m2, "ice-ufrag"), only(m2, "ice-pwd")) == creds and only(m2, "mid") == "0"
    assert only(m2, "setup") == "actpass" and m2.direction() == "sendonly"


def test_a_passive_browser_makes_the_sbc_the_dtls_client() -> None:
    h = Harness()
    h.offer(CHROME_OFFER.replace(b"a=setup:actpass", b"a=setup:passive"))
    to_browser = h.answer(PHONE_ANSWER)
    assert only(to_browser.media[0], "setup") == "active"
    [stream] = h.last_update().streams
    assert stream.a.webrtc is not None and stream.a.webrtc.client


def test_hold_towards_a_browser_keeps_the_address_for_ice() -> None:
    h = Harness(caller="core")
    h.offer(PHONE_OFFER, webrtc=True)
    h.answer(CHROME_ANSWER, toward_caller=True)
    held = PHONE_OFFER.replace(b"c=IN IP4 10.1.0.50", b"c=IN IP4 0.0.0.0")
    out = h.offer(held)
    [m] = out.media
    assert (out.media_connection(m) or ("", ""))[1] == ACCESS_IP
    assert m.direction() == "inactive"


def test_dtls_srtp_without_ice_still_passes_end_to_end() -> None:
    h = Harness()
    out = h.offer(sdp(
        "v=0", "o=- 1 1 IN IP4 192.168.1.20", "s=-", "c=IN IP4 192.168.1.20", "t=0 0",
        f"a=fingerprint:sha-256 {CHROME_FP}", "m=audio 4000 UDP/TLS/RTP/SAVP 0",
        "a=setup:actpass",
    ))  # fmt: skip
    assert out.media[0].proto == "UDP/TLS/RTP/SAVP" and out.has("fingerprint")
    [stream] = h.last_update().streams
    assert stream.passthrough and stream.a.webrtc is None


def test_webrtc_needs_the_sbcs_certificate_and_the_browsers_fingerprint() -> None:
    h = Harness(policy(fp=""))
    with pytest.raises(MediaRefused, match="WebRTC Not Available"):
        h.offer(CHROME_OFFER)
    h = Harness()
    with pytest.raises(MediaRefused, match="No DTLS Fingerprint"):
        h.offer(CHROME_OFFER.replace(f" {CHROME_FP}".encode(), b""))
    assert h.ctl.state_size() == {"media_sessions": 0, "media_ports": 0}


def test_a_data_channel_m_line_is_rejected_and_audio_goes_on() -> None:
    h = Harness()
    offer = CHROME_OFFER + sdp(
        "m=application 50124 UDP/DTLS/SCTP webrtc-datachannel",
        "c=IN IP4 127.0.0.1",
        "a=mid:1",
        "a=sctp-port:5000",
    )
    out = h.offer(offer)
    assert out.media[0].port != 0 and out.media[1].port == 0
    [stream] = h.last_update().streams
    assert stream.index == 0


def test_an_ice_restart_gets_new_credentials_and_keeps_the_dtls_roles() -> None:
    h = Harness()
    h.offer(CHROME_OFFER.replace(b"a=setup:actpass", b"a=setup:passive"))
    first = h.answer(PHONE_ANSWER)
    creds = (only(first.media[0], "ice-ufrag"), only(first.media[0], "ice-pwd"))
    assert only(first.media[0], "setup") == "active"  # the SBC is the DTLS client
    # A re-offer (actpass, same certificate, same ICE credentials): nothing changes.
    h.offer(CHROME_OFFER.replace(b"o=- 4611731400430051336 2", b"o=- 4611731400430051336 3"))
    again = h.answer(PHONE_ANSWER)
    assert only(again.media[0], "setup") == "active"
    assert (only(again.media[0], "ice-ufrag"), only(again.media[0], "ice-pwd")) == creds
    # New ICE credentials from the browser: an ICE restart (RFC 8445 9), joined with new ones.
    restart = CHROME_OFFER.replace(b"a=ice-ufrag:Xa3p", b"a=ice-ufrag:Zz9q")
    h.offer(restart)
    joined = h.answer(PHONE_ANSWER)
    assert (only(joined.media[0], "ice-ufrag"), only(joined.media[0], "ice-pwd")) != creds
    [stream] = h.last_update().streams
    assert stream.a.webrtc is not None and stream.a.webrtc.client  # the roles stay


def test_a_browser_answer_without_a_fingerprint_refuses_the_stream() -> None:
    h = Harness(caller="core")
    h.offer(PHONE_OFFER, webrtc=True)
    to_phone = h.answer(
        CHROME_ANSWER.replace(f"a=fingerprint:sha-256 {CHROME_FP}\r\n".encode(), b"")
    )
    [m] = to_phone.media
    assert m.port == 0 and not m.has("crypto")
    assert h.ctl.state_size()["media_ports"] == 0


def test_end_to_end_keys_cannot_go_to_a_browser() -> None:
    h = Harness(caller="core")
    dtls_phone = sdp(
        "v=0", "o=- 1 1 IN IP4 10.1.0.50", "s=-", "c=IN IP4 10.1.0.50", "t=0 0",
        f"a=fingerprint:sha-256 {CHROME_FP}", "m=audio 4000 UDP/TLS/RTP/SAVP 0",
        "a=setup:actpass",
    )  # fmt: skip
    with pytest.raises(MediaRefused, match="End-To-End Keys"):
        h.offer(dtls_phone, webrtc=True)
    assert h.ctl.state_size() == {"media_sessions": 0, "media_ports": 0}
