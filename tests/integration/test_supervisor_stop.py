"""``edgeterm stop``: stop accepting, let connections finish up to ``server.graceful_timeout``,
close the rest, exit; the command waits for the exit. The pidfile and admin socket go away.
"""

from __future__ import annotations

import socket
import time

import pytest

from tests.support.launcher import run_cli, spawn_cli
from tests.support.supervision import EchoTransfer, MiB, pid_gone, start_supervised
from tests.support.tlsclient import connect_tls, recv_exactly
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(90)


def test_stop_lets_an_in_flight_transfer_complete(edgeterm, echo, client_ctx):
    sv = start_supervised(edgeterm, [echo.addr], graceful_timeout=30.0)
    workers = [w["pid"] for w in sv.status()["workers"]]
    total = 16 * MiB
    transfer = EchoTransfer(sv.port, client_ctx, total, timeout=60).start()
    transfer.wait_received(1 * MiB, timeout=10)

    sv.server.stopped_by_us = True
    stop = spawn_cli("stop", "-c", str(sv.config))
    try:
        wait_until(
            lambda: "graceful stop" in sv.server.log(),
            timeout=15,
            what="the supervisor to begin a graceful stop",
        )
        in_flight = transfer.running()
        at_stop = transfer.received
        transfer.join(60)
        out, err = stop.communicate(timeout=30)
    finally:
        if stop.poll() is None:
            stop.kill()
            stop.wait(5)
    print(f"stop with a transfer in flight: {at_stop / MiB:.1f} of 16 MiB done at the stop")
    assert in_flight and at_stop < total, "the transfer was over before the stop"
    transfer.assert_intact()
    assert stop.returncode == 0, (out, err)
    assert f"edgeterm stopped (pid {sv.server.pid})" in out
    assert sv.server.wait_exit(10) == 0
    assert all(pid_gone(p) for p in workers)
    assert not sv.pidfile.exists() and not sv.admin_socket.exists()


def test_stop_cuts_a_stuck_client_after_the_graceful_timeout(edgeterm, echo, client_ctx):
    sv = start_supervised(edgeterm, [echo.addr], graceful_timeout=1.0)
    stuck = connect_tls(sv.port, client_ctx)  # open, then idle
    try:
        stuck.sendall(b"x")
        assert recv_exactly(stuck, 1) == b"x"
        sv.server.stopped_by_us = True
        t0 = time.monotonic()
        r = run_cli("stop", "-c", str(sv.config), timeout=30)
        code = sv.server.wait_exit(10)
        elapsed = time.monotonic() - t0
        print(f"stop with graceful_timeout = 1 and a stuck client: {elapsed:.2f}s ({r.stdout})")
        assert r.returncode == 0, (r.stdout, r.stderr)
        assert code == 0
        assert elapsed < 4.0, f"stop took {elapsed:.2f}s"
        # it waited for the client (about the graceful timeout) before cutting it
        assert elapsed >= 0.9, f"stop took only {elapsed:.2f}s: the client was not given time"
        # the stuck client's connection was closed by the server, cleanly: its handshake had
        # completed, so it gets a close_notify (b"") and not a bare FIN (SSLEOFError: the
        # client socket does not suppress ragged EOFs) or a reset
        stuck.settimeout(5)
        assert stuck.recv(1) == b"", "no close_notify before the close"
    finally:
        stuck.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", sv.port), timeout=5).close()
    assert not sv.pidfile.exists() and not sv.admin_socket.exists()


def test_stop_and_status_when_not_running_exit_3(edgeterm, echo):
    sv = start_supervised(edgeterm, [echo.addr])
    sv.server.stopped_by_us = True
    r = run_cli("stop", "-c", str(sv.config), timeout=30)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert sv.server.wait_exit(10) == 0
    for cmd in ("stop", "status", "reload"):
        r = run_cli(cmd, "-c", str(sv.config), timeout=30)
        assert r.returncode == 3, (cmd, r.returncode, r.stdout, r.stderr)
        assert "not running" in r.stderr
