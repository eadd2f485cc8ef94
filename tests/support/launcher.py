"""Start ``edgeterm start --foreground`` as a real process, wait for readiness, stop it by PID.

Readiness is what the server says on stderr: one ``listening name=<name> addr=<host>:<port>``
line per listener, then ``ready pid=<pid>``. Every wait has a deadline; on failure the error
carries the server's log.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from . import procfs
from .certs import CertSet
from .configs import base_config, write_config

LISTENING_RE = re.compile(r"listening name=(?P<name>\S+) addr=(?P<addr>\S+)")
READY_RE = re.compile(r"ready pid=(?P<pid>\d+)")


def edgeterm_command() -> list[str]:
    """The console script next to the running interpreter, else ``python -m edgeterm``."""
    script = Path(sys.executable).parent / "edgeterm"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "edgeterm"]


def run_cli(
    *args: str, timeout: float = 60.0, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``edgeterm <args>`` to completion (bounded), capturing stdout and stderr."""
    return subprocess.run(
        [*edgeterm_command(), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )


def spawn_cli(*args: str) -> subprocess.Popen[str]:
    """Start ``edgeterm <args>`` in the background (stdout and stderr piped, as text); the
    caller bounds it with ``communicate(timeout=...)`` and kills it if it outlives the test."""
    return subprocess.Popen(
        [*edgeterm_command(), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )


class ServerDied(AssertionError):
    pass


class Edgeterm:
    """One ``edgeterm start --foreground -c CONFIG`` process."""

    def __init__(self, config: Path, *, cwd: Path | None = None) -> None:
        self.config = config
        self.cwd = cwd or config.parent
        self.proc: subprocess.Popen[bytes] | None = None
        self.lines: list[str] = []
        self.listeners: dict[str, tuple[str, int]] = {}
        self.ready_pid: int | None = None
        self._ready = threading.Event()
        self._eof = threading.Event()
        self._lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self.known_pids: set[int] = set()
        self.stopped_by_us = False
        self.leftover_pids: list[int] = []

    # lifecycle -----------------------------------------------------------------------------

    def start(self, *, timeout: float = 30.0) -> Edgeterm:
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
        self.proc = subprocess.Popen(
            [*edgeterm_command(), "start", "--foreground", "-c", str(self.config)],
            cwd=self.cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.known_pids.add(self.proc.pid)
        self._reader = threading.Thread(target=self._read_log, name="edgeterm-log", daemon=True)
        self._reader.start()
        self.wait_ready(timeout)
        return self

    def _read_log(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            with self._lock:
                self.lines.append(line)
            if m := LISTENING_RE.search(line):
                host, _, port = m["addr"].rpartition(":")
                self.listeners[m["name"]] = (host.strip("[]"), int(port))
            if m := READY_RE.search(line):
                self.ready_pid = int(m["pid"])
                self._ready.set()
        self._eof.set()

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if self._eof.is_set() or (self.proc is not None and self.proc.poll() is not None):
                self._eof.wait(2)
                raise ServerDied(
                    f"edgeterm exited with {self.proc.poll() if self.proc else None} before "
                    f"ready:\n{self.log()}"
                )
            if time.monotonic() > deadline:
                raise ServerDied(f"edgeterm not ready after {timeout:.0f}s:\n{self.log()}")
        self.remember_pids()

    def remember_pids(self) -> None:
        """Record the current process tree, so that stop() can clean up every descendant."""
        if self.proc is not None:
            self.known_pids.update(procfs.tree_pids(self.proc.pid))

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def port(self, name: str = "https") -> int:
        return self.listeners[name][1]

    def log(self) -> str:
        with self._lock:
            return "\n".join(self.lines)

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None
        self.remember_pids()
        if sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            self.stopped_by_us = True  # an exit from now on is not a crash
        os.kill(self.proc.pid, sig)

    def wait_exit(self, timeout: float) -> int | None:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, *, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        """Signal the server (default SIGTERM), wait up to ``timeout``, then SIGKILL it and any
        leftover descendant by PID. Returns the exit code of the graceful stop, or None if it
        had to be killed."""
        if self.proc is None:
            return None
        self.stopped_by_us = True
        code: int | None = self.proc.poll()
        if code is None:
            self.remember_pids()
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)
            code = self.wait_exit(timeout)
            if code is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._kill_leftovers()
        self._eof.wait(5)
        return code

    def _kill_leftovers(self, timeout: float = 5.0) -> None:
        assert self.proc is not None
        leftovers = []
        for pid in self.known_pids - {self.proc.pid}:
            try:
                p = psutil.Process(pid)
                # only our own descendants: same session as the server we started
                if os.getsid(pid) == self.proc.pid and p.status() != psutil.STATUS_ZOMBIE:
                    leftovers.append(p)
            except (psutil.NoSuchProcess, ProcessLookupError, PermissionError):
                continue
        for p in leftovers:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.terminate()
        _, alive = psutil.wait_procs(leftovers, timeout=timeout)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(alive, timeout=timeout)
        self.leftover_pids = [p.pid for p in leftovers]


class EdgetermFactory:
    """Writes configs under ``directory`` and starts servers; ``close()`` stops them all."""

    def __init__(self, directory: Path, certs: CertSet) -> None:
        self.directory = directory
        self.certs = certs
        self.servers: list[Edgeterm] = []
        # certificates are referenced relative to the config file (resolution is part of the
        # contract) and the server runs from another directory
        (directory / "certs").symlink_to(certs.directory, target_is_directory=True)
        self.cwd = directory / "cwd"
        self.cwd.mkdir()

    def config(self, upstream_servers: list[str], **overrides: Any) -> dict[str, Any]:
        return base_config(self.certs, upstream_servers, cert_dir="certs", overrides=overrides)

    def start(
        self,
        upstream_servers: list[str] | None = None,
        *,
        cfg: dict[str, Any] | None = None,
        **overrides: Any,
    ) -> Edgeterm:
        if cfg is None:
            assert upstream_servers is not None
            cfg = self.config(upstream_servers, **overrides)
        path = write_config(self.directory / f"edgeterm-{len(self.servers)}.toml", cfg)
        server = Edgeterm(path, cwd=self.cwd)
        self.servers.append(server)
        server.start()
        return server

    def close(self) -> list[str]:
        """Stop every server; return problems seen (crash before teardown, tracebacks)."""
        problems = []
        for server in self.servers:
            if server.proc is None:
                continue
            crashed = not server.stopped_by_us and server.proc.poll() is not None
            server.stop()
            if crashed:
                problems.append(
                    f"edgeterm pid {server.pid} exited with {server.proc.returncode} during the "
                    f"test:\n{server.log()}"
                )
            elif "Traceback (most recent call last)" in server.log():
                problems.append(f"edgeterm pid {server.pid} logged a traceback:\n{server.log()}")
            if server.leftover_pids:
                problems.append(f"edgeterm pid {server.pid} left processes {server.leftover_pids}")
        return problems
