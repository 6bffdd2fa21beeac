"""The config schema: one frozen dataclass per section, ``Config`` holding them, and
``parse_config`` / ``load_config``. A new section is one dataclass plus one field on
``Config``."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from sbc import __version__
from sbc.config.values import (
    Cidr,
    ConfigError,
    HostPort,
    ListenUrl,
    _bracket,
    _check_host,
    _check_ip,
    _check_ng_url,
    _Ctx,
    _show,
    code_ranges,
    codec_list,
    file_path,
    integer,
    number,
    origin_problem,
    output_path,
    port_range,
    redis_url_problem,
    rule,
    sip_uri,
    text,
    worker_count,
)
from sbc.config.walker import (
    _build,
)
from sbc.media.codec_policy import DEFAULT_CODECS
from sbc.sdp.sdes import SUPPORTED_SUITES
from sbc.sip.uri import SipUri, parse_uri

# --- sections ----------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class SbcConfig:
    name: str = field(default="sbc", metadata=rule(text(what="a non-empty string")))
    # Advertised to clients (Via/Record-Route/Contact); None: the listen address.
    public_address: str | None = field(default=None, metadata=rule(text(_check_host)))
    # Signalling worker processes behind the same access addresses; "auto": one per CPU.
    workers: int = field(default=1, metadata=rule(worker_count))


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
    # wss (RFC 7118 over TLS) takes the side's certificate as tls does.
    tls_url = next((url for url in listen if url.transport in ("tls", "wss")), None)
    if tls_url is not None:
        if tls.certificate is None:
            yield "tls.certificate", f"required by listener {tls_url}"
        if tls.private_key is None:
            yield "tls.private_key", f"required by listener {tls_url}"
    if tls.verify_clients and tls.ca is None:
        yield "tls.ca", "required when verify_clients = true"


@dataclass(frozen=True, kw_only=True, slots=True)
class WebSocketConfig:
    """SIP over WebSocket (RFC 7118) on the ws:// and wss:// access listeners."""

    # Origins (RFC 6454) whose pages may open a connection (compared case-insensitively);
    # empty: any (RFC 6455 10.2 leaves the policy to the server).
    allowed_origins: tuple[str, ...] = ()
    # One SIP message per WebSocket message (RFC 7118 4.2): a larger one closes with 1009.
    max_message_size: int = field(default=65535, metadata=rule(integer(min=1024, max=1 << 24)))
    # Seconds between two pings to a client (RFC 6455 5.5.2); 0: none.
    ping_interval: float = field(default=30.0, metadata=rule(number(min=0)))
    # Seconds without any frame from the client (a pong counts) before it is closed.
    idle_timeout: float = field(default=120.0, metadata=rule(number(gt=0)))

    def check(self) -> Iterator[tuple[str, str]]:
        for i, origin in enumerate(self.allowed_origins):
            problem = origin_problem(origin)
            if problem is not None:
                yield f"allowed_origins[{i}]", f"{problem}, got {_show(origin)}"
        if self.ping_interval and self.ping_interval >= self.idle_timeout:
            yield (
                "ping_interval",
                f"must be below idle_timeout ({self.idle_timeout:g}) so that a live client's "
                f"pong keeps it open, got {self.ping_interval:g}",
            )


@dataclass(frozen=True, kw_only=True, slots=True)
class AccessConfig:
    """Client-facing side."""

    listen: tuple[ListenUrl, ...] = (
        ListenUrl(transport="udp", host="127.0.0.1", port=5060),
        ListenUrl(transport="tcp", host="127.0.0.1", port=5060),
    )
    tls: TlsConfig = field(default_factory=TlsConfig)
    websocket: WebSocketConfig = field(default_factory=WebSocketConfig)

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
        for i, url in enumerate(self.listen):
            if url.websocket:
                yield (
                    f"listen[{i}]",
                    f"WebSocket listeners are for clients: put {url} in access.listen",
                )
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
MediaEngine = Literal["builtin", "rtpengine"]


@dataclass(frozen=True, kw_only=True, slots=True)
class RtpengineNode:
    """An rtpengine node the media goes to with ``engine = "rtpengine"``."""

    url: str = field(metadata=rule(text(_check_ng_url)))  # udp://IP:PORT, its listen-ng
    weight: int = field(default=1, metadata=rule(integer(min=0)))  # 0: a standby


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
    # Where the media goes: the SBC's own relay workers, or rtpengine nodes (ng protocol).
    engine: MediaEngine = "builtin"
    rtpengine: tuple[RtpengineNode, ...] = ()

    def check(self) -> Iterator[tuple[str, str]]:
        if self.engine == "rtpengine" and not self.rtpengine:
            yield "rtpengine", 'engine = "rtpengine" needs at least one [[media.rtpengine]] node'
        urls = [node.url for node in self.rtpengine]
        for i, url in enumerate(urls):
            if url in urls[:i]:
                yield f"rtpengine[{i}].url", f"{url} is listed twice"
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
    # The target delay (seconds) of the overload control: served later than this (event
    # loop lag, socket queue wait), the SBC refuses a share of new out-of-dialog requests
    # with 503 and Retry-After. 0: off.
    overload_lag: float = field(default=0.1, metadata=rule(number(min=0)))
    retry_after: int = field(default=5, metadata=rule(integer(min=1)))
    # The backends' ceiling: client REGISTERs relayed per second in all (re-REGISTERs the
    # SBC answers itself do not count); over it: 503 with Retry-After. rate 0: no ceiling.
    backend_register: RateConfig = field(default_factory=lambda: RateConfig(rate=500.0, burst=1000))
    max_sources: int = field(default=100_000, metadata=rule(integer(min=100)))


@dataclass(frozen=True, kw_only=True, slots=True)
class AdminConfig:
    listen: HostPort = HostPort(host="127.0.0.1", port=8080)  # noqa: RUF009 (frozen)


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


def _check_key_prefix(value: str) -> str | None:
    if not value or any(c.isspace() for c in value):
        return "must be a non-empty prefix without spaces"
    return None


@dataclass(frozen=True, kw_only=True, slots=True)
class StateConfig:
    """Where the state that outlives a restart lives (registrations, bindings, bans),
    shared by the SBC instances that name the same Redis and prefix. No url: in memory."""

    url: str | None = field(default=None, metadata=rule(text(redis_url_problem)))
    key_prefix: str = field(default="sbc:", metadata=rule(text(_check_key_prefix)))


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
    state: StateConfig = field(default_factory=StateConfig)
    peers: tuple[Peer, ...] = ()

    def check(self) -> Iterator[tuple[str, str]]:
        if self.peers and not any(url.transport == "tls" for url in self.core.listen):
            yield "peers", "peering needs a tls:// listener in core.listen (the SBC's side)"
        # One socket per (kind, address): tcp and tls share TCP ports, admin is TCP too.
        seen: dict[tuple[str, str, int], str] = {}
        workers = self.sbc.workers
        sockets: list[tuple[str, str, str, int]] = [
            (f"access.listen[{i}]", "udp" if url.transport == "udp" else "tcp", url.host, url.port)
            for i, url in enumerate(self.access.listen)
        ]
        # Each worker has a core address of its own: the listen port plus the worker index.
        for i, url in enumerate(self.core.listen):
            kind = "udp" if url.transport == "udp" else "tcp"
            if url.port and url.port + workers - 1 > 65535:
                yield (
                    f"core.listen[{i}]",
                    f"port {url.port} + {workers} workers goes past 65535 (worker i listens "
                    "on the port + i)",
                )
                continue
            for w in range(workers if url.port else 1):
                sockets.append((f"core.listen[{i}]", kind, url.host, url.port + w))
        if workers > 1:
            for i, url in enumerate(self.access.listen):
                if url.port == 0:
                    yield (
                        f"access.listen[{i}]",
                        f"port 0 cannot be shared by {workers} workers: give a port",
                    )
            pairs = (self.media.ports[1] - self.media.ports[0] + 1) // 2
            if pairs < 2 * max(self.media.workers, 1) * workers:
                yield (
                    "media.ports",
                    f"range holds {pairs} RTP/RTCP port pairs; {workers} workers need "
                    f"{2 * max(self.media.workers, 1) * workers} at least (each has a share)",
                )
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
