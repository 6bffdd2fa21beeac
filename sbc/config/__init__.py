"""Typed configuration: TOML -> frozen dataclasses, every error naming its key path.

- ``values``: the grammars of config values (bounded numbers, host:port, URIs, CIDRs,
  ranges, codec lists, paths) and ``ConfigError`` / ``Invalid``;
- ``walker``: the schema walker mapping TOML tables onto the dataclasses by field type;
- ``schema``: the sections, ``Config``, ``parse_config`` and ``load_config``.

Why a walker of our own and not pydantic, msgspec or attrs + cattrs: the walker is about
120 lines; the rest is the schema and the value grammars (SIP URIs with transports, CIDR
lists, port and status-code ranges, codec names, files that must exist), which any of
those libraries would need as custom validators too. What the walker gives that they would
have to be bent to give: errors phrased for an operator and collected all at once
(``core.backends[1].uri: not a SIP URI (...)``, tested word for word in tests/test_config.py
and the docs), TOML's own types without coercion (``"5"`` is not an integer), and no
dependency in the signalling process for it.
"""

from sbc.config.schema import (
    SCANNER_AGENTS,
    SRTP_SUITES,
    AccessConfig,
    AdminConfig,
    Backend,
    CallsConfig,
    ClientExpires,
    Config,
    CoreConfig,
    LogConfig,
    MediaConfig,
    NatConfig,
    Peer,
    RateConfig,
    RegistrationConfig,
    SbcConfig,
    SecurityConfig,
    SipConfig,
    SrtpPolicy,
    TlsConfig,
    load_config,
    parse_config,
)
from sbc.config.values import (
    Cidr,
    ConfigError,
    HostPort,
    Invalid,
    ListenUrl,
    Parser,
    Transport,
    code_ranges,
    codec_list,
    file_path,
    integer,
    number,
    output_path,
    port_range,
    rule,
    sip_uri,
    text,
)

__all__ = [
    "SCANNER_AGENTS",
    "SRTP_SUITES",
    "AccessConfig",
    "AdminConfig",
    "Backend",
    "CallsConfig",
    "Cidr",
    "ClientExpires",
    "Config",
    "ConfigError",
    "CoreConfig",
    "HostPort",
    "Invalid",
    "ListenUrl",
    "LogConfig",
    "MediaConfig",
    "NatConfig",
    "Parser",
    "Peer",
    "RateConfig",
    "RegistrationConfig",
    "SbcConfig",
    "SecurityConfig",
    "SipConfig",
    "SrtpPolicy",
    "TlsConfig",
    "Transport",
    "code_ranges",
    "codec_list",
    "file_path",
    "integer",
    "load_config",
    "number",
    "output_path",
    "parse_config",
    "port_range",
    "rule",
    "sip_uri",
    "text",
]
