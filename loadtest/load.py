"""Running the C load client (``clients/tlsload.c``) in one or more processes, merging results.

Each process prints one JSON object; latencies come as histograms of [lower_bound_us, count]
buckets (64 linear sub-buckets per power of two), which merge by addition. The clients' own
CPU time is taken from ``wait4`` so the cost of the load generator is on record too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtest.errors import LoadtestError

SUB_BITS = 6


def _bucket_width(lower: int) -> int:
    if lower < (1 << SUB_BITS):
        return 1
    return 1 << (lower.bit_length() - 1 - SUB_BITS)


@dataclass(slots=True)
class Histogram:
    """Latency buckets in microseconds: lower bound -> count."""

    buckets: dict[int, int] = field(default_factory=dict)

    @classmethod
    def from_pairs(cls, pairs: Iterable[Iterable[int]]) -> Histogram:
        hist = cls()
        for lower, count in pairs:
            hist.buckets[int(lower)] = hist.buckets.get(int(lower), 0) + int(count)
        return hist

    def merge(self, other: Histogram) -> None:
        for lower, count in other.buckets.items():
            self.buckets[lower] = self.buckets.get(lower, 0) + count

    @property
    def count(self) -> int:
        return sum(self.buckets.values())

    def percentile(self, q: float) -> float | None:
        """The q-th percentile (0..100) in microseconds, at the middle of its bucket."""
        total = self.count
        if total == 0:
            return None
        rank = max(1, round(total * q / 100.0))
        seen = 0
        for lower in sorted(self.buckets):
            seen += self.buckets[lower]
            if seen >= rank:
                return lower + _bucket_width(lower) / 2.0
        return None

    def pairs(self) -> list[list[int]]:
        return [[lower, self.buckets[lower]] for lower in sorted(self.buckets)]


@dataclass(frozen=True, slots=True)
class ClientSpec:
    mode: str  # full, resumed, keepalive, bulk, idle
    port: int
    conns: int  # over all processes
    procs: int = 1
    duration: float = 5.0
    max_requests: int = 10_000_000
    rate: float = 0.0  # requests (connections) per second over all processes; 0: no cap
    path: str = "/"
    timeout: float = 10.0
    grace: float = 10.0
    hold: float = 120.0  # idle: the longest the connections are held
    ramp: int = 256  # idle: connections being set up at once, per process
    tls12: bool = False

    def argv(self, binary: Path, index: int) -> list[str]:
        conns = self.conns // self.procs + (1 if index < self.conns % self.procs else 0)
        args = [
            str(binary),
            "--mode",
            self.mode,
            "--port",
            str(self.port),
            "--conns",
            str(max(1, conns)),
            "--duration",
            f"{self.duration:g}",
            "--max",
            str(max(1, self.max_requests // self.procs)),
            "--timeout",
            f"{self.timeout:g}",
            "--grace",
            f"{self.grace:g}",
            "--path",
            self.path,
            "--hold",
            f"{self.hold:g}",
            "--ramp",
            str(self.ramp),
        ]
        if self.rate > 0:
            args += ["--rate", f"{self.rate / self.procs:.3f}"]
        if self.tls12:
            args.append("--tls12")
        return args


@dataclass(slots=True)
class ClientResult:
    elapsed: float = 0.0
    started: int = 0
    requests: int = 0
    handshakes: int = 0
    reused: int = 0
    bytes: int = 0
    established: int = 0
    unclean_closes: int = 0
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    tls: dict[str, str] = field(default_factory=dict)
    latency: Histogram = field(default_factory=Histogram)
    handshake: Histogram = field(default_factory=Histogram)
    client_cpu: float = 0.0

    def add(self, raw: Mapping[str, Any], cpu: float) -> None:
        self.elapsed = max(self.elapsed, float(raw["elapsed"]))
        for name in (
            "started",
            "requests",
            "handshakes",
            "reused",
            "bytes",
            "established",
            "unclean_closes",
            "errors",
        ):
            setattr(self, name, getattr(self, name) + int(raw[name]))
        for kind, n in raw["error_kinds"].items():
            self.error_kinds[kind] = self.error_kinds.get(kind, 0) + int(n)
        if raw["tls"].get("version") and not self.tls:
            self.tls = dict(raw["tls"])
        self.latency.merge(Histogram.from_pairs(raw["latency_us"]))
        self.handshake.merge(Histogram.from_pairs(raw["handshake_us"]))
        self.client_cpu += cpu


class ClientGroup:
    """The client processes of one load, started together and waited for together."""

    def __init__(self, binary: Path, spec: ClientSpec) -> None:
        self.spec = spec
        self._dir = tempfile.TemporaryDirectory(prefix="loadtest-client-")
        self._outs: list[Path] = []
        self._procs: list[subprocess.Popen[bytes]] = []
        for i in range(spec.procs):
            out = Path(self._dir.name) / f"client-{i}.json"
            self._outs.append(out)
            with open(out, "wb") as f:
                self._procs.append(
                    subprocess.Popen(
                        spec.argv(binary, i),
                        stdin=subprocess.PIPE if spec.mode == "idle" else subprocess.DEVNULL,
                        stdout=f,
                        stderr=subprocess.DEVNULL,
                    )
                )

    def wait_ready(self, timeout: float) -> tuple[int, int]:
        """Idle mode: wait until every process has set up its connections.

        Returns (established, failed) summed over the processes.
        """
        deadline = time.monotonic() + timeout
        while True:
            lines = [_first_line(out) for out in self._outs]
            if all(line.startswith("READY ") for line in lines):
                parts = [line.split() for line in lines]
                return sum(int(p[1]) for p in parts), sum(int(p[2]) for p in parts)
            if any(p.poll() is not None for p in self._procs):
                raise LoadtestError("an idle client exited before it was ready")
            if time.monotonic() > deadline:
                raise LoadtestError(f"idle clients not ready within {timeout:.0f}s")
            time.sleep(0.1)

    def release(self) -> None:
        """Idle mode: let the processes close their connections and report."""
        for p in self._procs:
            if p.stdin is not None:
                p.stdin.close()

    def wait(self, timeout: float) -> ClientResult:
        result = ClientResult()
        deadline = time.monotonic() + timeout
        try:
            for proc, out in zip(self._procs, self._outs, strict=True):
                cpu = _wait4(proc, max(0.1, deadline - time.monotonic()))
                text = out.read_text()
                lines = [line for line in text.splitlines() if line.startswith("{")]
                if not lines:
                    raise LoadtestError(
                        f"the load client (pid {proc.pid}) printed no result "
                        f"(exit {proc.returncode})"
                    )
                result.add(json.loads(lines[-1]), cpu)
        finally:
            self.close()
        return result

    def close(self) -> None:
        for proc in self._procs:
            if proc.returncode is None:
                _kill_and_reap(proc)
        self._dir.cleanup()


def _first_line(path: Path) -> str:
    try:
        with open(path) as f:
            return f.readline()
    except OSError:
        return ""


def _wait4(proc: subprocess.Popen[bytes], timeout: float) -> float:
    """Reap ``proc`` (killing it after ``timeout``); return its CPU seconds."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return usage.ru_utime + usage.ru_stime
        if time.monotonic() > deadline:
            os.kill(proc.pid, signal.SIGKILL)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            raise LoadtestError(f"the load client (pid {proc.pid}) ran past its time bound")
        time.sleep(0.02)


def _kill_and_reap(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.kill(proc.pid, signal.SIGKILL)
        _, status, _ = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    except ChildProcessError:
        proc.returncode = -9
    except ProcessLookupError:
        proc.wait()


def run(binary: Path, spec: ClientSpec) -> ClientResult:
    """Run one bounded load to completion."""
    group = ClientGroup(binary, spec)
    return group.wait(spec.duration + spec.grace + 30.0)
