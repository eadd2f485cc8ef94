"""``listeners.tcp_fastopen`` and ``listeners.defer_accept`` on a real server (issue 8).

The listening sockets belong to the supervisor (and its workers); the test takes a duplicate of
the supervisor's descriptor with ``pidfd_getfd(2)`` (Linux >= 5.6; needs ptrace rights over the
server, which the test's own child grants) and reads the options back with ``getsockopt``.
"""

from __future__ import annotations

import ctypes
import os
import socket
from typing import Any

import pytest

from tests.support.configs import deep_merge, write_config
from tests.support.launcher import EdgetermFactory, run_cli
from tests.support.supervision import start_supervised

pytestmark = pytest.mark.timeout(120)

SYS_pidfd_getfd = 438  # the same number on x86-64 and arm64 (the unified syscall table)


def listening_sockets(pid: int, port: int) -> list[socket.socket]:
    """Duplicates of every socket of ``pid`` that listens on ``port``."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    found = []
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    continue
            except OSError:
                continue
            fd = libc.syscall(SYS_pidfd_getfd, pidfd, int(name), 0)
            if fd < 0:
                err = ctypes.get_errno()
                pytest.skip(f"pidfd_getfd: {os.strerror(err)}")
            s = socket.socket(fileno=fd)
            try:
                listening = s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                ours = s.family == socket.AF_INET and s.getsockname()[1] == port
            except OSError:
                listening = ours = False
            if listening and ours:
                found.append(s)
            else:
                s.close()
    finally:
        os.close(pidfd)
    return found


def options(pid: int, port: int) -> list[tuple[int, int]]:
    socks = listening_sockets(pid, port)
    try:
        assert socks, f"no listening socket on port {port} in pid {pid}"
        return [
            (
                s.getsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN),
                s.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT),
            )
            for s in socks
        ]
    finally:
        for s in socks:
            s.close()


def with_listener(cfg: dict[str, Any], **opts: Any) -> dict[str, Any]:
    listeners = [dict(cfg["listeners"][0], **opts)]
    return deep_merge(cfg, {"listeners": listeners})


def test_options_are_set_and_follow_a_reload(edgeterm: EdgetermFactory, echo: Any) -> None:
    sv = start_supervised(edgeterm, [echo.addr])
    pid, port = sv.server.pid, sv.port
    assert options(pid, port) == [(0, 0), (0, 0)]  # two workers: two sockets, defaults off

    # a reload keeps the same sockets (a port-0 listener is keyed by its name), setting the new
    # values on them
    cfg = with_listener(sv.cfg, tcp_fastopen=256, defer_accept=5)
    write_config(sv.config, cfg)
    r = run_cli("reload", "-c", str(sv.config), timeout=60)
    assert r.returncode == 0, r.stderr
    sv.server.remember_pids()
    # the kernel stores TCP_DEFER_ACCEPT as a number of SYN-ACK retransmissions and reports
    # the time they cover: 5 s -> 3 retransmissions -> 7 s
    got = options(pid, port)
    assert len(got) == 2 and all(tfo == 256 and defer >= 5 for tfo, defer in got), got

    cfg = with_listener(cfg, tcp_fastopen=0, defer_accept=False)
    write_config(sv.config, cfg)
    r = run_cli("reload", "-c", str(sv.config), timeout=60)
    assert r.returncode == 0, r.stderr
    sv.server.remember_pids()
    assert options(pid, port) == [(0, 0), (0, 0)]


def test_options_at_start(edgeterm: EdgetermFactory, echo: Any) -> None:
    cfg = edgeterm.config([echo.addr])
    cfg = with_listener(cfg, tcp_fastopen=128, defer_accept=True)
    server = edgeterm.start(cfg=cfg)
    assert options(server.pid, server.port()) == [(128, 1)]
