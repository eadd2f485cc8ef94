"""One proxied connection: TLS from the client, plain TCP to an upstream server.

Lifecycle (``workers.state``): accepted -> [proxy-header ->] handshaking -> connecting ->
proxying -> half-closed -> closing -> closed.

Routing and upstreams (docs/routing.md): on a listener with ``accept_proxy`` the balancer's
PROXY header is read first, byte-exact (``MSG_PEEK``, then a ``recv`` of exactly the header's
bytes), so OpenSSL never sees it; its source address becomes ``peer``. After the handshake the
router picks the pool from SNI and ALPN, and the pool's balancer the server; a connect that
fails before any byte was sent tries another server. A pool with ``proxy_protocol`` gets its
header first on the fresh upstream socket, before any client byte, through the same pending
chunk as client data (so backpressure is unchanged).

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
from edgeterm.proxyproto import ProxyHeaderError, ProxyHeaderParser
from edgeterm.sockets import new_upstream_socket
from edgeterm.telemetry import classify_handshake_error

from . import state as S
from .balance import NO_EXCLUDE

if TYPE_CHECKING:
    from .observe import ConnTrace
    from .route import Entry
    from .upstream import Pool
    from .worker import Worker

EV_IN = select.EPOLLIN
EV_OUT = select.EPOLLOUT
EV_BAD = select.EPOLLERR | select.EPOLLHUP

_has_pending = openssl.has_pending_function()
_READ_BUDGET = 8  # reads per readiness event and direction, so one busy peer cannot starve others
LINGER = 1.0  # seconds to wait for the client's EOF after our alert/close_notify
_PEEK = 4096  # bytes peeked for a PROXY header (the parser's maximum v2 size)
_MSG_PEEK = socket.MSG_PEEK

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
R_NO_UPSTREAM = "upstream_unavailable"  # every server down, or all tried and failed
R_UPSTREAM_FULL = "upstream_full"  # every up server at its max_conns (this worker's share)
R_PROXY_TIMEOUT = "proxy_timeout"  # no whole PROXY header within the listener's proxy_timeout
R_PROXY_INVALID = "proxy_header_invalid"  # not a valid PROXY header (no TLS yet: no alert)
R_UNKNOWN_SNI = "unknown_sni"  # tls.strict_sni refused the ClientHello (unrecognized_name)
R_PER_CLIENT = "refused_per_client"  # limits.max_handshakes_per_client, after a PROXY header
R_IDLE = "idle_timeout"
R_CLIENT_ERROR = "client_error"
R_UPSTREAM_ERROR = "upstream_error"
R_SHUTDOWN = "shutdown"
R_NO_RESOURCES = "local_resources"  # no descriptor/memory for the upstream socket


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
        "client_cert",
        "client_cn",
        "deadline",
        "dst",
        "entry",
        "ip",
        "n_c2u",
        "n_u2c",
        "notify_wait",
        "peer",
        "pool",
        "pp",
        "reason",
        "server",
        "sni",
        "so",
        "sock",
        "spoke",
        "sslp",
        "state",
        "t_connect",
        "timer_entry",
        "trace",
        "tried",
        "u2c",
        "u2c_shut",
        "u_eof",
        "uev",
        "ufd",
        "up",
        "w",
    )

    def __init__(
        self, worker: Worker, sock: socket.socket, so: Any, entry: Entry[Pool], peer: Any
    ) -> None:
        self.w = worker
        self.sock = sock  # the client's TCP socket
        self.so = so  # its _ssl._SSLSocket: OpenSSL reads and writes the fd itself
        self.cfd = sock.fileno()
        self.entry = entry  # the listener it came in on
        # The client's address as accept() gave it, replaced by the source address of the
        # PROXY header on an accept_proxy listener: what logs, spans, source_hash and the
        # upstream's PROXY header see. ``dst``: the address the client connected to, when a
        # PROXY header said so (else the socket's own, read only if a pool needs it).
        self.peer: tuple[Any, ...] | None = peer
        self.dst: tuple[str, int] | None = None
        self.pp: ProxyHeaderParser | None = None  # while reading a PROXY header
        self.sni: str | None = None  # set by the worker's SNI callback
        self.client_cert = False  # a client certificate was presented (and so verified)
        self.client_cn: str | None = None  # its subject CN (only when tls.client_auth is on)
        self.pool = entry.default  # until the router has chosen, after the handshake
        self.server = -1  # index in the pool of the current (or last) attempt
        self.tried: set[int] | frozenset[int] = NO_EXCLUDE  # a set after the first failure
        self.state = S.ACCEPTED
        self.timer_entry: list[object] | None = None
        self.deadline = 0.0
        self.up: socket.socket | None = None
        self.ufd = -1
        self.cev = 0
        self.uev = 0
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
        self.t_connect = 0.0  # when the current upstream connect started (loop time)
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
        accept = self.entry.accept
        if accept is not None:
            self.state = S.check(self.state, S.PROXY_HEADER)
            self.pp = ProxyHeaderParser(accept=accept)
            self.deadline = w.loop.now + self.entry.proxy_timeout
        else:
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
            self._attempt_failed()
            self._connect()
        elif st == S.PROXY_HEADER:
            self._close(R_PROXY_TIMEOUT)
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
        elif st == S.PROXY_HEADER:
            self._read_proxy_header()

    # -- PROXY header from a balancer in front -------------------------------------------
    def _read_proxy_header(self) -> None:
        """Consume exactly the header's bytes: peek, then receive what ``take`` says is
        header. The TLS stream behind it stays in the kernel for OpenSSL. Every round takes
        at least one byte, so level-triggered epoll cannot spin."""
        pp = self.pp
        assert pp is not None
        sock = self.sock
        try:
            peeked = sock.recv(_PEEK, _MSG_PEEK)
            if not peeked:
                self._close(R_CLIENT_ERROR)  # EOF before a whole header
                return
            result = pp.feed(sock.recv(pp.take(peeked)))
        except BlockingIOError:
            return
        except ProxyHeaderError:
            self._close(R_PROXY_INVALID)
            return
        except OSError:
            self._close(R_CLIENT_ERROR)
            return
        if result is None:
            return  # more to come (bounded by proxy_timeout and the parser's maximum size)
        self.pp = None
        w = self.w
        if result.src is not None:  # PROXY; LOCAL and UNKNOWN keep the connection's own
            self.peer = result.src
            self.dst = result.dst
            if self.trace is not None:  # the access log and spans name the client too
                self.trace.client_address(result.src)
        if w.hs_per_client and self.peer is not None:
            ip = self.peer[0]
            started = w.hs_by_ip.get(ip, 0)
            if started >= w.hs_per_client:
                w.stats.refused_per_client += 1
                self.reason = R_PER_CLIENT
                self._close(None)
                return
            w.hs_by_ip[ip] = started + 1
            self.ip = ip
        self.state = S.check(self.state, S.HANDSHAKING)
        self.deadline = w.loop.now + w.t_handshake
        w.loop.arm(self, self.deadline)
        self._handshake()  # the ClientHello often came with the header

    def _handshake(self) -> None:
        try:
            self.so.do_handshake()
        except _WantRead:
            self._set_client(EV_IN)
            return
        except _WantWrite:
            self._set_client(EV_OUT)
            return
        except (_SSLError, OSError) as exc:
            self._handshake_failed(exc)
            return
        w = self.w
        # The handshake deadline (its start + t_handshake) has not moved since it started.
        w.stats.observe_handshake(w.loop.now - self.deadline + w.t_handshake)
        if self.ip is not None:
            w.handshake_ended(self.ip)
            self.ip = None
        if self.so.session_reused:
            w.stats.resumed += 1
        else:
            w.stats.full_handshakes += 1
        if w.client_auth:
            self._client_certificate()
        if self.trace is not None:
            self.trace.handshake_done(self.so, w.loop.now)
        self.state = S.check(self.state, S.CONNECTING)
        router = w.router
        if router is not None:
            alpn = self.so.selected_alpn_protocol() if router.uses_alpn else None
            self.pool = router.select(self.entry.index, self.sni, alpn)
        self._connect()

    def _client_certificate(self) -> None:
        """The verified client certificate's subject CN (a dict is built: only with
        tls.client_auth), for the upstream's PROXY header and, when the connection is
        recorded, its access log line and spans. A certificate that did not verify failed
        the handshake."""
        try:
            cert = self.so.getpeercert()
        except (ValueError, _SSLError):
            return
        if not cert:
            return
        self.client_cert = True
        cn = None
        for rdn in cert.get("subject", ()):
            for key, value in rdn:
                if key == "commonName" and cn is None:
                    cn = value
        self.client_cn = cn
        if self.trace is not None:
            self.trace.client_certificate(self.so, cn)

    def _pause_while_connecting(self) -> None:
        if self.state == S.CONNECTING:
            self._set_client(0)

    def _handshake_failed(self, exc: BaseException) -> None:
        """OpenSSL has written its fatal alert: make sure it arrives, then close.

        Closing a socket with unread input makes the kernel send a reset, which can make the
        client drop the alert; so shut our write side and read until the client's EOF, for at
        most ``LINGER`` seconds.
        """
        # The SNI callback marks a name refused by tls.strict_sni.
        reason = R_UNKNOWN_SNI if self.reason == R_UNKNOWN_SNI else R_HANDSHAKE_FAILED
        self.w.stats.count_close(reason)
        self.reason = reason
        if reason == R_HANDSHAKE_FAILED:
            self.w.stats.count_handshake_error(classify_handshake_error(exc)[0])
        if self.trace is not None:
            self.trace.handshake_failed(reason, self.w.loop.now, exc)
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
        """Try servers of the pool until a connect is under way; none left: close cleanly.

        A Unix socket whose backlog is full answers EAGAIN: a failed attempt like a refusal.
        """
        w = self.w
        pool = self.pool
        bal = pool.balancer
        peer = self.peer
        client = peer[0] if peer is not None else None  # for source_hash
        while True:
            i = bal.pick(client, self.tried) if self.attempt < pool.max_attempts else None
            if i is None:
                self._no_server()
                return
            self.server = i
            self.attempt += 1
            addr = pool.servers[i]
            try:
                up = new_upstream_socket(addr.family)
            except OSError:
                # Out of descriptors or memory here, not the server's fault: close this client
                # politely and make the worker stop accepting for a while.
                w.resources_exhausted()
                self._notify_and_close(R_NO_RESOURCES)
                return
            self.t_connect = w.loop.now
            err = up.connect_ex(addr.sockaddr())
            if err == 0 or err == errno.EINPROGRESS:
                self.up = up
                self.ufd = up.fileno()
                bal.acquired(i)  # in flight counts too: the cap holds while connecting
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
            self._attempt_failed()

    def _attempt_failed(self) -> None:
        """The connect to ``self.server`` failed before any byte was sent: passive health,
        and the next pick excludes it."""
        i = self.server
        tried = self.tried
        if tried is NO_EXCLUDE:
            self.tried = {i}
        else:
            assert isinstance(tried, set)
            tried.add(i)
        self.pool.balancer.connect_failed(i, self.w.loop.now)

    def _no_server(self) -> None:
        """No server left for this connection: close_notify, and count why (off the hot
        path: ``why_none`` scans the pool)."""
        w = self.w
        w.stats.upstream_unavailable += 1
        why = self.pool.balancer.why_none(self.tried)
        self._notify_and_close(R_UPSTREAM_FULL if why == "full" else R_NO_UPSTREAM)

    def _drop_upstream(self) -> None:
        up = self.up
        if up is not None:
            self.w.loop.forget(self.ufd)
            up.close()
            self.up = None
            self.ufd = -1
            self.uev = 0
            self.pool.balancer.released(self.server)

    def _connected(self) -> None:
        w = self.w
        pool = self.pool
        pool.balancer.connect_ok(self.server)
        self.state = S.check(self.state, S.PROXYING)
        w.stats.observe_connect(w.loop.now - self.t_connect)
        self.deadline = w.loop.now + w.t_idle
        if self.trace is not None:
            self.trace.upstream_connected(self.upstream_name(), w.loop.now)
        w.loop.arm(self, self.deadline)  # the idle timeout may be shorter than the connect one
        if pool.proxy:
            # First on the wire, before any client byte. What send() does not take waits as
            # the pending chunk, which also holds client reading back until it is out.
            header = self._proxy_header()
            up = self.up
            assert up is not None
            try:
                sent = up.send(header)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._notify_and_close(R_UPSTREAM_ERROR)
                return
            if sent < len(header):
                self.c2u = header
                self.c2u_off = sent
        self._update_interest()
        if self.spoke or _has_pending(self.sslp or self._ssl_pointer()):
            self._pump_c2u()  # read-ahead may hold the client's first bytes: epoll won't say

    def _ssl_pointer(self) -> int:
        self.sslp = openssl.ssl_pointer(self.so)
        return self.sslp

    def _proxy_header(self) -> bytes:
        peer = self.peer
        src = (peer[0], peer[1]) if peer is not None else None
        dst = self.dst
        if dst is None:
            try:
                local = self.sock.getsockname()
                dst = (local[0], local[1])
            except OSError:
                dst = None
        return self.pool.proxy_header(src, dst, self.so, self.sni, self.client_cert, self.client_cn)

    def upstream_name(self) -> str:
        """The server of the current (or last) attempt, as written in the config."""
        i = self.server
        return self.pool.keys[i] if i >= 0 else ""

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
                self._attempt_failed()
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
        """Close at once (graceful timeout expired, immediate stop).

        A connection past its handshake first gets one non-blocking close_notify, so that its
        client sees a clean end of the TLS stream (and may resume its session) rather than a
        bare FIN. Not when bytes for the client are still pending (the record being written
        must complete first, and a close_notify would claim a clean end after a cut stream),
        nor in CLOSING (ours, or a fatal alert, is already out). A full socket buffer or an
        error means the client gets the FIN alone; nothing waits.
        """
        state = self.state
        if state == S.CLOSED:
            return
        if (
            state in (S.CONNECTING, S.PROXYING, S.HALF_CLOSED)
            and self.u2c is None
            and not self.u2c_shut
        ):
            try:
                openssl.shutdown_once(self.so)
            except (_SSLError, OSError):
                pass  # WantWrite (buffer full), or the client is gone: close anyway
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
