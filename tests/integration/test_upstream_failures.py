"""Upstreams that refuse or never answer: the client is closed in time; a second server serves."""

from __future__ import annotations

import os
import socket
import ssl
import time

import pytest

from tests.support.tlsclient import connect_tls, recv_exactly

pytestmark = pytest.mark.timeout(60)

MARGIN = 1.0  # seconds of slack for process scheduling on a busy 2-core machine


def wait_closed_after_handshake(
    port: int, ctx: ssl.SSLContext, *, timeout: float
) -> tuple[str, float]:
    """Connect and handshake, send nothing, and wait for edgeterm to end the connection.

    Returns (how, seconds since the TCP connect): "close_notify", "eof without close_notify",
    "reset" or "handshake failed: ...".
    """
    start = time.monotonic()
    try:
        s = connect_tls(port, ctx, timeout=timeout)
    except ssl.SSLError as exc:
        return f"handshake failed: {exc}", time.monotonic() - start
    except ConnectionError as exc:
        return f"handshake failed: {exc!r}", time.monotonic() - start
    with s:
        try:
            data = s.recv(1024)
        except ssl.SSLEOFError:
            return "eof without close_notify", time.monotonic() - start
        except ConnectionResetError:
            return "reset", time.monotonic() - start
        except TimeoutError:
            return "still open", time.monotonic() - start
        assert data == b"", f"unexpected data {data!r}"
        return "close_notify", time.monotonic() - start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_refusing_upstream_client_closed_within_connect_timeout(
    edgeterm, refusing_port, client_ctx
):
    connect_timeout = 2.0
    server = edgeterm.start([refusing_port.addr], timeouts={"connect": connect_timeout})
    how, elapsed = wait_closed_after_handshake(
        server.port(), client_ctx, timeout=connect_timeout + 10
    )
    assert how != "still open"
    assert elapsed <= connect_timeout + MARGIN, f"closed after {elapsed:.2f}s ({how})"
    # the handshake had completed: the close must be a clean one (close_notify)
    assert how == "close_notify", how


def test_unresponsive_upstream_client_closed_within_connect_timeout(
    edgeterm, blackhole_port, client_ctx
):
    connect_timeout = 1.5
    server = edgeterm.start([blackhole_port.addr], timeouts={"connect": connect_timeout})
    how, elapsed = wait_closed_after_handshake(
        server.port(), client_ctx, timeout=connect_timeout + 10
    )
    assert how != "still open", f"not closed after {elapsed:.1f}s"
    assert elapsed <= connect_timeout + MARGIN, f"closed after {elapsed:.2f}s ({how})"
    assert elapsed >= connect_timeout * 0.8, f"gave up after {elapsed:.2f}s, before the timeout"
    assert how == "close_notify", how


def test_first_server_refuses_second_serves(edgeterm, refusing_port, echo, client_ctx):
    server = edgeterm.start([refusing_port.addr, echo.addr], timeouts={"connect": 3.0})
    n = 6  # round robin: some connections try the refusing server first, every one is served
    for _ in range(n):
        start = time.monotonic()
        with connect_tls(server.port(), client_ctx) as s:
            payload = os.urandom(10_000)
            s.sendall(payload)
            assert recv_exactly(s, len(payload), timeout=10) == payload
        assert time.monotonic() - start < 3.0
    assert len(echo.wait_connections(n)) == n


def test_server_keeps_serving_after_refused_upstreams(edgeterm, refusing_port, echo, client_ctx):
    """Two listeners: one to a dead pool, one to a live one; failures on the first do not
    disturb the second."""
    cfg = edgeterm.config([echo.addr])
    # a distinct bind string (two listeners on "127.0.0.1:0" is covered in test_lifecycle)
    cfg["listeners"].append(
        {"name": "dead", "bind": f"127.0.0.1:{free_port()}", "upstream": "dead", "backlog": 128}
    )
    cfg["upstreams"]["dead"] = {"servers": [refusing_port.addr]}
    cfg["timeouts"]["connect"] = 2.0
    server = edgeterm.start(cfg=cfg)
    for _ in range(20):
        how, _ = wait_closed_after_handshake(server.port("dead"), client_ctx, timeout=10)
        assert how != "still open"
    with connect_tls(server.port("https"), client_ctx) as s:
        s.sendall(b"still here")
        assert recv_exactly(s, 10) == b"still here"
    # plain TCP connect to the dead listener is still accepted (the listener is alive)
    socket.create_connection(("127.0.0.1", server.port("dead")), timeout=5).close()
