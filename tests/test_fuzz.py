"""Property-based fuzzing of the sans-I/O core ("How it is shown": fuzzing).

Valid messages (an INVITE with SDP, a REGISTER, OPTIONS, MESSAGE, requests within an
established call, a backend's responses, and the RFC 4475 valid set) are mutated in the
style of the PROTOS c07-sip test suite (overlong fields, format-string tokens, NUL/CR/LF
injection, huge integers, missing and duplicated mandatory headers, broken Via and URIs,
non-UTF-8 octets, truncation) and fed through ``SbcCore.receive_datagram`` and
``SbcCore.receive_stream`` (cut into arbitrary chunks) of a core with one backend (B1)
and the media relay. The properties:

* no exception escapes the core;
* every input gets a response, a forwarded message or nothing (a drop); a message the
  parser or the sanity filter rejects gets a 4xx/5xx with a reason phrase, or nothing;
* a rejected request never produces anything towards the backend;
* nothing malformed is ever sent anywhere: every message the SBC emits parses, and every
  request it relays passes the sanity filter itself (RFC 3261 16.3, 16.6);
* the stream path answers the same whatever the chunking;
* once the timers have run, no transaction, call or media state is left.

Runs are bounded (``max_examples``) and derandomized so CI is stable. Inputs fuzzing found
crashing or answered wrongly are kept as regression cases in tests/data/fuzz/.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from sipdata import rfc4475
from test_b2bua import (
    ACCESS,
    ALICE,
    ANSWER_SDP,
    B1,
    FROM_B1,
    Lab,
    ack_for,
    establish,
    in_dialog,
    invite,
    only,
    reply,
)
from test_registration import REGISTER

from sbc.actions import Close, SendData
from sbc.features.sanity import check_request
from sbc.media.control import Stats
from sbc.pipeline import SUPPORTED
from sbc.sip.flow import Flow
from sbc.sip.message import Message, ParseError, Request, Response
from sbc.sip.parser import Limits, parse_message

ECHO_LIMITS = Limits(max_headers=1 << 16, max_header_line=1 << 20)
FUZZ_DATA = Path(__file__).parent / "data" / "fuzz"
ALICE_TCP = Flow("tcp", ACCESS, ("192.0.2.7", 40001), conn_id=11)

# Bounded and derandomized for CI; SBC_FUZZ_EXAMPLES=20000 SBC_FUZZ_RANDOM=1 explores longer.
FUZZ = settings(
    max_examples=int(os.environ.get("SBC_FUZZ_EXAMPLES", "120")),
    derandomize=not os.environ.get("SBC_FUZZ_RANDOM"),
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _sip(text: str) -> bytes:
    return text.lstrip("\n").replace("\n", "\r\n").encode()


OPTIONS_BOB = _sip("""
OPTIONS sip:bob@example.com SIP/2.0
Via: SIP/2.0/UDP 10.0.0.7:5060;branch=z9hG4bK-opt1;rport
Max-Forwards: 70
To: <sip:bob@example.com>
From: <sip:alice@example.com>;tag=o1
Call-ID: opt1@10.0.0.7
CSeq: 7 OPTIONS
Accept: application/sdp
Content-Length: 0

""")

MESSAGE_BOB = _sip("""
MESSAGE sip:bob@example.com SIP/2.0
Via: SIP/2.0/UDP 10.0.0.7:5060;branch=z9hG4bK-msg1;rport
Max-Forwards: 70
To: <sip:bob@example.com>
From: "Alice" <sip:alice@example.com>;tag=m1
Call-ID: msg1@10.0.0.7
CSeq: 2 MESSAGE
Content-Type: text/plain
Expires: 300
Content-Length: 5

hello""")

# Out-of-dialog requests from the client (alice, behind NAT).
REQUEST_SEEDS: dict[str, bytes] = {
    "invite-sdp": invite(),
    "register": _sip(REGISTER.format(n=1, user="alice")),
    "options": OPTIONS_BOB,
    "message": MESSAGE_BOB,
    "wsinv": rfc4475("wsinv"),
    "esc01": rfc4475("esc01"),
    "longreq": rfc4475("longreq"),
    "mpart01": rfc4475("mpart01"),
    "inv2543": rfc4475("inv2543"),
    "cparam01": rfc4475("cparam01"),
}

# PROTOS c07-sip style payloads.
OVERLONG = (256, 1024, 8200, 70000)
FORMAT_TOKENS = (b"%s%s%s%s", b"%n%n%n%n", b"%x%x%x%x%d", b"%99999999999s", b"%.1024d")
INJECTIONS = (b"\x00", b"\r", b"\n", b"\r\n", b"\r\n\r\n", b"\x00\r\n", b"\t", b"\x7f", b"\x1b[2J")
NON_UTF8 = (b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\x80\x81\x82", b"\xfe\xff", b"\xe4\xb8")
HUGE_INTS = (
    b"2147483648", b"4294967296", b"4294967297", b"9223372036854775808",
    b"18446744073709551617", b"1" + b"0" * 40, b"-1", b"-2147483649", b"0x7fffffff",
    b"1e9", b"00000000000000000000070", b"", b" ", b"256", b"65536", b"3.5",
)  # fmt: skip
INT_HEADERS = (b"CSeq", b"Content-Length", b"l", b"Max-Forwards", b"Expires")
MANDATORY = (b"Via", b"To", b"From", b"Call-ID", b"CSeq", b"Max-Forwards", b"Content-Length")
BAD_VIAS = (
    b"SIP/2.0/UDP", b"SIP/2.0/UDP 10.0.0.7;branch", b"SIP/3.0/UDP 10.0.0.7;branch=z9hG4bK1",
    b"SIP/2.0/UDP 10.0.0.7:99999;branch=z9hG4bK1", b"SIP/2.0/UDP [::1;branch=z9hG4bK1",
    b";;,;,,", b"SIP/2.0/UDP 10.0.0.7;rport=abc;branch=z9hG4bK1",
    b"SIP/2.0/UDP 10.0.0.7;branch=z9hG4bK", b"SIP/2.0/UDP 10.0.0.7;received=;branch=z9hG4bK1",
    b"SIP/2.0/UDP 10.0.0.7;rport=99999999999999;branch=z9hG4bK1", b"SIP/2.0/UDP ;branch=x",
    b"SIP/2.0/UDP 10.0.0.7:0;branch=z9hG4bK1", b"SIP/2.0/UDP 10.0.0.7 ; branch = z9hG4bK1 ,",
    b"SIP/2.0/UDP 255.255.255.255;branch=z9hG4bK1", b"SIP/2.0/UDP 10.0.0.7;branch=" + b"z" * 5000,
)  # fmt: skip
BAD_URIS = (
    b"sip:", b"sip:@", b"<sip:bob@example.com>", b"sip:bob@example.com:0",
    b"sip:bob@example.com:70000", b"sip:b ob@example.com", b"sip:[::1", b"bob",
    b"sip:bob@example.com?Route=%3Csip:evil%3E", b"sip:bob@example.com;;;;", b"tel:",
    b"http://example.com/", b"sips:bob@example.com", b"sip:%00@example.com",
    b"sip:bob@example.com;maddr=255.255.255.255", b"sip:bob@" + b"a" * 300 + b".com",
    b"sip:bob@10.1.0.10:5070", b"sip:bob@127.0.0.1", b"sip:bob@[::ffff:10.1.0.10]",
)  # fmt: skip
START_LINES = (
    b"INVITE sip:bob@example.com SIP/2.1", b"INVITE sip:bob@example.com SIP/2.0 extra",
    b"INVITE  sip:bob@example.com  SIP/2.0", b"INVITE sip:bob@example.com", b"SIP/2.0",
    b"SIP/2.0 200", b"SIP/2.0 99999 OK", b"SIP/2.0 200 " + b"\xff" * 10, b"invite sip:bob@example.com SIP/2.0",
    b"BYE sip:bob@example.com SIP/2.0", b"ACK sip:bob@example.com SIP/2.0", b" INVITE sip:b@c SIP/2.0",
    b"CANCEL sip:bob@example.com SIP/2.0", b"FOO sip:bob@example.com SIP/2.0",
)  # fmt: skip


# -- mutations -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Mutation:
    """One edit of a message: ``kind`` with small integers choosing where and what."""

    kind: str
    a: int
    b: int

    def apply(self, data: bytes) -> bytes:
        head, sep, body = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        i = self.a % len(lines)
        a, b = self.a, self.b
        k = self.kind
        if k == "overlong":
            name, colon, value = lines[i].partition(b":")
            fill = b"A" * OVERLONG[b % len(OVERLONG)]
            lines[i] = name + colon + (value[: len(value) // 2] + fill if colon else fill)
        elif k == "format":
            pos = b % (len(lines[i]) + 1)
            lines[i] = lines[i][:pos] + FORMAT_TOKENS[a % len(FORMAT_TOKENS)] + lines[i][pos:]
        elif k == "inject":
            pos = b % (len(data) + 1)
            return data[:pos] + INJECTIONS[a % len(INJECTIONS)] + data[pos:]
        elif k == "non_utf8":
            pos = b % (len(head) + 1)
            return head[:pos] + NON_UTF8[a % len(NON_UTF8)] + head[pos:] + sep + body
        elif k == "huge_int":
            name = INT_HEADERS[a % len(INT_HEADERS)]
            value = HUGE_INTS[b % len(HUGE_INTS)]
            for j, line in enumerate(lines):
                if line.lower().startswith(name.lower() + b":"):
                    rest = line.split(b":", 1)[1].strip().split(b" ", 1)[1:]  # CSeq's method
                    lines[j] = name + b": " + value + (b" " + rest[0] if rest else b"")
                    break
            else:
                lines.append(name + b": " + value)
        elif k == "drop_header":
            name = MANDATORY[a % len(MANDATORY)].lower()
            lines = [ln for ln in lines if not ln.lower().startswith(name + b":")]
        elif k == "dup_header":
            name = MANDATORY[a % len(MANDATORY)].lower()
            found = [ln for ln in lines if ln.lower().startswith(name + b":")]
            if found:
                lines.insert(1 + b % len(lines), found[0] if b % 2 else found[0] + b"x")
        elif k == "bad_via":
            via = b"Via: " + BAD_VIAS[b % len(BAD_VIAS)]
            for j, line in enumerate(lines):
                if line.lower().startswith((b"via:", b"v:")):
                    lines[j] = via
                    break
            else:
                lines.insert(1, via)
        elif k == "bad_uri":
            uri = BAD_URIS[b % len(BAD_URIS)]
            if a % 3 == 0 and lines[0].count(b" ") >= 2:
                method, _, rest = lines[0].partition(b" ")
                lines[0] = method + b" " + uri + b" " + rest.rpartition(b" ")[2]
            else:
                name = (b"To", b"From", b"Contact")[a % 3]
                for j, line in enumerate(lines):
                    if line.lower().startswith(name.lower() + b":"):
                        lines[j] = name + b": <" + uri + b">"
                        break
        elif k == "start_line":
            lines[0] = START_LINES[b % len(START_LINES)]
        elif k == "cseq_method":
            for j, line in enumerate(lines):
                if line.lower().startswith(b"cseq:"):
                    lines[j] = b"CSeq: 1 " + (b"BYE", b"REGISTER", b"ACK", b"FOO", b"")[b % 5]
        elif k == "truncate":
            return data[: b % (len(data) + 1)]
        elif k == "flip":
            if not data:
                return data
            buf = bytearray(data)
            buf[b % len(buf)] = a % 256
            return bytes(buf)
        elif k == "swap_lines":
            j = b % len(lines)
            lines[i], lines[j] = lines[j], lines[i]
        return b"\r\n".join(lines) + sep + body


KINDS = (
    "overlong", "format", "inject", "non_utf8", "huge_int", "drop_header", "dup_header",
    "bad_via", "bad_uri", "start_line", "cseq_method", "truncate", "flip", "swap_lines",
)  # fmt: skip
mutation = st.builds(
    Mutation,
    kind=st.sampled_from(KINDS),
    a=st.integers(min_value=0, max_value=10_000),
    b=st.integers(min_value=0, max_value=100_000),
)
mutations = st.lists(mutation, min_size=1, max_size=4)
chunk_cuts = st.lists(st.integers(min_value=1, max_value=400), max_size=12)


def mutate(data: bytes, muts: list[Mutation]) -> bytes:
    for m in muts:
        data = m.apply(data)
    return data


# -- the oracle and the checks ------------------------------------------------------------


def rejected_by_sanity(data: bytes) -> bool:
    """True if the parser or the sanity filter rejects ``data`` as one datagram: the SBC's
    own definition of malformed, computed here independently of the core."""
    try:
        msg = parse_message(data, datagram=True)
    except ParseError:
        return True
    if isinstance(msg, Response):
        try:
            msg.via, msg.cseq, msg.call_id, msg.from_, msg.to  # noqa: B018
        except ParseError:
            return True
        return False
    assert isinstance(msg, Request)
    return check_request(msg, supported=SUPPORTED) is not None


def check_emitted(action: SendData) -> Message:
    """Whatever the SBC sends must be well formed: it parses, its header section holds no
    bare CR, LF or NUL (RFC 3261 7.3.1: lines end in CRLF), and a request it sends passes
    the SBC's own sanity filter (nothing malformed is relayed, RFC 3261 16.3 / 16.6)."""
    if action.data == b"\r\n" and action.flow.reliable:
        return Response(200, "pong")  # RFC 5626 3.5.1: the CRLF answer to a CRLFCRLF ping
    assert len(action.data) <= 65535
    if action.flow.remote[0] == B1[0]:
        msg = parse_message(action.data, datagram=True)  # within the SBC's own limits
    else:
        # An answer copies the sender's Via, From, To, Call-ID and CSeq (RFC 3261 8.2.6.2),
        # however long the sender made them.
        msg = parse_message(action.data, datagram=True, limits=ECHO_LIMITS)
    head = action.data.partition(b"\r\n\r\n")[0]
    assert head.count(b"\r") == head.count(b"\n") == head.count(b"\r\n"), head
    assert head.count(b"\x00") == head.count(b"\\\x00"), head  # only quoted-pairs
    assert action.flow.remote[1] != 0 and action.flow.remote[1] <= 65535
    if isinstance(msg, Request):
        assert check_request(msg, supported=SUPPORTED) is None, (msg, action.data)
        msg.via, msg.contact, msg.name_addrs("route")
    else:
        assert isinstance(msg, Response)
        assert 100 <= msg.status <= 699
        if msg.status >= 400:
            assert msg.reason.strip(), msg  # a reason phrase naming the fault
    return msg


def to_backend(actions: list[SendData | Close]) -> list[SendData]:
    return [a for a in actions if isinstance(a, SendData) and a.flow.remote[0] == B1[0]]


def summary(actions: list[SendData | Close]) -> list[tuple[str, str]]:
    """What was sent where, without the random tags and branches (for comparing runs)."""
    out = []
    for a in actions:
        if isinstance(a, Close) or a.data == b"\r\n":
            out.append(("close" if isinstance(a, Close) else "pong", str(a.flow.remote)))
            continue
        msg = parse_message(a.data, limits=ECHO_LIMITS)
        what = msg.method if isinstance(msg, Request) else str(msg.status)  # type: ignore[attr-defined]
        out.append((str(a.flow.remote), what))
    return out


class FuzzLab(Lab):
    """The B2BUA lab of test_b2bua (one backend that is up, the media relay) fed raw bytes
    on the datagram or the stream path; every action is checked as it comes out."""

    def __init__(self) -> None:
        self.emitted: list[SendData | Close] = []
        super().__init__(request_timeout=4.0, failures=1_000_000)

    def _sent(self, actions: list[object]) -> list[tuple[Flow, Message]]:
        actions = self._effects(actions)
        while self._deleted:  # the media worker's answer to Delete (as Lab does)
            session = self._deleted.pop()
            event = Stats(session=session, streams=())
            assert self._effects(self.core.media_event(event, self.now)) == []
        out = []
        for a in actions:
            assert isinstance(a, SendData | Close), a
            if isinstance(a, SendData) and a.data != b"\r\n":
                out.append((a.flow, check_emitted(a)))
        self.emitted += actions  # type: ignore[arg-type]
        return out

    def feed(self, data: bytes, *, stream: bool, cuts: list[int] = ()) -> list[SendData | Close]:  # type: ignore[assignment]
        self.tick()
        if not stream:
            actions = self.core.receive_datagram(data, ALICE, self.now)
        else:
            actions = []
            pos = 0
            for cut in [*cuts, len(data)]:
                chunk, pos = data[pos : pos + cut], pos + cut
                if chunk:
                    actions += self.core.receive_stream(chunk, ALICE_TCP, self.now)
                if pos >= len(data) or Close(ALICE_TCP) in actions:
                    break  # the I/O layer reads nothing more from a connection it closed
            self.core.connection_closed(ALICE_TCP)
        actions = self._effects(actions)  # type: ignore[arg-type]  # media commands, records
        self._sent(actions)
        return actions  # type: ignore[return-value]

    def state(self) -> dict[str, int]:
        layer = self.core.transactions
        mine = [
            tx
            for tx in layer._clients.values()
            if not (self.core.registration.owns(tx) or self.core.backends.owns(tx))
        ]
        size = dict(self.core.calls.state_size())
        size.update(
            clients=len(mine),
            servers=len(layer._servers),
            framers=len(self.core._framers),
            activity=len(self.core._activity),
        )
        if self.media is not None:
            size.update(self.media.state_size())
        return size


def assert_rejected_properly(data: bytes, actions: list[SendData | Close], flow: Flow) -> None:
    """A malformed request: a 4xx/5xx with a reason to its sender, or nothing; never a byte
    towards the backend."""
    assert to_backend(actions) == [], (data, actions)
    answers = [a for a in actions if isinstance(a, SendData)]
    assert len(answers) <= 1, answers
    for a in answers:
        assert a.flow.remote[0] == flow.remote[0]
        resp = parse_message(a.data, limits=ECHO_LIMITS)
        assert isinstance(resp, Response) and resp.status >= 400 and resp.reason.strip()


# -- the properties -----------------------------------------------------------------------


@FUZZ
@given(seed=st.sampled_from(sorted(REQUEST_SEEDS)), muts=mutations)
def test_mutated_requests_on_the_datagram_path(seed: str, muts: list[Mutation]) -> None:
    data = mutate(REQUEST_SEEDS[seed], muts)
    note(repr(data[:3000]))
    lab = FuzzLab()
    malformed = rejected_by_sanity(data)
    actions = lab.feed(data, stream=False)
    if malformed:
        assert_rejected_properly(data, actions, ALICE)
        # Every rejection is counted by reason (blank datagrams are keep-alives).
        counted = sum(
            v for k, v in lab.core.stats.items() if k.startswith(("rejected:", "dropped_response:"))
        )
        assert counted == 1 or not data.strip(b"\r\n\x00 "), lab.core.stats
    lab.run_until(lab.now + 120.0)
    assert not any(lab.state().values()), lab.state()


@FUZZ
@given(seed=st.sampled_from(sorted(REQUEST_SEEDS)), muts=mutations, cuts=chunk_cuts)
def test_mutated_requests_on_the_stream_path(
    seed: str, muts: list[Mutation], cuts: list[int]
) -> None:
    data = mutate(REQUEST_SEEDS[seed], muts)
    note(repr(data[:3000]))
    whole = FuzzLab()
    chunked = FuzzLab()
    expected = whole.feed(data, stream=True)
    got = chunked.feed(data, stream=True, cuts=cuts)
    # Framing by Content-Length does not depend on how the octets arrive (RFC 3261 18.3).
    assert summary(got) == summary(expected)
    if rejected_by_sanity(data) and b"\r\n\r\n" in data and data.count(b"\r\n\r\n") == 1:
        # One message on the stream, malformed: answered or dropped, never relayed.
        assert to_backend(got) == []
    for lab in (whole, chunked):
        lab.run_until(lab.now + 120.0)
        assert not any(lab.state().values()), lab.state()


@FUZZ
@given(
    method=st.sampled_from(["BYE", "INFO", "INVITE", "UPDATE", "ACK", "CANCEL"]),
    muts=mutations,
    stream=st.booleans(),
)
def test_mutated_requests_within_a_call(method: str, muts: list[Mutation], stream: bool) -> None:
    lab = FuzzLab()
    _fwd, _ok, got = establish(lab)
    if method == "ACK":
        seed = ack_for(got, cseq=1)
    elif method == "CANCEL":
        seed = invite().replace(b"INVITE sip:", b"CANCEL sip:").replace(b"1 INVITE", b"1 CANCEL")
    else:
        seed = in_dialog(method, got, 2)
    data = mutate(seed, muts)
    note(repr(data[:3000]))
    lab.run_until(lab.now + 1.0)
    baseline = lab.state()
    malformed = rejected_by_sanity(data)
    actions = lab.feed(data, stream=stream)
    if malformed and not stream:
        assert_rejected_properly(data, actions, ALICE)
    lab.run_until(lab.now + 120.0)
    after = lab.state()
    assert all(after[k] <= baseline[k] for k in after), (baseline, after)


@FUZZ
@given(status=st.sampled_from([180, 183, 200, 486, 503]), muts=mutations)
def test_mutated_backend_responses(status: int, muts: list[Mutation]) -> None:
    """RFC 3261 18.1.2 / 16.7: a malformed response from the backend is dropped, never
    relayed to the client; a valid one reaches the client well formed (check_emitted)."""
    lab = FuzzLab()
    _to_core, fwd = only(lab.from_client(invite()), Request)
    sdp = ANSWER_SDP if status in (183, 200) else ""
    data = mutate(bytes(reply(fwd, status, sdp=sdp)), muts)
    note(repr(data[:3000]))
    malformed = rejected_by_sanity(data)
    lab.tick()
    actions = lab.core.receive_datagram(data, FROM_B1, lab.now)
    lab._sent(actions)  # type: ignore[arg-type]
    if malformed:
        to_alice = [
            parse_message(a.data, limits=ECHO_LIMITS)
            for a in actions
            if isinstance(a, SendData) and a.flow.remote == ALICE.remote
        ]
        assert [m for m in to_alice if isinstance(m, Response)] == [], to_alice
    # The call ends whatever happened: alice gives up (CANCEL or BYE) or the timers do.
    lab.run_until(lab.now + 400.0)
    assert not any(lab.state().values()), lab.state()


@FUZZ
@given(
    data=st.binary(max_size=600),
    stream=st.booleans(),
    cuts=chunk_cuts,
)
def test_arbitrary_octets(data: bytes, stream: bool, cuts: list[int]) -> None:
    lab = FuzzLab()
    actions = lab.feed(data, stream=stream, cuts=cuts)
    assert to_backend(actions) == []
    lab.run_until(lab.now + 120.0)
    assert not any(lab.state().values())


# -- regression inputs found by fuzzing ---------------------------------------------------


def _fuzz_cases() -> list[str]:
    return sorted(p.name for p in FUZZ_DATA.glob("*.sip")) if FUZZ_DATA.is_dir() else []


@pytest.mark.parametrize("name", _fuzz_cases())
@pytest.mark.parametrize("stream", [False, True])
def test_fuzz_regressions(name: str, stream: bool) -> None:
    """Inputs fuzzing found (tests/data/fuzz/README.md): each is a malformed request that
    must be answered 400 and never reach the backend, on either path."""
    data = (FUZZ_DATA / name).read_bytes()
    lab = FuzzLab()
    actions = lab.feed(data, stream=stream)
    assert_rejected_properly(data, actions, ALICE_TCP if stream else ALICE)
    statuses = [
        r.status for r in map(parse_message, (a.data for a in actions if isinstance(a, SendData)))
    ]  # type: ignore[attr-defined]
    assert statuses == [400]
    lab.run_until(lab.now + 120.0)
    assert not any(lab.state().values())


def test_register_query_is_relayed_without_an_empty_contact() -> None:
    """Found by fuzzing: a REGISTER without Contact (a query, RFC 3261 10.2.3) was relayed
    with an empty ``Contact:`` added by the registration offload."""
    data = _sip(REGISTER.format(n=1, user="alice")).replace(
        b"Contact: <sip:alice@10.0.0.7:5060>\r\n", b""
    )
    lab = FuzzLab()
    [fwd] = to_backend(lab.feed(data, stream=False))
    msg = parse_message(fwd.data)
    assert isinstance(msg, Request) and msg.method == "REGISTER"
    assert "contact" not in msg


def test_backend_2xx_with_a_non_sip_contact_is_dropped() -> None:
    """Found by fuzzing: the 2xx was relayed and the ACK went to an http: Request-URI.
    RFC 3261 12.1.1: a dialog's remote target is a SIP or SIPS URI."""
    lab = FuzzLab()
    _to_core, fwd = only(lab.from_client(invite()), Request)
    ok = reply(fwd, 200, sdp=ANSWER_SDP)
    ok.set("Contact", "<http://example.com/>")
    assert lab.from_backend(ok) == []
    assert lab.core.stats["dropped_response:bad_contact"] == 1
    lab.run_until(lab.now + 400.0)
    assert not any(lab.state().values())


@pytest.mark.parametrize(
    ("data", "label"),
    [
        (invite().replace(b"Via: SIP/2.0/UDP ", b"Via: SIP/2.0/UDP \x00"), "nul_in_header"),
        (invite().replace(b"Via: SIP/2.0/UDP ", b"Via: SIP/2.0/UDP \r"), "bare_cr_or_lf_in_header"),
        (invite().replace(b";rport", b";x=" + b"a" * 70_000), "message_too_large"),
    ],
)
def test_answers_that_would_echo_garbage_are_not_sent(data: bytes, label: str) -> None:
    """Found by fuzzing: the 400/413 copied the sender's Via (RFC 3261 8.2.6.2) with its
    NUL or bare CR, or was itself too large to send; such an answer is counted, not sent."""
    lab = FuzzLab()
    assert lab.feed(data, stream=False) == []
    assert lab.core.stats[f"rejected:{label}"] == 1 and lab.core.stats["unanswerable"] == 1
