"""The deployment's security matrix (``sbc audit``), derived from its config.

The source paper (../shared/seed) ends with a matrix: for each relation between the parties
and each plane (SIP signalling, RTP data), which protection (IPsec, SIPS, SIPS + SRTP,
S/MIME, S/MIME + SRTP, MIKEY + SRTP, SIP Digest) gives authentication, and which gives
authentication, encryption and integrity. This module fills that matrix in for one
config: each cell says what this deployment does with that protection on that relation
and plane, and why (the config keys that decide it). ``sbc.audit_live`` then checks the
cells it can against the running SBC.

A cell's status:

- ``protected``: enforced for every party of the relation;
- ``partly``: it protects, but not all of it: ``kind`` is the paper's footnote (all data,
  SDP parts only, client authentication only, outgoing only behind NAT) or the ``why``
  says what is missing;
- ``optional``: available, but a party may go without it (the config also takes the
  unprotected way);
- ``not``: not protected;
- ``n/a``: not the SBC's to give or take (IPsec beneath it; keys end to end it relays
  untouched, on relations where they do not apply).

Relations are the paper's four, plus the SBC's own hop to the provider's core:
``client-to-sbc`` (the SBC checks the client, the client's traffic to it), ``sbc-to-client``
(the client checks the SBC, the SBC's traffic to it), ``client-to-client`` (end to end,
through the SBC), ``sbc-to-sbc`` (peering, [[peers]]), ``sbc-to-core`` ([[core.backends]]).
"""

from __future__ import annotations

import json
import ssl
from dataclasses import asdict, dataclass, field
from typing import Literal

from sbc.config import Config
from sbc.config.schema import _uri_transport

Status = Literal["protected", "partly", "optional", "not", "n/a"]

CLIENT_SBC, SBC_CLIENT, CLIENT_CLIENT, SBC_SBC, SBC_CORE = (
    "client-to-sbc",
    "sbc-to-client",
    "client-to-client",
    "sbc-to-sbc",
    "sbc-to-core",
)
RELATIONS = (CLIENT_SBC, SBC_CLIENT, CLIENT_CLIENT, SBC_SBC, SBC_CORE)
RELATION_TITLES = {
    CLIENT_SBC: "Client to SBC",
    SBC_CLIENT: "SBC to Client",
    CLIENT_CLIENT: "Client to Client",
    SBC_SBC: "SBC to SBC",
    SBC_CORE: "SBC to core",
}
SIGNALLING, MEDIA = "signalling", "media"
PLANES = (SIGNALLING, MEDIA)
PLANE_TITLES = {SIGNALLING: "SIP Sign.", MEDIA: "RTP Data"}
IPSEC, SIPS, SIPS_SRTP, SMIME, SMIME_SRTP, MIKEY, E2E, DIGEST = (
    "ipsec",
    "sips",
    "sips+srtp",
    "smime",
    "smime+srtp",
    "mikey+srtp",
    "zrtp/dtls-srtp",
    "digest",
)
MECHANISMS = (IPSEC, SIPS, SIPS_SRTP, SMIME, SMIME_SRTP, MIKEY, E2E, DIGEST)
MECHANISM_TITLES = {
    IPSEC: "IPsec",
    SIPS: "SIPS",
    SIPS_SRTP: "SIPS + SRTP",
    SMIME: "S/MIME",
    SMIME_SRTP: "S/MIME + SRTP",
    MIKEY: "MIKEY + SRTP",
    E2E: "ZRTP, DTLS-SRTP",
    DIGEST: "SIP Digest",
}
AUTH, ENCRYPTION = "authentication", "encryption"
PROPERTIES = (AUTH, ENCRYPTION)
PROPERTY_TITLES = {AUTH: "Authentication", ENCRYPTION: "Authentication, encryption and integrity"}
# The paper's footnotes.
ALL_DATA = "all data"
SDP_PARTS = "SDP parts only"
CLIENT_AUTH = "client authentication only"
OUTGOING_NAT = "outgoing only behind NAT"
KINDS = (ALL_DATA, SDP_PARTS, CLIENT_AUTH, OUTGOING_NAT)
_RANK: dict[str, int] = {"protected": 4, "partly": 3, "optional": 2, "not": 1, "n/a": 0}


@dataclass(frozen=True, slots=True)
class Cell:
    relation: str
    plane: str
    mechanism: str
    property: str
    status: Status
    kind: str | None = None  # one of KINDS
    why: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Verdict:
    """What protects a relation's plane in this deployment: the best of its cells."""

    relation: str
    plane: str
    property: str
    status: Status
    mechanism: str | None
    kind: str | None = None


@dataclass(slots=True)
class Facts:
    """What the config says that decides the cells."""

    access_tls: list[str] = field(default_factory=list)  # tls:// and wss:// access listeners
    access_plain: list[str] = field(default_factory=list)  # udp, tcp, ws
    browsers: bool = False  # ws or wss listeners (WebRTC: DTLS-SRTP to the SBC)
    verify_clients: bool = False
    min_version: str = "1.2"
    weak_ciphers: list[str] = field(default_factory=list)
    access_srtp: str = "optional"
    core_srtp: str = "off"
    peer_srtp: str = "optional"
    passthrough: bool = False
    engine: str = "builtin"
    peers: int = 0
    peer_ca: bool = False  # [core.tls] ca: peers' and TLS backends' certificates are checked
    backends: dict[str, list[str]] = field(default_factory=dict)  # transport -> backend URIs


def facts(config: Config) -> Facts:
    f = Facts()
    for url in config.access.listen:
        (f.access_tls if url.transport in ("tls", "wss") else f.access_plain).append(str(url))
        f.browsers |= url.websocket
    tls = config.access.tls
    f.verify_clients = tls.verify_clients
    f.min_version = tls.min_version
    f.weak_ciphers = weak_ciphers(tls.ciphers)
    m = config.media
    f.access_srtp, f.core_srtp, f.peer_srtp = m.access_srtp, m.core_srtp, m.peer_srtp
    f.passthrough, f.engine = m.srtp_passthrough, m.engine
    f.peers = len(config.peers)
    f.peer_ca = config.core.tls.ca is not None
    for backend in config.core.backends:
        f.backends.setdefault(_uri_transport(backend.uri), []).append(backend.uri)
    return f


# Cipher names that fail today's expectations (RFC 9325 4.1, 4.2: no NULL, RC4, (3)DES,
# export or anonymous suites; forward secrecy; no SHA-1 or MD5 MAC).
_WEAK_PARTS = ("NULL", "RC4", "DES", "MD5", "EXP", "ADH", "AECDH", "PSK", "SRP", "CAMELLIA")


def weak_ciphers(ciphers: str | None) -> list[str]:
    """The TLS 1.2 suites of an OpenSSL cipher string that are weak: no forward secrecy,
    a SHA-1 or MD5 MAC, or a broken cipher. None: Python's default list (none weak)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if ciphers:
        try:
            ctx.set_ciphers(ciphers)
        except ssl.SSLError:
            return [f"{ciphers!r} (OpenSSL takes none of it)"]
    weak = []
    for cipher in ctx.get_ciphers():
        name = str(cipher["name"])
        if name.startswith("TLS_"):
            continue  # TLS 1.3: AEAD with forward secrecy by design (RFC 8446)
        no_pfs = not (name.startswith("ECDHE-") or name.startswith("DHE-"))
        sha1 = name.endswith("-SHA")
        if no_pfs or sha1 or any(part in name for part in _WEAK_PARTS):
            weak.append(name)
    return weak


class _Matrix:
    def __init__(self) -> None:
        self.cells: list[Cell] = []

    def put(
        self,
        relations: tuple[str, ...],
        planes: tuple[str, ...],
        mechanism: str,
        properties: tuple[str, ...],
        status: Status,
        why: str | tuple[str, ...],
        kind: str | None = None,
    ) -> None:
        reasons = (why,) if isinstance(why, str) else why
        for r in relations:
            for p in planes:
                for prop in properties:
                    self.cells.append(Cell(r, p, mechanism, prop, status, kind, reasons))


BOTH = (AUTH, ENCRYPTION)


def matrix(config: Config) -> list[Cell]:
    """Every cell of the matrix for ``config``: relation x plane x mechanism x property."""
    f = facts(config)
    m = _Matrix()
    every = RELATIONS
    # IPsec: beneath the SBC.
    m.put(
        every,
        PLANES,
        IPSEC,
        BOTH,
        "n/a",
        "beneath the SBC: IPsec between the hosts (kernel xfrm) is the operator's, the SBC "
        "sees plain packets on its sockets",
    )
    # S/MIME: a B2BUA that anchors media rewrites every SDP.
    smime = (
        "the SBC reads and rewrites every SDP to anchor the media (a B2BUA with a "
        "relay): a signature breaks, an encrypted body cannot be anchored; an INVITE "
        "whose body is not SDP gets 415"
    )
    m.put(every, (SIGNALLING,), SMIME, BOTH, "not", smime)
    m.put(every, (MEDIA,), SMIME, BOTH, "n/a", "S/MIME protects SIP bodies, not the media")
    m.put(every, PLANES, SMIME_SRTP, BOTH, "not", smime)
    _sips(m, f)
    _srtp(m, f)
    _end_to_end(m, f)
    _digest(m, f, config)
    # A relation the deployment does not have: every cell of it n/a.
    absent = {
        SBC_SBC: "no [[peers]]" if not f.peers else "",
        SBC_CORE: "no [[core.backends]]: the embedded registrar" if not f.backends else "",
    }
    return [
        Cell(c.relation, c.plane, c.mechanism, c.property, "n/a", None, (absent[c.relation],))
        if absent.get(c.relation)
        else c
        for c in m.cells
    ]


def _sips(m: _Matrix, f: Facts) -> None:
    """SIPS (TLS per hop) for the signalling of each relation; SIPS + SRTP's signalling
    cells are the same."""
    m.put(RELATIONS, (MEDIA,), SIPS, BOTH, "n/a", "SIPS protects the signalling only")
    status, why = _access_tls(f)
    for mechanism in (SIPS, SIPS_SRTP):
        m.put(
            (CLIENT_SBC,),
            (SIGNALLING,),
            mechanism,
            (ENCRYPTION,),
            status,
            why,
            ALL_DATA if status != "not" else None,
        )
        # The SBC checks a client's TLS certificate only with verify_clients.
        if status == "not":
            m.put((CLIENT_SBC,), (SIGNALLING,), mechanism, (AUTH,), "not", why)
        elif f.verify_clients:
            m.put(
                (CLIENT_SBC,),
                (SIGNALLING,),
                mechanism,
                (AUTH,),
                status,
                (
                    *why,
                    "mutual TLS: clients show a certificate of access.tls.ca "
                    "(access.tls.verify_clients = true)",
                ),
                ALL_DATA,
            )
        else:
            m.put(
                (CLIENT_SBC,),
                (SIGNALLING,),
                mechanism,
                (AUTH,),
                "not",
                "TLS authenticates the SBC only: clients show no certificate "
                "(access.tls.verify_clients = false)",
            )
        # Towards clients: over the connection each client opened (RFC 5626, 3261 18.2.2),
        # the only way to reach a client behind NAT; clients check the SBC's certificate.
        reuse = "the SBC reaches a client over the connection the client opened (RFC 5626)"
        m.put(
            (SBC_CLIENT,),
            (SIGNALLING,),
            mechanism,
            BOTH,
            status,
            (*why, reuse, "clients that verify check access.tls.certificate")
            if status != "not"
            else why,
            OUTGOING_NAT if status != "not" else None,
        )
        m.put(
            (CLIENT_CLIENT,),
            (SIGNALLING,),
            mechanism,
            BOTH,
            "not",
            "per hop: the SBC terminates TLS and reads every message (a B2BUA)",
        )
        if not f.peers:
            m.put((SBC_SBC,), (SIGNALLING,), mechanism, BOTH, "n/a", "no [[peers]]")
        else:
            m.put(
                (SBC_SBC,),
                (SIGNALLING,),
                mechanism,
                (ENCRYPTION,),
                "protected",
                f"{f.peers} [[peers]], each over TLS (peers[].uri is sips: or transport=tls)",
                ALL_DATA,
            )
            if f.peer_ca:
                m.put(
                    (SBC_SBC,),
                    (SIGNALLING,),
                    mechanism,
                    (AUTH,),
                    "protected",
                    "mutual TLS: each peer's certificate is checked against core.tls.ca "
                    "and its peers[].tls_name; the SBC shows core.tls.certificate",
                    ALL_DATA,
                )
            else:
                m.put(
                    (SBC_SBC,),
                    (SIGNALLING,),
                    mechanism,
                    (AUTH,),
                    "not",
                    "no core.tls.ca: the peers' certificates cannot be checked",
                )
        _core_signalling(m, f, mechanism)


def _access_tls(f: Facts) -> tuple[Status, tuple[str, ...]]:
    if not f.access_tls:
        return "not", ("access.listen has no tls:// or wss:// listener: plain SIP only",)
    tls = (
        f"access.listen takes TLS ({', '.join(f.access_tls)}), TLS {f.min_version} at "
        "least (access.tls.min_version)",
    )
    if f.weak_ciphers:
        weak = ", ".join(f.weak_ciphers[:6]) + (" ..." if len(f.weak_ciphers) > 6 else "")
        return "partly", (*tls, f"access.tls.ciphers allows weak suites: {weak}")
    if f.access_plain:
        return "optional", (
            *tls,
            f"access.listen also takes plain SIP: {', '.join(f.access_plain)}",
        )
    return "protected", (*tls, "and nothing else")


def _core_signalling(m: _Matrix, f: Facts, mechanism: str) -> None:
    if not f.backends:
        m.put(
            (SBC_CORE,),
            (SIGNALLING,),
            mechanism,
            BOTH,
            "n/a",
            "no [[core.backends]]: the embedded registrar (no hop to a core)",
        )
        return
    secure = f.backends.get("tls", [])
    plain = [uri for t, uris in f.backends.items() if t != "tls" for uri in uris]
    if not secure:
        m.put(
            (SBC_CORE,),
            (SIGNALLING,),
            mechanism,
            BOTH,
            "not",
            f"core.backends over {'/'.join(sorted(f.backends))}: {', '.join(plain)}",
        )
        return
    status: Status = "protected" if not plain else "optional"
    why = (
        f"core.backends over TLS: {', '.join(secure)}",
        *([f"and not: {', '.join(plain)}"] if plain else []),
    )
    m.put((SBC_CORE,), (SIGNALLING,), mechanism, (ENCRYPTION,), status, why, ALL_DATA)
    if f.peer_ca:
        m.put(
            (SBC_CORE,),
            (SIGNALLING,),
            mechanism,
            (AUTH,),
            status,
            (*why, "the backends' certificates are checked against core.tls.ca"),
            ALL_DATA,
        )
    else:
        m.put(
            (SBC_CORE,),
            (SIGNALLING,),
            mechanism,
            (AUTH,),
            "partly",
            (*why, "no core.tls.ca: the system's trust store checks the backends"),
            ALL_DATA,
        )


def _srtp_status(
    policy: str, signalling: Status, key: str, tls_key: str
) -> tuple[Status, tuple[str, ...]]:
    """SDES-SRTP on a hop: as its policy asks, as safe as the signalling its keys ride in."""
    if policy == "off":
        return "not", (f'{key} = "off": plain RTP',)
    if policy == "optional":
        return "optional", (f'{key} = "optional": SRTP when the party offers it, else RTP',)
    if signalling == "protected":
        return "protected", (
            f'{key} = "mandatory" (RTP/AVP offers get 488), its SDES keys '
            f"in TLS-protected SDP ({tls_key})",
        )
    return "partly", (
        f'{key} = "mandatory", but its SDES keys may travel in SDP over plain SIP ({tls_key})',
    )


def _srtp(m: _Matrix, f: Facts) -> None:
    """SIPS + SRTP for the media of each relation (SDES, RFC 4568: keys in the SDP)."""
    signalling, _ = _access_tls(f)
    status, why = _srtp_status(f.access_srtp, signalling, "media.access_srtp", "access.listen")
    if f.passthrough and status != "not":
        why = (*why, "media.srtp_passthrough = true: the parties' own keys, relayed untouched")
    m.put(
        (CLIENT_SBC, SBC_CLIENT),
        (MEDIA,),
        SIPS_SRTP,
        BOTH,
        status,
        why,
        ALL_DATA if status != "not" else None,
    )
    if f.passthrough and f.access_srtp != "off":
        m.put(
            (CLIENT_CLIENT,),
            (MEDIA,),
            SIPS_SRTP,
            BOTH,
            "partly",
            (
                "media.srtp_passthrough = true: the SDES keys go end to end, but in SDP the SBC "
                "reads"
            ),
            SDP_PARTS,
        )
    else:
        why_cc = [
            "re-keyed per leg: the SBC decrypts and encrypts again (media.srtp_passthrough = false)"
        ]
        if f.engine == "rtpengine":
            why_cc.append(
                'with media.engine = "rtpengine" legs of the same SDES suite keep '
                "the parties' keys (rtpengine's own passthrough)"
            )
        m.put((CLIENT_CLIENT,), (MEDIA,), SIPS_SRTP, BOTH, "not", tuple(why_cc))
    if not f.peers:
        m.put((SBC_SBC,), (MEDIA,), SIPS_SRTP, BOTH, "n/a", "no [[peers]]")
    else:
        status, why = _srtp_status(f.peer_srtp, "protected", "media.peer_srtp", "peers over TLS")
        m.put(
            (SBC_SBC,),
            (MEDIA,),
            SIPS_SRTP,
            BOTH,
            status,
            why,
            ALL_DATA if status != "not" else None,
        )
    if not f.backends:
        m.put((SBC_CORE,), (MEDIA,), SIPS_SRTP, BOTH, "n/a", "no [[core.backends]]")
    else:
        core: Status = "protected" if set(f.backends) == {"tls"} else "optional"
        status, why = _srtp_status(f.core_srtp, core, "media.core_srtp", "core.backends")
        m.put(
            (SBC_CORE,),
            (MEDIA,),
            SIPS_SRTP,
            BOTH,
            status,
            why,
            ALL_DATA if status != "not" else None,
        )


def _end_to_end(m: _Matrix, f: Facts) -> None:
    """MIKEY, ZRTP and DTLS-SRTP: keys the parties make between themselves, which the SBC
    relays untouched (only addresses and ports rewritten)."""
    relayed = (
        "relayed untouched: the SBC rewrites only addresses and ports "
        "(sbc.media.session.keys_end_to_end)"
    )
    others = (CLIENT_SBC, SBC_CLIENT, SBC_SBC, SBC_CORE)
    m.put(
        (CLIENT_CLIENT,),
        (MEDIA,),
        MIKEY,
        BOTH,
        "optional",
        ("the parties' choice: an offer with a=key-mgmt (RFC 4567)", relayed),
        ALL_DATA,
    )
    m.put(
        (CLIENT_CLIENT,),
        (SIGNALLING,),
        MIKEY,
        (AUTH,),
        "optional",
        ("MIKEY signs its own a=key-mgmt attribute, nothing else of the message", relayed),
        SDP_PARTS,
    )
    m.put(
        (CLIENT_CLIENT,),
        (SIGNALLING,),
        MIKEY,
        (ENCRYPTION,),
        "not",
        "MIKEY protects its key exchange, not the SIP message",
    )
    m.put(others, PLANES, MIKEY, BOTH, "n/a", "end to end between the parties")
    m.put(
        (CLIENT_CLIENT,),
        (MEDIA,),
        E2E,
        BOTH,
        "optional",
        (
            "the parties' choice: ZRTP (a=zrtp-hash, RFC 6189) or DTLS-SRTP without ICE "
            "(a=fingerprint, RFC 5763)",
            relayed,
        ),
        ALL_DATA,
    )
    m.put((CLIENT_CLIENT,), (SIGNALLING,), E2E, BOTH, "n/a", "keys made in the media path")
    if f.browsers:
        m.put(
            (CLIENT_SBC, SBC_CLIENT),
            (MEDIA,),
            E2E,
            BOTH,
            "optional",
            (
                "browsers (ws:// and wss:// listeners) key their leg with DTLS-SRTP to the SBC "
                "(RFC 8827), fingerprints in the SDP; SIP phones do not",
            ),
            ALL_DATA,
        )
        m.put(
            (CLIENT_SBC, SBC_CLIENT), (SIGNALLING,), E2E, BOTH, "n/a", "keys made in the media path"
        )
        m.put((SBC_SBC, SBC_CORE), PLANES, E2E, BOTH, "n/a", "end to end between the parties")
    else:
        m.put(others, PLANES, E2E, BOTH, "n/a", "end to end between the parties")


def _digest(m: _Matrix, f: Facts, config: Config) -> None:
    if f.backends:
        m.put(
            (CLIENT_SBC,),
            (SIGNALLING,),
            DIGEST,
            (AUTH,),
            "partly",
            (
                "the backends' challenges and the clients' credentials pass unchanged "
                "(core.backends); whether a backend challenges is its own config",
                "failed authentications count towards bans (security.auth_failures)",
            ),
            CLIENT_AUTH,
        )
    else:
        m.put(
            (CLIENT_SBC,),
            (SIGNALLING,),
            DIGEST,
            (AUTH,),
            "not",
            "no [[core.backends]]: the embedded registrar takes every REGISTER "
            "(for development and the lab only)",
        )
    m.put(
        (CLIENT_SBC,),
        (SIGNALLING,),
        DIGEST,
        (ENCRYPTION,),
        "not",
        "Digest authenticates, it does not encrypt",
    )
    m.put((CLIENT_SBC,), (MEDIA,), DIGEST, BOTH, "n/a", "Digest is for the signalling")
    m.put(
        (CLIENT_CLIENT,),
        (SIGNALLING,),
        DIGEST,
        (AUTH,),
        "partly" if f.backends else "not",
        (
            "a callee's or its proxy's challenge passes through to the caller"
            if f.backends
            else "nobody challenges without backends"
        ),
        CLIENT_AUTH if f.backends else None,
    )
    m.put(
        (CLIENT_CLIENT,),
        (SIGNALLING,),
        DIGEST,
        (ENCRYPTION,),
        "not",
        "Digest authenticates, it does not encrypt",
    )
    m.put((CLIENT_CLIENT,), (MEDIA,), DIGEST, BOTH, "n/a", "Digest is for the signalling")
    m.put(
        (SBC_CLIENT, SBC_SBC, SBC_CORE),
        PLANES,
        DIGEST,
        BOTH,
        "n/a",
        "the SBC sends no credentials of its own",
    )
    del config


def verdicts(cells: list[Cell]) -> list[Verdict]:
    """Per relation, plane and property: the best status of its cells (and the mechanism)."""
    out = []
    for r in RELATIONS:
        for p in PLANES:
            for prop in PROPERTIES:
                mine = [c for c in cells if (c.relation, c.plane, c.property) == (r, p, prop)]
                best = max(mine, key=lambda c: _RANK[c.status], default=None)
                if best is None or best.status in ("n/a", "not"):
                    out.append(Verdict(r, p, prop, best.status if best else "n/a", None))
                else:
                    out.append(Verdict(r, p, prop, best.status, best.mechanism, best.kind))
    return out


def report(config: Config, source: str = "") -> dict[str, object]:
    """The matrix as plain values (``GET /audit``, ``sbc audit --format json``)."""
    cells = matrix(config)
    return {
        "config": source,
        "relations": list(RELATIONS),
        "planes": list(PLANES),
        "mechanisms": list(MECHANISMS),
        "properties": list(PROPERTIES),
        "cells": [asdict(c) for c in cells],
        "verdicts": [asdict(v) for v in verdicts(cells)],
    }


def to_json(data: dict[str, object]) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False)


# -- rendering ---------------------------------------------------------------------------------
SYMBOLS = {"protected": "yes", "partly": "part", "optional": "opt", "not": "no", "n/a": "-"}
LEGEND = (
    "yes: protected, for every party; part: partly (the footnote says what); opt: optional, "
    "a party may go without; no: not protected; -: not the SBC's (beneath it, or not this "
    "relation's)"
)
# Mechanisms whose "not" explains a verdict of "not" (S/MIME is never possible here).
_EXPLAINS = {SIGNALLING: (SIPS, DIGEST, MIKEY), MEDIA: (SIPS_SRTP, MIKEY, E2E)}


def _mark(cell: Cell) -> str:
    symbol = SYMBOLS[cell.status]
    return (
        f"{symbol}({KINDS.index(cell.kind) + 1})" if cell.kind and cell.status != "n/a" else symbol
    )


def reasons(cells: list[Cell], verdict: Verdict) -> list[str]:
    """Why a relation's plane is as its verdict says: the deciding cells' reasons."""
    mine = [
        c for c in cells
        if (c.relation, c.plane, c.property) == (verdict.relation, verdict.plane, verdict.property)
    ]  # fmt: skip
    if verdict.status == "not":
        chosen = [c for c in mine if c.mechanism in _EXPLAINS[verdict.plane] and c.status == "not"]
    else:
        chosen = [c for c in mine if c.status == verdict.status]
    # One line per reason, with the mechanisms it holds for (SIPS and SIPS + SRTP share
    # their signalling's).
    by_reason: dict[str, list[str]] = {}
    for c in chosen:
        for why in c.why:
            names = by_reason.setdefault(why, [])
            if MECHANISM_TITLES[c.mechanism] not in names:
                names.append(MECHANISM_TITLES[c.mechanism])
    return [f"{', '.join(names)}: {why}" for why, names in by_reason.items()]


def _verdict_text(v: Verdict) -> str:
    if v.mechanism is None:
        return v.status
    kind = f", {v.kind}" if v.kind else ""
    return f"{v.status} ({MECHANISM_TITLES[v.mechanism]}{kind})"


def _rows(cells: list[Cell], prop: str) -> list[list[str]]:
    index = {(c.relation, c.plane, c.mechanism, c.property): c for c in cells}
    table = verdicts(cells)
    rows = []
    for r in RELATIONS:
        for p in PLANES:
            v = next(v for v in table if (v.relation, v.plane, v.property) == (r, p, prop))
            marks = [_mark(index[(r, p, mech, prop)]) for mech in MECHANISMS]
            rows.append([RELATION_TITLES[r], PLANE_TITLES[p], *marks, _verdict_text(v)])
    return rows


HEADER = ["relation", "plane", *(MECHANISM_TITLES[m] for m in MECHANISMS), "this deployment"]


def render_text(cells: list[Cell], source: str, live: list[dict[str, object]] | None) -> str:
    out = [f"Security matrix of {source or 'the config'} (sbc audit)", LEGEND, ""]
    for prop in PROPERTIES:
        rows = [HEADER, *_rows(cells, prop)]
        widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
        out.append(PROPERTY_TITLES[prop])
        for row in rows:
            out.append(
                "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            )
        out.append("")
    out.append("Footnotes: " + "; ".join(f"({i + 1}) {k}" for i, k in enumerate(KINDS)))
    out.append("")
    out += _why_lines(cells, bullet="  - ")
    if live is not None:
        out += ["", *_live_lines(live)]
    return "\n".join(out) + "\n"


def _why_lines(cells: list[Cell], bullet: str) -> list[str]:
    out = ["Why:"]
    for v in verdicts(cells):
        if v.status == "n/a":
            continue
        title = f"{RELATION_TITLES[v.relation]}, {PLANE_TITLES[v.plane]}, {v.property}"
        out.append(f"{title}: {_verdict_text(v)}")
        out += [f"{bullet}{line}" for line in reasons(cells, v)]
    return out


def _live_lines(live: list[dict[str, object]]) -> list[str]:
    out = ["Live checks (against the running SBC):"]
    for check in live:
        mark = {"ok": "ok", "contradicts": "CONTRADICTS THE CONFIG", "skipped": "skipped"}
        out.append(f"  [{mark.get(str(check['result']), check['result'])}] {check['name']}: "
                   f"{check['observed']} (expected: {check['expected']})")  # fmt: skip
    return out


def render_markdown(cells: list[Cell], source: str, live: list[dict[str, object]] | None) -> str:
    out = [f"Security matrix of `{source or 'the config'}` (`sbc audit --format markdown`). "
           f"{LEGEND}.", ""]  # fmt: skip
    for prop in PROPERTIES:
        out += [f"**{PROPERTY_TITLES[prop]}**", "", "| " + " | ".join(HEADER) + " |",
                "|" + "---|" * len(HEADER)]  # fmt: skip
        out += ["| " + " | ".join(row) + " |" for row in _rows(cells, prop)]
        out.append("")
    out.append("Footnotes: " + "; ".join(f"({i + 1}) {k}" for i, k in enumerate(KINDS)) + ".")
    out.append("")
    out += _why_lines(cells, bullet="  - ")[0:1]
    for line in _why_lines(cells, bullet="  - ")[1:]:
        out.append(line if line.startswith("  - ") else f"- {line}")
    if live is not None:
        out += ["", *_live_lines(live)]
    return "\n".join(out) + "\n"


# -- requirements (``--require FILE``) ---------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Requirement:
    """A cell that must be protected: a relation's plane for a property, by any mechanism
    (its verdict) or by ``mechanism``."""

    relation: str
    plane: str
    property: str
    mechanism: str | None = None


def requirements(data: dict[str, object]) -> list[Requirement]:
    """The ``[[require]]`` tables of a TOML document; ValueError naming the bad entry."""
    items = data.get("require")
    if not isinstance(items, list) or not items:
        raise ValueError("require: needs at least one [[require]] table")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ValueError(f"require[{i}]: must be a table")
        unknown = set(item) - {"relation", "plane", "property", "mechanism"}
        if unknown:
            raise ValueError(f"require[{i}]: unknown key {sorted(unknown)[0]}")
        for key, allowed in (("relation", RELATIONS), ("plane", PLANES), ("property", PROPERTIES)):
            if item.get(key) not in allowed:
                raise ValueError(
                    f"require[{i}].{key}: must be one of {', '.join(allowed)}, "
                    f"got {item.get(key)!r}"
                )
        mechanism = item.get("mechanism")
        if mechanism is not None and mechanism not in MECHANISMS:
            raise ValueError(
                f"require[{i}].mechanism: must be one of {', '.join(MECHANISMS)}, got {mechanism!r}"
            )
        out.append(Requirement(item["relation"], item["plane"], item["property"], mechanism))
    return out


def unmet(cells: list[Cell], required: list[Requirement]) -> list[str]:
    """The required cells that this deployment does not protect, each with its status."""
    table = verdicts(cells)
    out = []
    for req in required:
        where = f"{req.relation} {req.plane} {req.property}"
        if req.mechanism is None:
            key = (req.relation, req.plane, req.property)
            v = next(v for v in table if (v.relation, v.plane, v.property) == key)
            if v.status != "protected":
                out.append(f"{where}: {_verdict_text(v)}")
            continue
        c = next(
            c for c in cells
            if (c.relation, c.plane, c.mechanism, c.property)
            == (req.relation, req.plane, req.mechanism, req.property)
        )  # fmt: skip
        if c.status != "protected":
            out.append(f"{where} by {MECHANISM_TITLES[c.mechanism]}: {c.status}")
    return out
