"""An established call as plain values, and the call made again from them: what a restarted
SBC needs to go on with a call whose signalling and media were in the process that died
(sbc/state.py keeps the values in the state store).

Kept: the call's id, sides, flows and target; both legs' dialogs (RFC 3261 12: Call-ID, tags,
URIs, CSeqs, remote target, route set) and the SBC's Contact on each; the header fields of
the two INVITEs an established call still reads (its record); when it was started and
answered (wall-clock seconds); its media session (``MediaController.export``). Not kept:
transactions in progress (a re-INVITE being answered when the SBC died is lost; the parties
retransmit or time out as with any lost hop), the session timer (RFC 4028: the parties'
own refreshes go on), a fork's early dialogs.

A restored leg's local CSeq is moved on by ``CSEQ_MARGIN``: the SBC may have sent requests
after the values were written, and the CSeq of its next request must be above them (RFC 3261
12.2.1.1 asks for higher, not for the next number).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sbc.calls.model import Call, Leg, Target
from sbc.features.balancer import BackendState
from sbc.registration.shared import decode_flow, encode_flow
from sbc.sides import Side
from sbc.sip.dialog import Dialog
from sbc.sip.message import Request

CSEQ_MARGIN = 100
# What an established call reads of its INVITEs (as b2bua._KEPT_FIELDS).
_FIELDS = ("Call-ID", "From", "To", "CSeq")


def call_value(call: Call, media: dict[str, Any] | None, wall_offset: float) -> dict[str, Any]:
    """The values of an established INVITE call (``call.confirmed`` set)."""
    assert call.confirmed is not None
    target = call.target
    backend = target.backend.name if target.backend is not None else None
    return {
        "id": call.id,
        "a_flow": encode_flow(call.a_flow),
        "a_side": str(call.a_side),
        "target": {"flow": encode_flow(target.flow), "uri": target.uri, "side": str(target.side),
                   "backend": backend},
        "started": call.started + wall_offset,
        "answered": (call.answered if call.answered is not None else call.started) + wall_offset,
        "a_tag": call.a_tag,
        "a_request": _request_value(call.a_request),
        "b_request": None if call.b_request is None else _request_value(call.b_request),
        "legs": [_leg_value(leg) for leg in call.confirmed],
        "media": media,
    }  # fmt: skip


def _request_value(req: Request) -> list[Any]:
    return [req.method, req.uri_text, [[n, v] for n in _FIELDS if (v := req.get(n)) is not None]]


def _leg_value(leg: Leg) -> dict[str, Any]:
    d = leg.dialog
    return {
        "side": str(leg.side), "flow": encode_flow(leg.flow), "contact": leg.contact,
        "caller": leg.caller, "invite_cseq": leg.invite_cseq,
        "dialog": [d.call_id, d.local_tag, d.remote_tag, d.local_uri, d.remote_uri, d.local_seq,
                   d.remote_seq, d.remote_target, list(d.route_set)],
    }  # fmt: skip


def restore_call(
    value: dict[str, Any], wall_offset: float, backends: Sequence[BackendState]
) -> Call:
    """The call of ``call_value``'s values, established, its legs joined; times on the
    clock of ``wall_offset``. ValueError (or KeyError, TypeError) if they are not such."""
    t = value["target"]
    backend = next((b for b in backends if b.name == t["backend"]), None)
    target = Target(decode_flow(t["flow"]), _text(t["uri"]), Side(t["side"]), backend)
    call = Call(
        call_id=_text(value["id"]), method="INVITE", a_flow=decode_flow(value["a_flow"]),
        a_side=Side(value["a_side"]), a_tx=None, a_request=_request(value["a_request"]),
        target=target, now=float(value["started"]) - wall_offset,
    )  # fmt: skip
    call.answered = float(value["answered"]) - wall_offset
    call.a_tag = _text(value["a_tag"])
    b_request = value["b_request"]
    call.b_request = None if b_request is None else _request(b_request)
    a_leg, b_leg = (_leg(call, v) for v in value["legs"])
    a_leg.peer, b_leg.peer = b_leg, a_leg
    call.legs = [a_leg, b_leg]
    call.confirmed = (a_leg, b_leg)
    call.state = "confirmed"
    call.provisional = True
    call.status = 200
    return call


def _leg(call: Call, value: dict[str, Any]) -> Leg:
    (call_id, local_tag, remote_tag, local_uri, remote_uri, local_seq, remote_seq, remote_target,
     route_set) = value["dialog"]  # fmt: skip
    dialog = Dialog(
        call_id=_text(call_id), local_tag=_text(local_tag), remote_tag=_text(remote_tag),
        local_uri=_text(local_uri), remote_uri=_text(remote_uri),
        local_seq=int(local_seq) + CSEQ_MARGIN,
        remote_seq=None if remote_seq is None else int(remote_seq),
        remote_target=_text(remote_target), route_set=[_text(r) for r in route_set],
    )  # fmt: skip
    leg = Leg(call, Side(value["side"]), decode_flow(value["flow"]), dialog,
              _text(value["contact"]), bool(value["caller"]))  # fmt: skip
    leg.invite_cseq = int(value["invite_cseq"])
    return leg


def _request(value: list[Any]) -> Request:
    method, uri, fields = value
    req = Request(_text(method), _text(uri))
    for name, field in fields:
        req.add(_text(name), _text(field))
    return req


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("not a str")
    return value
