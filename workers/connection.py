"""One proxied connection: TLS from the client, plain TCP to an upstream server.

Lifecycle (``workers.state``): accepted -> handshaking -> connecting -> proxying ->
half-closed -> closing -> closed.

Data path rules (ARCHITECTURE §4):

* Reads go into the worker's one scratch buffer and are written through at once. Only bytes
  that could not be written are kept, one chunk per direction at most; while a direction holds
  a chunk, the side that feeds it is not read (backpressure). So the high-water mark is one
  chunk (``limits.buffer_size``) and the low-water mark is empty, per direction.
* A TLS write that would block must be retried with the same bytes, so the pending chunk is a
  ``bytes`` copy made only on that slow path.
* Read-ahead is on (one read(2) per burst of records). Bytes OpenSSL has read but not returned
  never wake epoll: when the read budget runs out the pump runs again at the end of the round,
  and wherever client reading resumes (connected, backpressure relieved) ``has_pending`` is
  checked first.
* Half-close both ways: client EOF (close_notify or FIN) -> shutdown(SHUT_WR) upstream once the
  pending chunk is flushed; upstream EOF -> close_notify to the client (exactly one
  SSL_shutdown call, see ``edgeterm.openssl.shutdown_once``). Both done -> close.
* Hot path: no logging, no dict building, no closures; counters are plain ints summed into the
  worker's stats when the connection closes.
"""

from __future__ import annotations

import errno
import select
import socket
import ssl
from typing import TYPE_CHECKING, Any

from edgeterm import openssl
from edgeterm.sockets import new_upstream_socket

from . import state as S

if TYPE_CHECKING:
    from .observe import ConnTrace
    from .upstream import Pool
    from .worker import Worker

EV_IN = select.EPOLLIN
EV_OUT = select.EPOLLOUT
EV_BAD = select.EPOLLERR | select.EPOLLHUP

_has_pending = openssl.has_pending_function()
_READ_BUDGET = 8  # reads per readiness event and direction, so one busy peer cannot starve others
LINGER = 1.0  # seconds to wait for the client's EOF after our alert/close_notify

_WantRead = ssl.SSLWantReadError
_WantWrite = ssl.SSLWantWriteError
# A clean end: the client's close_notify. CPython returns b"" for it only while we have not
# sent ours; after our close_notify (upstream closed first) it raises SSLZeroReturnError.
# SSLEOFError is a FIN without close_notify (a "ragged" EOF), also an end of stream here.
_SSLEOF = (ssl.SSLEOFError, ssl.SSLZeroReturnError)
_SSLError = ssl.SSLError

# Close reasons, counted by the worker (Stats.closed_by).
R_DONE = "done"
R_HANDSHAKE_FAILED = "handshake_failed"
R_HANDSHAKE_TIMEOUT = "handshake_timeout"
R_NO_UPSTREAM = "upstream_unavailable"
R_IDLE = "idle_timeout"
R_CLIENT_ERROR = "client_error"
R_UPSTREAM_ERROR = "upstream_error"
R_SHUTDOWN = "shutdown"


class Connection:
    __slots__ = (
        "__weakref__",  # the _ssl object's owner is the connection (see the context setter)
        "attempt",
        "c2u",
        "c2u_off",
        "c2u_shut",
        "c_eof",
        "cev",
        "cfd",
        "deadline",
        "ip",
        "n_c2u",
        "n_u2c",
        "notify_wait",
        "pool",
        "reason",
        "so",
        "sock",
        "spoke",
        "sslp",
        "start",
        "state",
        "timer_entry",
        "trace",
        "u2c",
        "u2c_shut",
        "u_eof",
        "uev",
        "ufd",
        "up",
        "w",
    )

    def __init__(self, worker: Worker, sock: socket.socket, so: Any, pool: Pool) -> None:
        self.w = worker
        self.sock = sock  # the client's TCP socket
        self.so = so  # its _ssl._SSLSocket: OpenSSL reads and writes the fd itself
        self.cfd = sock.fileno()
        self.pool = pool
        self.state = S.ACCEPTED
        self.timer_entry: list[object] | None = None
        self.deadline = 0.0
        self.up: socket.socket | None = None
        self.ufd = -1
        self.cev = 0
        self.uev = 0
        self.start = 0
        self.attempt = 0
        self.c2u: bytes | None = None
        self.c2u_off = 0
        self.u2c: bytes | None = None
        self.c_eof = False
        self.u_eof = False
        self.c2u_shut = False
        self.u2c_shut = False
        self.notify_wait = False
        self.spoke = False
        self.sslp = 0  # the SSL * of ``so``, read once when first needed
        self.ip: str | None = None  # set while a handshake counts against its client address
        self.trace: ConnTrace | None = None  # only for sampled / access-logged connections
        self.reason = R_DONE  # why a lingering close ends (set by _notify_and_close)
        self.n_c2u = 0
        self.n_u2c = 0

    # The SNI callback is handed the _ssl object's owner, this connection, and switches the
    # certificate by setting ``context`` on it.
    @property
    def context(self) -> ssl.SSLContext:
        ctx: ssl.SSLContext = self.so.context
        return ctx

    @context.setter
    def context(self, ctx: ssl.SSLContext) -> None:
        self.so.context = ctx

    # -- lifecycle -----------------------------------------------------------------------
    def begin(self) -> None:
        w = self.w
        self.state = S.check(self.state, S.HANDSHAKING)
        self.deadline = w.loop.now + w.t_handshake
        w.loop.arm(self, self.deadline)
        self.cev = EV_IN
        w.loop.add(self.cfd, EV_IN, self.on_client)

    def on_timer(self, now: float) -> None:
        st = self.state
        if st == S.CLOSED:
            return
        if now < self.deadline:
            self.w.loop.arm(self, self.deadline)
            return
        if st == S.HANDSHAKING:
            self._close(R_HANDSHAKE_TIMEOUT)
        elif st == S.CONNECTING:
            self.w.stats.upstream_connect_timeouts += 1
            self._drop_upstream()
            self._connect()
        elif st == S.CLOSING:
            self._close(None)
        else:
            self._notify_and_close(R_IDLE)

    # -- client socket -------------------------------------------------------------------
    def on_client(self, ev: int) -> None:
        st = self.state
        if st == S.PROXYING or st == S.HALF_CLOSED:
            if ev & EV_OUT:
                self._flush_u2c()
            if ev & (EV_IN | EV_BAD) and self.state != S.CLOSED and self.c2u is None:
                self._pump_c2u()
        elif st == S.HANDSHAKING:
            self._handshake()
        elif st == S.CONNECTING:
            # The client spoke before the upstream answered. Level-triggered epoll would report
            # the same bytes again and again, so stop listening, but only at the end of this
            # round: the connect often completes in the same round, and then we read at once.
            if ev & EV_BAD:
                self._close(R_CLIENT_ERROR)
            elif not self.spoke:
                self.spoke = True
                self.w.loop.call_soon(self._pause_while_connecting)
        elif st == S.CLOSING:
            self._linger(ev)

    def _handshake(self) -> None:
        try:
            self.so.do_handshake()
        except _WantRead:
            self._set_client(EV_IN)
            return
        except _WantWrite:
            self._set_client(EV_OUT)
            return
        except (_SSLError, OSError):
            self._handshake_failed()
            return
        w = self.w
        if self.ip is not None:
            w.handshake_ended(self.ip)
            self.ip = None
        if self.so.session_reused:
            w.stats.resumed += 1
        else:
            w.stats.full_handshakes += 1
        if self.trace is not None:
            self.trace.handshake_done(self.so, w.loop.now)
        self.state = S.check(self.state, S.CONNECTING)
        self.start = self.pool.first()
        self._connect()

    def _pause_while_connecting(self) -> None:
        if self.state == S.CONNECTING:
            self._set_client(0)

    def _handshake_failed(self) -> None:
        """OpenSSL has written its fatal alert: make sure it arrives, then close.

        Closing a socket with unread input makes the kernel send a reset, which can make the
        client drop the alert; so shut our write side and read until the client's EOF, for at
        most ``LINGER`` seconds.
        """
        self.w.stats.count_close(R_HANDSHAKE_FAILED)
        self.reason = R_HANDSHAKE_FAILED
        if self.trace is not None:
            self.trace.handshake_failed(R_HANDSHAKE_FAILED, self.w.loop.now)
        if self.ip is not None:
            self.w.handshake_ended(self.ip)
            self.ip = None
        self.state = S.check(self.state, S.CLOSING)
        self._linger_start()

    def _linger_start(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(None)
            return
        self.deadline = self.w.loop.now + LINGER
        self.w.loop.arm(self, self.deadline)
        self._set_client(EV_IN)

    def _linger(self, ev: int) -> None:
        try:
            n = self.sock.recv_into(self.w.mv)
        except BlockingIOError:
            return
        except OSError:
            n = 0
        if n == 0:
            self._close(None)

    # -- upstream connect ----------------------------------------------------------------
    def _connect(self) -> None:
        w = self.w
        while True:
            addr = self.pool.server(self.start, self.attempt)
            if addr is None:
                w.stats.upstream_unavailable += 1
                self._notify_and_close(R_NO_UPSTREAM)
                return
            self.attempt += 1
            up = new_upstream_socket(addr.family)
            err = up.connect_ex(addr.sockaddr())
            if err == 0 or err == errno.EINPROGRESS:
                self.up = up
                self.ufd = up.fileno()
                if err == 0:
                    w.loop.add(self.ufd, 0, self.on_upstream)
                    self._connected()
                else:
                    self.uev = EV_OUT
                    w.loop.add(self.ufd, EV_OUT, self.on_upstream)
                    self.deadline = w.loop.now + w.t_connect
                    w.loop.arm(self, self.deadline)
                return
            up.close()
            w.stats.upstream_connect_errors += 1

    def _drop_upstream(self) -> None:
        up = self.up
        if up is not None:
            self.w.loop.forget(self.ufd)
            up.close()
            self.up = None
            self.ufd = -1
            self.uev = 0

    def _connected(self) -> None:
        w = self.w
        self.state = S.check(self.state, S.PROXYING)
        self.deadline = w.loop.now + w.t_idle
        if self.trace is not None:
            self.trace.upstream_connected(self.upstream_name(), w.loop.now)
        w.loop.arm(self, self.deadline)  # the idle timeout may be shorter than the connect one
        self._update_interest()
        if self.spoke or _has_pending(self.sslp or self._ssl_pointer()):
            self._pump_c2u()  # read-ahead may hold the client's first bytes: epoll won't say

    def _ssl_pointer(self) -> int:
        self.sslp = openssl.ssl_pointer(self.so)
        return self.sslp

    def upstream_name(self) -> str:
        addr = self.pool.server(self.start, self.attempt - 1)
        return str(addr) if addr is not None else ""

    def on_upstream(self, ev: int) -> None:
        st = self.state
        if st == S.PROXYING or st == S.HALF_CLOSED:
            if ev & EV_OUT:
                self._flush_c2u()
            if ev & (EV_IN | EV_BAD) and self.state != S.CLOSED and self.u2c is None:
                self._pump_u2c()
        elif st == S.CONNECTING:
            up = self.up
            assert up is not None
            if up.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                self.w.stats.upstream_connect_errors += 1
                self._drop_upstream()
                self._connect()
            else:
                self._connected()

    # -- forwarding ----------------------------------------------------------------------
    def _pump_c2u(self) -> None:
        """Client -> upstream: decrypt records into the scratch buffer, then one send.

        A TLS read returns at most one record (16 KiB); filling the buffer with several
        before writing saves send(2) calls in bulk transfers.
        """
        if self.c_eof or self.c2u is not None:
            return
        w = self.w
        so = self.so
        up = self.up
        assert up is not None
        buf = w.buf
        mv = w.mv
        size = w.bufsize
        self.deadline = w.loop.now + w.t_idle
        for _ in range(_READ_BUDGET):
            off = 0
            eof = False
            while off < size:
                try:
                    n = so.read(size - off, mv[off:] if off else buf)
                except (_WantRead, _WantWrite):
                    break
                except _SSLEOF:
                    n = 0
                except (_SSLError, OSError):
                    self._close(R_CLIENT_ERROR)
                    return
                if n == 0:
                    eof = True
                    break
                off += n
                # Stop at a short read unless OpenSSL still holds bytes (read-ahead): another
                # read would only cost a read(2) failing with EAGAIN and an exception; bytes
                # still in the kernel wake epoll again (level-triggered).
                sslp = self.sslp or self._ssl_pointer()
                if not _has_pending(sslp):
                    break
            if off:
                self.n_c2u += off
                try:
                    sent = up.send(mv[:off])
                except BlockingIOError:
                    sent = 0
                except OSError:
                    self._notify_and_close(R_UPSTREAM_ERROR)
                    return
                if sent < off:
                    self.c2u = mv[sent:off].tobytes()
                    self.c2u_off = 0
                    if eof:
                        self.c_eof = True  # _flush_c2u passes the EOF on after the chunk
                    self._update_interest()
                    return
            if eof:
                self.c_eof = True
                if self.u2c_shut:
                    # Both directions done; the upstream's EOF was read, so closing cannot
                    # reset it: skip the shutdown and the interest change.
                    self._close(R_DONE)
                    return
                self._update_interest()
                self._shut_upstream()
                return
            if off < size:
                return  # nothing buffered: epoll tells us when there is more
        # The budget ran out: OpenSSL may hold more (read-ahead), which epoll will not report.
        w.loop.call_soon(self._pump_c2u)

    def _pump_u2c(self) -> None:
        """Upstream -> client: read into the scratch buffer, encrypt through at once."""
        if self.u_eof or self.u2c is not None:
            return
        w = self.w
        so = self.so
        up = self.up
        assert up is not None
        buf = w.buf
        mv = w.mv
        size = w.bufsize
        self.deadline = w.loop.now + w.t_idle
        for _ in range(_READ_BUDGET):
            try:
                n = up.recv_into(buf)
            except BlockingIOError:
                return
            except OSError:
                self._notify_and_close(R_UPSTREAM_ERROR)
                return
            if n == 0:
                self.u_eof = True
                self._update_interest()
                self._notify_client()
                return
            self.n_u2c += n
            try:
                so.write(mv[:n])
            except (_WantWrite, _WantRead):
                self.u2c = mv[:n].tobytes()
                self._update_interest()
                return
            except (_SSLError, OSError):
                self._close(R_CLIENT_ERROR)
                return
            if n < size:
                return  # short read: the socket is drained; epoll reports the next bytes

    def _flush_c2u(self) -> None:
        data = self.c2u
        if data is None:
            return
        up = self.up
        assert up is not None
        try:
            sent = up.send(memoryview(data)[self.c2u_off :])
        except BlockingIOError:
            return
        except OSError:
            self._notify_and_close(R_UPSTREAM_ERROR)
            return
        self.c2u_off += sent
        if self.c2u_off < len(data):
            return
        self.c2u = None
        self.deadline = self.w.loop.now + self.w.t_idle
        if self.c_eof:
            self._update_interest()
            self._shut_upstream()
        else:
            self._update_interest()
            if _has_pending(self.sslp or self._ssl_pointer()):
                self._pump_c2u()

    def _flush_u2c(self) -> None:
        data = self.u2c
        if data is not None:
            try:
                self.so.write(data)
            except (_WantWrite, _WantRead):
                return
            except (_SSLError, OSError):
                self._close(R_CLIENT_ERROR)
                return
            self.u2c = None
            self.deadline = self.w.loop.now + self.w.t_idle
            self._update_interest()
            if self.u_eof:
                self._notify_client()
        elif self.notify_wait:
            self._notify_client()

    # -- half-close ----------------------------------------------------------------------
    def _shut_upstream(self) -> None:
        """The client has finished sending: pass its EOF on once nothing is pending."""
        if self.c2u is not None or self.c2u_shut:
            return
        up = self.up
        assert up is not None
        try:
            up.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(R_UPSTREAM_ERROR)
            return
        self.c2u_shut = True
        self._direction_done()

    def _notify_client(self) -> None:
        """The upstream has finished sending: close_notify to the client."""
        if self.u2c is not None or self.u2c_shut:
            return
        try:
            openssl.shutdown_once(self.so)
        except _WantWrite:
            self.notify_wait = True
            self._update_interest()
            return
        except (_SSLError, OSError):
            self._close(R_CLIENT_ERROR)
            return
        self.notify_wait = False
        self.u2c_shut = True
        self._update_interest()
        self._direction_done()

    def _direction_done(self) -> None:
        if self.c2u_shut and self.u2c_shut:
            self._close(R_DONE)
        elif self.state == S.PROXYING:
            self.state = S.check(self.state, S.HALF_CLOSED)

    # -- interest ------------------------------------------------------------------------
    def _set_client(self, events: int) -> None:
        if events != self.cev:
            self.w.loop.modify(self.cfd, events)
            self.cev = events

    def _update_interest(self) -> None:
        """Derive both sockets' epoll interest from the connection's flow state."""
        c = 0
        if not self.c_eof and self.c2u is None:
            c = EV_IN
        if self.u2c is not None or self.notify_wait:
            c |= EV_OUT
        if c != self.cev:
            self.w.loop.modify(self.cfd, c)
            self.cev = c
        if self.up is not None:
            u = 0
            if not self.u_eof and self.u2c is None:
                u = EV_IN
            if self.c2u is not None:
                u |= EV_OUT
            if u != self.uev:
                self.w.loop.modify(self.ufd, u)
                self.uev = u

    # -- closing -------------------------------------------------------------------------
    def _notify_and_close(self, reason: str) -> None:
        """Close a connection whose handshake completed: close_notify first, then linger.

        Without close_notify, OpenSSL clients treat the session as broken and never resume it.
        """
        self.w.stats.count_close(reason)
        self.reason = reason
        self._drop_upstream()
        if not self.u2c_shut:
            try:
                openssl.shutdown_once(self.so)
            except (_SSLError, OSError):
                self._close(None)
                return
        self.state = S.check(self.state, S.CLOSING)
        self._linger_start()

    def abort(self) -> None:
        """Close at once (graceful timeout expired, immediate stop)."""
        if self.state != S.CLOSED:
            self._close(R_SHUTDOWN)

    def _close(self, reason: str | None) -> None:
        if self.state == S.CLOSED:
            return
        self.state = S.check(self.state, S.CLOSED)
        w = self.w
        if self.ip is not None:
            w.handshake_ended(self.ip)
            self.ip = None
        loop = w.loop
        loop.forget(self.cfd)
        self.sock.close()
        self._drop_upstream()
        loop.disarm(self)
        if reason is not None:
            w.stats.count_close(reason)
        if self.trace is not None:
            self.trace.closed(reason or self.reason, self.n_c2u, self.n_u2c, loop.now)
        w.connection_closed(self)
