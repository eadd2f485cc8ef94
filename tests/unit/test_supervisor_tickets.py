"""The supervisor's ticket key ring across reloads, without forking: a real ``Supervisor``
(its listening sockets on 127.0.0.1:0, its loop, its locked key store), driven through the
methods its event loop calls.

* A reload that turns tickets off zeroes the ring and lets go of it once the new generation
  serves (not before: a failed reload keeps the serving generation's ring).
* A rotation held back by a worker that has not acknowledged the ring is logged once per
  episode, not at every one-second retry.
"""

from __future__ import annotations

import gc
import logging
import socket
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
from edgeterm.supervisor.supervisor import Generation, Supervisor, WorkerProc

from edgeterm.config import Config
from edgeterm.config_loader import load_config
from edgeterm.tls import build_contexts
from tests.support.certs import CertSet, make_cert_set
from tests.support.configs import base_config, write_config


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertSet:
    return make_cert_set(tmp_path_factory.mktemp("certs"))


def _config(tmp_path: Path, certs: CertSet, name: str, *, tickets: bool) -> tuple[Config, str]:
    cfg = base_config(
        certs,
        ["127.0.0.1:9"],
        overrides={
            "server": {
                "pidfile": str(tmp_path / "run" / "edgeterm.pid"),
                "admin_socket": str(tmp_path / "run" / "edgeterm.sock"),
            },
            "tls": {"tickets": {"enabled": tickets}},
        },
    )
    path = str(write_config(tmp_path / name, cfg))
    return load_config(path), path


@pytest.fixture
def supervisor(tmp_path: Path, certs: CertSet) -> Iterator[Supervisor]:
    config, path = _config(tmp_path, certs, "edgeterm.toml", tickets=True)
    sup = Supervisor(config, path, build_contexts(config.tls, path))
    yield sup
    for s in sup._all_sockets():
        s.close()
    for wp in sup.workers.values():
        wp.ctl.close()
    sup.telemetry.close()
    sup.health.close()
    sup.loop.close()


def _next_generation(sup: Supervisor, config: Config, path: str) -> Generation:
    """Generation 2 on the same sockets, as a reload builds it."""
    contexts = build_contexts(config.tls, path)
    return Generation(2, config, contexts, sup._slots(config), sup.serving.groups, time.time())


def test_turning_tickets_off_zeroes_and_releases_the_ring_once_the_new_generation_serves(
    supervisor: Supervisor, tmp_path: Path, certs: CertSet
) -> None:
    sup = supervisor
    assert sup.tickets is not None
    buf = sup.tickets.store.buf  # the mlock'ed key buffer
    assert any(bytes(buf.view)), "the ring holds no key to begin with"
    off, path = _config(tmp_path, certs, "off.toml", tickets=False)

    # phase one of the reload: the keys stay (the serving generation still issues tickets)
    sup._change_ticket_keys(off, [])
    assert sup.tickets is not None and any(bytes(buf.view))

    sup._promote(_next_generation(sup, off, path))
    assert sup.tickets is None
    assert bytes(buf.view) == bytes(buf.size), "the keys were not zeroed"
    assert sup.status()["tickets"] == {"enabled": False}
    ref = weakref.ref(buf)
    del buf
    gc.collect()
    assert ref() is None, "something still holds the key buffer"


def test_a_failed_reload_that_would_turn_tickets_off_keeps_the_ring(
    supervisor: Supervisor, tmp_path: Path, certs: CertSet
) -> None:
    sup = supervisor
    assert sup.tickets is not None
    before = bytes(sup.tickets.store.buf.view)
    off, path = _config(tmp_path, certs, "off.toml", tickets=False)
    sup._change_ticket_keys(off, [])
    sup.pending = _next_generation(sup, off, path)
    sup._abort_reload("a worker of the new generation cannot start: test")
    assert sup.tickets is not None
    assert bytes(sup.tickets.store.buf.view) == before
    assert sup.status()["tickets"]["enabled"] is True


def test_a_deferred_rotation_is_logged_once_per_episode(
    supervisor: Supervisor, caplog: pytest.LogCaptureFixture
) -> None:
    sup = supervisor
    tickets = sup.tickets
    assert tickets is not None
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    pid = 2**22 + 1  # above pid_max: never a real process (only bookkeeping here)
    wp = WorkerProc(pid, sup.serving.slots[0], 1, ours, sup.loop.now, tickets=True)
    sup.workers[pid] = wp
    tickets.ring.ack(pid, tickets.ring.seq)  # as at fork

    def deferred() -> int:
        return sum("rotation deferred" in r.getMessage() for r in caplog.records)

    def drain_frames() -> None:
        try:
            while theirs.recv(65536):
                pass
        except BlockingIOError:
            pass

    try:
        with caplog.at_level(logging.INFO, logger="edgeterm.supervisor"):
            sup._rotate_tickets()  # acknowledged: rotates, sends the new ring
            assert tickets.ring.rotations == 1 and deferred() == 0
            for _ in range(5):  # the worker does not answer: retried every second
                sup._rotate_tickets()
            assert tickets.ring.rotations == 1 and sup._rotation_due
            assert deferred() == 1, [r.getMessage() for r in caplog.records]
            assert str(pid) in next(
                r.getMessage() for r in caplog.records if "deferred" in r.getMessage()
            )

            tickets.ring.ack(pid, tickets.ring.seq)  # it answers: the episode ends
            sup._rotate_tickets()
            assert tickets.ring.rotations == 2
            assert any("no longer deferred" in r.getMessage() for r in caplog.records)

            for _ in range(3):  # a new episode is logged again, once
                sup._rotate_tickets()
            assert deferred() == 2
    finally:
        drain_frames()
        theirs.close()
