"""TLS clients for the tests: stdlib ``ssl`` (OpenSSL) and the ``openssl s_client`` binary.

Every socket made here has a timeout, and ``suppress_ragged_eofs=False``: a TCP FIN without
close_notify raises ``ssl.SSLEOFError`` instead of reading as a clean end of stream.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import selectors
import shutil
import socket
import ssl
import statistics
import subprocess
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .waiting import Deadline, WaitTimeout

HOST = "127.0.0.1"
R = TypeVar("R")


def client_context(
    cafile: Path | str,
    *,
    min_version: ssl.TLSVersion | None = None,
    max_version: ssl.TLSVersion | None = None,
    ciphers: str | None = None,
    alpn: list[str] | None = None,
    check_hostname: bool = True,
) -> ssl.SSLContext:
    """A verifying client context that trusts only ``cafile``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(cafile))
    ctx.check_hostname = check_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    with warnings.catch_warnings():  # TLS 1.0/1.1 bounds are deprecated, used on purpose here
        warnings.simplefilter("ignore", DeprecationWarning)
        if min_version is not None:
            ctx.minimum_version = min_version
        if max_version is not None:
            ctx.maximum_version = max_version
    if ciphers is not None:
        ctx.set_ciphers(ciphers)
    if alpn is not None:
        ctx.set_alpn_protocols(alpn)
    return ctx


def connect_tls(
    port: int,
    ctx: ssl.SSLContext,
    *,
    server_hostname: str | None = "localhost",
    timeout: float = 10.0,
) -> ssl.SSLSocket:
    """TCP connect to 127.0.0.1:port and complete a TLS handshake (raises on failure)."""
    raw = socket.create_connection((HOST, port), timeout=timeout)
    try:
        return ctx.wrap_socket(raw, server_hostname=server_hostname, suppress_ragged_eofs=False)
    except BaseException:
        raw.close()
        raise


def handshake_seconds(port: int, ctx: ssl.SSLContext, *, timeout: float = 10.0) -> float:
    """Wall time of TCP connect + full TLS handshake; the connection is closed afterwards."""
    start = time.perf_counter()
    s = connect_tls(port, ctx, timeout=timeout)
    elapsed = time.perf_counter() - start
    s.close()
    return elapsed


def median_handshake_seconds(port: int, ctx: ssl.SSLContext, n: int = 7) -> float:
    return statistics.median(handshake_seconds(port, ctx) for _ in range(n))


def recv_exactly(sock: socket.socket, n: int, *, timeout: float = 30.0) -> bytes:
    """Read exactly ``n`` bytes (raises on EOF or deadline)."""
    deadline = Deadline(timeout)
    buf = bytearray()
    while len(buf) < n:
        deadline.check(f"reading {n} bytes (got {len(buf)})")
        sock.settimeout(max(0.05, deadline.remaining()))
        data = sock.recv(min(1 << 20, n - len(buf)))
        if not data:
            raise EOFError(f"EOF after {len(buf)} of {n} bytes")
        buf += data
    return bytes(buf)


def _recv_or_clean_eof(sock: socket.socket, n: int) -> bytes:
    """``recv``, with a received close_notify read as b"" in every case.

    CPython returns b"" for close_notify only while we have not sent ours; after our own
    close_notify (a half-close) it raises SSLZeroReturnError for the same clean event. A FIN
    without close_notify still raises SSLEOFError (``suppress_ragged_eofs=False``).
    """
    try:
        return sock.recv(n)
    except ssl.SSLZeroReturnError:
        return b""


def recv_to_eof(sock: socket.socket, *, timeout: float = 30.0) -> bytes:
    """Read until a clean end of stream (for TLS: close_notify); bounded by ``timeout``.

    On a TLS socket made by ``connect_tls`` a FIN without close_notify raises SSLEOFError.
    """
    deadline = Deadline(timeout)
    buf = bytearray()
    while True:
        deadline.check(f"reading to EOF (got {len(buf)} bytes)")
        sock.settimeout(max(0.05, deadline.remaining()))
        data = _recv_or_clean_eof(sock, 1 << 20)
        if not data:
            return bytes(buf)
        buf += data


def sha256_to_eof(sock: socket.socket, *, timeout: float = 60.0) -> tuple[int, str]:
    """Like ``recv_to_eof`` but only counts and hashes (for large transfers)."""
    deadline = Deadline(timeout)
    h = hashlib.sha256()
    n = 0
    while True:
        deadline.check(f"reading to EOF (got {n} bytes)")
        sock.settimeout(max(0.05, deadline.remaining()))
        data = _recv_or_clean_eof(sock, 1 << 20)
        if not data:
            return n, h.hexdigest()
        h.update(data)
        n += len(data)


class BioTlsClient:
    """A blocking TLS client on ``SSLObject`` + ``MemoryBIO``, for exact control of closes.

    ``SSLSocket.unwrap()`` sends close_notify and then, in the same call, reads on to wait for
    the peer's: an answer that arrives meanwhile is an error (APPLICATION_DATA_AFTER_CLOSE_NOTIFY)
    and is lost. Here the incoming BIO is only fed when OpenSSL asks, so ``send_close_notify()``
    sends close_notify and returns with the read side intact: a TLS half-close.

    ``recv()`` returns b"" for a received close_notify and raises ``ssl.SSLEOFError`` for a TCP
    FIN without one (a truncated stream).
    """

    def __init__(
        self,
        port: int,
        ctx: ssl.SSLContext,
        *,
        server_hostname: str | None = "localhost",
        timeout: float = 10.0,
    ) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname=server_hostname)
        try:
            self._run(self.obj.do_handshake)
        except BaseException:
            self.sock.close()
            raise

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.sock.sendall(data)

    def _fill(self) -> None:
        data = self.sock.recv(1 << 18)
        if data:
            self.incoming.write(data)
        else:
            self.incoming.write_eof()

    def _run(self, fn: Callable[..., R], *args: Any) -> R:
        while True:
            try:
                result = fn(*args)
            except ssl.SSLWantReadError:
                self._flush()
                self._fill()
                continue
            self._flush()
            return result

    def version(self) -> str | None:
        return self.obj.version()

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = self._run(self.obj.write, view[: 1 << 16])
            view = view[n:]

    def recv(self, n: int = 1 << 18) -> bytes:
        try:
            return self._run(self.obj.read, n)
        except ssl.SSLZeroReturnError:  # close_notify after our own close_notify
            return b""

    def recv_to_eof(self, *, timeout: float = 30.0) -> bytes:
        deadline = Deadline(timeout)
        buf = bytearray()
        while True:
            deadline.check(f"reading to close_notify (got {len(buf)} bytes)")
            self.sock.settimeout(max(0.05, deadline.remaining()))
            data = self.recv()
            if not data:
                return bytes(buf)
            buf += data

    def send_close_notify(self) -> bool:
        """Send close_notify, keeping the read side open (TLS half-close).

        Returns True if the peer's close_notify had already been received (the shutdown is
        then complete), False if we are now waiting for it.
        """
        try:
            self.obj.unwrap()
        except ssl.SSLWantReadError:
            self._flush()  # first SSL_shutdown queued close_notify; the second wants the peer's
            return False
        self._flush()
        return True

    def shutdown_tcp_write(self) -> None:
        """TCP FIN after close_notify (what many clients do)."""
        self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> BioTlsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PeerClosed:
    """How the peer ended a plain TCP connection, and when."""

    def __init__(self, how: str, data: bytes, after: float) -> None:
        self.how = how  # "eof" | "reset"
        self.data = data  # bytes received before the end (an alert, for instance)
        self.after = after  # seconds since the call started

    def __repr__(self) -> str:
        return f"PeerClosed({self.how!r}, {len(self.data)} bytes, after {self.after:.3f}s)"


def wait_peer_close(sock: socket.socket, *, timeout: float) -> PeerClosed:
    """Read a plain TCP socket until the peer closes it (FIN or RST); raise on deadline."""
    start = time.monotonic()
    deadline = Deadline(timeout)
    buf = bytearray()
    while True:
        if deadline.expired():
            raise WaitTimeout(
                f"peer did not close the connection within {timeout:.1f}s "
                f"(received {bytes(buf[:64])!r}...)"
            )
        sock.settimeout(max(0.05, deadline.remaining()))
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return PeerClosed("reset", bytes(buf), time.monotonic() - start)
        if not data:
            return PeerClosed("eof", bytes(buf), time.monotonic() - start)
        buf += data


def tls_alert(data: bytes) -> tuple[int, int] | None:
    """If ``data`` starts with a TLS alert record, return (level, description)."""
    if len(data) >= 7 and data[0] == 0x15 and data[1] == 0x03:
        return data[5], data[6]
    return None


# openssl s_client ----------------------------------------------------------------------------

OPENSSL = shutil.which("openssl") or "openssl"


@dataclass
class SClientResult:
    returncode: int
    stdout: bytes
    stderr: str

    @property
    def established(self) -> bool:
        return "CONNECTION ESTABLISHED" in self.stderr


def s_client_args(
    port: int, cafile: Path | str, *extra: str, servername: str = "localhost"
) -> list[str]:
    return [
        OPENSSL,
        "s_client",
        "-connect",
        f"{HOST}:{port}",
        "-servername",
        servername,
        "-CAfile",
        str(cafile),
        "-verify_return_error",
        "-brief",
        *extra,
    ]


def s_client_exchange(
    port: int, cafile: Path | str, *extra: str, send: bytes, expect: bytes, timeout: float = 15.0
) -> SClientResult:
    """Run ``openssl s_client``, send ``send`` once connected, wait (bounded) until ``expect``
    has arrived on its stdout, then close stdin (s_client then closes and exits)."""
    proc = subprocess.Popen(
        s_client_args(port, cafile, *extra),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    deadline = Deadline(timeout)
    out = bytearray()
    err = bytearray()
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, out)
    sel.register(proc.stderr, selectors.EVENT_READ, err)
    open_streams = 2

    def pump(until_expect: bool) -> None:
        nonlocal open_streams
        while open_streams and not deadline.expired():
            if until_expect and expect in out:
                return
            for key, _ in sel.select(min(0.2, deadline.remaining())):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    open_streams -= 1
                else:
                    key.data.extend(chunk)

    try:
        proc.stdin.write(send)
        proc.stdin.flush()
        pump(until_expect=True)
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()  # s_client closes the connection and exits
        pump(until_expect=False)
        proc.wait(max(0.5, deadline.remaining()))
    finally:
        sel.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    return SClientResult(proc.returncode, bytes(out), err.decode(errors="replace"))


def s_client_handshake_only(
    port: int, cafile: Path | str, *extra: str, timeout: float = 15.0
) -> SClientResult:
    """Run ``openssl s_client`` with stdin at EOF: it handshakes (or fails) and exits."""
    p = subprocess.run(
        s_client_args(port, cafile, *extra),
        input=b"",
        capture_output=True,
        timeout=timeout,
    )
    return SClientResult(p.returncode, p.stdout, p.stderr.decode(errors="replace"))


def echo_exchange(sock: ssl.SSLSocket, data: bytes) -> None:
    """Send ``data`` through an echo upstream and check that exactly it comes back."""
    sock.sendall(data)
    assert recv_exactly(sock, len(data), timeout=10) == data


def close_cleanly(sock: ssl.SSLSocket) -> None:
    """Our close_notify, then the server's (passed on once the echo upstream has closed)."""
    sock.settimeout(10)
    sock.unwrap()
    sock.close()
