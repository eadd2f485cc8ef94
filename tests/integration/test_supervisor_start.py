"""``edgeterm start``: as a daemon (double fork, setsid) it returns 0 only once every worker
accepts, or a documented exit code with the reason; ``--foreground`` stays attached. Also the
pidfile (stale ones do not block), the admin socket (mode 0600), ``init``, and SIGUSR1.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.support.configs import write_config
from tests.support.launcher import run_cli
from tests.support.supervision import (
    Daemons,
    cli_status,
    dead_pid,
    echo_once,
    free_port,
    pid_gone,
    read_pidfile,
    serving_workers,
    start_supervised,
    supervised_config,
    tail,
    wait_pids_gone,
)
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(90)

EXIT_CONFIG, EXIT_NOT_RUNNING, EXIT_STARTUP, EXIT_ALREADY_RUNNING = 2, 3, 4, 6
STARTED_RE = re.compile(r"edgeterm started: pid (\d+), 2 workers")


@pytest.fixture
def daemons() -> Iterator[Daemons]:
    d = Daemons()
    yield d
    d.close()


def daemon_config(edgeterm, upstreams, port, **server):
    """A config file for a daemon on 127.0.0.1:``port`` (a daemon's port must be known)."""
    cfg, pidfile, admin_socket = supervised_config(edgeterm, upstreams, **server)
    cfg["listeners"][0]["bind"] = f"127.0.0.1:{port}"
    path = write_config(edgeterm.directory / "daemon.toml", cfg)
    return path, pidfile, admin_socket


def test_daemon_start_status_stop(edgeterm, echo, client_ctx, daemons):
    port = free_port()
    config, pidfile, admin_socket = daemon_config(edgeterm, [echo.addr], port)
    log_file = pidfile.parent / "edgeterm.log"  # the default: next to the pidfile

    r = daemons.start(config, pidfile)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr, tail(log_file))
    m = STARTED_RE.search(r.stdout)
    assert m, r.stdout
    pid = int(m[1])
    assert read_pidfile(pidfile) == pid
    # every worker accepts already: no waiting here
    echo_once(port, client_ctx, b"right after start")

    # detached: not our child, re-parented, in its own session, no terminal
    sup = psutil.Process(pid)
    assert sup.ppid() != os.getpid()
    assert pid not in [c.pid for c in psutil.Process().children(recursive=True)]
    assert os.getsid(pid) != os.getsid(0)
    assert sup.terminal() is None
    assert f"ready pid={pid} workers=2" in log_file.read_text()

    mode = os.stat(admin_socket).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600, oct(mode)

    st = cli_status(config)
    assert st["pid"] == pid
    workers = [w["pid"] for w in serving_workers(st)]
    assert len(workers) == 2
    assert sorted(workers) == sorted(c.pid for c in sup.children())

    r = run_cli("stop", "-c", str(config), timeout=60)
    assert r.returncode == 0, (r.stdout, r.stderr, tail(log_file))
    assert f"edgeterm stopped (pid {pid})" in r.stdout
    wait_pids_gone([pid, *workers], timeout=5, what="the daemon and its workers")
    assert not pidfile.exists(), "pidfile left behind"
    assert not admin_socket.exists(), "admin socket left behind"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    r = run_cli("status", "-c", str(config), timeout=30)
    assert r.returncode == EXIT_NOT_RUNNING, (r.stdout, r.stderr)
    assert "Traceback" not in log_file.read_text()


def test_start_twice_exits_6_already_running(edgeterm, echo, client_ctx):
    sv = start_supervised(edgeterm, [echo.addr])
    for args in (["start"], ["start", "--foreground"]):
        r = run_cli(*args, "-c", str(sv.config), timeout=30)
        assert r.returncode == EXIT_ALREADY_RUNNING, (args, r.returncode, r.stdout, r.stderr)
        assert "already running" in r.stderr and str(sv.server.pid) in r.stderr, r.stderr
    assert read_pidfile(sv.pidfile) == sv.server.pid
    assert sv.status()["pid"] == sv.server.pid
    echo_once(sv.port, client_ctx, b"still the first one")


@pytest.mark.parametrize("reuseport", [False, True], ids=["plain-holder", "reuseport-holder"])
def test_start_with_the_port_in_use_exits_4(edgeterm, echo, daemons, reuseport):
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if reuseport:  # another process that set SO_REUSEPORT must not get its traffic split
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen(8)
        port = holder.getsockname()[1]
        config, pidfile, admin_socket = daemon_config(edgeterm, [echo.addr], port)
        r = daemons.start(config, pidfile)
        assert r.returncode == EXIT_STARTUP, (r.returncode, r.stdout, r.stderr)
        assert str(port) in r.stderr and "in use" in r.stderr, r.stderr
        assert not pidfile.exists() and not admin_socket.exists()
    finally:
        holder.close()


def test_start_with_a_bad_certificate_exits_2_naming_the_key(
    edgeterm, echo, daemons, tmp_path: Path
):
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n")
    cfg, pidfile, admin_socket = supervised_config(edgeterm, [echo.addr])
    cfg["listeners"][0]["bind"] = f"127.0.0.1:{free_port()}"
    cfg["tls"]["certificates"][0]["cert"] = str(garbage)
    config = write_config(edgeterm.directory / "daemon.toml", cfg)
    for foreground in (False, True):
        if foreground:
            r = run_cli("start", "--foreground", "-c", str(config), timeout=30)
        else:
            r = daemons.start(config, pidfile)
        assert r.returncode == EXIT_CONFIG, (foreground, r.returncode, r.stdout, r.stderr)
        assert "tls.certificates[0].cert" in r.stderr, r.stderr
        assert str(garbage) in r.stderr
        assert not pidfile.exists() and not admin_socket.exists()


def test_a_stale_pidfile_does_not_block_a_start(edgeterm, echo, client_ctx, daemons):
    port = free_port()
    config, pidfile, _ = daemon_config(edgeterm, [echo.addr], port)
    stale = dead_pid()
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    pidfile.write_text(f"{stale}\n")
    r = daemons.start(config, pidfile)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    pid = read_pidfile(pidfile)
    assert pid is not None and pid != stale and f"pid {pid}," in r.stdout
    echo_once(port, client_ctx, b"after a stale pidfile")
    r = run_cli("stop", "-c", str(config), timeout=60)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert pid_gone(pid) and not pidfile.exists()


def test_init_writes_a_config_that_check_config_accepts(tmp_path: Path):
    directory = tmp_path / "fresh"
    r = run_cli("init", str(directory), cwd=tmp_path, timeout=60)
    assert r.returncode == 0, (r.stdout, r.stderr)
    config = directory / "edgeterm.toml"
    assert config.is_file()
    # from another directory: paths in the config are relative to the file
    r = run_cli("check-config", "-c", str(config), cwd=Path("/"), timeout=60)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert r.stdout.strip() == "ok"


@pytest.mark.parametrize("explicit", [True, False], ids=["server.log_file", "default-log-file"])
def test_sigusr1_reopens_the_log_file(edgeterm, echo, client_ctx, daemons, explicit):
    port = free_port()
    if explicit:
        log_file = edgeterm.directory / "logs" / "edgeterm.log"
        config, pidfile, _ = daemon_config(edgeterm, [echo.addr], port, log_file=str(log_file))
    else:
        config, pidfile, _ = daemon_config(edgeterm, [echo.addr], port)
        log_file = pidfile.parent / "edgeterm.log"
    r = daemons.start(config, pidfile)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    pid = read_pidfile(pidfile)
    assert pid is not None
    assert "ready pid=" in log_file.read_text()
    old_workers = [w["pid"] for w in cli_status(config)["workers"]]

    rotated = log_file.with_name(log_file.name + ".1")
    log_file.rename(rotated)  # what logrotate does
    os.kill(pid, signal.SIGUSR1)
    wait_until(log_file.exists, timeout=5, what=f"a new {log_file.name} after SIGUSR1")

    r = run_cli("reload", "-c", str(config), timeout=60)
    assert r.returncode == 0, (r.stdout, r.stderr)
    echo_once(port, client_ctx, b"after the rotation")
    wait_pids_gone(old_workers, timeout=10, what="generation 1 to drain")
    fresh = log_file.read_text()
    assert "reload done" in fresh, fresh
    assert "reload done" not in rotated.read_text()
    # the workers reopened too: generation 1's exit lines are in the new file
    for wpid in old_workers:
        assert re.search(rf"edgeterm\[{wpid}\] .*exiting", fresh), (wpid, fresh)
