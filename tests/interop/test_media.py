"""Real softphones talk through the SBC's media relay ("How it is shown").

alice and bob are baresip 1.0 processes (driven over ctrl_tcp, as in test_baresip.py), each
playing a tone of its own from a WAV made by sox (``aufile``: alice 1 kHz, bob 1.5 kHz) and
recording what it decodes from the call (``sndfile``: ``*-dec.wav`` in its ``snd_path``).
After the call the recordings are checked: each phone heard the other's tone (dominant
frequency and band-pass energy ratio), which is only possible if the relay moved the audio
both ways, decrypting and re-encrypting SRTP where the legs use it.

- ``test_srtp_call_between_two_access_legs``: both phones over TLS to the embedded registrar
  (no backend), SRTP mandatory (``;mediaenc=srtp-mand``, ``[media] access_srtp``). tshark on
  ``lo`` shows each access leg is SRTP: read as plain PCMU its payload is noise, decrypted
  (libsrtp, with the key from the SDP that leg's sender gave) it is the tone; each phone got
  an SDP with a key of the SBC's own, different on the two legs and never the other phone's.
- ``test_relay_sends_only_what_it_decrypted``: the same call; every packet the relay sends
  a phone carries, once decrypted, a payload the other phone sent.
- ``test_srtp_access_plain_core``: interworking, alice -(TLS, SRTP)-> SBC -(UDP, RTP)->
  Kamailio -> SBC -(TLS, SRTP)-> bob: the core leg (between the SBC's own relay ports, its
  SDP seen on the wire to Kamailio: RTP/AVP, no key) carries the tones as plain G.711.
- ``test_linphone_calls_baresip``: carol is linphonec 5.1 (TLS to the SBC by the name
  ``localhost``, SRTP mandatory), bob baresip; each hears the other.
- ``test_call_from_behind_nat``: alice in a network namespace behind a kernel MASQUERADE
  (tests/interop/netns.py) offers her private address; the relay latches onto the NAT's
  public address and port from her first packets, and the audio flows both ways. Once with
  the SBC's embedded registrar (one call), once through Kamailio (two calls).

Every call's record ([calls] records) carries the relay's statistics: packets in and out for
each party of each stream.

The SIP trace (``baresip -s``) prints whole messages, bodies included: the SDPs each phone
sent and received are read from it (the SBC does not log message bodies).
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from . import media_check as mc
from . import netns
from .conftest import Certs, RegistrarFactory, SbcFactory, require
from .phones import (  # noqa: F401 - captures, linphones, phones and sox are fixtures
    ALICE_HZ,
    BOB_HZ,
    CALL_TIMEOUT,
    DOMAIN,
    HOST,
    MEDIA_SECONDS,
    MIN_PACKETS,
    NOISE_RATIO,
    TONE_RATIO,
    CallSdps,
    Flow,
    Linphone,
    MediaPhone,
    PhoneFactory,
    Sdp,
    account,
    assert_heard,
    assert_recording,
    body,
    captures,
    flow,
    linphones,
    media_range,
    media_records,
    phones,
    sox,
    srtp_suite,
    start_capture,
    talk,
)
from .test_baresip import _backends
from .test_nat import NatLabFactory, nat_lab  # noqa: F401 - the fixture is used by name

pytestmark = pytest.mark.interop

NAT_MEDIA_PORTS = (20000, 20199)  # the SBC in its own namespace: no other SBC there
NAT_UDP_TIMEOUT = 30  # seconds an idle UDP mapping lives in the NAT: longer than a test


# =========================================================================================
# 1. SRTP on both access legs, re-keyed per leg
# =========================================================================================
@dataclass
class SrtpCall:
    """A call alice -> bob, both over TLS with mandatory SRTP, as the phones and the wire
    saw it: the SDPs, the four keys of its two legs, the captured datagrams."""

    alice: MediaPhone
    bob: MediaPhone
    sdps: CallSdps
    alice_key: tuple[str, bytes]  # alice encrypts with it (her offer, the tag chosen)
    to_alice_key: tuple[str, bytes]  # the SBC encrypts towards alice with it (its answer)
    to_bob_key: tuple[str, bytes]  # the SBC encrypts towards bob with it (its offer, tag chosen)
    bob_key: tuple[str, bytes]  # bob encrypts with it (his answer)
    datagrams: list[mc.Datagram]
    records: Path
    ports: tuple[int, int]  # the SBC's [media] range

    def flows(self) -> dict[str, tuple[Flow, tuple[str, bytes]]]:
        """Each direction of each leg, with the key that decrypts it."""
        sdps = self.sdps
        return {
            "alice->relay": (flow(self.datagrams, "alice->relay", sdps.alice_answer.rtp),
                             self.alice_key),
            "relay->bob": (flow(self.datagrams, "relay->bob", sdps.bob_answer.rtp),
                           self.to_bob_key),
            "bob->relay": (flow(self.datagrams, "bob->relay", sdps.bob_offer.rtp), self.bob_key),
            "relay->alice": (flow(self.datagrams, "relay->alice", sdps.alice_offer.rtp),
                             self.to_alice_key),
        }  # fmt: skip


def srtp_access_call(
    sbc_factory: SbcFactory,
    phones: PhoneFactory,  # noqa: F811 - the fixture imported above
    captures: list[mc.Capture],  # noqa: F811 - the fixture imported above
    certs: Certs,
    tmp_path: Path,
) -> SrtpCall:
    """Both phones register over TLS to the embedded registrar (no backend), SRTP mandatory
    on the phones and on the SBC's access side; alice calls bob under tshark on lo."""
    tshark = require("tshark")
    records = tmp_path / "calls.jsonl"
    sbc = sbc_factory(
        media='access_srtp = "mandatory"', extra=f'\n[calls]\nrecords = "{records}"\n'
    )
    low, high = media_range(sbc.config)
    proxy = f"127.0.0.1:{sbc.tls4}"
    alice = phones("alice", hz=ALICE_HZ, cafile=certs.ca)
    bob = phones("bob", hz=BOB_HZ, cafile=certs.ca)
    bob.command("uanew", account("bob", proxy, "tls", srtp=True, answer=True))
    bob.wait_event("REGISTER_OK")
    alice.command("uanew", account("alice", proxy, "tls", srtp=True))
    alice.wait_event("REGISTER_OK")

    capture = start_capture(tshark, tmp_path, "lo", f"udp portrange {low}-{high}", (HOST, low))
    captures.append(capture)
    setup = talk(alice, bob)
    assert capture.stop() == 0, capture.explain()
    print(f"call set up in {setup:.2f} s")
    sdps = CallSdps.of(alice, bob)
    return SrtpCall(
        alice=alice,
        bob=bob,
        sdps=sdps,
        alice_key=sdps.alice_offer.key(sdps.chosen_tag(sdps.alice_answer)),
        to_alice_key=sdps.alice_answer.key(),
        to_bob_key=sdps.bob_offer.key(sdps.chosen_tag(sdps.bob_answer)),
        bob_key=sdps.bob_answer.key(),
        datagrams=capture.datagrams(),
        records=records,
        ports=(low, high),
    )


def test_srtp_call_between_two_access_legs(
    sbc_factory: SbcFactory,
    phones: PhoneFactory,  # noqa: F811 - the fixture imported above
    captures: list[mc.Capture],  # noqa: F811 - the fixture imported above
    certs: Certs,
    sox: str,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
) -> None:
    call = srtp_access_call(sbc_factory, phones, captures, certs, tmp_path)
    sdps, (low, high) = call.sdps, call.ports

    # The SDPs: each phone sees the relay (its own port per leg), RTP/SAVP, and a key of
    # the SBC's, a different one on each leg, never the other phone's.
    for sdp in (sdps.alice_answer, sdps.bob_offer):
        assert sdp.address == "127.0.0.1" and low <= sdp.port <= high, sdp
        assert sdp.proto == "RTP/SAVP", sdp
    assert sdps.alice_answer.port != sdps.bob_offer.port
    keys = [k[1] for k in (call.alice_key, call.to_alice_key, call.to_bob_key, call.bob_key)]
    assert len(set(keys)) == 4, "a key was reused across legs or parties"
    assert not {k[1] for k in sdps.bob_offer.cryptos.values()} & {
        k[1] for k in sdps.alice_offer.cryptos.values()
    }, "bob was offered one of alice's keys"

    # Each phone heard the other's tone: the relay decrypted and re-encrypted both ways.
    assert srtp_suite(call.alice) and srtp_suite(call.bob)
    assert_heard(sox, call.bob, ALICE_HZ)
    assert_heard(sox, call.alice, BOB_HZ)

    # The wire: four flows, each SRTP. Read as plain PCMU a flow is noise; decrypted with
    # the key of its sender's SDP it is the tone. What the relay sends comes from the port
    # it advertised (symmetric RTP).
    flows = call.flows()
    tones = {"alice->relay": ALICE_HZ, "relay->bob": ALICE_HZ,
             "bob->relay": BOB_HZ, "relay->alice": BOB_HZ}  # fmt: skip
    sources = {"relay->bob": sdps.bob_offer.rtp, "relay->alice": sdps.alice_answer.rtp}
    summary = {}
    for name, (f, key) in flows.items():
        assert len(f.packets) >= MIN_PACKETS, (name, len(f.packets))
        if name in sources:
            assert f.sources == {sources[name]}, (name, f.sources)
        plain = f.listen(tmp_path, sox, tones[name])
        decrypted = f.listen(tmp_path, sox, tones[name], key=key)
        summary[name] = {"packets": len(f.packets), "as_pcmu": plain, "decrypted": decrypted}
        assert plain < NOISE_RATIO, (name, summary)
        assert decrypted >= TONE_RATIO, (name, summary)
    print("flows:", summary)
    # Not passed through: what bob gets does not decrypt with alice's key.
    assert flows["relay->bob"][0].listen(tmp_path, sox, ALICE_HZ, key=call.alice_key) == 0.0

    (record,) = media_records(call.records, 1)
    assert [leg["side"] for leg in record["legs"]] == ["access", "access"], record


def test_relay_sends_only_what_it_decrypted(
    sbc_factory: SbcFactory,
    phones: PhoneFactory,  # noqa: F811 - the fixture imported above
    captures: list[mc.Capture],  # noqa: F811 - the fixture imported above
    certs: Certs,
    tmp_path: Path,
) -> None:
    """Every packet the relay sends a phone, decrypted with the key the SBC gave that phone,
    carries a payload the other phone sent (decrypted with the other phone's key): nothing
    it could not decrypt is passed on. baresip sends SRTP as soon as it has answered, so
    bob's first packets reach the relay about as early as his 200 OK reaches the SBC."""
    call = srtp_access_call(sbc_factory, phones, captures, certs, tmp_path)
    flows = call.flows()

    def payloads(name: str) -> list[bytes]:
        f, key = flows[name]
        decrypted = mc.srtp_unprotect((p.raw for p in f.packets), *key)
        assert len(decrypted) == len(f.packets), f"{name}: not all decrypt with its key"
        return [r.payload for r in map(mc.parse_rtp, decrypted) if r is not None]

    for sent, relayed in (("alice->relay", "relay->bob"), ("bob->relay", "relay->alice")):
        original = set(payloads(sent))
        foreign = [i for i, p in enumerate(payloads(relayed)) if p not in original]
        assert not foreign, f"{relayed}: packets {foreign} carry nothing {sent} sent"
    media_records(call.records, 1)


# =========================================================================================
# 2. Interworking: SRTP on the access legs, plain RTP through the core
# =========================================================================================
def test_srtp_access_plain_core(
    kamailio_registrars: RegistrarFactory,
    sbc_factory: SbcFactory,
    phones: PhoneFactory,  # noqa: F811 - the fixture imported above
    captures: list[mc.Capture],  # noqa: F811 - the fixture imported above
    certs: Certs,
    sox: str,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
) -> None:
    """alice -(TLS, SRTP)-> SBC -(UDP, RTP)-> Kamailio -> SBC -(TLS, SRTP)-> bob: two calls in
    the SBC, whose core legs meet between the SBC's own relay ports (the core SDPs name them)."""
    tshark = require("tshark")
    (registrar,) = kamailio_registrars(1)
    records = tmp_path / "calls.jsonl"
    sbc = sbc_factory(
        media='access_srtp = "mandatory"\ncore_srtp = "off"',
        extra=_backends(registrar.uri) + f'\n[calls]\nrecords = "{records}"\n',
    )
    low, high = media_range(sbc.config)
    proxy = f"127.0.0.1:{sbc.tls4}"
    alice = phones("alice", hz=ALICE_HZ, cafile=certs.ca)
    bob = phones("bob", hz=BOB_HZ, cafile=certs.ca)
    bob.command("uanew", account("bob", proxy, "tls", srtp=True, answer=True))
    bob.wait_event("REGISTER_OK")
    alice.command("uanew", account("alice", proxy, "tls", srtp=True))
    alice.wait_event("REGISTER_OK")

    bpf = f"udp and (portrange {low}-{high} or port {registrar.port})"
    capture = start_capture(tshark, tmp_path, "lo", bpf, (HOST, low))
    captures.append(capture)
    setup = talk(alice, bob)
    assert capture.stop() == 0, capture.explain()
    print(f"call set up in {setup:.2f} s (through Kamailio)")

    assert_heard(sox, bob, ALICE_HZ)
    assert_heard(sox, alice, BOB_HZ)

    # The core side's SDPs, off the wire (SIP over UDP to and from Kamailio): plain RTP, no
    # key. The INVITE the SBC sent names its relay port of the first call's core leg; the
    # 200 the SBC sent back names the one of the second call's core leg.
    datagrams = capture.datagrams()
    core = sbc.extra_ports["core"]
    kamailio = (registrar.host, registrar.port)
    sip_out = [
        d.payload.decode(errors="replace").replace("\r\n", "\n")
        for d in datagrams
        if d.src == ("127.0.0.1", core) and d.dst == kamailio
    ]
    core_offer = _first_sdp(sip_out, "INVITE sip:")
    core_answer = _first_sdp(sip_out, "SIP/2.0 200")
    for sdp in (core_offer, core_answer):
        assert sdp.proto == "RTP/AVP" and not sdp.cryptos, sdp
        assert sdp.address == "127.0.0.1" and low <= sdp.port <= high, sdp

    sdps = CallSdps.of(alice, bob)
    for sdp in (sdps.alice_answer, sdps.bob_offer):
        assert sdp.proto == "RTP/SAVP" and sdp.cryptos, sdp
    alice_key = sdps.alice_offer.key(sdps.chosen_tag(sdps.alice_answer))
    bob_key = sdps.bob_answer.key()
    relay_a, relay_b = sdps.alice_answer.rtp, sdps.bob_offer.rtp
    summary = {}
    # Access legs: SRTP (noise as PCMU, the tone once decrypted).
    for f, hz, key in (
        (flow(datagrams, "alice->relay", relay_a), ALICE_HZ, alice_key),
        (flow(datagrams, "bob->relay", relay_b), BOB_HZ, bob_key),
    ):
        assert len(f.packets) >= MIN_PACKETS, (f.name, len(f.packets))
        summary[f.name] = {"packets": len(f.packets), "as_pcmu": f.listen(tmp_path, sox, hz),
                           "decrypted": f.listen(tmp_path, sox, hz, key=key)}  # fmt: skip
        assert summary[f.name]["as_pcmu"] < NOISE_RATIO, summary
        assert summary[f.name]["decrypted"] >= TONE_RATIO, summary
    # The core leg: plain RTP carrying the tones, relay port to relay port.
    for f, hz in (
        (flow(datagrams, "core: alice's audio", core_answer.rtp), ALICE_HZ),
        (flow(datagrams, "core: bob's audio", core_offer.rtp), BOB_HZ),
    ):
        assert len(f.packets) >= MIN_PACKETS, (f.name, len(f.packets))
        plain = f.listen(tmp_path, sox, hz)
        summary[f.name] = {"packets": len(f.packets), "as_pcmu": plain}
        assert plain >= TONE_RATIO, summary
    assert flow(datagrams, "", core_answer.rtp).sources == {core_offer.rtp}
    assert flow(datagrams, "", core_offer.rtp).sources == {core_answer.rtp}
    print("flows:", summary)

    lines = media_records(records, 2)
    sides = sorted((r["legs"][0]["side"], r["legs"][1]["side"]) for r in lines)
    assert sides == [("access", "core"), ("core", "access")], lines


def _first_sdp(messages: list[str], start: str) -> Sdp:
    for message in messages:
        if message.startswith(start) and "\nm=audio" in message:
            return Sdp.of(message)
    raise AssertionError(f"no {start!r} with SDP among {[m[:40] for m in messages]}")


# =========================================================================================
# 3. linphone calls baresip
# =========================================================================================


def test_linphone_calls_baresip(
    sbc_factory: SbcFactory,
    phones: PhoneFactory,  # noqa: F811 - the fixture imported above
    linphones: Callable[..., Linphone],  # noqa: F811 - the fixture imported above
    captures: list[mc.Capture],  # noqa: F811 - the fixture imported above
    certs: Certs,
    sox: str,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
) -> None:
    """carol (linphonec 5.1, TLS by the name localhost, SRTP mandatory) calls bob (baresip,
    TLS, SRTP mandatory) through the SBC (embedded registrar): each hears the other, and
    carol's leg on the wire is SRTP too (her address: where the relay latched)."""
    tshark = require("tshark")
    records = tmp_path / "calls.jsonl"
    sbc = sbc_factory(
        media='access_srtp = "mandatory"', extra=f'\n[calls]\nrecords = "{records}"\n'
    )
    low, high = media_range(sbc.config)
    bob = phones("bob", hz=BOB_HZ, cafile=certs.ca)
    bob.command("uanew", account("bob", f"{HOST}:{sbc.tls4}", "tls", srtp=True, answer=True))
    bob.wait_event("REGISTER_OK")
    carol = linphones("carol", hz=ALICE_HZ, proxy=f"localhost:{sbc.tls4}", ca=certs.ca)
    carol.wait_for(r"to \[LinphoneRegistrationOk\]")

    capture = start_capture(tshark, tmp_path, "lo", f"udp portrange {low}-{high}", (HOST, low))
    captures.append(capture)
    carol.send(f"call sip:bob@{DOMAIN}")
    bob.wait_event("CALL_ESTABLISHED", timeout=CALL_TIMEOUT)
    carol.wait_for(r"to LinphoneCallStreamsRunning")
    time.sleep(MEDIA_SECONDS)
    carol.send("terminate")
    bob.wait_event("CALL_CLOSED", timeout=CALL_TIMEOUT)
    carol.wait_for(r"to LinphoneCallReleased")
    assert capture.stop() == 0, capture.explain()

    bob_offer = Sdp.of(bob.sent("INVITE sip:", "INVITE"))
    assert bob_offer.proto == "RTP/SAVP" and bob_offer.cryptos, bob_offer
    assert bob_offer.address == HOST and low <= bob_offer.port <= high, bob_offer
    assert srtp_suite(bob)
    (record,) = media_records(records, 1)

    # carol's leg: she sends from where the relay latched; both directions are SRTP.
    latched = record["media"][0]["caller"]["latched"]
    assert latched is not None, record
    datagrams = capture.datagrams()
    to_carol = flow(datagrams, "relay->carol", (latched[0], latched[1]))
    assert len(to_carol.sources) == 1, to_carol.sources
    (relay_c,) = to_carol.sources
    from_carol = flow(datagrams, "carol->relay", relay_c)
    times = [d.at for d in datagrams if d.dst == (latched[0], latched[1])]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    timing = {"packets": len(times), "max_gap_ms": round(1000 * max(gaps, default=0.0), 1)}
    print(f"relay->carol: {timing}")
    for f, hz in ((to_carol, BOB_HZ), (from_carol, ALICE_HZ)):
        assert len(f.packets) >= MIN_PACKETS, (f.name, len(f.packets))
        assert f.listen(tmp_path, sox, hz) < NOISE_RATIO, f.name

    assert_heard(sox, bob, ALICE_HZ)
    assert_recording(
        sox, "carol", carol.recording, BOB_HZ, lambda: f"relay->carol {timing}\n{carol.explain()}"
    )


# =========================================================================================
# 4. A caller behind a kernel NAT: latching
# =========================================================================================
@dataclass
class NatSbc:
    """The SBC in ``core`` (access side 203.0.113.2:5060) and the NAT in front of ``lan``."""

    topology: netns.NatTopology
    records: Path
    backend: bool


def _nat_media(records: Path) -> str:
    return f"""
[media]
access_address = "{netns.CORE_ADDRESS}"
core_address = "127.0.0.1"
ports = "{NAT_MEDIA_PORTS[0]}-{NAT_MEDIA_PORTS[1]}"
workers = 1

[calls]
records = "{records}"
"""


@contextlib.contextmanager
def _sbc_behind_nat(workdir: Path, extra: str) -> Iterator[netns.NatTopology]:
    """The topology of netns.py with only the SBC in core (no backend: its embedded
    registrar), stopped by its PID and the namespaces deleted on exit, whatever happened."""
    problems: list[str] = []
    with contextlib.ExitStack() as stack:
        topology = stack.enter_context(netns.nat_topology(udp_timeout=NAT_UDP_TIMEOUT))
        sbc = netns.launch_sbc(topology.core, workdir, netns.sbc_config([], extra=extra))
        stack.callback(lambda: problems.extend(netns.stop_sbc(sbc)))
        netns.wait_sbc_ready(sbc)
        yield topology
    if problems:
        raise netns.NetnsError("\n".join(problems))


@pytest.fixture
def nat_sbc(
    request: pytest.FixtureRequest,
    nat_lab: NatLabFactory,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
) -> Iterator[NatSbc]:
    """Parametrized by whether a Kamailio backend is in the path (``nat_lab``) or not;
    ``nat_lab``'s setup checks for root, ip and iptables either way (see test_nat.py)."""
    records = tmp_path / "calls.jsonl"
    if request.param:
        lab = nat_lab(udp_timeout=NAT_UDP_TIMEOUT, extra=_nat_media(records))
        yield NatSbc(lab.topology, records, True)
        return
    workdir = tmp_path / "nat-sbc"
    workdir.mkdir()
    with _sbc_behind_nat(workdir, _nat_media(records)) as topology:
        yield NatSbc(topology, records, False)


@pytest.mark.parametrize(
    "nat_sbc",
    [
        pytest.param(False, id="embedded-registrar"),
        pytest.param(True, id="through-kamailio"),
    ],
    indirect=True,
)
def test_call_from_behind_nat(
    nat_sbc: NatSbc,
    phones: PhoneFactory,  # noqa: F811 - the fixture imported above
    sox: str,  # noqa: F811 - the fixture imported above
) -> None:
    """alice (192.168.77.2, in lan) behind the NAT (203.0.113.1) calls bob, who is beside
    the SBC (in core, 203.0.113.2). alice's SDP names her private address, which nothing in
    core can reach; the relay sends to where her packets come from (the NAT's mapping), so
    she hears bob, and bob hears her. Without a backend the call is one B2BUA call between
    two access legs; through Kamailio it is two, whose core legs meet in the SBC's relay."""
    topology = nat_sbc.topology
    proxy = f"{netns.CORE_ADDRESS}:{netns.ACCESS_PORT}"
    alice = phones("alice", hz=ALICE_HZ, address=netns.LAN_CLIENT, ns=topology.lan)
    bob = phones("bob", hz=BOB_HZ, address=netns.CORE_ADDRESS, ns=topology.core)
    bob.command("uanew", account("bob", proxy, "udp", answer=True))
    bob.wait_event("REGISTER_OK")
    alice.command("uanew", account("alice", proxy, "udp"))
    alice.wait_event("REGISTER_OK")

    setup = talk(alice, bob)
    print(f"call set up in {setup:.2f} s (backend: {nat_sbc.backend})")

    sdps = CallSdps.of(alice, bob)
    assert sdps.alice_offer.address == netns.LAN_CLIENT, sdps.alice_offer  # private
    low, high = NAT_MEDIA_PORTS
    for sdp in (sdps.alice_answer, sdps.bob_offer):
        assert sdp.address == netns.CORE_ADDRESS and low <= sdp.port <= high, sdp
    bob_invite = bob.sent("INVITE sip:", "INVITE")
    assert netns.LAN_CLIENT not in body(bob_invite), bob_invite  # not in o= either

    assert_heard(sox, bob, ALICE_HZ)
    assert_heard(sox, alice, BOB_HZ)

    # The relay latched onto the NAT's mapping of alice's RTP port: the call record says
    # where it sent, and the NAT's conntrack table agrees.
    lines = media_records(nat_sbc.records, 2 if nat_sbc.backend else 1)
    caller_call = next(r for r in lines if r["legs"][0]["side"] == "access")
    latched = caller_call["media"][0]["caller"]["latched"]
    assert latched is not None and latched[0] == netns.NAT_PUBLIC, caller_call
    assert netns.NAT_PORTS[0] <= latched[1] <= netns.NAT_PORTS[1], caller_call
    assert latched[1] != sdps.alice_offer.port, caller_call
    if topology.conntrack_available():
        mapping = topology.nat_mapping(sdps.alice_offer.rtp, sdps.alice_answer.rtp)
        assert mapping is not None, topology.udp_mappings()
        assert mapping.public == (latched[0], latched[1]), (mapping, latched)
