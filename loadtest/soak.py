"""Soak: edgeterm under a steady mixed load with a reload every minute; does anything grow?

    python -m loadtest.soak [--minutes 10] [--rate 700] [--churn-procs 3] [--out RELIABILITY.md]

(``make soak``; not part of ``make test``.) It starts ``edgeterm start --foreground`` with two
pinned workers in front of an echo upstream, on loopback, then for ``--minutes`` (at most 10):

* clients (Python threads; OpenSSL does the crypto outside the GIL):
  - **full**: new connections, full handshake, one 512-byte echo, close (half of ``--rate``/s);
  - **resumed**: the same with the previous connection's TLS 1.3 ticket (the other half);
    these two run in ``--churn-procs`` child processes (``python -m loadtest.soak
    --churn-child``), each offering its share of the rate: one Python process cannot offer
    half of edgeterm's handshake rate (a client verifies a signature per full handshake, and
    the interpreter's lock serialises the rest); a child stops when its stdin closes and
    prints its tally as one JSON line;
  - **keep-alive**: ``--keepalive`` connections, a 256-byte echo every 50 ms each, reconnecting
    after 10-20 s;
  - **bulk**: ``--bulk`` connections at a time, each echoing 4 MiB in 256 KiB steps (SHA-256
    checked), one after another;
  - **idle**: ``--idle`` connections held silent for 10-25 s, probed with one echo before they
    close, and replaced;

  every client lives less than ``server.graceful_timeout`` (30 s), so a reload's drain never
  has to cut one: any error or wrong byte is a failed connection;
* ``edgeterm reload`` every ``--reload-every`` seconds (must exit 0);
* every second: RSS and open descriptors (/proc) of every edgeterm process, with its role
  (supervisor, or worker slot/generation from the admin socket) and CPU time.

Then: a least-squares slope per process (and per worker slot across generations) over the
run minus the first minute (warm-up), compared with the noise (residual spread); failed
connections by kind; resumption rate; CPU use of edgeterm and of the soak itself. The report
goes to ``--out`` (RELIABILITY.md) with the command, the machine and the date; exit status 0
when nothing failed and nothing grew beyond noise, 1 otherwise.

It reuses the test suite's launcher, certificates and echo upstream (``tests/support``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import math
import os
import platform
import random
import resource
import shlex
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.support.certs import make_cert_set  # noqa: E402
from tests.support.configs import base_config, write_config  # noqa: E402
from tests.support.launcher import Edgeterm, run_cli  # noqa: E402
from tests.support.supervision import admin_status  # noqa: E402
from tests.support.upstreams import EchoUpstream, UpstreamLoop  # noqa: E402

HOST = "127.0.0.1"
MAX_MINUTES = 10.0
WARMUP = 60.0  # seconds excluded from the slopes
GRACEFUL = 30.0  # server.graceful_timeout; every client lives less than this
KiB, MiB = 1 << 10, 1 << 20


# -- counting -----------------------------------------------------------------------------------


@dataclass
class Tally:
    ok: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    failed: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    errors: list[str] = field(default_factory=list)
    resumed: int = 0
    resume_tries: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def good(self, kind: str, n: int = 1) -> None:
        with self.lock:
            self.ok[kind] += n

    def bad(self, kind: str, exc: BaseException, t0: float) -> None:
        with self.lock:
            self.failed[kind] += 1
            if len(self.errors) < 30:
                self.errors.append(f"t={time.monotonic() - t0:.1f}s {kind}: {exc!r}")

    def to_json(self) -> dict[str, Any]:
        with self.lock:
            return {
                "ok": dict(self.ok),
                "failed": dict(self.failed),
                "errors": list(self.errors),
                "resumed": self.resumed,
                "resume_tries": self.resume_tries,
            }

    def merge(self, other: dict[str, Any]) -> None:
        with self.lock:
            for kind, n in other["ok"].items():
                self.ok[kind] += int(n)
            for kind, n in other["failed"].items():
                self.failed[kind] += int(n)
            self.errors += [str(e) for e in other["errors"]][: max(0, 30 - len(self.errors))]
            self.resumed += int(other["resumed"])
            self.resume_tries += int(other["resume_tries"])


def recv_exactly(s: ssl.SSLSocket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        data = s.recv(min(n - len(buf), 1 << 20))
        if not data:
            raise EOFError(f"EOF after {len(buf)} of {n} bytes")
        buf += data
    return bytes(buf)


def echo(s: ssl.SSLSocket, payload: bytes) -> None:
    s.sendall(payload)
    if recv_exactly(s, len(payload)) != payload:
        raise AssertionError("echo mismatch")


class Clients:
    """All client threads; ``stop`` ends them (each finishes its current connection)."""

    def __init__(self, port: int, ctx: ssl.SSLContext, args: argparse.Namespace) -> None:
        self.port = port
        self.ctx = ctx
        self.args = args
        self.tally = Tally()
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        self.t0 = time.monotonic()

    def connect(self, session: ssl.SSLSession | None = None) -> ssl.SSLSocket:
        raw = socket.create_connection((HOST, self.port), timeout=10)
        # as real TLS clients do: without it, Nagle holds the first request of a resumed
        # session until the server's delayed ACK (40 ms), the server having nothing to send
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            return self.ctx.wrap_socket(raw, server_hostname="localhost", session=session)
        except BaseException:
            raw.close()
            raise

    def start_churn(self, rate: float) -> None:
        """Full and resumed connections, ``rate`` per second in all (half each)."""
        per_thread = 50.0  # connections per second one churn thread offers
        churn = max(1, round(rate / 2 / per_thread))
        for i in range(churn):
            self._spawn(self._full, f"full-{i}", rate / 2 / churn)
            self._spawn(self._resumed, f"resumed-{i}", rate / 2 / churn)

    def start(self) -> None:
        """Everything but the churn (full and resumed), which runs in child processes."""
        a = self.args
        for i in range(a.keepalive):
            self._spawn(self._keepalive, f"keepalive-{i}")
        for i in range(a.bulk):
            self._spawn(self._bulk, f"bulk-{i}")
        if a.idle:
            self._spawn(self._idle, "idle")

    def _spawn(self, target: Any, name: str, *args: Any) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        t.start()
        self.threads.append(t)

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(30)

    def _paced(self, rate: float) -> Any:
        """Yield at ``rate`` per second; when late, skip ahead instead of bursting."""
        interval = 1.0 / rate
        due = time.monotonic() + random.random() * interval
        while not self.stopping.is_set():
            delay = due - time.monotonic()
            if delay > 0 and self.stopping.wait(delay):
                return
            yield
            due = max(due + interval, time.monotonic() - interval)

    def _full(self, rate: float) -> None:
        payload = os.urandom(512)
        for _ in self._paced(rate):
            try:
                with self.connect() as s:
                    echo(s, payload)
                self.tally.good("full")
            except Exception as exc:
                self.tally.bad("full", exc, self.t0)

    def _resumed(self, rate: float) -> None:
        payload = os.urandom(512)
        session: ssl.SSLSession | None = None
        for _ in self._paced(rate):
            try:
                with self.connect(session) as s:
                    echo(s, payload)  # reading the echo also reads the session tickets
                    if session is not None:
                        with self.tally.lock:
                            self.tally.resume_tries += 1
                            self.tally.resumed += s.session_reused
                    session = s.session
                self.tally.good("resumed")
            except Exception as exc:
                session = None
                self.tally.bad("resumed", exc, self.t0)

    def _keepalive(self) -> None:
        payload = os.urandom(256)
        while not self.stopping.is_set():
            life = time.monotonic() + random.uniform(10, 20)
            try:
                with self.connect() as s:
                    n = 0
                    while time.monotonic() < life and not self.stopping.wait(0.05):
                        echo(s, payload)
                        n += 1
                self.tally.good("keepalive")
                self.tally.good("keepalive requests", n)
            except Exception as exc:
                self.tally.bad("keepalive", exc, self.t0)
                self.stopping.wait(0.5)

    def _bulk(self) -> None:
        total, step = 4 * MiB, 256 * KiB
        while not self.stopping.is_set():
            try:
                sent, back = hashlib.sha256(), hashlib.sha256()
                with self.connect() as s:
                    for _ in range(total // step):
                        chunk = os.urandom(step)
                        sent.update(chunk)
                        s.sendall(chunk)
                        back.update(recv_exactly(s, step))
                if sent.digest() != back.digest():
                    raise AssertionError("bulk echo differs")
                self.tally.good("bulk")
                self.tally.good("bulk bytes", 2 * total)
            except Exception as exc:
                self.tally.bad("bulk", exc, self.t0)
            self.stopping.wait(1.0)

    def _idle(self) -> None:
        held: list[tuple[float, ssl.SSLSocket]] = []
        try:
            while not self.stopping.is_set():
                now = time.monotonic()
                while len(held) < self.args.idle and not self.stopping.is_set():
                    try:
                        held.append((now + random.uniform(10, 25), self.connect()))
                    except Exception as exc:
                        self.tally.bad("idle", exc, self.t0)
                        break
                keep = []
                for until, s in held:
                    if until > now:
                        keep.append((until, s))
                        continue
                    try:
                        echo(s, b"still there?")
                        self.tally.good("idle")
                    except Exception as exc:
                        self.tally.bad("idle", exc, self.t0)
                    finally:
                        s.close()
                held = keep
                self.stopping.wait(0.2)
        finally:
            for _, s in held:
                s.close()


class ChurnProcesses:
    """``procs`` child processes offering ``rate`` full + resumed connections per second in
    all; ``stop`` closes their stdin and merges the tallies they print."""

    def __init__(self, port: int, cafile: Path, rate: float, procs: int, t0: float) -> None:
        self.argv = [
            sys.executable,
            "-m",
            "loadtest.soak",
            "--churn-child",
            "--port",
            str(port),
            "--cafile",
            str(cafile),
            "--rate",
            str(rate / procs),
            "--t0",
            repr(t0),  # time.monotonic() is the same clock in every process here
        ]
        self.procs = procs
        self.children: list[subprocess.Popen[str]] = []
        self.cpu = 0.0  # seconds the children used, as they report it

    def start(self) -> None:
        for _ in range(self.procs):
            self.children.append(
                subprocess.Popen(
                    self.argv,
                    cwd=REPO,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )

    def stop(self, into: Tally) -> None:
        for child in self.children:
            assert child.stdin is not None
            with contextlib.suppress(OSError):
                child.stdin.close()
        for child in self.children:
            # the tally is one short line, well within a pipe's buffer: wait, then read
            try:
                child.wait(timeout=GRACEFUL + 30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            assert child.stdout is not None
            out = child.stdout.read()
            child.stdout.close()
            lines = [line for line in out.splitlines() if line.startswith("{")]
            if child.returncode != 0 or not lines:
                into.failed["churn process"] += 1
                into.errors.append(f"churn process exited {child.returncode} without a tally")
                continue
            report = json.loads(lines[-1])
            self.cpu += float(report.pop("cpu"))
            into.merge(report)


def churn_child(port: int, cafile: Path, rate: float, t0: float) -> int:
    """The body of one churn process: offer ``rate`` connections/s until stdin closes."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(cafile))
    clients = Clients(port, ctx, argparse.Namespace())
    clients.t0 = t0
    clients.start_churn(rate)
    sys.stdin.read()  # until the parent closes our stdin
    clients.stop()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({**clients.tally.to_json(), "cpu": usage.ru_utime + usage.ru_stime}))
    return 0


# -- sampling -----------------------------------------------------------------------------------


@dataclass
class Sample:
    t: float
    pid: int
    role: str  # "supervisor" or "worker <slot> gen <generation>"
    rss: int
    fds: int


class Sampler:
    def __init__(self, server: Edgeterm, admin_socket: Path, t0: float) -> None:
        self.server = server
        self.admin_socket = admin_socket
        self.t0 = t0
        self.samples: list[Sample] = []
        self.cpu: dict[int, float] = {}  # last CPU seconds seen per pid (exited ones stay)
        self.roles: dict[int, str] = {}

    def sample(self) -> None:
        t = time.monotonic() - self.t0
        with contextlib.suppress(OSError, ValueError):
            for w in admin_status(self.admin_socket, timeout=2)["workers"]:
                self.roles[w["pid"]] = f"worker {w['slot']} gen {w['generation']}"
        root = psutil.Process(self.server.pid)
        for p in [root, *root.children()]:
            try:
                with p.oneshot():
                    rss = p.memory_info().rss
                    cpu = p.cpu_times()
                fds = len(os.listdir(f"/proc/{p.pid}/fd"))
            except (psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):
                continue
            self.cpu[p.pid] = cpu.user + cpu.system
            role = "supervisor" if p.pid == root.pid else self.roles.get(p.pid, "worker ?")
            self.samples.append(Sample(t, p.pid, role, rss, fds))


def slope(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares slope (per second) and the residuals' standard deviation."""
    xs = [x for x, _ in points]
    ys = [y for _, y in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0
    residuals = [y - (my + b * (x - mx)) for x, y in points]
    return b, statistics.pstdev(residuals)


@dataclass
class Trend:
    name: str
    n: int
    span: float  # seconds covered
    rss_start: float
    rss_end: float
    rss_slope: float  # bytes per second
    rss_noise: float
    fds_start: float
    fds_end: float
    fds_slope: float  # per second
    fds_noise: float

    @property
    def rss_growth(self) -> float:
        return self.rss_slope * self.span

    @property
    def fds_growth(self) -> float:
        return self.fds_slope * self.span

    @property
    def grows(self) -> bool:
        # growth over the window beyond twice the noise, and beyond 1 MiB / 2 descriptors
        return (self.rss_growth > max(2 * self.rss_noise, MiB)) or (
            self.fds_growth > max(2 * self.fds_noise, 2)
        )


def trend(name: str, samples: list[Sample]) -> Trend | None:
    if len(samples) < 20:
        return None
    head, tail = samples[: min(10, len(samples))], samples[-min(10, len(samples)) :]
    rss_b, rss_e = slope([(s.t, s.rss) for s in samples])
    fds_b, fds_e = slope([(s.t, s.fds) for s in samples])
    return Trend(
        name,
        len(samples),
        samples[-1].t - samples[0].t,
        statistics.median(s.rss for s in head),
        statistics.median(s.rss for s in tail),
        rss_b,
        rss_e,
        statistics.median(s.fds for s in head),
        statistics.median(s.fds for s in tail),
        fds_b,
        fds_e,
    )


@dataclass
class Generation:
    slot: str
    generation: int
    pid: int
    rss: float  # median over its last 10 samples as the serving generation
    fds: float


def trends(samples: list[Sample]) -> tuple[list[Trend], list[Generation], list[Trend]]:
    """(the judged series, each worker generation's mature state, per-process trends).

    Judged: the supervisor (one process for the whole run) and all workers summed per
    second (connections move from a draining generation to the new one, so per-worker series
    ramp up and down at every reload; their sum does not). Generations: each worker's RSS and
    descriptors over its last 10 s before the next reload, when it serves alone: a leak that
    each generation inherits or accumulates shows as a rising sequence.
    """
    measured = [s for s in samples if s.t >= WARMUP]
    judged = []
    sup = [s for s in measured if s.role == "supervisor"]
    if (t := trend("supervisor", sup)) is not None:
        judged.append(t)
    per_second: dict[float, list[Sample]] = defaultdict(list)
    for s in measured:
        if s.role != "supervisor":
            per_second[s.t].append(s)
    summed = [
        Sample(t, 0, "workers", sum(x.rss for x in ss), sum(x.fds for x in ss))
        for t, ss in sorted(per_second.items())
    ]
    if (t := trend("all workers (sum)", summed)) is not None:
        judged.append(t)

    # the newest generation present at each second serves; a generation's mature state is
    # its last 10 samples while it was the newest
    newest_at: dict[float, int] = {}
    for s in samples:
        if s.role.startswith("worker ") and "?" not in s.role:
            newest_at[s.t] = max(newest_at.get(s.t, 0), int(s.role.split()[-1]))
    serving: dict[int, list[Sample]] = defaultdict(list)
    for s in samples:
        worker = s.role.startswith("worker ") and "?" not in s.role
        if worker and int(s.role.split()[-1]) == newest_at[s.t]:
            serving[s.pid].append(s)
    generations = []
    for pid, ss in serving.items():
        tail = ss[-10:]
        _, slot, _, gen = ss[0].role.split()
        generations.append(
            Generation(
                slot,
                int(gen),
                pid,
                statistics.median(x.rss for x in tail),
                statistics.median(x.fds for x in tail),
            )
        )
    generations.sort(key=lambda g: (g.slot, g.generation))

    by_pid: dict[int, list[Sample]] = defaultdict(list)
    for s in measured:
        by_pid[s.pid].append(s)
    per_process = [
        t
        for pid, ss in sorted(by_pid.items(), key=lambda kv: kv[1][0].t)
        if (t := trend(f"{ss[0].role} (pid {pid})", ss)) is not None
    ]
    return judged, generations, per_process


def slope_error(xs: list[float], residual_sd: float) -> float:
    """The standard error of a least-squares slope over ``xs`` (``residual_sd`` as ``slope``
    returns it, the population form, corrected here for the two fitted parameters)."""
    n = len(xs)
    mx = statistics.fmean(xs)
    sxx = sum((x - mx) ** 2 for x in xs)
    if n < 3 or not sxx:
        return float("inf")
    return residual_sd * math.sqrt(n / (n - 2)) / math.sqrt(sxx)


def generation_growth(generations: list[Generation]) -> list[tuple[str, float, float, bool]]:
    """Per slot: (slot, RSS slope per generation, fds slope per generation, grows?) over the
    generations after the first (the first one also carries the warm-up).

    A generation's figures are taken while it serves, so they move with the load (each live
    connection holds one or two descriptors): a slope counts as growth only when it is
    significant (over three standard errors; about 9 points give a chance slope of 2 standard
    errors one time in 20 per series) and the growth it implies over the run is above
    1 MiB, or above 2 descriptors plus 5%."""
    out = []
    for slot in sorted({g.slot for g in generations}):
        gs = [g for g in generations if g.slot == slot][1:]
        if len(gs) < 3:
            continue
        xs = [float(g.generation) for g in gs]
        rss_b, rss_e = slope([(g.generation, g.rss) for g in gs])
        fds_b, fds_e = slope([(g.generation, g.fds) for g in gs])
        n = len(gs) - 1
        rss_grows = rss_b > 3 * slope_error(xs, rss_e) and rss_b * n > MiB
        fds_grows = fds_b > 3 * slope_error(xs, fds_e) and fds_b * n > 2 + 0.05 * gs[0].fds
        out.append((slot, rss_b, fds_b, rss_grows or fds_grows))
    return out


# -- running ------------------------------------------------------------------------------------


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = psutil.virtual_memory().total / (1 << 30)
    return (
        f"{platform.system()} {platform.release()} {platform.machine()}, {cpu}, "
        f"{os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), {mem:.0f} GiB RAM; "
        f"Python {platform.python_version()}, {ssl.OPENSSL_VERSION}"
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="edgeterm-soak-"))
    certs = make_cert_set(work / "certs")
    loop = UpstreamLoop().start()
    upstream = EchoUpstream(loop).start()
    run_dir = work / "run"
    cfg = base_config(
        certs,
        [upstream.addr],
        overrides={
            "server": {
                "workers": 2,
                "pin_cpus": True,
                "graceful_timeout": GRACEFUL,
                "pidfile": str(run_dir / "edgeterm.pid"),
                "admin_socket": str(run_dir / "edgeterm.sock"),
            },
            "timeouts": {"handshake": 10.0, "connect": 5.0, "idle": 60.0},
            "limits": {"max_connections": 10000},
        },
    )
    config = write_config(work / "edgeterm.toml", cfg)
    server = Edgeterm(config, cwd=work).start()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(certs.ca))
    clients = Clients(server.port(), ctx, args)
    t0 = clients.t0
    churn = ChurnProcesses(server.port(), certs.ca, args.rate, args.churn_procs, t0)
    sampler = Sampler(server, run_dir / "edgeterm.sock", t0)
    reloads: list[tuple[float, int, float, str]] = []
    soak_cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    load_before = os.getloadavg()
    duration = args.minutes * 60
    try:
        churn.start()
        clients.start()
        next_reload = t0 + args.reload_every
        next_sample = t0
        while (now := time.monotonic()) < t0 + duration:
            if now >= next_sample:
                sampler.sample()
                next_sample += 1.0
            if now >= next_reload:
                start = time.monotonic()
                r = run_cli("reload", "-c", str(config), timeout=60)
                took = time.monotonic() - start
                reloads.append((start - t0, r.returncode, took, (r.stdout + r.stderr).strip()))
                next_reload += args.reload_every
            time.sleep(max(0.0, min(next_sample, next_reload) - time.monotonic()))
    finally:
        clients.stop()
        churn.stop(clients.tally)
        soak_cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        load_after = os.getloadavg()
        elapsed = time.monotonic() - t0
        code = server.stop(timeout=GRACEFUL + 15)
        upstream.close()
        loop.stop()
    log = server.log()
    soak_cpu = (soak_cpu1.ru_utime - soak_cpu0.ru_utime) + (soak_cpu1.ru_stime - soak_cpu0.ru_stime)
    soak_cpu += churn.cpu
    judged, generations, per_process = trends(sampler.samples)
    tally = clients.tally
    return {
        "elapsed": elapsed,
        "tally": tally,
        "reloads": reloads,
        "judged": judged,
        "generations": generations,
        "per_process": per_process,
        "edgeterm_cpu": sum(sampler.cpu.values()),
        "soak_cpu": soak_cpu,
        "load": (load_before, load_after),
        "stop_code": code,
        "tracebacks": log.count("Traceback (most recent call last)"),
        "worker_deaths": log.count(" died ("),
        "samples": sampler.samples,
        "work": work,
    }


# -- reporting ----------------------------------------------------------------------------------


def verdict(result: dict[str, Any]) -> tuple[bool, list[str]]:
    problems = []
    tally: Tally = result["tally"]
    if sum(tally.failed.values()):
        problems.append(f"{sum(tally.failed.values())} failed connections")
    bad_reloads = [r for r in result["reloads"] if r[1] != 0]
    if bad_reloads:
        problems.append(f"{len(bad_reloads)} reloads failed")
    for t in result["judged"]:
        if t.grows:
            problems.append(f"{t.name} grows")
    for slot, _, _, grows in generation_growth(result["generations"]):
        if grows:
            problems.append(f"worker slot {slot} grows from generation to generation")
    if result["tracebacks"]:
        problems.append(f"{result['tracebacks']} tracebacks in the log")
    if result["worker_deaths"]:
        problems.append(f"{result['worker_deaths']} workers died")
    if result["stop_code"] != 0:
        problems.append(f"edgeterm stopped with {result['stop_code']}")
    return not problems, problems


def fmt_trend(t: Trend, *, judged: bool = True) -> str:
    per_min = 60.0
    return (
        f"| {t.name} | {t.n} | {t.rss_start / MiB:.1f} → {t.rss_end / MiB:.1f} | "
        f"{t.rss_slope * per_min / KiB:+.1f} | {t.rss_growth / KiB:+.0f} | "
        f"{2 * t.rss_noise / KiB:.0f} | {t.fds_start:.0f} → {t.fds_end:.0f} | "
        f"{t.fds_slope * per_min:+.2f} | {t.fds_growth:+.1f} | {2 * t.fds_noise:.1f} | "
        f"{('**grows**' if t.grows else 'flat') if judged else '-'} |"
    )


TREND_HEAD = (
    "| series | samples | RSS MiB (start → end) | RSS slope KiB/min | growth over window KiB "
    "| noise (2 sd) KiB | fds (start → end) | fds slope /min | fds growth | noise (2 sd) | |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)


def report(args: argparse.Namespace, command: str, result: dict[str, Any]) -> str:
    ok, problems = verdict(result)
    tally: Tally = result["tally"]
    el = result["elapsed"]
    conns = sum(v for k, v in tally.ok.items() if " " not in k)
    failed = sum(tally.failed.values())
    resumed = tally.resumed / tally.resume_tries if tally.resume_tries else 0.0
    mix = ", ".join(
        f"{k} {v:,}" + (f" ({v / el:,.0f}/s)" if k in ("full", "resumed") else "")
        for k, v in sorted(tally.ok.items())
    )
    reloads = result["reloads"]
    lines = [
        "# Reliability: the soak",
        "",
        "`make soak` (`python -m loadtest.soak`, not part of `make test`) runs edgeterm for up to",
        "10 minutes under a mixed load with a reload every minute, samples the memory and the",
        "open descriptors of every edgeterm process each second, and fails on any failed",
        "connection or on growth beyond noise. How it works: the docstring of",
        "[`loadtest/soak.py`](loadtest/soak.py).",
        "",
        "## Last run",
        "",
        f"- Command: `{command}`",
        f"- Date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Machine: {machine()}",
        f"- Duration: {el / 60:.1f} min ({args.minutes:g} requested); slopes over "
        f"{max(0.0, el - WARMUP) / 60:.1f} min after a {WARMUP:.0f} s warm-up",
        f"- edgeterm: 2 pinned workers, `graceful_timeout = {GRACEFUL:.0f}`, tickets on; an "
        "echo upstream on loopback",
        f"- **Result: {'PASS' if ok else 'FAIL'}**"
        + ("" if ok else " (" + "; ".join(problems) + ")"),
        "",
        "### Load",
        "",
        f"- Offered: {args.rate:g} new TLS connections/s (half full handshakes, half "
        f"resumed; from {args.churn_procs} client processes), {args.keepalive} keep-alive "
        "connections (one 256-byte echo every 50 ms each), "
        f"{args.bulk} bulk streams (4 MiB echoed each, SHA-256 checked), "
        f"{args.idle} idle connections (held 10-25 s, probed, replaced).",
        f"- Completed: {mix}.",
        f"- Achieved {(tally.ok['full'] + tally.ok['resumed']) / el:,.0f} of the offered "
        f"{args.rate:g} new TLS connections/s (below it, the clients were the limit).",
        f"- Resumption: {resumed:.1%} of {tally.resume_tries:,} attempts resumed "
        "(a ticket issued two key rotations ago gets a full handshake, by design).",
        f"- CPU: edgeterm (all processes) {result['edgeterm_cpu']:.0f} s = "
        f"{result['edgeterm_cpu'] / el:.0%} of one CPU; the soak itself (clients, echo "
        f"upstream, sampling, churn processes) {result['soak_cpu']:.0f} s = "
        f"{result['soak_cpu'] / el:.0%}.",
        "- Machine load average (1, 5, 15 min) at start "
        + " / ".join(f"{x:.2f}" for x in result["load"][0])
        + ", at end "
        + " / ".join(f"{x:.2f}" for x in result["load"][1])
        + " (anything else running on the machine shows here).",
        "",
        "### Failures",
        "",
        f"- Connections: {conns:,} completed, **{failed} failed**"
        + (" (" + ", ".join(f"{k} {v}" for k, v in tally.failed.items()) + ")" if failed else ""),
        f"- Reloads: {len(reloads)}, failed {sum(1 for r in reloads if r[1] != 0)}; "
        f"`edgeterm reload` took {min((r[2] for r in reloads), default=0):.2f}-"
        f"{max((r[2] for r in reloads), default=0):.2f} s",
        f"- Worker deaths: {result['worker_deaths']}; tracebacks in the log: "
        f"{result['tracebacks']}; graceful stop exit code: {result['stop_code']}",
    ]
    if tally.errors:
        lines += ["", "First errors:", "", *(f"    {e}" for e in tally.errors[:10])]
    lines += [
        "",
        "### Growth",
        "",
        "Judged: the supervisor, and all workers summed (connections move from the draining",
        "generation to the new one at each reload, so one worker's series ramps; the sum does",
        "not). Growth over window = slope * measured time; it must stay within the noise",
        "(twice the residuals' standard deviation) or under 1 MiB / 2 descriptors.",
        "",
        TREND_HEAD,
        *(fmt_trend(t) for t in result["judged"]),
        "",
        "Each worker generation once it serves alone (median of its last 10 s before the next",
        "reload): a leak that generations inherit or accumulate would rise from row to row.",
        "These figures move with the load (each live connection holds one or two descriptors):",
        "a slot grows only if its slope is over three standard errors and implies more than",
        "1 MiB, or 2 descriptors plus 5%, over the run.",
        "",
        "| slot | generation | pid | RSS MiB | fds |",
        "|---|---|---|---|---|",
        *(
            f"| {g.slot} | {g.generation} | {g.pid} | {g.rss / MiB:.1f} | {g.fds:.0f} |"
            for g in result["generations"]
        ),
        "",
        *(
            f"Slot {slot}: {rss_b / KiB:+.0f} KiB and {fds_b:+.1f} fds per generation "
            f"(generations 2 and later): {'**grows**' if grows else 'flat'}."
            for slot, rss_b, fds_b, grows in generation_growth(result["generations"])
        ),
        "",
        "### Growth per process",
        "",
        "For information, not judged: every edgeterm process seen after the warm-up with at",
        "least 20 samples. A worker ramps up after the reload that starts it (clients move over",
        "as their connections end) and down while it drains.",
        "",
        TREND_HEAD,
        *(fmt_trend(t, judged=False) for t in result["per_process"]),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.soak", description=__doc__)
    parser.add_argument("--minutes", type=float, default=10.0, help="1.5..10 (default 10)")
    parser.add_argument(
        "--rate",
        type=float,
        default=700.0,
        help="new connections/s (default 700: about half of what 2 workers handshake here)",
    )
    parser.add_argument("--keepalive", type=int, default=20)
    parser.add_argument("--bulk", type=int, default=1)
    parser.add_argument("--idle", type=int, default=500)
    parser.add_argument("--reload-every", type=float, default=60.0, help="seconds")
    parser.add_argument("--out", type=Path, default=REPO / "RELIABILITY.md")
    parser.add_argument("--samples", type=Path, help="write the raw samples here (JSON lines)")
    parser.add_argument(
        "--churn-procs", type=int, default=3, help="processes for the full/resumed clients"
    )
    # the churn child (internal): see ChurnProcesses
    parser.add_argument("--churn-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cafile", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--t0", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.churn_child:
        return churn_child(args.port, args.cafile, args.rate, args.t0)
    if args.churn_procs < 1:
        parser.error("--churn-procs must be at least 1")
    if not 1.5 <= args.minutes <= MAX_MINUTES:
        parser.error(f"--minutes must be within 1.5..{MAX_MINUTES:g} (the first is warm-up)")
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    command = "python -m loadtest.soak " + shlex.join(argv if argv is not None else sys.argv[1:])
    print(f"soak: {args.minutes:g} min, reload every {args.reload_every:g} s ...", flush=True)
    result = run(args)
    text = report(args, command.strip(), result)
    args.out.write_text(text)
    if args.samples is not None:
        with args.samples.open("w") as f:
            for s in result["samples"]:
                f.write(json.dumps(s.__dict__) + "\n")
    ok, problems = verdict(result)
    print(text)
    print(f"soak: {'PASS' if ok else 'FAIL: ' + '; '.join(problems)} (report: {args.out})")
    shutil.rmtree(result["work"], ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
