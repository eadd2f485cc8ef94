"""A worker's start: the ticket key ring inherited from the supervisor at fork is copied into
the worker's own locked store (tickets on) and, in every case, wiped
(``workers.main._install_tickets``)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import pytest
from edgeterm.workers.main import _install_tickets

from edgeterm import selfsigned
from edgeterm.config import CertificateConfig, Config, TicketsConfig, TlsConfig
from edgeterm.keyring import KEY_SIZE
from edgeterm.tickets import KeyStore
from edgeterm.tls import TlsContexts, build_contexts


@pytest.fixture(scope="module")
def tls_cfg(tmp_path_factory: pytest.TempPathFactory) -> TlsConfig:
    directory = tmp_path_factory.mktemp("worker-ticket-certs")
    selfsigned.generate(directory, ("localhost",))
    cert = CertificateConfig(cert=directory / "localhost.pem", key=directory / "localhost.key")
    return TlsConfig(certificates=(cert,))


@pytest.fixture(scope="module")
def contexts(tls_cfg: TlsConfig) -> TlsContexts:
    return build_contexts(tls_cfg, "test.toml")


def config(tls_cfg: TlsConfig, *, enabled: bool) -> Config:
    tls = dataclasses.replace(tls_cfg, tickets=TicketsConfig(enabled=enabled))
    return Config(path=Path("/etc/edgeterm/test.toml"), listeners=(), tls=tls, upstreams={})


def inherited_ring(keys: Sequence[bytes]) -> KeyStore:
    """What the supervisor's store looks like at fork: keys in slots 1.. (slot 0 unused)."""
    store = KeyStore()
    for i, key in enumerate(keys, start=1):
        store.view(i)[:] = key
    return store


def is_zero(store: KeyStore) -> bool:
    return bytes(store.buf.view) == bytes(store.buf.size)


def test_tickets_disabled_the_inherited_ring_is_still_wiped(
    tls_cfg: TlsConfig, contexts: TlsContexts
) -> None:
    keys = [os.urandom(KEY_SIZE), os.urandom(KEY_SIZE)]
    store = inherited_ring(keys)
    assert not is_zero(store)
    callback = _install_tickets(config(tls_cfg, enabled=False), contexts, (store, (2, 1), 5))
    assert callback is None
    assert is_zero(store), "the supervisor's keys stayed in the worker's memory"


def test_tickets_enabled_the_ring_is_copied_in_order_then_wiped(
    tls_cfg: TlsConfig, contexts: TlsContexts
) -> None:
    keys = [os.urandom(KEY_SIZE), os.urandom(KEY_SIZE)]
    store = inherited_ring(keys)
    callback = _install_tickets(config(tls_cfg, enabled=True), contexts, (store, (2, 1), 5))
    assert callback is not None
    assert (callback.seq, callback.count) == (5, 2)
    # order (2, 1): the key in slot 2 is current (slot 0 of the worker's store)
    assert bytes(callback.store.view(0)) == keys[1]
    assert bytes(callback.store.view(1)) == keys[0]
    assert callback.store.buf is not store.buf
    assert is_zero(store)


def test_no_ring_inherited(tls_cfg: TlsConfig, contexts: TlsContexts) -> None:
    assert _install_tickets(config(tls_cfg, enabled=True), contexts, None) is None
