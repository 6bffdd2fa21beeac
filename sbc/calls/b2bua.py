"""Calls through the SBC: a back-to-back user agent (sans-I/O).

Every call is two dialogs joined by the SBC: the leg it received the request on
and the leg it sends its own request on, each with its own Call-ID, tags, CSeq space, Via,
Contact and route set (RFC 3261 12 per leg; the SBC is a UAS on one and a UAC on the
other, RFC 3261 6 "back-to-back user agent"). Requests and responses are mapped between
the legs; nothing that names the far side's topology crosses over.

- ``route`` decides where a new request goes: from a client to a backend (the balancer),
  from a backend to a registered client (the flow token in our Path, RFC 5626 5.3), or,
  without backends, to a client registered at the embedded registrar.
- ``start`` opens a call (INVITE, SUBSCRIBE, REFER) or relays a request that creates no
  dialog (MESSAGE, OPTIONS, PUBLISH, NOTIFY ...) with fresh ids.
- ``in_dialog`` / ``receive_ack`` / ``cancel`` handle what arrives within a call.
- Each fork of the core leg (a new To tag, RFC 3261 13.2.2.4) gets its own early dialog on
  the other leg; the first 2xx wins, a later 2xx from another fork is ACKed and BYEd.
- The SDP passes through ``MediaSeam`` (the media relay fills it in).

The core feeds it client-transaction events (``on_response``, ``on_timeout``, ``forget``)
and timers (``next_deadline``, ``handle_timer``); it returns transaction outputs.
"""

from __future__ import annotations

import logging
import secrets
from collections import Counter

from sbc.backends import Backends
from sbc.calls.model import (
    CORE_TOPOLOGY_HEADERS,
    DEFAULT_POLICY,
    DIALOG_METHODS,
    LEG_HEADERS,
    Call,
    CallPolicy,
    Leg,
    MediaContext,
    MediaSeam,
    PassThroughMedia,
    PeerRoute,
    Target,
    Work,
    _Initial,
    _Mapped,
    _Own,
    _subscription_terminated,
    _with_tag,
)
from sbc.calls.routing import Routing
from sbc.deadlines import Deadlines
from sbc.media.session import MediaRefused
from sbc.registration import RegistrationProxy
from sbc.sides import ACCESS, CORE, PEER
from sbc.sip.dialog import DialogKey, uac_dialog, uas_dialog
from sbc.sip.flow import Flow, format_host
from sbc.sip.message import ParseError, Request, Response
from sbc.sip.transaction import (
    ClientTransaction,
    InviteServerTransaction,
    Output,
    Respond,
    Send,
    ServerTransaction,
    Timers,
    TransactionLayer,
)

log = logging.getLogger("sbc.calls")


class B2bua(Routing):
    def __init__(
        self,
        *,
        transactions: TransactionLayer,
        backends: Backends,
        registration: RegistrationProxy,
        respond: Respond,
        policy: CallPolicy = DEFAULT_POLICY,
        peers: tuple[PeerRoute, ...] = (),
        media: MediaSeam | None = None,
        key: bytes | None = None,
        wall_offset: float = 0.0,
    ) -> None:
        self.transactions = transactions
        self.backends = backends  # flows to backends and peers, the balancer, health
        self.registration = registration  # flows to registered clients
        self._respond = respond  # answers built by the core
        self.wall_offset = wall_offset  # epoch - monotonic (call records)
        self.set_policy(policy, peers)
        self.draining = False  # SIGTERM: no new calls, the others go on
        self.media: MediaSeam = media or PassThroughMedia()
        self._key = key or secrets.token_bytes(16)
        # The start of every call's id, which is the user part of the SBC's Contact on its
        # legs: the worker's mark with several signalling workers (sbc/ownership.py).
        self.id_prefix = ""
        self.calls: dict[str, Call] = {}
        self._dialogs: dict[DialogKey, Leg] = {}
        self._b_pending: dict[tuple[str, str], Call] = {}  # (Call-ID, our From tag) of leg B
        self._server: dict[ServerTransaction, Call | Leg] = {}  # INVITEs we may see CANCELed
        self._work: dict[ClientTransaction, Work] = {}
        self._deadlines: Deadlines[tuple[Call, str]] = Deadlines()
        self._per_source: Counter[str] = Counter()
        self.active_calls = 0  # INVITE calls not ended (admission, metrics)
        self.records: list[str] = []  # one JSON line per ended call
        self._awaiting_stats: dict[str, Call] = {}  # ended calls whose media stats are due
        self.stats: Counter[str] = Counter()
        # The calls answered, changed (target refresh, media) or ended since the core last
        # took them, when calls are kept outside the process (sbc/state.py); None: not.
        self.changed_calls: set[str] | None = None

    def set_policy(self, policy: CallPolicy, peers: tuple[PeerRoute, ...]) -> None:
        """[calls] and [[peers]], at start and on a reload: calls in
        progress keep their legs; limits, stripped headers and peer routes apply to what
        comes next."""
        self.policy = policy
        self.peers = peers
        self._peer_hosts = {(p.transport, p.host.lower()) for p in peers}
        header = policy.client_address_header
        # What is not copied to the other leg, per side it goes to.
        base = LEG_HEADERS | {p for p in policy.strip_headers if not p.endswith("*")}
        if header is not None:
            base |= {header.lower()}  # only the SBC writes it; a client's copy is dropped
        hidden = base | CORE_TOPOLOGY_HEADERS
        self._skip = {CORE: frozenset(base), ACCESS: frozenset(hidden), PEER: frozenset(hidden)}
        # A 3xx keeps its Contact list: the redirect targets are for the caller.
        self._skip_3xx = {side: skip - {"contact"} for side, skip in self._skip.items()}
        self._skip_prefixes = tuple(p[:-1] for p in policy.strip_headers if p.endswith("*"))

    @property
    def timers(self) -> Timers:
        return self.transactions.timers

    def __len__(self) -> int:
        return len(self.calls)

    def state_size(self) -> dict[str, int]:
        """What the B2BUA holds, for leak checks: all zero once every call is over."""
        return {
            "calls": len(self.calls),
            "dialogs": len(self._dialogs),
            "pending": len(self._b_pending),
            "server": len(self._server),
            "work": len(self._work),
            "sources": len(self._per_source),
            "awaiting_stats": len(self._awaiting_stats),
            "timers": self._deadlines.entries,
        }

    def idle(self) -> bool:
        """No call in progress and none of their transactions unfinished (the drain's end)."""
        return not self.active_calls and not self._work

    def owns(self, tx: ClientTransaction) -> bool:
        return tx in self._work

    def owns_server(self, tx: ServerTransaction) -> bool:
        return tx in self._server

    def new_call_id(self) -> str:
        """An id for a call to be started (``start``'s ``call_id``)."""
        return self.id_prefix + secrets.token_hex(8)

    def media_of_response(self, tx: ClientTransaction, resp: Response) -> MediaContext | None:
        """What an external media engine needs of an SDP in a response to one of the
        B2BUA's requests (RFC 3264: the answer to the request's offer, or an offer if the
        request had none): None if the response is not one whose SDP is passed on."""
        work = self._work.get(tx)
        if isinstance(work, _Initial):
            call, to_side, from_caller = work.call, work.call.a_side, False
            request = call.b_request
            to_flow = call.a_flow
        elif isinstance(work, _Mapped):
            call, to_side, from_caller = work.origin.call, work.origin.side, work.dest.caller
            request = tx.request
            to_flow = work.origin.flow
        else:
            return None
        if call.method != "INVITE" or call.state == "ended" or request is None:
            return None
        if not 100 < resp.status < 300 or request.method not in ("INVITE", "UPDATE", "PRACK"):
            return None
        return MediaContext(call.id, from_caller, not request.body, to_side, to_flow.websocket)

    def media_of_request(self, req: Request) -> MediaContext | None:
        """The same for an offer in a request within a call (re-INVITE, UPDATE)."""
        key = self._dialog_key(req)
        leg = self._dialogs.get(key) if key is not None else None
        if leg is None or leg.peer is None or leg.call.state == "ended":
            return None
        return MediaContext(leg.call.id, leg.caller, True, leg.peer.side, leg.peer.flow.websocket)

    def start(
        self,
        tx: ServerTransaction,
        req: Request,
        flow: Flow,
        target: Target,
        now: float,
        sbc_call: str | None = None,
    ) -> list[Output]:
        """A new request for the B2BUA; ``sbc_call``: the id of the call it starts (one
        made by ``new_call_id`` for it; a new one by default)."""
        method = req.method
        a_side = self.side_of(flow)
        if method == "INVITE":
            refusal = self._admit(flow)
            if refusal is not None:
                self.stats["calls_refused"] += 1
                return self._respond(tx, refusal.status, refusal.reason, refusal.headers, now)
        frm, to, cseq, call_id = req.from_, req.to, req.cseq, req.call_id
        if frm is None or to is None or cseq is None or call_id is None:
            return self._respond(tx, 400, "Missing Dialog Headers", (), now)
        call = Call(
            call_id=sbc_call or self.new_call_id(), method=method, a_flow=flow,
            a_side=a_side, a_tx=tx, a_request=req, target=target, now=now,
        )  # fmt: skip
        # The other leg's ids are derived from the caller's and the target, so a request
        # sent again with credentials after a 401/407 (same Call-ID and From tag, CSeq + 1,
        # RFC 3261 22.2) reaches the backend in the same Call-ID with a higher CSeq, while
        # the branches of a forked request (same Call-ID, another contact or flow) become
        # calls with ids of their own (8.1.1.4; a UA reached twice would see a merged
        # request, 8.2.2.2). Nothing of the caller's ids crosses over (topology hiding).
        where = f"{target.uri}\x00{target.flow}"
        b_call_id = self._derive("call-id", call_id, where) + "@sbc"
        b_tag = self._derive("tag", call_id, frm.tag or "", where)[:16]
        fwd = Request(method, target.uri)
        self._add_via(fwd, target.flow)
        mf = req.max_forwards
        fwd.add("Max-Forwards", str(70 if mf is None else mf - 1))
        fwd.add("From", _with_tag(frm, b_tag))
        fwd.add("To", _with_tag(to, None))
        fwd.add("Call-ID", b_call_id)
        fwd.add("CSeq", f"{cseq.seq} {method}")
        if method in DIALOG_METHODS or "contact" in req:
            fwd.add("Contact", self._contact(call, target.flow))
        self._copy_headers(req, fwd, target.side)
        replaces = fwd.get("replaces")
        if replaces is not None:
            fwd.set("Replaces", self._map_replaces(replaces, target.flow))
        header = self.policy.client_address_header
        if header is not None and a_side == ACCESS and target.side == CORE:
            # Topology hiding: the backend sees the SBC, and the client's address only here.
            host, port = flow.remote
            fwd.add(header, f"{format_host(host)}:{port};transport={flow.transport}")
        try:
            self._copy_body(call, req, fwd, False)
        except MediaRefused as exc:
            self.media.release(call.id)
            self.stats["calls_refused_media"] += 1
            return self._respond(tx, 488, str(exc), (), now)  # RFC 3261 21.4.26
        b_tx, out = self.transactions.send_request(
            fwd, dest=target.flow, reliable=target.flow.reliable, now=now
        )
        call.b_request = fwd
        call.b_tx = b_tx
        self._work[b_tx] = _Initial(call)
        self.calls[call.id] = call
        if method in DIALOG_METHODS:
            self._b_pending[(b_call_id, b_tag)] = call
        if isinstance(tx, InviteServerTransaction):
            self._server[tx] = call
        if method == "INVITE":
            self._per_source[call.source] += 1
            self.active_calls += 1
            if target.backend is not None:
                self.backends.balancer.dialog_started(target.backend)
                call.counted_backend = target.backend
            if self.policy.no_answer_timeout > 0:
                self._set_timer(call, "no_answer", now + self.policy.no_answer_timeout)
            self.stats["calls_started"] += 1  # an INVITE call, to a backend, client or peer
        if target.backend is not None:
            # Nothing at all from the backend by then (not even 100 Trying): the next one.
            call.tried = (target.backend.name,)
            self._set_timer(call, "failover", now + self.backends.request_timeout)
        log.info(
            "%s to %s", method, target.side,
            extra={"call": call.id, "call_id": call_id, "flow": str(target.flow)},
        )  # fmt: skip
        return out

    def on_response(self, tx: ClientTransaction, resp: Response, now: float) -> list[Output]:
        work = self._work.get(tx)
        if isinstance(work, _Initial):
            return self._initial_response(work.call, resp, now)
        if isinstance(work, _Mapped):
            return self._mapped_response(work, resp, now)
        if isinstance(work, _Own) and work.method == "INFO" and resp.status >= 300:
            # Our own INFO (DTMF interworking) refused: 415/501 (the UA takes no such
            # INFO, RFC 6086 4.2.2), 481 ... counted and logged; the call goes on.
            self.stats["dtmf_info_failed"] += 1
            log.warning(
                "DTMF INFO answered %d %s", resp.status, resp.reason,
                extra={"call": work.call.id},
            )  # fmt: skip
        return []

    def _initial_response(self, call: Call, resp: Response, now: float) -> list[Output]:
        status = resp.status
        self._cancel_timer(call, "failover")  # the backend is alive
        if status == 100:
            return []  # hop by hop (RFC 3261 16.7 step 5); our own 100 went to the caller
        try:
            to = resp.to
        except ParseError:
            to = None
        tag = to.tag if to is not None else None
        leg: Leg | None = None
        out: list[Output] = []
        if tag and status < 300 and call.method in DIALOG_METHODS:
            leg = call.forks.get(tag)
            if leg is None and call.state == "ended":
                if status < 200:
                    return self._send_cancel(call, now) if call.cancel_wanted else []
                return self._kill_fork(call, tag, resp, now)
            if leg is None:
                try:
                    leg = self._fork(call, resp)
                except ParseError:
                    leg = None
            elif 200 <= status < 300:
                # RFC 3261 12.1.2 / 13.2.2.4: the 2xx sets the route set and target.
                leg.dialog.route_set = [str(r) for r in reversed(resp.name_addrs("record-route"))]
                leg.dialog.refresh_target(resp)
        if status < 200:
            call.provisional = True
            if call.cancel_wanted:
                call.cancel_wanted = False
                out += self._send_cancel(call, now)
            if call.state == "ended" or call.a_tx is None:
                return out
            a_tag = leg.peer.dialog.local_tag if leg is not None and leg.peer else call.a_tag
            mapped = self._map_response(
                resp, call.a_request, call.a_side, a_tag, call, self._contact(call, call.a_flow)
            )
            return out + call.a_tx.respond(mapped, now)
        if status < 300:
            return out + self._answered(call, leg, resp, now)
        # 300-699: the call failed (the transaction ACKed it, RFC 3261 17.1.1.3).
        call.status = status
        if call.a_tx is not None and not call.cancelled and call.state != "ended":
            mapped = self._map_response(resp, call.a_request, call.a_side, call.a_tag, call, None)
            self._media_warning(call, mapped)
            out += call.a_tx.respond(mapped, now)
        if call.state != "ended":
            self._finish(call, f"{status} {resp.reason}", now)
        return out

    def _answered(self, call: Call, leg: Leg | None, resp: Response, now: float) -> list[Output]:
        """A 2xx to the request that opened the call."""
        if call.method not in DIALOG_METHODS:
            # A request that creates no dialog: answer and forget (MESSAGE, OPTIONS ...).
            out: list[Output] = []
            if call.a_tx is not None and call.state != "ended":
                mapped = self._map_response(
                    resp,
                    call.a_request,
                    call.a_side,
                    call.a_tag,
                    call,
                    self._contact(call, call.a_flow),
                )
                out = call.a_tx.respond(mapped, now)
                call.status = resp.status
                self._finish(call, f"{resp.status} {resp.reason}", now)
            return out
        if leg is None or leg.peer is None:
            return []  # a 2xx we cannot make a dialog of (no To tag): nothing to confirm
        if call.confirmed is not None and call.confirmed[1] is leg:
            # RFC 6026 7.2 / RFC 3261 13.2.2.4: a retransmitted 2xx is ACKed again.
            return self._resend_ack(leg, resp)
        if call.cancelled or call.state == "ended" or call.confirmed is not None:
            # Too late (CANCELed, or another fork answered first): ACK and BYE this one
            # (RFC 3261 9.1 race; 13.2.2.4 for more than one 2xx).
            return self._ack_and_bye(call, leg, resp, now)
        a_leg = leg.peer
        call.confirmed = (a_leg, leg)
        call.state = "confirmed"
        call.answered = now
        call.status = resp.status
        self._cancel_timer(call, "no_answer")
        for tag, other in list(call.forks.items()):
            if other is not leg:
                # The other early dialogs end with the 2xx (RFC 3261 13.2.2.4).
                self._unindex(other)
                if other.peer is not None:
                    self._unindex(other.peer)
                del call.forks[tag]
        call.legs = [a_leg, leg]
        self.changed(call)
        self._b_pending.pop((leg.dialog.call_id, leg.dialog.local_tag), None)
        if self.policy.max_duration > 0 and call.method == "INVITE":
            self._set_timer(call, "max_duration", now + self.policy.max_duration)
        if call.method == "INVITE":
            leg.ack_pending = leg.invite_cseq  # the INVITE's CSeq, set when the fork began
            self._session_timer(call, resp, now)
            self.stats["calls_answered"] += 1
        elif call.method == "SUBSCRIBE":
            self._subscription_expiry(call, resp, now)
        mapped = self._map_response(
            resp, call.a_request, call.a_side, a_leg.dialog.local_tag, call, a_leg.contact
        )
        a_tx = call.a_tx
        call.a_tx = None
        if a_tx is None:
            return []
        self._server.pop(a_tx, None)
        if call.method == "INVITE":
            self._start_retransmit(call, a_leg, a_tx, mapped, now)
        log.info("call answered", extra={"call": call.id, "call_id": call.a_request.call_id})
        return a_tx.respond(mapped, now)

    def _fork(self, call: Call, resp: Response) -> Leg:
        """A response with a new To tag: an early dialog on the callee's leg, and one with a
        To tag of its own on the caller's leg."""
        assert call.b_request is not None
        tag = resp.to.tag if resp.to is not None else ""
        b_dialog = uac_dialog(call.b_request, resp)
        a_dialog = uas_dialog(
            call.a_request,
            local_tag=call.a_tag if not call.forks else secrets.token_hex(6),
            local_seq=secrets.randbelow(10_000),
        )
        b_leg = Leg(call, call.target.side, call.target.flow, b_dialog,
                    self._contact(call, call.target.flow), False)  # fmt: skip
        a_leg = Leg(call, call.a_side, call.a_flow, a_dialog, self._contact(call, call.a_flow),
                    True)  # fmt: skip
        a_leg.peer, b_leg.peer = b_leg, a_leg
        if call.method == "INVITE":
            a_leg.invite_cseq = a_dialog.remote_seq or 0
            b_leg.invite_cseq = b_dialog.local_seq
        call.forks[tag or ""] = b_leg
        call.legs += [a_leg, b_leg]
        self._dialogs[a_dialog.key] = a_leg
        self._dialogs[b_dialog.key] = b_leg
        return b_leg

    def _kill_fork(self, call: Call, tag: str, resp: Response, now: float) -> list[Output]:
        """A 2xx for a call already over: ACK it and end that dialog at once (RFC 3261 15).
        The leg is kept with the call (not indexed) so a retransmitted 2xx is ACKed again."""
        assert call.b_request is not None
        try:
            dialog = uac_dialog(call.b_request, resp)
        except ParseError:
            return []
        leg = Leg(call, call.target.side, call.target.flow, dialog, "", False)
        call.forks[tag] = leg
        return self._ack_and_bye(call, leg, resp, now)

    def _ack_and_bye(self, call: Call, leg: Leg, resp: Response, now: float) -> list[Output]:
        if leg.ack_sent is not None:
            return self._resend_ack(leg, resp)
        cseq = resp.cseq.seq if resp.cseq is not None else leg.dialog.local_seq
        out = self._send_ack(leg, cseq, None)
        out += self._send_bye(
            call, leg, now, reason='SIP;cause=200;text="Call completed elsewhere"'
        )
        self._unindex(leg)
        self.stats["late_2xx_ended"] += 1
        return out

    def _resend_ack(self, leg: Leg, resp: Response) -> list[Output]:
        ack = leg.ack_sent
        cseq = resp.cseq
        if ack is None or cseq is None or ack.cseq is None or ack.cseq.seq != cseq.seq:
            return []
        return [Send(message=ack, dest=leg.ack_dest or leg.flow)]

    def _mapped_response(self, work: _Mapped, resp: Response, now: float) -> list[Output]:
        status = resp.status
        if status == 100:
            return []
        origin, dest, method = work.origin, work.dest, work.method
        call = origin.call
        if work.final:
            if method == "INVITE" and 200 <= status < 300:
                return self._resend_ack(dest, resp)  # a retransmitted 2xx (RFC 6026 7.2)
            return []
        if status >= 200:
            work.final = True
            if method == "INVITE":
                dest.invite_out = None
                origin.invite_in = None
                self._server.pop(work.tx, None)
            elif method == "UPDATE":
                dest.update_out = None
        ok = 200 <= status < 300
        if ok and method in ("INVITE", "UPDATE"):
            dest.dialog.refresh_target(resp)  # RFC 3261 12.2.1.2, RFC 3311 5.2
            self.changed(dest.call)
            self._session_timer(call, resp, now)
        mapped = self._map_response(
            resp,
            work.tx.request,
            origin.side,
            origin.dialog.local_tag,
            call,
            origin.contact,
            toward_caller=origin.caller,
        )
        if status >= 300 and method in ("INVITE", "UPDATE") and work.tx.request.body:
            self._media_warning(call, mapped)
            self.media.rejected(call.id)  # RFC 3264 8: a refused re-offer changes nothing
        out: list[Output] = []
        if method == "INVITE" and ok:
            dest.ack_pending = work.cseq
            dest.ack_sent = None
            self._start_retransmit(call, origin, work.tx, mapped, now)
        out += work.tx.respond(mapped, now)
        if status < 200:
            return out
        if method == "NOTIFY" and ok and _subscription_terminated(work.tx.request):
            if call.method in ("SUBSCRIBE", "REFER") and call.state != "ended":
                self._finish(call, "subscription terminated", now)
        elif method == "SUBSCRIBE" and ok and call.method == "SUBSCRIBE":
            self._subscription_expiry(call, resp, now)  # a refresh extends it (RFC 6665 4.1.2.1)
        elif status in (408, 481) and call.state != "ended":
            # RFC 3261 12.2.1.2: the dialog is gone on that side; end the other one too.
            out += self._end_call(call, f"{status} on {method}", now, skip=dest, code=status)
        return out

    def on_timeout(self, tx: ClientTransaction, now: float) -> list[Output]:
        work = self._work.pop(tx, None)
        if isinstance(work, _Initial):
            call = work.call
            out: list[Output] = []
            if call.target.backend is not None:
                # A transaction timeout towards a backend is a failure.
                out += self.backends.report_failure(
                    call.target.backend, f"{call.method} timed out", now
                )
            if call.a_tx is not None and not call.cancelled and call.state != "ended":
                reason = "Backend Timeout" if call.target.side == CORE else "Client Timeout"
                out += self._respond(call.a_tx, 408, reason, (), now)
            if call.state != "ended":
                self._finish(call, "timeout", now)
            return out
        if isinstance(work, _Mapped) and not work.final:
            call = work.origin.call
            out = self._respond(work.tx, 408, "Request Timeout", (), now)
            if work.method == "INVITE":
                work.dest.invite_out = None
                work.origin.invite_in = None
            if call.state != "ended":
                cause = f"{work.method} timed out"
                out += self._end_call(call, cause, now, skip=work.dest, code=408)
            return out
        if isinstance(work, _Own) and work.method == "INFO":
            self.stats["dtmf_info_failed"] += 1
            log.warning("DTMF INFO timed out", extra={"call": work.call.id})
        return []

    def forget(self, tx: ClientTransaction) -> None:
        """A client transaction is over (terminated). When it is a call's first INVITE,
        nothing more comes of it (a forked 2xx after timer M is stray, RFC 6026 8.4): an
        established call keeps only the few header fields it still reads of the two
        INVITEs (records, the index of the callee's leg), not the whole messages."""
        work = self._work.pop(tx, None)
        if isinstance(work, _Initial) and work.call.b_tx is tx:
            call = work.call
            call.b_tx = None
            if call.state == "confirmed" and call.method == "INVITE":
                call.a_request = _skeleton(call.a_request)
                if call.b_request is not None:
                    call.b_request = _skeleton(call.b_request)

    def server_gone(self, tx: ServerTransaction) -> None:
        self._server.pop(tx, None)

    # -- calls kept outside the process (sbc/calls/persist.py) -------------------------------
    def changed(self, call: Call) -> None:
        if self.changed_calls is not None:
            self.changed_calls.add(call.id)

    def restore(self, call: Call, now: float) -> None:
        """Go on with an established call made again from its kept values (a restart):
        its dialogs are found again, it counts as active, its duration limit holds."""
        self.calls[call.id] = call
        for leg in call.legs:
            self._dialogs[leg.dialog.key] = leg
        self.active_calls += 1
        self._per_source[call.source] += 1
        answered = call.answered if call.answered is not None else now
        if self.policy.max_duration > 0:
            self._set_timer(call, "max_duration", max(now, answered + self.policy.max_duration))
        self.stats["calls_restored"] += 1


# What an established call still reads of its INVITEs: the call record (Call-ID, From,
# To), the index of its legs (the core leg's Call-ID and From tag).
_KEPT_FIELDS = ("Call-ID", "From", "To", "CSeq")


def _skeleton(req: Request) -> Request:
    """``req`` with only the header fields of ``_KEPT_FIELDS`` and no body."""
    slim = Request(req.method, req.uri_text)
    for name in _KEPT_FIELDS:
        value = req.get(name)
        if value is not None:
            slim.add(name, value)
    return slim
