"""Real plaintext upstream servers on 127.0.0.1, for edgeterm to forward to.

All servers run on one asyncio event loop in a background thread (``UpstreamLoop``), so
hundreds of concurrent connections cost no threads. Each accepted connection gets a
``ConnRecord`` with live byte counters and SHA-256 digests of what was received and sent, which
the test thread reads (the counters are plain ints; digests are final once ``done`` is set).

Servers:
- ``EchoUpstream``: echoes every byte; on EOF it half-closes back and then closes.
- ``SourceSinkUpstream``: reads a header line ``b"<n_in> <n_out>\\n"``, then at the same time
  reads exactly n_in bytes and sends n_out random bytes; closes when both are done.
- ``AnswerAfterEofUpstream``: reads until the client's FIN, then writes
  ``sha256(received) + <answer_size random bytes>`` and closes.
- ``GreetThenHalfCloseUpstream``: sends random bytes, shuts its write side (FIN), then reads
  until EOF; the reverse half-close.
- ``RefusingPort``: a bound, non-listening port: every connect gets RST (ECONNREFUSED).
- ``BlackholePort``: a listening port whose accept queue is full: SYNs are dropped, connects hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import socket
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .waiting import wait_until

T = TypeVar("T")

CHUNK = 256 * 1024
HOST = "127.0.0.1"


class UpstreamLoop:
    """One asyncio loop in a daemon thread, hosting any number of upstream servers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="upstream-loop", daemon=True)
        self._started = threading.Event()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._started.set)
        self.loop.run_forever()

    def start(self) -> UpstreamLoop:
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("upstream loop did not start")
        return self

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run ``coro`` on the loop and wait (bounded) for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()


@dataclass
class ConnRecord:
    """What one upstream connection saw. Counters are live; digests final once ``done``."""

    opened_at: float = field(default_factory=time.monotonic)
    closed_at: float | None = None
    received: int = 0
    sent: int = 0
    eof_received: bool = False
    error: str | None = None
    _rx_hash: Any = field(default_factory=hashlib.sha256, repr=False)
    _tx_hash: Any = field(default_factory=hashlib.sha256, repr=False)
    done: threading.Event = field(default_factory=threading.Event, repr=False)
    received_sha256: str = ""
    sent_sha256: str = ""

    def on_received(self, data: bytes) -> None:
        self._rx_hash.update(data)
        self.received += len(data)

    def on_sent(self, data: bytes) -> None:
        self._tx_hash.update(data)
        self.sent += len(data)

    def sent_sha256_so_far(self) -> str:
        """Digest of what was sent until now (for a connection still open)."""
        return str(self._tx_hash.hexdigest())

    def finish(self) -> None:
        self.received_sha256 = self._rx_hash.hexdigest()
        self.sent_sha256 = self._tx_hash.hexdigest()
        self.closed_at = time.monotonic()
        self.done.set()


class Upstream:
    """Base class: a TCP server on 127.0.0.1:<ephemeral> served by ``serve()``."""

    def __init__(self, loop: UpstreamLoop, *, backlog: int = 1024) -> None:
        self._loop = loop
        self._backlog = backlog
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._lock = threading.Lock()
        self.records: list[ConnRecord] = []
        self.port = 0

    @property
    def addr(self) -> str:
        return f"{HOST}:{self.port}"

    def start(self) -> Upstream:
        self._loop.run(self._start())
        return self

    async def _start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, HOST, 0, backlog=self._backlog, limit=CHUNK
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        rec = ConnRecord()
        with self._lock:
            self.records.append(rec)
        self._writers.add(writer)
        try:
            await self.serve(rec, reader, writer)
        except (ConnectionError, OSError, asyncio.IncompleteReadError) as exc:
            rec.error = repr(exc)
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            rec.finish()

    async def serve(
        self, rec: ConnRecord, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        raise NotImplementedError

    # helpers for subclasses ---------------------------------------------------------------

    @staticmethod
    async def read_to_eof(rec: ConnRecord, reader: asyncio.StreamReader) -> None:
        while data := await reader.read(CHUNK):
            rec.on_received(data)
        rec.eof_received = True

    @staticmethod
    async def read_exactly(rec: ConnRecord, reader: asyncio.StreamReader, n: int) -> None:
        left = n
        while left > 0:
            data = await reader.read(min(CHUNK, left))
            if not data:
                raise asyncio.IncompleteReadError(b"", left)
            rec.on_received(data)
            left -= len(data)

    @staticmethod
    async def send_random(rec: ConnRecord, writer: asyncio.StreamWriter, n: int) -> None:
        left = n
        while left > 0:
            data = os.urandom(min(CHUNK, left))
            # Record before writing: the bytes can reach the client (and the test thread can
            # compare hashes) before this coroutine runs again.
            rec.on_sent(data)
            writer.write(data)
            left -= len(data)
            await writer.drain()

    # test-thread API ------------------------------------------------------------------------

    def connections(self) -> list[ConnRecord]:
        with self._lock:
            return list(self.records)

    def wait_connections(self, n: int, timeout: float = 10.0) -> list[ConnRecord]:
        """Wait until at least ``n`` connections were accepted; return all records."""
        wait_until(
            lambda: len(self.records) >= n,
            timeout=timeout,
            what=f"{n} connection(s) to upstream {self.addr} (have {len(self.records)})",
        )
        return self.connections()

    def wait_done(self, n: int, timeout: float = 30.0) -> list[ConnRecord]:
        """Wait until at least ``n`` connections have finished; return the finished ones."""

        def finished() -> list[ConnRecord] | None:
            done = [r for r in self.connections() if r.done.is_set()]
            return done if len(done) >= n else None

        result = wait_until(
            finished,
            timeout=timeout,
            interval=0.02,
            what=f"{n} finished connection(s) on upstream {self.addr}",
        )
        assert result is not None
        return result

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._loop.run(self._close(), timeout=10)

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()


class EchoUpstream(Upstream):
    """Echoes everything; on the client's EOF it sends FIN back and closes."""

    async def serve(
        self, rec: ConnRecord, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while data := await reader.read(CHUNK):
            rec.on_received(data)
            writer.write(data)
            rec.on_sent(data)
            await writer.drain()
        rec.eof_received = True
        if writer.can_write_eof():
            writer.write_eof()


class SourceSinkUpstream(Upstream):
    """Header ``b"<n_in> <n_out>\\n"``; then reads n_in bytes while sending n_out random bytes."""

    async def serve(
        self, rec: ConnRecord, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        header = await reader.readline()
        n_in, n_out = (int(x) for x in header.split())
        await asyncio.gather(
            self.read_exactly(rec, reader, n_in),
            self.send_random(rec, writer, n_out),
        )


def source_sink_header(n_in: int, n_out: int) -> bytes:
    """The header a client sends to ``SourceSinkUpstream``."""
    return b"%d %d\n" % (n_in, n_out)


class AnswerAfterEofUpstream(Upstream):
    """Reads until FIN, then answers ``sha256(received) + answer_size random bytes``, closes."""

    def __init__(self, loop: UpstreamLoop, *, answer_size: int = 1 << 20, **kw: Any) -> None:
        super().__init__(loop, **kw)
        self.answer_size = answer_size

    async def serve(
        self, rec: ConnRecord, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        digest = hashlib.sha256()
        while data := await reader.read(CHUNK):
            rec.on_received(data)
            digest.update(data)
        rec.eof_received = True
        head = digest.digest()
        writer.write(head)
        rec.on_sent(head)
        await self.send_random(rec, writer, self.answer_size)


class GreetThenHalfCloseUpstream(Upstream):
    """Sends ``greeting_size`` random bytes, shuts its write side, then reads until EOF."""

    def __init__(self, loop: UpstreamLoop, *, greeting_size: int = 1 << 20, **kw: Any) -> None:
        super().__init__(loop, **kw)
        self.greeting_size = greeting_size

    async def serve(
        self, rec: ConnRecord, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await self.send_random(rec, writer, self.greeting_size)
        writer.write_eof()
        await self.read_to_eof(rec, reader)


class RefusingPort:
    """A port on 127.0.0.1 that is bound (so nobody else gets it) but not listening."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind((HOST, 0))
        self.port = self._sock.getsockname()[1]
        # readiness: prove that a connect is refused
        probe = socket.socket()
        probe.settimeout(2)
        try:
            err = probe.connect_ex((HOST, self.port))
        finally:
            probe.close()
        if err != errno.ECONNREFUSED:
            self.close()
            raise RuntimeError(
                f"expected ECONNREFUSED on {self.addr}, got {errno.errorcode.get(err, err)}"
            )

    @property
    def addr(self) -> str:
        return f"{HOST}:{self.port}"

    def close(self) -> None:
        self._sock.close()


class BlackholePort:
    """A listening port that never completes a new TCP handshake (its accept queue is full).

    With ``listen(0)`` the kernel queues one connection; we make it ourselves and never accept.
    Later SYNs are dropped, so a connect to this port hangs until the caller gives up.
    """

    def __init__(self) -> None:
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind((HOST, 0))
        self._listener.listen(0)
        self.port = self._listener.getsockname()[1]
        self._fillers: list[socket.socket] = []
        for _ in range(8):  # bounded: connect until a connect hangs; keep the ones that succeed
            probe = socket.socket()
            probe.settimeout(0.3)
            try:
                probe.connect((HOST, self.port))
            except TimeoutError:
                probe.close()
                return
            self._fillers.append(probe)
        self.close()
        raise RuntimeError(f"could not make {self.addr} drop SYNs")

    @property
    def addr(self) -> str:
        return f"{HOST}:{self.port}"

    def close(self) -> None:
        for s in self._fillers:
            s.close()
        self._listener.close()
