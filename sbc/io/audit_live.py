"""``sbc audit --live``: the matrix's cells checked against the running SBC, from loopback
(or wherever its access listeners are), each check bounded by a short timeout.

What is checked, and against which cell of the matrix (sbc/audit.py):

- ``plain-sip``: a plain SIP REGISTER over UDP and TCP: answered on every plain listener the
  config has, never on a TLS listener's port (Client to SBC, signalling, SIPS);
- ``tls-version``: a handshake offering TLS 1.1 at most is refused; with ``min_version =
  "1.3"`` so is one offering TLS 1.2 at most (SIPS);
- ``weak-cipher``: a TLS 1.2 handshake offering only weak suites (static RSA key
  exchange, SHA-1 MACs, 3DES) is refused, unless the config's ciphers allow such suites;
- ``client-certificate``: a handshake without a client certificate fails where
  ``verify_clients`` asks for one, and is served where it does not (Client to SBC
  authentication);
- ``certificate``: the certificate the SBC shows: its expiry, and whether it names the
  listener's address or ``[sbc] public_address`` (SBC to Client authentication);
- ``srtp-mandatory``: an INVITE offering plain RTP (RTP/AVP) is refused with 488 where
  ``access_srtp = "mandatory"`` (Client to SBC media, SIPS + SRTP);
- ``sdes-rekey``: an INVITE offering SDES-SRTP to a user the check registers itself (the
  embedded registrar only): the offer the callee gets carries the SBC's key, not the
  caller's, unless ``srtp_passthrough`` (Client to Client media, SIPS + SRTP).

Each result is a dict: the check, the cell (relation, plane, mechanism, property), what
the config says should happen (``expected``), what happened (``observed``), and ``result``:
``ok``, ``contradicts`` (the running SBC does not do what its config says), ``warning`` or
``skipped`` (with why).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import ipaddress
import secrets
import socket
import ssl
import warnings
from collections.abc import Callable, Iterator

from cryptography import x509

from sbc import audit
from sbc.config import Config, ListenUrl
from sbc.sdp.sdes import Crypto
from sbc.sdp.sdp import SdpError, Session
from sbc.sip.message import ParseError, Request, Response, make_response
from sbc.sip.parser import parse_message
from sbc.sip.transaction import non2xx_ack

TIMEOUT = 2.0
USER_AGENT = "sbc-audit"
DOMAIN = "audit.invalid"
# TLS 1.2 suites no deployment should take (RFC 9325 4.1, 4.2).
WEAK_SUITES = "AES128-SHA:AES256-SHA:DES-CBC3-SHA:ECDHE-RSA-AES128-SHA:ECDHE-ECDSA-AES128-SHA"
RENEW_DAYS = 30

Check = dict[str, object]


def _host(url: ListenUrl) -> str:
    """Where a listener is reached from this host (a wildcard bind: loopback)."""
    if url.host in ("0.0.0.0", ""):
        return "127.0.0.1"
    return "::1" if url.host == "::" else url.host


def _result(
    name: str, cell: tuple[str, str, str, str], expected: str, observed: str, result: str
) -> Check:
    relation, plane, mechanism, prop = cell
    return {
        "name": name,
        "relation": relation,
        "plane": plane,
        "mechanism": mechanism,
        "property": prop,
        "expected": expected,
        "observed": observed,
        "result": result,
    }


def run(config: Config) -> list[Check]:
    """Every check against the SBC that ``config`` describes (it must be running)."""
    f = audit.facts(config)
    checks: list[Check] = []
    plain = [u for u in config.access.listen if u.transport in ("udp", "tcp")]
    tls = [u for u in config.access.listen if u.transport in ("tls", "wss")]
    for url in plain:
        checks.append(_plain_listener(url))
    for url in tls:
        checks += _plain_on_tls_port(url)
        checks.append(_tls_version(url, f.min_version))
        checks.append(_weak_cipher(url, f.weak_ciphers))
        checks.append(_client_certificate(url, f.verify_clients))
        checks.append(_certificate(url, config.sbc.public_address))
    if not plain and not tls:
        checks.append(_result("plain-sip", _SIPS_ENC, "a SIP listener", "none to check", "skipped"))
    checks += _media_checks(config, f, plain or tls)
    return checks


_SIPS_ENC = (audit.CLIENT_SBC, audit.SIGNALLING, audit.SIPS, audit.ENCRYPTION)
_SIPS_AUTH = (audit.CLIENT_SBC, audit.SIGNALLING, audit.SIPS, audit.AUTH)
_SBC_AUTH = (audit.SBC_CLIENT, audit.SIGNALLING, audit.SIPS, audit.AUTH)
_SRTP = (audit.CLIENT_SBC, audit.MEDIA, audit.SIPS_SRTP, audit.ENCRYPTION)
_REKEY = (audit.CLIENT_CLIENT, audit.MEDIA, audit.SIPS_SRTP, audit.ENCRYPTION)


# -- SIP over UDP and TCP ----------------------------------------------------------------------
def _register(local: tuple[str, int], transport: str, user: str, expires: int = 60) -> bytes:
    host, port = local
    h = f"[{host}]" if ":" in host else host
    return (
        f"REGISTER sip:{DOMAIN} SIP/2.0\r\n"
        f"Via: SIP/2.0/{transport.upper()} {h}:{port};branch=z9hG4bK{secrets.token_hex(8)}"
        ";rport\r\n"
        f"Max-Forwards: 70\r\nFrom: <sip:{user}@{DOMAIN}>;tag={secrets.token_hex(4)}\r\n"
        f"To: <sip:{user}@{DOMAIN}>\r\nCall-ID: {secrets.token_hex(8)}@{h}\r\n"
        f"CSeq: 1 REGISTER\r\nContact: <sip:{user}@{h}:{port}>\r\nExpires: {expires}\r\n"
        f"User-Agent: {USER_AGENT}\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _udp_exchange(host: str, port: int, build: Callable[[tuple[str, int]], bytes]) -> bytes | None:
    with socket.socket(_family(host), socket.SOCK_DGRAM) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect((host, port))
        sock.send(build(sock.getsockname()[:2]))
        try:
            return sock.recv(65535)
        except (TimeoutError, ConnectionRefusedError):
            return None


def _tcp_exchange(host: str, port: int, build: Callable[[tuple[str, int]], bytes]) -> bytes | None:
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT) as sock:
            sock.sendall(build(sock.getsockname()[:2]))
            return sock.recv(65535) or None
    except OSError:
        return None


def _status_line(data: bytes | None) -> str | None:
    if not data or not data.startswith(b"SIP/2.0 "):
        return None
    return data.split(b"\r\n", 1)[0].decode(errors="replace")


def _plain_listener(url: ListenUrl) -> Check:
    host = _host(url)
    exchange = _udp_exchange if url.transport == "udp" else _tcp_exchange
    user = f"audit-{secrets.token_hex(3)}"
    line = _status_line(exchange(host, url.port, lambda a: _register(a, url.transport, user, 0)))
    where = f"{url.transport.upper()} {host}:{url.port}"
    if line is None:
        return _result(
            "plain-sip",
            _SIPS_ENC,
            f"{where} takes plain SIP (access.listen)",
            f"no SIP answer on {where}",
            "contradicts",
        )
    return _result(
        "plain-sip",
        _SIPS_ENC,
        f"{where} takes plain SIP (access.listen)",
        f"{where} answered {line!r}",
        "ok",
    )


def _plain_on_tls_port(url: ListenUrl) -> list[Check]:
    host, out = _host(url), []
    user = f"audit-{secrets.token_hex(3)}"
    for transport, exchange in (("udp", _udp_exchange), ("tcp", _tcp_exchange)):

        def build(local: tuple[str, int], transport: str = transport) -> bytes:
            return _register(local, transport, user, 0)

        line = _status_line(exchange(host, url.port, build))
        where = f"plain {transport.upper()} to {host}:{url.port} ({url})"
        expected = "no plain SIP on a TLS listener's port"
        if line is None:
            out.append(_result("plain-sip", _SIPS_ENC, expected, f"{where}: no answer", "ok"))
        else:
            out.append(
                _result("plain-sip", _SIPS_ENC, expected, f"{where}: {line!r}", "contradicts")
            )
    return out


# -- TLS ------------------------------------------------------------------------------------
def _client_context(
    *, low: ssl.TLSVersion | None = None, high: ssl.TLSVersion | None = None, ciphers: str = ""
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # what is checked here is the server's policy
    if low is not None:
        ctx.minimum_version = low
    if high is not None:
        ctx.maximum_version = high
    if ciphers:
        ctx.set_ciphers(ciphers)
    return ctx


def _handshake(url: ListenUrl, ctx: ssl.SSLContext) -> tuple[bool, str, ssl.SSLSocket | None]:
    """(handshake done, what happened, the socket if done: the caller closes it)."""
    host = _host(url)
    try:
        raw = socket.create_connection((host, url.port), timeout=TIMEOUT)
    except OSError as exc:
        return False, f"no connection: {exc}", None
    try:
        tls = ctx.wrap_socket(raw, server_hostname=None)
    except (ssl.SSLError, OSError) as exc:
        raw.close()
        return (
            False,
            f"refused: {exc.__class__.__name__}: {getattr(exc, 'reason', None) or exc}",
            None,
        )
    cipher = tls.cipher()
    return True, f"{tls.version()} {cipher[0] if cipher else ''}".strip(), tls


def _tls_version(url: ListenUrl, min_version: str) -> Check:
    cell = _SIPS_ENC
    old = ssl.TLSVersion.TLSv1_2 if min_version == "1.3" else ssl.TLSVersion.TLSv1_1
    label = "TLS 1.2" if min_version == "1.3" else "TLS 1.1"
    expected = (
        f"a handshake offering {label} at most is refused "
        f"(access.tls.min_version = {min_version!r})"
    )
    try:
        with _quiet_deprecation():
            ctx = _client_context(
                low=ssl.TLSVersion.MINIMUM_SUPPORTED, high=old, ciphers="ALL:@SECLEVEL=0"
            )
    except (ssl.SSLError, ValueError) as exc:
        return _result(
            "tls-version", cell, expected, f"this host cannot offer {label}: {exc}", "skipped"
        )
    done, what, tls = _handshake(url, ctx)
    if tls is not None:
        tls.close()
    if "no protocols available" in what or "NO_PROTOCOLS_AVAILABLE" in what:
        return _result(
            "tls-version", cell, expected, f"this host's OpenSSL cannot offer {label}", "skipped"
        )
    if done:
        return _result("tls-version", cell, expected, f"{url}: accepted {what}", "contradicts")
    return _result("tls-version", cell, expected, f"{url}: {what}", "ok")


@contextlib.contextmanager
def _quiet_deprecation() -> Iterator[None]:
    """TLS 1.0 and 1.1 are deprecated in Python's ssl: offering them is the point here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def _weak_cipher(url: ListenUrl, weak: list[str]) -> Check:
    cell = _SIPS_ENC
    if weak:
        expected = f"weak suites taken: access.tls.ciphers allows {', '.join(weak[:3])}"
    else:
        expected = "a TLS 1.2 handshake offering only weak suites is refused"
    ctx = _client_context(
        low=ssl.TLSVersion.TLSv1_2,
        high=ssl.TLSVersion.TLSv1_2,
        ciphers=f"{WEAK_SUITES}:@SECLEVEL=0",
    )
    done, what, tls = _handshake(url, ctx)
    if tls is not None:
        tls.close()
    if done == bool(weak):
        return _result("weak-cipher", cell, expected, f"{url}: {what}", "ok")
    return _result("weak-cipher", cell, expected, f"{url}: {what}", "contradicts")


def _client_certificate(url: ListenUrl, verify: bool) -> Check:
    expected = (
        "a handshake without a client certificate fails (access.tls.verify_clients = true)"
        if verify
        else "served without a client certificate (access.tls.verify_clients = false)"
    )
    done, what, tls = _handshake(url, _client_context(low=ssl.TLSVersion.TLSv1_2))
    served = False
    if tls is not None:
        # TLS 1.3: a missing certificate is refused after the handshake, at the first read.
        try:
            tls.sendall(b"\r\n\r\n")  # a keep-alive (RFC 5626 4.4.1): the SBC answers CRLF
            tls.settimeout(TIMEOUT)
            served = tls.recv(16) != b""
        except (ssl.SSLError, OSError) as exc:
            what = f"refused after the handshake: {exc.__class__.__name__}"
        finally:
            tls.close()
    ok = served != verify if done else verify
    observed = f"{url}: {what}" + (", keep-alive answered" if served else "")
    return _result(
        "client-certificate", _SIPS_AUTH, expected, observed, "ok" if ok else "contradicts"
    )


def _certificate(url: ListenUrl, public: str | None) -> Check:
    _, what, tls = _handshake(url, _client_context(low=ssl.TLSVersion.TLSv1_2))
    if tls is None:
        return _result("certificate", _SBC_AUTH, "a certificate to read", what, "skipped")
    try:
        der = tls.getpeercert(binary_form=True)
    finally:
        tls.close()
    if not der:
        return _result(
            "certificate", _SBC_AUTH, "a certificate to read", "none shown", "contradicts"
        )
    cert = x509.load_der_x509_certificate(der)
    names = _names(cert)
    wanted = [n for n in (public, _host(url)) if n]
    left = (cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)).days
    observed = f"{url}: names {', '.join(names) or 'none'}; expires in {left} days"
    expected = f"valid for more than {RENEW_DAYS} days, naming {' or '.join(wanted)}"
    if left < 0:
        return _result("certificate", _SBC_AUTH, expected, observed + " (expired)", "contradicts")
    if not any(_matches(n, w) for n in names for w in wanted):
        return _result("certificate", _SBC_AUTH, expected, observed, "warning")
    return _result(
        "certificate", _SBC_AUTH, expected, observed, "warning" if left < RENEW_DAYS else "ok"
    )


def _names(cert: x509.Certificate) -> list[str]:
    names: list[str] = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names += [str(n) for n in san.get_values_for_type(x509.DNSName)]
        names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        pass
    names += [str(a.value) for a in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
    return names


def _matches(name: str, wanted: str) -> bool:
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(name) == ipaddress.ip_address(wanted)
    if name.startswith("*."):
        return wanted.split(".", 1)[-1].lower() == name[2:].lower()
    return name.lower() == wanted.lower()


# -- media policy, through a call ----------------------------------------------------------------
def _sdp(host: str, port: int, proto: str, key: str | None) -> str:
    family = "IP6" if ":" in host else "IP4"
    lines = [
        "v=0",
        f"o=- 1 1 IN {family} {host}",
        "s=-",
        f"c=IN {family} {host}",
        "t=0 0",
        f"m=audio {port} {proto} 0",
        "a=rtpmap:0 PCMU/8000",
    ]
    if key:
        lines.append(f"a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:{key}")
    return "\r\n".join(lines) + "\r\n"


def _invite(local: tuple[str, int], user: str, sdp: str) -> bytes:
    host, port = local
    h = f"[{host}]" if ":" in host else host
    return (
        f"INVITE sip:{user}@{DOMAIN} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {h}:{port};branch=z9hG4bK{secrets.token_hex(8)};rport\r\n"
        f"Max-Forwards: 70\r\nFrom: <sip:audit-caller@{DOMAIN}>;tag={secrets.token_hex(4)}\r\n"
        f"To: <sip:{user}@{DOMAIN}>\r\nCall-ID: {secrets.token_hex(8)}@{h}\r\n"
        f"CSeq: 1 INVITE\r\nContact: <sip:audit-caller@{h}:{port}>\r\n"
        f"User-Agent: {USER_AGENT}\r\nContent-Type: application/sdp\r\n"
        f"Content-Length: {len(sdp)}\r\n\r\n{sdp}"
    ).encode()


def _media_checks(config: Config, f: audit.Facts, listeners: list[ListenUrl]) -> list[Check]:
    udp = next((u for u in listeners if u.transport == "udp"), None)
    srtp_expected = (
        'an RTP/AVP offer is refused with 488 (media.access_srtp = "mandatory")'
        if f.access_srtp == "mandatory"
        else f"an RTP/AVP offer is taken (media.access_srtp = {f.access_srtp!r})"
    )
    rekey_expected = (
        "the callee gets the caller's own SDES key (media.srtp_passthrough = true)"
        if f.passthrough
        else "the callee gets the SBC's SDES key, not the caller's (re-keyed per leg)"
    )
    if udp is None:
        why = "no udp:// access listener to place a call on"
        return [
            _result("srtp-mandatory", _SRTP, srtp_expected, why, "skipped"),
            _result("sdes-rekey", _REKEY, rekey_expected, why, "skipped"),
        ]
    if f.backends:
        why = "with backends the call would reach the core"
        out = [_result("sdes-rekey", _REKEY, rekey_expected, why, "skipped")]
        if f.access_srtp == "mandatory":
            out.insert(0, _srtp_refused(udp, srtp_expected, user="audit-nobody"))
        else:
            out.insert(0, _result("srtp-mandatory", _SRTP, srtp_expected, why, "skipped"))
        return out
    return _through_a_call(udp, f, srtp_expected, rekey_expected)


def _srtp_refused(url: ListenUrl, expected: str, *, user: str) -> Check:
    host = _host(url)
    line = _status_line(
        _udp_exchange(host, url.port, lambda a: _invite(a, user, _sdp(a[0], 4000, "RTP/AVP", None)))
    )
    ok = line is not None and " 488 " in f"{line} "
    return _result(
        "srtp-mandatory",
        _SRTP,
        expected,
        f"the RTP/AVP INVITE got {line!r}",
        "ok" if ok else "contradicts",
    )


def _through_a_call(
    url: ListenUrl, f: audit.Facts, srtp_expected: str, rekey_expected: str
) -> list[Check]:
    """Register a callee of our own with the embedded registrar, call it twice (RTP/AVP,
    then SDES-SRTP), look at what the callee gets, and remove the binding."""
    host = _host(url)
    user = f"audit-{secrets.token_hex(4)}"
    out: list[Check] = []
    with socket.socket(_family(host), socket.SOCK_DGRAM) as callee:
        callee.bind((host if host != "0.0.0.0" else "127.0.0.1", 0))
        callee.settimeout(TIMEOUT)
        here = callee.getsockname()[:2]
        callee.sendto(_register(here, "udp", user), (host, url.port))
        line = _status_line(_recv(callee))
        if line is None or not line.startswith("SIP/2.0 200"):
            why = f"the check's own REGISTER got {line!r}"
            return [
                _result("srtp-mandatory", _SRTP, srtp_expected, why, "skipped"),
                _result("sdes-rekey", _REKEY, rekey_expected, why, "skipped"),
            ]
        try:
            for name, proto, key, expected in (
                ("srtp-mandatory", "RTP/AVP", None, srtp_expected),
                ("sdes-rekey", "RTP/SAVP", _key(), rekey_expected),
            ):
                out.append(_call(name, url, user, callee, proto, key, expected, f))
        finally:
            callee.sendto(_register(here, "udp", user, 0), (host, url.port))
            _recv(callee)
    return out


def _recv(sock: socket.socket) -> bytes | None:
    got = _recv_from(sock)
    return None if got is None else got[0]


def _recv_from(sock: socket.socket) -> tuple[bytes, tuple[str, int]] | None:
    try:
        data, source = sock.recvfrom(65535)
    except (TimeoutError, OSError):
        return None
    return data, source[:2]


def _key() -> str:
    """An SDES master key and salt (RFC 4568 6.1: 30 octets for AES_CM_128_HMAC_SHA1_80)."""
    return base64.b64encode(secrets.token_bytes(30)).decode()


def _call(
    name: str,
    url: ListenUrl,
    user: str,
    callee: socket.socket,
    proto: str,
    key: str | None,
    expected: str,
    f: audit.Facts,
) -> Check:
    host = _host(url)
    cell = _SRTP if name == "srtp-mandatory" else _REKEY
    with socket.socket(_family(host), socket.SOCK_DGRAM) as caller:
        caller.settimeout(TIMEOUT)
        caller.connect((host, url.port))
        here = caller.getsockname()[:2]
        data = _invite(here, user, _sdp(here[0], 4000, proto, key))
        invite = parse_message(data)
        assert isinstance(invite, Request)
        caller.send(data)
        got = _callee_invite(callee)
        final = _final(caller, invite)
    if name == "srtp-mandatory":
        if f.access_srtp == "mandatory":
            ok = got is None and final is not None and final.status == 488
        else:
            ok = got is not None
        observed = (
            f"the callee got the INVITE; the caller got {final.status if final else None}"
            if got is not None
            else f"the caller got {final.status if final else None}"
        )
        return _result(name, cell, expected, observed, "ok" if ok else "contradicts")
    if got is None:
        status = final.status if final else None
        if f.access_srtp == "off":
            return _result(
                name, cell, expected, f'SRTP refused ({status}): access_srtp = "off"', "skipped"
            )
        return _result(
            name, cell, expected, f"the callee got no INVITE (caller: {status})", "contradicts"
        )
    keys = _offered_keys(got.body)
    same = key is not None and base64.b64decode(key) in keys
    observed = (
        f"the callee's offer carries {'the caller' if same else 'another'}'s key "
        f"({len(keys)} crypto line(s))"
    )
    ok = same == f.passthrough and bool(keys)
    return _result(name, cell, expected, observed, "ok" if ok else "contradicts")


def _offered_keys(body: bytes) -> list[bytes]:
    """The SDES master keys (key || salt) of an offer's a=crypto lines, by the project's
    SDP and SDES parsers (none if it is not SDP they take)."""
    keys: list[bytes] = []
    try:
        for m in Session.parse(body).media:
            keys += [Crypto.parse(value).key_salt for value in m.attributes("crypto")]
    except SdpError:
        pass
    return keys


def _callee_invite(callee: socket.socket) -> Request | None:
    """The INVITE the SBC sends our callee, answered 480 where it came from (the call ends
    there)."""
    while (got := _recv_from(callee)) is not None:
        data, source = got
        try:
            msg = parse_message(data)
        except ParseError:
            continue
        if isinstance(msg, Request) and msg.method == "INVITE":
            answer = make_response(msg, 480, to_tag=secrets.token_hex(4))
            with contextlib.suppress(OSError):
                callee.sendto(bytes(answer), source)
            return msg
    return None


def _final(caller: socket.socket, invite: Request) -> Response | None:
    """The caller's final answer (after any provisional), ACKed (RFC 3261 17.1.1.3: a
    non-2xx final is ACKed by the transaction, so the SBC stops resending it)."""
    while (data := _recv(caller)) is not None:
        try:
            msg = parse_message(data)
        except ParseError:
            continue
        if isinstance(msg, Response) and msg.status >= 200:
            with contextlib.suppress(OSError):
                caller.send(bytes(non2xx_ack(invite, msg)))
            return msg
    return None
