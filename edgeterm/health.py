"""Active health checks of upstream servers: the pure state machine and its schedule.

The supervisor runs the checks once for all workers (a TCP connect to each server, within
``timeout``, every ``interval`` seconds) and pushes every up/down transition to the workers
over the control channel; the workers' balancers (``edgeterm.workers.balance``) apply it with
``set_state``. This module owns no sockets and reads no clock: the I/O shell passes ``now``.

Rules:

* A server changes state only after a run of results that contradict its state: ``fall``
  consecutive failures take an up server down, ``rise`` consecutive successes bring a down
  server up. A result that agrees with the state resets the run. (As HAProxy's ``rise`` and
  ``fall``.)
* A check that has not finished ``timeout`` seconds after it started is a failure; its late
  result, if any, is ignored.
* Checks of one server never overlap: the next starts ``interval`` seconds after the previous
  one started, or as soon as it finished when it took longer than that.
* The first checks of a pool are spread evenly over the first interval, not all at once.
* Servers start up (``initial_up``), so a start or a reload does not refuse traffic while the
  first checks run; passive health covers that window.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class HealthSettings:
    """``[upstreams.<name>.health]``: seconds and counts."""

    interval: float = 5.0
    timeout: float = 2.0
    rise: int = 2
    fall: int = 3

    def __post_init__(self) -> None:
        if not self.interval > 0:
            raise ValueError(f"interval must be > 0, got {self.interval!r}")
        if not self.timeout > 0:
            raise ValueError(f"timeout must be > 0, got {self.timeout!r}")
        for name in ("rise", "fall"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")


class HealthState:
    """One server's up/down state from a stream of check results."""

    __slots__ = ("_run", "fall", "rise", "up")

    def __init__(self, rise: int = 2, fall: int = 3, *, up: bool = True) -> None:
        if rise < 1 or fall < 1:
            raise ValueError("rise and fall must be >= 1")
        self.rise = rise
        self.fall = fall
        self.up = up
        self._run = 0  # consecutive results contradicting ``up``

    @property
    def run(self) -> int:
        """Consecutive results so far that contradict the current state."""
        return self._run

    def record(self, ok: bool) -> bool | None:
        """Fold in one check result; the new state when it changed, else None."""
        if ok == self.up:
            self._run = 0
            return None
        self._run += 1
        if self._run < (self.rise if ok else self.fall):
            return None
        self.up = ok
        self._run = 0
        return ok


class HealthMonitor:
    """The checks of one pool: when each server is due, time-outs, and the transitions.

    The I/O shell's loop, per pool::

        for i in mon.start_due(now):       # open a non-blocking connect to server i
            ...
        # connect finished (ok or refused): t = mon.finish(i, ok, now)
        # timer at mon.next_wakeup():      for i, up in mon.expire(now): push (pool, i, up)
        # every t that is not None:        push (pool, i, t) to the workers
    """

    __slots__ = ("_deadline", "_next", "settings", "states")

    def __init__(
        self, size: int, settings: HealthSettings, now: float, *, initial_up: bool = True
    ) -> None:
        if size < 1:
            raise ValueError("a pool needs at least one server")
        self.settings = settings
        self.states = [
            HealthState(settings.rise, settings.fall, up=initial_up) for _ in range(size)
        ]
        step = settings.interval / size
        self._next = [now + i * step for i in range(size)]  # when each check is due
        self._deadline: list[float | None] = [None] * size  # in flight: its time-out

    def is_up(self, i: int) -> bool:
        return self.states[i].up

    def in_flight(self, i: int) -> bool:
        return self._deadline[i] is not None

    def start_due(self, now: float) -> list[int]:
        """Servers whose check starts now (each is then in flight until finish or expire)."""
        started = []
        timeout = self.settings.timeout
        interval = self.settings.interval
        for i, due in enumerate(self._next):
            if self._deadline[i] is None and due <= now:
                self._deadline[i] = now + timeout
                self._next[i] = now + interval
                started.append(i)
        return started

    def finish(self, i: int, ok: bool, now: float) -> bool | None:
        """Server ``i``'s check ended (connected: ok; refused or failed: not ok).

        Returns the server's new state when it changed. A result after the time-out is a
        failure; one for a check that is not in flight (already expired) is ignored.
        """
        deadline = self._deadline[i]
        if deadline is None:
            return None
        self._deadline[i] = None
        if now > deadline:
            ok = False  # finished, but too late: a time-out the shell had not expired yet
        if self._next[i] < now:
            self._next[i] = now  # it took longer than the interval: the next one starts now
        return self.states[i].record(ok)

    def expire(self, now: float) -> list[tuple[int, bool]]:
        """Checks past their time-out count as failures; the transitions they caused."""
        changed = []
        for i, deadline in enumerate(self._deadline):
            if deadline is not None and deadline <= now:
                t = self.finish(i, False, now)
                if t is not None:
                    changed.append((i, t))
        return changed

    def next_wakeup(self) -> float:
        """The earliest time at which ``start_due`` or ``expire`` has something to do."""
        return min(
            d if d is not None else n for d, n in zip(self._deadline, self._next, strict=True)
        )
