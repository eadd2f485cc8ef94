"""A worker's counters: plain integer attributes, bumped on connection events, never per read."""

from __future__ import annotations

from bisect import bisect_left

from edgeterm.telemetry import LATENCY_BOUNDS

_N_BUCKETS = len(LATENCY_BOUNDS) + 1  # the last one is +Inf


class Stats:
    __slots__ = (
        "accept_errors",
        "accepted",
        "access_log_dropped",
        "active",
        "bytes_c2u",
        "bytes_u2c",
        "closed_by",
        "connect_latency",
        "connect_latency_sum",
        "full_handshakes",
        "handshake_errors",
        "handshake_latency",
        "handshake_latency_sum",
        "metric_exports_failed",
        "rate_limited",
        "refused_per_client",
        "resumed",
        "spans_dropped",
        "spans_exported",
        "spans_failed",
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
        # telemetry (issue 6): latency histograms, bucket i counting values <= LATENCY_BOUNDS[i]
        # (seconds), handshake errors by kind, and what telemetry itself dropped
        self.handshake_latency = [0] * _N_BUCKETS
        self.handshake_latency_sum = 0.0
        self.connect_latency = [0] * _N_BUCKETS
        self.connect_latency_sum = 0.0
        self.handshake_errors: dict[str, int] = {}  # edgeterm.telemetry.classify_handshake_error
        self.spans_dropped = 0  # worker thread: the export queue was full
        self.spans_exported = 0  # export thread only
        self.spans_failed = 0  # export thread only: the collector refused or was unreachable
        self.metric_exports_failed = 0  # metric reader thread only
        self.access_log_dropped = 0  # lines: the access log's buffer was full

    def observe_handshake(self, seconds: float) -> None:
        """A handshake that completed, ``seconds`` after it started."""
        self.handshake_latency[bisect_left(LATENCY_BOUNDS, seconds)] += 1
        self.handshake_latency_sum += seconds

    def observe_connect(self, seconds: float) -> None:
        """An upstream connect that succeeded after ``seconds``."""
        self.connect_latency[bisect_left(LATENCY_BOUNDS, seconds)] += 1
        self.connect_latency_sum += seconds

    def count_handshake_error(self, kind: str) -> None:
        self.handshake_errors[kind] = self.handshake_errors.get(kind, 0) + 1

    def count_close(self, reason: str) -> None:
        self.closed_by[reason] = self.closed_by.get(reason, 0) + 1

    def snapshot(self) -> dict[str, object]:
        out: dict[str, object] = {name: getattr(self, name) for name in self.__slots__}
        out["closed_by"] = dict(self.closed_by)
        out["handshake_errors"] = dict(self.handshake_errors)
        out["handshake_latency"] = list(self.handshake_latency)
        out["connect_latency"] = list(self.connect_latency)
        out["handshakes"] = self.full_handshakes + self.resumed
        return out
