"""Small process helpers: free ports, waiting for a listener, stopping what we started by PID."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable

from loadtest import measure


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def is_child_of(pid: int, parent: int) -> bool:
    """True when ``pid`` is alive and its parent is ``parent`` (so it is ours to signal)."""
    return any(st.pid == pid for st in measure.tree(parent)[1:])


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
    """Stop ``proc`` with ``sig``, then SIGKILL; then SIGKILL any of its children left behind.

    Only the process we started and the descendants it had are signalled, each by its PID.
    """
    if proc.poll() is not None:
        return
    descendants = measure.tree(proc.pid)[1:]
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5.0)
    for st in descendants:
        # A descendant that outlived its parent: kill it only if its PID still names the same
        # process (same start time), never a newcomer that reused the number.
        if measure.same_process(st):
            with contextlib.suppress(ProcessLookupError):
                os.kill(st.pid, signal.SIGKILL)


def wait_until(
    check: Callable[[], bool], timeout: float, what: str, interval: float = 0.05
) -> None:
    """Poll ``check()`` until it is true; raise TimeoutError naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout:.0f}s")
        time.sleep(interval)
