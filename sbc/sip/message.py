"""SIP requests and responses (RFC 3261 section 7).

A message keeps its header fields in order, each with its exact original text, so an
unmodified message serializes back to the same octets. Typed views (``via``, ``cseq``,
``from_`` ...) are parsed on first use and cached; a malformed value raises ``ParseError``
carrying the status the SBC answers with (RFC 3261 8.2, 16.3).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, NamedTuple

from sbc.sip.headers import (
    LIST_HEADERS,
    CSeq,
    NameAddr,
    Via,
    canonical_name,
    check_via_parm,
    header_key,
    parse_cseq,
    parse_name_addr,
    parse_name_addr_list,
    parse_uint,
    parse_via,
    parse_via_parm,
    split_list,
)
from sbc.sip.uri import Uri, parse_uri


class ParseError(Exception):
    """A message (or one of its headers) is malformed.

    ``status`` and ``reason`` are the response to answer with (0: drop, no answer possible).
    ``message`` is what could be parsed, enough to build that response (RFC 3261 8.2.6.2).
    ``fatal`` means a stream connection must be closed: its framing is lost.
    """

    def __init__(
        self,
        status: int,
        reason: str,
        *,
        message: Message | None = None,
        fatal: bool = False,
    ) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.message = message
        self.fatal = fatal


class HeaderField(NamedTuple):
    """One header field: key (lower-case full name), name as written, value, raw line(s)."""

    key: str
    name: str
    value: str
    raw: str | None  # exact original line(s) including folding; None once modified


# Not in a header view's cache. The locals that may hold it are left untyped (Any): compiled
# by mypyc, a typed local is checked on assignment, and the sentinel is no Via or NameAddr.
_MISSING: Any = object()


class Message:
    """Common part of requests and responses: ordered header fields and the body (bytes).

    The fields are three parallel lists (kept private, for speed: a message is parsed for
    every packet): ``_keys`` (lower-case full names, searched with C-level list methods),
    ``_pairs`` (``line.partition(":")`` of each line: name as written, ":", value with its
    surrounding whitespace, stripped when read) and ``_raws`` (the exact original line, or
    None once a field was written by the SBC).
    """

    __slots__ = ("_cache", "_keys", "_pairs", "_raw", "_raws", "body", "version")

    def __init__(self, body: bytes, version: str, raw: bytes | None) -> None:
        self._keys: list[str] = []
        self._pairs: list[tuple[str, str, str]] = []
        self._raws: list[str | None] = []
        self.body = body
        self.version = version
        self._raw = raw  # the exact octets this message was parsed from, while unmodified
        self._cache: dict[str, Any] = {}

    # -- generic header access ---------------------------------------------------------------
    def _touch(self, key: str) -> None:
        self._raw = None
        self._cache.pop(key, None)
        if key == "via":
            self._cache.pop("top-via", None)
            self._cache.pop("vias-checked", None)

    def _indices(self, key: str) -> list[int]:
        keys = self._keys
        n = keys.count(key)
        if n == 0:
            return []
        if n == 1:
            return [keys.index(key)]
        return [i for i, k in enumerate(keys) if k == key]

    def get(self, name: str) -> str | None:
        """Value of the first field with this name (compact forms match), or None."""
        key = header_key(name)
        try:
            return self._pairs[self._keys.index(key)][2].strip(" \t")
        except ValueError:
            return None

    def field_values(self, name: str) -> list[str]:
        """The value of every field with this name, as written (not split at commas)."""
        pairs = self._pairs
        return [pairs[i][2].strip(" \t") for i in self._indices(header_key(name))]

    def values(self, name: str) -> list[str]:
        """The values of every field with this name, list headers split at commas."""
        key = header_key(name)
        values = self.field_values(key)
        if key not in LIST_HEADERS:
            return values
        return [part for value in values for part in split_list(value)]

    def count(self, name: str) -> int:
        return self._keys.count(header_key(name))

    def __contains__(self, name: str) -> bool:
        return header_key(name) in self._keys

    def first_missing(self, wanted: tuple[tuple[str, str], ...]) -> str | None:
        """The name of the first (key, name) in ``wanted`` whose field is absent, or None;
        the keys are lower-case full names, looked up as they are."""
        keys = self._keys
        for key, name in wanted:
            if key not in keys:
                return name
        return None

    @property
    def fields(self) -> list[HeaderField]:
        """The header fields in order (a copy: edit through add/set/remove)."""
        return [
            HeaderField(k, n.rstrip(" \t"), v.strip(" \t"), r)
            for k, (n, _, v), r in zip(self._keys, self._pairs, self._raws, strict=True)
        ]

    def copy_fields_to(
        self, dst: Message, *, skip: frozenset[str], skip_prefixes: tuple[str, ...] = ()
    ) -> None:
        """Append this message's fields to ``dst`` in order, as written (their original lines
        are reused when serializing), except those whose key is in ``skip`` or starts with
        one of ``skip_prefixes`` (a B2BUA copying end-to-end headers to the other leg)."""
        keys, pairs, raws = dst._keys, dst._pairs, dst._raws
        for key, pair, raw in zip(self._keys, self._pairs, self._raws, strict=True):
            if key in skip or (skip_prefixes and key.startswith(skip_prefixes)):
                continue
            keys.append(key)
            pairs.append(pair)
            raws.append(raw)
        dst._raw = None
        dst._cache.clear()

    def add(self, name: str, value: str, *, first: bool = False) -> None:
        """Add a field (at the top with ``first``, as for Via and Record-Route)."""
        key = header_key(name)
        pair = (name if name[0].isupper() else canonical_name(key), ":", value)
        if first:
            self._keys.insert(0, key)
            self._pairs.insert(0, pair)
            self._raws.insert(0, None)
        else:
            self._keys.append(key)
            self._pairs.append(pair)
            self._raws.append(None)
        self._raw = None
        if self._cache:  # what _touch does; a message being built has no views to drop
            self._touch(key)

    def _replace(self, index: int, value: str) -> None:
        self._pairs[index] = (self._pairs[index][0].rstrip(" \t"), ":", value)
        self._raws[index] = None

    def _delete(self, index: int) -> None:
        del self._keys[index], self._pairs[index], self._raws[index]

    def set(self, name: str, value: str) -> None:
        """Replace every field with this name by one field at the first one's position."""
        key = header_key(name)
        found = self._indices(key)
        if not found:
            self.add(name, value)
            return
        for i in reversed(found[1:]):
            self._delete(i)
        self._replace(found[0], value)
        self._touch(key)

    def remove(self, name: str) -> int:
        """Remove every field with this name; returns how many were removed."""
        key = header_key(name)
        found = self._indices(key)
        for i in reversed(found):
            self._delete(i)
        self._touch(key)
        return len(found)

    def pop_first_value(self, name: str) -> str | None:
        """Remove the first element of a list header (a response's top Via, RFC 3261 18.1.2)."""
        key = header_key(name)
        try:
            i = self._keys.index(key)
        except ValueError:
            return None
        value = self._pairs[i][2].strip(" \t")
        if "," not in value:
            self._delete(i)
            self._touch(key)
            return value
        parts = split_list(value)
        if len(parts) == 1:
            self._delete(i)
        else:
            self._replace(i, ", ".join(parts[1:]))
        self._touch(key)
        return parts[0]

    def set_top_via(self, via: Via) -> None:
        """Replace the first via-parm with an already parsed one (the SBC stamping received/
        rport, RFC 3581 4), keeping the parsed view instead of parsing the text again."""
        old = self._cache.get("via")
        checked = "vias-checked" in self._cache
        self.set_first_value("via", str(via))
        self._cache["top-via"] = via
        if isinstance(old, tuple) and old:
            self._cache["via"] = (via, *old[1:])
        if checked:  # the via-parms below the top one are unchanged
            self._cache["vias-checked"] = True

    def add_top_via(self, via: Via) -> None:
        """Add a via-parm on top (a proxy forwarding, RFC 3261 16.6 step 8), keeping the
        parsed view instead of parsing the text again."""
        self.add("Via", str(via), first=True)
        self._cache["top-via"] = via

    def _copy_fields_from(self, other: Message) -> None:
        self._keys = other._keys.copy()
        self._pairs = other._pairs.copy()
        self._raws = other._raws.copy()
        self._cache = other._cache.copy()  # parsed values are immutable: shared safely

    def set_first_value(self, name: str, value: str) -> None:
        """Replace the first element of a list header (e.g. stamp received/rport on the top Via)."""
        key = header_key(name)
        try:
            i = self._keys.index(key)
        except ValueError:
            self.add(name, value)
            return
        old = self._pairs[i][2].strip(" \t")
        if "," in old:
            parts = split_list(old)
            parts[0] = value
            value = ", ".join(parts)
        self._replace(i, value)
        self._touch(key)

    # -- typed views (parsed on first use, cached) -------------------------------------------
    # Each property looks in the cache itself and calls one helper on a miss: a message is
    # parsed for every packet and its routing headers are read once each, so the layers
    # between the attribute and the header's parse function are kept few.
    def release_views(self) -> None:
        """Drop the parsed header views (they are parsed again if read). A message kept only
        to be re-sent (by a finished transaction, for timer J's 32 s) then holds a few dozen
        fewer objects for the garbage collector to walk."""
        self._cache = {}

    def _view(self, key: str, what: str, parse: Callable[[Message], Any]) -> Any:
        """A typed header view: parsed by ``parse`` on first use, cached until the header
        changes; a malformed value raises ParseError naming the header."""
        v = self._cache.get(key, _MISSING)
        if v is _MISSING:
            try:
                v = parse(self)
            except ValueError as exc:
                raise ParseError(400, f"Bad {what}: {exc}", message=self) from None
            self._cache[key] = v
        return v

    def _parse_single(self, key: str, what: str, parse: Callable[[str], Any]) -> Any:
        """Parse and cache the view of a header allowed once (From, To, Call-ID, CSeq,
        Max-Forwards: RFC 3261 7.3.1 lets only list headers repeat); None if absent."""
        keys = self._keys
        n = keys.count(key)
        if n == 1:
            try:
                v = parse(self._pairs[keys.index(key)][2].strip(" \t"))
            except ValueError as exc:
                raise ParseError(400, f"Bad {what}: {exc}", message=self) from None
        elif n == 0:
            v = None
        else:
            raise ParseError(400, f"Bad {what}: more than one {what} header", message=self)
        self._cache[key] = v
        return v

    @property
    def top_via(self) -> Via | None:
        """The first via-parm (RFC 3261 18.2.2 routes responses by it); only it is parsed."""
        v = self._cache.get("top-via", _MISSING)
        if v is _MISSING:
            try:
                value = self._pairs[self._keys.index("via")][2].strip(" \t")
            except ValueError:
                v = None
            else:
                try:
                    v = parse_via_parm(split_list(value)[0] if "," in value else value)
                except ValueError as exc:
                    raise ParseError(400, f"Bad Via: {exc}", message=self) from None
            self._cache["top-via"] = v
        view: Via | None = v
        return view

    def check_vias(self) -> Via | None:
        """The top via-parm (``top_via``), after every via-parm was checked against the
        grammar (RFC 3261 25.1) in order, with the faults ``via`` would raise; only the top
        one is made a Via: the others are relayed as written."""
        top = self.top_via
        cache = self._cache
        if top is None or "via" in cache or "vias-checked" in cache:
            return top
        pairs = self._pairs
        first = True
        for i in self._indices("via"):
            value = pairs[i][2].strip(" \t")
            parts = split_list(value) if "," in value else [value]
            for part in parts[1:] if first else parts:
                try:
                    check_via_parm(part)
                except ValueError as exc:
                    raise ParseError(400, f"Bad Via: {exc}", message=self) from None
            first = False
        cache["vias-checked"] = True
        return top

    @property
    def via(self) -> tuple[Via, ...]:
        """Every via-parm, top first (RFC 3261 20.42)."""
        v: tuple[Via, ...] = self._view("via", "Via", _all_vias)
        return v

    @property
    def call_id(self) -> str | None:
        v = self._cache.get("call-id", _MISSING)
        if v is _MISSING:
            v = self._parse_single("call-id", "Call-ID", _check_call_id)
        view: str | None = v
        return view

    @property
    def cseq(self) -> CSeq | None:
        v = self._cache.get("cseq", _MISSING)
        if v is _MISSING:
            v = self._parse_single("cseq", "CSeq", parse_cseq)
        view: CSeq | None = v
        return view

    @property
    def from_(self) -> NameAddr | None:
        v = self._cache.get("from", _MISSING)
        if v is _MISSING:
            v = self._parse_single("from", "From", parse_name_addr)
        view: NameAddr | None = v
        return view

    @property
    def to(self) -> NameAddr | None:
        v = self._cache.get("to", _MISSING)
        if v is _MISSING:
            v = self._parse_single("to", "To", parse_name_addr)
        view: NameAddr | None = v
        return view

    def name_addrs(self, name: str) -> tuple[NameAddr, ...]:
        """Contact, Route, Record-Route, Path, Service-Route as parsed name-addrs."""
        key = header_key(name)
        v = self._cache.get(key, _MISSING)
        if v is _MISSING:
            v = self._parse_name_addrs(key)
        view: tuple[NameAddr, ...] = v
        return view

    def _parse_name_addrs(self, key: str) -> tuple[NameAddr, ...]:
        keys = self._keys
        n = keys.count(key)
        try:
            if n == 0:
                v: tuple[NameAddr, ...] = ()  # no field: no scan of the others
            elif n == 1:
                v = parse_name_addr_list(self._pairs[keys.index(key)][2].strip(" \t"))
            else:
                pairs = self._pairs
                v = tuple(
                    na
                    for i, k in enumerate(keys)
                    if k == key
                    for na in parse_name_addr_list(pairs[i][2].strip(" \t"))
                )
        except ValueError as exc:
            raise ParseError(400, f"Bad {canonical_name(key)}: {exc}", message=self) from None
        self._cache[key] = v
        return v

    @property
    def contact(self) -> tuple[NameAddr, ...]:
        v = self._cache.get("contact", _MISSING)
        if v is _MISSING:
            v = self._parse_name_addrs("contact")
        view: tuple[NameAddr, ...] = v
        return view

    @property
    def max_forwards(self) -> int | None:
        v = self._cache.get("max-forwards", _MISSING)
        if v is _MISSING:
            v = self._parse_single("max-forwards", "Max-Forwards", _parse_max_forwards)
        view: int | None = v
        return view

    @property
    def content_type(self) -> str | None:
        return self.get("content-type")

    def set_body(self, body: bytes, content_type: str | None = None) -> None:
        """Replace the body and keep Content-Length (and Content-Type) true."""
        self.body = body
        self.set("Content-Length", str(len(body)))
        if content_type is not None:
            self.set("Content-Type", content_type)
        elif not body:
            self.remove("content-type")
        self._raw = None

    # -- serialization -----------------------------------------------------------------------
    def start_line(self) -> str:
        raise NotImplementedError

    def __bytes__(self) -> bytes:
        if self._raw is not None:
            return self._raw
        raws = self._raws
        if not all(raws):  # "None in raws" without comparing None with every line
            lines = [self.start_line()]
            lines += [
                r if r is not None else f"{n}: {v}"
                for (n, _, v), r in zip(self._pairs, raws, strict=True)
            ]
            lines += ("", "")  # the CRLF ending the last field and the empty line
        else:
            # No field written by the SBC: every line is the one received, joined in C.
            lines = [self.start_line(), *raws, "", ""]  # type: ignore[list-item]
        data = "\r\n".join(lines).encode("utf-8", "surrogateescape") + self.body
        self._raw = data
        return data

    def to_bytes(self) -> bytes:
        return bytes(self)

    @property
    def is_request(self) -> bool:
        return False

    def transaction_method(self) -> str:
        raise NotImplementedError


class Request(Message):
    """A SIP request. ``uri`` is parsed from ``uri_text`` on first use."""

    __slots__ = ("_start", "_uri", "method", "uri_text")

    def __init__(
        self,
        method: str,
        uri: str | Uri,
        *,
        body: bytes = b"",
        version: str = "SIP/2.0",
        raw: bytes | None = None,
        start: str | None = None,
    ) -> None:
        super().__init__(body, version, raw)
        self.method = method
        if isinstance(uri, str):
            self.uri_text = uri
            self._uri: Uri | None = None
        else:
            self.uri_text = str(uri)
            self._uri = uri
        self._start = start

    @property
    def is_request(self) -> bool:
        return True

    @property
    def uri(self) -> Uri:
        if self._uri is None:
            try:
                self._uri = parse_uri(self.uri_text)
            except ValueError as exc:
                raise ParseError(400, f"Bad Request-URI: {exc}", message=self) from None
        return self._uri

    @uri.setter
    def uri(self, value: Uri) -> None:
        self._uri = value
        self.uri_text = str(value)
        self._start = None
        self._raw = None

    def start_line(self) -> str:
        if self._start is None:
            self._start = f"{self.method} {self.uri_text} {self.version}"
        return self._start

    def transaction_method(self) -> str:
        return self.method

    def copy(self) -> Request:
        """An independent copy to edit and forward (RFC 3261 16.6 step 1)."""
        uri = self._uri if self._uri is not None else self.uri_text
        new = Request(self.method, uri, body=self.body, version=self.version, raw=self._raw)
        new._start = self._start
        new._copy_fields_from(self)
        return new

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.uri_text}>"


class Response(Message):
    """A SIP response."""

    __slots__ = ("_start", "reason", "status")

    def __init__(
        self,
        status: int,
        reason: str,
        *,
        body: bytes = b"",
        version: str = "SIP/2.0",
        raw: bytes | None = None,
        start: str | None = None,
    ) -> None:
        super().__init__(body, version, raw)
        self.status = status
        self.reason = reason
        self._start = start

    def start_line(self) -> str:
        if self._start is None:
            self._start = f"{self.version} {self.status} {self.reason}"
        return self._start

    def copy(self) -> Response:
        """An independent copy to edit and forward (RFC 3261 16.7 step 9)."""
        new = Response(self.status, self.reason, body=self.body, version=self.version,
                       raw=self._raw, start=self._start)  # fmt: skip
        new._copy_fields_from(self)
        return new

    def transaction_method(self) -> str:
        cseq = self.cseq
        return cseq.method if cseq is not None else ""

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.reason}>"


_new_message = object.__new__
# Compiled by mypyc, Request and Response are native classes: only their constructors make
# one (a direct C call there, the keyword arguments resolved at build time), and
# object.__new__ refuses them.
_NATIVE_MESSAGE: Final = Request.__new__ is not object.__new__


def parsed_request(method: str, uri_text: str, version: str, start: str) -> Request:
    """What Request(method, uri_text, version=version, start=start) makes, for the parser
    (once per received request): slots set directly, no keyword-argument calls."""
    if _NATIVE_MESSAGE:
        return Request(method, uri_text, version=version, start=start)
    msg: Request = _new_message(Request)
    msg._keys = []
    msg._pairs = []
    msg._raws = []
    msg.body = b""
    msg.version = version
    msg._raw = None
    msg._cache = {}
    msg.method = method
    msg.uri_text = uri_text
    msg._uri = None
    msg._start = start
    return msg


def parsed_response(status: int, reason: str, version: str, start: str) -> Response:
    """What Response(status, reason, version=version, start=start) makes, for the parser."""
    if _NATIVE_MESSAGE:
        return Response(status, reason, version=version, start=start)
    msg: Response = _new_message(Response)
    msg._keys = []
    msg._pairs = []
    msg._raws = []
    msg.body = b""
    msg.version = version
    msg._raw = None
    msg._cache = {}
    msg.status = status
    msg.reason = reason
    msg._start = start
    return msg


# -- parsers of the typed views (module level: no closure per access) ------------------------


def _all_vias(msg: Message) -> tuple[Via, ...]:
    values = msg.field_values("via")
    if len(values) == 1 and "," not in values[0]:
        top = msg._cache.get("top-via")  # the usual single Via, parsed already: reuse it
        if top is not None:
            return (top,)
    vias = tuple(via for value in values for via in parse_via(value))
    if vias:
        msg._cache["top-via"] = vias[0]  # the same via-parm: top_via need not parse it again
    return vias


def _check_call_id(value: str) -> str:
    # Call-ID = word [ "@" word ] (RFC 3261 25.1): no whitespace, not empty.
    if not value or " " in value or "\t" in value:
        raise ValueError("malformed Call-ID")
    return value


def _parse_max_forwards(value: str) -> int:
    return parse_uint(value, limit=255, what="Max-Forwards")


# RFC 3261 21: default reason phrases for the codes the SBC sends itself.
REASON_PHRASES: dict[int, str] = {
    100: "Trying", 180: "Ringing", 181: "Call Is Being Forwarded", 182: "Queued",
    183: "Session Progress", 200: "OK", 202: "Accepted", 300: "Multiple Choices",
    301: "Moved Permanently", 302: "Moved Temporarily", 400: "Bad Request",
    401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
    406: "Not Acceptable", 407: "Proxy Authentication Required", 408: "Request Timeout",
    413: "Request Entity Too Large", 414: "Request-URI Too Long",
    415: "Unsupported Media Type", 416: "Unsupported URI Scheme", 420: "Bad Extension",
    421: "Extension Required", 423: "Interval Too Brief", 480: "Temporarily Unavailable",
    481: "Call/Transaction Does Not Exist", 482: "Loop Detected", 483: "Too Many Hops",
    484: "Address Incomplete", 486: "Busy Here", 487: "Request Terminated",
    488: "Not Acceptable Here", 491: "Request Pending", 500: "Server Internal Error",
    501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable",
    504: "Server Time-out", 505: "Version Not Supported", 513: "Message Too Large",
    600: "Busy Everywhere", 603: "Decline", 604: "Does Not Exist Anywhere",
    606: "Not Acceptable",
}  # fmt: skip

# RFC 3261 8.2.6.2: the fields a response copies from its request, as the SBC spells them.
_COPIED: Final = {"via": "Via", "from": "From", "to": "To", "call-id": "Call-ID", "cseq": "CSeq"}


def make_response(
    request: Request, status: int, reason: str | None = None, *, to_tag: str | None = None
) -> Response:
    """Build a response to ``request`` (RFC 3261 8.2.6.2).

    Via, From, Call-ID and CSeq are copied verbatim (so this also works for a request
    whose other headers are malformed); To is copied and gets ``to_tag`` if it has no tag
    and the response is not a 100 (RFC 3261 8.2.6.2, 16.2 note on 100 Trying).
    """
    resp = Response(status, reason or REASON_PHRASES.get(status, "Unknown"))
    # The fields are appended as add() would append them, without its per-field work (the
    # names are known, the new response has no cached views to drop).
    keys, pairs = resp._keys, resp._pairs
    tag = to_tag if status > 100 else None
    for key, (_, _, value) in zip(request._keys, request._pairs, strict=True):
        name = _COPIED.get(key)
        if name is not None:
            value = value.strip(" \t")
            if key == "to" and tag and _lacks_tag(request, value):
                value = f"{value};tag={tag}"
            keys.append(key)
            pairs.append((name, ":", value))
    keys.append("content-length")
    pairs.append(("Content-Length", ":", "0"))
    resp._raws = [None] * len(keys)
    return resp


def _lacks_tag(request: Request, to_value: str) -> bool:
    """Whether the request's To (``to_value``, its only To field) has no tag; the view
    parsed already is used if there is one (a malformed To: False, nothing is added)."""
    view = request._cache.get("to", _MISSING)
    if view is not _MISSING and view is not None:
        to: NameAddr = view
        return to.tag is None
    try:
        return parse_name_addr(to_value).tag is None
    except ValueError:
        return False
