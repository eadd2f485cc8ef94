"""A worker: one epoll loop serving the listening sockets it was handed.

The worker never binds a listening socket: the supervisor does, and holds a copy of each for
as long as a worker may need it. That is what lets a replacement worker or a new generation
take over the same sockets without dropping their accept queues (ARCHITECTURE §2). The worker
closes only its own copies (descriptors inherited at fork), when it drains: see below.

Accepting: in batches of ``ACCEPT_BATCH`` per readiness event; at ``limits.max_connections``
the listeners are taken out of the loop (clients wait in the kernel's accept queue, they are
not refused) and put back when a connection closes; on EMFILE/ENFILE/ENOBUFS/ENOMEM the
worker stops accepting for a back-off that doubles up to one second and resets on success.

Draining: accept what is queued once more (until EAGAIN), then close our copies of the
listening sockets at once, let connections finish; at the graceful deadline the rest are
closed and the loop stops. Closing our copies is what makes a stopping server refuse new
clients instead of leaving them in an accept queue nobody reads (ARCHITECTURE §9, pitfall 2):
a socket ends with its last descriptor, and on a final stop the supervisor has already let go
of its own, so the last holder is a worker and the socket goes away right after that worker's
last ``accept``. On a reload the new generation and the supervisor still hold the sockets that
continue, so closing ours takes nothing away from them (docs/operations.md, "Stopping").

Heartbeats: any message from the supervisor counts as one (it sends one every second). With
none for ``server.heartbeat_timeout`` (a stopped or hung supervisor; a dead one closes the
channel, which drains at once) the worker drains and exits.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from edgeterm import control, tickets
from edgeterm.config import Config, ListenerConfig
from edgeterm.tls import TlsContexts

from .connection import R_UNKNOWN_SNI, Connection
from .loop import Loop
from .observe import Observer
from .route import Entry, Router
from .stats import Stats
from .upstream import Pool

log = logging.getLogger("edgeterm.worker")

ACCEPT_BATCH = 64
_BACKOFF_MIN = 0.01
_BACKOFF_MAX = 1.0
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


@dataclass(frozen=True, slots=True)
class Listener:
    config: ListenerConfig
    sock: socket.socket


class Worker:
    def __init__(
        self,
        config: Config,
        contexts: TlsContexts,
        listeners: Sequence[Listener],
        *,
        worker_id: int = 0,
        generation: int = 0,
        cpu: int | None = None,
        control_sock: socket.socket | None = None,
        ticket_callback: tickets.TicketCallback | None = None,
        observer: Observer | None = None,
        worker_count: int = 1,
        upstream_state: Mapping[str, Mapping[str, bool]] | None = None,
    ) -> None:
        """``worker_count``: workers of this generation (they share each server's
        ``max_conns``); ``upstream_state``: the active health state at fork, pool -> server
        key -> up (later changes come as UPSTREAM_STATE messages)."""
        self.config = config
        self.worker_id = worker_id
        self.cpu = cpu
        self.generation = generation
        self.loop = Loop()
        self.stats = Stats()
        self.bufsize = config.limits.buffer_size
        self.buf = bytearray(self.bufsize)
        self.mv = memoryview(self.buf)
        self.t_handshake = config.timeouts.handshake
        self.t_connect = config.timeouts.connect
        self.t_idle = config.timeouts.idle
        self.max_connections = config.limits.max_connections
        # The low-level wrap (what SSLSocket uses inside): no SSLSocket object per connection,
        # and none of the getsockopt/getsockname/getpeername/ioctl calls it makes.
        self._wrap = contexts.default._wrap_socket  # type: ignore[attr-defined]
        self._listeners = list(listeners)
        # Routing (docs/routing.md): this generation's pools, each with this worker's
        # balancer; the router only when there are routes (else: the listener's pool).
        self.pools = {name: Pool(up, workers=worker_count) for name, up in config.upstreams.items()}
        self.apply_upstream_state(upstream_state or {})
        lcfgs = [lst.config for lst in self._listeners]
        self.router: Router[Pool] | None = (
            Router(lcfgs, config.routes, self.pools) if config.routes else None
        )
        self.client_auth = config.tls.client_auth != "none"
        self._install_sni_callback(contexts)
        entries = [
            Entry(i, lst.config, self.pools[lst.config.upstream])
            for i, lst in enumerate(self._listeners)
        ]
        self._acceptors: list[tuple[int, Callable[[], int]]] = [
            (lst.sock.fileno(), self._make_acceptor(lst.sock, entry))
            for lst, entry in zip(self._listeners, entries, strict=True)
        ]
        self._accepting = False
        self._backoff = 0.0
        self._backoff_call: object | None = None
        self.conns: set[Connection] = set()
        self.hs_rate = config.limits.max_handshakes_per_second
        self._tokens = float(self.hs_rate)
        self._tokens_at = self.loop.now
        self._rate_call: object | None = None
        self.hs_per_client = config.limits.max_handshakes_per_client
        self.hs_by_ip: dict[str, int] = {}
        self.draining = False
        self._control = control_sock
        self._decoder = control.Decoder()
        self.heartbeat_timeout = config.server.heartbeat_timeout
        self.last_heartbeat = 0.0
        self.tickets = ticket_callback
        self.observer = observer

    # -- accepting ---------------------------------------------------------------------
    def _install_sni_callback(self, contexts: TlsContexts) -> None:
        """Certificate choice as ``TlsContexts.sni_callback`` does it, plus: remember the
        name on the connection (the router and the PROXY v2 authority TLV read it) and mark
        a refusal by tls.strict_sni so that it is counted as ``unknown_sni``. OpenSSL hands
        the callback the _ssl object's owner, the ``Connection``."""
        choose = contexts.sni_callback

        def on_sni(conn: Any, server_name: str | None, ctx: ssl.SSLContext) -> int | None:
            conn.sni = server_name
            refused = choose(conn, server_name, ctx)
            if refused is not None:
                conn.reason = R_UNKNOWN_SNI
            return refused

        contexts.default.sni_callback = on_sni

    def apply_upstream_state(self, state: Mapping[str, Mapping[str, bool]]) -> None:
        """Active health results (pool -> server key -> up) for this generation's pools."""
        for pool_name, servers in state.items():
            pool = self.pools.get(pool_name)
            if pool is not None:
                for key, up in servers.items():
                    pool.set_state(key, bool(up))

    def _make_acceptor(self, lsock: socket.socket, entry: Entry[Pool]) -> Callable[[], int]:
        """A function that accepts one batch from ``lsock``; returns how many it took."""
        accept = lsock.accept
        wrap = self._wrap
        # PROXY listeners: the per-client handshake limit applies to the address the header
        # gives (the connection counts it then), not to the balancer's.
        counted_here = entry.accept is None
        screen = entry.trusted if entry.networks else None

        def accept_batch() -> int:
            stats = self.stats
            taken = 0
            for _ in range(ACCEPT_BATCH):
                if stats.active >= self.max_connections:
                    self._pause_accepting()
                    return taken
                if self.hs_rate and not self._take_token():
                    return taken
                try:
                    csock, addr = accept()
                except BlockingIOError:
                    return taken
                except OSError as exc:
                    if exc.errno in _RESOURCE_ERRNOS:
                        stats.accept_errors += 1
                        self._accept_backoff()
                        return taken
                    if exc.errno == errno.EBADF:
                        return taken  # drain() closed it earlier in this round: a stale event
                    continue  # ECONNABORTED, EPROTO...: that client is gone, the next is not
                self._backoff = 0.0
                if screen is not None and not screen(addr[0]):
                    stats.count_close("proxy_untrusted")  # proxy_from: closed unread
                    csock.close()
                    continue
                ip = None
                if self.hs_per_client and counted_here:
                    ip = addr[0]
                    started = self.hs_by_ip.get(ip, 0)
                    if started >= self.hs_per_client:
                        stats.refused_per_client += 1
                        csock.close()
                        continue
                    self.hs_by_ip[ip] = started + 1
                try:
                    csock.setblocking(False)
                    so = wrap(csock, True)
                except (OSError, ssl.SSLError):
                    csock.close()  # reset before we could wrap it
                    if ip is not None:
                        self.handshake_ended(ip)
                    continue
                conn = Connection(self, csock, so, entry, addr)
                conn.ip = ip
                if self.observer is not None:
                    conn.trace = self.observer.begin(addr, self.loop.now)
                so.owner = conn  # what the SNI callback is handed
                stats.accepted += 1
                stats.active += 1
                taken += 1
                self.conns.add(conn)
                conn.begin()
            return taken

        return accept_batch

    # -- handshake budget --------------------------------------------------------------
    def _take_token(self) -> bool:
        """Token bucket for limits.max_handshakes_per_second (one second of burst). Without a
        token, stop accepting until one is due: clients wait in the accept queue."""
        now = self.loop.now
        tokens = min(float(self.hs_rate), self._tokens + (now - self._tokens_at) * self.hs_rate)
        self._tokens_at = now
        if tokens >= 1.0:
            self._tokens = tokens - 1.0
            return True
        self._tokens = tokens
        self.stats.rate_limited += 1
        self._pause_accepting()
        if self._rate_call is None:

            def resume() -> None:
                self._rate_call = None
                self.start_accepting()

            self._rate_call = self.loop.call_later((1.0 - tokens) / self.hs_rate, resume)
        return False

    def handshake_ended(self, ip: str) -> None:
        """A handshake counted against ``ip`` (limits.max_handshakes_per_client) is over."""
        left = self.hs_by_ip.get(ip, 0) - 1
        if left > 0:
            self.hs_by_ip[ip] = left
        else:
            self.hs_by_ip.pop(ip, None)

    def start_accepting(self) -> None:
        if (
            self._accepting
            or self.draining
            or self._backoff_call is not None
            or self._rate_call is not None
        ):
            return
        for fd, accept_batch in self._acceptors:
            self.loop.add(fd, select.EPOLLIN, _on_readable(accept_batch))
        self._accepting = True

    def _pause_accepting(self) -> None:
        if self._accepting:
            for fd, _ in self._acceptors:
                self.loop.remove(fd)
            self._accepting = False

    def _accept_backoff(self) -> None:
        self._pause_accepting()
        self._backoff = min(_BACKOFF_MAX, max(_BACKOFF_MIN, self._backoff * 2))

        def resume() -> None:
            self._backoff_call = None
            self.start_accepting()

        self._backoff_call = self.loop.call_later(self._backoff, resume)

    def resources_exhausted(self) -> None:
        """A connection could not get a descriptor: back off accepting, as for EMFILE."""
        self.stats.accept_errors += 1
        self._accept_backoff()

    def connection_closed(self, conn: Connection) -> None:
        stats = self.stats
        stats.active -= 1
        stats.bytes_c2u += conn.n_c2u
        stats.bytes_u2c += conn.n_u2c
        self.conns.discard(conn)
        if self.draining:
            if not self.conns:
                self.loop.stop()
        elif not self._accepting and stats.active < self.max_connections:
            self.start_accepting()

    # -- control channel ---------------------------------------------------------------
    def _on_control(self, ev: int) -> None:
        assert self._control is not None
        try:
            data = self._control.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            log.warning("control channel closed (supervisor gone): draining")
            self.loop.remove(self._control.fileno())
            self.drain()
            return
        self.last_heartbeat = self.loop.now  # any message shows the supervisor is alive
        try:
            messages = self._decoder.feed(data)
            tickets.wipe_bytes(data)
        except control.FrameError as exc:
            log.error("control channel: %s: draining", exc)
            self.loop.remove(self._control.fileno())
            self.drain()
            return
        for msg in messages:
            self._handle_control(msg)

    def _handle_control(self, msg: control.Message) -> None:
        t = control.MsgType
        if msg.type == t.DRAIN:
            self.drain()
        elif msg.type == t.STOP:
            self.stop_now()
        elif msg.type == t.TICKET_KEYS:
            self._install_ticket_keys(msg.payload)
        elif msg.type == t.UPSTREAM_STATE:
            self._on_upstream_state(msg)
        elif msg.type in (t.HEARTBEAT, t.STATS_REQUEST):
            # The answer to a heartbeat is our counters: the supervisor's status stays fresh.
            self.send_control(control.encode_json(t.STATS, self.status()))

    def _install_ticket_keys(self, payload: bytes) -> None:
        cb = self.tickets
        if cb is None:
            tickets.wipe_bytes(payload)  # tickets are off here: hold no copy of the keys
            return
        try:
            seq, count = tickets.install_ring(cb.store, payload)
        except control.FrameError as exc:
            log.error("control channel: %s", exc)
            return
        finally:
            tickets.wipe_bytes(payload)
        cb.keys_changed(seq, count)
        self.send_control(
            control.encode_json(control.MsgType.ACK, {"of": "TICKET_KEYS", "seq": seq})
        )

    def _on_upstream_state(self, msg: control.Message) -> None:
        """``{"pool": name, "servers": [[key, up], ...]}`` from the supervisor's checks."""
        try:
            body = msg.json()
            pool = body["pool"]
            changes: dict[str, bool] = {}
            for entry in body["servers"]:
                # exactly [key, up] with a string key and a JSON boolean: anything else is a
                # bug on the other side, and must not take a server down by coercion
                if not isinstance(entry, list) or len(entry) != 2:
                    raise ValueError(f"entry {entry!r} is not [server, up]")
                key, up = entry
                if not isinstance(key, str) or not isinstance(up, bool):
                    raise ValueError(f"entry {entry!r} is not [string, boolean]")
                changes[key] = up
        except (control.FrameError, KeyError, TypeError, ValueError) as exc:
            log.error("control channel: bad UPSTREAM_STATE: %s", exc)
            return
        if isinstance(pool, str):
            self.apply_upstream_state({pool: changes})

    def send_control(self, frame: bytes) -> None:
        if self._control is None:
            return
        try:
            self._control.sendall(frame)
        except OSError as exc:
            log.warning("control channel: %s", exc)

    def status(self) -> dict[str, object]:
        return {
            "worker": self.worker_id,
            "pid": os.getpid(),
            "cpu": self.cpu,
            "generation": self.generation,
            "draining": self.draining,
            "ticket_seq": self.tickets.seq if self.tickets else None,
            **self.stats.snapshot(),
        }

    # -- running and stopping -----------------------------------------------------------
    def run(self) -> None:
        """Serve until drained or stopped. The listeners are closed by ``drain`` or, after
        an immediate stop, when the process exits."""
        if self._control is not None:
            self._control.setblocking(False)
            self.loop.add(self._control.fileno(), select.EPOLLIN, self._on_control)
            self.last_heartbeat = self.loop.now
            self.loop.call_later(self._heartbeat_interval(), self._check_heartbeat)
        self.start_accepting()
        self.send_control(control.encode_json(control.MsgType.READY, self.status()))
        try:
            self.loop.run()
        finally:
            for conn in list(self.conns):
                conn.abort()
            self._pause_accepting()
            self.loop.close()

    def drain(self) -> None:
        """Stop accepting, let connections finish, stop at the graceful deadline."""
        if self.draining:
            return
        # Per listening socket: take what is already queued until EAGAIN once more (bounded:
        # the batches stop at max_connections or the handshake budget), then let go of our
        # copy at once. Where we are its last holder (a final stop, a listener removed by a
        # reload), the kernel from now on refuses new clients instead of queueing them for
        # nobody. A client whose handshake completes between that last accept and the close
        # is reset: the remaining window, two system calls wide.
        pairs = list(zip(self._acceptors, self._listeners, strict=True))
        for (fd, accept_batch), lst in pairs:
            while self._accepting and accept_batch() == ACCEPT_BATCH:
                pass
            self.loop.remove(fd)  # before the close: the number may be reused at once...
            del self._acceptors[0]  # ...so pause/start_accepting must never see it again
            lst.sock.close()
        self._accepting = False
        self.draining = True
        if not self.conns:
            self.loop.stop()
            return
        self.loop.call_later(self.config.server.graceful_timeout, self.stop_now)

    # -- heartbeats from the supervisor -------------------------------------------------
    def _heartbeat_interval(self) -> float:
        return min(1.0, self.heartbeat_timeout / 2)

    def _check_heartbeat(self) -> None:
        """A supervisor that is stopped (SIGSTOP) or hung sends nothing but keeps the channel
        open: after ``server.heartbeat_timeout`` of silence, drain and exit."""
        if self.draining:
            return
        silent = self.loop.now - self.last_heartbeat
        if silent > self.heartbeat_timeout:
            log.warning(
                "worker %d: no heartbeat from the supervisor for %.1fs "
                "(server.heartbeat_timeout = %.1fs): draining and exiting",
                self.worker_id,
                silent,
                self.heartbeat_timeout,
            )
            self.drain()
            return
        self.loop.call_later(self._heartbeat_interval(), self._check_heartbeat)

    def stop_now(self) -> None:
        for conn in list(self.conns):
            conn.abort()
        self.loop.stop()


def _on_readable(accept_batch: Callable[[], int]) -> Callable[[int], None]:
    def handler(_ev: int) -> None:
        accept_batch()

    return handler
