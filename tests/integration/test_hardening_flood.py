"""Connection floods: 5,000 connections reset in the middle of the handshake, then 5,000 opened
and abandoned (half silent, half stopping after half a ClientHello, all left open until the
server times them out).

Throughout, a normal client is served (every request answered), no worker dies or is
replaced, and once the timeouts have passed, every edgeterm process (supervisor and each
worker) holds exactly the file descriptors it held before the flood (/proc/PID/fd).
"""

from __future__ import annotations

import os
import resource
import selectors
import socket
import ssl
import struct
import time

import psutil
import pytest

from tests.support.supervision import (
    ClientLoop,
    admin_status,
    serving_workers,
    supervised_config,
    wait_status,
)
from tests.support.tlsclient import HOST, connect_tls, recv_exactly
from tests.support.waiting import Deadline, WaitTimeout, wait_until

pytestmark = pytest.mark.timeout(90)

FLOOD = 5000
HANDSHAKE_TIMEOUT = 2.0
LINGER = 1.0  # workers/connection.py: the most a failed handshake lingers for the client's EOF


@pytest.fixture(autouse=True, scope="module")
def many_fds() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < FLOOD + 500:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below {FLOOD + 500}")


def fd_counts(pid: int) -> dict[int, int]:
    """Open descriptors of the supervisor and each worker, from /proc/PID/fd."""
    counts = {}
    root = psutil.Process(pid)
    for p in [root, *root.children()]:
        try:
            counts[p.pid] = len(os.listdir(f"/proc/{p.pid}/fd"))
        except FileNotFoundError:
            continue
    return counts


def half_hello(ctx: ssl.SSLContext) -> bytes:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = outgoing.read()
    return hello[: len(hello) // 2]


def connect(port: int) -> socket.socket:
    return socket.create_connection((HOST, port), timeout=10)


def test_reset_and_abandoned_floods_leak_nothing(edgeterm, echo, client_ctx):
    cfg, _, admin_socket = supervised_config(edgeterm, [echo.addr])
    cfg["timeouts"]["handshake"] = HANDSHAKE_TIMEOUT
    cfg["limits"]["max_connections"] = 2 * FLOOD
    server = edgeterm.start(cfg=cfg)
    port = server.port()
    workers = [w["pid"] for w in serving_workers(admin_status(admin_socket))]
    assert len(workers) == 2

    # warm-up, then the descriptors each process holds when idle
    for _ in range(20):
        with connect_tls(port, client_ctx) as s:
            s.sendall(b"warm")
            assert recv_exactly(s, 4) == b"warm"
    wait_until(lambda: sum(fd_counts(server.pid).values()) > 0, timeout=5, what="the process tree")
    idle = wait_until(lambda: stable_fd_counts(server.pid), timeout=10, what="idle fd counts")

    hello = half_hello(client_ctx)
    loop = ClientLoop(port, client_ctx, pause=0.01, max_seconds=80).start()
    try:
        loop.wait_ok(5, timeout=10)

        # 1. resets in the middle of the handshake: half a ClientHello, then RST
        linger0 = struct.pack("ii", 1, 0)
        for _ in range(FLOOD):
            s = connect(port)
            s.sendall(hello)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger0)
            s.close()
        loop.wait_ok(5, timeout=10)

        # 2. opened and abandoned: held open, silent or after half a ClientHello
        abandoned = []
        for i in range(FLOOD):
            s = connect(port)
            if i % 2:
                s.sendall(hello)
            abandoned.append(s)
        opened_at = time.monotonic()
        loop.wait_ok(5, timeout=10)
        # the server closes each at the handshake timeout (a FIN: it read what was sent)
        still_open = wait_for_server_closes(abandoned, deadline=HANDSHAKE_TIMEOUT + 10)
        closed_after = time.monotonic() - opened_at
        for s in abandoned:
            s.close()
        assert still_open == 0, f"{still_open} abandoned connections not closed by edgeterm"
        assert closed_after <= HANDSHAKE_TIMEOUT + 5, f"closing took {closed_after:.1f}s"
        loop.wait_ok(5, timeout=10)
    finally:
        loop.stop()

    assert loop.failed == 0, loop.summary()
    assert loop.ok >= 20, loop.summary()

    # the workers saw the floods: every connection accepted, the abandoned ones timed out
    # (the counters reach the admin socket with the next heartbeat: poll, bounded)
    def timeouts(st) -> int:
        return sum(w["closed_by"].get("handshake_timeout", 0) for w in serving_workers(st))

    st = wait_status(
        admin_socket,
        lambda st: (
            sum(w["accepted"] for w in serving_workers(st)) >= 2 * FLOOD + loop.ok
            and timeouts(st) >= FLOOD
        ),
        timeout=5,
        what=f"the workers' counters to show {2 * FLOOD} accepted, {FLOOD} timed out",
    )
    assert [w["pid"] for w in serving_workers(st)] == workers, "a worker was replaced"
    assert st["restarts"] == 0, st["restarts"]
    assert server.running()

    # every process is back to its idle descriptors (after the handshake timeout and linger)
    try:
        wait_until(
            lambda: fd_counts(server.pid) == idle,
            timeout=HANDSHAKE_TIMEOUT + LINGER + 10,
            interval=0.1,
            what="every edgeterm process back to its idle fd count",
        )
    except WaitTimeout as exc:
        raise AssertionError(f"{exc}: idle {idle}, now {fd_counts(server.pid)}") from None

    # and serves
    with connect_tls(port, client_ctx) as s:
        s.sendall(b"after the floods")
        assert recv_exactly(s, 16) == b"after the floods"


def stable_fd_counts(pid: int) -> dict[int, int] | None:
    """The fd counts, once two readings 0.3 s apart agree (lingering closes are over)."""
    first = fd_counts(pid)
    time.sleep(0.3)  # two readings apart in time: that is what "stable" means here
    return first if fd_counts(pid) == first else None


def wait_for_server_closes(socks: list[socket.socket], *, deadline: float) -> int:
    """Wait until the peer has closed every socket (EOF or reset); return how many did not."""
    sel = selectors.DefaultSelector()
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    left = len(socks)
    limit = Deadline(deadline)
    try:
        while left and not limit.expired():
            for key, _ in sel.select(min(0.2, limit.remaining())):
                s = key.fileobj
                assert isinstance(s, socket.socket)
                try:
                    data = s.recv(4096)
                except BlockingIOError:
                    continue
                except ConnectionResetError:
                    data = b""
                assert data == b"", f"an abandoned connection was sent {data[:16]!r}"
                sel.unregister(s)
                left -= 1
    finally:
        sel.close()
    return left
