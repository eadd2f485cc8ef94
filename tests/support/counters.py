"""The workers' counters as ``edgeterm status --json`` shows them, for the upstream tests.

Each worker sends its counters to the supervisor with every heartbeat reply (once a second),
so a test waits, with a deadline, until the counter it synchronises on has reached the value
its own connections imply, then asserts the other counters of that same status exactly.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .supervision import cli_status
from .waiting import WaitTimeout, wait_until


def worker_total(st: dict[str, Any], counter: str) -> int:
    """A per-worker counter (``upstream_unavailable``, ...) summed over every worker."""
    return sum(int(w[counter]) for w in st["workers"])


def closed_total(st: dict[str, Any], reason: str) -> int:
    """Clients closed for ``reason`` (``closed_by``), summed over every worker."""
    return sum(int(w["closed_by"].get(reason, 0)) for w in st["workers"])


def wait_cli_status(
    config: Path,
    predicate: Callable[[dict[str, Any]], bool],
    *,
    timeout: float,
    what: str,
) -> dict[str, Any]:
    """Run ``edgeterm status --json -c CONFIG`` until ``predicate(status)``; return it."""
    last: list[dict[str, Any]] = []

    def check() -> dict[str, Any] | None:
        st = cli_status(config)
        last[:] = [st]
        return st if predicate(st) else None

    try:
        result = wait_until(check, timeout=timeout, interval=0.1, what=what)
    except WaitTimeout as exc:
        workers = [w for st in last for w in st["workers"]]
        raise WaitTimeout(f"{exc}; last workers: {json.dumps(workers, indent=1)}") from None
    assert result is not None
    return result
