"""The data path's contract with telemetry (the hooks; the exporting lives in edgeterm.telemetry).

Rule: an unsampled connection costs one attribute test per lifecycle step and nothing else.

* ``Observer``: one per worker, or None when traces and the access log are both off. At
  accept the worker asks ``observer.begin(peer, now)``; it returns a ``ConnTrace`` for a
  connection to record (sampled for tracing, or the access log is on), or None. The sampling
  decision is made there, before any OpenTelemetry object exists.
* ``ConnTrace``: the facts of one connection, filled by the hooks below, which the connection
  calls only when its ``trace`` is not None. ``closed`` is always the last call; a connection
  closed without ``handshake_done`` failed its handshake, and the close reason says why
  (``handshake_failed`` = an alert or protocol error, ``handshake_timeout``, ``client_error``,
  ``shutdown``). Reasons are the ``R_*`` constants of ``workers.connection``.
* ``client_address``: a PROXY header named the client (the TCP peer is the balancer); from
  then on the record reports that address. ``client_certificate``: with ``tls.client_auth``,
  the verified client certificate, right before ``handshake_done``.
"""

from __future__ import annotations

from typing import Any, Protocol


class ConnTrace(Protocol):
    def handshake_done(self, so: Any, now: float) -> None:
        """TLS is up: read version, cipher, SNI, ALPN, resumed from the _ssl object ``so``."""

    def handshake_failed(
        self, reason: str, now: float, exc: BaseException | None = None
    ) -> None: ...

    def client_address(self, peer: tuple[str, int]) -> None:
        """The client's address from a PROXY header (the connection's peer is the balancer)."""

    def client_certificate(self, so: Any, cn: str | None) -> None:
        """A verified client certificate: its subject CN (``so``: the _ssl object)."""

    def upstream_connected(self, server: str, now: float) -> None: ...

    def closed(self, reason: str, bytes_in: int, bytes_out: int, now: float) -> None: ...


class Observer(Protocol):
    def begin(self, peer: tuple[str, int] | None, now: float) -> ConnTrace | None: ...
