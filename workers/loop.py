"""A minimal epoll event loop with a timer heap.

The loop knows file descriptors, readiness and time; nothing about TLS or connections.

* Level-triggered epoll (``select.epoll``, what ``selectors.EpollSelector`` wraps; used directly
  so that changing interest does not allocate a new key object each time). Handlers register
  write interest only while they have bytes waiting.
* One handler per file descriptor: a callable taking the event mask. The handlers for a round
  are looked up right after ``epoll_wait`` returns, so an event for a descriptor that is closed
  (and whose number is reused) during the round reaches the old, closed handler, which ignores
  it, never the new one.
* ``now`` is read once per round (like nginx's cached time): handlers use ``loop.now``.
* Timers are lazy: an object with a ``deadline`` is checked when its heap entry comes due and
  re-armed if the deadline has moved later. Moving a deadline later is just an assignment, so
  the hot path never touches the heap; only earlier deadlines push a new entry. Entries of
  objects that went away are dropped and the heap is compacted when they dominate it.
"""

from __future__ import annotations

import heapq
import itertools
import select
import time
from collections.abc import Callable
from typing import Protocol

Handler = Callable[[int], None]

_MAX_EVENTS = 512
_COMPACT_MIN = 4096


class Timed(Protocol):
    """Something with a deadline the loop should call back at (or after)."""

    timer_entry: list[object] | None

    def on_timer(self, now: float) -> None: ...


class _Call:
    """A one-shot callback for ``Loop.call_later`` (rare events, not per connection)."""

    __slots__ = ("fn", "timer_entry")

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn
        self.timer_entry: list[object] | None = None

    def on_timer(self, now: float) -> None:
        self.fn()


class Loop:
    def __init__(self) -> None:
        self._ep = select.epoll()
        self._handlers: dict[int, Handler] = {}
        self._heap: list[list[object]] = []
        self._dead = 0
        self._seq = itertools.count()
        self._soon: list[Callable[[], None]] = []
        self.now = time.monotonic()
        self.running = False

    # -- descriptors -------------------------------------------------------------------
    def add(self, fd: int, events: int, handler: Handler) -> None:
        self._ep.register(fd, events)
        self._handlers[fd] = handler

    def modify(self, fd: int, events: int) -> None:
        self._ep.modify(fd, events)

    def remove(self, fd: int) -> None:
        """Stop watching ``fd`` that stays open (listeners, control channel)."""
        if self._handlers.pop(fd, None) is not None:
            self._ep.unregister(fd)

    def forget(self, fd: int) -> None:
        """Drop the handler of ``fd`` that the caller is about to close.

        Closing the descriptor removes it from the epoll set (we never dup them), so this
        saves the ``epoll_ctl(DEL)`` call.
        """
        self._handlers.pop(fd, None)

    # -- time --------------------------------------------------------------------------
    def arm(self, obj: Timed, when: float) -> None:
        """Make sure ``obj.on_timer`` runs at ``when`` or earlier."""
        entry = obj.timer_entry
        if entry is not None:
            if entry[0] <= when:  # type: ignore[operator]
                return
            entry[2] = None
            self._dead += 1
        entry = [when, next(self._seq), obj]
        obj.timer_entry = entry
        heapq.heappush(self._heap, entry)

    def disarm(self, obj: Timed) -> None:
        entry = obj.timer_entry
        if entry is not None:
            entry[2] = None
            obj.timer_entry = None
            self._dead += 1
            if self._dead > _COMPACT_MIN and self._dead > len(self._heap) // 2:
                self._heap = [e for e in self._heap if e[2] is not None]
                heapq.heapify(self._heap)
                self._dead = 0

    def call_later(self, delay: float, fn: Callable[[], None]) -> _Call:
        call = _Call(fn)
        self.arm(call, self.now + delay)
        return call

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` after this round's events, before sleeping again."""
        self._soon.append(fn)

    # -- running -----------------------------------------------------------------------
    def run_once(self, max_wait: float = 1.0) -> None:
        heap = self._heap
        if self._soon:
            timeout = 0.0
        elif heap:
            timeout = min(max(0.0, heap[0][0] - self.now), max_wait)  # type: ignore[operator]
        else:
            timeout = max_wait
        events = self._ep.poll(timeout, _MAX_EVENTS)
        self.now = now = time.monotonic()
        if events:
            get = self._handlers.get
            for (_fd, ev), handler in zip(events, [get(fd) for fd, _ in events], strict=True):
                if handler is not None:
                    handler(ev)
        while heap and heap[0][0] <= now:  # type: ignore[operator]
            entry = heapq.heappop(heap)
            obj = entry[2]
            if obj is None:
                self._dead -= 1
                continue
            obj.timer_entry = None  # type: ignore[attr-defined]
            obj.on_timer(now)  # type: ignore[attr-defined]
        if self._soon:
            soon, self._soon = self._soon, []
            for fn in soon:
                fn()

    def run(self) -> None:
        self.running = True
        while self.running:
            self.run_once()

    def stop(self) -> None:
        self.running = False

    def close(self) -> None:
        self._ep.close()
