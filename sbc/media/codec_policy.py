"""Codec policy: which codecs each leg of a call is offered, and whether an answered
stream is transcoded. Sans-I/O; ``session.MediaController`` calls it.

The rules, in short (docs/media.md "Transcoding" has them at length and says why):

- Each side has an ordered list of the transcodable codecs it may be offered
  (``[media] access_codecs`` / ``core_codecs`` / ``peer_codecs``). An offer towards a side
  keeps the offerer's codecs that list allows, in the offerer's order and with its payload
  types (RFC 3264 5.1, 6.1); codecs the SBC cannot transcode (G.729, Speex, video ...) and
  the auxiliary formats (RFC 4733 telephone-event, RFC 3389 CN) pass as offered.
- Behind the offerer's codecs the SBC appends the side's codecs the offer lacks (in the
  list's order, with free payload types), when the offerer has a codec it can transcode
  from: an answerer that shares a codec with the offerer takes it (RFC 3264 6.1: the answer
  keeps the offer's order), one that shares none finds a codec the SBC can bridge. With
  them a telephone-event of their clock rate if the offerer had telephone-event.
- The answer (RFC 3264 6.1): the answerer's first codec. One the offerer offered: the media
  passes untouched. One the SBC added: the stream is transcoded; the offerer is answered
  with its own best codec (its payload type, a=rtpmap and a=fmtp from its offer).
- DTMF interworking: when the answerer picks a codec the offerer offered
  but only one of the two has RFC 4733 telephone-event, the stream is still given codecs
  on both parties (the same codec: the relay copies the payload under its own RTP header)
  so that the relay can turn events into SIP INFO and SIP INFO into events in a sequence
  space of its own. Such a stream does not count as transcoded (``transcodes``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sbc.media.control import TRANSCODABLE, CodecSpec
from sbc.sdp.sdp import Line, Media

# RFC 3551 6, table 4: the static audio payload types (encoding name, clock, channels); a
# static type needs no a=rtpmap (RFC 4566 6).
STATIC: dict[int, tuple[str, int, int]] = {
    0: ("PCMU", 8000, 1), 3: ("GSM", 8000, 1), 4: ("G723", 8000, 1), 5: ("DVI4", 8000, 1),
    6: ("DVI4", 16000, 1), 7: ("LPC", 8000, 1), 8: ("PCMA", 8000, 1), 9: ("G722", 8000, 1),
    10: ("L16", 44100, 2), 11: ("L16", 44100, 1), 12: ("QCELP", 8000, 1),
    13: ("CN", 8000, 1), 14: ("MPA", 90000, 1), 15: ("G728", 8000, 1),
    16: ("DVI4", 11025, 1), 17: ("DVI4", 22050, 1), 18: ("G729", 8000, 1),
}  # fmt: skip
DTMF = "TELEPHONE-EVENT"  # RFC 4733 7.1.1 (RFC 4566 6: encoding names are case-insensitive)
# Formats that travel beside a codec and are not chosen as one: RFC 4733 events and RFC
# 3389 comfort noise.
AUXILIARY = frozenset({DTMF, "CN"})
# What the SBC writes for a codec it adds to an offer (a=rtpmap value without the PT, a=fmtp
# value, static PT): RFC 3551 4.5.14 / 4.5.2 (G.722's RTP clock is 8000 although it samples at
# 16 kHz), RFC 7587 7 (opus/48000/2 always; in-band FEC on).
ADDED: dict[str, tuple[str, str, int | None]] = {
    "PCMU": ("PCMU/8000", "", 0),
    "PCMA": ("PCMA/8000", "", 8),
    "G722": ("G722/8000", "", 9),
    "OPUS": ("opus/48000/2", "useinbandfec=1", None),
}
DTMF_FMTP = "0-16"  # RFC 4733 3.2: DTMF digits 0-9 * # A-D and flash
DYNAMIC = range(96, 128)  # RFC 3551 3: dynamic payload types
ALL_PTS = set(range(128))  # RFC 3550 5.1: PT is 7 bits
DEFAULT_PTIME = 20  # ms; RFC 3551 4.5: the default packetization of the audio codecs
# The codecs a side may be offered, in order, unless [media] says otherwise: all the
# transcodable ones, best quality first.
DEFAULT_CODECS = ("OPUS", "G722", "PCMU", "PCMA")


@dataclass(frozen=True, slots=True, kw_only=True)
class Format:
    """One payload format of an m-line with what its a=rtpmap / a=fmtp say (RFC 4566 6)."""

    pt: int
    name: str  # upper-cased encoding name; "" for a dynamic type without a=rtpmap
    clock: int = 0
    channels: int = 1
    rtpmap: str = ""  # the a=rtpmap value after the PT, as written ("opus/48000/2")
    fmtp: str = ""  # the a=fmtp value after the PT

    @property
    def auxiliary(self) -> bool:
        return self.name in AUXILIARY

    @property
    def transcodable(self) -> bool:
        return self.name in TRANSCODABLE

    def lines(self) -> list[Line]:
        out: list[Line] = []
        if self.rtpmap:
            out.append(("a", f"rtpmap:{self.pt} {self.rtpmap}"))
        if self.fmtp:
            out.append(("a", f"fmtp:{self.pt} {self.fmtp}"))
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class Offered:
    """What one offer on a stream was, kept for its answer: who offered, the offerer's
    formats and a=ptime, and the codecs the SBC added towards the answerer."""

    offerer: str  # "a" or "b"
    formats: tuple[Format, ...]
    ptime: int | None
    added: tuple[Format, ...]  # codecs (not telephone-event) the SBC added
    at_cap: bool = False  # the transcoding cap kept the SBC from adding codecs

    def has(self, name: str) -> bool:
        return any(f.name == name for f in self.formats)


def _split_pt(value: str) -> tuple[int, str] | None:
    pt_text, _, rest = value.partition(" ")
    if not (pt_text.isascii() and pt_text.isdigit()):
        return None
    return int(pt_text), rest.strip()


def formats_of(m: Media) -> list[Format] | None:
    """The m-line's formats in order (RFC 4566 5.14), None if one is not an RTP payload
    type (then the policy leaves the m-line alone)."""
    rtpmaps: dict[int, str] = {}
    fmtps: dict[int, str] = {}
    for value in m.attributes("rtpmap"):
        if (pair := _split_pt(value)) is not None:
            rtpmaps.setdefault(*pair)
    for value in m.attributes("fmtp"):
        if (pair := _split_pt(value)) is not None:
            fmtps.setdefault(*pair)
    out: list[Format] = []
    for text in m.formats:
        if not (text.isascii() and text.isdigit()) or int(text) > 127:
            return None
        pt = int(text)
        rtpmap = rtpmaps.get(pt, "")
        name, clock, channels = STATIC.get(pt, ("", 0, 1))
        if rtpmap:
            # RFC 4566 6: <encoding name>/<clock rate>[/<encoding parameters>]
            parts = rtpmap.split("/")
            name = parts[0].strip().upper()
            clock = int(parts[1]) if len(parts) > 1 and parts[1].strip().isdigit() else 0
            channels = int(parts[2]) if len(parts) > 2 and parts[2].strip().isdigit() else 1
        out.append(Format(pt=pt, name=name, clock=clock, channels=channels, rtpmap=rtpmap,
                          fmtp=fmtps.get(pt, "")))  # fmt: skip
    return out


def ptime_of(m: Media) -> int | None:
    """a=ptime in milliseconds (RFC 4566 6), None if absent or unreadable."""
    for value in m.attributes("ptime"):
        try:
            ms = round(float(value.strip()))
        except ValueError:
            continue
        if 0 < ms <= 1000:
            return ms
    return None


def best(formats: Iterable[Format], allowed: Sequence[str], keep: str | None) -> Format | None:
    """The first codec the SBC can transcode from, among those ``allowed`` if any is; the
    codec named ``keep`` (the leg's current one) first if it is there (stable re-offers)."""
    candidates = [f for f in formats if f.transcodable]
    for f in candidates:
        if f.name == keep:
            return f
    for f in candidates:
        if f.name in allowed:
            return f
    return candidates[0] if candidates else None


def dtmf_for(formats: Iterable[Format], clock: int) -> Format | None:
    """The telephone-event format of ``clock`` (RFC 4733 2.1: events use the codec's clock),
    else the first one."""
    events = [f for f in formats if f.name == DTMF]
    for f in events:
        if f.clock == clock:
            return f
    return events[0] if events else None


def to_add(
    formats: Sequence[Format], allowed: Sequence[str], current: CodecSpec | None
) -> list[str]:
    """Names of the codecs the SBC adds behind the offer's towards a side whose list is
    ``allowed``: nothing if the offerer has no codec the SBC can transcode from; else every
    codec of the list the offer lacks, in the list's order, so that an answerer that takes
    none of the offerer's codecs finds one the SBC can bridge; on a transcoded stream
    (``current``: the answerer's codec now) that codec first, so a re-offer keeps it."""
    if not any(f.transcodable for f in formats):
        return []
    offered = {f.name for f in formats}
    names: list[str] = []
    if current is not None and current.name in allowed and current.name not in offered:
        names.append(current.name)
    names.extend(n for n in allowed if n not in offered and n not in names)
    return names


def needs_transcoding(formats: Sequence[Format], allowed: Sequence[str]) -> bool:
    """Whether only transcoding can meet an offer towards a side whose list is ``allowed``:
    none of its codecs (transcodable ones the list allows, or ones the SBC passes as they
    are) is left for that side."""
    return not any(not f.auxiliary and (not f.transcodable or f.name in allowed) for f in formats)


def _free_pt(used: set[int], prefer: Sequence[int | None]) -> int | None:
    for pt in prefer:
        if pt is not None and pt not in used:
            return pt
    for pt in DYNAMIC:
        if pt not in used:
            return pt
    return None


def rewrite_offer(
    m: Media,
    formats: Sequence[Format],
    allowed: Sequence[str],
    add: Sequence[str],
    current: CodecSpec | None,
) -> tuple[Format, ...]:
    """Filter the offer's m-line for a side (RFC 3264 5.1: the offerer's order and payload
    types) and add the codecs ``add`` names; returns the added ones. An m-line left as it
    was is not touched (byte-exact passthrough)."""
    kept = [f for f in formats if not f.transcodable or f.name in allowed]
    if len(kept) == len(formats) and not add:
        return ()
    removed = {f.pt for f in formats} - {f.pt for f in kept}
    _remove_formats(m, removed)
    # New payload types avoid every type of the original offer, so none of the offerer's
    # numbers means something else on the other leg.
    used = {f.pt for f in formats}
    added: list[Format] = []
    for name in add:
        rtpmap, fmtp, static = ADDED[name]
        prefer = [current.pt if current is not None and current.name == name else None, static]
        pt = _free_pt(used, prefer)
        if pt is None:
            break
        used.add(pt)
        clock = int(rtpmap.split("/")[1])
        added.append(Format(pt=pt, name=name, clock=clock, channels=2 if name == "OPUS" else 1,
                            rtpmap=rtpmap, fmtp=fmtp))  # fmt: skip
    # RFC 4733 2.1: telephone-event at the clock of each added codec, when the offerer sends
    # events (the relay maps their payload types and clocks between the legs).
    events: list[Format] = []
    if any(f.name == DTMF for f in formats):
        clocks = {f.clock for f in kept if f.name == DTMF}
        # The leg's current codec comes back with the events clock it had (baresip sends
        # telephone-event/8000 beside Opus).
        wanted = [
            current.dtmf_clock
            if current is not None and current.name == f.name and current.dtmf_pt is not None
            else f.clock
            for f in added
        ]
        for clock in dict.fromkeys(wanted):
            if clock in clocks:
                continue
            prefer = [current.dtmf_pt if current is not None and current.dtmf_clock == clock
                      else None]  # fmt: skip
            pt = _free_pt(used, prefer)
            if pt is None:
                break
            used.add(pt)
            clocks.add(clock)
            events.append(Format(pt=pt, name=DTMF, clock=clock, rtpmap=f"telephone-event/{clock}",
                                 fmtp=DTMF_FMTP))  # fmt: skip
    if added or events:
        codecs = [str(f.pt) for f in kept if not f.auxiliary]
        aux = [str(f.pt) for f in kept if f.auxiliary]
        m.formats = [*codecs, *(str(f.pt) for f in added), *aux, *(str(f.pt) for f in events)]
        _drop_bandwidth(m)
        _order_codec_lines(m, {f.pt: f.lines() for f in (*added, *events)})
    return tuple(added)


def rewrite_answer(m: Media, codec: Format, dtmf: Format | None, ptime: int | None) -> None:
    """The answer of a transcoded stream towards the offerer (RFC 3264 6.1): the offerer's
    codec and telephone-event with its payload types, a=rtpmap and a=fmtp, and its own
    a=ptime; nothing of the answerer's codecs."""
    chosen = [codec] if dtmf is None else [codec, dtmf]
    m.formats = [str(f.pt) for f in chosen]
    _order_codec_lines(m, {f.pt: f.lines() for f in chosen})
    _drop_bandwidth(m)
    m.remove("maxptime")
    m.remove("ptime")
    if ptime is not None:
        m.add("ptime", str(ptime))


def drop_added(m: Media, offered: Offered) -> None:
    """An answer that took one of the offerer's own codecs, as the offerer gets it: without
    the formats the SBC added to the offer (an answerer may list every format it accepts,
    RFC 3264 6.1; those it lists of the SBC's would name codecs the offerer never offered)."""
    formats = formats_of(m)
    if formats is None:
        return
    own = {f.pt for f in offered.formats}
    _remove_formats(m, {f.pt for f in formats if f.pt not in own})


def dtmf_interworking(
    offered: Offered, answer: Sequence[Format], chosen: Format
) -> tuple[Format, Format | None, Format | None] | None:
    """The answerer chose ``chosen``, a codec the offer has (no transcoding): when exactly
    one of offer and answer has telephone-event (RFC 4733 7.1.1), the offerer's format of
    that codec, the offerer's telephone-event and the answerer's (one of them None), for a
    stream the relay runs for DTMF interworking; else None (both or neither have events:
    the media passes untouched)."""
    if not chosen.transcodable:
        return None
    codec = next((f for f in offered.formats if f.name == chosen.name), None)
    if codec is None or (chosen.clock and codec.clock and chosen.clock != codec.clock):
        return None
    offered_dtmf = dtmf_for(offered.formats, codec.clock or 8000)
    answered_dtmf = dtmf_for(answer, chosen.clock or codec.clock or 8000)
    if (offered_dtmf is None) == (answered_dtmf is None):
        return None
    return codec, offered_dtmf, answered_dtmf


def transcodes(a: CodecSpec | None, b: CodecSpec | None) -> bool:
    """Whether a stream whose parties have these codecs is transcoded (it counts against
    ``max_transcoded_calls``): not when both have the same codec (a stream
    run only for DTMF interworking costs a header rewrite per packet, no codec)."""
    if a is None or b is None:
        return False
    return (a.name, a.clock, a.channels) != (b.name, b.clock, b.channels)


def spec(codec: Format, dtmf: Format | None, ptime: int | None) -> CodecSpec:
    """A leg's codec as the workers are told it (control.CodecSpec)."""
    return CodecSpec(
        name=codec.name, pt=codec.pt, clock=codec.clock or 8000, channels=codec.channels,
        ptime=ptime or DEFAULT_PTIME, fmtp=codec.fmtp,
        dtmf_pt=None if dtmf is None else dtmf.pt,
        dtmf_clock=dtmf.clock if dtmf is not None and dtmf.clock else 8000,
    )  # fmt: skip


def _is_codec_line(kind: str, value: str, pts: set[int] | None = None) -> bool:
    if kind != "a":
        return False
    for name in ("rtpmap:", "fmtp:", "rtcp-fb:"):
        if value.startswith(name):
            if pts is None:
                return True
            pair = _split_pt(value[len(name) :])
            return pair is not None and pair[0] in pts
    return False


def _remove_formats(m: Media, pts: set[int]) -> None:
    """Formats gone from the m-line, with their a=rtpmap, a=fmtp and a=rtcp-fb (RFC 4585
    4.2; a=rtcp-fb:* stays)."""
    if not pts:
        return
    m.formats = [t for t in m.formats if not (t.isdigit() and int(t) in pts)]
    m.lines = [line for line in m.lines if not _is_codec_line(*line, pts)]


def _drop_bandwidth(m: Media) -> None:
    """A media-level b= (RFC 4566 5.8) was sized for the codecs it came with, not for those
    the SBC puts in their place: it goes."""
    m.lines = [line for line in m.lines if line[0] != "b"]


def _order_codec_lines(m: Media, new: dict[int, list[Line]]) -> None:
    """The a=rtpmap / a=fmtp / a=rtcp-fb lines in the order of the m-line's formats, the new
    formats' lines (``new``) among them, where the first such line was; a=rtcp-fb:* stays
    where it is."""
    by_pt: dict[int, list[Line]] = {}
    rest: list[Line] = []
    at = None
    for kind, value in m.lines:
        if _is_codec_line(kind, value, ALL_PTS):
            pair = _split_pt(value.partition(":")[2])
            assert pair is not None
            by_pt.setdefault(pair[0], []).append((kind, value))
            at = len(rest) if at is None else at
        else:
            rest.append((kind, value))
    # Lines of types not on the m-line (stale ones) go: a new type may reuse the number.
    pts = [int(t) for t in m.formats if t.isdigit()]
    ordered = [line for pt in pts for line in (new[pt] if pt in new else by_pt.get(pt, []))]
    if at is None:
        at = next((i for i, (kind, _) in enumerate(rest) if kind == "a"), len(rest))
    m.lines = rest[:at] + ordered + rest[at:]
