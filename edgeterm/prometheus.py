"""The supervisor's telemetry: a Prometheus text endpoint, and the board workers export from.

* ``telemetry.prometheus_bind`` (off by default): the supervisor serves ``GET /metrics`` in
  the Prometheus text format 0.0.4 from its own loop: non-blocking sockets, at most
  ``MAX_CLIENTS`` at once, requests of at most ``MAX_REQUEST`` bytes, ``CLIENT_TIMEOUT``
  seconds per client, HTTP/1.0 with ``Connection: close``. No thread, no library.
* The figures are the workers' counters (the stats each pushes every second) summed over
  every worker, plus the supervisor's own (restarts, reloads, ticket keys). Counters never go
  down: when a worker exits, its last counters move into a retired total that stays in the
  sums (what it counted in its last second is lost). Gauges (active connections) are summed
  over the workers running now.
* The board (``edgeterm.telemetry.Board``) carries the supervisor's figures to the workers,
  whose OTLP exports include them (worker 0 only); it is created here, before any fork.
"""

from __future__ import annotations

import errno
import logging
import math
import select
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

from edgeterm import telemetry
from edgeterm.config import Address, TelemetryConfig
from edgeterm.sockets import bind_group, bound_address
from edgeterm.telemetry import (
    LATENCY_BOUNDS,
    WORKER_HISTOGRAMS,
    MetricDef,
    Point,
    SupervisorFacts,
)

log = logging.getLogger("edgeterm.supervisor")

MAX_CLIENTS: Final = 16
MAX_REQUEST: Final = 8192
CLIENT_TIMEOUT: Final = 5.0
TICK: Final = 1.0
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

# snapshot keys that identify a worker rather than count something
_IDENTITY: Final = frozenset({"worker", "pid", "cpu", "generation", "draining", "ticket_seq"})
_GAUGES: Final = frozenset({"active"})


# --- sums over workers --------------------------------------------------------------------


def add_snapshot(total: dict[str, Any], snap: Mapping[str, Any], *, gauges: bool = True) -> None:
    """Add one worker's stats snapshot into ``total``: numbers add, tables add per key, lists
    (histogram buckets) add per index. ``gauges=False`` leaves the gauges out (a retired worker
    has no open connection)."""
    for key, value in snap.items():
        if key in _IDENTITY or (not gauges and key in _GAUGES) or isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            total[key] = total.get(key, 0) + value
        elif isinstance(value, Mapping):
            table = total.setdefault(key, {})
            for k, v in value.items():
                if isinstance(v, int | float) and not isinstance(v, bool):
                    table[k] = table.get(k, 0) + v
        elif isinstance(value, list):
            old = total.get(key)
            if isinstance(old, list) and len(old) == len(value):
                total[key] = [a + b for a, b in zip(old, value, strict=True)]
            elif old is None:
                total[key] = list(value)


class Totals:
    """Worker counters summed so that they never decrease across worker exits."""

    def __init__(self) -> None:
        self.retired: dict[str, Any] = {}
        self._last: dict[int, Mapping[str, Any]] = {}

    def update(self, workers: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
        """The sum over ``workers`` (pid -> latest snapshot) and every worker seen before."""
        for pid in [p for p in self._last if p not in workers]:
            add_snapshot(self.retired, self._last.pop(pid), gauges=False)
        total: dict[str, Any] = {}
        add_snapshot(total, self.retired)
        for pid, snap in workers.items():
            if snap:
                self._last[pid] = snap
                add_snapshot(total, snap)
        return total


# --- the text format ------------------------------------------------------------------------


def _escape(value: str) -> str:
    """A label value: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    """A HELP docstring: backslash and newline escaped (quotes stay)."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _labels(labels: Iterable[tuple[str, str]]) -> str:
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
    return f"{{{inner}}}" if inner else ""


def _value(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if math.isnan(v):
        return "NaN"
    return str(int(v)) if v == int(v) and abs(v) < 2**53 else repr(v)


def render(points: list[Point], histograms: list[tuple[MetricDef, list[int], float]]) -> str:
    """The Prometheus text exposition (format 0.0.4) of these points and histograms."""
    lines: list[str] = []
    families: dict[MetricDef, list[tuple[tuple[tuple[str, str], ...], float]]] = {}
    for metric, labels, value in points:
        families.setdefault(metric, []).append((labels, value))
    for metric, samples in families.items():
        name = metric.prom + ("_total" if metric.kind == "counter" else "")
        kind = "counter" if metric.kind == "counter" else "gauge"
        lines.append(f"# HELP {name} {_escape_help(metric.help)}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(f"{name}{_labels(labels)} {_value(value)}" for labels, value in samples)
    for metric, buckets, total in histograms:
        name = metric.prom
        lines.append(f"# HELP {name} {_escape_help(metric.help)}")
        lines.append(f"# TYPE {name} histogram")
        running = 0
        for bound, count in zip((*LATENCY_BOUNDS, math.inf), buckets, strict=True):
            running += count
            lines.append(f'{name}_bucket{{le="{_value(bound)}"}} {running}')
        lines.append(f"{name}_sum {_value(total)}")
        lines.append(f"{name}_count {running}")
    return "\n".join(lines) + "\n"


def exposition(total: Mapping[str, Any], facts: SupervisorFacts, now: float) -> str:
    points = telemetry.worker_points(total) + telemetry.supervisor_points(facts, now)
    histograms = []
    for metric, key in WORKER_HISTOGRAMS:
        buckets, hist_sum = telemetry.histogram_of(total, key)
        histograms.append((metric, buckets, hist_sum))
    return render(points, histograms)


# --- the HTTP endpoint --------------------------------------------------------------------


class _Client:
    """One scrape: read the request head, answer, close. Timed by the loop (``on_timer``)."""

    __slots__ = ("endpoint", "inbuf", "out", "sock", "timer_entry")

    def __init__(self, endpoint: MetricsEndpoint, sock: socket.socket) -> None:
        self.endpoint = endpoint
        self.sock = sock
        self.inbuf = bytearray()
        self.out = b""
        self.timer_entry: list[object] | None = None

    def on_event(self, ev: int) -> None:
        if self.out:
            self._send()
            return
        try:
            data = self.sock.recv(MAX_REQUEST)
        except BlockingIOError:
            return
        except OSError:
            self.endpoint.drop(self)
            return
        self.inbuf += data
        head_end = self.inbuf.find(b"\r\n\r\n")
        if head_end < 0:
            head_end = self.inbuf.find(b"\n\n")
        if head_end < 0:
            if not data:
                self.endpoint.drop(self)  # EOF before a whole request head
            elif len(self.inbuf) >= MAX_REQUEST:
                self._answer(431, "Request Header Fields Too Large", b"request too large\n")
            return
        self._respond(bytes(self.inbuf[:head_end]))

    def _respond(self, head: bytes) -> None:
        request_line = head.split(b"\n", 1)[0].strip()
        parts = request_line.split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            self._answer(400, "Bad Request", b"bad request\n")
            return
        method, target = parts[0], parts[1]
        path = target.split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            self._answer(405, "Method Not Allowed", b"only GET\n", extra="Allow: GET, HEAD\r\n")
        elif path != b"/metrics":
            self._answer(404, "Not Found", b"see /metrics\n")
        else:
            try:
                body = self.endpoint.body()
            except Exception as exc:  # a bug here must not take the supervisor down
                log.error("prometheus endpoint: %s", exc)
                self._answer(500, "Internal Server Error", b"see the edgeterm log\n")
                return
            self._answer(200, "OK", body, head_only=method == b"HEAD", content_type=CONTENT_TYPE)

    def _answer(
        self,
        status: int,
        reason: str,
        body: bytes,
        *,
        head_only: bool = False,
        content_type: str = "text/plain; charset=utf-8",
        extra: str = "",
    ) -> None:
        header = (
            f"HTTP/1.0 {status} {reason}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n"
        )
        self.out = header.encode("ascii") + (b"" if head_only else body)
        self._send()

    def _send(self) -> None:
        try:
            sent = self.sock.send(self.out)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.endpoint.drop(self)
            return
        self.out = self.out[sent:]
        if self.out:
            self.endpoint.loop_modify(self, select.EPOLLOUT)
            return
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.endpoint.drop(self)

    def on_timer(self, now: float) -> None:
        self.endpoint.drop(self)


class MetricsEndpoint:
    """``GET /metrics`` on ``bind``, served from the supervisor's loop."""

    def __init__(self, bind: Address, body: Callable[[], bytes]) -> None:
        """Bind now (raises StartupError), so that a taken port stops the start."""
        self.sock = bind_group(bind, MAX_CLIENTS, 1)[0]
        self.address = bound_address(self.sock)
        self.body = body
        self.loop: Any = None
        self.clients: dict[int, _Client] = {}

    def start(self, loop: Any) -> None:
        self.loop = loop
        loop.add(self.sock.fileno(), select.EPOLLIN, self._on_accept)
        log.info("prometheus endpoint listening addr=%s path=/metrics", self.address)

    def _on_accept(self, _ev: int) -> None:
        loop = self.loop
        for _ in range(MAX_CLIENTS):
            if len(self.clients) >= MAX_CLIENTS:
                return  # the others wait in the backlog until a scrape finishes
            try:
                sock, _addr = self.sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    return
                continue
            sock.setblocking(False)
            client = _Client(self, sock)
            self.clients[sock.fileno()] = client
            loop.add(sock.fileno(), select.EPOLLIN, client.on_event)
            loop.arm(client, loop.now + CLIENT_TIMEOUT)

    def loop_modify(self, client: _Client, events: int) -> None:
        self.loop.modify(client.sock.fileno(), events)

    def drop(self, client: _Client) -> None:
        fd = client.sock.fileno()
        if self.clients.pop(fd, None) is None:
            return
        self.loop.forget(fd)
        self.loop.disarm(client)
        client.sock.close()

    def close_sockets(self) -> None:
        """In a forked worker: close our descriptors without touching the (parent's) loop."""
        for client in self.clients.values():
            client.sock.close()
        self.clients = {}
        self.sock.close()

    def close(self) -> None:
        for client in list(self.clients.values()):
            self.drop(client)
        if self.loop is not None:
            self.loop.remove(self.sock.fileno())
        self.sock.close()


# --- the supervisor's side ------------------------------------------------------------------


class SupervisorTelemetry:
    """Created in the supervisor before any fork: the board, and the Prometheus endpoint when
    ``telemetry.prometheus_bind`` is set. ``facts`` returns what the supervisor knows now."""

    def __init__(self, config: TelemetryConfig, facts: Callable[[], SupervisorFacts]) -> None:
        self.facts = facts
        self.board = telemetry.create_board()
        self.totals = Totals()
        self.endpoint: MetricsEndpoint | None = None
        if config.prometheus_bind is not None:
            self.endpoint = MetricsEndpoint(config.prometheus_bind, self._body)
        self.loop: Any = None

    def start(self, loop: Any) -> None:
        self.loop = loop
        if self.endpoint is not None:
            self.endpoint.start(loop)
        self._tick()

    def _tick(self) -> None:
        try:
            facts = self.facts()
            self.board.publish(facts)
            self.totals.update(facts.workers)
        except Exception as exc:  # metrics must never take the supervisor down
            log.error("telemetry: %s", exc)
        self.loop.call_later(TICK, self._tick)

    def _body(self) -> bytes:
        facts = self.facts()
        total = self.totals.update(facts.workers)
        return exposition(total, facts, time.monotonic()).encode()

    def close_in_child(self) -> None:
        if self.endpoint is not None:
            self.endpoint.close_sockets()

    def close(self) -> None:
        if self.endpoint is not None:
            self.endpoint.close()
