"""Finding the anchors (haproxy, nginx and its stream module) and describing the machine.

Nothing is installed here: a missing tool raises :class:`MissingPrerequisite` naming the apt
package to install.
"""

from __future__ import annotations

import os
import platform
import shutil
import ssl
import subprocess
import sys
from pathlib import Path

from loadtest.errors import MissingPrerequisite

NGINX_STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")
_SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")


def _which(name: str) -> str | None:
    """``name`` on PATH or in an sbin directory; ``LOADTEST_<NAME>`` overrides (another build,
    or an empty value to run as if it were missing)."""
    override = os.environ.get(f"LOADTEST_{name.upper()}")
    if override is not None:
        return override if override and os.access(override, os.X_OK) else None
    found = shutil.which(name)
    if found:
        return found
    for d in _SBIN:
        candidate = os.path.join(d, name)
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def haproxy() -> str:
    path = _which("haproxy")
    if path is None:
        raise MissingPrerequisite("haproxy is not installed: apt-get install haproxy")
    return path


def nginx() -> tuple[str, Path | None]:
    """The nginx binary and the stream module to load (None when it is built in)."""
    path = _which("nginx")
    if path is None:
        raise MissingPrerequisite("nginx is not installed: apt-get install nginx")
    flags = _run([path, "-V"])
    if "--with-stream=dynamic" in flags or "--with-stream " not in flags + " ":
        if not NGINX_STREAM_MODULE.exists():
            raise MissingPrerequisite(
                f"nginx's stream module is missing ({NGINX_STREAM_MODULE}): "
                "apt-get install libnginx-mod-stream"
            )
        return path, NGINX_STREAM_MODULE
    return path, None


def _run(argv: list[str]) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"({exc})"
    return (result.stdout + result.stderr).strip()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, str]:
    """The facts BENCHMARKS.md states: CPUs, kernel and the versions of everything measured."""
    info = {
        "nproc": str(len(os.sched_getaffinity(0))),
        "cpu": _cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "openssl": ssl.OPENSSL_VERSION,
        "executable": sys.executable,
    }
    hp = _which("haproxy")
    info["haproxy"] = _run([hp, "-v"]).splitlines()[0] if hp else "missing"
    ng = _which("nginx")
    info["nginx"] = _run([ng, "-v"]).splitlines()[0] if ng else "missing"
    return info


def source_tree() -> dict[str, object]:
    """The commit measured and the files changed in the work tree (read-only git calls)."""
    root = Path(__file__).resolve().parent.parent
    head = _run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"])
    status = _run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"])
    changed = [line[3:] for line in status.splitlines() if len(line) > 3]
    return {"head": head, "changed": changed}
