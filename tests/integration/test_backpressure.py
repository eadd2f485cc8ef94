"""Backpressure: a slow TLS reader must pause the upstream, not grow edgeterm's memory.

The upstream offers 256 MiB as fast as it can; the client reads about 1 KiB/s. Once the kernel
buffers on both sides are full the upstream must stall (edgeterm stopped reading it), and the
RSS of the edgeterm process tree must stay within 8 MiB of its value before the transfer. Then
the client reads at full speed and all 256 MiB arrive intact.
"""

from __future__ import annotations

import hashlib
import statistics
import time

import pytest

from tests.support import procfs
from tests.support.tlsclient import connect_tls, recv_exactly
from tests.support.upstreams import SourceSinkUpstream, source_sink_header
from tests.support.waiting import Deadline, wait_until

MiB = 1 << 20
TOTAL = 256 * MiB
RSS_MARGIN = 8 * MiB
SLOW_READ = 256  # bytes per tick
TICK = 0.25  # seconds: 1 KiB/s


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_slow_reader_bounds_memory_then_transfer_completes(edgeterm, upstream, client_ctx):
    up = upstream(SourceSinkUpstream)
    server = edgeterm.start([up.addr])
    port = server.port()

    # warm-up: one full-speed transfer, so that lazily allocated buffers already exist
    with connect_tls(port, client_ctx) as s:
        s.sendall(source_sink_header(0, 8 * MiB))
        data = recv_exactly(s, 8 * MiB, timeout=30)
    (warm,) = up.wait_done(1)
    assert hashlib.sha256(data).hexdigest() == warm.sent_sha256
    del data

    s = connect_tls(port, client_ctx, timeout=60)
    try:
        # baseline with the connection established, before any byte of the transfer
        baseline = statistics.median(procfs.tree_rss(server.pid) for _ in range(5))
        s.sendall(source_sink_header(0, TOTAL))
        (_, rec) = up.wait_connections(2)

        got = hashlib.sha256()
        received = 0
        samples: list[int] = []

        def slow_tick() -> None:
            nonlocal received
            chunk = s.recv(SLOW_READ)
            assert chunk, "unexpected EOF during the slow phase"
            got.update(chunk)
            received += len(chunk)
            samples.append(procfs.tree_rss(server.pid))
            time.sleep(TICK)  # pacing of the slow reader, not synchronisation

        # phase 1: read slowly until the upstream stalls (sent unchanged for 1.5 s)
        stall = Deadline(30)
        last_sent, last_change = rec.sent, time.monotonic()
        while time.monotonic() - last_change < 1.5:
            stall.check(f"the upstream to stall (sent {rec.sent} bytes so far)")
            slow_tick()
            if rec.sent != last_sent:
                last_sent, last_change = rec.sent, time.monotonic()
        sent_at_stall = rec.sent
        # phase 2: keep reading slowly for several more seconds, sampling memory
        for _ in range(int(4 / TICK)):
            slow_tick()

        assert rec.sent > 1 * MiB, "the upstream never got going"
        assert sent_at_stall < TOTAL // 2, (
            f"the upstream sent {sent_at_stall / MiB:.0f} MiB to a reader taking 1 KiB/s: "
            "edgeterm did not apply backpressure"
        )
        peak = max(samples)
        assert peak - baseline < RSS_MARGIN, (
            f"edgeterm RSS grew by {(peak - baseline) / MiB:.1f} MiB (baseline "
            f"{baseline / MiB:.1f} MiB, peak {peak / MiB:.1f} MiB) while the client read slowly"
        )

        # phase 3: full speed; everything arrives intact
        s.settimeout(60)
        deadline = Deadline(120)
        while received < TOTAL:
            deadline.check(f"the rest of the 256 MiB (got {received} bytes)")
            chunk = s.recv(min(MiB, TOTAL - received))
            assert chunk, f"EOF after {received} of {TOTAL} bytes"
            got.update(chunk)
            received += len(chunk)
    finally:
        s.close()
    wait_until(rec.done.is_set, timeout=30, what="the upstream to finish")
    assert rec.error is None
    assert rec.sent == TOTAL
    assert got.hexdigest() == rec.sent_sha256
