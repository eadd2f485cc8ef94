"""Garbage instead of a ClientHello: the client gets an alert or a close, the next is served."""

from __future__ import annotations

import contextlib
import os
import socket

import pytest

from tests.support.tlsclient import connect_tls, recv_exactly, tls_alert, wait_peer_close

pytestmark = pytest.mark.timeout(60)

GARBAGE = {
    "http-request": b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "random-4k": os.urandom(4096),
    "zeros": bytes(512),
    # a handshake record header announcing more than a TLS record may hold
    "oversized-record": b"\x16\x03\x01\xff\xff" + os.urandom(64),
    # a well-formed record header around a body that is not a ClientHello
    "bogus-handshake": b"\x16\x03\x01\x00\x40" + os.urandom(64),
    "sslv2-hello": bytes.fromhex("802b0103010012000000100100800700c0030080060040020080040080")
    + os.urandom(16),
}


@pytest.fixture
def server(edgeterm, echo):
    # a long handshake timeout: the close we wait for must come from the garbage, not the timer
    return edgeterm.start([echo.addr], timeouts={"handshake": 30.0})


@pytest.mark.parametrize("name", list(GARBAGE))
def test_garbage_gets_alert_or_close_then_next_client_served(server, client_ctx, name):
    with socket.create_connection(("127.0.0.1", server.port()), timeout=5) as s:
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            s.sendall(GARBAGE[name])  # the server may close while we are still sending
        closed = wait_peer_close(s, timeout=5)
    if closed.data:
        assert tls_alert(closed.data) is not None, (
            f"answered {closed.data[:32]!r} instead of a TLS alert"
        )
        level, _ = tls_alert(closed.data)  # type: ignore[misc]
        assert level == 2, f"alert level {level}, expected fatal (2)"

    with connect_tls(server.port(), client_ctx) as c:
        c.sendall(b"next client")
        assert recv_exactly(c, 11) == b"next client"


def test_many_garbage_clients_then_served(server, client_ctx):
    for payload in list(GARBAGE.values()) * 10:
        with socket.create_connection(("127.0.0.1", server.port()), timeout=5) as s:
            try:
                s.sendall(payload)
            except (ConnectionResetError, BrokenPipeError):
                continue
            wait_peer_close(s, timeout=5)
    with connect_tls(server.port(), client_ctx) as c:
        c.sendall(b"still serving")
        assert recv_exactly(c, 13) == b"still serving"
