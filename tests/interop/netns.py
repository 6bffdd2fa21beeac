"""Network namespaces for NAT tests: a client behind a real kernel NAT, facing the SBC.

    lan  eth0 192.168.77.2/24 --veth-- lan0 192.168.77.1  nat  wan0 203.0.113.1/24 --veth--
    eth0 203.0.113.2/24  core  (+ lo 127.0.0.1: the SBC's core side and Kamailio)

``nat`` forwards (ip_forward=1), masquerades everything leaving wan0 (iptables-nft; UDP/TCP
to the public ports 40000-49999, so a mapped port never equals the client's own), lets
lan->wan through and only ESTABLISHED,RELATED back, and forgets an idle UDP mapping after
``udp_timeout`` seconds (``nf_conntrack_udp_timeout`` and ``..._udp_timeout_stream``, set
inside ``nat`` only; the machine's own values are untouched).

Namespace names carry the test process's PID and a counter, so parallel runs do not collide;
``nat_topology()`` deletes every namespace it created, also when building them fails.

Sockets: ``Namespace.socket()`` opens a socket *inside* a namespace from this process (a
short-lived thread calls setns(2) and creates it; a socket stays in the namespace it was
created in), so the tests drive the client with plain Python sockets.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import re
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

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
    """An ``ip``/``iptables``/``sysctl`` command failed while building the topology."""


def tools_missing() -> list[str]:
    """What this module needs and the machine lacks (root counts as a tool)."""
    missing = [tool for tool in ("ip", "iptables") if shutil.which(tool) is None]
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

    def socket(
        self, family: int = socket.AF_INET, kind: int = socket.SOCK_DGRAM, proto: int = 0
    ) -> socket.socket:
        """A socket living in this namespace (created by a thread that entered it)."""
        result: list[socket.socket | BaseException] = []

        def enter_and_create() -> None:
            try:
                fd = os.open(self.path, os.O_RDONLY)
                try:
                    if _libc.setns(fd, _CLONE_NEWNET) != 0:
                        errno = ctypes.get_errno()
                        raise OSError(errno, f"setns({self.path}): {os.strerror(errno)}")
                finally:
                    os.close(fd)
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
        sock = self.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        return sock


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
            self.core.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
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
