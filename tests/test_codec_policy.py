"""Codec policy and the transcoding cap: what each leg is offered,
when the SBC transcodes, and what the media workers are told."""

from __future__ import annotations

import dataclasses
import json

import pytest
from test_b2bua import (
    ALICE,
    ANSWER_SDP,
    B1,
    SDP,
    Lab,
    ack_for,
    alice_hangs_up,
    invite,
    only,
    reply,
)
from test_b2bua import media_policy as b2bua_media_policy

from sbc.app import media_policy
from sbc.config import ConfigError, parse_config
from sbc.media.codec_policy import DEFAULT_CODECS
from sbc.media.control import CodecSpec, Command, Update
from sbc.media.session import MediaController, MediaPolicy, MediaRefused, SideMedia
from sbc.sdp.sdp import Media, Session
from sbc.sip.message import Request, Response

ACCESS_IP = "203.0.113.1"
CORE_IP = "10.1.0.1"


def sdp(*lines: str) -> bytes:
    return ("\r\n".join(lines) + "\r\n").encode()


def offer_sdp(m: str, *attrs: str, host: str = "192.168.1.20", port: int = 4000) -> bytes:
    kind, _, formats = m.partition(" ")
    return sdp(
        "v=0",
        f"o=- 1 1 IN IP4 {host}",
        "s=-",
        f"c=IN IP4 {host}",
        "t=0 0",
        f"m={kind} {port} RTP/AVP {formats}",
        *attrs,
    )


# A softphone restricted to Opus (baresip's lines), with RFC 4733 events at 8000 Hz.
OPUS_OFFER = offer_sdp(
    "audio 96 101",
    "b=AS:83",
    "a=rtpmap:96 opus/48000/2",
    "a=fmtp:96 stereo=1;sprop-stereo=1",
    "a=rtpmap:101 telephone-event/8000",
    "a=fmtp:101 0-15",
    "a=sendrecv",
    "a=ptime:20",
)
# A core restricted to PCMA, packetizing at 30 ms.
PCMA_ANSWER = offer_sdp(
    "audio 8 101",
    "a=rtpmap:8 PCMA/8000",
    "a=rtpmap:101 telephone-event/8000",
    "a=fmtp:101 0-16",
    "a=ptime:30",
    "a=sendrecv",
    host="10.1.0.50",
    port=5000,
)


def policy(
    access: tuple[str, ...] = DEFAULT_CODECS, core: tuple[str, ...] = ("PCMA",), cap: int = 100
) -> MediaPolicy:
    return MediaPolicy(
        sides={
            "access": SideMedia(bind="0.0.0.0", advertise=ACCESS_IP, codecs=access),
            "core": SideMedia(bind=CORE_IP, advertise=CORE_IP, codecs=core),
        },
        ports=(30000, 30099),
        max_transcoded_calls=cap,
    )


class Harness:
    def __init__(self, pol: MediaPolicy | None = None) -> None:
        self._sent: list[tuple[int, Command]] = []
        self.ctl = MediaController(pol or policy())

    @property
    def sent(self) -> list[tuple[int, Command]]:
        """Every command for the workers so far (what the core would return as actions)."""
        self._sent += self.ctl.take_commands()
        return self._sent

    def update(self, call: str = "c1") -> Update:
        for _worker, cmd in reversed(self.sent):
            if isinstance(cmd, Update) and cmd.session == call:
                return cmd
        raise AssertionError("no Update")

    def codecs(self, call: str = "c1") -> tuple[CodecSpec | None, CodecSpec | None]:
        [stream] = self.update(call).streams
        return stream.a.codec, stream.b.codec

    def offer(self, body: bytes, toward_caller: bool = False, call: str = "c1") -> Media:
        out = self.ctl.offer(call, ("access", "core"), toward_caller, body, "application/sdp")
        return Session.parse(out).media[0]

    def answer(self, body: bytes, toward_caller: bool = True, call: str = "c1") -> Media:
        out = self.ctl.answer(call, ("access", "core"), toward_caller, body, "application/sdp")
        return Session.parse(out).media[0]

    def assert_clean(self) -> None:
        for call in list(self.ctl.sessions):
            self.ctl.release(call)
        assert self.ctl.state_size() == {"media_sessions": 0, "media_ports": 0}
        assert self.ctl.transcoded_calls == 0


def rtpmaps(m: Media) -> list[str]:
    return m.attributes("rtpmap")


OPUS_LEG = CodecSpec(name="OPUS", pt=96, clock=48000, channels=2, ptime=20,
                     fmtp="stereo=1;sprop-stereo=1", dtmf_pt=101, dtmf_clock=8000)  # fmt: skip
PCMA_LEG = CodecSpec(name="PCMA", pt=8, clock=8000, channels=1, ptime=30, fmtp="",
                     dtmf_pt=101, dtmf_clock=8000)  # fmt: skip


def test_opus_only_caller_to_a_pcma_only_core_is_transcoded() -> None:
    h = Harness()
    to_core = h.offer(OPUS_OFFER)
    # Nothing of the core's list was left: the SBC offers it PCMA (static PT 8, RFC 3551),
    # and the caller's telephone-event with its PT; no opus line, no b= sized for Opus.
    assert to_core.formats == ["8", "101"]
    assert rtpmaps(to_core) == ["8 PCMA/8000", "101 telephone-event/8000"]
    assert to_core.attributes("fmtp") == ["101 0-15"] and not to_core.has("b")
    assert not any(kind == "b" for kind, _ in to_core.lines)
    assert to_core.attributes("ptime") == ["20"]
    assert h.codecs() == (None, None)  # nothing decided before the answer
    assert h.ctl.transcoded_calls == 1  # the slot is held for the pending answer

    to_caller = h.answer(PCMA_ANSWER)
    # RFC 3264 6.1: the caller is answered with its own codec and PTs and its own ptime.
    assert to_caller.formats == ["96", "101"]
    assert rtpmaps(to_caller) == ["96 opus/48000/2", "101 telephone-event/8000"]
    assert to_caller.attributes("fmtp") == ["96 stereo=1;sprop-stereo=1", "101 0-15"]
    assert to_caller.attributes("ptime") == ["20"] and to_caller.direction() == "sendrecv"
    assert b"PCMA" not in bytes(Session([], [to_caller]))
    # The workers transcode OPUS (caller) <-> PCMA (core), each leg with its PTs and ptime.
    assert h.codecs() == (OPUS_LEG, PCMA_LEG)
    assert h.ctl.transcoded_calls == 1
    h.assert_clean()


def test_a_shared_codec_is_offered_alone_and_nothing_is_transcoded() -> None:
    h = Harness()
    offer = OPUS_OFFER.replace(b"96 101", b"96 8 101").replace(
        b"a=rtpmap:101", b"a=rtpmap:8 PCMA/8000\r\na=rtpmap:101"
    )
    to_core = h.offer(offer)
    # The core's list keeps PCMA only; Opus and its lines are removed, nothing is added.
    assert to_core.formats == ["8", "101"]
    assert rtpmaps(to_core) == ["8 PCMA/8000", "101 telephone-event/8000"]
    assert h.ctl.transcoded_calls == 0
    to_caller = h.answer(PCMA_ANSWER)
    assert to_caller.formats == ["8", "101"] and to_caller.attributes("ptime") == ["30"]
    assert h.codecs() == (None, None)
    h.assert_clean()


def test_an_answer_on_the_offerers_codec_loses_the_formats_the_sbc_added() -> None:
    h = Harness(policy(core=DEFAULT_CODECS))
    assert h.offer(OPUS_OFFER).formats == ["96", "9", "0", "8", "101"]
    # A browser-like answerer repeats every format it accepts, the SBC's additions too.
    answer = offer_sdp(
        "audio 96 9 0 8 101",
        "a=rtpmap:96 opus/48000/2",
        "a=rtpmap:9 G722/8000",
        "a=rtpmap:0 PCMU/8000",
        "a=rtpmap:8 PCMA/8000",
        "a=rtpmap:101 telephone-event/8000",
        host="10.1.0.50",
    )
    to_caller = h.answer(answer)
    # The caller gets only what it offered: its Opus and its events (RFC 3264 6.1).
    assert to_caller.formats == ["96", "101"]
    assert rtpmaps(to_caller) == ["96 opus/48000/2", "101 telephone-event/8000"]
    assert h.codecs() == (None, None)
    h.assert_clean()


def test_defaults_append_the_missing_codecs_behind_the_offerers() -> None:
    h = Harness(policy(core=DEFAULT_CODECS))
    to_core = h.offer(OPUS_OFFER)
    # The caller's Opus first (its PT), then the list's codecs it lacks (static PTs), then
    # its telephone-event; the b= sized for Opus goes.
    assert to_core.formats == ["96", "9", "0", "8", "101"]
    assert rtpmaps(to_core) == [
        "96 opus/48000/2", "9 G722/8000", "0 PCMU/8000", "8 PCMA/8000",
        "101 telephone-event/8000",
    ]  # fmt: skip
    assert not any(kind == "b" for kind, _ in to_core.lines)
    # A shared codec may still be picked: no slot is held while the answer is pending.
    assert h.ctl.transcoded_calls == 0
    # The callee takes the caller's Opus: nothing is transcoded.
    h.answer(OPUS_OFFER.replace(b"192.168.1.20", b"10.1.0.50"))
    assert h.codecs() == (None, None) and h.ctl.transcoding().streams == 0
    assert h.ctl.transcoded("c1") == 0
    h.assert_clean()


@pytest.mark.parametrize(
    ("caller", "callee"),
    [("PCMU", "PCMA"), ("PCMA", "PCMU"), ("OPUS", "PCMA"), ("G722", "PCMU"), ("PCMU", "OPUS")],
)
def test_a_callee_without_the_callers_codec_gets_one_the_sbc_transcodes(
    caller: str, callee: str
) -> None:
    """The default lists: a callee that lacks the caller's only codec picks one the SBC
    appended, and the stream is transcoded between the two."""
    h = Harness(policy(core=DEFAULT_CODECS))
    pts = {"PCMU": 0, "PCMA": 8, "G722": 9, "OPUS": 111}
    rtpmap = {"PCMU": "PCMU/8000", "PCMA": "PCMA/8000", "G722": "G722/8000",
              "OPUS": "opus/48000/2"}  # fmt: skip
    offer = offer_sdp(f"audio {pts[caller]}", f"a=rtpmap:{pts[caller]} {rtpmap[caller]}")
    to_core = h.offer(offer)
    names = [r.split()[1].split("/")[0].upper() for r in rtpmaps(to_core)]
    assert names[0] == caller and sorted(names) == sorted(DEFAULT_CODECS), names
    added = next(r for r in rtpmaps(to_core) if r.split()[1].upper().startswith(callee))
    pt = added.split()[0]
    h.answer(offer_sdp(f"audio {pt}", f"a=rtpmap:{added}", host="10.1.0.50"))
    a, b = h.codecs()
    assert a is not None and b is not None and (a.name, b.name) == (caller, callee)
    assert h.ctl.transcoding().streams == 1 and h.ctl.transcoded("c1") == 1
    assert h.ctl.transcoded_calls == 1
    h.assert_clean()
    assert h.ctl.transcoding().streams_total == 1


def test_why_an_offer_was_refused_is_a_305_warning() -> None:
    h = Harness(policy(core=DEFAULT_CODECS, cap=1))
    # G.729 alone: nothing the SBC can transcode, nothing added.
    h.offer(offer_sdp("audio 18", "a=rtpmap:18 G729/8000"))
    assert h.ctl.refused_warning("c1") == (
        '305 sbc "Incompatible media format: no offered codec (G729) is one the SBC transcodes"'
    )
    h.ctl.rejected("c1")
    assert h.ctl.refused_warning("c1") is None and h.ctl.state_size()["media_ports"] == 0
    # PCMU with the others appended, and the answerer still took none.
    h.offer(offer_sdp("audio 0", "a=rtpmap:0 PCMU/8000"), call="c2")
    assert h.ctl.refused_warning("c2") == (
        '305 sbc "Incompatible media format: the answerer takes none of PCMU OPUS G722 PCMA"'
    )
    # At the cap (c3 transcodes), c4's offer goes on without anything added.
    h.offer(OPUS_OFFER, call="c3")
    h.answer(PCMA_ANSWER, call="c3")
    assert h.ctl.transcoded_calls == 1
    assert h.offer(offer_sdp("audio 0", "a=rtpmap:0 PCMU/8000"), call="c4").formats == ["0"]
    assert h.ctl.refused_warning("c4") == (
        '305 sbc "Incompatible media format: transcoding capacity reached (offered: PCMU)"'
    )
    h.assert_clean()


def test_events_are_added_at_the_clock_of_the_added_codec_and_mapped() -> None:
    h = Harness()
    offer = OPUS_OFFER.replace(b"telephone-event/8000", b"telephone-event/48000")
    to_core = h.offer(offer)
    # RFC 4733 2.1: events at the codec's clock; PT 97 is the first free dynamic type (96
    # is the caller's Opus: no number means two things on the two legs).
    assert to_core.formats == ["8", "101", "97"]
    assert rtpmaps(to_core) == [
        "8 PCMA/8000", "101 telephone-event/48000", "97 telephone-event/8000",
    ]  # fmt: skip
    answer = PCMA_ANSWER.replace(b"101", b"97")
    to_caller = h.answer(answer)
    assert to_caller.formats == ["96", "101"]
    caller, core = h.codecs()
    assert caller is not None and (caller.dtmf_pt, caller.dtmf_clock) == (101, 48000)
    assert core is not None and (core.dtmf_pt, core.dtmf_clock) == (97, 8000)
    h.assert_clean()


def test_events_on_one_leg_interwork_with_info() -> None:
    # The core answers without telephone-event; the caller keeps its own
    # (the relay turns its events into SIP INFO and INFO into events towards it).
    h = Harness()
    h.offer(OPUS_OFFER)
    to_caller = h.answer(offer_sdp("audio 8", "a=rtpmap:8 PCMA/8000", host="10.1.0.50"))
    assert to_caller.formats == ["96", "101"]
    assert rtpmaps(to_caller) == ["96 opus/48000/2", "101 telephone-event/8000"]
    assert to_caller.attributes("fmtp") == ["96 stereo=1;sprop-stereo=1", "101 0-15"]
    caller, core = h.codecs()
    assert caller is not None and (caller.dtmf_pt, caller.dtmf_clock) == (101, 8000)
    assert core is not None and core.dtmf_pt is None and core.ptime == 20  # no a=ptime: 20
    h.assert_clean()
    # An offer without events gets none added.
    h.offer(offer_sdp("audio 111", "a=rtpmap:111 opus/48000/2"))
    to_core = h.offer(offer_sdp("audio 111", "a=rtpmap:111 opus/48000/2"))
    assert to_core.formats == ["8"]
    h.assert_clean()


def test_the_sides_list_order_and_the_offerers_best_codec() -> None:
    h = Harness(policy(access=("OPUS", "PCMU"), core=("G722", "PCMA")))
    offer = offer_sdp(
        "audio 0 96 9",
        "a=rtpmap:0 PCMU/8000",
        "a=rtpmap:96 opus/48000/2",
        "a=rtpmap:96 opus/48000/2",
    )
    # G.722 (9) is offered, so it is kept, and PCMA, which it lacks, is appended.
    assert h.offer(offer).formats == ["9", "8"]
    h.assert_clean()
    # Without G.722: the core's list in its order, G.722 first (static PT 9).
    to_core = h.offer(offer.replace(b" 9\r\n", b"\r\n"))
    assert to_core.formats == ["9", "8"]
    assert rtpmaps(to_core) == ["9 G722/8000", "8 PCMA/8000"]
    h.answer(offer_sdp("audio 9", "a=rtpmap:9 G722/8000", host="10.1.0.50"))
    caller, core = h.codecs()
    # The caller's leg: the first of its codecs its side's list allows (PCMU before Opus).
    assert caller is not None and (caller.name, caller.pt, caller.clock) == ("PCMU", 0, 8000)
    assert core is not None and (core.name, core.pt, core.clock) == ("G722", 9, 8000)
    h.assert_clean()


def test_opus_is_added_with_a_dynamic_pt_and_rfc7587_rtpmap() -> None:
    h = Harness(policy(access=DEFAULT_CODECS, core=("OPUS",)))
    to_core = h.offer(offer_sdp("audio 8 96", "a=rtpmap:8 PCMA/8000", "a=rtpmap:96 speex/16000"))
    # Speex (not transcodable) passes; 96 is taken, so Opus gets 97.
    assert to_core.formats == ["96", "97"]
    assert rtpmaps(to_core) == ["96 speex/16000", "97 opus/48000/2"]
    assert to_core.attributes("fmtp") == ["97 useinbandfec=1"]
    h.answer(offer_sdp("audio 97", "a=rtpmap:97 opus/48000/2", "a=ptime:60", host="10.1.0.50"))
    caller, core = h.codecs()
    assert caller == CodecSpec(name="PCMA", pt=8, clock=8000)
    assert core == CodecSpec(name="OPUS", pt=97, clock=48000, channels=2, ptime=60)
    # The answerer picking the codec it shares with the caller: no transcoding.
    h.assert_clean()
    h.offer(offer_sdp("audio 8 96", "a=rtpmap:8 PCMA/8000", "a=rtpmap:96 speex/16000"))
    h.answer(offer_sdp("audio 96", "a=rtpmap:96 speex/16000", host="10.1.0.50"))
    assert h.codecs() == (None, None) and h.ctl.transcoded_calls == 0
    h.assert_clean()


def test_video_and_end_to_end_keyed_streams_are_left_alone() -> None:
    h = Harness()
    video = OPUS_OFFER + b"m=video 4002 RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\n"
    out = Session.parse(h.ctl.offer("c1", ("access", "core"), False, video, "application/sdp"))
    assert out.media[1].formats == ["96"] and rtpmaps(out.media[1]) == ["96 H264/90000"]
    h.assert_clean()
    dtls = sdp(
        "v=0", "o=- 1 1 IN IP4 192.168.1.20", "s=-", "c=IN IP4 192.168.1.20", "t=0 0",
        "a=fingerprint:sha-256 AB:CD", "m=audio 4000 UDP/TLS/RTP/SAVPF 111",
        "a=rtpmap:111 opus/48000/2",
    )  # fmt: skip
    assert h.offer(dtls).formats == ["111"] and h.ctl.transcoded_calls == 0
    h.assert_clean()


def test_the_cap_refuses_offers_only_transcoding_could_meet() -> None:
    h = Harness(policy(cap=1))
    h.offer(OPUS_OFFER, call="c1")
    # c1's pending offer holds the one slot: an Opus-only c2 is refused (488 with this
    # reason from the B2BUA) and leaves nothing behind.
    with pytest.raises(MediaRefused, match=r"^Transcoding Capacity Reached$"):
        h.offer(OPUS_OFFER, call="c2")
    assert "c2" not in h.ctl.sessions
    # An offer with a codec the core takes goes on, without anything added.
    both = OPUS_OFFER.replace(b"96 101", b"96 8 101")
    assert h.offer(both, call="c3").formats == ["8", "101"]
    h.answer(PCMA_ANSWER, call="c1")
    assert h.ctl.transcoded_calls == 1
    # A released call frees its slot.
    h.ctl.release("c1")
    assert h.ctl.transcoded_calls == 0
    assert h.offer(OPUS_OFFER, call="c2").formats == ["8", "101"]
    h.assert_clean()


def test_a_refused_offer_and_an_answer_that_shares_a_codec_free_the_slot() -> None:
    h = Harness(policy(cap=1))
    h.offer(OPUS_OFFER)
    h.ctl.rejected("c1")  # a 486 to the INVITE
    assert h.ctl.transcoded_calls == 0 and "c1" not in h.ctl.sessions
    # The core answering with a codec the caller offered (here by mistake: it was not in the
    # offer sent to it) is not transcoded.
    h.offer(OPUS_OFFER)
    h.answer(OPUS_OFFER.replace(b"192.168.1.20", b"10.1.0.50"))
    assert h.codecs() == (None, None) and h.ctl.transcoded_calls == 0
    h.assert_clean()


def test_no_transcoding_at_all_with_a_cap_of_zero() -> None:
    h = Harness(policy(cap=0))
    with pytest.raises(MediaRefused, match=r"^No Common Codec$"):
        h.offer(OPUS_OFFER)
    h.assert_clean()


def test_reoffers_on_a_transcoded_call_keep_the_legs_codecs() -> None:
    h = Harness()
    first = h.offer(OPUS_OFFER)
    h.answer(PCMA_ANSWER)
    # Hold from the caller (RFC 3264 8.4): the same offer to the core, the same answer back.
    hold = h.offer(OPUS_OFFER.replace(b"a=sendrecv", b"a=sendonly"))
    assert hold.formats == first.formats and rtpmaps(hold) == rtpmaps(first)
    assert hold.direction() == "sendonly"
    assert h.codecs() == (OPUS_LEG, PCMA_LEG)  # unchanged while the re-offer is pending
    to_caller = h.answer(PCMA_ANSWER.replace(b"a=sendrecv", b"a=recvonly"))
    assert to_caller.formats == ["96", "101"] and to_caller.direction() == "recvonly"
    assert h.codecs() == (OPUS_LEG, PCMA_LEG) and h.ctl.transcoded_calls == 1

    # A re-offer from the core (PCMA only): the caller's side allows PCMA, so it is offered
    # first, the caller's Opus (its PT 96 again) is appended first so the call keeps
    # working, then the rest of the caller's side's list.
    core_offer = PCMA_ANSWER.replace(b"a=ptime:30\r\n", b"")
    to_caller = h.offer(core_offer, toward_caller=True)
    assert to_caller.formats == ["8", "96", "9", "0", "101"]
    assert rtpmaps(to_caller) == [
        "8 PCMA/8000", "96 opus/48000/2", "9 G722/8000", "0 PCMU/8000",
        "101 telephone-event/8000",
    ]  # fmt: skip
    to_core = h.answer(OPUS_OFFER, toward_caller=False)
    assert to_core.formats == ["8", "101"] and rtpmaps(to_core)[0] == "8 PCMA/8000"
    caller, core = h.codecs()
    assert caller == OPUS_LEG
    assert core == CodecSpec(name="PCMA", pt=8, clock=8000, dtmf_pt=101)  # ptime 20 now
    assert h.ctl.transcoded_calls == 1

    # The caller now offers PCMA as well: the legs share it, transcoding stops.
    both = OPUS_OFFER.replace(b"96 101", b"96 8 101").replace(
        b"a=rtpmap:101", b"a=rtpmap:8 PCMA/8000\r\na=rtpmap:101"
    )
    assert h.offer(both).formats == ["8", "101"]
    h.answer(PCMA_ANSWER)
    assert h.codecs() == (None, None) and h.ctl.transcoded_calls == 0
    h.assert_clean()


def test_a_refused_reoffer_restores_the_codecs() -> None:
    h = Harness(policy(cap=1))
    h.offer(OPUS_OFFER)
    h.answer(PCMA_ANSWER)
    h.offer(OPUS_OFFER.replace(b"4000", b"4100"))
    h.ctl.rejected("c1")
    assert h.codecs() == (OPUS_LEG, PCMA_LEG) and h.ctl.transcoded_calls == 1
    # A re-offer that rejects the stream (port 0) ends the transcoding.
    h.offer(OPUS_OFFER.replace(b"4000", b"0") + b"m=audio 4002 RTP/AVP 8\r\n")
    assert h.ctl.transcoded_calls == 1  # until the answer
    h.answer(PCMA_ANSWER.replace(b"5000", b"0") + b"m=audio 5002 RTP/AVP 8\r\n")
    assert h.ctl.transcoded_calls == 0
    h.assert_clean()


def test_a_stale_rtpmap_does_not_survive_next_to_an_added_codec() -> None:
    h = Harness()
    # a=rtpmap:8 names a type that is not on the m-line; the SBC adds PCMA as 8.
    to_core = h.offer(OPUS_OFFER.replace(b"a=sendrecv", b"a=rtpmap:8 G726-32/8000\r\na=sendrecv"))
    assert to_core.formats == ["8", "101"]
    assert rtpmaps(to_core) == ["8 PCMA/8000", "101 telephone-event/8000"]
    h.assert_clean()


# -- through the B2BUA -------------------------------------------------------------------------


def b2bua_lab(cap: int) -> Lab:
    pol = b2bua_media_policy()
    core = dataclasses.replace(pol.sides["core"], codecs=("PCMA",))
    sides = {**pol.sides, "core": core}
    return Lab(media=dataclasses.replace(pol, sides=sides, max_transcoded_calls=cap))


OPUS_SDP = OPUS_OFFER.decode().replace("192.168.1.20", "10.0.0.7")


def test_an_opus_call_to_a_pcma_core_through_the_b2bua_and_the_cap() -> None:
    lab = b2bua_lab(cap=1)
    _, fwd = only(lab.from_client(invite(1, body=OPUS_SDP)), Request)
    assert isinstance(fwd, Request) and b"m=audio" in fwd.body
    [m] = Session.parse(fwd.body).media
    assert m.formats == ["8", "101"]
    ok = reply(fwd, 200, sdp=PCMA_ANSWER.decode())
    _, got = only(lab.from_backend(ok), Response)
    assert isinstance(got, Response)
    [m] = Session.parse(got.body).media
    assert m.formats == ["96", "101"] and rtpmaps(m)[0] == "96 opus/48000/2"
    lab.from_client(ack_for(got))
    [update] = [c for _, c in lab.media_commands if isinstance(c, Update)][-1:]
    assert (update.streams[0].a.codec, update.streams[0].b.codec) == (OPUS_LEG, PCMA_LEG)
    # A second Opus-only call while the first one transcodes: 488 with the reason (RFC
    # 3261 21.4.26), and nothing reaches the core.
    out = lab.from_client(invite(2, body=OPUS_SDP))
    [(flow, resp)] = [(f, m) for f, m in out if isinstance(m, Response) and m.status != 100]
    assert flow == ALICE and isinstance(resp, Response)
    assert (resp.status, resp.reason) == (488, "Transcoding Capacity Reached")
    assert not [m for f, m in out if f.remote == B1]
    alice_hangs_up(lab, got, 2)
    assert [json.loads(r) for r in lab.records]
    lab.assert_clean()
    assert lab.media is not None and lab.media.transcoded_calls == 0


# -- configuration ---------------------------------------------------------------------------


def test_config_keys_and_their_errors() -> None:
    media = parse_config({}, source="t").media
    assert media.access_codecs == media.core_codecs == DEFAULT_CODECS
    assert media.peer_codecs is None and media.max_transcoded_calls == 100
    config = parse_config(
        {"media": {"core_codecs": ["pcma", "PCMU"], "access_codecs": ["opus"],
                   "max_transcoded_calls": 0}},
        source="t",
    )  # fmt: skip
    pol = media_policy(config, 1)
    assert pol.sides["core"].codecs == ("PCMA", "PCMU") == pol.sides["peer"].codecs
    assert pol.sides["access"].codecs == ("OPUS",) and pol.max_transcoded_calls == 0
    config = parse_config({"media": {"peer_codecs": ["G722"]}}, source="t")
    assert media_policy(config, 1).sides["peer"].codecs == ("G722",)
    for raw, reason in [
        ({"core_codecs": ["G729"]}, 'media.core_codecs: "G729" is not a codec the SBC'),
        ({"access_codecs": []}, "media.access_codecs: must be a list of codec names"),
        ({"peer_codecs": ["PCMA", "pcma"]}, 'media.peer_codecs: codec "pcma" is listed twice'),
        ({"core_codecs": ["telephone-event"]}, "media.core_codecs: telephone-event is not"),
        ({"max_transcoded_calls": -1}, "media.max_transcoded_calls: must be an integer >= 0"),
    ]:
        with pytest.raises(ConfigError) as exc:
            parse_config({"media": raw}, source="t")
        assert exc.value.errors[0].startswith(f"t: {reason}"), exc.value.errors


G729_SDP = (
    "v=0\r\no=- 1 1 IN IP4 10.0.0.7\r\ns=-\r\nc=IN IP4 10.0.0.7\r\nt=0 0\r\n"
    "m=audio 4000 RTP/AVP 18\r\na=rtpmap:18 G729/8000\r\n"
)


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (G729_SDP, "no offered codec (G729) is one the SBC transcodes"),
        (OPUS_SDP, "the answerer takes none of OPUS PCMA"),
    ],
    ids=["untranscodable", "none-taken"],
)
def test_a_488_from_the_callee_says_why_and_leaves_no_media_behind(body: str, why: str) -> None:
    """RFC 3261 21.4.26: the callee's 488 reaches the caller with the SBC's Warning (305,
    20.43) instead of the core's, and the caller's relay ports are given back."""
    lab = b2bua_lab(cap=10)
    _, fwd = only(lab.from_client(invite(1, body=body)), Request)
    assert lab.media is not None and lab.media.state_size()["media_ports"] == 2
    [got] = [m for f, m in lab.from_backend(reply(fwd, 488)) if f == ALICE]
    assert isinstance(got, Response) and got.status == 488
    assert got.field_values("warning") == [f'305 sbc "Incompatible media format: {why}"']
    assert lab.media.state_size() == {"media_sessions": 0, "media_ports": 0}
    lab.assert_clean()


def test_the_call_record_counts_transcoded_streams() -> None:
    lab = b2bua_lab(cap=10)
    for n, (body, transcoded) in enumerate([(OPUS_SDP, 1), (SDP, 0)], start=1):
        _, fwd = only(lab.from_client(invite(n, body=body)), Request)
        answer = PCMA_ANSWER.decode() if transcoded else ANSWER_SDP
        _, got = only(lab.from_backend(reply(fwd, 200, sdp=answer)), Response)
        lab.from_client(ack_for(got, n=n))
        assert lab.media is not None and lab.media.transcoding().streams == transcoded
        alice_hangs_up(lab, got, 2, n=n)
    records = [json.loads(r) for r in lab.records]
    assert [r["transcoded_streams"] for r in records] == [1, 0]
    assert lab.media is not None and lab.media.transcoding().streams_total == 1
    lab.assert_clean()
