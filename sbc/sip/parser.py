"""Bytes to SIP messages: datagram parsing, stream framing by Content-Length, size limits.

RFC 3261 7 (message format), 7.3.1 (folding), 7.5 (leading CRLF), 18.3 (framing:
Content-Length on streams, datagram truncation), RFC 5626 3.5.1 (CRLF keep-alive).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from sbc.sip import grammar
from sbc.sip.headers import header_key
from sbc.sip.message import Message, ParseError, Request, parsed_request, parsed_response

__all__ = ["DEFAULT_LIMITS", "Limits", "ParseError", "StreamFramer", "parse_message"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Size limits; a message beyond them is answered 413 or 400 and not processed."""

    max_message_size: int = 65535
    max_headers: int = 128
    max_header_line: int = 8192


DEFAULT_LIMITS = Limits()

_KNOWN_KEYS: dict[str, str] = {}  # field name as written (maybe with trailing LWS) -> key


def _key_for(name: str) -> str | None:
    """Header key for a field name as written, or None if the name is not a token."""
    key = _KNOWN_KEYS.get(name)
    if key is not None:
        return key
    stripped = name.rstrip(" \t")
    if not stripped or not grammar.TOKEN_RE.fullmatch(stripped):
        return None
    key = header_key(stripped)
    if len(_KNOWN_KEYS) < 4096:
        _KNOWN_KEYS[name] = key
    return key


def _start_line(start: str) -> tuple[Message, bool]:
    """The message for a start line, and whether the line was malformed (requests only)."""
    if start[:4].upper() == "SIP/":
        m = grammar.STATUS_LINE_RE.fullmatch(start)
        if m is None:
            raise ParseError(0, "Malformed Status-Line")
        version, code, reason = m.groups()
        status = int(code)
        msg: Message = parsed_response(status, reason, version, start)
        if not 100 <= status <= 699:
            raise ParseError(0, "Status-Code out of range", message=msg)
        return msg, False
    m = _request_line(start)
    if m is None:
        # Keep going so the 400 can carry Via/From/To/Call-ID/CSeq (RFC 3261 8.2.6.2).
        return Request(start.split(" ", 1)[0], "", start=start), True
    method, uri, version = m.groups()
    return parsed_request(method, uri, version, start), False


_request_line = grammar.REQUEST_LINE_RE.fullmatch


def _parse_head(head: str, limits: Limits) -> Message:
    """Start line and header fields of a header section (no trailing CRLFCRLF)."""
    nl = head.find("\r\n")
    msg, bad_start = _start_line(head if nl < 0 else head[:nl])
    if nl >= 0:
        lines = head[nl + 2 :].split("\r\n")
        if len(lines) > limits.max_headers:
            raise ParseError(400, "Too Many Header Fields", message=msg)
        if len(head) > limits.max_header_line and max(map(len, lines)) > limits.max_header_line:
            raise ParseError(400, "Header Line Too Long", message=msg)
        if not _fields_fast(msg, lines):
            _fields_slow(msg, lines, limits.max_header_line)
    if bad_start:
        raise ParseError(400, "Malformed Request-Line", message=msg)
    crlf = head.count("\r\n")
    if head.count("\r") != crlf or head.count("\n") != crlf:
        # RFC 3261 7.3.1 / 25.1: a line ends with CRLF, and CR or LF appear nowhere else in
        # a header section (folding is CRLF followed by WSP). A bare CR or LF would be
        # passed on inside a value, and an element that also ends lines at a bare LF would
        # read a header the SBC never saw (header injection towards the backend).
        raise ParseError(400, "Bare CR or LF in Header", message=msg)
    if "\x00" in head and head.count("\x00") != head.count("\\\x00"):
        # RFC 3261 25.1: only a quoted-pair ("\" %x00-09 ...) may hold a NUL, as RFC 4475
        # 3.1.1.2 does in a display name; TEXT-UTF8char, tokens and URIs never do (a URI
        # escapes it as %00, RFC 4475 3.1.1.4). A bare NUL is refused: a backend written
        # in C would truncate the value at it.
        raise ParseError(400, "NUL in Header", message=msg)
    return msg


def _fields_fast(msg: Message, lines: list[str]) -> bool:
    """The common case: every line is ``name: value`` with a known name, no folding."""
    pairs = [line.partition(":") for line in lines]
    names = [p[0] for p in pairs if p[1]]
    if len(names) != len(pairs):
        # A line without a colon is malformed even if it is a known name ("Call-ID"):
        # the slow path says so (RFC 3261 7.3.1). Found by tests/test_fuzz.py.
        return False
    keys = list(map(_KNOWN_KEYS.get, names))
    # Keys are non-empty strings, so all() is "None not in keys" without comparing None
    # with every string.
    if not all(keys):
        return False  # an unknown name, a line without colon, or a continuation line
    msg._keys = keys  # type: ignore[assignment]  # no None left
    msg._pairs = pairs
    msg._raws = lines  # type: ignore[assignment]  # list[str] is a list[str | None] here
    return True


def _fields_slow(msg: Message, lines: list[str], max_line: int) -> None:
    """Every line checked; folded lines joined (RFC 3261 7.3.1); new names learned."""
    keys: list[str] = []
    pairs: list[tuple[str, str, str]] = []
    raws: list[str | None] = []
    msg._keys, msg._pairs, msg._raws = keys, pairs, raws  # partial fields for a 400
    for line in lines:
        if line[:1] in (" ", "\t"):
            # A continuation line; the CRLF plus whitespace is one LWS.
            if not keys:
                raise ParseError(400, "Continuation Line Without Header", message=msg)
            name, _, value = pairs[-1]
            pairs[-1] = (name, ":", (value + " " + line.strip(" \t")).strip(" \t"))
            raws[-1] = f"{raws[-1]}\r\n{line}"
            if len(raws[-1] or "") > max_line:
                raise ParseError(400, "Header Line Too Long", message=msg)
            continue
        name, colon, value = line.partition(":")
        key = _key_for(name) if colon else None
        if key is None:
            raise ParseError(400, "Malformed Header Line", message=msg)
        keys.append(key)
        pairs.append((name.rstrip(" \t"), ":", value.strip(" \t")))
        raws.append(line)


def _content_length(msg: Message) -> int | None:
    """The Content-Length value; a framing error if repeated, negative or not a number."""
    keys = msg._keys
    n = keys.count("content-length")
    if n == 0:
        return None
    if n > 1:
        raise ParseError(400, "Multiple Content-Length Values", message=msg, fatal=True)
    value = msg._pairs[keys.index("content-length")][2].strip(" \t")
    if not value.isdigit() or not value.isascii() or len(value) > 10:
        raise ParseError(400, "Bad Content-Length", message=msg, fatal=True)
    return int(value)


def parse_message(
    data: bytes, *, limits: Limits = DEFAULT_LIMITS, datagram: bool = True
) -> Message:
    """Parse one whole message, as it arrives in a UDP datagram (RFC 3261 18.3).

    Leading CRLFs are skipped (RFC 3261 7.5). Without Content-Length the body is the
    rest of the datagram; with it, extra octets are ignored (RFC 4475 3.1.1.8) and a
    shorter body is an error (RFC 4475 3.1.2.2). Raises ParseError.
    """
    if len(data) > limits.max_message_size:
        msg = _try_head(data, limits)
        raise ParseError(413, "Message Too Large", message=msg)
    if data[:2] == b"\r\n":
        data = data.lstrip(b"\r\n")
    end = data.find(b"\r\n\r\n")
    if end < 0:
        if not data.endswith(b"\r\n"):
            raise ParseError(400, "Header Section Not Terminated", message=_try_head(data, limits))
        # A datagram ends the message: accept a header section without the empty line.
        head_bytes, rest = data[:-2], b""
    else:
        head_bytes, rest = data[:end], data[end + 4 :]
    msg = _parse_head(head_bytes.decode("utf-8", "surrogateescape"), limits)
    length = _content_length(msg)
    if length is None:
        if not datagram:
            raise ParseError(400, "Missing Content-Length", message=msg, fatal=True)
        msg.body = rest
    elif length > len(rest):
        raise ParseError(400, "Content-Length Larger Than Message", message=msg)
    else:
        msg.body = rest[:length]
    if end >= 0 and length is not None and length == len(rest):
        msg._raw = data  # exact octets: re-serialising an untouched message is free
    return msg


def _try_head(data: bytes, limits: Limits) -> Message | None:
    """Best-effort header parse of an oversized or broken message, to answer it."""
    end = data.find(b"\r\n\r\n")
    head = data[: end if end >= 0 else min(len(data), limits.max_message_size)]
    head = head[: head.rfind(b"\r\n")] if end < 0 else head
    try:
        return _parse_head(
            head.decode("utf-8", "surrogateescape"),
            Limits(max_message_size=1 << 30, max_headers=1 << 16, max_header_line=1 << 30),
        )
    except ParseError as exc:
        return exc.message


class StreamFramer:
    """Frames messages on a TCP/TLS byte stream by Content-Length (RFC 3261 18.3).

    ``feed`` returns complete messages, ParseErrors, and ``KEEPALIVE`` for a CRLFCRLF
    ping (RFC 5626 3.5.1: answer it with CRLF). After a fatal error the stream cannot be
    resynchronised and the caller must close the connection.
    """

    KEEPALIVE: ClassVar[bytes] = b"\r\n\r\n"

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self._buf = bytearray()
        self._skip = 0  # body octets of an oversized message still to discard
        self.broken = False

    def feed(self, data: bytes) -> list[Message | ParseError | bytes]:
        if self.broken:
            return []
        self._buf += data
        out: list[Message | ParseError | bytes] = []
        buf = self._buf
        while buf:
            if self._skip:
                n = min(self._skip, len(buf))
                del buf[:n]
                self._skip -= n
                continue
            if buf[:2] == b"\r\n":
                # RFC 3261 7.5 / RFC 5626 3.5.1: CRLF before a start line; CRLFCRLF is a ping.
                if buf[:4] == b"\r\n\r\n":
                    del buf[:4]
                    out.append(self.KEEPALIVE)
                    continue
                if len(buf) < 4 and b"\r\n\r\n".startswith(buf):
                    break  # maybe the start of a ping: wait for more
                del buf[:2]
                continue
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > self.limits.max_message_size:
                    self.broken = True
                    out.append(ParseError(413, "Header Section Too Large", fatal=True))
                break
            if end + 4 > self.limits.max_message_size:
                # RFC 3261 21.4.11: 413, as parse_message answers the same octets in a
                # datagram (the fields are read leniently, only to form the answer).
                big = _try_head(bytes(buf[: end + 4]), self.limits)
                del buf[: end + 4]
                self._skip = _content_length_or_zero(big)
                out.append(ParseError(413, "Message Too Large", message=big))
                continue
            try:
                msg = _parse_head(bytes(buf[:end]).decode("utf-8", "surrogateescape"), self.limits)
                length = _content_length(msg)
                if length is None:
                    raise ParseError(400, "Missing Content-Length", message=msg, fatal=True)
            except ParseError as exc:
                if exc.fatal or exc.message is None:
                    # Without the header fields there is no Content-Length: framing is lost.
                    self.broken = True
                    exc.fatal = True
                    out.append(exc)
                    break
                # The header section is bad but framing survives: skip this message's body.
                length = _content_length_or_zero(exc.message)
                del buf[: end + 4]
                self._skip = length
                out.append(exc)
                continue
            total = end + 4 + length
            if total > self.limits.max_message_size:
                del buf[: end + 4]
                self._skip = length
                out.append(ParseError(413, "Message Too Large", message=msg))
                continue
            if len(buf) < total:
                break
            raw = bytes(buf[:total])
            del buf[:total]
            msg.body = raw[end + 4 :]
            msg._raw = raw
            out.append(msg)
        return out


def _content_length_or_zero(msg: Message | None) -> int:
    if msg is None:
        return 0
    try:
        return _content_length(msg) or 0
    except ParseError:
        return 0
