"""Session tickets that resume on every worker: key storage, transport, and the OpenSSL callback.

* ``KeyStore``: key slots of 80 bytes in a ``LockedBuffer`` (mlock'ed, MADV_DONTDUMP). Random
  keys are written straight into a slot by ``getrandom(2)``, key files are read straight into
  one, and a retired slot is zeroed: key bytes never become Python ``bytes`` on the supervisor.
* Transport: ``ring_frame`` sends the ring's keys to a worker as a TICKET_KEYS control frame,
  gathered with ``sendmsg`` directly from the locked buffer. The worker copies them into its own
  store and wipes the frame's bytes (best effort: they also pass through a kernel socket buffer).
* ``TicketCallback``: installs ``SSL_CTX_set_tlsext_ticket_key_evp_cb`` on the worker's
  contexts. To issue a ticket it encrypts under the first key (AES-256-CBC, HMAC-SHA256, a
  fresh IV from OpenSSL's RNG); to read one it finds the key by name and returns 2 (use and
  renew) when that key is not the encrypting one, 0 (full handshake) when no key matches.
  The OSSL_PARAM arrays for the HMAC keys are built once per install, not per handshake.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import socket
import ssl
import struct
from collections.abc import Sequence
from typing import Any

from edgeterm import control, openssl
from edgeterm.keyring import (
    AES_OFFSET,
    CAPACITY,
    HMAC_OFFSET,
    HMAC_SIZE,
    KEY_SIZE,
    MAX_FILE_KEYS,
    NAME_SIZE,
    KeyFileError,
)
from edgeterm.secmem import LockedBuffer

log = logging.getLogger("edgeterm.tickets")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.getrandom.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
_libc.getrandom.restype = ctypes.c_ssize_t

_HEADER = struct.Struct(">QB")  # seq, number of keys; then the keys, encrypting key first


class KeyStore:
    def __init__(self, capacity: int = CAPACITY) -> None:
        self.capacity = capacity
        self.buf = LockedBuffer(capacity * KEY_SIZE)

    def address(self, slot: int) -> int:
        return self.buf.address + slot * KEY_SIZE

    def view(self, slot: int) -> memoryview:
        return self.buf.view[slot * KEY_SIZE : (slot + 1) * KEY_SIZE]

    def fill_random(self, slot: int) -> None:
        got = _libc.getrandom(self.address(slot), KEY_SIZE, 0)
        if got != KEY_SIZE:
            raise OSError(ctypes.get_errno(), "getrandom failed for a ticket key")

    def wipe(self, slot: int) -> None:
        self.buf.wipe(slot * KEY_SIZE, (slot + 1) * KEY_SIZE)

    def name(self, slot: int) -> bytes:
        return bytes(self.view(slot)[:NAME_SIZE])  # names are not secret

    def load_file(self, slot: int, path: str) -> None:
        """Read an 80-byte key file into ``slot``; raise KeyFileError naming the file."""
        try:
            with open(path, "rb", buffering=0) as f:
                got = f.readinto(self.view(slot))
                extra = f.read(1)
        except OSError as exc:
            self.wipe(slot)
            raise KeyFileError(f"{path}: cannot read: {exc.strerror or exc}") from exc
        if got != KEY_SIZE or extra:
            self.wipe(slot)
            size = "more than 80 bytes" if extra else f"{got} bytes"
            raise KeyFileError(
                f"{path}: a ticket key file must be exactly {KEY_SIZE} bytes, got {size} "
                "(make one with: openssl rand 80 > FILE)"
            )


def load_key_files(store: KeyStore, take: Any, release: Any, paths: Sequence[str]) -> list[int]:
    """Stage key files into fresh slots; on any error free them and raise KeyFileError."""
    if len(paths) > MAX_FILE_KEYS:
        raise KeyFileError(f"at most {MAX_FILE_KEYS} ticket key files are supported")
    slots: list[int] = []
    try:
        for path in paths:
            slot = take()
            slots.append(slot)
            store.load_file(slot, path)
    except BaseException:
        release(slots)
        raise
    return slots


# -- transport ---------------------------------------------------------------------------


def send_ring(sock: socket.socket, store: KeyStore, order: Sequence[int], seq: int) -> None:
    """Send the keys of ``order`` (encrypting first) as one TICKET_KEYS frame."""
    payload_len = _HEADER.size + KEY_SIZE * len(order)
    head = control.HEADER.pack(payload_len, control.MsgType.TICKET_KEYS)
    parts: list[Any] = [head + _HEADER.pack(seq, len(order))]
    parts.extend(store.view(slot) for slot in order)
    sock.sendmsg(parts)


def wipe_bytes(data: bytes) -> None:
    """Overwrite the contents of a bytes object that held key material (CPython layout)."""
    if data:
        ctypes.memset(id(data) + bytes.__basicsize__ - 1, 0, len(data))


def install_ring(store: KeyStore, payload: bytes) -> tuple[int, int]:
    """Worker side: copy a TICKET_KEYS payload into ``store``; return (seq, key count)."""
    if len(payload) < _HEADER.size:
        raise control.FrameError("TICKET_KEYS: truncated")
    seq, count = _HEADER.unpack_from(payload)
    if count < 1 or count > store.capacity or len(payload) != _HEADER.size + count * KEY_SIZE:
        raise control.FrameError("TICKET_KEYS: bad key count or length")
    for i in range(count):
        start = _HEADER.size + i * KEY_SIZE
        store.view(i)[:] = payload[start : start + KEY_SIZE]
    for i in range(count, store.capacity):
        store.wipe(i)
    return seq, count


# -- the OpenSSL callback -------------------------------------------------------------------

_OSSL_PARAM_UTF8_STRING = 4
_OSSL_PARAM_OCTET_STRING = 5
_OSSL_PARAM_UNMODIFIED = ctypes.c_size_t(-1).value


class _OsslParam(ctypes.Structure):
    _fields_ = [
        ("key", ctypes.c_char_p),
        ("data_type", ctypes.c_uint),
        ("data", ctypes.c_void_p),
        ("data_size", ctypes.c_size_t),
        ("return_size", ctypes.c_size_t),
    ]


_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.c_void_p,  # SSL *
    ctypes.c_void_p,  # unsigned char key_name[16]
    ctypes.c_void_p,  # unsigned char *iv
    ctypes.c_void_p,  # EVP_CIPHER_CTX *
    ctypes.c_void_p,  # EVP_MAC_CTX *
    ctypes.c_int,  # enc
)

_DIGEST = ctypes.c_char_p(b"SHA256")
_KEY_PARAM = b"key"
_DIGEST_PARAM = b"digest"
_IV_LEN = 16


class _Crypto:
    def __init__(self) -> None:
        lib = ctypes.CDLL(openssl.libssl_path())
        vp, c_int = ctypes.c_void_p, ctypes.c_int

        def fn(name: str, restype: Any, *argtypes: Any) -> Any:
            f = getattr(lib, name)
            f.restype = restype
            f.argtypes = list(argtypes)
            return f

        self.set_cb = fn("SSL_CTX_set_tlsext_ticket_key_evp_cb", c_int, vp, _CALLBACK)
        self.RAND_bytes = fn("RAND_bytes", c_int, vp, c_int)
        self.cipher = fn("EVP_aes_256_cbc", vp)()
        self.EncryptInit = fn("EVP_EncryptInit_ex", c_int, vp, vp, vp, vp, vp)
        self.DecryptInit = fn("EVP_DecryptInit_ex", c_int, vp, vp, vp, vp, vp)
        self.MAC_set_params = fn("EVP_MAC_CTX_set_params", c_int, vp, vp)


_crypto: _Crypto | None = None


class TicketCallback:
    """The ticket key callback of one worker, reading keys from its ``KeyStore``."""

    def __init__(self, store: KeyStore) -> None:
        global _crypto
        if _crypto is None:
            _crypto = _Crypto()
        self._c = _crypto
        self.store = store
        self.count = 0
        self.seq = 0
        self._by_name: dict[bytes, int] = {}
        self._params: list[Any] = []
        self._cfunc = _CALLBACK(self._callback)  # kept alive as long as this object
        self.issued = 0
        self.decrypted = 0
        self.unknown = 0

    def install(self, contexts: Sequence[ssl.SSLContext]) -> None:
        for ctx in contexts:
            if self._c.set_cb(openssl.ctx_pointer(ctx), self._cfunc) != 1:
                raise RuntimeError("SSL_CTX_set_tlsext_ticket_key_evp_cb failed")

    def keys_changed(self, seq: int, count: int) -> None:
        """The store now holds ``count`` keys (slot 0 encrypts): rebuild the lookups."""
        params: list[Any] = []
        by_name: dict[bytes, int] = {}
        for slot in range(count):
            array = (_OsslParam * 3)()
            array[0] = _OsslParam(
                _KEY_PARAM,
                _OSSL_PARAM_OCTET_STRING,
                self.store.address(slot) + HMAC_OFFSET,
                HMAC_SIZE,
                _OSSL_PARAM_UNMODIFIED,
            )
            array[1] = _OsslParam(
                _DIGEST_PARAM,
                _OSSL_PARAM_UTF8_STRING,
                ctypes.cast(_DIGEST, ctypes.c_void_p),
                6,
                _OSSL_PARAM_UNMODIFIED,
            )
            params.append(array)
            by_name.setdefault(self.store.name(slot), slot)
        self._params = params
        self._by_name = by_name
        self.count = count
        self.seq = seq

    def _callback(
        self, ssl_ptr: int, key_name: int, iv: int, cctx: int, hctx: int, enc: int
    ) -> int:
        try:
            c = self._c
            if enc:
                if not self.count:
                    return -1
                ctypes.memmove(key_name, self.store.address(0), NAME_SIZE)
                if c.RAND_bytes(iv, _IV_LEN) != 1:
                    return -1
                if c.EncryptInit(cctx, c.cipher, None, self.store.address(0) + AES_OFFSET, iv) != 1:
                    return -1
                if c.MAC_set_params(hctx, self._params[0]) != 1:
                    return -1
                self.issued += 1
                return 1
            slot = self._by_name.get(ctypes.string_at(key_name, NAME_SIZE))
            if slot is None:
                self.unknown += 1
                return 0
            if c.MAC_set_params(hctx, self._params[slot]) != 1:
                return -1
            if c.DecryptInit(cctx, c.cipher, None, self.store.address(slot) + AES_OFFSET, iv) != 1:
                return -1
            self.decrypted += 1
            return 1 if slot == 0 else 2
        except Exception:  # never let an exception cross into OpenSSL
            return -1
