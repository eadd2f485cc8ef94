"""Telemetry: OpenTelemetry traces and metrics from each worker, the facts of each recorded
connection, and the metric vocabulary the supervisor's Prometheus endpoint shares
(docs/observability.md says what a user gets; this says how).

Rules (ARCHITECTURE §4 hot-path rules, §5):

* Sampling is decided at accept, in ``Recorder.begin``: one call to the ``random`` module and
  a comparison. A connection that is neither sampled for tracing nor access-logged gets no
  object at all (the data path then skips every hook). No OpenTelemetry object exists for
  a connection until it closes.
* A recorded connection keeps plain facts in a ``ConnRecord`` (loop times, TLS facts, byte
  counts). Its spans are built once, when it closes, with explicit start and end times: the
  loop's monotonic times converted to epoch nanoseconds.
* OpenTelemetry (the SDK and gRPC) is imported and started only in a worker, after the fork
  (``WorkerTelemetry.start``): the batch span processor and gRPC are not fork-safe. The
  supervisor, which forks, never starts either: what it knows (reloads, restarts, ticket
  keys) reaches OTLP through a small shared-memory ``Board`` that worker 0 reports.
* Metrics are read from the worker's ``Stats`` by observable instruments when the periodic
  reader collects (every ``export_interval``): the data path records nothing for them. The
  latency histograms are fixed buckets kept in ``Stats``; the exporter adds them to each
  export as OTLP explicit-bucket histograms.
* Telemetry never blocks or breaks the data path: exports run on the SDK's threads; at most
  ``MAX_QUEUED_SPANS`` spans wait for export, spans beyond that are not built and are counted
  (``Stats.spans_dropped``), spans whose export failed are counted (``Stats.spans_failed``);
  each hook swallows its own errors; an export attempt is bounded by ``export_timeout``.

Nothing at module level imports OpenTelemetry: this module is also imported by the config
loader, the supervisor and ``workers.stats``.
"""

from __future__ import annotations

import ctypes
import inspect
import logging
import math
import mmap
import os
import socket
import ssl
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from random import getrandbits, random
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol
from urllib.parse import urlsplit

from edgeterm import __version__, openssl
from edgeterm.accesslog import AccessLog
from edgeterm.config import TelemetryConfig

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics import MeterProvider

log = logging.getLogger("edgeterm.telemetry")

# Upper bounds (seconds, inclusive) of the latency histogram buckets; a last bucket is +Inf.
LATENCY_BOUNDS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
MAX_QUEUED_SPANS: Final = 2048  # spans built and not yet exported (about 2 KiB each)
MAX_EXPORT_BATCH: Final = 512
SHUTDOWN_TIMEOUT: Final = 1.0  # seconds a stopping worker gives its last exports
TICK: Final = 1.0  # seconds between access log flushes and export health checks

# How a failed handshake is classified (span attribute error.type, metric reason).
HANDSHAKE_FAILURE_KINDS: Final = (
    "timeout",
    "alert",
    "protocol_error",
    "eof",
    "unknown_sni",
    "error",
)


# --- the OTLP endpoint ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OtlpTarget:
    protocol: Literal["grpc", "http"]
    traces: str  # grpc: "http(s)://host:port"; http: the traces URL
    metrics: str  # grpc: the same; http: the metrics URL
    insecure: bool  # grpc over plaintext (http://)


_SIGNAL_PATHS: Final = ("/v1/traces", "/v1/metrics")
OTLP_HTTP_PORT: Final = 4318
OTLP_GRPC_PORT: Final = 4317


def parse_otlp_endpoint(text: str) -> OtlpTarget:
    """The exporter for ``telemetry.otlp_endpoint`` (raises ValueError saying what is wrong).

    The rule: the scheme is ``http`` (plaintext) or ``https`` (TLS). OTLP/HTTP with protobuf
    when the path ends in ``/v1/traces`` or ``/v1/metrics`` (each signal goes to its own path
    under the same prefix), or when the port is 4318 (the OTLP/HTTP port; the path, if any,
    is the prefix). Otherwise OTLP/gRPC to host:port (default port 4317), with no path.
    """
    if any(c.isspace() or not c.isprintable() for c in text):
        raise ValueError("the endpoint URL cannot contain spaces or control characters")
    try:
        url = urlsplit(text)
        port = url.port
    except ValueError as exc:
        raise ValueError(f"not a valid URL: {exc}") from None
    if url.scheme not in ("http", "https"):
        raise ValueError('expected a URL starting with "http://" or "https://"')
    if not url.hostname:
        raise ValueError("the endpoint URL has no host")
    if url.username is not None or url.password is not None:
        raise ValueError("put credentials in telemetry.headers, not in the URL")
    if url.query or url.fragment:
        raise ValueError("the endpoint URL cannot have a query or a fragment")
    path = url.path.rstrip("/")
    origin = f"{url.scheme}://{url.netloc}"
    for suffix in _SIGNAL_PATHS:
        if path.endswith(suffix):
            prefix = path[: -len(suffix)]
            return OtlpTarget(
                "http", f"{origin}{prefix}/v1/traces", f"{origin}{prefix}/v1/metrics", False
            )
    if port == OTLP_HTTP_PORT:
        return OtlpTarget("http", f"{origin}{path}/v1/traces", f"{origin}{path}/v1/metrics", False)
    if path:
        raise ValueError(
            "a gRPC endpoint has no path; for OTLP/HTTP end the path with /v1/traces "
            f"or use port {OTLP_HTTP_PORT}"
        )
    host = f"[{url.hostname}]" if ":" in url.hostname else url.hostname
    target = f"{url.scheme}://{host}:{port or OTLP_GRPC_PORT}"
    return OtlpTarget("grpc", target, target, url.scheme == "http")


def export_timeout(config: TelemetryConfig) -> float:
    """Seconds one export attempt may take (retries included): the export interval, 1..10 s."""
    return min(10.0, max(1.0, config.export_interval))


# --- the metric vocabulary (OTLP names, Prometheus names) -------------------------------------

MetricKind = Literal["counter", "updown", "gauge", "histogram"]
Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class MetricDef:
    name: str  # OpenTelemetry
    prom: str  # Prometheus (counters get "_total")
    kind: MetricKind
    unit: str
    help: str


def _metric(name: str, kind: MetricKind, unit: str, help: str) -> MetricDef:
    """The Prometheus name is the OpenTelemetry one with "_" for ".", plus "_seconds" for a
    time (and "_total" for a counter, added when rendering)."""
    return MetricDef(
        name, name.replace(".", "_") + ("_seconds" if unit == "s" else ""), kind, unit, help
    )


ACCEPTED = _metric(
    "edgeterm.connections.accepted", "counter", "{connection}", "Client connections accepted."
)
ACTIVE = _metric(
    "edgeterm.connections.active", "updown", "{connection}", "Client connections open now."
)
CLOSED = _metric(
    "edgeterm.connections.closed",
    "counter",
    "{connection}",
    "Client connections closed, by reason.",
)
HANDSHAKES = _metric(
    "edgeterm.tls.handshakes",
    "counter",
    "{handshake}",
    "TLS handshakes completed, by kind (full or resumed).",
)
HANDSHAKE_FAILURES = _metric(
    "edgeterm.tls.handshake.failures",
    "counter",
    "{handshake}",
    "TLS handshakes failed, by reason: timeout, alert, protocol_error, eof, unknown_sni, error.",
)
HANDSHAKE_DURATION = _metric(
    "edgeterm.tls.handshake.duration",
    "histogram",
    "s",
    "Time from the start of the TLS handshake (after any PROXY header) to its completion.",
)
BYTES = _metric(
    "edgeterm.bytes",
    "counter",
    "By",
    "Bytes forwarded, by direction, counted when the connection closes.",
)
CONNECT_FAILURES = _metric(
    "edgeterm.upstream.connect.failures",
    "counter",
    "{attempt}",
    "Upstream connect attempts that failed, by reason (error, timeout).",
)
UPSTREAM_UNAVAILABLE = _metric(
    "edgeterm.upstream.unavailable",
    "counter",
    "{connection}",
    "Client connections closed because no upstream server could be reached.",
)
CONNECT_DURATION = _metric(
    "edgeterm.upstream.connect.duration", "histogram", "s", "Time to connect to an upstream server."
)
ACCEPT_ERRORS = _metric(
    "edgeterm.accept.errors",
    "counter",
    "{error}",
    "accept() failures for lack of resources (EMFILE, ENFILE, ENOBUFS, ENOMEM).",
)
RATE_LIMITED = _metric(
    "edgeterm.limits.handshake_rate.pauses",
    "counter",
    "{pause}",
    "Times accepting paused for limits.max_handshakes_per_second.",
)
REFUSED_PER_CLIENT = _metric(
    "edgeterm.limits.per_client.refused",
    "counter",
    "{connection}",
    "Connections closed at accept for limits.max_handshakes_per_client.",
)
SPANS = _metric(
    "edgeterm.telemetry.spans",
    "counter",
    "{span}",
    "Spans by outcome: exported, dropped (export queue full), failed (export error).",
)
ACCESS_LOG_DROPPED = _metric(
    "edgeterm.telemetry.access_log.dropped",
    "counter",
    "{line}",
    "Access log lines dropped because the output could not keep up.",
)
METRIC_EXPORTS_FAILED = _metric(
    "edgeterm.telemetry.metric_exports.failed",
    "counter",
    "{export}",
    "Metric exports to the OTLP collector that failed.",
)
# the supervisor's
TICKET_ROTATIONS = _metric(
    "edgeterm.tickets.rotations",
    "counter",
    "{rotation}",
    "Ticket key changes: rotations, and key files loaded.",
)
TICKET_KEY_AGE = _metric(
    "edgeterm.tickets.key_age", "gauge", "s", "Age of the ticket key that encrypts new tickets."
)
WORKER_RESTARTS = _metric(
    "edgeterm.workers.restarts", "counter", "{restart}", "Workers that died and were replaced."
)
RELOADS = _metric("edgeterm.reloads", "counter", "{reload}", "Reloads, by result (ok, failed).")
WORKERS = _metric(
    "edgeterm.workers", "updown", "{worker}", "Worker processes running (every generation)."
)

WORKER_METRICS: Final = (
    ACCEPTED,
    ACTIVE,
    CLOSED,
    HANDSHAKES,
    HANDSHAKE_FAILURES,
    BYTES,
    CONNECT_FAILURES,
    UPSTREAM_UNAVAILABLE,
    ACCEPT_ERRORS,
    RATE_LIMITED,
    REFUSED_PER_CLIENT,
    SPANS,
    ACCESS_LOG_DROPPED,
    METRIC_EXPORTS_FAILED,
)
WORKER_HISTOGRAMS: Final = (
    (HANDSHAKE_DURATION, "handshake_latency"),
    (CONNECT_DURATION, "connect_latency"),
)
SUPERVISOR_METRICS: Final = (TICKET_ROTATIONS, TICKET_KEY_AGE, WORKER_RESTARTS, RELOADS, WORKERS)

Point = tuple[MetricDef, Labels, float]


def _num(snap: Mapping[str, Any], key: str) -> float:
    value = snap.get(key, 0)
    return float(value) if isinstance(value, int | float) else 0.0


def _counts(snap: Mapping[str, Any], key: str) -> dict[str, float]:
    value = snap.get(key)
    if not isinstance(value, Mapping):
        return {}
    return {str(k): float(v) for k, v in value.items() if isinstance(v, int | float)}


def worker_points(snap: Mapping[str, Any]) -> list[Point]:
    """The counters and gauges in a worker's stats snapshot (or a sum of snapshots)."""
    closed = _counts(snap, "closed_by")
    errors = _counts(snap, "handshake_errors")
    failures = {kind: errors.get(kind, 0.0) for kind in HANDSHAKE_FAILURE_KINDS}
    failures["timeout"] = closed.get("handshake_timeout", 0.0)
    failures["unknown_sni"] = closed.get("unknown_sni", 0.0)  # tls.strict_sni
    # "error": failed handshakes the data path did not classify
    unclassified = closed.get("handshake_failed", 0.0) - sum(errors.values())
    failures["error"] = errors.get("error", 0.0) + max(0.0, unclassified)
    return [
        (ACCEPTED, (), _num(snap, "accepted")),
        (ACTIVE, (), _num(snap, "active")),
        *((CLOSED, (("reason", r),), v) for r, v in sorted(closed.items())),
        (HANDSHAKES, (("kind", "full"),), _num(snap, "full_handshakes")),
        (HANDSHAKES, (("kind", "resumed"),), _num(snap, "resumed")),
        *((HANDSHAKE_FAILURES, (("reason", k),), v) for k, v in failures.items()),
        (BYTES, (("direction", "client_to_upstream"),), _num(snap, "bytes_c2u")),
        (BYTES, (("direction", "upstream_to_client"),), _num(snap, "bytes_u2c")),
        (CONNECT_FAILURES, (("reason", "error"),), _num(snap, "upstream_connect_errors")),
        (CONNECT_FAILURES, (("reason", "timeout"),), _num(snap, "upstream_connect_timeouts")),
        (UPSTREAM_UNAVAILABLE, (), _num(snap, "upstream_unavailable")),
        (ACCEPT_ERRORS, (), _num(snap, "accept_errors")),
        (RATE_LIMITED, (), _num(snap, "rate_limited")),
        (REFUSED_PER_CLIENT, (), _num(snap, "refused_per_client")),
        (SPANS, (("outcome", "exported"),), _num(snap, "spans_exported")),
        (SPANS, (("outcome", "dropped"),), _num(snap, "spans_dropped")),
        (SPANS, (("outcome", "failed"),), _num(snap, "spans_failed")),
        (ACCESS_LOG_DROPPED, (), _num(snap, "access_log_dropped")),
        (METRIC_EXPORTS_FAILED, (), _num(snap, "metric_exports_failed")),
    ]


def histogram_of(snap: Mapping[str, Any], key: str) -> tuple[list[int], float]:
    """(bucket counts, sum) of one latency histogram in a snapshot; zeros when absent."""
    raw = snap.get(key)
    buckets = [0] * (len(LATENCY_BOUNDS) + 1)
    if isinstance(raw, list) and len(raw) == len(buckets):
        buckets = [int(v) for v in raw]
    return buckets, _num(snap, f"{key}_sum")


@dataclass(frozen=True, slots=True)
class SupervisorFacts:
    """What the supervisor knows, for metrics (``workers``: pid -> latest stats snapshot; the
    workers' own copy, read from the board, has only the count in ``running``)."""

    workers: Mapping[int, Mapping[str, Any]] = field(default_factory=dict)
    running: int = 0
    restarts: int = 0
    reloads_ok: int = 0
    reloads_failed: int = 0
    ticket_rotations: int = 0
    key_since: float | None = None  # time.monotonic() when the current ticket key took over


def supervisor_points(facts: SupervisorFacts, now: float) -> list[Point]:
    points: list[Point] = [
        (WORKER_RESTARTS, (), float(facts.restarts)),
        (RELOADS, (("result", "ok"),), float(facts.reloads_ok)),
        (RELOADS, (("result", "failed"),), float(facts.reloads_failed)),
        (WORKERS, (), float(facts.running)),
    ]
    if facts.key_since is not None:
        points.append((TICKET_ROTATIONS, (), float(facts.ticket_rotations)))
        points.append((TICKET_KEY_AGE, (), max(0.0, now - facts.key_since)))
    return points


# --- the board: supervisor facts shared with the workers -----------------------------------


class Board:
    """A page of shared memory the supervisor writes its figures to (once a second) and its
    workers read when they export metrics over OTLP. Created before the first fork; children
    inherit the mapping (``MAP_SHARED``). No locks: each field is an aligned 8-byte word, and
    a reader seeing one field of the previous second is harmless for metrics."""

    _FORMAT: Final = struct.Struct("=QQQQQd")  # restarts, ok, failed, rotations, workers, since

    def __init__(self) -> None:
        self._map = mmap.mmap(-1, mmap.PAGESIZE)  # anonymous: MAP_SHARED
        self.publish(SupervisorFacts())

    def publish(self, facts: SupervisorFacts) -> None:
        since = math.nan if facts.key_since is None else facts.key_since
        self._FORMAT.pack_into(
            self._map,
            0,
            facts.restarts,
            facts.reloads_ok,
            facts.reloads_failed,
            facts.ticket_rotations,
            facts.running,
            since,
        )

    def read(self) -> SupervisorFacts:
        restarts, ok, failed, rotations, running, since = self._FORMAT.unpack_from(self._map, 0)
        return SupervisorFacts(
            running=running,
            restarts=restarts,
            reloads_ok=ok,
            reloads_failed=failed,
            ticket_rotations=rotations,
            key_since=None if math.isnan(since) else since,
        )


_board: Board | None = None


def create_board() -> Board:
    """The supervisor's board (call before forking workers); workers find it with ``board()``."""
    global _board
    if _board is None:
        _board = Board()
    return _board


def board() -> Board | None:
    return _board


# --- one recorded connection ----------------------------------------------------------------

_SSL_get_servername: Any = None


def server_name(so: Any) -> str | None:
    """The SNI the client sent (the stdlib has no server-side getter: ``SSL_get_servername``)."""
    global _SSL_get_servername
    if _SSL_get_servername is None:
        fn = ctypes.CDLL(openssl.libssl_path()).SSL_get_servername
        fn.restype, fn.argtypes = ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_int]
        _SSL_get_servername = fn
    name: bytes | None = _SSL_get_servername(openssl.ssl_pointer(so), 0)
    return name.decode("ascii", "replace") if name else None


def classify_handshake_error(exc: BaseException | None) -> tuple[str, str]:
    """(kind, detail) of the exception a handshake failed with; kind is one of
    ``HANDSHAKE_FAILURE_KINDS``: "alert" (the client sent a fatal alert), "protocol_error"
    (OpenSSL refused what the client sent, and sent its alert), "eof" (the client closed or
    reset the connection), "error" (anything else)."""
    reason = str(getattr(exc, "reason", None) or "")  # OpenSSL's name, e.g. HTTP_REQUEST
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLSyscallError | ssl.SSLZeroReturnError):
        return "eof", reason or type(exc).__name__
    if isinstance(exc, ssl.SSLError):
        return ("alert" if "ALERT" in reason else "protocol_error"), reason or str(exc)
    if isinstance(exc, OSError):
        return "eof", os.strerror(exc.errno) if exc.errno else type(exc).__name__
    return "error", type(exc).__name__ if exc is not None else ""


# close reasons (workers.connection.R_*) of connections whose handshake never finished;
# others (shutdown, proxy_timeout...) are their own kind
_REASON_KINDS: Final = {"handshake_timeout": "timeout", "client_error": "eof"}


class ConnRecord:
    """The facts of one recorded connection (``workers.observe.ConnTrace``). Times are the
    worker loop's monotonic clock (read once per loop round)."""

    __slots__ = (
        "alpn",
        "bytes_in",
        "bytes_out",
        "cipher",
        "client_cn",
        "client_subject",
        "failure",
        "failure_detail",
        "group",
        "owner",
        "peer",
        "reason",
        "resumed",
        "sampled",
        "sni",
        "t_accept",
        "t_close",
        "t_handshake",
        "t_upstream",
        "upstream",
        "version",
    )

    def __init__(
        self, owner: Recorder, peer: tuple[str, int] | None, now: float, sampled: bool
    ) -> None:
        self.owner = owner
        self.peer = peer
        self.sampled = sampled
        self.t_accept = now
        self.t_handshake: float | None = None
        self.t_upstream: float | None = None
        self.t_close = now
        self.version: str | None = None
        self.cipher: str | None = None
        self.alpn: str | None = None
        self.sni: str | None = None
        self.group: str | None = None
        self.resumed = False
        self.client_cn: str | None = None  # the verified client certificate's subject CN
        self.client_subject: str | None = None  # its subject DN (RFC 4514), sampled only
        self.failure: str | None = None  # one of HANDSHAKE_FAILURE_KINDS
        self.failure_detail = ""
        self.upstream: str | None = None
        self.reason = ""
        self.bytes_in = 0  # client -> upstream (plaintext)
        self.bytes_out = 0  # upstream -> client

    def handshake_done(self, so: Any, now: float) -> None:
        self.t_handshake = now
        try:
            self.version = so.version()
            cipher = so.cipher()
            self.cipher = cipher[0] if cipher else None
            self.alpn = so.selected_alpn_protocol()
            self.resumed = bool(so.session_reused)
            self.sni = server_name(so)
            self.group = openssl.negotiated_group(so)
        except Exception:
            self.owner.errors += 1

    def handshake_failed(self, reason: str, now: float, exc: BaseException | None = None) -> None:
        # Without ``exc``: called inside the data path's ``except`` clause, where the exception
        # is still the current one.
        self.t_handshake = now
        error = exc if exc is not None else sys.exc_info()[1]
        self.failure, self.failure_detail = classify_handshake_error(error)
        if reason != "handshake_failed":  # e.g. unknown_sni: the data path knows better
            self.failure = reason

    def client_address(self, peer: tuple[str, int]) -> None:
        """The client's own address, from a PROXY protocol header (the peer is the balancer)."""
        self.peer = peer

    def client_certificate(self, so: Any, cn: str | None) -> None:
        """A verified client certificate (``tls.client_auth``): its subject CN; for a sampled
        connection also the whole subject DN, decoded from the certificate (``so``: the _ssl
        object) only then."""
        self.client_cn = cn
        if self.sampled:
            try:
                self.client_subject = subject_dn(so.getpeercert(True))
            except Exception:
                self.owner.errors += 1

    def upstream_connected(self, server: str, now: float) -> None:
        self.upstream = server
        self.t_upstream = now

    def closed(self, reason: str, bytes_in: int, bytes_out: int, now: float) -> None:
        self.reason = reason
        self.bytes_in = bytes_in
        self.bytes_out = bytes_out
        self.t_close = now
        if self.t_handshake is None:  # never finished: timeout, the client left, shutdown
            self.failure = _REASON_KINDS.get(reason, reason)
            self.failure_detail = reason
        self.owner.finish(self)

    def access_fields(self, worker: int, trace_id: str | None) -> dict[str, object]:
        """The access log line's fields (docs/observability.md lists them)."""
        offset = time.time() - time.monotonic()
        hs, up = self.t_handshake, self.t_upstream
        return {
            "time": _iso(self.t_close + offset),
            "worker": worker,
            "client": _peer(self.peer),
            "client_cn": self.client_cn,
            "sni": self.sni,
            "alpn": self.alpn,
            "tls_version": self.version,
            "cipher": self.cipher,
            "resumed": self.resumed,
            "handshake_ms": None if hs is None or self.failure else _ms(hs - self.t_accept),
            "handshake_error": self.failure,
            "handshake_error_detail": self.failure_detail or None,
            "upstream": self.upstream,
            "connect_ms": None if up is None or hs is None else _ms(up - hs),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "duration_ms": _ms(self.t_close - self.t_accept),
            "reason": self.reason,
            "trace_id": trace_id,
        }


def subject_dn(der: bytes | None) -> str | None:
    """The subject of a DER certificate as an RFC 4514 string (``CN=alice,O=Example``)."""
    if not der:
        return None
    from cryptography import x509

    return x509.load_der_x509_certificate(der).subject.rfc4514_string()


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch)) + f".{int(epoch % 1 * 1000):03d}Z"


def _peer(peer: tuple[str, int] | None) -> str | None:
    if not peer:
        return None
    host, port = peer[0], peer[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Recorder:
    """The worker's ``workers.observe.Observer``: decides at accept which connections to
    record, and hands each finished record to the span builder and the access log."""

    __slots__ = ("access", "errors", "ratio", "spans", "worker_id")

    def __init__(self, worker_id: int, access: AccessLog | None) -> None:
        self.worker_id = worker_id
        self.access = access
        self.spans: SpanBuilder | None = None
        self.ratio = 0.0  # set when span export starts
        self.errors = 0  # hook failures (telemetry bugs), logged once by the tick

    def begin(self, peer: tuple[str, int] | None, now: float) -> ConnRecord | None:
        if random() < self.ratio:
            return ConnRecord(self, peer, now, True)
        if self.access is not None:
            return ConnRecord(self, peer, now, False)
        return None

    def finish(self, rec: ConnRecord) -> None:
        try:
            trace_id = None
            if rec.sampled and self.spans is not None:
                trace_id = self.spans.record(rec)
            if self.access is not None:
                self.access.write(rec.access_fields(self.worker_id, trace_id))
        except Exception:
            self.errors += 1


# --- OpenTelemetry (imported in the worker only) -------------------------------------------


class StatsLike(Protocol):
    spans_dropped: int
    spans_exported: int
    spans_failed: int
    metric_exports_failed: int
    access_log_dropped: int

    def snapshot(self) -> dict[str, object]: ...


class LoopLike(Protocol):
    def call_later(self, delay: float, fn: Callable[[], None]) -> object: ...


class WorkerLike(Protocol):
    """What telemetry reads of a ``workers.worker.Worker``."""

    @property
    def stats(self) -> StatsLike: ...

    @property
    def loop(self) -> LoopLike: ...

    @property
    def draining(self) -> bool: ...


class SpanBuilder:
    """Builds one trace per sampled connection when it closes: a SERVER span for the whole
    connection with child spans ``tls.handshake`` and ``upstream.connect``.

    The spans are made as finished ``ReadableSpan`` objects and handed straight to the batch
    processor, not through the ``Tracer`` API: the facts and times are all known at close, and
    this costs the worker about 6 us per connection instead of about 130 us (measured with
    three spans; the OTLP encoding on the export thread comes on top of either).
    """

    def __init__(self, processor: Any, resource: Any, stats: StatsLike, ratio: float) -> None:
        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        from opentelemetry.trace import SpanContext, SpanKind, TraceFlags
        from opentelemetry.trace.status import Status, StatusCode

        self._emit = processor.on_end
        self._resource = resource
        self._scope = InstrumentationScope("edgeterm", __version__)
        self._stats = stats
        self._ratio = ratio
        self.submitted = 0  # spans handed to the batch processor (this thread only)
        self._span = ReadableSpan
        self._context = SpanContext
        self._flags = TraceFlags(TraceFlags.SAMPLED)
        self._server = SpanKind.SERVER
        self._internal = SpanKind.INTERNAL
        self._status = Status
        self._unset = Status(StatusCode.UNSET)
        self._error = StatusCode.ERROR

    def pending(self) -> int:
        stats = self._stats
        return self.submitted - stats.spans_exported - stats.spans_failed

    def _emit_span(
        self,
        name: str,
        trace_id: int,
        parent: Any,
        kind: Any,
        attributes: dict[str, Any],
        start: int,
        end: int,
        status: Any,
    ) -> Any:
        context = self._context(trace_id, getrandbits(64) or 1, False, self._flags)
        span = self._span(
            name,
            context,
            parent,
            self._resource,
            attributes,
            kind=kind,
            status=status,
            start_time=start,
            end_time=end,
            instrumentation_scope=self._scope,
        )
        self._emit(span)
        return context

    def record(self, rec: ConnRecord) -> str | None:
        hs_ok = rec.t_handshake is not None and rec.failure is None
        count = 2 + hs_ok  # connection, handshake, and the upstream connect once TLS is up
        if self.pending() + count > MAX_QUEUED_SPANS:
            self._stats.spans_dropped += count
            return None
        off = time.time_ns() - time.monotonic_ns()
        t0 = int(rec.t_accept * 1e9) + off
        t_end = int(rec.t_close * 1e9) + off
        t_hs = t_end if rec.t_handshake is None else int(rec.t_handshake * 1e9) + off
        tls = self._tls_attributes(rec)
        attrs: dict[str, Any] = {
            "edgeterm.close_reason": rec.reason,
            "edgeterm.bytes.client_to_upstream": rec.bytes_in,
            "edgeterm.bytes.upstream_to_client": rec.bytes_out,
            "edgeterm.sample_ratio": self._ratio,
            **tls,
        }
        if rec.peer:
            attrs["client.address"] = rec.peer[0]
            attrs["client.port"] = rec.peer[1]
        if rec.t_handshake is not None:
            attrs["edgeterm.handshake.duration_ms"] = _ms(rec.t_handshake - rec.t_accept)
        if rec.upstream is not None:
            attrs["edgeterm.upstream.address"] = rec.upstream
            if rec.t_upstream is not None and rec.t_handshake is not None:
                attrs["edgeterm.upstream.connect_ms"] = _ms(rec.t_upstream - rec.t_handshake)
        root_status = hs_status = up_status = self._unset
        if rec.failure is not None:
            attrs["error.type"] = rec.failure
            attrs["edgeterm.handshake.error"] = rec.failure_detail
            tls["error.type"] = rec.failure
            root_status = hs_status = self._status(
                self._error, f"{rec.failure}: {rec.failure_detail}"
            )
        up_attrs: dict[str, Any] = {}
        if rec.upstream is not None:
            up_attrs["edgeterm.upstream.address"] = rec.upstream
        if hs_ok and rec.t_upstream is None:  # never connected: the close reason says why
            up_attrs["error.type"] = rec.reason
            up_status = self._status(self._error, rec.reason)
            if rec.reason == "upstream_unavailable":
                root_status = up_status
        trace_id = getrandbits(128) or 1
        root = self._emit_span(
            "edgeterm.connection", trace_id, None, self._server, attrs, t0, t_end, root_status
        )
        internal = self._internal
        self._emit_span("tls.handshake", trace_id, root, internal, tls, t0, t_hs, hs_status)
        if hs_ok:
            t_up = t_end if rec.t_upstream is None else int(rec.t_upstream * 1e9) + off
            self._emit_span(
                "upstream.connect", trace_id, root, internal, up_attrs, t_hs, t_up, up_status
            )
        self.submitted += count
        return f"{trace_id:032x}"

    @staticmethod
    def _tls_attributes(rec: ConnRecord) -> dict[str, Any]:
        attrs: dict[str, Any] = {"tls.protocol.name": "tls", "tls.resumed": rec.resumed}
        if rec.version:
            attrs["tls.protocol.version"] = rec.version.removeprefix("TLSv")
        if rec.cipher:
            attrs["tls.cipher"] = rec.cipher
        if rec.sni:
            attrs["tls.client.server_name"] = rec.sni
        if rec.alpn:
            attrs["tls.next_protocol"] = rec.alpn
        if rec.group:
            attrs["tls.curve"] = rec.group
        if rec.client_subject:
            attrs["tls.client.subject"] = rec.client_subject
        if rec.client_cn:
            attrs["edgeterm.tls.client.cn"] = rec.client_cn
        return attrs


def resource_attributes(
    config: TelemetryConfig, worker_id: int, cpu: int | None, generation: int
) -> dict[str, str | int]:
    host = socket.gethostname()
    attrs: dict[str, str | int] = {
        "service.name": config.service_name,
        "service.version": __version__,
        "service.instance.id": f"{host}/{os.getpid()}",
        "host.name": host,
        "process.pid": os.getpid(),
        "edgeterm.worker.id": worker_id,
        "edgeterm.generation": generation,
    }
    if cpu is not None:
        attrs["edgeterm.worker.cpu"] = cpu
    return attrs


class _LastError(logging.Handler):
    """Keeps the SDK's last warning (shown in our own log line) instead of printing each."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.message = ""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.message = record.getMessage().splitlines()[0][:300]
        except Exception:
            self.message = str(record.msg)[:300]


class Pipeline:
    """The OpenTelemetry SDK in one worker: a tracer provider with a bounded batch processor,
    a meter provider with observable instruments over ``Stats``, OTLP exporters for both."""

    def __init__(
        self,
        config: TelemetryConfig,
        worker: WorkerLike,
        *,
        worker_id: int,
        cpu: int | None,
        generation: int,
    ) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        self.target = parse_otlp_endpoint(config.otlp_endpoint)
        # gRPC's own logging goes to stderr; errors only, unless the operator asks for more
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
        self.last_error = _LastError()
        otel_log = logging.getLogger("opentelemetry")
        otel_log.propagate = False  # one line of ours per outage, not one per failed export
        otel_log.handlers[:] = [self.last_error]
        self.stats = worker.stats
        self.worker = worker
        self.worker_id = worker_id
        self.started_ns = time.time_ns()
        self._points_at = -1.0
        self._points: list[Point] = []
        self._lock = threading.Lock()
        # monotonic times of the last export that worked / failed (spans or metrics)
        self.last_ok = 0.0
        self.last_failed = 0.0
        resource = Resource.create(resource_attributes(config, worker_id, cpu, generation))
        timeout = export_timeout(config)
        interval_ms = config.export_interval * 1000.0

        self.spans_processor: Any = None  # a BatchSpanProcessor (whose methods are untyped)
        self.spans: SpanBuilder | None = None
        if config.sample_ratio > 0:
            self.spans_processor = BatchSpanProcessor(
                self._span_exporter(config, timeout),  # type: ignore[arg-type]
                max_queue_size=MAX_QUEUED_SPANS + MAX_EXPORT_BATCH,
                schedule_delay_millis=interval_ms,
                max_export_batch_size=MAX_EXPORT_BATCH,
                export_timeout_millis=timeout * 1000.0,
            )
            self.spans = SpanBuilder(
                self.spans_processor, resource, self.stats, config.sample_ratio
            )
        self.meter_provider = self._meter_provider(config, resource, timeout, interval_ms)

    # -- traces ------------------------------------------------------------------------
    def _span_exporter(self, config: TelemetryConfig, timeout: float) -> _CountingSpanExporter:
        headers = dict(config.headers)
        inner: Any
        if self.target.protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            inner = OTLPSpanExporter(
                endpoint=self.target.traces,
                insecure=self.target.insecure,
                headers=headers,
                timeout=timeout,
            )
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                OTLPSpanExporter as HttpSpanExporter,
            )

            inner = HttpSpanExporter(endpoint=self.target.traces, headers=headers, timeout=timeout)
        return _CountingSpanExporter(inner, self)

    # -- metrics -----------------------------------------------------------------------
    def _meter_provider(
        self, config: TelemetryConfig, resource: Any, timeout: float, interval_ms: float
    ) -> MeterProvider:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        headers = dict(config.headers)
        inner: Any
        if self.target.protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
                OTLPMetricExporter,
            )

            inner = OTLPMetricExporter(
                endpoint=self.target.metrics,
                insecure=self.target.insecure,
                headers=headers,
                timeout=timeout,
            )
        else:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                OTLPMetricExporter as HttpMetricExporter,
            )

            inner = HttpMetricExporter(
                endpoint=self.target.metrics, headers=headers, timeout=timeout
            )
        reader = PeriodicExportingMetricReader(
            _histogram_exporter(inner, self),
            export_interval_millis=interval_ms,
            export_timeout_millis=timeout * 1000.0,
        )
        provider = MeterProvider(resource=resource, metric_readers=[reader])
        meter = provider.get_meter("edgeterm", __version__)
        for metric in (*WORKER_METRICS, *SUPERVISOR_METRICS):
            callbacks = [self._callback(metric)]
            if metric.kind == "counter":
                meter.create_observable_counter(
                    metric.name, callbacks, unit=metric.unit, description=metric.help
                )
            elif metric.kind == "updown":
                meter.create_observable_up_down_counter(
                    metric.name, callbacks, unit=metric.unit, description=metric.help
                )
            else:
                meter.create_observable_gauge(
                    metric.name, callbacks, unit=metric.unit, description=metric.help
                )
        return provider

    def _collect(self) -> list[Point]:
        """This worker's points, read once per collection (the callbacks run one after the
        other on the reader's thread)."""
        with self._lock:
            now = time.monotonic()
            if now - self._points_at > 0.5:
                points = worker_points(self.stats.snapshot())
                shared = board()
                if shared is not None and self.worker_id == 0 and not self.worker.draining:
                    points += supervisor_points(shared.read(), now)
                self._points = points
                self._points_at = now
            return self._points

    def _callback(self, metric: MetricDef) -> Callable[[Any], Iterable[Any]]:
        from opentelemetry.metrics import Observation

        def observe(_options: Any) -> Iterable[Any]:
            return [Observation(v, dict(labels)) for m, labels, v in self._collect() if m is metric]

        return observe

    def histograms(self) -> list[Any]:
        """The latency histograms as SDK metric data (cumulative since the worker started)."""
        from opentelemetry.sdk.metrics.export import (
            AggregationTemporality,
            Histogram,
            HistogramDataPoint,
            Metric,
        )

        snap = self.stats.snapshot()
        now_ns = time.time_ns()
        out = []
        for metric, key in WORKER_HISTOGRAMS:
            buckets, total = histogram_of(snap, key)
            point = HistogramDataPoint(
                attributes={},
                start_time_unix_nano=self.started_ns,
                time_unix_nano=now_ns,
                count=sum(buckets),
                sum=total,
                bucket_counts=buckets,
                explicit_bounds=LATENCY_BOUNDS,
                min=None,  # type: ignore[arg-type]  # not tracked: left out of the OTLP point
                max=None,  # type: ignore[arg-type]
            )
            data = Histogram([point], AggregationTemporality.CUMULATIVE)
            out.append(Metric(metric.name, metric.help, metric.unit, data))
        return out

    # -- stopping ----------------------------------------------------------------------
    def shutdown(self) -> None:
        """Export what is left, then stop the SDK threads (the caller bounds the time)."""
        if self.spans_processor is not None:
            self.spans_processor.shutdown()
        self.meter_provider.shutdown(timeout_millis=SHUTDOWN_TIMEOUT * 1000.0)


class _CountingSpanExporter:
    """Wraps the OTLP span exporter: counts exported and failed spans into ``Stats`` (from
    the batch processor's thread, the only writer of those two counters)."""

    def __init__(self, inner: Any, pipeline: Pipeline) -> None:
        self._inner = inner
        self._pipeline = pipeline

    def export(self, spans: Any) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        stats = self._pipeline.stats
        try:
            result = self._inner.export(spans)
        except Exception:
            result = SpanExportResult.FAILURE
        if result == SpanExportResult.SUCCESS:
            stats.spans_exported += len(spans)
            self._pipeline.last_ok = time.monotonic()
        else:
            stats.spans_failed += len(spans)
            self._pipeline.last_failed = time.monotonic()
        return result

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        _shutdown(self._inner, timeout_millis)

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


def _shutdown(exporter: Any, timeout_millis: float) -> None:
    """Not every exporter's ``shutdown`` takes a timeout (the OTLP/HTTP ones do not)."""
    if "timeout_millis" in inspect.signature(exporter.shutdown).parameters:
        exporter.shutdown(timeout_millis=timeout_millis)
    else:
        exporter.shutdown()


def _histogram_exporter(inner: Any, pipeline: Pipeline) -> Any:
    """A metric exporter that adds the precomputed latency histograms to every export (the
    SDK has no asynchronous histogram) and counts failed exports."""
    from opentelemetry.sdk.metrics.export import (
        MetricExporter,
        MetricExportResult,
        MetricsData,
        ResourceMetrics,
        ScopeMetrics,
    )
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    class HistogramExporter(MetricExporter):
        def __init__(self) -> None:
            super().__init__(
                preferred_temporality=inner._preferred_temporality,
                preferred_aggregation=inner._preferred_aggregation,
            )

        def export(
            self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
        ) -> MetricExportResult:
            try:
                metrics_data = self._with_histograms(metrics_data)
                result: MetricExportResult = inner.export(
                    metrics_data, timeout_millis=timeout_millis
                )
            except Exception:
                result = MetricExportResult.FAILURE
            if result == MetricExportResult.SUCCESS:
                pipeline.last_ok = time.monotonic()
            else:
                pipeline.stats.metric_exports_failed += 1
                pipeline.last_failed = time.monotonic()
            return result

        @staticmethod
        def _with_histograms(data: MetricsData) -> MetricsData:
            extra = pipeline.histograms()
            if not data.resource_metrics:
                return data
            first, *rest = data.resource_metrics
            scopes = list(first.scope_metrics)
            for i, sm in enumerate(scopes):
                if sm.scope.name == "edgeterm":
                    scopes[i] = ScopeMetrics(sm.scope, [*sm.metrics, *extra], sm.schema_url)
                    break
            else:
                scope = InstrumentationScope("edgeterm", __version__)
                scopes.append(ScopeMetrics(scope, extra, ""))
            return MetricsData([ResourceMetrics(first.resource, scopes, first.schema_url), *rest])

        def force_flush(self, timeout_millis: float = 10_000) -> bool:
            return bool(inner.force_flush(timeout_millis=timeout_millis))

        def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
            _shutdown(inner, timeout_millis)

    return HistogramExporter()


# --- a worker's telemetry ---------------------------------------------------------------------


class WorkerTelemetry:
    """Everything one worker runs for telemetry. Create it before dropping privileges (it
    opens the access log file), pass ``observer`` to the Worker, then ``start(worker)`` (in
    the worker process: starts OpenTelemetry), ``reopen()`` on SIGUSR1, ``shutdown()`` at exit.
    """

    def __init__(
        self, config: TelemetryConfig, *, worker_id: int, cpu: int | None, generation: int
    ) -> None:
        self.config = config
        self.worker_id = worker_id
        self.cpu = cpu
        self.generation = generation
        self.access = AccessLog(config.access_log_file) if config.access_log else None
        tracing = bool(config.otlp_endpoint) and config.sample_ratio > 0
        self.recorder = Recorder(worker_id, self.access) if tracing or self.access else None
        self.pipeline: Pipeline | None = None
        self._worker: WorkerLike | None = None
        self._failing = False
        self._errors_logged = 0
        self._lost_when_ok = 0  # spans dropped or failed as of the last healthy tick

    @property
    def observer(self) -> Recorder | None:
        """The data path's ``Observer``; None when neither tracing nor the access log is on."""
        return self.recorder

    def start(self, worker: WorkerLike) -> None:
        self._worker = worker
        if self.config.otlp_endpoint:
            try:
                self.pipeline = Pipeline(
                    self.config,
                    worker,
                    worker_id=self.worker_id,
                    cpu=self.cpu,
                    generation=self.generation,
                )
            except Exception as exc:
                log.error("telemetry: cannot start OTLP export (%s); serving without it", exc)
            else:
                if self.recorder is not None and self.pipeline.spans is not None:
                    self.recorder.spans = self.pipeline.spans
                    self.recorder.ratio = self.config.sample_ratio
        if self.pipeline is not None or self.access is not None:
            worker.loop.call_later(TICK, self._tick)

    def _tick(self) -> None:
        worker = self._worker
        assert worker is not None
        try:
            self._check()
        except Exception as exc:  # never let a telemetry bug stop the loop
            log.error("telemetry: %s", exc)
        worker.loop.call_later(TICK, self._tick)

    def _check(self) -> None:
        worker = self._worker
        assert worker is not None
        stats = worker.stats
        if self.access is not None:
            self.access.flush()
            stats.access_log_dropped = self.access.dropped
        pipeline = self.pipeline
        if pipeline is not None:
            lost = stats.spans_dropped + stats.spans_failed
            failing = pipeline.last_failed > pipeline.last_ok
            if failing and not self._failing:
                self._failing = True
                log.warning(
                    "telemetry: export to %s failing (%s); dropping data until it recovers",
                    self.config.otlp_endpoint,
                    pipeline.last_error.message or "no detail",
                )
            elif not failing and self._failing:
                self._failing = False
                log.info(
                    "telemetry: export to %s recovered (%d spans lost meanwhile)",
                    self.config.otlp_endpoint,
                    lost - self._lost_when_ok,
                )
            if not failing:
                self._lost_when_ok = lost
        errors = self.recorder.errors if self.recorder is not None else 0
        if errors and not self._errors_logged:
            self._errors_logged = errors
            log.error("telemetry: a connection hook failed (%d so far); recording goes on", errors)

    def reopen(self) -> None:
        if self.access is not None:
            self.access.reopen()

    def shutdown(self, timeout: float = SHUTDOWN_TIMEOUT) -> None:
        """Flush the access log; give the last exports at most ``timeout`` seconds."""
        if self.access is not None:
            self.access.close()
        pipeline = self.pipeline
        if pipeline is None:
            return
        thread = threading.Thread(target=pipeline.shutdown, name="otel-shutdown", daemon=True)
        thread.start()
        thread.join(timeout)
