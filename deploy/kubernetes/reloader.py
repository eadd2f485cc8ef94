"""Reload edgeterm when its mounted config, certificates or ticket keys change.

edgeterm reads its files at start and on ``edgeterm reload`` (SIGHUP) only. In Kubernetes, an
updated ConfigMap or Secret reaches a running pod's volume by itself (within about a minute),
but nobody tells edgeterm. This sidecar does: every few seconds it looks at the files under
the watched directory (name, inode, size, mtime; it never reads them), and when they have
changed and then stayed the same for one more look, it runs ``edgeterm reload``. A rejected
reload (a bad certificate, a key file of the wrong size) is logged, and edgeterm keeps serving
the previous config; the next change is tried again.

Runs on the edgeterm image's own Python (no shell there, no dependencies needed). The pod
must share its process namespace (``shareProcessNamespace: true``) and the /run/edgeterm
volume, so that the pid in edgeterm's pidfile is one this container can signal.

Settings (environment): EDGETERM (the edgeterm command), EDGETERM_CONFIG, EDGETERM_WATCH (the
directory), EDGETERM_WATCH_INTERVAL (seconds, default 5).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

EDGETERM = os.environ.get("EDGETERM", "/opt/edgeterm/bin/edgeterm")
CONFIG = os.environ.get("EDGETERM_CONFIG", "/etc/edgeterm/edgeterm.toml")
WATCH = os.environ.get("EDGETERM_WATCH", os.path.dirname(CONFIG))
INTERVAL = float(os.environ.get("EDGETERM_WATCH_INTERVAL", "5"))
NOT_RUNNING = 3  # edgeterm's exit code: nothing answers on the pidfile/admin socket


def log(message: str) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    print(f"{stamp} edgeterm-reloader: {message}", file=sys.stderr, flush=True)


def fingerprint(root: str) -> frozenset[tuple[str, int, int, int]]:
    """What the files under ``root`` look like, without reading them. Kubernetes' volumes are
    symlinks into a hidden ``..data`` directory that is swapped at once on an update; entries
    starting with ``..`` are its machinery and are skipped (the links lead to the same files)."""
    seen = set()
    for directory, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith("..")]
        for name in files:
            if name.startswith(".."):
                continue
            path = os.path.join(directory, name)
            try:
                st = os.stat(path)
            except OSError:
                continue
            seen.add((os.path.relpath(path, root), st.st_ino, st.st_size, st.st_mtime_ns))
    return frozenset(seen)


def reload() -> int:
    try:
        r = subprocess.run(
            [EDGETERM, "reload", "-c", CONFIG, "--timeout", "60"],
            capture_output=True,
            text=True,
            timeout=90,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log(f"edgeterm reload: {exc}")
        return 1
    for line in (r.stdout + r.stderr).splitlines():
        log(f"edgeterm reload: {line}")
    return r.returncode


def main() -> int:
    log(f"watching {WATCH} every {INTERVAL:g}s; on a change: {EDGETERM} reload -c {CONFIG}")
    applied = fingerprint(WATCH)
    last = applied
    while True:
        time.sleep(INTERVAL)
        now = fingerprint(WATCH)
        # reload once the files have stopped changing, and only if they differ from what
        # the last reload (or the start) saw
        if now == last and now != applied:
            log("files changed: reloading")
            code = reload()
            if code != NOT_RUNNING:  # not running yet: try again at the next look
                applied = now
        last = now


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(0)
