#!/usr/bin/env python3
"""Transcoding cost: transcoded calls per core and CPU per call, for the codec
pairs the SBC transcodes between, through the engine the media workers run
(``sbc.media.transcode.Transcoder``).

    .venv/bin/python bench/transcode.py [--quick] [--out docs/performance.md]

A call is two directions, each a ``Transcoder`` (caller's codec -> callee's and back) fed one
20 ms RTP packet every 20 ms: 100 packets/s per call. The load is synthetic speech-like audio
(a voiced source with a moving pitch, formant-like harmonics, noise and syllable-rate
loudness) encoded once per codec before timing, then sent as RTP with increasing sequence
numbers and timestamps. ``--calls`` calls run side by side (each with its own codec state)
and are fed round-robin, packet by packet, as a worker would see them, for ``--seconds`` of
CPU time per pair, in this one process pinned to one CPU; the garbage collector is off while
timing. CPU is this process's (``time.process_time``: user + system). Per pair:

- µs of CPU per packet, each direction;
- µs of CPU per second of call: 50 packets of each direction;
- calls per core: how many calls one core carries at 100 % (1 s / CPU per call-second);
  a worker also relays, encrypts and reports, so plan for well under that.

Every output packet is checked (one per input packet in a steady 20 ms -> 20 ms stream; the
right payload type and SSRC). ``--out FILE`` rewrites the section between the
bench/transcode.py markers and nothing else.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import math
import os
import platform
import random
import struct
import sys
import time
from array import array
from dataclasses import dataclass
from pathlib import Path

import av
from report import command_line, cpu_model, dist_version, git_rev, write_section

from sbc.media import codecs
from sbc.media.control import CodecSpec
from sbc.media.transcode import Transcoder

PAIRS = (("PCMU", "PCMA"), ("OPUS", "PCMA"), ("G722", "PCMA"))
PT = {"PCMU": 0, "PCMA": 8, "G722": 9, "OPUS": 111}
PTIME = 20
PACKETS_PER_S = 1000 // PTIME  # per direction
SOURCE_SECONDS = 4  # distinct audio per stream, then it repeats (timestamps go on)


def spec(name: str) -> CodecSpec:
    return CodecSpec(
        name=name, pt=PT[name], clock=codecs.CODECS[name].clock, ptime=PTIME, dtmf_pt=101
    )


def speech_like(rate: int, seconds: float, seed: int) -> bytes:
    """16-bit mono PCM that keeps a speech codec busy: a glottal-like pulse train (pitch
    100-220 Hz drifting), harmonics shaped by three moving formant peaks, some noise, and
    a 4 Hz syllable envelope with pauses."""
    rnd = random.Random(seed)
    n = int(rate * seconds)
    out = array("h")
    phase = 0.0
    for i in range(n):
        t = i / rate
        f0 = 160 + 60 * math.sin(2 * math.pi * 0.7 * t + seed)
        phase += 2 * math.pi * f0 / rate
        formants = (500 + 200 * math.sin(3.1 * t), 1500 + 400 * math.sin(2.3 * t), 2500.0)
        v = 0.0
        for k in range(1, 16):
            fk = k * f0
            if fk >= rate / 2 - 200:
                break
            gain = sum(1.0 / (1.0 + ((fk - f) / 150.0) ** 2) for f in formants)
            v += gain * math.sin(k * phase) / k
        v += 0.05 * rnd.uniform(-1, 1)
        syll = max(0.0, math.sin(2 * math.pi * 4 * t)) ** 0.5
        if int(t * 1.5) % 4 == 3:  # a pause now and then
            syll *= 0.05
        out.append(max(-32768, min(32767, round(6000 * syll * v))))
    return out.tobytes()


def encoded_stream(name: str, seed: int) -> list[bytes]:
    """SOURCE_SECONDS of speech-like audio as ``name`` payloads of PTIME ms."""
    s = spec(name)
    codec = codecs.CODECS[name]
    enc = codec.new_encoder(s, codec.rate, PTIME)
    pcm = speech_like(codec.rate, SOURCE_SECONDS, seed)
    step = 2 * codec.rate * PTIME // 1000
    out = []
    for i in range(0, len(pcm) - step + 1, step):
        ((payload, _),) = enc.encode(pcm[i : i + step])
        out.append(payload)
    return out


@dataclass
class Direction:
    src: str
    dst: str
    packets: int = 0
    out: int = 0
    cpu: float = 0.0
    payload_in: float = 0.0  # mean octets
    payload_out: float = 0.0

    @property
    def us_per_packet(self) -> float:
        return 1e6 * self.cpu / self.packets


@dataclass
class PairResult:
    a: str
    b: str
    ab: Direction
    ba: Direction
    calls: int
    wall: float

    @property
    def us_per_call_second(self) -> float:
        return PACKETS_PER_S * (self.ab.us_per_packet + self.ba.us_per_packet)

    @property
    def calls_per_core(self) -> float:
        return 1e6 / self.us_per_call_second


def run_direction(src: str, dst: str, calls: int, seconds: float, seed: int) -> Direction:
    """Push ``src`` packets through ``calls`` Transcoders round-robin for ``seconds`` of CPU."""
    payloads = encoded_stream(src, seed)
    s, d = spec(src), spec(dst)
    step = s.clock * PTIME // 1000
    streams = [Transcoder(s, d) for _ in range(calls)]
    head = struct.Struct("!BBHII")
    # Warm up: codec start-up (and the resampler's delay) out of the figures.
    ts = [random.getrandbits(32) for _ in range(calls)]
    res = Direction(src, dst)
    seq = 0
    out_octets = 0
    in_octets = 0

    def one_round(count: bool) -> int:
        nonlocal seq, out_octets, in_octets
        produced = 0
        payload = payloads[seq % len(payloads)]
        b1 = (0x80 if seq == 0 else 0) | s.pt
        for c, tr in enumerate(streams):
            pkt = head.pack(0x80, b1, seq & 0xFFFF, (ts[c] + seq * step) & 0xFFFFFFFF, c)
            got = tr.push(pkt + payload, seq * PTIME / 1000)
            produced += len(got)
            if count:
                in_octets += len(payload)
                out_octets += sum(len(p) - 12 for p in got)
        seq += 1
        return produced

    for _ in range(10):
        one_round(False)
    gc.collect()
    gc.disable()
    try:
        start = time.process_time()
        deadline = start + seconds
        rounds = 0
        produced = 0
        while True:
            produced += one_round(True)
            rounds += 1
            if rounds % 10 == 0 and time.process_time() >= deadline:
                break
        res.cpu = time.process_time() - start
    finally:
        gc.enable()
    res.packets = rounds * calls
    res.out = produced
    res.payload_in = in_octets / res.packets
    res.payload_out = out_octets / max(1, produced)
    for tr in streams:
        if tr.dropped:
            raise SystemExit(f"{src}->{dst}: {tr.dropped} packets dropped by the transcoder")
        if tr.dst.pt != d.pt:
            raise SystemExit("wrong payload type")
    if abs(produced - res.packets) > calls:  # 20 -> 20 ms: one out per in
        raise SystemExit(f"{src}->{dst}: {produced} packets out for {res.packets} in")
    return res


def run(args: argparse.Namespace) -> tuple[list[PairResult], dict[str, str]]:
    allowed = sorted(os.sched_getaffinity(0))
    cpu = allowed[-1] if args.cpu is None else args.cpu
    os.sched_setaffinity(0, {cpu})
    env = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{cpu_model()}; pinned to CPU {cpu} of {len(allowed)}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "versions": (
            f"sbc {dist_version('sbc')}{git_rev()}, PyAV {av.__version__} (FFmpeg libavcodec "
            f"{'.'.join(map(str, av.library_versions['libavcodec']))})"
        ),
        "command": command_line(),
    }
    results = []
    for i, (a, b) in enumerate(PAIRS):
        wall = time.perf_counter()
        ab = run_direction(a, b, args.calls, args.seconds, seed=2 * i)
        ba = run_direction(b, a, args.calls, args.seconds, seed=2 * i + 1)
        wall = time.perf_counter() - wall
        r = PairResult(a, b, ab, ba, args.calls, wall)
        results.append(r)
        print(
            f"{a}<->{b}: {ab.us_per_packet:.1f} / {ba.us_per_packet:.1f} µs per packet, "
            f"{r.us_per_call_second:,.0f} µs CPU per call-second, "
            f"{r.calls_per_core:,.0f} calls per core",
            flush=True,
        )
    return results, env


def render(results: list[PairResult], args: argparse.Namespace, env: dict[str, str]) -> str:
    lines = [
        "## Transcoding: calls per core, CPU per call (bench/transcode.py)",
        "",
        f"- Date: {env['date']}",
        f"- CPU: {env['cpu']} (os.sched_setaffinity)",
        f"- Versions: {env['versions']}, {env['python']}",
        f"- Command: `{env['command']}`",
        f"- Load: {args.calls} calls side by side per direction, each its own "
        "`sbc.media.transcode.Transcoder` (codec state per stream), fed round-robin one "
        f"{PTIME} ms RTP packet at a time for {args.seconds:g} s of CPU per direction, "
        "in one process on one core, garbage collector off while timing. Audio: synthetic "
        "speech-like signal (moving pitch, formant-shaped harmonics, noise, syllable "
        f"envelope with pauses; {SOURCE_SECONDS} s, repeated), encoded once before timing. "
        "A call is both directions at 50 packets/s each, so CPU per call-second = 50 x "
        "(µs per packet A->B + µs per packet B->A). Every packet out checked (one per "
        "packet in, the receiver's payload type, nothing dropped).",
        "- Codecs: PCMU <-> PCMA code to code through a 256-entry table (one `bytes.translate` "
        "a packet, no linear PCM); PCMA in the other pairs by the SBC's G.711 tables; "
        "G.722 (64 kbit/s) by FFmpeg's g722; "
        "Opus by libopus (application voip, 20 ms frames; PCMA->OPUS encodes 8 kHz input at "
        "16 kbit/s, so nothing is resampled; OPUS->PCMA decodes at 48 kHz and resamples to 8 "
        "kHz with swresample); G722<->PCMA resamples 16 <-> 8 kHz.",
        "",
        "| Pair (A <-> B) | µs CPU per packet A->B | µs CPU per packet B->A | "
        "µs CPU per call-second | Calls per core at 100 % | Payload octets A / B |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.a} <-> {r.b} | {r.ab.us_per_packet:.1f} | {r.ba.us_per_packet:.1f} | "
            f"{r.us_per_call_second:,.0f} | {r.calls_per_core:,.0f} | "
            f"{r.ab.payload_in:.0f} / {r.ba.payload_in:.0f} |"
        )
    lines += [
        "",
        "Calls per core is the engine alone at 100 % of a core: a media worker also receives, "
        "relays, encrypts (SRTP) and reports the packets (bench/media.py measures that part), "
        "so a worker carries fewer transcoded calls; `[media] max_transcoded_calls` is the "
        "cap to set from these figures.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 s per direction instead of 5")
    ap.add_argument("--seconds", type=float, default=5.0, help="CPU seconds per direction")
    ap.add_argument("--calls", type=int, default=50, help="calls side by side")
    ap.add_argument("--cpu", type=int, help="CPU to pin to (default: the last allowed)")
    ap.add_argument("--out", type=Path, help="rewrite the bench/transcode.py section of FILE")
    args = ap.parse_args(argv)
    if args.quick:
        args.seconds = 1.0
    results, env = run(args)
    section = render(results, args, env)
    print(section)
    if args.out:
        write_section(args.out, "bench/transcode.py", section)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
