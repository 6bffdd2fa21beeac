"""Typed header values: Via, name-addr (From/To/Contact/Route), CSeq; names and lists.

Parsing functions raise ``ValueError`` naming the fault; the message layer turns that into a
``ParseError`` carrying the 400 to answer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

from sbc.sip import grammar
from sbc.sip.uri import Params, SipUri, Uri, parse_uri

# RFC 3261 7.3.3 compact forms, plus RFC 3265 (o, u), RFC 3515 (r), RFC 3892 (b),
# RFC 4028 (x), RFC 3841 (a, j, d), RFC 4474 (y, n), RFC 3903 none.
COMPACT_FORMS: dict[str, str] = {
    "i": "call-id",
    "m": "contact",
    "e": "content-encoding",
    "l": "content-length",
    "c": "content-type",
    "f": "from",
    "s": "subject",
    "k": "supported",
    "t": "to",
    "v": "via",
    "o": "event",
    "u": "allow-events",
    "r": "refer-to",
    "b": "referred-by",
    "x": "session-expires",
    "a": "accept-contact",
    "j": "reject-contact",
    "d": "request-disposition",
    "y": "identity",
    "n": "identity-info",
}

# Canonical spelling used when the SBC writes a header itself.
CANONICAL_NAMES: dict[str, str] = {
    "call-id": "Call-ID",
    "cseq": "CSeq",
    "www-authenticate": "WWW-Authenticate",
    "mime-version": "MIME-Version",
    "rack": "RAck",
    "rseq": "RSeq",
}

# Headers whose values are comma-separated lists (RFC 3261 7.3.1). Authorization and
# friends contain commas but are not lists and are never split.
LIST_HEADERS = frozenset(
    {
        "via", "contact", "route", "record-route", "path", "service-route", "allow",
        "supported", "require", "proxy-require", "unsupported", "accept", "accept-encoding",
        "accept-language", "allow-events", "content-encoding", "content-language",
        "in-reply-to", "alert-info", "call-info", "error-info", "warning",
        "p-asserted-identity", "p-preferred-identity", "p-associated-uri", "history-info",
        "security-client", "security-server", "security-verify", "reason",
        "accept-contact", "reject-contact", "request-disposition",
    }
)  # fmt: skip


@lru_cache(maxsize=1024)
def header_key(name: str) -> str:
    """Lower-case full header name for a name as written (compact forms expanded)."""
    low = name.lower()
    return COMPACT_FORMS.get(low, low)


def canonical_name(key: str) -> str:
    """How the SBC spells a header it writes: Call-ID, CSeq, Content-Length ..."""
    return CANONICAL_NAMES.get(key) or "-".join(p.capitalize() for p in key.split("-"))


def split_list(value: str) -> list[str]:
    """Split a list header value at commas outside quoted strings and <...> (RFC 3261 7.3.1).

    Empty elements are kept (as "") so that validators can reject them.
    """
    if "," not in value:
        return [value.strip()]
    out: list[str] = []
    start = 0
    i = 0
    n = len(value)
    in_quote = False
    in_angle = False
    while i < n:
        ch = value[i]
        if in_quote:
            if ch == "\\":
                i += 1
            elif ch == '"':
                in_quote = False
        elif ch == '"':
            in_quote = True
        elif ch == "<":
            in_angle = True
        elif ch == ">":
            in_angle = False
        elif ch == "," and not in_angle:
            out.append(value[start:i].strip())
            start = i + 1
        i += 1
    out.append(value[start:].strip())
    return out


def _parse_params(text: str, pos: int, what: str) -> Params:
    """generic-param list from ``pos`` to the end of ``text`` (RFC 3261 25.1)."""
    params: list[tuple[str, str | None]] = []
    n = len(text)
    while pos < n:
        m = grammar.GENERIC_PARAM_RE.match(text, pos)
        if m is None:
            raise ValueError(f"malformed {what} parameters")
        params.append((m.group(1), m.group(2)))
        pos = m.end()
    return tuple(params)


def _param(params: Params, name: str) -> str | None:
    for key, value in params:
        if key.lower() == name:
            return "" if value is None else value
    return None


def _params_str(params: Params) -> str:
    return "".join(f";{k}" if v is None else f";{k}={v}" for k, v in params)


def _with_param(params: Params, name: str, value: str | None) -> Params:
    low = name.lower()
    out = [(k, value if k.lower() == low else v) for k, v in params]
    if not any(k.lower() == low for k, _ in params):
        out.append((name, value))
    return tuple(out)


MAGIC_COOKIE = "z9hG4bK"  # RFC 3261 8.1.1.7


@dataclass(frozen=True, slots=True, kw_only=True)
class Via:
    """One via-parm (RFC 3261 20.42). ``host`` keeps IPv6 brackets."""

    transport: str
    host: str
    port: int | None = None
    params: Params = ()
    protocol: str = "SIP/2.0"

    def __str__(self) -> str:
        port = "" if self.port is None else f":{self.port}"
        return f"{self.protocol}/{self.transport} {self.host}{port}{_params_str(self.params)}"

    def param(self, name: str) -> str | None:
        return _param(self.params, name)

    def with_param(self, name: str, value: str | None = None) -> Via:
        return replace(self, params=_with_param(self.params, name, value))

    @property
    def branch(self) -> str | None:
        return self.param("branch")

    @property
    def rfc3261_branch(self) -> bool:
        """True if the branch carries the magic cookie and something after it (RFC 3261 17.2.3)."""
        b = self.branch
        return b is not None and b.startswith(MAGIC_COOKIE) and len(b) > len(MAGIC_COOKIE)

    @property
    def received(self) -> str | None:
        return self.param("received")

    @property
    def rport(self) -> int | None:
        """The rport value a server filled in (RFC 3581 4); None if absent or empty."""
        v = self.param("rport")
        return int(v) if v else None

    @property
    def wants_rport(self) -> bool:
        return any(k.lower() == "rport" for k, _ in self.params)

    @property
    def host_bare(self) -> str:
        h = self.host[1:-1] if self.host.startswith("[") else self.host
        return h.lower()

    @property
    def sent_by(self) -> tuple[str, int | None]:
        return self.host_bare, self.port


@lru_cache(maxsize=2048)
def parse_via(value: str) -> tuple[Via, ...]:
    """All via-parms of one Via header field value (RFC 3261 20.42, 25.1)."""
    out: list[Via] = []
    for part in split_list(value):
        if not part:
            raise ValueError("empty Via element")
        m = grammar.VIA_PARM_RE.match(part)
        if m is None:
            raise ValueError("malformed Via sent-protocol or sent-by")
        name, version, transport, host, port = m.groups()
        if name.upper() != "SIP" or version != "2.0":
            raise ValueError("Via protocol is not SIP/2.0")
        port_n = None if port is None else int(port)
        if port_n is not None and not 0 < port_n <= 65535:
            raise ValueError("Via port out of range")
        params = _parse_params(part, m.end(), "Via")
        for key, v in params:
            if key.lower() == "rport" and v is not None and not v.isdigit():
                raise ValueError("Via rport is not a number")
        out.append(
            Via(
                transport=transport.upper(),
                host=host,
                port=port_n,
                params=params,
                protocol=f"{name}/{version}",
            )
        )
    return tuple(out)


@dataclass(frozen=True, slots=True, kw_only=True)
class NameAddr:
    """name-addr / addr-spec with header parameters (From, To, Contact, Route, ...).

    ``display_name`` is as written (quoted strings keep their quotes); ``star`` is the
    Contact ``*`` of RFC 3261 10.2.2.
    """

    uri: Uri | None
    display_name: str | None = None
    params: Params = ()
    bracketed: bool = True
    star: bool = False

    def __str__(self) -> str:
        if self.star:
            return "*"
        if self.bracketed or self.display_name:
            dn = f"{self.display_name} " if self.display_name else ""
            return f"{dn}<{self.uri}>{_params_str(self.params)}"
        return f"{self.uri}{_params_str(self.params)}"

    def param(self, name: str) -> str | None:
        return _param(self.params, name.lower())

    def with_param(self, name: str, value: str | None = None) -> NameAddr:
        return replace(self, params=_with_param(self.params, name, value))

    @property
    def tag(self) -> str | None:
        return self.param("tag")

    @property
    def sip_uri(self) -> SipUri | None:
        return self.uri if isinstance(self.uri, SipUri) else None


@lru_cache(maxsize=4096)
def parse_name_addr(value: str) -> NameAddr:
    """One name-addr or addr-spec with its parameters (RFC 3261 20.10, 20.20, 20.39)."""
    m = grammar.NAME_ADDR_RE.match(value)
    if m is not None:
        display, uri_text = m.groups()
        bracketed = True
    else:
        m = grammar.ADDR_SPEC_RE.match(value)
        if m is None:
            raise ValueError("malformed name-addr or addr-spec")
        display, uri_text, bracketed = None, m.group(1), False
    uri = parse_uri(uri_text)
    params = _parse_params(value, m.end(), "header")
    return NameAddr(uri=uri, display_name=display, params=params, bracketed=bracketed)


def parse_name_addr_list(value: str) -> tuple[NameAddr, ...]:
    """Contact / Route / Record-Route / Path values; Contact may be ``*``."""
    if value.strip() == "*":
        return (NameAddr(uri=None, star=True),)
    out = []
    for part in split_list(value):
        if not part:
            raise ValueError("empty list element")
        out.append(parse_name_addr(part))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class CSeq:
    """CSeq (RFC 3261 20.16): sequence number < 2**31 and the method."""

    seq: int
    method: str

    def __str__(self) -> str:
        return f"{self.seq} {self.method}"


@lru_cache(maxsize=1024)
def parse_cseq(value: str) -> CSeq:
    m = grammar.CSEQ_RE.fullmatch(value.strip())
    if m is None:
        raise ValueError("malformed CSeq")
    seq = int(m.group(1))
    if seq >= 2**31:
        raise ValueError("CSeq number too large")
    return CSeq(seq, m.group(2))


def parse_uint(value: str, *, limit: int, what: str) -> int:
    """A 1*DIGIT header value (Max-Forwards, Content-Length, Expires) bounded by ``limit``."""
    v = value.strip()
    if not grammar.DIGITS_RE.fullmatch(v):
        raise ValueError(f"{what} is not a number")
    n = int(v)
    if n > limit:
        raise ValueError(f"{what} too large")
    return n


def is_token(text: str) -> bool:
    return grammar.TOKEN_RE.fullmatch(text) is not None


def media_type(value: str) -> str:
    """``type/subtype`` of a Content-Type / Accept element, lower-cased, without parameters."""
    return value.split(";", 1)[0].strip().lower()
