"""`make lab`: the docker-compose lab (docker/docker-compose.yml) built with network namespaces.

    lan (alice 192.168.77.2, bob 192.168.77.3: baresip)
      -> nat (kernel MASQUERADE to 203.0.113.1)
      -> access network: the SBC's access side 203.0.113.2 (namespace sbc-core-*)
      -> core network 10.200.2.0/24: the SBC's core side 10.200.2.10, Kamailio on
         10.200.2.11 and 10.200.2.12 (namespace sbc-back-*)

The configs are the docker/ files: the compose file gives the addresses, the certificate
command and the phones' tones; docker/sbc.toml, docker/baresip/*/{config,accounts} and
docker/kamailio/kamailio.cfg are used as they are, with the compose addresses of the access
network replaced by the namespaces' (the core network keeps the compose addresses) and the
phones' file paths by files in the work directory. Unlike the compose lab, the phones are
behind a kernel NAT here.

alice and bob register over TLS through the SBC (each lands on the Kamailio its address of
record hashes to), alice calls bob with SRTP, each plays a tone and records what it hears
for a few seconds. The report: the registrations, the call, the frequency each phone heard
(measured on its recording), and the phones' legs on the wire in lan (SRTP: noise read as
G.711, the tone once decrypted with the key of the SDP). Everything is bounded
(``LAB_SECONDS``) and torn down whatever happens: processes stopped by PID, namespaces
deleted. Exit status 0 when every check passed, 1 when one failed, 2 when a program is
missing.

Run it as ``python -m tests.interop.lab`` from the repository root (``make lab``); ``--json
FILE`` also writes the report as JSON (tests/interop/test_lab.py reads it).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import ipaddress
import itertools
import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

from . import media_check as mc
from . import netns
from .conftest import sbc_command
from .netns import Namespace, NsRegistrar
from .phones import (
    NOISE_RATIO,
    TONE_RATIO,
    CallSdps,
    Flow,
    MediaPhone,
    assert_recording,
    flow,
)
from .phones import srtp_suite as _srtp_suite
from .phones import talk as _talk
from .test_baresip import CTRL_FAILED

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "docker-compose.yml"
LAB_SECONDS = 90  # the whole run, teardown included, is bounded by this
PHONE_LIFETIME = 60  # baresip -t: each phone quits by itself after this anyway
NAT_UDP_TIMEOUT = 30  # longer than the call: the lab does not test keep-alives
MIN_PACKETS = 50  # per direction of each phone's leg (50 packets/s)
LAN_PHONES = ("192.168.77.2", "192.168.77.3")  # the first is netns.LAN_CLIENT
KAMAILIO_PORT = 5060  # kamailio without -l in the compose file: every address, port 5060
BACK_LINK = "eth1"  # the SBC namespace's link to the core network


class LabError(RuntimeError):
    """The lab could not be built from the docker/ files, or a step failed."""


# -- what the compose file says --------------------------------------------------------------
@dataclass(frozen=True)
class PhoneSpec:
    name: str
    address: str  # on the access network
    tone_hz: float
    config: Path  # docker/baresip/NAME/config
    accounts: Path
    certs_mount: str  # where the certs volume is mounted in the container (sip_cafile's dir)


@dataclass(frozen=True)
class ComposeLab:
    sbc_access: str
    sbc_core: str
    core_prefix: int
    sbc_config: Path  # the file mounted at /opt/sbc/config/sbc.toml
    gen_certs: list[str]  # the SBC's gen-certs arguments (after "gen-certs")
    kamailios: dict[str, str]  # service -> address on the core network
    kamailio_defines: dict[str, list[str]]  # service -> its -A values but CTL_SOCKET
    phones: list[PhoneSpec]


def _bind_source(volumes: list[str], target: str) -> Path:
    for volume in volumes:
        source, _, rest = volume.partition(":")
        if rest.split(":")[0] == target:
            return (DOCKER / source).resolve()
    raise LabError(f"no volume mounted at {target} in {volumes}")


def _volume_target(volumes: list[str], source: str) -> str:
    for volume in volumes:
        parts = volume.split(":")
        if parts[0] == source:
            return parts[1]
    raise LabError(f"volume {source} not mounted in {volumes}")


def read_compose(path: Path = COMPOSE) -> ComposeLab:
    compose = yaml.safe_load(path.read_text())
    services: dict[str, Any] = compose["services"]
    sbc = services["sbc"]
    command = " ".join(sbc["command"])
    match = re.search(r"\bsbc gen-certs ([^;|&]*)", command)
    if match is None:
        raise LabError(f"no 'sbc gen-certs' in the sbc service's command: {command}")
    core_subnet = compose["networks"]["core"]["ipam"]["config"][0]["subnet"]
    kamailios = {n: s for n, s in services.items() if "kamailio" in str(s.get("image", ""))}
    phones = []
    for name, service in services.items():
        if "baresip" not in str(service.get("image", "")):
            continue
        volumes = service["volumes"]
        phones.append(
            PhoneSpec(
                name=name,
                address=service["networks"]["access"]["ipv4_address"],
                tone_hz=float(service["environment"]["TONE_HZ"]),
                config=_bind_source(volumes, "/home/lab/.baresip/config"),
                accounts=_bind_source(volumes, "/home/lab/.baresip/accounts"),
                certs_mount=_volume_target(volumes, "certs"),
            )
        )
    return ComposeLab(
        sbc_access=sbc["networks"]["access"]["ipv4_address"],
        sbc_core=sbc["networks"]["core"]["ipv4_address"],
        core_prefix=ipaddress.ip_network(core_subnet).prefixlen,
        sbc_config=_bind_source(sbc["volumes"], "/opt/sbc/config/sbc.toml"),
        gen_certs=shlex.split(match[1]),
        kamailios={name: s["networks"]["core"]["ipv4_address"] for name, s in kamailios.items()},
        kamailio_defines={name: _defines(s["command"]) for name, s in kamailios.items()},
        phones=sorted(phones, key=lambda p: p.name),
    )


def _defines(command: list[str]) -> list[str]:
    """The values of a kamailio command's -A options, but its control socket's."""
    values = [b for a, b in itertools.pairwise(command) if a == "-A"]
    return [v for v in values if not v.startswith("CTL_SOCKET=")]


class LabRegistrar(NsRegistrar):
    """A registrar of the lab: conftest's command (docker/kamailio/kamailio.cfg, listen
    addresses, control socket) plus the compose file's defines for that service."""

    def __init__(self, defines: list[str], *args: Any, **kwargs: Any) -> None:
        self.defines = defines
        super().__init__(*args, **kwargs)

    def command(self) -> list[str]:
        return [*super().command(), *(arg for d in self.defines for arg in ("-A", d))]


def substitute(text: str, addresses: dict[str, str]) -> str:
    """``text`` with each whole IPv4 address that is a key of ``addresses`` replaced."""
    return re.sub(
        r"(?<![\d.])\d{1,3}(?:\.\d{1,3}){3}(?![\d.])",
        lambda m: addresses.get(m[0], m[0]),
        text,
    )


def phone_config(text: str, *, addresses: dict[str, str], certs: Path, tone: Path,
                 recdir: Path) -> str:  # fmt: skip
    """A docker/baresip/*/config for the lab: addresses substituted, the CA, the tone and
    the recording directory in the work directory."""
    lines = []
    for line in substitute(text, addresses).splitlines():
        key, _, value = line.partition("\t")
        value = value.strip()
        if key == "sip_cafile":
            line = f"{key}\t\t{certs / Path(value).name}"
        elif key == "audio_source" and value.startswith("aufile,"):
            line = f"{key}\t\taufile,{tone}"
        elif key == "snd_path":
            line = f"{key}\t\t{recdir}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def account_line(accounts: Path, addresses: dict[str, str]) -> str:
    """The one account of a docker/baresip/*/accounts file, addresses substituted."""
    lines = [
        line.strip()
        for line in accounts.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if len(lines) != 1:
        raise LabError(f"{accounts}: expected one account line, got {lines}")
    return substitute(lines[0], addresses)


# -- the run ------------------------------------------------------------------------------------
@dataclass
class Report:
    ok: bool = False
    seconds: float = 0.0
    registrations: dict[str, dict[str, Any]] = field(default_factory=dict)
    call: dict[str, Any] = field(default_factory=dict)
    audio: dict[str, dict[str, float]] = field(default_factory=dict)
    srtp: dict[str, dict[str, Any]] = field(default_factory=dict)
    error: str | None = None
    workdir: str = ""

    def lines(self) -> list[str]:
        out = ["make lab: alice and bob (baresip) behind a kernel NAT, the SBC between the",
               "access and core networks, two Kamailio registrars (docker/ configs)"]  # fmt: skip
        for name, reg in self.registrations.items():
            out.append(
                f"  registered   {name}: TLS via the NAT ({reg['public']}), "
                f"on {reg['backend']}, copied to {reg['replicated']} ({reg['seconds']:.2f} s)"
            )
        if self.call:
            out.append(
                f"  call         alice -> {self.call['backend']} -> bob established in "
                f"{self.call['setup_seconds']:.2f} s, talked {self.call['talk_seconds']:g} s"
            )
        for name, heard in self.audio.items():
            out.append(
                f"  audio        {name} heard {heard['frequency']:.1f} Hz (sent "
                f"{heard['sent_hz']:g} Hz; {heard['seconds']:.1f} s, tone energy "
                f"{heard['ratio']:.2f})"
            )
        if self.call:
            out.append(
                f"  SRTP         alice {self.call['alice_suite']}, bob {self.call['bob_suite']}"
                " (SDES keys in the SDP of each leg)"
            )
        for name, leg in self.srtp.items():
            out.append(
                f"  on the wire  {name}: {leg['packets']} packets, tone energy as plain "
                f"G.711 {leg['as_pcmu']:.2f}, decrypted {leg['decrypted']:.2f}"
            )
        if self.error:
            out.append(f"  FAILED       {self.error}")
        out.append(f"  result       {'PASS' if self.ok else 'FAIL'} in {self.seconds:.1f} s")
        return out


class LabTimeout(Exception):
    pass


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise LabTimeout(f"the lab took longer than {LAB_SECONDS} s")


# While a process is started and its stop registered, SIGTERM is held back: raised in
# between, it would leave the process running (``_holding_sigterm``).
_held: list[int] = []  # [1] while holding; the signal number once one came
_HOLDING = -1


def _terminated(signum: int, frame: FrameType | None) -> None:
    if _held:
        _held[0] = signum
        return
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def _holding_sigterm() -> Iterator[None]:
    """SIGTERM inside the block is raised (KeyboardInterrupt) when the block is done."""
    _held.append(_HOLDING)
    try:
        yield
    finally:
        signum = _held.pop()
    if signum != _HOLDING:
        raise KeyboardInterrupt(f"signal {signum}")


def _require(*programs: str) -> dict[str, str]:
    found = {p: shutil.which(p) for p in programs}
    missing = [p for p, path in found.items() if path is None]
    missing += netns.tools_missing()
    if missing:
        raise FileNotFoundError(f"make lab needs {', '.join(missing)} (make peers installs them)")
    return {p: path for p, path in found.items() if path is not None}


@contextlib.contextmanager
def core_network(sbc_ns: Namespace, lab: ComposeLab, tag: str) -> Iterator[Namespace]:
    """The backends' namespace, linked to the SBC's: the compose file's core network."""
    back = Namespace(f"sbc-back-{tag}")
    netns.run("ip", "netns", "add", back.name)
    try:
        netns.run("ip", "link", "add", BACK_LINK, "netns", sbc_ns.name, "type", "veth",
                  "peer", "name", "eth0", "netns", back.name)  # fmt: skip
        sbc_ns.ip("addr", "add", f"{lab.sbc_core}/{lab.core_prefix}", "dev", BACK_LINK)
        sbc_ns.ip("link", "set", BACK_LINK, "up")
        for address in lab.kamailios.values():
            back.ip("addr", "add", f"{address}/{lab.core_prefix}", "dev", "eth0")
        back.ip("link", "set", "lo", "up")
        back.ip("link", "set", "eth0", "up")
        yield back
    finally:
        netns.run("ip", "netns", "delete", back.name, check=False)


def start_phone(spec: PhoneSpec, ns: Namespace, workdir: Path, addresses: dict[str, str],
                certs: Path, tools: dict[str, str]) -> MediaPhone:  # fmt: skip
    confdir = workdir / spec.name
    recdir = confdir / "rec"
    recdir.mkdir(parents=True)
    tone = mc.make_tone(tools["sox"], confdir / "tone.wav", spec.tone_hz, PHONE_LIFETIME)
    config = phone_config(spec.config.read_text(), addresses=addresses, certs=certs,
                          tone=tone, recdir=recdir)  # fmt: skip
    match = re.search(r"^ctrl_tcp_listen\s+127\.0\.0\.1:(\d+)", config, re.M)
    if match is None:
        raise LabError(f"{spec.config}: no ctrl_tcp_listen on 127.0.0.1")
    (confdir / "config").write_text(config)
    (confdir / "accounts").write_text("")  # added over ctrl_tcp once connected (uanew)
    log_path = confdir / "baresip.log"
    argv = [tools["baresip"], "-f", str(confdir), "-t", str(PHONE_LIFETIME), "-s"]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(ns.argv(*argv), stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    return MediaPhone(proc=proc, confdir=confdir, log_path=log_path, ctrl_port=int(match[1]),
                      name=spec.name, recdir=recdir, ns=ns)  # fmt: skip


def nat_address(phone: MediaPhone) -> str:
    """Where the SBC saw the phone's REGISTER come from: the NAT's public address and port,
    from the Via of the 200 (RFC 3581 received and rport)."""
    for message in phone.trace("SIP/2.0 200"):
        if re.search(r"^CSeq: \d+ REGISTER", message, re.M | re.I):
            received = re.search(r"received=([0-9.]+)", message)
            rport = re.search(r"rport=(\d+)", message)
            if received and rport:
                return f"{received[1]}:{rport[1]}"
    return "?"


def from_relay(datagrams: list[mc.Datagram], name: str, relay: tuple[str, int]) -> Flow:
    """The RTP datagrams the relay sent from ``relay`` (the port in the SDP it gave a phone).
    Picked by source: a phone with a second address sends and receives on the first (it
    binds its RTP port to every address), so its SDP's address is not where packets go."""
    packets, sources = [], set()
    for d in datagrams:
        rtp = mc.parse_rtp(d.payload) if d.src == relay else None
        if rtp is not None:
            packets.append(rtp)
            sources.add(d.src)
    return Flow(name, packets, sources)


def media_ports(sbc_config: str) -> tuple[int, int]:
    import tomllib

    low, high = tomllib.loads(sbc_config)["media"]["ports"].split("-")
    return int(low), int(high)


def run_lab(workdir: Path, report: Report, log: io.StringIO) -> None:
    tools = _require("kamailio", "kamcmd", "baresip", "sox", "tshark")
    lab = read_compose()
    if len(lab.phones) != 2 or [p.name for p in lab.phones] != ["alice", "bob"]:
        raise LabError(f"the compose file's phones are {[p.name for p in lab.phones]}")
    alice_spec, bob_spec = lab.phones
    addresses = {lab.sbc_access: netns.CORE_ADDRESS}
    addresses.update({p.address: lan for p, lan in zip(lab.phones, LAN_PHONES, strict=True)})

    with contextlib.ExitStack() as stack:
        stack.enter_context(contextlib.redirect_stdout(log))  # teardown chatter: kept in log
        topo = stack.enter_context(netns.nat_topology(udp_timeout=NAT_UDP_TIMEOUT))
        topo.lan.ip("addr", "add", f"{LAN_PHONES[1]}/24", "dev", "eth0")
        tag = topo.core.name.removeprefix("sbc-core-")
        back = stack.enter_context(core_network(topo.core, lab, tag))

        # Certificates as the container makes them on its first start, SBC address substituted.
        certs = workdir / "certs"
        gen = [substitute(arg, addresses) for arg in lab.gen_certs]
        proc = subprocess.run([*sbc_command(), "gen-certs", *gen], cwd=workdir,
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        if proc.returncode != 0:
            raise LabError(f"sbc gen-certs {' '.join(gen)}: {proc.stderr}")

        # The two registrars on the core network, docker/kamailio/kamailio.cfg.
        rundir = Path(tempfile.mkdtemp(prefix="kamlab-"))  # short: Unix socket paths
        stack.callback(shutil.rmtree, rundir, ignore_errors=True)
        registrars: dict[str, LabRegistrar] = {}
        for index, (name, address) in enumerate(sorted(lab.kamailios.items())):
            registrar = LabRegistrar(lab.kamailio_defines[name], back, index, KAMAILIO_PORT,
                                     rundir / name, workdir / f"{name}.log", tools["kamailio"],
                                     tools["kamcmd"])  # fmt: skip
            registrar.host = address
            registrars[name] = registrar
            stack.callback(_stop_registrar, registrar)
            registrar.start()

        # The SBC: docker/sbc.toml with the access addresses substituted.
        sbc_text = substitute(lab.sbc_config.read_text(), addresses)
        (workdir / "config").mkdir()
        with _holding_sigterm():
            sbc = netns.launch_sbc(topo.core, workdir / "config", sbc_text)
            stack.callback(lambda: _note("; ".join(netns.stop_sbc(sbc)) or None))
        sbc = replace(sbc, core=(lab.sbc_core, 5080))
        user_agent = re.search(r'^user_agent\s*=\s*"([^"]+)"', sbc_text, re.M)
        netns.wait_sbc_ready(sbc, server=user_agent[1] if user_agent else "")
        if sbc.access != (netns.CORE_ADDRESS, 5060):
            raise LabError(f"the SBC's access side is {sbc.access}")

        # The phones, behind the NAT; bob first, as he is the one called.
        phones: dict[str, MediaPhone] = {}
        for spec in (bob_spec, alice_spec):
            phone = start_phone(spec, topo.lan, workdir, addresses, certs, tools)
            phones[spec.name] = phone
            stack.callback(_stop_phone, phone)
            phone.wait_ready()
            if CTRL_FAILED in phone.log():
                raise LabError(f"{spec.name}: ctrl_tcp could not listen")
            phone.connect()
            started = time.monotonic()
            phone.command("uanew", account_line(spec.accounts, addresses))
            phone.wait_event("REGISTER_OK")
            seconds = time.monotonic() - started
            report.registrations[spec.name] = {"seconds": seconds}
        alice, bob = phones["alice"], phones["bob"]
        # Where each REGISTER went (the binding holds the socket it came in on) and where
        # dmq_usrloc copied it (no socket).
        for name, kamailio in registrars.items():
            for aor, contacts in kamailio.bindings().items():
                if aor in report.registrations:
                    held = "backend" if any(c.get("socket") for c in contacts) else "replicated"
                    report.registrations[aor][held] = name
        for name, phone in phones.items():
            report.registrations[name]["public"] = nat_address(phone)
        for name, reg in report.registrations.items():
            if "backend" not in reg or "replicated" not in reg:
                raise LabError(f"{name}'s binding is not on both Kamailio: {reg}")

        # The call, captured in lan: the phones' legs, both directions.
        low, high = media_ports(sbc_text)
        capture = mc.Capture(tools["tshark"], "eth0", f"udp portrange {low}-{high}",
                             workdir / "lan.pcap", duration=40, prefix=topo.lan.argv())  # fmt: skip
        stack.callback(capture.stop)
        capture.start()
        talk = 3.0
        setup = _talk(alice, bob, talk)
        capture.stop()
        via = re.search(r"INVITE to core .*flow=\w+:([0-9.]+):", sbc.log())
        backend = {a: n for n, a in lab.kamailios.items()}.get(via[1] if via else "", "?")
        report.call = {"setup_seconds": setup, "talk_seconds": talk, "backend": backend,
                       "alice_suite": _srtp_suite(alice), "bob_suite": _srtp_suite(bob)}  # fmt: skip

        # What each phone heard.
        for phone, sent_by in ((bob, alice_spec), (alice, bob_spec)):
            heard = assert_recording(tools["sox"], phone.name, phone.recording(),
                                     sent_by.tone_hz, phone.explain)  # fmt: skip
            report.audio[phone.name] = {**heard, "sent_hz": sent_by.tone_hz}

        # The phones' legs on the wire: SRTP both ways.
        sdps = CallSdps.of(alice, bob)
        datagrams = capture.datagrams()
        legs: dict[str, tuple[Flow, tuple[str, bytes], float]] = {
            "alice->sbc": (flow(datagrams, "alice->sbc", sdps.alice_answer.rtp),
                           sdps.alice_offer.key(sdps.chosen_tag(sdps.alice_answer)),
                           alice_spec.tone_hz),
            "sbc->alice": (from_relay(datagrams, "sbc->alice", sdps.alice_answer.rtp),
                           sdps.alice_answer.key(), bob_spec.tone_hz),
            "sbc->bob": (from_relay(datagrams, "sbc->bob", sdps.bob_offer.rtp),
                         sdps.bob_offer.key(sdps.chosen_tag(sdps.bob_answer)),
                         alice_spec.tone_hz),
            "bob->sbc": (flow(datagrams, "bob->sbc", sdps.bob_offer.rtp),
                         sdps.bob_answer.key(), bob_spec.tone_hz),
        }  # fmt: skip
        for name, (f, key, hz) in legs.items():
            report.srtp[name] = {
                "packets": len(f.packets),
                "as_pcmu": f.listen(workdir, tools["sox"], hz),
                "decrypted": f.listen(workdir, tools["sox"], hz, key=key),
            }
        for name, leg in report.srtp.items():
            if leg["packets"] < MIN_PACKETS:
                raise LabError(f"{name}: {leg['packets']} RTP packets captured")
            if leg["as_pcmu"] >= NOISE_RATIO or leg["decrypted"] < TONE_RATIO:
                raise LabError(f"{name} is not SRTP carrying the tone: {leg}")
        report.ok = True
    if _problems:
        report.ok = False
        report.error = "teardown: " + "; ".join(_problems)


_problems: list[str] = []


def _note(problem: str | None) -> None:
    if problem:
        _problems.append(problem)


def _stop_registrar(registrar: NsRegistrar) -> None:
    _note(registrar._terminate())


def _stop_phone(phone: MediaPhone) -> None:
    _note(phone.stop())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make lab", description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="also write the report here as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--workdir", type=Path, help="an empty directory to work in")
    args = parser.parse_args(argv)
    start = time.monotonic()
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        if any(args.workdir.iterdir()):
            parser.error(f"{args.workdir} is not empty")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sbc-lab-"))
    report = Report(workdir=str(workdir))
    log = io.StringIO()
    code = 1
    signal.signal(signal.SIGALRM, _alarm)
    signal.signal(signal.SIGTERM, _terminated)
    signal.alarm(LAB_SECONDS)
    try:
        run_lab(workdir, report, log)
        code = 0 if report.ok else 1
    except FileNotFoundError as exc:
        report.error, code = str(exc), 2
    except (Exception, KeyboardInterrupt) as exc:  # reported, after the teardown ran
        report.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        print(str(exc)[-6000:], file=sys.stderr)
    finally:
        signal.alarm(0)
    report.seconds = time.monotonic() - start
    if not report.ok:
        (workdir / "teardown.log").write_text(log.getvalue())
        print(log.getvalue()[-12000:], file=sys.stderr)
        print(f"logs kept in {workdir}", file=sys.stderr)
    print("\n".join(report.lines()))
    if args.json:
        args.json.write_text(json.dumps(vars(report), indent=1))
    if report.ok and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
