"""``edgeterm status``: the supervisor's status JSON as text, and whether the server is ready.

Pure functions of the JSON the supervisor returns on its admin socket (``Supervisor.status``),
so they are unit-tested without a server. The CLI adds what only it can see: the worker
processes' state (stopped, exited) and how many workers the serving generation should have
(docs/cli.md, "status").

Ready means: every slot of the serving generation has a worker, and each of them has said it
accepts connections and is not draining (a draining serving generation means the server stops).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

ProcessProblem = Callable[[int], str | None]


def format_age(seconds: float) -> str:
    """A duration as an operator reads it: ``42s``, ``5m07s``, ``3h05m``, ``2d04h``."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def format_time(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def _tickets_line(t: Mapping[str, Any]) -> str:
    if not t.get("enabled"):
        return "tickets: disabled"
    source = "from key files" if t.get("source") == "files" else "generated"
    parts = [f"tickets: {t.get('keys', '?')} keys {source}"]
    if isinstance(t.get("current_key_age"), int | float):
        parts.append(f"current key {format_age(t['current_key_age'])} old")
    rotations = t.get("rotations", 0)
    every = t.get("rotate_every")
    every_text = f" (every {every:g}s)" if isinstance(every, int | float) else ""
    parts.append(f"{rotations} rotation{'' if rotations == 1 else 's'}{every_text}")
    if "locked_memory" in t:
        parts.append(
            "keys in locked memory"
            if t["locked_memory"]
            else "keys NOT in locked memory (raise RLIMIT_MEMLOCK)"
        )
    return ", ".join(parts)


def worker_state(w: Mapping[str, Any]) -> str:
    return "draining" if w.get("draining") else ("ready" if w.get("ready") else "starting")


def render_text(st: Mapping[str, Any], now: float | None = None) -> list[str]:
    """The plain-text ``edgeterm status``: every fact of the JSON an operator watches (never
    key material: the JSON holds none)."""
    now = time.time() if now is None else now
    rl = st["reloads"]
    lines = [
        f"edgeterm pid {st['pid']}, up {format_age(st['uptime'])}, "
        f"generation {st['generation']}, config {st['config']}"
    ]
    loaded = st.get("loaded_at")
    if isinstance(loaded, int | float):
        lines.append(f"config loaded {format_time(loaded)} ({format_age(now - loaded)} ago)")
    lines.append(
        f"reloads: {rl['ok']} ok, {rl['failed']} failed"
        f"{', one in progress' if rl.get('in_progress') else ''}; "
        f"worker restarts: {st['restarts']}"
    )
    last = rl.get("last")
    if isinstance(last, Mapping) and not last.get("ok", True):
        lines.append(f"last reload failed: {last.get('error')}")
    lines.append(_tickets_line(st.get("tickets", {})))
    lines.append(
        f"{'slot':>4} {'pid':>8} {'cpu':>4} {'gen':>4} {'state':>9} {'active':>7} "
        f"{'handshakes':>11} {'resumed':>8}"
    )
    for w in st["workers"]:
        cpu = "-" if w.get("cpu") is None else w["cpu"]
        lines.append(
            f"{w['slot']:>4} {w['pid']:>8} {cpu:>4} {w['generation']:>4} {worker_state(w):>9} "
            f"{w.get('active', 0):>7} {w.get('handshakes', 0):>11} {w.get('resumed', 0):>8}"
        )
    for pool, servers in st.get("upstreams", {}).items():  # active health checks
        for key, server in servers.items():
            lines.append(f"upstream {pool} {key}: {'up' if server['up'] else 'DOWN'}")
    return lines


def not_ready(
    st: Mapping[str, Any],
    *,
    expected_workers: int | None = None,
    process_problem: ProcessProblem | None = None,
) -> list[str]:
    """Why the serving generation is not ready; ``[]`` when it is.

    ``expected_workers``: the slots the serving generation has (the supervisor's ``slots``: a
    slot whose worker died and waits for its restart back-off has no entry in the JSON);
    without it, only gaps below the highest slot are seen. ``process_problem(pid)``: what is
    wrong with a worker process that the supervisor has not noticed yet (stopped, exited), or
    None."""
    generation = st["generation"]
    serving = sorted(
        (w for w in st["workers"] if w["generation"] == generation), key=lambda w: w["slot"]
    )
    reasons: list[str] = []
    if st.get("stopping"):
        reasons.append("edgeterm is stopping")
    for w in serving:
        who = f"worker {w['slot']} (pid {w['pid']})"
        if w.get("draining"):
            reasons.append(f"{who} is draining: edgeterm is stopping")
        elif not w.get("ready"):
            reasons.append(f"{who} is starting")
        elif process_problem is not None and (problem := process_problem(w["pid"])):
            reasons.append(f"{who} {problem}")
    slots = {w["slot"] for w in serving}
    count = expected_workers if expected_workers is not None else max(slots, default=-1) + 1
    for slot in sorted(set(range(count)) - slots):
        reasons.append(f"worker {slot} is not running (waiting to be restarted)")
    if not serving and not reasons:
        reasons.append(f"generation {generation} has no worker")
    return reasons
