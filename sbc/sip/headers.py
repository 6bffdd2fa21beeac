"""Typed header values: Via, name-addr (From/To/Contact/Route), CSeq; names and lists.

Parsing functions raise ``ValueError`` naming the fault; the message layer turns that into a
``ParseError`` carrying the 400 to answer.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Final

from sbc.sip import grammar
from sbc.sip.uri import SipUri, Uri, parse_uri, sip_uri_from_parts

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


HeaderParams = tuple[tuple[str, str], ...]  # (name, value); "" is a parameter without value


def _parse_params(text: str) -> HeaderParams:
    """generic-params already validated by the caller's regex (RFC 3261 25.1)."""
    if not text:
        return ()
    if " " in text or "\t" in text or ('"' in text and not _simple_quotes(text)):
        return tuple(grammar.GENERIC_PARAM_RE.findall(text))
    out = []  # a plain loop: cheaper than a comprehension for a few parameters
    for part in text[1:].split(";"):
        k, _, v = part.partition("=")
        out.append((k, v))
    return tuple(out)


def _simple_quotes(text: str) -> bool:
    """Quoted values without ';' or escapes: splitting at ';' and '=' stays correct."""
    return "\\" not in text and ";" not in "".join(text.split('"')[1::2])


def _param(params: HeaderParams, name: str) -> str | None:
    for key, value in params:
        if key == name or key.lower() == name:
            return value
    return None


def _params_str(params: HeaderParams) -> str:
    return "".join(f";{k}={v}" if v else f";{k}" for k, v in params)


def _with_param(params: HeaderParams, name: str, value: str) -> HeaderParams:
    return _with_params(params, {name: value})


def _with_params(params: HeaderParams, updates: dict[str, str]) -> HeaderParams:
    """Set parameters in one pass: existing ones keep their place, new ones are appended."""
    wanted = {k.lower(): (k, v) for k, v in updates.items()}
    out = []
    for k, v in params:
        new = wanted.pop(k.lower(), None)
        out.append((k, new[1]) if new is not None else (k, v))
    out.extend(wanted.values())
    return tuple(out)


MAGIC_COOKIE = "z9hG4bK"  # RFC 3261 8.1.1.7


class Via:
    """One via-parm (RFC 3261 20.42). ``host`` keeps IPv6 brackets. Treat as immutable."""

    __slots__ = ("host", "params", "port", "protocol", "transport")

    def __init__(
        self,
        *,
        transport: str,
        host: str,
        port: int | None = None,
        params: HeaderParams = (),
        protocol: str = "SIP/2.0",
    ) -> None:
        self.transport = transport
        self.host = host
        self.port = port
        self.params = params
        self.protocol = protocol

    def _key(self) -> tuple[object, ...]:
        return (self.protocol, self.transport, self.host.lower(), self.port, self.params)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Via) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"Via({self})"

    def __str__(self) -> str:
        port = "" if self.port is None else f":{self.port}"
        return f"{self.protocol}/{self.transport} {self.host}{port}{_params_str(self.params)}"

    def param(self, name: str) -> str | None:
        """Value of a parameter ("" if it has none), None if absent."""
        return _param(self.params, name.lower())

    def with_param(self, name: str, value: str = "") -> Via:
        return self.with_params({name: value})

    def with_params(self, updates: dict[str, str]) -> Via:
        return Via(
            transport=self.transport,
            host=self.host,
            port=self.port,
            params=_with_params(self.params, updates),
            protocol=self.protocol,
        )

    @property
    def branch(self) -> str | None:
        for key, value in self.params:  # _param(self.params, "branch"), inlined
            if key == "branch" or key.lower() == "branch":
                return value
        return None

    @property
    def rfc3261_branch(self) -> bool:
        """True if the branch carries the magic cookie and something after it (RFC 3261 17.2.3)."""
        b = self.branch
        return b is not None and b.startswith(MAGIC_COOKIE) and len(b) > len(MAGIC_COOKIE)

    @property
    def received(self) -> str | None:
        return _param(self.params, "received")

    @property
    def rport(self) -> int | None:
        """The rport value a server filled in (RFC 3581 4); None if absent or empty."""
        v = _param(self.params, "rport")
        return int(v) if v else None

    @property
    def wants_rport(self) -> bool:
        return _param(self.params, "rport") is not None

    @property
    def host_bare(self) -> str:
        h = self.host[1:-1] if self.host.startswith("[") else self.host
        return h.lower()

    @property
    def sent_by(self) -> tuple[str, int | None]:
        return self.host_bare, self.port


def _checked_via_parm(
    text: str,
) -> tuple[str, str, str, str, int | None, str, HeaderParams | None]:
    """One via-parm matched and checked (RFC 3261 20.42, 25.1): (name, version, transport,
    host, port, the parameters' text, the parameters parsed if the rport check needed
    them); ValueError names the fault."""
    m = grammar.VIA_PARM_RE.fullmatch(text)
    if m is None:
        if not text.strip():
            raise ValueError("empty Via element")
        raise ValueError("malformed Via")
    name, version, transport, host, port, params = m.groups()
    if version != "2.0" or (name != "SIP" and name.upper() != "SIP"):
        raise ValueError("Via protocol is not SIP/2.0")
    port_n = None
    if port is not None:
        port_n = int(port)
        if not 0 < port_n <= 65535:
            raise ValueError("Via port out of range")
    parsed = None
    if "rport=" in params.lower():
        parsed = _parse_params(params)
        rport = _param(parsed, "rport")
        if rport and not rport.isdigit():
            raise ValueError("Via rport is not a number")
    return name, version, transport, host, port_n, params, parsed


def parse_via_parm(text: str) -> Via:
    """One via-parm (RFC 3261 20.42, 25.1)."""
    name, version, transport, host, port_n, params, parsed = _checked_via_parm(text)
    if parsed is None:
        parsed = _parse_params(params)
    protocol = "SIP/2.0" if name == "SIP" else f"{name}/{version}"
    if _NATIVE_VIA:
        return Via(
            transport=transport.upper(), host=host, port=port_n, params=parsed, protocol=protocol
        )
    # Via(transport=..., host=..., ...) without the keyword-argument call.
    via = _new_via(Via)
    via.transport = transport.upper()
    via.host = host
    via.port = port_n
    via.params = parsed
    via.protocol = protocol
    return via


def check_via_parm(text: str) -> None:
    """What ``parse_via_parm`` checks of one via-parm, with the same faults, without making
    the Via (a via-parm below the top one is relayed as written, never read)."""
    _checked_via_parm(text)


_new_via = object.__new__
# Compiled by mypyc, Via is a native class: only its constructor makes one (a direct C call
# there, the keyword arguments resolved at build time), and object.__new__ refuses it.
_NATIVE_VIA: Final = Via.__new__ is not object.__new__


def parse_via(value: str) -> tuple[Via, ...]:
    """All via-parms of one Via header field value."""
    return tuple(parse_via_parm(part) for part in split_list(value))


class NameAddr:
    """name-addr / addr-spec with header parameters (From, To, Contact, Route, ...).

    ``display_name`` is as written (quoted strings keep their quotes); ``star`` is the
    Contact ``*`` of RFC 3261 10.2.2. The URI is parsed on first use. Treat as immutable.
    """

    __slots__ = (
        "_params", "_params_text", "_uri", "_uri_parts", "_uri_text", "bracketed",
        "display_name", "star",
    )  # fmt: skip

    def __init__(
        self,
        *,
        uri: Uri | str | None,
        uri_text: str | None = None,
        display_name: str | None = None,
        params: HeaderParams = (),
        params_text: str = "",
        bracketed: bool = True,
        star: bool = False,
    ) -> None:
        # Parameters are split on first use from ``params_text`` (validated by the caller).
        self._params: HeaderParams | None = None if params_text else params
        self._params_text = params_text
        self._uri_parts: tuple[Any, ...] | None = None
        if isinstance(uri, str):
            self._uri_text: str | None = uri
            self._uri: Uri | None = None
        else:
            self._uri_text = uri_text  # str(uri) when needed
            self._uri = uri
        self.display_name = display_name
        self.bracketed = bracketed
        self.star = star

    @property
    def params(self) -> HeaderParams:
        if self._params is None:
            self._params = _parse_params(self._params_text)
        return self._params

    @property
    def uri(self) -> Uri | None:
        """The URI (parse_uri raises ValueError if it is malformed)."""
        if self._uri is None:
            if self._uri_parts is not None:
                self._uri = sip_uri_from_parts(*self._uri_parts)
            elif self._uri_text is not None:
                self._uri = parse_uri(self._uri_text)
        return self._uri

    @property
    def uri_text(self) -> str | None:
        if self._uri_text is None and self._uri is not None:
            self._uri_text = str(self._uri)
        return self._uri_text

    def __str__(self) -> str:
        if self.star:
            return "*"
        params = self._params_text if self._params is None else _params_str(self._params)
        if self.bracketed or self.display_name:
            dn = f"{self.display_name} " if self.display_name else ""
            return f"{dn}<{self.uri_text}>{params}"
        return f"{self.uri_text}{params}"

    def __repr__(self) -> str:
        return f"NameAddr({self})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NameAddr) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def param(self, name: str) -> str | None:
        return _param(self.params, name.lower())

    def with_param(self, name: str, value: str = "") -> NameAddr:
        return NameAddr(
            uri=self.uri,
            uri_text=self._uri_text,
            display_name=self.display_name,
            params=_with_param(self.params, name, value),
            bracketed=self.bracketed,
            star=self.star,
        )

    @property
    def tag(self) -> str | None:
        params = self._params  # _param(self.params, "tag"), inlined: read for every message
        if params is None:
            params = self._params = _parse_params(self._params_text)
        for key, value in params:
            if key == "tag" or key.lower() == "tag":
                return value
        return None

    @property
    def sip_uri(self) -> SipUri | None:
        uri = self.uri
        return uri if isinstance(uri, SipUri) else None


_new_name_addr = object.__new__
_NATIVE_NAME_ADDR: Final = NameAddr.__new__ is not object.__new__  # compiled: see _NATIVE_VIA


def parse_name_addr(value: str, *, check_uri: bool = True) -> NameAddr:
    """One name-addr or addr-spec with its parameters (RFC 3261 20.10, 20.20, 20.39).

    With ``check_uri`` the URI is parsed now, so a malformed one is found at once.
    """
    m = grammar.NAME_ADDR_SIP_RE.fullmatch(value)
    if m is not None:
        # The common case: a bracketed SIP URI, validated and split in one pass.
        groups = m.groups()
        if groups[6] is not None and int(groups[6]) > 65535:
            raise ValueError("port out of range in URI")
        params_text = groups[9]
        if _NATIVE_NAME_ADDR:
            na = NameAddr(uri=groups[1], display_name=groups[0], params_text=params_text)
            na._uri_parts = groups[2:9]  # the URI is built from its parts on first use
            return na
        # What NameAddr(uri=groups[1], display_name=groups[0], params_text=groups[9]) makes,
        # without the keyword-argument call: the URI is built from its parts on first use.
        na = _new_name_addr(NameAddr)
        na._params = None if params_text else ()
        na._params_text = params_text
        na._uri_parts = groups[2:9]
        na._uri_text = groups[1]
        na._uri = None
        na.display_name = groups[0]
        na.bracketed = True
        na.star = False
        return na
    m = grammar.NAME_ADDR_RE.fullmatch(value)
    if m is not None:
        display, uri_text, params = m.groups()
        bracketed = True
    else:
        m = grammar.ADDR_SPEC_RE.fullmatch(value)
        if m is None:
            raise ValueError("malformed name-addr or addr-spec")
        uri_text, params = m.groups()
        display, bracketed = None, False
    na = NameAddr(uri=uri_text, display_name=display, params_text=params, bracketed=bracketed)
    if check_uri:
        na._uri = parse_uri(uri_text)
    return na


def parse_name_addr_list(value: str, *, check_uri: bool = True) -> tuple[NameAddr, ...]:
    """Contact / Route / Record-Route / Path values; Contact may be ``*``."""
    if value == "*":
        return (NameAddr(uri=None, star=True),)
    if "," not in value:
        return (parse_name_addr(value, check_uri=check_uri),)
    return tuple(parse_name_addr(part, check_uri=check_uri) for part in split_list(value))


class CSeq:
    """CSeq (RFC 3261 20.16): sequence number < 2**31 and the method."""

    __slots__ = ("method", "seq")

    def __init__(self, seq: int, method: str) -> None:
        self.seq = seq
        self.method = method

    def __str__(self) -> str:
        return f"{self.seq} {self.method}"

    def __repr__(self) -> str:
        return f"CSeq({self.seq}, {self.method!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CSeq) and (self.seq, self.method) == (other.seq, other.method)

    def __hash__(self) -> int:
        return hash((self.seq, self.method))


def parse_cseq(value: str) -> CSeq:
    m = grammar.CSEQ_RE.fullmatch(value)
    if m is None:
        raise ValueError("malformed CSeq")
    seq = int(m.group(1))
    if seq >= 2**31:
        raise ValueError("CSeq number too large")
    return CSeq(seq, m.group(2))


def parse_uint(value: str, *, limit: int, what: str) -> int:
    """A 1*DIGIT header value (Max-Forwards, Content-Length, Expires) bounded by ``limit``."""
    if not (value.isdigit() and value.isascii() and len(value) <= 10):
        raise ValueError(f"{what} is not a number")
    n = int(value)
    if n > limit:
        raise ValueError(f"{what} too large")
    return n


def is_token(text: str) -> bool:
    return grammar.TOKEN_RE.fullmatch(text) is not None


def media_type(value: str) -> str:
    """``type/subtype`` of a Content-Type / Accept element, lower-cased, without parameters."""
    return value.split(";", 1)[0].strip().lower()
