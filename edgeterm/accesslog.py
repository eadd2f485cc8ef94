"""The access log: one JSON line per connection, buffered, to a file or stderr.

* A line is formatted when its connection closes and kept in memory; ``flush()`` writes the
  buffer: the worker's telemetry tick calls it every second, ``write`` calls it once the
  buffer passes ``FLUSH_BYTES``, and ``close`` at exit. Never one write(2) per connection.
* Writing never stalls the worker. A regular file is written at once (``O_APPEND``: lines
  of several workers never mix). A pipe, socket or terminal (stderr under a supervisor
  or systemd) is written only when ``poll`` says there is room, at most ``PIPE_BUF`` bytes of
  whole lines per write (atomic: lines of several processes never interleave); what does not
  fit waits for the next flush.
* At most ``MAX_BUFFER`` bytes wait; lines beyond that, or lost to a write error, are dropped
  and counted (``dropped``, reported as ``edgeterm_telemetry_access_log_dropped_total``).
* ``reopen()`` (SIGUSR1, after logrotate moved the file) opens the path again; stderr needs
  nothing (a daemon's stderr already follows its log file, see ``edgeterm.logs``).
"""

from __future__ import annotations

import json
import logging
import os
import select
import stat
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Final

log = logging.getLogger("edgeterm.telemetry")

MAX_BUFFER: Final = 1 << 20  # bytes of lines waiting to be written
FLUSH_BYTES: Final = 64 << 10  # flush as soon as this much is waiting
CLOSE_TIMEOUT: Final = 0.5  # seconds ``close`` waits for a slow pipe
_FILE_CHUNK: Final = 1 << 20
_PIPE_CHUNK: Final = select.PIPE_BUF


class AccessLog:
    def __init__(
        self,
        path: Path | None,
        *,
        max_buffer: int = MAX_BUFFER,
        flush_bytes: int = FLUSH_BYTES,
    ) -> None:
        """Open ``path`` for appending (None: stderr); raises OSError when it cannot."""
        self.path = path
        self.max_buffer = max_buffer
        self.flush_bytes = flush_bytes
        self.dropped = 0  # lines
        self._buf: list[bytes] = []
        self._size = 0
        self._fd, self._poll, self._chunk = self._open()

    def _open(self) -> tuple[int, select.poll | None, int]:
        if self.path is None:
            fd = 2
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
            fd = os.open(self.path, flags, 0o640)
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return fd, None, _FILE_CHUNK
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        return fd, poller, _PIPE_CHUNK

    def write(self, fields: Mapping[str, object]) -> None:
        line = json.dumps(fields, separators=(",", ":")).encode() + b"\n"
        if self._size + len(line) > self.max_buffer:
            self.dropped += 1
            return
        self._buf.append(line)
        self._size += len(line)
        if self._size >= self.flush_bytes:
            self.flush()

    def flush(self) -> None:
        """Write what the output takes now; keep the rest for the next flush."""
        if not self._buf:
            return
        data = b"".join(self._buf)
        done = self._write(data)
        rest = data[done:]
        self._buf = [rest] if rest else []
        self._size = len(rest)

    def _write(self, data: bytes, wait: float = 0.0) -> int:
        view = memoryview(data)
        off = 0
        while off < len(data):
            if self._poll is not None:
                events = self._poll.poll(wait * 1000.0)
                if not events:
                    break  # the reader is behind: try again at the next flush
            end = off + self._chunk
            if end < len(data):
                cut = data.rfind(b"\n", off, end)
                # whole lines only; a line longer than a chunk goes out alone
                end = cut + 1 if cut >= off else data.index(b"\n", off) + 1
            try:
                off += os.write(self._fd, view[off:end])
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # EPIPE, ENOSPC, EIO...: these lines are lost
                lost = data.count(b"\n", off)
                if not self.dropped:
                    log.error("access log: %s; dropping lines", exc.strerror or exc)
                self.dropped += lost
                return len(data)
        return off

    def reopen(self) -> None:
        """Write what is buffered to the old file, then open the path again (SIGUSR1)."""
        if self.path is None:
            return
        self.flush()
        try:
            fd, poller, chunk = self._open()
        except OSError as exc:
            log.error("access log: cannot reopen %s: %s", self.path, exc.strerror or exc)
            return
        old = self._fd
        self._fd, self._poll, self._chunk = fd, poller, chunk
        os.close(old)

    def close(self) -> None:
        """Write what is buffered (waiting at most ``CLOSE_TIMEOUT`` for a slow pipe)."""
        deadline = time.monotonic() + CLOSE_TIMEOUT
        while self._buf:
            left = deadline - time.monotonic()
            data = b"".join(self._buf)
            rest = data[self._write(data, wait=max(0.0, left)) :]
            self._buf = [rest] if rest else []
            if rest and left <= 0:
                self.dropped += rest.count(b"\n")
                self._buf = []
        self._size = 0
        if self.path is not None and self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
