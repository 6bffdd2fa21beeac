"""Test data helpers: the RFC 4475 / RFC 5118 torture messages (see tests/data/*/README.md)."""

from __future__ import annotations

import re
from pathlib import Path

DATA = Path(__file__).parent / "data"


def rfc4475(name: str) -> bytes:
    return (DATA / "rfc4475" / f"{name}.dat").read_bytes()


def rfc4475_names() -> list[str]:
    return sorted(p.stem for p in (DATA / "rfc4475").glob("*.dat"))


def rfc5118(name: str) -> bytes:
    """An RFC 5118 message made wire-ready as its README says: CRLF line ends, a final empty
    line where the archive lacks it, and Content-Length set to the real body length."""
    raw = (DATA / "rfc5118" / name).read_bytes().replace(b"\n", b"\r\n")
    if b"\r\n\r\n" not in raw:
        raw += b"\r\n"
    head, _, body = raw.partition(b"\r\n\r\n")
    head = re.sub(
        rb"(?im)^(Content-Length|l)[ \t]*:[ \t]*\d+", b"Content-Length: %d" % len(body), head
    )
    return head + b"\r\n\r\n" + body


def rfc5118_names() -> list[str]:
    return sorted(p.name for p in (DATA / "rfc5118").iterdir() if p.suffix != ".md")


def sip(text: str) -> bytes:
    """A message written with \\n line ends in a test, as wire bytes with CRLF."""
    return text.lstrip("\n").replace("\n", "\r\n").encode()
