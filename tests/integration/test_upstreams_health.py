"""Health (issue 7): a server killed under load is marked down by the supervisor's active
checks, gets no new connection after the detection time, and gets traffic again only once
the checks have seen it back (``rise``); every client connection is served or closed cleanly.
Those tests turn passive health off, so that only the UPSTREAM_STATE pushes to the workers can
take a server out or bring it back. Passive health alone also takes a refusing server out;
with no server left, clients are closed and counted (``upstream_unavailable``); and
``edgeterm status`` shows the state the checks pushed to the workers."""

from __future__ import annotations

import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.configs import write_config
from tests.support.counters import closed_total, wait_cli_status, worker_total
from tests.support.launcher import EdgetermFactory, run_cli
from tests.support.routing import NamedUpstream, read_name
from tests.support.supervision import admin_status, cli_status, wait_status
from tests.support.tlsclient import connect_tls, recv_exactly, recv_to_eof
from tests.support.upstreams import RefusingPort
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(90)

INTERVAL = 0.25
TIMEOUT = 0.5
RISE = 3
FALL = 2
MARGIN = 1.0  # scheduling slack on a busy 2-core machine


@dataclass
class Load:
    """A thread making one request after another; each outcome is (start, how, server)."""

    port: int
    ctx: ssl.SSLContext
    results: list[tuple[float, str, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Load:
        self._thread = threading.Thread(target=self._run, name="load", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            t = time.monotonic()
            name = ""
            try:
                with connect_tls(self.port, self.ctx, timeout=5) as s:
                    name = read_name(s, timeout=5)
                    s.sendall(b"ping")
                    assert recv_exactly(s, 4, timeout=5) == b"ping"
                self.results.append((t, "ok", name))
            except EOFError:  # close_notify before the answer: a clean close
                self.results.append((t, "clean", name))
            except Exception as exc:
                self.results.append((t, f"error {exc!r}", name))
            self._stop.wait(0.002)

    def served_since(self, t: float) -> Counter[str]:
        return Counter(name for start, how, name in self.results if start >= t and how == "ok")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(15)


def server_state(st: dict[str, Any], key: str) -> dict[str, Any]:
    entry: dict[str, Any] = st["upstreams"]["app"][key]
    return entry


def connect_errors(admin: Path) -> int:
    return worker_total(admin_status(admin), "upstream_connect_errors")


def fresh_counters(admin: Path, after: dict[str, Any], *, refreshes: int) -> dict[str, Any]:
    """The status once the workers' counters have changed ``refreshes`` times since ``after``
    (under load, each heartbeat reply brings a new ``accepted`` count)."""
    seen = [worker_total(after, "accepted")]

    def refreshed() -> dict[str, Any] | None:
        st = admin_status(admin)
        if worker_total(st, "accepted") != seen[-1]:
            seen.append(worker_total(st, "accepted"))
        return st if len(seen) > refreshes else None

    st = wait_until(refreshed, timeout=5 + 2 * refreshes, what=f"{refreshes} counter refreshes")
    assert st is not None
    return st


def test_killed_server_is_marked_down_then_back(
    edgeterm: EdgetermFactory, upstream: Callable[..., Any], client_ctx: ssl.SSLContext
) -> None:
    a = upstream(NamedUpstream, name="a")
    b = upstream(NamedUpstream, name="b")
    cfg = edgeterm.config([a.addr, b.addr])
    cfg["upstreams"]["app"]["health"] = {
        "interval": INTERVAL,
        "timeout": TIMEOUT,
        "rise": RISE,
        "fall": FALL,
    }
    # Passive health off: with it (3 failures -> down for 10 s) the workers would take b out
    # by themselves, and this test would pass even if they ignored the supervisor's pushes.
    # Without it, only the UPSTREAM_STATE "down" push stops the connects to b, and only the
    # "up" push brings b back.
    cfg["upstreams"]["app"]["passive"] = {"fail_threshold": 0}
    server = edgeterm.start(cfg=cfg)
    admin = Path(edgeterm.directory) / "run" / "edgeterm.sock"
    st = admin_status(admin)
    assert server_state(st, b.addr)["up"] and server_state(st, a.addr)["up"]
    load = Load(server.port(), client_ctx).start()
    try:
        wait_until(lambda: len(load.served_since(0)) == 2, timeout=10, what="both servers used")

        t_kill = time.monotonic()
        b.close()  # the process "dies": in-flight connections reset, new ones refused
        wait_status(
            admin,
            lambda s: not server_state(s, b.addr)["up"],
            timeout=FALL * INTERVAL + TIMEOUT + 5,
            what="b marked down",
        )
        detected = time.monotonic() - t_kill
        assert detected <= FALL * INTERVAL + TIMEOUT + MARGIN, f"detected after {detected:.2f}s"

        # From now on no connect is even tried on b: the workers' error count stands still.
        # Their counters reach the supervisor with each heartbeat reply (once a second): the
        # second refresh after the detection answers a heartbeat sent after the push.
        st = fresh_counters(admin, admin_status(admin), refreshes=2)
        errors_then = worker_total(st, "upstream_connect_errors")
        t_down = time.monotonic()
        # a window of load (with the push ignored, about every other connect would go to b
        # first and be refused), then two more refreshes to bring its counters
        wait_until(
            lambda: sum(load.served_since(t_down).values()) >= 150,
            timeout=20,
            what="150 requests served after b was down",
        )
        st = fresh_counters(admin, st, refreshes=2)
        assert worker_total(st, "upstream_connect_errors") == errors_then, "connects tried on b"
        assert set(load.served_since(t_down)) == {"a"}

        # b comes back on the same port: traffic returns only after RISE good checks
        t_back = time.monotonic()
        b2 = upstream(NamedUpstream, name="b", port=b.port)
        st = wait_status(
            admin,
            lambda s: server_state(s, b.addr)["up"],
            timeout=RISE * INTERVAL + TIMEOUT + 5,
            what="b up again",
        )
        since = server_state(st, b.addr)["since"] - time.time() + time.monotonic()
        assert since >= t_back + (RISE - 1) * INTERVAL * 0.9  # RISE checks, INTERVAL apart
        wait_until(lambda: len(b2.client_connections()) >= 5, timeout=5, what="clients on b again")
        early = [r.opened_at for r in b2.client_connections() if r.opened_at < since - 0.05]
        assert not early, f"{len(early)} client connection(s) sent to b before it was up"
        assert len(b2.connections()) > len(b2.client_connections())  # the checks connected
        # a was there all along: no client was closed for lack of an upstream
        st = fresh_counters(admin, admin_status(admin), refreshes=1)
        assert worker_total(st, "upstream_unavailable") == 0, st["workers"]
    finally:
        load.stop()
    outcomes = Counter(how for _, how, _ in load.results)
    assert set(outcomes) <= {"ok", "clean"}, outcomes
    assert outcomes["clean"] <= 2, outcomes  # at most the request in flight on b at the kill
    assert outcomes["ok"] > 100, outcomes


def test_passive_health_takes_a_refusing_server_out(
    edgeterm: EdgetermFactory,
    upstream: Callable[..., Any],
    refusing_port: RefusingPort,
    client_ctx: ssl.SSLContext,
) -> None:
    a = upstream(NamedUpstream, name="a")
    cfg = edgeterm.config([refusing_port.addr, a.addr])
    cfg["upstreams"]["app"]["passive"] = {"fail_threshold": 2, "down_for": 30.0}
    server = edgeterm.start(cfg=cfg)
    admin = Path(edgeterm.directory) / "run" / "edgeterm.sock"
    for _ in range(40):  # all served (a connect refused is retried on a), round robin
        with connect_tls(server.port(), client_ctx) as s:
            assert read_name(s) == "a"
    wait_until(lambda: admin_status(admin)["workers"][0]["accepted"] >= 40, timeout=5, what="stats")
    # two refusals marked the server down for 30 s: no attempt on it after those
    assert connect_errors(admin) == 2
    st = cli_status(server.config)  # what `edgeterm status --json` shows
    assert worker_total(st, "upstream_connect_errors") == 2
    assert worker_total(st, "upstream_unavailable") == 0  # every client was served
    assert closed_total(st, "upstream_unavailable") == closed_total(st, "upstream_full") == 0


def test_no_server_left_closes_clients_and_counts_them(
    edgeterm: EdgetermFactory, refusing_port: RefusingPort, client_ctx: ssl.SSLContext
) -> None:
    """The only server refuses; once the active checks took it down, clients get close_notify
    without a connect being tried (passive health off: only the push can stop the connects),
    and each close is counted as ``upstream_unavailable`` in ``edgeterm status --json``."""
    cfg = edgeterm.config([refusing_port.addr])
    cfg["upstreams"]["app"]["health"] = {"interval": INTERVAL, "timeout": TIMEOUT, "fall": FALL}
    cfg["upstreams"]["app"]["passive"] = {"fail_threshold": 0}
    server = edgeterm.start(cfg=cfg)
    admin = Path(edgeterm.directory) / "run" / "edgeterm.sock"
    wait_status(
        admin,
        lambda s: not server_state(s, refusing_port.addr)["up"],
        timeout=FALL * INTERVAL + TIMEOUT + 5,
        what="the refusing server marked down",
    )
    clients = 5
    for _ in range(clients):
        with connect_tls(server.port(), client_ctx) as s:
            assert recv_to_eof(s, timeout=10) == b""  # close_notify, nothing forwarded
    st = wait_cli_status(
        server.config,
        lambda st: closed_total(st, "upstream_unavailable") >= clients,
        timeout=10,
        what=f"{clients} upstream_unavailable closes in edgeterm status",
    )
    assert closed_total(st, "upstream_unavailable") == clients, st["workers"]
    assert closed_total(st, "upstream_full") == 0, st["workers"]
    assert worker_total(st, "upstream_unavailable") == clients, st["workers"]
    assert worker_total(st, "upstream_connect_errors") == 0, st["workers"]  # none tried


def test_health_checks_follow_reloads(edgeterm, upstream, refusing_port, client_ctx):
    """The supervisor's checks follow each new config; a server that stays keeps its state."""
    a = upstream(NamedUpstream, name="a")
    cfg = edgeterm.config([a.addr, refusing_port.addr])
    server = edgeterm.start(cfg=cfg)
    admin = Path(edgeterm.directory) / "run" / "edgeterm.sock"
    assert admin_status(admin)["upstreams"] == {}  # no [health] table: no checks

    health = {"interval": INTERVAL, "timeout": TIMEOUT, "rise": RISE, "fall": FALL}
    cfg["upstreams"]["app"]["health"] = health
    reload(server, cfg)
    st = wait_status(
        admin,
        lambda s: not server_state(s, refusing_port.addr)["up"],
        timeout=5,
        what="the refusing server checked and marked down",
    )
    assert server_state(st, a.addr)["up"]
    since = server_state(st, refusing_port.addr)["since"]

    cfg["upstreams"]["app"]["balance"] = "least_conn"  # another change; same servers
    reload(server, cfg)
    st = admin_status(admin)
    assert server_state(st, refusing_port.addr) == {"up": False, "since": since}
    # the new generation's worker got that state at fork: it never even tries the server
    for _ in range(10):
        with connect_tls(server.port(), client_ctx) as s:
            assert read_name(s) == "a"
    st = wait_status(
        admin,
        lambda s: any(
            w["generation"] == s["generation"] and w["accepted"] >= 10 for w in s["workers"]
        ),
        timeout=5,
        what="the new worker's counters",
    )
    [worker] = [w for w in st["workers"] if w["generation"] == st["generation"]]
    assert worker["upstream_connect_errors"] == 0

    del cfg["upstreams"]["app"]["health"]
    reload(server, cfg)
    assert admin_status(admin)["upstreams"] == {}


def reload(server, cfg):
    write_config(server.config, cfg)
    r = run_cli("reload", "-c", str(server.config), timeout=60)
    assert r.returncode == 0, (r.stdout, r.stderr)
