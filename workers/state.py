"""The connection lifecycle as a table.

Rules:

* A connection is in exactly one state. It moves only along an edge of ``TRANSITIONS``;
  any other move is a bug in edgeterm (not the client's fault) and raises ``IllegalTransition``.
* ``ACCEPTED``: the TCP connection exists, nothing read yet.
* ``PROXY_HEADER``: on a listener with ``accept_proxy``, reading the PROXY protocol header the
  balancer in front sends before the TLS stream, bounded by the listener's ``proxy_timeout``.
* ``HANDSHAKING``: TLS handshake in progress, bounded by ``timeouts.handshake``.
* ``CONNECTING``: handshake done, connecting to an upstream server (retrying other servers of
  the pool on failure), bounded by ``timeouts.connect`` per attempt.
* ``PROXYING``: bytes flow both ways.
* ``HALF_CLOSED``: one direction has finished (its EOF was passed on); the other still flows.
* ``CLOSING``: we are finishing politely: delivering a fatal alert or a close_notify, or
  lingering so that unread input does not turn our close into a reset.
* ``CLOSED``: both sockets are closed; terminal.

States are small ints so that the hot path compares integers, not objects.
"""

from __future__ import annotations

from typing import Final

ACCEPTED: Final = 0
PROXY_HEADER: Final = 1
HANDSHAKING: Final = 2
CONNECTING: Final = 3
PROXYING: Final = 4
HALF_CLOSED: Final = 5
CLOSING: Final = 6
CLOSED: Final = 7

NAMES: Final = (
    "accepted",
    "proxy-header",
    "handshaking",
    "connecting",
    "proxying",
    "half-closed",
    "closing",
    "closed",
)

TRANSITIONS: Final[frozenset[tuple[int, int]]] = frozenset(
    {
        (ACCEPTED, PROXY_HEADER),
        (ACCEPTED, HANDSHAKING),
        (ACCEPTED, CLOSED),
        (PROXY_HEADER, HANDSHAKING),
        (PROXY_HEADER, CLOSED),  # invalid header, timeout, client gone: no TLS yet, no alert
        (HANDSHAKING, CONNECTING),
        (HANDSHAKING, CLOSING),  # failed handshake: let the alert reach the client
        (HANDSHAKING, CLOSED),
        (CONNECTING, PROXYING),
        (CONNECTING, CLOSING),  # no upstream: close_notify to the client
        (CONNECTING, CLOSED),
        (PROXYING, HALF_CLOSED),
        (PROXYING, CLOSING),
        (PROXYING, CLOSED),
        (HALF_CLOSED, CLOSING),
        (HALF_CLOSED, CLOSED),
        (CLOSING, CLOSED),
    }
)


class IllegalTransition(RuntimeError):
    """edgeterm tried to move a connection along an edge the table does not have (our bug)."""

    def __init__(self, current: int, new: int) -> None:
        super().__init__(f"illegal connection transition {NAMES[current]} -> {NAMES[new]}")
        self.current = current
        self.new = new


def check(current: int, new: int) -> int:
    """Return ``new`` if ``current -> new`` is an edge of the table, else raise."""
    if (current, new) not in TRANSITIONS:
        raise IllegalTransition(current, new)
    return new
