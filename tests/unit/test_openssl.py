"""edgeterm.openssl: the ctypes bridge to the libssl behind CPython's ssl module."""

from __future__ import annotations

import ssl
from pathlib import Path
from types import SimpleNamespace

import pytest

from edgeterm import openssl, selfsigned
from edgeterm.errors import StartupError
from tests.support import memtls

SSL_CTRL_GET_READ_AHEAD = 40


@pytest.fixture(scope="module")
def cert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("openssl-certs")
    selfsigned.generate(directory, ("localhost",))
    return directory


@pytest.fixture
def server_ctx(cert_dir: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_dir / "localhost.pem", cert_dir / "localhost.key")
    return ctx


@pytest.fixture
def client_ctx(cert_dir: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cert_dir / "ca.pem"))


class Pair:
    """A client and a server SSLObject joined by memory BIOs."""

    def __init__(self, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> None:
        self.c_in, self.c_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.s_in, self.s_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.client = client_ctx.wrap_bio(self.c_in, self.c_out, server_hostname="localhost")
        self.server = server_ctx.wrap_bio(self.s_in, self.s_out, server_side=True)

    def pump(self) -> None:
        self.s_in.write(self.c_out.read())
        self.c_in.write(self.s_out.read())

    def handshake(self) -> Pair:
        memtls.handshake(self.client, self.server, (self.c_in, self.c_out), (self.s_in, self.s_out))
        return self


def get_options(ptr: int) -> int:
    lib = openssl._lib()
    return int(lib.SSL_CTX_get_options(ptr))


# --- locating libssl and the SSL_CTX ---


def test_loads_the_libssl_mapped_into_the_process() -> None:
    with open("/proc/self/maps") as maps:
        assert openssl.libssl_path() in maps.read()


def test_ctx_pointer_self_check_passes(server_ctx: ssl.SSLContext) -> None:
    ptr = openssl.ctx_pointer(server_ctx)
    assert ptr
    assert get_options(ptr) == int(server_ctx.options)
    server_ctx.options |= ssl.OP_NO_TICKET
    assert get_options(ptr) & ssl.OP_NO_TICKET
    assert openssl.ctx_pointer(server_ctx) == ptr  # second call: the cached, cheap path


def test_the_self_check_leaves_the_options_unchanged(server_ctx: ssl.SSLContext) -> None:
    before = server_ctx.options
    openssl._checked_ctx_pointer(server_ctx, server_ctx, openssl.CTX_OFFSET)
    assert server_ctx.options == before


@pytest.mark.parametrize(
    "offset",
    [o for o in range(0, ssl.SSLContext.__basicsize__, 8) if o != openssl.CTX_OFFSET],
)
def test_a_wrong_offset_fails_cleanly(server_ctx: ssl.SSLContext, offset: int) -> None:
    # Every other pointer-sized field of the real object: refcount, type, NULLs, Python
    # objects... none is an SSL_CTX, and none may crash the check.
    with pytest.raises(StartupError, match="cannot reach OpenSSL's SSL_CTX"):
        openssl._checked_ctx_pointer(server_ctx, server_ctx, offset)


def test_an_offset_outside_the_object_is_refused(server_ctx: ssl.SSLContext) -> None:
    with pytest.raises(StartupError, match="not a pointer field inside"):
        openssl._checked_ctx_pointer(server_ctx, server_ctx, 4096)
    with pytest.raises(StartupError, match="not a pointer field inside"):
        openssl._checked_ctx_pointer(server_ctx, server_ctx, openssl.CTX_OFFSET + 1)


def test_another_objects_field_fails_cleanly(server_ctx: ssl.SSLContext) -> None:
    with pytest.raises(StartupError, match="refusing to start"):
        openssl._checked_ctx_pointer(server_ctx, b"x" * 64, openssl.CTX_OFFSET)  # ob_size
    with pytest.raises(StartupError, match="refusing to start"):
        openssl._checked_ctx_pointer(server_ctx, ssl.MemoryBIO(), openssl.CTX_OFFSET)


def test_another_contexts_pointer_is_caught_by_the_option_flip(
    server_ctx: ssl.SSLContext,
) -> None:
    # Same options, so only flipping one on the Python side tells the two SSL_CTX apart.
    twin = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    twin.options = server_ctx.options
    with pytest.raises(StartupError, match="did not show in C"):
        openssl._checked_ctx_pointer(server_ctx, twin, openssl.CTX_OFFSET)


# --- SSL * ---


def test_ssl_pointer_belongs_to_the_connections_context(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    pair = Pair(server_ctx, client_ctx)
    lib = openssl._lib()
    for obj, ctx in ((pair.server, server_ctx), (pair.client, client_ctx)):
        ptr = openssl.ssl_pointer(obj)
        assert lib.SSL_get_SSL_CTX(ptr) == openssl.ctx_pointer(ctx)
    assert openssl.ssl_pointer(pair.server) != openssl.ssl_pointer(pair.client)


def test_ssl_pointer_refuses_an_object_without_a_connection() -> None:
    with pytest.raises(ValueError, match="not set up"):
        openssl.ssl_pointer(SimpleNamespace(_sslobj=None))  # type: ignore[arg-type]


# --- groups, read-ahead ---


def test_set_groups_default_handshake_uses_x25519(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    openssl.set_groups(server_ctx, "X25519:P-256:P-384")
    pair = Pair(server_ctx, client_ctx).handshake()
    assert openssl.negotiated_group(pair.server) == "X25519"
    assert openssl.negotiated_group(pair.client) == "X25519"


def test_set_groups_is_honoured(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> None:
    openssl.set_groups(server_ctx, "X25519:P-256:P-384")
    openssl.set_groups(client_ctx, "P-384")
    pair = Pair(server_ctx, client_ctx).handshake()
    assert openssl.negotiated_group(pair.server) == "secp384r1"

    openssl.set_groups(client_ctx, "P-521")  # not on the server's list
    with pytest.raises(ssl.SSLError):
        Pair(server_ctx, client_ctx).handshake()


def test_set_groups_rejects_unknown_groups(server_ctx: ssl.SSLContext) -> None:
    with pytest.raises(ValueError, match="rejected the key exchange groups"):
        openssl.set_groups(server_ctx, "X25519:no-such-group")
    assert openssl._lib().ERR_get_error() == 0  # nothing left to confuse the ssl module


def test_set_read_ahead(server_ctx: ssl.SSLContext) -> None:
    lib = openssl._lib()
    ptr = openssl.ctx_pointer(server_ctx)
    openssl.set_read_ahead(server_ctx, True)
    assert lib.SSL_CTX_ctrl(ptr, SSL_CTRL_GET_READ_AHEAD, 0, None) == 1
    openssl.set_read_ahead(server_ctx, False)
    assert lib.SSL_CTX_ctrl(ptr, SSL_CTRL_GET_READ_AHEAD, 0, None) == 0


# --- shutdown_once ---


def test_shutdown_once_sends_close_notify_and_keeps_reading(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    pair = Pair(server_ctx, client_ctx).handshake()
    pair.client.write(b"before")
    pair.pump()
    assert pair.server.read(100) == b"before"

    assert openssl.shutdown_once(pair.server) == 0
    pair.pump()
    assert pair.client.read(100) == b""  # a clean EOF: close_notify received

    # Half-closed: the client may still send, and the server still reads.
    pair.client.write(b"after")
    pair.pump()
    assert pair.server.read(100) == b"after"

    # A second call neither sends another alert nor tries to read the peer's close_notify.
    assert openssl.shutdown_once(pair.server) == 0
    assert pair.s_out.pending == 0


def test_shutdown_once_before_the_handshake_raises_ssl_error(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    pair = Pair(server_ctx, client_ctx)
    with pytest.raises(ssl.SSLError, match="shutdown while in init"):
        openssl.shutdown_once(pair.server)
    assert openssl._lib().ERR_get_error() == 0  # the error queue was cleared
    Pair(server_ctx, client_ctx).handshake()  # and the ssl module is unaffected


def test_secure_heap_is_sized_for_live_connections() -> None:
    from edgeterm.openssl import SECURE_HEAP_MAX, SECURE_HEAP_PER_CONNECTION, secure_heap_size

    assert secure_heap_size(1) == 1 << 16
    size = secure_heap_size(10_000)
    assert size >= SECURE_HEAP_PER_CONNECTION * 10_000
    assert size & (size - 1) == 0  # a power of two, as CRYPTO_secure_malloc_init requires
    assert secure_heap_size(10**9) == SECURE_HEAP_MAX
