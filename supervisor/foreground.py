"""Run edgeterm as one process: bind the listeners, build the TLS contexts, run one worker.

This is the single-worker foreground mode (``edgeterm start --foreground`` until the
pre-forking supervisor takes over). It already follows the supervisor's split of duties:
this module owns the listening sockets and the signals; the worker only serves them.

Signals only enqueue (``signal.set_wakeup_fd``); the worker's loop dispatches:
SIGTERM/SIGINT graceful stop (a second one stops at once), SIGQUIT immediate stop.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket

from edgeterm.workers.worker import Listener, Worker

from edgeterm import logs
from edgeterm.config import Config
from edgeterm.sockets import bind_group, bound_address
from edgeterm.tls import build_contexts

log = logging.getLogger("edgeterm.supervisor")

_HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1)


def run(config: Config, config_file: str) -> int:
    logs.setup(config.server.log_file)
    contexts = build_contexts(config.tls, config_file)
    for warning in contexts.warnings:
        log.warning("%s", warning)
    listeners: list[Listener] = []
    try:
        for lcfg in config.listeners:
            (sock,) = bind_group(lcfg.bind, lcfg.backlog, 1)
            listeners.append(Listener(lcfg, sock))
            log.info("listening name=%s addr=%s", lcfg.name, bound_address(sock))
        worker = Worker(config, contexts, listeners)
        rfd, wfd = socket.socketpair()
        rfd.setblocking(False)
        wfd.setblocking(False)
        old_wakeup = signal.set_wakeup_fd(wfd.fileno())
        for signum in _HANDLED:
            signal.signal(signum, lambda _s, _f: None)
        stops = 0

        def on_signal(_ev: int) -> None:
            nonlocal stops
            try:
                data = rfd.recv(64)
            except BlockingIOError:
                return
            for signum in data:
                if signum in (signal.SIGTERM, signal.SIGINT):
                    stops += 1
                    if stops == 1:
                        log.info("graceful stop (%s)", signal.Signals(signum).name)
                        worker.drain()
                    else:
                        log.info("second stop signal: stopping now")
                        worker.stop_now()
                elif signum == signal.SIGQUIT:
                    log.info("immediate stop (SIGQUIT)")
                    worker.stop_now()
                elif signum == signal.SIGUSR1:
                    logs.reopen(config.server.log_file)
                elif signum == signal.SIGHUP:
                    log.warning("SIGHUP: reload needs the supervisor mode; ignored")

        worker.loop.add(rfd.fileno(), select.EPOLLIN, on_signal)
        log.info("ready pid=%d workers=1", os.getpid())
        try:
            worker.run()
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for signum in _HANDLED:
                signal.signal(signum, signal.SIG_DFL)
            rfd.close()
            wfd.close()
        log.info("stopped: %s", worker.stats.snapshot())
        return 0
    finally:
        for lst in listeners:
            lst.sock.close()
