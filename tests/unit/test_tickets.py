"""edgeterm.tickets: the locked key store, the TICKET_KEYS frame, and the OpenSSL callback.

The callback tests are real TLS handshakes between ``SSLObject`` s over memory BIOs: a client
session issued by one server context is offered to another whose store holds other keys.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
from pathlib import Path

import pytest

from edgeterm import control, selfsigned
from edgeterm.config import CertificateConfig, TlsConfig
from edgeterm.keyring import KEY_SIZE, MAX_FILE_KEYS, NAME_SIZE, KeyFileError, KeyRing
from edgeterm.tickets import (
    KeyStore,
    TicketCallback,
    install_ring,
    load_key_files,
    send_ring,
    wipe_bytes,
)
from edgeterm.tls import build_contexts
from tests.support import memtls

ZERO_KEY = bytes(KEY_SIZE)


def key(tag: int) -> bytes:
    """A recognisable 80-byte key: its name (first 16 bytes) starts with ``tag``."""
    return bytes([tag]) * NAME_SIZE + os.urandom(KEY_SIZE - NAME_SIZE)


def payload(seq: int, keys: list[bytes]) -> bytes:
    return struct.pack(">QB", seq, len(keys)) + b"".join(keys)


# --- KeyStore ---


def test_a_new_store_is_zeroed_locked_and_excluded_from_core_dumps() -> None:
    store = KeyStore(capacity=4)
    assert bytes(store.buf.view) == bytes(4 * KEY_SIZE)
    assert store.buf.dontdump
    assert store.buf.locked  # RLIMIT_MEMLOCK here allows it (ulimit -l)
    flags = vm_flags(store.buf.address)
    assert "dd" in flags, flags  # VM_DONTDUMP
    assert "lo" in flags, flags  # VM_LOCKED


def vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping holding ``address``, from /proc/self/smaps."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start <= address < end
            elif inside and line.startswith("VmFlags:"):
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def test_fill_random_fills_one_slot_with_80_random_bytes() -> None:
    store = KeyStore(capacity=3)
    store.fill_random(1)
    first = bytes(store.view(1))
    assert len(first) == KEY_SIZE
    assert first != ZERO_KEY
    assert bytes(store.view(0)) == ZERO_KEY and bytes(store.view(2)) == ZERO_KEY  # neighbours
    store.fill_random(1)
    assert bytes(store.view(1)) != first
    assert store.name(1) == bytes(store.view(1))[:NAME_SIZE]


def test_wipe_zeroes_one_slot_only() -> None:
    store = KeyStore(capacity=3)
    for slot in range(3):
        store.fill_random(slot)
    kept = bytes(store.view(2))
    store.wipe(1)
    assert bytes(store.view(1)) == ZERO_KEY
    assert bytes(store.view(0)) != ZERO_KEY
    assert bytes(store.view(2)) == kept


def test_the_address_of_a_slot_is_its_bytes_in_the_buffer() -> None:
    import ctypes

    store = KeyStore(capacity=2)
    store.fill_random(1)
    assert ctypes.string_at(store.address(1), KEY_SIZE) == bytes(store.view(1))
    assert store.address(1) - store.address(0) == KEY_SIZE


def test_load_file_reads_exactly_80_bytes(tmp_path: Path) -> None:
    data = key(7)
    path = tmp_path / "ticket.key"
    path.write_bytes(data)
    store = KeyStore(capacity=2)
    store.load_file(1, str(path))
    assert bytes(store.view(1)) == data
    assert store.name(1) == bytes([7]) * NAME_SIZE


@pytest.mark.parametrize(
    ("size", "says"), [(79, "got 79 bytes"), (81, "more than 80 bytes"), (0, "got 0 bytes")]
)
def test_load_file_rejects_a_wrong_size_naming_the_file(
    tmp_path: Path, size: int, says: str
) -> None:
    path = tmp_path / f"bad-{size}.key"
    path.write_bytes(os.urandom(size))
    store = KeyStore(capacity=1)
    store.fill_random(0)  # whatever was in the slot is wiped on failure
    with pytest.raises(KeyFileError) as info:
        store.load_file(0, str(path))
    message = str(info.value)
    assert str(path) in message
    assert says in message
    assert "exactly 80 bytes" in message
    assert "openssl rand 80" in message
    assert bytes(store.view(0)) == ZERO_KEY


def test_load_file_rejects_a_missing_file_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "missing.key"
    with pytest.raises(KeyFileError, match=r"missing\.key: cannot read"):
        KeyStore(capacity=1).load_file(0, str(path))


def test_load_key_files_releases_staged_slots_when_one_file_is_bad(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.key", tmp_path / "bad.key"
    good.write_bytes(key(1))
    bad.write_bytes(os.urandom(79))
    store = KeyStore(capacity=6)
    ring = KeyRing(store.fill_random, store.wipe, now=0.0, capacity=6)
    live = {slot: bytes(store.view(slot)) for slot in ring.order()}
    with pytest.raises(KeyFileError, match=r"bad\.key"):
        load_key_files(store, ring.take, ring.release, [str(good), str(bad)])
    # the live keys are untouched; the slot that held good.key was wiped and freed
    assert {slot: bytes(store.view(slot)) for slot in ring.order()} == live
    assert all(bytes(store.view(s)) == ZERO_KEY for s in range(6) if s not in live)
    assert len([ring.take() for _ in range(4)]) == 4  # every spare slot is free again


def test_load_key_files_returns_slots_in_file_order(tmp_path: Path) -> None:
    paths = []
    for tag in (3, 1, 2):
        p = tmp_path / f"k{tag}.key"
        p.write_bytes(key(tag))
        paths.append(str(p))
    store = KeyStore(capacity=5)
    ring = KeyRing(store.fill_random, store.wipe, now=0.0, capacity=5)
    slots = load_key_files(store, ring.take, ring.release, paths)
    assert [store.name(s)[0] for s in slots] == [3, 1, 2]


def test_load_key_files_limits_the_number_of_files(tmp_path: Path) -> None:
    store = KeyStore()
    ring = KeyRing(store.fill_random, store.wipe, now=0.0)
    paths = [str(tmp_path / f"{i}.key") for i in range(MAX_FILE_KEYS + 1)]
    with pytest.raises(KeyFileError, match=f"at most {MAX_FILE_KEYS}"):
        load_key_files(store, ring.take, ring.release, paths)


# --- the TICKET_KEYS frame ---


def test_send_ring_then_install_ring_copies_the_keys_in_order() -> None:
    sender = KeyStore(capacity=6)
    for slot in range(6):
        sender.fill_random(slot)
    order = (4, 1, 5)  # current, next, previous
    a, b = socket.socketpair()
    with a, b:
        send_ring(a, sender, order, seq=42)
        b.settimeout(5)
        messages = control.Decoder().feed(b.recv(65536))
    assert len(messages) == 1
    msg = messages[0]
    assert msg.type == control.MsgType.TICKET_KEYS

    receiver = KeyStore(capacity=6)
    for slot in range(6):
        receiver.fill_random(slot)  # stale keys from an older, bigger ring
    assert install_ring(receiver, msg.payload) == (42, 3)
    assert [bytes(receiver.view(i)) for i in range(3)] == [bytes(sender.view(s)) for s in order]
    assert all(bytes(receiver.view(i)) == ZERO_KEY for i in range(3, 6))  # the rest wiped


@pytest.mark.parametrize(
    "bad",
    [
        b"",
        b"\x00" * 8,  # shorter than the header
        payload(1, []),  # no key
        payload(1, [key(1)])[:-1],  # a truncated key
        payload(1, [key(1)]) + b"\x00",  # a byte too many
        struct.pack(">QB", 1, 2) + key(1),  # says two keys, carries one
        payload(1, [key(i) for i in range(5)]),  # more keys than the store holds
    ],
    ids=["empty", "short-header", "no-key", "truncated", "oversized", "count", "capacity"],
)
def test_install_ring_rejects_a_malformed_payload(bad: bytes) -> None:
    store = KeyStore(capacity=4)
    store.fill_random(0)
    before = bytes(store.buf.view)
    with pytest.raises(control.FrameError, match="TICKET_KEYS"):
        install_ring(store, bad)
    assert bytes(store.buf.view) == before  # the installed keys stay


def test_wipe_bytes_zeroes_a_bytes_object() -> None:
    secret = os.urandom(KEY_SIZE * 3)
    assert secret != bytes(len(secret))
    wipe_bytes(secret)
    assert secret == bytes(KEY_SIZE * 3)
    assert len(secret) == KEY_SIZE * 3


def test_wipe_bytes_of_an_empty_object_is_harmless() -> None:
    empty = b""
    wipe_bytes(empty)
    assert empty == b""


# --- the callback, in real handshakes ---


@pytest.fixture(scope="module")
def tls_cfg(tmp_path_factory: pytest.TempPathFactory) -> TlsConfig:
    directory = tmp_path_factory.mktemp("ticket-certs")
    selfsigned.generate(directory, ("localhost",))
    cert = CertificateConfig(cert=directory / "localhost.pem", key=directory / "localhost.key")
    return TlsConfig(certificates=(cert,))


@pytest.fixture(scope="module")
def ca_file(tls_cfg: TlsConfig) -> Path:
    return tls_cfg.certificates[0].cert.parent / "ca.pem"


class Server:
    """One server context (as a worker builds it) with its own store and ticket callback."""

    def __init__(self, tls_cfg: TlsConfig, keys: list[bytes]) -> None:
        self.contexts = build_contexts(tls_cfg, "test.toml")
        self.store = KeyStore(capacity=4)
        self.callback = TicketCallback(self.store)
        self.set_keys(keys)
        self.callback.install(self.contexts.contexts)

    def set_keys(self, keys: list[bytes], seq: int = 1) -> None:
        count = install_ring(self.store, payload(seq, keys))[1]
        self.callback.keys_changed(seq, count)


def connect(
    server: Server, client_ctx: ssl.SSLContext, session: ssl.SSLSession | None = None
) -> ssl.SSLObject:
    """A full TLS exchange over memory BIOs, including the post-handshake tickets; return the
    client side (its ``session`` then holds the newest ticket)."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="localhost", session=session)
    srv = server.contexts.default.wrap_bio(s_in, s_out, server_side=True)
    memtls.handshake(client, srv, (c_in, c_out), (s_in, s_out))
    srv.write(b"x")  # application data after the tickets: reading it processes them
    c_in.write(s_out.read())
    assert client.read(1) == b"x"
    return client


@pytest.fixture(params=["TLSv1.3", "TLSv1.2"])
def client_ctx(request: pytest.FixtureRequest, ca_file: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca_file))
    ctx.maximum_version = ssl.TLSVersion[request.param.replace(".", "_")]
    ctx.minimum_version = ctx.maximum_version
    return ctx


def test_a_ticket_resumes_on_another_context_with_the_same_keys(
    tls_cfg: TlsConfig, client_ctx: ssl.SSLContext
) -> None:
    k1 = key(1)
    a, b = Server(tls_cfg, [k1]), Server(tls_cfg, [k1])
    first = connect(a, client_ctx)
    assert not first.session_reused
    assert first.session is not None and first.session.has_ticket
    assert a.callback.issued >= 1

    again = connect(b, client_ctx, first.session)
    assert again.session_reused
    assert b.callback.decrypted == 1
    assert b.callback.unknown == 0


def test_a_decrypt_only_key_resumes_and_renews_the_ticket(
    tls_cfg: TlsConfig, client_ctx: ssl.SSLContext
) -> None:
    k1, k2 = key(1), key(2)
    server = Server(tls_cfg, [k1])
    session = connect(server, client_ctx).session
    server.set_keys([k2, k1], seq=2)  # a rotation: k1 now decrypts only
    issued = server.callback.issued
    resumed = connect(server, client_ctx, session)
    assert resumed.session_reused
    assert server.callback.issued > issued  # renewed: a new ticket under k2

    server.set_keys([key(3), k2], seq=3)  # k1 gone: the renewed ticket still resumes
    assert resumed.session is not None
    assert connect(server, client_ctx, resumed.session).session_reused


def test_a_ticket_under_an_unknown_key_gets_a_full_handshake(
    tls_cfg: TlsConfig, client_ctx: ssl.SSLContext
) -> None:
    server = Server(tls_cfg, [key(1)])
    session = connect(server, client_ctx).session
    other = Server(tls_cfg, [key(2), key(3)])
    fresh = connect(other, client_ctx, session)  # no error: a full handshake
    assert not fresh.session_reused
    assert other.callback.unknown == 1
    assert other.callback.decrypted == 0
    assert fresh.session is not None and fresh.session.has_ticket  # and a new ticket


def test_same_name_different_secret_does_not_resume(
    tls_cfg: TlsConfig, client_ctx: ssl.SSLContext
) -> None:
    k1 = key(1)
    impostor = k1[:NAME_SIZE] + os.urandom(KEY_SIZE - NAME_SIZE)  # same name, other secrets
    session = connect(Server(tls_cfg, [k1]), client_ctx).session
    other = Server(tls_cfg, [impostor])
    assert not connect(other, client_ctx, session).session_reused  # the HMAC check fails


def test_tls12_renews_only_tickets_under_a_decrypt_only_key(
    tls_cfg: TlsConfig, ca_file: Path
) -> None:
    # In TLS 1.2 a new ticket on resumption is the server's choice: the callback's 2 ("renew").
    client = ssl.create_default_context(cafile=str(ca_file))
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    k1, k2 = key(1), key(2)
    server = Server(tls_cfg, [k1])
    session = connect(server, client).session
    issued = server.callback.issued
    assert connect(server, client, session).session_reused
    assert server.callback.issued == issued  # under the current key: no new ticket
    server.set_keys([k2, k1], seq=2)
    assert connect(server, client, session).session_reused
    assert server.callback.issued == issued + 1  # under a decrypt-only key: renewed


def test_tls13_sends_count_tickets_after_a_full_handshake_and_one_on_renewal(
    tls_cfg: TlsConfig, ca_file: Path
) -> None:
    seen: list[int] = []

    def on_message(
        _c: object, direction: str, _v: object, ctype: int, mtype: int, _d: object
    ) -> None:
        if direction == "read" and ctype == 22 and mtype == 4:  # handshake, NewSessionTicket
            seen.append(1)

    client = ssl.create_default_context(cafile=str(ca_file))
    client.minimum_version = ssl.TLSVersion.TLSv1_3
    client._msg_callback = on_message  # type: ignore[attr-defined]
    k1 = key(1)
    server = Server(tls_cfg, [k1])  # tls.tickets.count: the default, 2
    session = connect(server, client).session
    assert len(seen) == 2
    seen.clear()
    assert connect(server, client, session).session_reused
    assert seen == []  # under the current key: the client keeps its ticket
    server.set_keys([key(2), k1], seq=2)
    assert connect(server, client, session).session_reused
    assert len(seen) == 1  # under a decrypt-only key: one new ticket
