"""Health (issue 7): a server killed under load is marked down by the supervisor's active
checks, gets no new connection after the detection time, and gets traffic again only once
the checks have seen it back (``rise``); every client connection is served or closed cleanly.
Passive health alone also takes a refusing server out, and ``edgeterm status`` shows the state
the checks pushed to the workers."""

from __future__ import annotations

import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.configs import write_config
from tests.support.launcher import run_cli
from tests.support.routing import NamedUpstream, read_name
from tests.support.supervision import admin_status, wait_status
from tests.support.tlsclient import connect_tls, recv_exactly
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


def server_state(st, key):
    return st["upstreams"]["app"][key]


def connect_errors(admin: Path) -> int:
    return sum(w["upstream_connect_errors"] for w in admin_status(admin)["workers"])


def test_killed_server_is_marked_down_then_back(edgeterm, upstream, client_ctx):
    a = upstream(NamedUpstream, name="a")
    b = upstream(NamedUpstream, name="b")
    cfg = edgeterm.config([a.addr, b.addr])
    cfg["upstreams"]["app"]["health"] = {
        "interval": INTERVAL,
        "timeout": TIMEOUT,
        "rise": RISE,
        "fall": FALL,
    }
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

        # From now on no connect is even tried on b: the workers' error count stands still
        # (their counters reach the supervisor with each heartbeat, once a second).
        time.sleep(1.2)
        errors_then = connect_errors(admin)
        t_down = time.monotonic()
        time.sleep(2.7)  # 1.5 s of load, then a heartbeat to bring the counters
        assert connect_errors(admin) == errors_then
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
    finally:
        load.stop()
    outcomes = Counter(how for _, how, _ in load.results)
    assert set(outcomes) <= {"ok", "clean"}, outcomes
    assert outcomes["clean"] <= 2, outcomes  # at most the request in flight on b at the kill
    assert outcomes["ok"] > 100, outcomes


def test_passive_health_takes_a_refusing_server_out(edgeterm, upstream, refusing_port, client_ctx):
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
