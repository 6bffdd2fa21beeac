"""Dialog state (RFC 3261 12): ids from requests and responses, requests within a dialog."""

from __future__ import annotations

from sipdata import sip

from sbc.sip.dialog import Dialog, uac_dialog, uas_dialog, without_tag
from sbc.sip.headers import parse_name_addr
from sbc.sip.message import Request, make_response
from sbc.sip.parser import parse_message

INVITE = sip(
    "INVITE sip:bob@example.com SIP/2.0\n"
    "Via: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK-1\n"
    "Record-Route: <sip:p1.example.com;lr>, <sip:p2.example.com;lr>\n"
    "Max-Forwards: 70\n"
    'From: "Alice" <sip:alice@example.com;user=phone>;tag=a1;x=y\n'
    "To: Bob <sip:bob@example.com>\n"
    "Call-ID: c1\n"
    "CSeq: 7 INVITE\n"
    "Contact: <sip:alice@192.0.2.1:5062>\n"
    "Content-Length: 0\n\n"
)


def test_uas_dialog_and_a_request_within_it() -> None:
    req = parse_message(INVITE)
    assert isinstance(req, Request)
    d = uas_dialog(req, local_tag="b1", local_seq=100)
    assert d.key == ("c1", "b1", "a1") and d.remote_seq == 7
    assert d.remote_uri == '"Alice" <sip:alice@example.com;user=phone>;x=y'  # tag kept apart
    assert d.local_uri == "Bob <sip:bob@example.com>"
    # RFC 3261 12.1.1: the UAS route set is the Record-Route in order; loose routing.
    bye = d.request("BYE")
    assert bye.uri_text == "sip:alice@192.0.2.1:5062"
    assert bye.values("route") == ["<sip:p1.example.com;lr>", "<sip:p2.example.com;lr>"]
    assert bye.get("from") == "Bob <sip:bob@example.com>;tag=b1"
    assert bye.get("to") == '"Alice" <sip:alice@example.com;user=phone>;x=y;tag=a1'
    assert bye.get("cseq") == "101 BYE" and d.request("ACK", seq=7).get("cseq") == "7 ACK"
    # RFC 3261 12.2.2: a lower CSeq is out of order.
    assert d.accept_remote_cseq(8) and not d.accept_remote_cseq(7)


def test_uac_dialog_reverses_the_route_set_and_strict_routing() -> None:
    req = parse_message(INVITE)
    assert isinstance(req, Request)
    ok = make_response(req, 200, to_tag="b9")
    ok.add("Record-Route", "<sip:p1.example.com;lr>")
    ok.add("Record-Route", "<sip:p2.example.com;lr>")
    ok.add("Contact", "<sip:bob@192.0.2.9>")
    d = uac_dialog(req, parse_message(bytes(ok)))  # type: ignore[arg-type]
    assert d.key == ("c1", "a1", "b9") and d.remote_target == "sip:bob@192.0.2.9"
    assert d.route_set == ["<sip:p2.example.com;lr>", "<sip:p1.example.com;lr>"]
    # RFC 3261 12.2.1.1: a strict router first: it becomes the Request-URI, the remote
    # target goes last in Route.
    strict = Dialog(
        call_id="c", local_tag="l", remote_tag="r", local_uri="<sip:a@x>", remote_uri="<sip:b@y>",
        local_seq=1, remote_seq=None, remote_target="sip:b@192.0.2.9",
        route_set=["<sip:strict.example.com>", "<sip:p3.example.com;lr>"],
    )  # fmt: skip
    req2 = strict.request("INFO")
    assert req2.uri_text == "sip:strict.example.com"
    assert req2.values("route") == ["<sip:p3.example.com;lr>", "<sip:b@192.0.2.9>"]


def test_without_tag() -> None:
    assert without_tag("<sip:a@x>;tag=1") == "<sip:a@x>"
    assert without_tag("sip:a@x;tag=1;foo") == "sip:a@x;foo"
    assert without_tag(parse_name_addr('"A b" <sip:a@x>;tag=1')) == '"A b" <sip:a@x>'
    assert without_tag("<sip:a@x>") == "<sip:a@x>"
