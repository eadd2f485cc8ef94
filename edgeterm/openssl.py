"""The only ctypes code in edgeterm: what the stdlib ``ssl`` module does not expose.

The stdlib gives no access to session ticket keys, key exchange groups, read-ahead, or a
one-sided ``SSL_shutdown``. We reach them by calling the very libssl that CPython's ``_ssl``
module is linked with, on the ``SSL_CTX *`` / ``SSL *`` pointers that CPython's objects hold.

Reading those pointers relies on CPython's object layout (3.11):

- ``PySSLContext``: ``PyObject_HEAD``, then ``SSL_CTX *ctx``.
- ``PySSLSocket`` (``_ssl._SSLSocket``, what ``SSLSocket._sslobj`` and ``SSLObject._sslobj``
  are): ``PyObject_HEAD``, ``PyObject *Socket``, ``SSL *ssl``, ``PySSLContext *ctx``, ...

So every pointer read is self-checked once per process before it is trusted:

- context: ``SSL_CTX_get_options(ptr)`` must equal ``ctx.options``, and flipping an option from
  Python must show on the C side;
- connection: the ``ctx`` field after ``ssl`` must be ``id(sslobj.context)`` (a pure memory read
  inside the object), then ``SSL_get_SSL_CTX(ssl)`` must be the context's ``SSL_CTX *``.

Memory is only read inside the Python object (bounds checked against the type's basic size);
before a candidate pointer is handed to OpenSSL, the memory it points at is probed through the
kernel (a ``write()`` into a pipe fails with EFAULT instead of crashing), so a wrong layout ends
in :class:`StartupError`, not a segfault.

Hot path: :func:`ssl_pointer` and :func:`shutdown_once` do one memory read and one or two
FFI calls with pre-declared prototypes; the layout check runs only on the first call.
"""

from __future__ import annotations

import _ssl
import ctypes
import ctypes.util
import os
import resource
import ssl
import sys
from dataclasses import dataclass
from typing import Any, Final

from edgeterm import secmem
from edgeterm.errors import StartupError

__all__ = [
    "ctx_pointer",
    "enable_secure_heap",
    "has_pending",
    "libssl_path",
    "lock_secure_heap",
    "negotiated_group",
    "self_check",
    "set_groups",
    "set_read_ahead",
    "shutdown_once",
    "ssl_pointer",
]

# --- OpenSSL constants (ssl.h, stable ABI values) ---
SSL_CTRL_SET_READ_AHEAD: Final = 41
SSL_CTRL_SET_GROUPS_LIST: Final = 92
SSL_CTRL_GET_NEGOTIATED_GROUP: Final = 134

_SSL_ERROR_SSL: Final = 1
_SSL_ERROR_WANT_READ: Final = 2
_SSL_ERROR_WANT_WRITE: Final = 3
_SSL_ERROR_SYSCALL: Final = 5
_SSL_ERROR_ZERO_RETURN: Final = 6
_SSL_SENT_SHUTDOWN: Final = 1
_SSL_WRITING: Final = 2  # SSL_want(): a write is waiting for the transport

# --- CPython object layout ---
_PTR_SIZE: Final = ctypes.sizeof(ctypes.c_void_p)
# sizeof(PyObject) == sizeof(PyObject_HEAD); object.__basicsize__ also covers Py_TRACE_REFS builds.
_HEAD_SIZE: Final = object.__basicsize__
CTX_OFFSET: Final = _HEAD_SIZE  # PySSLContext.ctx
SSL_OFFSET: Final = _HEAD_SIZE + _PTR_SIZE  # PySSLSocket.ssl, after PyObject *Socket
_SSLSOCKET_CTX_OFFSET: Final = _HEAD_SIZE + 2 * _PTR_SIZE  # PySSLSocket.ctx

# How much memory behind a candidate pointer must be readable before OpenSSL may touch it.
# SSL_CTX_get_options reads a field ~300 bytes in; SSL_get_SSL_CTX one ~2.5 KiB in (3.0).
_SSL_CTX_PROBE: Final = 1024
_SSL_PROBE: Final = 4096

_OPTION_TO_FLIP: Final = int(ssl.OP_NO_TICKET)
_SSLSOCKET_TYPE: Final[type] = vars(_ssl)["_SSLSocket"]  # not in typeshed


def _versions() -> str:
    return f"Python {sys.version.split()[0]}, {ssl.OPENSSL_VERSION}"


def _layout_error(detail: str) -> StartupError:
    return StartupError(
        "cannot reach OpenSSL's SSL_CTX through CPython's object layout "
        f"({_versions()}): {detail}; "
        "refusing to start without working session tickets/groups"
    )


# --- locating and loading libssl ---


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def _maps() -> list[tuple[int, int, str, str]]:
    """(start, end, permissions, path or "") of every mapping of this process, in address
    order, from /proc/self/maps."""
    out = []
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
        for line in maps:
            fields = line.split(None, 5)
            if len(fields) < 2:
                continue
            lo, _, hi = fields[0].partition("-")
            path = fields[5].strip() if len(fields) == 6 else ""
            out.append((int(lo, 16), int(hi, 16), fields[1], path))
    return out


def _mapped_libssl_paths() -> list[str]:
    """Distinct ``libssl.so*`` files mapped into this process, in mapping order."""
    paths: list[str] = []
    try:
        maps = _maps()
    except OSError:
        return []
    for _lo, _hi, _perms, path in maps:
        if os.path.basename(path).startswith("libssl.so") and path not in paths:
            paths.append(path)
    return paths


def _path_of_ssl_symbol_used_by_ssl_module() -> str | None:
    """The file that defines ``SSL_CTX_new`` as ``_ssl`` resolves it (dlsym + dladdr)."""
    module_file = getattr(_ssl, "__file__", None)
    if not module_file:
        return None
    try:
        ssl_module = ctypes.CDLL(module_file)  # already loaded: dlopen returns the same handle
        address = ctypes.cast(ssl_module.SSL_CTX_new, ctypes.c_void_p).value
        libc = ctypes.CDLL(None)
        dladdr = libc.dladdr
    except (OSError, AttributeError):
        return None
    dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
    dladdr.restype = ctypes.c_int
    info = _DlInfo()
    if not dladdr(address, ctypes.byref(info)) or not info.dli_fname:
        return None
    return os.fsdecode(info.dli_fname)


def _find_libssl() -> str:
    candidates = _mapped_libssl_paths()
    if len(candidates) == 1:
        return candidates[0]
    if len(candidates) > 1:
        used = _path_of_ssl_symbol_used_by_ssl_module()
        if used is not None:
            for path in candidates:
                if os.path.realpath(path) == os.path.realpath(used):
                    return path
        return candidates[0]
    found = ctypes.util.find_library("ssl")
    if found is None:
        raise StartupError(f"cannot find the libssl that Python's ssl module uses ({_versions()})")
    return found


class _Lib:
    """libssl's entry points with their prototypes declared once."""

    def __init__(self, path: str) -> None:
        self.path = path
        lib = ctypes.CDLL(path, use_errno=True)
        vp, c_int, c_long = ctypes.c_void_p, ctypes.c_int, ctypes.c_long

        def fn(name: str, restype: Any, *argtypes: Any) -> Any:
            function = getattr(lib, name)
            function.restype = restype
            function.argtypes = list(argtypes)
            return function

        self.SSL_CTX_get_options = fn("SSL_CTX_get_options", ctypes.c_uint64, vp)
        self.SSL_CTX_ctrl = fn("SSL_CTX_ctrl", c_long, vp, c_int, c_long, vp)
        self.SSL_ctrl = fn("SSL_ctrl", c_long, vp, c_int, c_long, vp)
        self.SSL_get_SSL_CTX = fn("SSL_get_SSL_CTX", vp, vp)
        self.SSL_shutdown = fn("SSL_shutdown", c_int, vp)
        self.SSL_get_shutdown = fn("SSL_get_shutdown", c_int, vp)
        self.SSL_want = fn("SSL_want", c_int, vp)
        self.SSL_has_pending = fn("SSL_has_pending", c_int, vp)
        self.SSL_get_error = fn("SSL_get_error", c_int, vp, c_int)
        # libcrypto functions, found through libssl's dependency (dlsym searches it).
        self.ERR_get_error = fn("ERR_get_error", ctypes.c_ulong)
        self.ERR_clear_error = fn("ERR_clear_error", None)
        self.ERR_error_string_n = fn(
            "ERR_error_string_n", None, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_size_t
        )
        self.OBJ_nid2sn = fn("OBJ_nid2sn", ctypes.c_char_p, c_int)
        self.OpenSSL_version_num = fn("OpenSSL_version_num", ctypes.c_ulong)
        self.CRYPTO_secure_malloc_init = fn(
            "CRYPTO_secure_malloc_init", c_int, ctypes.c_size_t, ctypes.c_size_t
        )
        self.CRYPTO_secure_malloc_initialized = fn("CRYPTO_secure_malloc_initialized", c_int)
        self.CRYPTO_secure_malloc = fn(
            "CRYPTO_secure_malloc", vp, ctypes.c_size_t, ctypes.c_char_p, c_int
        )
        self.CRYPTO_secure_free = fn("CRYPTO_secure_free", None, vp, ctypes.c_char_p, c_int)
        self.CRYPTO_secure_allocated = fn("CRYPTO_secure_allocated", c_int, vp)
        self.CRYPTO_secure_used = fn("CRYPTO_secure_used", ctypes.c_size_t)


def _load() -> tuple[_Lib | None, str]:
    try:
        lib = _Lib(_find_libssl())
    except (OSError, AttributeError, StartupError) as exc:
        return None, f"cannot load libssl ({_versions()}): {exc}"
    loaded = int(lib.OpenSSL_version_num())
    if loaded != ssl.OPENSSL_VERSION_NUMBER:
        return None, (
            f"the libssl found at {lib.path} is version {loaded:#x}, but Python's ssl module "
            f"runs {ssl.OPENSSL_VERSION} ({ssl.OPENSSL_VERSION_NUMBER:#x}); "
            "refusing to start without working session tickets/groups"
        )
    return lib, ""


_LIB, _LOAD_ERROR = _load()


def _lib() -> _Lib:
    if _LIB is None:
        raise StartupError(_LOAD_ERROR)
    return _LIB


def libssl_path() -> str:
    """The path of the libssl edgeterm calls (the one ``_ssl`` is linked with)."""
    return _lib().path


# --- safe memory access ---


def _read_pointer(holder: object, offset: int) -> int:
    """The pointer-sized field at ``offset`` inside ``holder``; never reads outside the object."""
    size = type(holder).__basicsize__
    if offset < 0 or offset % _PTR_SIZE or offset + _PTR_SIZE > size:
        raise _layout_error(
            f"offset {offset} is not a pointer field inside a {type(holder).__name__} "
            f"({size} bytes)"
        )
    return ctypes.c_void_p.from_address(id(holder) + offset).value or 0


def _readable(address: int, length: int) -> bool:
    """Whether ``length`` bytes at ``address`` can be read, asked of the kernel (EFAULT-safe)."""
    if address < 4096 or address % _PTR_SIZE:
        return False
    view = (ctypes.c_char * length).from_address(address)
    read_end, write_end = os.pipe()
    try:
        return os.write(write_end, view) == length
    except OSError:
        return False
    finally:
        os.close(read_end)
        os.close(write_end)


# --- SSL_CTX ---

_ctx_layout_verified = False


def _checked_ctx_pointer(ctx: ssl.SSLContext, holder: object, offset: int) -> int:
    """Read a candidate ``SSL_CTX *`` from ``holder`` at ``offset`` and prove it is ``ctx``'s.

    Raises :class:`StartupError` when it is not; the parameters exist so tests can point it at
    the wrong place.
    """
    lib = _lib()
    pointer = _read_pointer(holder, offset)
    if not _readable(pointer, _SSL_CTX_PROBE):
        raise _layout_error(f"the field at offset {offset} is not a readable pointer")
    python_options = int(ctx.options)
    if int(lib.SSL_CTX_get_options(pointer)) != python_options:
        raise _layout_error("SSL_CTX_get_options() does not match SSLContext.options")
    try:
        ctx.options = ssl.Options(python_options ^ _OPTION_TO_FLIP)
        seen = int(lib.SSL_CTX_get_options(pointer))
    finally:
        ctx.options = ssl.Options(python_options)
    if seen != python_options ^ _OPTION_TO_FLIP:
        raise _layout_error("an option changed through SSLContext.options did not show in C")
    return pointer


def ctx_pointer(ctx: ssl.SSLContext) -> int:
    """The ``SSL_CTX *`` of ``ctx``, self-checked (fully on the first call in the process).

    The first call briefly toggles one option of ``ctx`` and restores it: call it before the
    context is shared with other threads.
    """
    global _ctx_layout_verified
    if not isinstance(ctx, ssl.SSLContext):
        raise TypeError(f"expected an ssl.SSLContext, got {type(ctx).__name__}")
    if not _ctx_layout_verified:
        pointer = _checked_ctx_pointer(ctx, ctx, CTX_OFFSET)
        _ctx_layout_verified = True
        return pointer
    pointer = _read_pointer(ctx, CTX_OFFSET)
    if int(_lib().SSL_CTX_get_options(pointer)) != int(ctx.options):
        raise _layout_error("SSL_CTX_get_options() does not match SSLContext.options")
    return pointer


SECURE_HEAP_PER_CONNECTION = 256  # bytes: room for one connection's ephemeral key(s)
SECURE_HEAP_MIN = 1 << 16
SECURE_HEAP_MAX = 1 << 26


def secure_heap_size(max_connections: int) -> int:
    """A secure heap large enough for ``max_connections`` live handshakes' keys.

    OpenSSL 3.0 takes every private key from the secure heap once it is on, including each
    connection's ephemeral key-exchange key (kept until the connection is freed), and a full
    heap fails the handshake rather than falling back to ordinary memory. A 64 KiB heap
    stopped a worker at about 2,000 connections (found by loadtest's idle scenario). So it is
    sized per connection, as a power of two (the allocator's requirement), capped at 64 MiB.
    """
    want = max(SECURE_HEAP_MIN, SECURE_HEAP_PER_CONNECTION * max_connections)
    return min(SECURE_HEAP_MAX, 1 << (want - 1).bit_length())


def enable_secure_heap(size: int = 1 << 16, min_size: int = 32) -> str:
    """Turn on OpenSSL's secure heap (mlock'ed, guarded) for private keys loaded afterwards.

    Call before any private key is loaded, with ``secure_heap_size(max_connections)``: the
    ephemeral keys of live connections live there too. Also finds where the heap is mapped,
    so that each forked worker can lock its own copy (``lock_secure_heap``). Returns a
    sentence for the log saying what is true in this process; never raises (it is a
    hardening, not a requirement).
    """
    global _secure_heap
    lib = _lib()
    if lib.CRYPTO_secure_malloc_initialized():
        return "OpenSSL secure heap: on (set up earlier in this process)"
    result = int(lib.CRYPTO_secure_malloc_init(size, min_size))
    lib.ERR_clear_error()
    if result not in (1, 2):
        return "OpenSSL secure heap: off (CRYPTO_secure_malloc_init failed; check RLIMIT_MEMLOCK)"
    heap = _secure_heap = _locate_secure_heap(size)
    flags = _vma_flags(heap.start) if heap is not None else None
    # 1: guard pages, mlock and MADV_DONTDUMP all worked; 2: one of them failed
    locked = result == 1 or (flags is not None and "lo" in flags)
    here = "locked in the supervisor" if locked else "not locked in memory (RLIMIT_MEMLOCK too low)"
    if heap is None:
        workers = "the workers cannot lock their copies (its mapping was not found)"
    else:
        workers = (
            "each worker locks its own copy at start and logs the result "
            "(mlock is not inherited across fork)"
        )
    return f"OpenSSL secure heap: on ({size // 1024} KiB) for private keys, {here}; {workers}"


@dataclass(frozen=True, slots=True)
class SecureHeap:
    """Where OpenSSL's secure heap arena is mapped (the same address in forked children)."""

    start: int
    size: int


_secure_heap: SecureHeap | None = None  # found by enable_secure_heap, inherited by fork


def secure_heap() -> SecureHeap | None:
    return _secure_heap


def secure_heap_used() -> int:
    """Bytes allocated from the secure heap now (``CRYPTO_secure_used``); 0 without one
    (OpenSSL 3.0 takes a lock that exists only once the heap is set up)."""
    lib = _lib()
    if not lib.CRYPTO_secure_malloc_initialized():
        return 0
    return int(lib.CRYPTO_secure_used())


def _vma_flags(start: int) -> set[str] | None:
    """The kernel's flags (``VmFlags`` in /proc/self/smaps: ``lo`` locked, ``dd`` not dumped)
    of the mapping that starts at ``start``; None when there is none or smaps is unreadable."""
    found = False
    try:
        with open("/proc/self/smaps", encoding="ascii", errors="replace") as smaps:
            for line in smaps:
                head = line.split(None, 1)[0] if line.strip() else ""
                if not head.endswith(":") and "-" in head:  # a mapping's first line
                    found = int(head.partition("-")[0], 16) == start
                elif found and head == "VmFlags:":
                    return set(line.split()[1:])
    except (OSError, ValueError):
        return None
    return None


def _locate_secure_heap(size: int) -> SecureHeap | None:
    """The arena ``CRYPTO_secure_malloc_init`` mapped: the mapping holding a secure allocation
    (a one-byte probe, freed at once), exactly ``size`` bytes, read-write, between the two
    inaccessible guard pages OpenSSL puts around it. None if anything does not match."""
    lib = _lib()
    probe = lib.CRYPTO_secure_malloc(1, b"edgeterm", 0)
    if not probe:
        return None
    try:
        if not lib.CRYPTO_secure_allocated(probe):
            return None  # OpenSSL fell back to ordinary memory
        maps = _maps()
    except OSError:
        return None
    finally:
        lib.CRYPTO_secure_free(probe, b"edgeterm", 0)
    for i, (lo, hi, perms, _path) in enumerate(maps):
        if lo <= probe < hi:
            before = maps[i - 1] if i > 0 else (0, 0, "", "")
            after = maps[i + 1] if i + 1 < len(maps) else (0, 0, "", "")
            guarded = before[1] == lo and before[2].startswith("---")
            guarded = guarded and after[0] == hi and after[2].startswith("---")
            if hi - lo == size and perms.startswith("rw") and guarded:
                return SecureHeap(lo, size)
            return None
    return None


def lock_secure_heap() -> tuple[bool | None, str]:
    """Lock this process's copy of the secure heap (call in a worker right after fork: memory
    locks are not inherited, so a child's copy, private keys included, could be swapped).

    Returns (locked, a sentence for the log); locked is None when there is no secure heap.
    The lock is ``MLOCK_ONFAULT``, as OpenSSL's own: pages are locked as they are used.
    """
    heap = _secure_heap
    if heap is None:
        return None, "OpenSSL secure heap: none to lock"
    kib = heap.size // 1024
    try:
        mapped = any(lo == heap.start and hi == heap.start + heap.size for lo, hi, _, _ in _maps())
    except OSError as exc:
        return False, f"OpenSSL secure heap ({kib} KiB): not locked (/proc/self/maps: {exc})"
    if not mapped:
        return False, f"OpenSSL secure heap ({kib} KiB): not locked (its mapping moved)"
    err = secmem.lock_range(heap.start, heap.size)
    if err:
        soft = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
        limit = "unlimited" if soft == resource.RLIM_INFINITY else f"{soft // 1024} KiB"
        return False, (
            f"OpenSSL secure heap ({kib} KiB): not locked in memory ({os.strerror(err)}; "
            f"RLIMIT_MEMLOCK is {limit}: raise it, e.g. LimitMEMLOCK= in the systemd unit)"
        )
    flags = _vma_flags(heap.start)
    if flags is not None and "lo" not in flags:
        return False, f"OpenSSL secure heap ({kib} KiB): mlock succeeded but it is not locked"
    dump = ", left out of core dumps" if flags is not None and "dd" in flags else ""
    return True, f"OpenSSL secure heap: locked ({kib} KiB{dump})"


def set_groups(ctx: ssl.SSLContext, groups: str) -> None:
    """Restrict the key exchange groups, e.g. ``"X25519:P-256:P-384"`` (OpenSSL names)."""
    lib = _lib()
    result = int(
        lib.SSL_CTX_ctrl(ctx_pointer(ctx), SSL_CTRL_SET_GROUPS_LIST, 0, groups.encode("ascii"))
    )
    if result != 1:
        lib.ERR_clear_error()
        raise ValueError(f"OpenSSL rejected the key exchange groups {groups!r}")


def set_read_ahead(ctx: ssl.SSLContext, on: bool) -> None:
    """Let OpenSSL read as much as the socket holds into its buffer (fewer read syscalls)."""
    _lib().SSL_CTX_ctrl(ctx_pointer(ctx), SSL_CTRL_SET_READ_AHEAD, 1 if on else 0, None)


# --- SSL ---

_ssl_layout_verified = False


def _sslobj_of(obj: Any) -> Any:
    if type(obj) is _SSLSOCKET_TYPE:
        return obj  # already the _ssl object (the worker's data path holds it directly)
    sslobj = getattr(obj, "_sslobj", None)
    if type(sslobj) is not _SSLSOCKET_TYPE:
        raise ValueError("the TLS connection is not set up (or already closed)")
    return sslobj


def _verify_ssl_layout(sslobj: Any) -> None:
    global _ssl_layout_verified
    # The _ssl object's own context: SSLSocket.context can lag behind an SNI switch.
    context: ssl.SSLContext = sslobj.context
    if _read_pointer(sslobj, _SSLSOCKET_CTX_OFFSET) != id(context):
        raise _layout_error("the _ssl._SSLSocket fields are not (Socket, ssl, ctx)")
    pointer = _read_pointer(sslobj, SSL_OFFSET)
    if not _readable(pointer, _SSL_PROBE):
        raise _layout_error("the SSL * field is not a readable pointer")
    if (_lib().SSL_get_SSL_CTX(pointer) or 0) != ctx_pointer(context):
        raise _layout_error("SSL_get_SSL_CTX() of the connection is not its context's SSL_CTX")
    _ssl_layout_verified = True


def ssl_pointer(obj: Any) -> int:
    """The ``SSL *`` of a connection; the layout is verified on the first call per process."""
    sslobj = _sslobj_of(obj)
    if not _ssl_layout_verified:
        _verify_ssl_layout(sslobj)
    return ctypes.c_void_p.from_address(id(sslobj) + SSL_OFFSET).value or 0


def self_check() -> None:
    """Verify both layouts now, so that a mismatch stops the start rather than a connection.

    Cheap once done (the result is cached for the process, and inherited by forked workers).
    """
    if _ctx_layout_verified and _ssl_layout_verified:
        return
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx_pointer(ctx)
    ssl_pointer(ctx.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=True))


def _take_error_string(lib: _Lib) -> str:
    code = int(lib.ERR_get_error())
    if not code:
        return ""
    buffer = ctypes.create_string_buffer(256)
    lib.ERR_error_string_n(code, buffer, len(buffer))
    return buffer.value.decode("ascii", "replace")


def shutdown_once(sock: Any) -> int:
    """Send our close_notify with a single ``SSL_shutdown`` call; never read from the peer.

    Returns 0 once the close_notify is out (or was already sent). Raises
    :class:`ssl.SSLWantWriteError` when the transport is full (call again when writable),
    :class:`ssl.SSLWantReadError`, or :class:`ssl.SSLError` (``SSLSyscallError`` for an I/O
    error). CPython's ``unwrap()`` instead calls ``SSL_shutdown`` twice, the second time reading
    the peer's close_notify, which breaks a half-closed stream. Reading afterwards still works
    (the peer may keep sending until its own close_notify).

    Call it only with no application write pending: after a ``send`` raised
    ``SSLWantWriteError``, OpenSSL insists that exact write completes first ("bad write retry").
    """
    lib = _LIB
    if lib is None:
        raise StartupError(_LOAD_ERROR)
    pointer = ssl_pointer(sock)
    if lib.SSL_get_shutdown(pointer) & _SSL_SENT_SHUTDOWN and lib.SSL_want(pointer) != _SSL_WRITING:
        return 0  # already sent and flushed: calling SSL_shutdown again would read
    result = lib.SSL_shutdown(pointer)
    if result >= 0:
        return 0
    error = lib.SSL_get_error(pointer, result)
    saved_errno = ctypes.get_errno()
    detail = _take_error_string(lib)
    lib.ERR_clear_error()
    if error == _SSL_ERROR_WANT_WRITE:
        raise ssl.SSLWantWriteError(error, "The operation did not complete (write)")
    if error == _SSL_ERROR_WANT_READ:
        raise ssl.SSLWantReadError(error, "The operation did not complete (read)")
    if error == _SSL_ERROR_SYSCALL:
        message = os.strerror(saved_errno) if saved_errno else "EOF or I/O error"
        raise ssl.SSLSyscallError(error, f"SSL_shutdown: {message}")
    if error == _SSL_ERROR_ZERO_RETURN:
        raise ssl.SSLZeroReturnError(error, "TLS/SSL connection has been closed (EOF)")
    raise ssl.SSLError(error, f"SSL_shutdown failed: {detail or 'unknown error'}")


def has_pending(sock: Any) -> bool:
    """Whether OpenSSL holds bytes not yet returned by a read: decrypted plaintext, or (with
    read-ahead) raw records it read from the socket but has not processed. Neither wakes
    epoll, so a reader that paused must check this before waiting for readiness again."""
    lib = _LIB
    if lib is None:
        raise StartupError(_LOAD_ERROR)
    return bool(lib.SSL_has_pending(ssl_pointer(sock)))


def has_pending_function() -> Any:
    """``SSL_has_pending`` itself, for a hot loop that caches the ``SSL *`` (``ssl_pointer``)."""
    lib = _LIB
    if lib is None:
        raise StartupError(_LOAD_ERROR)
    return lib.SSL_has_pending


def negotiated_group(obj: ssl.SSLSocket | ssl.SSLObject) -> str | None:
    """The key exchange group of a finished handshake (OpenSSL short name, e.g. ``X25519``)."""
    lib = _lib()
    nid = int(lib.SSL_ctrl(ssl_pointer(obj), SSL_CTRL_GET_NEGOTIATED_GROUP, 0, None))
    if nid <= 0 or nid >= 0x1000000:  # 0: none; TLSEXT_nid_unknown | id: not known to OpenSSL
        return None
    name: bytes | None = lib.OBJ_nid2sn(nid)
    return name.decode("ascii") if name else None
