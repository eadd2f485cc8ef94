import pytest

from edgeterm.health import HealthMonitor, HealthSettings, HealthState


def feed(state, results):
    return [state.record(ok) for ok in results]


def test_fall_consecutive_failures_take_it_down():
    s = HealthState(rise=2, fall=3)
    assert s.up
    assert feed(s, [False, False, False]) == [None, None, False]
    assert not s.up


def test_rise_consecutive_successes_bring_it_up():
    s = HealthState(rise=2, fall=3, up=False)
    assert feed(s, [True, True]) == [None, True]
    assert s.up


def test_an_agreeing_result_resets_the_run():
    s = HealthState(rise=2, fall=3)
    assert feed(s, [False, False, True, False, False, True]) == [None] * 6
    assert s.up and s.run == 0
    s = HealthState(rise=3, fall=1, up=False)
    assert feed(s, [True, True, False, True, True, True]) == [None] * 5 + [True]


def test_results_agreeing_with_the_state_never_report():
    s = HealthState(rise=1, fall=1)
    assert feed(s, [True] * 5) == [None] * 5
    assert feed(s, [False, False, True, True]) == [False, None, True, None]


def test_flapping_with_rise_and_fall_of_one():
    s = HealthState(rise=1, fall=1)
    assert feed(s, [False, True, False, True]) == [False, True, False, True]


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"interval": 0}, "interval"),
        ({"timeout": -1}, "timeout"),
        ({"rise": 0}, "rise"),
        ({"fall": 1.5}, "fall"),
        ({"fall": True}, "fall"),
        ({"interval": float("nan")}, "interval"),
    ],
)
def test_settings_are_checked(kw, message):
    with pytest.raises(ValueError, match=message):
        HealthSettings(**kw)


def test_state_refuses_zero_counts():
    with pytest.raises(ValueError):
        HealthState(rise=0)


SET = HealthSettings(interval=10.0, timeout=2.0, rise=2, fall=2)


def test_first_checks_are_spread_over_the_interval():
    m = HealthMonitor(4, SET, now=100.0)
    assert m.start_due(100.0) == [0]
    assert m.start_due(104.9) == [1]
    assert m.start_due(105.0) == [2]
    assert m.start_due(107.5) == [3]
    assert m.start_due(108.0) == []


def test_checks_do_not_overlap_and_repeat_every_interval():
    m = HealthMonitor(1, SET, now=0.0)
    assert m.start_due(0.0) == [0]
    assert m.in_flight(0)
    assert m.start_due(50.0) == []  # still in flight (the shell has not expired it)
    m2 = HealthMonitor(1, SET, now=0.0)
    m2.start_due(0.0)
    assert m2.finish(0, True, 0.5) is None
    assert not m2.in_flight(0)
    assert m2.next_wakeup() == 10.0
    assert m2.start_due(9.9) == []
    assert m2.start_due(10.0) == [0]


def test_a_slow_check_is_followed_at_once():
    s = HealthSettings(interval=1.0, timeout=5.0)
    m = HealthMonitor(1, s, now=0.0)
    m.start_due(0.0)
    m.finish(0, True, 3.0)
    assert m.next_wakeup() == 3.0
    assert m.start_due(3.0) == [0]


def test_failures_and_timeouts_take_a_server_down_and_successes_back_up():
    m = HealthMonitor(2, SET, now=0.0)
    m.start_due(0.0)
    assert m.finish(0, False, 0.1) is None  # refused: one failure
    assert m.next_wakeup() == 5.0  # server 1's first check; server 0's next is at 10
    assert m.start_due(10.0) == [0, 1]  # both due by now
    assert m.expire(11.9) == []
    assert m.expire(12.0) == [(0, False)]  # timed out: the second failure in a row
    assert not m.is_up(0) and m.is_up(1)
    assert m.finish(0, True, 12.5) is None  # late result of an expired check: ignored
    assert m.finish(1, True, 12.5) is None
    m.start_due(20.0)
    assert m.finish(0, True, 20.1) is None
    m.start_due(30.0)
    assert m.finish(0, True, 30.1) is True  # rise = 2
    assert m.is_up(0)


def test_a_result_after_the_timeout_counts_as_a_failure():
    m = HealthMonitor(1, HealthSettings(interval=10, timeout=1, rise=1, fall=1), now=0.0)
    m.start_due(0.0)
    assert m.finish(0, True, 1.5) is False


def test_next_wakeup_is_the_earliest_due_or_deadline():
    m = HealthMonitor(2, SET, now=0.0)
    assert m.next_wakeup() == 0.0
    m.start_due(0.0)
    assert m.next_wakeup() == 2.0  # server 0's timeout
    m.finish(0, True, 1.0)
    assert m.next_wakeup() == 5.0  # server 1's first check


def test_initially_down():
    m = HealthMonitor(1, HealthSettings(rise=1), now=0.0, initial_up=False)
    assert not m.is_up(0)
    m.start_due(0.0)
    assert m.finish(0, True, 0.1) is True
