"""RFC 3261 section 25 ABNF as regular expressions.

Each pattern quotes the rule it implements. The patterns work on header values that the
parser has already unfolded (RFC 3261 7.3.1: a CRLF followed by whitespace is LWS and is
equivalent to a single SP), so ``LWS`` here is plain ``[ \\t]+``.

Repetitions are possessive (``*+``, ``++``) wherever giving characters back can never lead
to a match (the next character of the rule cannot be one the repetition takes): the language
is the same, and the re engine keeps no backtracking state, which makes the header views
(parsed for every packet) markedly cheaper.
"""

from __future__ import annotations

import re

# alphanum / "-" / "." / "!" / "%" / "*" / "_" / "+" / "`" / "'" / "~"
TOKEN = r"[A-Za-z0-9\-.!%*_+`'~]++"
# LWS = [*WSP CRLF] 1*WSP ; SWS = [LWS]   (after unfolding)
LWS = r"[ \t]++"
SWS = r"[ \t]*+"
# quoted-string = SWS DQUOTE *(qdtext / quoted-pair ) DQUOTE
# qdtext = LWS / %x21 / %x23-5B / %x5D-7E / UTF8-NONASCII
# quoted-pair = "\" (%x00-09 / %x0B-0C / %x0E-7F)
# (written as an unrolled loop, linear and fast in the re engine)
QUOTED_STRING = r'"[^"\\\r\n]*+(?:\\[\x00-\x09\x0b\x0c\x0e-\x7f][^"\\\r\n]*+)*+"'
# escaped = "%" HEXDIG HEXDIG
ESCAPED = r"%[0-9A-Fa-f]{2}"
# hostname = *( domainlabel "." ) toplabel [ "." ]; IPv4address; IPv6reference = "[" IPv6address "]"
# The IPv6 part is deliberately loose: RFC 5118 4.10 asks parsers to tolerate the
# "2001:db8:::192.0.2.1" form that the RFC 3261 ABNF itself allows by mistake.
IPV6_REFERENCE = r"\[[0-9A-Fa-f:.]+\]"
# domainlabel = alphanum / alphanum *( alphanum / "-" ) alphanum  ("_" tolerated too), the same
# strings as runs of alphanumerics separated by one "." or by a run of "-" / "_".
HOSTNAME = r"[A-Za-z0-9]++(?:(?:\.|[\-_]++)[A-Za-z0-9]++)*+\.?"
HOST = rf"(?:{IPV6_REFERENCE}|{HOSTNAME})"
PORT = r"[0-9]{1,5}"
# Method = INVITEm / ACKm / OPTIONSm / BYEm / CANCELm / REGISTERm / extension-method
METHOD = TOKEN
# SIP-Version = "SIP" "/" 1*DIGIT "." 1*DIGIT
SIP_VERSION = r"[Ss][Ii][Pp]/[0-9]+\.[0-9]+"

# Request-Line = Method SP Request-URI SP SIP-Version CRLF  (exactly one SP each, RFC 4475 3.1.2.9)
REQUEST_LINE_RE = re.compile(rf"({METHOD}) ([^\x00-\x20]+) ({SIP_VERSION})")
# Status-Line = SIP-Version SP Status-Code SP Reason-Phrase CRLF; Status-Code = 3DIGIT
# Reason-Phrase = *(reserved / unreserved / escaped / UTF8-NONASCII / UTF8-CONT / SP / HTAB)
STATUS_LINE_RE = re.compile(rf"({SIP_VERSION}) ([0-9]{{3}}) ([^\x00-\x08\x0a-\x1f\x7f]*)")

TOKEN_RE = re.compile(TOKEN)
HOST_RE = re.compile(HOST)

# RFC 5118 4.5: received=2001:db8::9:255 (IPv6address, no brackets) is valid in Via.
IPV6_BARE = r"[0-9A-Fa-f]*+:[0-9A-Fa-f:.]++"
# generic-param = token [ EQUAL gen-value ]; gen-value = token / host / quoted-string
# SEMI = SWS ";" SWS ; EQUAL = SWS "=" SWS
# Each alternative must match as far as the value goes (the repetition below is possessive,
# and GENERIC_PARAM_RE's search is not anchored at the value's end): IPV6_BARE comes before
# TOKEN, which would stop at its first ":" (received=2001:db8::1 read as "2001").
GEN_VALUE = rf"(?:{IPV6_BARE}|{TOKEN}|{QUOTED_STRING}|{IPV6_REFERENCE})"
GENERIC_PARAMS = rf"(?:{SWS};{SWS}{TOKEN}(?:{SWS}={SWS}{GEN_VALUE})?)*+"
GENERIC_PARAM_RE = re.compile(rf"{SWS};{SWS}({TOKEN})(?:{SWS}={SWS}({GEN_VALUE}))?")

# sent-protocol = protocol-name SLASH protocol-version SLASH transport ; SLASH = SWS "/" SWS
# sent-by = host [ COLON port ]
# via-parm = sent-protocol LWS sent-by *( SEMI via-params )
VIA_PARM_RE = re.compile(
    rf"{SWS}({TOKEN}){SWS}/{SWS}({TOKEN}){SWS}/{SWS}({TOKEN}){LWS}({HOST})"
    rf"(?:{SWS}:{SWS}({PORT}))?({GENERIC_PARAMS}){SWS}"
)

# display-name = *(token LWS) / quoted-string
# name-addr = [ display-name ] LAQUOT addr-spec RAQUOT ; LAQUOT = SWS "<" ; RAQUOT = ">" SWS
# No whitespace is allowed inside the angle brackets (RFC 4475 3.1.2.14).
NAME_ADDR_RE = re.compile(
    rf"{SWS}({QUOTED_STRING}|(?:{TOKEN}(?:{LWS}{TOKEN})*))?{SWS}<([^\x00-\x20<>\"]+)>"
    rf"({GENERIC_PARAMS}){SWS}"
)
# addr-spec = SIP-URI / SIPS-URI / absoluteURI (no LWS, no ';' '?' ',' when not bracketed,
# RFC 3261 20.10: the URI parameters then belong to the header field)
ADDR_SPEC_RE = re.compile(rf"{SWS}([^\x00-\x20<>\";,?]+)({GENERIC_PARAMS}){SWS}")

# CSeq = "CSeq" HCOLON 1*DIGIT LWS Method ; the number is < 2**31 (RFC 3261 8.1.1.5)
CSEQ_RE = re.compile(rf"([0-9]{{1,10}}){LWS}({METHOD})")

# Content-Length = ( "Content-Length" / "l" ) HCOLON 1*DIGIT
DIGITS_RE = re.compile(r"[0-9]{1,10}")

# SIP-URI = "sip:" [ userinfo ] hostport uri-parameters [ headers ]
# userinfo = ( user / telephone-subscriber ) [ ":" password ] "@"
# user = 1*( unreserved / escaped / user-unreserved )
# user-unreserved = "&" / "=" / "+" / "$" / "," / ";" / "?" / "/"
# password = *( unreserved / escaped / "&" / "=" / "+" / "$" / "," )
# uri-parameter = transport-param / user-param / method-param / ttl-param / maddr-param
#                 / lr-param / other-param ; other-param = pname [ "=" pvalue ]
# paramchar = param-unreserved / unreserved / escaped
# param-unreserved = "[" / "]" / "/" / ":" / "&" / "+" / "$"
# headers = "?" header *( "&" header ) ; header = hname "=" hvalue
_UNRESERVED = r"A-Za-z0-9\-_.!~*'()"
# The 1*(chars / escaped) rules are unrolled loops: chars*(escaped chars*)*, non-empty.
_USER_CHARS = rf"[{_UNRESERVED}&=+$,;?/]"
USER = rf"(?=[{_UNRESERVED}&=+$,;?/%]){_USER_CHARS}*+(?:{ESCAPED}{_USER_CHARS}*+)*+"
PASSWORD = rf"[{_UNRESERVED}&=+$,]*+(?:{ESCAPED}[{_UNRESERVED}&=+$,]*+)*+"
_PARAM_CHARS = rf"[{_UNRESERVED}\[\]/:&+$]"
PARAMCHARS = rf"(?=[{_UNRESERVED}\[\]/:&+$%]){_PARAM_CHARS}*+(?:{ESCAPED}{_PARAM_CHARS}*+)*+"
HNVS = rf"[{_UNRESERVED}\[\]/?:+$]*+(?:{ESCAPED}[{_UNRESERVED}\[\]/?:+$]*+)*+"
SIP_URI = (
    rf"(?:({USER})(?::({PASSWORD}))?@)?({HOST})(?::({PORT}))?"
    rf"((?:;{PARAMCHARS}(?:={PARAMCHARS})?)*+)"
    rf"(\?{HNVS}={HNVS}(?:&{HNVS}={HNVS})*+)?"
)
SIP_URI_RE = re.compile(SIP_URI)
# name-addr whose URI is a SIP/SIPS URI, matched in one pass (the common case):
# groups display, uri, scheme, user, password, host, port, uri-params, uri-headers, params
NAME_ADDR_SIP_RE = re.compile(
    rf"{SWS}({QUOTED_STRING}|(?:{TOKEN}(?:{LWS}{TOKEN})*))?{SWS}<(([Ss][Ii][Pp][Ss]?):{SIP_URI})>"
    rf"({GENERIC_PARAMS}){SWS}"
)
URI_PARAM_RE = re.compile(rf";({PARAMCHARS})(?:=({PARAMCHARS}))?")
# scheme = ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )
SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+\-.]*")
# absoluteURI = scheme ":" ( hier-part / opaque-part ): any uric, no SP, '<', '>', '"'
ABSOLUTE_REST_RE = re.compile(r"[^\x00-\x20<>\"{}|\\^`]+")
# telephone-subscriber (RFC 3966 3): global or local number, then ;params
TEL_RE = re.compile(r"(\+?[0-9A-Fa-f*#\-.()]+)((?:;[^;]+)*)")
