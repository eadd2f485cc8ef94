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


def bind_group(
    addr: Address, backlog: int, count: int, *, check_free: bool = True
) -> list[socket.socket]:
    """Bind ``count`` SO_REUSEPORT listening sockets on ``addr`` (port 0: one free port).

    ``check_free=False`` joins sockets to a group this process already holds (more workers
    after a reload).
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
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock
