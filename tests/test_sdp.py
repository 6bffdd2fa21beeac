"""SDP (RFC 4566): byte-exact round trips of real bodies, edits, and the exact error reasons."""

from __future__ import annotations

from pathlib import Path

import pytest

from sbc.sdp import Media, Origin, SdpError, Session

DATA = Path(__file__).parent / "data" / "sdp"
CRLF_FIXTURES = [
    "baresip_offer",
    "linphone_offer",
    "answer_video_rejected",
    "hold_sendonly",
    "session_and_media_c",
    "ipv6",
]


def fixture(name: str) -> bytes:
    return (DATA / f"{name}.sdp").read_bytes()


def crlf(text: str) -> bytes:
    """Lines of ``text`` (one per source line, leading newline dropped) with CRLF endings."""
    return text.lstrip("\n").replace("\n", "\r\n").encode()


@pytest.mark.parametrize("name", CRLF_FIXTURES)
def test_round_trip_exact(name: str) -> None:
    data = fixture(name)
    assert data.endswith(b"\r\n") and b"\r\n" in data
    assert bytes(Session.parse(data)) == data


def test_lf_input_renders_crlf() -> None:
    data = fixture("lf_endings")
    assert b"\r" not in data
    session = Session.parse(data)
    assert bytes(session) == data.replace(b"\n", b"\r\n")
    assert session.lines[2] == ("s", "")
    assert session.media[0].connection == ("IP4", "10.0.0.7")


def test_mixed_endings_and_trailing_empty_line() -> None:
    data = b"v=0\r\no=- 1 1 IN IP4 10.0.0.1\ns=-\r\nt=0 0\n\r\n"
    assert bytes(Session.parse(data)) == b"v=0\r\no=- 1 1 IN IP4 10.0.0.1\r\ns=-\r\nt=0 0\r\n"


def test_non_utf8_round_trip() -> None:
    data = b"v=0\r\no=- 1 1 IN IP4 10.0.0.1\r\ns=caf\xe9 \xff\r\nt=0 0\r\n"
    assert bytes(Session.parse(data)) == data


def test_baresip_offer_views() -> None:
    session = Session.parse(fixture("baresip_offer"))
    assert session.origin == Origin("-", "1977356487", 2489215938, "IN", "IP4", "192.168.1.23")
    assert session.connection == ("IP4", "192.168.1.23")
    assert session.attributes("tool") == ["baresip 3.10.1"]
    (audio,) = session.media
    assert (audio.kind, audio.port, audio.port_count, audio.proto) == (
        "audio",
        10936,
        None,
        "RTP/SAVP",
    )
    assert audio.formats == ["96", "0", "8", "101"]
    assert audio.lines[0] == ("b", "AS:83")
    assert audio.attributes("crypto") == [
        "1 AES_CM_128_HMAC_SHA1_32 inline:e2FUGZTmuX5w4JQji+oZQFWGipAiP7geW+IO6Jam",
        "2 AES_CM_128_HMAC_SHA1_80 inline:tjjtBR/TiF/PYi6bDQHW9RiaEMc9TAZkVsdH8nnw",
    ]
    assert audio.attributes("rtcp-rsize") == [""]
    assert audio.attributes("rtcp") == []  # a=rtcp-rsize is not a=rtcp
    assert audio.has("sendrecv") and not audio.has("rtcp")
    assert audio.connection is None
    assert session.media_connection(audio) == ("IP4", "192.168.1.23")
    assert audio.direction() == "sendrecv"
    assert session.media_direction(audio) == "sendrecv"


def test_linphone_offer_views() -> None:
    session = Session.parse(fixture("linphone_offer"))
    (audio,) = session.media
    assert audio.attributes("rtcp") == ["7079"]
    assert audio.has("rtcp-mux")
    assert [c.split()[0] for c in audio.attributes("crypto")] == ["1", "2"]
    assert len(audio.attributes("candidate")) == 4
    assert session.attributes("ice-ufrag") == ["2b1c9f3e"]
    assert audio.direction() is None
    assert session.media_direction(audio) == "sendrecv"  # RFC 3264 5.1 default


def test_rejected_video_and_hold() -> None:
    answer = Session.parse(fixture("answer_video_rejected"))
    video = answer.media[1]
    assert (video.kind, video.port, video.formats, video.lines) == ("video", 0, ["96"], [])
    hold = Session.parse(fixture("hold_sendonly"))
    assert hold.connection == ("IP4", "0.0.0.0")
    assert hold.media_direction(hold.media[0]) == "sendonly"


def test_session_and_media_connection() -> None:
    session = Session.parse(fixture("session_and_media_c"))
    audio, video = session.media
    assert session.media_connection(audio) == ("IP4", "192.0.2.21")
    assert session.media_connection(video) == ("IP4", "192.0.2.20")
    assert audio.attributes("rtcp") == ["53021 IN IP4 192.0.2.22"]
    assert (video.port, video.port_count) == (51372, 2)
    assert session.media_direction(audio) == "recvonly"  # session-level flag
    assert session.media_direction(video) == "sendrecv"


def test_ipv6() -> None:
    session = Session.parse(fixture("ipv6"))
    assert session.connection is None
    assert session.origin.addrtype == "IP6"
    assert session.media_connection(session.media[0]) == ("IP6", "::1")
    assert session.media_direction(session.media[0]) == "inactive"


def test_multicast_connection_drops_ttl() -> None:
    session = Session.parse(b"v=0\no=- 1 1 IN IP4 h\ns=-\nc=IN IP4 224.2.1.1/127/3\nt=0 0\n")
    assert session.connection == ("IP4", "224.2.1.1")


def test_edit_anchor_media() -> None:
    """What the SBC does to an offer: new origin address and version, its own c= and port,
    no ICE, and the other side's lines kept as they were."""
    session = Session.parse(fixture("linphone_offer"))
    origin = session.origin
    origin.address = "203.0.113.1"
    origin.version += 1
    session.origin = origin
    session.connection = ("IP4", "203.0.113.1")
    session.remove("ice-pwd")
    session.remove("ice-ufrag")
    audio = session.media[0]
    audio.port = 40000
    audio.remove("candidate")
    audio.remove("rtcp")
    audio.remove("crypto")
    audio.add("crypto", "1 AES_CM_128_HMAC_SHA1_80 inline:e2FUGZTmuX5w4JQji+oZQFWGipAiP7geW+IO6Jam")
    assert bytes(session) == crlf("""
v=0
o=alice 3091 1537 IN IP4 203.0.113.1
s=Talk
c=IN IP4 203.0.113.1
t=0 0
a=rtcp-xr:rcvr-rtt=all:10000 stat-summary=loss,dup,jitt,TTL voip-metrics
a=record:off
m=audio 40000 RTP/SAVP 96 97 98 0 8 18 101 99 100
a=rtpmap:96 opus/48000/2
a=fmtp:96 useinbandfec=1
a=rtpmap:97 speex/16000
a=fmtp:97 vbr=on
a=rtpmap:98 speex/8000
a=fmtp:98 vbr=on
a=fmtp:18 annexb=yes
a=rtpmap:101 telephone-event/48000
a=rtpmap:99 telephone-event/16000
a=rtpmap:100 telephone-event/8000
a=rtcp-mux
a=rtcp-fb:* trr-int 1000
a=rtcp-fb:* ccm tmmbr
a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:e2FUGZTmuX5w4JQji+oZQFWGipAiP7geW+IO6Jam
""")


def test_edit_connection_insert_and_direction() -> None:
    """c= goes after i= at media level and before b=/t= at session level (RFC 4566 5)."""
    session = Session.parse(fixture("session_and_media_c"))
    session.connection = None
    audio, video = session.media
    audio.connection = ("IP6", "2001:db8::9")
    video.connection = ("IP4", "192.0.2.99")
    video.set_direction("sendonly")
    audio.set_direction("inactive")
    session.set_direction("sendrecv")
    session.connection = ("IP4", "192.0.2.98")
    video.formats.append("100")
    video.port_count = None
    assert bytes(session) == crlf("""
v=0
o=bob 2890844527 2890844527 IN IP4 192.0.2.20
s=Call
i=A call with audio and video
c=IN IP4 192.0.2.98
b=AS:2000
t=0 0
a=sendrecv
m=audio 49170 RTP/AVP 8 101
i=voice
c=IN IP6 2001:db8::9
a=rtpmap:8 PCMA/8000
a=rtpmap:101 telephone-event/8000
a=rtcp:53021 IN IP4 192.0.2.22
a=inactive
m=video 51372 RTP/AVP 99 100
c=IN IP4 192.0.2.99
b=AS:1500
a=rtpmap:99 H264/90000
a=fmtp:99 profile-level-id=42e01f;packetization-mode=1
a=sendonly
""")


def test_edit_unhold_and_reject() -> None:
    session = Session.parse(fixture("hold_sendonly"))
    session.connection = ("IP4", "192.168.1.23")
    session.media[0].set_direction("sendrecv")
    session.media.append(Media("video", 0, None, "RTP/AVP", ["31"]))
    assert bytes(session) == crlf("""
v=0
o=- 1977356487 2489215939 IN IP4 192.168.1.23
s=-
c=IN IP4 192.168.1.23
t=0 0
m=audio 10936 RTP/AVP 0 101
a=rtpmap:0 PCMU/8000
a=rtpmap:101 telephone-event/8000
a=fmtp:101 0-15
a=sendrecv
a=ptime:20
m=video 0 RTP/AVP 31
""")


def test_unchanged_m_line_keeps_its_text() -> None:
    data = b"v=0\r\no=- 1 1 IN IP4 h\r\ns=-\r\nt=0 0\r\nm=audio  4000 RTP/AVP 0 \r\n"
    session = Session.parse(data)
    assert bytes(session) == data
    session.media[0].port = 4002
    assert bytes(session).endswith(b"\r\nm=audio 4002 RTP/AVP 0\r\n")


def test_zero_formats_accepted() -> None:
    session = Session.parse(b"v=0\no=- 1 1 IN IP4 h\ns=-\nt=0 0\nm=video 0 RTP/AVP\n")
    assert session.media[0].formats == []


def test_unknown_line_types_pass_through() -> None:
    data = (
        b"v=0\r\no=- 1 1 IN IP4 h\r\ns=-\r\nx=whatever\r\nt=0 0\r\nm=audio 1 RTP/AVP 0\r\ny=1\r\n"
    )
    session = Session.parse(data)
    assert session.media[0].lines == [("y", "1")]
    assert bytes(session) == data


def test_set_direction_rejects_unknown() -> None:
    session = Session.parse(fixture("hold_sendonly"))
    with pytest.raises(ValueError, match="not an SDP direction"):
        session.set_direction("sendmaybe")


HEAD = "v=0\no=- 1 1 IN IP4 10.0.0.1\ns=-\nt=0 0\n"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "SDP body is empty"),
        (b"\r\n\r\n", "SDP body is empty"),
        (b"v=0\r\n" + b"a=x\r\n" * 13107 + b"a=xxxxx\r\n", "SDP body larger than 65536 bytes"),
        (b"v=1\no=- 1 1 IN IP4 h\ns=-\nt=0 0\n", "SDP line 1: must be v=0"),
        (b"o=- 1 1 IN IP4 h\nv=0\ns=-\nt=0 0\n", "SDP line 1: must be v=0"),
        (b"v=0\no=- 1 1 IN IP4 h\n\ns=-\nt=0 0\n", "SDP line 3: not a type=value line"),
        (b"v=0\no=- 1 1 IN IP4 h\nS=-\nt=0 0\n", "SDP line 3: not a type=value line"),
        (b"v=0\no=- 1 1 IN IP4 h\ns -\nt=0 0\n", "SDP line 3: not a type=value line"),
        (b"v=0\no=- 1 1 IN IP4 h\nss=-\nt=0 0\n", "SDP line 3: not a type=value line"),
        (b"v=0\no=- 1 1 IN IP4\ns=-\nt=0 0\n", "SDP line 2: o= line needs 6 fields"),
        (b"v=0\no=- 1 x IN IP4 h\ns=-\nt=0 0\n", "SDP line 2: o= sess-version is not a number"),
        (
            b"v=0\no=- 1 1 IN IP4 h\no=- 1 1 IN IP4 h\ns=-\nt=0 0\n",
            "SDP line 3: more than one o= line",
        ),
        (b"v=0\ns=-\nt=0 0\n", "SDP has no o= line"),
        (b"v=0\no=- 1 1 IN IP4 h\nt=0 0\n", "SDP has no s= line"),
        (b"v=0\no=- 1 1 IN IP4 h\ns=-\n", "SDP has no t= line"),
        (b"v=0\no=- 1 1 IN IP4 h\ns=-\nm=audio 1 RTP/AVP 0\nt=0 0\n", "SDP has no t= line"),
        (HEAD.encode() + b"c=IN IP4\n", "SDP line 5: c= line needs nettype, addrtype and address"),
        (
            HEAD.encode() + b"m=audio 1 RTP/AVP 0\nc=IN\n",
            "SDP line 6: c= line needs nettype, addrtype and address",
        ),
        (HEAD.encode() + b"m=audio 4000\n", "SDP line 5: m= line needs port and proto"),
        (HEAD.encode() + b"m=audio RTP/AVP 0\n", "SDP line 5: m= port must be a number 0-65535"),
        (
            HEAD.encode() + b"m=audio 65536 RTP/AVP 0\n",
            "SDP line 5: m= port must be a number 0-65535",
        ),
        (HEAD.encode() + b"m=audio -1 RTP/AVP 0\n", "SDP line 5: m= port must be a number 0-65535"),
        (
            HEAD.encode() + b"m=audio 4000/0 RTP/AVP 0\n",
            "SDP line 5: m= port count must be a positive number",
        ),
        (HEAD.encode() + b"m=audio 0 RTP/AVP 0\n" * 65, "SDP line 69: more than 64 m= lines"),
    ],
)
def test_errors(body: bytes, reason: str) -> None:
    with pytest.raises(SdpError) as info:
        Session.parse(body)
    assert str(info.value) == reason


def test_limits_accept_maximum() -> None:
    session = Session.parse(HEAD.encode() + b"m=audio 0 RTP/AVP 0\n" * 64)
    assert len(session.media) == 64
    head = b"v=0\r\no=- 1 1 IN IP4 h\r\ns=-\r\nt=0 0\r\n"
    body = head + b"a=" + b"x" * (65536 - len(head) - 4) + b"\r\n"
    assert len(body) == 65536
    assert bytes(Session.parse(body)) == body
    with pytest.raises(SdpError, match=r"^SDP body larger than 65536 bytes$"):
        Session.parse(body + b"\n")


def test_origin_parse_and_str() -> None:
    origin = Origin.parse("jdoe 2890844526 2890842807 IN IP4 10.47.16.5")
    assert origin == Origin("jdoe", "2890844526", 2890842807, "IN", "IP4", "10.47.16.5")
    assert str(origin) == "jdoe 2890844526 2890842807 IN IP4 10.47.16.5"
    with pytest.raises(SdpError, match=r"^o= line needs 6 fields$"):
        Origin.parse("jdoe 1 2 IN IP4 h extra")
