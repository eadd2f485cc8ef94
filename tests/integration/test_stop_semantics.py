"""What a client sees while edgeterm stops or reloads (ARCHITECTURE §9, pitfall 2).

* A graceful stop refuses new connections at once (the listening sockets are closed right
  after the workers' last accept) while the connections it holds finish normally.
* A listener removed by a reload refuses at once too, while the old generation still drains
  the connections it holds on it; the listeners that continue never miss a connection.
* An immediate stop (``edgeterm stop --now``, SIGQUIT) ends at once, and a client whose
  handshake had completed gets a close_notify, not a bare FIN.
"""

from __future__ import annotations

import copy
import signal
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.support.configs import write_config
from tests.support.launcher import EdgetermFactory, run_cli, spawn_cli
from tests.support.supervision import (
    ClientLoop,
    echo_once,
    free_port,
    pid_gone,
    serving_workers,
    start_supervised,
    wait_pids_gone,
    wait_status,
)
from tests.support.tlsclient import HOST, close_cleanly, connect_tls, echo_exchange
from tests.support.upstreams import EchoUpstream
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(120)

REFUSED_WITHIN = 2.0  # seconds: what "at once" must mean on a loaded two-CPU machine


def refused(port: int) -> bool:
    """True when a TCP connect to ``port`` is refused (RST to the SYN, or a reset queued
    connection). A connect that succeeds is closed again and counts as not refused."""
    try:
        sock = socket.create_connection((HOST, port), timeout=1.0)
    except (ConnectionRefusedError, ConnectionResetError):
        return True
    except TimeoutError:
        return False
    sock.close()
    return False


def test_a_graceful_stop_refuses_new_clients_at_once_and_finishes_the_held_one(
    edgeterm: EdgetermFactory, echo: EchoUpstream, client_ctx: ssl.SSLContext
) -> None:
    sv = start_supervised(edgeterm, [echo.addr], graceful_timeout=30.0)
    port = sv.port
    workers = [w["pid"] for w in sv.status()["workers"]]
    held = connect_tls(port, client_ctx)
    stop = None
    try:
        echo_exchange(held, b"before the stop")
        sv.server.stopped_by_us = True
        t0 = time.monotonic()
        stop = spawn_cli("stop", "-c", str(sv.config))
        wait_until(lambda: refused(port), timeout=REFUSED_WITHIN + 5, what="a refused connect")
        refused_after = time.monotonic() - t0
        print(f"graceful stop: new connections refused {refused_after * 1000:.0f} ms after stop")
        assert refused_after < REFUSED_WITHIN, f"refused only after {refused_after:.2f}s"
        # still draining: the supervisor and the held connection's worker are there
        assert sv.server.running() and stop.poll() is None
        assert refused(port), "the port accepted again"
        echo_exchange(held, b"after the refusal, the held connection still works")
        close_cleanly(held)
        out, err = stop.communicate(timeout=20)
    finally:
        held.close()
        if stop is not None and stop.poll() is None:
            stop.kill()
            stop.wait(5)
    assert stop.returncode == 0, (out, err)
    assert f"edgeterm stopped (pid {sv.server.pid})" in out
    assert sv.server.wait_exit(10) == 0
    wait_pids_gone(workers, timeout=5, what="the workers to exit")
    assert "listening sockets released" in sv.server.log()


def test_a_listener_removed_by_reload_refuses_at_once_while_its_connections_finish(
    edgeterm: EdgetermFactory,
    echo: EchoUpstream,
    upstream: Callable[..., Any],
    client_ctx: ssl.SSLContext,
) -> None:
    other = upstream(EchoUpstream)
    sv = start_supervised(edgeterm, [echo.addr], graceful_timeout=30.0)
    port2 = free_port()
    with_second = copy.deepcopy(sv.cfg)
    with_second["listeners"].append({"name": "second", "bind": f"{HOST}:{port2}", "upstream": "b"})
    with_second["upstreams"]["b"] = {"servers": [other.addr]}
    loop = ClientLoop(sv.port, client_ctx, max_seconds=60).start()  # the continuing listener
    held = None
    try:
        loop.wait_ok(20, timeout=10)
        write_config(sv.config, with_second)
        r = run_cli("reload", "-c", str(sv.config), timeout=60)
        assert r.returncode == 0, (r.stdout, r.stderr)
        held = connect_tls(port2, client_ctx)
        echo_exchange(held, b"on the second listener")

        write_config(sv.config, sv.cfg)  # the second listener goes
        t0 = time.monotonic()
        r = run_cli("reload", "-c", str(sv.config), timeout=60)
        assert r.returncode == 0, (r.stdout, r.stderr)
        assert "generation 3 serving" in r.stdout
        wait_until(lambda: refused(port2), timeout=REFUSED_WITHIN + 5, what="port2 refused")
        after = time.monotonic() - t0
        print(f"removed listener refused {after * 1000:.0f} ms after the reload command began")
        # generation 2 is still draining the held connection, on the removed listener
        st = sv.status()
        assert any(w["generation"] == 2 and w["draining"] for w in st["workers"]), st["workers"]
        echo_exchange(held, b"the held connection outlives its listener")
        close_cleanly(held)
        held = None
        loop.wait_ok(20, timeout=10)
    finally:
        loop.stop()
        if held is not None:
            held.close()
    print(f"client loop on the continuing listener across both reloads: {loop.summary()}")
    assert loop.failed == 0, loop.summary()
    wait_status(
        sv.admin_socket,
        lambda s: all(w["generation"] == 3 for w in s["workers"]),
        timeout=10,
        what="generation 2 to finish draining",
    )
    echo_once(sv.port, client_ctx, b"still serving")


@pytest.mark.parametrize("how", ["stop --now", "SIGQUIT"])
def test_an_immediate_stop_ends_at_once_with_close_notify(
    edgeterm: EdgetermFactory, echo: EchoUpstream, client_ctx: ssl.SSLContext, how: str
) -> None:
    sv = start_supervised(edgeterm, [echo.addr], graceful_timeout=30.0)
    workers = [w["pid"] for w in serving_workers(sv.status())]
    held = connect_tls(sv.port, client_ctx)
    try:
        echo_exchange(held, b"held")
        sv.server.stopped_by_us = True
        t0 = time.monotonic()
        if how == "SIGQUIT":
            sv.server.send_signal(signal.SIGQUIT)
            code = sv.server.wait_exit(15)
        else:
            r = run_cli("stop", "--now", "-c", str(sv.config), timeout=30)
            assert r.returncode == 0, (r.stdout, r.stderr)
            assert "edgeterm stopped" in r.stdout
            code = sv.server.wait_exit(10)
        elapsed = time.monotonic() - t0
        print(f"{how} with a held connection and graceful_timeout = 30: {elapsed:.2f}s")
        assert code == 0
        assert elapsed < 5.0, f"{how} took {elapsed:.2f}s"
        held.settimeout(5)
        assert held.recv(1) == b"", "the held connection ended without close_notify"
    finally:
        held.close()
    assert all(pid_gone(p) for p in workers)
    assert refused(sv.port)
    assert "immediate stop" in sv.server.log() or how != "SIGQUIT"
    assert not sv.pidfile.exists() and not sv.admin_socket.exists()
