"""OpenSSL's secure heap (edgeterm.openssl): private keys really live in it, and a forked
worker locks its own copy again (memory locks are not inherited across fork).

Each check runs in a fresh Python process: the secure heap can be set up once per process and
never undone, and every private key loaded afterwards would go into it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from edgeterm import selfsigned

REPO = Path(__file__).resolve().parents[2]

# Enables the heap, loads a certificate's key, forks a "worker" that locks its copy, and
# prints what it saw as JSON (VmLck in kB, from /proc/PID/status).
CHILD = textwrap.dedent(
    """
    import json, os, ssl, sys
    from edgeterm import openssl

    def vmlck() -> int:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmLck:"):
                    return int(line.split()[1])
        raise AssertionError("no VmLck")

    size = int(sys.argv[1])
    out = {"before_init": openssl.secure_heap_used(), "lock_none": openssl.lock_secure_heap()}
    out["supervisor_message"] = openssl.enable_secure_heap(size)
    heap = openssl.secure_heap()
    out["heap"] = None if heap is None else [heap.start, heap.size]
    out["used_before_key"] = openssl.secure_heap_used()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(sys.argv[2], sys.argv[3])
    out["used_after_key"] = openssl.secure_heap_used()
    out["supervisor_vmlck"] = vmlck()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        child = {"vmlck_at_fork": vmlck()}
        child["locked"], child["message"] = openssl.lock_secure_heap()
        child["vmlck_after"] = vmlck()
        os.write(w, json.dumps(child).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.waitpid(pid, 0)
    out["worker"] = json.loads(data)
    print(json.dumps(out))
    """
)

HEAP = 1 << 20  # 1 MiB: what limits.max_connections = 4096 asks for (secure_heap_size)


@pytest.fixture(scope="module")
def cert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("secure-heap-certs")
    selfsigned.generate(directory, ("localhost",))
    return directory


def run_child(cert_dir: Path, prefix: list[str] | None = None) -> dict[str, Any]:
    cmd = [
        *(prefix or []),
        sys.executable,
        "-c",
        CHILD,
        str(HEAP),
        str(cert_dir / "localhost.pem"),
        str(cert_dir / "localhost.key"),
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def memlock_allows(size: int) -> bool:
    import resource

    soft = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
    return os.geteuid() == 0 or soft == resource.RLIM_INFINITY or soft >= 2 * size


def test_private_key_is_in_the_secure_heap_and_a_forked_worker_locks_its_copy(
    cert_dir: Path,
) -> None:
    out = run_child(cert_dir)
    assert out["heap"] is not None, out["supervisor_message"]
    assert out["heap"][1] == HEAP
    assert out["before_init"] == 0  # and no crash: OpenSSL's lock does not exist yet
    assert out["lock_none"] == [None, "OpenSSL secure heap: none to lock"]
    # the key loaded after enable_secure_heap went into the secure heap
    assert out["used_before_key"] == 0
    assert out["used_after_key"] > 0, out
    if not memlock_allows(HEAP):
        pytest.skip("RLIMIT_MEMLOCK here is below the heap size: see the next test")
    assert "locked in the supervisor" in out["supervisor_message"]
    assert (
        "each worker locks its own copy at start and logs the result" in out["supervisor_message"]
    )
    assert out["supervisor_vmlck"] >= HEAP // 1024
    worker = out["worker"]
    # fork dropped the lock: only what the child locks itself
    assert worker["vmlck_at_fork"] < HEAP // 1024
    assert worker["locked"] is True, worker["message"]
    assert worker["vmlck_after"] >= HEAP // 1024
    assert worker["message"] == "OpenSSL secure heap: locked (1024 KiB, left out of core dumps)"


def test_when_rlimit_memlock_forbids_it_the_logs_say_so(cert_dir: Path) -> None:
    """Without CAP_IPC_LOCK (dropped from the bounding set, so root loses it at exec too) and
    with RLIMIT_MEMLOCK at 64 KiB, neither the supervisor nor the worker can lock 1 MiB."""
    setpriv, prlimit = shutil.which("setpriv"), shutil.which("prlimit")
    if setpriv is None or prlimit is None:
        pytest.skip("needs setpriv and prlimit (util-linux)")
    prefix = [prlimit, "--memlock=65536:65536"]
    if os.geteuid() == 0:
        prefix = [setpriv, "--bounding-set=-ipc_lock", "--inh-caps=-ipc_lock", "--", *prefix]
    out = run_child(cert_dir, prefix)
    assert out["used_after_key"] > 0  # still on, and used
    assert "not locked in memory" in out["supervisor_message"], out["supervisor_message"]
    assert (
        "each worker locks its own copy at start and logs the result" in out["supervisor_message"]
    )
    worker = out["worker"]
    assert worker["locked"] is False
    assert worker["vmlck_after"] < HEAP // 1024
    assert "not locked in memory" in worker["message"]
    assert "RLIMIT_MEMLOCK is 64 KiB" in worker["message"], worker["message"]
