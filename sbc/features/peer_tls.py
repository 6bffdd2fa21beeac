"""Who a TLS peer is: the names in a verified certificate, matched against
the name configured for a peer SBC ([[peers]] tls_name).

Sans-I/O: it reads the dictionary ``ssl.SSLSocket.getpeercert()`` returns (the certificate
the TLS library has already verified against the configured CA) and decides nothing else.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

PeerCert = Mapping[str, Any]  # the shape of ssl's getpeercert() result


def certificate_names(cert: PeerCert | None) -> set[str]:
    """The identities a certificate carries, lower-case: its subjectAltName DNS names, IP
    addresses (normalised) and the host parts of SIP/SIPS URIs (RFC 5922 7.1); the
    subject's common names only when it has no such subjectAltName (RFC 5922 7.1, RFC 6125
    6.4.4: a CN is a fallback, never beside SANs)."""
    if not cert:
        return set()
    names: set[str] = set()
    for kind, value in cert.get("subjectAltName", ()):
        text = str(value).strip()
        if kind == "DNS":
            names.add(text.lower().rstrip("."))
        elif kind == "IP Address":
            names.add(_normal_ip(text))
        elif kind == "URI" and text.lower().startswith(("sip:", "sips:")):
            # RFC 5922 7.1: a URI SAN names the SIP domain by its host part.
            host = text.split(":", 1)[1].split(";", 1)[0].rsplit("@", 1)[-1]
            names.add(host.lower())
    if names:
        return names
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                names.add(_normal_ip(str(value).strip()).lower().rstrip("."))
    return names


def _normal_ip(text: str) -> str:
    """An IP address in one spelling (ssl writes IPv6 SANs with every zero group); any
    other text unchanged."""
    try:
        return str(ipaddress.ip_address(text.strip("[]")))
    except ValueError:
        return text


def matches(cert: PeerCert | None, expected: Iterable[str]) -> bool:
    """Whether a verified certificate names one of ``expected`` (exact match, no wildcards:
    RFC 5922 7.2 has SIP domain certificates name the domain itself)."""
    names = certificate_names(cert)
    return any(_normal_ip(e.strip()).lower().rstrip(".") in names for e in expected)
