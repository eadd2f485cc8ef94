"""The pidfile: written atomically, removed on exit, stale ones (dead pid) ignored."""

from __future__ import annotations

import os
from pathlib import Path


def read_pid(path: Path) -> int | None:
    """The pid in ``path`` if that process is alive, else None (missing or stale file)."""
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid  # alive, owned by someone else
    return pid


def write(path: Path, pid: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{pid}.tmp")
    tmp.write_text(f"{pid}\n")
    os.replace(tmp, path)


def remove(path: Path, pid: int) -> None:
    """Remove ``path`` if it still names ``pid`` (never another instance's file)."""
    try:
        if int(path.read_text().strip()) == pid:
            path.unlink()
    except (OSError, ValueError):
        pass
