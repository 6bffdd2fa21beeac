"""SDP (RFC 4566) parse/serialize with byte-exact round trips, and SDES a=crypto (RFC 4568)."""

from sbc.sdp.sdes import SUITES, Crypto, Suite, find_suite
from sbc.sdp.sdp import Media, Origin, SdpError, Session

__all__ = ["SUITES", "Crypto", "Media", "Origin", "SdpError", "Session", "Suite", "find_suite"]
