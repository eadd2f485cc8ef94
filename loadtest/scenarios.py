"""The scenarios: one bounded load against one freshly started target, measured from both sides.

Every run starts the target anew in its own directory, warms it up (throughput scenarios),
reads the target's CPU seconds (utime + stime of all its processes, /proc), runs the C client
for a fixed time, reads the CPU again, and stops the target. The result is a flat dict (one
JSON line in the raw results) with the client's counts and latency histograms.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtest import load
from loadtest.errors import LoadtestError
from loadtest.targets import Setup, Target
from loadtest.upstream import Upstream

BULK_BODY = 1 << 20  # bytes per bulk response
IDLE_PER_CLIENT = 9_000  # idle connections per client process (the client has 20,000 fds)
COUNTER_REFRESH = 1.2  # edgeterm's workers push their counters every second


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    unit: str  # what the CPU is divided by
    what: str  # one line for the report
    mode: str  # the client's mode
    conns: int = 64
    procs: int = 2
    path: str = "/"
    throughput: bool = True  # warmed up, measured for --duration


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("full", "handshake", "new connection + full handshake per request", "full", 64),
        Scenario("resumed", "handshake", "new connection, every handshake resumed", "resumed", 64),
        Scenario(
            "keepalive", "request", "small requests over 64 long-lived connections", "keepalive"
        ),
        Scenario(
            "bulk",
            "byte",
            "1 MiB responses over 4 connections",
            "bulk",
            4,
            path=f"/bytes/{BULK_BODY}",
        ),
        Scenario(
            "paced",
            "handshake",
            "full handshakes at half load, the same offered rate for every target",
            "full",
            128,
        ),
        Scenario(
            "idle",
            "connection",
            "idle TLS connections: PSS per connection",
            "idle",
            throughput=False,
        ),
        Scenario(
            "reload",
            "connection",
            "3 reloads under half load: failed connections per 10,000",
            "full",
            128,
            throughput=False,
        ),
        Scenario(
            "kill",
            "connection",
            "3 worker SIGKILLs under half load: failed connections per 10,000",
            "full",
            128,
            throughput=False,
        ),
    )
}
DISRUPTIONS = ("reload", "kill")
AT_HALF_LOAD = ("paced", *DISRUPTIONS)  # scenarios that offer half of edgeterm's full rate
DISRUPTION_SECONDS = 12.0
DISRUPTION_AT = (2.0, 5.0, 8.0)


@dataclass(slots=True)
class Bench:
    """What every run shares: binaries, the upstream, the certificate, the options."""

    tlsload: Path
    upstream: Upstream
    root: Path  # per-invocation temp directory
    cert: Path
    key: Path
    combined: Path
    duration: float = 6.0
    warmup: float = 1.0
    workers: int = 2
    tls12: bool = False
    idle_conns: int = 0  # 0: as many as the target's descriptor limit allows
    half_load: float = 0.0  # connections per second for reload/kill; 0: calibrate
    runs: int = 0
    keep_logs: Path | None = None  # where the logs of runs that went wrong are copied
    edgeterm_path: Path | None = None  # run edgeterm from this snapshot (loadtest.source)

    def setup_for(self, name: str) -> Setup:
        self.runs += 1
        return Setup(
            run_dir=self.root / f"{self.runs:03d}-{name}",
            cert=self.cert,
            key=self.key,
            combined=self.combined,
            upstream_port=self.upstream.port,
            workers=self.workers,
            edgeterm_path=self.edgeterm_path,
        )

    def client(self, scenario: Scenario, port: int, **over: Any) -> load.ClientSpec:
        fields: dict[str, Any] = {
            "mode": scenario.mode,
            "port": port,
            "conns": scenario.conns,
            "procs": scenario.procs,
            "duration": self.duration,
            "path": scenario.path,
            "tls12": self.tls12,
        }
        fields.update(over)
        return load.ClientSpec(**fields)


def _latency_fields(res: load.ClientResult) -> dict[str, Any]:
    def ms(h: load.Histogram, q: float) -> float | None:
        v = h.percentile(q)
        return None if v is None else round(v / 1000.0, 3)

    return {
        "p50_ms": ms(res.latency, 50),
        "p90_ms": ms(res.latency, 90),
        "p99_ms": ms(res.latency, 99),
        "p999_ms": ms(res.latency, 99.9),
        "hs_p50_ms": ms(res.handshake, 50),
        "hs_p99_ms": ms(res.handshake, 99),
        "latency_hist": res.latency.pairs(),
    }


def _client_fields(res: load.ClientResult) -> dict[str, Any]:
    return {
        "elapsed_s": round(res.elapsed, 3),
        "started": res.started,
        "requests": res.requests,
        "handshakes": res.handshakes,
        "client_resumed": res.reused,
        "bytes": res.bytes,
        "errors": res.errors,
        "error_kinds": res.error_kinds,
        "unclean_closes": res.unclean_closes,
        "tls": res.tls,
        "client_cpu_s": round(res.client_cpu, 3),
    }


def _units(scenario: Scenario, res: load.ClientResult) -> int:
    if scenario.unit == "handshake":
        return res.handshakes
    if scenario.unit == "request":
        return res.requests
    if scenario.unit == "byte":
        return res.bytes
    return res.established


def run_throughput(bench: Bench, scenario: Scenario, target: Target) -> dict[str, Any]:
    """full, resumed, keepalive, bulk: CPU per unit of work, rate and latency."""
    paced: dict[str, Any] = {}
    if scenario.name in AT_HALF_LOAD:
        if bench.half_load <= 0:
            raise LoadtestError("half load unknown: calibrate first")
        paced["rate"] = bench.half_load
    if bench.warmup > 0:
        load.run(bench.tlsload, bench.client(scenario, target.port, duration=bench.warmup, **paced))
    if scenario.unit == "handshake" and target.counters() is not None:
        time.sleep(COUNTER_REFRESH)  # let the warm-up's handshakes reach the counters
    before = target.counters()
    cpu0, up0 = target.cpu_seconds(), bench.upstream.cpu_seconds()
    res = load.run(bench.tlsload, bench.client(scenario, target.port, **paced))
    cpu = target.cpu_seconds() - cpu0
    up_cpu = bench.upstream.cpu_seconds() - up0
    units = _units(scenario, res)
    out: dict[str, Any] = {
        "unit": scenario.unit,
        "units": units,
        "rate": round(units / res.elapsed, 1) if res.elapsed > 0 else 0.0,
        "server_cpu_s": round(cpu, 3),
        "cpu_per_unit_us": (cpu / units * 1e6) if units else None,
        "upstream_cpu_s": round(up_cpu, 3),
    }
    if paced:
        out["offered_rate"] = bench.half_load
    out.update(_client_fields(res))
    out.update(_latency_fields(res))
    if before is not None and scenario.unit == "handshake":
        time.sleep(COUNTER_REFRESH)
        after = target.counters()
        assert after is not None
        out["server_handshakes"] = after["handshakes"] - before["handshakes"]
        out["server_resumed"] = after["resumed"] - before["resumed"]
    return out


def run_idle(bench: Bench, scenario: Scenario, target: Target) -> dict[str, Any]:
    """idle: hold as many TLS connections as the target can, PSS per connection."""
    capacity = target.idle_capacity()
    wanted = bench.idle_conns or int(capacity * 0.9) // 100 * 100
    count = min(wanted, capacity)
    time.sleep(0.5)
    pss0 = target.pss_kib()
    cpu0 = target.cpu_seconds()
    client_procs = max(2, math.ceil(count / IDLE_PER_CLIENT))
    spec = bench.client(
        scenario,
        target.port,
        conns=count,
        procs=client_procs,
        duration=90.0,
        hold=120.0,
        grace=5.0,
    )
    group = load.ClientGroup(bench.tlsload, spec)
    try:
        established, failed = group.wait_ready(timeout=120.0)
        setup_cpu = target.cpu_seconds() - cpu0
        time.sleep(2.0)  # let the servers settle (lazy frees, counters)
        pss1 = target.pss_kib()
        server = target.counters()
    except BaseException:
        group.close()
        raise
    group.release()
    res = group.wait(60.0)
    out: dict[str, Any] = {
        "unit": "connection",
        "requested": count,
        "units": established,
        "setup_failed": failed,
        "pss_before_kib": pss0,
        "pss_after_kib": pss1,
        "kib_per_conn": (pss1 - pss0) / established if established else None,
        "setup_cpu_per_conn_us": setup_cpu / established * 1e6 if established else None,
    }
    if server is not None:
        out["server_active"] = server["active"]
    out.update(_client_fields(res))
    return out


def run_disruption(bench: Bench, scenario: Scenario, target: Target) -> dict[str, Any]:
    """reload / kill: connections at half load while the target reloads or loses a worker."""
    if bench.half_load <= 0:
        raise LoadtestError("half load unknown: calibrate first")
    spec = bench.client(
        scenario, target.port, duration=DISRUPTION_SECONDS, rate=bench.half_load, grace=15.0
    )
    actions: list[dict[str, Any]] = []
    problems: list[str] = []

    def act() -> None:
        t0 = time.monotonic()
        for i, at in enumerate(DISRUPTION_AT):
            time.sleep(max(0.0, t0 + at - time.monotonic()))
            started = time.monotonic()
            try:
                if scenario.name == "reload":
                    target.reload()
                    actions.append(
                        {
                            "at": round(started - t0, 2),
                            "reload_s": round(time.monotonic() - started, 3),
                        }
                    )
                else:
                    pid = target.kill_worker(i)
                    actions.append({"at": round(started - t0, 2), "killed": pid})
            except (LoadtestError, TimeoutError, OSError) as exc:
                problems.append(str(exc))

    group = load.ClientGroup(bench.tlsload, spec)
    actor = threading.Thread(target=act, name=f"{scenario.name}-actor", daemon=True)
    actor.start()
    res = group.wait(spec.duration + spec.grace + 30.0)
    actor.join(30.0)
    attempts = res.started
    out: dict[str, Any] = {
        "unit": "connection",
        "units": attempts,
        "offered_rate": bench.half_load,
        "rate": round(res.requests / res.elapsed, 1) if res.elapsed else 0.0,
        "failures": res.errors,
        "failed_per_10k": res.errors / attempts * 10_000 if attempts else None,
        "actions": actions,
        "action_errors": problems,
    }
    out.update(_client_fields(res))
    out.update(_latency_fields(res))
    return out


RUNNERS: dict[str, Callable[[Bench, Scenario, Target], dict[str, Any]]] = {
    "full": run_throughput,
    "resumed": run_throughput,
    "keepalive": run_throughput,
    "bulk": run_throughput,
    "paced": run_throughput,
    "idle": run_idle,
    "reload": run_disruption,
    "kill": run_disruption,
}


def calibrate_half_load(bench: Bench, target: Target, seconds: float = 3.0) -> float:
    """Half of the full-handshake rate ``target`` reaches with the usual client."""
    res = load.run(bench.tlsload, bench.client(SCENARIOS["full"], target.port, duration=seconds))
    if res.elapsed <= 0 or res.handshakes == 0:
        raise LoadtestError("calibration measured no handshakes")
    return res.handshakes / res.elapsed / 2.0
