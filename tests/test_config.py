"""Config schema: defaults, error key paths, collection of all errors, paths, IPv6."""

from __future__ import annotations

import dataclasses
import shutil
import socket
from pathlib import Path
from typing import get_args, get_origin, get_type_hints

import pytest

from sbc import __version__
from sbc.certs import generate_dev_certs
from sbc.config import (
    Backend,
    Config,
    ConfigError,
    HostPort,
    ListenUrl,
    load_config,
    parse_config,
)

REPO = Path(__file__).resolve().parent.parent


def errors_of(data: dict[str, object], **kw: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, source="sbc.toml", **kw)  # type: ignore[arg-type]
    assert str(info.value) == "\n".join(info.value.errors)
    return info.value.errors


def one_error(data: dict[str, object]) -> str:
    errors = errors_of(data)
    assert len(errors) == 1, errors
    return errors[0]


@pytest.fixture
def tls_files(tmp_path: Path) -> Path:
    generate_dev_certs(tmp_path / "certs", hostnames=[], ips=[])
    return tmp_path / "certs"


# --- defaults ----------------------------------------------------------------------------------


def test_empty_config_gives_defaults() -> None:
    c = parse_config({})
    assert c == Config()
    assert c.sbc.name == "sbc" and c.sbc.public_address is None
    assert [str(u) for u in c.access.listen] == ["udp://127.0.0.1:5060", "tcp://127.0.0.1:5060"]
    assert c.access.tls.certificate is None and c.access.tls.verify_clients is False
    assert c.access.tls.min_version == "1.2" and c.access.tls.ciphers is None
    assert [str(u) for u in c.core.listen] == ["udp://127.0.0.1:5080"]
    assert c.core.backends == ()
    assert c.media.address == "127.0.0.1" and c.media.ports == (20000, 30000)
    assert c.admin.listen == HostPort(host="127.0.0.1", port=8080)
    assert (c.sip.t1, c.sip.t2, c.sip.t4) == (0.5, 4.0, 5.0)
    assert c.sip.max_message_size == 65535 and c.sip.max_headers == 128
    assert c.sip.max_header_line == 8192 and c.sip.tcp_idle_timeout == 300.0
    assert c.sip.user_agent is None and c.sip.server_header == f"sbc/{__version__}"
    assert c.log.level == "info" and c.log.format == "text"


def test_values_are_converted() -> None:
    c = parse_config(
        {
            "sbc": {"name": "edge-1", "public_address": "sbc.example.net"},
            "core": {
                "backends": [
                    {"uri": "sip:127.0.0.1:5070;transport=udp"},
                    {"uri": "sip:core.example.net;transport=tcp", "weight": 0},
                ],
                "listen": ["udp://127.0.0.1:5080", "tcp://127.0.0.1:5080"],
            },
            "media": {"address": "::1", "ports": "40000-40100"},
            "admin": {"listen": "[::1]:9000"},
            "sip": {"t1": 1, "t2": 8, "user_agent": "edge"},
            "log": {"level": "debug", "format": "json"},
        }
    )
    assert c.core.backends == (
        Backend(uri="sip:127.0.0.1:5070;transport=udp", weight=1),
        Backend(uri="sip:core.example.net;transport=tcp", weight=0),
    )
    assert c.media.ports == (40000, 40100)
    assert c.admin.listen == HostPort(host="::1", port=9000)
    assert str(c.admin.listen) == "[::1]:9000"
    assert isinstance(c.sip.t1, float) and c.sip.t1 == 1.0
    assert c.sip.server_header == "edge"
    assert c.log.format == "json"


def test_config_is_frozen() -> None:
    c = parse_config({})
    with pytest.raises(AttributeError):
        c.sbc.name = "x"  # type: ignore[misc]


# --- listen URLs -------------------------------------------------------------------------------


def test_listen_urls_ipv4_and_ipv6() -> None:
    c = parse_config(
        {
            "access": {
                "listen": ["udp://127.0.0.1:5060", "TCP://[::1]:5060", "udp://[0:0::1]"],
            },
            "core": {"listen": ["tcp://0.0.0.0:0"]},
        }
    )
    udp4, tcp6, udp6 = c.access.listen
    assert udp4 == ListenUrl(transport="udp", host="127.0.0.1", port=5060)
    assert udp4.family == socket.AF_INET
    assert tcp6 == ListenUrl(transport="tcp", host="::1", port=5060)
    assert tcp6.family == socket.AF_INET6
    assert str(tcp6) == "tcp://[::1]:5060"
    assert udp6.host == "::1" and udp6.port == 5060  # normalized, default port
    assert c.core.listen[0].port == 0


def test_listen_url_parse_roundtrip() -> None:
    for text in ("udp://127.0.0.1:5060", "tls://[::1]:5061", "tcp://[2001:db8::1]:5080"):
        assert str(ListenUrl.parse(text)) == text
    assert ListenUrl.parse("tls://10.0.0.1").port == 5061


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://127.0.0.1:21", "scheme must be udp, tcp, tls, ws or wss"),
        ("ws://127.0.0.1:8080/sip", "must not have a path"),
        ("127.0.0.1:5060", 'must look like "udp://HOST:PORT"'),
        ("udp://::1:5060", "an IPv6 address must be in brackets"),
        ("udp://[::1:5060", "missing ']'"),
        ("udp://[127.0.0.1]:5060", "brackets must hold an IPv6 address"),
        ("udp://127.0.0.1:65536", "port must be 0-65535"),
        ("udp://127.0.0.1:x", "port must be a number"),
        ("udp://sbc.example.net:5060", "host must be an IP address"),
        ("udp://:5060", "missing host"),
    ],
)
def test_bad_listen_url(url: str, reason: str) -> None:
    error = one_error({"access": {"listen": ["udp://127.0.0.1:5060", url]}})
    assert error.startswith(f"sbc.toml: access.listen[1]: {reason}")
    assert error.endswith(f'got "{url}"')


def test_listen_must_be_an_array_and_not_empty() -> None:
    assert one_error({"access": {"listen": "udp://127.0.0.1:5060"}}).startswith(
        "sbc.toml: access.listen: must be an array"
    )
    assert one_error({"core": {"listen": []}}) == (
        "sbc.toml: core.listen: must list at least one listen URL"
    )


def test_duplicate_listen_address() -> None:
    error = one_error(
        {
            "access": {"listen": ["udp://127.0.0.1:5060", "tcp://127.0.0.1:5060"]},
            "core": {"listen": ["udp://127.0.0.1:5060"]},
        }
    )
    assert error == (
        "sbc.toml: core.listen[0]: duplicate listen address udp 127.0.0.1:5060, "
        "already used by access.listen[0]"
    )


def test_tcp_and_tls_share_tcp_ports_and_admin_is_tcp(tls_files: Path) -> None:
    errors = errors_of(
        {
            "access": {
                "listen": ["tcp://[::1]:5061", "tls://[::1]:5061"],
                "tls": {
                    "certificate": str(tls_files / "server.pem"),
                    "private_key": str(tls_files / "server.key"),
                },
            },
            "admin": {"listen": "127.0.0.1:5080"},
            "core": {"listen": ["tcp://127.0.0.1:5080"]},
        }
    )
    assert errors == [
        "sbc.toml: access.listen[1]: duplicate listen address tcp [::1]:5061, "
        "already used by access.listen[0]",
        "sbc.toml: admin.listen: duplicate listen address tcp 127.0.0.1:5080, "
        "already used by core.listen[0]",
    ]


def test_port_zero_is_never_a_duplicate() -> None:
    parse_config({"access": {"listen": ["udp://127.0.0.1:0", "udp://127.0.0.1:0"]}})


# --- errors name the key path ------------------------------------------------------------------


def test_backend_weight_error_example() -> None:
    error = one_error(
        {"core": {"backends": [{"uri": "sip:10.0.0.1"}, {"uri": "sip:10.0.0.2", "weight": "x"}]}}
    )
    assert error == 'sbc.toml: core.backends[1].weight: must be an integer >= 0, got "x"'


def test_unknown_keys_are_named_with_allowed_ones() -> None:
    errors = errors_of({"acess": {}, "access": {"listne": []}, "core": {"backends": [{"url": 1}]}})
    assert errors == [
        "sbc.toml: acess: unknown key; allowed: sbc, access, core, media, admin, sip, log, registration, nat, calls, security, state, peers",
        "sbc.toml: access.listne: unknown key; allowed: listen, tls, websocket",
        "sbc.toml: core.backends[0].url: unknown key; allowed: uri, weight",
        "sbc.toml: core.backends[0].uri: required key is missing",
    ]


def test_odd_key_names_are_quoted() -> None:
    assert one_error({"log": {"a b": 1}}).startswith('sbc.toml: log."a b": unknown key')


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"sbc": "x"}, 'sbc: must be a table, got "x"'),
        ({"sbc": {"name": ""}}, 'sbc.name: must be a non-empty string, got ""'),
        ({"sbc": {"name": 5}}, "sbc.name: must be a non-empty string, got 5"),
        (
            {"sbc": {"public_address": "bad host"}},
            'sbc.public_address: must be an IP address or hostname, got "bad host"',
        ),
        (
            {"access": {"tls": {"verify_clients": "yes"}}},
            'access.tls.verify_clients: must be true or false, got "yes"',
        ),
        (
            {"access": {"tls": {"min_version": 1.3}}},
            'access.tls.min_version: must be one of "1.2", "1.3", got 1.3',
        ),
        (
            {"access": {"tls": {"min_version": "1.1"}}},
            'access.tls.min_version: must be one of "1.2", "1.3", got "1.1"',
        ),
        (
            {"core": {"backends": [{"uri": "http://10.0.0.1"}]}},
            'core.backends[0].uri: must start with sip: or sips:, got "http://10.0.0.1"',
        ),
        (
            {"core": {"backends": [{"uri": "sip:"}]}},
            'core.backends[0].uri: malformed sip URI, got "sip:"',
        ),
        (
            {"core": {"backends": [{"uri": "sip:10.0.0.1:99999"}]}},
            'core.backends[0].uri: port out of range in URI, got "sip:10.0.0.1:99999"',
        ),
        ({"core": {"backends": {"uri": "sip:a"}}}, "core.backends: must be an array"),
        (
            {"core": {"backends": [{"uri": "sip:a", "weight": -1}]}},
            "core.backends[0].weight: must be an integer >= 0, got -1",
        ),
        (
            {"core": {"backends": [{"uri": "sip:a", "weight": True}]}},
            "core.backends[0].weight: must be an integer >= 0, got true",
        ),
        (
            {"media": {"address": "localhost"}},
            'media.address: must be an IP address, got "localhost"',
        ),
        (
            {"media": {"ports": "30000-20000"}},
            'media.ports: low port must be below high port, got "30000-20000"',
        ),
        ({"media": {"ports": "20001-30000"}}, "media.ports: low port must be even"),
        ({"media": {"ports": "80-30000"}}, "media.ports: ports must be within 1024-65535"),
        ({"media": {"ports": "20000-70000"}}, "media.ports: ports must be within 1024-65535"),
        ({"media": {"ports": "20000"}}, 'media.ports: must be a port range "LOW-HIGH"'),
        ({"media": {"ports": [20000, 30000]}}, 'media.ports: must be a port range "LOW-HIGH"'),
        ({"admin": {"listen": "127.0.0.1"}}, 'admin.listen: missing port, got "127.0.0.1"'),
        ({"admin": {"listen": "::1:8080"}}, "admin.listen: an IPv6 address must be in brackets"),
        ({"sip": {"t1": 0}}, "sip.t1: must be a number > 0, got 0"),
        ({"sip": {"t4": "5"}}, 'sip.t4: must be a number > 0, got "5"'),
        ({"sip": {"t1": 1.0, "t2": 0.5}}, "sip.t2: must be >= t1 (1), got 0.5"),
        ({"sip": {"max_message_size": 100}}, "sip.max_message_size: must be an integer >= 1024"),
        ({"sip": {"max_headers": 1.5}}, "sip.max_headers: must be an integer >= 10, got 1.5"),
        (
            {"sip": {"max_header_line": 9000, "max_message_size": 4096}},
            "sip.max_header_line: must be <= max_message_size (4096), got 9000",
        ),
        ({"sip": {"tcp_idle_timeout": -1}}, "sip.tcp_idle_timeout: must be a number > 0"),
        ({"sip": {"user_agent": ""}}, "sip.user_agent: must be a non-empty string"),
        (
            {"log": {"level": "verbose"}},
            'log.level: must be one of "debug", "info", "warning", "error", got "verbose"',
        ),
        ({"log": {"format": "xml"}}, 'log.format: must be one of "text", "json", got "xml"'),
    ],
)
def test_error_names_key_path(data: dict[str, object], expected: str) -> None:
    assert one_error(data).startswith(f"sbc.toml: {expected}")


def test_all_errors_are_collected() -> None:
    errors = errors_of(
        {
            "sbc": {"name": 1},
            "access": {"listen": ["udp://x:1", "tcp://127.0.0.1:5060"], "extra": True},
            "core": {"backends": [{"uri": "sip:a", "weight": "x"}, {"weight": 2}]},
            "media": {"ports": "30000-20000"},
            "sip": {"t1": -1},
            "log": {"level": "loud"},
        }
    )
    assert [e.split(":")[1].strip() for e in errors] == [
        "sbc.name",
        "access.extra",
        "access.listen[0]",
        "core.backends[0].weight",
        "core.backends[1].uri",
        "media.ports",
        "sip.t1",
        "log.level",
    ]


# --- TLS and file paths ------------------------------------------------------------------------


def test_tls_listener_requires_certificate_and_key() -> None:
    errors = errors_of({"access": {"listen": ["tls://[::1]:5061"]}})
    assert errors == [
        "sbc.toml: access.tls.certificate: required by listener tls://[::1]:5061",
        "sbc.toml: access.tls.private_key: required by listener tls://[::1]:5061",
    ]


def test_verify_clients_requires_ca() -> None:
    assert one_error({"core": {"tls": {"verify_clients": True}}}) == (
        "sbc.toml: core.tls.ca: required when verify_clients = true"
    )


def test_missing_certificate_file_names_the_key(tmp_path: Path) -> None:
    errors = errors_of(
        {"access": {"tls": {"certificate": "nope.pem", "private_key": "", "ca": 5}}},
        base_dir=tmp_path,
    )
    assert errors == [
        f"sbc.toml: access.tls.certificate: file not found: {tmp_path / 'nope.pem'}",
        'sbc.toml: access.tls.private_key: must be a file path, got ""',
        "sbc.toml: access.tls.ca: must be a file path, got 5",
    ]


def test_relative_paths_resolve_against_config_dir(tls_files: Path, tmp_path: Path) -> None:
    conf_dir = tmp_path / "config"
    conf_dir.mkdir()
    path = conf_dir / "sbc.toml"
    path.write_text(
        '[access]\nlisten = ["tls://127.0.0.1:5061"]\n'
        '[access.tls]\ncertificate = "../certs/server.pem"\nprivate_key = "../certs/server.key"\n'
        f'ca = "{tls_files / "ca.pem"}"\nverify_clients = true\nmin_version = "1.3"\n'
        'ciphers = "ECDHE+AESGCM"\n'
    )
    c = load_config(path)
    assert c.access.tls.certificate == tls_files / "server.pem"
    assert c.access.tls.private_key == tls_files / "server.key"
    assert c.access.tls.ca == tls_files / "ca.pem"
    assert c.access.tls.certificate.is_absolute()
    assert c.access.tls.min_version == "1.3" and c.access.tls.ciphers == "ECDHE+AESGCM"


# --- files -------------------------------------------------------------------------------------


def test_load_config_reports_file_name(tmp_path: Path) -> None:
    path = tmp_path / "sbc.toml"
    path.write_text('[core]\n[[core.backends]]\nuri = "sip:10.0.0.1"\nweight = "x"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.errors == [
        f'{path}: core.backends[0].weight: must be an integer >= 0, got "x"'
    ]


def test_load_config_bad_toml_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[sbc\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: invalid TOML: "):
        load_config(path)
    with pytest.raises(ConfigError, match=r"missing\.toml: cannot read: No such file"):
        load_config(tmp_path / "missing.toml")


def test_default_config_file_loads(tmp_path: Path) -> None:
    (tmp_path / "config").mkdir()
    shutil.copy(REPO / "config" / "sbc.toml", tmp_path / "config" / "sbc.toml")
    generate_dev_certs(tmp_path / "certs", hostnames=[], ips=[])
    c = load_config(tmp_path / "config" / "sbc.toml")
    assert [str(u) for u in c.access.listen] == [
        "udp://127.0.0.1:5060",
        "tcp://127.0.0.1:5060",
        "tls://127.0.0.1:5061",
        "udp://[::1]:5060",
        "ws://127.0.0.1:8088",
        "wss://127.0.0.1:8443",
    ]
    assert c.access.tls.certificate == tmp_path / "certs" / "server.pem"
    assert c.access.tls.ca == tmp_path / "certs" / "ca.pem"
    assert [str(u) for u in c.core.listen] == ["udp://127.0.0.1:5080"]
    assert c.core.backends == ()  # no backend: the embedded registrar
    assert c.media.ports == (20000, 30000)
    assert str(c.admin.listen) == "127.0.0.1:8080"


def _is_section(tp: object) -> bool:
    return dataclasses.is_dataclass(tp) and not hasattr(tp, "parse")


def test_documentation_lists_every_key() -> None:
    doc = (REPO / "docs" / "configuration.md").read_text()

    def walk(cls: type, prefix: str) -> None:
        for name, tp in get_type_hints(cls).items():
            key = f"{prefix}.{name}" if prefix else name
            if _is_section(tp):
                assert f"[{key}]" in doc, f"docs/configuration.md misses section [{key}]"
                walk(tp, key)
            elif get_origin(tp) is tuple and _is_section(get_args(tp)[0]):
                assert f"[[{key}]]" in doc, f"docs/configuration.md misses [[{key}]]"
                walk(get_args(tp)[0], key)
            else:
                assert f"`{name}`" in doc, f"docs/configuration.md misses {key}"

    walk(Config, "")


# --- backend health, registration offload, NAT ----------------------------------


def test_issue3_defaults_and_values() -> None:
    c = parse_config({})
    assert (c.core.probe_interval, c.core.probe_failures, c.core.probe_successes) == (5.0, 3, 2)
    assert c.core.balance == "aor-hash"
    alive = c.core.alive_codes
    assert {200, 299, 404, 405} <= alive and not {100, 408, 500, 503} & alive
    assert (c.registration.client_expires.udp, c.registration.backend_expires) == (60, 3600)
    assert c.nat.keepalive_method == "options"
    c = parse_config(
        {
            "core": {"probe_reply_codes": ["200", "486-487"], "balance": "least-calls"},
            "registration": {"client_expires": {"tls": 600}, "backend_expires": 7200},
        }
    )
    assert c.core.alive_codes == frozenset({200, 486, 487})
    assert c.registration.client_expires.tls == 600 and c.registration.client_expires.udp == 60


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"core": {"probe_reply_codes": ["2xx"]}},
            "core.probe_reply_codes: must be a list of codes",
        ),
        ({"core": {"probe_reply_codes": ["299-200"]}}, "core.probe_reply_codes: must be a list"),
        ({"core": {"balance": "random"}}, "core.balance: must be one of"),
        ({"core": {"probe_failures": 0}}, "core.probe_failures: must be an integer >= 1"),
        (
            {"registration": {"backend_expires": 300, "client_expires": {"udp": 600}}},
            "registration.backend_expires: must be longer than every client_expires (600)",
        ),
        ({"registration": {"backend_spread": 1.5}}, "registration.backend_spread: must be below 1"),
        (
            {"registration": {"client_expires": {"sctp": 1}}},
            "registration.client_expires.sctp: unknown key",
        ),
        ({"nat": {"keepalive_method": "stun"}}, "nat.keepalive_method: must be one of"),
    ],
)
def test_issue3_errors_name_the_key(data: dict[str, object], expected: str) -> None:
    assert one_error(data).startswith(f"sbc.toml: {expected}")


def test_calls_section(tmp_path: Path) -> None:
    c = parse_config({})
    assert (c.calls.max_calls, c.calls.no_answer_timeout, c.calls.records) == (0, 180.0, None)
    out = tmp_path / "calls.jsonl"
    c = parse_config(
        {"calls": {"max_calls_per_source": 3, "strip_headers": ["P-*"], "records": str(out)}}
    )
    assert c.calls.max_calls_per_source == 3 and c.calls.strip_headers == ("P-*",)
    assert c.calls.records == out


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"calls": {"max_calls": -1}}, "calls.max_calls: must be an integer >= 0"),
        ({"calls": {"no_answer_timeout": 0}}, "calls.no_answer_timeout: must be"),
        ({"calls": {"strip_headers": ["bad name"]}}, "calls.strip_headers[0]: must be a header"),
        ({"calls": {"strip_headers": "P-*"}}, "calls.strip_headers: must be an array"),
        ({"calls": {"records": "/nonexistent-dir/x.jsonl"}}, "calls.records: directory not found"),
    ],
)
def test_calls_errors_name_the_key(data: dict[str, object], expected: str) -> None:
    assert one_error(data).startswith(f"sbc.toml: {expected}")


def test_peers(tls_files: Path) -> None:
    core = {
        "listen": ["udp://127.0.0.1:5080", "tls://127.0.0.1:5081"],
        "tls": {
            "certificate": str(tls_files / "server.pem"),
            "private_key": str(tls_files / "server.key"),
        },
    }
    peer = {
        "name": "partner",
        "uri": "sip:192.0.2.50:5061;transport=tls",
        "domains": ["partner.example"],
    }
    c = parse_config(
        {"core": core, "peers": [peer, {**peer, "name": "b", "domains": [], "prefixes": ["+4930"]}]}
    )
    assert [p.name for p in c.peers] == ["partner", "b"] and c.peers[1].prefixes == ("+4930",)


@pytest.mark.parametrize(
    ("peer", "expected"),
    [
        (
            {"name": "p", "uri": "sip:192.0.2.50:5060", "domains": ["x.example"]},
            "peers[0].uri: peering is over TLS",
        ),
        ({"name": "p", "uri": "sips:192.0.2.50"}, "peers[0].domains: a peer needs at least one"),
        (
            {"name": "p", "uri": "sips:192.0.2.50", "prefixes": ["12a"]},
            "peers[0].prefixes[0]: must be digits",
        ),
        (
            {"uri": "sips:192.0.2.50", "domains": ["x.example"]},
            "peers[0].name: required key is missing",
        ),
    ],
)
def test_peer_errors_name_the_key(peer: dict[str, object], expected: str) -> None:
    errors = errors_of({"peers": [peer]})
    assert any(e.startswith(f"sbc.toml: {expected}") for e in errors), errors


def test_peers_need_a_core_tls_listener() -> None:
    peer = {"name": "p", "uri": "sips:192.0.2.50", "domains": ["x.example"]}
    assert one_error({"peers": [peer]}) == (
        "sbc.toml: peers: peering needs a tls:// listener in core.listen (the SBC's side)"
    )


def test_a_backend_needs_a_core_listener_of_its_transport() -> None:
    backend = {"uri": "sip:192.0.2.5:5061;transport=tls"}
    assert one_error({"core": {"backends": [backend]}}) == (
        "sbc.toml: core.backends[0].uri: needs a tls:// listener in core.listen to reach it "
        "over TLS"
    )


# --- SIP over WebSocket ------------------------------------------------------------------------


def test_websocket_listeners_and_their_section(tls_files: Path) -> None:
    c = parse_config(
        {
            "access": {
                "listen": ["ws://127.0.0.1:5066", "wss://[::1]", "udp://127.0.0.1:5060"],
                "tls": {
                    "certificate": str(tls_files / "server.pem"),
                    "private_key": str(tls_files / "server.key"),
                },
                "websocket": {
                    "allowed_origins": ["https://Phone.example.com", "http://[::1]:8000"],
                    "max_message_size": 4096,
                    "ping_interval": 0,
                    "idle_timeout": 30.5,
                },
            }
        }
    )
    ws, wss, _ = c.access.listen
    assert (ws.transport, ws.port, ws.websocket) == ("ws", 5066, True)
    assert (wss.transport, wss.port, str(wss)) == ("wss", 443, "wss://[::1]:443")
    assert not c.access.listen[2].websocket
    w = c.access.websocket
    assert w.allowed_origins == ("https://Phone.example.com", "http://[::1]:8000")
    assert (w.max_message_size, w.ping_interval, w.idle_timeout) == (4096, 0.0, 30.5)
    defaults = parse_config({}).access.websocket
    assert defaults.allowed_origins == ()
    assert (defaults.max_message_size, defaults.ping_interval, defaults.idle_timeout) == (
        65535, 30.0, 120.0,
    )  # fmt: skip


def test_wss_listener_requires_the_access_certificate() -> None:
    assert errors_of({"access": {"listen": ["wss://127.0.0.1:7443"]}}) == [
        "sbc.toml: access.tls.certificate: required by listener wss://127.0.0.1:7443",
        "sbc.toml: access.tls.private_key: required by listener wss://127.0.0.1:7443",
    ]


def test_websocket_listeners_are_for_the_access_side_only() -> None:
    assert one_error({"core": {"listen": ["udp://127.0.0.1:5080", "ws://127.0.0.1:5066"]}}) == (
        "sbc.toml: core.listen[1]: WebSocket listeners are for clients: put "
        "ws://127.0.0.1:5066 in access.listen"
    )


def test_a_websocket_listener_shares_tcp_ports_with_the_others() -> None:
    assert one_error({"access": {"listen": ["tcp://127.0.0.1:5060", "ws://127.0.0.1:5060"]}}) == (
        "sbc.toml: access.listen[1]: duplicate listen address tcp 127.0.0.1:5060, "
        "already used by access.listen[0]"
    )


@pytest.mark.parametrize(
    ("websocket", "expected"),
    [
        (
            {"allowed_origins": ["phone.example.com"]},
            "access.websocket.allowed_origins[0]: must be an origin like "
            '"https://phone.example.com" (http or https, no path), got "phone.example.com"',
        ),
        (
            {"allowed_origins": ["https://phone.example.com/app"]},
            "access.websocket.allowed_origins[0]: must be an origin like "
            '"https://phone.example.com" (http or https, no path), got '
            '"https://phone.example.com/app"',
        ),
        (
            {"allowed_origins": ["https://bad_host!"]},
            "access.websocket.allowed_origins[0]: host must be an IP address or hostname, "
            'got "https://bad_host!"',
        ),
        (
            {"allowed_origins": "https://a.example"},
            "access.websocket.allowed_origins: must be an array",
        ),
        (
            {"max_message_size": 100},
            "access.websocket.max_message_size: must be an integer between 1024 and 16777216, got 100",
        ),
        ({"ping_interval": -1}, "access.websocket.ping_interval: must be a number >= 0, got -1"),
        ({"idle_timeout": 0}, "access.websocket.idle_timeout: must be a number > 0, got 0"),
        (
            {"ping_interval": 60, "idle_timeout": 60},
            "access.websocket.ping_interval: must be below idle_timeout (60) so that a live "
            "client's pong keeps it open, got 60",
        ),
        ({"origins": []}, "access.websocket.origins: unknown key; allowed: allowed_origins"),
    ],
)
def test_websocket_errors_name_the_key(websocket: dict[str, object], expected: str) -> None:
    assert one_error({"access": {"websocket": websocket}}).startswith(f"sbc.toml: {expected}")
