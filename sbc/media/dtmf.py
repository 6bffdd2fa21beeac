"""DTMF in SIP INFO bodies, sans-I/O: what the SBC reads from an INFO and
writes into one when it interworks with RFC 4733 telephone-events.

RFC 6086 defines the INFO method but no DTMF package body; the formats here are de-facto
ones, not RFCs:

- ``application/dtmf-relay`` (Cisco's, the most common): lines ``Signal=5`` and
  ``Duration=160`` (milliseconds), CRLF-separated, names case-insensitive;
- ``application/dtmf``: the digit alone (``5``), read but never written.

Digits are those of RFC 4733 3.2 (events 0-15: 0-9, *, #, A-D) and the flash (event 16),
written ``16`` (some senders write ``!``, read as the same).
"""

from __future__ import annotations

DTMF_RELAY = "application/dtmf-relay"
DTMF = "application/dtmf"
DEFAULT_MS = 250  # a body without Duration
MAX_MS = 10000  # RFC 4733 2.5.1.3: longer events are split; the SBC bounds what it is told

_DIGITS = {**{str(d): str(d) for d in range(10)}, "*": "*", "#": "#", "A": "A", "B": "B",
           "C": "C", "D": "D", "10": "*", "11": "#", "12": "A", "13": "B", "14": "C",
           "15": "D", "16": "16", "!": "16"}  # fmt: skip


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def is_dtmf(content_type: str | None) -> bool:
    return _media_type(content_type) in (DTMF_RELAY, DTMF)


def parse(content_type: str | None, body: bytes) -> tuple[str, int] | None:
    """(digit, duration in ms) of an INFO body in one of the formats above, None if it is
    not one (another package, an unknown signal, an unreadable body)."""
    kind = _media_type(content_type)
    try:
        text = body.decode("ascii")
    except UnicodeDecodeError:
        return None
    if kind == DTMF:
        digit = _DIGITS.get(text.strip().upper())
        return None if digit is None else (digit, DEFAULT_MS)
    if kind != DTMF_RELAY:
        return None
    fields: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        if sep:
            fields.setdefault(name.strip().lower(), value.strip())
    digit = _DIGITS.get(fields.get("signal", "").upper())
    if digit is None:
        return None
    duration = fields.get("duration", "")
    ms = int(duration) if duration.isascii() and duration.isdigit() else DEFAULT_MS
    return digit, min(max(ms, 1), MAX_MS)


def body(digit: str, duration_ms: int) -> bytes:
    """An ``application/dtmf-relay`` body."""
    return f"Signal={digit}\r\nDuration={duration_ms}\r\n".encode("ascii")
