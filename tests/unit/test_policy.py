from edgeterm.supervisor.policy import (
    BACKOFF_MAX,
    KILL_AFTER,
    STABLE_AFTER,
    Backoff,
    Heartbeats,
    Slot,
    plan_slots,
    slots_to_spawn,
)


def test_slots_pin_to_distinct_cpus_and_wrap():
    assert plan_slots(2, True, {3, 1}) == [Slot(0, 1), Slot(1, 3)]
    assert [s.cpu for s in plan_slots(3, True, {0, 1})] == [0, 1, 0]
    assert [s.cpu for s in plan_slots(2, False, {0, 1})] == [None, None]


def test_backoff_first_restart_is_immediate_then_doubles_to_a_cap():
    b = Backoff()
    delays = [b.on_exit(lived=0.5) for _ in range(12)]
    assert delays[0] == 0.0
    assert delays[1:4] == [0.1, 0.2, 0.4]
    assert max(delays) == BACKOFF_MAX
    assert delays == sorted(delays)


def test_backoff_resets_after_a_stable_run():
    b = Backoff()
    for _ in range(5):
        b.on_exit(lived=0.1)
    assert b.on_exit(lived=STABLE_AFTER + 1) == 0.0


def test_heartbeat_term_then_kill_once():
    hb = Heartbeats(timeout=10.0)
    hb.seen(100, now=0.0)
    hb.seen(200, now=0.0)
    assert hb.due(5.0) == ([], [])
    hb.seen(200, now=9.0)
    assert hb.due(10.5) == ([100], [])
    assert hb.due(10.5 + KILL_AFTER / 2) == ([], [])
    assert hb.due(10.6 + KILL_AFTER) == ([], [100])
    assert hb.due(100.0) == ([200], [])  # 200 went silent too; 100 is not killed twice
    hb.forget(100)
    assert 100 not in hb.last


def test_slots_to_spawn_respects_occupancy_and_backoff():
    slots = plan_slots(3, True, {0, 1})
    assert [s.index for s in slots_to_spawn(slots, [0], {}, now=0.0)] == [1, 2]
    assert [s.index for s in slots_to_spawn(slots, [0], {1: 5.0}, now=1.0)] == [2]
    assert [s.index for s in slots_to_spawn(slots, [0], {1: 5.0}, now=5.0)] == [1, 2]
