"""A client behind a real kernel NAT registers through the SBC (items 4-5), and is
called over the NAT mapping of its REGISTER.

Three network namespaces (tests/interop/netns.py): ``lan`` holds the client
(192.168.77.2), ``nat`` masquerades it to 203.0.113.1 and forgets idle UDP mappings after a
few seconds, ``core`` holds the SBC (access side 203.0.113.2:5060, core side
127.0.0.1:5080) and a Kamailio registrar (127.0.0.1:5070). Nothing touches the machine's own
network: the namespaces are this test's, and are deleted afterwards, also on failure.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from . import netns, sipwire
from .conftest import SCENARIOS, require
from .netns import NatLab
from .test_calls import parse_messages

UDP_TIMEOUT = 5  # seconds an idle UDP mapping lives in the nat namespace
NatLabFactory = Callable[..., NatLab]


def require_netns() -> None:
    """Skip without root/ip/iptables, or fail under CI (``CI=true``), like ``require()``."""
    missing = netns.tools_missing()
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"NAT tests need {', '.join(missing)}")
        pytest.skip(f"NAT tests need {', '.join(missing)}")


@pytest.fixture
def nat_lab(tmp_path: Path) -> Iterator[NatLabFactory]:
    """``nat_lab(core="...", extra="...", udp_timeout=5)`` builds the namespaces and starts
    Kamailio and the SBC in core (``extra``: TOML sections appended to the SBC's config).
    Teardown stops both by PID, checks the SBC exited 0 on SIGTERM without a Traceback and
    deletes the namespaces, whatever the test did."""
    require_netns()
    kamailio, kamcmd = require("kamailio"), require("kamcmd")
    count = itertools.count()
    with contextlib.ExitStack() as stack:

        def start(**kwargs: Any) -> NatLab:
            workdir = tmp_path / f"lab{next(count)}"
            workdir.mkdir()
            return stack.enter_context(
                netns.nat_lab(workdir, kamailio=kamailio, kamcmd=kamcmd, **kwargs)
            )

        yield start


def test_register_through_nat(nat_lab: NatLabFactory) -> None:
    lab = nat_lab()
    client = lab.client()  # 192.168.77.2:5060
    private = client.getsockname()[:2]
    response = lab.register(client, "alice", contact="sip:alice@192.168.77.2:5060")
    assert response.status == 200, response.raw

    # The SBC saw the NAT's public side, and says so in the Via it returns (RFC 3581 4).
    via = netns.via_params(response)
    assert via.get("received") == netns.NAT_PUBLIC, response.get("via")
    public_port = int(via["rport"])
    assert public_port != private[1], "the NAT maps to 40000-49999: rport must be the NAT's"
    if lab.topology.conntrack_available():
        mapping = lab.nat_mapping(client)
        assert mapping is not None, lab.topology.udp_mappings()
        assert mapping.public == (netns.NAT_PUBLIC, public_port), mapping
    else:
        assert netns.NAT_PORTS[0] <= public_port <= netns.NAT_PORTS[1], public_port

    # Kamailio holds the private contact, reached through a Path naming the SBC's core side
    # with a flow token (RFC 3327): the SBC, not the backend, knows the NAT's address.
    bindings = lab.registrar.bindings()
    assert list(bindings) == ["alice"], bindings
    (binding,) = bindings["alice"]
    assert binding["contact"] == "sip:alice@192.168.77.2:5060", binding
    core_host, core_port = lab.sbc.core
    path = str(binding["path"])
    assert re.fullmatch(rf"<sip:[^@;>\s]+@{re.escape(core_host)}:{core_port};lr>", path), path
    # Neither the public side's nor the client's addresses are the backend's business in
    # the Path: it names only the SBC.
    assert netns.NAT_PUBLIC not in path and netns.LAN_CLIENT not in path, path


def test_nat_binding_expires_without_keepalives(nat_lab: NatLabFactory) -> None:
    """The baseline that makes the NAT real: an idle UDP mapping dies after the timeout, and
    then nothing from the SBC's address reaches the client any more."""
    # No keep-alive due in this test's lifetime, whatever the SBC's default.
    lab = nat_lab(udp_timeout=UDP_TIMEOUT, extra="\n[nat]\nkeepalive_interval = 3600\n")
    client = lab.client()
    response = lab.register(client, "alice", contact="sip:alice@192.168.77.2:5060")
    assert response.status == 200, response.raw
    public_port = int(netns.via_params(response)["rport"])
    conntrack = lab.topology.conntrack_available()

    # Positive control: right now a datagram from the SBC's own address and port to the
    # public mapping gets through (so a lost probe later means the mapping is gone, not that
    # the probe is broken).
    assert lab.probe_client(client, public_port), "probe did not reach the client"
    if conntrack:
        assert lab.nat_mapping_alive(client), lab.topology.udp_mappings()
    idle_since = time.monotonic()

    # Stay idle past the timeout, bounded; watch the client socket meanwhile (anything the
    # SBC sent would refresh the mapping and spoil the baseline).
    received = []
    deadline = idle_since + UDP_TIMEOUT + 3.0
    gone_after = None
    while time.monotonic() < deadline:
        client.settimeout(0.2)
        with contextlib.suppress(TimeoutError):
            received.append(client.recvfrom(65535)[0])
        if conntrack and not lab.nat_mapping_alive(client):
            gone_after = time.monotonic() - idle_since
            break
    assert not received, f"the client received during the idle wait: {received!r}"
    if conntrack:
        assert gone_after is not None, f"mapping still there: {lab.topology.udp_mappings()}"
        # It lived about as long as the configured timeout, not less.
        assert gone_after >= UDP_TIMEOUT - 1.0, gone_after
    # End to end: the same datagram as before is now dropped at the NAT.
    assert not lab.probe_client(client, public_port), "the NAT still forwards to the client"


def test_keepalives_keep_the_nat_binding_open(nat_lab: NatLabFactory) -> None:
    """The SBC's OPTIONS keep-alives keep the NAT mapping past its UDP timeout,
    so the client stays reachable from the SBC's address and port."""
    lab = nat_lab(udp_timeout=UDP_TIMEOUT, extra="\n[nat]\nkeepalive_interval = 2.0\n")
    client = lab.client()
    response = lab.register(client, "alice", contact="sip:alice@192.168.77.2:5060")
    public_port = int(netns.via_params(response)["rport"])
    received = netns.serve_client(client, UDP_TIMEOUT + 3.0)  # answers the OPTIONS
    keepalives = [r for r in received if r.method == "OPTIONS"]
    assert len(keepalives) >= 2, received  # one every keepalive_interval
    assert lab.nat_mapping_alive(client)  # read-only check first: a probe would refresh it
    assert lab.probe_client(client, public_port)


def test_parse_conntrack() -> None:
    text = (
        "ipv4     2 udp      17 3 src=192.168.77.2 dst=203.0.113.2 sport=5060 dport=5060 "
        "src=203.0.113.2 dst=203.0.113.1 sport=5060 dport=40123 [ASSURED] mark=0 zone=0 use=2\n"
        "ipv4     2 tcp      6 10 SYN_SENT src=1.2.3.4 dst=5.6.7.8 sport=1 dport=2 [UNREPLIED] "
        "src=5.6.7.8 dst=1.2.3.4 sport=2 dport=1 mark=0 zone=0 use=2\n"
    )
    (mapping,) = netns.parse_conntrack(text)
    assert mapping.private == ("192.168.77.2", 5060)
    assert mapping.remote == ("203.0.113.2", 5060)
    assert mapping.public == ("203.0.113.1", 40123)
    assert mapping.seconds_left == 3 and mapping.flags == {"ASSURED"}


CALLER_PORT = 5090  # the SIPp caller in core, beside the SBC's access side (own namespace)
CALL_SECONDS = 15.0  # SIPp's -timeout, and how long the client waits for the call


def start_caller(lab: NatLab, workdir: Path, callee: str) -> subprocess.Popen[str]:
    """SIPp (call_basic_uac.xml) inside core, calling ``callee``@example.com through the
    SBC's access side: its INVITE goes SBC -> Kamailio -> SBC -> the client behind the NAT."""
    workdir.mkdir()
    args = lab.topology.core.argv(
        require("sipp"),
        sipwire.hostport(*lab.sbc.access),
        "-sf", str(SCENARIOS / "call_basic_uac.xml"),
        "-s", callee,
        "-t", "u1",
        "-i", netns.CORE_ADDRESS,
        "-p", str(CALLER_PORT),
        "-m", "1",
        "-timeout", f"{CALL_SECONDS:g}",
        "-timeout_error",
        "-nostdin",
        "-trace_stat", "-stf", str(workdir / "stat.csv"),
        "-trace_err", "-error_file", str(workdir / "err.log"),
        "-trace_msg", "-message_file", str(workdir / "msg.log"),
    )  # fmt: skip
    return subprocess.Popen(
        args,
        cwd=workdir,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
    )


def finish_caller(proc: subprocess.Popen[str], workdir: Path) -> tuple[int, str, str]:
    """Wait for the SIPp caller (killed by its PID if it overstays); exit code, screen and
    message log."""
    try:
        out, err = proc.communicate(timeout=CALL_SECONDS + 5)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=5)
    messages = workdir / "msg.log"
    log = messages.read_text(errors="replace") if messages.exists() else ""
    return proc.returncode, out + err, log


def test_incoming_call_reaches_the_client_behind_nat(
    nat_lab: NatLabFactory, tmp_path: Path
) -> None:
    """A call from the core side reaches a client behind the kernel NAT over the
    mapping its REGISTER opened (SBC -> Kamailio -> SBC -> NAT -> client); the client
    answers, ACK and BYE cross the same way, and the client sees nothing of the core."""
    records = tmp_path / "calls.jsonl"
    lab = nat_lab(extra=f'\n[calls]\nrecords = "{records}"\n')
    client = lab.client()  # 192.168.77.2:5060
    contact = f"sip:bob@{netns.LAN_CLIENT}:{netns.CLIENT_PORT}"
    response = lab.register(client, "bob", contact=contact)
    assert response.status == 200, response.raw
    public_port = int(netns.via_params(response)["rport"])
    assert public_port != netns.CLIENT_PORT

    workdir = tmp_path / "caller"
    caller = start_caller(lab, workdir, "bob")
    try:
        got = netns.answer_call(client, CALL_SECONDS, contact=contact)
    finally:
        code, screen, log = finish_caller(caller, workdir)
    a_msgs = parse_messages(log)
    calls = [r.method for r in got if r.method != "OPTIONS"]
    assert code == 0, f"sipp exit {code}\n{screen[-3000:]}\n{log[-6000:]}\nclient got {calls}"
    assert calls == ["INVITE", "ACK", "BYE"], (calls, log[-6000:])
    labels = [m.label() for m in a_msgs if m.direction == "received"]
    assert labels[-3:] == ["180 INVITE", "200 INVITE", "200 BYE"], labels

    # Every request came from the SBC's access side, into the client's private socket: core
    # has no route to the lan, so only the NAT's mapping can have brought them here.
    invite, ack, bye = (r for r in got if r.method != "OPTIONS")
    for request in (invite, ack, bye):
        assert request.source == lab.sbc.access, request
    # The Request-URI is the contact the client registered (its private address).
    assert invite.raw.startswith(f"INVITE {contact} SIP/2.0\r\n".encode()), invite.raw[:100]
    assert b"\r\nTo: <sip:bob@example.com>" in invite.raw, invite.raw
    # ...sent to the NAT's public port: the SBC's record names the flow of the REGISTER.
    public = f"udp:{netns.NAT_PUBLIC}:{public_port}"
    assert_calls_recorded(records, public)
    if lab.topology.conntrack_available():
        mapping = lab.nat_mapping(client)
        assert mapping is not None, lab.topology.udp_mappings()
        assert mapping.public == (netns.NAT_PUBLIC, public_port), mapping
        assert "UNREPLIED" not in mapping.flags, mapping  # traffic went both ways through it

    # Nothing of the core in any header the client received: not Kamailio, not the SBC's
    # core side (127.0.0.1:5080), not the caller's own ids or port.
    caller_invite = next(m for m in a_msgs if m.direction == "sent" and m.method == "INVITE")
    secrets_ = [caller_invite.header("Call-ID"), str(caller_invite.tag("From"))]
    for request in got:
        head = request.raw.split(b"\r\n\r\n", 1)[0].decode(errors="replace")
        for needle in (
            "127.0.0.1",
            f":{netns.KAMAILIO_PORT}",
            f":{netns.SBC_CORE_PORT}",
            f":{CALLER_PORT}",
            *secrets_,
        ):
            assert needle not in head, (needle, head)
        assert "kamailio" not in head.lower(), head


def assert_calls_recorded(records: Path, access_flow: str, timeout: float = 3.0) -> None:
    """Two answered calls ended (caller -> Kamailio, Kamailio -> client); the second one's
    access leg is the client's flow through the NAT (``udp:PUBLIC_IP:PUBLIC_PORT``)."""
    deadline = time.monotonic() + timeout
    lines: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        text = records.read_text() if records.exists() else ""
        lines = [json.loads(line) for line in text.splitlines() if line.strip()]
        if len(lines) >= 2:
            break
        time.sleep(0.05)
    assert [r["status"] for r in lines] == [200, 200], lines
    flows = [leg["flow"] for r in lines for leg in r["legs"] if leg["side"] == "access"]
    assert access_flow in flows, lines
