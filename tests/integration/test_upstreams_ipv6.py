"""IPv6 upstream servers (``"[::1]:port"``) with active health checks: edgeterm forwards to
them, the supervisor's checks connect to them over IPv6, take a killed one down and bring it
back, and the status names them as written. Skipped where the host has no ``::1``."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.counters import closed_total, wait_cli_status, worker_total
from tests.support.launcher import EdgetermFactory
from tests.support.routing import NamedUpstream, read_name
from tests.support.supervision import admin_status, wait_status
from tests.support.tlsclient import connect_tls, recv_exactly
from tests.support.upstreams import CHUNK

pytestmark = pytest.mark.timeout(90)

HOST6 = "::1"
INTERVAL = 0.25
TIMEOUT = 0.5
RISE = 2
FALL = 2


def have_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind((HOST6, 0))
            s.listen(1)
    except OSError:
        return False
    return True


if not have_ipv6_loopback():
    pytest.skip("this host has no IPv6 loopback address ::1", allow_module_level=True)


class NamedUpstream6(NamedUpstream):
    """A ``NamedUpstream`` listening on ``[::1]``."""

    @property
    def addr(self) -> str:
        return f"[{HOST6}]:{self.port}"

    async def _start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, HOST6, self.port, backlog=self._backlog, limit=CHUNK, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]


def request(port: int, ctx: ssl.SSLContext) -> str:
    """One connection through edgeterm: the server's name, then an echo."""
    with connect_tls(port, ctx) as s:
        name = read_name(s)
        s.sendall(b"over v6")
        assert recv_exactly(s, 7) == b"over v6"
        return name


def up_state(st: dict[str, Any], key: str) -> bool:
    return bool(st["upstreams"]["app"][key]["up"])


def test_ipv6_upstreams_with_health_checks(
    edgeterm: EdgetermFactory, upstream: Callable[..., Any], client_ctx: ssl.SSLContext
) -> None:
    a = upstream(NamedUpstream6, name="v6a")
    b = upstream(NamedUpstream6, name="v6b")
    assert a.addr.startswith("[::1]:") and b.addr.startswith("[::1]:")
    cfg = edgeterm.config([a.addr, b.addr])
    cfg["upstreams"]["app"]["health"] = {
        "interval": INTERVAL,
        "timeout": TIMEOUT,
        "rise": RISE,
        "fall": FALL,
    }
    cfg["upstreams"]["app"]["passive"] = {"fail_threshold": 0}  # only the checks take b out
    server = edgeterm.start(cfg=cfg)
    port = server.port()
    admin = Path(edgeterm.directory) / "run" / "edgeterm.sock"

    # the checks reach both servers over IPv6 and name them as written
    st = wait_status(
        admin,
        lambda s: len(a.connections()) >= 2 and len(b.connections()) >= 2,
        timeout=5,
        what="health checks on both IPv6 servers",
    )
    assert set(st["upstreams"]["app"]) == {a.addr, b.addr}
    assert up_state(st, a.addr) and up_state(st, b.addr)
    names = [request(port, client_ctx) for _ in range(10)]
    assert Counter(names) == {"v6a": 5, "v6b": 5}  # round robin over both

    b.close()
    wait_status(
        admin,
        lambda s: not up_state(s, b.addr),
        timeout=FALL * INTERVAL + TIMEOUT + 5,
        what="the killed IPv6 server marked down",
    )
    served_before = len(a.client_connections())
    assert [request(port, client_ctx) for _ in range(10)] == ["v6a"] * 10
    assert len(a.client_connections()) == served_before + 10

    t_back = time.monotonic()
    b2 = upstream(NamedUpstream6, name="v6b", port=b.port)
    wait_status(
        admin,
        lambda s: up_state(s, b.addr),
        timeout=RISE * INTERVAL + TIMEOUT + 5,
        what="the IPv6 server up again",
    )
    assert time.monotonic() - t_back >= (RISE - 1) * INTERVAL * 0.9  # RISE checks apart
    names = [request(port, client_ctx) for _ in range(10)]
    assert Counter(names) == {"v6a": 5, "v6b": 5}
    assert len(b2.client_connections()) == 5
    assert len(b2.connections()) > 5  # the checks connected to it as well

    # every client was served: none closed for lack of an upstream (30 accepted in all)
    st = wait_cli_status(
        server.config,
        lambda s: worker_total(s, "accepted") >= 30,
        timeout=10,
        what="the 30 connections in edgeterm status",
    )
    assert worker_total(st, "upstream_unavailable") == 0, st["workers"]
    assert closed_total(st, "upstream_unavailable") == 0, st["workers"]
    # and once b was down, no connect was tried on it (passive health is off)
    assert worker_total(st, "upstream_connect_errors") == 0, st["workers"]
    assert admin_status(admin)["upstreams"]["app"][b.addr]["up"]
