"""Sanity filter for requests: the checks of RFC 3261 8.2 and 16.3 before anything else.

A request that fails gets a ``Rejection``: the status, a reason phrase naming the fault
(RFC 4475 expects 400 for most faults, 505 for a bad version, 416 for an unknown URI scheme,
420 for unknown extensions, 501 for unknown methods), extra headers for the response, and a
short ``label`` under which the rejection is counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from sbc.sip.headers import media_type
from sbc.sip.message import ParseError, Request, Response
from sbc.sip.uri import SipUri, TelUri

# RFC 3261 27.4 and the extensions' RFCs: methods the SBC knows.
KNOWN_METHODS = frozenset(
    {
        "INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "REGISTER", "PRACK", "SUBSCRIBE",
        "NOTIFY", "PUBLISH", "INFO", "REFER", "MESSAGE", "UPDATE",
    }
)  # fmt: skip
ALLOW = "INVITE, ACK, BYE, CANCEL, OPTIONS, REGISTER, PRACK, SUBSCRIBE, NOTIFY, PUBLISH, INFO, REFER, MESSAGE, UPDATE"  # noqa: E501
# Bodies the SBC itself must understand for session requests (it anchors media).
SESSION_BODY_TYPES = frozenset({"application/sdp", "multipart/mixed", "multipart/alternative"})
ACCEPT = "application/sdp, multipart/mixed"
_MANDATORY = (
    ("to", "To"), ("from", "From"), ("cseq", "CSeq"), ("call-id", "Call-ID"), ("via", "Via"),
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Rejection:
    status: int
    reason: str
    label: str
    headers: tuple[tuple[str, str], ...] = ()


def check_request(req: Request, *, supported: frozenset[str] = frozenset()) -> Rejection | None:
    """Return why ``req`` must be rejected, or None if it may be processed."""
    # RFC 3261 8.2 / 16.3 step 1; RFC 4475 3.1.2.16: an unknown version gets 505.
    if req.version != "SIP/2.0":
        return Rejection(505, "Version Not Supported", "bad_version")
    # RFC 3261 8.1.1: To, From, CSeq, Call-ID, Max-Forwards and Via are mandatory;
    # Max-Forwards may be absent in RFC 2543 requests (RFC 4475 3.4.1).
    missing = req.first_missing(_MANDATORY)
    if missing is not None:
        return Rejection(400, f"Missing {missing} Header", "missing_header")
    try:
        uri = req.uri
        top = req.check_vias()
        cseq = req.cseq
        req.call_id  # noqa: B018 - parse and validate
        to = req.to
        req.from_  # noqa: B018
        req.max_forwards  # noqa: B018
        if req.method in ("INVITE", "REGISTER", "SUBSCRIBE", "REFER", "UPDATE"):
            req.contact  # noqa: B018
        req.name_addrs("route")  # RFC 3261 16.4: the SBC reads it to find its own entry
    except ParseError as exc:
        return Rejection(400, exc.reason, fault_label(exc.reason))
    assert cseq is not None and to is not None
    # RFC 3261 8.2.2.1 / 16.3 step 2: a scheme the SBC does not understand gets 416.
    if not isinstance(uri, (SipUri, TelUri)):
        return Rejection(416, "Unsupported URI Scheme", "bad_uri_scheme")
    # RFC 3261 19.1.1 (table 1): headers are not allowed in a Request-URI (RFC 4475 3.1.2.11).
    if isinstance(uri, SipUri) and uri.headers is not None:
        return Rejection(400, "Headers In Request-URI", "bad_uri")
    # RFC 4475 3.2.1: a branch of only the magic cookie is no transaction identifier.
    assert top is not None  # a Via field is present (checked above): its first element
    branch = top.branch
    if branch == "z9hG4bK":
        return Rejection(400, "Via Branch Is Only The Magic Cookie", "bad_via")
    # A Via without a branch parameter is accepted on purpose: RFC 3261 8.1.1.7 makes the
    # branch a MUST only for RFC 3261 clients, 17.2.3 keeps the RFC 2543 matching rules for
    # requests without one, and RFC 4475 3.4.1 (inv2543) must be accepted. A branch
    # parameter without a value breaks the grammar (RFC 3261 25.1: via-branch = "branch"
    # EQUAL token), and that is a "Via without branch", answered 400.
    if not branch and (branch == "" or any(k.lower() == "branch" for k, _ in top.params)):
        return Rejection(400, "Via Branch Is Empty", "bad_via")
    if cseq.method != req.method:
        # RFC 4475 3.1.2.18: an unknown method is reported as such (501) before the mismatch.
        if req.method not in KNOWN_METHODS:
            return Rejection(501, "Not Implemented", "unknown_method", (("Allow", ALLOW),))
        return Rejection(400, "CSeq Method Does Not Match", "cseq_mismatch")
    if req.method in ("ACK", "CANCEL"):
        return None
    # RFC 3261 8.2.2.3 / 16.3 step 6: Require and Proxy-Require options the SBC lacks -> 420.
    unsupported = [
        opt
        for name in ("require", "proxy-require")
        for opt in req.values(name)
        if opt and opt.lower() not in supported
    ]
    if unsupported:
        return Rejection(
            420, "Bad Extension", "bad_extension", (("Unsupported", ", ".join(unsupported)),)
        )
    if req.method == "REGISTER" and not isinstance(to.uri, SipUri):
        # RFC 3261 10.3 / RFC 4475 3.3.4: the To of a REGISTER is the AOR, a SIP URI.
        return Rejection(400, "To Is Not A SIP Address-of-Record", "bad_aor")
    if req.method in ("INVITE", "UPDATE", "PRACK") and req.body:
        # RFC 3261 8.2.3: a body the SBC cannot process -> 415 with Accept.
        ctype = media_type(req.content_type or "")
        if ctype not in SESSION_BODY_TYPES:
            return Rejection(415, "Unsupported Media Type", "bad_body", (("Accept", ACCEPT),))
    if req.method == "INVITE" and "accept" in req:
        # RFC 3261 21.4.7 / RFC 4475 3.3.15: the answer would be SDP, which Accept excludes.
        accepted = {media_type(a) for a in req.values("accept") if a}
        if accepted and not accepted & {"application/sdp", "application/*", "*/*"}:
            return Rejection(406, "Not Acceptable", "not_acceptable", (("Accept", ACCEPT),))
    return None


def check_response(resp: Response) -> str | None:
    """Why ``resp`` must be discarded (a reason phrase naming the fault), or None.

    RFC 3261 18.1.2 / 16.7 and RFC 4475 3.1.2.5, 3.1.2.19: a malformed response is dropped,
    never answered or relayed. A response must carry Via, From, To, Call-ID and CSeq
    (RFC 3261 8.2.6.2 copies them from the request), each single header once (7.3.1).
    """
    # RFC 3261 7.1: SIP/2.0 is the only version this element speaks.
    if resp.version != "SIP/2.0":
        return "Bad Version"
    missing = resp.first_missing(_MANDATORY)
    if missing is not None:
        return f"Missing {missing} Header"
    try:
        resp.check_vias()  # every via-parm parses (the SBC pops the top one)
        cseq = resp.cseq
        resp.call_id  # noqa: B018
        resp.from_  # noqa: B018
        resp.to  # noqa: B018
        if cseq is not None and cseq.method in _DIALOG_METHODS and 100 < resp.status < 300:
            # RFC 3261 12.1.1 / 12.1.2: the Contact of a dialog-creating response is the
            # remote target, "a SIP or SIPS URI"; the route set comes from Record-Route.
            resp.name_addrs("record-route")
            if any(c.sip_uri is None for c in resp.contact):
                return "Bad Contact: not a SIP URI"
    except ParseError as exc:
        return exc.reason
    return None


# RFC 3261 12.1, RFC 6665 4.1.2.2: requests whose 1xx/2xx responses create dialogs.
_DIALOG_METHODS = frozenset({"INVITE", "SUBSCRIBE"})


def fault_label(reason: str) -> str:
    """Counter label for a fault reason phrase: 'Bad Via: ...' -> 'bad_via'."""
    head = reason.split(":", 1)[0].strip().lower()
    return head.replace(" ", "_").replace("-", "_")
