"""The process contract: readiness lines, one per listener; SIGTERM/SIGINT stop it with exit 0."""

from __future__ import annotations

import signal
import socket

import psutil
import pytest

from tests.support import procfs
from tests.support.tlsclient import connect_tls, recv_exactly
from tests.support.upstreams import EchoUpstream

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_gracefully_with_exit_0(edgeterm, echo, client_ctx, sig):
    server = edgeterm.start([echo.addr])
    port = server.port()
    with connect_tls(port, client_ctx) as s:
        s.sendall(b"hello")
        assert recv_exactly(s, 5) == b"hello"
    tree = procfs.tree_pids(server.pid)
    assert server.ready_pid in tree

    server.send_signal(sig)
    code = server.wait_exit(20)
    assert code == 0, f"exit code {code}"
    _, alive = psutil.wait_procs([psutil.Process(p) for p in tree if psutil.pid_exists(p)], 5)
    assert not alive, f"processes left after the stop: {alive}"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_each_listener_reported_with_its_real_port(edgeterm, upstream, client_ctx):
    """Two listeners, both on 127.0.0.1:0: each gets its own port, reported and serving."""
    a, b = upstream(EchoUpstream), upstream(EchoUpstream)
    cfg = edgeterm.config([a.addr])
    cfg["listeners"].append({"name": "second", "bind": "127.0.0.1:0", "upstream": "other"})
    cfg["upstreams"]["other"] = {"servers": [b.addr]}
    server = edgeterm.start(cfg=cfg)
    assert set(server.listeners) == {"https", "second"}
    ports = {name: port for name, (_, port) in server.listeners.items()}
    assert all(p > 0 for p in ports.values()) and len(set(ports.values())) == 2
    for name, up in (("https", a), ("second", b)):
        with connect_tls(server.port(name), client_ctx) as s:
            s.sendall(name.encode())
            assert recv_exactly(s, len(name)) == name.encode()
        assert len(up.wait_connections(1)) == 1
    # the ready line comes after every listening line
    lines = server.log().splitlines()
    ready = next(i for i, line in enumerate(lines) if "ready pid=" in line)
    listening = [i for i, line in enumerate(lines) if "listening name=" in line]
    assert len(listening) == 2 and max(listening) < ready
