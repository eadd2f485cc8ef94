"""Socket creation and options: the only place edgeterm calls setsockopt.

The supervisor binds listening sockets here (one SO_REUSEPORT socket per worker slot); workers
tune accepted and upstream sockets here.
"""

from __future__ import annotations

import errno
import socket

from edgeterm.config import Address
from edgeterm.errors import StartupError


def _new_listener(addr: Address, reuseport: bool) -> socket.socket:
    sock = socket.socket(addr.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if addr.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    except OSError:
        sock.close()
        raise
    return sock


def _check_free(addr: Address) -> None:
    """Fail if another socket holds ``addr``, even one that set SO_REUSEPORT itself.

    A reuseport bind succeeds next to another reuseport listener of the same user (another
    edgeterm, say), which would silently split the traffic between the two: bind a probe
    without SO_REUSEPORT first. The probe never listens, so closing it drops nothing.
    """
    probe = _new_listener(addr, reuseport=False)
    try:
        probe.bind(addr.sockaddr())
    except OSError as exc:
        raise StartupError(f"cannot bind {addr}: {exc.strerror or exc}") from exc
    finally:
        probe.close()


def set_listener_options(sock: socket.socket, *, tcp_fastopen: int, defer_accept: int) -> None:
    """``listeners.tcp_fastopen`` and ``listeners.defer_accept`` on a listening socket.

    Both are set on every bind and again on every reload (a reused socket takes the new
    values; 0 turns them off).

    * TCP_FASTOPEN: the length of the queue of TFO connections not yet accepted. A client's
      SYN can then carry its ClientHello, saving a round trip on reconnects; the kernel also
      needs the server bit (2) of ``net.ipv4.tcp_fastopen`` (deploy/sysctl/90-edgeterm.conf).
    * TCP_DEFER_ACCEPT: seconds during which the kernel keeps a connection whose client has not
      sent anything yet (the ClientHello) out of the accept queue, so a worker is not woken for
      a bare handshake.
    """
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN, tcp_fastopen)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, defer_accept)


def bind_group(
    addr: Address,
    backlog: int,
    count: int,
    *,
    check_free: bool = True,
    tcp_fastopen: int = 0,
    defer_accept: int = 0,
) -> list[socket.socket]:
    """Bind ``count`` SO_REUSEPORT listening sockets on ``addr`` (port 0: one free port).

    ``check_free=False`` joins sockets to a group this process already holds (more workers
    after a reload). ``tcp_fastopen``/``defer_accept``: see ``set_listener_options``.
    """
    if addr.port != 0 and check_free:
        _check_free(addr)
    socks: list[socket.socket] = []
    port = addr.port
    try:
        for _ in range(count):
            sock = _new_listener(addr, reuseport=True)
            socks.append(sock)
            try:
                sock.bind((addr.host, port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise StartupError(f"cannot bind {addr}: address already in use") from exc
                raise StartupError(f"cannot bind {addr}: {exc.strerror or exc}") from exc
            port = sock.getsockname()[1]
            # Accepted sockets inherit TCP_NODELAY from the listener: no setsockopt per client.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tcp_fastopen or defer_accept:
                set_listener_options(sock, tcp_fastopen=tcp_fastopen, defer_accept=defer_accept)
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


def bound_address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}"


def new_upstream_socket(family: socket.AddressFamily) -> socket.socket:
    # SOCK_NONBLOCK at creation: no separate ioctl(FIONBIO).
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    if family != socket.AF_UNIX:  # no Nagle on a Unix socket: TCP_NODELAY would fail
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock
