"""Handshake and idle timeouts, and that silent clients do not stall anyone else."""

from __future__ import annotations

import selectors
import socket
import ssl
import statistics
import time

import pytest

from tests.support import procfs
from tests.support.tlsclient import (
    connect_tls,
    handshake_seconds,
    recv_exactly,
    wait_peer_close,
)
from tests.support.waiting import Deadline, wait_until

pytestmark = pytest.mark.timeout(90)

HANDSHAKE_TIMEOUT = 1.0


def test_silent_client_closed_after_handshake_timeout(edgeterm, echo):
    server = edgeterm.start([echo.addr], timeouts={"handshake": HANDSHAKE_TIMEOUT})
    with socket.create_connection(("127.0.0.1", server.port()), timeout=5) as s:
        closed = wait_peer_close(s, timeout=HANDSHAKE_TIMEOUT + 5)
    assert closed.after >= HANDSHAKE_TIMEOUT * 0.8, closed
    assert closed.after <= HANDSHAKE_TIMEOUT + 1.0, closed


def test_client_stuck_mid_handshake_closed_after_handshake_timeout(edgeterm, echo, client_ctx):
    """A client that sends a ClientHello and then nothing more is bounded the same way."""
    server = edgeterm.start([echo.addr], timeouts={"handshake": HANDSHAKE_TIMEOUT})
    raw = socket.create_connection(("127.0.0.1", server.port()), timeout=5)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = client_ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    raw.sendall(outgoing.read())  # the ClientHello; we never answer the ServerHello
    with raw:
        closed = wait_peer_close(raw, timeout=HANDSHAKE_TIMEOUT + 5)
    assert closed.after <= HANDSHAKE_TIMEOUT + 1.0, closed


@pytest.mark.slow
def test_500_silent_clients_do_not_delay_a_normal_handshake(edgeterm, echo, client_ctx):
    count = 500
    server = edgeterm.start([echo.addr], timeouts={"handshake": HANDSHAKE_TIMEOUT})
    port = server.port()
    handshake_seconds(port, client_ctx)  # warm-up
    baseline = statistics.median(handshake_seconds(port, client_ctx) for _ in range(7))

    silent: list[socket.socket] = []
    opened_at: dict[int, float] = {}
    try:
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            opened_at[s.fileno()] = time.monotonic()
            silent.append(s)
        # synchronise on the server: it holds a socket for each accepted silent client
        ports = {s.getsockname()[1] for s in silent}

        def accepted() -> bool:
            conns = procfs.tree_tcp_connections(server.pid)
            return sum(1 for c in conns if c.raddr and c.raddr.port in ports) >= count

        wait_until(
            accepted,
            timeout=HANDSHAKE_TIMEOUT,
            interval=0.005,
            what=f"edgeterm to accept {count} silent clients",
        )
        loaded = statistics.median(handshake_seconds(port, client_ctx) for _ in range(7))
        assert loaded - baseline <= 0.100, (
            f"median handshake {loaded * 1000:.1f} ms with {count} silent clients vs "
            f"{baseline * 1000:.1f} ms without"
        )

        # and every silent client is closed after about the handshake timeout
        sel = selectors.DefaultSelector()
        for s in silent:
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
        closed_after: list[float] = []
        deadline = Deadline(HANDSHAKE_TIMEOUT + 5)
        while len(closed_after) < count and not deadline.expired():
            for key, _ in sel.select(min(0.1, deadline.remaining())):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    data = sock.recv(1024)
                except (ConnectionResetError, BlockingIOError):
                    data = b""
                assert data == b"", f"a silent client received {data!r}"
                closed_after.append(time.monotonic() - opened_at[sock.fileno()])
                sel.unregister(sock)
        sel.close()
        assert len(closed_after) == count, f"{count - len(closed_after)} silent clients still open"
        assert min(closed_after) >= HANDSHAKE_TIMEOUT * 0.8, min(closed_after)
        assert max(closed_after) <= HANDSHAKE_TIMEOUT + 2.0, max(closed_after)
    finally:
        for s in silent:
            s.close()
    # served normally afterwards
    with connect_tls(port, client_ctx) as s:
        s.sendall(b"after")
        assert recv_exactly(s, 5) == b"after"


def test_idle_connection_closed_with_close_notify(edgeterm, echo, client_ctx):
    idle = 1.0
    server = edgeterm.start([echo.addr], timeouts={"idle": idle})
    with connect_tls(server.port(), client_ctx, timeout=idle + 10) as s:
        s.sendall(b"ping")
        assert recv_exactly(s, 4) == b"ping"
        start = time.monotonic()
        assert s.recv(1024) == b""  # close_notify; SSLEOFError if it is a bare FIN
        elapsed = time.monotonic() - start
    assert idle * 0.8 <= elapsed <= idle + 1.5, elapsed
    (rec,) = echo.wait_done(1, timeout=5)
    assert rec.eof_received or rec.error


def test_active_connection_not_closed_by_idle_timeout(edgeterm, echo, client_ctx):
    idle = 1.0
    server = edgeterm.start([echo.addr], timeouts={"idle": idle})
    with connect_tls(server.port(), client_ctx) as s:
        end = time.monotonic() + 3 * idle
        n = 0
        while time.monotonic() < end:  # bounded: 3 idle periods of steady traffic
            s.sendall(b"x" * 100)
            assert recv_exactly(s, 100, timeout=5) == b"x" * 100
            n += 1
            time.sleep(idle / 4)  # pacing: traffic every quarter of the idle timeout
        assert n >= 8
