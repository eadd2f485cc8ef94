"""Memory for secrets: anonymous, mlock'ed (never swapped), excluded from core dumps.

``LockedBuffer`` is a fixed-size mmap that is locked with ``mlock(2)`` and advised
``MADV_DONTDUMP``; ``wipe`` zeroes a range in place. Locks are not inherited across fork, so a
child calls ``relock()``. Where the process's RLIMIT_MEMLOCK forbids locking, the buffer still
works and ``locked`` says so (the logs report it).

``lock_range`` locks memory that someone else mapped (OpenSSL's secure heap, after fork).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mlock.restype = ctypes.c_int
_mlock2 = getattr(_libc, "mlock2", None)  # glibc 2.27+
if _mlock2 is not None:
    _mlock2.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
    _mlock2.restype = ctypes.c_int
MLOCK_ONFAULT = 1  # linux/mman.h


def lock_range(address: int, size: int) -> int:
    """``mlock`` ``size`` bytes at ``address``; 0 on success, else the errno.

    With ``MLOCK_ONFAULT`` (as OpenSSL locks its secure heap) pages are locked as they are
    touched instead of all at once, so a large, mostly empty heap costs no memory; where
    ``mlock2`` is missing, plain ``mlock``."""
    if _mlock2 is not None:
        if _mlock2(address, size, MLOCK_ONFAULT) == 0:
            return 0
        err = ctypes.get_errno()
        if err != errno.ENOSYS:
            return err
    return 0 if _libc.mlock(address, size) == 0 else ctypes.get_errno()


class LockedBuffer:
    def __init__(self, size: int) -> None:
        self.size = size
        self._map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.view = memoryview(self._map)
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        self.dontdump = False
        self.locked = False
        self.relock()

    def relock(self) -> None:
        """Lock (again, e.g. after fork) and exclude from core dumps; best effort."""
        try:
            self._map.madvise(mmap.MADV_DONTDUMP)
            self.dontdump = True
        except (OSError, AttributeError):
            self.dontdump = False
        self.locked = _libc.mlock(self.address, self.size) == 0

    def wipe(self, start: int = 0, end: int | None = None) -> None:
        stop = self.size if end is None else end
        ctypes.memset(self.address + start, 0, stop - start)
