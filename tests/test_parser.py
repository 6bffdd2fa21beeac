"""SIP message layer: parsing, serialization round trips, URIs, headers, framing, limits."""

from __future__ import annotations

import pytest
from sipdata import rfc4475, rfc5118, rfc5118_names, sip

from sbc.sip.headers import parse_name_addr, parse_via, split_list
from sbc.sip.message import ParseError, Request, Response, make_response
from sbc.sip.parser import Limits, StreamFramer, parse_message
from sbc.sip.uri import AbsoluteUri, SipUri, TelUri, parse_uri

# RFC 4475 3.1.1 (valid), 3.3 (application-layer cases, syntactically valid), 3.4.1.
PARSEABLE = [
    "wsinv", "intmeth", "esc01", "escnull", "esc02", "lwsdisp", "longreq", "dblreq",
    "semiuri", "transports", "mpart01", "unreason", "noreason", "badbranch", "unkscm",
    "novelsc", "unksm2", "bext01", "invut", "regaut01", "bcast", "zeromf", "cparam01",
    "cparam02", "regescrt", "sdp01", "inv2543", "baddate",
]  # fmt: skip

OPTIONS = sip("""
OPTIONS sip:127.0.0.1:5060 SIP/2.0
Via: SIP/2.0/UDP 192.0.2.1:5062;branch=z9hG4bK776asdhds;rport
Max-Forwards: 70
To: <sip:127.0.0.1:5060>
From: "Alice" <sip:alice@example.com>;tag=1928301774
Call-ID: a84b4c76e66710@pc33.example.com
CSeq: 63104 OPTIONS
Content-Length: 0

""")


@pytest.mark.parametrize("name", PARSEABLE)
def test_rfc4475_valid_messages_parse_and_round_trip(name: str) -> None:
    data = rfc4475(name)
    msg = parse_message(data)
    if name == "dblreq":
        # RFC 4475 3.1.1.8: only the REGISTER; the trailing INVITE octets are not part of it.
        assert isinstance(msg, Request) and msg.method == "REGISTER"
        assert bytes(msg) == data[: len(bytes(msg))] and b"INVITE" not in bytes(msg)
        return
    assert bytes(msg) == data
    # A forced re-serialization (touching one header) keeps every other line byte for byte.
    msg.set("X-Test", "1")
    again = bytes(msg)
    assert again.startswith(data.split(b"\r\n\r\n", 1)[0])
    assert again.endswith(b"\r\nX-Test: 1\r\n\r\n" + msg.body)


def test_wsinv_folding_compact_forms_and_escapes() -> None:
    msg = parse_message(rfc4475("wsinv"))
    assert isinstance(msg, Request)
    assert msg.method == "INVITE"
    # RFC 3261 7.3.1: folded lines are one value; "v:", "f:", "m:", "i:" are compact forms.
    vias = msg.via
    assert [v.transport for v in vias] == ["UDP", "TCP", "UDP"]
    assert vias[0].host == "192.0.2.2" and vias[0].branch == "390skdjuw"
    assert vias[1].host == "spindle.example.com" and vias[1].branch == "z9hG4bK9ikj8"
    assert vias[2].branch == "z9hG4bK30239"
    assert msg.max_forwards == 68
    assert msg.cseq is not None and (msg.cseq.seq, msg.cseq.method) == (9, "INVITE")
    assert msg.call_id == "wsinv.ndaksdj@192.0.2.1"
    assert msg.from_ is not None and msg.from_.display_name == '"J Rosenberg \\\\\\""'
    assert msg.from_.tag == "98asjd8"
    assert msg.to is not None and msg.to.tag == "1918181833n"
    contacts = msg.contact
    assert contacts[0].display_name == '"Quoted string \\"\\""'
    assert contacts[0].param("newparam") == "newvalue" and contacts[0].param("q") == "0.33"
    assert msg.get("NewFangledHeader") == "newfangled value continued newfangled value"
    assert msg.get("UnknownHeaderWithUnusualValue") == ";;,,;;,;"
    assert msg.get("s") == "" and msg.get("subject") == ""


def test_intmeth_and_escapes_keep_their_octets() -> None:
    msg = parse_message(rfc4475("intmeth"))
    assert isinstance(msg, Request)
    assert msg.method == "!interesting-Method0123456789_*+`.%indeed'~"
    assert msg.cseq is not None and msg.cseq.method == msg.method
    null = parse_message(rfc4475("escnull"))
    assert isinstance(null, Request)
    to = null.to
    assert to is not None and isinstance(to.uri, SipUri)
    assert to.uri.user == "null-%00-null"  # RFC 4475 3.1.1.4: not truncated at %00
    assert to.uri.user_unescaped == "null-\x00-null"


def test_mpart01_body_is_kept_as_bytes() -> None:
    data = rfc4475("mpart01")
    msg = parse_message(data)
    assert msg.body == data.split(b"\r\n\r\n", 1)[1]
    assert msg.body.count(b"\n") > msg.body.count(b"\r\n")  # the bare LFs survive
    assert (msg.get("content-type") or "").startswith("multipart/mixed;boundary=")


def test_responses_with_unusual_reason_phrases() -> None:
    unreason = parse_message(rfc4475("unreason"))
    assert isinstance(unreason, Response) and unreason.status == 200
    assert "простое" in unreason.reason
    noreason = parse_message(rfc4475("noreason"))
    assert isinstance(noreason, Response) and noreason.status == 100 and noreason.reason == ""


@pytest.mark.parametrize(
    ("name", "status", "reason"),
    [
        ("clerr", 400, "Content-Length Larger Than Message"),
        ("ncl", 400, "Bad Content-Length"),
        ("mcl01", 400, "Multiple Content-Length Values"),
        ("lwsruri", 400, "Malformed Request-Line"),
        ("lwsstart", 400, "Malformed Request-Line"),
        ("trws", 400, "Malformed Request-Line"),
        ("bigcode", 0, "Malformed Status-Line"),
    ],
)
def test_rfc4475_framing_and_start_line_faults(name: str, status: int, reason: str) -> None:
    with pytest.raises(ParseError) as err:
        parse_message(rfc4475(name))
    assert (err.value.status, err.value.reason) == (status, reason)
    if status:
        # enough was parsed to answer (RFC 3261 8.2.6.2)
        assert err.value.message is not None and "via" in err.value.message


@pytest.mark.parametrize(
    ("name", "attr", "reason"),
    [
        ("badinv01", "via", "Bad Via"),
        ("quotbal", "to", "Bad To"),
        ("ltgtruri", "uri", "Bad Request-URI"),
        ("regbadct", "contact", "Bad Contact"),
        ("badaspec", "to", "Bad To"),
        ("baddn", "from_", "Bad From"),
        ("scalar02", "cseq", "Bad CSeq"),
        ("scalar02", "max_forwards", "Bad Max-Forwards"),
        ("multi01", "call_id", "Bad Call-ID"),
        ("multi01", "to", "Bad To"),
    ],
)
def test_rfc4475_header_faults_are_found_lazily(name: str, attr: str, reason: str) -> None:
    msg = parse_message(rfc4475(name))
    with pytest.raises(ParseError) as err:
        getattr(msg, attr)
    assert err.value.status == 400 and err.value.reason.startswith(reason)


@pytest.mark.parametrize("name", rfc5118_names())
def test_rfc5118(name: str) -> None:
    msg = parse_message(rfc5118(name))
    assert isinstance(msg, Request)
    if name == "ipv6-bad":
        # RFC 5118 4.2: an IPv6 address without brackets in the Request-URI is invalid.
        with pytest.raises(ParseError) as err:
            _ = msg.uri
        assert err.value.status == 400
        return
    assert isinstance(msg.uri, SipUri)
    assert msg.via and msg.from_ is not None and msg.to is not None and msg.cseq is not None


def test_rfc5118_ipv6_details() -> None:
    amb = parse_message(rfc5118("port-ambiguous"))
    assert isinstance(amb, Request) and isinstance(amb.uri, SipUri)
    assert amb.uri.host == "[2001:db8::10:5070]" and amb.uri.port is None  # RFC 5118 4.3
    unamb = parse_message(rfc5118("port-unambiguous"))
    assert isinstance(unamb, Request) and isinstance(unamb.uri, SipUri)
    assert unamb.uri.host_bare == "2001:db8::10" and unamb.uri.port == 5070
    with_delim = parse_message(rfc5118("via-received-param-with-delim")).via[0]
    no_delim = parse_message(rfc5118("via-received-param-no-delim")).via[0]
    assert with_delim.received == "[2001:db8::9:255]" and no_delim.received == "2001:db8::9:255"
    mixed = parse_message(rfc5118("mult-ip-in-header")).via
    assert [v.host_bare for v in mixed] == ["2001:db8::9:1", "192.0.2.1", "2001:db8::9:255"]
    assert mixed[0].port == 6050
    bug = parse_message(rfc5118("ipv6-bug-abnf-3-colons"))
    assert isinstance(bug, Request) and isinstance(bug.uri, SipUri)
    assert bug.uri.host == "[2001:db8:::192.0.2.1]"  # RFC 5118 4.10: tolerated
    sdp = parse_message(rfc5118("ipv6-in-sdp"))
    assert b"c=IN IP6 2001:db8::20" in sdp.body


def test_uris() -> None:
    u = parse_uri("sips:alice:secret@[2001:db8::1]:5061;transport=tls;lr;maddr=x?subject=hi&x=y")
    assert isinstance(u, SipUri) and u.secure
    assert (u.user, u.password, u.host, u.port) == ("alice", "secret", "[2001:db8::1]", 5061)
    assert u.transport == "tls" and u.lr and u.param("MADDR") == "x"
    assert u.headers == "subject=hi&x=y"
    assert str(u) == "sips:alice:secret@[2001:db8::1]:5061;transport=tls;lr;maddr=x?subject=hi&x=y"
    assert str(u.with_param("lr").without_param("maddr")) == (
        "sips:alice:secret@[2001:db8::1]:5061;transport=tls;lr?subject=hi&x=y"
    )
    semi = parse_uri("sip:user;par=u%40example.net@example.com")  # RFC 4475 3.1.1.9
    assert isinstance(semi, SipUri) and semi.user == "user;par=u%40example.net"
    tel = parse_uri("tel:+1-201-555-0123;phone-context=example.com")
    assert isinstance(tel, TelUri) and tel.is_global and tel.param("phone-context") == "example.com"
    other = parse_uri("soap.beep://192.0.2.103:3002")
    assert isinstance(other, AbsoluteUri) and other.scheme == "soap.beep"
    for bad in ("sip:", "sip:user@", "sip:host:99999", "nocolon", "sip:a b", "<sip:x>"):
        with pytest.raises(ValueError):
            parse_uri(bad)


def test_headers_lists_and_name_addr() -> None:
    assert split_list('"a, b" <sip:x>, <sip:y;p=1,2>, z') == [
        '"a, b" <sip:x>',
        "<sip:y;p=1,2>",
        "z",
    ]
    assert split_list("a,,b") == ["a", "", "b"]
    na = parse_name_addr('"Bob \\"B\\"" <sip:bob@example.com;transport=tcp>;tag=x;expires=60')
    assert na.display_name == '"Bob \\"B\\""' and na.tag == "x" and na.param("EXPIRES") == "60"
    assert isinstance(na.uri, SipUri) and na.uri.transport == "tcp"
    assert str(na) == '"Bob \\"B\\"" <sip:bob@example.com;transport=tcp>;tag=x;expires=60'
    spec = parse_name_addr("sip:carol@example.com;tag=1")  # addr-spec: ;tag is a header param
    assert not spec.bracketed and spec.tag == "1"
    assert isinstance(spec.uri, SipUri) and spec.uri.params == ()
    via = parse_via("SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKx;rport, SIP/2.0/TLS [::1]")
    assert via[0].wants_rport and via[0].rport is None and via[0].rfc3261_branch
    assert via[1].transport == "TLS" and via[1].host_bare == "::1" and via[1].port is None
    assert str(via[0].with_param("rport", "5062").with_param("received", "192.0.2.9")) == (
        "SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKx;rport=5062;received=192.0.2.9"
    )
    for bad in ("SIP/2.0/UDP", "SIP/3.0/UDP h", "SIP/2.0/UDP h;;", "SIP/2.0/UDP h:0"):
        with pytest.raises(ValueError):
            parse_via(bad)


def test_message_editing() -> None:
    msg = parse_message(OPTIONS)
    assert isinstance(msg, Request)
    msg.add("Via", "SIP/2.0/UDP 10.0.0.9;branch=z9hG4bKnew", first=True)
    msg.set("Max-Forwards", "69")
    assert msg.max_forwards == 69
    assert msg.top_via is not None and msg.top_via.branch == "z9hG4bKnew"
    assert len(msg.via) == 2
    assert msg.pop_first_value("via") == "SIP/2.0/UDP 10.0.0.9;branch=z9hG4bKnew"
    assert msg.top_via is not None and msg.top_via.branch == "z9hG4bK776asdhds"
    msg.set_body(b"v=0\r\n", "application/sdp")
    data = bytes(msg)
    assert b"Content-Length: 5\r\n" in data and data.endswith(b"\r\n\r\nv=0\r\n")
    assert msg.remove("content-type") == 1 and "content-type" not in msg
    msg.uri = parse_uri("sip:bob@example.com")
    assert bytes(msg).startswith(b"OPTIONS sip:bob@example.com SIP/2.0\r\n")
    assert parse_message(bytes(msg)).get("call-id") == "a84b4c76e66710@pc33.example.com"


def test_make_response_copies_headers_and_adds_to_tag() -> None:
    req = parse_message(OPTIONS)
    assert isinstance(req, Request)
    resp = make_response(req, 200, to_tag="abc")
    assert resp.status == 200 and resp.reason == "OK"
    assert resp.get("via") == req.get("via") and resp.get("cseq") == "63104 OPTIONS"
    assert resp.to is not None and resp.to.tag == "abc"
    assert make_response(req, 100, to_tag="abc").to.tag is None  # type: ignore[union-attr]
    parsed = parse_message(bytes(resp))
    assert isinstance(parsed, Response) and parsed.get("content-length") == "0"


def test_datagram_without_content_length_takes_the_rest() -> None:
    msg = parse_message(OPTIONS.replace(b"Content-Length: 0\r\n", b"") + b"body")
    assert msg.body == b"body"


def test_leading_crlf_is_ignored() -> None:
    msg = parse_message(b"\r\n\r\n" + OPTIONS)
    assert isinstance(msg, Request) and msg.method == "OPTIONS"


def test_size_limits() -> None:
    limits = Limits(max_message_size=2048, max_headers=20, max_header_line=300)
    big = OPTIONS.replace(
        b"Content-Length: 0\r\n\r\n", b"Content-Length: 3000\r\n\r\n" + b"x" * 3000
    )
    with pytest.raises(ParseError) as err:
        parse_message(big, limits=limits)
    assert err.value.status == 413 and err.value.message is not None
    many = OPTIONS.replace(b"Content-Length", b"X-A: 1\r\n" * 20 + b"Content-Length")
    with pytest.raises(ParseError) as err:
        parse_message(many, limits=limits)
    assert (err.value.status, err.value.reason) == (400, "Too Many Header Fields")
    long_line = OPTIONS.replace(b"Content-Length", b"X-A: " + b"a" * 400 + b"\r\nContent-Length")
    with pytest.raises(ParseError) as err:
        parse_message(long_line, limits=limits)
    assert (err.value.status, err.value.reason) == (400, "Header Line Too Long")


def test_malformed_header_line() -> None:
    with pytest.raises(ParseError) as err:
        parse_message(OPTIONS.replace(b"Max-Forwards: 70", b"Max Forwards 70"))
    assert (err.value.status, err.value.reason) == (400, "Malformed Header Line")
    with pytest.raises(ParseError) as err:
        parse_message(OPTIONS[:-4])  # the header section just stops
    assert (err.value.status, err.value.reason) == (400, "Header Section Not Terminated")
    # A datagram is the whole message: a last header line without the empty line is accepted.
    assert parse_message(OPTIONS[:-2]).get("content-length") == "0"


# -- stream framing (RFC 3261 18.3) -----------------------------------------------------------


def test_stream_two_messages_in_one_chunk_and_one_split_bytewise() -> None:
    framer = StreamFramer()
    out = framer.feed(OPTIONS + OPTIONS)
    assert len(out) == 2 and all(isinstance(m, Request) for m in out)
    got: list[object] = []
    for i in range(len(OPTIONS)):
        got += framer.feed(OPTIONS[i : i + 1])
    assert len(got) == 1 and bytes(got[0]) == OPTIONS  # type: ignore[call-overload]


def test_stream_body_framing_by_content_length() -> None:
    body = b"v=0\r\n\r\n\r\nstill body"
    msg = OPTIONS.replace(b"Content-Length: 0", b"Content-Length: %d" % len(body)) + body
    framer = StreamFramer()
    first = framer.feed(msg[:-5])
    assert first == []
    out = framer.feed(msg[-5:] + OPTIONS)
    assert isinstance(out[0], Request) and out[0].body == body
    assert isinstance(out[1], Request) and out[1].body == b""


def test_stream_keepalive_and_leading_crlf() -> None:
    framer = StreamFramer()
    assert framer.feed(b"\r\n") == []
    assert framer.feed(b"\r\n") == [StreamFramer.KEEPALIVE]
    out = framer.feed(b"\r\n" + OPTIONS)
    assert len(out) == 1 and isinstance(out[0], Request)


def test_stream_missing_or_bad_content_length_is_fatal() -> None:
    framer = StreamFramer()
    out = framer.feed(OPTIONS.replace(b"Content-Length: 0\r\n", b"") + OPTIONS)
    assert len(out) == 1 and isinstance(out[0], ParseError) and out[0].fatal
    assert out[0].status == 400 and framer.broken and framer.feed(OPTIONS) == []
    framer = StreamFramer()
    out = framer.feed(rfc4475("ncl"))
    assert isinstance(out[0], ParseError) and out[0].fatal


def test_stream_bad_header_keeps_the_connection_usable() -> None:
    framer = StreamFramer()
    out = framer.feed(OPTIONS.replace(b"Max-Forwards: 70", b"Max Forwards") + OPTIONS)
    assert isinstance(out[0], ParseError) and not out[0].fatal and out[0].status == 400
    assert isinstance(out[1], Request)


def test_stream_oversized_body_is_skipped() -> None:
    framer = StreamFramer(Limits(max_message_size=1024))
    big = OPTIONS.replace(b"Content-Length: 0", b"Content-Length: 5000") + b"y" * 5000
    out: list[object] = []
    for i in range(0, len(big), 700):
        out += framer.feed(big[i : i + 700])
    out += framer.feed(OPTIONS)
    assert isinstance(out[0], ParseError) and out[0].status == 413 and not out[0].fatal
    assert len(out) == 2 and isinstance(out[1], Request)


def test_stream_endless_header_section_is_fatal() -> None:
    framer = StreamFramer(Limits(max_message_size=1024))
    out = framer.feed(b"OPTIONS sip:x SIP/2.0\r\n" + b"X-A: 1\r\n" * 200)
    assert isinstance(out[0], ParseError) and out[0].status == 413 and out[0].fatal


def test_ipv6_received_in_spaced_via_params() -> None:
    """Parameters with whitespace go through the general parameter scan: a bare IPv6
    received value (RFC 3261 18.2.1, RFC 5118 4.5) is read whole, not cut at its first ":"."""
    from sbc.sip.headers import parse_via_parm

    via = parse_via_parm(
        "SIP/2.0/UDP [2001:db8::9]:5060 ; branch=z9hG4bK-1 ; received=2001:db8::1 ; rport=5060"
    )
    assert (via.received, via.branch, via.rport) == ("2001:db8::1", "z9hG4bK-1", 5060)
