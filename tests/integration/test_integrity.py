"""Integrity: random bytes both ways at once through edgeterm, compared by SHA-256 at both ends.

The client is asyncio (one thread drives the reads and writes of every connection at the same
time); the upstream is ``SourceSinkUpstream``, which sends its own random bytes while it reads
the client's, so both directions are independent streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import ssl
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from tests.support.upstreams import SourceSinkUpstream, source_sink_header

T = TypeVar("T")
MiB = 1 << 20
CHUNK = 256 * 1024


async def duplex_transfer(
    port: int, ctx: ssl.SSLContext, n_up: int, n_down: int
) -> tuple[str, str]:
    """Send n_up random bytes while receiving n_down; return (sha256 sent, sha256 received)."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname="localhost", limit=4 * CHUNK
    )
    try:
        writer.write(source_sink_header(n_up, n_down))
        sent = hashlib.sha256()

        async def send() -> None:
            left = n_up
            while left:
                data = os.urandom(min(CHUNK, left))
                sent.update(data)
                writer.write(data)
                left -= len(data)
                await writer.drain()

        async def receive() -> str:
            got = hashlib.sha256()
            n = 0
            while n < n_down:
                data = await reader.read(min(MiB, n_down - n))
                if not data:
                    raise EOFError(f"EOF after {n} of {n_down} bytes")
                got.update(data)
                n += len(data)
            return got.hexdigest()

        _, received = await asyncio.gather(send(), receive())
        return sent.hexdigest(), received
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 10)


def run(coro: Coroutine[Any, Any, T], timeout: float) -> T:
    """Run ``coro`` in a fresh event loop, bounded by ``timeout`` seconds."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_64mib_each_way_at_once_on_one_connection(edgeterm, upstream, client_ctx):
    up = upstream(SourceSinkUpstream)
    server = edgeterm.start([up.addr])
    n = 64 * MiB
    sent, received = run(duplex_transfer(server.port(), client_ctx, n, n), timeout=150)
    (rec,) = up.wait_done(1, timeout=30)
    assert rec.error is None
    assert rec.received == n and rec.sent == n
    assert rec.received_sha256 == sent, "client -> upstream bytes differ"
    assert rec.sent_sha256 == received, "upstream -> client bytes differ"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_200_concurrent_connections_1mib_each_way(edgeterm, upstream, client_ctx):
    up = upstream(SourceSinkUpstream)
    server = edgeterm.start([up.addr])
    count, n = 200, MiB

    async def all_at_once() -> list[tuple[str, str]]:
        return await asyncio.gather(
            *(duplex_transfer(server.port(), client_ctx, n, n) for _ in range(count))
        )

    results = run(all_at_once(), timeout=150)
    records = up.wait_done(count, timeout=30)
    assert len(records) == count
    assert [r.error for r in records if r.error] == []
    assert all(r.received == n and r.sent == n for r in records)
    at_upstream = {(r.received_sha256, r.sent_sha256) for r in records}
    assert set(results) == at_upstream
    assert len(at_upstream) == count  # every stream distinct: none crossed or duplicated
