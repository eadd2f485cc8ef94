"""Helpers for the supervisor tests: admin-socket status, client loops, throttled transfers,
daemons started with ``edgeterm start`` (no ``--foreground``) and cleaned up by PID.

Everything is real: the status comes from the supervisor's admin socket (the same one-line JSON
protocol ``edgeterm status`` uses), the clients are stdlib ``ssl`` sockets, daemons are found
through their pidfile. Every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from .launcher import Edgeterm, EdgetermFactory, run_cli
from .tlsclient import HOST, connect_tls, recv_exactly
from .waiting import Deadline, WaitTimeout, wait_until

KiB = 1 << 10
MiB = 1 << 20


# ports and pids -----------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now (for daemon configs, whose
    port the test must know in advance)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped (for a stale pidfile)."""
    proc = subprocess.Popen(["true"])
    proc.wait(10)
    return proc.pid


def read_pidfile(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def pid_gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie counts as gone: it serves nothing)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_pids_gone(pids: list[int], *, timeout: float, what: str = "processes") -> None:
    def all_gone() -> bool:
        return all(pid_gone(p) for p in pids)

    try:
        wait_until(all_gone, timeout=timeout, interval=0.02, what=what)
    except WaitTimeout as exc:
        alive = [p for p in pids if not pid_gone(p)]
        raise WaitTimeout(f"{exc}: still alive {alive}") from None


# a supervised server in the foreground ------------------------------------------------------


@dataclass
class Supervised:
    """``edgeterm start --foreground`` with ``workers`` pinned workers, its pidfile and admin
    socket under the test's directory."""

    server: Edgeterm
    cfg: dict[str, Any]
    pidfile: Path
    admin_socket: Path

    @property
    def config(self) -> Path:
        return self.server.config

    @property
    def port(self) -> int:
        return self.server.port()

    def status(self) -> dict[str, Any]:
        return admin_status(self.admin_socket)


def supervised_config(
    factory: EdgetermFactory, upstream_servers: list[str], **server: Any
) -> tuple[dict[str, Any], Path, Path]:
    """A config with two pinned workers (the machine has two CPUs) and absolute run paths."""
    run = factory.directory / "run"
    pidfile, admin_socket = run / "edgeterm.pid", run / "edgeterm.sock"
    settings = {
        "workers": 2,
        "pin_cpus": True,
        "pidfile": str(pidfile),
        "admin_socket": str(admin_socket),
        **server,
    }
    return factory.config(upstream_servers, server=settings), pidfile, admin_socket


def start_supervised(
    factory: EdgetermFactory, upstream_servers: list[str], **server: Any
) -> Supervised:
    cfg, pidfile, admin_socket = supervised_config(factory, upstream_servers, **server)
    started = factory.start(cfg=cfg)
    return Supervised(started, cfg, pidfile, admin_socket)


# status -------------------------------------------------------------------------------------


def admin_status(admin_socket: Path, *, timeout: float = 5.0) -> dict[str, Any]:
    """One ``{"cmd": "status"}`` request on the admin socket (what ``edgeterm status`` sends)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(admin_socket))
        sock.sendall(b'{"cmd": "status"}\n')
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
    answer = json.loads(b"".join(chunks))
    assert isinstance(answer, dict), answer
    return answer


def wait_status(
    admin_socket: Path,
    predicate: Callable[[dict[str, Any]], Any],
    *,
    timeout: float,
    what: str,
    interval: float = 0.02,
) -> dict[str, Any]:
    """Poll the admin socket until ``predicate(status)`` is truthy; return that status."""
    last: list[dict[str, Any]] = []

    def check() -> dict[str, Any] | None:
        st = admin_status(admin_socket)
        last[:] = [st]
        return st if predicate(st) else None

    try:
        result = wait_until(check, timeout=timeout, interval=interval, what=what)
    except WaitTimeout as exc:
        raise WaitTimeout(f"{exc}; last status: {json.dumps(last, indent=1)}") from None
    assert result is not None
    return result


def cli_status(config: Path) -> dict[str, Any]:
    r = run_cli("status", "--json", "-c", str(config), timeout=30)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    answer = json.loads(r.stdout)
    assert isinstance(answer, dict)
    return answer


def serving_workers(st: dict[str, Any]) -> list[dict[str, Any]]:
    """The ready, non-draining workers of the serving generation, by slot."""
    return sorted(
        (
            w
            for w in st["workers"]
            if w["generation"] == st["generation"] and w["ready"] and not w["draining"]
        ),
        key=lambda w: w["slot"],
    )


# clients ------------------------------------------------------------------------------------


def echo_once(port: int, ctx: ssl.SSLContext, payload: bytes, *, timeout: float = 5.0) -> None:
    """One TLS connection through edgeterm to an echo upstream: send, read the echo, close."""
    with connect_tls(port, ctx, timeout=timeout) as s:
        s.sendall(payload)
        got = recv_exactly(s, len(payload), timeout=timeout)
        if got != payload:
            raise AssertionError(f"echo mismatch: sent {payload!r}, got {got!r}")


@dataclass
class LoopFailure:
    at: float  # monotonic
    error: str


@dataclass
class ClientLoop:
    """A thread opening a new TLS connection every ``pause`` seconds, each with one request and
    its answer (echo upstream), until stopped or ``max_seconds`` elapse."""

    port: int
    ctx: ssl.SSLContext
    pause: float = 0.003
    max_seconds: float = 30.0
    ok: int = 0
    failures: list[LoopFailure] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> ClientLoop:
        self._thread = threading.Thread(target=self._run, name="client-loop", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        deadline = Deadline(self.max_seconds)
        n = 0
        while not self._stop.is_set() and not deadline.expired():
            n += 1
            try:
                echo_once(self.port, self.ctx, b"request %d\n" % n)
                self.ok += 1
            except Exception as exc:
                self.failures.append(LoopFailure(time.monotonic(), repr(exc)))
            # pacing (a new connection every few ms), not synchronisation
            self._stop.wait(self.pause)

    def wait_ok(self, n: int, *, timeout: float) -> None:
        start = self.ok
        wait_until(
            lambda: self.ok >= start + n,
            timeout=timeout,
            what=f"{n} more successful loop connections (ok={self.ok}, failed={self.failed})",
        )

    @property
    def failed(self) -> int:
        return len(self.failures)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(15)
            assert not self._thread.is_alive(), "client loop did not stop"

    def summary(self) -> str:
        errors = "; ".join(f.error for f in self.failures[:5])
        return f"ok={self.ok} failed={self.failed}" + (f" ({errors})" if errors else "")


class EchoTransfer:
    """A long transfer through edgeterm to an echo upstream, in a thread: ``total`` random
    bytes sent in ``chunk``-sized steps, each read back before the next (so at most one chunk is
    in flight and one SSL socket is never used by two threads). Throttled to one chunk per
    ``slow_pause`` seconds until ``go_fast()``; this keeps it alive across the events under test,
    whatever they take, and the test checks it was still running when they were over.
    """

    def __init__(
        self,
        port: int,
        ctx: ssl.SSLContext,
        total: int,
        *,
        chunk: int = 64 * KiB,
        slow_pause: float = 0.02,
        timeout: float = 90.0,
    ) -> None:
        self.port = port
        self.ctx = ctx
        self.total = total
        self.chunk = chunk
        self.slow_pause = slow_pause
        self.timeout = timeout
        self.sent = 0
        self.received = 0
        self.sent_sha256 = ""
        self.received_sha256 = ""
        self.error: BaseException | None = None
        self._fast = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="echo-transfer", daemon=True)

    def start(self) -> EchoTransfer:
        self._thread.start()
        return self

    def go_fast(self) -> None:
        self._fast.set()

    def _run(self) -> None:
        tx, rx = hashlib.sha256(), hashlib.sha256()
        deadline = Deadline(self.timeout)
        try:
            with connect_tls(self.port, self.ctx, timeout=10) as s:
                while self.sent < self.total:
                    deadline.check(f"transfer ({self.received} of {self.total} bytes back)")
                    data = os.urandom(min(self.chunk, self.total - self.sent))
                    s.settimeout(max(0.05, deadline.remaining()))
                    s.sendall(data)
                    tx.update(data)
                    self.sent += len(data)
                    back = recv_exactly(s, len(data), timeout=max(0.05, deadline.remaining()))
                    rx.update(back)
                    self.received += len(back)
                    if not self._fast.is_set():
                        self._fast.wait(self.slow_pause)  # throttle (pacing only)
        except BaseException as exc:
            self.error = exc
        finally:
            self.sent_sha256 = tx.hexdigest()
            self.received_sha256 = rx.hexdigest()
            self._done.set()

    def wait_received(self, n: int, *, timeout: float) -> None:
        wait_until(
            lambda: self.received >= n or self._done.is_set(),
            timeout=timeout,
            what=f"{n} bytes of the transfer back",
        )
        assert self.error is None, f"transfer failed early: {self.error!r}"

    def running(self) -> bool:
        return not self._done.is_set()

    def join(self, timeout: float) -> None:
        self.go_fast()
        if not self._done.wait(timeout):
            raise WaitTimeout(
                f"transfer not finished after {timeout:.0f}s ({self.received} of {self.total})"
            )
        self._thread.join(5)

    def assert_intact(self) -> None:
        assert self.error is None, f"transfer failed after {self.received} bytes: {self.error!r}"
        assert self.received == self.sent == self.total
        assert self.received_sha256 == self.sent_sha256, "echoed bytes differ from sent bytes"


# daemons ------------------------------------------------------------------------------------


class Daemons:
    """Daemons started with ``edgeterm start -c CONFIG``; ``close()`` stops any left running,
    by the PIDs read from their pidfiles (SIGTERM, then SIGKILL), workers included."""

    def __init__(self) -> None:
        self.pidfiles: list[Path] = []
        self.pids: set[int] = set()

    def start(self, config: Path, pidfile: Path, *, timeout: float = 60.0) -> Any:
        """Run ``edgeterm start -c CONFIG`` to completion; remember the daemon for cleanup."""
        self.pidfiles.append(pidfile)
        r = run_cli("start", "-c", str(config), timeout=timeout)
        self.remember(pidfile)
        return r

    def remember(self, pidfile: Path) -> None:
        pid = read_pidfile(pidfile)
        if pid is not None and not pid_gone(pid):
            self.pids.add(pid)
            with contextlib.suppress(psutil.NoSuchProcess):
                self.pids.update(c.pid for c in psutil.Process(pid).children(recursive=True))

    def close(self) -> list[int]:
        """Stop what is still running; return the pids that had to be stopped here."""
        for pidfile in self.pidfiles:
            self.remember(pidfile)
        procs = []
        for pid in self.pids:
            with contextlib.suppress(psutil.NoSuchProcess):
                p = psutil.Process(pid)
                if p.status() != psutil.STATUS_ZOMBIE:
                    procs.append(p)
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=10)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(alive, timeout=10)
        return [p.pid for p in procs]


def tail(path: Path, n: int = 60) -> str:
    """The last lines of a log file (for failure messages)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError as exc:
        return f"<{path}: {exc}>"
