"""The terminators under test: edgeterm and the anchors, configured alike, started and stopped.

Every target listens on 127.0.0.1 only, uses the same certificate, the same plaintext upstream
and two workers (haproxy: two threads), TLS 1.2 and 1.3 with the same TLS 1.2 ciphers, key
exchange groups, server cipher preference, ALPN ``http/1.1``, session tickets on (two per
TLS 1.3 handshake, OpenSSL's default) and a 4096 listen backlog. Each runs in its own
directory; stopping signals only the process we started (and its own children), by PID.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from loadtest import measure, prereq, procs
from loadtest.errors import LoadtestError

TLS12_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    )
)
HAPROXY_BIND_OPTIONS = "alpn http/1.1 curves X25519:P-256:P-384 backlog 4096"
START_TIMEOUT = 60.0
# What marks an error in the targets' logs (edgeterm, haproxy, nginx).
PROBLEM_MARKERS = ("Traceback", " ERROR ", " CRITICAL ", "[ALERT]", "[alert]", "[crit]", "[emerg]")
FD_RESERVE = 128  # descriptors a server process keeps for itself (listeners, logs, control)


def fd_limit() -> int:
    """The per-process descriptor limit the servers inherit (the hard limit; soft is raised)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return hard if hard != resource.RLIM_INFINITY else max(soft, 65536)


@dataclass(frozen=True, slots=True)
class Setup:
    """What every target is given."""

    run_dir: Path  # this target's own directory
    cert: Path  # leaf certificate (PEM)
    key: Path  # its private key (PEM)
    combined: Path  # certificate then key, for haproxy's ``crt``
    upstream_port: int
    workers: int = 2
    edgeterm_path: Path | None = None  # a snapshot to run edgeterm from (loadtest.source)


class Target(ABC):
    name: ClassVar[str]
    can_reload: ClassVar[bool] = False
    can_kill_worker: ClassVar[bool] = False

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.port = procs.free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        setup.run_dir.mkdir(parents=True, exist_ok=True)
        self._stderr = setup.run_dir / f"{self.name}.stderr"

    # -- to implement ----------------------------------------------------------------------
    @abstractmethod
    def argv(self) -> list[str]: ...

    @abstractmethod
    def write_config(self) -> None: ...

    @abstractmethod
    def per_process_connections(self) -> int:
        """Proxied connections one serving process can hold within the descriptor limit."""

    @abstractmethod
    def serving_processes(self) -> int: ...

    def ready(self) -> bool:
        return procs.port_open(self.port)

    # -- common ----------------------------------------------------------------------------
    @property
    def pid(self) -> int:
        if self.proc is None:
            raise LoadtestError(f"{self.name} is not running")
        return self.proc.pid

    def env(self) -> dict[str, str] | None:
        """The environment to run the target in (None: loadtest's own)."""
        return None

    def start(self) -> None:
        self.write_config()
        with open(self._stderr, "wb") as err:
            self.proc = subprocess.Popen(
                self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                cwd=self.setup.run_dir,
                env=self.env(),
                start_new_session=True,  # a Ctrl-C reaches loadtest, which stops it in order
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not self.ready():
            if self.proc.poll() is not None:
                raise LoadtestError(
                    f"{self.name} exited during start (code {self.proc.returncode}):\n"
                    + self.log_tail()
                )
            if time.monotonic() > deadline:
                self.stop()
                raise LoadtestError(f"{self.name} not ready within {START_TIMEOUT:.0f}s")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            procs.stop(self.proc)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self._stderr.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def log_files(self) -> list[Path]:
        return [self._stderr]

    def keep_logs(self, directory: Path) -> None:
        """Copy this run's log files (and config) to ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        for path in [*self.log_files(), *self.setup.run_dir.glob("*.toml")]:
            if path.exists():
                shutil.copy(path, directory / path.name)
        for path in self.setup.run_dir.glob("*.c*f"):
            shutil.copy(path, directory / path.name)

    def problem_lines(self) -> list[str]:
        """Lines of the target's logs that report an error, an alert or a traceback."""
        found: list[str] = []
        for path in self.log_files():
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            found += [line for line in text.splitlines() if any(m in line for m in PROBLEM_MARKERS)]
        return found

    def cpu_seconds(self) -> float:
        return measure.cpu_seconds(self.pid)

    def pss_kib(self) -> int:
        return measure.tree_pss_kib(self.pid)

    def idle_capacity(self) -> int:
        return self.per_process_connections() * self.serving_processes()

    def counters(self) -> dict[str, int] | None:
        """Server-side handshake counters, where the target exposes them."""
        return None

    def reload(self) -> None:
        raise LoadtestError(f"{self.name}: reload is not supported by loadtest")

    def kill_worker(self, index: int) -> int:
        raise LoadtestError(f"{self.name}: worker kill is not supported by loadtest")

    def _children(self) -> list[int]:
        return [st.pid for st in measure.tree(self.pid)[1:]]

    def _wait_new_children(self, before: set[int], count: int, what: str) -> None:
        procs.wait_until(
            lambda: len(set(self._children()) - before) >= count,
            30.0,
            f"{self.name}: {what}",
        )


class Edgeterm(Target):
    name = "edgeterm"
    can_reload = True
    can_kill_worker = True

    @property
    def config_file(self) -> Path:
        return self.setup.run_dir / "edgeterm.toml"

    @property
    def log_file(self) -> Path:
        return self.setup.run_dir / "edgeterm.log"

    def per_process_connections(self) -> int:
        return (fd_limit() - FD_RESERVE) // 2

    def serving_processes(self) -> int:
        return self.setup.workers

    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "edgeterm",
            "start",
            "--foreground",
            "-c",
            str(self.config_file),
        ]

    def env(self) -> dict[str, str] | None:
        if self.setup.edgeterm_path is None:
            return None
        return {**os.environ, "PYTHONPATH": str(self.setup.edgeterm_path)}

    def write_config(self) -> None:
        s, run = self.setup, self.setup.run_dir
        q = json.dumps  # a JSON string is a valid TOML basic string for these paths
        self.config_file.write_text(
            f"""# written by loadtest
[server]
workers = {s.workers}
pin_cpus = true
pidfile = {q(str(run / "edgeterm.pid"))}
admin_socket = {q(str(run / "edgeterm.sock"))}
log_file = {q(str(self.log_file))}
graceful_timeout = 10.0

[[listeners]]
name = "bench"
bind = "127.0.0.1:{self.port}"
upstream = "app"
backlog = 4096

[tls]
min_version = "TLSv1.2"
ciphers = "intermediate"
alpn = ["http/1.1"]

[[tls.certificates]]
cert = {q(str(s.cert))}
key = {q(str(s.key))}

[tls.tickets]
enabled = true
count = 2

[upstreams.app]
servers = ["127.0.0.1:{s.upstream_port}"]

[timeouts]
handshake = 10.0
connect = 5.0
idle = 300.0

[limits]
max_connections = {self.per_process_connections()}
"""
        )

    def ready(self) -> bool:
        try:
            return "ready pid=" in self.log_file.read_text(errors="replace")
        except OSError:
            return False

    def log_files(self) -> list[Path]:
        return [self.log_file, self._stderr]

    def log_tail(self, lines: int = 20) -> str:
        parts = []
        for path in self.log_files():
            try:
                parts += path.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                pass
        return "\n".join(parts)

    def _cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "edgeterm", *args, "-c", str(self.config_file)],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def status(self) -> dict[str, Any]:
        result = self._cli("status", "--json", timeout=20.0)
        if result.returncode != 0:
            raise LoadtestError(f"edgeterm status failed: {result.stderr.strip()}")
        answer: dict[str, Any] = json.loads(result.stdout)
        return answer

    def counters(self) -> dict[str, int]:
        st = self.status()
        out = {"accepted": 0, "handshakes": 0, "resumed": 0, "active": 0}
        for w in st["workers"]:
            for key in out:
                out[key] += int(w.get(key, 0))
        return out

    def reload(self) -> None:
        result = self._cli("reload")
        if result.returncode != 0:
            raise LoadtestError(f"edgeterm reload failed: {result.stderr.strip()}")

    def kill_worker(self, index: int) -> int:
        workers = [w for w in self.status()["workers"] if w["ready"] and not w["draining"]]
        if not workers:
            raise LoadtestError("edgeterm: no ready worker to kill")
        pid = int(workers[index % len(workers)]["pid"])
        if not procs.is_child_of(pid, self.pid):
            raise LoadtestError(f"edgeterm: worker pid {pid} is not a child of the supervisor")
        os.kill(pid, signal.SIGKILL)
        return pid


class Haproxy(Target):
    """haproxy in master-worker mode (``-W``, so that SIGUSR2 reloads seamlessly), one worker
    process with two threads pinned to CPUs 0 and 1."""

    name = "haproxy"
    can_reload = True

    def __init__(self, setup: Setup) -> None:
        super().__init__(setup)
        self.binary = prereq.haproxy()

    @property
    def config_file(self) -> Path:
        return self.setup.run_dir / "haproxy.cfg"

    def per_process_connections(self) -> int:
        return (fd_limit() - FD_RESERVE) // 2

    def serving_processes(self) -> int:
        return 1  # threads share one process and its descriptor limit

    def argv(self) -> list[str]:
        return [self.binary, "-W", "-db", "-f", str(self.config_file)]

    def write_config(self) -> None:
        s = self.setup
        cpus = "0-1" if s.workers == 2 else f"0-{s.workers - 1}"
        self.config_file.write_text(
            f"""# written by loadtest
global
    nbthread {s.workers}
    cpu-map auto:1/1-{s.workers} {cpus}
    maxconn {self.per_process_connections()}
    ssl-default-bind-ciphers {TLS12_CIPHERS}
    ssl-default-bind-options ssl-min-ver TLSv1.2
    stats socket {s.run_dir / "haproxy.sock"} mode 600 level admin

defaults
    mode tcp
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    timeout client-fin 300s
    timeout server-fin 300s

frontend bench
    bind 127.0.0.1:{self.port} ssl crt {s.combined} {HAPROXY_BIND_OPTIONS}
    default_backend app

backend app
    server app 127.0.0.1:{s.upstream_port}
"""
        )

    def ready(self) -> bool:
        return procs.port_open(self.port) and bool(self._children())

    def reload(self) -> None:
        before = set(self._children())
        os.kill(self.pid, signal.SIGUSR2)
        self._wait_new_children(before, 1, "no new worker after SIGUSR2")


class Nginx(Target):
    """nginx ``stream`` with ssl: a master and two workers pinned to CPUs 0 and 1, one
    SO_REUSEPORT listening socket per worker (as edgeterm)."""

    name = "nginx"
    can_reload = True
    can_kill_worker = True

    def __init__(self, setup: Setup) -> None:
        super().__init__(setup)
        self.binary, self.module = prereq.nginx()

    @property
    def config_file(self) -> Path:
        return self.setup.run_dir / "nginx.conf"

    def per_process_connections(self) -> int:
        return (fd_limit() - FD_RESERVE) // 2

    def serving_processes(self) -> int:
        return self.setup.workers

    def argv(self) -> list[str]:
        run = self.setup.run_dir
        return [
            self.binary,
            "-p",
            str(run),
            "-c",
            str(self.config_file),
            "-e",
            str(run / "error.log"),
        ]

    def write_config(self) -> None:
        s, run = self.setup, self.setup.run_dir
        load = f"load_module {self.module};\n" if self.module else ""
        affinity = " ".join(format(1 << i, "b").zfill(s.workers) for i in range(s.workers))
        self.config_file.write_text(
            f"""# written by loadtest
{load}daemon off;
master_process on;
worker_processes {s.workers};
worker_cpu_affinity {affinity};
worker_rlimit_nofile {fd_limit()};
pid {run / "nginx.pid"};
error_log {run / "error.log"} warn;

events {{
    worker_connections {2 * self.per_process_connections() + 16};
}}

stream {{
    upstream app {{
        server 127.0.0.1:{s.upstream_port};
    }}
    server {{
        listen 127.0.0.1:{self.port} ssl reuseport backlog=4096;
        ssl_certificate {s.cert};
        ssl_certificate_key {s.key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_ciphers {TLS12_CIPHERS};
        ssl_prefer_server_ciphers on;
        ssl_ecdh_curve X25519:prime256v1:secp384r1;
        ssl_session_tickets on;
        ssl_handshake_timeout 10s;
        proxy_pass app;
        proxy_connect_timeout 5s;
        proxy_timeout 300s;
    }}
}}
"""
        )

    def ready(self) -> bool:
        return procs.port_open(self.port) and len(self._children()) >= self.setup.workers

    def log_files(self) -> list[Path]:
        return [self._stderr, self.setup.run_dir / "error.log"]

    def reload(self) -> None:
        before = set(self._children())
        os.kill(self.pid, signal.SIGHUP)
        self._wait_new_children(before, self.setup.workers, "no new workers after SIGHUP")

    def kill_worker(self, index: int) -> int:
        children = sorted(self._children())
        if not children:
            raise LoadtestError("nginx: no worker to kill")
        pid = children[index % len(children)]
        os.kill(pid, signal.SIGKILL)
        return pid


class EdgetermTelemetry(Edgeterm):
    """edgeterm exporting traces and metrics over OTLP to a live collector that only counts
    (``tests/support/otlp.py``), at the default sample ratio: the cost of telemetry (issue 6)
    is this target's CPU per unit of work against plain ``edgeterm`` in the same run."""

    name = "edgeterm-otel"
    sample_ratio = 0.01
    _collector: subprocess.Popen[bytes] | None = None

    def write_config(self) -> None:
        super().write_config()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self._otlp_port = s.getsockname()[1]
        with self.config_file.open("a") as f:
            f.write(
                f"""
[telemetry]
otlp_endpoint = "http://127.0.0.1:{self._otlp_port}"
sample_ratio = {self.sample_ratio}
"""
            )

    def start(self) -> None:
        self.write_config()
        repo = Path(__file__).resolve().parent.parent
        self._collector = subprocess.Popen(
            [sys.executable, "-m", "tests.support.otlp", "--port", str(self._otlp_port)],
            cwd=repo,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        write_config, self.write_config = self.write_config, lambda: None  # keep the port
        try:
            super().start()
        finally:
            self.write_config = write_config  # type: ignore[method-assign]

    def stop(self) -> None:
        super().stop()
        if self._collector is not None:
            procs.stop(self._collector)
            self._collector = None


class EdgetermTelemetryAll(EdgetermTelemetry):
    """The same with every connection traced (sample_ratio = 1)."""

    name = "edgeterm-otel1"
    sample_ratio = 1.0


TARGETS: dict[str, type[Target]] = {
    cls.name: cls for cls in (Edgeterm, Haproxy, Nginx, EdgetermTelemetry, EdgetermTelemetryAll)
}


def check_available(names: list[str]) -> None:
    """Raise MissingPrerequisite (naming the apt package) for an anchor that cannot run."""
    for name in names:
        if name == "haproxy":
            prereq.haproxy()
        elif name == "nginx":
            prereq.nginx()
        elif name not in TARGETS:
            raise LoadtestError(f"unknown target {name!r} (known: {', '.join(TARGETS)})")
