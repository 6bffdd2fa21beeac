# mypy: disable-error-code="misc"
# (a part of B2bua, one class of its single-inheritance chain: its methods take
# ``self: B2bua``, a subclass, which mypy reports as "misc")
"""Where the requests of a call go: a new request's target (a peer, a backend, a
registered client), admission, and the next hop of a request within a dialog (RFC 3261
12.2.1.1, 8.1.2), with the SBC's Via and Contact on each leg."""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from sbc.calls.mapping import Mapping
from sbc.calls.model import (
    Call,
    Leg,
    NextHop,
    PeerRoute,
    Refusal,
    Target,
)
from sbc.features.registrar import aor_of
from sbc.sides import ACCESS, CORE, PEER, Side
from sbc.sip.flow import Flow, format_address
from sbc.sip.headers import parse_name_addr
from sbc.sip.message import ParseError, Request
from sbc.sip.transaction import (
    new_branch,
)
from sbc.sip.uri import SipUri, parse_uri

log = logging.getLogger("sbc.calls")

if TYPE_CHECKING:
    from sbc.calls.b2bua import B2bua


class Routing(Mapping):
    """B2bua's routing (a part of the B2bua: ``self`` is the B2bua)."""

    def side_of(self: B2bua, flow: Flow) -> Side:
        """Which side a flow is on: a peer SBC, the core (backends), or the access side."""
        if (flow.transport, flow.remote[0].lower()) in self._peer_hosts:
            return PEER
        return CORE if self.backends.is_core_flow(flow) else ACCESS

    def _peer_for(self: B2bua, req: Request) -> PeerRoute | None:
        uri = req.uri
        if not isinstance(uri, SipUri):
            return None
        return next((p for p in self.peers if p.matches(uri)), None)

    def route(
        self: B2bua, req: Request, flow: Flow, now: float, alive: Callable[[Flow], bool]
    ) -> Target | Refusal:
        where = self._route(req, flow, now, alive)
        uri = req.uri
        if (
            isinstance(where, Target)
            and not where.flow.secure
            and isinstance(uri, SipUri)
            and uri.secure
        ):
            # RFC 5630 5.3: a SIPS request is never sent on over a hop that is not TLS
            # (no last-hop exception; WSS is TLS, RFC 7118 5.2.2); 480 with warn-code 380
            # (RFC 5630 9).
            self.stats["refused_sips_next_hop"] += 1
            return Refusal(480, "SIPS Not Allowed", (("Warning", '380 sbc "SIPS Not Allowed"'),))
        return where

    def _route(
        self: B2bua, req: Request, flow: Flow, now: float, alive: Callable[[Flow], bool]
    ) -> Target | Refusal:
        backends, registration = self.backends, self.registration
        side = self.side_of(flow)
        peer = self._peer_for(req) if side != PEER else None
        if peer is not None:
            # SBC-to-SBC peering: the Request-URI's domain or number belongs to a peer.
            out = backends.flow_for(peer.transport, (peer.host, peer.port))
            if out is None:
                return Refusal(503, "No Route To Peer", (("Retry-After", "10"),))
            return Target(out, req.uri_text, PEER)
        if side == CORE:
            # From a backend: our Path in the top Route names the registered client's flow.
            client = registration.client_flow(req)
            if client is None:
                return Refusal(404, "Not Found")
            if not alive(client) or not registration.has_flow(client):
                return Refusal(430, "Flow Failed")  # RFC 5626 5.3
            return Target(client, req.uri_text, ACCESS)
        if backends.balancer.backends:
            # From a client: to the backend holding the caller's registration, which is the
            # one its AOR hashes to, unless another algorithm is configured.
            frm = req.from_
            aor = (aor_of(frm) if frm is not None else None) or req.uri_text
            backend = backends.balancer.pick_for_dialog(aor)
            out = backends.flow_to(backend) if backend is not None else None
            if backend is None or out is None:
                retry = (("Retry-After", "10"),)
                return Refusal(503, "No Backend Available", retry)
            # The Request-URI the client authenticated is kept.
            return Target(out, req.uri_text, CORE, backend)
        found = registration.local_target(req, now)
        if found is None:
            return Refusal(404, "Not Found")
        client, contact = found
        if not alive(client):
            # The SBC is the registrar here, so the caller is a UA, for which 430 is not
            # meant (RFC 5626 5.3, 11.6: an edge proxy's answer to the registrar's proxy):
            # the user cannot be reached until it registers again over a new flow.
            return Refusal(480, "Temporarily Unavailable")
        return Target(client, str(contact) if contact is not None else req.uri_text, ACCESS)

    def _admit(self: B2bua, flow: Flow) -> Refusal | None:
        """503 with Retry-After over the overall or per-source call limit."""
        p = self.policy
        retry = (("Retry-After", str(p.retry_after)),)
        if self.draining:
            # Shutting down: RFC 3261 21.5.4, another SBC or later.
            return Refusal(503, "Shutting Down", retry)
        if p.max_calls and self.active_calls >= p.max_calls:
            return Refusal(503, "Too Many Calls", retry)
        if p.max_calls_per_source and self._per_source[flow.remote[0]] >= p.max_calls_per_source:
            return Refusal(503, "Too Many Calls From Source", retry)
        return None

    def _within(
        self: B2bua, leg: Leg, method: str, *, seq: int | None = None
    ) -> tuple[Request, Flow]:
        """A request within the dialog of ``leg`` (RFC 3261 12.2.1.1) with our Via, and the
        flow it goes out on.

        A client (access side) is reached over its own flow whatever its Contact says: the
        NAT binding or connection it registered or called from (RFC 5626 5.3, RFC 3581).
        Towards the core and peers the request follows the route set, else the remote
        target (12.2.1.1). A next hop that is this SBC itself (a call from one of its
        clients to another that went out to a registrar which did not record-route, and
        came back in) is handed to the SBC's own matching leg without leaving it. Any other
        next hop is reached through the leg's backend or peer as an outbound proxy, with its
        URI pre-loaded as a loose Route when the route set is empty (8.1.2), so that a proxy
        that did not record-route still forwards the request to the target instead of
        taking it for itself."""
        req = leg.dialog.request(method, seq=seq)
        dest = self._next_hop(leg, req)
        self._add_via(req, dest)
        return req, dest

    def _next_hop(self: B2bua, leg: Leg, req: Request) -> Flow:
        flow = leg.flow
        if leg.side == ACCESS:
            return flow
        dialog = leg.dialog
        route0 = dialog.route_set[0] if dialog.route_set else ""
        hop = leg.hop
        if hop is None or hop.route0 != route0 or hop.target != dialog.remote_target:
            # Worked out once per route set and remote target (a target refresh changes it).
            dest, preload = self._resolve_hop(leg, route0)
            hop = leg.hop = NextHop(route0, dialog.remote_target, dest, preload)
        if hop.preload is not None:
            req.add("Route", hop.preload)
            self.stats["route_preloaded"] += 1
        elif hop.dest is not flow:
            self.stats["looped_in_dialog"] += 1
        return hop.dest

    def _resolve_hop(self: B2bua, leg: Leg, route0: str) -> tuple[Flow, str | None]:
        """The flow towards the first route, else the remote target, and the Route to
        pre-load (or None)."""
        flow = leg.flow
        try:
            if route0:
                uri = parse_name_addr(route0, check_uri=False).sip_uri
            else:
                parsed = parse_uri(leg.dialog.remote_target)
                uri = parsed if isinstance(parsed, SipUri) else None
        except (ParseError, ValueError):  # not a SIP URI we can read: the leg's flow
            return flow, None
        if uri is None:
            return flow, None
        port = uri.port or (5061 if uri.secure or flow.secure else 5060)
        address = (uri.host_bare, port)
        if address == flow.remote:
            return flow, None
        own = self.backends.own_core_address(address)
        if own is not None:
            return Flow(flow.transport, flow.local, own), None
        if route0:
            return flow, None
        transport = "" if flow.transport == "udp" else f";transport={flow.uri_transport}"
        return flow, f"<sip:{format_address(flow.remote)}{transport};lr>"

    def _add_via(self: B2bua, req: Request, flow: Flow) -> None:
        local = self.backends.advertised(flow)
        req.add("Via", f"SIP/2.0/{flow.transport.upper()} {local};branch={new_branch()};rport",
                first=True)  # fmt: skip

    def _contact(self: B2bua, call: Call, flow: Flow) -> str:
        """Our Contact on a leg: the SBC's address on that side; the user part names the
        call (RFC 3261 8.1.1.8: a URI that reaches this UA for the dialog). Towards a
        WebSocket client it says transport=ws (RFC 7118 5.2.2), over WS and WSS alike."""
        transport = "" if flow.transport == "udp" else f";transport={flow.uri_transport}"
        return f"<sip:{call.id}@{self.backends.advertised(flow)}{transport}>"

    def _derive(self: B2bua, *parts: str) -> str:
        mac = hmac.new(self._key, "\x00".join(parts).encode("utf-8", "surrogateescape"),
                       hashlib.sha256)  # fmt: skip
        return mac.hexdigest()[:24]
