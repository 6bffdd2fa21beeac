"""Requests within a dialog follow RFC 3261 12.2.1.1 on the core side: the route set when
there is one, else the remote target. Behind a registrar that does not record-route, a call
between two clients of the SBC leaves through the core and comes back in; each leg's remote
target is then the SBC's own core Contact, and what is sent there (ACK, BYE, re-INVITE, INFO
and their answers) reaches the other call's leg inside the SBC. Any other remote target is
reached through the backend as an outbound proxy with a pre-loaded Route (8.1.2)."""

from __future__ import annotations

from test_b2bua import (
    ALICE,
    ANSWER_SDP,
    B1,
    CORE,
    FROM_B1,
    SDP,
    Lab,
    ack_for,
    in_dialog,
    invite,
    only,
    reply,
    sip,
)

from sbc.sip.flow import Flow
from sbc.sip.message import Message, Request, Response, make_response
from sbc.sip.uri import parse_uri

BOB = Flow("udp", ALICE.local, ("192.0.2.8", 41000))
BOB_CONTACT = "<sip:bob@10.0.0.8:5060>"


class NoRecordRouteProxy:
    """The backend B1 as a Kamailio without record_route(): initial INVITEs for bob go to
    his registered contact with the SBC's Path as Route; responses go back along Via; it
    never stays in the dialog."""

    def __init__(self, lab: Lab, path: str) -> None:
        self.lab = lab
        self.path = path
        self.n = 0

    def forward_invite(self, req: Request) -> list[tuple[Flow, Message]]:
        self.n += 1
        req.uri = parse_uri("sip:bob@10.0.0.8:5060")
        req.add("Route", self.path, first=True)
        req.add("Via", f"SIP/2.0/UDP {B1[0]}:{B1[1]};branch=z9hG4bK-kam{self.n}", first=True)
        return self.lab.from_backend(req)

    def forward_response(self, resp: Response) -> list[tuple[Flow, Message]]:
        resp.pop_first_value("via")
        return self.lab.from_backend(resp)


def register_bob(lab: Lab) -> str:
    register = sip(
        "REGISTER sip:example.com SIP/2.0\n"
        "Via: SIP/2.0/UDP 10.0.0.8:5060;branch=z9hG4bK-rb;rport\nMax-Forwards: 70\n"
        "From: <sip:bob@example.com>;tag=rb\nTo: <sip:bob@example.com>\n"
        f"Call-ID: regb@10.0.0.8\nCSeq: 1 REGISTER\nContact: {BOB_CONTACT}\n"
        "Expires: 3600\nContent-Length: 0\n\n"
    )
    _, fwd = only(lab.from_client(register, BOB), Request)
    assert isinstance(fwd, Request)
    ok = make_response(fwd, 200, to_tag="reg")
    ok.add("Contact", f"{BOB_CONTACT};expires=3600")
    lab.from_backend(ok)
    path = fwd.get("path")
    assert path is not None
    return path


def requests_to(out: list[tuple[Flow, Message]], flow: Flow) -> list[Request]:
    return [m for f, m in out if isinstance(m, Request) and f.remote == flow.remote]


def responses_to(out: list[tuple[Flow, Message]], flow: Flow) -> list[Response]:
    return [m for f, m in out if isinstance(m, Response) and f.remote == flow.remote]


def bob_request(method: str, got: Request, answer: Response, cseq: int, body: str = "") -> bytes:
    """bob's request within his dialog (the INVITE he got, the 2xx he sent)."""
    contact = got.contact[0].uri_text
    head = (
        f"{method} {contact} SIP/2.0\n"
        f"Via: SIP/2.0/UDP 10.0.0.8:5060;branch=z9hG4bK-b{method}{cseq};rport\n"
        "Max-Forwards: 70\n"
        f"From: {answer.get('to')}\nTo: {got.get('from')}\nCall-ID: {got.call_id}\n"
        f"CSeq: {cseq} {method}\n"
    )
    if body:
        head += f"Content-Type: application/sdp\nContent-Length: {len(body)}\n\n"
        return sip(head) + body.encode()
    return sip(head + "Content-Length: 0\n\n")


def test_a_call_that_loops_through_a_registrar_without_record_route() -> None:
    lab = Lab()
    kam = NoRecordRouteProxy(lab, register_bob(lab))
    # alice -> SBC -> B1 -> SBC -> bob
    out = lab.from_client(invite())
    [to_b1] = requests_to(out, FROM_B1)
    [got] = requests_to(kam.forward_invite(to_b1), BOB)
    assert got.method == "INVITE" and "route" not in got
    ring = make_response(got, 180, to_tag="bob-t")
    ring.add("Contact", BOB_CONTACT)
    [r180] = responses_to(lab.from_client(ring, BOB), FROM_B1)
    [to_alice] = responses_to(kam.forward_response(r180), ALICE)
    assert to_alice.status == 180
    answer = make_response(got, 200, to_tag="bob-t")
    answer.add("Contact", BOB_CONTACT)
    answer.set_body(ANSWER_SDP.encode(), "application/sdp")
    [r200] = responses_to(lab.from_client(answer, BOB), FROM_B1)
    assert "record-route" not in r200
    [ok] = responses_to(kam.forward_response(r200), ALICE)
    assert ok.status == 200
    looped = lab.core.stats["looped"]

    # alice's ACK: core leg 1's remote target is the SBC's own Contact of core leg 2; the
    # ACK reaches bob without anything sent to the backend.
    out = lab.from_client(ack_for(ok))
    assert not requests_to(out, FROM_B1)
    [ack] = requests_to(out, BOB)
    assert ack.method == "ACK" and lab.core.stats["looped"] == looped + 1

    # A hold from bob (re-INVITE), answered by alice; then bob's ACK.
    hold = SDP.replace("10.0.0.7", "10.0.0.8") + "a=sendonly\r\n"
    out = lab.from_client(bob_request("INVITE", got, answer, 2, hold), BOB)
    assert not requests_to(out, FROM_B1)
    [reinvite] = requests_to(out, ALICE)
    assert reinvite.method == "INVITE" and b"a=sendonly" in reinvite.body
    resumed = make_response(reinvite, 200)
    resumed.add("Contact", "<sip:alice@10.0.0.7:5060>")
    resumed.set_body(SDP.encode() + b"a=recvonly\r\n", "application/sdp")
    out = lab.from_client(resumed)
    [to_bob] = responses_to(out, BOB)
    assert to_bob.status == 200 and b"a=recvonly" in to_bob.body
    out = lab.from_client(bob_request("ACK", got, answer, 2), BOB)
    assert [m.method for m in requests_to(out, ALICE)] == ["ACK"]

    # INFO from alice, answered by bob.
    out = lab.from_client(in_dialog("INFO", ok, 2))
    [info] = requests_to(out, BOB)
    [to_alice] = responses_to(lab.from_client(make_response(info, 200), BOB), ALICE)
    assert to_alice.status == 200 and to_alice.get("cseq") == "2 INFO"

    # bob hangs up: alice gets the BYE at once; nothing waits on the backend.
    out = lab.from_client(bob_request("BYE", got, answer, 3), BOB)
    assert [m.status for m in responses_to(out, BOB)] == [200]
    [bye] = requests_to(out, ALICE)
    assert bye.method == "BYE" and not requests_to(out, FROM_B1)
    assert lab.from_client(make_response(bye, 200)) == []
    assert lab.core.calls.stats["looped_in_dialog"] >= 5
    lab.assert_clean()


def test_a_core_callee_behind_a_proxy_without_record_route_gets_a_preloaded_route() -> None:
    lab = Lab()
    out = lab.from_client(invite())
    [fwd] = requests_to(out, FROM_B1)
    ok = reply(fwd, 200, sdp=ANSWER_SDP, rr=False)  # Contact: bob at 10.1.0.50:5062
    [got] = responses_to(lab.from_backend(ok), ALICE)
    out = lab.from_client(ack_for(got))
    [ack] = requests_to(out, FROM_B1)
    # RFC 3261 12.2.1.1: the remote target is the Request-URI; 8.1.2: the backend, our
    # outbound proxy, is pre-loaded as a loose Route so that it forwards the request.
    assert str(ack.uri) == "sip:bob@10.1.0.50:5062"
    assert ack.field_values("route") == [f"<sip:{B1[0]}:{B1[1]};lr>"]
    out = lab.from_client(in_dialog("BYE", got, 2))
    [bye] = requests_to(out, FROM_B1)
    assert str(bye.uri) == "sip:bob@10.1.0.50:5062"
    assert bye.field_values("route") == [f"<sip:{B1[0]}:{B1[1]};lr>"]
    lab.from_backend(make_response(bye, 200))
    assert CORE[0] not in str(bye.uri)
    lab.assert_clean()


def test_a_record_routed_dialog_uses_the_route_set_and_no_preloaded_route() -> None:
    lab = Lab()
    [fwd] = requests_to(lab.from_client(invite()), FROM_B1)
    [got] = responses_to(lab.from_backend(reply(fwd, 200, sdp=ANSWER_SDP)), ALICE)
    [ack] = requests_to(lab.from_client(ack_for(got)), FROM_B1)
    assert ack.field_values("route") == ["<sip:10.1.0.10:5070;lr;did=backend.core.internal>"]
    assert lab.core.calls.stats["route_preloaded"] == 0
    [bye] = requests_to(lab.from_client(in_dialog("BYE", got, 2)), FROM_B1)
    lab.from_backend(make_response(bye, 200))
    lab.assert_clean()
