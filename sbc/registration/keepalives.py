"""Keep-alives towards registered clients behind NAT (sans-I/O).

A client behind NAT is reachable only while its NAT binding lives, so the SBC sends on its
flow every ``[nat] interval`` seconds: an OPTIONS (any answer shows the client is there)
or a CRLF (RFC 5626 4.4.1). ``failures`` OPTIONS in a row unanswered mean the client is
gone: its flow goes to ``on_dead``. ``KeepaliveTable`` (sbc/features/keepalive.py) keeps
the schedule; this is the transaction user of the OPTIONS.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sbc.backends import Backends
from sbc.deadlines import Deadlines
from sbc.features.keepalive import KeepaliveTable, NatPolicy
from sbc.sip.flow import Flow, format_host
from sbc.sip.headers import NameAddr
from sbc.sip.message import Request
from sbc.sip.transaction import ClientTransaction, Output, ResponseReceived, TransactionLayer


@dataclass(frozen=True, slots=True)
class RawSend:
    """Octets to send as they are (a CRLF keep-alive, RFC 5626 4.4.1)."""

    flow: Flow
    data: bytes


@dataclass(slots=True)
class _Keepalive:
    flow: Flow
    deadline: float  # unanswered by then: one keep-alive failure


class NatKeepalives:
    def __init__(
        self,
        *,
        transactions: TransactionLayer,
        backends: Backends,
        policy: NatPolicy,
        on_dead: Callable[[Flow, float], list[Output]],
    ) -> None:
        self.transactions = transactions
        self._backends = backends  # the SBC's own address on a flow, for the OPTIONS
        self.policy = policy
        self._on_dead = on_dead
        self._table = KeepaliveTable(interval=policy.interval, failures=policy.failures)
        self._pending: dict[ClientTransaction, _Keepalive] = {}
        self._deadlines: Deadlines[ClientTransaction] = Deadlines()  # OPTIONS unanswered

    def __contains__(self, flow: Flow) -> bool:
        """Whether keep-alives go to ``flow``."""
        return flow in self._table

    def watch(self, flow: Flow, contacts: tuple[NameAddr, ...], now: float) -> None:
        """Start keep-alives to a client behind NAT; OPTIONS go to its first contact."""
        target = next((str(c.uri) for c in contacts if c.uri is not None), None)
        self._table.watch(flow, target or f"sip:{format_host(flow.remote[0])}", now)

    def unwatch(self, flow: Flow) -> None:
        self._table.unwatch(flow)

    def next_deadline(self) -> float | None:
        pending, due = self._deadlines.next_deadline(), self._table.next_deadline()
        deadlines = [d for d in (pending, due) if d is not None]
        return min(deadlines) if deadlines else None

    def handle_timer(self, now: float) -> list[Output | RawSend]:
        out: list[Output | RawSend] = []
        # An OPTIONS unanswered within the interval is one failure (so a dead client is
        # found after about interval x failures, not failures x timer F).
        while (tx := self._deadlines.pop_due(now)) is not None:
            work = self._pending.pop(tx)
            out += self.transactions.terminate(tx)
            out += self._failed(work.flow, now)
        for flow in self._table.due(now):
            if self.policy.method == "crlf":
                out.append(RawSend(flow, b"\r\n\r\n"))
                continue
            target = self._table.target(flow) or f"sip:{format_host(flow.remote[0])}"
            tx, sent = self.transactions.send_request(
                self._request(flow, target), dest=flow, reliable=False, now=now
            )
            timeout = min(self.policy.interval, self.transactions.timers.timer_f)
            self._pending[tx] = _Keepalive(flow, now + timeout)
            self._deadlines.set(tx, now + timeout)
            out += sent
        return out

    def _request(self, flow: Flow, target: str) -> Request:
        from_uri = f"sip:keepalive@{self._backends.advertised(flow)}"
        req = self._backends.own_request("OPTIONS", target, flow, from_uri=from_uri)
        req.add("Content-Length", "0")
        return req

    def _failed(self, flow: Flow, now: float) -> list[Output]:
        return self._on_dead(flow, now) if self._table.failed(flow) else []

    # -- transaction events of the OPTIONS ---------------------------------------------------
    def owns(self, tx: ClientTransaction) -> bool:
        return tx in self._pending

    def on_response(self, event: ResponseReceived) -> None:
        work = self._pending.get(event.transaction)
        if work is not None and event.response.status >= 200:
            # Any final answer, even 405 or 501, shows the client is there.
            self.forget(event.transaction)
            self._table.answered(work.flow)

    def on_timeout(self, tx: ClientTransaction, now: float) -> list[Output]:
        work = self._pending.pop(tx, None)
        self._deadlines.cancel(tx)
        return self._failed(work.flow, now) if work is not None else []

    def forget(self, tx: ClientTransaction) -> None:
        self._deadlines.cancel(tx)
        self._pending.pop(tx, None)
