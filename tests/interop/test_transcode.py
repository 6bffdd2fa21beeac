"""Transcoding through the real SBC ("How it is shown"): alice is a baresip that
can only do Opus (or G.722), the core takes only G.711 A-law (``[media] core_codecs =
["PCMA"]``), bob is a baresip that can only do PCMA. alice -> SBC -> Kamailio -> SBC -> bob:
the SBC offers the core PCMA, transcodes alice's leg between her codec and PCMA in the
media worker, and bob's leg passes PCMA through. Each phone hears the other's tone with its
frequency intact (their recordings, checked with sox), the SDPs each phone got name only its
own codec, and the call records carry the relay's counts. Once more with alice over TLS
with SRTP mandatory: her leg is decrypted, transcoded and re-encrypted. DTMF (item 2):
digits cross the transcoded call both ways as RFC 4733 events, and a digit reaches a
callee without telephone-event as SIP INFO."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from .conftest import Certs, RegistrarFactory, SbcFactory, require
from .phones import (  # noqa: F401 - phones and sox are fixtures
    ALICE_HZ,
    BOB_HZ,
    CallSdps,
    MediaPhone,
    PhoneFactory,
    account,
    assert_heard,
    body,
    media_records,
    phones,
    sox,
    srtp_suite,
    talk,
)
from .test_baresip import _backends
from .test_calls import Lab, passed, received

pytestmark = pytest.mark.interop

# alice's codec: (baresip module name, its a=rtpmap as baresip's account names it)
CALLER_CODECS = {"opus": "opus/48000/2", "g722": "G722/8000/1"}
STATIC = {0: "pcmu", 8: "pcma", 9: "g722"}  # RFC 3551 6


def audio_codecs(phone: MediaPhone, start: str) -> list[str]:
    """The audio codecs (lower-case encoding names, in m-line order, telephone-event left
    out) of the SDP in the INVITE or 200 (``start``) of ``phone``'s trace."""
    text = body(phone.sent(start, "INVITE"))
    m = re.search(r"^m=audio \d+ \S+ ([\d ]+)$", text, re.M)
    assert m, text
    names = {
        int(pt): name.lower() for pt, name in re.findall(r"^a=rtpmap:(\d+) ([^/]+)/", text, re.M)
    }
    codecs = [names.get(int(pt), STATIC.get(int(pt), pt)) for pt in m[1].split()]
    return [c for c in codecs if c != "telephone-event"]


@pytest.mark.parametrize(
    ("codec", "secure"), [("g722", False), ("opus", False), ("opus", True)],
    ids=["g722", "opus", "opus-tls-srtp"],
)  # fmt: skip
def test_a_caller_without_g711_talks_to_a_pcma_only_core(
    codec: str,
    secure: bool,
    kamailio_registrars: RegistrarFactory,
    sbc_factory: SbcFactory,
    phones: PhoneFactory,  # noqa: F811 - the fixture imported above
    sox: str,  # noqa: F811 - the fixture imported above
    certs: Certs,
    tmp_path: Path,
) -> None:
    """``secure``: alice over TLS with SRTP mandatory; her leg is decrypted, transcoded and
    re-encrypted, the core leg stays plain RTP."""
    (registrar,) = kamailio_registrars(1)
    records = tmp_path / "calls.jsonl"
    sbc = sbc_factory(
        media='core_codecs = ["PCMA"]',
        extra=_backends(registrar.uri) + f'\n[calls]\nrecords = "{records}"\n',
    )
    proxy = f"127.0.0.1:{sbc.udp4}"
    alice = phones("alice", hz=ALICE_HZ, codecs=(codec,), cafile=certs.ca)
    bob = phones("bob", hz=BOB_HZ, codecs=("pcma",))
    bob.command("uanew", account("bob", proxy, "udp", answer=True) + ";audio_codecs=PCMA/8000/1")
    bob.wait_event("REGISTER_OK")
    alice_account = (
        account("alice", f"127.0.0.1:{sbc.tls4}", "tls", srtp=True)
        if secure
        else account("alice", proxy, "udp")
    )
    alice.command("uanew", alice_account + f";audio_codecs={CALLER_CODECS[codec]}")
    alice.wait_event("REGISTER_OK")

    setup = talk(alice, bob)
    print(f"{codec} -> PCMA call set up in {setup:.2f} s")

    # The SDPs: alice offered only her codec and got an answer naming it; the core was
    # offered PCMA alone, so bob was offered PCMA first (the access side's other codecs
    # appended behind it) and answered PCMA (payload type 8) only.
    name = CALLER_CODECS[codec].split("/")[0].lower()
    assert audio_codecs(alice, "INVITE sip:") == [name]
    assert audio_codecs(alice, "SIP/2.0 200") == [name]
    assert audio_codecs(bob, "INVITE sip:")[0] == "pcma"
    assert audio_codecs(bob, "SIP/2.0 200") == ["pcma"]
    sdps = CallSdps.of(alice, bob)
    assert sdps.alice_answer.address == sdps.bob_offer.address == "127.0.0.1"  # the relay
    assert sdps.alice_answer.proto == ("RTP/SAVP" if secure else "RTP/AVP")
    assert sdps.bob_offer.proto == "RTP/AVP"
    if secure:
        assert srtp_suite(alice), "alice's call is not SRTP"

    # Each heard the other's tone through the transcoder: frequency within 10 Hz.
    assert_heard(sox, bob, ALICE_HZ)
    assert_heard(sox, alice, BOB_HZ)

    # The relay moved packets both ways on every leg of both calls.
    for record in media_records(records, 2):
        for stream in record["media"]:
            for party in ("caller", "callee"):
                assert stream[party]["packets_in"] > 50, record
                assert stream[party]["packets_out"] > 50, record


DIGITS = "5#"


def test_dtmf_digits_cross_the_transcoded_call(
    kamailio_registrars: RegistrarFactory,
    sbc_factory: SbcFactory,
    phones: PhoneFactory,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
) -> None:
    """RFC 4733 events through the transcoder: alice (Opus, telephone-event/48000) and bob
    (PCMA, telephone-event/8000) each send digits (baresip ``sndcode``); the other side's
    baresip reports each digit (CALL_DTMF_START with the digit). The SBC maps the payload
    type and rescales the timestamps and durations between the clocks."""
    (registrar,) = kamailio_registrars(1)
    sbc = sbc_factory(media='core_codecs = ["PCMA"]', extra=_backends(registrar.uri))
    proxy = f"127.0.0.1:{sbc.udp4}"
    alice = phones("alice", hz=ALICE_HZ, codecs=("opus",))
    bob = phones("bob", hz=BOB_HZ, codecs=("pcma",))
    bob.command("uanew", account("bob", proxy, "udp", answer=True) + ";audio_codecs=PCMA/8000/1")
    bob.wait_event("REGISTER_OK")
    alice.command("uanew", account("alice", proxy, "udp") + ";audio_codecs=opus/48000/2")
    alice.wait_event("REGISTER_OK")
    alice.command("dial", "sip:bob@example.com")
    alice.wait_event("CALL_ESTABLISHED", timeout=10.0)
    bob.wait_event("CALL_ESTABLISHED", timeout=10.0)
    for sender, receiver in ((alice, bob), (bob, alice)):
        for i, digit in enumerate(DIGITS, start=1):
            sender.command("sndcode", digit)
            time.sleep(0.3)
            sender.command("sndcode", "")  # baresip: an empty code ends the tone
            receiver.wait_event("CALL_DTMF_START", timeout=5.0, count=i)
        got = [e.get("param") for e in receiver.events if e.get("type") == "CALL_DTMF_START"]
        assert got == list(DIGITS), f"{receiver.name} got {got}\n{receiver.explain()}"
    alice.command("hangup")
    alice.wait_event("CALL_CLOSED", timeout=10.0)
    bob.wait_event("CALL_CLOSED", timeout=10.0)


def test_dtmf_events_become_info_for_a_callee_without_telephone_event(
    kamailio_registrars: RegistrarFactory,
    sbc_factory: SbcFactory,
    phones: PhoneFactory,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
) -> None:
    """Item 2's interworking: alice (baresip, PCMU and telephone-event) presses 5; bob (a
    SIPp UAS whose answer has PCMU alone) gets an INFO with application/dtmf-relay,
    Signal=5, from the SBC, in his dialog."""
    (registrar,) = kamailio_registrars(1)
    records = tmp_path / "calls.jsonl"
    sbc = sbc_factory(extra=_backends(registrar.uri) + f'\n[calls]\nrecords = "{records}"\n')
    lab = Lab(sbc, registrar, records, tmp_path, require("sipp"))
    try:
        bob = lab.callee("call_info_dtmf_uas.xml", "bob", timeout=20.0)
        alice = phones("alice", hz=ALICE_HZ)
        alice.command("uanew", account("alice", f"127.0.0.1:{sbc.udp4}", "udp"))
        alice.wait_event("REGISTER_OK")
        alice.command("dial", "sip:bob@example.com")
        alice.wait_event("CALL_ESTABLISHED", timeout=10.0)
        time.sleep(0.5)
        alice.command("sndcode", "5")
        time.sleep(0.3)
        alice.command("sndcode", "")
        time.sleep(1.0)
        alice.command("hangup")
        alice.wait_event("CALL_CLOSED", timeout=10.0)
        (b_msgs,) = passed(bob)
        infos = [m for m in received(b_msgs) if m.method == "INFO"]
        assert len(infos) == 1, [m.first_line for m in received(b_msgs)]
        assert "Signal=5" in infos[0].body and "Duration=" in infos[0].body, infos[0].text
    finally:
        for sipp in lab.running:
            sipp.stop()
