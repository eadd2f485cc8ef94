"""Upstream balancing: which server of a pool a new connection tries, and which next.

Pure (no sockets, no logging): one ``Balancer`` per pool and worker. The connection calls
``pick(client_host, tried)`` for its first attempt and again after each connect that failed
before any byte was sent, with ``tried`` holding the servers it already tried; ``None`` means
no server is left and the client is closed cleanly (``why_none`` names the reason to count).

Modes:

* ``round_robin``: smooth weighted round robin (each pick adds every eligible server's weight
  to its running score, takes the highest and subtracts the eligible total from it): over any
  window of sum(weights) picks each server gets exactly its weight, interleaved rather than in
  bursts. Equal weights use a plain rotating cursor.
* ``least_conn``: the fewest active connections per weight, compared as ``(active + 1) /
  weight`` (so idle heavier servers go first); ties go round robin (a rotating scan start).
* ``two_choices``: two distinct servers drawn at random (in proportion to their weights), the
  one with the lower ``(active + 1) / weight`` wins. Nearly as even as ``least_conn`` without
  scanning the pool; ``rng`` is injectable for tests.
* ``source_hash``: weighted rendezvous hashing of the client's address: every eligible server
  gets a score from hash(client, server key) and its weight, the highest wins. The same client
  goes to the same server while the pool is unchanged; a server that leaves (removed, down,
  full) moves only its own clients, each to its next-highest server. Without a client address
  it falls back to round robin. Server keys (e.g. ``"10.0.0.1:8080"``), not positions, feed
  the hash, so a reload that removes one server keeps every other mapping.

A server is eligible when it is up (active health, pushed by the supervisor with
``set_state``), not passively down (``fail_threshold`` consecutive connect failures mark it
down for ``down_for`` seconds), below its ``max_conns`` cap (0: none; the count is this
worker's), and not in ``exclude``. When the down period ends the server is tried again; it is
on probation until a connect succeeds: one more failure marks it down again.

Hot path: ``pick``, ``acquired``, ``released`` and ``connect_ok`` build no lists, dicts or
closures; the clock is read only while some server is passively down.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
import zlib
from bisect import bisect_right
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass
from typing import Final, Literal

Mode = Literal["round_robin", "least_conn", "two_choices", "source_hash"]
MODES: Final[tuple[Mode, ...]] = ("round_robin", "least_conn", "two_choices", "source_hash")
WhyNone = Literal["down", "full", "tried"]

NO_EXCLUDE: Final[frozenset[int]] = frozenset()

_M64: Final = 0xFFFFFFFFFFFFFFFF
_TWO_53: Final = float(1 << 53)
_crc32 = zlib.crc32
_DRAWS: Final = 4  # random draws for one two_choices candidate before scanning instead


@dataclass(frozen=True, slots=True)
class Server:
    """One server of a pool, as the balancer sees it."""

    key: str  # stable identity, e.g. "10.0.0.1:8080" or "unix:/run/app.sock" (source_hash)
    weight: int = 1
    max_conns: int = 0  # this worker's cap on active connections; 0 = none


def _hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def _mix64(x: int) -> int:
    """A 64-bit finaliser (splitmix64's): every input bit affects every output bit."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


class Balancer:
    __slots__ = (
        "_admin",
        "_clock",
        "_cum",
        "_cur",
        "_cursor",
        "_down_for",
        "_down_until",
        "_fails",
        "_pick",
        "_rng",
        "_seeds",
        "_threshold",
        "_timed",
        "_total",
        "_uniform",
        "active",
        "caps",
        "keys",
        "mode",
        "size",
        "weights",
    )

    def __init__(
        self,
        servers: Sequence[Server],
        mode: Mode = "round_robin",
        *,
        fail_threshold: int = 3,
        down_for: float = 10.0,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not servers:
            raise ValueError("a pool needs at least one server")
        if mode not in MODES:
            raise ValueError(f"unknown balance mode {mode!r} (known: {', '.join(MODES)})")
        for s in servers:
            if isinstance(s.weight, bool) or not isinstance(s.weight, int) or s.weight < 1:
                raise ValueError(f"{s.key}: weight must be an integer >= 1, got {s.weight!r}")
            if isinstance(s.max_conns, bool) or not isinstance(s.max_conns, int):
                raise ValueError(f"{s.key}: max_conns must be an integer, got {s.max_conns!r}")
            if s.max_conns < 0:
                raise ValueError(f"{s.key}: max_conns must be >= 0, got {s.max_conns}")
        if len({s.key for s in servers}) != len(servers):
            raise ValueError("server keys must be unique")
        if fail_threshold < 0:
            raise ValueError("fail_threshold must be >= 0 (0: no passive health)")
        if not down_for > 0:
            raise ValueError("down_for must be > 0")
        n = len(servers)
        self.mode: Mode = mode
        self.size = n
        self.keys: tuple[str, ...] = tuple(s.key for s in servers)
        self.weights: tuple[int, ...] = tuple(s.weight for s in servers)
        self.caps: tuple[int, ...] = tuple(s.max_conns for s in servers)
        self.active = [0] * n  # this worker's open connections per server
        self._admin = [True] * n  # active health state, pushed by the supervisor
        self._fails = [0] * n  # consecutive connect failures
        self._down_until = [0.0] * n  # passive: down until then; 0.0 = not down
        self._timed = 0  # servers with a non-zero _down_until (down or on probation)
        self._threshold = fail_threshold
        self._down_for = float(down_for)
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._uniform = len(set(self.weights)) == 1
        self._cur = [0] * n  # smooth weighted round robin scores
        self._cursor = 0  # rotating start: round robin with equal weights, least_conn ties
        cum: list[int] = []
        acc = 0
        for w in self.weights:
            acc += w
            cum.append(acc)
        self._cum: tuple[int, ...] = tuple(cum)
        self._total = acc
        self._seeds: tuple[int, ...] = tuple(_hash64(k.encode("utf-8")) for k in self.keys)
        rr = self._rr_uniform if self._uniform else self._rr_weighted
        if mode == "round_robin":
            self._pick: Callable[[str | None, Container[int], float], int | None] = rr
        elif mode == "least_conn":
            self._pick = self._least_conn
        elif mode == "two_choices":
            self._pick = self._two_choices
        else:
            self._pick = self._source_hash

    # -- the connection's API ------------------------------------------------------------
    def pick(
        self,
        client_addr: str | None = None,
        exclude: Container[int] = NO_EXCLUDE,
        now: float | None = None,
    ) -> int | None:
        """The server for a new attempt, or None when every server is down, full or tried.

        ``client_addr`` is the client's IP address without port (used by ``source_hash``);
        ``exclude`` the servers this connection already tried; ``now`` defaults to the clock,
        which is read only while some server is passively down.
        """
        if now is None:
            now = self._clock() if self._timed else 0.0
        return self._pick(client_addr, exclude, now)

    def acquired(self, i: int) -> None:
        """A connection to server ``i`` was opened (counts against ``max_conns``)."""
        self.active[i] += 1

    def released(self, i: int) -> None:
        """A connection to server ``i`` was closed."""
        assert self.active[i] > 0, f"released({i}) without acquired"
        self.active[i] -= 1

    def connect_failed(self, i: int, now: float) -> bool:
        """A connect to server ``i`` failed; True when this failure marked it down."""
        if not self._threshold:
            return False
        f = self._fails[i] + 1
        self._fails[i] = f
        du = self._down_until[i]
        if f >= self._threshold and du <= now:  # not already down (in-flight failures)
            if du == 0.0:
                self._timed += 1
            self._down_until[i] = now + self._down_for
            return True
        return False

    def connect_ok(self, i: int) -> None:
        """A connect to server ``i`` succeeded: its failure count and passive state (down or
        on probation) clear."""
        self._fails[i] = 0
        if self._down_until[i]:
            self._down_until[i] = 0.0
            self._timed -= 1

    def set_state(self, i: int, up: bool) -> None:
        """The supervisor's active health check says server ``i`` is up or down.

        Up also clears the passive state: the checks just connected ``rise`` times in a row.
        """
        self._admin[i] = up
        if up:
            self.connect_ok(i)

    def is_up(self, i: int, now: float) -> bool:
        """Up by both active and passive health (whatever its connection count)."""
        return self._admin[i] and not self._down_until[i] > now

    def why_none(self, exclude: Container[int] = NO_EXCLUDE, now: float | None = None) -> WhyNone:
        """After ``pick`` returned None: ``"tried"`` if some up server was tried (and failed),
        else ``"full"`` if some up server is at its cap, else ``"down"``. Off the hot path."""
        if now is None:
            now = self._clock()
        full = False
        for i in range(self.size):
            if self.is_up(i, now):
                if i in exclude:
                    return "tried"
                full = True
        return "full" if full else "down"

    # -- eligibility ---------------------------------------------------------------------
    # Inlined in the loops below (a method call per candidate costs more than the test):
    #   i in exclude or not admin[i] or down[i] > now or (caps[i] and active[i] >= caps[i])
    # An expired _down_until stays set (probation) until connect_ok or set_state clears it.
    def _ok(self, i: int, exclude: Container[int], now: float) -> bool:
        cap = self.caps[i]
        return not (
            i in exclude
            or not self._admin[i]
            or self._down_until[i] > now
            or (cap and self.active[i] >= cap)
        )

    # -- modes ---------------------------------------------------------------------------
    def _rr_uniform(self, client: str | None, exclude: Container[int], now: float) -> int | None:
        n = self.size
        admin = self._admin
        down = self._down_until
        caps = self.caps
        active = self.active
        i = self._cursor
        k = 0
        while k < n:
            if not (
                i in exclude or not admin[i] or down[i] > now or (caps[i] and active[i] >= caps[i])
            ):
                self._cursor = i + 1 if i + 1 < n else 0
                return i
            i = i + 1 if i + 1 < n else 0
            k += 1
        return None

    def _rr_weighted(self, client: str | None, exclude: Container[int], now: float) -> int | None:
        n = self.size
        admin = self._admin
        down = self._down_until
        caps = self.caps
        active = self.active
        cur = self._cur
        weights = self.weights
        best = -1
        best_score = 0
        total = 0
        i = 0
        while i < n:
            if not (
                i in exclude or not admin[i] or down[i] > now or (caps[i] and active[i] >= caps[i])
            ):
                w = weights[i]
                score = cur[i] + w
                cur[i] = score
                total += w
                if best < 0 or score > best_score:
                    best = i
                    best_score = score
            i += 1
        if best < 0:
            return None
        cur[best] -= total
        return best

    def _least_conn(self, client: str | None, exclude: Container[int], now: float) -> int | None:
        n = self.size
        admin = self._admin
        down = self._down_until
        caps = self.caps
        active = self.active
        weights = self.weights
        i = self._cursor
        best = -1
        best_load = 0  # (active + 1) of the best, compared as a fraction over best_w
        best_w = 1
        k = 0
        while k < n:
            if not (
                i in exclude or not admin[i] or down[i] > now or (caps[i] and active[i] >= caps[i])
            ):
                load = active[i] + 1
                w = weights[i]
                if best < 0 or load * best_w < best_load * w:
                    best = i
                    best_load = load
                    best_w = w
            i = i + 1 if i + 1 < n else 0
            k += 1
        if best < 0:
            return None
        self._cursor = best + 1 if best + 1 < n else 0
        return best

    def _draw(self, exclude: Container[int], now: float, other: int) -> int:
        """A random eligible server other than ``other``, in proportion to weight; -1 if
        ``_DRAWS`` draws found none."""
        rnd = self._rng.random
        n = self.size
        uniform = self._uniform
        k = 0
        while k < _DRAWS:
            i = int(rnd() * n) if uniform else bisect_right(self._cum, rnd() * self._total)
            if i >= n:  # float rounding at the very top
                i = n - 1
            if i != other and self._ok(i, exclude, now):
                return i
            k += 1
        return -1

    def _two_choices(self, client: str | None, exclude: Container[int], now: float) -> int | None:
        if self.size == 1:
            return 0 if self._ok(0, exclude, now) else None
        a = self._draw(exclude, now, -1)
        if a < 0:
            return self._least_conn(client, exclude, now)  # most servers are unavailable
        b = self._draw(exclude, now, a)
        if b < 0:
            return self._least_conn(client, exclude, now)  # maybe a is the only one left
        active = self.active
        weights = self.weights
        if (active[b] + 1) * weights[a] < (active[a] + 1) * weights[b]:
            return b
        return a

    def _source_hash(self, client: str | None, exclude: Container[int], now: float) -> int | None:
        if client is None:
            if self._uniform:
                return self._rr_uniform(client, exclude, now)
            return self._rr_weighted(client, exclude, now)
        # CRC-32 of the client is enough input (the per-server mixing does the spreading) and
        # is stable across processes and restarts, unlike hash().
        h = _crc32(client.encode("utf-8"))
        n = self.size
        admin = self._admin
        down = self._down_until
        caps = self.caps
        active = self.active
        seeds = self._seeds
        best = -1
        i = 0
        if self._uniform:
            best_score = -1
            while i < n:
                if not (
                    i in exclude
                    or not admin[i]
                    or down[i] > now
                    or (caps[i] and active[i] >= caps[i])
                ):
                    # splitmix64's finaliser of (client hash ^ server seed), inlined
                    x = h ^ seeds[i]
                    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
                    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
                    x ^= x >> 31
                    if x > best_score:
                        best = i
                        best_score = x
                i += 1
            return best if best >= 0 else None
        # Weighted rendezvous: score = -weight / ln(u), u uniform in (0, 1) from the hash.
        # The server with the highest score wins; each wins in proportion to its weight.
        weights = self.weights
        log = math.log
        best_f = 0.0
        while i < n:
            if not (
                i in exclude or not admin[i] or down[i] > now or (caps[i] and active[i] >= caps[i])
            ):
                u = ((_mix64(h ^ seeds[i]) >> 11) + 0.5) / _TWO_53
                score_f = -weights[i] / log(u)
                if best < 0 or score_f > best_f:
                    best = i
                    best_f = score_f
            i += 1
        return best if best >= 0 else None
