"""The plaintext upstream every target forwards to: ``clients/upstream.c``, in a few processes."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from loadtest import measure, procs
from loadtest.errors import LoadtestError


class Upstream:
    """``GET /bytes/N`` answers N bytes, anything else a small body (HTTP/1.1, keep-alive)."""

    def __init__(self, binary: Path, processes: int = 4) -> None:
        self.binary = binary
        self.processes = processes
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [str(self.binary), "0", str(self.processes)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode().split()
        if len(line) != 2 or line[0] != "port":
            self.stop()
            raise LoadtestError(f"the upstream did not start (said {line!r})")
        self.port = int(line[1])
        procs.wait_until(lambda: procs.port_open(self.port), 10.0, "upstream not listening")
        time.sleep(0.05)

    def cpu_seconds(self) -> float:
        return measure.cpu_seconds(self.proc.pid) if self.proc is not None else 0.0

    def stop(self) -> None:
        if self.proc is not None:
            procs.stop(self.proc)
            if self.proc.stdout is not None:
                self.proc.stdout.close()
