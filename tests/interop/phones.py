"""Real softphones for the interop tests: baresip and linphonec playing a tone and recording
what they hear, and the checks on what they heard and what was on the wire.

- ``MediaPhone`` (a ``Baresip`` of test_baresip.py) plays a tone of its own from a WAV made by
  sox (``aufile``) and records what it decodes from the call (``sndfile``: ``*-dec.wav`` in
  its ``snd_path``); the ``phones`` fixture starts them (maybe inside a network namespace).
  ``account()`` is an account line registering through the SBC.
- ``Linphone`` is linphonec 5.1 driven through its standard input (``soundcard use files``,
  ``play``, ``record``, ``call``, ``pause``, ``resume``, ``terminate``); the ``linphones``
  fixture starts them over TLS or UDP, with SRTP mandatory or none.
- ``assert_heard()`` / ``assert_recording()``: a recording holds the other party's tone
  (dominant frequency and band-pass energy ratio, media_check.py).
- ``Sdp`` / ``CallSdps``: the SDPs in baresip's SIP trace (``-s`` prints whole messages).
- ``start_capture()`` / ``flow()`` / ``Flow.listen()``: tshark on ``lo`` and the RTP of one
  direction of one leg, read as G.711 (the tone if plain, noise if SRTP) or decrypted.
- ``media_records()``: the SBC's call records with the relay's statistics.

Used by test_media.py, test_matrix.py and lab.py.
"""

from __future__ import annotations

import base64
import contextlib
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
from .conftest import TCP, PortPool, require
from .netns import Namespace
from .test_baresip import MODULES, Baresip, BaresipError, _header, came_up, stop_all

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
            if _header(message, "CSeq").split()[-1] == method and body(message).strip():
                return message
        raise AssertionError(f"{self.name}: no {start!r} ({method}) with SDP\n{self.explain()}")


# baresip's codec modules by the codec names a test restricts a phone to, and the sample
# rate its aufile source must have for that codec (baresip 1.0 does not resample a file).
CODEC_MODULES = {"pcmu": "g711.so", "pcma": "g711.so", "g722": "g722.so", "opus": "opus.so",
                 "gsm": "gsm.so"}  # fmt: skip
CODEC_RATES = {"pcmu": 8000, "pcma": 8000, "g722": 16000, "opus": 48000, "gsm": 8000}
CODEC_CHANNELS = {"opus": 2}  # baresip's opus/48000/2 takes stereo from aufile


def phone_config(
    ctrl_port: int,
    address: str,
    tone: Path,
    recdir: Path,
    cafile: Path | None,
    codecs: tuple[str, ...] = (),
    modules: tuple[str, ...] = (),
) -> str:
    """A phone with no sound card: ``aufile`` plays ``tone`` into the call, ``sndfile``
    writes what is decoded from it (and what is encoded) into ``recdir``; G.711 only, or
    the codec modules of ``codecs`` (the account's ``audio_codecs`` then picks among them);
    ``modules``: more of baresip's modules (``dtls_srtp.so``)."""
    codec_modules = sorted({CODEC_MODULES[c.lower()] for c in codecs}) if codecs else ["g711.so"]
    codec_lines = "".join(f"module\t\t\t{m}\n" for m in [*codec_modules, *modules])
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
{codec_lines}module			srtp.so
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
    """``phones(name, hz=..., address="127.0.0.1", ns=None, cafile=None, codecs=())`` starts a baresip
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
        codecs: tuple[str, ...] = (),
        modules: tuple[str, ...] = (),
    ) -> MediaPhone:
        confdir = tmp_path / f"phone-{name}"
        recdir = confdir / "rec"
        recdir.mkdir(parents=True)
        rate = max((CODEC_RATES[c.lower()] for c in codecs), default=mc.RATE)
        channels = max((CODEC_CHANNELS.get(c.lower(), 1) for c in codecs), default=1)
        tone = mc.make_tone(
            sox, confdir / f"tone-{hz:g}.wav", hz, TONE_SECONDS, rate=rate, channels=channels
        )
        for attempt in range(3):
            if ns is None:
                pool = PortPool()
                ctrl_port = pool.port("127.0.0.1", TCP)
                pool.release()  # baresip binds it now
            else:
                ctrl_port = 4444 + attempt  # the namespace is this test's own
            (confdir / "config").write_text(
                phone_config(ctrl_port, address, tone, recdir, cafile, codecs, modules)
            )
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
            if came_up(phone, attempt):
                return phone
        raise AssertionError("unreachable")

    try:
        yield start
    finally:
        stop_all(started)


def account(
    user: str,
    proxy: str,
    transport: str,
    *,
    srtp: bool = False,
    answer: bool = False,
    mediaenc: str = "",
) -> str:
    """An account registering through the SBC at ``proxy`` (host:port) over ``transport``;
    ``srtp``: SDES-SRTP required, or ``mediaenc``: baresip's media encryption by name."""
    param = f";transport={transport}" if transport != "udp" else ""
    options = f';outbound="sip:{proxy}{param}";regint=600'
    mediaenc = mediaenc or ("srtp-mand" if srtp else "")
    options += f";mediaenc={mediaenc}" if mediaenc else ""
    options += ";answermode=auto" if answer else ""
    return f"<sip:{user}@{DOMAIN}{param}>{options}"


def talk(alice: MediaPhone, bob: MediaPhone, seconds: float = MEDIA_SECONDS) -> float:
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


def srtp_suite(phone: MediaPhone) -> str:
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
def body(message: str) -> str:
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
        text = body(message)
        conn = re.search(r"^c=IN IP[46] (\S+)", text, re.M)
        media = re.search(r"^m=audio (\d+) (\S+) ([\d ]+)$", text, re.M)
        assert conn and media, f"no audio in\n{text}"
        cryptos = {
            int(tag): (suite, base64.b64decode(key))
            for tag, suite, key in re.findall(
                r"^a=crypto:(\d+) (\S+) inline:([A-Za-z0-9+/=]+)", text, re.M
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

        def probe() -> None:
            sock.sendto(b"capture-probe", probe_to)

        capture.start(probe=probe)
    return capture


@pytest.fixture
def captures() -> Iterator[list[mc.Capture]]:
    """Captures a test started: each is stopped by its PID at teardown, whatever happened."""
    started: list[mc.Capture] = []
    yield started
    for capture in started:
        capture.stop()


# -- call records ---------------------------------------------------------------------------
def read_records(path: Path, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
    """The SBC's call records in ``path`` once there are ``count`` (or what there is after
    ``timeout``: the records are written every half second)."""
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text() if path.exists() else ""
        lines = [json.loads(line) for line in text.splitlines() if line.strip()]
        if len(lines) >= count or time.monotonic() >= deadline:
            return lines
        time.sleep(0.1)


def media_records(path: Path, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
    """The ``count`` call records, waited for; each must carry the relay's statistics with
    packets in and out for both parties of every stream. The SBC writes a
    record without them if they do not arrive within 2 s of the call's end: that is a bug."""
    lines = read_records(path, count, timeout)
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


# -- linphonec -------------------------------------------------------------------------------
@dataclass
class Linphone:
    """linphonec driven through its standard input (``soundcard use files``, ``play``,
    ``record``, ``call``, ``pause``, ``resume``, ``terminate``, ``quit``); its output and
    log are files."""

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

    def count(self, pattern: str) -> int:
        """How many times ``pattern`` is in its log (e.g. a state it moved to)."""
        return len(re.findall(pattern, self.log()))

    def wait_count(self, pattern: str, count: int, timeout: float = CALL_TIMEOUT) -> None:
        """Until ``pattern`` is in its log ``count`` times."""
        deadline = time.monotonic() + timeout
        while self.count(pattern) < count:
            if self.proc.poll() is not None or time.monotonic() >= deadline:
                raise AssertionError(f"{self.name}: not {count} x /{pattern}/\n{self.explain()}")
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


def linphone_config(
    proxy: str, user: str, ca: Path, *, transport: str = "tls", srtp: bool = True
) -> str:
    """One transport (a random local port): TLS with the server certificate checked against
    ``ca`` and its name (the proxy is then named ``localhost``: linphone does not match IP
    addresses in a certificate), or UDP. SRTP mandatory (SDES) or no media encryption."""
    assert transport in ("tls", "udp"), transport
    tls = transport == "tls"
    param = ";transport=tls" if tls else ""
    encryption = "srtp" if srtp else "none"
    return f"""\
[sip]
sip_port={0 if tls else -1}
sip_tcp_port=0
sip_tls_port={-1 if tls else 0}
default_proxy=0
root_ca={ca}
verify_server_certs=1
verify_server_cn=1
media_encryption={encryption}
media_encryption_mandatory={int(srtp)}
[rtp]
audio_rtp_port={RTP_PORTS}
[sound]
echocancellation=0
[misc]
enable_call_history=0
[proxy_0]
reg_proxy=<sip:{proxy}{param}>
reg_route=<sip:{proxy}{param};lr>
reg_identity=sip:{user}@{DOMAIN}
reg_expires=600
reg_sendregister=1
"""


@pytest.fixture
def linphones(tmp_path: Path, sox: str) -> Iterator[Callable[..., Linphone]]:
    """``linphones(name, hz=, proxy="localhost:PORT", ca=, transport="tls", srtp=True)``
    starts a linphonec registering through ``proxy`` (see ``linphone_config``), playing a
    tone of ``hz`` into its calls and recording what it hears. Each is stopped at teardown
    (quit, else SIGKILL by PID)."""
    binary = require("linphonec")
    started: list[Linphone] = []

    def start(
        name: str, *, hz: float, proxy: str, ca: Path, transport: str = "tls", srtp: bool = True
    ) -> Linphone:
        home = tmp_path / f"linphone-{name}"
        (home / ".local" / "share" / "linphone").mkdir(parents=True)
        rc = home / "linphonerc"
        rc.write_text(linphone_config(proxy, name, ca, transport=transport, srtp=srtp))
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
