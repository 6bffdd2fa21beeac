"""Raw sockets against the real ``sbc run``: stream framing, keep-alives, size limits, TLS.

What SIPp cannot send (broken framing, a request without Call-ID, a CSeq method mismatch)
or cannot check (that a connection was closed, exact bytes of a keep-alive pong) is done
here with plain sockets, against the same process.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from . import sipwire
from .conftest import (
    MAX_MESSAGE_SIZE,
    SERVER_HEADER,
    TCP_IDLE_TIMEOUT,
    Certs,
    SbcProcess,
    require_ipv6,
)

pytestmark = pytest.mark.interop


@contextmanager
def tcp(sbc: SbcProcess, host: str | None = None) -> Iterator[sipwire.StreamReader]:
    host = host or sbc.host4
    port = sbc.tcp4 if host == sbc.host4 else sbc.tcp6
    assert port is not None
    with socket.create_connection((host, port), timeout=2) as sock:
        yield sipwire.StreamReader(sock)


@contextmanager
def tls(sbc: SbcProcess, certs: Certs) -> Iterator[sipwire.StreamReader]:
    """TLS with full verification of the SBC's certificate against the dev CA."""
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    ctx.load_cert_chain(str(certs.client_cert), str(certs.client_key))
    with (
        socket.create_connection((sbc.host4, sbc.tls4), timeout=2) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as sock,
    ):
        yield sipwire.StreamReader(sock)


def stream_request(reader: sipwire.StreamReader, transport: str, **kwargs: object) -> bytes:
    host, port = reader.sock.getpeername()[:2]
    return sipwire.request(
        target=sipwire.hostport(host, port),
        transport=transport,
        local=reader.sock.getsockname()[:2],
        **kwargs,  # type: ignore[arg-type]
    )


def assert_ok(response: sipwire.Response, call_id: str | None = None) -> None:
    assert response.status == 200, response.raw
    assert response.get("server") == SERVER_HEADER, response.raw
    if call_id is not None:
        assert response.get("call-id") == call_id, response.raw


def udp_request(sbc: SbcProcess, sock: socket.socket, **kwargs: object) -> sipwire.Response:
    data = sipwire.request(
        target=sipwire.hostport(sbc.host4, sbc.udp4),
        transport="udp",
        local=sock.getsockname()[:2],
        **kwargs,  # type: ignore[arg-type]
    )
    return sipwire.udp_exchange(sock, (sbc.host4, sbc.udp4), data)


# -- stream framing -----------------------------------------------------------------------
FRAMING_FAULTS = {
    # RFC 3261 20.14: Content-Length is 1*DIGIT; a negative one cannot frame anything.
    "negative": ({"content_length": "-5"}, "Content-Length"),
    "not-a-number": ({"content_length": "five"}, "Content-Length"),
    # RFC 3261 18.3: on a stream Content-Length MUST be present.
    "missing": ({"omit": ("Content-Length",)}, "Content-Length"),
}


@pytest.mark.parametrize("fault", FRAMING_FAULTS)
def test_framing_error_closes_only_that_connection(sbc: SbcProcess, fault: str) -> None:
    """400 naming Content-Length, then that connection closes; others carry on."""
    kwargs, named = FRAMING_FAULTS[fault]
    with tcp(sbc) as good, tcp(sbc) as bad:
        good.sock.sendall(stream_request(good, "tcp", call_id="before@interop"))
        assert_ok(good.response(), "before@interop")

        bad.sock.sendall(stream_request(bad, "tcp", call_id="broken@interop", **kwargs))
        response = bad.response()
        assert response.status == 400, response.raw
        assert named in response.reason, response.raw
        assert response.get("call-id") == "broken@interop", response.raw
        assert bad.at_eof(), "the SBC kept a connection with broken framing open"
        assert bad.buffer == b"", bad.buffer

        # The other connection and UDP are unaffected.
        for n in range(3):
            good.sock.sendall(stream_request(good, "tcp", call_id=f"after-{n}@interop"))
            assert_ok(good.response(), f"after-{n}@interop")
        assert_ok(sbc.options_udp())


def test_stream_pipelined_and_fragmented(sbc: SbcProcess) -> None:
    """Two requests in one segment get two answers; one request in pieces gets one."""
    with tcp(sbc) as conn:
        first = stream_request(conn, "tcp", call_id="pipe-1@interop")
        second = stream_request(conn, "tcp", call_id="pipe-2@interop")
        conn.sock.sendall(first + second)
        assert_ok(conn.response(), "pipe-1@interop")
        assert_ok(conn.response(), "pipe-2@interop")

        data = stream_request(conn, "tcp", call_id="frag@interop")
        for start in range(0, len(data), 40):
            conn.sock.sendall(data[start : start + 40])
            time.sleep(0.005)
        assert_ok(conn.response(), "frag@interop")


# -- keep-alives ----------------------------------------------------------------------------
@pytest.mark.parametrize("transport", ["tcp", "tls", "tcp6"])
def test_crlf_keepalive_pong(sbc: SbcProcess, certs: Certs, transport: str) -> None:
    """RFC 5626 3.5.1: CRLFCRLF ping gets exactly a CRLF pong; the connection stays usable."""
    if transport == "tcp6":
        require_ipv6()
    opened = (
        tls(sbc, certs) if transport == "tls" else tcp(sbc, "::1" if transport == "tcp6" else None)
    )
    with opened as conn:
        for _ in range(2):
            conn.sock.sendall(b"\r\n\r\n")
            assert conn.read_exact(2) == b"\r\n"
        conn.sock.sendall(stream_request(conn, transport[:3], call_id="after-ping@interop"))
        assert_ok(conn.response(), "after-ping@interop")
        assert conn.buffer == b"", f"more than one CRLF per ping: {conn.buffer!r}"


def test_udp_crlf_keepalive_is_ignored(sbc: SbcProcess) -> None:
    """A CRLFCRLF datagram is not a message: no answer, and the next OPTIONS gets its 200."""
    with sipwire.udp_socket(sbc.host4) as sock:
        sock.sendto(b"\r\n\r\n", (sbc.host4, sbc.udp4))
        response = udp_request(sbc, sock, call_id="after-crlf@interop")
        assert_ok(response, "after-crlf@interop")  # the first datagram back is the 200


# -- size limits ----------------------------------------------------------------------------
def _oversized(**kwargs: object) -> dict[str, object]:
    body = b"x" * (MAX_MESSAGE_SIZE + 100)
    return {"body": body, "extra": (("Content-Type", "text/plain"),), **kwargs}


def test_oversized_udp_gets_413(sbc: SbcProcess) -> None:
    """A datagram above [sip] max_message_size gets 413; the socket keeps working."""
    with sipwire.udp_socket(sbc.host4) as sock:
        response = udp_request(sbc, sock, **_oversized(call_id="big@interop"))
        assert response.status == 413, response.raw
        assert response.get("call-id") == "big@interop", response.raw
        assert_ok(udp_request(sbc, sock, call_id="small@interop"), "small@interop")


def test_oversized_tcp_gets_413_and_keeps_connection(sbc: SbcProcess) -> None:
    """With a valid Content-Length the oversized body is skipped, not mistaken for a request."""
    with tcp(sbc) as conn:
        conn.sock.sendall(stream_request(conn, "tcp", **_oversized(call_id="big@interop")))
        response = conn.response()
        assert response.status == 413, response.raw
        assert response.get("call-id") == "big@interop", response.raw
        conn.sock.sendall(stream_request(conn, "tcp", call_id="small@interop"))
        assert_ok(conn.response(), "small@interop")


# -- malformed requests SIPp cannot send ------------------------------------------------------
MALFORMED = {
    "no-call-id": ({"omit": ("Call-ID",)}, "Missing Call-ID Header"),
    "cseq-method-mismatch": ({"cseq": "1 INVITE"}, "CSeq Method Does Not Match"),
}


@pytest.mark.parametrize("fault", MALFORMED)
def test_malformed_then_valid_udp(sbc: SbcProcess, fault: str) -> None:
    kwargs, reason = MALFORMED[fault]
    with sipwire.udp_socket(sbc.host4) as sock:
        response = udp_request(sbc, sock, **kwargs)
        assert (response.status, response.reason) == (400, reason), response.raw
        assert_ok(udp_request(sbc, sock, call_id="valid@interop"), "valid@interop")


@pytest.mark.parametrize("fault", MALFORMED)
def test_malformed_then_valid_tcp(sbc: SbcProcess, fault: str) -> None:
    kwargs, reason = MALFORMED[fault]
    with tcp(sbc) as conn:
        conn.sock.sendall(stream_request(conn, "tcp", **kwargs))
        response = conn.response()
        assert (response.status, response.reason) == (400, reason), response.raw
        conn.sock.sendall(stream_request(conn, "tcp", call_id="valid@interop"))
        assert_ok(conn.response(), "valid@interop")


def test_final_responses(sbc: SbcProcess) -> None:
    """Requests the SBC cannot handle yet get a proper final response, not silence."""
    with sipwire.udp_socket(sbc.host4) as sock:
        # RFC 3261 8.2.1: an unknown method gets 501 with Allow.
        response = udp_request(sbc, sock, method="FROBNICATE")
        assert response.status == 501, response.raw
        assert "OPTIONS" in (response.get("allow") or ""), response.raw
        # A request the SBC cannot route (no backend configured) gets a final 404.
        local = sock.getsockname()[:2]
        data = sipwire.request(
            target="bob@example.com", transport="udp", local=local, method="MESSAGE"
        )
        response = sipwire.udp_exchange(sock, (sbc.host4, sbc.udp4), data)
        assert response.status == 404, response.raw


# -- rport on every response ------------------------------------------------------------------
VIA_CASES = {
    "200": ({}, 200),
    "400-sanity": ({"omit": ("From",)}, 400),
    "413-parser": (_oversized(), 413),
}


@pytest.mark.parametrize("case", VIA_CASES)
def test_every_udp_response_fills_rport(sbc: SbcProcess, case: str) -> None:
    """RFC 3581 4: the server MUST set the empty rport of the top Via to the source port
    and add received, in every response (RFC 3261 18.2.1, 8.2.6.2: Via is copied from the
    request as the transport layer left it), including rejections."""
    kwargs, status = VIA_CASES[case]
    with sipwire.udp_socket(sbc.host4) as sock:
        port = sock.getsockname()[1]
        response = udp_request(sbc, sock, **kwargs)
        assert response.status == status, response.raw
        via = response.get("via") or ""
        params = dict(p.partition("=")[::2] for p in via.split(";")[1:])
        assert params.get("rport") == str(port), f"top Via {via!r} of {response.raw!r}"
        assert params.get("received") == sbc.host4, f"top Via {via!r} of {response.raw!r}"


# -- TLS --------------------------------------------------------------------------------------
def test_tls_options_with_verified_certificate(sbc: SbcProcess, certs: Certs) -> None:
    """The SBC's certificate from ``sbc gen-certs`` verifies against its CA for localhost."""
    with tls(sbc, certs) as conn:
        assert isinstance(conn.sock, ssl.SSLSocket)
        assert conn.sock.version() in ("TLSv1.2", "TLSv1.3")
        for n in range(3):
            conn.sock.sendall(stream_request(conn, "tls", call_id=f"tls-{n}@interop"))
            response = conn.response()
            assert_ok(response, f"tls-{n}@interop")
            assert "SIP/2.0/TLS" in (response.get("via") or ""), response.raw


def test_idle_connection_is_closed(sbc: SbcProcess) -> None:
    """[sip] tcp_idle_timeout: a connection with no traffic is closed by the SBC, not before."""
    with tcp(sbc) as conn:
        conn.sock.sendall(stream_request(conn, "tcp", call_id="idle@interop"))
        assert_ok(conn.response(), "idle@interop")
        started = time.monotonic()
        conn.sock.settimeout(TCP_IDLE_TIMEOUT + 3.0)
        assert conn.sock.recv(100) == b"", "the SBC sent data instead of closing"
        waited = time.monotonic() - started
        assert TCP_IDLE_TIMEOUT - 0.3 <= waited <= TCP_IDLE_TIMEOUT + 2.0, waited
