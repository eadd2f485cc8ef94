"""The session-ticket key ring: which key encrypts, which decrypt, and when it rotates.

Pure: no I/O, an injected clock, and key *slots* rather than key bytes. The bytes live in a
locked buffer (``edgeterm.tickets.KeyStore``); the ring only says which slot is which and asks
the store to fill a slot with fresh random bytes or to wipe a retired one.

Two sources of keys:

* generated (the default): a ring of three, as nginx does. ``previous`` decrypts only,
  ``current`` encrypts, ``next`` decrypts only. Rotation moves previous <- current <- next <-
  a new random key, and wipes the key that falls off. A key reaches every worker as ``next``
  one rotation before it becomes ``current``, and a rotation waits until every worker has
  acknowledged the ring holding that ``next``, so no worker ever issues a ticket a sibling
  cannot read. A ticket survives one rotation (its key becomes ``previous``: it resumes and is
  renewed) but not two.
* files (a fleet): the keys read from ``tls.tickets.key_files``; the first encrypts, all
  decrypt. They change only when the files do (re-read on SIGHUP).

A key is 80 bytes: name (16), HMAC-SHA256 secret (32), AES-256-CBC key (32), the layout of
nginx's 80-byte ``ssl_session_ticket_key`` files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

KEY_SIZE = 80
NAME_SIZE = 16
HMAC_OFFSET = 16
HMAC_SIZE = 32
AES_OFFSET = 48
AES_SIZE = 32
MAX_FILE_KEYS = 8
CAPACITY = 2 * MAX_FILE_KEYS + 3  # live keys + keys staged while a reload validates files


class KeyFileError(ValueError):
    """A ticket key file is missing, unreadable or not 80 bytes (the operator's fault)."""


class KeyRing:
    def __init__(
        self,
        fill_random: Callable[[int], None],
        wipe: Callable[[int], None],
        now: float,
        capacity: int = CAPACITY,
    ) -> None:
        self._fill = fill_random
        self._wipe = wipe
        self._free = list(range(capacity))
        self.from_files = False
        self.previous: int | None = None
        self.current = self._take_random()
        self.next: int | None = self._take_random()
        self.file_slots: tuple[int, ...] = ()
        self.seq = 1
        self.rotations = 0
        self.current_since = now
        self._acked: dict[int, int] = {}

    def _take_random(self) -> int:
        slot = self.take()
        self._fill(slot)
        return slot

    def take(self) -> int:
        """A free slot (for the caller to fill, e.g. from a key file)."""
        if not self._free:
            raise RuntimeError("no free ticket key slot")
        return self._free.pop(0)

    def release(self, slots: Iterable[int]) -> None:
        for slot in slots:
            self._wipe(slot)
            self._free.append(slot)

    # -- what workers install -----------------------------------------------------------
    def order(self) -> tuple[int, ...]:
        """Slots in install order: the encrypting key first, then the decrypt-only ones."""
        if self.from_files:
            return self.file_slots
        keys = [self.current]
        if self.next is not None:
            keys.append(self.next)
        if self.previous is not None:
            keys.append(self.previous)
        return tuple(keys)

    # -- acknowledgements ---------------------------------------------------------------
    def ack(self, worker: int, seq: int) -> None:
        self._acked[worker] = max(seq, self._acked.get(worker, 0))

    def forget(self, worker: int) -> None:
        self._acked.pop(worker, None)

    def all_acked(self, workers: Iterable[int]) -> bool:
        return all(self._acked.get(w, 0) >= self.seq for w in workers)

    # -- changes --------------------------------------------------------------------------
    def rotate(self, now: float, workers: Iterable[int]) -> bool:
        """Rotate if every worker holds the current ring; return whether it rotated."""
        if self.from_files or not self.all_acked(workers):
            return False
        assert self.next is not None
        retired = self.previous
        self.previous = self.current
        self.current = self.next
        self.next = self._take_random()
        if retired is not None:
            self.release([retired])
        self.seq += 1
        self.rotations += 1
        self.current_since = now
        return True

    def use_file_slots(self, slots: Sequence[int], now: float) -> None:
        """Switch to keys the caller has loaded into ``slots`` (first encrypts)."""
        if not slots:
            raise KeyFileError("no ticket keys")
        old = self.order()
        self.from_files = True
        self.previous = None
        self.next = None
        self.current = slots[0]
        self.file_slots = tuple(slots)
        self.release(s for s in old if s not in self.file_slots)
        self.seq += 1
        self.rotations += 1
        self.current_since = now

    def age(self, now: float) -> float:
        return now - self.current_since
