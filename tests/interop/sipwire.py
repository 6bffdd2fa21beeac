"""Raw SIP over sockets for the interop tests: build a request, read one response.

Deliberately independent of the ``sbc`` package: the tests must judge the SBC's bytes with
their own eyes, not with the parser under test.
"""

from __future__ import annotations

import re
import secrets
import socket
import time
from dataclasses import dataclass, field

# RFC 3261 7.3.3 compact forms of the headers the tests read.
_COMPACT = {"v": "via", "f": "from", "t": "to", "i": "call-id", "l": "content-length"}
_STATUS_LINE = re.compile(rb"SIP/2\.0 (\d{3}) ([^\r\n]*)")


def hostport(host: str, port: int) -> str:
    """``127.0.0.1:5060`` or ``[::1]:5060`` (RFC 3261 25.1 IPv6reference)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def request(
    *,
    target: str,
    transport: str,
    local: tuple[str, int],
    method: str = "OPTIONS",
    call_id: str | None = None,
    cseq: str | None = None,
    max_forwards: str = "70",
    omit: tuple[str, ...] = (),
    extra: tuple[tuple[str, str], ...] = (),
    body: bytes = b"",
    content_length: str | None = None,
) -> bytes:
    """A request to ``sip:TARGET`` with a top Via asking for rport (RFC 3581).

    ``omit`` drops headers by name (to build a malformed request); ``content_length``
    overrides the computed value (to break stream framing).
    """
    tag = secrets.token_hex(4)
    call_id = call_id or f"{secrets.token_hex(8)}@interop"
    headers = [
        ("Via", f"SIP/2.0/{transport.upper()} {hostport(*local)};branch=z9hG4bK{tag};rport"),
        ("Max-Forwards", max_forwards),
        ("From", f"<sip:interop@{hostport(*local)}>;tag={tag}"),
        ("To", f"<sip:{target}>"),
        ("Call-ID", call_id),
        ("CSeq", cseq or f"1 {method}"),
        *extra,
        ("Content-Length", content_length if content_length is not None else str(len(body))),
    ]
    lines = [f"{method} sip:{target} SIP/2.0"]
    lines += [f"{name}: {value}" for name, value in headers if name not in omit]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass
class Response:
    status: int
    reason: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    raw: bytes = b""

    def get(self, name: str) -> str | None:
        """First value of header ``name`` (case-insensitive, compact forms understood)."""
        name = name.lower()
        for key, value in self.headers:
            key = key.lower()
            if _COMPACT.get(key, key) == name:
                return value
        return None


def parse_response(raw: bytes) -> Response:
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, f"no end of header section in {raw!r}"
    first, *lines = head.decode("utf-8", "replace").split("\r\n")
    match = _STATUS_LINE.fullmatch(first.encode())
    assert match, f"not a SIP response: {first!r}"
    headers = []
    for line in lines:
        if line[:1] in (" ", "\t") and headers:  # RFC 3261 7.3.1 folding
            headers[-1] = (headers[-1][0], headers[-1][1] + " " + line.strip())
            continue
        name, colon, value = line.partition(":")
        assert colon, f"malformed header line {line!r} in {raw!r}"
        headers.append((name.strip(), value.strip()))
    return Response(int(match[1]), match[2].decode(), headers, body, raw)


def udp_exchange(
    sock: socket.socket, dest: tuple[str, int], data: bytes, timeout: float = 2.0
) -> Response:
    """Send one datagram and return the first response that comes back."""
    sock.settimeout(timeout)
    sock.sendto(data, dest)
    reply, _ = sock.recvfrom(65535)
    return parse_response(reply)


def udp_socket(host: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    return sock


class StreamReader:
    """Reads SIP responses and keep-alive pongs from a TCP or TLS socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def _fill(self, deadline: float) -> bool:
        """Read more; False at end of stream."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"nothing complete within the timeout; have {self.buffer!r}")
        self.sock.settimeout(remaining)
        chunk = self.sock.recv(65535)
        self.buffer += chunk
        return bool(chunk)

    def read_exact(self, size: int, timeout: float = 2.0) -> bytes:
        deadline = time.monotonic() + timeout
        while len(self.buffer) < size:
            if not self._fill(deadline):
                break
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def response(self, timeout: float = 2.0) -> Response:
        """The next complete response, framed by Content-Length (RFC 3261 18.3)."""
        return parse_response(self.message(timeout))

    def message(self, timeout: float = 2.0) -> bytes:
        """The next complete message (request or response), framed by Content-Length."""
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self.buffer:
            if not self._fill(deadline):
                raise EOFError(f"connection closed; unframed bytes {self.buffer!r}")
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        lengths = [
            value.strip()
            for name, _, value in (line.partition(b":") for line in head.split(b"\r\n")[1:])
            if name.strip().lower() in (b"content-length", b"l")
        ]
        assert len(lengths) == 1, f"need one Content-Length on a stream: {head!r}"
        assert lengths[0].isdigit(), f"bad Content-Length on a stream: {head!r}"
        length = int(lengths[0])
        while len(rest) < length:
            if not self._fill(deadline):
                raise EOFError(f"connection closed inside a body: {self.buffer!r}")
            rest = self.buffer.partition(b"\r\n\r\n")[2]
        body, self.buffer = rest[:length], rest[length:]
        return head + b"\r\n\r\n" + body

    def at_eof(self, timeout: float = 2.0) -> bool:
        """True if the peer closes the connection (after any pending bytes) in time."""
        deadline = time.monotonic() + timeout
        try:
            while self._fill(deadline):
                pass
        except TimeoutError:
            return False
        except (ConnectionResetError, BrokenPipeError):
            return True
        return True
