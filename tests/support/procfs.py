"""Resource readings over a process and all its descendants (psutil reads /proc).

edgeterm may run as one process or as a supervisor with worker children, so every reading is
summed over the whole tree. A process that exits between listing and reading is skipped.
"""

from __future__ import annotations

import contextlib
from typing import Any

import psutil


def tree(pid: int) -> list[psutil.Process]:
    """``pid`` and all its descendants that exist now."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_pids(pid: int) -> list[int]:
    return [p.pid for p in tree(pid)]


def tree_rss(pid: int) -> int:
    """Sum of resident set sizes (bytes)."""
    total = 0
    for p in tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):
            total += p.memory_info().rss
    return total


def tree_fds(pid: int) -> int:
    """Sum of open file descriptors."""
    total = 0
    for p in tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):
            total += p.num_fds()
    return total


def tree_tcp_connections(pid: int, *, status: str | None = None) -> list[Any]:
    """TCP sockets held by the tree (optionally only those in ``status``, e.g. ESTABLISHED)."""
    conns: list[Any] = []
    for p in tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):
            for c in p.net_connections(kind="tcp"):
                if status is None or c.status == status:
                    conns.append(c)
    return conns
