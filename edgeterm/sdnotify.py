"""The systemd notification protocol (``sd_notify(3)``), without libsystemd.

A service started with ``Type=notify`` finds ``NOTIFY_SOCKET`` in its environment: the path of
an ``AF_UNIX`` datagram socket (``@name`` for the abstract namespace). Each notification is one
datagram of newline-separated ``KEY=VALUE`` assignments. edgeterm sends:

* ``READY=1`` (with ``MAINPID`` and ``STATUS``) once every worker of the first generation
  accepts connections;
* ``RELOADING=1`` with ``MONOTONIC_USEC`` (the ``CLOCK_MONOTONIC`` time in microseconds, which
  systemd >= 253 requires next to ``RELOADING=1``) when a reload starts, and ``READY=1`` when it
  has finished, successfully or not;
* ``STOPPING=1`` when it starts to stop.

``Notifier.from_environment()`` reads ``NOTIFY_SOCKET`` once and removes it from the
environment, so the workers the supervisor forks do not inherit it (with ``NotifyAccess=all``
they could otherwise confuse systemd). Without ``NOTIFY_SOCKET`` every call is a no-op.
Sending never raises: a lost notification must not stop the server (systemd times out and says
so in its own log).
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("edgeterm.sdnotify")

ENV = "NOTIFY_SOCKET"


def socket_address(value: str) -> str | bytes | None:
    """The ``connect``/``sendto`` address for a ``NOTIFY_SOCKET`` value, or None if unusable.

    ``@name`` is the abstract namespace (a leading NUL byte); other values must be absolute
    paths. (``vsock:`` addresses, systemd >= 254 for VMs, are not supported.)
    """
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def format_message(**fields: object) -> bytes:
    """``format_message(READY=1, STATUS="x")`` -> ``b"READY=1\\nSTATUS=x"``. Newlines in a value
    would start a new assignment, so they become spaces."""
    lines = []
    for key, value in fields.items():
        text = str(value).replace("\n", " ")
        lines.append(f"{key}={text}")
    return "\n".join(lines).encode()


class Notifier:
    """Sends notifications to one ``NOTIFY_SOCKET`` (or nowhere)."""

    def __init__(self, address: str | bytes | None) -> None:
        self.address = address

    @classmethod
    def from_environment(cls, *, unset: bool = True) -> Notifier:
        value = os.environ.get(ENV, "")
        if unset:
            os.environ.pop(ENV, None)
        address = socket_address(value)
        if value and address is None:
            log.warning("ignoring %s=%r: not an absolute path or @abstract name", ENV, value)
        return cls(address)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, **fields: object) -> bool:
        """Send one datagram; True if it was sent."""
        if self.address is None:
            return False
        message = format_message(**fields)
        # A socket per message: notifications are rare, and no descriptor stays open for the
        # workers forked later to inherit.
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                sock.sendto(message, self.address)
        except OSError as exc:
            log.warning("sd_notify to %s failed: %s", self.display, exc)
            return False
        return True

    @property
    def display(self) -> str:
        if isinstance(self.address, bytes):
            return "@" + self.address[1:].decode(errors="replace")
        return str(self.address)

    # the messages edgeterm sends -------------------------------------------------------

    def ready(self, status: str) -> bool:
        return self.notify(READY=1, MAINPID=os.getpid(), STATUS=status)

    def reloading(self, status: str = "reloading") -> bool:
        return self.notify(RELOADING=1, MONOTONIC_USEC=monotonic_usec(), STATUS=status)

    def stopping(self, status: str = "stopping") -> bool:
        return self.notify(STOPPING=1, STATUS=status)

    def status(self, status: str) -> bool:
        return self.notify(STATUS=status)
