"""OpenSSL's secure heap in the workers: memory locks are not inherited across fork, so each
worker locks its own copy of the heap (private keys, ephemeral keys) at start and logs whether
it could; the supervisor's log line says what is true of the supervisor and of the workers.

Real processes: ``edgeterm start --foreground`` with two workers; VmLck read from
/proc/PID/status of each worker.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
from pathlib import Path

import pytest

import tests.support.launcher as launcher
from edgeterm.openssl import secure_heap_size
from tests.support.launcher import EdgetermFactory
from tests.support.supervision import Supervised, serving_workers, supervised_config, wait_status
from tests.support.upstreams import EchoUpstream
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(90)

MAX_CONNECTIONS = 4096
HEAP_KIB = secure_heap_size(MAX_CONNECTIONS) // 1024  # 1024 KiB
SUPERVISOR_LOCKED = re.compile(
    rf"OpenSSL secure heap: on \({HEAP_KIB} KiB\) for private keys, locked in the supervisor; "
    r"each worker locks its own copy at start and logs the result"
)


def vmlck_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmLck:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmLck in /proc/{pid}/status")


def start(factory: EdgetermFactory, echo: EchoUpstream) -> Supervised:
    cfg, pidfile, admin = supervised_config(factory, [echo.addr], workers=2)
    cfg["limits"] = {"max_connections": MAX_CONNECTIONS}
    return Supervised(factory.start(cfg=cfg), cfg, pidfile, admin)


def worker_pids(sv: Supervised) -> list[int]:
    st = wait_status(
        sv.admin_socket, lambda s: len(serving_workers(s)) == 2, timeout=20, what="2 workers"
    )
    return [w["pid"] for w in serving_workers(st)]


def memlock_allows() -> bool:
    import resource

    soft = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
    return os.geteuid() == 0 or soft == resource.RLIM_INFINITY or soft >= 2 * HEAP_KIB * 1024


def test_each_worker_locks_its_copy_of_the_secure_heap(
    edgeterm: EdgetermFactory, echo: EchoUpstream
) -> None:
    sv = start(edgeterm, echo)
    log = sv.server.log()
    if not memlock_allows():
        # the supervisor and the workers say they could not lock it
        assert "not locked in memory" in log, log
        assert re.search(r"worker 0: OpenSSL secure heap .*not locked in memory", log), log
        return
    assert SUPERVISOR_LOCKED.search(log), log
    assert vmlck_kib(sv.server.pid) >= HEAP_KIB
    pids = worker_pids(sv)
    for slot, pid in enumerate(pids):
        assert vmlck_kib(pid) >= HEAP_KIB, f"worker {slot} pid {pid}"
        assert f"worker {slot}: OpenSSL secure heap: locked ({HEAP_KIB} KiB" in log, log

    # a worker that replaces a dead one locks its copy too
    os.kill(pids[0], signal.SIGKILL)
    st = wait_status(
        sv.admin_socket,
        lambda s: len(serving_workers(s)) == 2 and serving_workers(s)[0]["pid"] != pids[0],
        timeout=20,
        what="worker 0 replaced",
    )
    new_pid = serving_workers(st)[0]["pid"]
    assert vmlck_kib(new_pid) >= HEAP_KIB
    wait_until(
        lambda: sv.server.log().count("worker 0: OpenSSL secure heap: locked") == 2,
        timeout=10,
        what="the new worker's log line",
    )


def test_rlimit_memlock_too_low_is_reported_by_every_process(
    edgeterm: EdgetermFactory, echo: EchoUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RLIMIT_MEMLOCK at 64 KiB and (when root) no CAP_IPC_LOCK: nothing can lock the 1 MiB
    heap. edgeterm still serves, and says so for the supervisor and each worker."""
    setpriv, prlimit = shutil.which("setpriv"), shutil.which("prlimit")
    if setpriv is None or prlimit is None:
        pytest.skip("needs setpriv and prlimit (util-linux)")
    prefix = [prlimit, "--memlock=65536:65536"]
    if os.geteuid() == 0:
        prefix = [setpriv, "--bounding-set=-ipc_lock", "--inh-caps=-ipc_lock", "--", *prefix]
    command = launcher.edgeterm_command()
    monkeypatch.setattr(launcher, "edgeterm_command", lambda: [*prefix, *command])
    sv = start(edgeterm, echo)
    log = sv.server.log()
    assert re.search(
        rf"OpenSSL secure heap: on \({HEAP_KIB} KiB\) for private keys, not locked in memory "
        r"\(RLIMIT_MEMLOCK too low\); each worker locks its own copy at start and logs the result",
        log,
    ), log
    for slot, pid in enumerate(worker_pids(sv)):
        assert vmlck_kib(pid) < HEAP_KIB
        assert re.search(
            rf"worker {slot}: OpenSSL secure heap \({HEAP_KIB} KiB\): not locked in memory "
            r"\(.*; RLIMIT_MEMLOCK is 64 KiB",
            log,
        ), log
