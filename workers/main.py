"""The worker process's entry point, run in a child the supervisor forked.

It is handed everything from outside: its slot's listening sockets, its CPU, its control
channel, the validated config and the TLS contexts (built and checked by the supervisor
before the fork). Order matters:

1. pin to the CPU (first act, so every allocation happens on the right node);
2. lock our copy of OpenSSL's secure heap (memory locks are not inherited across fork), and
   log whether it is locked;
3. stop sharing the parent's signal wakeup socket; install our own signal queue;
4. take our own copy of the ticket key ring and wipe the inherited one (always, even with
   tickets disabled);
5. drop privileges (``server.user`` / ``server.group``) when started as root;
6. serve until drained or stopped.

Signals: SIGTERM drains, SIGQUIT stops at once, SIGUSR1 reopens the log file; SIGINT and
SIGHUP are ignored (the terminal's Ctrl-C reaches the whole process group: the supervisor
decides what happens).

Exit codes: 0 after a drain or stop, ``EXIT_BOOT`` when the worker could not start serving
(the supervisor then halts instead of crash-looping).
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import select
import signal
import socket
from collections.abc import Mapping, Sequence

from edgeterm import control, logs, openssl
from edgeterm.config import Config
from edgeterm.signals import SignalQueue, reset_after_fork
from edgeterm.telemetry import WorkerTelemetry
from edgeterm.tickets import KeyStore, TicketCallback
from edgeterm.tls import TlsContexts

from .worker import Listener, Worker

log = logging.getLogger("edgeterm.worker")

EXIT_BOOT = 5


def drop_privileges(user: str | None, group: str | None) -> None:
    if os.geteuid() != 0 or (user is None and group is None):
        return
    gid = grp.getgrnam(group).gr_gid if group else None
    pw = pwd.getpwnam(user) if user else None
    if gid is None and pw is not None:
        gid = pw.pw_gid
    if gid is not None:
        os.setgroups([])
        os.setgid(gid)
    if pw is not None:
        os.setuid(pw.pw_uid)


def serve(
    config: Config,
    contexts: TlsContexts,
    listeners: Sequence[Listener],
    control_sock: socket.socket,
    *,
    slot: int,
    cpu: int | None,
    generation: int,
    ticket_seed: tuple[KeyStore, Sequence[int], int] | None = None,
    worker_count: int = 1,
    upstream_state: Mapping[str, Mapping[str, bool]] | None = None,
) -> int:
    """Run one worker; return its exit code. Never returns into supervisor code by raising.

    ``worker_count``: workers of the generation (they share ``max_conns``);
    ``upstream_state``: the supervisor's active health state at fork (docs/routing.md)."""
    try:
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        _lock_secure_heap(slot)
        reset_after_fork()
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signals = SignalQueue((signal.SIGTERM, signal.SIGQUIT, signal.SIGUSR1))
        tickets = _install_tickets(config, contexts, ticket_seed)
        # telemetry (issue 6): the access log opens before the privilege drop; OpenTelemetry
        # starts after the fork, here in the worker, once the Worker exists.
        telem = WorkerTelemetry(config.telemetry, worker_id=slot, cpu=cpu, generation=generation)
        drop_privileges(config.server.user, config.server.group)
        worker = Worker(
            config,
            contexts,
            listeners,
            worker_id=slot,
            generation=generation,
            cpu=cpu,
            control_sock=control_sock,
            ticket_callback=tickets,
            observer=telem.observer,
            worker_count=worker_count,
            upstream_state=upstream_state,
        )
        telem.start(worker)
    except Exception as exc:
        log.error("worker %d cannot start: %s", slot, exc)
        try:
            control_sock.sendall(
                control.encode_json(control.MsgType.BOOT_ERROR, {"error": str(exc)})
            )
        except OSError:
            pass
        return EXIT_BOOT

    def on_signal(_ev: int) -> None:
        for signum in signals.take():
            if signum == signal.SIGTERM:
                worker.drain()
            elif signum == signal.SIGQUIT:
                worker.stop_now()
            elif signum == signal.SIGUSR1:
                logs.reopen()
                telem.reopen()

    worker.loop.add(signals.fileno(), select.EPOLLIN, on_signal)
    log.info("worker %d serving pid=%d cpu=%s generation=%d", slot, os.getpid(), cpu, generation)
    try:
        worker.run()
    finally:
        telem.shutdown()  # bounded: flush the access log, last exports
    log.info("worker %d exiting: %s", slot, worker.stats.snapshot())
    return 0


def _lock_secure_heap(slot: int) -> None:
    """Lock this worker's copy of OpenSSL's secure heap (private keys) and say so. A
    hardening: whatever goes wrong is logged, never a reason not to serve."""
    try:
        locked, message = openssl.lock_secure_heap()
    except Exception as exc:
        log.warning("worker %d: OpenSSL secure heap: not locked (%s)", slot, exc)
        return
    if locked:
        log.info("worker %d: %s", slot, message)
    elif locked is not None:
        log.warning("worker %d: %s", slot, message)


def _install_tickets(
    config: Config,
    contexts: TlsContexts,
    seed: tuple[KeyStore, Sequence[int], int] | None,
) -> TicketCallback | None:
    """Copy the ring we inherited from the supervisor into our own locked store, wipe the
    inherited copy, and install the ticket callback on every context.

    The inherited copy is wiped whatever happens: with tickets disabled it is not used, and
    it must not stay behind in this process's memory either."""
    if seed is None:
        return None
    inherited, order, seq = seed
    if not config.tls.tickets.enabled:
        inherited.buf.wipe()
        return None
    store = KeyStore()
    try:
        for i, slot in enumerate(order):
            store.view(i)[:] = inherited.view(slot)
    finally:
        inherited.buf.wipe()
    callback = TicketCallback(store)
    callback.keys_changed(seq, len(order))
    callback.install(contexts.contexts)
    return callback
