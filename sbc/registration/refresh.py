"""Offloaded re-REGISTERs answered from a template, before the message is parsed.

A client refreshes its registration by sending the same REGISTER again: the same octets but
for the top Via's branch (a new transaction, RFC 3261 8.1.1.7), the From tag (8.1.1.3: new
in each request outside a dialog, though many clients keep theirs), the CSeq number (10.2.4:
one higher) and, with digest, its credentials (22.4: a new nc, cnonce and response). Once
the registration proxy has answered one refresh itself (registration offload), it keeps, for
that client's UDP flow, the request without those parts and its own 200 cut around what
changes in the answer (the branch, the From tag, the CSeq number, the Date). A later
datagram from the flow that is the same request but for those parts, with a higher CSeq, is
answered by splicing them into the 200, as long as the registration is still the cached one and its
backend binding stays fresh (``may_answer_locally``): no parse, no transaction. The same
branch and CSeq again (a retransmission) gets the same octets again, as its transaction
would send them (RFC 3261 17.2.2). Anything else, including every change of a header field,
takes the full path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from sbc.features.registrar import CachedRegistration
from sbc.sip.flow import Flow

__all__ = ["Cut", "RefreshTemplates", "Template", "cut_request"]

# The top Via's branch value (RFC 3261 20.42, 8.1.1.7: a token, 25.1), within one line.
_BRANCH = re.compile(
    rb"\r\n(?:via|v)[ \t]*:[^\r\n]*?;[ \t]*branch[ \t]*=[ \t]*([A-Za-z0-9.!%*_+`'~-]+)", re.I
)
# The From tag (RFC 3261 8.1.1.3: a new one in each request outside a dialog, so a refresh may
# have its own).
_FROM_TAG = re.compile(
    rb"\r\n(?:from|f)[ \t]*:[^\r\n]*?;[ \t]*tag[ \t]*=[ \t]*([A-Za-z0-9.!%*_+`'~-]+)", re.I
)
# The CSeq number of a REGISTER (RFC 3261 20.16); the method text stays in the template.
_CSEQ = re.compile(rb"\r\ncseq[ \t]*:[ \t]*(\d{1,9})[ \t]+REGISTER[ \t]*\r\n", re.I)
# Credentials, with any folded lines (RFC 3261 20.7, 20.28).
_CREDENTIALS = re.compile(
    rb"\r\n(?:authorization|proxy-authorization)[ \t]*:[^\r\n]*(?:\r\n[ \t][^\r\n]*)*", re.I
)
# Greedy to the end of the line, the trailing blanks stripped after: a lazy capture before
# optional blanks backtracks quadratically on a long run of them.
_CALL_ID = re.compile(rb"\r\n(?:call-id|i)[ \t]*:[ \t]*([^\r\n]*)\r\n", re.I)
_DATE = re.compile(rb"\r\ndate[ \t]*:[ \t]*([^\r\n]*)", re.I)
# The variable parts alone, matched where a template says they are (``_fit``).
_TOKEN = re.compile(rb"[A-Za-z0-9.!%*_+`'~-]+")
_DIGITS = re.compile(rb"\d{1,9}")

# What a request is compared by: its octets without the parts that change between refreshes.
Shape = tuple[bytes, ...]


@dataclass(slots=True)
class Cut:
    """A REGISTER taken apart: its shape, its Call-ID (also in the shape), its branch, From
    tag and CSeq number, and its credentials (the first Authorization or
    Proxy-Authorization value; None without). Not changed once made (not frozen: one is
    made for every refresh, and a frozen dataclass costs more to make)."""

    shape: Shape
    call_id: bytes
    branch: bytes
    from_tag: bytes
    cseq: int
    credentials: bytes | None
    # What was cut out between the pieces of the shape, in order: "branch", "from_tag",
    # "cseq" or "credentials" (a whole Authorization or Proxy-Authorization field).
    slots: tuple[str, ...] = ()


def cut_request(data: bytes) -> Cut | None:
    """``data`` (one datagram) as a REGISTER's shape, or None if it does not look like one
    whose refreshes can be recognised (no branch, no CSeq, overlapping parts)."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    call_id = _CALL_ID.search(data, 0, end + 2)
    if call_id is None:
        return None
    return _cut(data, end, call_id)


def _cut(data: bytes, end: int, call_id: re.Match[bytes]) -> Cut | None:
    """``cut_request`` once the end of the header section and the Call-ID are found."""
    branch = _BRANCH.search(data, 0, end)
    from_tag = _FROM_TAG.search(data, 0, end)
    cseq = _CSEQ.search(data, 0, end + 2)
    if branch is None or from_tag is None or cseq is None:
        return None
    if branch.group(1) == b"z9hG4bK":
        return None  # RFC 4475 3.2.1: the sanity filter answers it 400
    spans = [(branch.span(1), "branch"), (from_tag.span(1), "from_tag"), (cseq.span(1), "cseq")]
    credentials: bytes | None = None
    proxy_credentials: bytes | None = None
    for match in _CREDENTIALS.finditer(data, 0, end):
        spans.append((match.span(), "credentials"))
        name, _, value = match.group()[2:].partition(b":")
        if name.strip().lower() == b"authorization":
            credentials = credentials or value.strip()
        else:
            proxy_credentials = proxy_credentials or value.strip()
    credentials = credentials or proxy_credentials  # as the full path reads them
    spans.sort()
    pieces: list[bytes] = []
    pos = 0
    for (start, stop), _ in spans:
        if start < pos:
            return None
        pieces.append(data[pos:start])
        pos = stop
    pieces.append(data[pos:])
    return Cut(
        tuple(pieces),
        call_id.group(1).rstrip(b" \t"),
        branch.group(1),
        from_tag.group(1),
        int(cseq.group(1)),
        credentials,
        tuple(slot for _, slot in spans),
    )


def _fit(shape: Shape, slots: tuple[str, ...], data: bytes, call_id: bytes) -> Cut | None:
    """``data`` cut as a request of ``shape`` (whose variable parts are ``slots``): what
    ``cut_request`` makes of it when it has that shape, found without searching. The pieces
    around the variable parts are the same octets, and each variable part is the longest
    run of what it may hold (a token, digits, a field with its folded lines), as the
    searches of ``cut_request`` take it; so they would find the same parts."""
    # Slices compared, not startswith(piece, start) or match.group(): cheaper compiled.
    pos = len(shape[0])
    if data[:pos] != shape[0]:
        return None
    branch = from_tag = b""
    cseq = 0
    credentials: bytes | None = None
    proxy_credentials: bytes | None = None
    for slot, piece in zip(slots, shape[1:], strict=True):
        if slot == "cseq":
            m = _DIGITS.match(data, pos)
        elif slot == "credentials":
            m = _CREDENTIALS.match(data, pos)
        else:
            m = _TOKEN.match(data, pos)
        if m is None:
            return None
        stop = m.end()
        after = stop + len(piece)
        if data[stop:after] != piece:
            return None
        part = data[pos:stop]
        if slot == "branch":
            branch = part
        elif slot == "from_tag":
            from_tag = part
        elif slot == "cseq":
            cseq = int(part)
        else:
            name, _, value = part[2:].partition(b":")
            if name.strip().lower() == b"authorization":
                credentials = credentials or value.strip()
            else:
                proxy_credentials = proxy_credentials or value.strip()
        pos = after
    if pos != len(data) or branch == b"z9hG4bK":
        return None  # longer; or RFC 4475 3.2.1: the sanity filter answers it 400
    return Cut(shape, call_id, branch, from_tag, cseq, credentials or proxy_credentials, slots)


@dataclass(slots=True)
class Template:
    """What the SBC answered to one refresh of a registration over a flow."""

    shape: Shape
    slots_in: tuple[str, ...]  # what is cut out of the requests between its pieces (Cut.slots)
    reg: CachedRegistration
    granted: int  # the expiry the answer gives the client (its Contact's expires)
    answer: tuple[bytes, ...]  # the 200 around its variable parts, in order
    slots: tuple[str, ...]  # what goes between them: "branch", "from_tag", "cseq", "date"
    dest: Flow  # where the answers go (RFC 3261 18.2.2 for this flow and Via)
    branch: bytes  # of the last request answered
    cseq: int
    last: bytes  # the last answer sent (a retransmission gets it again)
    answered_at: float  # when (a retransmission is one only within 64*T1 of it)

    def repeated_by(self, cut: Cut) -> bool:
        """Whether ``cut`` is the last request answered again (same branch and CSeq)."""
        return cut.branch == self.branch and cut.cseq == self.cseq


class RefreshTemplates:
    """The templates of the registrations whose refreshes the SBC answers itself, by client
    flow and Call-ID. RFC 3261 10.2 has a UA use one Call-ID for all its registrations with
    a registrar, so a PBX registering many users over one flow has many templates under one
    key (at most ``PER_KEY``, the oldest go first)."""

    PER_KEY: ClassVar[int] = 64

    def __init__(self) -> None:
        self._by_key: dict[tuple[Flow, bytes], list[Template]] = {}

    def __len__(self) -> int:
        return sum(len(templates) for templates in self._by_key.values())

    def __bool__(self) -> bool:
        """Whether any template is kept: asked for every datagram, so not by counting
        (a key's list is never empty)."""
        return bool(self._by_key)

    def learn(
        self,
        data: bytes,
        flow: Flow,
        reg: CachedRegistration,
        answer: bytes,
        dest: Flow,
        now: float,
    ) -> bool:
        """Keep ``data``, a REGISTER the SBC answered itself with ``answer`` (sent to
        ``dest``), as the template of the next refreshes of ``reg``."""
        cut = cut_request(data)
        parts = _cut_answer(answer)
        if cut is None or parts is None or cut.call_id != _key_of(reg):
            return False  # (a Call-ID written with odd spacing is not worth a template)
        pieces, slots = parts
        template = Template(
            shape=cut.shape, slots_in=cut.slots, reg=reg, granted=reg.client_expires,
            answer=pieces, slots=slots, dest=dest, branch=cut.branch, cseq=cut.cseq,
            last=answer, answered_at=now,
        )  # fmt: skip
        templates = self._by_key.setdefault((flow, cut.call_id), [])
        templates[:] = [t for t in templates if t.reg.aor != reg.aor and t.shape != cut.shape]
        templates.append(template)
        del templates[: -self.PER_KEY]
        return True

    def match(self, data: bytes, flow: Flow) -> tuple[Template, Cut] | None:
        """The template ``data`` is a refresh of, if any (the caller checks the rest)."""
        # The Call-ID first: most REGISTERs (new registrations, their credentials, another
        # flow) have no template under their flow and Call-ID, and are not cut further.
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return None
        call_id = _CALL_ID.search(data, 0, end + 2)
        if call_id is None:
            return None
        key = call_id.group(1).rstrip(b" \t")
        templates = self._by_key.get((flow, key))
        if templates is None:
            return None
        for template in templates:
            cut = _fit(template.shape, template.slots_in, data, key)
            if cut is not None:
                return template, cut
        return None

    def answer(self, template: Template, cut: Cut, date: bytes, now: float) -> bytes:
        """The 200 for ``cut``, from its template; remembered for a retransmission."""
        values = {
            "branch": cut.branch, "from_tag": cut.from_tag, "cseq": str(cut.cseq).encode(),
            "date": date,
        }  # fmt: skip
        out = [template.answer[0]]
        for slot, piece in zip(template.slots, template.answer[1:], strict=True):
            out.append(values[slot])
            out.append(piece)
        answer = b"".join(out)
        template.branch, template.cseq, template.last = cut.branch, cut.cseq, answer
        template.answered_at = now
        return answer

    def drop(self, flow: Flow, call_id: str, aor: str) -> None:
        """The registration of ``aor`` over ``flow`` with ``call_id`` is gone or was replaced
        (expired, de-registered, answered anew by its backend): its template goes."""
        key = (flow, call_id.encode("utf-8", "surrogateescape"))
        templates = self._by_key.get(key)
        if templates is None:
            return
        templates[:] = [t for t in templates if t.reg.aor != aor]
        if not templates:
            del self._by_key[key]

    def drop_flow(self, flow: Flow) -> None:
        """The client behind ``flow`` is gone (rare: a scan of every key)."""
        for key in [key for key in self._by_key if key[0] == flow]:
            del self._by_key[key]

    def clear(self) -> None:
        self._by_key.clear()


def _key_of(reg: CachedRegistration) -> bytes:
    return reg.call_id.encode("utf-8", "surrogateescape")


def _cut_answer(answer: bytes) -> tuple[tuple[bytes, ...], tuple[str, ...]] | None:
    """The SBC's 200 cut around its branch, From tag, CSeq number and Date value."""
    end = answer.find(b"\r\n\r\n")
    if end < 0:
        return None
    found = [
        ("branch", _BRANCH.search(answer, 0, end)),
        ("from_tag", _FROM_TAG.search(answer, 0, end)),
        ("cseq", _CSEQ.search(answer, 0, end + 2)),
        ("date", _DATE.search(answer, 0, end)),
    ]
    spans = sorted((m.span(1), slot) for slot, m in found if m is not None)
    if len(spans) != len(found):
        return None
    pieces: list[bytes] = []
    pos = 0
    for (start, stop), _ in spans:
        if start < pos:
            return None
        pieces.append(answer[pos:start])
        pos = stop
    pieces.append(answer[pos:])
    return tuple(pieces), tuple(slot for _, slot in spans)
