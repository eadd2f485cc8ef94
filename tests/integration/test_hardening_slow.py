"""Slow handshakes (slowloris on TLS): 1,000 sockets each send a real ClientHello one byte per
second while a normal client handshakes again and again.

The normal client's p99 handshake time stays under 50 ms, and every slow socket is closed by
edgeterm at ``timeouts.handshake`` (measured from its connect), without a byte sent to it.

The slow sockets live in a child process (multiprocessing, spawn), so that their bookkeeping
never holds this process's GIL while it times a handshake.
"""

from __future__ import annotations

import errno
import multiprocessing
import resource
import selectors
import socket
import ssl
import time
from typing import Any

import psutil
import pytest

from tests.support import procfs
from tests.support.tlsclient import HOST, connect_tls, recv_exactly
from tests.support.waiting import Deadline, wait_until

pytestmark = pytest.mark.timeout(90)

SLOW = 1000
HANDSHAKE_TIMEOUT = 3.0
P99_LIMIT = 0.050


@pytest.fixture(autouse=True, scope="module")
def many_fds() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < SLOW + 200:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below {SLOW + 200}")


def client_hello(ctx: ssl.SSLContext) -> bytes:
    """The bytes of a real ClientHello (what ``ctx`` sends first)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def slow_clients(port: int, count: int, hello: bytes, limit: float, conn: Any) -> None:
    """Child process: open ``count`` sockets, then send ``hello`` one byte per second on each;
    report ("ready",) once all are open, then ("done", [(closed_after, received), ...])."""
    sel = selectors.DefaultSelector()
    socks: list[socket.socket] = []
    opened: dict[int, float] = {}
    sent: dict[int, int] = {}
    for _ in range(count):
        s = socket.create_connection((HOST, port), timeout=10)
        s.setblocking(False)
        opened[s.fileno()] = time.monotonic()
        sent[s.fileno()] = 0
        sel.register(s, selectors.EVENT_READ)
        socks.append(s)
    conn.send(("ready",))
    results: dict[int, tuple[float, int]] = {}
    received: dict[int, int] = dict.fromkeys(opened, 0)
    deadline = time.monotonic() + limit
    while len(results) < count and time.monotonic() < deadline:
        now = time.monotonic()
        # one byte per second per socket, each on its own phase (its connect time)
        next_due = now + 1.0
        for s in socks:
            fd = s.fileno()
            if fd in results or fd < 0:
                continue
            due = opened[fd] + sent[fd]
            if due <= now and sent[fd] < len(hello):
                try:
                    s.send(hello[sent[fd] : sent[fd] + 1])
                    sent[fd] += 1
                except OSError as exc:
                    if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
                        raise
                due = opened[fd] + sent[fd]
            next_due = min(next_due, due)
        for key, _ in sel.select(max(0.0, min(0.05, next_due - time.monotonic()))):
            s = key.fileobj
            assert isinstance(s, socket.socket)
            fd = s.fileno()
            try:
                data = s.recv(4096)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                data = b""
            if data:
                received[fd] += len(data)
                continue
            results[fd] = (time.monotonic() - opened[fd], received[fd])
            sel.unregister(s)
    still_open = count - len(results)
    for s in socks:
        s.close()
    conn.send(("done", list(results.values()), still_open))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def test_slow_clienthellos_do_not_delay_a_normal_handshake(edgeterm, echo, client_ctx):
    server = edgeterm.start(
        [echo.addr],
        timeouts={"handshake": HANDSHAKE_TIMEOUT},
        limits={"max_connections": 20000},
    )
    port = server.port()
    workers = {p.pid for p in psutil.Process(server.pid).children()}
    assert workers, "no worker process"

    def handshake() -> float:
        start = time.perf_counter()
        s = connect_tls(port, client_ctx, timeout=5)
        elapsed = time.perf_counter() - start
        s.close()
        return elapsed

    baseline = [handshake() for _ in range(50)]
    fds_before = procfs.tree_fds(server.pid)

    ctx = multiprocessing.get_context("spawn")
    parent_end, child_end = ctx.Pipe()
    child = ctx.Process(
        target=slow_clients,
        args=(port, SLOW, client_hello(client_ctx), HANDSHAKE_TIMEOUT + 6, child_end),
        daemon=True,
    )
    child.start()
    try:
        assert parent_end.poll(30), "the slow clients did not connect"
        assert parent_end.recv() == ("ready",)
        # the server holds all of them (synchronise on the server, not on a sleep)
        wait_until(
            lambda: procfs.tree_fds(server.pid) >= fds_before + SLOW,
            timeout=HANDSHAKE_TIMEOUT * 2 / 3,  # a busy machine accepts 1,000 in ~0.2 s
            interval=0.01,
            what=f"edgeterm to accept {SLOW} slow clients",
        )
        # time handshakes until every slow socket has been closed, and a second more
        loaded: list[float] = []
        failures: list[str] = []
        window = Deadline(HANDSHAKE_TIMEOUT + 8)
        done_at: float | None = None
        while not window.expired():
            try:
                loaded.append(handshake())
            except (OSError, ssl.SSLError) as exc:
                failures.append(repr(exc))
            if done_at is None and parent_end.poll():
                done_at = time.monotonic()
            if done_at is not None and time.monotonic() - done_at > 1.0:
                break
            time.sleep(0.002)  # pacing: a new handshake every few ms, not synchronisation
        assert done_at is not None, "the slow clients did not finish"
        tag, closed, still_open = parent_end.recv()
    finally:
        child.join(15)
        if child.is_alive():
            child.kill()
            child.join(5)
    assert tag == "done"

    # every slow socket closed by the server at about the handshake timeout, with no answer
    assert still_open == 0, f"{still_open} slow sockets still open after {HANDSHAKE_TIMEOUT + 6}s"
    after = [a for a, _ in closed]
    assert len(after) == SLOW
    assert min(after) >= HANDSHAKE_TIMEOUT * 0.9, f"closed early: {min(after):.2f}s"
    assert max(after) <= HANDSHAKE_TIMEOUT + 1.0, f"closed late: {max(after):.2f}s"
    assert sum(n for _, n in closed) == 0, "a slow client was sent bytes"

    # the normal client was served throughout, fast
    assert not failures, failures[:5]
    assert len(loaded) >= 200, f"only {len(loaded)} handshakes in the window"
    p99 = percentile(loaded, 0.99)
    assert p99 < P99_LIMIT, (
        f"p99 handshake {p99 * 1000:.1f} ms under {SLOW} slow clients (n={len(loaded)}, "
        f"median {percentile(loaded, 0.5) * 1000:.1f} ms; idle: median "
        f"{percentile(baseline, 0.5) * 1000:.1f} ms, "
        f"p99 {percentile(baseline, 0.99) * 1000:.1f} ms)"
    )

    # the worker is the same process, and serves
    assert {p.pid for p in psutil.Process(server.pid).children()} == workers
    with connect_tls(port, client_ctx) as s:
        s.sendall(b"after the slow clients")
        assert recv_exactly(s, 22) == b"after the slow clients"
