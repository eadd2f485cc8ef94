"""A worker's counters: plain integer attributes, bumped on connection events, never per read."""

from __future__ import annotations


class Stats:
    __slots__ = (
        "accept_errors",
        "accepted",
        "active",
        "bytes_c2u",
        "bytes_u2c",
        "closed_by",
        "full_handshakes",
        "rate_limited",
        "refused_per_client",
        "resumed",
        "upstream_connect_errors",
        "upstream_connect_timeouts",
        "upstream_unavailable",
    )

    def __init__(self) -> None:
        self.accepted = 0
        self.active = 0
        self.accept_errors = 0
        self.full_handshakes = 0
        self.rate_limited = 0  # times accepting paused for limits.max_handshakes_per_second
        self.refused_per_client = 0  # closed at accept: limits.max_handshakes_per_client
        self.resumed = 0
        self.upstream_connect_errors = 0
        self.upstream_connect_timeouts = 0
        self.upstream_unavailable = 0
        self.bytes_c2u = 0
        self.bytes_u2c = 0
        self.closed_by: dict[str, int] = {}

    def count_close(self, reason: str) -> None:
        self.closed_by[reason] = self.closed_by.get(reason, 0) + 1

    def snapshot(self) -> dict[str, object]:
        out: dict[str, object] = {name: getattr(self, name) for name in self.__slots__}
        out["closed_by"] = dict(self.closed_by)
        out["handshakes"] = self.full_handshakes + self.resumed
        return out
