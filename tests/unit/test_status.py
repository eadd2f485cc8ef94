"""edgeterm.status: the plain-text status and the readiness verdict, from status JSON."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from edgeterm.status import format_age, not_ready, render_text

NOW = 1_800_000_000.0


def worker(slot: int, pid: int, generation: int = 3, **kw: Any) -> dict[str, Any]:
    w = {
        "pid": pid,
        "slot": slot,
        "cpu": slot,
        "generation": generation,
        "ready": True,
        "draining": False,
        "active": 4,
        "accepted": 10,
        "handshakes": 9,
        "resumed": 7,
    }
    w.update(kw)
    return w


STATUS: dict[str, Any] = {
    "pid": 100,
    "uptime": 7300.0,
    "generation": 3,
    "config": "/etc/edgeterm/edgeterm.toml",
    "loaded_at": NOW - 125,
    "reloads": {"ok": 2, "failed": 1, "last": {"ok": True}, "in_progress": False},
    "restarts": 1,
    "upstreams": {},
    "tickets": {
        "enabled": True,
        "source": "generated",
        "keys": 3,
        "current_key_age": 61.4,
        "rotations": 5,
        "rotate_every": 3600.0,
        "locked_memory": True,
    },
    "workers": [worker(0, 201), worker(1, 202)],
}


def status(**changes: Any) -> dict[str, Any]:
    st = copy.deepcopy(STATUS)
    st.update(changes)
    return st


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (59.9, "59s"), (61, "1m01s"), (3600, "1h00m"), (90061, "1d01h"), (-3, "0s")],
)
def test_format_age(seconds: float, text: str) -> None:
    assert format_age(seconds) == text


def test_text_has_load_time_tickets_and_resumed() -> None:
    lines = render_text(STATUS, now=NOW)
    assert lines[0] == (
        "edgeterm pid 100, up 2h01m, generation 3, config /etc/edgeterm/edgeterm.toml"
    )
    assert lines[1] == "config loaded 2027-01-15 07:57:55 UTC (2m05s ago)"
    assert lines[2] == "reloads: 2 ok, 1 failed; worker restarts: 1"
    assert lines[3] == (
        "tickets: 3 keys generated, current key 1m01s old, 5 rotations (every 3600s), "
        "keys in locked memory"
    )
    assert lines[4].split()[-1] == "resumed"
    assert [line.split()[-1] for line in lines[5:7]] == ["7", "7"]


def test_text_tickets_variants_and_a_failed_reload() -> None:
    files = status(
        tickets={
            "enabled": True,
            "source": "files",
            "keys": 3,
            "current_key_age": 5,
            "rotations": 1,
            "rotate_every": None,
            "locked_memory": False,
        },
        reloads={
            "ok": 0,
            "failed": 1,
            "last": {"ok": False, "error": "bad cert"},
            "in_progress": True,
        },
    )
    text = "\n".join(render_text(files, now=NOW))
    assert (
        "tickets: 3 keys from key files, current key 5s old, 1 rotation, keys NOT in locked "
        "memory (raise RLIMIT_MEMLOCK)"
    ) in text
    assert "last reload failed: bad cert" in text
    assert "one in progress" in text
    assert "tickets: disabled" in render_text(status(tickets={"enabled": False}), now=NOW)


def test_ready_when_every_serving_worker_is() -> None:
    assert not_ready(STATUS) == []
    assert not_ready(STATUS, expected_workers=2) == []
    # an old generation draining after a reload does not matter
    draining_old = status(workers=[*STATUS["workers"], worker(0, 150, generation=2, draining=True)])
    assert not_ready(draining_old) == []


def test_a_starting_or_draining_serving_worker_is_not_ready() -> None:
    st = status(workers=[worker(0, 201), worker(1, 203, ready=False)])
    assert not_ready(st) == ["worker 1 (pid 203) is starting"]
    st = status(workers=[worker(0, 201, draining=True), worker(1, 202, draining=True)])
    assert len(not_ready(st)) == 2 and "draining" in not_ready(st)[0]


def test_a_stopping_server_is_not_ready_before_its_workers_drain() -> None:
    st = {**STATUS, "stopping": True}
    assert not_ready(st) == ["edgeterm is stopping"]


def test_a_missing_slot_is_not_ready() -> None:
    # slot 0 died and waits for its restart back-off: it has no entry at all
    gap = status(workers=[worker(1, 202)])
    assert not_ready(gap) == ["worker 0 is not running (waiting to be restarted)"]
    # the highest slot missing is seen only when the expected count is known
    top = status(workers=[worker(0, 201)])
    assert not_ready(top) == []
    assert not_ready(top, expected_workers=2) == [
        "worker 1 is not running (waiting to be restarted)"
    ]
    assert not_ready(status(workers=[])) == ["generation 3 has no worker"]


def test_process_problems_count_only_for_ready_workers() -> None:
    def problem(pid: int) -> str | None:
        return "is stopped" if pid == 202 else None

    assert not_ready(STATUS, process_problem=problem) == ["worker 1 (pid 202) is stopped"]
