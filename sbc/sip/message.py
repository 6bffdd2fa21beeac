"""SIP requests and responses (RFC 3261 section 7).

A message keeps its header fields in order, each with its exact original text, so an
unmodified message serializes back to the same octets. Typed views (``via``, ``cseq``,
``from_`` ...) are parsed on first use and cached; a malformed value raises ``ParseError``
carrying the status the SBC answers with (RFC 3261 8.2, 16.3).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from sbc.sip.headers import (
    LIST_HEADERS,
    CSeq,
    NameAddr,
    Via,
    canonical_name,
    header_key,
    parse_cseq,
    parse_name_addr,
    parse_name_addr_list,
    parse_uint,
    parse_via,
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


class HeaderField:
    """One header field line: key (lower-case full name), name as written, value, raw text."""

    __slots__ = ("key", "name", "raw", "value")

    def __init__(self, key: str, name: str, value: str, raw: str | None) -> None:
        self.key = key
        self.name = name
        self.value = value
        self.raw = raw  # exact original line(s) including folding; None once modified

    def __repr__(self) -> str:
        return f"HeaderField({self.name!r}, {self.value!r})"

    def line(self) -> str:
        return self.raw if self.raw is not None else f"{self.name}: {self.value}"


class Message:
    """Common part of requests and responses: ordered header fields and the body (bytes)."""

    __slots__ = ("_cache", "_raw", "body", "fields", "version")

    def __init__(self, fields: list[HeaderField], body: bytes, version: str, raw: bytes | None):
        self.fields = fields
        self.body = body
        self.version = version
        self._raw = raw  # the exact octets this message was parsed from, while unmodified
        self._cache: dict[str, Any] = {}

    # -- generic header access ------------------------------------------------------------
    def _touch(self, key: str) -> None:
        self._raw = None
        self._cache.pop(key, None)

    def get(self, name: str) -> str | None:
        """Value of the first field with this name (compact forms match), or None."""
        key = header_key(name)
        for f in self.fields:
            if f.key == key:
                return f.value
        return None

    def values(self, name: str) -> list[str]:
        """The values of every field with this name, list headers split at commas."""
        key = header_key(name)
        out: list[str] = []
        for f in self.fields:
            if f.key == key:
                if key in LIST_HEADERS:
                    out.extend(split_list(f.value))
                else:
                    out.append(f.value)
        return out

    def count(self, name: str) -> int:
        key = header_key(name)
        return sum(1 for f in self.fields if f.key == key)

    def __contains__(self, name: str) -> bool:
        key = header_key(name)
        return any(f.key == key for f in self.fields)

    def add(self, name: str, value: str, *, first: bool = False) -> None:
        """Add a field (at the top with ``first``, as for Via and Record-Route)."""
        key = header_key(name)
        f = HeaderField(key, name if name[0].isupper() else canonical_name(key), value, None)
        if first:
            self.fields.insert(0, f)
        else:
            self.fields.append(f)
        self._touch(key)

    def set(self, name: str, value: str) -> None:
        """Replace every field with this name by one field at the first one's position."""
        key = header_key(name)
        idx = next((i for i, f in enumerate(self.fields) if f.key == key), None)
        if idx is None:
            self.add(name, value)
            return
        keep = self.fields[idx]
        self.fields = [f for f in self.fields if f.key != key or f is keep]
        keep.value = value
        keep.raw = None
        self._touch(key)

    def remove(self, name: str) -> int:
        """Remove every field with this name; returns how many were removed."""
        key = header_key(name)
        before = len(self.fields)
        self.fields = [f for f in self.fields if f.key != key]
        self._touch(key)
        return before - len(self.fields)

    def pop_first_value(self, name: str) -> str | None:
        """Remove the first element of a list header (a response's top Via, RFC 3261 18.1.2)."""
        key = header_key(name)
        for i, f in enumerate(self.fields):
            if f.key == key:
                parts = split_list(f.value)
                head = parts[0]
                if len(parts) == 1:
                    del self.fields[i]
                else:
                    f.value = ", ".join(parts[1:])
                    f.raw = None
                self._touch(key)
                return head
        return None

    def set_first_value(self, name: str, value: str) -> None:
        """Replace the first element of a list header (e.g. stamp received/rport on the top Via)."""
        key = header_key(name)
        for f in self.fields:
            if f.key == key:
                parts = split_list(f.value)
                parts[0] = value
                f.value = ", ".join(parts)
                f.raw = None
                self._touch(key)
                return
        self.add(name, value)

    def __iter__(self) -> Iterator[HeaderField]:
        return iter(self.fields)

    # -- typed views ----------------------------------------------------------------------
    def _typed(self, key: str, what: str, parse: Any) -> Any:
        try:
            return self._cache[key]
        except KeyError:
            pass
        try:
            value = parse()
        except ValueError as exc:
            raise ParseError(400, f"Bad {what}: {exc}", message=self) from None
        self._cache[key] = value
        return value

    def _single(self, name: str) -> str | None:
        key = header_key(name)
        found = None
        for f in self.fields:
            if f.key == key:
                if found is not None:
                    raise ValueError(f"more than one {canonical_name(key)} header")
                found = f.value
        return found

    @property
    def via(self) -> tuple[Via, ...]:
        """Every via-parm, top first (RFC 3261 20.42)."""

        def parse() -> tuple[Via, ...]:
            out: tuple[Via, ...] = ()
            for f in self.fields:
                if f.key == "via":
                    out += parse_via(f.value)
            return out

        result: tuple[Via, ...] = self._typed("via", "Via", parse)
        return result

    @property
    def top_via(self) -> Via | None:
        v = self.via
        return v[0] if v else None

    @property
    def call_id(self) -> str | None:
        def parse() -> str | None:
            value = self._single("call-id")
            if value is not None and (not value or " " in value or "\t" in value):
                raise ValueError("malformed Call-ID")
            return value

        result: str | None = self._typed("call-id", "Call-ID", parse)
        return result

    @property
    def cseq(self) -> CSeq | None:
        def parse() -> CSeq | None:
            value = self._single("cseq")
            return None if value is None else parse_cseq(value)

        result: CSeq | None = self._typed("cseq", "CSeq", parse)
        return result

    def _name_addr(self, key: str, what: str) -> NameAddr | None:
        def parse() -> NameAddr | None:
            value = self._single(key)
            return None if value is None else parse_name_addr(value)

        result: NameAddr | None = self._typed(key, what, parse)
        return result

    @property
    def from_(self) -> NameAddr | None:
        return self._name_addr("from", "From")

    @property
    def to(self) -> NameAddr | None:
        return self._name_addr("to", "To")

    def name_addrs(self, name: str) -> tuple[NameAddr, ...]:
        """Contact, Route, Record-Route, Path, Service-Route as parsed name-addrs."""
        key = header_key(name)

        def parse() -> tuple[NameAddr, ...]:
            out: tuple[NameAddr, ...] = ()
            for f in self.fields:
                if f.key == key:
                    out += parse_name_addr_list(f.value)
            return out

        result: tuple[NameAddr, ...] = self._typed(key, canonical_name(key), parse)
        return result

    @property
    def contact(self) -> tuple[NameAddr, ...]:
        return self.name_addrs("contact")

    @property
    def max_forwards(self) -> int | None:
        def parse() -> int | None:
            value = self._single("max-forwards")
            return None if value is None else parse_uint(value, limit=255, what="Max-Forwards")

        result: int | None = self._typed("max-forwards", "Max-Forwards", parse)
        return result

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

    # -- serialization --------------------------------------------------------------------
    def start_line(self) -> str:
        raise NotImplementedError

    def __bytes__(self) -> bytes:
        if self._raw is not None:
            return self._raw
        head = "\r\n".join([self.start_line(), *(f.line() for f in self.fields)])
        data = (head + "\r\n\r\n").encode("utf-8", "surrogateescape") + self.body
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
        fields: list[HeaderField] | None = None,
        body: bytes = b"",
        version: str = "SIP/2.0",
        raw: bytes | None = None,
        start: str | None = None,
    ) -> None:
        super().__init__(fields if fields is not None else [], body, version, raw)
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
        fields: list[HeaderField] | None = None,
        body: bytes = b"",
        version: str = "SIP/2.0",
        raw: bytes | None = None,
        start: str | None = None,
    ) -> None:
        super().__init__(fields if fields is not None else [], body, version, raw)
        self.status = status
        self.reason = reason
        self._start = start

    def start_line(self) -> str:
        if self._start is None:
            self._start = f"{self.version} {self.status} {self.reason}"
        return self._start

    def transaction_method(self) -> str:
        cseq = self.cseq
        return cseq.method if cseq is not None else ""

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.reason}>"


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

_COPIED = ("via", "from", "to", "call-id", "cseq")


def make_response(
    request: Request, status: int, reason: str | None = None, *, to_tag: str | None = None
) -> Response:
    """Build a response to ``request`` (RFC 3261 8.2.6.2).

    Via, From, Call-ID and CSeq are copied verbatim (so this also works for a request
    whose other headers are malformed); To is copied and gets ``to_tag`` if it has no tag
    and the response is not a 100 (RFC 3261 8.2.6.2, 16.2 note on 100 Trying).
    """
    fields: list[HeaderField] = []
    for f in request.fields:
        if f.key in _COPIED:
            value = f.value
            if f.key == "to" and to_tag and status > 100 and _lacks_tag(value):
                value = f"{value};tag={to_tag}"
            fields.append(HeaderField(f.key, canonical_name(f.key), value, None))
    resp = Response(status, reason or REASON_PHRASES.get(status, "Unknown"), fields=fields)
    resp.fields.append(HeaderField("content-length", "Content-Length", "0", None))
    return resp


def _lacks_tag(to_value: str) -> bool:
    try:
        return parse_name_addr(to_value).tag is None
    except ValueError:
        return False
