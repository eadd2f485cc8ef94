"""The supervisor and its workers when things go wrong, with real processes:

* a worker that cannot boot halts the whole server with exit code 5 and the reason;
* a supervisor killed with SIGKILL: its workers see EOF on their channel, drain and exit, and
  new clients are refused at once (their sockets went with the supervisor and the drain);
* a supervisor that stops answering (SIGSTOP): its workers drain and exit after
  ``server.heartbeat_timeout``; resumed, it replaces them;
* a reload requested while another is in progress is queued, not dropped: ``edgeterm reload``
  returns 0 only once a reload that began after its own signal serves.
"""

from __future__ import annotations

import copy
import os
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.configs import write_config
from tests.support.launcher import EdgetermFactory, edgeterm_command, run_cli
from tests.support.supervision import (
    Daemons,
    echo_once,
    free_port,
    pid_gone,
    serving_workers,
    start_supervised,
    supervised_config,
    wait_pids_gone,
    wait_status,
)
from tests.support.tlsclient import HOST, close_cleanly, connect_tls, echo_exchange
from tests.support.upstreams import EchoUpstream
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(120)

EXIT_BOOT = 5


@pytest.fixture
def daemons() -> Iterator[Daemons]:
    d = Daemons()
    yield d
    d.close()


def refused(port: int) -> bool:
    """A TCP connect is refused (or reset); one that succeeds is closed again."""
    try:
        socket.create_connection((HOST, port), timeout=1.0).close()
    except (ConnectionRefusedError, ConnectionResetError):
        return True
    except TimeoutError:
        return False
    return False


# -- a worker that cannot boot ----------------------------------------------------------------


@pytest.mark.parametrize("foreground", [True, False], ids=["foreground", "daemon"])
def test_a_worker_that_cannot_boot_halts_the_server_with_exit_5_and_the_reason(
    edgeterm: EdgetermFactory, echo: EchoUpstream, daemons: Daemons, foreground: bool
) -> None:
    """Each worker opens the access log itself (after the fork, before it serves). Pointed at
    a Unix socket (syslog's ``/dev/log`` is the usual mistake), it passes the config check
    (a writable special file, which the check does not open) and open(2) fails in the worker
    with ENXIO: the server must halt with the reason, not crash-loop."""
    port = free_port()
    log_socket = edgeterm.directory / "syslog.sock"  # short path: sun_path is 108 bytes
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(str(log_socket))
    cfg, pidfile, admin_socket = supervised_config(edgeterm, [echo.addr])
    cfg["listeners"][0]["bind"] = f"{HOST}:{port}"
    cfg["telemetry"] = {"access_log": True, "access_log_file": str(log_socket)}
    path = write_config(edgeterm.directory / "boot.toml", cfg)
    try:
        t0 = time.monotonic()
        if foreground:
            r = run_cli("start", "--foreground", "-c", str(path), timeout=60)
            said, log = r.stderr, r.stdout + r.stderr
        else:
            r = daemons.start(path, pidfile)
            said, log = r.stderr, (pidfile.parent / "edgeterm.log").read_text()
        elapsed = time.monotonic() - t0
    finally:
        sink.close()
    last = said.strip().splitlines()[-1:]
    print(
        f"boot failure ({'foreground' if foreground else 'daemon'}): exit {r.returncode} "
        f"after {elapsed:.1f}s: {last}"
    )
    assert r.returncode == EXIT_BOOT, (r.returncode, r.stdout, r.stderr)
    assert "cannot start" in said and "No such device or address" in said, said
    assert str(log_socket) in said, said
    assert "stopping the server" in log and "supervisor exiting with code 5" in log, log
    assert log.count("started worker") <= 2, "the server crash-looped instead of halting"
    assert elapsed < 30
    wait_until(lambda: not pidfile.exists(), timeout=10, what="the pidfile removed")
    assert not admin_socket.exists()
    assert refused(port)


# -- the supervisor goes away ---------------------------------------------------------------


def test_after_sigkill_of_the_supervisor_the_workers_drain_and_exit(
    edgeterm: EdgetermFactory, echo: EchoUpstream, client_ctx: ssl.SSLContext
) -> None:
    sv = start_supervised(edgeterm, [echo.addr], graceful_timeout=30.0)
    port = sv.port
    workers = [w["pid"] for w in serving_workers(sv.status())]
    held = connect_tls(port, client_ctx)
    try:
        echo_exchange(held, b"before")
        sv.server.stopped_by_us = True  # a SIGKILL exit is what this test is about
        os.kill(sv.server.pid, signal.SIGKILL)
        t0 = time.monotonic()
        assert sv.server.wait_exit(10) == -signal.SIGKILL
        wait_until(lambda: refused(port), timeout=5, what="new connections refused")
        refused_after = time.monotonic() - t0
        print(f"supervisor killed: new connections refused after {refused_after * 1000:.0f} ms")
        assert refused_after < 2.0
        assert not all(pid_gone(p) for p in workers), "the worker holding a connection left"
        echo_exchange(held, b"the held connection finishes without its supervisor")
        close_cleanly(held)
    finally:
        held.close()
    wait_pids_gone(workers, timeout=10, what="the orphaned workers to exit")
    log = sv.server.log()
    assert log.count("control channel closed (supervisor gone): draining") == 2, log


def test_workers_drain_and_exit_when_the_supervisor_stops_answering(
    edgeterm: EdgetermFactory, echo: EchoUpstream, client_ctx: ssl.SSLContext
) -> None:
    timeout = 2.0
    sv = start_supervised(edgeterm, [echo.addr], heartbeat_timeout=timeout, graceful_timeout=30.0)
    workers = [w["pid"] for w in serving_workers(sv.status())]
    held = connect_tls(sv.port, client_ctx)
    marker = "no heartbeat from the supervisor"
    try:
        echo_exchange(held, b"before")
        os.kill(sv.server.pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            wait_until(
                lambda: sv.server.log().count(marker) == 2,
                timeout=timeout + 10,
                what="both workers to notice the silent supervisor",
            )
            noticed = time.monotonic() - stopped_at
            # the last heartbeat came up to one second (the supervisor's tick) before the
            # SIGSTOP; workers look every min(1, timeout / 2) seconds
            print(f"supervisor stopped: workers drained after {noticed:.1f}s (timeout {timeout})")
            assert timeout - 1.0 <= noticed < timeout + 3.0, noticed
            echo_exchange(held, b"the held connection finishes during the drain")
            close_cleanly(held)
            wait_pids_gone(workers, timeout=10, what="the workers to exit")
        finally:
            os.kill(sv.server.pid, signal.SIGCONT)  # never leave a stopped process behind
    finally:
        held.close()
    # resumed, the supervisor replaces the workers that left and serves again
    st = wait_status(
        sv.admin_socket,
        lambda s: (
            len(serving_workers(s)) == 2 and not {w["pid"] for w in s["workers"]} & set(workers)
        ),
        timeout=15,
        what="two replacement workers",
    )
    assert st["restarts"] == 2
    for i in range(10):
        echo_once(sv.port, client_ctx, b"after %d" % i)
    assert sv.server.log().count(marker) == 2, "logged more than once per worker"


# -- reloads back to back -------------------------------------------------------------------


def start_reload(config: Path) -> subprocess.Popen[str]:
    """``edgeterm reload -c CONFIG`` in the background (the caller bounds the wait)."""
    return subprocess.Popen(
        [*edgeterm_command(), "reload", "-c", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_reload_requested_during_a_reload_follows_it_and_is_in_effect_when_reload_returns(
    edgeterm: EdgetermFactory,
    echo: EchoUpstream,
    upstream: Callable[..., Any],
    client_ctx: ssl.SSLContext,
    tmp_path: Path,
) -> None:
    other = upstream(EchoUpstream)
    sv = start_supervised(edgeterm, [echo.addr])
    # The first reload's workers open their access log on a FIFO: open(2) waits for a reader,
    # so that reload stays in progress until the test opens the FIFO.
    fifo = tmp_path / "access.fifo"
    os.mkfifo(fifo)
    slow = copy.deepcopy(sv.cfg)
    slow["telemetry"] = {"access_log": True, "access_log_file": str(fifo)}
    write_config(sv.config, slow)
    first = start_reload(sv.config)
    second: subprocess.Popen[str] | None = None
    reader = -1
    try:
        wait_status(
            sv.admin_socket,
            lambda s: s["reloads"]["started"] == 1 and s["reloads"]["in_progress"],
            timeout=15,
            what="the first reload in progress",
        )
        changed = copy.deepcopy(sv.cfg)  # the second config: another upstream server
        changed["upstreams"]["app"] = {"servers": [other.addr]}
        write_config(sv.config, changed)
        second = start_reload(sv.config)
        st = wait_status(
            sv.admin_socket,
            lambda s: s["reloads"]["requested"] == 2,
            timeout=15,
            what="the second reload request",
        )
        assert st["reloads"]["started"] == 1 and st["reloads"]["in_progress"], st["reloads"]
        assert second.poll() is None, "the second reload returned before its reload began"
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # let the first reload finish
        out2, err2 = second.communicate(timeout=60)
        out1, err1 = first.communicate(timeout=60)
        print(f"first reload: {out1.strip()}; second reload: {out2.strip()}")
        assert second.returncode == 0, (out2, err2)
        assert "generation 3 serving" in out2, out2
        assert first.returncode == 0, (out1, err1)
        # the second config is in effect: every new connection goes to the other upstream
        before = len(echo.connections())
        for i in range(4):
            echo_once(sv.port, client_ctx, b"to the other upstream %d" % i)
        assert len(other.connections()) == 4
        assert len(echo.connections()) == before
        st = sv.status()
        assert st["generation"] == 3
        assert st["reloads"]["ok"] == 2 and st["reloads"]["failed"] == 0
        assert st["reloads"]["requested"] == st["reloads"]["started"] == 2
        assert st["reloads"]["last"]["seq"] == 2
        assert "another reload follows" in sv.server.log()
        wait_status(
            sv.admin_socket,
            lambda s: all(w["generation"] == 3 for w in s["workers"]),
            timeout=15,
            what="generation 2 to drain",
        )
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(5)
        if reader >= 0:
            os.close(reader)
