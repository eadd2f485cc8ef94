"""A server's ``max_conns`` shared out among the workers (docs/routing.md, "Caps"): each
worker enforces ``floor(max_conns / workers)``, at least 1; so the total never exceeds
``max_conns`` unless ``max_conns < workers``, which check-config and start warn about."""

from __future__ import annotations

import socket

import pytest
from edgeterm.workers.upstream import Pool, max_conns_warnings, worker_share

from edgeterm.config import Address, Config, UpstreamConfig


@pytest.mark.parametrize(
    ("max_conns", "workers", "share"),
    [
        (0, 4, 0),  # no cap stays no cap
        (1, 1, 1),
        (1, 2, 1),  # fewer than the workers: 1 each (total 2, warned about)
        (3, 4, 1),
        (4, 4, 1),
        (7, 4, 1),
        (8, 4, 2),
        (10, 4, 2),  # total 8: up to workers - 1 under the cap
        (100, 3, 33),
        (100, 64, 1),
        (5, 0, 5),  # a worker count below 1 counts as 1
    ],
)
def test_worker_share(max_conns: int, workers: int, share: int) -> None:
    assert worker_share(max_conns, workers) == share


@pytest.mark.parametrize("workers", range(1, 65))
def test_the_total_stays_within_max_conns_unless_it_is_below_the_worker_count(
    workers: int,
) -> None:
    for max_conns in range(1, 300):
        total = workers * worker_share(max_conns, workers)
        if max_conns >= workers:
            assert max_conns - workers < total <= max_conns, (max_conns, workers, total)
        else:
            assert total == workers, (max_conns, workers, total)


def _addrs(n: int) -> tuple[Address, ...]:
    return tuple(Address("127.0.0.1", 9000 + i, socket.AF_INET) for i in range(n))


def test_pool_caps_are_the_worker_shares() -> None:
    cfg = UpstreamConfig(name="app", servers=_addrs(4), max_conns=(10, 0, 3, 1))
    assert Pool(cfg, workers=4).balancer.caps == (2, 0, 1, 1)
    assert Pool(cfg, workers=1).balancer.caps == (10, 0, 3, 1)
    assert Pool(cfg).balancer.caps == (10, 0, 3, 1)


def test_warning_for_each_cap_below_the_worker_count() -> None:
    pools = {
        "app": UpstreamConfig(name="app", servers=_addrs(3), max_conns=(1, 0, 2)),
        "db": UpstreamConfig(name="db", servers=_addrs(1)),
    }
    config = Config(path=None, listeners=(), tls=None, upstreams=pools)  # type: ignore[arg-type]
    warnings = max_conns_warnings(config, 2, "edgeterm.toml")
    assert warnings == [
        "edgeterm.toml: upstreams.app.servers[0].max_conns: 1 is fewer than the 2 workers, and "
        "each worker allows at least 1 connection: up to 2 can be open to 127.0.0.1:9000 (set "
        "max_conns >= 2, or fewer workers)"
    ]
    assert max_conns_warnings(config, 1, "edgeterm.toml") == []
    assert len(max_conns_warnings(config, 3, "edgeterm.toml")) == 2
