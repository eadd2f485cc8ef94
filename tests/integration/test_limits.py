"""``limits.max_connections``: at the limit edgeterm stops accepting; it does not refuse."""

from __future__ import annotations

import os
import socket
import ssl
import threading
import time

import pytest

from tests.support.tlsclient import connect_tls, recv_exactly

pytestmark = pytest.mark.timeout(60)

LIMIT = 10


def round_trip(s: ssl.SSLSocket, size: int = 1000) -> None:
    payload = os.urandom(size)
    s.sendall(payload)
    assert recv_exactly(s, size, timeout=10) == payload


class BackgroundHandshake(threading.Thread):
    """Completes a TLS handshake on an already connected TCP socket, in the background."""

    def __init__(self, raw: socket.socket, ctx: ssl.SSLContext) -> None:
        super().__init__(daemon=True)
        raw.settimeout(30)
        self.tls = ctx.wrap_socket(
            raw,
            server_hostname="localhost",
            do_handshake_on_connect=False,
            suppress_ragged_eofs=False,
        )
        self.done_at: float | None = None
        self.error: BaseException | None = None

    def completed_at(self) -> float | None:
        return self.done_at

    def run(self) -> None:
        try:
            self.tls.do_handshake()
            self.done_at = time.monotonic()
        except BaseException as exc:
            self.error = exc


def test_eleventh_client_waits_and_is_served_when_one_leaves(edgeterm, echo, client_ctx):
    server = edgeterm.start(
        [echo.addr], limits={"max_connections": LIMIT}, timeouts={"handshake": 30.0}
    )
    port = server.port()
    held = [connect_tls(port, client_ctx) for _ in range(LIMIT)]
    try:
        for s in held:
            round_trip(s)

        # the 11th: its TCP connect succeeds (the kernel queues it) ...
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        eleventh = BackgroundHandshake(raw, client_ctx)
        eleventh.start()
        # ... but its handshake does not complete while the ten are held, and it is not reset
        eleventh.join(2.0)  # a negative check: nothing must happen during this time
        assert eleventh.error is None, f"the 11th client was refused: {eleventh.error!r}"
        assert eleventh.is_alive() and eleventh.completed_at() is None, (
            "the 11th handshake completed while 10 connections were held"
        )

        # one of the ten leaves: the 11th is served promptly
        leaving = held.pop()
        leaving.close()
        left_at = time.monotonic()
        eleventh.join(10)
        assert eleventh.error is None, f"the 11th client failed: {eleventh.error!r}"
        done_at = eleventh.completed_at()
        assert done_at is not None, "the 11th handshake did not complete"
        assert done_at - left_at < 2.0, f"served {done_at - left_at:.2f}s late"
        held.append(eleventh.tls)
        for s in held:  # all ten (including the newcomer) work
            round_trip(s)
    finally:
        for s in held:
            s.close()


def test_limit_frees_up_for_later_clients(edgeterm, echo, client_ctx):
    """After reaching the limit several times, the count goes back down: no leak of slots."""
    server = edgeterm.start([echo.addr], limits={"max_connections": LIMIT})
    port = server.port()
    for _ in range(3):
        batch = [connect_tls(port, client_ctx) for _ in range(LIMIT)]
        for s in batch:
            round_trip(s)
        for s in batch:
            s.close()
    # with every slot free again, a full batch is served at once
    batch = [connect_tls(port, client_ctx, timeout=5) for _ in range(LIMIT)]
    for s in batch:
        round_trip(s)
        s.close()
