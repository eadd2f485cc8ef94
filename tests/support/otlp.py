"""Telemetry receivers for the tests: a real OTLP collector and a strict Prometheus parser.

- ``OtlpReceiver``: an OTLP/gRPC server (TraceService and MetricsService from
  ``opentelemetry-proto``, served by ``grpcio``) in this process, keeping every request and
  the metadata (headers) each came with (``metadata()``).
  ``stop()`` then ``start()`` again on the same port plays "collector down, then back".
- ``OtlpHttpReceiver``: the same for OTLP/HTTP with protobuf bodies (``/v1/traces``,
  ``/v1/metrics``), on ``http.server``.
- ``parse_prometheus``: the text format 0.0.4, strictly: every sample belongs to a family
  declared by ``# TYPE``, names and labels are well formed, values are numbers, no sample
  repeats, histogram buckets are cumulative and end with ``le="+Inf"`` equal to ``_count``.

For benchmarks, a collector that only counts what it receives (nothing kept):
``python -m tests.support.otlp --port 4317``.
"""

from __future__ import annotations

import math
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from .waiting import WaitTimeout, wait_until

HOST = "127.0.0.1"


def any_value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return attributes(v.kvlist_value.values)
    return getattr(v, kind)


def attributes(kvs: Iterable[KeyValue]) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in kvs}


@dataclass
class Span:
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str  # "" for a root span
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    status_code: int  # 0 unset, 1 ok, 2 error
    status_message: str
    resource: dict[str, Any]


@dataclass
class MetricPoint:
    name: str
    kind: str  # "sum", "gauge", "histogram"
    attributes: dict[str, Any]
    value: float | None  # sums and gauges
    bucket_counts: list[int] = field(default_factory=list)  # histograms
    explicit_bounds: list[float] = field(default_factory=list)
    count: int = 0
    sum: float = 0.0
    monotonic: bool = False
    resource: dict[str, Any] = field(default_factory=dict)
    received_at: float = 0.0


class _Store:
    def __init__(self, keep: bool = True) -> None:
        self.keep = keep  # False: count spans, keep nothing (benchmarks)
        self.span_count = 0
        self.lock = threading.Lock()
        self.spans: list[Span] = []
        self.metrics: list[MetricPoint] = []
        self.trace_requests = 0
        self.metric_requests = 0
        # (signal, headers) of every request: gRPC metadata / HTTP headers, names lowercased
        self.request_metadata: list[tuple[str, dict[str, str]]] = []

    def add_metadata(self, signal: str, pairs: Iterable[tuple[str, Any]]) -> None:
        headers = {str(k).lower(): v if isinstance(v, str) else repr(v) for k, v in pairs}
        with self.lock:
            self.request_metadata.append((signal, headers))

    def add_traces(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        if not self.keep:
            n = sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
            with self.lock:
                self.span_count += n
                self.trace_requests += 1
            return
        out = []
        for rs in request.resource_spans:
            resource = attributes(rs.resource.attributes)
            for ss in rs.scope_spans:
                for s in ss.spans:
                    out.append(
                        Span(
                            name=s.name,
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_span_id=s.parent_span_id.hex(),
                            kind=s.kind,
                            start_ns=s.start_time_unix_nano,
                            end_ns=s.end_time_unix_nano,
                            attributes=attributes(s.attributes),
                            status_code=s.status.code,
                            status_message=s.status.message,
                            resource=resource,
                        )
                    )
        with self.lock:
            self.spans.extend(out)
            self.span_count += len(out)
            self.trace_requests += 1

    def add_metrics(self, request: metrics_service_pb2.ExportMetricsServiceRequest) -> None:
        if not self.keep:
            with self.lock:
                self.metric_requests += 1
            return
        now = time.monotonic()
        out = []
        for rm in request.resource_metrics:
            resource = attributes(rm.resource.attributes)
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    kind = m.WhichOneof("data")
                    if kind in ("sum", "gauge"):
                        data = getattr(m, kind)
                        for p in data.data_points:
                            value = p.as_int if p.WhichOneof("value") == "as_int" else p.as_double
                            out.append(
                                MetricPoint(
                                    m.name,
                                    kind,
                                    attributes(p.attributes),
                                    float(value),
                                    monotonic=kind == "sum" and data.is_monotonic,
                                    resource=resource,
                                    received_at=now,
                                )
                            )
                    elif kind == "histogram":
                        for p in m.histogram.data_points:
                            out.append(
                                MetricPoint(
                                    m.name,
                                    kind,
                                    attributes(p.attributes),
                                    None,
                                    bucket_counts=list(p.bucket_counts),
                                    explicit_bounds=list(p.explicit_bounds),
                                    count=p.count,
                                    sum=p.sum,
                                    resource=resource,
                                    received_at=now,
                                )
                            )
        with self.lock:
            self.metrics.extend(out)
            self.metric_requests += 1


class _Receiver:
    """What both receivers offer the tests."""

    store: _Store

    def spans(self) -> list[Span]:
        with self.store.lock:
            return list(self.store.spans)

    def roots(self) -> list[Span]:
        return [s for s in self.spans() if not s.parent_span_id]

    def children(self, root: Span) -> list[Span]:
        return [
            s
            for s in self.spans()
            if s.trace_id == root.trace_id and s.parent_span_id == root.span_id
        ]

    def wait_roots(
        self, predicate: Callable[[list[Span]], bool], *, timeout: float = 15.0, what: str = ""
    ) -> list[Span]:
        def check() -> list[Span] | None:
            roots = self.roots()
            return roots if predicate(roots) else None

        try:
            result = wait_until(check, timeout=timeout, interval=0.05, what=what or "spans")
        except WaitTimeout as exc:
            raise WaitTimeout(f"{exc}; received {len(self.spans())} spans") from None
        assert result is not None
        return result

    def metadata(self, signal: str | None = None) -> list[dict[str, str]]:
        """The headers of every request received (of ``signal``: "traces" or "metrics")."""
        with self.store.lock:
            return [h for s, h in self.store.request_metadata if signal in (None, s)]

    def metric_points(self, name: str) -> list[MetricPoint]:
        with self.store.lock:
            return [m for m in self.store.metrics if m.name == name]

    def latest(
        self, name: str, *, resource: dict[str, Any] | None = None, **labels: Any
    ) -> MetricPoint | None:
        """The last point received of metric ``name`` with these point attributes (and these
        resource attributes)."""
        for point in reversed(self.metric_points(name)):
            if all(point.attributes.get(k) == v for k, v in labels.items()) and all(
                point.resource.get(k) == v for k, v in (resource or {}).items()
            ):
                return point
        return None

    def wait_metric(
        self,
        name: str,
        predicate: Callable[[MetricPoint], bool],
        *,
        timeout: float = 15.0,
        resource: dict[str, Any] | None = None,
        **labels: Any,
    ) -> MetricPoint:
        def check() -> MetricPoint | None:
            point = self.latest(name, resource=resource, **labels)
            return point if point is not None and predicate(point) else None

        try:
            result = wait_until(check, timeout=timeout, interval=0.05, what=f"metric {name}")
        except WaitTimeout as exc:
            raise WaitTimeout(f"{exc}; last: {self.latest(name, **labels)}") from None
        assert result is not None
        return result


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, store: _Store) -> None:
        self.store = store

    def Export(self, request: Any, context: Any) -> Any:
        self.store.add_metadata("traces", context.invocation_metadata())
        self.store.add_traces(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class _MetricsService(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, store: _Store) -> None:
        self.store = store

    def Export(self, request: Any, context: Any) -> Any:
        self.store.add_metadata("metrics", context.invocation_metadata())
        self.store.add_metrics(request)
        return metrics_service_pb2.ExportMetricsServiceResponse()


class OtlpReceiver(_Receiver):
    """An OTLP/gRPC collector on 127.0.0.1 (``port=0``: a free port, kept across restarts).

    ``down()`` holds the port without listening (connections are refused, and nobody else can
    bind it meanwhile); ``start()`` serves on it. No SO_REUSEPORT: a port taken by someone
    else is an error, not traffic shared with them."""

    def __init__(self, port: int = 0, *, keep: bool = True) -> None:
        self.store = _Store(keep)
        self.port = port
        self._server: grpc.Server | None = None
        self._holder: socket.socket | None = None

    def down(self) -> OtlpReceiver:
        holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        holder.bind((HOST, self.port))
        self.port = holder.getsockname()[1]
        self._holder = holder
        return self

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> OtlpReceiver:
        if self._holder is not None:
            self._holder.close()
            self._holder = None
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=4), options=[("grpc.so_reuseport", 0)]
        )
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self.store), server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(
            _MetricsService(self.store), server
        )
        port = server.add_insecure_port(f"{HOST}:{self.port}")
        if port == 0:
            raise OSError(f"cannot bind the OTLP receiver on {HOST}:{self.port}")
        self.port = port
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait(5)
            self._server = None


class OtlpHttpReceiver(_Receiver):
    """An OTLP/HTTP (protobuf) collector on 127.0.0.1: POST /v1/traces and /v1/metrics."""

    def __init__(self) -> None:
        self.store = _Store()
        store = self.store

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                signal = self.path.rpartition("/")[2]
                store.add_metadata(signal, self.headers.items())
                if self.path == "/v1/traces":
                    req = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
                    store.add_traces(req)
                    answer = trace_service_pb2.ExportTraceServiceResponse()
                elif self.path == "/v1/metrics":
                    req2 = metrics_service_pb2.ExportMetricsServiceRequest.FromString(body)
                    store.add_metrics(req2)
                    answer = metrics_service_pb2.ExportMetricsServiceResponse()
                else:
                    self.send_error(404)
                    return
                data = answer.SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer((HOST, 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}/v1/traces"

    def start(self) -> OtlpHttpReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


# --- Prometheus text format ------------------------------------------------------------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE_RE = re.compile(rf"^(?P<name>{_NAME})(?:\{{(?P<labels>.*)\}})? (?P<value>\S+)$")
_LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(,|$)')
_TYPES = ("counter", "gauge", "histogram", "summary", "untyped")


class PrometheusFormatError(AssertionError):
    pass


@dataclass
class Family:
    name: str
    type: str
    help: str
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = field(default_factory=dict)

    def value(self, suffix: str = "", **labels: str) -> float:
        key = (self.name + suffix, tuple(sorted(labels.items())))
        return self.samples[key]

    def total(self, suffix: str = "") -> float:
        return sum(v for (n, _), v in self.samples.items() if n == self.name + suffix)


def _parse_value(text: str, line: str) -> float:
    if text in ("+Inf", "-Inf", "NaN"):
        return float(text.replace("Inf", "inf").replace("NaN", "nan"))
    if not re.fullmatch(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?", text):
        raise PrometheusFormatError(f"bad value {text!r} in {line!r}")
    return float(text)


def _parse_labels(text: str, line: str) -> tuple[tuple[str, str], ...]:
    labels: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        m = _LABEL_RE.match(text, pos)
        if m is None:
            raise PrometheusFormatError(f"bad labels in {line!r}")
        value = m.group(2).replace("\\n", "\n").replace('\\"', '"').replace("\\\\", "\\")
        labels.append((m.group(1), value))
        pos = m.end()
    names = [k for k, _ in labels]
    if len(set(names)) != len(names):
        raise PrometheusFormatError(f"repeated label in {line!r}")
    return tuple(sorted(labels))


def parse_prometheus(text: str) -> dict[str, Family]:
    """Parse the text exposition format (0.0.4) strictly; families by name."""
    if not text.endswith("\n"):
        raise PrometheusFormatError("the exposition must end with a newline")
    families: dict[str, Family] = {}
    helps: dict[str, str] = {}
    current: Family | None = None
    for line in text.split("\n")[:-1]:
        if line.startswith("# HELP "):
            name, _, doc = line[7:].partition(" ")
            if not re.fullmatch(_NAME, name) or name in helps:
                raise PrometheusFormatError(f"bad or repeated HELP: {line!r}")
            helps[name] = doc
            continue
        if line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            if not re.fullmatch(_NAME, name) or kind not in _TYPES or name in families:
                raise PrometheusFormatError(f"bad or repeated TYPE: {line!r}")
            current = families[name] = Family(name, kind, helps.get(name, ""))
            continue
        if line.startswith("#") or not line.strip():
            raise PrometheusFormatError(f"unexpected line {line!r}")
        m = _SAMPLE_RE.match(line)
        if m is None:
            raise PrometheusFormatError(f"bad sample line {line!r}")
        name = m["name"]
        if current is None:
            raise PrometheusFormatError(f"sample before any TYPE: {line!r}")
        allowed = {current.name}
        if current.type == "histogram":
            allowed = {current.name + s for s in ("_bucket", "_sum", "_count")}
        if name not in allowed:
            raise PrometheusFormatError(f"sample {name!r} outside its family {current.name!r}")
        labels = _parse_labels(m["labels"] or "", line)
        key = (name, labels)
        if key in current.samples:
            raise PrometheusFormatError(f"repeated sample {line!r}")
        current.samples[key] = _parse_value(m["value"], line)
    for family in families.values():
        if family.type == "counter":
            if not family.name.endswith("_total"):
                raise PrometheusFormatError(f"counter {family.name} does not end in _total")
            if any(v < 0 for v in family.samples.values()):
                raise PrometheusFormatError(f"negative counter in {family.name}")
        if family.type == "histogram":
            _check_histogram(family)
    return families


def _check_histogram(family: Family) -> None:
    buckets = sorted(
        (float(dict(labels)["le"].replace("+Inf", "inf")), v)
        for (n, labels), v in family.samples.items()
        if n == family.name + "_bucket"
    )
    if not buckets or not math.isinf(buckets[-1][0]):
        raise PrometheusFormatError(f"histogram {family.name} lacks le=+Inf")
    counts = [v for _, v in buckets]
    if counts != sorted(counts):
        raise PrometheusFormatError(f"histogram {family.name} buckets are not cumulative")
    if family.value("_count") != counts[-1]:
        raise PrometheusFormatError(f"histogram {family.name}: _count != +Inf bucket")


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="an OTLP/gRPC collector that only counts")
    parser.add_argument("--port", type=int, default=4317)
    args = parser.parse_args()
    receiver = OtlpReceiver(args.port, keep=False).start()
    print(f"OTLP/gRPC collector on {receiver.endpoint}; Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(5)
            st = receiver.store
            print(f"spans {st.span_count} metric exports {st.metric_requests}", flush=True)
    except KeyboardInterrupt:
        receiver.stop()


if __name__ == "__main__":
    main()
