"""SIPp against the real ``sbc run``: OPTIONS on every transport, malformed then valid.

OPTIONS over UDP, TCP and TLS, and a SIPp scenario that sends a
malformed message and then a valid one and expects 400 then 200.
"""

from __future__ import annotations

import pytest

from .conftest import SbcProcess, SippRunner, require_ipv6

pytestmark = pytest.mark.interop

CALLS = 20


@pytest.mark.parametrize(("transport", "flag"), [("udp", "u1"), ("tcp", "t1")])
def test_options_ipv4(sbc: SbcProcess, sipp: SippRunner, transport: str, flag: str) -> None:
    """20 OPTIONS at 20/s, one socket or connection: 20 calls pass, the SBC answers each."""
    result = sipp("options.xml", sbc.host4, sbc.udp4, transport=flag, calls=CALLS, rate=20)
    result.assert_all_passed(CALLS)


# No SIPp TLS test: Debian 12's sip-tester 3.6.1 is built without OpenSSL ("OpenSSL is
# required for the -tls_cert option"). TLS is driven by a real peer in test_sipsak.py and with
# full certificate verification in test_transport.py.


@pytest.mark.parametrize(("transport", "flag"), [("udp", "u1"), ("tcp", "t1")])
def test_options_ipv6(sbc: SbcProcess, sipp: SippRunner, transport: str, flag: str) -> None:
    """SIPp 3.6 speaks IPv6 with ``-i ::1``; [remote_ip] comes out bracketed in the URI."""
    require_ipv6()
    assert sbc.udp6 is not None
    result = sipp("options.xml", sbc.host6, sbc.udp6, transport=flag, calls=5, rate=20)
    result.assert_all_passed(5)


@pytest.mark.parametrize(("transport", "flag"), [("udp", "u1"), ("tcp", "t1")])
def test_malformed_then_valid(sbc: SbcProcess, sipp: SippRunner, transport: str, flag: str) -> None:
    """400 naming the fault for each malformed OPTIONS, then 200; 5 calls in a row.

    Over TCP all 5 calls share SIPp's one connection, which SIPp treats as fatal if closed:
    a pass proves a 400 does not cost the client its connection.
    """
    result = sipp("malformed_then_valid.xml", sbc.host4, sbc.udp4, transport=flag, calls=5)
    result.assert_all_passed(5)
    # Each call: two 400s and one 200, seen by SIPp (its message trace).
    assert result.messages.count("SIP/2.0 400 Missing From Header") == 5, result.explain()
    assert result.messages.count("SIP/2.0 400 Bad Max-Forwards") == 5, result.explain()
    assert result.messages.count("SIP/2.0 200 OK") == 5, result.explain()
