# mypy: disable-error-code="misc"
# (a part of B2bua, one class of its single-inheritance chain: its methods take
# ``self: B2bua``, a subclass, which mypy reports as "misc")
"""Requests within a call (RFC 3261 12.2): mapped into the other leg's dialog, BYE ending
both legs at once (RFC 3261 15.1.2), the ACK for a 2xx (13.2.2.4), CANCEL (9), DTMF
interworking between SIP INFO and RFC 4733 events."""

from __future__ import annotations

import logging
import secrets
from typing import TYPE_CHECKING

from sbc.calls.model import (
    CONTACT_METHODS,
    Leg,
    _Mapped,
    _mapped_rack,
    _Own,
)
from sbc.calls.teardown import Teardown
from sbc.media import dtmf
from sbc.media.control import Dtmf
from sbc.media.session import MediaRefused
from sbc.sip.dialog import DialogKey
from sbc.sip.flow import Flow
from sbc.sip.message import ParseError, Request, make_response
from sbc.sip.transaction import (
    Output,
    Send,
    ServerTransaction,
    cancel_request,
)

log = logging.getLogger("sbc.calls")

if TYPE_CHECKING:
    from sbc.calls.b2bua import B2bua


class Dialogs(Teardown):
    """B2bua's dialogs (a part of the B2bua: ``self`` is the B2bua)."""

    @staticmethod
    def _dialog_key(req: Request) -> DialogKey | None:
        """The dialog a request within one names, as seen by us (RFC 3261 12.2.2): Call-ID,
        To tag (ours), From tag (the peer's)."""
        to, frm, call_id = req.to, req.from_, req.call_id
        if to is None or frm is None or to.tag is None or call_id is None:
            return None
        return (call_id, to.tag, frm.tag or "")

    def has_dialog(self: B2bua, req: Request) -> bool:
        key = self._dialog_key(req)
        return key is not None and key in self._dialogs

    def in_dialog(
        self: B2bua, tx: ServerTransaction, req: Request, flow: Flow, now: float
    ) -> list[Output]:
        key, cseq = self._dialog_key(req), req.cseq
        if key is None or cseq is None:
            return self._respond(tx, 400, "Missing Dialog Headers", (), now)
        leg = self._dialogs.get(key)
        if leg is None and req.method == "NOTIFY":
            leg = self._notify_fork(req, *key)
        if leg is None or leg.call.state == "ended" or leg.peer is None:
            # RFC 3261 12.2.2: no such dialog.
            return self._respond(tx, 481, None, (), now)
        call = leg.call
        method = req.method
        if not leg.dialog.accept_remote_cseq(cseq.seq):
            return self._respond(tx, 500, "CSeq Out of Order", (), now)  # RFC 3261 12.2.2
        peer = leg.peer
        if method == "BYE":
            return self._bye(tx, req, leg, now)
        if method == "INFO" and dtmf.is_dtmf(req.content_type) and call.confirmed is not None:
            # DTMF interworking: a digit from a party without telephone-event, for one with it,
            # goes on as RFC 4733 events; the INFO ends here (RFC 6086 4.2.2: 200).
            digit = dtmf.parse(req.content_type, req.body)
            if digit is not None and self.media.dtmf_info(call.id, leg.caller, *digit):
                self.stats["dtmf_info_to_rtp"] += 1
                return self._respond(tx, 200, None, (), now)
        if method == "INVITE":
            if leg.invite_out is not None or peer.invite_in is not None:
                return self._respond(tx, 491, None, (), now)  # RFC 3261 14.2: glare
            if leg.invite_in is not None or leg.retransmit is not None:
                retry = (("Retry-After", str(secrets.randbelow(10) + 1)),)
                return self._respond(tx, 500, "Previous INVITE Pending", retry, now)  # 14.2
            leg.dialog.refresh_target(req)
            self.changed(call)
        if method == "UPDATE":
            if leg.update_out is not None or peer.update_out is not None:
                return self._respond(tx, 491, None, (), now)  # RFC 3311 5.2: glare
            leg.dialog.refresh_target(req)
            self.changed(call)
        fwd, dest = self._within(peer, method)
        mf = req.max_forwards
        fwd.add("Max-Forwards", str(70 if mf is None else mf - 1))
        if method in CONTACT_METHODS:
            fwd.add("Contact", peer.contact)
        if method == "PRACK":
            rack = _mapped_rack(req.get("rack"), peer.invite_cseq)
            if rack is None:
                return self._respond(tx, 400, "Bad RAck", (), now)
            fwd.add("RAck", rack)  # RFC 3262 7.2, the CSeq number of this leg's INVITE
        self._copy_headers(req, fwd, peer.side)
        try:
            self._copy_body(call, req, fwd, peer.caller)
        except MediaRefused as exc:
            return self._respond(tx, 488, str(exc), (), now)  # the call goes on as it was
        seq = fwd.cseq.seq if fwd.cseq is not None else 0
        ctx, out = self.transactions.send_request(fwd, dest=dest, reliable=dest.reliable, now=now)
        self._work[ctx] = _Mapped(tx, leg, peer, method, seq)
        if method == "INVITE":
            leg.invite_in = tx
            leg.invite_cseq = cseq.seq
            peer.invite_out = ctx
            peer.invite_cseq = seq
            self._server[tx] = leg
        elif method == "UPDATE":
            peer.update_out = ctx
        self.stats[f"in_dialog:{method}"] += 1
        return out

    def _notify_fork(
        self: B2bua, req: Request, call_id: str, local: str, remote: str
    ) -> Leg | None:
        """RFC 6665 4.1.2.4: a NOTIFY may arrive before the 2xx to its SUBSCRIBE (or REFER)
        and creates the dialog itself."""
        call = self._b_pending.get((call_id, local))
        if call is None or call.method not in ("SUBSCRIBE", "REFER") or call.b_request is None:
            return None
        fake = make_response(call.b_request, 200, to_tag=remote)
        for contact in req.field_values("contact"):
            fake.add("Contact", contact)
        for rr in req.field_values("record-route"):
            fake.add("Record-Route", rr)
        try:
            leg = self._fork(call, fake)
        except ParseError:
            return None
        leg.dialog.route_set = list(reversed(leg.dialog.route_set))  # 12.1.1 order for requests
        return leg

    def _bye(
        self: B2bua, tx: ServerTransaction, req: Request, leg: Leg, now: float
    ) -> list[Output]:
        """RFC 3261 15: BYE from either side ends the call on both legs."""
        call = leg.call
        peer = leg.peer
        assert peer is not None
        if call.confirmed is None:
            # A BYE on an early dialog (RFC 3261 15): the caller gives up, or the callee does.
            out = self._respond(tx, 200, None, (), now)
            if call.forks.get(leg.dialog.remote_tag) is not leg:  # the caller's leg
                out += self._abandon(call, 487, "Request Terminated", now)
            else:
                out += self._abandon(call, 480, "Temporarily Unavailable", now, cancel=False)
            return out
        # RFC 3261 15.1.2: the session is over once a BYE is sent, so the BYE is answered at
        # once and the other leg gets a BYE of its own; the caller is not kept waiting on a
        # far end that may be gone (and a proxy in between, with a 5 s timer of its own, does
        # not turn a slow far end into a 408).
        call.cause = "BYE from " + ("caller" if leg is call.confirmed[0] else "callee")
        out = self._respond(tx, 200, None, (), now)
        if peer.ack_pending is not None:
            out += self._send_ack(peer, peer.ack_pending, None)  # RFC 3261 15: ACK, then BYE
        fwd, dest = self._within(peer, "BYE")
        mf = req.max_forwards
        fwd.add("Max-Forwards", str(70 if mf is None else mf - 1))
        self._copy_headers(req, fwd, peer.side)
        self._copy_body(call, req, fwd, peer.caller)
        ctx, sent = self.transactions.send_request(fwd, dest=dest, reliable=dest.reliable, now=now)
        self._work[ctx] = _Own(call, "BYE")
        self.stats["in_dialog:BYE"] += 1
        self._finish(call, call.cause, now)
        return out + sent

    def receive_ack(self: B2bua, ack: Request, now: float) -> list[Output]:
        """An ACK for a 2xx (RFC 3261 13.2.2.4, 17.2.3: not part of any transaction): stop
        re-sending our 2xx on this leg and ACK the other leg's 2xx."""
        key, cseq = self._dialog_key(ack), ack.cseq
        if key is None or cseq is None:
            return []
        leg = self._dialogs.get(key)
        if leg is None or leg.peer is None:
            self.stats["stray_ack"] += 1
            return []
        rt = leg.retransmit
        if rt is None or rt.cseq != cseq.seq:
            return []  # a retransmitted ACK (absorbed), or one for an INVITE we never answered
        leg.retransmit = None
        self._cancel_timer(leg.call, self._rt_name(leg))
        peer = leg.peer
        if peer.ack_pending is None:
            return []
        self.stats["ack_relayed"] += 1
        return self._send_ack(peer, peer.ack_pending, ack)

    def _send_ack(self: B2bua, leg: Leg, cseq: int, source: Request | None) -> list[Output]:
        """The UAC core's ACK for a 2xx (RFC 3261 13.2.2.4): same CSeq number, the dialog's
        route set, a new branch; a late SDP answer in the caller's ACK is carried over."""
        ack, dest = self._within(leg, "ACK", seq=cseq)
        mf = source.max_forwards if source is not None else None
        ack.add("Max-Forwards", str(70 if mf is None else max(mf - 1, 0)))  # RFC 3261 16.6
        if source is not None:
            self._copy_headers(source, ack, leg.side)
            self._copy_body(leg.call, source, ack, leg.caller)
        else:
            ack.add("Content-Length", "0")
        leg.ack_sent = ack
        leg.ack_dest = dest
        leg.ack_pending = None
        return [Send(message=ack, dest=dest)]

    def cancel(self: B2bua, target: ServerTransaction, now: float) -> list[Output]:
        """The caller CANCELed an INVITE we forwarded: 487 to it at once (RFC 3261 9.2) and a
        CANCEL on the other leg (9.1). A 2xx that crosses it is ACKed and BYEd."""
        owner = self._server.pop(target, None)
        if isinstance(owner, Leg):
            # A re-INVITE: answered 487; the CANCEL goes to the re-INVITE we sent.
            out = self._respond(target, 487, None, (), now)
            peer = owner.peer
            ctx = peer.invite_out if peer is not None else None
            owner.invite_in = None
            if ctx is not None and peer is not None:
                # RFC 3261 9.1: the CANCEL goes where the request it cancels went.
                cancel = cancel_request(ctx.request)
                c_tx, sent = self.transactions.send_request(
                    cancel, dest=ctx.dest, reliable=ctx.reliable, now=now
                )
                self._work[c_tx] = _Own(owner.call, "CANCEL")
                out += sent
            return out
        if owner is None:
            return self._respond(target, 487, None, (), now)
        self.stats["calls_cancelled"] += 1
        return self._abandon(owner, 487, "Request Terminated", now)

    def media_dtmf(self: B2bua, event: Dtmf, now: float) -> list[Output]:
        """A digit one party sent as RFC 4733 events, the other party having none: an
        INFO with an application/dtmf-relay body in the other party's dialog
        (RFC 6086 4.1; RFC 3261 12.2.1.1: its CSeq, route set, remote target). Its 200 is
        absorbed; a failure is counted (``on_response``)."""
        call = self.calls.get(event.session)
        if call is None or call.state == "ended" or call.confirmed is None:
            return []
        leg = call.confirmed[1] if event.party == "a" else call.confirmed[0]
        info, dest = self._within(leg, "INFO")
        info.add("Max-Forwards", "70")
        info.set_body(dtmf.body(event.digit, event.duration_ms), dtmf.DTMF_RELAY)
        tx, out = self.transactions.send_request(info, dest=dest, reliable=dest.reliable, now=now)
        self._work[tx] = _Own(call, "INFO")
        self.stats["dtmf_rtp_to_info"] += 1
        return out
