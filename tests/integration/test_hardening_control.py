"""Secrets and control: private key permissions, the admin socket, the supervisor <-> worker
control channel under malformed frames.

- A private key file that every user can read (o+r) gives a warning, in ``check-config`` and
  in the log at start (a combined cert+key file too); group-readable is not warned about
  (0640 with the service's group is the documented deployment).
- The admin socket is 0600 (also in the foreground; the daemon case is in
  test_supervisor_start) and answers malformed, oversized, idle or wrong requests without
  harm to the supervisor.
- The control channel, live: a copy of one end of a running worker's channel is taken with
  ``pidfd_getfd(2)``, and malformed frames are written into it. From the "supervisor" side the
  worker must refuse them (FrameError: drain and exit, a bad TICKET_KEYS payload: log and keep
  serving); from the "worker" side the supervisor must refuse them (kill that worker, replace
  it, keep serving). Neither side may crash.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import socket
import stat
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from edgeterm import control
from tests.support.configs import write_config
from tests.support.launcher import run_cli
from tests.support.supervision import (
    admin_status,
    echo_once,
    serving_workers,
    start_supervised,
    wait_status,
)
from tests.support.waiting import Deadline, wait_until

pytestmark = pytest.mark.timeout(90)

# -- private key permissions ------------------------------------------------------------------


def key_files(certs, directory: Path, mode: int, *, combined: bool = False) -> dict[str, str]:
    """A copy of the default certificate and key with the key file at ``mode``."""
    directory.mkdir(parents=True, exist_ok=True)
    cert = directory / "site.pem"
    key = directory / "site.key"
    if combined:
        cert.write_bytes(certs.default.cert.read_bytes() + certs.default.key.read_bytes())
        os.chmod(cert, mode)
        return {"cert": str(cert)}
    shutil.copyfile(certs.default.cert, cert)
    shutil.copyfile(certs.default.key, key)
    os.chmod(key, mode)
    return {"cert": str(cert), "key": str(key)}


@pytest.mark.parametrize(
    ("mode", "who", "combined"),
    [
        (0o644, "other users", False),
        (0o604, "other users", False),
        (0o640, None, False),  # group-readable: the documented deployment (deploy/systemd)
        (0o600, None, False),
        (0o400, None, False),
        (0o644, "other users", True),
    ],
    ids=["0644", "0604", "0640", "0600", "0400", "combined-0644"],
)
def test_check_config_warns_about_a_readable_private_key(
    edgeterm, echo, tmp_path, mode, who, combined
):
    entry = key_files(edgeterm.certs, tmp_path / "keys", mode, combined=combined)
    cfg = edgeterm.config([echo.addr], tls={"certificates": [entry]})
    config = write_config(tmp_path / "edgeterm.toml", cfg)
    r = run_cli("check-config", "-c", str(config), timeout=60)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert r.stdout.strip() == "ok"
    key_file = entry.get("key", entry["cert"])
    which = "cert" if combined else "key"
    warnings = [line for line in r.stderr.splitlines() if "readable by" in line]
    if who is None:
        assert warnings == [], r.stderr
    else:
        assert warnings == [
            f"warning: {config}: tls.certificates[0].{which}: the private key file {key_file} "
            f"is readable by {who} (mode {mode:04o}); chmod 600 it"
        ], r.stderr


def test_start_logs_the_readable_key_warning_and_serves(edgeterm, echo, tmp_path, client_ctx):
    entry = key_files(edgeterm.certs, tmp_path / "keys", 0o644)
    server = edgeterm.start([echo.addr], tls={"certificates": [entry]})
    assert re.search(
        r"WARNING .*tls\.certificates\[0\]\.key: the private key file .*site\.key is readable "
        r"by other users \(mode 0644\); chmod 600 it",
        server.log(),
    ), server.log()
    echo_once(server.port(), client_ctx, b"a warning, not an error")


# -- the admin socket -------------------------------------------------------------------------


def admin_exchange(path: Path, data: bytes, *, timeout: float = 5.0) -> bytes:
    """Send raw bytes to the admin socket, return the raw answer (until the server closes)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)  # the end of the request, with or without a newline
        chunks = []
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                chunks.append(chunk)
    return b"".join(chunks)


ADMIN_GARBAGE = {
    "not-json": (b"status please\n", "request is not JSON"),
    "not-utf8": (b'{"cmd": "\xff\xfe"}\n', "request is not JSON"),
    "a-list": (b'["status"]\n', "unknown command None"),
    "a-string": (b'"status"\n', "unknown command None"),
    "unknown-command": (b'{"cmd": "stop"}\n', "unknown command 'stop'"),
    "command-not-a-string": (b'{"cmd": {"status": 1}}\n', "unknown command"),
    "oversized-no-newline": (b"{" * 100_000, None),
    "nul-bytes": (b"\x00" * 64 + b"\n", "request is not JSON"),
    "empty-then-close": (b"", "unknown command None"),
}


@pytest.fixture
def supervised(edgeterm, echo):
    return start_supervised(edgeterm, [echo.addr])


def test_admin_socket_mode_and_malformed_requests(supervised, client_ctx):
    sv = supervised
    mode = os.stat(sv.admin_socket).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600, oct(mode)
    workers = [w["pid"] for w in serving_workers(sv.status())]

    for name, (data, error) in ADMIN_GARBAGE.items():
        raw = admin_exchange(sv.admin_socket, data)
        if error is not None:
            answer = json.loads(raw)
            assert error in answer.get("error", ""), (name, answer)
        elif raw:
            assert "error" in json.loads(raw), (name, raw)
        # the supervisor still answers, with the same workers
        st = sv.status()
        assert [w["pid"] for w in serving_workers(st)] == workers, name

    # idle admin connections (they never send) do not block the others
    idle = []
    try:
        for _ in range(50):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(sv.admin_socket))
            idle.append(s)
        # (a connect can find the 16-deep accept queue full for a moment: retry, bounded)
        st = wait_until(
            lambda: try_status(sv.admin_socket), timeout=1.0, what="status with idle clients"
        )
        assert st["pid"] == sv.server.pid
    finally:
        for s in idle:
            s.close()
    echo_once(sv.port, client_ctx, b"still serving")


def try_status(path: Path) -> dict[str, Any] | None:
    try:
        return admin_status(path, timeout=1.0)
    except BlockingIOError:
        return None


def test_admin_socket_deeply_nested_request(supervised, client_ctx):
    sv = supervised
    raw = admin_exchange(sv.admin_socket, b"[" * 3000 + b"\n")
    assert "error" in json.loads(raw)
    assert sv.server.running()
    assert sv.status()["pid"] == sv.server.pid
    echo_once(sv.port, client_ctx, b"still serving")


# -- the control channel, live ----------------------------------------------------------------

_SYS_PIDFD_GETFD = 438  # the same number on x86_64 and aarch64 (the generic syscall table)
_libc = ctypes.CDLL(None, use_errno=True)
_SS_LINE = re.compile(r"^u_str\s+\S+\s+\d+\s+\d+\s+\S+\s+(\d+)\s+\S+\s+(\d+)\s+users:\((.*)\)$")
_SS_USER = re.compile(r"pid=(\d+),fd=(\d+)")


def unix_sockets() -> dict[int, tuple[int, list[tuple[int, int]]]]:
    """inode -> (peer inode, [(pid, fd), ...]) for every connected unix stream socket."""
    out = subprocess.run(["ss", "-xpn"], capture_output=True, text=True, timeout=10).stdout
    table = {}
    for line in out.splitlines():
        m = _SS_LINE.match(line.strip())
        if m:
            owners = [(int(p), int(f)) for p, f in _SS_USER.findall(m[3])]
            table[int(m[1])] = (int(m[2]), owners)
    return table


def channel_fds(supervisor: int, worker: int) -> tuple[int, int]:
    """(the supervisor's fd, the worker's fd) of that worker's control channel."""
    table = unix_sockets()
    for _inode, (peer, owners) in table.items():
        for pid, fd in owners:
            if pid != worker or peer not in table:
                continue
            for peer_pid, peer_fd in table[peer][1]:
                if peer_pid == supervisor:
                    return peer_fd, fd
    raise AssertionError(f"no control channel between {supervisor} and {worker} in ss -xp")


def steal(pid: int, fd: int) -> socket.socket:
    """A duplicate, in this process, of descriptor ``fd`` of process ``pid``."""
    pidfd = os.pidfd_open(pid)
    try:
        new = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0)
        if new < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"pidfd_getfd({pid}, {fd}): {os.strerror(err)}")
    finally:
        os.close(pidfd)
    return socket.socket(fileno=new)


@pytest.fixture
def channel(supervised):
    """(supervised, worker pid, into_worker, into_supervisor): sockets writing into one
    worker's control channel, as if from the supervisor and as if from the worker."""
    if shutil.which("ss") is None:
        pytest.skip("needs ss (iproute2) to find the control channel")
    sv = supervised
    worker = serving_workers(sv.status())[0]["pid"]
    sup_fd, worker_fd = channel_fds(sv.server.pid, worker)
    try:
        into_worker = steal(sv.server.pid, sup_fd)
        into_supervisor = steal(worker, worker_fd)
    except OSError as exc:
        pytest.skip(f"pidfd_getfd is not available here: {exc}")
    yield sv, worker, into_worker, into_supervisor
    into_worker.close()
    into_supervisor.close()


def frame(msg_type: int, payload: bytes) -> bytes:
    return struct.pack(">IB", len(payload), msg_type) + payload


def wait_replaced(sv, old: int, *, timeout: float = 10.0) -> dict[str, Any]:
    """Wait until slot 0's worker ``old`` has been replaced by a ready one; return status."""
    return wait_status(
        sv.admin_socket,
        lambda st: (
            old not in [w["pid"] for w in serving_workers(st)] and len(serving_workers(st)) == 2
        ),
        timeout=timeout,
        what=f"worker {old} replaced by a ready worker",
    )


def assert_serving(sv, client_ctx) -> None:
    assert sv.server.running(), "the supervisor died"
    for i in range(4):  # both workers (SO_REUSEPORT spreads the connections)
        echo_once(sv.port, client_ctx, b"still serving %d" % i)


TO_WORKER = {
    "unknown-type": frame(200, b""),
    "oversized": struct.pack(">IB", control.MAX_PAYLOAD + 1, control.MsgType.TICKET_KEYS),
    "length-4GiB": struct.pack(">IB", 0xFFFFFFFF, control.MsgType.HEARTBEAT),
}


@pytest.mark.parametrize("garbage", list(TO_WORKER))
def test_worker_refuses_a_bad_frame_and_exits_cleanly(channel, client_ctx, garbage):
    sv, worker, into_worker, _ = channel
    into_worker.sendall(TO_WORKER[garbage])
    wait_replaced(sv, worker)
    assert re.search(r"control channel: .*: draining", sv.server.log()), sv.server.log()
    assert_serving(sv, client_ctx)


def test_worker_keeps_serving_after_a_bad_ticket_ring(channel, client_ctx):
    sv, worker, into_worker, _ = channel
    into_worker.sendall(frame(control.MsgType.TICKET_KEYS, b"\x00" * 13))
    wait_until(
        lambda: "TICKET_KEYS: bad key count or length" in sv.server.log(),
        timeout=5,
        what="the worker to log the bad ring",
    )
    # the same worker, still answering heartbeats (its counters move) and serving
    st = sv.status()
    assert worker in [w["pid"] for w in serving_workers(st)]
    assert_serving(sv, client_ctx)
    assert worker in [w["pid"] for w in serving_workers(sv.status())]


TO_SUPERVISOR = {
    "unknown-type": frame(200, b""),
    "oversized": struct.pack(">IB", control.MAX_PAYLOAD + 1, control.MsgType.STATS),
    "stats-not-an-object": frame(control.MsgType.STATS, b"[1, 2, 3]"),
    "ready-not-json": frame(control.MsgType.READY, b"\xff garbage"),
}


@pytest.mark.parametrize("garbage", list(TO_SUPERVISOR))
def test_supervisor_kills_a_worker_sending_a_bad_frame_and_keeps_serving(
    channel, client_ctx, garbage
):
    sv, worker, _, into_supervisor = channel
    into_supervisor.sendall(TO_SUPERVISOR[garbage])
    wait_replaced(sv, worker)
    assert f"pid={worker} sent a bad frame" in sv.server.log(), sv.server.log()
    assert_serving(sv, client_ctx)


SUPERVISOR_CRASHES = {
    "ack-seq-not-a-number": (
        frame(control.MsgType.ACK, b'{"of": "TICKET_KEYS", "seq": "x"}'),
        "supervisor._on_message: int(ack['seq']) raises ValueError (TypeError for a list), "
        "which nothing catches",
    ),
    "stats-nested-deep": (
        frame(control.MsgType.STATS, b"[" * 2000 + b"]" * 2000),
        "control.Message.json lets RecursionError through (it catches ValueError only)",
    ),
}


@pytest.mark.parametrize(
    "garbage",
    [pytest.param(name) for name in SUPERVISOR_CRASHES],
)
def test_supervisor_survives_a_bad_message_from_a_worker(channel, client_ctx, garbage):
    sv, worker, _, into_supervisor = channel
    into_supervisor.sendall(SUPERVISOR_CRASHES[garbage][0])
    deadline = Deadline(3)
    while not deadline.expired() and sv.server.running():
        time.sleep(0.05)  # a negative check: the supervisor must still be there after 3 s
    assert sv.server.running(), f"the supervisor died:\n{sv.server.log()[-3000:]}"
    assert_serving(sv, client_ctx)
    if worker not in [w["pid"] for w in serving_workers(sv.status())]:
        wait_replaced(sv, worker)
