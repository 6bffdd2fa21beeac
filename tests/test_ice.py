"""The STUN side of the ICE-lite agent (sbc.media.ice): RFC 5769 test vectors, the
short-term credential checks of RFC 8489 9.1.3, XOR-MAPPED-ADDRESS over IPv4 and IPv6,
role conflicts (RFC 8445 7.3.1.1) and malformed input."""

from __future__ import annotations

import contextlib
import struct

import pytest

from sbc.media import ice


def unhex(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


# RFC 5769 2.1, "Sample Request" (typed in from the RFC text): a Binding request with
# SOFTWARE, PRIORITY, ICE-CONTROLLED, USERNAME "evtj:h6vY", MESSAGE-INTEGRITY, FINGERPRINT.
PASSWORD = "VOkJxbRl1RmTxUk/WvJxBt"
REQUEST = unhex("""
00 01 00 58 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86
fa 87 df ae 80 22 00 10 53 54 55 4e 20 74 65 73
74 20 63 6c 69 65 6e 74 00 24 00 04 6e 00 01 ff
80 29 00 08 93 2f f9 b1 51 26 3b 36 00 06 00 09
65 76 74 6a 3a 68 36 76 59 20 20 20 00 08 00 14
9a ea a7 0c bf d8 cb 56 78 1e f2 b5 b2 d3 f2 49
c1 b5 71 a2 80 28 00 04 e5 7a 3b cf
""")
# RFC 5769 2.2, "Sample IPv4 Response": XOR-MAPPED-ADDRESS 192.0.2.1 port 32853.
RESPONSE_V4 = unhex("""
01 01 00 3c 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86
fa 87 df ae 80 22 00 0b 74 65 73 74 20 76 65 63
74 6f 72 20 00 20 00 08 00 01 a1 47 e1 12 a6 43
00 08 00 14 2b 91 f5 99 fd 9e 90 c3 8c 74 89 f9
2a f9 ba 53 f0 6b e7 d7 80 28 00 04 c0 7d 4c 96
""")
# RFC 5769 2.3, "Sample IPv6 Response": 2001:db8:1234:5678:11:2233:4455:6677 port 32853.
RESPONSE_V6 = unhex("""
01 01 00 48 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86
fa 87 df ae 80 22 00 0b 74 65 73 74 20 76 65 63
74 6f 72 20 00 20 00 14 00 02 a1 47 01 13 a9 fa
a5 d3 f1 79 bc 25 f4 b5 be d2 b9 d9 00 08 00 14
a3 82 95 4e 4b e6 7b f1 17 84 c9 7c 82 92 c2 75
bf e3 ed 41 80 28 00 04 c8 fb 0b 4c
""")
TXID = unhex("b7 e7 a7 01 bc 34 d6 86 fa 87 df ae")
V4 = ("192.0.2.1", 32853)
V6 = ("2001:db8:1234:5678:11:2233:4455:6677", 32853)


def test_rfc5769_sample_request_verifies() -> None:
    msg = ice.parse(REQUEST)
    assert msg.type == ice.BINDING_REQUEST
    assert msg.transaction == TXID
    assert msg.get(ice.USERNAME) == b"evtj:h6vY"
    assert msg.get(ice.SOFTWARE) == b"STUN test client"
    assert msg.get(ice.PRIORITY) == unhex("6e 00 01 ff")
    assert msg.has(ice.ICE_CONTROLLED)
    assert msg.fingerprint_ok()
    assert msg.integrity_ok(PASSWORD.encode())
    assert not msg.integrity_ok(b"wrong")


@pytest.mark.parametrize(("vector", "addr"), [(RESPONSE_V4, V4), (RESPONSE_V6, V6)])
def test_rfc5769_sample_responses(vector: bytes, addr: tuple[str, int]) -> None:
    msg = ice.parse(vector)
    assert msg.type == ice.BINDING_SUCCESS
    assert msg.integrity_ok(PASSWORD.encode()) and msg.fingerprint_ok()
    value = msg.get(ice.XOR_MAPPED_ADDRESS)
    assert value is not None
    assert ice.read_xor_address(value, TXID) == addr
    # Our encoding of the address is the RFC's byte for byte.
    assert ice.xor_address(addr, TXID) == value


def answer(data: bytes, src: tuple[str, int] = ("203.0.113.5", 50000)) -> ice.Check:
    check = ice.answer_check(data, src, ufrag="evtj", pwd=PASSWORD)
    assert check is not None
    return check


def error_of(check: ice.Check) -> int:
    msg = ice.parse(check.response)
    value = msg.get(ice.ERROR_CODE)
    assert msg.type == ice.BINDING_ERROR and value is not None
    return value[2] * 100 + value[3]


def test_a_valid_check_gets_a_success_that_verifies() -> None:
    request = ice.binding_request(TXID, username="evtj:h6vY", pwd=PASSWORD, use_candidate=True)
    check = answer(request, ("203.0.113.5", 50000))
    assert check.valid and check.use_candidate and check.error is None
    msg = ice.parse(check.response)
    assert msg.type == ice.BINDING_SUCCESS and msg.transaction == TXID
    assert msg.integrity_ok(PASSWORD.encode()) and msg.fingerprint_ok()
    value = msg.get(ice.XOR_MAPPED_ADDRESS)
    assert value is not None and ice.read_xor_address(value, TXID) == ("203.0.113.5", 50000)


def test_ipv6_source() -> None:
    request = ice.binding_request(TXID, username="evtj:x", pwd=PASSWORD)
    check = answer(request, V6)
    assert check.valid and not check.use_candidate
    value = ice.parse(check.response).get(ice.XOR_MAPPED_ADDRESS)
    assert value is not None and ice.read_xor_address(value, TXID) == V6


def test_the_rfc_request_claims_controlled_so_a_lite_agent_answers_487() -> None:
    """RFC 8445 7.3.1.1: both controlled; the lite agent cannot switch (6.1.1)."""
    check = answer(REQUEST)
    assert not check.valid and error_of(check) == ice.ROLE_CONFLICT
    # authenticated: the error carries MESSAGE-INTEGRITY
    assert ice.parse(check.response).integrity_ok(PASSWORD.encode())


def test_bad_integrity_is_401() -> None:
    request = ice.binding_request(TXID, username="evtj:h6vY", pwd="not the password")
    check = answer(request)
    assert not check.valid and error_of(check) == ice.UNAUTHENTICATED
    assert ice.parse(check.response).integrity_at < 0  # RFC 8489 9.1.3: not authenticated


@pytest.mark.parametrize("username", ["other:h6vY", "evtj", "evtj:", "evtjx:h6vY", "h6vY:evtj"])
def test_username_not_ours_is_401(username: str) -> None:
    check = answer(ice.binding_request(TXID, username=username, pwd=PASSWORD))
    assert error_of(check) == ice.UNAUTHENTICATED


def test_missing_credentials_are_400() -> None:
    """RFC 8489 9.1.3: no USERNAME or no MESSAGE-INTEGRITY is 400 Bad Request."""
    no_mi = ice.encode(ice.BINDING_REQUEST, TXID, [(ice.USERNAME, b"evtj:h6vY")])
    assert error_of(answer(no_mi)) == ice.BAD_REQUEST
    no_user = ice.encode(ice.BINDING_REQUEST, TXID, [], key=PASSWORD.encode())
    assert error_of(answer(no_user)) == ice.BAD_REQUEST


def test_unknown_comprehension_required_attribute_is_420() -> None:
    request = ice.encode(
        ice.BINDING_REQUEST, TXID, [(ice.USERNAME, b"evtj:a"), (0x0077, b"x")],
        key=PASSWORD.encode(),
    )  # fmt: skip
    check = answer(request)
    assert error_of(check) == ice.UNKNOWN_ATTRIBUTE
    assert ice.parse(check.response).get(ice.UNKNOWN_ATTRIBUTES) == b"\x00\x77"


def test_bad_fingerprint_is_silently_discarded() -> None:
    bad = REQUEST[:-1] + bytes([REQUEST[-1] ^ 1])
    assert ice.answer_check(bad, V4, ufrag="evtj", pwd=PASSWORD) is None


def test_responses_and_indications_are_not_answered() -> None:
    assert ice.answer_check(RESPONSE_V4, V4, ufrag="evtj", pwd=PASSWORD) is None
    indication = ice.encode(ice.BINDING_INDICATION, TXID, [])
    assert ice.answer_check(indication, V4, ufrag="evtj", pwd=PASSWORD) is None


def test_malformed_attributes_are_400_and_garbage_is_dropped() -> None:
    # an attribute whose length runs past the message (header valid)
    broken = (
        struct.pack("!HHI", 0x0001, 8, ice.MAGIC_COOKIE)
        + TXID
        + struct.pack("!HH", 6, 40)
        + b"abcd"
    )
    check = answer(broken)
    assert error_of(check) == ice.BAD_REQUEST and ice.parse(check.response).transaction == TXID
    for garbage in (
        b"",
        b"\x00",
        b"\x00\x01" + bytes(30),
        REQUEST[:-3],
        b"\xff" * 40,
        REQUEST + b"x",
    ):
        assert ice.answer_check(garbage, V4, ufrag="evtj", pwd=PASSWORD) is None
    with pytest.raises(ice.StunError):
        ice.parse(broken)


def test_parse_never_raises_anything_but_stun_error() -> None:
    import random

    rnd = random.Random(5769)
    for _ in range(2000):
        data = bytearray(REQUEST)
        for _ in range(rnd.randint(1, 6)):
            data[rnd.randrange(len(data))] = rnd.randrange(256)
        with contextlib.suppress(ice.StunError):
            ice.parse(bytes(data))
        ice.answer_check(bytes(data), V4, ufrag="evtj", pwd=PASSWORD)
