"""The docker-compose lab, checked by parsing (these machines have no Docker engine):
docker/docker-compose.yml, the SBC config it mounts (docker/sbc.toml), the phones' baresip
files and the Dockerfiles agree with each other. `make lab` runs the same files in network
namespaces (tests/interop/lab.py)."""

from __future__ import annotations

import ipaddress
import re
import shlex
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from sbc.certs import generate_dev_certs
from sbc.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "docker-compose.yml"
SBC_MOUNT = "/opt/sbc/config/sbc.toml"
SBC_WORKDIR = "/opt/sbc"  # the Dockerfile's WORKDIR: the command's relative paths
PHONES = {"alice": 1000.0, "bob": 1500.0}
KAMAILIOS = ("kamailio1", "kamailio2")
KAMAILIO_PORT = 5060  # no -l: every address, port 5060
DOMAIN = "example.com"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = compose["services"]
    return result


def address(service: dict[str, Any], network: str) -> str:
    value: str = service["networks"][network]["ipv4_address"]
    return value


def binds(service: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Container path -> (source, mode) of each volume of a service."""
    out = {}
    for volume in service.get("volumes", []):
        source, target, *mode = volume.split(":")
        out[target] = (source, mode[0] if mode else "rw")
    return out


def command_text(service: dict[str, Any]) -> str:
    command = service["command"]
    return command if isinstance(command, str) else " ".join(command)


def gen_certs_args(sbc: dict[str, Any]) -> list[str]:
    match = re.search(r"\bsbc gen-certs ([^;|&]*)", command_text(sbc))
    assert match, command_text(sbc)
    return shlex.split(match[1])


@pytest.fixture(scope="module")
def sbc_config(services: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Config:
    """docker/sbc.toml loaded where the container has it, next to the certificates the
    container generates on its first start (the compose command's gen-certs)."""
    root = tmp_path_factory.mktemp("opt-sbc")
    (root / "config").mkdir()
    source, _ = binds(services["sbc"])[SBC_MOUNT]
    shutil.copy(DOCKER / source, root / "config" / "sbc.toml")
    args = gen_certs_args(services["sbc"])
    out = args[args.index("--out") + 1]
    ips = [args[i + 1] for i, a in enumerate(args) if a == "--ip"]
    names = [args[i + 1] for i, a in enumerate(args) if a == "--hostname"]
    generate_dev_certs(root / out, hostnames=names, ips=ips)
    return load_config(root / "config" / "sbc.toml")


# -- services and networks --------------------------------------------------------------------
def test_services(services: dict[str, Any]) -> None:
    assert set(services) == {"sbc", *KAMAILIOS, *PHONES}


def test_the_sbc_is_the_only_bridge(compose: dict[str, Any], services: dict[str, Any]) -> None:
    assert set(compose["networks"]) == {"access", "core"}
    on = {name: set(service["networks"]) for name, service in services.items()}
    assert [name for name, nets in on.items() if len(nets) > 1] == ["sbc"]
    assert on["sbc"] == {"access", "core"}
    for phone in PHONES:
        assert on[phone] == {"access"}, phone
    for kamailio in KAMAILIOS:
        assert on[kamailio] == {"core"}, kamailio
    # The core network has no way out but through the SBC.
    assert compose["networks"]["core"].get("internal") is True


def test_addresses_are_in_their_subnets_and_unique(
    compose: dict[str, Any], services: dict[str, Any]
) -> None:
    for network, spec in compose["networks"].items():
        subnet = ipaddress.ip_network(spec["ipam"]["config"][0]["subnet"])
        taken = [address(s, network) for s in services.values() if network in s["networks"]]
        assert len(taken) == len(set(taken)), taken
        for ip in taken:
            assert ipaddress.ip_address(ip) in subnet, (network, ip)


# -- mounts and builds ----------------------------------------------------------------------------
def test_every_referenced_file_exists(compose: dict[str, Any], services: dict[str, Any]) -> None:
    named = set(compose.get("volumes") or {})
    for name, service in services.items():
        build = service["build"]
        context = (DOCKER / build["context"]).resolve()
        assert context.is_dir(), (name, context)
        assert (context / build["dockerfile"]).is_file(), (name, build)
        for target, (source, mode) in binds(service).items():
            if source.startswith((".", "/")):
                assert (DOCKER / source).is_file(), (name, source)
                assert mode == "ro", (name, target)  # configs are read, never written
            else:
                assert source in named, (name, source)


def test_mounted_configs(services: dict[str, Any]) -> None:
    sbc = binds(services["sbc"])
    assert sbc[SBC_MOUNT] == ("./sbc.toml", "ro")
    assert sbc["/opt/sbc/certs"][0] == "certs"  # the Dockerfile's VOLUME
    for kamailio in KAMAILIOS:
        mounts = binds(services[kamailio])
        assert mounts["/etc/kamailio/kamailio.cfg"] == ("./kamailio/kamailio.cfg", "ro")
        assert "/etc/kamailio/kamailio.cfg" in services[kamailio]["command"]
    for phone in PHONES:
        mounts = binds(services[phone])
        assert mounts["/home/lab/.baresip/config"] == (f"./baresip/{phone}/config", "ro")
        assert mounts["/home/lab/.baresip/accounts"] == (f"./baresip/{phone}/accounts", "ro")
        assert mounts["/opt/certs"] == ("certs", "ro")


def test_dockerfile_slim_non_root_with_healthcheck() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^FROM python:[\d.]+-slim\b", text, re.M)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n?.*CMD", text, re.M)
    assert re.search(rf"^WORKDIR {SBC_WORKDIR}$", text, re.M)
    # The compiled build needs setup.py and a C compiler at install (README "Compiled build").
    assert re.search(r"^COPY .*\bsetup\.py\b", text, re.M)
    assert re.search(r"apt-get install .*\bgcc\b[\s\S]*pip install \.", text)
    peers = (DOCKER / "peers" / "Dockerfile").read_text()
    assert re.findall(r"^USER (\S+)", peers, re.M)[-1] not in ("root", "0")


# -- the SBC: its config agrees with the compose file ----------------------------------------------
def test_sbc_config_loads(sbc_config: Config) -> None:
    assert sbc_config.sbc.name == "sbc-lab"


def test_sbc_runs_the_mounted_config(services: dict[str, Any]) -> None:
    command = command_text(services["sbc"])
    assert re.search(r"exec sbc run --config config/sbc\.toml\b", command), command
    # Certificates where the config's relative paths point (../certs from config/), made on
    # the first start only, and valid for the address the phones connect to.
    assert re.search(r"\[ -f certs/server\.pem \] \|\| sbc gen-certs ", command), command
    args = gen_certs_args(services["sbc"])
    assert args[args.index("--out") + 1] == "certs"
    assert address(services["sbc"], "access") in args


def test_tls_files_are_the_generated_ones(sbc_config: Config) -> None:
    tls = sbc_config.access.tls
    for path, name in ((tls.certificate, "server.pem"), (tls.private_key, "server.key"),
                       (tls.ca, "ca.pem")):  # fmt: skip
        assert path is not None and path.name == name and path.parent.name == "certs", path


def test_listen_addresses_are_the_sbc_s(services: dict[str, Any], sbc_config: Config) -> None:
    access, core = address(services["sbc"], "access"), address(services["sbc"], "core")
    hosts = {url.host for url in sbc_config.access.listen}
    assert hosts == {access, "127.0.0.1"}  # loopback: the image's health check
    assert {url.host for url in sbc_config.core.listen} == {core}
    assert sbc_config.media.access_address == access
    assert sbc_config.media.core_address == core


def test_health_check_target_is_listened_on(sbc_config: Config) -> None:
    text = (DOCKER / "Dockerfile").read_text()
    assert 'sock.sendto(request.encode(), ("127.0.0.1", 5060))' in text
    assert any(
        (url.transport, url.host, url.port) == ("udp", "127.0.0.1", 5060)
        for url in sbc_config.access.listen
    )


def _container_ports(entries: list[str]) -> set[tuple[int, str]]:
    out = set()
    for entry in entries:
        port, _, proto = str(entry).rpartition(":")[2].partition("/")
        out.add((int(port), proto or "tcp"))
    return out


def test_published_and_exposed_ports_match_the_listeners(
    services: dict[str, Any], sbc_config: Config
) -> None:
    def kind(transport: str) -> str:
        return "udp" if transport == "udp" else "tcp"

    sbc = services["sbc"]
    access = address(sbc, "access")
    published = _container_ports(sbc["ports"])
    listening = {(u.port, kind(u.transport)) for u in sbc_config.access.listen if u.host == access}
    assert published == listening
    for entry in sbc["ports"]:  # on the host's loopback only
        assert str(entry).startswith("127.0.0.1:"), entry
    assert _container_ports(sbc["expose"]) == {
        (u.port, kind(u.transport)) for u in sbc_config.core.listen
    }


def test_backends_are_the_kamailio_services(services: dict[str, Any], sbc_config: Config) -> None:
    expected = {f"sip:{address(services[k], 'core')}:{KAMAILIO_PORT}" for k in KAMAILIOS}
    assert {b.uri for b in sbc_config.core.backends} == expected
    for kamailio in KAMAILIOS:
        service = services[kamailio]
        assert "-l" not in service["command"]  # every address, the default port
        assert _container_ports(service["expose"]) == {(KAMAILIO_PORT, "udp"),
                                                       (KAMAILIO_PORT, "tcp")}  # fmt: skip


def test_kamailios_share_their_location_table(services: dict[str, Any]) -> None:
    """The SBC sends a call to the caller's registrar: it must know the callee too."""
    cfg = (DOCKER / "kamailio" / "kamailio.cfg").read_text()
    assert "#!ifdef WITH_DMQ" in cfg and 'loadmodule "dmq_usrloc.so"' in cfg
    uris = {k: f'"sip:{address(services[k], "core")}:{KAMAILIO_PORT}"' for k in KAMAILIOS}
    for kamailio in KAMAILIOS:
        command = services[kamailio]["command"]
        (other,) = (k for k in KAMAILIOS if k != kamailio)
        assert "WITH_DMQ" in command
        assert f"DMQ_SERVER={uris[kamailio]}" in command, command
        assert f"DMQ_NOTIFY={uris[other]}" in command, command


# -- the phones -------------------------------------------------------------------------------------
def baresip_config(phone: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in (DOCKER / "baresip" / phone / "config").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("\t")
            out.setdefault(key, []).append(value.strip())
    return out


def account(phone: str) -> str:
    lines = [
        line
        for line in (DOCKER / "baresip" / phone / "accounts").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("phone", list(PHONES))
def test_phone_config(phone: str, services: dict[str, Any], sbc_config: Config) -> None:
    service = services[phone]
    config = baresip_config(phone)
    own = address(service, "access")
    assert config["sip_listen"] == [f"{own}:5060"]
    assert config["net_interface"] == [own]
    # The CA of the SBC's certificates, from the shared volume.
    assert config["sip_cafile"] == ["/opt/certs/ca.pem"]
    assert sbc_config.access.tls.ca is not None and sbc_config.access.tls.ca.name == "ca.pem"
    for module in ("g711.so", "srtp.so", "aufile.so", "sndfile.so"):
        assert module in config["module"], module
    assert "ctrl_tcp.so" in config["module_app"]
    # The tone it plays and the directory it records into are made by its command.
    (source,) = config["audio_source"]
    tone = source.removeprefix("aufile,")
    command = command_text(service)
    assert f" {tone} synth " in command and "${TONE_HZ}" in command, command
    assert f"mkdir -p {config['snd_path'][0]}" in command, command
    assert float(service["environment"]["TONE_HZ"]) == PHONES[phone]
    assert "exec baresip -f /home/lab/.baresip" in command
    assert services[phone]["depends_on"]["sbc"]["condition"] == "service_healthy"
    assert binds(service)["/usr/local/bin/ctrl"] == ("./baresip/ctrl.sh", "ro")


def test_phones_control_ports_differ() -> None:
    """`make lab` runs both phones in one namespace: their ctrl_tcp ports must differ."""
    ports = [baresip_config(p)["ctrl_tcp_listen"][0] for p in PHONES]
    assert all(p.startswith("127.0.0.1:") for p in ports) and len(set(ports)) == len(ports)


@pytest.mark.parametrize("phone", list(PHONES))
def test_accounts_register_over_tls_with_srtp(
    phone: str, services: dict[str, Any], sbc_config: Config
) -> None:
    line = account(phone)
    assert line.startswith(f"<sip:{phone}@{DOMAIN};transport=tls>"), line
    outbound = re.search(r';outbound="sip:([\d.]+):(\d+);transport=tls"', line)
    assert outbound, line
    tls = {(u.host, u.port) for u in sbc_config.access.listen if u.transport == "tls"}
    assert (outbound[1], int(outbound[2])) in tls
    assert outbound[1] == address(services["sbc"], "access")
    assert ";mediaenc=srtp-mand" in line
    assert (";answermode=auto" in line) == (phone == "bob"), line
    assert sbc_config.media.access_srtp == "mandatory"


def test_ctrl_script_is_executable() -> None:
    script = DOCKER / "baresip" / "ctrl.sh"
    assert script.stat().st_mode & 0o111
    assert script.read_text().startswith("#!/bin/bash\n")
