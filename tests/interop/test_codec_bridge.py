"""A callee that lacks the caller's codec still gets the call: the SBC appends the codecs it
can transcode behind the caller's, the callee picks one of them, and the SBC transcodes the
caller's leg (docs/media.md, Transcoding). Two baresips, default [media] codec lists, each
able to do only the codec the case names:

- caller -> callee PCMU -> PCMA, PCMA -> PCMU, OPUS -> PCMA, G722 -> PCMU, over UDP with
  plain RTP and over TLS with SRTP mandatory, through the embedded registrar and through a
  Kamailio backend: the call is set up, each hears the other's tone, each phone's answer
  names only its own codec, and one stream is transcoded (metrics and call records);
- a caller hold and resume on a transcoded call (the callee answers the re-INVITE): the
  call stays transcoded and a digit sent after the resume crosses it;
- a shared codec: nothing is transcoded, though the callee prefers a codec the SBC added;
- no bridge: a GSM-only caller (a codec the SBC does not transcode) and a PCMA-only callee:
  488 to the caller with the SBC's Warning 305 naming why, and no relay port left bound.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import Certs, RegistrarFactory, SbcFactory, SbcProcess, wait_until
from .phones import (  # noqa: F401 - phones and sox are fixtures
    ALICE_HZ,
    BOB_HZ,
    CALL_TIMEOUT,
    DOMAIN,
    MediaPhone,
    PhoneFactory,
    account,
    assert_heard,
    body,
    phones,
    read_records,
    sox,
    srtp_suite,
    talk,
)
from .test_baresip import _backends
from .test_calls import scrape
from .test_matrix import direction, invite_answers

pytestmark = pytest.mark.interop

# baresip's account line names a codec by its a=rtpmap (audio_codecs=...).
RTPMAP = {
    "pcmu": "PCMU/8000/1",
    "pcma": "PCMA/8000/1",
    "g722": "G722/8000/1",
    "opus": "opus/48000/2",
    "gsm": "GSM/8000/1",
}
STATIC = {0: "pcmu", 3: "gsm", 8: "pcma", 9: "g722"}  # RFC 3551 6


def sdp_codecs(message: str) -> list[str]:
    """The audio codecs of a message's SDP (lower-case, m-line order, no telephone-event)."""
    text = body(message)
    m = re.search(r"^m=audio \d+ \S+ ([\d ]+)$", text, re.M)
    assert m, message
    names = {int(pt): n.lower() for pt, n in re.findall(r"^a=rtpmap:(\d+) ([^/]+)/", text, re.M)}
    codecs = [names.get(int(pt), STATIC.get(int(pt), pt)) for pt in m[1].split()]
    return [c for c in codecs if c != "telephone-event"]


@dataclass(frozen=True)
class Case:
    caller: tuple[str, ...]
    callee: tuple[str, ...]
    secure: bool
    backend: bool

    @property
    def id(self) -> str:
        return "-".join([
            "+".join(self.caller), "to", "+".join(self.callee),
            "tls-srtp" if self.secure else "udp-rtp", "kamailio" if self.backend else "embedded",
        ])  # fmt: skip


PAIRS = [("pcmu", "pcma"), ("pcma", "pcmu"), ("opus", "pcma"), ("g722", "pcmu")]
CASES = [
    Case((a,), (b,), secure, backend)
    for a, b in PAIRS
    for secure in (False, True)
    for backend in (False, True)
]


@dataclass
class Call:
    sbc: SbcProcess
    alice: MediaPhone
    bob: MediaPhone
    records: Path  # the SBC's call records file


@pytest.fixture
def start_call(
    kamailio_registrars: RegistrarFactory,
    sbc_factory: SbcFactory,
    phones: PhoneFactory,  # noqa: F811 - the fixture imported above
    certs: Certs,
    tmp_path: Path,
):  # type: ignore[no-untyped-def]
    """``start_call(case)``: an SBC (default codec lists, call records on), a Kamailio behind
    it if the case says so, and alice and bob registered with the case's codecs."""

    def start(case: Case) -> Call:
        records = tmp_path / "calls.jsonl"
        extra = f'\n[calls]\nrecords = "{records}"\n'
        if case.backend:
            (registrar,) = kamailio_registrars(1)
            extra += _backends(registrar.uri)
        srtp = "mandatory" if case.secure else "off"
        sbc = sbc_factory(media=f'access_srtp = "{srtp}"', extra=extra)
        transport = "tls" if case.secure else "udp"
        proxy = f"127.0.0.1:{sbc.tls4 if case.secure else sbc.udp4}"
        bob = phones("bob", hz=BOB_HZ, codecs=case.callee, cafile=certs.ca)
        codecs = ",".join(RTPMAP[c] for c in case.callee)
        line = account("bob", proxy, transport, srtp=case.secure, answer=True)
        bob.command("uanew", f"{line};audio_codecs={codecs}")
        bob.wait_event("REGISTER_OK")
        alice = phones("alice", hz=ALICE_HZ, codecs=case.caller, cafile=certs.ca)
        codecs = ",".join(RTPMAP[c] for c in case.caller)
        line = account("alice", proxy, transport, srtp=case.secure)
        alice.command("uanew", f"{line};audio_codecs={codecs}")
        alice.wait_event("REGISTER_OK")
        return Call(sbc, alice, bob, records)

    return start


def transcoded(sbc: SbcProcess) -> tuple[float, float]:
    """Streams transcoded since the start, and now."""
    metrics = scrape(sbc)
    return (
        metrics[("sbc_transcoded_streams_total", ())],
        metrics[("sbc_transcoding_streams", ())],
    )


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_the_sbc_transcodes_for_a_callee_without_the_callers_codec(
    case: Case,
    start_call,  # type: ignore[no-untyped-def]
    sox: str,  # noqa: F811 - the fixture imported above
) -> None:
    call: Call = start_call(case)
    setup = talk(call.alice, call.bob)
    print(f"{case.id}: set up in {setup:.2f} s")
    (mine,), (theirs,) = case.caller, case.callee
    # alice offered her codec and was answered with it; bob was offered hers first, then
    # the ones the SBC appended (his among them), and answered with his own.
    assert sdp_codecs(call.alice.sent("INVITE sip:", "INVITE")) == [mine]
    assert sdp_codecs(call.alice.sent("SIP/2.0 200", "INVITE")) == [mine]
    offered = sdp_codecs(call.bob.sent("INVITE sip:", "INVITE"))
    assert offered[0] == mine and theirs in offered, offered
    assert sdp_codecs(call.bob.sent("SIP/2.0 200", "INVITE")) == [theirs]
    if case.secure:
        assert srtp_suite(call.alice) and srtp_suite(call.bob)
    assert_heard(sox, call.bob, ALICE_HZ)
    assert_heard(sox, call.alice, BOB_HZ)
    # One stream was transcoded (the caller's leg), and the records say so.
    assert transcoded(call.sbc) == (1, 0)
    legs = 2 if case.backend else 1
    found = read_records(call.records, legs)
    assert sorted(r["transcoded_streams"] for r in found) == [0] * (legs - 1) + [1], found


def test_a_reinvite_on_a_transcoded_call_keeps_it_transcoded(
    start_call,  # type: ignore[no-untyped-def]
) -> None:
    call: Call = start_call(Case(("pcmu",), ("pcma",), secure=False, backend=True))
    alice, bob = call.alice, call.bob
    alice.command("dial", f"sip:bob@{DOMAIN}")
    alice.wait_event("CALL_ESTABLISHED", timeout=CALL_TIMEOUT)
    bob.wait_event("CALL_ESTABLISHED", timeout=CALL_TIMEOUT)
    alice.command("hold")
    wait_until(
        "bob's answer to the hold",
        lambda: (
            len(invite_answers(alice)) >= 2 and direction(invite_answers(alice)[1]) == "recvonly"
        ),
        CALL_TIMEOUT,
        alice.explain,
    )
    alice.command("resume")
    wait_until(
        "bob's answer to the resume",
        lambda: (
            len(invite_answers(alice)) >= 3 and direction(invite_answers(alice)[2]) == "sendrecv"
        ),
        CALL_TIMEOUT,
        alice.explain,
    )
    # bob answered each re-offer with PCMA; alice was answered with PCMU each time.
    assert {tuple(sdp_codecs(m)) for m in invite_answers(alice)} == {("pcmu",)}
    assert transcoded(call.sbc) == (1, 1)
    alice.command("sndcode", "5")
    time.sleep(0.3)
    alice.command("sndcode", "")
    bob.wait_event("CALL_DTMF_START", timeout=5.0)
    alice.command("hangup")
    bob.wait_event("CALL_CLOSED", timeout=CALL_TIMEOUT)
    assert transcoded(call.sbc) == (1, 0)


def test_a_shared_codec_is_not_transcoded(
    start_call,  # type: ignore[no-untyped-def]
    sox: str,  # noqa: F811 - the fixture imported above
) -> None:
    """alice can do PCMU only; bob prefers PCMA but can do PCMU too. The SBC appends PCMA (and
    the others) behind alice's PCMU; bob, keeping the offer's order (RFC 3264 6.1), takes
    PCMU: the media passes untouched. (Both of bob's codecs are at 8 kHz: baresip 1.0 plays
    its tone file only into a codec of the file's rate.)"""
    call: Call = start_call(Case(("pcmu",), ("pcma", "pcmu"), secure=False, backend=True))
    talk(call.alice, call.bob)
    assert sdp_codecs(call.bob.sent("SIP/2.0 200", "INVITE"))[0] == "pcmu"
    assert_heard(sox, call.alice, BOB_HZ)
    assert_heard(sox, call.bob, ALICE_HZ)
    assert transcoded(call.sbc) == (0, 0)
    assert [r["transcoded_streams"] for r in read_records(call.records, 2)] == [0, 0]


@pytest.mark.parametrize("backend", [False, True], ids=["embedded", "kamailio"])
def test_no_bridge_gets_488_with_a_warning_and_frees_the_media(
    backend: bool,
    start_call,  # type: ignore[no-untyped-def]
) -> None:
    call: Call = start_call(Case(("gsm",), ("pcma",), secure=False, backend=backend))
    call.alice.command("dial", f"sip:bob@{DOMAIN}")
    call.alice.wait_event("CALL_CLOSED", timeout=CALL_TIMEOUT)
    [refusal] = call.alice.trace("SIP/2.0 488")
    warnings = re.findall(r"^Warning: (.*)$", refusal, re.M | re.I)
    assert warnings == [
        '305 sbc "Incompatible media format: no offered codec (GSM) is one the SBC transcodes"'
    ], refusal
    assert not any("kamailio" in w or "127.0.0.1" in w for w in warnings)
    # No relay port is left bound: the workers report none (their totals come every 2 s).
    deadline = time.monotonic() + 6.0
    while True:
        metrics = scrape(call.sbc)
        ports = sum(v for (name, _), v in metrics.items() if name == "sbc_media_ports")
        if ports == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert ports == 0, metrics
    assert metrics[("sbc_calls_active", ())] == 0
    assert transcoded(call.sbc) == (0, 0)
