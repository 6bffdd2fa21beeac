"""A real browser (headless Chromium) talks to SIP phones through the SBC's WebRTC gateway.

The SBC's access side listens on ``ws://`` and ``wss://`` as well as UDP and TLS: the same
listener serves the browser softphone (sbc/static/, a plain HTTP GET) and carries its SIP
over WebSocket (RFC 7118); the SBC terminates the browser's ICE (it is ICE-lite) and
DTLS-SRTP and bridges the audio to baresip, which talks TLS and SDES-SRTP. The browser's
fake microphone plays a 1 kHz tone, bob (baresip) plays 1.5 kHz and records what he hears.

Everything runs inside a fresh network namespace with only ``lo`` up (browser.webrtc_netns):
Chromium gathers ICE candidates on every interface it sees, so there they can only be
loopback. Ports are fixed: nothing else binds in that namespace.

- Without the SBC (the harness itself): ``test_namespace_has_only_loopback``;
  ``test_page_loads_from_its_own_origin`` (the page and sip.js from a tiny local HTTP server:
  ``window.phone`` is there and nothing is fetched from elsewhere);
  ``test_browser_audio_on_loopback`` (two peer connections inside the page: every candidate
  is loopback, and the page's meters hear the fake microphone's tone).
- With the SBC, the page loaded from its own listener and registered as alice:
  ``test_browser_calls_baresip_over_ws`` / ``..._over_wss`` (the browser calls bob and hangs
  up) and ``test_baresip_calls_the_browser`` (bob calls, the page answers by itself, bob hangs
  up). Each side hears the other's tone (bob's recording; the page's ``phone.tone()`` and
  ``phone.level()``), the browser's ICE pair is loopback at both ends, DTLS is connected with
  an SRTP cipher, and the SBC's call record has packets both ways. The ws call takes a
  screenshot during the call into tmp_path, and into docs/webrtc-phone.png when
  SBC_SCREENSHOT=1 (never in an ordinary run).
- ``test_opus_only_browser_and_pcmu_only_baresip_are_transcoded``: the page in Opus-only
  mode (``?codecs=opus``: a sip.js SDP modifier on its offers and answers) and a bob with
  PCMU alone, either calling: the SBC transcodes Opus <-> PCMU (the record counts one
  transcoded stream), both hear each other, the page's codec is Opus.
- ``test_calls_through_a_kamailio_registrar``: a Kamailio registrar in the namespace as the
  SBC's core backend; the browser (ws) and bob (TLS) register through the SBC (Kamailio
  stores the SBC's Path with a flow token), and a call either way goes SBC -> Kamailio ->
  SBC -> callee: audio both ways, hang-up, a call record for each pass.
- ``test_calls_with_the_media_on_rtpengine``: ``[media] engine = "rtpengine"`` with a
  userspace rtpengine started in the namespace: the node terminates the browser's ICE and
  DTLS-SRTP and bob's SDES-SRTP; a call either way (the caller hangs up), tones both ways,
  the SDPs each side got name the node's ports, the record names the node.
- ``test_a_lost_websocket_ends_the_call``: the page closes its SIP WebSocket, or the whole
  browser is killed, mid-call: the SBC sends bob a BYE within WS_LOSS_TIMEOUT (record cause
  "flow failed"), and a new call to the browser fails at once.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from . import netns
from .browser import (  # noqa: F401 - webrtc_netns is a fixture
    BrowserError,
    Chromium,
    browser_tone,
    chromium,
    chromium_binary,
    webrtc_netns,
)
from .conftest import Certs, Registrar, RegistrarFactory, backends_config
from .phones import (  # noqa: F401 - phones and sox are fixtures
    ALICE_HZ,
    BOB_HZ,
    CALL_TIMEOUT,
    DOMAIN,
    MEDIA_SECONDS,
    MediaPhone,
    PhoneFactory,
    account,
    assert_heard,
    body,
    media_records,
    phones,
    read_records,
    sox,
)
from .test_rtpengine import RtpengineNode, rtpengine_nodes

pytestmark = pytest.mark.interop

HOST = "127.0.0.1"
UDP_PORT = 5060
TLS_PORT = 5061
WS_PORT = 8088
WSS_PORT = 8443
CORE_PORT = 5080
ADMIN_PORT = 8080
MEDIA_PORTS = (20000, 20199)
SERVER_HEADER = "sbc-webrtc-test"
STATIC = Path(__file__).resolve().parents[2] / "sbc" / "static"
DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "webrtc-phone.png"

BROWSER_HZ = ALICE_HZ  # the browser's fake microphone (1 kHz)
TONE_TOLERANCE = 20.0  # Hz: the analyser's bins are 5.9 Hz wide, interpolated
MIN_LEVEL = 0.05  # RMS of the remote audio in the page: a half-scale tone is about 0.35
REGISTER_TIMEOUT = 10.0
PAGE_TIMEOUT = 10.0
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LOOPBACK_PREFIXES = ("127.", "::1", "[::1]")
# baresip's account audio_codecs value for the codec names phones.CODEC_MODULES knows.
BARESIP_CODECS = {"pcmu": "PCMU/8000/1", "pcma": "PCMA/8000/1", "opus": "opus/48000/2"}
STATIC_PTS = {0: "pcmu", 8: "pcma", 9: "g722"}  # RFC 3551 6: no a=rtpmap needed
WS_LOSS_TIMEOUT = 5.0  # the browser's WebSocket gone -> the SBC's BYE reaches baresip


# =========================================================================================
# The SBC with WebSocket listeners, inside the test's namespace
# =========================================================================================
def webrtc_config(certs: Certs, records: Path, extra: str = "", media: str = "") -> str:
    """Access on UDP, TLS, WS and WSS (127.0.0.1, fixed ports); the embedded registrar (no
    backend) unless ``extra`` adds [[core.backends]]; SRTP mandatory towards SIP phones; call
    records with the relay's counters. ``media``: more [media] keys (e.g. ``engine``);
    ``extra`` comes last (tables such as [[media.rtpengine]] or [[core.backends]])."""
    listen = [
        f"tls://{HOST}:{TLS_PORT}",
        f"ws://{HOST}:{WS_PORT}",
        f"wss://{HOST}:{WSS_PORT}",
        f"udp://{HOST}:{UDP_PORT}",  # last: once it answers, every listener is bound
    ]
    return f"""\
[sbc]
name = "webrtc-interop"

[access]
listen = [{", ".join(f'"{url}"' for url in listen)}]

[access.tls]
certificate = "{certs.server_cert}"
private_key = "{certs.server_key}"
ca = "{certs.ca}"

[core]
listen = ["udp://{HOST}:{CORE_PORT}"]

[admin]
listen = "{HOST}:{ADMIN_PORT}"

[media]
ports = "{MEDIA_PORTS[0]}-{MEDIA_PORTS[1]}"
access_srtp = "mandatory"
timeout = 600
{media}
[calls]
records = "{records}"

[sip]
user_agent = "{SERVER_HEADER}"

[log]
level = "debug"
format = "text"

[security]
# The default limits, loopback not exempt: the page's ~130 files come over one kept-alive
# connection (one TLS handshake over wss), within tls_handshakes and pike_density.
{extra}"""


def wait_listening(port: int, timeout: float = 5.0) -> None:
    """Until a TCP socket listens on HOST:port in this thread's namespace, read from the
    kernel's table (a test connection would show up in the SBC's log as a failed handshake)."""
    # /proc/thread-self: the namespace of this thread, not of the process's first thread.
    table = Path("/proc/thread-self/net/tcp")
    packed = int.from_bytes(socket.inet_aton(HOST), sys.byteorder)
    wanted = f"{packed:08X}:{port:04X}"
    deadline = time.monotonic() + timeout
    while True:
        rows = [line.split() for line in table.read_text().splitlines()[1:]]
        if any(row[1] == wanted and row[3] == "0A" for row in rows):  # 0A: LISTEN
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"nothing listens on {HOST}:{port} after {timeout} s")
        time.sleep(0.05)


@dataclass
class WebRtcLab:
    """The SBC in the test's namespace, baresip phones and browsers started through it."""

    ns: netns.Namespace
    sbc: netns.NsSbc
    records: Path
    certs: Certs
    sox: str
    workdir: Path
    phone_factory: PhoneFactory
    stack: contextlib.ExitStack
    browsers: list[Chromium] = field(default_factory=list)

    def bob(self, codecs: tuple[str, ...] = ()) -> MediaPhone:
        """baresip bob: TLS to the SBC, SDES-SRTP mandatory, answers by himself, plays
        BOB_HZ and records what he hears; registered. ``codecs`` (baresip's names, e.g.
        ("pcmu",)): the only ones he has (phones.CODEC_MODULES, the account's
        audio_codecs); G.711 both laws by default."""
        bob = self.phone_factory("bob", hz=BOB_HZ, cafile=self.certs.ca, codecs=codecs)
        self.stack.callback(bob.stop)  # before the SBC goes (its un-REGISTER gets an answer)
        line = account("bob", f"{HOST}:{TLS_PORT}", "tls", srtp=True, answer=True)
        if codecs:
            line += ";audio_codecs=" + ",".join(BARESIP_CODECS[c] for c in codecs)
        bob.command("uanew", line)
        bob.wait_event("REGISTER_OK", timeout=REGISTER_TIMEOUT)
        return bob

    def browser(
        self, *, secure: bool = False, autoanswer: bool = False, codecs: str = ""
    ) -> Chromium:
        """A Chromium whose fake microphone plays BROWSER_HZ, with the page loaded from the
        SBC's own ws (http://) or wss (https://) listener and registered as alice.
        ``codecs`` (e.g. "opus"): the page's ?codecs=, its SDP keeps only those (and
        telephone-event), offers and answers alike."""
        tone = browser_tone(self.sox, self.workdir / f"browser-{BROWSER_HZ:g}.wav", BROWSER_HZ)
        page = self.stack.enter_context(
            chromium(self.workdir / f"chromium-{len(self.browsers)}", tone=tone)
        )
        self.browsers.append(page)
        origin = f"https://{HOST}:{WSS_PORT}" if secure else f"http://{HOST}:{WS_PORT}"
        query = f"user=alice&domain={DOMAIN}&autoregister=1"
        query += "&autoanswer=1" if autoanswer else ""
        query += f"&codecs={codecs}" if codecs else ""
        page.open(f"{origin}/?{query}", timeout=PAGE_TIMEOUT)
        page.wait_for("window.phone && window.phone.registered", REGISTER_TIMEOUT)
        return page


@contextlib.contextmanager
def running_lab(
    ns: netns.Namespace,
    phones: PhoneFactory,  # noqa: F811 - the fixture imported above
    certs: Certs,
    sox: str,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
    extra: str = "",
    media: str = "",
) -> Iterator[WebRtcLab]:
    """The SBC with ws/wss listeners in the test's namespace (``extra``, ``media``: more
    config, see ``webrtc_config``); at the end browsers, then phones, then the SBC are
    stopped (by PID), and an SBC that misbehaved fails the test."""
    chromium_binary()  # skip (fail in CI) before anything starts
    records = tmp_path / "calls.jsonl"
    workdir = tmp_path / "sbc"
    workdir.mkdir()
    problems: list[str] = []
    with contextlib.ExitStack() as stack:
        sbc = netns.launch_sbc(ns, workdir, webrtc_config(certs, records, extra, media))
        sbc.access = (HOST, UDP_PORT)
        stack.callback(lambda: problems.extend(netns.stop_sbc(sbc)))
        netns.wait_sbc_ready(sbc, server=SERVER_HEADER)
        for port in (TLS_PORT, WS_PORT, WSS_PORT):
            wait_listening(port)
        # Callbacks run last-in first-out: browsers and phones go before the SBC.
        with contextlib.ExitStack() as inner:
            yield WebRtcLab(
                ns=ns,
                sbc=sbc,
                records=records,
                certs=certs,
                sox=sox,
                workdir=tmp_path,
                phone_factory=phones,
                stack=inner,
            )
    assert not problems, "\n".join(problems)


@pytest.fixture
def webrtc_lab(
    webrtc_netns: netns.Namespace,  # noqa: F811 - the fixture imported above
    phones: PhoneFactory,  # noqa: F811 - the fixture imported above
    certs: Certs,
    sox: str,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
) -> Iterator[WebRtcLab]:
    """The SBC with its embedded registrar (see ``running_lab``)."""
    with running_lab(webrtc_netns, phones, certs, sox, tmp_path) as lab:
        yield lab


@pytest.fixture
def kamailio_lab(
    webrtc_netns: netns.Namespace,  # noqa: F811 - the fixture imported above
    kamailio_registrars: RegistrarFactory,
    phones: PhoneFactory,  # noqa: F811 - the fixture imported above
    certs: Certs,
    sox: str,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
) -> Iterator[tuple[WebRtcLab, Registrar]]:
    """A Kamailio registrar in the test's namespace (started after the thread entered it, so
    it binds there; a free loopback port from PortPool) as the SBC's one core backend: the
    SBC relays REGISTERs to it with a Path (a flow token) and routes calls through it. The
    SBC stops before Kamailio (this fixture's teardown runs first)."""
    (registrar,) = kamailio_registrars(1)
    with running_lab(
        webrtc_netns, phones, certs, sox, tmp_path, extra=backends_config(registrar.uri)
    ) as lab:
        yield lab, registrar


@pytest.fixture
def rtpengine_lab(
    webrtc_netns: netns.Namespace,  # noqa: F811 - the fixture imported above
    phones: PhoneFactory,  # noqa: F811 - the fixture imported above
    certs: Certs,
    sox: str,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
) -> Iterator[tuple[WebRtcLab, RtpengineNode]]:
    """A userspace rtpengine in the test's namespace (started after the thread entered it,
    on 127.0.0.1 with a free ng port and 64 media ports) as the SBC's media engine: the
    node terminates the browser's ICE and DTLS-SRTP and bob's SDES-SRTP. The SBC stops
    before rtpengine (its deletes get their answers)."""
    with (
        rtpengine_nodes(tmp_path, 1) as (node,),
        running_lab(
            webrtc_netns, phones, certs, sox, tmp_path,
            media='engine = "rtpengine"\n',
            extra=f'\n[[media.rtpengine]]\nurl = "{node.url}"\n',
        ) as lab,
    ):  # fmt: skip
        yield lab, node


# =========================================================================================
# Checks on a call in progress
# =========================================================================================
def wait_call(page: Chromium, state: str, timeout: float = CALL_TIMEOUT) -> None:
    """Until the page's call is in ``state``; a call that ends first fails at once, with
    the reason the page saw (a SIP status, a media error)."""
    result = page.wait_for(
        f"window.phone.state === {state!r} || (window.phone.state === 'ended'"
        " && 'ended: ' + window.phone.lastError)",
        timeout,
    )
    if result is not True and state != "ended":
        raise AssertionError(f"the browser's call {result}, never {state}\n{page.explain()}")


def wait_for_audio(page: Chromium) -> None:
    """Until the page's meter hears the remote party; a failure says what the peer
    connection saw (packets, DTLS and ICE state, the pair in use)."""
    try:
        page.wait_for(f"window.phone.level() > {MIN_LEVEL}", CALL_TIMEOUT)
    except BrowserError as exc:
        stats = page.evaluate("window.phone.stats()")
        raise AssertionError(f"the browser hears nothing; its media: {stats}\n{exc}") from None


def page_hears(page: Chromium, hz: float) -> dict[str, Any]:
    """The page's measure of the remote audio: a few readings of its dominant frequency
    (the median must be ``hz``) and its level (above MIN_LEVEL)."""
    readings = []
    for _ in range(5):
        readings.append(float(page.evaluate("window.phone.tone()")))
        time.sleep(0.2)
    tone = sorted(readings)[len(readings) // 2]
    level = float(page.evaluate("window.phone.level()"))
    heard = {"tone": tone, "readings": readings, "level": level}
    print(f"the browser heard: {heard}")
    assert abs(tone - hz) <= TONE_TOLERANCE, f"browser heard {heard}, not {hz} Hz\n{page.explain()}"
    assert level > MIN_LEVEL, f"browser heard {heard}: too quiet\n{page.explain()}"
    return heard


def assert_webrtc_media(page: Chromium) -> dict[str, Any]:
    """The page's peer connection: DTLS connected with an SRTP cipher, RTP both ways, and the
    ICE pair in use on loopback at both ends (the namespace allows nothing else)."""
    stats: dict[str, Any] = page.evaluate("window.phone.stats()") or {}
    print(f"the browser's media: {stats}")
    assert stats, f"no peer connection in the page\n{page.explain()}"
    assert stats.get("dtlsState") == "connected", f"{stats}\n{page.explain()}"
    assert stats.get("srtpCipher"), stats
    assert stats["packetsSent"] > 0 and stats["packetsReceived"] > 0, stats
    for end in ("local", "remote"):
        assert str(stats.get(end, "")).startswith(LOOPBACK_PREFIXES), stats
    return stats


def codec_names(sdp: str) -> list[str]:
    """The audio formats of an SDP's first m=audio line in order, as lower-case encoding
    names (a payload type without a=rtpmap by RFC 3551, else its number)."""
    m = re.search(r"^m=audio \d+ \S+ ([\d ]+)\s*$", sdp, re.M)
    assert m, sdp
    names = {
        int(pt): name.lower() for pt, name in re.findall(r"^a=rtpmap:(\d+) ([^/]+)/", sdp, re.M)
    }
    return [names.get(int(pt), STATIC_PTS.get(int(pt), pt)) for pt in m[1].split()]


def screenshot(page: Chromium, tmp_path: Path, *, docs: bool = False) -> Path:
    """A PNG of the page now, in tmp_path; with ``docs`` (a call in progress) also
    docs/webrtc-phone.png, but only when SBC_SCREENSHOT=1 (an ordinary run, CI's included,
    never rewrites the docs)."""
    path = page.screenshot(tmp_path / "webrtc-phone.png")
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000, f"not a PNG: {data[:16]!r}"
    if docs and os.environ.get("SBC_SCREENSHOT") == "1":
        shutil.copyfile(path, DOCS_SCREENSHOT)
        print(f"screenshot written to {DOCS_SCREENSHOT}")
    return path


def browser_calls_bob(lab: WebRtcLab, tmp_path: Path, *, secure: bool) -> None:
    """The browser calls bob, they talk, the browser hangs up; both heard each other."""
    bob = lab.bob()
    page = lab.browser(secure=secure)
    page.evaluate("window.phone.call('bob')")
    wait_call(page, "incall")
    bob.wait_event("CALL_ESTABLISHED", timeout=CALL_TIMEOUT)
    wait_for_audio(page)
    time.sleep(MEDIA_SECONDS)
    page_hears(page, BOB_HZ)
    assert_webrtc_media(page)
    screenshot(page, tmp_path, docs=not secure)

    page.evaluate("window.phone.hangup()")
    wait_call(page, "ended")
    bob.wait_event("CALL_CLOSED", timeout=CALL_TIMEOUT)
    assert_heard(lab.sox, bob, BROWSER_HZ)
    media_records(lab.records, 1)


# =========================================================================================
# The tests
# =========================================================================================
def test_browser_calls_baresip_over_ws(webrtc_lab: WebRtcLab, tmp_path: Path) -> None:
    """The browser (page and SIP over ws://) calls bob; both hear each other."""
    browser_calls_bob(webrtc_lab, tmp_path, secure=False)


def test_browser_calls_baresip_over_wss(webrtc_lab: WebRtcLab, tmp_path: Path) -> None:
    """The same over wss:// (the page from https://, the dev CA's certificate)."""
    browser_calls_bob(webrtc_lab, tmp_path, secure=True)


def test_baresip_calls_the_browser(webrtc_lab: WebRtcLab) -> None:
    """bob calls alice's browser (it answers by itself), they talk, bob hangs up."""
    bob = webrtc_lab.bob()
    page = webrtc_lab.browser(autoanswer=True)
    bob.command("dial", f"sip:alice@{DOMAIN}")
    wait_call(page, "incall")
    bob.wait_event("CALL_ESTABLISHED", timeout=CALL_TIMEOUT)
    wait_for_audio(page)
    time.sleep(MEDIA_SECONDS)
    page_hears(page, BOB_HZ)
    assert_webrtc_media(page)

    bob.command("hangup")
    bob.wait_event("CALL_CLOSED", timeout=CALL_TIMEOUT)
    wait_call(page, "ended")
    assert_heard(webrtc_lab.sox, bob, BROWSER_HZ)
    media_records(webrtc_lab.records, 1)


# -- a callee without the browser's codec: the SBC transcodes -------------------------------
@pytest.mark.parametrize("caller", ["browser", "baresip"])
def test_opus_only_browser_and_pcmu_only_baresip_are_transcoded(
    webrtc_lab: WebRtcLab, caller: str
) -> None:
    """The page offers (and answers with) Opus alone (?codecs=opus), bob has PCMU alone:
    the SBC adds G.711 to the browser's offer towards bob (or Opus to bob's offer towards the
    browser), each answers its own codec, and the relay transcodes Opus <-> PCMU between
    DTLS-SRTP and SDES-SRTP. Both hear each other; the record counts one transcoded stream.
    ``caller``: who dials (the page answers by itself when bob calls)."""
    bob = webrtc_lab.bob(codecs=("pcmu",))
    page = webrtc_lab.browser(codecs="opus", autoanswer=caller == "baresip")
    if caller == "browser":
        page.evaluate("window.phone.call('bob')")
    else:
        bob.command("dial", f"sip:alice@{DOMAIN}")
    wait_call(page, "incall")
    bob.wait_event("CALL_ESTABLISHED", timeout=CALL_TIMEOUT)
    wait_for_audio(page)
    time.sleep(MEDIA_SECONDS)
    page_hears(page, BOB_HZ)
    stats = assert_webrtc_media(page)
    assert stats.get("codec") == "audio/opus", stats
    # What the page's peer connection holds, after its modifier: Opus and telephone-event.
    sdp = page.evaluate("window.phone.sdp()")
    for side in ("local", "remote"):
        codecs = [c for c in codec_names(sdp[side]) if c != "telephone-event"]
        assert codecs == ["opus"], (side, sdp[side])
    # bob's side: PCMU alone in his offer or answer, and in what the SBC gave him back.
    bob_invite = codec_names(body(bob.sent("INVITE sip:", "INVITE")))
    bob_ok = codec_names(body(bob.sent("SIP/2.0 200", "INVITE")))
    print(f"bob's INVITE: {bob_invite}; 200: {bob_ok}")
    if caller == "browser":
        assert "pcmu" in bob_invite and bob_ok[0] == "pcmu", (bob_invite, bob_ok)
    else:
        assert bob_invite[0] == "pcmu" and "opus" not in bob_invite, bob_invite
        assert bob_ok[0] == "pcmu" and "opus" not in bob_ok, bob_ok

    if caller == "browser":
        page.evaluate("window.phone.hangup()")
        wait_call(page, "ended")
        bob.wait_event("CALL_CLOSED", timeout=CALL_TIMEOUT)
    else:
        bob.command("hangup")
        bob.wait_event("CALL_CLOSED", timeout=CALL_TIMEOUT)
        wait_call(page, "ended")
    assert_heard(webrtc_lab.sox, bob, BROWSER_HZ)
    (record,) = media_records(webrtc_lab.records, 1)
    assert record["transcoded_streams"] == 1, record


# -- a Kamailio registrar behind the SBC ------------------------------------------------------
@pytest.mark.parametrize("caller", ["browser", "baresip"])
def test_calls_through_a_kamailio_registrar(
    kamailio_lab: tuple[WebRtcLab, Registrar], caller: str
) -> None:
    """The browser (ws) and bob (TLS, SDES) register through the SBC to Kamailio, which
    stores each binding with the SBC's Path (a flow token on its core port); a call from
    either goes SBC -> Kamailio -> SBC (by the Path) -> the other, over the callee's own
    flow; they hear each other and the caller hangs up."""
    lab, registrar = kamailio_lab
    bob = lab.bob()
    page = lab.browser(autoanswer=caller == "baresip")
    bindings = registrar.bindings()
    print(f"kamailio's bindings: {bindings}")
    assert sorted(bindings) == ["alice", "bob"], bindings
    path = re.compile(rf"<sip:[a-z2-7]+@{re.escape(HOST)}:{CORE_PORT};lr>")
    for user, contacts in bindings.items():
        (binding,) = contacts
        assert path.fullmatch(str(binding["path"])), (user, binding)
    assert ".invalid" in str(bindings["alice"][0]["contact"]), bindings["alice"]

    if caller == "browser":
        page.evaluate("window.phone.call('bob')")
    else:
        bob.command("dial", f"sip:alice@{DOMAIN}")
    wait_call(page, "incall")
    bob.wait_event("CALL_ESTABLISHED", timeout=CALL_TIMEOUT)
    wait_for_audio(page)
    time.sleep(MEDIA_SECONDS)
    page_hears(page, BOB_HZ)
    assert_webrtc_media(page)
    if caller == "browser":
        page.evaluate("window.phone.hangup()")
        wait_call(page, "ended")
        bob.wait_event("CALL_CLOSED", timeout=CALL_TIMEOUT)
    else:
        bob.command("hangup")
        bob.wait_event("CALL_CLOSED", timeout=CALL_TIMEOUT)
        wait_call(page, "ended")
    assert_heard(lab.sox, bob, BROWSER_HZ)
    # The call crossed the SBC twice (access -> Kamailio, Kamailio -> access): two records,
    # each relayed both ways, the first towards the backend.
    records = media_records(lab.records, 2)
    assert sorted(str(r["backend"]) for r in records) != ["None", "None"], records


# -- the media on rtpengine -------------------------------------------------------------------
def m_line(sdp: str) -> tuple[int, str]:
    """The port and transport protocol of an SDP's first m=audio line."""
    m = re.search(r"^m=audio (\d+) (\S+) ", sdp, re.M)
    assert m, sdp
    return int(m[1]), m[2]


@pytest.mark.parametrize("caller", ["browser", "baresip"])
def test_calls_with_the_media_on_rtpengine(
    rtpengine_lab: tuple[WebRtcLab, RtpengineNode], caller: str
) -> None:
    """[media] engine = "rtpengine": the browser (ws) and bob (TLS, SDES-SRTP) call each
    other, the node speaking WebRTC to the page (ICE, DTLS-SRTP, rtcp-mux) and SDES-SRTP
    to bob. The SDPs both were given name the node's ports (its ICE candidates too, on
    loopback); they hear each other; the caller hangs up and the node forgets the call."""
    lab, node = rtpengine_lab
    bob = lab.bob()
    page = lab.browser(autoanswer=caller == "baresip")
    if caller == "browser":
        page.evaluate("window.phone.call('bob')")
    else:
        bob.command("dial", f"sip:alice@{DOMAIN}")
    wait_call(page, "incall")
    bob.wait_event("CALL_ESTABLISHED", timeout=CALL_TIMEOUT)
    wait_for_audio(page)
    time.sleep(MEDIA_SECONDS)
    page_hears(page, BOB_HZ)
    stats = assert_webrtc_media(page)
    # What the page was given: the node's port, UDP/TLS/RTP/SAVPF, its DTLS fingerprint and
    # ICE candidates on loopback in its range, rtcp-mux; and the pair in use is the node's.
    remote = page.evaluate("window.phone.sdp()")["remote"]
    print(f"the page's remote SDP:\n{remote}")
    port, proto = m_line(remote)
    assert node.owns(port) and proto == "UDP/TLS/RTP/SAVPF", remote
    assert re.search(r"^a=fingerprint:sha-\d+ ", remote, re.M), remote
    assert "a=rtcp-mux" in remote and "a=crypto:" not in remote, remote
    candidates = re.findall(r"^a=candidate:\S+ \d+ \S+ \d+ (\S+) (\d+) ", remote, re.M)
    assert candidates, remote
    for address, cport in candidates:
        assert address.startswith(LOOPBACK_PREFIXES) and node.owns(int(cport)), remote
    assert str(stats["remote"]).startswith(HOST), stats
    # What bob was given: the node's port, RTP/SAVP with an SDES key, no ICE.
    given = body(bob.sent("INVITE sip:" if caller == "browser" else "SIP/2.0 200", "INVITE"))
    print(f"bob was given:\n{given}")
    port, proto = m_line(given)
    assert node.owns(port) and proto == "RTP/SAVP", given
    assert "a=crypto:" in given and "a=candidate" not in given, given

    if caller == "browser":
        page.evaluate("window.phone.hangup()")
        wait_call(page, "ended")
        bob.wait_event("CALL_CLOSED", timeout=CALL_TIMEOUT)
    else:
        bob.command("hangup")
        bob.wait_event("CALL_CLOSED", timeout=CALL_TIMEOUT)
        wait_call(page, "ended")
    assert_heard(lab.sox, bob, BROWSER_HZ)
    (record,) = read_records(lab.records, 1)
    print(f"call record: {record}")
    assert record["status"] == 200, record
    (media,) = record["media"]
    assert media["engine"] == "rtpengine" and media["node"] == node.url, record
    assert media["totals"]["RTP"]["packets"] > 0, record  # the node's totals
    deadline = time.monotonic() + 5
    while "Received command 'delete'" not in node.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "Received command 'delete'" in node.log(), node.log()[-3000:]


# -- the browser's WebSocket dies mid-call ------------------------------------------------------
@pytest.mark.parametrize(
    ("how", "caller"), [("closed", "browser"), ("killed", "baresip")],
    ids=["page-closes-ws-caller", "browser-killed-callee"],
)  # fmt: skip
def test_a_lost_websocket_ends_the_call(webrtc_lab: WebRtcLab, how: str, caller: str) -> None:
    """In a call with bob, the browser's SIP WebSocket goes: the page closes it (sip.js's
    transport.disconnect(), a close frame) or the whole browser is killed (the kernel closes
    the connection, no close frame). The SBC cannot reach the browser any more, so it ends
    the call towards bob (BYE) within WS_LOSS_TIMEOUT, and its record says why."""
    bob = webrtc_lab.bob()
    page = webrtc_lab.browser(autoanswer=caller == "baresip")
    if caller == "browser":
        page.evaluate("window.phone.call('bob')")
    else:
        bob.command("dial", f"sip:alice@{DOMAIN}")
    wait_call(page, "incall")
    bob.wait_event("CALL_ESTABLISHED", timeout=CALL_TIMEOUT)
    wait_for_audio(page)

    start = time.monotonic()
    if how == "closed":
        page.evaluate("window.phone.disconnect()")
    else:
        page.kill()
    bob.wait_event("CALL_CLOSED", timeout=WS_LOSS_TIMEOUT)
    elapsed = time.monotonic() - start
    print(f"bob's call closed {elapsed:.2f} s after the WebSocket went ({how})")
    byes = bob.trace("BYE sip:")
    assert byes, f"bob got no BYE\n{bob.explain()}"
    print(byes[0])
    (record,) = read_records(webrtc_lab.records, 1)
    print(f"call record: {record}")
    assert record["status"] == 200 and record["answer"] is not None, record
    assert record["cause"] == "flow failed", record
    if how == "closed":
        assert page.evaluate("window.phone.registered") is False
    # alice's binding went with her flow: a new call to her fails at once, not after the
    # SBC has tried a dead connection.
    start = time.monotonic()
    bob.command("dial", f"sip:alice@{DOMAIN}")
    bob.wait_event("CALL_CLOSED", timeout=WS_LOSS_TIMEOUT, count=2)
    closed = [e for e in bob.events if e.get("type") == "CALL_CLOSED"]
    print(f"bob's second call closed after {time.monotonic() - start:.2f} s: {closed[-1]}")
    assert bob.count("CALL_ESTABLISHED") == 1, bob.explain()
    # docs/calls.md: the embedded registrar answers a UA 480 while the binding stays.
    assert str(closed[-1].get("param", "")).split()[:1] == ["480"], closed


# -- without the SBC: the page, the browser and the namespace ------------------------------
@contextlib.contextmanager
def static_server() -> Iterator[tuple[str, list[str]]]:
    """sbc/static/ over HTTP on a free loopback port (in this thread's namespace): its
    origin and the paths requested."""
    requested: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            requested.append(self.path)

    handler = functools.partial(Handler, directory=str(STATIC))
    server = http.server.ThreadingHTTPServer((HOST, 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="static", daemon=True)
    thread.start()
    try:
        yield f"http://{HOST}:{server.server_address[1]}", requested
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_namespace_has_only_loopback(
    webrtc_netns: netns.Namespace,  # noqa: F811 - the fixture imported above
) -> None:
    """What the browser and the SBC will see: lo, and nothing else."""
    links = subprocess.run(
        ["ip", "-o", "link", "show"], capture_output=True, text=True, timeout=5, check=True
    ).stdout
    names = [line.split(":")[1].strip() for line in links.splitlines()]
    assert names == ["lo"], links
    # This thread is in that namespace (the same inode), not just looking into it.
    assert os.stat("/proc/thread-self/ns/net").st_ino == os.stat(webrtc_netns.path).st_ino


def test_page_loads_from_its_own_origin(
    webrtc_netns: netns.Namespace,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
) -> None:
    """The softphone and the sip.js modules it imports load from the page's own origin, and
    it starts idle and unregistered with the SIP server on that same origin."""
    chromium_binary()
    with static_server() as (origin, requested), chromium(tmp_path / "chromium") as page:
        page.open(f"{origin}/?user=alice&domain={DOMAIN}", timeout=PAGE_TIMEOUT)
        page.wait_for("window.phone !== undefined", PAGE_TIMEOUT)
        state = page.evaluate(
            "({state: phone.state, registered: phone.registered, lastError: phone.lastError,"
            " log: phone.log, user: document.getElementById('user').value,"
            " domain: document.getElementById('domain').value,"
            " resources: performance.getEntriesByType('resource').map((e) => e.name)})"
        )
        screenshot(page, tmp_path)
    print({key: value for key, value in state.items() if key != "resources"})
    print(f"{len(state['resources'])} resources, e.g. {state['resources'][:3]}")
    assert state["state"] == "idle" and state["registered"] is False, state
    assert state["lastError"] is None, state
    assert (state["user"], state["domain"]) == ("alice", DOMAIN), state
    port = origin.rsplit(":", 1)[1]
    assert any(f"SIP server ws://{HOST}:{port}/" in line for line in state["log"]), state
    assert state["resources"], state
    assert all(url.startswith(origin + "/") for url in state["resources"]), state["resources"]
    assert "/vendor/sip.js/lib/api/index.js" in requested, requested


LOOPBACK_CALL = """
(async () => {
  const audio = { echoCancellation: false, noiseSuppression: false, autoGainControl: false };
  const mic = await navigator.mediaDevices.getUserMedia({ audio, video: false });
  const a = new RTCPeerConnection({ iceServers: [] });
  const b = new RTCPeerConnection({ iceServers: [] });
  const candidates = [];
  a.onicecandidate = (e) => { if (e.candidate) { candidates.push(e.candidate.candidate); b.addIceCandidate(e.candidate); } };
  b.onicecandidate = (e) => { if (e.candidate) { candidates.push(e.candidate.candidate); a.addIceCandidate(e.candidate); } };
  const remote = new Promise((resolve) => { b.ontrack = (e) => resolve(new MediaStream([e.track])); });
  for (const track of mic.getTracks()) a.addTrack(track, mic);
  await a.setLocalDescription();
  await b.setRemoteDescription(a.localDescription);
  await b.setLocalDescription();
  await a.setRemoteDescription(b.localDescription);
  window.loopback = { a, b, candidates };
  window.phone.listen(await remote);
  return true;
})()
"""

LOOPBACK_PAIR = """
(async () => {
  const report = await window.loopback.a.getStats();
  const byId = new Map([...report.values()].map((e) => [e.id, e]));
  for (const entry of report.values()) {
    if (entry.type === "transport" && entry.selectedCandidatePairId) {
      const pair = byId.get(entry.selectedCandidatePairId);
      return { local: byId.get(pair.localCandidateId).address,
               remote: byId.get(pair.remoteCandidateId).address,
               candidates: window.loopback.candidates };
    }
  }
  return null;
})()
"""


def test_browser_audio_on_loopback(
    webrtc_netns: netns.Namespace,  # noqa: F811 - the fixture imported above
    sox: str,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
) -> None:
    """In the namespace the browser's ICE candidates are loopback only, its fake microphone
    plays the tone file, and the page's meters (phone.level, phone.tone) measure it after
    a trip through a peer connection: the harness the SBC tests rely on."""
    chromium_binary()
    tone = browser_tone(sox, tmp_path / "tone.wav", BROWSER_HZ)
    with static_server() as (origin, _), chromium(tmp_path / "chromium", tone=tone) as page:
        page.open(f"{origin}/", timeout=PAGE_TIMEOUT)
        page.wait_for("window.phone !== undefined", PAGE_TIMEOUT)
        page.evaluate(LOOPBACK_CALL, timeout=PAGE_TIMEOUT)
        pair = page.wait_for(LOOPBACK_PAIR, PAGE_TIMEOUT)
        wait_for_audio(page)
        time.sleep(1.0)
        page_hears(page, BROWSER_HZ)
    print(pair)
    assert pair["candidates"], pair
    for candidate in pair["candidates"]:
        address = candidate.split()[4]  # foundation component transport priority ADDRESS
        assert address.startswith(LOOPBACK_PREFIXES), candidate
    assert pair["local"].startswith(LOOPBACK_PREFIXES), pair
    assert pair["remote"].startswith(LOOPBACK_PREFIXES), pair
