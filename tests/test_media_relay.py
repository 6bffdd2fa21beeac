"""RelayEngine (sbc.media.relay): forwarding, latching, SRTP re-keying, passthrough,
statistics, timeouts and port bookkeeping, sans-I/O with a fake clock."""

from __future__ import annotations

import gc
import os
import struct

import pytest

from sbc.media import control
from sbc.media.control import Address, Party, SrtpKey, Stream, Update
from sbc.media.relay import PortChanges, RelayEngine
from sbc.media.srtp import KEY_SALT_LENGTHS, SrtpReceiver, SrtpSender

BIND = "10.0.0.1"
PA, PB = 20000, 20002  # relay ports facing A and B
A = ("192.0.2.10", 4000)  # A's SDP address
B = ("198.51.100.20", 5000)  # B's SDP address
NAT_A = ("203.0.113.5", 61000)  # A seen through its NAT
EVIL = ("203.0.113.66", 6666)


def key(suite: str = "AES_CM_128_HMAC_SHA1_80") -> SrtpKey:
    return SrtpKey(suite=suite, key_salt=os.urandom(KEY_SALT_LENGTHS[suite]))


def rtp(seq: int, ssrc: int = 0x1111, ts: int | None = None, pt: int = 0, size: int = 160) -> bytes:
    ts = seq * 160 if ts is None else ts
    return struct.pack("!BBHII", 0x80, pt, seq & 0xFFFF, ts & 0xFFFFFFFF, ssrc) + bytes(size)


def rtcp(ssrc: int = 0x1111) -> bytes:
    """RFC 3550 6.4.1 sender report without report blocks."""
    return struct.pack("!BBHIIIIII", 0x80, 200, 6, ssrc, 1, 2, 3, 4, 5)


def party(port: int, remote: Address | None, **kw: object) -> Party:
    return Party(bind=BIND, port=port, remote=remote, **kw)  # type: ignore[arg-type]


def update(a: Party, b: Party, *, session: str = "s1", passthrough: bool = False) -> Update:
    return Update(session=session, streams=(Stream(index=0, a=a, b=b, passthrough=passthrough),))


def engine_with(a: Party | None = None, b: Party | None = None, **kw: float) -> RelayEngine:
    engine = RelayEngine(**kw)
    engine.update(update(a or party(PA, A), b or party(PB, B)), now=0.0)
    return engine


def pstats(engine: RelayEngine, side: str = "a", session: str = "s1") -> control.PartyStats:
    stream = engine.stats(session).streams[0]
    return stream.a if side == "a" else stream.b


# -- forwarding --------------------------------------------------------------------------------


def test_rtp_goes_to_the_other_party_from_its_port() -> None:
    engine = engine_with()
    assert engine.receive(PA, rtp(1), A, 1.0) == (PB, rtp(1), B)
    assert engine.receive(PB, rtp(7, ssrc=2), B, 1.0) == (PA, rtp(7, ssrc=2), A)


def test_rtcp_goes_between_the_rtcp_ports() -> None:
    engine = engine_with(b=party(PB, B, remote_rtcp=("198.51.100.21", 7000)))
    # RFC 3550 11: RTCP on the RTP port + 1; A's RTCP address defaults to its RTP port + 1
    assert engine.receive(PA + 1, rtcp(), (A[0], A[1] + 1), 1.0) == (
        PB + 1,
        rtcp(),
        ("198.51.100.21", 7000),
    )
    assert engine.receive(PB + 1, rtcp(2), ("198.51.100.21", 7000), 1.0) == (
        PA + 1,
        rtcp(2),
        (A[0], A[1] + 1),
    )


def test_rtcp_mux_on_one_side() -> None:
    """RFC 5761 4: on a muxed port, a second byte in 192..223 is RTCP."""
    engine = engine_with(a=party(PA, A, rtcp_mux=True))
    assert engine.ports == 3  # A's one port, B's two
    assert engine.receive(PA, rtcp(), A, 1.0) == (PB + 1, rtcp(), (B[0], B[1] + 1))
    assert engine.receive(PA, rtp(1), A, 1.0) == (PB, rtp(1), B)
    assert engine.receive(PB + 1, rtcp(), (B[0], B[1] + 1), 1.0) == (PA, rtcp(), A)
    assert engine.receive(PA + 1, rtcp(), A, 1.0) is None  # A has no RTCP port
    # payload type 72 with the marker bit (200) is RTCP; payload type 0 with marker is not
    marked = bytearray(rtp(2))
    marked[1] = 0x80
    assert engine.receive(PA, bytes(marked), A, 1.0) == (PB, bytes(marked), B)


def test_no_destination_and_no_session_drop() -> None:
    engine = engine_with(b=party(PB, None))  # B's address unknown (e.g. before the answer)
    assert engine.receive(PA, rtp(1), A, 1.0) is None
    assert engine.no_destination == 1
    assert pstats(engine, "a").packets_in == 1
    assert engine.receive(PB + 4, rtp(1), A, 1.0) is None
    assert engine.no_session == 1


def test_not_rtp_is_dropped_on_a_relayed_stream() -> None:
    engine = engine_with()
    assert engine.receive(PA, b"\x00\x01\x00\x00" + bytes(20), A, 1.0) is None  # STUN
    assert engine.receive(PA, b"", A, 1.0) is None
    assert engine.receive(PA, rtp(1)[:11], A, 1.0) is None
    assert engine.invalid == 3
    assert engine.receive(PA, rtp(1), A, 1.0) is not None  # now A is latched
    assert engine.receive(PA, b"\x16\xfe\xfd" + bytes(20), A, 1.0) is None  # DTLS
    assert engine.receive(PA, b"", A, 1.0) is None
    assert engine.invalid == 5


# -- latching ----------------------------------------------------------------------------------


def test_a_nat_source_latches_within_the_window_and_media_goes_back_there() -> None:
    engine = engine_with(a=party(PA, ("10.1.1.1", 4000)))  # private address in A's SDP
    assert engine.receive(PA, rtp(1), NAT_A, 4.9) == (PB, rtp(1), B)
    assert pstats(engine, "a").latched == NAT_A
    assert engine.receive(PB, rtp(1), B, 5.0) == (PA, rtp(1), NAT_A)  # symmetric RTP


def test_after_the_window_another_source_is_dropped_and_counted() -> None:
    engine = engine_with(a=party(PA, ("10.1.1.1", 4000)))
    engine.receive(PA, rtp(1), NAT_A, 1.0)
    assert engine.receive(PA, rtp(2), EVIL, 6.0) is None
    assert engine.receive(PB, rtp(1), B, 6.0) == (PA, rtp(1), NAT_A)
    assert engine.receive(PA, rtp(3), NAT_A, 6.0) is not None
    s = pstats(engine, "a")
    assert (s.dropped_source, s.packets_in, s.latched) == (1, 2, NAT_A)


def test_within_the_window_the_latest_source_wins() -> None:
    engine = engine_with(a=party(PA, ("10.1.1.1", 4000)))
    engine.receive(PA, rtp(1), EVIL, 1.0)
    engine.receive(PA, rtp(2), NAT_A, 2.0)
    assert pstats(engine, "a").latched == NAT_A
    assert engine.receive(PA, rtp(3), EVIL, 5.5) is None


def test_nothing_latches_after_the_window_but_the_sdp_address_is_always_accepted() -> None:
    engine = engine_with()
    assert engine.receive(PA, rtp(1), NAT_A, 5.1) is None
    assert pstats(engine, "a").dropped_source == 1
    assert engine.receive(PA, rtp(2), A, 100.0) == (PB, rtp(2), B)
    assert pstats(engine, "a").latched == A
    assert engine.receive(PA, rtp(3), NAT_A, 100.0) is None


def test_no_reflection_and_no_own_port_as_source() -> None:
    engine = engine_with(b=party(PB, None))
    # A packet from B's relay port (a forged SDP address looping back) is never accepted.
    assert engine.receive(PA, rtp(1), (BIND, PB), 1.0) is None
    assert pstats(engine, "a").dropped_source == 1
    # A latched packet is never sent back to its source when B has no address.
    assert engine.receive(PA, rtp(2), A, 1.0) is None
    # B latches and gets A's packets only from then on, at its own source.
    assert engine.receive(PB, rtp(1, ssrc=9), EVIL, 1.0) == (PA, rtp(1, ssrc=9), A)
    assert engine.receive(PA, rtp(3), A, 1.0) == (PB, rtp(3), EVIL)


def test_an_update_that_changes_an_address_reopens_the_window_and_clears_that_latch() -> None:
    engine = engine_with(a=party(PA, ("10.1.1.1", 4000)), b=party(PB, ("10.2.2.2", 5000)))
    engine.receive(PA, rtp(1), NAT_A, 1.0)
    engine.receive(PB, rtp(1, ssrc=2), B, 1.0)
    # a re-INVITE with the same SDP: nothing changes, the window stays closed
    changes = engine.update(
        update(party(PA, ("10.1.1.1", 4000)), party(PB, ("10.2.2.2", 5000))), 50.0
    )
    assert not changes
    assert engine.receive(PA, rtp(2), EVIL, 51.0) is None
    assert pstats(engine, "a").latched == NAT_A
    assert pstats(engine, "a").packets_in == 1  # statistics survive
    # B moves (e.g. a transfer): B's latch is cleared, both windows reopen
    engine.update(update(party(PA, ("10.1.1.1", 4000)), party(PB, ("10.3.3.3", 5000))), 60.0)
    assert pstats(engine, "b").latched is None
    assert pstats(engine, "a").latched == NAT_A
    assert engine.receive(PA, rtp(3), NAT_A, 61.0) == (PB, rtp(3), ("10.3.3.3", 5000))
    assert engine.receive(PB, rtp(2, ssrc=2), ("198.51.100.99", 5004), 64.0) is not None
    assert pstats(engine, "b").latched == ("198.51.100.99", 5004)
    assert engine.receive(PB, rtp(3, ssrc=2), B, 66.0) is None  # window over


def test_hold_clears_the_destination() -> None:
    engine = engine_with()
    engine.receive(PB, rtp(1), B, 1.0)
    engine.update(update(party(PA, A), party(PB, None, sends=False)), 10.0)
    assert engine.receive(PA, rtp(1), A, 11.0) is None
    assert engine.no_destination == 1


def test_rtcp_latches_separately() -> None:
    engine = engine_with(a=party(PA, ("10.1.1.1", 4000)))
    engine.receive(PA, rtp(1), NAT_A, 1.0)
    assert pstats(engine, "a").latched == NAT_A
    nat_rtcp = ("203.0.113.5", 61003)  # the NAT maps RTCP to a port of its own
    assert engine.receive(PA + 1, rtcp(), nat_rtcp, 2.0) == (PB + 1, rtcp(), (B[0], B[1] + 1))
    assert engine.receive(PB + 1, rtcp(2), (B[0], B[1] + 1), 2.0) == (PA + 1, rtcp(2), nat_rtcp)
    assert engine.receive(PA + 1, rtcp(), EVIL, 9.0) is None
    assert engine.receive(PA, rtp(2), nat_rtcp, 9.0) is None  # RTP's latch is its own


def test_rtcp_from_the_latched_rtp_source_port_plus_one_is_accepted_after_the_window() -> None:
    engine = engine_with(a=party(PA, ("10.1.1.1", 4000)))
    engine.receive(PA, rtp(1), NAT_A, 1.0)
    rtcp_src = (NAT_A[0], NAT_A[1] + 1)
    assert engine.receive(PA + 1, rtcp(), rtcp_src, 20.0) is not None
    assert engine.receive(PA + 1, rtcp(), (NAT_A[0], NAT_A[1] + 7), 20.0) is None


# -- SRTP --------------------------------------------------------------------------------------


def srtp_engine(**kw: object) -> tuple[RelayEngine, SrtpKey, SrtpKey, SrtpKey, SrtpKey]:
    """A: SRTP both ways; B: SRTP both ways; four distinct keys (re-keyed per leg)."""
    ka_in, ka_out, kb_in, kb_out = key(), key(), key(), key()
    a = party(PA, kw.pop("a_remote", A), recv_key=ka_in, send_key=ka_out)  # type: ignore[arg-type]
    b = party(PB, B, recv_key=kb_in, send_key=kb_out)
    return engine_with(a, b), ka_in, ka_out, kb_in, kb_out


def test_a_deleted_session_leaves_no_cyclic_garbage() -> None:
    """A deleted session's legs, handlers and SRTP contexts die by reference counting: the
    media worker runs the cyclic collector's full collections rarely."""
    engine, ka_in, *_ = srtp_engine()
    engine.receive(PA, SrtpSender(ka_in).protect(rtp(1)), A, 1.0)
    gc.collect()
    gc.disable()
    try:
        engine.delete("s1")
        for i in range(3):
            a_key = key()
            engine.update(update(party(PA, A, recv_key=a_key), party(PB, B), session=f"x{i}"), 2.0)
            assert engine.receive(PA, SrtpSender(a_key).protect(rtp(2)), A, 2.0) is not None
            engine.delete(f"x{i}")
        assert gc.collect() == 0
    finally:
        gc.enable()
    assert engine.sessions == 0 and engine.ports == 0


def test_srtp_is_re_keyed_per_leg() -> None:
    engine, ka_in, ka_out, kb_in, kb_out = srtp_engine()
    a_send, a_recv = SrtpSender(ka_in), SrtpReceiver(ka_out)
    b_send, b_recv = SrtpSender(kb_in), SrtpReceiver(kb_out)
    for seq in (65534, 65535, 0, 1):  # across a rollover (RFC 3711 3.3.1)
        out = engine.receive(PA, a_send.protect(rtp(seq)), A, 1.0)
        assert out is not None and out[0] == PB and out[2] == B
        assert b_recv.unprotect(out[1]) == rtp(seq)
        back = engine.receive(PB, b_send.protect(rtp(seq, ssrc=2)), B, 1.0)
        assert back is not None and a_recv.unprotect(back[1]) == rtp(seq, ssrc=2)
    out = engine.receive(PA + 1, a_send.protect_rtcp(rtcp()), (A[0], A[1] + 1), 1.0)
    assert out is not None and b_recv.unprotect_rtcp(out[1]) == rtcp()
    s = pstats(engine, "a")
    assert s.srtp_failures == 0 and s.lost == 0


@pytest.mark.parametrize("srtp_side", ["a", "b"])
def test_srtp_to_plain_interworking(srtp_side: str) -> None:
    k_in, k_out = key(), key()
    keyed = {"recv_key": k_in, "send_key": k_out}
    a = party(PA, A, **(keyed if srtp_side == "a" else {}))
    b = party(PB, B, **(keyed if srtp_side == "b" else {}))
    engine = engine_with(a, b)
    port, src, other, other_src = (PA, A, PB, B) if srtp_side == "a" else (PB, B, PA, A)
    out = engine.receive(port, SrtpSender(k_in).protect(rtp(5)), src, 1.0)
    assert out == (other, rtp(5), other_src)
    back = engine.receive(other, rtp(9, ssrc=3), other_src, 1.0)
    assert back is not None and SrtpReceiver(k_out).unprotect(back[1]) == rtp(9, ssrc=3)


def test_a_packet_that_fails_to_authenticate_is_dropped_and_never_latches() -> None:
    engine, ka_in, *_ = srtp_engine(a_remote=("10.1.1.1", 4000))
    forged = SrtpSender(key()).protect(rtp(1))  # another key
    assert engine.receive(PA, forged, EVIL, 1.0) is None
    assert engine.receive(PA, rtp(1), EVIL, 1.0) is None  # plain on an SRTP leg
    s = pstats(engine, "a")
    assert (s.srtp_failures, s.latched, s.packets_in) == (2, None, 0)
    good = SrtpSender(ka_in).protect(rtp(1))
    assert engine.receive(PA, good, NAT_A, 1.0) is not None
    assert engine.receive(PA, good, NAT_A, 1.0) is None  # RFC 3711 3.3.2 replay
    assert pstats(engine, "a").srtp_failures == 3
    assert pstats(engine, "a").latched == NAT_A


def test_a_verified_ssrc_change_re_latches_after_the_window() -> None:
    engine, ka_in, ka_out, kb_in, _ = srtp_engine(a_remote=("10.1.1.1", 4000))
    sender = SrtpSender(ka_in)
    engine.receive(PA, sender.protect(rtp(1, ssrc=1)), NAT_A, 1.0)
    # the same SSRC from a new address after the window: not verified as a restart
    moved = ("203.0.113.5", 62000)
    assert engine.receive(PA, sender.protect(rtp(2, ssrc=1)), moved, 30.0) is None
    # a forged packet with a new SSRC does not authenticate
    assert engine.receive(PA, SrtpSender(key()).protect(rtp(1, ssrc=7)), EVIL, 30.0) is None
    s = pstats(engine, "a")
    assert (s.dropped_source, s.srtp_failures, s.latched) == (1, 1, NAT_A)
    # the phone restarted its stream (new SSRC) behind a new NAT binding
    assert engine.receive(PA, sender.protect(rtp(500, ssrc=2)), moved, 31.0) is not None
    assert pstats(engine, "a").latched == moved
    back = engine.receive(PB, SrtpSender(kb_in).protect(rtp(1, ssrc=9)), B, 31.0)
    assert back is not None and back[2] == moved
    assert SrtpReceiver(ka_out).unprotect(back[1]) == rtp(1, ssrc=9)
    # the old SSRC cannot come back from yet another address
    assert engine.receive(PA, sender.protect(rtp(3, ssrc=1)), EVIL, 32.0) is None
    assert pstats(engine, "a").latched == moved


def test_a_changed_key_gets_a_new_context_and_an_unchanged_key_keeps_its_state() -> None:
    engine, ka_in, ka_out, kb_in, kb_out = srtp_engine()
    sender = SrtpSender(ka_in)
    for seq in (65534, 65535, 0):
        assert engine.receive(PA, sender.protect(rtp(seq)), A, 1.0) is not None
    # the same description again: the ROC and replay state stay (seq 1 is ROC 1)
    engine.update(
        update(
            party(PA, A, recv_key=ka_in, send_key=ka_out),
            party(PB, B, recv_key=kb_in, send_key=kb_out),
        ),
        2.0,
    )
    assert engine.receive(PA, sender.protect(rtp(1)), A, 2.0) is not None
    # A re-keys (a new a=crypto in a re-INVITE)
    new = key("AEAD_AES_128_GCM")
    engine.update(
        update(
            party(PA, A, recv_key=new, send_key=ka_out),
            party(PB, B, recv_key=kb_in, send_key=kb_out),
        ),
        3.0,
    )
    assert engine.receive(PA, sender.protect(rtp(2)), A, 3.0) is None
    assert engine.receive(PA, SrtpSender(new).protect(rtp(3)), A, 3.0) is not None


def test_a_duplicate_is_not_encrypted_twice() -> None:
    """RFC 3711 9.1: the same index under the same key must not be encrypted again."""
    kb_out = key()
    engine = engine_with(b=party(PB, B, send_key=kb_out))
    assert engine.receive(PA, rtp(1), A, 1.0) is not None
    assert engine.receive(PA, rtp(1), A, 1.0) is None
    assert engine.protect_failures == 1


def test_an_unusable_key_drops_instead_of_sending_plain() -> None:
    bad = SrtpKey(suite="AES_256_CM_HMAC_SHA1_80", key_salt=bytes(46))
    engine = engine_with(a=party(PA, A, recv_key=bad), b=party(PB, B))
    assert engine.receive(PA, rtp(1), A, 1.0) is None
    assert engine.receive(PA + 1, rtcp(), (A[0], A[1] + 1), 1.0) is None
    assert pstats(engine, "a").srtp_failures == 2
    assert engine.ports == 4
    engine = engine_with(a=party(PA, A), b=party(PB, B, send_key=bad))
    assert engine.receive(PA, rtp(1), A, 1.0) is None  # nothing plain goes to B
    assert engine.protect_failures == 1


def test_passthrough_forwards_bytes_unchanged() -> None:
    k = key()
    engine = RelayEngine()
    engine.update(
        update(party(PA, A, rtcp_mux=True), party(PB, B, rtcp_mux=True), passthrough=True), 0.0
    )
    protected = SrtpSender(k).protect(rtp(1))
    dtls = b"\x16\xfe\xfd" + os.urandom(60)
    assert engine.receive(PA, protected, A, 1.0) == (PB, protected, B)
    assert engine.receive(PB, dtls, B, 1.0) == (PA, dtls, A)
    srtcp = SrtpSender(k).protect_rtcp(rtcp())
    assert engine.receive(PA, srtcp, A, 1.0) == (PB, srtcp, B)
    assert engine.receive(PA, protected, EVIL, 9.0) is None  # latching still applies


# -- statistics --------------------------------------------------------------------------------


def test_loss_and_packet_counts() -> None:
    engine = engine_with()
    for seq in (10, 11, 12, 15, 14, 16):  # 13 lost, 14 late (RFC 3550 A.3)
        engine.receive(PA, rtp(seq), A, 1.0)
    engine.receive(PA + 1, rtcp(), (A[0], A[1] + 1), 1.0)
    s = pstats(engine, "a")
    assert (s.packets_in, s.bytes_in, s.lost) == (7, 6 * 172 + 28, 1)
    b = pstats(engine, "b")
    assert (b.packets_out, b.bytes_out, b.packets_in) == (7, 6 * 172 + 28, 0)


def test_loss_across_a_wrap_and_an_ssrc_change() -> None:
    engine = engine_with()
    for seq in (65533, 65535, 0, 2):  # 65534 and 1 lost
        engine.receive(PA, rtp(seq), A, 1.0)
    for seq in (100, 102):  # a new SSRC: 101 lost
        engine.receive(PA, rtp(seq, ssrc=5), A, 1.0)
    assert pstats(engine, "a").lost == 3


def test_jitter_follows_rfc3550_a8() -> None:
    engine = engine_with()
    arrivals = [0.0, 0.020, 0.045, 0.060, 0.090, 0.100]
    j = 0.0
    for i, t in enumerate(arrivals):
        engine.receive(PA, rtp(i), A, 1.0 + t)
        if i:
            d = abs((t - arrivals[i - 1]) * 8000 - 160)
            j += (d - j) / 16
    assert pstats(engine, "a").jitter_ms == pytest.approx(j / 8, abs=1e-3)
    assert pstats(engine, "a").jitter_ms > 0


def test_steady_stream_has_no_jitter_and_video_uses_90khz() -> None:
    engine = engine_with()
    for i in range(50):
        engine.receive(PA, rtp(i, ts=i * 3000, pt=34), A, 1.0 + i / 30)  # H.263 at 30 fps
    assert pstats(engine, "a").jitter_ms == pytest.approx(0.0, abs=1e-6)


# -- timeouts ----------------------------------------------------------------------------------


def test_a_silent_session_times_out_once() -> None:
    engine = engine_with(timeout=60.0)
    assert engine.next_deadline() == 60.0
    engine.receive(PA, rtp(1), A, 30.0)
    assert engine.check_timeouts(89.9) == []
    assert engine.next_deadline() == 90.0
    assert engine.check_timeouts(90.0) == [control.Timeout(session="s1", idle=60.0)]
    assert engine.check_timeouts(200.0) == []
    assert engine.next_deadline() is None
    # an Update (e.g. a re-INVITE) re-arms it
    engine.update(update(party(PA, A), party(PB, B)), 300.0)
    assert engine.check_timeouts(360.0) == [control.Timeout(session="s1", idle=60.0)]


def test_rejected_packets_do_not_keep_a_session_alive() -> None:
    engine = engine_with(timeout=10.0)
    for t in range(1, 11):
        engine.receive(PA, rtp(t), EVIL, float(t) + 5)
    assert [t.session for t in engine.check_timeouts(10.0)] == ["s1"]


def test_a_session_on_hold_never_times_out() -> None:
    engine = engine_with(a=party(PA, A, sends=False), b=party(PB, None, sends=False), timeout=1.0)
    assert engine.check_timeouts(1000.0) == []
    assert engine.next_deadline() is None


# -- ports -------------------------------------------------------------------------------------


def test_ports_open_on_update_and_close_on_delete() -> None:
    engine = RelayEngine()
    changes = engine.update(update(party(PA, A), party(PB, B)), 0.0)
    assert sorted(changes.open) == [(BIND, p) for p in (PA, PA + 1, PB, PB + 1)]
    assert changes.close == ()
    assert (engine.sessions, engine.ports) == (1, 4)
    engine.receive(PA, rtp(1), A, 1.0)
    stats, changes = engine.delete("s1")
    assert stats.streams[0].a.packets_in == 1 and stats.streams[0].b.packets_out == 1
    assert sorted(changes.close) == [(BIND, p) for p in (PA, PA + 1, PB, PB + 1)]
    assert (engine.sessions, engine.ports, engine.local_ports()) == (0, 0, set())
    assert engine.receive(PA, rtp(2), A, 2.0) is None
    assert engine.delete("s1") == (control.Stats(session="s1", streams=()), PortChanges())


def test_an_update_that_drops_or_changes_streams_moves_exactly_those_ports() -> None:
    engine = RelayEngine()
    video = Stream(index=1, a=party(20004, A), b=party(20006, B))
    engine.update(
        Update(session="s1", streams=(update(party(PA, A), party(PB, B)).streams[0], video)), 0.0
    )
    assert engine.ports == 8
    # the video stream goes; A turns rtcp-mux on
    changes = engine.update(update(party(PA, A, rtcp_mux=True), party(PB, B)), 1.0)
    assert sorted(changes.close) == [(BIND, p) for p in (PA + 1, 20004, 20005, 20006, 20007)]
    assert changes.open == ()
    assert engine.ports == 3
    # A moves to another bind address (side): that port is closed and opened again
    changes = engine.update(
        update(Party(bind="10.0.0.2", port=PA, remote=A, rtcp_mux=True), party(PB, B)), 2.0
    )
    assert changes == PortChanges(open=(("10.0.0.2", PA),), close=((BIND, PA),))
    engine.update(Update(session="s1", streams=()), 3.0)
    assert engine.ports == 0 and engine.local_ports() == set()
    assert engine.delete("s1")[1] == PortChanges()
    assert engine.sessions == 0


def test_a_port_of_another_session_is_not_taken() -> None:
    engine = engine_with()
    changes = engine.update(update(party(PA, A), party(30000, B), session="s2"), 1.0)
    assert sorted(changes.open) == [(BIND, 30000), (BIND, 30001)]
    assert engine.receive(PA, rtp(1), A, 1.0) == (PB, rtp(1), B)  # still s1's
    engine.delete("s2")
    assert engine.ports == 4
    engine.delete("s1")
    assert engine.ports == 0


def test_many_sessions_leave_nothing_behind() -> None:
    engine = RelayEngine()
    for i in range(100):
        port = 40000 + 4 * i
        engine.update(update(party(port, A), party(port + 2, B), session=f"c{i}"), 0.0)
        engine.receive(port, rtp(1), A, 0.5)
    assert (engine.sessions, engine.ports) == (100, 400)
    for i in range(100):
        engine.delete(f"c{i}")
    assert (engine.sessions, engine.ports, engine.local_ports()) == (0, 0, set())


def test_a_call_that_comes_back_through_a_backend_meets_itself_between_relay_ports() -> None:
    """alice -> SBC -> backend -> SBC -> bob: the two calls' core parties are each other's
    relay ports. A relay port is a source only where the party's SDP names it, and never a
    port of the same session (that would be a loop)."""
    engine = RelayEngine(latch_window=5.0)
    alice, bob = ("192.0.2.10", 4000), ("192.0.2.20", 6000)
    engine.update(update(party(20000, alice), party(20002, (BIND, 20004)), session="c1"), 0.0)
    engine.update(update(party(20004, (BIND, 20002)), party(20006, bob), session="c2"), 0.0)
    assert engine.receive(20000, rtp(1), alice, 1.0) == (20002, rtp(1), (BIND, 20004))
    assert engine.receive(20004, rtp(1), (BIND, 20002), 1.0) == (20006, rtp(1), bob)
    assert engine.receive(20006, rtp(9, ssrc=2), bob, 9.0) == (20004, rtp(9, ssrc=2), (BIND, 20002))
    assert engine.receive(20002, rtp(9, ssrc=2), (BIND, 20004), 9.0) == (
        20000, rtp(9, ssrc=2), alice,
    )  # fmt: skip
    # Another relay port than the SDP's, even in the latch window, is not a source.
    assert engine.receive(20004, rtp(2), (BIND, 20000), 1.0) is None
    # A session whose SDP names its own port: refused, no loop.
    engine.update(update(party(20010, (BIND, 20012)), party(20012, (BIND, 20010)), session="x"), 0)
    assert engine.receive(20010, rtp(1), (BIND, 20012), 1.0) is None


def test_a_party_that_has_not_answered_an_srtp_offer_is_not_relayed() -> None:
    """Until its answer says whether and how it encrypts, what the party sends is dropped:
    SRTP it sends early must not be passed on as if it were plain RTP."""
    engine = engine_with(b=party(PB, B, accept=False))
    assert engine.receive(PB, rtp(1), B, 1.0) is None
    assert engine.receive(PA, rtp(1), A, 1.0) == (PB, rtp(1), B)  # towards it: as before
    engine.update(update(party(PA, A), party(PB, B)), 1.5)
    assert engine.receive(PB, rtp(2), B, 2.0) == (PA, rtp(2), A)


def test_totals_count_live_and_ended_sessions_and_dropped_streams() -> None:
    """totals() (the metrics): the counters of every party the engine ever had,
    those gone with a Delete or with a stream an Update closed included."""
    engine = RelayEngine()
    assert engine.totals() == control.Totals()
    video = Stream(index=1, a=party(20004, A), b=party(20006, B))
    engine.update(
        Update(session="s1", streams=(update(party(PA, A), party(PB, B)).streams[0], video)), 0.0
    )
    engine.update(update(party(30000, A), party(30002, B), session="s2"), 0.0)
    engine.receive(PA, rtp(1), A, 1.0)  # s1 audio: relayed to B
    engine.receive(20004, rtp(1), A, 1.0)  # s1 video: relayed
    engine.receive(30000, rtp(1), EVIL, 9.0)  # s2: after the window, a stranger: dropped
    engine.receive(40000, rtp(1), A, 9.0)  # no session
    t = engine.totals()
    assert (t.packets_in, t.packets_out, t.bytes_in, t.bytes_out) == (2, 2, 344, 344)
    assert (t.dropped_source, t.no_session, t.sessions, t.ports) == (1, 1, 2, 12)
    engine.update(update(party(PA, A), party(PB, B)), 10.0)  # s1's video stream closes
    assert engine.totals().packets_in == 2 and engine.totals().ports == 8
    engine.delete("s1")
    engine.delete("s2")
    t = engine.totals()
    assert (t.packets_in, t.packets_out, t.dropped_source, t.no_session) == (2, 2, 1, 1)
    assert (t.sessions, t.ports) == (0, 0)
    engine.delete("s1")  # twice: nothing counted twice
    assert engine.totals() == t
