# mypy: disable-error-code="misc"
# (a part of B2bua, one class of its single-inheritance chain: its methods take
# ``self: B2bua``, a subclass, which mypy reports as "misc")
"""A call's timers: no answer, maximum duration, session timer (RFC 4028), subscription
expiry, the 2xx retransmission until the ACK (RFC 3261 13.3.1.4), failover to the next
backend, and the guard that ends what is still pending 64*T1 after a call ended. All in one
``Deadlines`` keyed by (call, name)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from sbc.calls.model import (
    _RETRY,
    Call,
    Leg,
    Target,
    _Initial,
    _Mapped,
    _Retransmit,
)
from sbc.calls.records import Records
from sbc.features.registrar import aor_of
from sbc.sides import CORE
from sbc.sip.message import Response
from sbc.sip.transaction import (
    Output,
    ServerTransaction,
    TransactionState,
)

log = logging.getLogger("sbc.calls")

if TYPE_CHECKING:
    from sbc.calls.b2bua import B2bua


class CallTimers(Records):
    """B2bua's timers (a part of the B2bua: ``self`` is the B2bua)."""

    def _set_timer(self: B2bua, call: Call, name: str, deadline: float) -> None:
        call.timers.add(name)
        self._deadlines.set((call, name), deadline)

    def _cancel_timer(self: B2bua, call: Call, name: str) -> None:
        call.timers.discard(name)
        self._deadlines.cancel((call, name))

    def _stop_timers(self: B2bua, call: Call) -> None:
        for leg in call.legs:
            leg.retransmit = None
        for name in call.timers:
            self._deadlines.cancel((call, name))
        call.timers.clear()

    def next_deadline(self: B2bua) -> float | None:
        return self._deadlines.next_deadline()

    def handle_timer(self: B2bua, now: float) -> list[Output]:
        out: list[Output] = []
        while (due := self._deadlines.pop_due(now)) is not None:
            call, name = due
            call.timers.discard(name)
            out += self._on_timer(call, name, now)
        return out

    def _on_timer(self: B2bua, call: Call, name: str, now: float) -> list[Output]:
        if name == "no_answer":
            self.stats["calls_no_answer"] += 1
            return self._abandon(call, 408, "No Answer", now)
        if name == "failover":
            return self._failover(call, now)
        if name == "guard":
            return self._end_pending(call, now)
        if name == "record":
            if self._awaiting_stats.pop(call.id, None) is not None:
                self.records.append(self._record(call))
            return []
        if name == "max_duration":
            self.stats["calls_max_duration"] += 1
            return self._end_call(call, "maximum call duration", now)
        if name == "session":
            # RFC 4028 10: no refresh within the session interval; the session is over.
            self.stats["calls_session_expired"] += 1
            return self._end_call(call, "session timer expired", now, code=408)
        if name == "expires":
            return self._end_call(call, "subscription expired", now) if call.confirmed else []
        if name.startswith("2xx:") and call.confirmed is not None:
            leg = call.confirmed[int(name[4:])]
            rt = leg.retransmit
            if rt is None:
                return []
            if now >= rt.give_up:
                # RFC 3261 13.3.1.4: no ACK within 64*T1: the dialog ends with BYE.
                leg.retransmit = None
                self.stats["ack_timeout"] += 1
                return self._end_call(call, "no ACK", now, code=408)
            rt.interval = min(2 * rt.interval, self.timers.t2)
            self._set_timer(call, name, min(now + rt.interval, rt.give_up))
            return rt.tx.respond(rt.response, now)
        return []

    def _end_pending(self: B2bua, call: Call, now: float) -> list[Output]:
        out: list[Output] = []
        pending = [call.b_tx, *(leg.invite_out for leg in call.legs)]
        for tx in pending:
            if tx is None or tx.state not in (
                TransactionState.CALLING,
                TransactionState.PROCEEDING,
            ):
                continue
            work = self._work.pop(tx, None)
            if isinstance(work, _Mapped) and not work.final:
                out += self._respond(work.tx, 487, None, (), now)
            out += self.transactions.terminate(tx)
            self.stats["invite_abandoned"] += 1
        self._dismantle(call)
        return out

    @staticmethod
    def _dismantle(call: Call) -> None:
        """64*T1 after its end nothing can need the call's legs any more: break its
        reference cycles (call -> legs -> call, leg <-> peer) so reference counting frees it
        at once. Left to the cyclic collector, ended calls piled up between its full
        collections, whose pauses then grew to a second under load and dropped packets."""
        for leg in (*call.legs, *call.forks.values()):
            leg.peer = None
            leg.retransmit = None
        call.legs = []
        call.forks = {}
        call.confirmed = None

    def _failover(self: B2bua, call: Call, now: float) -> list[Output]:
        """The backend sent nothing at all within request_timeout: it counts a failure and
        the request goes to the next backend of the caller's AOR order (a transaction
        timeout is a failure: the caller does not wait for timer B on a dead backend)."""
        backend, b_tx, b_request = call.target.backend, call.b_tx, call.b_request
        if backend is None or b_tx is None or b_request is None or call.state == "ended":
            return []
        self._work.pop(b_tx, None)
        out = self.transactions.terminate(b_tx)
        out += self.backends.report_failure(backend, f"{call.method} unanswered", now)
        frm = call.a_request.from_
        aor = (aor_of(frm) if frm is not None else None) or call.a_request.uri_text
        nxt = self.backends.balancer.pick_for_aor(aor, exclude=call.tried)
        flow = self.backends.flow_to(nxt) if nxt is not None else None
        if nxt is None or flow is None:
            if call.a_tx is not None:
                out += self._respond(call.a_tx, 503, "No Backend Available", _RETRY, now)
            self._finish(call, "no backend answered", now)
            return out
        fwd = b_request.copy()
        fwd.pop_first_value("via")
        self._add_via(fwd, flow)
        if "contact" in fwd:
            fwd.set("Contact", self._contact(call, flow))
        if call.counted_backend is not None:
            self.backends.balancer.dialog_ended(call.counted_backend)
            self.backends.balancer.dialog_started(nxt)
            call.counted_backend = nxt
        call.target = Target(flow, call.target.uri, CORE, nxt)
        call.tried = (*call.tried, nxt.name)
        tx, sent = self.transactions.send_request(fwd, dest=flow, reliable=flow.reliable, now=now)
        call.b_request, call.b_tx = fwd, tx
        self._work[tx] = _Initial(call)
        self._set_timer(call, "failover", now + self.backends.request_timeout)
        self.stats["failover"] += 1
        log.info(
            "%s failed over", call.method,
            extra={"call": call.id, "call_id": call.a_request.call_id, "backend": nxt.name},
        )  # fmt: skip
        return out + sent

    def _rt_name(self: B2bua, leg: Leg) -> str:
        confirmed = leg.call.confirmed
        return "2xx:0" if confirmed is None or confirmed[0] is leg else "2xx:1"

    def _start_retransmit(
        self: B2bua, call: Call, leg: Leg, tx: ServerTransaction, resp: Response, now: float
    ) -> None:
        cseq = tx.request.cseq
        t1 = self.timers.t1
        leg.retransmit = _Retransmit(
            tx, resp, cseq.seq if cseq is not None else 0, t1, now + self.timers.timer_h
        )
        # Over a reliable transport the 2xx is not re-sent, but the ACK is still awaited.
        first = now + (t1 if not tx.reliable else self.timers.timer_h)
        self._set_timer(call, self._rt_name(leg), first)

    def _session_timer(self: B2bua, call: Call, resp: Response, now: float) -> None:
        """RFC 4028: the SBC stays in the path of refreshes; with no refresh by the end of the
        interval it ends the call (RFC 4028 10: "the session is considered terminated")."""
        value = resp.get("session-expires")
        if value is None:
            return
        text = value.split(";", 1)[0].strip()
        if not text.isdigit():
            return
        interval = float(text)
        if interval < 90:
            return  # RFC 4028 4: below the minimum, ignored
        # RFC 4028 10: the refresher sends by half the interval; end after the whole one
        # minus a margin of min(32, interval / 3) like the UA that is not the refresher.
        self._set_timer(call, "session", now + interval - min(32.0, interval / 3))

    def _subscription_expiry(self: B2bua, call: Call, resp: Response, now: float) -> None:
        value = resp.get("expires")
        seconds = int(value) if value is not None and value.isdigit() else 3600
        self._set_timer(call, "expires", now + seconds + 32)

    def media_lost(self: B2bua, call_id: str, now: float) -> list[Output]:
        """The media relay node of the call is gone (down for [media] timeout): BYE both
        legs."""
        call = self.calls.get(call_id)
        if call is None or call.state == "ended":
            return []
        self.stats["calls_media_lost"] += 1
        return self._end_call(call, "media relay lost", now, code=503)

    def media_timeout(self: B2bua, call_id: str, now: float) -> list[Output]:
        """The relay saw no media for [media] timeout seconds: BYE both legs."""
        call = self.calls.get(call_id)
        if call is None or call.state == "ended":
            return []
        self.stats["calls_media_timeout"] += 1
        return self._end_call(call, "media timeout", now, code=408)
