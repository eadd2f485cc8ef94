"""Active health checks of upstream servers, run once in the supervisor for all workers.

For every pool with an ``[upstreams.<name>.health]`` table, a non-blocking TCP connect (a
``connect`` on the path for ``unix:`` servers) to each server every ``interval`` seconds,
within ``timeout``; ``edgeterm.health.HealthMonitor`` owns the schedule and the rise/fall
rule, this module the sockets. A check that connects closes at once; to a pool with
``proxy_protocol`` it first sends a LOCAL header (v2) or ``PROXY UNKNOWN`` (v1), so servers
that require the header do not log an error for each check (HAProxy's check-send-proxy).

Every up/down transition is pushed to the workers as an ``UPSTREAM_STATE`` control message
``{"pool": name, "servers": [[key, up]]}`` (servers by key, ``str(Address)``, so a message
means the same to every generation). A new worker gets the current state at fork
(``snapshot``). On reload ``configure`` follows the new config: servers whose pool and key are
unchanged keep their state, new ones start up (passive health covers the first checks).
"""

from __future__ import annotations

import errno
import logging
import select
import socket
import time
from collections.abc import Callable
from typing import Any

from edgeterm.workers.loop import Loop

from edgeterm import control
from edgeterm.config import Address, Config, UpstreamConfig
from edgeterm.health import HealthMonitor, HealthState
from edgeterm.proxyproto import encode_v1, encode_v2

log = logging.getLogger("edgeterm.supervisor")


class _PoolChecks:
    """The checks of one pool: its monitor and the sockets of checks in flight."""

    def __init__(self, cfg: UpstreamConfig, monitor: HealthMonitor, since: list[float]) -> None:
        self.name = cfg.name
        self.servers: tuple[Address, ...] = cfg.servers
        self.keys = tuple(str(a) for a in cfg.servers)
        self.monitor = monitor
        self.since = since  # wall-clock time of each server's last transition (or start)
        self.socks: dict[int, socket.socket] = {}
        self.hello = b""
        if cfg.proxy_protocol == "v2":
            self.hello = encode_v2(None, None)
        elif cfg.proxy_protocol == "v1":
            self.hello = encode_v1(None, None)


class HealthChecker:
    """The supervisor's active checks; a ``Timed`` object on the supervisor's loop."""

    def __init__(self, loop: Loop, push: Callable[[bytes], None]) -> None:
        self.loop = loop
        self.push = push  # sends a control frame to every worker
        self.timer_entry: list[object] | None = None
        self.pools: dict[str, _PoolChecks] = {}

    # -- configuration ---------------------------------------------------------------------
    def configure(self, config: Config) -> None:
        """Check the pools of ``config`` from now on, keeping the state of servers that stay."""
        now = self.loop.now
        old = self.pools
        new: dict[str, _PoolChecks] = {}
        for name, cfg in config.upstreams.items():
            if cfg.health is None:
                continue
            monitor = HealthMonitor(len(cfg.servers), cfg.health, now)
            since = [time.time()] * len(cfg.servers)
            before = old.get(name)
            if before is not None:
                where = {key: i for i, key in enumerate(before.keys)}
                for i, addr in enumerate(cfg.servers):
                    j = where.get(str(addr))
                    if j is not None and not before.monitor.is_up(j):
                        s = cfg.health
                        monitor.states[i] = HealthState(s.rise, s.fall, up=False)
                        since[i] = before.since[j]
            new[name] = _PoolChecks(cfg, monitor, since)
        for pc in old.values():
            self._abandon(pc)
        self.pools = new
        if new:
            log.info(
                "active health checks: %s",
                ", ".join(f"{n} ({len(p.keys)} servers)" for n, p in new.items()),
            )
        self._rearm()

    def snapshot(self) -> dict[str, dict[str, bool]]:
        """The state of every checked server: pool -> key -> up (what a new worker starts
        with)."""
        return {
            name: {key: pc.monitor.is_up(i) for i, key in enumerate(pc.keys)}
            for name, pc in self.pools.items()
        }

    def status(self) -> dict[str, Any]:
        """For ``edgeterm status``: pool -> key -> {up, since}."""
        return {
            name: {
                key: {"up": pc.monitor.is_up(i), "since": round(pc.since[i], 3)}
                for i, key in enumerate(pc.keys)
            }
            for name, pc in self.pools.items()
        }

    def close(self) -> None:
        for pc in self.pools.values():
            self._abandon(pc)
        self.pools = {}
        self.loop.disarm(self)

    def close_in_child(self) -> None:
        """In a freshly forked worker: close the inherited sockets of checks in flight."""
        for pc in self.pools.values():
            for s in pc.socks.values():
                s.close()
            pc.socks.clear()

    # -- the loop --------------------------------------------------------------------------
    def on_timer(self, now: float) -> None:
        for pc in list(self.pools.values()):
            for i, up in pc.monitor.expire(now):
                self._transition(pc, i, up, "timed out")
            for i in [i for i in pc.socks if not pc.monitor.in_flight(i)]:
                self._drop(pc, i)
            for i in pc.monitor.start_due(now):
                self._start(pc, i)
        self._rearm()

    def _rearm(self) -> None:
        if self.pools:
            self.loop.arm(self, min(pc.monitor.next_wakeup() for pc in self.pools.values()))

    def _start(self, pc: _PoolChecks, i: int) -> None:
        addr = pc.servers[i]
        try:
            s = socket.socket(addr.family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        except OSError as exc:
            self._finish(pc, i, None, exc.errno or errno.EIO)
            return
        try:
            err = s.connect_ex(addr.sockaddr())
        except OSError as exc:
            err = exc.errno or errno.EIO
        if err == errno.EINPROGRESS:
            pc.socks[i] = s
            self.loop.add(s.fileno(), select.EPOLLOUT, self._on_ready(pc, i, s))
        else:
            self._finish(pc, i, s, err)

    def _on_ready(self, pc: _PoolChecks, i: int, s: socket.socket) -> Callable[[int], None]:
        def on_event(_ev: int) -> None:
            if pc.socks.get(i) is not s:
                return  # expired or abandoned meanwhile
            del pc.socks[i]
            self.loop.remove(s.fileno())
            self._finish(pc, i, s, s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))

        return on_event

    def _finish(self, pc: _PoolChecks, i: int, s: socket.socket | None, err: int) -> None:
        if s is not None:
            if err == 0 and pc.hello:
                try:
                    s.send(pc.hello)
                except OSError:
                    pass
            s.close()
        if self.pools.get(pc.name) is not pc:
            return
        changed = pc.monitor.finish(i, err == 0, self.loop.now)
        if changed is not None:
            why = "connected" if err == 0 else errno.errorcode.get(err, str(err))
            self._transition(pc, i, changed, why)
        self._rearm()

    def _transition(self, pc: _PoolChecks, i: int, up: bool, why: str) -> None:
        pc.since[i] = time.time()
        key = pc.keys[i]
        if up:
            log.info("upstream %s server %s is up (active check: %s)", pc.name, key, why)
        else:
            log.warning("upstream %s server %s is down (active check: %s)", pc.name, key, why)
        self.push(
            control.encode_json(
                control.MsgType.UPSTREAM_STATE, {"pool": pc.name, "servers": [[key, up]]}
            )
        )

    def _drop(self, pc: _PoolChecks, i: int) -> None:
        s = pc.socks.pop(i, None)
        if s is not None:
            self.loop.remove(s.fileno())
            s.close()

    def _abandon(self, pc: _PoolChecks) -> None:
        for i in list(pc.socks):
            self._drop(pc, i)
