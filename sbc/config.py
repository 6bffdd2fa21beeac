"""Typed configuration: TOML -> frozen dataclasses, checked by a small schema walker.

Each section is one dataclass. The walker maps TOML keys to fields by name and converts
values by field type (str, int, float, bool, Literal, X | None, tuple[X, ...], nested
dataclasses, classes with a ``parse(str)`` classmethod). A field may instead name its own
parser in its metadata (``field(metadata=rule(parser))``); a parser raises ``Invalid(reason)``.
Cross-field checks live in an optional ``check()`` method yielding ``(key, reason)``.

A new section is one dataclass plus one field on ``Config``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
import socket
import tomllib
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Final, Literal, Union, get_args, get_origin, get_type_hints

from sbc import __version__
from sbc.media.codec_policy import DEFAULT_CODECS
from sbc.media.control import TRANSCODABLE
from sbc.sdp.sdes import SUPPORTED_SUITES
from sbc.sip.uri import SipUri, parse_uri

__all__ = [
    "AccessConfig",
    "AdminConfig",
    "Backend",
    "Config",
    "ConfigError",
    "CoreConfig",
    "HostPort",
    "Invalid",
    "ListenUrl",
    "LogConfig",
    "MediaConfig",
    "SbcConfig",
    "SipConfig",
    "TlsConfig",
    "Transport",
    "file_path",
    "integer",
    "load_config",
    "number",
    "parse_config",
    "port_range",
    "rule",
    "sip_uri",
    "text",
]

Transport = Literal["udp", "tcp", "tls"]
_DEFAULT_PORTS: Final[dict[str, int]] = {"udp": 5060, "tcp": 5060, "tls": 5061}


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


# --- value types -------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class ListenUrl:
    """``udp://127.0.0.1:5060``, ``tls://[::1]:5061``; host is an IP literal, no brackets.

    Port 0 asks the OS for a free port (tests); the port defaults to 5060 (5061 for tls).
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
        transport = scheme.lower()
        if transport not in _DEFAULT_PORTS:
            raise ValueError("scheme must be udp, tcp or tls")
        host, port = _split_host_port(rest, default_port=_DEFAULT_PORTS[transport])
        t: Transport = "udp" if transport == "udp" else "tcp" if transport == "tcp" else "tls"
        return cls(transport=t, host=_ip_literal(host), port=port)

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


# --- sections ----------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class SbcConfig:
    name: str = field(default="sbc", metadata=rule(text(what="a non-empty string")))
    # Advertised to clients (Via/Record-Route/Contact); None: the listen address.
    public_address: str | None = field(default=None, metadata=rule(text(_check_host)))


@dataclass(frozen=True, kw_only=True, slots=True)
class TlsConfig:
    certificate: Path | None = field(default=None, metadata=rule(file_path))
    private_key: Path | None = field(default=None, metadata=rule(file_path))
    ca: Path | None = field(default=None, metadata=rule(file_path))
    verify_clients: bool = False
    min_version: Literal["1.2", "1.3"] = "1.2"
    ciphers: str | None = field(default=None, metadata=rule(text(what="an OpenSSL cipher string")))


def _listen_checks(listen: tuple[ListenUrl, ...], tls: TlsConfig) -> Iterator[tuple[str, str]]:
    if not listen:
        yield "listen", "must list at least one listen URL"
    tls_url = next((url for url in listen if url.transport == "tls"), None)
    if tls_url is not None:
        if tls.certificate is None:
            yield "tls.certificate", f"required by listener {tls_url}"
        if tls.private_key is None:
            yield "tls.private_key", f"required by listener {tls_url}"
    if tls.verify_clients and tls.ca is None:
        yield "tls.ca", "required when verify_clients = true"


@dataclass(frozen=True, kw_only=True, slots=True)
class AccessConfig:
    """Client-facing side."""

    listen: tuple[ListenUrl, ...] = (
        ListenUrl(transport="udp", host="127.0.0.1", port=5060),
        ListenUrl(transport="tcp", host="127.0.0.1", port=5060),
    )
    tls: TlsConfig = field(default_factory=TlsConfig)

    def check(self) -> Iterator[tuple[str, str]]:
        yield from _listen_checks(self.listen, self.tls)


@dataclass(frozen=True, kw_only=True, slots=True)
class Backend:
    uri: str = field(metadata=rule(sip_uri))
    weight: int = field(default=1, metadata=rule(integer(min=0)))


_DOMAIN = re.compile(r"[A-Za-z0-9.-]+")
_TLS_NAME = re.compile(r"[A-Za-z0-9.:-]+")
_PREFIX = re.compile(r"\+?[0-9*#]+")


@dataclass(frozen=True, kw_only=True, slots=True)
class Peer:
    """A peer SBC (SBC-to-SBC peering): calls whose Request-URI has one of
    ``domains`` as host, or a user part starting with one of ``prefixes``, go to ``uri``
    over TLS; requests from its address are taken as from a trusted peer."""

    name: str = field(metadata=rule(text(what="a non-empty string")))
    uri: str = field(metadata=rule(sip_uri))
    domains: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()
    # The name its certificate must carry (subject CN or subjectAltName);
    # unset: the host of ``uri`` as written.
    tls_name: str | None = None

    def check(self) -> Iterator[tuple[str, str]]:
        if self.tls_name is not None and not _TLS_NAME.fullmatch(self.tls_name):
            yield "tls_name", f"must be a host name or IP address, got {_show(self.tls_name)}"
        transport = _uri_transport(self.uri)
        if transport != "tls":
            yield "uri", f"peering is over TLS (sips: or ;transport=tls), got {transport}"
        for i, domain in enumerate(self.domains):
            if not _DOMAIN.fullmatch(domain):
                yield f"domains[{i}]", f"must be a domain name, got {_show(domain)}"
        for i, prefix in enumerate(self.prefixes):
            if not _PREFIX.fullmatch(prefix):
                yield f"prefixes[{i}]", f"must be digits (with an optional +), got {_show(prefix)}"
        if not self.domains and not self.prefixes:
            yield "domains", "a peer needs at least one domain or prefix to route to it"


def _uri_transport(uri_text: str) -> str:
    uri = parse_uri(uri_text)
    assert isinstance(uri, SipUri)
    return uri.transport or ("tls" if uri.secure else "udp")


@dataclass(frozen=True, kw_only=True, slots=True)
class CoreConfig:
    """Provider-facing side: backend SIP servers."""

    listen: tuple[ListenUrl, ...] = (ListenUrl(transport="udp", host="127.0.0.1", port=5080),)
    tls: TlsConfig = field(default_factory=TlsConfig)
    backends: tuple[Backend, ...] = ()
    # Backend health: OPTIONS probes, thresholds, codes that mean "alive".
    probe_interval: float = field(default=5.0, metadata=rule(number(gt=0)))
    probe_failures: int = field(default=3, metadata=rule(integer(min=1)))
    probe_successes: int = field(default=2, metadata=rule(integer(min=1)))
    probe_reply_codes: tuple[str, ...] = field(
        default=("200-299", "400-407", "409-499"), metadata=rule(code_ranges)
    )
    # A request relayed to a backend that gets no answer at all within this goes to the next.
    request_timeout: float = field(default=4.0, metadata=rule(number(gt=0)))
    # New dialogs: aor-hash | weighted-round-robin | least-calls (REGISTER always by AOR).
    balance: Literal["aor-hash", "weighted-round-robin", "least-calls"] = "aor-hash"

    def check(self) -> Iterator[tuple[str, str]]:
        yield from _listen_checks(self.listen, self.tls)
        have = {url.transport for url in self.listen}
        for i, backend in enumerate(self.backends):
            transport = _uri_transport(backend.uri)
            if transport not in have:
                yield (
                    f"backends[{i}].uri",
                    f"needs a {transport}:// listener in core.listen to reach it over "
                    f"{transport.upper()}",
                )

    @property
    def alive_codes(self) -> frozenset[int]:
        """The probe reply codes that count as alive, expanded."""
        codes: set[int] = set()
        for item in self.probe_reply_codes:
            low, _, high = item.partition("-")
            codes.update(range(int(low), int(high or low) + 1))
        return frozenset(codes)


@dataclass(frozen=True, kw_only=True, slots=True)
class ClientExpires:
    """Registration expiry the SBC gives clients, per transport (seconds)."""

    udp: int = field(default=60, metadata=rule(integer(min=10)))
    tcp: int = field(default=300, metadata=rule(integer(min=10)))
    tls: int = field(default=300, metadata=rule(integer(min=10)))


@dataclass(frozen=True, kw_only=True, slots=True)
class RegistrationConfig:
    """Registration offload: short expiry to clients, long to backends."""

    client_expires: ClientExpires = field(default_factory=ClientExpires)
    backend_expires: int = field(default=3600, metadata=rule(integer(min=60)))
    # Random spread of the backend expiry, as a fraction (0.1: 3240-3600 s), so that a restart
    # does not make every binding refresh at the same moment.
    backend_spread: float = field(default=0.1, metadata=rule(number(min=0)))

    def check(self) -> Iterator[tuple[str, str]]:
        if self.backend_spread >= 1:
            yield "backend_spread", f"must be below 1, got {self.backend_spread:g}"
        longest = max(self.client_expires.udp, self.client_expires.tcp, self.client_expires.tls)
        if self.backend_expires <= longest:
            yield (
                "backend_expires",
                f"must be longer than every client_expires ({longest}), got {self.backend_expires}",
            )


@dataclass(frozen=True, kw_only=True, slots=True)
class NatConfig:
    """Keep-alives towards clients behind NAT."""

    keepalive_interval: float = field(default=20.0, metadata=rule(number(gt=0)))
    keepalive_method: Literal["options", "crlf"] = "options"
    keepalive_failures: int = field(default=3, metadata=rule(integer(min=1)))


def output_path(raw: object, ctx: _Ctx) -> Path:
    """A file the SBC writes (appends to): its directory must exist; relative paths are taken
    from the config file's directory."""
    path = _path(raw, ctx)
    if not path.parent.is_dir():
        raise Invalid(f"directory not found: {path.parent}")
    if path.is_dir():
        raise Invalid(f"is a directory: {path}")
    return path


_HEADER_PATTERN = re.compile(r"[A-Za-z0-9!%'`.+_~-]+\*?")


@dataclass(frozen=True, kw_only=True, slots=True)
class CallsConfig:
    """Calls through the B2BUA."""

    max_calls: int = field(default=0, metadata=rule(integer(min=0)))  # 0: no limit
    max_calls_per_source: int = field(default=0, metadata=rule(integer(min=0)))
    no_answer_timeout: float = field(default=180.0, metadata=rule(number(gt=0)))
    max_duration: float = field(default=0.0, metadata=rule(number(min=0)))  # 0: no limit
    retry_after: int = field(default=5, metadata=rule(integer(min=1)))
    # SIGTERM: no new calls; calls in progress go on this long at most, then BYE. 0: BYE at
    # once.
    drain_timeout: float = field(default=30.0, metadata=rule(number(min=0)))
    # Header names removed from requests and responses in both directions; "P-*" matches
    # every header starting with "P-" (case-insensitive).
    strip_headers: tuple[str, ...] = ()
    records: Path | None = field(default=None, metadata=rule(output_path))
    # Header that tells the backends the client's real address (the backend trusts it: the
    # SBC removes it from what clients send). None: the backends see only the SBC.
    client_address_header: str | None = None

    def check(self) -> Iterator[tuple[str, str]]:
        header = self.client_address_header
        if header is not None and (header.endswith("*") or not _HEADER_PATTERN.fullmatch(header)):
            yield "client_address_header", f"must be a header name, got {_show(header)}"
        for i, name in enumerate(self.strip_headers):
            if not _HEADER_PATTERN.fullmatch(name):
                yield (
                    f"strip_headers[{i}]",
                    f"must be a header name, optionally ending in *, got {_show(name)}",
                )


SrtpPolicy = Literal["mandatory", "optional", "off"]
# SDES crypto-suites the relay can do (pylibsrtp's profiles; RFC 4568 6.2, RFC 7714 14.2).
SRTP_SUITES = tuple(SUPPORTED_SUITES)


@dataclass(frozen=True, kw_only=True, slots=True)
class MediaConfig:
    """The RTP/SRTP relay."""

    # Local address of the relay ports; access_address / core_address override it per side.
    address: str = field(default="127.0.0.1", metadata=rule(text(_check_ip)))
    access_address: str | None = field(default=None, metadata=rule(text(_check_ip)))
    core_address: str | None = field(default=None, metadata=rule(text(_check_ip)))
    # Written into the SDP sent to clients (the SBC's public IP, e.g. behind a 1:1 NAT);
    # None: the access address.
    advertise_address: str | None = field(default=None, metadata=rule(text(_check_ip)))
    ports: tuple[int, int] = field(default=(20000, 30000), metadata=rule(port_range))
    workers: int = field(default=0, metadata=rule(integer(min=0, max=64)))  # 0: one per core
    timeout: float = field(default=60.0, metadata=rule(number(gt=0)))  # no RTP: BYE
    latch_window: float = field(default=5.0, metadata=rule(number(gt=0)))
    access_srtp: SrtpPolicy = "optional"
    core_srtp: SrtpPolicy = "off"
    peer_srtp: SrtpPolicy = "optional"
    srtp_suites: tuple[str, ...] = ("AES_CM_128_HMAC_SHA1_80", "AES_CM_128_HMAC_SHA1_32")
    # true: an SDES offer's keys go end to end and the relay passes SRTP unchanged (the
    # parties protect their media from each other, the SBC only relays).
    srtp_passthrough: bool = False
    # Transcoding: the transcodable codecs each side may be offered, in order;
    # peers get core_codecs unless peer_codecs is set. Other codecs pass as offered.
    access_codecs: tuple[str, ...] = field(default=DEFAULT_CODECS, metadata=rule(codec_list))
    core_codecs: tuple[str, ...] = field(default=DEFAULT_CODECS, metadata=rule(codec_list))
    peer_codecs: tuple[str, ...] | None = field(default=None, metadata=rule(codec_list))
    # Calls with a transcoded stream at once; 0: no transcoding at all.
    max_transcoded_calls: int = field(default=100, metadata=rule(integer(min=0)))

    def check(self) -> Iterator[tuple[str, str]]:
        if not self.srtp_suites:
            yield "srtp_suites", "must list at least one crypto-suite"
        for i, suite in enumerate(self.srtp_suites):
            if suite not in SRTP_SUITES:
                yield (
                    f"srtp_suites[{i}]",
                    f"unsupported crypto-suite {_show(suite)}; supported: {', '.join(SRTP_SUITES)}",
                )
        pairs = (self.ports[1] - self.ports[0] + 1) // 2
        if pairs < 2 * max(self.workers, 1):
            yield "ports", f"range holds {pairs} RTP/RTCP port pairs; needs 2 per worker at least"


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


@dataclass(frozen=True, kw_only=True, slots=True)
class RateConfig:
    """A token bucket: ``rate`` per second (0: no limit), up to ``burst`` at once."""

    rate: float = field(default=0.0, metadata=rule(number(min=0)))
    burst: int = field(default=1, metadata=rule(integer(min=1)))


# The User-Agents of common SIP scanners, dropped without an answer.
SCANNER_AGENTS = ("friendly-scanner", "sipvicious", "sipcli", "VaxSIPUserAgent", "pplsip")


@dataclass(frozen=True, kw_only=True, slots=True)
class SecurityConfig:
    """The front door: access lists, flood and brute-force bans, rate limits."""

    # Trusted sources: never banned, rate limited, locked out or shed for overload (the
    # SBC's own monitoring, an enterprise NAT with many phones).
    allow: tuple[Cidr, ...] = ()
    access_allow: tuple[Cidr, ...] = ()  # empty: everyone may use the access side
    access_deny: tuple[Cidr, ...] = ()
    # The core side takes requests only from the backends and peers, and from these.
    core_allow: tuple[Cidr, ...] = ()
    user_agent_block: tuple[str, ...] = SCANNER_AGENTS
    # Flood bans in the manner of Kamailio's pike: more than pike_density packets from one
    # source within pike_window seconds bans it for ban_time seconds. 0: off.
    pike_window: float = field(default=2.0, metadata=rule(number(gt=0)))
    pike_density: int = field(default=200, metadata=rule(integer(min=0)))
    ban_time: float = field(default=300.0, metadata=rule(number(gt=0)))
    # Out-of-dialog requests per source, by method; over the bucket: 503 with Retry-After.
    register: RateConfig = field(default_factory=lambda: RateConfig(rate=20.0, burst=60))
    invite: RateConfig = field(default_factory=lambda: RateConfig(rate=10.0, burst=30))
    other: RateConfig = field(default_factory=lambda: RateConfig(rate=50.0, burst=100))
    # Failed authentications (credentials answered 401/407/403) within auth_window seconds:
    # per source it is banned, per user name the user is locked for ban_time. 0: off.
    auth_failures: int = field(default=5, metadata=rule(integer(min=0)))
    auth_user_failures: int = field(default=20, metadata=rule(integer(min=0)))
    auth_window: float = field(default=60.0, metadata=rule(number(gt=0)))
    max_connections_per_source: int = field(default=64, metadata=rule(integer(min=0)))
    tls_handshakes: RateConfig = field(default_factory=lambda: RateConfig(rate=10.0, burst=20))
    # The event loop this late (seconds) means overloaded: new out-of-dialog requests get
    # 503 with Retry-After for a while. 0: off.
    overload_lag: float = field(default=0.25, metadata=rule(number(min=0)))
    retry_after: int = field(default=5, metadata=rule(integer(min=1)))
    # The backends' ceiling: client REGISTERs relayed per second in all (re-REGISTERs the
    # SBC answers itself do not count); over it: 503 with Retry-After. rate 0: no ceiling.
    backend_register: RateConfig = field(default_factory=lambda: RateConfig(rate=500.0, burst=1000))
    max_sources: int = field(default=100_000, metadata=rule(integer(min=100)))


@dataclass(frozen=True, kw_only=True, slots=True)
class AdminConfig:
    listen: HostPort = HostPort(host="127.0.0.1", port=8080)


@dataclass(frozen=True, kw_only=True, slots=True)
class SipConfig:
    # RFC 3261 17.1.1.1 timer values, seconds.
    t1: float = field(default=0.5, metadata=rule(number(gt=0)))
    t2: float = field(default=4.0, metadata=rule(number(gt=0)))
    t4: float = field(default=5.0, metadata=rule(number(gt=0)))
    max_message_size: int = field(default=65535, metadata=rule(integer(min=1024)))
    max_headers: int = field(default=128, metadata=rule(integer(min=10)))
    max_header_line: int = field(default=8192, metadata=rule(integer(min=256)))
    tcp_idle_timeout: float = field(default=300.0, metadata=rule(number(gt=0)))
    # Server/User-Agent header value; None: "sbc/<version>".
    user_agent: str | None = field(default=None, metadata=rule(text(what="a non-empty string")))

    @property
    def server_header(self) -> str:
        return self.user_agent if self.user_agent is not None else f"sbc/{__version__}"

    def check(self) -> Iterator[tuple[str, str]]:
        if self.t2 < self.t1:
            yield "t2", f"must be >= t1 ({self.t1:g}), got {self.t2:g}"
        if self.max_header_line > self.max_message_size:
            yield (
                "max_header_line",
                f"must be <= max_message_size ({self.max_message_size}), "
                f"got {self.max_header_line}",
            )


@dataclass(frozen=True, kw_only=True, slots=True)
class LogConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


@dataclass(frozen=True, kw_only=True, slots=True)
class Config:
    sbc: SbcConfig = field(default_factory=SbcConfig)
    access: AccessConfig = field(default_factory=AccessConfig)
    core: CoreConfig = field(default_factory=CoreConfig)
    media: MediaConfig = field(default_factory=MediaConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    sip: SipConfig = field(default_factory=SipConfig)
    log: LogConfig = field(default_factory=LogConfig)
    registration: RegistrationConfig = field(default_factory=RegistrationConfig)
    nat: NatConfig = field(default_factory=NatConfig)
    calls: CallsConfig = field(default_factory=CallsConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    peers: tuple[Peer, ...] = ()

    def check(self) -> Iterator[tuple[str, str]]:
        if self.peers and not any(url.transport == "tls" for url in self.core.listen):
            yield "peers", "peering needs a tls:// listener in core.listen (the SBC's side)"
        # One socket per (kind, address): tcp and tls share TCP ports, admin is TCP too.
        seen: dict[tuple[str, str, int], str] = {}
        sockets: list[tuple[str, str, str, int]] = [
            (f"{side}.listen[{i}]", "udp" if url.transport == "udp" else "tcp", url.host, url.port)
            for side, section in (("access", self.access), ("core", self.core))
            for i, url in enumerate(section.listen)
        ]
        sockets.append(("admin.listen", "tcp", self.admin.listen.host, self.admin.listen.port))
        for key, kind, host, port in sockets:
            if port == 0:
                continue
            where = (kind, host, port)
            if where in seen:
                yield (
                    key,
                    (
                        f"duplicate listen address {kind} {_bracket(host)}:{port}, "
                        f"already used by {seen[where]}"
                    ),
                )
            else:
                seen[where] = key


# --- the walker --------------------------------------------------------------------------------

_FAILED: Final = object()
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _join(path: str, key: str) -> str:
    key = key if _BARE_KEY.fullmatch(key) else json.dumps(key, ensure_ascii=False)
    return f"{path}.{key}" if path else key


def _describe(tp: Any) -> str:
    noun = getattr(tp, "noun", None)
    if isinstance(noun, str):
        return noun
    if dataclasses.is_dataclass(tp):
        return "a table"
    return {str: "a string", bool: "true or false", int: "an integer", float: "a number"}.get(
        tp, str(tp)
    )


def _convert(tp: Any, raw: object, path: str, ctx: _Ctx) -> object:
    """Convert by type; errors go to ``ctx``, returning ``_FAILED``."""
    origin = get_origin(tp)
    args = get_args(tp)
    if origin in (Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"config walker cannot handle type {tp!r}")
        return _convert(rest[0], raw, path, ctx)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type) and not hasattr(tp, "parse"):
        return _build(tp, raw, path, ctx)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        if not isinstance(raw, list):
            each = _describe(args[0])
            ctx.error(path, f"must be an array, each item {each}, got {_show(raw)}")
            return _FAILED
        items = [_convert(args[0], item, f"{path}[{i}]", ctx) for i, item in enumerate(raw)]
        return _FAILED if any(item is _FAILED for item in items) else tuple(items)
    try:
        return _scalar(tp, raw)
    except Invalid as exc:
        ctx.error(path, exc.reason)
        return _FAILED


def _scalar(tp: Any, raw: object) -> object:
    if get_origin(tp) is Literal:
        if raw in get_args(tp) and type(raw) in {type(a) for a in get_args(tp)}:
            return raw
        allowed = ", ".join(_show(a) for a in get_args(tp))
        raise Invalid(f"must be one of {allowed}, got {_show(raw)}")
    if tp is bool:
        if isinstance(raw, bool):
            return raw
    elif tp is int:
        if _is_int(raw):
            return raw
    elif tp is float:
        if isinstance(raw, int | float) and not isinstance(raw, bool):
            return float(raw)
    elif tp is str:
        if isinstance(raw, str):
            return raw
    elif callable(getattr(tp, "parse", None)):
        if isinstance(raw, str):
            try:
                return tp.parse(raw)
            except ValueError as exc:
                raise Invalid(f"{exc}, got {_show(raw)}") from None
    else:
        raise TypeError(f"config walker cannot handle type {tp!r}")
    raise Invalid(f"must be {_describe(tp)}, got {_show(raw)}")


def _build(cls: type[Any], raw: object, path: str, ctx: _Ctx) -> object:
    """Build dataclass ``cls`` from a TOML table, then run its ``check()``."""
    if not isinstance(raw, Mapping):
        ctx.error(path, f"must be a table, got {_show(raw)}")
        return _FAILED
    fields = [f for f in dataclasses.fields(cls) if f.init]
    names = [f.name for f in fields]
    for key in raw:
        if key not in names:
            ctx.error(_join(path, str(key)), f"unknown key; allowed: {', '.join(names)}")
    hints = get_type_hints(cls)
    values: dict[str, object] = {}
    ok = True
    for f in fields:
        key_path = _join(path, f.name)
        if f.name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                ctx.error(key_path, "required key is missing")
                ok = False
            continue
        parser = f.metadata.get("parse")
        if parser is not None:
            try:
                value = parser(raw[f.name], ctx)
            except Invalid as exc:
                ctx.error(key_path, exc.reason)
                value = _FAILED
        else:
            value = _convert(hints[f.name], raw[f.name], key_path, ctx)
        if value is _FAILED:
            ok = False
        else:
            values[f.name] = value
    if not ok:
        return _FAILED
    obj = cls(**values)
    check = getattr(obj, "check", None)
    if check is not None:
        for key, reason in check():
            ctx.error(f"{path}.{key}" if path else key, reason)
    return obj


# --- entry points ------------------------------------------------------------------------------


def parse_config(
    data: Mapping[str, object], *, source: str = "<config>", base_dir: Path | None = None
) -> Config:
    """Validate already-decoded TOML; raise ConfigError listing every problem."""
    ctx = _Ctx(base_dir=base_dir)
    config = _build(Config, data, "", ctx)
    if ctx.errors or not isinstance(config, Config):
        raise ConfigError([f"{source}: {key}: {reason}" for key, reason in ctx.errors])
    return config


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML file; relative file paths inside are taken from its directory."""
    source = str(path)
    try:
        with open(path, "rb") as fp:
            data = tomllib.load(fp)
    except OSError as exc:
        raise ConfigError([f"{source}: cannot read: {exc.strerror or exc}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{source}: invalid TOML: {exc}"]) from None
    return parse_config(data, source=source, base_dir=Path(path).absolute().parent)
