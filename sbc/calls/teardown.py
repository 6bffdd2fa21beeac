# mypy: disable-error-code="misc"
# (a part of B2bua, one class of its single-inheritance chain: its methods take
# ``self: B2bua``, a subclass, which mypy reports as "misc")
"""How calls end: abandoned before an answer (487 or 408 to the caller, CANCEL to the
callee, RFC 3261 9.1), ended by the SBC with BYE on each leg (RFC 3326 Reason), every
call at a shutdown or over a lost flow, and what is forgotten when a call is over."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from sbc.calls.model import (
    Call,
    Leg,
    _Own,
)
from sbc.sip.flow import Flow
from sbc.sip.transaction import (
    Output,
    cancel_request,
)

log = logging.getLogger("sbc.calls")

if TYPE_CHECKING:
    from sbc.calls.b2bua import B2bua


class Teardown:
    """B2bua's teardown (a part of the B2bua: ``self`` is the B2bua)."""

    def _abandon(
        self: B2bua, call: Call, status: int, reason: str, now: float, *, cancel: bool = True
    ) -> list[Output]:
        """End a call that was not answered: ``status`` to the caller, CANCEL to the callee."""
        out: list[Output] = []
        call.cancelled = True
        call.status = call.status or status  # what the caller was answered (records)
        if call.a_tx is not None:
            out += self._respond(call.a_tx, status, reason, (), now)
            self._server.pop(call.a_tx, None)
            call.a_tx = None
        if cancel:
            if call.provisional:
                out += self._send_cancel(call, now)
            else:
                call.cancel_wanted = True  # RFC 3261 9.1: only after a provisional response
        self._finish(call, f"{status} {reason}", now)
        return out

    def _send_cancel(self: B2bua, call: Call, now: float) -> list[Output]:
        if call.b_request is None or call.b_tx is None or call.b_tx.state.name == "TERMINATED":
            return []
        if call.b_tx.last_response is not None and call.b_tx.last_response.status >= 200:
            return []
        cancel = cancel_request(call.b_request)
        flow = call.target.flow
        tx, out = self.transactions.send_request(cancel, dest=flow, reliable=flow.reliable, now=now)
        self._work[tx] = _Own(call, "CANCEL")
        return out

    def _end_call(
        self: B2bua, call: Call, cause: str, now: float, *, skip: Leg | None = None, code: int = 200
    ) -> list[Output]:
        """End a call from the SBC: BYE on each confirmed leg (one leg died,
        or a limit was reached), or 408/CANCEL if it was never answered."""
        if call.state == "ended":
            return []
        if call.confirmed is None:
            return self._abandon(call, 408, "Request Timeout", now)
        if call.method != "INVITE":
            # A subscription (RFC 6665) has no BYE: the SBC forgets it; the subscriber's next
            # refresh gets 481 and it subscribes again.
            self._finish(call, cause, now)
            return []
        out: list[Output] = []
        for leg in call.confirmed:
            if leg.ack_pending is not None:
                # RFC 3261 15: the 2xx is ACKed before the dialog is ended with BYE.
                out += self._send_ack(leg, leg.ack_pending, None)
            if leg is not skip:
                reason = f'SIP;cause={code};text="{cause}"'  # RFC 3326
                out += self._send_bye(call, leg, now, reason=reason)
        self._finish(call, cause, now)
        return out

    def _send_bye(self: B2bua, call: Call, leg: Leg, now: float, *, reason: str) -> list[Output]:
        bye, dest = self._within(leg, "BYE")
        bye.add("Max-Forwards", "70")
        bye.add("Reason", reason)  # RFC 3326
        bye.add("Content-Length", "0")
        tx, out = self.transactions.send_request(bye, dest=dest, reliable=dest.reliable, now=now)
        self._work[tx] = _Own(call, "BYE")
        return out

    def has_flow(self: B2bua, flow: Flow) -> bool:
        """Whether a call still uses ``flow`` (its connection must not be closed as idle)."""
        return any(call.a_flow == flow or call.target.flow == flow for call in self.calls.values())

    def end_all(self: B2bua, cause: str, now: float) -> list[Output]:
        """End every call (the drain deadline of a shutdown): BYE on each
        answered leg with Reason cause 503 (RFC 3326), unanswered ones abandoned."""
        out: list[Output] = []
        for call in list(self.calls.values()):
            out += self._end_call(call, cause, now, code=503)
        return out

    def end_calls_on_flow(self: B2bua, flow: Flow, now: float) -> list[Output]:
        """A client flow failed (keep-alives unanswered, or its connection was lost): its
        calls end, the other leg with BYE (or CANCEL if not answered yet)."""
        out: list[Output] = []
        for call in list(self.calls.values()):
            legs = [leg for leg in call.legs if leg.flow == flow]
            if legs or call.a_flow == flow or call.target.flow == flow:
                skip = legs[0] if legs else None
                out += self._end_call(call, "flow failed", now, skip=skip, code=480)
        return out

    def _finish(self: B2bua, call: Call, cause: str, now: float) -> None:
        """The call is over: forget its dialogs and timers, write its record."""
        call.state = "ended"
        call.ended = now
        call.cause = call.cause or cause
        self.changed(call)
        for leg in call.legs:
            self._unindex(leg)
            leg.retransmit = None
        self._stop_timers(call)
        # INVITE client transactions still without a final answer (a CANCEL or BYE the far
        # end ignored) are ended after 64*T1, like a proxy's timer C (RFC 3261 9.1, 16.6).
        self._set_timer(call, "guard", now + self.timers.timer_b)
        if call.a_tx is not None:
            self._server.pop(call.a_tx, None)
        if call.b_request is not None:
            frm = call.b_request.from_
            tag = frm.tag if frm is not None else None
            self._b_pending.pop((call.b_request.call_id or "", tag or ""), None)
        self.calls.pop(call.id, None)
        if call.method == "INVITE":
            src = call.source
            self.active_calls -= 1
            self._per_source[src] -= 1
            if self._per_source[src] <= 0:
                del self._per_source[src]
            if call.counted_backend is not None:
                self.backends.balancer.dialog_ended(call.counted_backend)
                call.counted_backend = None
            call.transcoded = self.media.transcoded(call.id)
            stats_follow = self.media.release(call.id)
            if self.policy.keep_records:
                if stats_follow:
                    # The relay's statistics go into the record; it is
                    # written without them if they do not come within two seconds.
                    self._awaiting_stats[call.id] = call
                    self._set_timer(call, "record", now + 2.0)
                else:
                    self.records.append(self._record(call))
            self.stats["calls_ended"] += 1
        log.info(
            "call ended: %s", call.cause,
            extra={"call": call.id, "call_id": call.a_request.call_id},
        )  # fmt: skip

    def _unindex(self: B2bua, leg: Leg) -> None:
        if self._dialogs.get(leg.dialog.key) is leg:
            del self._dialogs[leg.dialog.key]
