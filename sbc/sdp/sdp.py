"""SDP session descriptions (RFC 4566) that parse and serialize back to the same octets.

Every line is kept as ``(type char, value)`` with its original text; only what is edited
is re-rendered, so an untouched body round-trips byte for byte (CRLF endings). Typed views
(``origin``, ``connection``, ``direction`` ...) are read from and written to those lines.
Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

MAX_BODY = 64 * 1024  # bytes; a larger body is refused (DoS guard, not an RFC limit)
MAX_MEDIA = 64  # m= lines

# RFC 3264 5.1 / RFC 4566 6: the direction attributes
DIRECTIONS = frozenset({"sendrecv", "sendonly", "recvonly", "inactive"})

Line = tuple[str, str]


class SdpError(ValueError):
    """A body that is not valid SDP; str() is the reason (fit for a 488/400 reason phrase)."""


@dataclass(slots=True)
class Origin:
    """RFC 4566 5.2: o=<username> <sess-id> <sess-version> <nettype> <addrtype> <address>."""

    username: str
    session_id: str
    version: int
    nettype: str
    addrtype: str
    address: str

    @classmethod
    def parse(cls, value: str) -> Origin:
        fields = value.split()
        if len(fields) != 6:
            raise SdpError("o= line needs 6 fields")
        username, session_id, version, nettype, addrtype, address = fields
        if not version.isascii() or not version.isdigit():
            raise SdpError("o= sess-version is not a number")
        return cls(username, session_id, int(version), nettype, addrtype, address)

    def __str__(self) -> str:
        return (
            f"{self.username} {self.session_id} {self.version} "
            f"{self.nettype} {self.addrtype} {self.address}"
        )


def _parse_connection(value: str) -> tuple[str, str]:
    """RFC 4566 5.7: c=<nettype> <addrtype> <connection-address>; returns (addrtype, address)
    with any multicast /ttl[/count] suffix dropped."""
    fields = value.split()
    if len(fields) != 3:
        raise SdpError("c= line needs nettype, addrtype and address")
    return fields[1], fields[2].split("/", 1)[0]


def _attr_match(value: str, name: str) -> bool:
    """Whether an a= value is ``name`` (a flag) or ``name:...`` (RFC 4566 5.13)."""
    return value == name or (value.startswith(name) and value[len(name) : len(name) + 1] == ":")


def _attributes(lines: list[Line], name: str) -> list[str]:
    out: list[str] = []
    for kind, value in lines:
        if kind == "a" and _attr_match(value, name):
            out.append(value[len(name) + 1 :])
    return out


def _remove(lines: list[Line], name: str) -> None:
    lines[:] = [line for line in lines if not (line[0] == "a" and _attr_match(line[1], name))]


def _attribute_names(lines: list[Line]) -> set[str]:
    """The names of the a= lines (a=name or a=name:value, RFC 4566 5.13)."""
    return {value.partition(":")[0] for kind, value in lines if kind == "a"}


def _remove_all(lines: list[Line], names: Collection[str]) -> None:
    """Remove every a= line named in ``names`` in one pass; untouched when there is none."""
    if any(kind == "a" and value.partition(":")[0] in names for kind, value in lines):
        lines[:] = [
            line for line in lines if line[0] != "a" or line[1].partition(":")[0] not in names
        ]


def _direction(lines: list[Line]) -> str | None:
    for kind, value in lines:
        if kind == "a" and value in DIRECTIONS:
            return value
    return None


def _set_direction(lines: list[Line], value: str) -> None:
    """Replace the first direction flag in place (dropping any others), else append one."""
    if value not in DIRECTIONS:
        raise ValueError(f"not an SDP direction: {value!r}")
    out: list[Line] = []
    done = False
    for line in lines:
        if line[0] == "a" and line[1] in DIRECTIONS:
            if not done:
                out.append(("a", value))
                done = True
            continue
        out.append(line)
    if not done:
        out.append(("a", value))
    lines[:] = out


def _connection(lines: list[Line]) -> tuple[str, str] | None:
    for kind, value in lines:
        if kind == "c":
            return _parse_connection(value)
    return None


def _set_connection(lines: list[Line], conn: tuple[str, str] | None, before: str) -> None:
    """Replace the first c= line (dropping any others) or insert one after the leading lines
    whose types are in ``before``; None removes every c= line."""
    out: list[Line] = []
    done = conn is None
    for line in lines:
        if line[0] == "c":
            if not done and conn is not None:
                out.append(("c", f"IN {conn[0]} {conn[1]}"))
                done = True
            continue
        out.append(line)
    if not done and conn is not None:
        pos = 0
        while pos < len(out) and out[pos][0] in before:
            pos += 1
        out.insert(pos, ("c", f"IN {conn[0]} {conn[1]}"))
    lines[:] = out


@dataclass(slots=True)
class Media:
    """One media description, RFC 4566 5.14: m=<media> <port>[/<number>] <proto> <fmt> ...

    ``lines`` holds every line after the m= line in order (i=, c=, b=, k=, a= ...).
    """

    kind: str
    port: int
    port_count: int | None
    proto: str
    formats: list[str]
    lines: list[Line] = field(default_factory=list)
    # the m= value as received and what it parsed to: rendered unchanged while they agree
    _raw: tuple[str, tuple[str, int, int | None, str, tuple[str, ...]]] | None = field(
        default=None, repr=False, compare=False
    )

    @classmethod
    def parse_m(cls, value: str) -> Media:
        """Parse the value of an m= line (RFC 4566 5.14); raises SdpError without line number."""
        fields = value.split()
        if len(fields) < 3:
            raise SdpError("m= line needs port and proto")
        kind, port_text, proto, *formats = fields
        count_text: str | None = None
        if "/" in port_text:
            port_text, count_text = port_text.split("/", 1)
        if not (port_text.isascii() and port_text.isdigit()) or int(port_text) > 65535:
            raise SdpError("m= port must be a number 0-65535")
        count: int | None = None
        if count_text is not None:
            if not (count_text.isascii() and count_text.isdigit()) or int(count_text) < 1:
                raise SdpError("m= port count must be a positive number")
            count = int(count_text)
        media = cls(kind, int(port_text), count, proto, formats, [])
        media._raw = (value, media._key())
        return media

    def _key(self) -> tuple[str, int, int | None, str, tuple[str, ...]]:
        return (self.kind, self.port, self.port_count, self.proto, tuple(self.formats))

    def m_value(self) -> str:
        """The m= line value: the original text unless a field was changed."""
        if self._raw is not None and self._raw[1] == self._key():
            return self._raw[0]
        port = str(self.port) if self.port_count is None else f"{self.port}/{self.port_count}"
        return " ".join([self.kind, port, self.proto, *self.formats])

    def attributes(self, name: str) -> list[str]:
        """Values of every a=name:value line ("" for a flag a=name); RFC 4566 5.13."""
        return _attributes(self.lines, name)

    def has(self, name: str) -> bool:
        return any(kind == "a" and _attr_match(value, name) for kind, value in self.lines)

    def remove(self, name: str) -> None:
        """Remove every a=name and a=name:value line."""
        _remove(self.lines, name)

    def remove_all(self, names: Collection[str]) -> None:
        """Remove every a= line whose name is in ``names``."""
        _remove_all(self.lines, names)

    def attribute_names(self) -> set[str]:
        return _attribute_names(self.lines)

    def add(self, name: str, value: str | None = None) -> None:
        """Append a=name or a=name:value (a= lines come last in a media description)."""
        self.lines.append(("a", name if value is None else f"{name}:{value}"))

    @property
    def connection(self) -> tuple[str, str] | None:
        """(addrtype, address) of this media's c= line (RFC 4566 5.7), None if it has none."""
        return _connection(self.lines)

    @connection.setter
    def connection(self, conn: tuple[str, str] | None) -> None:
        # RFC 4566 5: media-level order is i=, c=, b=, k=, a=
        _set_connection(self.lines, conn, "i")

    def direction(self) -> str | None:
        """This media's direction flag (RFC 3264 5.1), None if it has none."""
        return _direction(self.lines)

    def set_direction(self, value: str) -> None:
        _set_direction(self.lines, value)


@dataclass(slots=True)
class Session:
    """A session description: the session-level lines and the media descriptions."""

    lines: list[Line]
    media: list[Media]

    @classmethod
    def parse(cls, data: bytes) -> Session:
        if len(data) > MAX_BODY:
            raise SdpError(f"SDP body larger than {MAX_BODY} bytes")
        text = data.decode("utf-8", errors="surrogateescape")
        raw = text.split("\n")
        # RFC 4566 5: records end in CRLF, a parser SHOULD also accept a bare LF
        raw = [line[:-1] if line.endswith("\r") else line for line in raw]
        while raw and raw[-1] == "":
            raw.pop()
        if not raw:
            raise SdpError("SDP body is empty")
        lines: list[Line] = []
        media: list[Media] = []
        target = lines
        seen: set[str] = set()
        for number, line in enumerate(raw, 1):
            kind, eq, value = line[:1], line[1:2], line[2:]
            if eq != "=" or not ("a" <= kind <= "z"):
                raise SdpError(f"SDP line {number}: not a type=value line")
            if number == 1 and line != "v=0":
                raise SdpError("SDP line 1: must be v=0")  # RFC 4566 5.1
            try:
                if kind == "m":  # RFC 4566 5.14
                    if len(media) == MAX_MEDIA:
                        raise SdpError(f"more than {MAX_MEDIA} m= lines")
                    media.append(Media.parse_m(value))
                    target = media[-1].lines
                    continue
                if kind == "c":
                    _parse_connection(value)
                if target is lines:
                    if kind in "vos" and kind in seen:
                        raise SdpError(f"more than one {kind}= line")
                    if kind == "o":
                        Origin.parse(value)
                    seen.add(kind)
            except SdpError as e:
                raise SdpError(f"SDP line {number}: {e}") from None
            target.append((kind, value))
        # RFC 4566 5: v=, o=, s= and at least one t= are required
        for kind in "ost":
            if kind not in seen:
                raise SdpError(f"SDP has no {kind}= line")
        return cls(lines, media)

    def __bytes__(self) -> bytes:
        out = [f"{kind}={value}\r\n" for kind, value in self.lines]
        for m in self.media:
            out.append(f"m={m.m_value()}\r\n")
            out.extend(f"{kind}={value}\r\n" for kind, value in m.lines)
        return "".join(out).encode("utf-8", errors="surrogateescape")

    @property
    def origin(self) -> Origin:
        """The o= line (RFC 4566 5.2)."""
        for kind, value in self.lines:
            if kind == "o":
                return Origin.parse(value)
        raise SdpError("SDP has no o= line")

    @origin.setter
    def origin(self, origin: Origin) -> None:
        for i, (kind, _) in enumerate(self.lines):
            if kind == "o":
                self.lines[i] = ("o", str(origin))
                return
        pos = 1 if self.lines and self.lines[0][0] == "v" else 0
        self.lines.insert(pos, ("o", str(origin)))

    @property
    def connection(self) -> tuple[str, str] | None:
        """(addrtype, address) of the session-level c= line (RFC 4566 5.7), None if none."""
        return _connection(self.lines)

    @connection.setter
    def connection(self, conn: tuple[str, str] | None) -> None:
        # RFC 4566 5: session-level order is v= o= s= i= u= e= p= c= b= t= r= z= k= a=
        _set_connection(self.lines, conn, "vosiuep")

    def attributes(self, name: str) -> list[str]:
        """Values of every session-level a=name:value line ("" for a flag a=name)."""
        return _attributes(self.lines, name)

    def has(self, name: str) -> bool:
        return any(kind == "a" and _attr_match(value, name) for kind, value in self.lines)

    def remove(self, name: str) -> None:
        _remove(self.lines, name)

    def remove_all(self, names: Collection[str]) -> None:
        """Remove every session-level a= line whose name is in ``names``."""
        _remove_all(self.lines, names)

    def attribute_names(self) -> set[str]:
        return _attribute_names(self.lines)

    def add(self, name: str, value: str | None = None) -> None:
        """Append a session-level a=name or a=name:value (last in the session section)."""
        self.lines.append(("a", name if value is None else f"{name}:{value}"))

    def direction(self) -> str | None:
        """The session-level direction flag (RFC 3264 5.1), None if there is none."""
        return _direction(self.lines)

    def set_direction(self, value: str) -> None:
        _set_direction(self.lines, value)

    def media_connection(self, m: Media) -> tuple[str, str] | None:
        """The media's c= if it has one, else the session's (RFC 4566 5.7)."""
        conn = m.connection
        return conn if conn is not None else self.connection

    def media_direction(self, m: Media) -> str:
        """Media flag, else session flag, else sendrecv (RFC 4566 6, RFC 3264 5.1)."""
        return m.direction() or self.direction() or "sendrecv"
