"""The interop matrix: real softphones through a real ``sbc run``.

Each case is one call: {baresip -> baresip, linphonec -> baresip} x {UDP, TLS} x {SRTP,
plain RTP}. The SBC is its own registrar (no backend: one B2BUA call between two access
legs; the Kamailio path with real phones is test_baresip_calls.py and test_media.py's
``test_srtp_access_plain_core``). In every case:

1. register: bob (baresip, auto-answer) and the caller register through the SBC over the
   case's transport; the SBC's /metrics shows both registrations;
2. call: the caller dials bob, bob answers, both say the call is up;
3. audio both ways: each phone records what it decodes, and each recording holds the other's
   tone (dominant frequency within 10 Hz, band-pass energy, phones.py ``assert_heard``);
4. hold: the caller puts the call on hold (baresip ``hold`` over ctrl_tcp, linphonec
   ``pause``): bob receives the re-INVITE through the SBC with ``a=sendonly`` and answers
   ``a=recvonly``, and the caller gets that answer back (its own trace or log);
5. resume: the caller resumes (``resume``): bob receives ``a=sendrecv``, answers it, and on
   the wire RTP flows again both ways on both legs and carries the tones;
6. hang-up: the caller hangs up, both phones see the call end, the call record says
   ``BYE from caller``, and /metrics says no call is active.

On the wire (tshark on ``lo``, the SBC's relay ports) each leg is checked for what the case
says: with SRTP, read as plain G.711 a stream is noise, and bob's leg decrypted with the keys
of his SDPs is the tone; plain, each stream read as G.711 is the tone. That is done for the
time after resume, so it also shows audio flowing again.

What was seen with which versions is in docs/interop.md.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest

from . import media_check as mc
from .conftest import Certs, SbcFactory, SbcProcess, require, wait_until
from .phones import (  # noqa: F401 - captures, linphones, phones and sox are fixtures
    ALICE_HZ,
    BOB_HZ,
    CALL_TIMEOUT,
    DOMAIN,
    HOST,
    NOISE_RATIO,
    TONE_RATIO,
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
    start_capture,
)
from .test_baresip import _header
from .test_calls import scrape

pytestmark = pytest.mark.interop

TALK_SECONDS = 2.5  # before the hold: baresip 1.0 records only this part (see docs/interop.md)
RESUMED_SECONDS = 2.0  # after the resume, checked on the wire
HOLD_SECONDS = 1.5
SETTLE = 0.3  # seconds left out at the start of each window (the re-INVITE's round trip)
PACKETS_PER_SECOND = 50  # ptime 20
MIN_SHARE = 0.6  # of the packets a window could hold at 50/s, that a stream must carry
HELD_SHARE = 0.1  # at most, of those, from the party that was asked not to send


@dataclass(frozen=True)
class Case:
    caller: str  # "baresip" or "linphone"
    transport: str  # "udp" or "tls"
    srtp: bool

    @property
    def id(self) -> str:
        return f"{self.caller}-baresip-{self.transport}-{'srtp' if self.srtp else 'plain'}"


class UndecryptableAfterReinvite(AssertionError):
    """A phone could not decrypt the SRTP the SBC sent it after a re-INVITE."""


MAX_DECRYPT_ERRORS = 2  # RTP packets a phone may fail to decrypt in a whole call
# An SBC that re-keyed its leg on every re-INVITE made bob (baresip 1.0, which keeps its
# first key) fail to decrypt everything after a hold: these cases caught it, and the
# SBC now keeps a leg's keys on re-offers (RFC 4568 7.1.4; sbc/media/session.py).


def _param(case: Case) -> Any:
    return pytest.param(case, id=case.id)


CASES = [
    _param(Case(caller, transport, srtp))
    for caller in ("baresip", "linphone")
    for transport in ("udp", "tls")
    for srtp in (True, False)
]


# -- what a caller must do ----------------------------------------------------------------------
class Caller(Protocol):
    @property
    def name(self) -> str: ...

    def register(self) -> None: ...
    def dial(self) -> None: ...
    def wait_established(self) -> None: ...
    def hold(self) -> None: ...
    def wait_held(self) -> None: ...
    def resume(self) -> None: ...
    def wait_resumed(self) -> None: ...
    def hangup(self) -> None: ...
    def wait_closed(self) -> None: ...
    def received_answers(self) -> list[str]: ...
    def srtp_errors(self) -> list[str]: ...
    def assert_heard(self, sox_binary: str, hz: float) -> None: ...


def direction(sdp_message: str) -> str:
    """The audio direction an SDP says (sendrecv when it says none)."""
    match = re.search(r"^a=(sendrecv|sendonly|recvonly|inactive)\s*$", body(sdp_message), re.M)
    return match.group(1) if match else "sendrecv"


def unique_by_cseq(messages: list[str]) -> list[str]:
    """One of each CSeq (UDP retransmissions left out), in order."""
    seen: dict[str, str] = {}
    for message in messages:
        seen.setdefault(_header(message, "CSeq"), message)
    return list(seen.values())


def invites(phone: MediaPhone) -> list[str]:
    """The INVITEs with SDP in ``phone``'s trace (sent or received), one per CSeq."""
    return unique_by_cseq([m for m in phone.trace("INVITE sip:") if body(m).strip()])


def invite_answers(phone: MediaPhone) -> list[str]:
    """The 200s to INVITEs with SDP in ``phone``'s trace, one per CSeq."""
    return unique_by_cseq(
        [
            m
            for m in phone.trace("SIP/2.0 200")
            if _header(m, "CSeq").endswith("INVITE") and body(m).strip()
        ]
    )


def rtp_decrypt_errors(phone: MediaPhone) -> list[str]:
    """baresip's complaints about SRTP packets it could not decrypt (SRTCP left out: a few
    of those at a call's start or end are normal for baresip 1.0)."""
    return re.findall(r"srtp: failed to decrypt RTP packet.*", phone.log())


@dataclass
class BaresipCaller:
    phone: MediaPhone
    proxy: str
    case: Case

    @property
    def name(self) -> str:
        return self.phone.name

    def register(self) -> None:
        self.phone.command(
            "uanew", account(self.name, self.proxy, self.case.transport, srtp=self.case.srtp)
        )
        self.phone.wait_event("REGISTER_OK")

    def dial(self) -> None:
        self.phone.command("dial", f"sip:bob@{DOMAIN}")

    def wait_established(self) -> None:
        self.phone.wait_event("CALL_ESTABLISHED", timeout=CALL_TIMEOUT)

    def hold(self) -> None:
        self.phone.command("hold")

    def _answered(self, count: int, sdp_direction: str) -> bool:
        answers = invite_answers(self.phone)
        return len(answers) >= count and direction(answers[count - 1]) == sdp_direction

    def wait_held(self) -> None:
        answered = lambda: self._answered(2, "recvonly")  # noqa: E731
        wait_until("the answer to the hold", answered, CALL_TIMEOUT, self.phone.explain)

    def resume(self) -> None:
        self.phone.command("resume")

    def wait_resumed(self) -> None:
        answered = lambda: self._answered(3, "sendrecv")  # noqa: E731
        wait_until("the answer to the resume", answered, CALL_TIMEOUT, self.phone.explain)

    def hangup(self) -> None:
        self.phone.command("hangup")

    def wait_closed(self) -> None:
        self.phone.wait_event("CALL_CLOSED", timeout=CALL_TIMEOUT)

    def received_answers(self) -> list[str]:
        return invite_answers(self.phone)

    def assert_heard(self, sox_binary: str, hz: float) -> None:
        assert_heard(sox_binary, self.phone, hz)

    def srtp_errors(self) -> list[str]:
        return rtp_decrypt_errors(self.phone)


# linphonec's log (-d 6) has every state change of a call and every SIP message it sent or
# received, whole.
STREAMS_RUNNING = r"to LinphoneCallStreamsRunning"


@dataclass
class LinphoneCaller:
    phone: Linphone

    @property
    def name(self) -> str:
        return self.phone.name

    def register(self) -> None:
        self.phone.wait_for(r"to \[LinphoneRegistrationOk\]")

    def dial(self) -> None:
        self.phone.send(f"call sip:bob@{DOMAIN}")

    def wait_established(self) -> None:
        self.phone.wait_count(STREAMS_RUNNING, 1)

    def hold(self) -> None:
        self.phone.send("pause")

    def wait_held(self) -> None:
        self.phone.wait_for(r"to LinphoneCallPaused\b")

    def resume(self) -> None:
        self.phone.send("resume")

    def wait_resumed(self) -> None:
        self.phone.wait_count(STREAMS_RUNNING, 2)

    def hangup(self) -> None:
        self.phone.send("terminate")

    def wait_closed(self) -> None:
        self.phone.wait_for(r"to LinphoneCallReleased")

    def received_answers(self) -> list[str]:
        """The 200s to INVITEs with SDP that its log shows it received, one per CSeq."""
        log = self.phone.log().replace("\r\n", "\n")
        messages = [
            entry.split("\n", 1)[1]
            for entry in re.split(r"^(?=\d{4}-\d\d-\d\d \d\d:\d\d:\d\d:\d{3} )", log, flags=re.M)
            if re.match(r"\S+ \S+ belle-sip-message-channel .*: received \[\d+\] new bytes", entry)
        ]
        return unique_by_cseq(
            [
                m
                for m in messages
                if m.startswith("SIP/2.0 200")
                and _header(m, "CSeq").endswith("INVITE")
                and body(m).strip()
            ]
        )

    def srtp_errors(self) -> list[str]:
        return re.findall(r"^.*srtp.*\b(?:fail|failed|error)\b.*$", self.phone.log(), re.M | re.I)

    def assert_heard(self, sox_binary: str, hz: float) -> None:
        assert_recording(sox_binary, self.name, self.phone.recording, hz, self.phone.explain)


# -- the wire -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Window:
    name: str
    start: float  # seconds since the epoch, as the capture's timestamps
    end: float

    def of(self, datagrams: list[mc.Datagram]) -> list[mc.Datagram]:
        return [d for d in datagrams if self.start + SETTLE <= d.at <= self.end]

    @property
    def expected(self) -> float:
        """Packets a stream sending all along would carry in it."""
        return PACKETS_PER_SECOND * max(0.0, self.end - self.start - SETTLE)


def registrations(sbc: SbcProcess) -> float:
    return scrape(sbc).get(("sbc_registrations", (("mode", "local"),)), 0.0)


def active_calls(sbc: SbcProcess) -> float:
    return scrape(sbc)[("sbc_calls_active", ())]


@pytest.mark.parametrize("case", CASES)
def test_call_hold_resume_hangup(
    case: Case,
    sbc_factory: SbcFactory,
    phones: PhoneFactory,  # noqa: F811 - the fixture imported above
    linphones: Callable[..., Linphone],  # noqa: F811 - the fixture imported above
    captures: list[mc.Capture],  # noqa: F811 - the fixture imported above
    certs: Certs,
    sox: str,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
) -> None:
    tshark = require("tshark")
    records = tmp_path / "calls.jsonl"
    sbc = sbc_factory(
        media=f'access_srtp = "{"mandatory" if case.srtp else "off"}"',
        extra=f'\n[calls]\nrecords = "{records}"\n',
    )
    low, high = media_range(sbc.config)
    port = sbc.tls4 if case.transport == "tls" else sbc.udp4
    proxy = f"{HOST}:{port}"

    # 1. Register.
    bob = phones("bob", hz=BOB_HZ, cafile=certs.ca)
    bob.command("uanew", account("bob", proxy, case.transport, srtp=case.srtp, answer=True))
    bob.wait_event("REGISTER_OK")
    caller: Caller
    if case.caller == "baresip":
        caller = BaresipCaller(phones("alice", hz=ALICE_HZ, cafile=certs.ca), proxy, case)
    else:
        # Over TLS linphonec checks the certificate's name: the SBC is "localhost" to it.
        name = "localhost" if case.transport == "tls" else HOST
        caller = LinphoneCaller(
            linphones(
                "carol",
                hz=ALICE_HZ,
                proxy=f"{name}:{port}",
                ca=certs.ca,
                transport=case.transport,
                srtp=case.srtp,
            )
        )
    caller.register()
    assert registrations(sbc) == 2, scrape(sbc)

    # 2. Call; 4. hold; 5. resume; 6. hang up; each step's wall-clock time kept for the wire.
    capture = start_capture(tshark, tmp_path, "lo", f"udp portrange {low}-{high}", (HOST, low))
    captures.append(capture)
    start = time.monotonic()
    caller.dial()
    bob.wait_event("CALL_ESTABLISHED", timeout=CALL_TIMEOUT)
    caller.wait_established()
    setup = time.monotonic() - start
    time.sleep(TALK_SECONDS)
    hold_sent = time.time()
    caller.hold()
    caller.wait_held()
    held = time.time()
    time.sleep(HOLD_SECONDS)
    resume_sent = time.time()
    caller.resume()
    caller.wait_resumed()
    resumed = time.time()
    time.sleep(RESUMED_SECONDS)
    hangup_sent = time.time()
    caller.hangup()
    bob.wait_event("CALL_CLOSED", timeout=CALL_TIMEOUT)
    caller.wait_closed()
    assert capture.stop() == 0, capture.explain()
    print(f"{case.id}: set up in {setup:.2f} s, hold took {held - hold_sent:.2f} s, "
          f"resume {resumed - resume_sent:.2f} s")  # fmt: skip

    # The SBC holds no call afterwards; its record says the caller hung up.
    (record,) = media_records(records, 1)
    assert record["cause"] == "BYE from caller", record
    assert [leg["side"] for leg in record["legs"]] == ["access", "access"], record
    assert active_calls(sbc) == 0, scrape(sbc)

    # 3. Audio both ways: each recording is the other's tone.
    assert_heard(sox, bob, ALICE_HZ)
    caller.assert_heard(sox, BOB_HZ)

    # 4, 5. The re-INVITEs went through the SBC: bob got the hold (sendonly) and the resume
    # (sendrecv) and answered recvonly then sendrecv; the caller got those answers.
    got, answered = invites(bob), invite_answers(bob)
    assert [direction(m) for m in got] == ["sendrecv", "sendonly", "sendrecv"], got
    assert [direction(m) for m in answered] == ["sendrecv", "recvonly", "sendrecv"], answered
    assert [direction(m) for m in caller.received_answers()] == [
        "sendrecv", "recvonly", "sendrecv"
    ], caller.received_answers()  # fmt: skip

    # The wire. bob's leg from his SDPs (the relay's port from the offers he got, his own
    # from his answers); the caller's leg from where the relay latched onto it.
    offers = [Sdp.of(m) for m in got]
    answers = [Sdp.of(m) for m in answered]
    assert len({o.rtp for o in offers}) == 1, offers  # the relay kept its port
    relay_b, bob_rtp = offers[-1].rtp, answers[-1].rtp
    latched = record["media"][0]["caller"]["latched"]
    assert latched is not None, record
    caller_rtp = (str(latched[0]), int(latched[1]))
    datagrams = capture.datagrams()
    relay_sources = flow(datagrams, "relay->caller", caller_rtp).sources
    assert len(relay_sources) == 1, relay_sources
    (relay_c,) = relay_sources
    for relay in (relay_b, relay_c):
        assert relay[0] == HOST and low <= relay[1] <= high, (relay, (low, high))

    talk2 = Window("after resume", resumed, hangup_sent)
    holding = Window("on hold", held, resume_sent)
    after = talk2.of(datagrams)
    streams: dict[str, tuple[Flow, float]] = {
        "caller->relay": (flow(after, "caller->relay", relay_c), ALICE_HZ),
        "relay->bob": (flow(after, "relay->bob", bob_rtp), ALICE_HZ),
        "bob->relay": (flow(after, "bob->relay", relay_b), BOB_HZ),
        "relay->caller": (flow(after, "relay->caller", caller_rtp), BOB_HZ),
    }
    # bob's keys after the resume: the SBC's in the last offer he got (the tag he chose),
    # his own in his last answer.
    keys: dict[str, tuple[str, bytes]] = {}
    if case.srtp:
        (tag,) = answers[-1].cryptos
        keys = {"relay->bob": offers[-1].key(tag), "bob->relay": answers[-1].key()}
    summary: dict[str, dict[str, float]] = {}
    # Symmetric RTP: the relay sends each phone its audio from the port it advertised.
    assert streams["relay->bob"][0].sources == {relay_b}, streams["relay->bob"][0].sources
    for name, (stream, hz) in streams.items():
        assert len(stream.packets) >= MIN_SHARE * talk2.expected, (name, len(stream.packets))
        plain = stream.listen(tmp_path, sox, hz)
        summary[name] = {"packets": len(stream.packets), "as_g711": plain}
        if case.srtp:
            assert plain < NOISE_RATIO, (name, summary)
            if name in keys:
                summary[name]["decrypted"] = stream.listen(tmp_path, sox, hz, key=keys[name])
                assert summary[name]["decrypted"] >= TONE_RATIO, (name, summary)
        else:
            assert plain >= TONE_RATIO, (name, summary)

    # On hold the caller asked bob not to send: (almost) nothing of bob's reaches the caller.
    on_hold = holding.of(datagrams)
    from_bob = len(flow(on_hold, "", relay_b).packets)
    to_caller = len(flow(on_hold, "", caller_rtp).packets)
    summary["on hold"] = {"bob->relay": from_bob, "relay->caller": to_caller}
    print(f"{case.id}: {summary}")
    assert to_caller <= HELD_SHARE * holding.expected, summary

    # Last: each phone decrypted what the SBC sent it, the re-INVITEs included (bob is
    # baresip; a baresip or linphonec caller).
    errors = {"bob": rtp_decrypt_errors(bob), caller.name: caller.srtp_errors()}
    counts = {name: len(lines) for name, lines in errors.items()}
    if any(count > MAX_DECRYPT_ERRORS for count in counts.values()):
        first = {name: lines[:1] for name, lines in errors.items()}
        raise UndecryptableAfterReinvite(f"SRTP decrypt errors: {counts}, first: {first}")
