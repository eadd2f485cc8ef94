"""``edgeterm status`` against a real server: the plain-text report (ticket key age and rotation
count, config load time, per-worker ``resumed``) and ``status --ready``, the health check the
Docker image and the Kubernetes readiness and startup probes run (docs/cli.md)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest

from tests.support.configs import write_config
from tests.support.launcher import EdgetermFactory, run_cli
from tests.support.supervision import (
    admin_status,
    serving_workers,
    start_supervised,
    wait_status,
)
from tests.support.tlsclient import HOST, recv_exactly

pytestmark = pytest.mark.timeout(120)

EXIT_NOT_RUNNING = 3
EXIT_NOT_READY = 7


def resumed_connections(port: int, ctx: ssl.SSLContext, n: int) -> int:
    """``n`` echo connections, each offering the first one's session; how many resumed."""
    session = None
    resumed = 0
    for i in range(n + 1):
        raw = socket.create_connection((HOST, port), timeout=10)
        with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as s:
            s.sendall(b"ping %d\n" % i)
            recv_exactly(s, len(b"ping %d\n" % i), timeout=10)
            resumed += bool(s.session_reused)
            session = session or s.session
    return resumed


def test_text_status_shows_tickets_config_load_time_and_resumed(
    edgeterm: EdgetermFactory, echo: Any, client_ctx: ssl.SSLContext
) -> None:
    sv = start_supervised(edgeterm, [echo.addr])
    assert resumed_connections(sv.port, client_ctx, 6) == 6
    st = wait_status(
        sv.admin_socket,
        lambda s: sum(w["resumed"] for w in serving_workers(s)) == 6,
        timeout=10,
        what="6 resumed handshakes in the workers' counters",
    )
    r = run_cli("status", "-c", str(sv.config), timeout=30)
    assert r.returncode == 0, (r.stdout, r.stderr)
    out = r.stdout
    # the config and when it was loaded (the serving generation's load time)
    assert re.search(r"(?m)^config loaded \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC \(\d+s ago\)$", out), (
        out
    )
    # ticket keys: how many, where from, the current key's age, the rotations
    tickets = st["tickets"]
    assert tickets["rotations"] == 0
    m = re.search(r"(?m)^tickets: (\d+) keys generated, current key (\d+)s old, 0 rotations", out)
    assert m, out
    assert int(m[1]) == tickets["keys"]
    assert abs(int(m[2]) - tickets["current_key_age"]) <= 30
    # per worker: a resumed column, with the JSON's numbers
    header, *rows = [line for line in out.splitlines() if re.match(r"^\s*(slot|\d+)\s", line)]
    assert header.split() == [
        "slot", "pid", "cpu", "gen", "state", "active", "handshakes", "resumed",
    ]  # fmt: skip
    by_pid = {int(row.split()[1]): row.split() for row in rows}
    now = admin_status(sv.admin_socket)
    for w in serving_workers(now):
        assert int(by_pid[w["pid"]][7]) == w["resumed"], (w, out)
    assert sum(int(cols[7]) for cols in by_pid.values()) == 6

    # a reload rotates the generated keys: the count goes up, the key age starts again
    r = run_cli("reload", "-c", str(sv.config), timeout=60)
    assert r.returncode == 0, (r.stdout, r.stderr)
    sv.server.remember_pids()
    r = run_cli("status", "-c", str(sv.config), timeout=30)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert re.search(
        r"(?m)^tickets: \d+ keys generated, current key \d+s old, 1 rotation\b", r.stdout
    )
    assert "generation 2" in r.stdout


def test_text_status_never_shows_ticket_key_material(
    edgeterm: EdgetermFactory, echo: Any, tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    files = []
    for name in ("current", "previous"):
        path = keys / f"{name}.key"
        path.write_bytes(os.urandom(80))
        path.chmod(0o600)
        files.append(str(path))
    sv = start_supervised(edgeterm, [echo.addr])
    cfg = dict(sv.cfg, tls=dict(sv.cfg["tls"], tickets={"enabled": True, "key_files": files}))
    write_config(sv.config, cfg)
    r = run_cli("reload", "-c", str(sv.config), timeout=60)
    assert r.returncode == 0, (r.stdout, r.stderr)
    sv.server.remember_pids()
    text = run_cli("status", "-c", str(sv.config), timeout=30).stdout
    raw = run_cli("status", "--json", "-c", str(sv.config), timeout=30).stdout
    assert re.search(r"(?m)^tickets: 2 keys from key files, current key \d+s old, 1 rotation", text)
    for f in files:
        key = Path(f).read_bytes()
        for chunk in (key[:16], key[16:32], key[32:48]):  # every part of the 80-byte format
            for shown in (chunk.hex(), chunk.hex().upper()):
                assert shown not in text and shown not in raw


def test_ready_exits_0_then_7_while_every_worker_is_stopped(
    edgeterm: EdgetermFactory, echo: Any
) -> None:
    # a long heartbeat timeout: the supervisor must not replace the stopped workers meanwhile
    sv = start_supervised(edgeterm, [echo.addr], heartbeat_timeout=120.0)
    r = run_cli("status", "--ready", "-c", str(sv.config), timeout=30)
    assert (r.returncode, r.stdout.strip()) == (0, "ready: generation 1, 2 workers"), r.stderr
    workers = [w["pid"] for w in serving_workers(sv.status())]
    assert len(workers) == 2
    stopped: list[int] = []
    try:
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
        r = run_cli("status", "--ready", "-c", str(sv.config), timeout=30)
        assert r.returncode == EXIT_NOT_READY, (r.returncode, r.stdout, r.stderr)
        for pid in workers:
            assert re.search(rf"(?m)^not ready: worker \d \(pid {pid}\) is stopped", r.stderr), (
                r.stderr
            )
        # without --ready, status only says that the supervisor answers (the liveness probe)
        plain = run_cli("status", "-c", str(sv.config), timeout=30)
        assert plain.returncode == 0, (plain.stdout, plain.stderr)
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    r = run_cli("status", "--ready", "-c", str(sv.config), timeout=30)
    assert r.returncode == 0, (r.stdout, r.stderr)


def test_ready_exits_3_when_nothing_answers(edgeterm: EdgetermFactory, echo: Any) -> None:
    sv = start_supervised(edgeterm, [echo.addr])
    config = sv.config
    sv.server.send_signal(signal.SIGTERM)
    assert sv.server.wait_exit(30) == 0
    r = run_cli("status", "--ready", "-c", str(config), timeout=30)
    assert r.returncode == EXIT_NOT_RUNNING, (r.stdout, r.stderr)
    assert "not running" in r.stderr
