"""Many live TLS connections on one worker.

Regression: with a 64 KiB OpenSSL secure heap, every live connection kept its ephemeral
key-exchange key there and a worker stopped completing handshakes at about 2,000 connections
(loadtest's idle scenario found it). The heap is now sized from limits.max_connections.
"""

from __future__ import annotations

import resource

import pytest

from tests.support.tlsclient import connect_tls

pytestmark = pytest.mark.timeout(120)

N = 2500


def test_one_worker_holds_thousands_of_live_tls_connections(edgeterm, echo, client_ctx):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < N + 200:
        pytest.skip(f"needs {N + 200} descriptors in the test process, the limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 2 * N)), hard))
    server = edgeterm.start([echo.addr], limits={"max_connections": 4 * N})
    port = server.port()
    conns = []
    try:
        for i in range(N):
            s = connect_tls(port, client_ctx, timeout=10)
            conns.append(s)
            if i % 500 == 0:  # the connection is really proxied, not just accepted
                s.sendall(b"ping")
                assert s.recv(4) == b"ping"
        # every one of them still works at the end, the first and the last
        for s in (conns[0], conns[N // 2], conns[-1]):
            s.sendall(b"last")
            assert s.recv(4) == b"last"
    finally:
        for s in conns:
            s.close()
