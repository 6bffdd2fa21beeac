# mypy: disable-error-code="misc"
# (a part of B2bua, one class of its single-inheritance chain: its methods take
# ``self: B2bua``, a subclass, which mypy reports as "misc")
"""What crosses from one leg to the other: responses mapped onto the other leg's request
(RFC 3261 8.2.6.2), the end-to-end headers minus the leg's own and the topology-hiding lists,
bodies with their SDP offers and answers through the media seam (RFC 3264), Replaces and
RAck rewritten to the other leg's ids (RFC 3891, RFC 3262 7.2)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from sbc.calls.model import (
    CONTACT_METHODS,
    DIALOG_METHODS,
    Call,
    Leg,
    _is_sdp,
)
from sbc.calls.timers import CallTimers
from sbc.media.session import MediaRefused
from sbc.sides import Side
from sbc.sip.flow import Flow
from sbc.sip.message import Request, Response, make_response

log = logging.getLogger("sbc.calls")

if TYPE_CHECKING:
    from sbc.calls.b2bua import B2bua


class Mapping(CallTimers):
    """B2bua's mapping (a part of the B2bua: ``self`` is the B2bua)."""

    def _map_replaces(self: B2bua, value: str, target: Flow) -> str:
        """RFC 3891 (attended transfer): Replaces names a dialog by the ids of the leg the
        INVITE came from; the far UA knows it by the other leg's ids. Both tag orders are
        tried; when two legs match (a call that left and re-entered the SBC through a
        proxy), the one whose other leg faces ``target`` wins. Unknown dialogs pass as
        they are (the far end answers 481)."""
        call_id, _, rest = value.partition(";")
        params = [p.strip() for p in rest.split(";") if p.strip()]
        tags = {k.lower(): v for k, _, v in (p.partition("=") for p in params)}
        to_tag, from_tag = tags.get("to-tag"), tags.get("from-tag")
        if not to_tag or not from_tag:
            return value
        found: list[tuple[Leg, bool]] = []
        for local, remote, swapped in ((to_tag, from_tag, False), (from_tag, to_tag, True)):
            leg = self._dialogs.get((call_id.strip(), local, remote))
            if leg is not None and leg.peer is not None:
                found.append((leg, swapped))
        if not found:
            return value
        leg, swapped = next(
            ((g, s) for g, s in found if g.peer and g.peer.flow == target), found[0]
        )
        assert leg.peer is not None
        other = leg.peer.dialog
        # to-tag is the local tag of the UA that gets the INVITE (RFC 3891 3): on leg L the SBC
        # stands in for that UA, so a to-tag equal to L's local tag becomes the far UA's own
        # tag on the other leg, which is that leg's remote tag.
        new_to, new_from = (other.local_tag, other.remote_tag) if swapped else (
            other.remote_tag, other.local_tag)  # fmt: skip
        extra = "".join(f";{p}" for p in params if p.partition("=")[0].lower() not in
                        ("to-tag", "from-tag"))  # fmt: skip
        self.stats["replaces_mapped"] += 1
        return f"{other.call_id};to-tag={new_to};from-tag={new_from}{extra}"

    def _copy_headers(
        self: B2bua, src: Request | Response, dst: Request | Response, to_side: Side
    ) -> None:
        """Unknown and end-to-end headers pass, minus the leg's own and the
        configured strip list."""
        src.copy_fields_to(dst, skip=self._skip[to_side], skip_prefixes=self._skip_prefixes)

    def _copy_body(
        self: B2bua, call: Call, src: Request, dst: Request, toward_caller: bool
    ) -> None:
        """The body of a request; an SDP offer or answer goes through the media relay
        (RFC 3264 and RFC 3262 5 / RFC 3311 for where offers and answers may be).
        Raises MediaRefused for an offer that cannot be met."""
        body = src.body
        if body and (call.method != "INVITE" or call.state == "ended"):
            body = b"" if _is_sdp(src.content_type) else body  # no session to anchor it in
        elif body:
            method = src.method
            sides = (call.a_side, call.target.side)
            ctype = src.content_type
            if method in ("INVITE", "UPDATE") or (method == "PRACK" and call.a_request.body):
                body = self.media.offer(
                    call.id, sides, toward_caller, body, ctype, _browser(call, toward_caller)
                )
            elif method in ("ACK", "PRACK"):
                body = self.media.answer(call.id, sides, toward_caller, body, ctype)
            elif _is_sdp(ctype):
                body = b""  # SDP outside offer/answer would name the far side's addresses
        dst.set_body(body)

    def _map_response(
        self: B2bua,
        resp: Response,
        request: Request,
        to_side: Side,
        to_tag: str,
        call: Call,
        contact: str | None,
        *,
        toward_caller: bool = True,
    ) -> Response:
        """The other leg's response as a response to ``request`` (RFC 3261 8.2.6.2 for the
        dialog headers): same status and reason, end-to-end headers and body, our Contact
        (a 3xx keeps its Contact list: the redirect targets are for the caller)."""
        out = make_response(request, resp.status, resp.reason, to_tag=to_tag)
        if 100 < resp.status < 300 and request.method in DIALOG_METHODS:
            # RFC 3261 12.1.1: a response that creates a dialog carries the request's
            # Record-Route (the proxies before us stay in the route set).
            for rr in request.field_values("record-route"):
                out.add("Record-Route", rr)
        skip = self._skip_3xx[to_side] if 300 <= resp.status < 400 else self._skip[to_side]
        resp.copy_fields_to(out, skip=skip, skip_prefixes=self._skip_prefixes)
        if (
            contact
            and 100 < resp.status < 300
            and ("contact" in resp or request.method in CONTACT_METHODS)
        ):
            out.add("Contact", contact)
        body = resp.body
        if body:
            body = self._response_body(call, resp, request, body, toward_caller)
        out.set_body(body)
        return out

    def _media_warning(self: B2bua, call: Call, resp: Response) -> None:
        """A 488 or 606 to an offer (RFC 3261 21.4.26, 21.6.4) gets the SBC's own Warning
        saying why (the answerer's Warning names a core host and is not passed to clients):
        no codec the SBC transcodes, the cap, or no codec the answerer takes."""
        if resp.status not in (488, 606):
            return
        warning = self.media.refused_warning(call.id)
        if warning is not None:
            resp.add("Warning", warning)

    def _response_body(
        self: B2bua, call: Call, resp: Response, request: Request, body: bytes, toward_caller: bool
    ) -> bytes:
        """An SDP in a 1xx/2xx to an offer is its answer; to a request without one (an
        INVITE with no SDP), it is the offer (RFC 3264, RFC 3261 13.2.1). Elsewhere an SDP
        is not passed (it would name the far side)."""
        ctype = resp.content_type
        if not _is_sdp(ctype):
            return body
        if not (100 < resp.status < 300 and request.method in ("INVITE", "UPDATE", "PRACK")):
            return b""
        if call.method != "INVITE" or call.state == "ended":
            return b""
        sides = (call.a_side, call.target.side)
        if request.body:
            return self.media.answer(call.id, sides, toward_caller, body, ctype)
        try:
            return self.media.offer(
                call.id, sides, toward_caller, body, ctype, _browser(call, toward_caller)
            )
        except MediaRefused as exc:
            # An offer in a response cannot be refused with a status; it is not passed.
            log.warning(
                "media offer in a response refused: %s", exc,
                extra={"call": call.id, "call_id": call.a_request.call_id},
            )  # fmt: skip
            return b""


def _browser(call: Call, toward_caller: bool) -> bool:
    """The party an offer goes to is reached over a WebSocket (RFC 7118): a browser, which
    gets WebRTC-shaped SDP."""
    flow = call.a_flow if toward_caller else call.target.flow
    return flow.websocket
