"""The way of a received message through the core, one stage after the other, in the order
of docs/architecture.md: 1b the guard (admission by source, before parsing), 2 framing
(a datagram is a message; a stream is cut by its ``StreamFramer``), 3 sanity
(sbc/features/sanity.py), 4 the transport rules (received/rport, where responses go), 5
the transactions (sbc/sip/transaction.py), 6 the transaction user (``SbcCore._handle_request``
and the owners of client transactions, ``SbcCore._outputs``).

``Pipeline`` is a part of ``SbcCore``, its base class (single inheritance, as the parts of
sbc/calls/ are chained into the B2BUA, so that mypyc compiles it): the stages use the core's
guard, transactions and calls; their methods take ``self: SbcCore``.
"""

# mypy: disable-error-code="misc"
from __future__ import annotations

import logging
import secrets
from typing import TYPE_CHECKING

from sbc.actions import Action, Close, HandOver, SendData, with_effects
from sbc.features.guard import REGISTER, Limited, credentials_user
from sbc.features.keepalive import is_stun, stun_binding_response
from sbc.features.sanity import Rejection, check_request, check_response, fault_label
from sbc.ownership import marked_worker
from sbc.sides import ACCESS
from sbc.sip.flow import Flow
from sbc.sip.headers import MAGIC_COOKIE
from sbc.sip.message import Message, ParseError, Request, Response, make_response
from sbc.sip.parser import StreamFramer, parse_message
from sbc.sip.transaction import RequestDisposition
from sbc.sip.uri import SipUri

if TYPE_CHECKING:
    from sbc.core import SbcCore

log = logging.getLogger("sbc.core")

# Extensions a request may require of the SBC (Require, RFC 3261 20.32): those the B2BUA
# relays end to end (reliable provisionals, RFC 3262; session timers, RFC 4028) and those
# of registration (Path, RFC 3327; outbound, RFC 5626).
SUPPORTED: frozenset[str] = frozenset({"100rel", "timer", "path", "outbound"})
# How many messages to this SBC itself may be received inside one another (_loop_back).
_MAX_LOOP_DEPTH = 4


class Pipeline:
    """The input entry points of the core and the stages behind them."""

    # Set by SbcCore.__init__; declared here, where the stages assign them.
    _guard_verdict: Limited | None  # the guard's verdict on the datagram being handled
    _handing_in: bool  # a message another worker handed over is being handled
    worker: int  # this core's signalling worker, of ``workers``
    workers: int
    _loop_depth: int  # messages to this SBC itself being received (_loop_back)

    @with_effects
    def receive_datagram(self: SbcCore, data: bytes, flow: Flow, now: float) -> list[Action]:
        """One UDP datagram (RFC 3261 18.3: the datagram is the message)."""
        engine = self.rtpengine
        if engine is not None and flow.local == engine.local:
            return self._ng_datagram(data, flow, now)  # an rtpengine node's reply
        # 1b. The guard: a banned or not allowed source is dropped before it is parsed.
        if self.guard.active and not self.guard.admit(flow.remote[0], self._side(flow), now):
            return []
        # 2. Framing: STUN and keep-alives on the SIP port, else one message.
        if is_stun(data):
            # RFC 5626 4.4.2: STUN binding requests on the SIP port are answered.
            self.stats["stun"] += 1
            answer = stun_binding_response(data, flow.remote)
            return [SendData(flow, answer)] if answer is not None else []
        if not data.strip(b"\r\n\x00 "):
            self.stats["keepalive"] += 1  # RFC 5626 4.4.1 CRLF keep-alive (also RFC 3261 7.5)
            return []
        if data.startswith(b"ACK ") and self._shed_tag_bytes in data:
            # The ACK of a 503 refused for overload (RFC 3261 17.1.1.3: it ends a transaction
            # that the SBC did not keep): dropped before it is parsed.
            self.stats["shed_ack"] += 1
            return []
        # Registration offload: a refresh like one answered before, known by its octets
        # (sbc/registration/refresh.py), is answered without parsing.
        if (
            self.registration.refreshes
            and data.startswith(b"REGISTER ")
            and len(data) <= self.settings.limits.max_message_size
        ):
            refreshed = self._refresh(data, flow, now)
            if refreshed is not None:
                return refreshed
        try:
            msg = parse_message(data, limits=self.settings.limits, datagram=True)
            actions = self._handle(msg, flow, now)
        except ParseError as exc:
            return self._parse_failed(exc, flow)
        finally:
            self._guard_verdict = None
            answered, self.registration.answered = self.registration.answered, None
        if answered is not None:  # a refresh answered locally: the template of the next
            self.registration.refreshes.learn(data, flow, *answered)
        return actions

    def _refresh(self: SbcCore, data: bytes, flow: Flow, now: float) -> list[Action] | None:
        """The answer to a refresh recognised by its template, after the guard's rate
        limits, as the full path would ask them (``_guard_request``); None: the full path
        takes the datagram (and answers a limited one with the guard's verdict)."""
        found = self.registration.refresh_candidate(data, flow, now)
        if found is None:
            return None
        template, cut = found
        key = None
        if self.guard.active and not template.repeated_by(cut) and self._side(flow) == ACCESS:
            credentials = None
            if cut.credentials is not None:
                key = f"refresh {flow} {cut.branch!r}"  # closed after the answer below
                user = credentials_user(cut.credentials.decode("utf-8", "replace"))
                credentials = (key, user)
            limited = self.guard.check_request(
                flow.remote[0], REGISTER, now, credentials=credentials
            )
            if limited is not None:
                self._guard_verdict = limited
                return None
        dest, answer = self.registration.refresh(template, cut, now)
        if key is not None:
            # The credentials were not checked (offload): the record is closed, neither a
            # success that would clear the source's or the user's failures nor a failure.
            self.guard.auth_answer(key, 0, now)
        return [SendData(dest, answer)]

    def admit_data(self: SbcCore, flow: Flow, now: float) -> bool:
        """1b. The guard on bytes received on a connection (a TCP/TLS read, or anything a
        WebSocket connection reads: SIP messages, HTTP requests, control frames):
        each is a packet of the source for the flood count (pike); False when the source is
        not allowed on the flow's side or is banned (now, or by this packet), and the
        connection is to be closed unread."""
        return not self.guard.active or self.guard.admit(flow.remote[0], self._side(flow), now)

    @with_effects
    def receive_stream(self: SbcCore, data: bytes, flow: Flow, now: float) -> list[Action]:
        """Octets from a TCP/TLS connection; framing errors close only this connection."""
        # 1b. The guard: a source banned while connected loses the connection.
        if not self.admit_data(flow, now):
            self.connection_closed(flow)
            return [Close(flow)]
        # 2. Framing: the connection's framer cuts messages by Content-Length.
        framer = self._framers.get(flow)
        if framer is None:
            framer = self._framers[flow] = StreamFramer(self.settings.limits)
        self._activity.pop(flow, None)
        self._activity[flow] = now
        actions: list[Action] = []
        for item in framer.feed(data):
            if isinstance(item, bytes):
                actions.append(SendData(flow, b"\r\n"))  # RFC 5626 3.5.1 pong
            elif isinstance(item, ParseError):
                actions += self._parse_failed(item, flow)
                if item.fatal:
                    actions.append(Close(flow))
                    self.connection_closed(flow)
                    break
            else:
                try:
                    actions += self._handle(item, flow, now)
                except ParseError as exc:
                    actions += self._parse_failed(exc, flow)
        return actions

    @with_effects
    def receive_message(self: SbcCore, data: bytes, flow: Flow, now: float) -> list[Action]:
        """One whole message from a message-oriented connection: SIP over WebSocket carries
        one SIP message per WebSocket message (RFC 7118 5), so nothing is framed by
        Content-Length (it may be absent); a malformed message is answered as from UDP and
        the connection stays. 1b, the guard, saw the bytes that carried it: the I/O layer
        asks ``admit_data`` for each read of a WebSocket connection (HTTP requests and
        control frames count too), as ``receive_stream`` does for each TCP read, so the
        message is not counted again."""
        self._message_flows.add(flow)
        self._activity.pop(flow, None)
        self._activity[flow] = now
        if not data.strip(b"\r\n"):
            return [SendData(flow, b"\r\n")]  # RFC 5626 3.5.1 keep-alive ping: pong
        return self._whole_message(data, flow, now)

    def _loop_back(self: SbcCore, data: bytes, dest: Flow, now: float) -> list[Action]:
        """A message for this SBC itself: a request within a call that left through the core
        and came back in (the remote target is one of our core addresses) or the response to
        one. It is received at once on the listener it names, as if it had come from the
        socket that sent it, without a round trip through the kernel or a backend. Bounded:
        a loop inside a loop is legitimate (a BYE and its answer); deeper is a fault."""
        if self._loop_depth >= _MAX_LOOP_DEPTH:
            self.stats["loop_dropped"] += 1
            log.warning("message to this SBC itself dropped: loop too deep")
            return []
        flow = Flow(dest.transport, dest.remote, dest.local)
        self.stats["looped"] += 1
        self._loop_depth += 1
        try:
            return self._whole_message(data, flow, now)
        finally:
            self._loop_depth -= 1

    def _whole_message(self: SbcCore, data: bytes, flow: Flow, now: float) -> list[Action]:
        """A whole message that came another way than a socket's (a loop back, another
        worker): parsed and through stages 3 to 6; a malformed one as from the wire."""
        try:
            msg = parse_message(data, limits=self.settings.limits, datagram=True)
            return self._handle(msg, flow, now)
        except ParseError as exc:
            return self._parse_failed(exc, flow)

    def _parse_failed(self: SbcCore, exc: ParseError, flow: Flow) -> list[Action]:
        """Answer a malformed request if a response can be formed; drop anything else."""
        self.stats[f"rejected:{fault_label(exc.reason)}"] += 1
        msg = exc.message
        log.info("malformed message: %s", exc.reason, extra={"flow": str(flow)})
        if (
            exc.status == 0
            or not isinstance(msg, Request)
            or msg.method == "ACK"
            or "via" not in msg
            or "cseq" not in msg
        ):
            return []
        self._stamp_via(msg, flow)
        resp = make_response(msg, exc.status, exc.reason, to_tag=_new_tag())
        data = self._finish(resp)
        if len(data) > self.settings.limits.max_message_size or _unsafe_head(data):
            # RFC 3261 8.2.6.2 copies Via, From, To, Call-ID and CSeq verbatim: an answer
            # that would echo a bare CR, LF or NUL, or be too large to send, is not sent.
            self.stats["unanswerable"] += 1
            return []
        return [SendData(self._response_flow(msg, flow), data)]

    @with_effects
    def receive_handed(self: SbcCore, data: bytes, flow: Flow, now: float) -> list[Action]:
        """A whole message that another signalling worker received on ``flow`` and handed
        over, because its transaction or dialog is this worker's (``_owner``). The guard
        admitted it there; it goes through the other stages here, and is not handed on."""
        self.stats["handed_in"] += 1
        self._handing_in = True
        try:
            return self._whole_message(data, flow, now)
        finally:
            self._handing_in = False
            self.registration.answered = None  # a template is learnt from the wire only

    def _owner(self: SbcCore, msg: Message) -> int:
        """The worker whose mark (sbc/ownership.py) a message carries, or -1: the branch of
        a response's top Via (its client transaction), the Request-URI's user of a request
        within a dialog (the SBC's Contact on the leg is the call's id)."""
        if isinstance(msg, Response):
            via = msg.top_via
            branch = via.branch if via is not None else None
            return marked_worker(branch, len(MAGIC_COOKIE)) if branch else -1
        assert isinstance(msg, Request)
        uri = msg.uri
        if not isinstance(uri, SipUri) or uri.user is None or not uri.user.startswith("w"):
            return -1
        if msg.method == "REGISTER":
            return -1  # not within a dialog, whatever its To says: any worker answers it
        to = msg.to
        return marked_worker(uri.user) if to is not None and to.tag is not None else -1

    def _handle(self: SbcCore, msg: Message, flow: Flow, now: float) -> list[Action]:
        """A parsed message, through stages 3 to 6 in order."""
        if self.workers > 1 and not self._handing_in:
            # 1a. Another worker's transaction or dialog: handed over to it as it came.
            owner = self._owner(msg)
            if owner >= 0 and owner != self.worker and owner < self.workers:
                self.stats["handed_over"] += 1
                return [HandOver(owner, flow, bytes(msg), True)]
        if isinstance(msg, Response):
            return self._handle_response(msg, now)
        assert isinstance(msg, Request)
        # 1b. The guard, after parsing: a scanner's User-Agent gets no answer at all.
        if self.guard.active and self.guard.blocked_agent(msg.get("user-agent")):
            return []
        # 1c. Overload: a share of new requests is refused before any other work.
        if self.guard.shed_ratio:
            shed = self._shed(msg, flow, now)
            if shed is not None:
                return shed
        # 3. Sanity (a rejection is answered statelessly, after the transport rules).
        rejection = check_request(msg, supported=SUPPORTED)
        # 4. Transport rules: received/rport, and where the responses go.
        self._stamp_via(msg, flow)
        if rejection is not None:
            return self._reject(msg, rejection, flow)
        dest = self._response_flow(msg, flow)
        # 5. Transactions: a retransmission is absorbed here.
        disposition, tx, outputs = self.transactions.receive_request(
            msg, dest=dest, reliable=flow.reliable, now=now
        )
        actions = self._outputs(outputs, now)
        # 6. The transaction user.
        if disposition is RequestDisposition.ACK_TO_TU:
            # RFC 3261 13.2.2.4 / RFC 6026: the ACK for a 2xx goes to the dialog's owner.
            return actions + self._outputs(self.calls.receive_ack(msg, now), now)
        if disposition is RequestDisposition.NEW and tx is not None:
            try:
                actions += self._outputs(self._handle_request(tx, msg, flow, now), now)
            except ParseError as exc:
                # A header only the routing reads was malformed: answer through the
                # transaction, which would otherwise wait for an answer forever.
                self.stats[f"rejected:{fault_label(exc.reason)}"] += 1
                resp = self._response(msg, exc.status or 400, exc.reason)
                actions += self._outputs(tx.respond(resp, now), now)
        return actions

    def _shed(self: SbcCore, req: Request, flow: Flow, now: float) -> list[Action] | None:
        """A new out-of-dialog request from the access side while overloaded: if the guard
        refuses it, 503 with Retry-After (RFC 3261 21.5.4, RFC 6357 5), statelessly (RFC 3261
        8.2.7: no transaction kept; a retransmission gets the same answer) and before the
        sanity filter, the transactions and the routing. None: the full path takes it
        (requests within a dialog, ACK and CANCEL, retransmissions of requests taken).
        The To tag is the same in every such 503, so that their ACKs are dropped unparsed."""
        if req.method == "ACK" or req.method == "CANCEL" or self._side(flow) != ACCESS:
            return None
        if "via" not in req or "cseq" not in req:
            return None  # no answer can be formed (RFC 3261 8.2.6.2): the full path drops it
        try:
            to = req.to
            if to is None or to.tag is not None or self.transactions.has_server(req):
                return None
        except ParseError:
            return None  # malformed: the full path answers it
        limited = self.guard.shed(flow.remote[0], now)
        if limited is None:
            return None
        self._stamp_via(req, flow)
        try:
            resp = make_response(req, limited.status, limited.reason, to_tag=self._shed_tag)
        except ParseError:
            return []
        resp.add("Retry-After", str(limited.retry_after))
        data = self._finish(resp)
        if len(data) > self.settings.limits.max_message_size or _unsafe_head(data):
            self.stats["unanswerable"] += 1  # as in _parse_failed
            return []
        return [SendData(self._response_flow(req, flow), data)]

    def _handle_response(self: SbcCore, resp: Response, now: float) -> list[Action]:
        """A response: sanity (a malformed one is dropped), then its client transaction,
        whose transaction user gets it (``_outputs``)."""
        fault = check_response(resp)
        if fault is not None:
            # RFC 3261 18.1.2 / RFC 4475 3.1.2.5: a malformed response is discarded.
            self.stats[f"dropped_response:{fault_label(fault)}"] += 1
            return []
        try:
            tx, outputs = self.transactions.receive_response(resp, now=now)
        except ParseError as exc:
            # RFC 3261 18.1.2 / RFC 4475 3.1.2.5: a malformed response is discarded.
            self.stats[f"dropped_response:{fault_label(exc.reason)}"] += 1
            return []
        if tx is None:
            self.stats["stray_response"] += 1  # RFC 3261 18.1.2: no match, discard
        return self._outputs(outputs, now)

    def _reject(self: SbcCore, req: Request, rejection: Rejection, flow: Flow) -> list[Action]:
        """Stateless rejection of a request that failed the sanity filter (RFC 3261 8.2)."""
        self.stats[f"rejected:{rejection.label}"] += 1
        log.info(
            "rejecting %s: %d %s",
            req.method,
            rejection.status,
            rejection.reason,
            extra={"flow": str(flow), "call_id": req.get("call-id")},
        )
        if req.method == "ACK" or "via" not in req or "cseq" not in req:
            # RFC 3261 17: an ACK is never answered. RFC 3261 8.2.6.2, 17.1.3, 18.2.2: an
            # answer goes where the request's Via says and is matched by branch and CSeq;
            # without them it cannot be formed (dropped, as _parse_failed does).
            return []
        resp = self._response(req, rejection.status, rejection.reason, headers=rejection.headers)
        return [SendData(self._response_flow(req, flow), self._finish(resp))]

    # -- 4. transport rules ------------------------------------------------------------------
    @staticmethod
    def _stamp_via(req: Request, flow: Flow) -> None:
        """RFC 3261 18.2.1 received, RFC 3581 4 rport on the top Via (if it parses)."""
        try:
            via = req.check_vias()  # a malformed via-parm: the answer goes to the source
        except ParseError:
            return
        if via is None:
            return
        host, port = flow.remote
        if via.wants_rport:
            req.set_top_via(via.with_params({"received": host, "rport": str(port)}))
        elif via.host_bare != host.lower():
            req.set_top_via(via.with_param("received", host))

    @staticmethod
    def _response_flow(req: Request, flow: Flow) -> Flow:
        """Where responses go (RFC 3261 18.2.2, RFC 3581 4).

        Streams: the connection the request came on. UDP: the source address, at the rport
        if the client asked for it, else at the Via sent-by port (default 5060).
        """
        if flow.reliable:
            return flow
        try:
            via = req.check_vias()  # a malformed via-parm: the answer goes to the source
        except ParseError:
            via = None
        if via is None or via.wants_rport:
            return flow
        return flow.to((flow.remote[0], via.port or 5060))


def _unsafe_head(data: bytes) -> bool:
    """A header section with a bare CR or LF, or a NUL (RFC 3261 7.3.1, 25.1)."""
    head = data.partition(b"\r\n\r\n")[0]
    crlf = head.count(b"\r\n")
    nul = head.count(b"\x00")
    return head.count(b"\r") != crlf or head.count(b"\n") != crlf or nul != head.count(b"\\\x00")


def _new_tag() -> str:
    return secrets.token_hex(6)
