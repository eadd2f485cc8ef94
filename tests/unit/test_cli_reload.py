"""``edgeterm reload`` decides which finished reload answers its SIGHUP (``reload_outcome``).

The status it reads before signalling gives ``reloads.requested`` (n); only a reload that began
at a request number above n began after that read, so after the operator's files were written.
"""

from __future__ import annotations

from typing import Any

from edgeterm.cli import reload_outcome


def reloads(requested: int, last: dict[str, Any] | None, **kw: Any) -> dict[str, Any]:
    return {
        "ok": kw.get("ok", 0),
        "failed": kw.get("failed", 0),
        "in_progress": kw.get("in_progress", False),
        "requested": requested,
        "started": last["seq"] if last else 0,
        "last": last,
    }


def test_the_reload_that_began_after_the_signal_answers() -> None:
    before = reloads(3, {"ok": True, "generation": 3, "seq": 3}, ok=3)
    # an earlier reload (request 3) ended: not ours
    assert reload_outcome(before, reloads(4, {"ok": True, "generation": 3, "seq": 3})) is None
    ours = {"ok": True, "generation": 4, "seq": 4}
    assert reload_outcome(before, reloads(4, ours)) == ours


def test_a_reload_that_began_before_the_signal_does_not_answer_even_if_it_ends_after() -> None:
    # our SIGHUP (request 2) came while reload 1 was starting a generation: reload 1 ends
    # first and must not be taken for ours; the queued reload that follows is
    before = reloads(1, None, in_progress=True)
    assert before["started"] == 0
    in_flight = reloads(2, {"ok": True, "generation": 2, "seq": 1}, ok=1)
    assert reload_outcome(before, in_flight) is None
    queued = {"ok": False, "error": "bad certificate", "seq": 2}
    assert reload_outcome(before, reloads(2, queued, ok=1, failed=1)) == queued


def test_a_later_reload_that_already_ended_answers_too() -> None:
    before = reloads(5, {"ok": True, "generation": 4, "seq": 5})
    later = {"ok": True, "generation": 6, "seq": 7}
    assert reload_outcome(before, reloads(7, later)) == later


def test_a_supervisor_without_request_numbers_falls_back_to_the_counters() -> None:
    old = {"ok": 1, "failed": 0, "in_progress": False, "last": {"ok": True, "generation": 2}}
    assert reload_outcome(old, dict(old)) is None
    busy = {"ok": 2, "failed": 0, "in_progress": True, "last": {"ok": True, "generation": 3}}
    assert reload_outcome(old, busy) is None
    done = dict(busy, in_progress=False)
    assert reload_outcome(old, done) == done["last"]
