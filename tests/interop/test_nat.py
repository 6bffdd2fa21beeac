"""A client behind a real kernel NAT registers through the SBC (issue 3, items 4-5).

Three network namespaces (tests/interop/netns.py): ``lan`` holds the client
(192.168.77.2), ``nat`` masquerades it to 203.0.113.1 and forgets idle UDP mappings after a
few seconds, ``core`` holds the SBC (access side 203.0.113.2:5060, core side
127.0.0.1:5080) and a Kamailio registrar (127.0.0.1:5070). Nothing touches the machine's own
network: the namespaces are this test's, and are deleted afterwards, also on failure.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from . import netns
from .conftest import require
from .netns import NatLab

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
    """Issue 3 item 5: the SBC's OPTIONS keep-alives keep the NAT mapping past its UDP timeout,
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
