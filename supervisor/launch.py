"""Starting the supervisor: in the foreground, or as a daemon that reports back when ready.

Everything that can fail because of the operator (config, certificates, ports, a running
instance) is checked in the calling process, before any fork, so the error reaches the
terminal. The daemon is a double fork with ``setsid``; the grandchild tells the waiting
``edgeterm start`` through a pipe once every worker accepts connections, or why it could not.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from edgeterm import logs, openssl
from edgeterm.config import Config
from edgeterm.errors import StartupError
from edgeterm.tls import build_contexts

from . import pidfile
from .supervisor import EXIT_FAILURE, Supervisor

log = logging.getLogger("edgeterm.supervisor")

EXIT_ALREADY_RUNNING = 6
READY_TIMEOUT = 120.0


class AlreadyRunning(Exception):
    pass


def default_log_file(config: Config) -> Path:
    return config.server.log_file or config.server.pidfile.parent / "edgeterm.log"


def prepare(config: Config, config_file: str, log_file: Path | None) -> Supervisor:
    """Check and build everything a supervisor needs; bind its listeners."""
    running = pidfile.read_pid(config.server.pidfile)
    if running is not None:
        raise AlreadyRunning(
            f"edgeterm is already running (pid {running}, pidfile {config.server.pidfile})"
        )
    openssl.self_check()
    logs.setup(log_file)
    log.info(
        "%s",
        openssl.enable_secure_heap(openssl.secure_heap_size(config.limits.max_connections)),
    )
    contexts = build_contexts(config.tls, config_file)
    for warning in contexts.warnings:
        log.warning("%s", warning)
    return Supervisor(config, config_file, contexts)


def run_foreground(config: Config, config_file: str) -> int:
    sup = prepare(config, config_file, config.server.log_file)
    return sup.run()


def run_daemon(config: Config, config_file: str) -> tuple[int, str]:
    """Start a daemon; return (exit code, message) once it serves or has failed."""
    log_file = default_log_file(config)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    sup = prepare(config, config_file, log_file)
    r, w = os.pipe()
    first = os.fork()
    if first > 0:
        os.close(w)
        os.waitpid(first, 0)
        return _wait_for_daemon(r, log_file)
    # The first child: new session, then fork again so the daemon can never get a terminal.
    try:
        os.close(r)
        os.setsid()
        if os.fork() > 0:
            os._exit(0)
        _detach_stdio(log_file)

        def on_ready(error: str | None) -> None:
            if error is None:
                msg = f"ok edgeterm started: pid {os.getpid()}, {len(sup.serving.slots)} workers\n"
            else:
                msg = f"error {sup.exit_code or EXIT_FAILURE} {error}\n"
            try:
                os.write(w, msg.encode())
                os.close(w)
            except OSError:
                pass

        sup.on_ready = on_ready
        code = sup.run()
    except BaseException as exc:  # never fall back into the caller's code in a child
        try:
            os.write(w, f"error {EXIT_FAILURE} {exc}\n".encode())
        except OSError:
            pass
        code = EXIT_FAILURE
    os._exit(code)


def _wait_for_daemon(r: int, log_file: Path) -> tuple[int, str]:
    import select

    # Stop at the first line: the workers inherited the pipe's write end, so no EOF comes.
    buf = b""
    poller = select.poll()
    poller.register(r, select.POLLIN)
    deadline = time.monotonic() + READY_TIMEOUT
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or not poller.poll(left * 1000):
            os.close(r)
            return (
                EXIT_FAILURE,
                f"edgeterm did not report ready within {READY_TIMEOUT:.0f}s; see {log_file}",
            )
        data = os.read(r, 4096)
        if not data:
            break
        buf += data
    os.close(r)
    chunks = [buf.split(b"\n", 1)[0]]
    text = b"".join(chunks).decode(errors="replace").strip()
    if text.startswith("ok "):
        return 0, text[3:]
    if text.startswith("error "):
        code_text, _, why = text[6:].partition(" ")
        code = int(code_text) if code_text.isdigit() else EXIT_FAILURE
        return code, f"edgeterm failed to start: {why} (see {log_file})"
    return EXIT_FAILURE, f"edgeterm exited during start; see {log_file}"


def _detach_stdio(log_file: Path) -> None:
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    logs.setup(log_file, stdio=True)  # stdout/stderr follow the log file, also on SIGUSR1
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)


__all__ = ["EXIT_ALREADY_RUNNING", "AlreadyRunning", "StartupError", "run_daemon", "run_foreground"]
