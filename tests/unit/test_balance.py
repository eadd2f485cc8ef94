import random
from collections import Counter

import pytest
from edgeterm.workers.balance import MODES, NO_EXCLUDE, Balancer, Server


class Clock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


def servers(n=3, weights=None, cap=0):
    weights = weights or [1] * n
    return [Server(f"10.0.0.{i}:8080", weight=w, max_conns=cap) for i, w in enumerate(weights)]


def make(mode, n=3, weights=None, cap=0, seed=1, **kw):
    return Balancer(
        servers(n, weights, cap),
        mode,
        rng=random.Random(seed),
        clock=kw.pop("clock", Clock()),
        **kw,
    )


def clients(n, prefix="198.51"):
    return [f"{prefix}.{i // 256 % 256}.{i % 256}" if n <= 65536 else f"c{i}" for i in range(n)]


def assert_shares(counts, weights, total, tol):
    """Each server's share within ``tol`` (relative) of its weight's share."""
    wsum = sum(weights)
    for i, w in enumerate(weights):
        expected = total * w / wsum
        assert abs(counts[i] - expected) <= tol * expected, (i, counts, expected)


# -- round robin --------------------------------------------------------------------------


def test_round_robin_equal_weights_is_exact_and_in_order():
    b = make("round_robin")
    picks = [b.pick() for _ in range(9999)]
    assert picks[:6] == [0, 1, 2, 0, 1, 2]
    assert Counter(picks) == {0: 3333, 1: 3333, 2: 3333}


def test_round_robin_weights_are_exact_in_every_window_and_interleaved():
    b = make("round_robin", weights=[1, 2, 3])
    picks = [b.pick() for _ in range(10002)]
    assert Counter(picks) == {0: 1667, 1: 3334, 2: 5001}
    for k in range(0, len(picks), 6):
        assert Counter(picks[k : k + 6]) == {0: 1, 1: 2, 2: 3}
    # smooth: the heaviest server never gets three in a row, the lightest never two
    runs = "".join(map(str, picks))
    assert "222" not in runs and "00" not in runs


def test_round_robin_skips_an_unavailable_server_and_keeps_proportions():
    b = make("round_robin", n=4, weights=[1, 2, 3, 4])
    b.set_state(3, False)
    picks = Counter(b.pick() for _ in range(6000))
    assert picks == {0: 1000, 1: 2000, 2: 3000}


# -- least_conn ---------------------------------------------------------------------------


def test_least_conn_equalises_active_counts():
    b = make("least_conn", n=5)
    for _ in range(10000):
        i = b.pick()
        b.acquired(i)
        assert max(b.active) - min(b.active) <= 1
    assert b.active == [2000] * 5


def test_least_conn_follows_weights():
    b = make("least_conn", weights=[1, 2, 3])
    for _ in range(6000):
        b.acquired(b.pick())
    assert b.active == [1000, 2000, 3000]


def test_least_conn_always_picks_a_least_loaded_server_under_churn():
    weights = [1, 2, 3, 1, 5]
    b = make("least_conn", weights=weights)
    rnd = random.Random(7)
    open_ = []
    for _ in range(10000):
        i = b.pick()
        lowest = min((b.active[j] + 1) / weights[j] for j in range(5))
        assert (b.active[i] + 1) / weights[i] == lowest
        b.acquired(i)
        open_.append(i)
        while open_ and rnd.random() < 0.5:
            b.released(open_.pop(rnd.randrange(len(open_))))


def test_least_conn_breaks_ties_round_robin():
    b = make("least_conn", n=4)
    assert [b.pick() for _ in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]  # nothing acquired: all tie
    b.acquired(1)
    assert [b.pick() for _ in range(6)] == [0, 2, 3, 0, 2, 3]


# -- two_choices --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_two_choices_keeps_active_counts_close(seed):
    b = make("two_choices", n=10, seed=seed)
    for _ in range(10000):
        b.acquired(b.pick())
    # One random choice would spread ~±30 around 1000 here (max - min about 100); two
    # choices keep the gap to a few connections (over 200 seeds: 2 or 3 mostly, at most 7).
    assert max(b.active) - min(b.active) <= 10
    assert max(b.active) / min(b.active) < 1.01


def test_two_choices_under_churn():
    b = make("two_choices", n=8, seed=3)
    rnd = random.Random(3)
    open_ = []
    gaps = []
    for step in range(20000):
        i = b.pick()
        b.acquired(i)
        open_.append(i)
        if len(open_) > 400:  # steady state: 400 open connections, random ones close
            b.released(open_.pop(rnd.randrange(len(open_))))
        if step > 1000:
            gaps.append(max(b.active) - min(b.active))
    assert sum(b.active) == 400
    # Around 50 each. Measured with this churn: a random choice averages a max - min gap of
    # about 20 (worst about 40); two choices about 4 (worst about 13).
    assert sum(gaps) / len(gaps) < 6
    assert max(gaps) <= 20


def test_two_choices_follows_weights():
    b = make("two_choices", weights=[1, 2, 3], seed=11)
    for _ in range(12000):
        b.acquired(b.pick())
    assert_shares(b.active, [1, 2, 3], 12000, 0.02)


def test_two_choices_is_deterministic_with_an_injected_rng():
    a = [make("two_choices", n=6, seed=42).pick() for _ in range(1)]
    b1 = make("two_choices", n=6, seed=42)
    b2 = make("two_choices", n=6, seed=42)
    assert [b1.pick() for _ in range(100)] == [b2.pick() for _ in range(100)]
    assert a[0] is not None


def test_two_choices_single_and_last_server():
    b = make("two_choices", n=1)
    assert b.pick() == 0
    assert b.pick(exclude={0}) is None
    b = make("two_choices", n=5)
    for i in range(4):
        b.set_state(i, False)
    assert all(b.pick() == 4 for _ in range(50))


# -- source_hash --------------------------------------------------------------------------


def test_source_hash_same_client_same_server_across_instances():
    a = make("source_hash", n=7)
    b = make("source_hash", n=7, seed=99)  # another worker: same mapping
    for c in clients(2000):
        first = a.pick(c)
        assert a.pick(c) == first == b.pick(c)


def test_source_hash_spreads_evenly_and_by_weight():
    cs = clients(30000)
    b = make("source_hash", n=5)
    assert_shares(Counter(b.pick(c) for c in cs), [1] * 5, len(cs), 0.05)
    w = make("source_hash", weights=[1, 2, 3])
    assert_shares(Counter(w.pick(c) for c in clients(60000)), [1, 2, 3], 60000, 0.03)


def test_source_hash_removing_a_server_moves_only_its_clients():
    cs = clients(20000)
    full = Balancer(servers(10), "source_hash")
    smaller = Balancer(servers(10)[:4] + servers(10)[5:], "source_hash")  # 10.0.0.4 removed
    moved = 0
    for c in cs:
        before = full.keys[full.pick(c)]
        after = smaller.keys[smaller.pick(c)]
        if before == "10.0.0.4:8080":
            moved += 1
        else:
            assert after == before
    assert 0.08 < moved / len(cs) < 0.12  # about 1/10


def test_source_hash_mapping_does_not_depend_on_server_order():
    cs = clients(3000)
    a = Balancer(servers(6), "source_hash")
    b = Balancer(list(reversed(servers(6))), "source_hash")
    assert all(a.keys[a.pick(c)] == b.keys[b.pick(c)] for c in cs)


def test_source_hash_down_server_moves_its_clients_and_gets_them_back():
    cs = clients(5000)
    b = make("source_hash", n=5)
    before = {c: b.pick(c) for c in cs}
    b.set_state(2, False)
    during = {c: b.pick(c) for c in cs}
    assert all(during[c] == before[c] for c in cs if before[c] != 2)
    assert all(during[c] != 2 for c in cs)
    b.set_state(2, True)
    assert {c: b.pick(c) for c in cs} == before


def test_source_hash_without_client_address_round_robins():
    b = make("source_hash")
    assert [b.pick(None) for _ in range(6)] == [0, 1, 2, 0, 1, 2]


# -- every mode: caps, exclusion, health ---------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_cap_holds(mode):
    b = make(mode, n=3, weights=[1, 2, 3], cap=5)
    rnd = random.Random(5)
    open_ = []
    for step in range(10000):
        i = b.pick(f"192.0.2.{step % 200}")
        if i is None:
            assert all(a == 5 for a in b.active)
            assert b.why_none() == "full"
        else:
            b.acquired(i)
            open_.append(i)
        assert max(b.active) <= 5
        if open_ and rnd.random() < 0.4:
            b.released(open_.pop(rnd.randrange(len(open_))))


@pytest.mark.parametrize("mode", MODES)
def test_all_full_gives_none(mode):
    b = make(mode, n=2, cap=2)
    for _ in range(4):
        b.acquired(b.pick("203.0.113.1"))
    assert b.active == [2, 2]
    assert b.pick("203.0.113.1") is None
    b.released(1)
    assert b.pick("203.0.113.1") == 1


@pytest.mark.parametrize("mode", MODES)
def test_retries_visit_each_server_once(mode):
    for k in range(20):
        b = make(mode, n=5, weights=[1, 1, 2, 3, 5], seed=k)
        tried = set()
        for _ in range(5):
            i = b.pick(f"192.0.2.{k}", tried)
            assert i is not None and i not in tried
            tried.add(i)
        assert b.pick(f"192.0.2.{k}", tried) is None
        assert b.why_none(tried) == "tried"


@pytest.mark.parametrize("mode", MODES)
def test_exclude_is_respected(mode):
    b = make(mode, n=4)
    for k in range(200):
        assert b.pick(f"192.0.2.{k}", {0, 1, 3}) == 2
        assert b.pick(f"192.0.2.{k}", frozenset({0, 2})) in (1, 3)


@pytest.mark.parametrize("mode", MODES)
def test_passive_health_down_then_back_after_down_for(mode):
    clock = Clock(100.0)
    b = make(mode, n=3, clock=clock, fail_threshold=3, down_for=10.0)
    assert b.connect_failed(1, clock.t) is False
    assert b.connect_failed(1, clock.t) is False
    b.connect_ok(1)  # a success resets the count
    assert not b.connect_failed(1, clock.t) and not b.connect_failed(1, clock.t)
    assert b.connect_failed(1, clock.t) is True  # third in a row: down
    assert not b.is_up(1, clock.t)
    assert all(b.pick(f"192.0.2.{k}") != 1 for k in range(300))
    clock.t += 9.9
    assert all(b.pick(f"192.0.2.{k}") != 1 for k in range(300))
    clock.t += 0.1
    assert b.is_up(1, clock.t)
    assert 1 in {b.pick(f"192.0.2.{k}") for k in range(300)}
    # on probation: the next failure takes it down again at once
    assert b.connect_failed(1, clock.t) is True
    assert all(b.pick(f"192.0.2.{k}") != 1 for k in range(300))
    clock.t += 10
    b.connect_ok(1)
    assert not b.connect_failed(1, clock.t)  # the count started again


def test_failures_while_down_do_not_extend_the_down_period():
    clock = Clock(0.0)
    b = make("round_robin", clock=clock, fail_threshold=1, down_for=10.0)
    assert b.connect_failed(0, 0.0)
    assert not b.connect_failed(0, 5.0)  # a connect started before it was marked down
    assert b.is_up(0, 10.0)


def test_passive_health_can_be_off():
    b = make("round_robin", fail_threshold=0)
    for _ in range(100):
        assert not b.connect_failed(0, 0.0)
    assert b.is_up(0, 0.0)


@pytest.mark.parametrize("mode", MODES)
def test_all_down_gives_none_and_active_health_brings_them_back(mode):
    b = make(mode, n=3)
    for i in range(3):
        b.set_state(i, False)
    assert b.pick("192.0.2.1") is None
    assert b.why_none() == "down"
    b.set_state(2, True)
    assert b.pick("192.0.2.1") == 2


def test_active_up_clears_passive_down():
    clock = Clock(0.0)
    b = make("round_robin", clock=clock, fail_threshold=1, down_for=60.0)
    b.connect_failed(0, 0.0)
    assert not b.is_up(0, 1.0)
    b.set_state(0, True)
    assert b.is_up(0, 1.0)


def test_clock_is_read_only_while_a_server_is_passively_down():
    reads = []

    def clock():
        reads.append(1)
        return 0.0

    b = Balancer(servers(3), "round_robin", clock=clock, fail_threshold=1)
    for _ in range(10):
        b.pick()
    assert reads == []
    b.connect_failed(0, 0.0)
    b.pick()
    assert reads == [1]
    b.connect_ok(0)
    b.pick()
    assert reads == [1]


def test_pick_defaults():
    b = make("round_robin")
    assert b.pick() == 0
    assert b.pick(None, NO_EXCLUDE, now=5.0) == 1


@pytest.mark.parametrize(
    ("srv", "mode", "kw", "message"),
    [
        ([], "round_robin", {}, "at least one server"),
        (servers(2), "random", {}, "unknown balance mode"),
        ([Server("a", weight=0)], "round_robin", {}, "weight must be an integer >= 1"),
        ([Server("a", weight=True)], "round_robin", {}, "weight must be"),
        ([Server("a", max_conns=-1)], "round_robin", {}, "max_conns must be >= 0"),
        ([Server("a"), Server("a")], "round_robin", {}, "keys must be unique"),
        (servers(1), "round_robin", {"fail_threshold": -1}, "fail_threshold"),
        (servers(1), "round_robin", {"down_for": 0}, "down_for"),
    ],
)
def test_invalid_pools_are_refused(srv, mode, kw, message):
    with pytest.raises(ValueError, match=message):
        Balancer(srv, mode, **kw)


def test_released_without_acquired_is_a_bug():
    b = make("least_conn")
    with pytest.raises(AssertionError):
        b.released(0)
