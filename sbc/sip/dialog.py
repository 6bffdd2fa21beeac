"""Dialog state of one user agent (RFC 3261 12): ids, sequence numbers, target, route set.

A ``Dialog`` is what a UA keeps between requests of a call: Call-ID and tags (the dialog id,
12), its own and the peer's URIs, the local and remote CSeq, the remote target (the peer's
Contact) and the route set. ``request`` builds a request within the dialog (12.2.1.1);
``accept_remote_cseq`` applies the ordering rule for requests received within it (12.2.2).
The B2BUA holds one dialog per leg. Pure data: no I/O, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sbc.sip.headers import NameAddr, parse_name_addr
from sbc.sip.message import ParseError, Request, Response

DialogKey = tuple[str, str, str]  # (Call-ID, local tag, remote tag)


@dataclass(slots=True, eq=False, kw_only=True)
class Dialog:
    call_id: str
    local_tag: str
    remote_tag: str  # "" while not known (an INVITE sent, no answer with a tag yet)
    local_uri: str  # name-addr of our From (UAC) or To (UAS), without the tag
    remote_uri: str
    local_seq: int
    remote_seq: int | None  # None: the peer has not sent a request in this dialog yet
    remote_target: str  # the peer's Contact URI (12.1.1, 12.1.2)
    route_set: list[str] = field(default_factory=list)  # Route values, in order
    _route0: str | None = field(default=None, repr=False)  # route_set[0] _strict is for
    _strict: str | None = field(default=None, repr=False)

    @property
    def key(self) -> DialogKey:
        return (self.call_id, self.local_tag, self.remote_tag)

    def next_seq(self) -> int:
        """RFC 3261 12.2.1.1: the local CSeq goes up by one for each new request (not ACK or
        CANCEL, which reuse the number of the request they refer to)."""
        self.local_seq += 1
        return self.local_seq

    def request(self, method: str, *, seq: int | None = None) -> Request:
        """A request within the dialog (RFC 3261 12.2.1.1), without Via and Max-Forwards.

        Loose routing (the first route has ``lr``): the Request-URI is the remote target and
        the route set becomes the Route header fields. Strict routing: the Request-URI is the
        first route's URI, the remaining routes and then the remote target are the Route.
        """
        routes = self.route_set
        uri = self.remote_target
        route_values: list[str] = list(routes)
        if routes:
            strict = self._strict_uri(routes[0])
            if strict is not None:
                uri = strict
                route_values = [*routes[1:], f"<{self.remote_target}>"]
        req = Request(method, uri)
        for value in route_values:
            req.add("Route", value)
        req.add("From", f"{self.local_uri};tag={self.local_tag}")
        to = f"{self.remote_uri};tag={self.remote_tag}" if self.remote_tag else self.remote_uri
        req.add("To", to)
        req.add("Call-ID", self.call_id)
        req.add("CSeq", f"{self.next_seq() if seq is None else seq} {method}")
        return req

    def _strict_uri(self, first: str) -> str | None:
        """The first route's URI if it is a strict router (no ``lr``, RFC 3261 12.2.1.1),
        else None; worked out once per route set (it is parsed for every request)."""
        if self._route0 != first:
            na = parse_name_addr(first, check_uri=False)
            uri = na.sip_uri
            self._route0 = first
            self._strict = na.uri_text if uri is not None and not uri.lr else None
        return self._strict

    def accept_remote_cseq(self, seq: int) -> bool:
        """RFC 3261 12.2.2: a request with a CSeq lower than the last one is out of order
        (answered 500); otherwise the remote sequence number becomes this one."""
        if self.remote_seq is not None and seq < self.remote_seq:
            return False
        self.remote_seq = seq
        return True

    def refresh_target(self, msg: Request | Response) -> None:
        """Target refresh (RFC 3261 12.2.1.2, 12.2.2): a Contact in a re-INVITE or UPDATE
        (RFC 3311 5.2) or in their 2xx replaces the remote target."""
        try:
            contacts = msg.contact
        except ParseError:
            return
        if contacts and contacts[0].uri_text:
            self.remote_target = contacts[0].uri_text


def uas_dialog(request: Request, *, local_tag: str, local_seq: int) -> Dialog:
    """The dialog a UAS creates by answering ``request`` with a tag (RFC 3261 12.1.1): route
    set from Record-Route in order, remote target from Contact, remote CSeq from the request.
    Raises ParseError if a header it needs is missing or malformed."""
    frm, to, cseq, call_id = request.from_, request.to, request.cseq, request.call_id
    if frm is None or to is None or cseq is None or call_id is None:
        raise ParseError(400, "Missing Dialog Headers", message=request)
    contacts = request.contact
    target = contacts[0].uri_text if contacts and contacts[0].uri_text else request.uri_text
    return Dialog(
        call_id=call_id,
        local_tag=local_tag,
        remote_tag=frm.tag or "",
        local_uri=without_tag(to),
        remote_uri=without_tag(frm),
        local_seq=local_seq,
        remote_seq=cseq.seq,
        remote_target=target,
        route_set=[str(r) for r in request.name_addrs("record-route")],
    )


def uac_dialog(request: Request, response: Response) -> Dialog:
    """The dialog a UAC creates from a response with a To tag (RFC 3261 12.1.2): route set
    from the response's Record-Route in reverse order, remote target from its Contact."""
    frm, to, cseq = request.from_, response.to, request.cseq
    if frm is None or to is None or cseq is None or request.call_id is None:
        raise ParseError(400, "Missing Dialog Headers", message=request)
    contacts = response.contact
    target = contacts[0].uri_text if contacts and contacts[0].uri_text else request.uri_text
    return Dialog(
        call_id=request.call_id,
        local_tag=frm.tag or "",
        remote_tag=to.tag or "",
        local_uri=without_tag(frm),
        remote_uri=without_tag(request.to or to),
        local_seq=cseq.seq,
        remote_seq=None,
        remote_target=target,
        route_set=[str(r) for r in reversed(response.name_addrs("record-route"))],
    )


def without_tag(value: str | NameAddr) -> str:
    """A From/To value without its tag parameter (the dialog keeps the tag apart)."""
    na = parse_name_addr(value, check_uri=False) if isinstance(value, str) else value
    if na.tag is None and isinstance(value, str):
        return value
    params = "".join(f";{k}={v}" if v else f";{k}" for k, v in na.params if k.lower() != "tag")
    if not na.bracketed and not na.display_name:
        return f"{na.uri_text}{params}"
    dn = f"{na.display_name} " if na.display_name else ""
    return f"{dn}<{na.uri_text}>{params}"
