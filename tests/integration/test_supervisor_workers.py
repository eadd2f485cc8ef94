"""Pre-forked pinned workers (ARCHITECTURE §2): one per CPU, each pinned to its own CPU, all
sharing the load; a worker killed with SIGKILL is replaced on the same slot and CPU at once,
and only the connections it held fail (its listening socket belongs to the supervisor, so the
connections queued on it wait for the replacement instead of being dropped).
"""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from tests.support.launcher import run_cli
from tests.support.supervision import (
    ClientLoop,
    cli_status,
    echo_once,
    serving_workers,
    start_supervised,
    wait_status,
)
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(90)


def test_two_workers_pinned_to_distinct_cpus_share_200_connections(edgeterm, echo, client_ctx):
    sv = start_supervised(edgeterm, [echo.addr])
    st = cli_status(sv.config)  # through `edgeterm status --json`
    assert st["pid"] == sv.server.pid == sv.server.ready_pid
    assert st["generation"] == 1
    assert st["config"] == str(sv.config)
    workers = serving_workers(st)
    assert [w["slot"] for w in workers] == [0, 1], st["workers"]
    cpus = [w["cpu"] for w in workers]
    assert len(set(cpus)) == 2 and set(cpus) <= os.sched_getaffinity(0), cpus
    for w in workers:
        proc = psutil.Process(w["pid"])
        assert proc.ppid() == sv.server.pid
        assert proc.cpu_affinity() == [w["cpu"]], f"worker {w['slot']} not pinned"

    n = 200
    for i in range(n):
        echo_once(sv.port, client_ctx, b"hello %d\n" % i)

    # counters arrive with the once-a-second heartbeats
    def counted(s):
        ws = s["workers"]
        return sum(w["accepted"] for w in ws) >= n and sum(w["handshakes"] for w in ws) >= n

    st = wait_status(sv.admin_socket, counted, timeout=5, what=f"{n} connections counted")
    per_worker = {w["slot"]: (w["accepted"], w["handshakes"]) for w in st["workers"]}
    print(f"accepted/handshakes per slot over {n} connections: {per_worker}")
    assert [w["pid"] for w in st["workers"]] == [w["pid"] for w in workers], "a worker changed"
    assert sum(a for a, _ in per_worker.values()) == n
    assert all(a > 0 and h > 0 for a, h in per_worker.values()), per_worker
    assert st["restarts"] == 0

    human = cli_status_text(sv.config)
    for w in workers:
        assert str(w["pid"]) in human


def cli_status_text(config) -> str:
    r = run_cli("status", "-c", str(config), timeout=30)
    assert r.returncode == 0, (r.stdout, r.stderr)
    return r.stdout


def test_kill_9_worker_is_replaced_on_its_cpu_and_only_its_connections_fail(
    edgeterm, echo, client_ctx
):
    sv = start_supervised(edgeterm, [echo.addr])
    before = serving_workers(sv.status())
    victim, other = before
    loop = ClientLoop(sv.port, client_ctx, max_seconds=30).start()
    try:
        loop.wait_ok(150, timeout=15)
        ok_before = loop.ok
        assert loop.failed == 0, loop.summary()

        killed_at = time.monotonic()
        os.kill(victim["pid"], signal.SIGKILL)

        def replaced(s):
            for w in serving_workers(s):
                if w["slot"] == victim["slot"] and w["pid"] != victim["pid"]:
                    return w
            return None

        st = wait_status(
            sv.admin_socket, replaced, timeout=5, interval=0.005, what="a replacement worker"
        )
        replaced_after = time.monotonic() - killed_at
        new = replaced(st)

        # keep the load on for a while after the replacement, and see the new worker serve
        loop.wait_ok(300, timeout=20)
        st = wait_status(
            sv.admin_socket,
            lambda s: any(w["pid"] == new["pid"] and w["accepted"] > 0 for w in s["workers"]),
            timeout=5,
            what="the replacement worker accepting connections",
        )
    finally:
        loop.stop()

    print(
        f"kill -9 worker {victim['slot']} (pid {victim['pid']}, cpu {victim['cpu']}): "
        f"replaced by pid {new['pid']} after {replaced_after * 1000:.0f} ms; client loop "
        f"{loop.summary()} ({ok_before} before the kill)"
    )
    assert new["cpu"] == victim["cpu"] and new["slot"] == victim["slot"]
    assert psutil.Process(new["pid"]).cpu_affinity() == [victim["cpu"]]
    assert replaced_after < 1.5, f"replacement took {replaced_after:.2f}s"
    # the other worker was not touched
    assert other["pid"] in [w["pid"] for w in serving_workers(st)]
    assert st["restarts"] == 1
    assert len(serving_workers(st)) == 2 and len(st["workers"]) == 2
    # only connections in flight on the killed worker may fail: the loop has one at a time
    assert loop.failed <= 2, loop.summary()
    assert all(f.at >= killed_at for f in loop.failures), "a connection failed before the kill"
    assert all(f.at <= killed_at + replaced_after + 1.0 for f in loop.failures), loop.summary()
    wait_until(
        lambda: not psutil.pid_exists(victim["pid"]),
        timeout=5,
        what="the killed worker to be reaped",
    )


def test_a_frozen_worker_is_killed_after_heartbeat_timeout_and_replaced(edgeterm, echo, client_ctx):
    """SIGSTOP: the worker stops answering heartbeats; after ``heartbeat_timeout`` it gets
    SIGTERM (pending, it is stopped), then SIGKILL, and a new worker takes its slot."""
    timeout = 2.0
    sv = start_supervised(edgeterm, [echo.addr], heartbeat_timeout=timeout)
    victim, other = serving_workers(sv.status())
    frozen_at = time.monotonic()
    os.kill(victim["pid"], signal.SIGSTOP)
    try:

        def replaced(s):
            for w in serving_workers(s):
                if w["slot"] == victim["slot"] and w["pid"] != victim["pid"]:
                    return w
            return None

        st = wait_status(
            sv.admin_socket, replaced, timeout=15, interval=0.05, what="a replacement worker"
        )
    finally:
        # never leave a stopped process behind, whatever happened
        if psutil.pid_exists(victim["pid"]):
            os.kill(victim["pid"], signal.SIGCONT)
    after = time.monotonic() - frozen_at
    new = replaced(st)
    print(f"frozen worker replaced after {after:.1f}s (heartbeat_timeout {timeout}s)")
    assert new["cpu"] == victim["cpu"]
    assert after >= timeout, "replaced before its heartbeat deadline"
    assert after < timeout + 3.0 + 3.0, f"replacement took {after:.1f}s"
    assert other["pid"] in [w["pid"] for w in serving_workers(st)], "the healthy worker went"
    assert st["restarts"] == 1
    wait_until(
        lambda: not psutil.pid_exists(victim["pid"]), timeout=5, what="the frozen worker gone"
    )
    for i in range(20):
        echo_once(sv.port, client_ctx, b"after %d" % i)
    assert "missed its heartbeats" in sv.server.log()
