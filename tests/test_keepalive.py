"""NAT detection, keep-alives to NATed clients and STUN on the SIP port."""

from __future__ import annotations

import ipaddress
import os
import struct

from sipdata import sip
from test_registration import B1, CLIENT, CORE, REGISTER, answer, make_core, sent

from sbc.actions import SendData
from sbc.core import CoreSettings, SbcCore
from sbc.features.balancer import BackendSpec
from sbc.features.keepalive import (
    STUN_MAGIC,
    KeepaliveTable,
    NatPolicy,
    behind_nat,
    is_private,
    is_stun,
    stun_binding_response,
)
from sbc.registration import OffloadPolicy
from sbc.sides import Side
from sbc.sip.flow import Flow
from sbc.sip.message import Request, Response, make_response


def test_private_addresses() -> None:
    for host in (
        "10.1.2.3",
        "172.20.0.1",
        "192.168.1.10",
        "100.64.0.1",
        "169.254.9.9",
        "fd00::1",
        "fe80::1",
    ):
        assert is_private(host), host
    for host in ("192.0.2.7", "8.8.8.8", "127.0.0.1", "2001:db8::1", "example.com", "[::1]"):
        assert not is_private(host), host


def test_nat_detection() -> None:
    public = ("203.0.113.5", 40000)
    assert not behind_nat(public, "203.0.113.5", 40000, ["203.0.113.5"])
    assert behind_nat(public, "192.168.1.2", 5060, ["192.168.1.2"])  # Via differs
    assert behind_nat(public, "203.0.113.5", 5060, ["203.0.113.5"])  # the port was mapped
    assert behind_nat(public, "203.0.113.5", 40000, ["10.0.0.2"])  # private Contact
    assert not behind_nat(("198.51.100.1", 5060), "198.51.100.1", None, [])


def binding_request(txid: bytes) -> bytes:
    return struct.pack("!HHI", 0x0001, 0, STUN_MAGIC) + txid


def decode_xor_mapped(resp: bytes, txid: bytes) -> tuple[str, int]:
    msg_type, length, magic = struct.unpack_from("!HHI", resp, 0)
    assert (msg_type, magic) == (0x0101, STUN_MAGIC) and resp[8:20] == txid
    attr_type, attr_len = struct.unpack_from("!HH", resp, 20)
    assert attr_type == 0x0020 and length == 4 + attr_len
    family, xport = struct.unpack_from("!xBH", resp, 24)
    port = xport ^ (STUN_MAGIC >> 16)
    raw = resp[28 : 28 + (4 if family == 1 else 16)]
    key = struct.pack("!I", STUN_MAGIC) + (txid if family == 2 else b"")
    addr = (
        bytes(a ^ b for a, b in zip(raw, key, strict=False))
        if family == 1
        else bytes(a ^ b for a, b in zip(raw, key, strict=True))
    )
    return str(ipaddress.ip_address(addr)), port


def test_stun_binding_answers_with_the_mapped_address() -> None:
    txid = os.urandom(12)
    for source in (("203.0.113.9", 61000), ("2001:db8::9", 5062)):
        resp = stun_binding_response(binding_request(txid), source)
        assert resp is not None and is_stun(resp)
        assert decode_xor_mapped(resp, txid) == source
    assert not is_stun(b"OPTIONS sip:x SIP/2.0\r\n" + b"x" * 20)
    assert stun_binding_response(struct.pack("!HHI", 0x0111, 0, STUN_MAGIC) + txid, source) is None


def test_core_answers_stun_on_the_sip_port() -> None:
    core = SbcCore(CoreSettings(local_hosts=frozenset({"127.0.0.1"})))
    txid = os.urandom(12)
    [action] = core.receive_datagram(binding_request(txid), CLIENT, 0.0)
    assert isinstance(action, SendData) and action.flow == CLIENT
    assert decode_xor_mapped(action.data, txid) == CLIENT.remote


def test_keepalive_table_schedule_and_failures() -> None:
    table = KeepaliveTable(interval=20.0, failures=2)
    flow = CLIENT
    table.watch(flow, "sip:a@10.0.0.7", 0.0)
    assert table.next_deadline() == 20.0 and table.due(19.9) == []
    assert table.due(20.0) == [flow] and table.next_deadline() == 40.0
    assert not table.failed(flow)
    table.answered(flow)
    assert not table.failed(flow) and table.failed(flow)  # two in a row
    table.unwatch(flow)
    assert table.next_deadline() is None and table.due(100.0) == []


def register_nated(core: SbcCore, now: float, *, extra: bytes = b"") -> Response:
    """alice behind NAT: Via/Contact 10.0.0.7, packets from 192.0.2.7:40000."""
    req = sip(REGISTER.format(n=1, user="alice"))
    if extra:
        req = req.replace(b"Content-Length: 0", extra + b"\r\nContent-Length: 0")
    [(flow, fwd)] = sent(core.receive_datagram(req, CLIENT, now))
    assert isinstance(fwd, Request)
    ok = make_response(fwd, 200, to_tag="reg")
    ok.add("Contact", f"{fwd.get('contact')}")
    [(_, resp)] = sent(core.receive_datagram(bytes(ok), Flow("udp", CORE, flow.remote), now))
    assert isinstance(resp, Response) and resp.status == 200
    return resp


def test_options_keepalives_until_the_client_stops_answering() -> None:
    # A long client expiry, so that only the keep-alives can find the client gone.
    core = make_core(B1, offload=OffloadPolicy(client_udp=600))
    register_nated(core, 0.0)
    assert CLIENT in core.registration.keepalives
    # Every 20 s an OPTIONS to the client's public address; answered: keep going.
    for t in (20.0, 40.0):
        msgs = [(f, m) for f, m in sent(core.handle_timer(t)) if isinstance(m, Request)]
        keepalive = [(f, m) for f, m in msgs if m.method == "OPTIONS" and f.remote == CLIENT.remote]
        [(flow, req)] = keepalive
        assert str(req.uri) == "sip:alice@10.0.0.7:5060" and flow.local == CLIENT.local
        answer(core, req, 200, t + 0.01, CLIENT.remote)  # any answer counts
        assert core.receive_datagram(bytes(make_response(req, 405, to_tag="x")), CLIENT, t) == []
    # The client vanishes: three unanswered keep-alives drop the binding and de-register it.
    dereg = []
    now = 40.0
    while (deadline := core.next_deadline()) is not None and deadline <= 200.0 and not dereg:
        now = deadline
        for flow, msg in sent(core.handle_timer(now)):
            if isinstance(msg, Request) and msg.method == "REGISTER" and flow.remote == B1:
                dereg.append(msg)
            elif isinstance(msg, Request) and msg.method == "OPTIONS" and flow.remote == B1:
                answer(core, msg, 200, now, B1)  # the backend stays up
    [req] = dereg
    assert req.get("expires") == "0" and 100.0 <= now <= 121.0
    assert CLIENT not in core.registration.keepalives and len(core.registration.registrations) == 0


def test_crlf_keepalives() -> None:
    specs = (BackendSpec(name="sip:127.0.0.1:5070", host="127.0.0.1", port=5070, transport="udp"),)
    core = SbcCore(
        CoreSettings(
            local_hosts=frozenset({"127.0.0.1"}),
            backends=specs,
            nat=NatPolicy(interval=15.0, method="crlf", failures=3),
        )
    )
    core.add_listener(Side.ACCESS, "udp", CLIENT.local)
    core.add_listener(Side.CORE, "udp", CORE)
    register_nated(core, 0.0)
    actions = core.handle_timer(15.0)
    assert SendData(CLIENT, b"\r\n\r\n") in actions


def test_flow_timer_for_outbound_clients() -> None:
    core = make_core(B1)
    resp = register_nated(core, 0.0, extra=b"Supported: outbound, path")
    assert resp.get("flow-timer") is None  # no reg-id: not an outbound registration
    core = make_core(B1)
    req = sip(REGISTER.format(n=1, user="bob")).replace(
        b"Contact: <sip:bob@10.0.0.7:5060>",
        b'Contact: <sip:bob@10.0.0.7:5060;ob>;reg-id=1;+sip.instance="<urn:uuid:00000000-0000-0000-0000-000000000001>"',
    )
    req = req.replace(b"Content-Length: 0", b"Supported: outbound, path\r\nContent-Length: 0")
    [(flow, fwd)] = sent(core.receive_datagram(req, CLIENT, 0.0))
    assert isinstance(fwd, Request)
    ok = make_response(fwd, 200, to_tag="reg")
    ok.add("Contact", fwd.get("contact") or "")
    [(_, resp)] = sent(core.receive_datagram(bytes(ok), Flow("udp", CORE, flow.remote), 0.0))
    assert isinstance(resp, Response) and resp.get("flow-timer") == "20"  # RFC 5626 5.4
