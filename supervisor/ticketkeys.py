"""The supervisor's ticket keys: the ring, its rotation timer, and handing keys to workers.

See ``edgeterm.keyring`` for the rules and ``edgeterm.tickets`` for storage and transport.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Sequence
from typing import Any

from edgeterm.config import TicketsConfig
from edgeterm.keyring import KeyRing
from edgeterm.tickets import KeyStore, load_key_files, send_ring


class TicketKeys:
    def __init__(self, cfg: TicketsConfig, now: float) -> None:
        self.store = KeyStore()
        self.ring = KeyRing(self.store.fill_random, self.store.wipe, now)
        self.rotate_every = cfg.rotate_every
        self.key_files: tuple[str, ...] = ()
        if cfg.key_files:
            self.commit_files(self.stage_files([str(p) for p in cfg.key_files]), cfg, now)

    def stage_files(self, paths: Sequence[str]) -> list[int]:
        """Read key files into spare slots (raises KeyFileError; nothing live changes)."""
        return load_key_files(self.store, self.ring.take, self.ring.release, paths)

    def discard(self, slots: Sequence[int]) -> None:
        self.ring.release(slots)

    def commit_files(self, slots: Sequence[int], cfg: TicketsConfig, now: float) -> None:
        self.ring.use_file_slots(slots, now)
        self.key_files = tuple(str(p) for p in cfg.key_files)
        self.rotate_every = cfg.rotate_every

    def close(self) -> None:
        """Wipe every key (this ring is being replaced)."""
        self.store.buf.wipe()

    def rotate(self, now: float, workers: Iterable[int]) -> bool:
        return self.ring.rotate(now, workers)

    def send(self, sock: socket.socket) -> None:
        send_ring(sock, self.store, self.ring.order(), self.ring.seq)

    def status(self, now: float) -> dict[str, Any]:
        return {
            "enabled": True,
            "source": "files" if self.ring.from_files else "generated",
            "keys": len(self.ring.order()),
            "current_key_age": round(self.ring.age(now), 3),
            "rotations": self.ring.rotations,
            "rotate_every": None if self.ring.from_files else self.rotate_every,
            "locked_memory": self.store.buf.locked,
        }
