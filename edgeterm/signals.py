"""Signals that only enqueue: ``signal.set_wakeup_fd`` writes the signal number to a socket
pair, the process's event loop reads it and dispatches. Handlers never run edgeterm logic.
"""

from __future__ import annotations

import signal
import socket
from collections.abc import Iterable


class SignalQueue:
    def __init__(self, signums: Iterable[signal.Signals]) -> None:
        self._signums = tuple(signums)
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)
        self._old = signal.set_wakeup_fd(self._w.fileno(), warn_on_full_buffer=False)
        for signum in self._signums:
            signal.signal(signum, _enqueue_only)

    def fileno(self) -> int:
        return self._r.fileno()

    def take(self) -> list[int]:
        """The signal numbers received since the last call, in order."""
        out: list[int] = []
        while True:
            try:
                data = self._r.recv(256)
            except BlockingIOError:
                return out
            if not data:
                return out
            out.extend(data)

    def close(self, restore: bool = True) -> None:
        if restore:
            signal.set_wakeup_fd(self._old if self._old != self._w.fileno() else -1)
            for signum in self._signums:
                signal.signal(signum, signal.SIG_DFL)
        self._r.close()
        self._w.close()


def _enqueue_only(signum: int, frame: object) -> None:
    """The wakeup fd already carries the signal number; nothing else happens here."""


def reset_after_fork() -> None:
    """In a forked child: stop writing signals into the parent's wakeup socket."""
    signal.set_wakeup_fd(-1)
