"""Network namespaces for NAT tests: a client behind a real kernel NAT, facing the SBC.

    lan  eth0 192.168.77.2/24 --veth-- lan0 192.168.77.1  nat  wan0 203.0.113.1/24 --veth--
    eth0 203.0.113.2/24  core  (+ lo 127.0.0.1: the SBC's core side and Kamailio)

``nat`` forwards (ip_forward=1), masquerades everything leaving wan0 (iptables-nft; UDP/TCP
to the public ports 40000-49999, so a mapped port differs from the client's 5060), lets
lan->wan through and only ESTABLISHED,RELATED back, and forgets an idle UDP mapping after
``udp_timeout`` seconds (``nf_conntrack_udp_timeout`` and ``..._udp_timeout_stream``, set
inside ``nat`` only; the machine's own values are untouched). ``core`` has no route to the
lan: only the NAT's public address is reachable from there.

Namespace names carry the test process's PID and a counter, so parallel runs do not collide;
``nat_topology()`` deletes every namespace it created, also when building them fails.

Sockets: ``Namespace.new_socket()`` opens a socket *inside* a namespace from this process (a
short-lived thread calls setns(2) and creates it; a socket stays in the namespace it was
created in), so the tests drive the client with plain Python sockets.

Isolation: ``with isolated() as ns:`` puts the calling thread itself into a fresh namespace
with only ``lo`` up (setns(2), ``enter_thread()``), so everything the test starts inside the
block (the SBC, baresip, a browser) sees loopback only; the thread goes back and the
namespace is deleted at the end. The WebRTC tests use it: a browser gathers ICE candidates on
every interface it sees.

API, bottom up:
- ``nat_topology(udp_timeout=5, masquerade=...)`` -> ``NatTopology`` (``lan``/``nat``/``core``
  ``Namespace``s; ``udp_mappings()``, ``nat_mapping(private, remote)``,
  ``nat_mapping_alive(private, remote)`` read the NAT's conntrack table without touching it;
  ``send_from_core(source, dest, payload)`` and ``probe_reaches(...)`` test it end to end).
- ``nat_lab(workdir, kamailio=, kamcmd=, core=, extra=, udp_timeout=)`` -> ``NatLab``: the
  topology plus Kamailio and ``sbc run`` inside core (``lab.sbc``, ``lab.registrar``), and the
  client side: ``lab.client()``, ``lab.register(sock, user)``, ``lab.nat_mapping_alive(sock)``,
  ``lab.probe_client(sock, public_port)``; ``serve_client(sock, seconds)`` answers OPTIONS
  keep-alives like a UA and returns what arrived; ``answer_call(sock, seconds, contact=)``
  is the called UA (180, 200 with SDP until the ACK, 200 to the BYE).
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import sipwire
from .conftest import Registrar, sbc_command

LAN_CLIENT = "192.168.77.2"
NAT_LAN = "192.168.77.1"
NAT_PUBLIC = "203.0.113.1"  # RFC 5737 TEST-NET-3: never routed anywhere real
CORE_ADDRESS = "203.0.113.2"
NAT_PORTS = (40000, 49999)  # MASQUERADE --to-ports for UDP and TCP
IP_TIMEOUT = 10.0

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_counter = itertools.count()


class NetnsError(RuntimeError):
    """Building the topology failed, or the SBC/Kamailio in it did not start or stop well."""


def tools_missing() -> list[str]:
    """What this module needs and the machine lacks (root counts as a tool)."""
    missing = [tool for tool in ("ip", "iptables", "sysctl") if shutil.which(tool) is None]
    if os.geteuid() != 0:
        missing.append("root (network namespaces need CAP_SYS_ADMIN)")
    return missing


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=IP_TIMEOUT)
    if check and proc.returncode != 0:
        raise NetnsError(f"{' '.join(args)}: exit {proc.returncode}\n{proc.stderr}")
    return proc


@dataclass(frozen=True)
class Namespace:
    name: str

    @property
    def path(self) -> str:
        return f"/run/netns/{self.name}"

    def argv(self, *command: str) -> list[str]:
        """``command`` run inside this namespace (``ip netns exec`` execs it: same PID)."""
        return ["ip", "netns", "exec", self.name, *command]

    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(*self.argv(*command), check=check)

    def ip(self, *args: str) -> None:
        run("ip", "-n", self.name, *args)

    def sysctl(self, **values: object) -> None:
        """``sysctl -w`` inside the namespace; keys with dots given as ``a__b`` -> ``a.b``."""
        pairs = [f"{key.replace('__', '.')}={value}" for key, value in values.items()]
        self.run("sysctl", "-q", "-w", *pairs)

    def new_socket(
        self, family: int = socket.AF_INET, kind: int = socket.SOCK_DGRAM, proto: int = 0
    ) -> socket.socket:
        """A socket living in this namespace (created by a thread that entered it)."""
        result: list[socket.socket | BaseException] = []

        def enter_and_create() -> None:
            try:
                enter_thread(self.path)
                result.append(socket.socket(family, kind, proto))
            except BaseException as exc:  # handed to the caller's thread
                result.append(exc)

        # The thread's network namespace changes, never the test process's main thread.
        thread = threading.Thread(target=enter_and_create, name=f"netns-{self.name}")
        thread.start()
        thread.join(IP_TIMEOUT)
        if not result:
            raise NetnsError(f"no socket from namespace {self.name} within {IP_TIMEOUT} s")
        if isinstance(result[0], BaseException):
            raise result[0]
        return result[0]

    def udp_socket(self, host: str, port: int = 0) -> socket.socket:
        sock = self.new_socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        return sock


def enter_thread(path: str) -> None:
    """Move the calling thread (only it) into the network namespace at ``path`` (setns(2);
    Python 3.11 has no os.setns). Sockets it creates from then on, threads it starts and
    processes it spawns live in that namespace; sockets opened before stay where they were."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, _CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns({path}): {os.strerror(errno)}")
    finally:
        os.close(fd)


@contextlib.contextmanager
def isolated(prefix: str = "sbc-iso") -> Iterator[Namespace]:
    """A fresh namespace with only ``lo`` up, and the calling thread inside it until the
    block ends: the test and every process it starts meanwhile (``subprocess`` forks from
    this thread) see 127.0.0.0/8 and ::1 only. Then the thread goes back to the namespace it
    came from and the namespace is deleted, whatever happened (processes still running in
    it keep it alive until they exit: stop them inside the block)."""
    ns = Namespace(f"{prefix}-{os.getpid()}-{next(_counter)}")
    # The way back: this thread's own namespace (not the process's: it may differ).
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        run("ip", "netns", "add", ns.name)
        try:
            ns.ip("link", "set", "lo", "up")
            enter_thread(ns.path)
            try:
                yield ns
            finally:
                if _libc.setns(home, _CLONE_NEWNET) != 0:
                    errno = ctypes.get_errno()
                    raise OSError(errno, f"setns back from {ns.name}: {os.strerror(errno)}")
        finally:
            proc = run("ip", "netns", "delete", ns.name, check=False)
            if proc.returncode != 0:
                print(f"ip netns delete {ns.name}: {proc.stderr.strip()}")
    finally:
        os.close(home)


@dataclass(frozen=True)
class UdpMapping:
    """One UDP entry of the nat namespace's conntrack table (/proc/net/nf_conntrack)."""

    private: tuple[str, int]  # the client's own address (original source)
    remote: tuple[str, int]  # where it sent to (original destination)
    public: tuple[str, int]  # what the remote sees (reply destination): the NAT mapping
    seconds_left: int
    flags: frozenset[str]  # UNREPLIED, ASSURED


_CT_FIELD = re.compile(r"(src|dst|sport|dport)=(\S+)")


def parse_conntrack(text: str) -> list[UdpMapping]:
    mappings = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 6 or fields[2] != "udp":
            continue
        pairs = _CT_FIELD.findall(line)
        if len(pairs) < 8:
            continue
        orig = dict(pairs[:4])
        reply = dict(pairs[4:8])
        mappings.append(
            UdpMapping(
                private=(orig["src"], int(orig["sport"])),
                remote=(orig["dst"], int(orig["dport"])),
                public=(reply["dst"], int(reply["dport"])),
                seconds_left=int(fields[4]),
                flags=frozenset(re.findall(r"\[([A-Z]+)\]", line)),
            )
        )
    return mappings


@dataclass(frozen=True)
class NatTopology:
    lan: Namespace
    nat: Namespace
    core: Namespace
    udp_timeout: int

    client = LAN_CLIENT
    nat_public = NAT_PUBLIC
    core_address = CORE_ADDRESS

    @property
    def namespaces(self) -> tuple[Namespace, Namespace, Namespace]:
        return (self.lan, self.nat, self.core)

    # -- the NAT's state, read without touching it
    def conntrack_available(self) -> bool:
        return self.nat.run("test", "-r", "/proc/net/nf_conntrack", check=False).returncode == 0

    def udp_mappings(self) -> list[UdpMapping]:
        """The nat namespace's live UDP conntrack entries (expired ones are not listed)."""
        return parse_conntrack(self.nat.run("cat", "/proc/net/nf_conntrack").stdout)

    def nat_mapping(self, private: tuple[str, int], remote: tuple[str, int]) -> UdpMapping | None:
        """The live mapping of ``private`` towards ``remote``, or None."""
        for mapping in self.udp_mappings():
            if mapping.private == private and mapping.remote == remote:
                return mapping
        return None

    def nat_mapping_alive(self, private: tuple[str, int], remote: tuple[str, int]) -> bool:
        """Whether the NAT still maps ``private`` towards ``remote`` (read-only: looking
        does not refresh it, unlike a probe through it)."""
        return self.nat_mapping(private, remote) is not None

    # -- the NAT's state, tested end to end
    def send_from_core(
        self, source: tuple[str, int], dest: tuple[str, int], payload: bytes
    ) -> None:
        """One UDP datagram from ``source`` (an address in core, any port, even one a
        process holds, like the SBC's 5060) to ``dest``: a raw socket writes the UDP header
        itself. This is how a packet from the SBC's own socket looks to the NAT."""
        header = struct.pack("!HHHH", source[1], dest[1], 8 + len(payload), 0)  # no checksum
        with contextlib.closing(
            self.core.new_socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
        ) as raw:
            raw.bind((source[0], 0))
            raw.sendto(header + payload, (dest[0], 0))

    def probe_reaches(
        self,
        client: socket.socket,
        source: tuple[str, int],
        public: tuple[str, int],
        timeout: float = 1.0,
    ) -> bool:
        """Send a token from ``source`` (in core) to the NAT's ``public`` address; whether it
        arrives at ``client`` (a socket in lan) within ``timeout``. Other datagrams the
        client receives meanwhile are read and ignored. A probe that gets through refreshes
        the mapping, as any reply-direction packet does."""
        token = f"nat-probe-{os.getpid()}-{next(_counter)}-{time.monotonic_ns()}".encode()
        self.send_from_core(source, public, token)
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            client.settimeout(remaining)
            try:
                data, _ = client.recvfrom(65535)
            except TimeoutError:
                return False
            if data == token:
                return True
        return False


def _build(topo: NatTopology, masquerade: tuple[str, ...]) -> None:
    lan, nat, core = topo.namespaces
    for ns in topo.namespaces:
        run("ip", "netns", "add", ns.name)
    # veth pairs created straight inside the namespaces: no names in the root namespace.
    run("ip", "link", "add", "eth0", "netns", lan.name, "type", "veth",
        "peer", "name", "lan0", "netns", nat.name)  # fmt: skip
    run("ip", "link", "add", "wan0", "netns", nat.name, "type", "veth",
        "peer", "name", "eth0", "netns", core.name)  # fmt: skip
    lan.ip("addr", "add", f"{LAN_CLIENT}/24", "dev", "eth0")
    nat.ip("addr", "add", f"{NAT_LAN}/24", "dev", "lan0")
    nat.ip("addr", "add", f"{NAT_PUBLIC}/24", "dev", "wan0")
    core.ip("addr", "add", f"{CORE_ADDRESS}/24", "dev", "eth0")
    for ns, links in ((lan, ("lo", "eth0")), (nat, ("lo", "lan0", "wan0")), (core, ("lo", "eth0"))):
        for link in links:
            ns.ip("link", "set", link, "up")
    lan.ip("route", "add", "default", "via", NAT_LAN)
    # core has no route to 192.168.77.0/24: only the NAT's public address is reachable.

    nat.sysctl(
        net__ipv4__ip_forward=1,
        net__netfilter__nf_conntrack_udp_timeout=topo.udp_timeout,
        net__netfilter__nf_conntrack_udp_timeout_stream=topo.udp_timeout,
    )
    ipt = ("iptables", "-w", "5")
    for proto in ("udp", "tcp"):
        nat.run(*ipt, "-t", "nat", "-A", "POSTROUTING", "-o", "wan0", "-p", proto,
                "-j", "MASQUERADE", *masquerade)  # fmt: skip
    nat.run(*ipt, "-t", "nat", "-A", "POSTROUTING", "-o", "wan0", "-j", "MASQUERADE")
    nat.run(*ipt, "-P", "FORWARD", "DROP")
    nat.run(*ipt, "-A", "FORWARD", "-i", "lan0", "-o", "wan0", "-j", "ACCEPT")
    nat.run(*ipt, "-A", "FORWARD", "-i", "wan0", "-o", "lan0",
            "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT")  # fmt: skip


def delete(topo: NatTopology) -> list[str]:
    """Delete the namespaces (their veths and rules go with them); the complaints, if any."""
    problems = []
    for ns in topo.namespaces:
        if os.path.exists(ns.path):
            proc = run("ip", "netns", "delete", ns.name, check=False)
            if proc.returncode != 0:
                problems.append(f"ip netns delete {ns.name}: {proc.stderr.strip()}")
    return problems


@contextlib.contextmanager
def nat_topology(
    *,
    udp_timeout: int = 5,
    masquerade: tuple[str, ...] = ("--to-ports", f"{NAT_PORTS[0]}-{NAT_PORTS[1]}"),
) -> Iterator[NatTopology]:
    """lan -> nat -> core, deleted on exit whatever happened (also half-built).

    ``masquerade``: the options of the UDP/TCP MASQUERADE rules, e.g. ``("--random-fully",)``
    for random public ports (close to a symmetric NAT).
    """
    tag = f"{os.getpid()}-{next(_counter)}"
    topo = NatTopology(
        lan=Namespace(f"sbc-lan-{tag}"),
        nat=Namespace(f"sbc-nat-{tag}"),
        core=Namespace(f"sbc-core-{tag}"),
        udp_timeout=udp_timeout,
    )
    try:
        _build(topo, masquerade)
        yield topo
    except BaseException:
        for problem in delete(topo):  # the first error is the one to report
            print(problem)
        raise
    problems = delete(topo)
    if problems:
        raise NetnsError("\n".join(problems))


# =========================================================================================
# The lab: the real SBC and a real Kamailio registrar inside ``core``, a client in ``lan``.
#
# Fixed ports are safe here: ``core`` is this test's own namespace, nothing else binds in it.
# Both processes are started with ``ip netns exec`` (which execs: the PID is the program's)
# and stopped by that PID.
# =========================================================================================
ACCESS_PORT = 5060  # the SBC's access side: udp://203.0.113.2:5060
SBC_CORE_PORT = 5080  # the SBC's core side: udp://127.0.0.1:5080 (named in the Path)
KAMAILIO_PORT = 5070  # the registrar: udp+tcp 127.0.0.1:5070
ADMIN_PORT = 8080
CLIENT_PORT = 5060  # the client's own port in lan
SERVER_HEADER = "sbc-nat-test"
SBC_START_TIMEOUT = 10.0
SBC_STOP_TIMEOUT = 5.0
_READY = re.compile(r"\bready\b")


class NsRegistrar(Registrar):
    """conftest's Kamailio registrar, run inside a namespace and probed from inside it.

    (kamcmd needs no namespace: its control socket is a file under /tmp.)
    """

    def __init__(self, netns: Namespace, *args: Any, **kwargs: Any) -> None:
        self.netns = netns
        super().__init__(*args, **kwargs)

    def command(self) -> list[str]:
        return self.netns.argv(*super().command())

    def options(self, transport: str = "udp", timeout: float = 2.0) -> sipwire.Response:
        target = sipwire.hostport(self.host, self.port)
        kind = socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM
        with contextlib.closing(self.netns.new_socket(socket.AF_INET, kind)) as sock:
            sock.settimeout(timeout)
            sock.bind((self.host, 0))
            sock.connect((self.host, self.port))
            local = sock.getsockname()[:2]
            data = sipwire.request(target=target, transport=transport, local=local)
            if transport == "udp":
                return sipwire.udp_exchange(sock, (self.host, self.port), data, timeout)
            sock.sendall(data)
            return sipwire.StreamReader(sock).response(timeout)


@dataclass
class NsSbc:
    """``sbc run`` inside ``core``: access side on 203.0.113.2, core side on 127.0.0.1."""

    proc: subprocess.Popen[bytes]
    netns: Namespace
    config: Path
    stderr_path: Path
    access: tuple[str, int] = (CORE_ADDRESS, ACCESS_PORT)
    core: tuple[str, int] = ("127.0.0.1", SBC_CORE_PORT)

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def options(self, timeout: float = 1.0) -> sipwire.Response:
        """One OPTIONS to the access side, sent from inside core (not through the NAT)."""
        with contextlib.closing(self.netns.udp_socket(self.access[0])) as sock:
            local = sock.getsockname()[:2]
            target = sipwire.hostport(*self.access)
            data = sipwire.request(target=target, transport="udp", local=local)
            return sipwire.udp_exchange(sock, self.access, data, timeout)


def sbc_config(backends: list[str], *, core: str = "", extra: str = "") -> str:
    """The SBC's TOML; ``core`` adds keys to [core], ``extra`` adds sections at the end."""
    backend_tables = "".join(f'\n[[core.backends]]\nuri = "{uri}"\n' for uri in backends)
    return f"""\
[sbc]
name = "nat-interop"

[access]
listen = ["udp://{CORE_ADDRESS}:{ACCESS_PORT}"]

[core]
listen = ["udp://127.0.0.1:{SBC_CORE_PORT}"]
probe_interval = 1.0
{core}
{backend_tables}
[admin]
listen = "127.0.0.1:{ADMIN_PORT}"

[sip]
user_agent = "{SERVER_HEADER}"

[log]
level = "debug"
format = "text"
{extra}
"""


def launch_sbc(netns: Namespace, workdir: Path, config_text: str) -> NsSbc:
    """Start ``sbc run`` inside ``netns`` without waiting (``wait_sbc_ready`` does)."""
    config = workdir / "sbc.toml"
    config.write_text(config_text)
    stderr_path = workdir / "sbc.stderr"
    with stderr_path.open("wb") as out:
        proc = subprocess.Popen(
            netns.argv(*sbc_command(), "run", "--config", str(config)),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )
    return NsSbc(proc=proc, netns=netns, config=config, stderr_path=stderr_path)


def wait_sbc_ready(
    sbc: NsSbc, timeout: float = SBC_START_TIMEOUT, server: str = SERVER_HEADER
) -> None:
    """Until the log says ready and the access side answers OPTIONS with the Server header
    ``server`` (the config's [sip] user_agent)."""
    deadline = time.monotonic() + timeout
    problem = "no 'ready' in the log"
    while time.monotonic() < deadline:
        if sbc.proc.poll() is not None:
            raise NetnsError(f"sbc run exited with {sbc.proc.returncode}:\n{sbc.log()}")
        if _READY.search(sbc.log()):
            try:
                response = sbc.options(timeout=0.5)
            except OSError as exc:
                problem = f"OPTIONS after 'ready': {exc!r}"
            else:
                if response.status == 200 and response.get("server") == server:
                    return
                problem = f"OPTIONS after 'ready' got {response.raw!r}"
        time.sleep(0.05)
    raise NetnsError(f"sbc run not ready within {timeout} s ({problem}):\n{sbc.log()}")


def stop_sbc(sbc: NsSbc) -> list[str]:
    """SIGTERM by PID, wait, else SIGKILL; what is wrong with how it ran and stopped."""
    proc = sbc.proc
    problems = []
    if proc.poll() is not None:
        problems.append(f"the SBC died during the test (exit {proc.returncode})")
    else:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)  # the second ends a drain (calls still up) at once
        try:
            proc.wait(timeout=SBC_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=SBC_STOP_TIMEOUT)
            problems.append(f"did not exit within {SBC_STOP_TIMEOUT} s of SIGTERM; killed")
        if proc.returncode != 0:
            problems.append(f"exit code {proc.returncode} after SIGTERM")
    log = sbc.log()
    if "Traceback" in log:
        problems.append("a Traceback in its log")
    print(f"--- sbc run in {sbc.netns.name} ({sbc.stderr_path}) ---\n{log}")
    for problem in problems:
        print(f"SBC: {problem}")
    return problems


# -- the client in lan ------------------------------------------------------------------
def register_request(
    local: tuple[str, int],
    server: tuple[str, int],
    user: str,
    *,
    contact: str | None = None,
    expires: int = 600,
    call_id: str | None = None,
    cseq: int = 1,
    domain: str = "example.com",
) -> bytes:
    """A REGISTER as a client behind NAT writes it: its private address in Via and Contact."""
    tag = secrets.token_hex(4)
    sent_by = sipwire.hostport(*local)
    lines = [
        f"REGISTER sip:{sipwire.hostport(*server)} SIP/2.0",
        f"Via: SIP/2.0/UDP {sent_by};branch=z9hG4bK{secrets.token_hex(6)};rport",
        "Max-Forwards: 70",
        f"From: <sip:{user}@{domain}>;tag={tag}",
        f"To: <sip:{user}@{domain}>",
        f"Call-ID: {call_id or secrets.token_hex(8)}@nat-client",
        f"CSeq: {cseq} REGISTER",
        f"Contact: <{contact or f'sip:{user}@{sent_by}'}>",
        f"Expires: {expires}",
        "Content-Length: 0",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def final_response(sock: socket.socket, timeout: float) -> sipwire.Response:
    """The next final response on ``sock`` (provisional ones and requests skipped)."""
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        sock.settimeout(remaining)
        data, _ = sock.recvfrom(65535)
        if data.startswith(b"SIP/2.0 "):
            response = sipwire.parse_response(data)
            if response.status >= 200:
                return response
    raise TimeoutError(f"no final response within {timeout} s")


def via_params(response: sipwire.Response) -> dict[str, str]:
    """The parameters of the top Via of a response (``received``, ``rport``...)."""
    via = response.get("via")
    assert via is not None, response.raw
    first = via.split(",")[0]
    params: dict[str, str] = {}
    for param in first.split(";")[1:]:
        name, _, value = param.strip().partition("=")
        params[name.lower()] = value
    return params


@dataclass
class SipRequest:
    method: str
    raw: bytes
    source: tuple[str, int]


def serve_client(sock: socket.socket, seconds: float) -> list[SipRequest]:
    """Be a passive UA on ``sock`` for ``seconds``: answer every OPTIONS with 200 (a
    keep-alive the client answers), collect every request received (CRLF keep-alives come
    back with method ``"CRLF"``). The NAT mapping sees whatever the client sends back."""
    received: list[SipRequest] = []
    deadline = time.monotonic() + seconds
    while (remaining := deadline - time.monotonic()) > 0:
        sock.settimeout(remaining)
        try:
            data, source = sock.recvfrom(65535)
        except TimeoutError:
            break
        if data.strip(b"\r\n") == b"":
            received.append(SipRequest("CRLF", data, source))
            continue
        if data.startswith(b"SIP/2.0 "):
            continue  # a stray response
        method = data.split(b" ", 1)[0].decode(errors="replace")
        received.append(SipRequest(method, data, source))
        if method == "OPTIONS":
            sock.sendto(_response_to(data, "200 OK"), source)
    return received


def _response_to(request: bytes, status: str) -> bytes:
    """A response copying Via, From, To, Call-ID and CSeq (RFC 3261 8.2.6.2)."""
    head = request.split(b"\r\n\r\n", 1)[0].decode(errors="replace").split("\r\n")[1:]
    copied = [
        line
        for line in head
        if line.split(":", 1)[0].strip().lower() in ("via", "v", "from", "f", "to", "t",
                                                     "call-id", "i", "cseq")
    ]  # fmt: skip
    # RFC 3261 8.2.6.2: the UAS adds a To tag if the request had none.
    copied = [
        f"{line};tag={secrets.token_hex(4)}"
        if line.split(":", 1)[0].strip().lower() in ("to", "t") and ";tag=" not in line
        else line
        for line in copied
    ]
    lines = [f"SIP/2.0 {status}", *copied, "Content-Length: 0"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@dataclass
class NatLab:
    """A running lab: the topology, the SBC and the registrar in core; clients in lan."""

    topology: NatTopology
    sbc: NsSbc
    registrar: NsRegistrar
    clients: list[socket.socket]

    def client(self, port: int = CLIENT_PORT) -> socket.socket:
        """A UDP socket of the client in lan, on 192.168.77.2:``port`` (closed at teardown)."""
        sock = self.topology.lan.udp_socket(LAN_CLIENT, port)
        self.clients.append(sock)
        return sock

    def register(
        self, sock: socket.socket, user: str, *, timeout: float = 3.0, **kwargs: Any
    ) -> sipwire.Response:
        """A REGISTER from ``sock`` through the NAT to the SBC; the final response."""
        data = register_request(sock.getsockname()[:2], self.sbc.access, user, **kwargs)
        sock.sendto(data, self.sbc.access)
        return final_response(sock, timeout)

    def nat_mapping(self, sock: socket.socket) -> UdpMapping | None:
        """The NAT's live mapping of ``sock`` towards the SBC's access side (conntrack)."""
        return self.topology.nat_mapping(sock.getsockname()[:2], self.sbc.access)

    def nat_mapping_alive(self, sock: socket.socket) -> bool:
        """Read-only: whether the NAT still maps ``sock`` towards the SBC (conntrack)."""
        return self.nat_mapping(sock) is not None

    def probe_client(self, sock: socket.socket, public_port: int, timeout: float = 1.0) -> bool:
        """End to end: whether a datagram from the SBC's own address and port to the NAT's
        public ``public_port`` reaches ``sock`` (it refreshes the mapping if it does)."""
        return self.topology.probe_reaches(
            sock, self.sbc.access, (NAT_PUBLIC, public_port), timeout
        )


@contextlib.contextmanager
def nat_lab(
    workdir: Path,
    *,
    kamailio: str,
    kamcmd: str,
    core: str = "",
    extra: str = "",
    udp_timeout: int = 5,
    masquerade: tuple[str, ...] | None = None,
) -> Iterator[NatLab]:
    """Topology + Kamailio + SBC in core; on exit everything is stopped by PID and the
    namespaces deleted, whatever happened. Raises NetnsError (with the logs) at exit if the
    SBC or Kamailio misbehaved: died, needed SIGKILL, exited non-zero, logged a Traceback."""
    problems: list[str] = []
    with contextlib.ExitStack() as stack:
        kwargs = {} if masquerade is None else {"masquerade": masquerade}
        topo = stack.enter_context(nat_topology(udp_timeout=udp_timeout, **kwargs))
        rundir = Path(tempfile.mkdtemp(prefix="kamnat-"))  # short: a Unix socket path
        stack.callback(shutil.rmtree, rundir, ignore_errors=True)
        registrar = NsRegistrar(
            topo.core, 0, KAMAILIO_PORT, rundir / "r0", workdir / "kamailio.log", kamailio, kamcmd
        )

        def stop_registrar() -> None:
            died = registrar.proc is not None and not registrar.running
            problem = registrar._terminate()
            print(f"--- kamailio in {topo.core.name} ({registrar.log_path}) ---")
            print("\n".join(registrar.log().splitlines()[-100:]))
            mine = ["died during the test"] if died and not registrar.stopped_by_test else []
            mine += [problem] if problem else []
            for line in mine:
                print(f"kamailio: {line}")
            problems.extend(f"kamailio: {line}" for line in mine)

        stack.callback(stop_registrar)
        registrar.start()
        sbc = launch_sbc(topo.core, workdir, sbc_config([registrar.uri], core=core, extra=extra))
        stack.callback(lambda: problems.extend(f"SBC: {p}" for p in stop_sbc(sbc)))
        wait_sbc_ready(sbc)
        lab = NatLab(topology=topo, sbc=sbc, registrar=registrar, clients=[])

        def close_clients() -> None:
            for sock in lab.clients:
                sock.close()

        stack.callback(close_clients)
        yield lab
    if problems:
        raise NetnsError("\n".join(problems))


# -- a called client in lan: a minimal UAS --------------------------------------------------
def _copied_headers(request: bytes, names: tuple[str, ...]) -> list[str]:
    """The header lines of ``request`` named in ``names`` (full or compact forms), in order."""
    head = request.split(b"\r\n\r\n", 1)[0].decode(errors="replace").split("\r\n")[1:]
    return [line for line in head if line.split(":", 1)[0].strip().lower() in names]


def uas_response(
    request: bytes,
    status: str,
    *,
    to_tag: str,
    contact: str | None = None,
    body: str = "",
) -> bytes:
    """A response of a UAS that answers ``request`` (RFC 3261 8.2.6.2, 12.1.1): Via, From,
    Call-ID, CSeq copied, To with ``to_tag`` (unless it has one), the Record-Route copied for
    a dialog-creating response (``contact`` given), and an SDP ``body``."""
    lines = [f"SIP/2.0 {status}"]
    for line in _copied_headers(
        request, ("via", "v", "from", "f", "to", "t", "call-id", "i", "cseq", "record-route")
    ):
        name = line.split(":", 1)[0].strip().lower()
        if name == "record-route" and contact is None:
            continue
        if name in ("to", "t") and ";tag=" not in line:
            line = f"{line};tag={to_tag}"
        lines.append(line)
    if contact is not None:
        lines.append(f"Contact: <{contact}>")
    if body:
        lines.append("Content-Type: application/sdp")
    lines.append(f"Content-Length: {len(body.encode())}")
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()


def answer_call(
    sock: socket.socket,
    seconds: float,
    *,
    contact: str,
    retransmit: float = 0.5,
) -> list[SipRequest]:
    """Be the called UA on ``sock`` for at most ``seconds``: answer the first INVITE with 180
    then 200 (an SDP offer-answer for ``sock``'s own address; the 200 re-sent every
    ``retransmit`` s until the ACK, RFC 3261 13.3.1.4), answer its BYE with 200 and return.
    OPTIONS keep-alives get 200 meanwhile; a retransmitted INVITE gets the last response
    again; every request received is returned, in order (``source`` is where it came from)."""
    received: list[SipRequest] = []
    own = sock.getsockname()[0]
    tag = secrets.token_hex(4)
    sdp = (
        f"v=0\r\no=client 3001 1 IN IP4 {own}\r\ns=-\r\nc=IN IP4 {own}\r\nt=0 0\r\n"
        "m=audio 44000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
    )
    last_final: tuple[bytes, tuple[str, int]] | None = None
    acked = False
    next_resend = 0.0
    deadline = time.monotonic() + seconds
    while (now := time.monotonic()) < deadline:
        if last_final is not None and not acked and now >= next_resend:
            sock.sendto(*last_final)
            next_resend = now + retransmit
        wait = deadline - now
        if last_final is not None and not acked:
            wait = min(wait, max(0.01, next_resend - now))
        sock.settimeout(wait)
        try:
            data, source = sock.recvfrom(65535)
        except TimeoutError:
            continue
        if data.startswith(b"SIP/2.0 ") or data.strip(b"\r\n") == b"":
            continue  # a stray response, or a CRLF keep-alive
        method = data.split(b" ", 1)[0].decode(errors="replace")
        received.append(SipRequest(method, data, source))
        if method == "OPTIONS":
            sock.sendto(_response_to(data, "200 OK"), source)
        elif method == "INVITE" and last_final is None:
            ringing = uas_response(data, "180 Ringing", to_tag=tag, contact=contact)
            sock.sendto(ringing, source)
            ok = uas_response(data, "200 OK", to_tag=tag, contact=contact, body=sdp)
            last_final = (ok, source)
            next_resend = time.monotonic()  # sent at the top of the loop
        elif method == "INVITE" and last_final is not None:
            sock.sendto(last_final[0], source)  # a retransmission
        elif method == "ACK":
            acked = True
        elif method == "BYE":
            sock.sendto(uas_response(data, "200 OK", to_tag=tag), source)
            return received
    return received
