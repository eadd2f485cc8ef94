import socket
from collections import Counter

from edgeterm.workers.upstream import Pool

from edgeterm.config import Address, UpstreamConfig


def _pool(n):
    servers = tuple(Address("127.0.0.1", 9000 + i, socket.AF_INET) for i in range(n))
    return Pool(UpstreamConfig(name="app", servers=servers))


def test_round_robin_spreads_evenly():
    pool = _pool(3)
    counts = Counter(pool.server(pool.first(), 0).port for _ in range(300))
    assert counts == {9000: 100, 9001: 100, 9002: 100}


def test_retry_visits_every_other_server_once_then_gives_up():
    pool = _pool(3)
    pool.first()
    start = pool.first()  # 1
    tried = [pool.server(start, a) for a in range(4)]
    assert [s.port for s in tried[:3]] == [9001, 9002, 9000]
    assert tried[3] is None
