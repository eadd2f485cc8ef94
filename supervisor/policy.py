"""The supervisor's decisions, without processes: slots, restart back-off, heartbeats, reconcile.

Pure and clock-injected, so unit tests drive them without forking.

* A *slot* is a worker position: slot i owns listening socket i of every listener and, when
  pinning, CPU i of the usable set. A replacement or new-generation worker takes the same slot.
* Back-off: a worker that dies is replaced at once the first time; if the slot keeps dying
  (each worker lived less than ``STABLE_AFTER``), the delay doubles from 0.1 s up to 10 s.
* Heartbeats: a worker that has not been heard from for ``timeout`` seconds is sent SIGTERM;
  if it is still there ``KILL_AFTER`` seconds later, SIGKILL.
* Reconcile: for the serving generation, every slot should have one live worker; the actions
  are the slots to spawn now (back-off permitting).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

STABLE_AFTER = 10.0
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 10.0
KILL_AFTER = 3.0


@dataclass(frozen=True, slots=True)
class Slot:
    index: int
    cpu: int | None


def plan_slots(count: int, pin: bool, usable_cpus: Iterable[int]) -> list[Slot]:
    """Slot i pinned to the i-th usable CPU (wrapping around when there are more workers)."""
    cpus = sorted(usable_cpus)
    if not pin or not cpus:
        return [Slot(i, None) for i in range(count)]
    return [Slot(i, cpus[i % len(cpus)]) for i in range(count)]


@dataclass(slots=True)
class Backoff:
    """Restart delays for one slot."""

    failures: int = 0

    def on_exit(self, lived: float) -> float:
        """A worker of this slot exited after ``lived`` seconds: how long to wait to respawn."""
        if lived >= STABLE_AFTER:
            self.failures = 0
        self.failures += 1
        if self.failures == 1:
            return 0.0
        return float(min(BACKOFF_MAX, BACKOFF_FIRST * 2.0 ** (self.failures - 2)))


@dataclass(slots=True)
class Heartbeats:
    """Last time each worker (by pid) was heard from, and who has been told to go."""

    timeout: float
    last: dict[int, float] = field(default_factory=dict)
    termed: dict[int, float] = field(default_factory=dict)

    def seen(self, pid: int, now: float) -> None:
        self.last[pid] = now

    def forget(self, pid: int) -> None:
        self.last.pop(pid, None)
        self.termed.pop(pid, None)

    def due(self, now: float) -> tuple[list[int], list[int]]:
        """(pids to SIGTERM now, pids to SIGKILL now)."""
        term: list[int] = []
        kill: list[int] = []
        for pid, last in self.last.items():
            sent = self.termed.get(pid)
            if sent is None:
                if now - last > self.timeout:
                    term.append(pid)
                    self.termed[pid] = now
            elif now - sent > KILL_AFTER:
                kill.append(pid)
                self.termed[pid] = float("inf")  # SIGKILL once
        return term, kill


def slots_to_spawn(
    slots: Sequence[Slot],
    occupied: Iterable[int],
    not_before: Mapping[int, float],
    now: float,
) -> list[Slot]:
    """Slots of the serving generation with no worker whose back-off has expired."""
    taken = set(occupied)
    return [s for s in slots if s.index not in taken and not_before.get(s.index, 0.0) <= now]
