"""Real softphones talk through the SBC's media relay (issue 5, "How it is shown").

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

import base64
import contextlib
import itertools
import json
import re
import socket
import subprocess
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from . import media_check as mc
from . import netns
from .conftest import TCP, Certs, PortPool, RegistrarFactory, SbcFactory, require
from .netns import Namespace
from .test_baresip import CTRL_FAILED, MODULES, Baresip, BaresipError, _backends, _header
from .test_nat import NatLabFactory, nat_lab  # noqa: F401 - the fixture is used by name

pytestmark = pytest.mark.interop

HOST = "127.0.0.1"
DOMAIN = "example.com"
ALICE_HZ = 1000.0
BOB_HZ = 1500.0
TONE_SECONDS = 30  # longer than any call: the test hangs up, not the end of the file
MEDIA_SECONDS = 3.0  # how long each call lasts once both phones say it is established
MIN_HEARD = 2.0  # seconds of audio each recording must hold at least
CALL_TIMEOUT = 10.0
LIFETIME = 45  # baresip -t: it quits by itself after this whatever the test does
CAPTURE_SECONDS = 30  # tshark -a duration
MIN_PACKETS = 50  # per direction of each leg in MEDIA_SECONDS (50 packets/s at ptime 20)
TONE_RATIO = 0.9  # band-pass energy over total: the tone is about 1.0
NOISE_RATIO = 0.3  # SRTP read as PCMU is noise: about 0.05 in a 200 Hz band
RTP_PORTS = "61000-64999"  # the phones' RTP ports: above the ephemeral ports and every relay range
NAT_MEDIA_PORTS = (20000, 20199)  # the SBC in its own namespace: no other SBC there
NAT_UDP_TIMEOUT = 30  # seconds an idle UDP mapping lives in the NAT: longer than a test


# -- the phones -------------------------------------------------------------------------------
@dataclass
class MediaPhone(Baresip):
    """A baresip that plays a tone and records what it hears, maybe inside a namespace."""

    name: str = ""
    recdir: Path | None = None
    ns: Namespace | None = None

    def connect(self, timeout: float = 5.0) -> None:
        if self.ns is None:
            super().connect(timeout)
            return
        # ctrl_tcp listens on 127.0.0.1 inside the namespace: the socket must be made there.
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise BaresipError(f"baresip exited with {self.proc.returncode}\n{self.explain()}")
            sock = self.ns.new_socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.settimeout(0.5)
            try:
                sock.connect(("127.0.0.1", self.ctrl_port))
                self.sock = sock
                return
            except OSError as exc:
                sock.close()
                if time.monotonic() >= deadline:
                    raise BaresipError(
                        f"ctrl_tcp not up in {self.ns.name} within {timeout} s: {exc}"
                    ) from exc
                time.sleep(0.05)

    def recording(self) -> Path:
        """The one recording of what this phone decoded in its call."""
        assert self.recdir is not None
        files = sorted(self.recdir.glob("*-dec.wav"))
        assert len(files) == 1, f"{self.name}: recordings {files}\n{self.explain()}"
        return files[0]

    def sent(self, start: str, method: str) -> str:
        """The first message with an SDP body starting with ``start`` whose CSeq method is
        ``method`` in this phone's SIP trace (whole, with its trace line first)."""
        for message in self.trace(start):
            if _header(message, "CSeq").split()[-1] == method and _body(message).strip():
                return message
        raise AssertionError(f"{self.name}: no {start!r} ({method}) with SDP\n{self.explain()}")


def _phone_config(
    ctrl_port: int, address: str, tone: Path, recdir: Path, cafile: Path | None
) -> str:
    """A phone with no sound card: ``aufile`` plays ``tone`` into the call, ``sndfile``
    writes what is decoded from it (and what is encoded) into ``recdir``; G.711 only."""
    return f"""\
poll_method		epoll
sip_listen		{address}:0
{f"sip_cafile		{cafile}" if cafile else ""}
net_interface		{address}
call_max_calls		1
rtp_ports		{RTP_PORTS}
audio_player		aufile,/dev/null
audio_source		aufile,{tone}
audio_alert		aufile,/dev/null
module_path		{MODULES}
module			g711.so
module			srtp.so
module			aufile.so
module			sndfile.so
snd_path		{recdir}
module_tmp		uuid.so
module_tmp		account.so
module_app		menu.so
module_app		ctrl_tcp.so
ctrl_tcp_listen		127.0.0.1:{ctrl_port}
"""


PhoneFactory = Callable[..., MediaPhone]


@pytest.fixture
def sox() -> str:
    return require("sox")


@pytest.fixture
def phones(tmp_path: Path, sox: str) -> Iterator[PhoneFactory]:
    """``phones(name, hz=..., address="127.0.0.1", ns=None, cafile=None)`` starts a baresip
    playing a tone of ``hz`` (made here with sox), connected to its control socket, inside
    namespace ``ns`` if given. Each is stopped by its PID at teardown (``ip netns exec``
    execs baresip: the PID is baresip's)."""
    binary = require("baresip")
    started: list[MediaPhone] = []

    def start(
        name: str,
        *,
        hz: float,
        address: str = "127.0.0.1",
        ns: Namespace | None = None,
        cafile: Path | None = None,
    ) -> MediaPhone:
        confdir = tmp_path / f"phone-{name}"
        recdir = confdir / "rec"
        recdir.mkdir(parents=True)
        tone = mc.make_tone(sox, confdir / f"tone-{hz:g}.wav", hz, TONE_SECONDS)
        for attempt in range(3):
            if ns is None:
                pool = PortPool()
                ctrl_port = pool.port("127.0.0.1", TCP)
                pool.release()  # baresip binds it now
            else:
                ctrl_port = 4444 + attempt  # the namespace is this test's own
            (confdir / "config").write_text(_phone_config(ctrl_port, address, tone, recdir, cafile))
            (confdir / "accounts").write_text("")
            log_path = confdir / f"baresip-{attempt}.log"
            argv = [binary, "-f", str(confdir), "-t", str(LIFETIME), "-s"]
            with log_path.open("wb") as log:
                proc = subprocess.Popen(
                    ns.argv(*argv) if ns is not None else argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                )
            phone = MediaPhone(
                proc=proc,
                confdir=confdir,
                log_path=log_path,
                ctrl_port=ctrl_port,
                name=name,
                recdir=recdir,
                ns=ns,
            )
            started.append(phone)
            try:
                phone.wait_ready()
                phone.connect()
                return phone
            except BaresipError as exc:
                phone.stop()
                if CTRL_FAILED not in phone.log() or attempt == 2:
                    pytest.fail(str(exc))
        raise AssertionError("unreachable")

    try:
        yield start
    finally:
        problems = []
        for phone in started:
            problem = phone.stop()
            print(f"--- baresip {phone.name} ({phone.log_path}) ---\n{phone.explain()}")
            if problem:
                problems.append(f"{phone.name}: {problem}")
        assert not problems, "\n".join(problems)


def _account(
    user: str, proxy: str, transport: str, *, srtp: bool = False, answer: bool = False
) -> str:
    """An account registering through the SBC at ``proxy`` (host:port) over ``transport``."""
    param = f";transport={transport}" if transport != "udp" else ""
    options = f';outbound="sip:{proxy}{param}";regint=600'
    options += ";mediaenc=srtp-mand" if srtp else ""
    options += ";answermode=auto" if answer else ""
    return f"<sip:{user}@{DOMAIN}{param}>{options}"


def _talk(alice: MediaPhone, bob: MediaPhone, seconds: float = MEDIA_SECONDS) -> float:
    """alice calls bob (who answers by himself), they talk ``seconds``, alice hangs up;
    how long the call took to be established."""
    start = time.monotonic()
    alice.command("dial", f"sip:bob@{DOMAIN}")
    alice.wait_event("CALL_ESTABLISHED", timeout=CALL_TIMEOUT)
    bob.wait_event("CALL_ESTABLISHED", timeout=CALL_TIMEOUT)
    setup = time.monotonic() - start
    time.sleep(seconds)
    alice.command("hangup")
    alice.wait_event("CALL_CLOSED", timeout=CALL_TIMEOUT)
    bob.wait_event("CALL_CLOSED", timeout=CALL_TIMEOUT)
    return setup


def _srtp_suite(phone: MediaPhone) -> str:
    """The suite baresip says its leg uses (CALL_MENC: ``0,audio,SUITE``)."""
    events = [e for e in phone.events if e.get("type") == "CALL_MENC"]
    assert events, f"{phone.name}: no SRTP on its leg\n{phone.explain()}"
    return str(events[-1]["param"]).split(",")[-1]


def assert_heard(sox: str, phone: MediaPhone, hz: float) -> dict[str, float]:
    """``phone`` recorded at least MIN_HEARD s of audio, and it is the tone ``hz``."""
    return assert_recording(sox, phone.name, phone.recording(), hz, phone.explain)


def assert_recording(
    sox: str, name: str, recording: Path, hz: float, explain: Callable[[], str]
) -> dict[str, float]:
    assert recording.exists(), f"{name} recorded nothing\n{explain()}"
    rate, _, seconds = mc.wav_info(recording)
    assert seconds >= MIN_HEARD, f"{name} heard {seconds} s of audio\n{explain()}"
    ratio = mc.band_energy_ratio(sox, recording, hz)
    frequency = mc.dominant_frequency(mc.read_wav(recording), rate)
    heard = {"seconds": seconds, "ratio": ratio, "frequency": frequency}
    print(f"{name} heard: {heard}")
    assert abs(frequency - hz) <= 10, f"{name} heard {heard}, not {hz} Hz"
    assert ratio >= TONE_RATIO, f"{name} heard {heard}, not {hz} Hz"
    return heard


# -- SDP ----------------------------------------------------------------------------------------
def _body(message: str) -> str:
    parts = message.split("\n\n", 1)
    return parts[1] if len(parts) == 2 else ""


@dataclass(frozen=True)
class Sdp:
    address: str
    port: int
    proto: str
    payload_types: tuple[int, ...]
    cryptos: dict[int, tuple[str, bytes]]  # tag -> (suite, master key || salt)

    @classmethod
    def of(cls, message: str) -> Sdp:
        body = _body(message)
        conn = re.search(r"^c=IN IP[46] (\S+)", body, re.M)
        media = re.search(r"^m=audio (\d+) (\S+) ([\d ]+)$", body, re.M)
        assert conn and media, f"no audio in\n{body}"
        cryptos = {
            int(tag): (suite, base64.b64decode(key))
            for tag, suite, key in re.findall(
                r"^a=crypto:(\d+) (\S+) inline:([A-Za-z0-9+/=]+)", body, re.M
            )
        }
        return cls(
            address=conn[1],
            port=int(media[1]),
            proto=media[2],
            payload_types=tuple(int(pt) for pt in media[3].split()),
            cryptos=cryptos,
        )

    @property
    def rtp(self) -> tuple[str, int]:
        return (self.address, self.port)

    def key(self, tag: int | None = None) -> tuple[str, bytes]:
        """The one crypto line of an answer, or the offer's line with ``tag``."""
        if tag is None:
            assert len(self.cryptos) == 1, self.cryptos
            return next(iter(self.cryptos.values()))
        return self.cryptos[tag]


@dataclass(frozen=True)
class CallSdps:
    """The four SDPs of a call alice -> bob, as the phones saw them."""

    alice_offer: Sdp  # what alice sent
    alice_answer: Sdp  # what alice received (from the SBC)
    bob_offer: Sdp  # what bob received (from the SBC)
    bob_answer: Sdp  # what bob sent

    @classmethod
    def of(cls, alice: MediaPhone, bob: MediaPhone) -> CallSdps:
        return cls(
            alice_offer=Sdp.of(alice.sent("INVITE sip:", "INVITE")),
            alice_answer=Sdp.of(alice.sent("SIP/2.0 200", "INVITE")),
            bob_offer=Sdp.of(bob.sent("INVITE sip:", "INVITE")),
            bob_answer=Sdp.of(bob.sent("SIP/2.0 200", "INVITE")),
        )

    def chosen_tag(self, answer: Sdp) -> int:
        (tag,) = answer.cryptos
        return tag


def media_range(sbc_config: Path) -> tuple[int, int]:
    low, high = tomllib.loads(sbc_config.read_text())["media"]["ports"].split("-")
    return int(low), int(high)


# -- the wire -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Flow:
    """The RTP packets of one direction of one leg, as captured."""

    name: str
    packets: list[mc.Rtp]
    sources: set[tuple[str, int]]

    def listen(self, tmp_path: Path, sox: str, hz: float, *, key: tuple[str, bytes] | None = None,
               ) -> float:  # fmt: skip
        """The payloads (decrypted with ``key`` if given) read as G.711 of the negotiated
        payload type: the energy ratio of the tone ``hz``; 0.0 if nothing decrypts."""
        packets = [p.raw for p in self.packets]
        if key is not None:
            packets = mc.srtp_unprotect(packets, key[0], key[1])
        rtp = [r for r in map(mc.parse_rtp, packets) if r is not None]
        if not rtp:
            return 0.0
        table = mc.G711.get(rtp[0].payload_type, mc.ULAW)
        samples = mc.g711_decode((r.payload for r in rtp), table)
        name = re.sub(r"\W+", "-", self.name)
        wav = mc.write_wav(tmp_path / f"{name}{'-decrypted' if key else ''}.wav", samples)
        return mc.band_energy_ratio(sox, wav, hz)


def flow(datagrams: list[mc.Datagram], name: str, dst: tuple[str, int]) -> Flow:
    """The RTP datagrams sent to ``dst`` (RTCP and non-RTP left out)."""
    packets, sources = [], set()
    for d in datagrams:
        if d.dst == dst:
            rtp = mc.parse_rtp(d.payload)
            if rtp is not None:
                packets.append(rtp)
                sources.add(d.src)
    return Flow(name, packets, sources)


def start_capture(
    tshark: str, tmp_path: Path, name: str, bpf: str, probe_to: tuple[str, int]
) -> mc.Capture:
    """tshark on ``lo``, returned once a probe datagram to ``probe_to`` (which ``bpf``
    must match; nothing listens there yet) is in its file."""
    capture = mc.Capture(tshark, "lo", bpf, tmp_path / f"{name}.pcap", duration=CAPTURE_SECONDS)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        capture.start(probe=lambda: sock.sendto(b"capture-probe", probe_to))
    return capture


@pytest.fixture
def captures() -> Iterator[list[mc.Capture]]:
    """Captures a test started: each is stopped by its PID at teardown, whatever happened."""
    started: list[mc.Capture] = []
    yield started
    for capture in started:
        capture.stop()


# -- call records ---------------------------------------------------------------------------
def media_records(path: Path, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
    """The ``count`` call records, waited for; each must carry the relay's statistics with
    packets in and out for both parties of every stream (issue 5 item 7). The SBC writes a
    record without them if they do not arrive within 2 s of the call's end: that is a bug."""
    deadline = time.monotonic() + timeout
    lines: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        lines = [json.loads(line) for line in text.splitlines() if line.strip()]
        if len(lines) >= count:
            break
        time.sleep(0.1)
    assert len(lines) == count, lines
    for record in lines:
        assert record["status"] == 200, record
        media = record["media"]
        assert media, f"call record without media statistics: {record}"
        assert [s["index"] for s in media] == [0], record
        for party in ("caller", "callee"):
            stats = media[0][party]
            assert stats["packets_in"] > 0 and stats["packets_out"] > 0, (party, record)
            assert stats["bytes_in"] > 0 and stats["bytes_out"] > 0, (party, record)
    print("call records:", json.dumps(lines, indent=1))
    return lines


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
    phones: PhoneFactory,
    captures: list[mc.Capture],
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
    bob.command("uanew", _account("bob", proxy, "tls", srtp=True, answer=True))
    bob.wait_event("REGISTER_OK")
    alice.command("uanew", _account("alice", proxy, "tls", srtp=True))
    alice.wait_event("REGISTER_OK")

    capture = start_capture(tshark, tmp_path, "lo", f"udp portrange {low}-{high}", (HOST, low))
    captures.append(capture)
    setup = _talk(alice, bob)
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
    phones: PhoneFactory,
    captures: list[mc.Capture],
    certs: Certs,
    sox: str,
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
    assert _srtp_suite(call.alice) and _srtp_suite(call.bob)
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
    phones: PhoneFactory,
    captures: list[mc.Capture],
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
    phones: PhoneFactory,
    captures: list[mc.Capture],
    certs: Certs,
    sox: str,
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
    bob.command("uanew", _account("bob", proxy, "tls", srtp=True, answer=True))
    bob.wait_event("REGISTER_OK")
    alice.command("uanew", _account("alice", proxy, "tls", srtp=True))
    alice.wait_event("REGISTER_OK")

    bpf = f"udp and (portrange {low}-{high} or port {registrar.port})"
    capture = start_capture(tshark, tmp_path, "lo", bpf, (HOST, low))
    captures.append(capture)
    setup = _talk(alice, bob)
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
@dataclass
class Linphone:
    """linphonec driven through its standard input (``soundcard use files``, ``play``,
    ``record``, ``call``, ``terminate``, ``quit``); its output and log are files."""

    name: str
    proc: subprocess.Popen[str]
    out_path: Path
    log_path: Path
    recording: Path

    def output(self) -> str:
        return self.out_path.read_text(errors="replace") if self.out_path.exists() else ""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def explain(self) -> str:
        states = "\n".join(re.findall(r"^.*moving from state.*$", self.log(), re.M))
        return f"--- linphonec output ---\n{self.output()[-3000:]}\n--- states ---\n{states}"

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def wait_for(self, pattern: str, timeout: float = CALL_TIMEOUT) -> re.Match[str]:
        """Until ``pattern`` is in its log (-d 6: every state change) or output."""
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.log()) or re.search(pattern, self.output())
            if match:
                return match
            if self.proc.poll() is not None or time.monotonic() >= deadline:
                raise AssertionError(f"{self.name}: no /{pattern}/\n{self.explain()}")
            time.sleep(0.05)

    def stop(self, timeout: float = 5.0) -> str | None:
        """``quit`` (it un-registers), wait; SIGKILL by PID if it stays."""
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                self.send("quit")
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)
                return f"linphonec {self.name} not gone {timeout} s after quit; killed"
        return None


def _linphone_config(proxy: str, user: str, ca: Path) -> str:
    """TLS only (random local port), SRTP mandatory (SDES), the server certificate checked
    against ``ca`` and its name (the proxy is named ``localhost``: linphone does not match
    IP addresses in a certificate)."""
    return f"""\
[sip]
sip_port=0
sip_tcp_port=0
sip_tls_port=-1
default_proxy=0
root_ca={ca}
verify_server_certs=1
verify_server_cn=1
media_encryption=srtp
media_encryption_mandatory=1
[rtp]
audio_rtp_port={RTP_PORTS}
[sound]
echocancellation=0
[misc]
enable_call_history=0
[proxy_0]
reg_proxy=<sip:{proxy};transport=tls>
reg_route=<sip:{proxy};transport=tls;lr>
reg_identity=sip:{user}@{DOMAIN}
reg_expires=600
reg_sendregister=1
"""


@pytest.fixture
def linphones(tmp_path: Path, sox: str) -> Iterator[Callable[..., Linphone]]:
    """``linphones(name, hz=, proxy="localhost:PORT", ca=)`` starts a linphonec registering
    through ``proxy`` over TLS, playing a tone of ``hz`` into its calls and recording what
    it hears. Each is stopped at teardown (quit, else SIGKILL by PID)."""
    binary = require("linphonec")
    started: list[Linphone] = []

    def start(name: str, *, hz: float, proxy: str, ca: Path) -> Linphone:
        home = tmp_path / f"linphone-{name}"
        (home / ".local" / "share" / "linphone").mkdir(parents=True)
        rc = home / "linphonerc"
        rc.write_text(_linphone_config(proxy, name, ca))
        tone = mc.make_tone(sox, home / f"tone-{hz:g}.wav", hz, TONE_SECONDS)
        recording = home / "heard.wav"
        out_path, log_path = home / "linphonec.out", home / "linphonec.log"
        with out_path.open("w") as out:
            proc = subprocess.Popen(
                [binary, "-c", str(rc), "-d", "6", "-l", str(log_path)],
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                env={"HOME": str(home), "PATH": "/usr/bin:/bin"},
            )
        phone = Linphone(name, proc, out_path, log_path, recording)
        started.append(phone)
        phone.send("soundcard use files")
        phone.send(f"play {tone}")
        phone.send(f"record {recording}")
        return phone

    try:
        yield start
    finally:
        problems = []
        for phone in started:
            problem = phone.stop()
            print(f"--- linphonec {phone.name} ---\n{phone.explain()}")
            if problem:
                problems.append(problem)
        assert not problems, "\n".join(problems)


def test_linphone_calls_baresip(
    sbc_factory: SbcFactory,
    phones: PhoneFactory,
    linphones: Callable[..., Linphone],
    captures: list[mc.Capture],
    certs: Certs,
    sox: str,
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
    bob.command("uanew", _account("bob", f"{HOST}:{sbc.tls4}", "tls", srtp=True, answer=True))
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
    assert _srtp_suite(bob)
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
def test_call_from_behind_nat(nat_sbc: NatSbc, phones: PhoneFactory, sox: str) -> None:
    """alice (192.168.77.2, in lan) behind the NAT (203.0.113.1) calls bob, who is beside
    the SBC (in core, 203.0.113.2). alice's SDP names her private address, which nothing in
    core can reach; the relay sends to where her packets come from (the NAT's mapping), so
    she hears bob, and bob hears her. Without a backend the call is one B2BUA call between
    two access legs; through Kamailio it is two, whose core legs meet in the SBC's relay."""
    topology = nat_sbc.topology
    proxy = f"{netns.CORE_ADDRESS}:{netns.ACCESS_PORT}"
    alice = phones("alice", hz=ALICE_HZ, address=netns.LAN_CLIENT, ns=topology.lan)
    bob = phones("bob", hz=BOB_HZ, address=netns.CORE_ADDRESS, ns=topology.core)
    bob.command("uanew", _account("bob", proxy, "udp", answer=True))
    bob.wait_event("REGISTER_OK")
    alice.command("uanew", _account("alice", proxy, "udp"))
    alice.wait_event("REGISTER_OK")

    setup = _talk(alice, bob)
    print(f"call set up in {setup:.2f} s (backend: {nat_sbc.backend})")

    sdps = CallSdps.of(alice, bob)
    assert sdps.alice_offer.address == netns.LAN_CLIENT, sdps.alice_offer  # private
    low, high = NAT_MEDIA_PORTS
    for sdp in (sdps.alice_answer, sdps.bob_offer):
        assert sdp.address == netns.CORE_ADDRESS and low <= sdp.port <= high, sdp
    bob_invite = bob.sent("INVITE sip:", "INVITE")
    assert netns.LAN_CLIENT not in _body(bob_invite), bob_invite  # not in o= either

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
