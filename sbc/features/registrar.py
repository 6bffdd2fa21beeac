"""Registration through the SBC: flow tokens in Path, AORs, the client-facing expiry.

RFC 3327 (Path): the SBC puts a Path URI naming itself in every REGISTER it forwards, so the
registrar routes requests for the user back through the SBC. The URI's user part is a flow
token (RFC 5626 5.2): it names the client's flow (transport, SBC socket, client address,
connection) and carries an HMAC so that nobody can make the SBC send to an address of their
choosing by forging a Route.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections import Counter
from collections.abc import Iterator
from typing import ClassVar, Protocol

from sbc.deadlines import Deadlines
from sbc.sip.flow import Flow
from sbc.sip.headers import NameAddr
from sbc.sip.uri import SipUri

_MAC_LEN = 8


class FlowTokens:
    """Encode a flow into a token usable as a SIP URI user part, and back."""

    # Tokens kept per flow: a client's REGISTERs all name its flow, and an HMAC costs more
    # than a dictionary lookup. Bounded: emptied when full (a token is made again at will).
    CACHED: ClassVar[int] = 4096

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key or secrets.token_bytes(32)
        self._tokens: dict[Flow, str] = {}

    def encode(self, flow: Flow) -> str:
        token = self._tokens.get(flow)
        if token is None:
            if len(self._tokens) >= self.CACHED:
                self._tokens.clear()
            token = self._tokens[flow] = self._encode(flow)
        return token

    def _encode(self, flow: Flow) -> str:
        (lh, lp), (rh, rp) = flow.local, flow.remote
        data = f"{flow.transport}|{lh}|{lp}|{rh}|{rp}|{flow.conn_id}".encode()
        mac = hmac.new(self._key, data, hashlib.sha256).digest()[:_MAC_LEN]
        # base32: letters and digits only, valid in a SIP URI user part (RFC 3261 25.1).
        return base64.b32encode(mac + data).decode().rstrip("=").lower()

    def decode(self, token: str) -> Flow | None:
        """The flow a token names, or None if it is not one of ours (bad MAC or format)."""
        try:
            padded = token.upper() + "=" * (-len(token) % 8)
            raw = base64.b32decode(padded)
        except (ValueError, UnicodeEncodeError):
            return None
        mac, data = raw[:_MAC_LEN], raw[_MAC_LEN:]
        good = hmac.new(self._key, data, hashlib.sha256).digest()[:_MAC_LEN]
        if len(mac) != _MAC_LEN or not hmac.compare_digest(mac, good):
            return None
        try:
            transport, lh, lp, rh, rp, conn = data.decode().split("|")
            return Flow(transport, (lh, int(lp)), (rh, int(rp)), int(conn))
        except ValueError:
            return None


def aor_of(to: NameAddr) -> str | None:
    """The address-of-record of a REGISTER's To (RFC 3261 10.3 step 5): scheme, user and
    host, lower-case host, no port default games, no parameters. None if not a SIP URI."""
    uri = to.uri
    return aor_of_uri(uri) if isinstance(uri, SipUri) else None


def aor_of_uri(uri: SipUri) -> str:
    """The AOR form of a SIP URI: scheme, unescaped user, lower-case host, port."""
    user = f"{uri.user_unescaped}@" if uri.user is not None else ""
    port = f":{uri.port}" if uri.port is not None else ""
    return f"{uri.scheme.lower()}:{user}{uri.host_bare}{port}"


def client_expires_for(transport: str, udp: int, tcp: int, tls: int) -> int:
    """The expiry granted to a client by its transport: a WebSocket connection is kept
    like a TCP one, a secure one (WSS) like TLS."""
    if transport == "udp":
        return udp
    return tls if transport == "tls" or transport == "wss" else tcp


# -- registration offload --------------------------------------------------------------------


def contact_expires(contact: NameAddr, default: int) -> int:
    """RFC 3261 10.2.1.1: the Contact's expires parameter, else the Expires header value."""
    value = contact.param("expires")
    return int(value) if value and value.isdigit() else default


def contact_key(contact: NameAddr) -> str:
    """A contact without its expires/q parameters: what makes two REGISTERs 'the same binding'
    (URI, +sip.instance, reg-id and any other parameter still count)."""
    kept = [(k.lower(), v) for k, v in contact.params if k.lower() not in ("expires", "q")]
    return f"{contact.uri}|{sorted(kept)}"


class CachedRegistration:
    """What the SBC knows of one client registration it relayed (one flow, one Call-ID)."""

    __slots__ = (
        "aor", "backend", "backend_call_id", "backend_expires_at", "call_id", "client_expires",
        "client_expires_at", "contacts", "cseq", "flow", "owner", "persisted_expiry",
    )  # fmt: skip

    def __init__(
        self,
        *,
        aor: str,
        flow: Flow,
        call_id: str,
        cseq: int,
        contacts: tuple[NameAddr, ...],
        backend: str,
        backend_expires_at: float,
        client_expires: int,
        client_expires_at: float,
        owner: int = 0,
    ) -> None:
        self.aor = aor
        self.flow = flow
        self.call_id = call_id
        self.cseq = cseq
        self.contacts = contacts  # as the client sent them (without expires)
        self.backend = backend
        self.backend_expires_at = backend_expires_at
        self.client_expires = client_expires
        self.client_expires_at = client_expires_at
        # The Call-ID of the backend binding when the SBC made it itself (recovery).
        self.backend_call_id: str | None = None
        # The signalling worker that stored it last, whose Path the backend holds: the one
        # that de-registers and recovers it (sbc/registration/shared.py).
        self.owner = owner
        # The client expiry last written to the state store (sbc/state.py); 0: never.
        self.persisted_expiry = 0.0


class RegistrationStore(Protocol):
    """Where the registrations the SBC relayed live. The default keeps
    them in memory (``MemoryRegistrationStore``); another store (shared, persistent) only
    has to provide these."""

    # The keys stored or dropped since the core took them (sbc/state.py); None: untracked.
    changed: set[tuple[str, str, Flow]] | None
    # The keys whose client only refreshed (CSeq and expiry moved on) since then.
    refreshed: set[tuple[str, str, Flow]]

    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[CachedRegistration]: ...
    def get(self, aor: str, call_id: str, flow: Flow) -> CachedRegistration | None: ...
    def store(self, reg: CachedRegistration, *, refresh: bool = False) -> None: ...
    def drop(self, reg: CachedRegistration) -> None: ...
    def has_flow(self, flow: Flow) -> bool: ...
    def expired(self, now: float) -> list[CachedRegistration]: ...
    def next_deadline(self) -> float | None: ...


def may_answer_locally(
    reg: CachedRegistration | None,
    *,
    cseq: int,
    contacts: tuple[NameAddr, ...],
    expires: int,
    now: float,
) -> bool:
    """Registration offload: may the SBC answer this re-REGISTER itself?

    Only a refresh of the same registration (the caller looked it up by AOR, Call-ID and
    flow) with a higher CSeq, a non-zero expiry and the same contact set, while the backend
    binding stays fresh for two more client periods; anything else goes to the backend,
    which also refreshes the backend binding (so only while the client keeps refreshing).
    """
    if reg is None or expires == 0 or cseq <= reg.cseq:
        return False
    if any(contact_expires(c, expires) == 0 for c in contacts):
        return False
    if sorted(map(contact_key, contacts)) != sorted(map(contact_key, reg.contacts)):
        return False  # a contact added, removed or changed
    return reg.backend_expires_at - now >= 2 * reg.client_expires


class MemoryRegistrationStore:
    """The in-memory ``RegistrationStore``: a dict, and a heap of client expiries."""

    def __init__(self) -> None:
        self._by_key: dict[tuple[str, str, Flow], CachedRegistration] = {}
        self._expiries: Deadlines[tuple[str, str, Flow]] = Deadlines()  # client expiries
        self._per_flow: Counter[Flow] = Counter()
        # The keys stored or dropped since the core last took them, when the state is kept
        # outside the process too (sbc/state.py); None: not tracked. ``refreshed``: those
        # whose client only refreshed (the core writes those less often).
        self.changed: set[tuple[str, str, Flow]] | None = None
        self.refreshed: set[tuple[str, str, Flow]] = set()

    def __len__(self) -> int:
        return len(self._by_key)

    def __iter__(self) -> Iterator[CachedRegistration]:
        return iter(list(self._by_key.values()))

    def get(self, aor: str, call_id: str, flow: Flow) -> CachedRegistration | None:
        return self._by_key.get((aor, call_id, flow))

    def has_flow(self, flow: Flow) -> bool:
        """Whether some registration still uses this flow."""
        return self._per_flow[flow] > 0

    def store(self, reg: CachedRegistration, *, refresh: bool = False) -> None:
        """Keep ``reg``; ``refresh``: only its CSeq and client expiry moved on."""
        key = (reg.aor, reg.call_id, reg.flow)
        if key not in self._by_key:
            self._per_flow[reg.flow] += 1
        self._by_key[key] = reg
        self._expiries.set(key, reg.client_expires_at)
        if self.changed is not None:
            (self.refreshed if refresh else self.changed).add(key)

    def drop(self, reg: CachedRegistration) -> None:
        key = (reg.aor, reg.call_id, reg.flow)
        self._expiries.cancel(key)
        if self.changed is not None:
            self.changed.add(key)
        if self._by_key.pop(key, None) is not None:
            self._per_flow[reg.flow] -= 1
            if not self._per_flow[reg.flow]:
                del self._per_flow[reg.flow]

    def expired(self, now: float) -> list[CachedRegistration]:
        """Remove and return the registrations whose client stopped refreshing."""
        out = []
        while (key := self._expiries.pop_due(now)) is not None:
            reg = self._by_key[key]
            self.drop(reg)
            out.append(reg)
        return out

    def next_deadline(self) -> float | None:
        return self._expiries.next_deadline()


# -- embedded registrar, when no backend is configured ---------------------------------------


class LocalBinding:
    __slots__ = ("call_id", "contact", "cseq", "expires_at", "flow")

    def __init__(
        self, *, contact: NameAddr, flow: Flow, call_id: str, cseq: int, expires_at: float
    ) -> None:
        self.contact = contact
        self.flow = flow
        self.call_id = call_id
        self.cseq = cseq
        self.expires_at = expires_at


class RegisterRefused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


class LocationService:
    """An in-memory registrar (RFC 3261 10.3) for an SBC without backends."""

    def __init__(self) -> None:
        self._aors: dict[str, dict[str, LocalBinding]] = {}
        # The AORs whose bindings a REGISTER, a failed flow or a restore changed since the
        # core last took them (sbc/state.py); None: not tracked. Expiry needs no mark.
        self.changed: set[str] | None = None

    def __len__(self) -> int:
        return sum(len(b) for b in self._aors.values())

    def live(self, now: float) -> int:
        """Bindings not expired at ``now`` (those expired are purged only when their AOR is
        next used): what the metrics and ``sbc status`` show."""
        return sum(b.expires_at > now for bs in self._aors.values() for b in bs.values())

    def register(
        self,
        *,
        aor: str,
        contacts: tuple[NameAddr, ...],
        flow: Flow,
        call_id: str,
        cseq: int,
        expires: int,
        now: float,
    ) -> list[tuple[NameAddr, int]]:
        """Apply a REGISTER (RFC 3261 10.3 steps 6-7); the AOR's bindings with their
        remaining seconds for the 200 (step 8). ``expires`` is what the request asks, already
        capped by the caller; contacts' own expires parameters are capped to it."""
        self._purge(aor, now)
        bindings = self._aors.setdefault(aor, {})
        if self.changed is not None:
            self.changed.add(aor)
        if any(c.star for c in contacts):
            # Step 6: "*" only with Expires 0 and alone; removes every binding.
            if len(contacts) != 1 or expires != 0:
                raise RegisterRefused(400, "Contact * Needs Expires 0")
            for key, b in list(bindings.items()):
                if b.call_id != call_id or cseq > b.cseq:
                    del bindings[key]
            return self.current(aor, now)
        # Step 7: all updates or none; a binding with the same Call-ID needs a higher CSeq.
        for contact in contacts:
            old = bindings.get(contact_key(contact))
            if old is not None and old.call_id == call_id and cseq <= old.cseq:
                raise RegisterRefused(500, "Out Of Order CSeq")
        for contact in contacts:
            key = contact_key(contact)
            wanted = min(contact_expires(contact, expires), expires) if expires else 0
            if wanted == 0:
                bindings.pop(key, None)
            else:
                bindings[key] = LocalBinding(
                    contact=contact, flow=flow, call_id=call_id, cseq=cseq, expires_at=now + wanted
                )
        return self.current(aor, now)

    def _purge(self, aor: str, now: float) -> None:
        bindings = self._aors.get(aor, {})
        for key in [k for k, b in bindings.items() if b.expires_at <= now]:
            del bindings[key]
        if not bindings:
            self._aors.pop(aor, None)

    def current(self, aor: str, now: float) -> list[tuple[NameAddr, int]]:
        self._purge(aor, now)
        return [
            (b.contact, max(1, int(b.expires_at - now))) for b in self._aors.get(aor, {}).values()
        ]

    def lookup(self, aor: str, now: float) -> list[LocalBinding]:
        self._purge(aor, now)
        return sorted(self._aors.get(aor, {}).values(), key=lambda b: -b.expires_at)

    def drop_flow(self, flow: Flow) -> int:
        """Remove every binding that reaches its client over ``flow`` (it failed)."""
        n = 0
        for aor in list(self._aors):
            bindings = self._aors[aor]
            for key in [k for k, b in bindings.items() if b.flow == flow]:
                del bindings[key]
                n += 1
                if self.changed is not None:
                    self.changed.add(aor)
            if not bindings:
                del self._aors[aor]
        return n

    def has_flow(self, flow: Flow) -> bool:
        return any(b.flow == flow for bs in self._aors.values() for b in bs.values())

    def bindings(self) -> list[tuple[str, LocalBinding]]:
        """Every binding with its AOR, expired ones included (purged on their AOR's use)."""
        return [(aor, b) for aor, bs in self._aors.items() for b in bs.values()]

    def restore(self, aor: str, binding: LocalBinding) -> None:
        """Put back a binding as another registrar holds it (a worker's copy of the shared
        state, sbc/registration/shared.py): it replaces the AOR's binding of its contact."""
        self._aors.setdefault(aor, {})[contact_key(binding.contact)] = binding
        if self.changed is not None:
            self.changed.add(aor)

    def of(self, aor: str) -> list[LocalBinding]:
        """The AOR's bindings as they are (expired ones included)."""
        return list(self._aors.get(aor, {}).values())
