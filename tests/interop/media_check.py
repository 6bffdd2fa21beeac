"""Checks on real audio and real packets for the media relay's interop tests.

- Tones: ``make_tone()`` writes a sine WAV with sox (8 kHz, mono, 16-bit: what G.711 carries).
- What a softphone heard: ``band_energy_ratio()`` (sox: the energy left after a band-pass
  ``sinc`` filter around the tone over the total energy; about 1 for the tone, a few percent
  for noise) and ``dominant_frequency()`` (a Goertzel scan of the samples, pure Python).
- What was on the wire: ``Capture`` runs tshark (bounded by ``-a duration``) and writes a
  classic pcap; ``read_pcap()`` gives its UDP datagrams; ``parse_rtp()`` splits RTP headers
  from payloads; ``g711_decode()`` reads a payload as PCMU/PCMA, so a stream can be listened
  to as if it were plain RTP (the tone if it is, noise if it is SRTP); ``srtp_unprotect()``
  decrypts SRTP with a key from an SDP (libsrtp through pylibsrtp, not the SBC's code).

Nothing here needs more than the standard library, sox, tshark and pylibsrtp.
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import re
import signal
import struct
import subprocess
import threading
import time
import wave
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

RATE = 8000
SOX_TIMEOUT = 30.0


# -- sound files ---------------------------------------------------------------------------
def make_tone(
    sox: str,
    path: Path,
    hz: float,
    seconds: float,
    volume: float = 0.5,
    rate: int = RATE,
    channels: int = 1,
) -> Path:
    """A sine of ``hz`` for ``seconds``: 16-bit WAV, mono at 8 kHz unless told (baresip's
    aufile plays it, and wants the sample rate and channels of the call's codec)."""
    proc = subprocess.run(
        [sox, "-n", "-r", str(rate), "-c", str(channels), "-b", "16", str(path),
         "synth", f"{seconds:g}", "sine", f"{hz:g}", "vol", f"{volume:g}"],
        capture_output=True, text=True, timeout=SOX_TIMEOUT,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"sox could not write {path}: {proc.stderr}")
    return path


def read_wav(path: Path) -> list[int]:
    """The samples of a mono 16-bit WAV (the first channel of a multi-channel one)."""
    with wave.open(str(path), "rb") as wav:
        width, channels = wav.getsampwidth(), wav.getnchannels()
        frames = wav.readframes(wav.getnframes())
    if width != 2:
        raise ValueError(f"{path}: {8 * width}-bit samples, expected 16")
    samples = struct.unpack(f"<{len(frames) // 2}h", frames[: len(frames) // 2 * 2])
    return list(samples[::channels])


def write_wav(path: Path, samples: Sequence[int], rate: int = RATE) -> Path:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(struct.pack(f"<{len(samples)}h", *samples))
    return path


def wav_info(path: Path) -> tuple[int, int, float]:
    """(sample rate, channels, seconds) of a WAV."""
    with wave.open(str(path), "rb") as wav:
        return wav.getframerate(), wav.getnchannels(), wav.getnframes() / wav.getframerate()


_RMS = re.compile(r"^RMS\s+amplitude:\s+([0-9.eE+-]+|nan|-?inf)\s*$", re.M)


def sox_rms(sox: str, path: Path, *effects: str) -> float:
    """The RMS amplitude of ``path`` after sox ``effects`` (sox ``stat``, which prints on
    standard error)."""
    proc = subprocess.run(
        [sox, str(path), "-n", *effects, "stat"],
        capture_output=True, text=True, errors="replace", timeout=SOX_TIMEOUT,
    )  # fmt: skip
    match = _RMS.search(proc.stderr)
    if proc.returncode != 0 or match is None:
        raise RuntimeError(f"sox stat on {path} {effects}: exit {proc.returncode}\n{proc.stderr}")
    value = float(match.group(1))
    return 0.0 if math.isnan(value) else value


def band_energy_ratio(sox: str, path: Path, hz: float, half_width: float = 100.0) -> float:
    """Energy within ``hz`` +- ``half_width`` (sox ``sinc`` band-pass) over the total energy:
    close to 1 when the sound is that tone, a few percent for white noise. A wideband or
    stereo recording (G.722 at 16 kHz, Opus at 48 kHz) is measured on its first channel in
    the telephone band, at 8 kHz: a 200 Hz wide sinc at 48 kHz needs a far longer filter
    than sox's default and would attenuate the tone itself."""
    if wav_info(path)[2] == 0.0:
        return 0.0  # sox prints no statistics for an empty file
    narrow = ("remix", "1", "rate", str(RATE))
    total = sox_rms(sox, path, *narrow)
    if total == 0.0:
        return 0.0
    band = sox_rms(sox, path, *narrow, "sinc", f"{hz - half_width:g}-{hz + half_width:g}")
    return (band / total) ** 2


def _goertzel_power(samples: Sequence[float], hz: float, rate: int) -> float:
    coeff = 2.0 * math.cos(2.0 * math.pi * hz / rate)
    s1 = s2 = 0.0
    for x in samples:
        s1, s2 = x + coeff * s1 - s2, s1
    return s1 * s1 + s2 * s2 - coeff * s1 * s2


def dominant_frequency(
    samples: Sequence[int], rate: int = RATE, lo: float = 100.0, hi: float = 3800.0
) -> float:
    """The frequency with the most energy (Goertzel: a 25 Hz grid, then 1 Hz steps around
    the best), over the loudest half second of ``samples``; 0.0 for silence."""
    window = rate // 2
    if len(samples) < window:
        return 0.0
    # The loudest window: a recording starts and may end with silence.
    best_start, best_energy = 0, -1.0
    for start in range(0, len(samples) - window + 1, window // 2):
        energy = sum(x * x for x in samples[start : start + window : 8])
        if energy > best_energy:
            best_start, best_energy = start, energy
    if best_energy <= 0:
        return 0.0
    chunk = [float(x) for x in samples[best_start : best_start + window]]
    coarse = max(
        (lo + 25.0 * i for i in range(int((hi - lo) / 25.0) + 1)),
        key=lambda f: _goertzel_power(chunk, f, rate),
    )
    return max((coarse + d for d in range(-25, 26)), key=lambda f: _goertzel_power(chunk, f, rate))


# -- G.711 (ITU-T G.711), to hear a captured payload as if it were plain RTP ---------------
def _ulaw(byte: int) -> int:
    u = ~byte & 0xFF
    t = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
    return (0x84 - t) if u & 0x80 else (t - 0x84)


def _alaw(byte: int) -> int:
    a = byte ^ 0x55
    t = (a & 0x0F) << 4
    seg = (a & 0x70) >> 4
    if seg == 0:
        t += 8
    elif seg == 1:
        t += 0x108
    else:
        t = (t + 0x108) << (seg - 1)
    return t if a & 0x80 else -t


ULAW = [_ulaw(b) for b in range(256)]
ALAW = [_alaw(b) for b in range(256)]
G711 = {0: ULAW, 8: ALAW}  # static payload types (RFC 3551 6): PCMU, PCMA


def g711_decode(payloads: Iterable[bytes], table: list[int] = ULAW) -> list[int]:
    out: list[int] = []
    for payload in payloads:
        out.extend(table[b] for b in payload)
    return out


# -- pcap -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Datagram:
    at: float  # seconds since the epoch
    src: tuple[str, int]
    dst: tuple[str, int]
    payload: bytes


def _ip(data: bytes, at: float) -> Datagram | None:
    if not data:
        return None
    version = data[0] >> 4
    if version == 4:
        ihl = (data[0] & 0x0F) * 4
        frag = struct.unpack("!H", data[6:8])[0]
        if data[9] != 17 or frag & 0x3FFF:  # UDP, not a fragment
            return None
        src, dst = ".".join(map(str, data[12:16])), ".".join(map(str, data[16:20]))
        udp = data[ihl:]
    elif version == 6:
        if data[6] != 17:
            return None
        src = str(ipaddress.IPv6Address(data[8:24]))
        dst = str(ipaddress.IPv6Address(data[24:40]))
        udp = data[40:]
    else:
        return None
    if len(udp) < 8:
        return None
    sport, dport, length = struct.unpack("!HHH", udp[:6])
    return Datagram(at, (src, sport), (dst, dport), udp[8:length])


def read_pcap(path: Path) -> list[Datagram]:
    """The UDP datagrams of a classic pcap file (tshark ``-F pcap``): Ethernet (also what
    Linux ``lo`` and veth give), Linux cooked (SLL, SLL2) or raw IP link layers."""
    data = path.read_bytes()
    if len(data) < 24:
        return []
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        endian = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        endian = ">"
    else:
        raise ValueError(f"{path}: not a classic pcap file (magic {magic.hex()})")
    nano = magic in (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d")
    linktype = struct.unpack(endian + "I", data[20:24])[0]
    out: list[Datagram] = []
    offset = 24
    while offset + 16 <= len(data):
        sec, frac, incl, _ = struct.unpack(endian + "IIII", data[offset : offset + 16])
        frame = data[offset + 16 : offset + 16 + incl]
        offset += 16 + incl
        at = sec + frac / (1e9 if nano else 1e6)
        if linktype == 1:  # Ethernet
            ethertype, ip = struct.unpack("!H", frame[12:14])[0], frame[14:]
        elif linktype == 113:  # Linux cooked (SLL)
            ethertype, ip = struct.unpack("!H", frame[14:16])[0], frame[16:]
        elif linktype == 276:  # SLL2
            ethertype, ip = struct.unpack("!H", frame[0:2])[0], frame[20:]
        elif linktype in (101, 12):  # raw IP
            ethertype, ip = (0x0800 if frame and frame[0] >> 4 == 4 else 0x86DD), frame
        else:
            raise ValueError(f"{path}: link type {linktype} not handled")
        if ethertype not in (0x0800, 0x86DD):
            continue
        datagram = _ip(ip, at)
        if datagram is not None:
            out.append(datagram)
    return out


# -- RTP (RFC 3550 5.1) ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Rtp:
    payload_type: int
    seq: int
    ssrc: int
    payload: bytes  # for SRTP: the encrypted payload and the authentication tag
    raw: bytes


def parse_rtp(data: bytes) -> Rtp | None:
    """An RTP packet's header fields and payload; None for what is not RTP version 2 (or is
    RTCP: payload types 72-76 with the marker bit are RTCP's 200-204, RFC 5761 4)."""
    if len(data) < 12 or data[0] >> 6 != 2:
        return None
    pt = data[1] & 0x7F
    if 72 <= pt <= 76:
        return None
    cc = data[0] & 0x0F
    header = 12 + 4 * cc
    if data[0] & 0x10:  # header extension
        if len(data) < header + 4:
            return None
        header += 4 + 4 * struct.unpack("!H", data[header + 2 : header + 4])[0]
    if len(data) < header:
        return None
    seq, _, ssrc = struct.unpack("!HII", data[2:12])
    return Rtp(pt, seq, ssrc, data[header:], data)


def srtp_unprotect(packets: Iterable[bytes], suite: str, key_salt: bytes) -> list[bytes]:
    """Each SRTP packet decrypted with an SDES key (RFC 4568), or left out if it does not
    authenticate with it. libsrtp itself (pylibsrtp), not the SBC's code."""
    import pylibsrtp

    profiles = {
        "AES_CM_128_HMAC_SHA1_80": pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80,
        "AES_CM_128_HMAC_SHA1_32": pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_32,
        "AEAD_AES_128_GCM": pylibsrtp.Policy.SRTP_PROFILE_AEAD_AES_128_GCM,
        "AEAD_AES_256_GCM": pylibsrtp.Policy.SRTP_PROFILE_AEAD_AES_256_GCM,
    }
    policy = pylibsrtp.Policy(
        key=key_salt,
        ssrc_type=pylibsrtp.Policy.SSRC_ANY_INBOUND,
        srtp_profile=profiles[suite.upper()],
    )
    session = pylibsrtp.Session(policy)
    out = []
    for packet in packets:
        with contextlib.suppress(pylibsrtp.Error):
            out.append(session.unprotect(packet))
    return out


# -- tshark ------------------------------------------------------------------------------------------
class Capture:
    """tshark writing a classic pcap, started and stopped by its PID.

    ``start()`` returns once tshark says it is capturing; ``stop()`` ends it with SIGINT
    (it flushes and exits 0) and kills it if it does not go; ``-a duration`` bounds it anyway.
    ``prefix`` runs it elsewhere, e.g. ``ip netns exec NS``.
    """

    def __init__(
        self,
        tshark: str,
        interface: str,
        bpf: str,
        pcap: Path,
        *,
        duration: int = 30,
        prefix: Sequence[str] = (),
    ) -> None:
        self.args = [
            *prefix, tshark, "-i", interface, "-f", bpf, "-a", f"duration:{duration}",
            "-F", "pcap", "-w", str(pcap), "-q",
        ]  # fmt: skip
        self.pcap = pcap
        self.proc: subprocess.Popen[str] | None = None
        self.stderr: list[str] = []
        self._started = threading.Event()
        self._reader: threading.Thread | None = None

    def start(self, timeout: float = 10.0, probe: Callable[[], None] | None = None) -> None:
        """Start tshark; return once it captures. tshark says "Capturing on" a moment
        before its filter sees packets: with ``probe`` (which sends one datagram the
        filter matches) it returns once a probe is in the file, else 1 s after that."""
        self.proc = subprocess.Popen(
            self.args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
        )
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()
        if not self._started.wait(timeout) or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError(f"tshark did not start capturing: {self.explain()}")
        if probe is None:
            time.sleep(1.0)
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            probe()
            time.sleep(0.05)
            # dumpcap writes each packet as it comes: more than the file header is a packet.
            if self.pcap.exists() and self.pcap.stat().st_size > 24:
                return
        self.stop()
        raise RuntimeError(f"tshark captured no probe within {timeout} s: {self.explain()}")

    def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)
            if "Capturing on" in line:
                self._started.set()
        self._started.set()  # it ended: stop waiting either way

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGINT, wait; SIGKILL if it stays. Its exit code (None if never started)."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
        if self._reader is not None:
            self._reader.join(timeout=timeout)
        return proc.returncode

    def explain(self) -> str:
        return f"{' '.join(self.args)}\n{''.join(self.stderr)[-3000:]}"

    def datagrams(self) -> list[Datagram]:
        return read_pcap(self.pcap) if self.pcap.exists() else []
