"""Observability (issue 6): OTLP traces and metrics, the Prometheus endpoint, the access log.

Real processes: ``edgeterm start --foreground`` with an echo upstream, stdlib ``ssl`` clients,
and a real OTLP/gRPC collector in this process (``tests.support.otlp``). Exports run every
0.2 s here (``telemetry.export_interval``), stats reach the supervisor every second: checks
poll with deadlines.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edgeterm import proxyproto as pp
from tests.support.configs import deep_merge
from tests.support.launcher import EdgetermFactory
from tests.support.otlp import (
    Family,
    OtlpHttpReceiver,
    OtlpReceiver,
    Span,
    parse_prometheus,
)
from tests.support.routing import make_client_pki, tls_after_header
from tests.support.supervision import Supervised, supervised_config, wait_status
from tests.support.tlsclient import HOST, client_context, connect_tls, recv_exactly, recv_to_eof
from tests.support.upstreams import BlackholePort, EchoUpstream, RefusingPort
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(90)

EXPORT_INTERVAL = 0.2
PROMETHEUS_RE = re.compile(r"prometheus endpoint listening addr=(?P<host>[^\s:]+):(?P<port>\d+)")
SPAN_SERVER = 2  # SpanKind.SPAN_KIND_SERVER
STATUS_ERROR = 2


@pytest.fixture
def client_ctx(ca: Path) -> ssl.SSLContext:
    """A verifying client context that offers ALPN http/1.1 (and so has it in the spans)."""
    return client_context(ca, alpn=["http/1.1"])


@pytest.fixture
def collector() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver().start()
    yield receiver
    receiver.stop()


def start(
    factory: EdgetermFactory,
    servers: list[str],
    *,
    workers: int = 1,
    telemetry: dict[str, Any] | None = None,
    **extra: Any,
) -> Supervised:
    cfg, pidfile, admin = supervised_config(factory, servers, workers=workers)
    settings = {"export_interval": EXPORT_INTERVAL, **(telemetry or {})}
    cfg = deep_merge(cfg, {"telemetry": settings, **extra})
    return Supervised(factory.start(cfg=cfg), cfg, pidfile, admin)


@dataclass
class Conn:
    local_port: int
    sent: int
    received: int
    resumed: bool
    session: ssl.SSLSession | None


def exchange(
    port: int,
    ctx: ssl.SSLContext,
    payload: bytes = b"hello telemetry\n",
    *,
    session: ssl.SSLSession | None = None,
) -> Conn:
    """One TLS connection through edgeterm to the echo upstream, closed cleanly both ways
    (close_notify, then the server's after the upstream's EOF): close reason "done"."""
    raw = socket.create_connection((HOST, port), timeout=10)
    s = ctx.wrap_socket(
        raw, server_hostname="localhost", session=session, suppress_ragged_eofs=False
    )
    try:
        local_port = s.getsockname()[1]
        s.sendall(payload)
        got = recv_exactly(s, len(payload), timeout=10)
        assert got == payload
        new_session, resumed = s.session, s.session_reused
        s.unwrap()
    finally:
        s.close()
    return Conn(local_port, len(payload), len(got), resumed, new_session)


def by_port(roots: list[Span]) -> dict[int, Span]:
    return {int(r.attributes["client.port"]): r for r in roots if "client.port" in r.attributes}


def scrape(port: int) -> dict[str, Family]:
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5) as answer:
        assert answer.status == 200
        assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return parse_prometheus(answer.read().decode())


def prometheus_port(sv: Supervised) -> int:
    m = wait_until(lambda: PROMETHEUS_RE.search(sv.server.log()), timeout=5, what="prometheus line")
    return int(m["port"])


# --- traces -----------------------------------------------------------------------------------


def test_one_span_per_connection_with_tls_facts_children_and_access_log(
    edgeterm: EdgetermFactory,
    echo: EchoUpstream,
    collector: OtlpReceiver,
    client_ctx: ssl.SSLContext,
) -> None:
    log_file = edgeterm.directory / "logs" / "access.log"
    sv = start(
        edgeterm,
        [echo.addr],
        telemetry={
            "otlp_endpoint": collector.endpoint,
            "sample_ratio": 1.0,
            "service_name": "edge-test",
            "headers": {"X-Tenant": "t1"},
            "access_log": True,
            "access_log_file": str(log_file),
        },
    )
    first = exchange(sv.port, client_ctx, b"a" * 1000)
    conns = [first]
    conns += [exchange(sv.port, client_ctx, b"b" * 10, session=first.session) for _ in range(2)]
    conns.append(exchange(sv.port, client_ctx, b"c" * 77))
    assert [c.resumed for c in conns] == [False, True, True, False]

    roots = collector.wait_roots(
        lambda rs: {c.local_port for c in conns} <= set(by_port(rs)), what="4 root spans"
    )
    assert len(roots) == 4, "exactly one span per connection"
    spans = by_port(roots)
    for conn in conns:
        root = spans[conn.local_port]
        a = root.attributes
        assert root.name == "edgeterm.connection" and root.kind == SPAN_SERVER
        assert a["client.address"] == HOST
        assert a["tls.client.server_name"] == "localhost"
        assert a["tls.next_protocol"] == "http/1.1"
        assert a["tls.protocol.version"] == "1.3"
        assert a["tls.cipher"].startswith("TLS_")
        assert a["tls.resumed"] is conn.resumed
        assert a["edgeterm.upstream.address"] == echo.addr
        assert a["edgeterm.bytes.client_to_upstream"] == conn.sent
        assert a["edgeterm.bytes.upstream_to_client"] == conn.received
        assert a["edgeterm.close_reason"] == "done"
        assert a["edgeterm.handshake.duration_ms"] >= 0
        assert a["edgeterm.upstream.connect_ms"] >= 0
        assert root.status_code != STATUS_ERROR
        # resource: who exported it
        r = root.resource
        assert r["service.name"] == "edge-test"
        assert r["edgeterm.worker.id"] == 0 and r["edgeterm.generation"] == 1
        assert "edgeterm.worker.cpu" in r and r["host.name"] == socket.gethostname()
        # children: the handshake, then the upstream connect, inside the connection's span
        children = sorted(collector.children(root), key=lambda s: s.start_ns)
        assert [c.name for c in children] == ["tls.handshake", "upstream.connect"]
        hs, up = children
        assert root.start_ns == hs.start_ns <= hs.end_ns <= up.start_ns <= up.end_ns
        assert up.end_ns <= root.end_ns
        assert hs.attributes["tls.resumed"] is conn.resumed
        assert up.attributes["edgeterm.upstream.address"] == echo.addr
        assert abs(root.start_ns / 1e9 - time.time()) < 60  # epoch time, not monotonic

    # the access log: one JSON line per connection, the same facts, the trace id
    def lines() -> list[dict[str, Any]] | None:
        text = log_file.read_text() if log_file.exists() else ""
        found = [json.loads(line) for line in text.splitlines()]
        return found if len(found) >= 4 else None

    entries = wait_until(lines, timeout=10, what="4 access log lines")
    assert len(entries) == 4
    by_client = {e["client"]: e for e in entries}
    for conn in conns:
        e = by_client[f"{HOST}:{conn.local_port}"]
        root = spans[conn.local_port]
        assert e["trace_id"] == root.trace_id
        assert (e["bytes_in"], e["bytes_out"]) == (conn.sent, conn.received)
        assert e["resumed"] is conn.resumed and e["reason"] == "done"
        assert (e["sni"], e["alpn"], e["tls_version"]) == ("localhost", "http/1.1", "TLSv1.3")
        assert e["upstream"] == echo.addr and e["worker"] == 0
        assert e["handshake_error"] is None and e["handshake_ms"] >= 0

    # OTLP metrics from the same worker
    collector.wait_metric("edgeterm.tls.handshakes", lambda p: p.value == 2, kind="full")
    collector.wait_metric("edgeterm.tls.handshakes", lambda p: p.value == 2, kind="resumed")
    collector.wait_metric("edgeterm.connections.closed", lambda p: p.value == 4, reason="done")
    total = sum(c.sent for c in conns)
    collector.wait_metric(
        "edgeterm.bytes", lambda p: p.value == total, direction="client_to_upstream"
    )
    active = collector.wait_metric("edgeterm.connections.active", lambda p: p.value == 0)
    assert active.resource["service.name"] == "edge-test"
    collector.wait_metric("edgeterm.telemetry.spans", lambda p: p.value >= 12, outcome="exported")
    assert collector.latest("edgeterm.telemetry.spans", outcome="dropped").value == 0  # type: ignore[union-attr]
    # the latency histograms: one handshake and one upstream connect per connection
    for name in ("edgeterm.tls.handshake.duration", "edgeterm.upstream.connect.duration"):
        hist = collector.wait_metric(name, lambda p: p.count == len(conns))
        assert hist.kind == "histogram", name
        assert len(hist.bucket_counts) == len(hist.explicit_bounds) + 1, name
        assert sum(hist.bucket_counts) == hist.count, name
        assert 0 < hist.sum < 10 * len(conns), name  # seconds: positive, not absurd
    for reason in ("error", "timeout"):
        failed = collector.latest("edgeterm.upstream.connect.failures", reason=reason)
        assert failed is not None and failed.value == 0, reason
    # telemetry.headers reach the collector with every export, spans and metrics alike
    for signal_ in ("traces", "metrics"):
        sent = collector.metadata(signal_)
        assert sent, signal_
        assert all(h.get("x-tenant") == "t1" for h in sent), (signal_, sent[-1])


def test_sample_ratio_zero_sends_metrics_and_no_spans(
    edgeterm: EdgetermFactory,
    echo: EchoUpstream,
    collector: OtlpReceiver,
    client_ctx: ssl.SSLContext,
) -> None:
    sv = start(
        edgeterm,
        [echo.addr],
        telemetry={"otlp_endpoint": collector.endpoint, "sample_ratio": 0.0},
    )
    for _ in range(5):
        exchange(sv.port, client_ctx)
    collector.wait_metric("edgeterm.connections.accepted", lambda p: p.value == 5)
    collector.wait_metric("edgeterm.connections.closed", lambda p: p.value == 5, reason="done")
    assert collector.spans() == []


def test_failed_handshakes_have_spans_with_the_reason(
    edgeterm: EdgetermFactory,
    echo: EchoUpstream,
    collector: OtlpReceiver,
    client_ctx: ssl.SSLContext,
    tmp_path: Path,
) -> None:
    sv = start(
        edgeterm,
        [echo.addr],
        telemetry={"otlp_endpoint": collector.endpoint, "sample_ratio": 1.0},
        timeouts={"handshake": 0.5},
    )
    ports: dict[str, int] = {}
    # alert: a client that does not trust our CA sends unknown_ca
    other_ca = ssl.create_default_context()
    with socket.create_connection((HOST, sv.port), timeout=5) as raw:
        ports["alert"] = raw.getsockname()[1]
        with pytest.raises(ssl.SSLCertVerificationError):
            other_ca.wrap_socket(raw, server_hostname="localhost")
    # protocol_error: not TLS at all
    with socket.create_connection((HOST, sv.port), timeout=5) as raw:
        ports["protocol_error"] = raw.getsockname()[1]
        raw.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        raw.recv(1024)
    # timeout: a client that says nothing
    with socket.create_connection((HOST, sv.port), timeout=5) as raw:
        ports["timeout"] = raw.getsockname()[1]
        raw.recv(1024)  # returns at the server's close, after the handshake timeout
    ok = exchange(sv.port, client_ctx)

    roots = collector.wait_roots(
        lambda rs: {*ports.values(), ok.local_port} <= set(by_port(rs)), what="4 root spans"
    )
    spans = by_port(roots)
    details = {
        "alert": "TLSV1_ALERT_UNKNOWN_CA",
        "protocol_error": "HTTP_REQUEST",
        "timeout": "handshake_timeout",
    }
    for kind, port in ports.items():
        root = spans[port]
        assert root.status_code == STATUS_ERROR, kind
        assert root.attributes["error.type"] == kind
        assert root.attributes["edgeterm.handshake.error"] == details[kind]
        assert details[kind] in root.status_message
        children = collector.children(root)
        assert [c.name for c in children] == ["tls.handshake"], "no upstream connect"
        assert children[0].status_code == STATUS_ERROR
        assert children[0].attributes["error.type"] == kind
    assert "error.type" not in spans[ok.local_port].attributes

    # the metric: each failure counted under its own kind (the data path classifies them:
    # Stats.count_handshake_error), none left to "error"
    def failures() -> dict[str, float] | None:
        points = {
            r: collector.latest("edgeterm.tls.handshake.failures", reason=r)
            for r in ("timeout", "alert", "protocol_error", "eof", "unknown_sni", "error")
        }
        values = {r: p.value for r, p in points.items() if p is not None and p.value is not None}
        return values if len(values) == 6 and sum(values.values()) == 3 else None

    counted = wait_until(failures, timeout=10, what="3 failed handshakes counted")
    assert counted == {
        "timeout": 1,
        "alert": 1,
        "protocol_error": 1,
        "eof": 0,
        "unknown_sni": 0,
        "error": 0,
    }
    # only the handshake that completed is in the latency histogram, and only its connect
    hist = collector.wait_metric("edgeterm.tls.handshake.duration", lambda p: p.count >= 1)
    assert hist.count == 1
    connect = collector.wait_metric("edgeterm.upstream.connect.duration", lambda p: p.count >= 1)
    assert connect.count == 1


def test_collector_down_then_up(
    edgeterm: EdgetermFactory, echo: EchoUpstream, client_ctx: ssl.SSLContext
) -> None:
    receiver = OtlpReceiver().down()  # the collector is down: connections refused
    sv = start(
        edgeterm,
        [echo.addr],
        telemetry={
            "otlp_endpoint": receiver.endpoint,
            "sample_ratio": 1.0,
            "prometheus_bind": "127.0.0.1:0",
        },
    )
    metrics = prometheus_port(sv)
    try:
        before = [exchange(sv.port, client_ctx) for _ in range(20)]  # served as usual
        assert len(before) == 20

        def lost() -> dict[str, Family] | None:
            f = scrape(metrics)
            spans = f["edgeterm_telemetry_spans_total"]
            done = f["edgeterm_connections_accepted_total"].value() == 20
            return f if done and spans.value(outcome="failed") > 0 else None

        fams = wait_until(lost, timeout=15, what="spans counted as failed")
        assert fams["edgeterm_connections_active"].value() == 0
        assert fams["edgeterm_telemetry_spans_total"].value(outcome="exported") == 0
        wait_until(
            lambda: "telemetry: export to" in sv.server.log(), timeout=10, what="failing logged"
        )
        receiver.start()
        # spans flow again once the exporter reconnects; those of the connections made
        # meanwhile may be lost: keep connecting until some arrive
        seen: set[int] = set()

        def flowing() -> bool:
            seen.add(exchange(sv.port, client_ctx).local_port)
            return bool(seen & set(by_port(receiver.roots())))

        try:
            wait_until(flowing, timeout=20, interval=0.1, what="spans after the collector is up")
        except AssertionError as exc:
            spans = scrape(metrics)["edgeterm_telemetry_spans_total"].samples
            raise AssertionError(f"{exc}; edgeterm's span counters: {spans}") from None
        recovered = wait_until(
            lambda: re.search(r"recovered \((\d+) spans lost", sv.server.log()),
            timeout=10,
            what="recovery logged",
        )
        assert int(recovered[1]) > 0
        receiver.wait_metric("edgeterm.connections.accepted", lambda p: p.value == 20 + len(seen))
    finally:
        receiver.stop()


def test_otlp_http_endpoint(
    edgeterm: EdgetermFactory, echo: EchoUpstream, client_ctx: ssl.SSLContext
) -> None:
    receiver = OtlpHttpReceiver().start()
    try:
        sv = start(
            edgeterm,
            [echo.addr],
            telemetry={"otlp_endpoint": receiver.endpoint, "sample_ratio": 1.0},
        )
        conn = exchange(sv.port, client_ctx)
        receiver.wait_roots(lambda rs: conn.local_port in by_port(rs), what="the span over HTTP")
        receiver.wait_metric("edgeterm.connections.accepted", lambda p: p.value == 1)
    finally:
        receiver.stop()


# --- Prometheus ------------------------------------------------------------------------------


def test_prometheus_counters_match_connections_and_show_rotation(
    edgeterm: EdgetermFactory,
    echo: EchoUpstream,
    collector: OtlpReceiver,
    client_ctx: ssl.SSLContext,
) -> None:
    sv = start(
        edgeterm,
        [echo.addr],
        workers=2,
        telemetry={
            "otlp_endpoint": collector.endpoint,
            "sample_ratio": 0.0,
            "prometheus_bind": "127.0.0.1:0",
        },
    )
    port = prometheus_port(sv)
    first = exchange(sv.port, client_ctx, b"x" * 100)
    conns = [first, exchange(sv.port, client_ctx, b"y" * 10, session=first.session)]
    conns += [exchange(sv.port, client_ctx, b"z" * 5) for _ in range(6)]
    n, resumed = len(conns), sum(c.resumed for c in conns)

    def settled() -> dict[str, Family] | None:
        fams = scrape(port)
        closed = fams.get("edgeterm_connections_closed_total")
        return fams if closed is not None and closed.total() == n else None

    fams = wait_until(settled, timeout=10, what="counters of every connection")
    assert fams["edgeterm_connections_accepted_total"].value() == n
    assert fams["edgeterm_connections_active"].value() == 0
    assert fams["edgeterm_connections_closed_total"].value(reason="done") == n
    hs = fams["edgeterm_tls_handshakes_total"]
    assert (hs.value(kind="full"), hs.value(kind="resumed")) == (n - resumed, resumed)
    b = fams["edgeterm_bytes_total"]
    assert b.value(direction="client_to_upstream") == sum(c.sent for c in conns)
    assert b.value(direction="upstream_to_client") == sum(c.received for c in conns)
    assert fams["edgeterm_workers"].value() == 2
    assert fams["edgeterm_tls_handshake_failures_total"].total() == 0
    for name in (
        "edgeterm_tls_handshake_duration_seconds",
        "edgeterm_upstream_connect_duration_seconds",
    ):
        hist = fams[name]
        assert hist.type == "histogram", name
        assert hist.value("_count") == n, name  # one handshake, one upstream connect each
        assert hist.value("_bucket", le="+Inf") == n, name
        assert 0 < hist.value("_sum") < 10 * n, name
    connect_failures = fams["edgeterm_upstream_connect_failures_total"]
    assert connect_failures.value(reason="error") == connect_failures.value(reason="timeout") == 0
    rotations = fams["edgeterm_tickets_rotations_total"].value()
    age = fams["edgeterm_tickets_key_age_seconds"].value()
    assert age >= 0
    assert fams["edgeterm_reloads_total"].value(result="ok") == 0

    # SIGHUP: reload and ticket key rotation
    time.sleep(1.1)  # so that the new key is visibly younger
    sv.server.send_signal(signal.SIGHUP)

    def rotated() -> dict[str, Family] | None:
        f = scrape(port)
        return f if f["edgeterm_reloads_total"].value(result="ok") == 1 else None

    fams = wait_until(rotated, timeout=20, what="the reload in the metrics")
    assert fams["edgeterm_tickets_rotations_total"].value() == rotations + 1
    assert fams["edgeterm_tickets_key_age_seconds"].value() < age + 1.0
    # counters never go down across the generation change
    assert fams["edgeterm_connections_accepted_total"].value() >= n
    # and worker 0 reports the supervisor's figures over OTLP too
    collector.wait_metric(
        "edgeterm.tickets.rotations", lambda p: p.value == rotations + 1, timeout=15
    )
    collector.wait_metric("edgeterm.reloads", lambda p: p.value == 1, result="ok")

    # a worker killed: restarts counted, counters still monotonic
    st = wait_status(sv.admin_socket, lambda s: len(s["workers"]) == 2, timeout=20, what="2")
    before = fams["edgeterm_connections_accepted_total"].value()
    os.kill(st["workers"][0]["pid"], signal.SIGKILL)

    def restarted() -> dict[str, Family] | None:
        f = scrape(port)
        return f if f["edgeterm_workers_restarts_total"].value() == 1 else None

    fams = wait_until(restarted, timeout=20, what="the restart in the metrics")
    assert fams["edgeterm_connections_accepted_total"].value() >= before

    # not /metrics: 404; a request that is not HTTP: 400
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"http://{HOST}:{port}/nope", timeout=5)
    assert info.value.code == 404
    with socket.create_connection((HOST, port), timeout=5) as raw:
        raw.sendall(b"hello\r\n\r\n")
        assert raw.recv(100).startswith(b"HTTP/1.0 400 ")


def test_access_log_reopens_on_sigusr1(
    edgeterm: EdgetermFactory, echo: EchoUpstream, client_ctx: ssl.SSLContext
) -> None:
    log_file = edgeterm.directory / "access.log"
    sv = start(
        edgeterm,
        [echo.addr],
        telemetry={"access_log": True, "access_log_file": str(log_file)},
    )
    a = exchange(sv.port, client_ctx)
    wait_until(lambda: log_file.exists() and log_file.read_text(), timeout=10, what="a line")
    rotated = log_file.with_suffix(".log.1")
    log_file.rename(rotated)
    sv.server.send_signal(signal.SIGUSR1)
    wait_until(log_file.exists, timeout=10, what="the reopened file")
    b = exchange(sv.port, client_ctx)
    wait_until(lambda: log_file.read_text(), timeout=10, what="a line in the new file")
    old = [json.loads(x) for x in rotated.read_text().splitlines()]
    new = [json.loads(x) for x in log_file.read_text().splitlines()]
    assert [e["client"] for e in old] == [f"{HOST}:{a.local_port}"]
    assert [e["client"] for e in new] == [f"{HOST}:{b.local_port}"]
    assert new[0]["trace_id"] is None  # no OTLP endpoint: not traced


# --- the client's identity: PROXY header, client certificate ----------------------------------


def access_lines(path: Path, n: int) -> list[dict[str, Any]]:
    """The first ``n`` access log lines, once they are written (the log flushes every second)."""

    def ready() -> list[dict[str, Any]] | None:
        text = path.read_text() if path.exists() else ""
        found = [json.loads(line) for line in text.splitlines()]
        return found if len(found) >= n else None

    found = wait_until(ready, timeout=10, what=f"{n} access log lines")
    assert len(found) == n, found
    return found


BALANCED_CLIENTS = {
    "v1": (("203.0.113.7", 51001), ("198.51.100.1", 443)),
    "v2": (("2001:db8::7", 52002), ("2001:db8::1", 8443)),
}


def traced_and_logged(collector: OtlpReceiver, log_file: Path) -> dict[str, object]:
    """``[telemetry]`` with every connection traced to ``collector`` and access-logged."""
    return {
        "otlp_endpoint": collector.endpoint,
        "sample_ratio": 1.0,
        "access_log": True,
        "access_log_file": str(log_file),
    }


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_client_address_from_a_proxy_header_in_spans_and_access_log(
    edgeterm: EdgetermFactory,
    echo: EchoUpstream,
    collector: OtlpReceiver,
    client_ctx: ssl.SSLContext,
    version: str,
) -> None:
    """Behind an L4 balancer (``accept_proxy``) the client is the header's source address,
    not the balancer's (the TCP peer, here 127.0.0.1)."""
    log_file = edgeterm.directory / "access.log"
    listener = {"name": "https", "bind": f"{HOST}:0", "upstream": "app", "backlog": 128}
    sv = start(
        edgeterm,
        [echo.addr],
        telemetry=traced_and_logged(collector, log_file),
        listeners=[{**listener, "accept_proxy": version, "proxy_timeout": 2.0}],
    )
    src, dst = BALANCED_CLIENTS[version]
    header = pp.encode_v1(src, dst) if version == "v1" else pp.encode_v2(src, dst)
    payload = b"behind a balancer\n"
    with tls_after_header(sv.port, client_ctx, header) as s:
        balancer_port = s.getsockname()[1]
        s.sendall(payload)
        assert recv_exactly(s, len(payload), timeout=10) == payload
        s.unwrap()

    roots = collector.wait_roots(lambda rs: src[1] in by_port(rs), what="the span")
    assert len(roots) == 1
    a = roots[0].attributes
    assert (a["client.address"], a["client.port"]) == src
    assert a["edgeterm.close_reason"] == "done"
    (line,) = access_lines(log_file, 1)
    shown = f"[{src[0]}]:{src[1]}" if ":" in src[0] else f"{src[0]}:{src[1]}"
    assert line["client"] == shown, line
    assert line["client"] != f"{HOST}:{balancer_port}"
    assert line["trace_id"] == roots[0].trace_id and line["reason"] == "done"


def test_client_certificate_subject_in_spans_and_access_log(
    edgeterm: EdgetermFactory,
    echo: EchoUpstream,
    collector: OtlpReceiver,
    ca: Path,
    tmp_path: Path,
) -> None:
    pki = make_client_pki(tmp_path / "client-pki")
    log_file = edgeterm.directory / "access.log"
    sv = start(
        edgeterm,
        [echo.addr],
        telemetry=traced_and_logged(collector, log_file),
        tls={"client_auth": "optional", "client_ca": str(pki.ca)},
    )
    with_cert = exchange(sv.port, pki.valid.context(ca, alpn=["http/1.1"]))
    without = exchange(sv.port, client_context(ca, alpn=["http/1.1"]))

    ports = {with_cert.local_port, without.local_port}
    spans = by_port(collector.wait_roots(lambda rs: ports <= set(by_port(rs)), what="2 spans"))
    alice = spans[with_cert.local_port]
    assert alice.attributes["edgeterm.tls.client.cn"] == pki.valid.cn == "alice"
    assert alice.attributes["tls.client.subject"] == "CN=alice"
    (hs,) = [c for c in collector.children(alice) if c.name == "tls.handshake"]
    assert hs.attributes["edgeterm.tls.client.cn"] == "alice"
    anonymous = spans[without.local_port].attributes
    assert "edgeterm.tls.client.cn" not in anonymous and "tls.client.subject" not in anonymous

    by_client = {e["client"]: e for e in access_lines(log_file, 2)}
    assert by_client[f"{HOST}:{with_cert.local_port}"]["client_cn"] == "alice"
    assert by_client[f"{HOST}:{without.local_port}"]["client_cn"] is None


# --- upstream connect failures ----------------------------------------------------------------


def test_upstream_connect_failures_by_reason(
    edgeterm: EdgetermFactory,
    collector: OtlpReceiver,
    refusing_port: RefusingPort,
    blackhole_port: BlackholePort,
    client_ctx: ssl.SSLContext,
) -> None:
    """Every connection tries both servers (passive health off, so neither is skipped): one
    refusal (reason "error") and one timeout each, then closes as upstream_unavailable."""
    sv = start(
        edgeterm,
        [refusing_port.addr, blackhole_port.addr],
        telemetry={"otlp_endpoint": collector.endpoint, "sample_ratio": 1.0},
        timeouts={"connect": 0.3},
        upstreams={"app": {"passive": {"fail_threshold": 0}}},
    )
    n = 3
    ports = []
    for _ in range(n):
        with connect_tls(sv.port, client_ctx) as s:
            ports.append(s.getsockname()[1])
            assert recv_to_eof(s, timeout=10) == b""  # close_notify after the last attempt

    collector.wait_metric("edgeterm.upstream.unavailable", lambda p: p.value == n)
    for reason in ("error", "timeout"):
        collector.wait_metric(
            "edgeterm.upstream.connect.failures", lambda p: p.value == n, reason=reason
        )
    collector.wait_metric(
        "edgeterm.connections.closed", lambda p: p.value == n, reason="upstream_unavailable"
    )
    # handshakes completed, no upstream connect did
    hs = collector.wait_metric("edgeterm.tls.handshake.duration", lambda p: p.count == n)
    assert hs.count == n
    connect = collector.latest("edgeterm.upstream.connect.duration")
    assert connect is not None and connect.count == 0 and connect.sum == 0

    spans = by_port(collector.wait_roots(lambda rs: set(ports) <= set(by_port(rs)), what="spans"))
    for port in ports:
        root = spans[port]
        assert root.status_code == STATUS_ERROR
        assert root.attributes["edgeterm.close_reason"] == "upstream_unavailable"
        (up,) = [c for c in collector.children(root) if c.name == "upstream.connect"]
        assert up.status_code == STATUS_ERROR
        assert up.attributes["error.type"] == "upstream_unavailable"
