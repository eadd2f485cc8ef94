"""Upstream pools: which server a new connection tries first, and which next.

Pure (no sockets): the connection asks ``first()`` once, then ``server(start, attempt)`` for
each retry, so a connect that fails before any byte was sent moves on to the next server
of the pool, each server being tried at most once per connection.
"""

from __future__ import annotations

from edgeterm.config import Address, UpstreamConfig


class Pool:
    __slots__ = ("_next", "name", "servers", "size")

    def __init__(self, cfg: UpstreamConfig) -> None:
        self.name = cfg.name
        self.servers: tuple[Address, ...] = cfg.servers
        self.size = len(cfg.servers)
        self._next = 0

    def first(self) -> int:
        """Round robin: the index the next connection starts at."""
        start = self._next
        self._next = (start + 1) % self.size
        return start

    def server(self, start: int, attempt: int) -> Address | None:
        """The server for ``attempt`` (0-based) of a connection that started at ``start``."""
        if attempt >= self.size:
            return None
        return self.servers[(start + attempt) % self.size]
