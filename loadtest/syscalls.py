"""System calls per unit of work: edgeterm against the anchors, counted with ``strace -c``.

    python -m loadtest.syscalls [--targets edgeterm,haproxy,nginx] [--modes full,keepalive]
                                [--count N] [--stream-count N]

Each target is started as ``python -m loadtest`` starts it (same certificate, upstream and
policy), warmed up, then every process of its tree is traced with ``strace -c -f`` while the C
client makes exactly ``--count`` requests (full: one new connection and full handshake each)
or ``--stream-count`` requests (keepalive: small requests over 64 long-lived connections).
The counts are exact whatever else the machine does, which is what makes them useful next to
the noisier CPU figures: they show how much of a gap is system calls (the kernel's work, the
same for everyone) and how much is user-space work per call. strace slows the traced processes
down a lot, so no time is reported.

Needs strace (``apt-get install strace``), as well as what ``python -m loadtest`` needs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from loadtest import measure, targets
from loadtest.clients import build
from loadtest.errors import LoadtestError, MissingPrerequisite
from loadtest.upstream import Upstream

WARMUP_REQUESTS = 300
CLIENT_PROCS = 2
CONNS = 64
STRACE_ATTACH_WAIT = 1.0  # strace prints nothing when it has attached; give it this long
CLIENT_TIMEOUT = 300.0


@dataclass(frozen=True, slots=True)
class Count:
    target: str
    mode: str
    requests: int
    errors: int
    calls: dict[str, int]  # syscall -> calls during the measured requests

    @property
    def total(self) -> int:
        return sum(self.calls.values())


def parse_strace_summary(text: str) -> dict[str, int]:
    """``strace -c`` table -> {syscall: calls}; the ``total`` line is left out."""
    calls: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 5 or parts[-1] == "total" or not parts[0][0].isdigit():
            continue
        try:
            calls[parts[-1]] = calls.get(parts[-1], 0) + int(parts[3])
        except ValueError:
            continue
    return calls


def _client(tlsload: Path, mode: str, port: int, requests: int) -> tuple[int, int]:
    """Run the C client for exactly ``requests`` requests; return (requests, errors)."""
    per_proc = max(1, requests // CLIENT_PROCS)
    procs = [
        subprocess.Popen(
            [
                str(tlsload),
                "--mode",
                mode,
                "--port",
                str(port),
                "--conns",
                str(CONNS // CLIENT_PROCS),
                "--duration",
                str(CLIENT_TIMEOUT),
                "--max",
                str(per_proc),
            ],
            stdout=subprocess.PIPE,
        )
        for _ in range(CLIENT_PROCS)
    ]
    done = errors = 0
    for p in procs:
        out, _ = p.communicate(timeout=CLIENT_TIMEOUT + 30)
        result = json.loads(out)
        done += int(result["requests"])
        errors += int(result["errors"])
    return done, errors


def count_one(target: targets.Target, tlsload: Path, mode: str, requests: int, out: Path) -> Count:
    _client(tlsload, mode, target.port, WARMUP_REQUESTS)
    pids = [st.pid for st in measure.tree(target.pid)]
    argv = ["strace", "-c", "-f", "-o", str(out)]
    for pid in pids:
        argv += ["-p", str(pid)]
    tracer = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(STRACE_ATTACH_WAIT)
        if tracer.poll() is not None:
            raise LoadtestError(f"strace exited at once (code {tracer.returncode}): not permitted?")
        done, errors = _client(tlsload, mode, target.port, requests)
    finally:
        tracer.send_signal(signal.SIGINT)
        tracer.wait(30)
    return Count(target.name, mode, done, errors, parse_strace_summary(out.read_text()))


def report(counts: list[Count], top: int = 8) -> str:
    lines = [
        "| mode | target | requests | syscalls per request | the most frequent, per request |",
        "|---|---|---|---|---|",
    ]
    for c in counts:
        n = max(1, c.requests)
        common = sorted(c.calls.items(), key=lambda kv: -kv[1])[:top]
        detail = ", ".join(f"{name} {calls / n:.2f}" for name, calls in common)
        lines.append(f"| {c.mode} | {c.target} | {c.requests:,} | {c.total / n:.1f} | {detail} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.syscalls", description=__doc__)
    ap.add_argument("--targets", default="edgeterm,haproxy,nginx")
    ap.add_argument("--modes", default="full,keepalive")
    ap.add_argument("--count", type=int, default=2000, help="requests per target (full, resumed)")
    ap.add_argument(
        "--stream-count",
        type=int,
        default=40000,
        help="requests per target in keepalive and bulk (the 64 handshakes are then noise)",
    )
    args = ap.parse_args(argv)
    names = [n for n in args.targets.split(",") if n]
    modes = [m for m in args.modes.split(",") if m]
    for mode in modes:
        if mode not in ("full", "resumed", "keepalive", "bulk"):
            ap.error(f"unknown mode {mode!r}")
    try:
        if shutil.which("strace") is None:
            raise MissingPrerequisite("strace is not installed: apt-get install strace")
        targets.check_available(names)
        binaries = build.build_all()
    except MissingPrerequisite as exc:
        print(f"loadtest.syscalls: {exc}", file=sys.stderr)
        return 3
    except LoadtestError as exc:
        print(f"loadtest.syscalls: {exc}", file=sys.stderr)
        return 2
    from edgeterm.selfsigned import generate

    root = Path(tempfile.mkdtemp(prefix="loadtest-syscalls-"))
    counts: list[Count] = []
    upstream = Upstream(binaries["upstream"])
    try:
        cert = generate(root / "certs", ["localhost"], key_type="ecdsa-p256")
        combined = root / "certs" / "combined.pem"
        combined.write_bytes(cert.cert_path.read_bytes() + cert.key_path.read_bytes())
        upstream.start()
        for mode in modes:
            for name in names:
                setup = targets.Setup(
                    run_dir=root / f"{mode}-{name}",
                    cert=cert.cert_path,
                    key=cert.key_path,
                    combined=combined,
                    upstream_port=upstream.port,
                )
                target = targets.TARGETS[name](setup)
                target.start()
                try:
                    n = args.stream_count if mode in ("keepalive", "bulk") else args.count
                    c = count_one(target, binaries["tlsload"], mode, n, setup.run_dir / "s")
                finally:
                    target.stop()
                counts.append(c)
                print(
                    f"{mode:9} {name:8} {c.requests} requests, {c.errors} errors, "
                    f"{c.total / max(1, c.requests):.1f} syscalls per request",
                    file=sys.stderr,
                )
    except LoadtestError as exc:
        print(f"loadtest.syscalls: {exc}", file=sys.stderr)
        return 1
    finally:
        upstream.stop()
        shutil.rmtree(root, ignore_errors=True)
    print(report(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
