"""Telemetry without processes: the endpoint rule, sampling, spans, metric sums, the
Prometheus text, the access log's buffering, the board, the config keys."""

from __future__ import annotations

import json
import os
import ssl
import textwrap
from pathlib import Path
from typing import Any

import pytest
from edgeterm.workers.stats import Stats
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from edgeterm import prometheus, telemetry
from edgeterm.accesslog import AccessLog
from edgeterm.config import TelemetryConfig
from edgeterm.config_loader import load_config
from edgeterm.errors import ConfigError
from edgeterm.telemetry import (
    LATENCY_BOUNDS,
    ConnRecord,
    Recorder,
    SpanBuilder,
    SupervisorFacts,
    classify_handshake_error,
    parse_otlp_endpoint,
)
from tests.support.otlp import PrometheusFormatError, parse_prometheus

# --- the endpoint rule ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "protocol", "traces", "metrics", "insecure"),
    [
        ("http://collector:4317", "grpc", "http://collector:4317", "http://collector:4317", True),
        ("https://collector", "grpc", "https://collector:4317", "https://collector:4317", False),
        ("http://[::1]:9000/", "grpc", "http://[::1]:9000", "http://[::1]:9000", True),
        (
            "http://c:4318",
            "http",
            "http://c:4318/v1/traces",
            "http://c:4318/v1/metrics",
            False,
        ),
        (
            "https://c/otlp/v1/traces",
            "http",
            "https://c/otlp/v1/traces",
            "https://c/otlp/v1/metrics",
            False,
        ),
        (
            "http://c:80/v1/metrics/",
            "http",
            "http://c:80/v1/traces",
            "http://c:80/v1/metrics",
            False,
        ),
        (
            "http://c:4318/prefix",
            "http",
            "http://c:4318/prefix/v1/traces",
            "http://c:4318/prefix/v1/metrics",
            False,
        ),
    ],
)
def test_endpoint_rule(url: str, protocol: str, traces: str, metrics: str, insecure: bool) -> None:
    target = parse_otlp_endpoint(url)
    assert (target.protocol, target.traces, target.metrics) == (protocol, traces, metrics)
    if protocol == "grpc":
        assert target.insecure is insecure


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("collector:4317", "http://"),
        ("grpc://c:4317", "http://"),
        ("http://:4317", "no host"),
        ("http://c:4317/otlp", "a gRPC endpoint has no path"),
        ("http://u:p@c:4317", "headers"),
        ("http://c:4317?x=1", "query"),
        ("http://c:99999", "not a valid URL"),
        ("http://c :4317", "spaces"),
        ("http://c\x00:4317", "control"),
    ],
)
def test_endpoint_errors(url: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        parse_otlp_endpoint(url)


# --- config -----------------------------------------------------------------------------------

MINIMAL = """
[[listeners]]
name = "https"
bind = "127.0.0.1:8443"
upstream = "app"

[tls]
[[tls.certificates]]
cert = "site.pem"

[upstreams.app]
servers = ["127.0.0.1:8080"]
"""


def test_telemetry_defaults(tmp_path: Path) -> None:
    path = tmp_path / "e.toml"
    path.write_text(MINIMAL)
    assert load_config(path).telemetry == TelemetryConfig()
    d = TelemetryConfig()
    assert (d.service_name, d.headers, d.prometheus_bind, d.access_log) == (
        "edgeterm",
        (),
        None,
        False,
    )


def test_telemetry_keys(tmp_path: Path) -> None:
    path = tmp_path / "e.toml"
    path.write_text(
        MINIMAL
        + textwrap.dedent(
            """
            [telemetry]
            otlp_endpoint = "http://127.0.0.1:4317"
            sample_ratio = 0.5
            service_name = "edge-eu"
            headers = { Authorization = "Bearer x", "x-tenant" = "t1" }
            export_interval = 2.5
            prometheus_bind = "127.0.0.1:9464"
            access_log = true
            access_log_file = "logs/access.log"
            """
        )
    )
    t = load_config(path).telemetry
    assert t.headers == (("authorization", "Bearer x"), ("x-tenant", "t1"))
    assert t.prometheus_bind is not None and t.prometheus_bind.port == 9464
    assert t.access_log_file == tmp_path / "logs" / "access.log"
    assert (t.service_name, t.export_interval, t.access_log) == ("edge-eu", 2.5, True)


def test_telemetry_errors_name_the_key(tmp_path: Path) -> None:
    path = tmp_path / "e.toml"
    path.write_text(
        MINIMAL
        + textwrap.dedent(
            """
            [telemetry]
            otlp_endpoint = "collector:4317"
            service_name = ""
            headers = { "bad name" = "x", ok = 1, nl = "a\\nb" }
            export_interval = 0
            prometheus_bind = "nowhere"
            access_log = "yes"
            """
        )
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    for key in (
        "telemetry.otlp_endpoint: expected a URL",
        "telemetry.service_name: must not be empty",
        'telemetry.headers."bad name": invalid header name',
        "telemetry.headers.ok: expected a string",
        "telemetry.headers.nl: a header value must be printable",
        "telemetry.export_interval: must be between",
        "telemetry.prometheus_bind: expected host:port",
        "telemetry.access_log: expected a boolean",
    ):
        assert key in text, (key, text)


def test_shipped_config_documents_every_telemetry_key() -> None:
    shipped = Path(__file__).resolve().parents[2] / "etc" / "edgeterm.toml"
    text = shipped.read_text()
    for key in TelemetryConfig.__slots__:  # type: ignore[attr-defined]
        assert f"\n{key} = " in text or f"\n# {key} = " in text, key
    assert load_config(shipped).telemetry == TelemetryConfig()


# --- sampling and records -------------------------------------------------------------------


class FakeSSL:
    def version(self) -> str:
        return "TLSv1.3"

    def cipher(self) -> tuple[str, str, int]:
        return ("TLS_AES_128_GCM_SHA256", "TLSv1.3", 128)

    def selected_alpn_protocol(self) -> str:
        return "h2"

    session_reused = True


class Sink:
    def __init__(self) -> None:
        self.records: list[ConnRecord] = []

    def record(self, rec: ConnRecord) -> str:
        self.records.append(rec)
        return "ab" * 16


def test_begin_returns_none_unless_sampled_or_logged() -> None:
    rec = Recorder(0, None)
    assert all(rec.begin(("1.2.3.4", 5), 1.0) is None for _ in range(1000))  # ratio 0
    rec.ratio = 1.0
    assert all(rec.begin(("1.2.3.4", 5), 1.0) is not None for _ in range(100))
    rec.ratio = 0.25
    n = sum(rec.begin(None, 1.0) is not None for _ in range(20000))
    assert 4000 < n < 6000


def test_access_only_records_every_connection_unsampled(tmp_path: Path) -> None:
    log = AccessLog(tmp_path / "a.log")
    rec = Recorder(3, log)
    r = rec.begin(("10.0.0.1", 4242), 100.0)
    assert r is not None and r.sampled is False
    # the facts reach the line even though the handshake hook could not read the SNI
    r.handshake_done(FakeSSL(), 100.010)
    r.upstream_connected("10.0.0.9:80", 100.012)
    r.closed("done", 5, 7, 100.5)
    log.close()
    (line,) = (tmp_path / "a.log").read_text().splitlines()
    entry = json.loads(line)
    assert entry["client"] == "10.0.0.1:4242" and entry["worker"] == 3
    assert (entry["tls_version"], entry["alpn"], entry["resumed"]) == ("TLSv1.3", "h2", True)
    assert (entry["bytes_in"], entry["bytes_out"], entry["reason"]) == (5, 7, "done")
    assert entry["handshake_ms"] == 10.0 and entry["connect_ms"] == 2.0
    assert entry["duration_ms"] == 500.0 and entry["trace_id"] is None
    assert entry["time"].endswith("Z")


def test_sampled_record_goes_to_spans_and_log(tmp_path: Path) -> None:
    log = AccessLog(tmp_path / "a.log")
    rec = Recorder(0, log)
    sink = Sink()
    rec.spans = sink  # type: ignore[assignment]
    rec.ratio = 1.0
    r = rec.begin(("::1", 1), 1.0)
    assert r is not None and r.sampled
    r.closed("handshake_timeout", 0, 0, 2.0)
    log.close()
    assert sink.records == [r]
    entry = json.loads((tmp_path / "a.log").read_text())
    assert entry["trace_id"] == "ab" * 16 and entry["client"] == "[::1]:1"
    assert entry["handshake_error"] == "timeout" and entry["handshake_ms"] is None


def test_a_failing_sink_never_raises_into_the_data_path() -> None:
    rec = Recorder(0, None)

    class Broken:
        def record(self, rec: ConnRecord) -> str:
            raise RuntimeError("bug")

    rec.spans = Broken()  # type: ignore[assignment]
    rec.ratio = 1.0
    r = rec.begin(None, 1.0)
    assert r is not None
    r.handshake_done(object(), 1.1)  # no TLS methods at all
    r.closed("done", 0, 0, 1.2)
    assert rec.errors == 2


def _raise_and_classify(exc: BaseException) -> tuple[str, str]:
    try:
        raise exc
    except BaseException:
        r = ConnRecord(Recorder(0, None), None, 0.0, False)
        r.handshake_failed("handshake_failed", 0.1)  # reads the current exception
        return r.failure or "", r.failure_detail


def test_handshake_errors_are_classified() -> None:
    alert = ssl.SSLError(1, "[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca")
    alert.reason = "TLSV1_ALERT_UNKNOWN_CA"
    proto = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    proto.reason = "WRONG_VERSION_NUMBER"
    assert _raise_and_classify(alert) == ("alert", "TLSV1_ALERT_UNKNOWN_CA")
    assert _raise_and_classify(proto) == ("protocol_error", "WRONG_VERSION_NUMBER")
    assert _raise_and_classify(ssl.SSLEOFError(8, "EOF"))[0] == "eof"
    assert _raise_and_classify(ConnectionResetError(104, "reset")) == (
        "eof",
        os.strerror(104),
    )
    assert classify_handshake_error(None) == ("error", "")


def test_failure_kind_follows_the_close_reason() -> None:
    r = ConnRecord(Recorder(0, None), None, 0.0, False)
    r.handshake_failed("unknown_sni", 0.1, ssl.SSLError(1, "unrecognized name"))
    assert r.failure == "unknown_sni"
    for reason, kind in [("proxy_timeout", "proxy_timeout"), ("client_error", "eof")]:
        r = ConnRecord(Recorder(0, None), None, 0.0, False)
        r.closed(reason, 0, 0, 1.0)
        assert (r.failure, r.failure_detail) == (kind, reason)


def _client_der(cn: str, org: str) -> bytes:
    """A self-signed client certificate (DER) with subject O=org, CN=cn."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


class FakeClientCert(FakeSSL):
    def __init__(self, der: bytes) -> None:
        self.der = der
        self.asked = 0

    def getpeercert(self, binary_form: bool = False) -> bytes:
        assert binary_form
        self.asked += 1
        return self.der


def test_proxy_header_address_and_client_certificate_reach_the_access_log(
    tmp_path: Path,
) -> None:
    log = AccessLog(tmp_path / "a.log")
    rec = Recorder(0, log)
    r = rec.begin(("127.0.0.1", 40000), 1.0)  # the balancer
    assert r is not None and not r.sampled
    r.client_address(("2001:db8::7", 52000))  # what its PROXY header said
    so = FakeClientCert(_client_der("alice", "Example"))
    r.client_certificate(so, "alice")
    r.handshake_done(so, 1.01)
    r.closed("done", 1, 1, 1.5)
    log.close()
    entry = json.loads((tmp_path / "a.log").read_text())
    assert entry["client"] == "[2001:db8::7]:52000"
    assert entry["client_cn"] == "alice"
    assert so.asked == 0  # unsampled: the subject DN is not decoded


def test_client_certificate_subject_in_spans() -> None:
    builder, exporter, _ = _builder()
    r = ConnRecord(Recorder(0, None), ("127.0.0.1", 40000), 10.0, True)
    r.client_address(("203.0.113.7", 51000))
    r.client_certificate(FakeClientCert(_client_der("alice", "Example, Inc.")), "alice")
    r.handshake_done(FakeSSL(), 10.001)
    r.upstream_connected("127.0.0.1:8080", 10.002)
    r.reason, r.t_close = "done", 11.0
    builder.record(r)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    for name in ("edgeterm.connection", "tls.handshake"):
        a = spans[name].attributes
        assert a is not None
        assert a["tls.client.subject"] == "CN=alice,O=Example\\, Inc.", name  # RFC 4514
        assert a["edgeterm.tls.client.cn"] == "alice", name
    root = spans["edgeterm.connection"].attributes
    assert root is not None
    assert (root["client.address"], root["client.port"]) == ("203.0.113.7", 51000)
    # no certificate, no attributes
    builder, exporter, _ = _builder()
    r = ConnRecord(Recorder(0, None), None, 10.0, True)
    r.handshake_done(FakeSSL(), 10.001)
    r.reason, r.t_close = "done", 11.0
    builder.record(r)
    for span in exporter.get_finished_spans():
        assert "tls.client.subject" not in (span.attributes or {})
        assert "edgeterm.tls.client.cn" not in (span.attributes or {})


# --- spans ------------------------------------------------------------------------------------


class FakeStats:
    spans_dropped = 0
    spans_exported = 0
    spans_failed = 0
    metric_exports_failed = 0
    access_log_dropped = 0

    def snapshot(self) -> dict[str, object]:
        return {}


def _builder() -> tuple[SpanBuilder, InMemorySpanExporter, FakeStats]:
    exporter = InMemorySpanExporter()
    stats = FakeStats()
    resource = Resource.create({"service.name": "t"})
    return SpanBuilder(SimpleSpanProcessor(exporter), resource, stats, 0.5), exporter, stats


def test_spans_have_explicit_times_and_parent_links() -> None:
    builder, exporter, _ = _builder()
    r = ConnRecord(Recorder(0, None), ("127.0.0.1", 5000), 1000.0, True)
    r.handshake_done(FakeSSL(), 1000.002)
    r.upstream_connected("127.0.0.1:8080", 1000.003)
    r.reason, r.bytes_in, r.bytes_out, r.t_close = "done", 10, 20, 1001.0
    trace_id = builder.record(r)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    root, hs, up = spans["edgeterm.connection"], spans["tls.handshake"], spans["upstream.connect"]
    assert trace_id == f"{root.context.trace_id:032x}"
    assert root.kind == SpanKind.SERVER and root.parent is None
    assert hs.parent.span_id == up.parent.span_id == root.context.span_id  # type: ignore[union-attr]
    assert root.end_time - root.start_time == pytest.approx(1e9, abs=1e3)  # type: ignore[operator]
    assert hs.end_time - hs.start_time == pytest.approx(2e6, abs=1e3)  # type: ignore[operator]
    assert up.start_time == hs.end_time
    assert root.attributes["tls.next_protocol"] == "h2"  # type: ignore[index]
    assert root.attributes["edgeterm.sample_ratio"] == 0.5  # type: ignore[index]
    assert root.attributes["edgeterm.bytes.upstream_to_client"] == 20  # type: ignore[index]
    assert root.status.status_code == StatusCode.UNSET
    assert root.resource.attributes["service.name"] == "t"
    assert {s.context.trace_id for s in spans.values()} == {root.context.trace_id}
    assert len({s.context.span_id for s in spans.values()}) == 3


def test_upstream_unavailable_marks_the_connect_span() -> None:
    builder, exporter, _ = _builder()
    r = ConnRecord(Recorder(0, None), None, 5.0, True)
    r.handshake_done(FakeSSL(), 5.1)
    r.closed("upstream_unavailable", 0, 0, 5.2)
    builder.record(r)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert spans["upstream.connect"].status.status_code == StatusCode.ERROR
    assert spans["edgeterm.connection"].status.status_code == StatusCode.ERROR


def test_spans_beyond_the_queue_are_dropped_and_counted() -> None:
    builder, exporter, stats = _builder()
    builder.submitted = telemetry.MAX_QUEUED_SPANS - 1  # as if the collector were down
    r = ConnRecord(Recorder(0, None), None, 5.0, True)
    r.closed("handshake_timeout", 0, 0, 6.0)
    assert builder.record(r) is None
    assert stats.spans_dropped == 2 and exporter.get_finished_spans() == ()


# --- metrics --------------------------------------------------------------------------------


def test_stats_histograms() -> None:
    s = Stats()
    s.observe_handshake(0.0004)
    s.observe_handshake(LATENCY_BOUNDS[3])  # inclusive upper bound
    s.observe_handshake(99.0)
    assert s.handshake_latency[0] == 1 and s.handshake_latency[3] == 1
    assert s.handshake_latency[-1] == 1
    snap = s.snapshot()
    assert snap["handshake_latency"] == s.handshake_latency
    assert snap["handshake_latency"] is not s.handshake_latency


def _failures(snap: dict[str, Any]) -> dict[str, float]:
    return {
        dict(labels)["reason"]: v
        for m, labels, v in telemetry.worker_points(snap)
        if m is telemetry.HANDSHAKE_FAILURES
    }


def test_unclassified_handshake_failures_count_as_error() -> None:
    closed = {"handshake_failed": 3, "handshake_timeout": 2, "unknown_sni": 4, "done": 9}
    snap: dict[str, Any] = {"closed_by": closed}
    assert _failures(snap) == {
        "timeout": 2,
        "alert": 0,
        "protocol_error": 0,
        "eof": 0,
        "unknown_sni": 4,
        "error": 3,
    }
    snap["handshake_errors"] = {"alert": 2, "eof": 1}
    assert _failures(snap)["alert"] == 2 and _failures(snap)["error"] == 0


def test_totals_never_decrease_when_workers_exit() -> None:
    totals = prometheus.Totals()
    a = {"accepted": 5, "active": 2, "closed_by": {"done": 3}, "handshake_latency": [1, 2]}
    b = {"accepted": 1, "active": 1, "closed_by": {"idle_timeout": 1}, "pid": 7, "worker": 1}
    t = totals.update({10: a, 11: b})
    assert (t["accepted"], t["active"], t["closed_by"]) == (6, 3, {"done": 3, "idle_timeout": 1})
    assert "pid" not in t and "worker" not in t
    t = totals.update({11: b})  # worker 10 exited
    assert (t["accepted"], t["active"], t["closed_by"]["done"]) == (6, 1, 3)
    assert t["handshake_latency"] == [1, 2]
    t = totals.update({11: b, 12: {"accepted": 2, "active": 0}})  # its replacement
    assert t["accepted"] == 8


def test_exposition_parses_strictly() -> None:
    s = Stats()
    s.accepted, s.full_handshakes, s.resumed = 3, 2, 1
    s.count_close("done")
    s.count_close('we"ird\\reason\n')
    s.observe_handshake(0.003)
    facts = SupervisorFacts({1: {}}, running=1, restarts=2, ticket_rotations=4, key_since=10.0)
    text = prometheus.exposition(s.snapshot(), facts, now=12.5)
    fams = parse_prometheus(text)
    assert fams["edgeterm_connections_accepted_total"].value() == 3
    assert fams["edgeterm_connections_closed_total"].value(reason='we"ird\\reason\n') == 1
    assert fams["edgeterm_tls_handshakes_total"].value(kind="resumed") == 1
    assert fams["edgeterm_tickets_key_age_seconds"].value() == 2.5
    assert fams["edgeterm_tickets_rotations_total"].value() == 4
    assert fams["edgeterm_workers_restarts_total"].value() == 2
    hist = fams["edgeterm_tls_handshake_duration_seconds"]
    assert hist.value("_count") == 1 and hist.value("_bucket", le="0.0025") == 0
    assert hist.value("_bucket", le="0.005") == 1 and hist.value("_sum") == 0.003
    assert "edgeterm_connections_active" in fams


@pytest.mark.parametrize(
    "text",
    [
        "x_total 1\n",  # no TYPE
        "# TYPE x_total counter\nx_total 1",  # no final newline
        '# TYPE x_total counter\nx_total{a="1",a="2"} 1\n',
        "# TYPE x_total counter\nx_total one\n",
        "# TYPE x counter\nx 1\n",  # a counter without _total
        "# TYPE x_total counter\nx_total 1\nx_total 2\n",
        '# TYPE h histogram\nh_bucket{le="1"} 2\nh_bucket{le="+Inf"} 1\nh_count 1\nh_sum 0\n',
        '# TYPE g gauge\ng{a="x"} 1\ny 2\n',
    ],
)
def test_the_strict_parser_rejects(text: str) -> None:
    with pytest.raises(PrometheusFormatError):
        parse_prometheus(text)


def test_board_is_shared_with_forked_children() -> None:
    board = telemetry.Board()
    board.publish(SupervisorFacts(running=2, restarts=1, reloads_ok=3, key_since=42.5))
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child reads what the parent publishes after the fork
        os.close(w)
        os.read(r, 1)
        facts = board.read()
        ok = (facts.running, facts.restarts, facts.ticket_rotations, facts.key_since)
        os._exit(0 if ok == (2, 1, 7, 42.5) else 1)
    os.close(r)
    board.publish(SupervisorFacts(running=2, restarts=1, ticket_rotations=7, key_since=42.5))
    os.write(w, b"x")
    os.close(w)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert board.read().key_since == 42.5
    board.publish(SupervisorFacts())
    assert board.read().key_since is None


# --- the access log ---------------------------------------------------------------------------


def test_access_log_buffers_until_flush(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "a.log"
    log = AccessLog(path, flush_bytes=1000)
    log.write({"n": 1})
    assert path.read_text() == ""
    log.flush()
    assert path.read_text() == '{"n":1}\n'
    for i in range(100):  # passes flush_bytes: written without an explicit flush
        log.write({"n": i, "pad": "x" * 20})
    assert path.read_text().count("\n") > 1
    log.close()
    assert path.read_text().count("\n") == 101


def test_access_log_never_blocks_on_a_full_pipe_and_counts_drops() -> None:
    r, w = os.pipe()
    os.set_blocking(r, False)
    saved = os.dup(2)
    os.dup2(w, 2)  # stderr is the pipe, which nobody reads
    try:
        log = AccessLog(None, max_buffer=200_000, flush_bytes=10_000)
        for i in range(20_000):
            log.write({"line": i, "pad": "y" * 60})  # about 1.6 MB: far more than fits
        assert log.dropped > 0
        # read what arrived: whole lines only, in order
        data = b""
        while True:
            try:
                chunk = os.read(r, 1 << 16)
            except BlockingIOError:
                break
            data += chunk
        lines = data.decode().splitlines()
        assert lines and all(json.loads(x)["pad"] for x in lines)
        numbers = [json.loads(x)["line"] for x in lines]
        assert numbers == list(range(len(numbers)))
        log.close()  # gives up after CLOSE_TIMEOUT; never hangs
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(r)
        os.close(w)


def test_access_log_reopen(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    log = AccessLog(path)
    log.write({"n": 1})
    path.rename(tmp_path / "a.log.1")
    log.reopen()  # flushes to the old file first
    log.write({"n": 2})
    log.close()
    assert (tmp_path / "a.log.1").read_text() == '{"n":1}\n'
    assert path.read_text() == '{"n":2}\n'


def test_server_name_of_a_real_handshake(tmp_path: Path) -> None:
    from edgeterm import selfsigned

    gen = selfsigned.generate(tmp_path, ["localhost"], basename="localhost")
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(gen.cert_path, gen.key_path)
    client = ssl.create_default_context(cafile=str(gen.ca_cert_path))
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    cobj = client.wrap_bio(c_in, c_out, server_hostname="localhost")
    sobj = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for obj in (cobj, sobj):
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    assert telemetry.server_name(sobj._sslobj) == "localhost"  # type: ignore[attr-defined]
