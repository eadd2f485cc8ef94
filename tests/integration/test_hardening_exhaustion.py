"""Resource exhaustion: the file limit (EMFILE), upstreams whose accept queue is full, and many
clients that never read.

- EMFILE: edgeterm runs under ``prlimit --nofile=32:32``; more clients arrive at once than the
  worker has descriptors for. The worker backs off (clients wait in the accept queue), does not
  die, and serves new clients by itself once the first ones leave.
- Upstream backlog full (``BlackholePort``: a listener that never accepts, its queue filled):
  many clients at once are each closed with close_notify at ``timeouts.connect``, no upstream
  socket is left behind; with a second server in the pool, every client is served after one
  connect timeout. (One client against a black hole is tests/integration/test_upstream_failures.)
- Clients that never read while the upstream streams: each connection holds at most its bounded
  buffer, so the worker's RSS stays flat however much the upstreams offer. (One slow reader is
  tests/integration/test_backpressure; this is the many-connection bound.)
"""

from __future__ import annotations

import os
import shutil
import ssl
import threading
import time
from collections import Counter

import psutil
import pytest

from tests.support import launcher, procfs
from tests.support.supervision import echo_once, supervised_config, wait_status
from tests.support.tlsclient import connect_tls, recv_exactly
from tests.support.upstreams import SourceSinkUpstream, source_sink_header
from tests.support.waiting import Deadline, WaitTimeout, wait_until

pytestmark = pytest.mark.timeout(90)

MiB = 1 << 20


def worker_pids(server) -> set[int]:
    return {p.pid for p in psutil.Process(server.pid).children()}


# -- EMFILE -----------------------------------------------------------------------------------

FD_LIMIT = 32


class HeldClient(threading.Thread):
    """Connect, handshake, one echo, then hold the connection until ``release``. ``outcome``:
    "served", or how the server refused it (a fixed server may close some cleanly at its
    limit); a client still waiting is "waiting"."""

    def __init__(self, port: int, ctx: ssl.SSLContext, release: threading.Event) -> None:
        super().__init__(daemon=True)
        self.port, self.ctx, self.release = port, ctx, release
        self.served = threading.Event()
        self.outcome = "waiting"

    def run(self) -> None:
        try:
            with connect_tls(self.port, self.ctx, timeout=30) as s:
                s.sendall(b"held")
                assert recv_exactly(s, 4, timeout=30) == b"held"
                self.outcome = "served"
                self.served.set()
                self.release.wait(60)
        except BaseException as exc:  # reported by the test
            self.outcome = repr(exc)


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit (util-linux)")
def test_emfile_worker_backs_off_and_recovers(edgeterm, echo, client_ctx, monkeypatch):
    plain = launcher.edgeterm_command
    monkeypatch.setattr(
        launcher,
        "edgeterm_command",
        lambda: ["prlimit", f"--nofile={FD_LIMIT}:{FD_LIMIT}", *plain()],
    )
    cfg, _, admin_socket = supervised_config(edgeterm, [echo.addr], workers=1, pin_cpus=False)
    cfg["timeouts"].update({"handshake": 20.0, "connect": 5.0})
    server = edgeterm.start(cfg=cfg)
    port = server.port()
    workers = worker_pids(server)
    (worker,) = workers
    assert psutil.Process(worker).rlimit(psutil.RLIMIT_NOFILE) == (FD_LIMIT, FD_LIMIT)
    echo_once(port, client_ctx, b"before")

    # more clients at once than the worker has descriptors for (two per proxied connection)
    release = threading.Event()
    clients = [HeldClient(port, client_ctx, release) for _ in range(FD_LIMIT)]
    try:
        for c in clients:
            c.start()
        wait_until(
            lambda: sum(c.served.is_set() for c in clients) >= 5,
            timeout=15,
            what="the first clients to be served",
        )
        # the worker's own counter says it met EMFILE (on accept, or on an upstream socket)
        # and backed off; the counters reach the admin socket with the next heartbeat
        try:
            wait_status(
                admin_socket,
                lambda st: sum(w["accept_errors"] for w in st["workers"]) > 0,
                timeout=30,
                what="the worker to count a failed accept or upstream socket (EMFILE)",
            )
        except WaitTimeout as exc:
            raise AssertionError(
                f"{exc}\nworker fds: {procfs.tree_fds(worker)} (limit {FD_LIMIT}); "
                f"clients: {sorted(Counter(c.outcome for c in clients).items())}"
            ) from None
        assert procfs.tree_fds(worker) >= FD_LIMIT - 2, "EMFILE counted below the file limit"
        time.sleep(1.0)  # a negative check: at the limit for a while, the worker must survive
        assert server.running() and worker_pids(server) == workers, "the worker died at EMFILE"
        outcomes = [c.outcome for c in clients]
        assert outcomes.count("served") < FD_LIMIT, "every client was served: no limit reached"
    finally:
        release.set()  # the held clients leave
    # none hangs: the waiting ones are served (or refused) once descriptors free up
    for c in clients:
        c.join(40)
    outcomes = [c.outcome for c in clients]
    assert "waiting" not in outcomes, outcomes
    assert not [o for o in outcomes if "Timeout" in o], outcomes
    assert worker_pids(server) == workers, "the worker was replaced"
    # and new clients are served promptly, by the same worker
    start = time.monotonic()
    echo_once(port, client_ctx, b"after")
    assert time.monotonic() - start < 2.0


# -- upstream accept queue full ---------------------------------------------------------------


def closed_with_close_notify(port: int, ctx: ssl.SSLContext, results: list, i: int) -> None:
    start = time.monotonic()
    try:
        with connect_tls(port, ctx, timeout=20) as s:
            data = s.recv(1024)  # b"": close_notify; SSLEOFError: a bare FIN
            results[i] = ("close_notify" if data == b"" else f"data {data!r}", start)
    except (OSError, ssl.SSLError) as exc:
        results[i] = (repr(exc), start)
    results[i] = (*results[i], time.monotonic())


def test_full_upstream_backlog_times_out_cleanly_for_many_clients(
    edgeterm, blackhole_port, client_ctx, echo
):
    connect_timeout = 1.5
    server = edgeterm.start([blackhole_port.addr], timeouts={"connect": connect_timeout})
    port = server.port()
    fds_idle = procfs.tree_fds(server.pid)
    n = 40
    results: list = [None] * n
    threads = [
        threading.Thread(target=closed_with_close_notify, args=(port, client_ctx, results, i))
        for i in range(n)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    hows = [r[0] for r in results]
    assert hows == ["close_notify"] * n, hows
    took = [end - start for _, start, end in results]
    assert min(took) >= connect_timeout * 0.8, f"gave up early: {min(took):.2f}s"
    assert max(took) <= connect_timeout + 1.5, f"closed late: {max(took):.2f}s"
    # no upstream socket left connecting, nothing else leaked
    wait_until(
        lambda: procfs.tree_fds(server.pid) == fds_idle,
        timeout=5,
        what=f"edgeterm back to {fds_idle} fds (now {procfs.tree_fds(server.pid)})",
    )
    assert not procfs.tree_tcp_connections(server.pid, status="SYN_SENT")


def test_full_upstream_backlog_then_next_server_serves(edgeterm, blackhole_port, echo, client_ctx):
    """A connect that times out moves on to the next server: the client is served, one
    connect timeout late (whatever order the balancer tries the servers in)."""
    connect_timeout = 1.0
    server = edgeterm.start([blackhole_port.addr, echo.addr], timeouts={"connect": connect_timeout})
    port = server.port()
    took: list[float] = []
    for i in range(20):  # bounded: until one client has met the black hole (and more)
        start = time.monotonic()
        echo_once(port, client_ctx, b"request %d" % i, timeout=10)
        took.append(time.monotonic() - start)
        if len(took) >= 4 and any(t >= connect_timeout * 0.8 for t in took):
            break
    assert any(t >= connect_timeout * 0.8 for t in took), f"never tried the black hole: {took}"
    assert max(took) <= connect_timeout + 1.5, took


# -- clients that never read ------------------------------------------------------------------


@pytest.mark.slow
def test_many_clients_that_never_read_hold_bounded_memory(edgeterm, upstream, client_ctx):
    n = 20
    offered = 64 * MiB  # per connection: 1.25 GiB in all if edgeterm buffered it
    buffer_size = 65536
    up = upstream(SourceSinkUpstream)
    server = edgeterm.start([up.addr], limits={"buffer_size": buffer_size})
    port = server.port()
    (worker,) = worker_pids(server)
    # warm-up: one transfer, so lazily allocated buffers exist before the baseline
    with connect_tls(port, client_ctx) as s:
        s.sendall(source_sink_header(0, 4 * MiB))
        recv_exactly(s, 4 * MiB, timeout=30)
    base = psutil.Process(worker).memory_info().rss

    socks = []
    try:
        for _ in range(n):
            s = connect_tls(port, client_ctx, timeout=10)
            s.sendall(source_sink_header(0, offered))
            socks.append(s)
        records = up.wait_connections(n + 1)[1:]

        # every upstream stalls: edgeterm stopped reading it (sent unchanged for 1 s)
        deadline = Deadline(30)
        last = [r.sent for r in records]
        stable_since = time.monotonic()
        while time.monotonic() - stable_since < 1.0:
            deadline.check(f"the upstreams to stall (sent {sum(last) / MiB:.0f} MiB)")
            time.sleep(0.1)  # sampling interval of the stall detector
            now = [r.sent for r in records]
            if now != last:
                last, stable_since = now, time.monotonic()
        peak = max(psutil.Process(worker).memory_info().rss for _ in range(5))
    finally:
        for s in socks:
            s.close()

    # every upstream got going, then stalled before the end; what it sent sits in kernel
    # socket buffers (loopback autotunes a receive buffer up to tcp_rmem's 32 MiB here)
    assert min(last) > MiB, last
    assert max(last) < offered, f"an upstream sent all {offered / MiB:.0f} MiB"
    # per connection: at most one pending chunk each way plus OpenSSL's record buffers
    bound = n * (2 * buffer_size + 64 * 1024) + 8 * MiB
    assert peak - base < bound, (
        f"worker RSS grew {(peak - base) / MiB:.1f} MiB with {n} clients that never read "
        f"(bound {bound / MiB:.1f} MiB; the upstreams sent {sum(last) / MiB:.0f} MiB)"
    )
    assert os.path.exists(f"/proc/{worker}"), "the worker died"
