"""Config values: the grammars of the values a config holds (integers with bounds, host:port,
URIs, CIDRs, port and code ranges, codec lists, paths), each a parser that raises
``Invalid(reason)``, and the errors the config reports (``ConfigError``: every problem with
its key path)."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Final, Literal

from sbc.media.codec_policy import DEFAULT_CODECS
from sbc.media.control import TRANSCODABLE
from sbc.ownership import MAX_WORKERS
from sbc.sip.uri import SipUri, parse_uri

Transport = Literal["udp", "tcp", "tls", "ws", "wss"]
# SIP's ports (RFC 3261 19.1.2), and WebSocket's for ws/wss (RFC 6455 3; RFC 7118 names none).
_DEFAULT_PORTS: Final[dict[str, int]] = {
    "udp": 5060, "tcp": 5060, "tls": 5061, "ws": 80, "wss": 443,
}  # fmt: skip
_TRANSPORTS: Final[dict[str, Transport]] = {
    "udp": "udp", "tcp": "tcp", "tls": "tls", "ws": "ws", "wss": "wss",
}  # fmt: skip


class ConfigError(Exception):
    """All problems found in one config; ``errors`` holds one ``"<file>: <key>: <reason>"`` each."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


class Invalid(Exception):
    """Raised by a field parser; ``reason`` completes ``"<file>: <key>: "``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class _Ctx:
    base_dir: Path | None
    errors: list[tuple[str, str]] = field(default_factory=list)

    def error(self, path: str, reason: str) -> None:
        self.errors.append((path, reason))


Parser = Callable[[object, _Ctx], object]


def rule(parser: Parser) -> dict[str, Parser]:
    """Field metadata naming the parser for that field."""
    return {"parse": parser}


# --- value display and small parsers ---------------------------------------------------------


def _show(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        text = json.dumps(value, ensure_ascii=False, default=str)
        return text if len(text) <= 60 else "an array"
    return str(value)


def _is_int(raw: object) -> bool:
    return isinstance(raw, int) and not isinstance(raw, bool)


def integer(*, min: int | None = None, max: int | None = None) -> Parser:
    if min is not None and max is not None:
        what = f"an integer between {min} and {max}"
    elif min is not None:
        what = f"an integer >= {min}"
    elif max is not None:
        what = f"an integer <= {max}"
    else:
        what = "an integer"

    def parse(raw: object, ctx: _Ctx) -> int:
        if not _is_int(raw):
            raise Invalid(f"must be {what}, got {_show(raw)}")
        assert isinstance(raw, int)
        if (min is not None and raw < min) or (max is not None and raw > max):
            raise Invalid(f"must be {what}, got {_show(raw)}")
        return raw

    return parse


def worker_count(raw: object, ctx: _Ctx) -> int:
    """A number of processes, or "auto": one per CPU the process may run on."""
    if raw == "auto":
        return max(1, min(len(os.sched_getaffinity(0)), MAX_WORKERS))
    if not _is_int(raw) or not 1 <= raw <= MAX_WORKERS:  # type: ignore[operator]
        raise Invalid(f'must be an integer between 1 and {MAX_WORKERS} or "auto", got {_show(raw)}')
    assert isinstance(raw, int)
    return raw


def number(*, gt: float | None = None, min: float | None = None) -> Parser:
    """Seconds and the like: int or float, returned as float."""
    what = "a number"
    if gt is not None:
        what += f" > {gt:g}"
    elif min is not None:
        what += f" >= {min:g}"

    def parse(raw: object, ctx: _Ctx) -> float:
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise Invalid(f"must be {what}, got {_show(raw)}")
        value = float(raw)
        if value != value or (gt is not None and value <= gt) or (min is not None and value < min):
            raise Invalid(f"must be {what}, got {_show(raw)}")
        return value

    return parse


def text(check: Callable[[str], str | None] | None = None, *, what: str = "a string") -> Parser:
    """Non-empty string; ``check`` returns a reason or None."""

    def parse(raw: object, ctx: _Ctx) -> str:
        if not isinstance(raw, str) or not raw:
            raise Invalid(f"must be {what}, got {_show(raw)}")
        if check is not None and (reason := check(raw)) is not None:
            raise Invalid(f"{reason}, got {_show(raw)}")
        return raw

    return parse


_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _is_hostname(value: str) -> bool:
    name = value[:-1] if value.endswith(".") else value
    return 0 < len(name) <= 253 and all(_LABEL.fullmatch(label) for label in name.split("."))


def ng_address(url: str) -> tuple[str, int] | None:
    """The (IP, port) of an rtpengine node's ng URL ``udp://IP:PORT`` (``[IPv6]``), or None."""
    scheme, sep, rest = url.partition("://")
    if scheme != "udp" or not sep:
        return None
    host, colon, port = rest.rpartition(":")
    if not colon or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return (host, int(port)) if _is_ip(host) else None


def redis_url_problem(url: str) -> str | None:
    """Why ``url`` is not a Redis URL the SBC can use (redis-py's forms: redis://,
    rediss:// with TLS, unix:// for a socket path), or None."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("redis", "rediss", "unix"):
        return "must be redis://HOST[:PORT][/DB], rediss://... (TLS) or unix:///PATH"
    if scheme == "unix":
        path = rest.partition("?")[0]
        return None if path.startswith("/") else "unix:// needs an absolute socket path"
    where, _, db = rest.partition("/")
    where = where.rpartition("@")[2]  # user:password@ is redis-py's to read
    db = db.partition("?")[0]
    if db and not db.isdigit():
        return f"the database must be a number, got {db!r}"
    try:
        host, _port = _split_host_port(where, default_port=6379)
    except ValueError as exc:
        return str(exc)
    if not (_is_ip(host) or _is_hostname(host)):
        return f"{host!r} is not an IP address or hostname"
    return None


def _check_ng_url(value: str) -> str | None:
    if ng_address(value) is None:
        return "must be udp://IP:PORT (the node's ng control socket, rtpengine listen-ng)"
    return None


def _check_ip(value: str) -> str | None:
    return None if _is_ip(value) else "must be an IP address"


def _check_host(value: str) -> str | None:
    return None if _is_ip(value) or _is_hostname(value) else "must be an IP address or hostname"


def _split_host_port(value: str, *, default_port: int | None) -> tuple[str, int]:
    """``host[:port]`` or ``[v6][:port]`` -> (host without brackets, port); ValueError(reason)."""
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise ValueError("missing ']' after IPv6 address")
        host, rest = value[1:end], value[end + 1 :]
        if not _is_ip(host) or ":" not in host:
            raise ValueError("brackets must hold an IPv6 address")
    else:
        if value.count(":") > 1:
            raise ValueError("an IPv6 address must be in brackets, e.g. [::1]:5060")
        host, colon, port_text = value.partition(":")
        rest = colon + port_text
    if not host:
        raise ValueError("missing host")
    if not rest:
        if default_port is None:
            raise ValueError("missing port")
        return host, default_port
    if not rest.startswith(":") or not rest[1:].isdigit() or not rest[1:].isascii():
        raise ValueError("port must be a number after ':'")
    port = int(rest[1:])
    if port > 65535:
        raise ValueError("port must be 0-65535")
    return host, port


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET


def _ip_literal(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        raise ValueError("host must be an IP address (IPv6 in brackets)") from None


def _path(raw: object, ctx: _Ctx) -> Path:
    """A path from the config; relative paths are taken from the config file's directory."""
    if not isinstance(raw, str) or not raw:
        raise Invalid(f"must be a file path, got {_show(raw)}")
    path = Path(raw).expanduser()
    if not path.is_absolute():
        path = (ctx.base_dir or Path.cwd()) / path
    return Path(os.path.normpath(path))


def file_path(raw: object, ctx: _Ctx) -> Path:
    """Existing file; relative paths are taken from the config file's directory."""
    path = _path(raw, ctx)
    if not path.is_file():
        raise Invalid(f"file not found: {path}")
    return path


def port_range(raw: object, ctx: _Ctx) -> tuple[int, int]:
    if not isinstance(raw, str):
        raise Invalid(f'must be a port range "LOW-HIGH", got {_show(raw)}')
    m = re.fullmatch(r"\s*(\d{1,5})\s*-\s*(\d{1,5})\s*", raw)
    if m is None:
        raise Invalid(f'must be a port range "LOW-HIGH", got {_show(raw)}')
    low, high = int(m[1]), int(m[2])
    if not (1024 <= low <= 65535 and 1024 <= high <= 65535):
        raise Invalid(f"ports must be within 1024-65535, got {_show(raw)}")
    if low >= high:
        raise Invalid(f"low port must be below high port, got {_show(raw)}")
    if low % 2:
        raise Invalid(f"low port must be even (RTP uses even ports), got {_show(raw)}")
    return low, high


def code_ranges(raw: object, ctx: _Ctx) -> tuple[str, ...]:
    """SIP status codes as a list of "NNN" or "NNN-MMM" strings (100-699)."""
    if not isinstance(raw, list) or not raw:
        raise Invalid(f'must be a list of codes like ["200-299", "404"], got {_show(raw)}')
    out = []
    for item in raw:
        m = re.fullmatch(r"([1-6]\d\d)(?:-([1-6]\d\d))?", item) if isinstance(item, str) else None
        if m is None or (m[2] is not None and int(m[2]) < int(m[1])):
            raise Invalid(f'must be a list of codes like ["200-299", "404"], got {_show(raw)}')
        out.append(item)
    return tuple(out)


def codec_list(raw: object, ctx: _Ctx) -> tuple[str, ...]:
    """Transcodable codec names in order of preference, upper-cased."""
    names = ", ".join(f'"{n}"' for n in DEFAULT_CODECS)
    if not isinstance(raw, list) or not raw:
        raise Invalid(f"must be a list of codec names like [{names}], got {_show(raw)}")
    out: list[str] = []
    for item in raw:
        name = item.strip().upper() if isinstance(item, str) else ""
        if name == "TELEPHONE-EVENT":
            raise Invalid("telephone-event is not listed: it always passes (RFC 4733)")
        if name not in TRANSCODABLE:
            raise Invalid(f"{_show(item)} is not a codec the SBC transcodes; choose from {names}")
        if name in out:
            raise Invalid(f"codec {_show(item)} is listed twice")
        out.append(name)
    return tuple(out)


def sip_uri(raw: object, ctx: _Ctx) -> str:
    """A sip:/sips: URI, parsed with the SIP layer's own parser; kept as the string given.

    A host name is resolved (A/AAAA) when the SBC starts; RFC 3263 NAPTR/SRV is not done.
    """
    if not isinstance(raw, str):
        raise Invalid(f'must be a SIP URI like "sip:10.0.0.1:5060", got {_show(raw)}')
    try:
        uri = parse_uri(raw)
    except ValueError as exc:
        raise Invalid(f"{exc}, got {_show(raw)}") from None
    if not isinstance(uri, SipUri):
        raise Invalid(f"must start with sip: or sips:, got {_show(raw)}")
    if not (_is_ip(uri.host_bare) or _is_hostname(uri.host_bare)):
        raise Invalid(f"host must be an IP address or hostname, got {_show(raw)}")
    if uri.port == 0:
        raise Invalid(f"port must be 1-65535, got {_show(raw)}")
    transport = uri.transport
    if transport not in (None, "udp", "tcp", "tls"):
        raise Invalid(f"transport must be udp, tcp or tls, got {_show(raw)}")
    return raw


def origin_problem(value: str) -> str | None:
    """What is wrong with a web origin as a browser sends it in ``Origin`` (RFC 6454 6.2:
    ``scheme://host`` with an optional port, no path), or None."""
    scheme, sep, rest = value.partition("://")
    if not sep or scheme.lower() not in ("http", "https") or not rest or "/" in rest:
        return 'must be an origin like "https://phone.example.com" (http or https, no path)'
    try:
        host, _ = _split_host_port(rest, default_port=0)
    except ValueError as exc:
        return str(exc)
    if not (_is_ip(host) or _is_hostname(host)):
        return "host must be an IP address or hostname"
    return None


# --- value types -------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class ListenUrl:
    """``udp://127.0.0.1:5060``, ``tls://[::1]:5061``, ``wss://0.0.0.0:8443``; host is an IP
    literal, no brackets. ``ws``/``wss``: SIP over WebSocket (RFC 7118), access side only.

    Port 0 asks the OS for a free port (tests); the port defaults to 5060 (5061 for tls, 80
    for ws, 443 for wss).
    """

    transport: Transport
    host: str
    port: int

    noun: ClassVar[str] = 'a listen URL like "udp://127.0.0.1:5060"'

    @classmethod
    def parse(cls, value: str) -> ListenUrl:
        scheme, sep, rest = value.partition("://")
        if not sep:
            raise ValueError('must look like "udp://HOST:PORT"')
        t = _TRANSPORTS.get(scheme.lower())
        if t is None:
            raise ValueError("scheme must be udp, tcp, tls, ws or wss")
        if "/" in rest:
            raise ValueError("must not have a path (a WebSocket listener takes any path)")
        host, port = _split_host_port(rest, default_port=_DEFAULT_PORTS[t])
        return cls(transport=t, host=_ip_literal(host), port=port)

    @property
    def websocket(self) -> bool:
        """SIP over WebSocket (RFC 7118): ws, or wss (over TLS)."""
        return self.transport == "ws" or self.transport == "wss"

    @property
    def family(self) -> socket.AddressFamily:
        return _family(self.host)

    def __str__(self) -> str:
        return f"{self.transport}://{_bracket(self.host)}:{self.port}"


@dataclass(frozen=True, kw_only=True, slots=True)
class HostPort:
    """``127.0.0.1:8080`` or ``[::1]:8080``; host is an IP literal, no brackets."""

    host: str
    port: int

    noun: ClassVar[str] = 'an address like "127.0.0.1:8080"'

    @classmethod
    def parse(cls, value: str) -> HostPort:
        host, port = _split_host_port(value, default_port=None)
        return cls(host=_ip_literal(host), port=port)

    @property
    def family(self) -> socket.AddressFamily:
        return _family(self.host)

    def __str__(self) -> str:
        return f"{_bracket(self.host)}:{self.port}"


def output_path(raw: object, ctx: _Ctx) -> Path:
    """A file the SBC writes (appends to): its directory must exist; relative paths are taken
    from the config file's directory."""
    path = _path(raw, ctx)
    if not path.parent.is_dir():
        raise Invalid(f"directory not found: {path.parent}")
    if path.is_dir():
        raise Invalid(f"is a directory: {path}")
    return path


@dataclass(frozen=True, slots=True)
class Cidr:
    """An address or network for the access lists: ``"10.0.0.0/8"``, ``"192.0.2.7"``,
    ``"2001:db8::/32"`` (host bits set are refused: a typo, not a network)."""

    network: ipaddress.IPv4Network | ipaddress.IPv6Network

    noun: ClassVar[str] = 'an address or network like "10.0.0.0/8"'

    @classmethod
    def parse(cls, value: str) -> Cidr:
        try:
            return cls(ipaddress.ip_network(value.strip(), strict=True))
        except ValueError as exc:
            raise ValueError(f"not an address or network ({exc})") from None

    def __str__(self) -> str:
        return str(self.network)
