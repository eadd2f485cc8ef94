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
- UPSTREAM_STATE (active health, supervisor -> worker), by the same rule: a frame over
  ``MAX_PAYLOAD`` is a FrameError (drain, exit, replaced); a payload that is not
  ``{"pool": str, "servers": [[key, up], ...]}`` is logged and dropped whole, and the worker
  keeps serving with its state unchanged; a well-formed one naming a pool or server this
  generation does not have changes nothing. A frame that never completes stalls the channel:
  the worker stops answering heartbeats and the supervisor replaces it after
  ``server.heartbeat_timeout``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import socket
import ssl
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
    Supervised,
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


def steal_channel(sv: Supervised) -> tuple[int, socket.socket, socket.socket]:
    """(worker pid, into_worker, into_supervisor) for slot 0's worker; skips the test where
    the channel cannot be found or copied."""
    if shutil.which("ss") is None:
        pytest.skip("needs ss (iproute2) to find the control channel")
    worker = serving_workers(sv.status())[0]["pid"]
    sup_fd, worker_fd = channel_fds(sv.server.pid, worker)
    try:
        into_worker = steal(sv.server.pid, sup_fd)
        into_supervisor = steal(worker, worker_fd)
    except OSError as exc:
        pytest.skip(f"pidfd_getfd is not available here: {exc}")
    return worker, into_worker, into_supervisor


@pytest.fixture
def channel(supervised):
    """(supervised, worker pid, into_worker, into_supervisor): sockets writing into one
    worker's control channel, as if from the supervisor and as if from the worker."""
    worker, into_worker, into_supervisor = steal_channel(supervised)
    yield supervised, worker, into_worker, into_supervisor
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
    "upstream-state-oversized": struct.pack(
        ">IB", control.MAX_PAYLOAD + 1, control.MsgType.UPSTREAM_STATE
    ),
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


# -- UPSTREAM_STATE payloads ------------------------------------------------------------------

# "@KEY@" stands for the JSON string of the pool's one server (the echo upstream), as the
# worker knows it; a message that took effect on it would close every client of that worker.
_UP = b'{"pool": "app", "servers": [[@KEY@, false]]}'
_DEEP = b"[" * 5000 + b"]" * 5000  # past the JSON decoder's recursion limit, well under 64 KiB
_MANY = json.dumps(
    {"pool": "app", "servers": [[f"10.0.{i // 250}.{i % 250 + 1}:80", False] for i in range(1000)]}
).encode()

# refused whole and logged ("control channel: bad UPSTREAM_STATE: ..."), state unchanged
REFUSED_UPSTREAM_STATES: dict[str, bytes] = {
    "not-json": b"\xff\xfe not json",
    "truncated-json": _UP[: len(_UP) // 2],
    "empty": b"",
    "not-an-object": b'[["app", [[@KEY@, false]]]]',
    "missing-pool": b'{"servers": [[@KEY@, false]]}',
    "missing-servers": b'{"pool": "app"}',
    "servers-null": b'{"pool": "app", "servers": null}',
    "servers-a-number": b'{"pool": "app", "servers": 7}',
    "entry-too-long": b'{"pool": "app", "servers": [[@KEY@, false, 1]]}',
    "entry-too-short": b'{"pool": "app", "servers": [[@KEY@]]}',
    "entry-not-a-pair": b'{"pool": "app", "servers": [7]}',
    "good-entry-then-bad": b'{"pool": "app", "servers": [[@KEY@, false], ["x"]]}',
    "nested-too-deep": b'{"pool": "app", "servers": ' + _DEEP + b"}",
    "integer-5000-digits": b'{"pool": "app", "servers": [[@KEY@, ' + b"9" * 5000 + b"]]}",
}
# well-formed, about nothing this worker has: ignored without a word, state unchanged
IGNORED_UPSTREAM_STATES: dict[str, bytes] = {
    "unknown-pool": b'{"pool": "nope", "servers": [[@KEY@, false]]}',
    "unknown-server": b'{"pool": "app", "servers": [["127.0.0.1:1", false]]}',
    "server-named-otherwise": b'{"pool": "app", "servers": [["localhost:@PORT@", false]]}',
    "pool-not-a-string": b'{"pool": ["app"], "servers": [[@KEY@, false]]}',
    "a-thousand-unknown-servers": _MANY,
    "extra-keys": b'{"pool": "app", "servers": [], "x": {"y": [1, 2]}}',
}
# Wrong types that a lax reader would coerce (bool(None) is False; "ab" unpacks as two items)
# and so take the server down: the worker must refuse them whole, like the payloads above.
LAX_UPSTREAM_STATES: dict[str, tuple[bytes, str]] = {
    "up-null": (
        b'{"pool": "app", "servers": [[@KEY@, null]]}',
        "bool(None) is False: a null `up` marks the server down",
    ),
    "entry-a-two-letter-string": (
        b'{"pool": "app", "servers": [[@KEY@, false], "ab"]}',
        '"ab" unpacks as ["a", "b"], so the message is applied, not refused',
    ),
}
# written after each case: a bad payload whose log line no case produces, so that once it is
# in the log the worker has handled the case before it
_SENTINEL = b'{"pool": "app", "servers": true}'
_SENTINEL_ERROR = "bad UPSTREAM_STATE: 'bool' object is not iterable"


def upstream_state_frame(body: bytes, key: str) -> bytes:
    port = key.rpartition(":")[2]
    filled = body.replace(b"@KEY@", json.dumps(key).encode()).replace(b"@PORT@", port.encode())
    return frame(control.MsgType.UPSTREAM_STATE, filled)


def bad_state_lines_until_sentinel(sv: Supervised, worker: int) -> list[str] | None:
    """The worker's "bad UPSTREAM_STATE" log lines up to and including the sentinel's, once
    the sentinel's is there."""
    lines = []
    for line in sv.server.log().splitlines():
        if f"edgeterm[{worker}] " in line and "bad UPSTREAM_STATE" in line:
            lines.append(line)
            if _SENTINEL_ERROR in line:
                return lines
    return None


def assert_worker_serves(
    sv: Supervised, worker: int, client_ctx: ssl.SSLContext, *, at_least: int = 2
) -> None:
    """Connections through edgeterm until ``worker`` itself has taken ``at_least`` of them
    (SO_REUSEPORT spreads them over both workers); each must be served (echoed)."""
    st = sv.status()
    base = {w["pid"]: w["accepted"] for w in serving_workers(st)}
    assert worker in base, f"worker {worker} is not serving: {st['workers']}"
    made = 0
    for _round in range(6):
        for _ in range(8):
            echo_once(sv.port, client_ctx, b"served %d" % made)
            made += 1
        target = sum(base.values()) + made

        def caught_up(s: dict[str, Any], target: int = target) -> bool:
            return sum(int(w["accepted"]) for w in s["workers"] if w["pid"] in base) >= target

        st = wait_status(
            sv.admin_socket,
            caught_up,
            timeout=5,
            what=f"the workers' counters to show {made} more connections",
        )
        [mine] = [w for w in st["workers"] if w["pid"] == worker]
        assert not mine["draining"], mine
        if mine["accepted"] - base[worker] >= at_least:
            return
    raise AssertionError(f"worker {worker} took fewer than {at_least} of {made} connections")


def send_upstream_state_case(
    sv: Supervised, worker: int, into_worker: socket.socket, body: bytes
) -> list[str]:
    """Write one UPSTREAM_STATE case, then the sentinel; return the case's log lines."""
    key = sv.cfg["upstreams"]["app"]["servers"][0]
    into_worker.sendall(
        upstream_state_frame(body, key) + frame(control.MsgType.UPSTREAM_STATE, _SENTINEL)
    )
    lines = wait_until(
        lambda: bad_state_lines_until_sentinel(sv, worker),
        timeout=5,
        what="the worker to handle the message and the sentinel after it",
    )
    assert lines is not None
    return lines[:-1]  # the case's own lines


@pytest.mark.parametrize(
    ("case", "logged"),
    [(name, True) for name in REFUSED_UPSTREAM_STATES]
    + [(name, False) for name in IGNORED_UPSTREAM_STATES],
)
def test_worker_drops_a_bad_upstream_state_and_keeps_serving(
    channel, client_ctx: ssl.SSLContext, case: str, logged: bool
) -> None:
    sv, worker, into_worker, _ = channel
    body = {**REFUSED_UPSTREAM_STATES, **IGNORED_UPSTREAM_STATES}[case]
    lines = send_upstream_state_case(sv, worker, into_worker, body)
    assert len(lines) == (1 if logged else 0), lines
    assert "Traceback" not in sv.server.log()
    # the same worker, its pool's server still up for it: its clients are served
    assert_worker_serves(sv, worker, client_ctx)


@pytest.mark.parametrize("case", list(LAX_UPSTREAM_STATES))
def test_worker_refuses_an_upstream_state_with_wrong_types(
    channel, client_ctx: ssl.SSLContext, case: str
) -> None:
    sv, worker, into_worker, _ = channel
    lines = send_upstream_state_case(sv, worker, into_worker, LAX_UPSTREAM_STATES[case][0])
    assert_worker_serves(sv, worker, client_ctx)  # the server is still up for this worker
    assert len(lines) == 1, lines  # refused and logged, like the payloads above


def test_a_frame_that_never_completes_gets_the_worker_replaced(
    edgeterm, echo, client_ctx: ssl.SSLContext
) -> None:
    """The header promises MAX_PAYLOAD bytes that never come: the worker's decoder waits (it
    holds at most MAX_PAYLOAD), the supervisor's heartbeats become payload bytes, the worker
    goes silent, and the heartbeat timeout replaces it."""
    sv = start_supervised(edgeterm, [echo.addr], heartbeat_timeout=3.0)
    worker, into_worker, into_supervisor = steal_channel(sv)
    try:
        partial = b'{"pool": "app", "servers": [['
        into_worker.sendall(
            struct.pack(">IB", control.MAX_PAYLOAD, control.MsgType.UPSTREAM_STATE) + partial
        )
        wait_replaced(sv, worker, timeout=15)
        assert f"worker pid={worker} missed its heartbeats: SIGTERM" in sv.server.log()
        assert_serving(sv, client_ctx)
    finally:
        into_worker.close()
        into_supervisor.close()


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
