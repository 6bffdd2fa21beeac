"""SIP, SIPS and TEL URIs (RFC 3261 19.1, RFC 3966) and other absolute URIs.

URIs are immutable values. ``parse_uri`` raises ``ValueError`` naming the fault; ``str()``
gives the URI back in its written form (parameter order and case are kept).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Final
from urllib.parse import unquote

from sbc.sip import grammar

Params = tuple[tuple[str, str | None], ...]


def _param(params: Params, name: str) -> str | None:
    name = name.lower()
    for key, value in params:
        if key.lower() == name:
            return value if value is not None else ""
    return None


def _has_param(params: Params, name: str) -> bool:
    name = name.lower()
    return any(key.lower() == name for key, _ in params)


def _params_str(params: Params) -> str:
    return "".join(f";{k}" if v is None else f";{k}={v}" for k, v in params)


def _with_param(params: Params, name: str, value: str | None) -> Params:
    low = name.lower()
    kept = tuple(p for p in params if p[0].lower() != low)
    return (*kept, (name, value))


def _without_param(params: Params, name: str) -> Params:
    low = name.lower()
    return tuple(p for p in params if p[0].lower() != low)


class SipUri:
    """sip: / sips: URI. ``host`` keeps IPv6 brackets; ``user`` stays %-escaped as written.

    Immutable by convention (URIs are shared through parse_uri's cache): the ``with_*``
    methods return new URIs.
    """

    __slots__ = ("_params", "_params_text", "headers", "host", "password", "port", "scheme", "user")

    def __init__(
        self,
        *,
        scheme: str = "sip",
        user: str | None = None,
        password: str | None = None,
        host: str,
        port: int | None = None,
        params: Params = (),
        params_text: str = "",  # ";a=b;c" as written, split on first use instead of params
        headers: str | None = None,  # the "?h=v&..." part without '?', as written
    ) -> None:
        self.scheme = scheme
        self.user = user
        self.password = password
        self.host = host
        self.port = port
        self._params: Params | None = None if params_text else params
        self._params_text = params_text
        self.headers = headers

    @property
    def params(self) -> Params:
        if self._params is None:
            self._params = _split_params(self._params_text)
        return self._params

    def _key(self) -> tuple[object, ...]:
        return (self.scheme.lower(), self.user, self.password, self.host.lower(), self.port,
                self.params, self.headers)  # fmt: skip

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SipUri) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"SipUri({self})"

    def __str__(self) -> str:
        out = [self.scheme, ":"]
        if self.user is not None:
            out.append(self.user)
            if self.password is not None:
                out += (":", self.password)
            out.append("@")
        out.append(self.host)
        if self.port is not None:
            out += (":", str(self.port))
        out.append(self._params_text if self._params is None else _params_str(self._params))
        if self.headers is not None:
            out += ("?", self.headers)
        return "".join(out)

    @property
    def secure(self) -> bool:
        return self.scheme.lower() == "sips"

    @property
    def host_bare(self) -> str:
        """Host without IPv6 brackets, lower-cased (RFC 3261 19.1.4: case-insensitive)."""
        h = self.host[1:-1] if self.host.startswith("[") else self.host
        return h.lower()

    @property
    def user_unescaped(self) -> str | None:
        return None if self.user is None else unquote(self.user, errors="surrogateescape")

    def param(self, name: str) -> str | None:
        """Value of a URI parameter; "" for a parameter without a value; None if absent."""
        return _param(self.params, name)

    def has_param(self, name: str) -> bool:
        return _has_param(self.params, name)

    @property
    def transport(self) -> str | None:
        t = self.param("transport")
        return t.lower() if t else None

    @property
    def lr(self) -> bool:
        return self.has_param("lr")

    def _with_params(self, params: Params) -> SipUri:
        return SipUri(
            scheme=self.scheme,
            user=self.user,
            password=self.password,
            host=self.host,
            port=self.port,
            params=params,
            headers=self.headers,
        )

    def with_param(self, name: str, value: str | None = None) -> SipUri:
        return self._with_params(_with_param(self.params, name, value))

    def without_param(self, name: str) -> SipUri:
        return self._with_params(_without_param(self.params, name))


def sip_uri_from_parts(
    scheme: str,
    user: str | None,
    password: str | None,
    host: str,
    port: str | None,
    params: str | None,
    headers: str | None,
) -> SipUri:
    """A SipUri from the groups of grammar.SIP_URI (already matched)."""
    port_n = None
    if port is not None:
        port_n = int(port)
        if port_n > 65535:
            raise ValueError("port out of range in URI")
    if _NATIVE_URI:
        return SipUri(
            scheme=scheme,
            user=user,
            password=password,
            host=host,
            port=port_n,
            params_text=params or "",
            headers=headers[1:] if headers else None,
        )
    # SipUri(scheme=..., ..., params_text=params) without the keyword-argument call: every
    # name-addr read from a message (To, Contact, Route ...) builds its URI here.
    uri = _new_uri(SipUri)
    uri.scheme = scheme
    uri.user = user
    uri.password = password
    uri.host = host
    uri.port = port_n
    uri._params = None if params else ()
    uri._params_text = params or ""
    uri.headers = headers[1:] if headers else None
    return uri


_new_uri = object.__new__
# Compiled by mypyc, SipUri is a native class: only its constructor makes one (a direct C call
# there, the keyword arguments resolved at build time), and object.__new__ refuses it.
_NATIVE_URI: Final = SipUri.__new__ is not object.__new__


@dataclass(frozen=True, slots=True, kw_only=True)
class TelUri:
    """tel: URI (RFC 3966)."""

    number: str
    params: Params = ()
    scheme: str = "tel"

    def __str__(self) -> str:
        return f"{self.scheme}:{self.number}{_params_str(self.params)}"

    @property
    def is_global(self) -> bool:
        return self.number.startswith("+")

    def param(self, name: str) -> str | None:
        return _param(self.params, name)


@dataclass(frozen=True, slots=True, kw_only=True)
class AbsoluteUri:
    """Any other scheme, kept opaque (RFC 3261 19: absoluteURI). Proxies route on it only to 416."""

    scheme: str
    rest: str = field(default="")

    def __str__(self) -> str:
        return f"{self.scheme}:{self.rest}"


Uri = SipUri | TelUri | AbsoluteUri


def _split_params(text: str) -> Params:
    """uri-parameters already validated by grammar.SIP_URI (";name[=value]" ...)."""
    out: list[tuple[str, str | None]] = []
    for part in text[1:].split(";"):
        k, sep, v = part.partition("=")
        out.append((k, v if sep else None))
    return tuple(out)


# URIs repeat within a message and a transaction (From, To, Contact, Route) and across calls
# (backends, the SBC's own); each call also brings a few of its own (its Contact at the SBC),
# which a larger cache would only keep longer after the call ended.
@lru_cache(maxsize=512)
def parse_uri(text: str) -> Uri:
    """Parse a URI. Raises ValueError with the reason if it is malformed."""
    colon = text.find(":")
    if colon <= 0:
        raise ValueError("URI without scheme")
    scheme = text[:colon]
    rest = text[colon + 1 :]
    if not grammar.SCHEME_RE.fullmatch(scheme):
        raise ValueError("bad URI scheme")
    low = scheme.lower()
    if low in ("sip", "sips"):
        m = grammar.SIP_URI_RE.fullmatch(rest)
        if m is None:
            raise ValueError(f"malformed {low} URI")
        return sip_uri_from_parts(scheme, *m.groups())
    if low == "tel":
        t = grammar.TEL_RE.fullmatch(rest)
        if t is None:
            raise ValueError("malformed tel URI")
        number, params = t.groups()
        tel_params = tuple(
            (p.partition("=")[0], p.partition("=")[2] if "=" in p else None)
            for p in params.split(";")[1:]
        )
        return TelUri(scheme=scheme, number=number, params=tel_params)
    if not grammar.ABSOLUTE_REST_RE.fullmatch(rest):
        raise ValueError("malformed URI")
    return AbsoluteUri(scheme=scheme, rest=rest)
