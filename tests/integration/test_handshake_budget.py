"""The handshake budget: limits.max_handshakes_per_second and limits.max_handshakes_per_client.

Per second: clients over the budget wait in the accept queue (not refused) and are served as
the bucket refills. Per client: a connection that would exceed the concurrent handshakes of
its address is closed at accept; other addresses are not affected.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time

import pytest

from tests.support.tlsclient import connect_tls

pytestmark = pytest.mark.timeout(60)

HOST = "127.0.0.1"


def test_handshakes_per_second_queue_excess_clients_instead_of_refusing(edgeterm, echo, client_ctx):
    rate = 20
    server = edgeterm.start([echo.addr], limits={"max_handshakes_per_second": rate})
    port = server.port()
    done: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = time.monotonic()

    def client() -> None:
        try:
            with connect_tls(port, client_ctx, timeout=20) as s:
                s.sendall(b"x")
                assert s.recv(1) == b"x"
            with lock:
                done.append(time.monotonic() - start)
        except BaseException as exc:  # collected and asserted below
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(3 * rate)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors[:3]
    assert len(done) == 3 * rate
    done.sort()
    # One second of burst (20) right away, then 20 per second: the last of 60 needs ~2 s.
    assert done[rate - 1] < 1.0, done[:rate]
    assert done[-1] > 1.5, f"60 handshakes in {done[-1]:.2f}s: the budget did not hold"
    assert done[-1] < 6.0, f"60 handshakes took {done[-1]:.2f}s: queued clients starved"


def _silent(src: str, port: int) -> socket.socket:
    """A TCP connection that starts no handshake: it holds a handshake slot until it times out."""
    s = socket.socket()
    s.bind((src, 0))
    s.settimeout(5)
    s.connect((HOST, port))
    return s


def _handshake_from(src: str, port: int, ctx: ssl.SSLContext) -> bool:
    raw = socket.socket()
    raw.bind((src, 0))
    raw.settimeout(5)
    raw.connect((HOST, port))
    try:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            s.sendall(b"ping")
            return s.recv(4) == b"ping"
    except (ssl.SSLError, OSError):
        return False


def test_handshakes_per_client_limit_one_address_not_others(edgeterm, echo, client_ctx):
    server = edgeterm.start([echo.addr], limits={"max_handshakes_per_client": 2})
    port = server.port()
    held = [_silent("127.0.0.1", port), _silent("127.0.0.1", port)]
    try:
        # Wait until the worker holds both (the third must see them): a bounded poll.
        deadline = time.monotonic() + 5
        refused = False
        while time.monotonic() < deadline:
            if not _handshake_from("127.0.0.1", port, client_ctx):
                refused = True
                break
        assert refused, "a third concurrent handshake from 127.0.0.1 was not refused"
        assert _handshake_from("127.0.0.2", port, client_ctx), "another address was refused"
    finally:
        held.pop().close()
    # One slot free again: the same address is served.
    deadline = time.monotonic() + 5
    while not _handshake_from("127.0.0.1", port, client_ctx):
        assert time.monotonic() < deadline, "127.0.0.1 not served after a slot was freed"
    for s in held:
        s.close()
