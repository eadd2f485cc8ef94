"""The supervisor: owns the listening sockets, forks pinned workers, keeps them alive, reloads.

Duties (ARCHITECTURE §2):

* Bind one SO_REUSEPORT socket per worker slot per listener, before forking, and hold a copy
  of each for as long as a worker may be started on it. Worker i gets socket i of every
  listener. A replacement or a new-generation worker takes the same sockets, so no accept queue
  is ever dropped. When a reload lowers the worker count, the extra sockets are shared out among
  the workers rather than closed.
* Let go of a socket as soon as no worker will ever be started on it again: on a final stop
  (all of them) and for a listener a reload removed (its sockets), right after telling the
  workers that hold them to drain. Those workers accept until EAGAIN once more and close their
  copies; the last close ends the socket, so new clients are refused at once instead of
  waiting in an accept queue nobody reads (ARCHITECTURE §9, pitfall 2). The supervisor's copy
  is never the last one while a worker still holds the socket, so the socket ends right after
  that worker's last accept, not before it.
* Signals only enqueue; the loop dispatches: SIGTERM/SIGINT graceful stop (a second one:
  immediate), SIGQUIT immediate stop, SIGHUP reload, SIGUSR1 reopen logs, SIGCHLD reap.
* Control channel per worker (``edgeterm.control``): a heartbeat every second, answered by the
  worker's counters; a worker silent for ``server.heartbeat_timeout`` gets SIGTERM, then SIGKILL.
  The other way round, a worker that hears nothing for that long drains and exits.
* A worker that dies after it was ready is replaced on the same slot (CPU and sockets), at once
  the first time and with back-off if the slot keeps dying. A worker that dies *before* it was
  ready cannot boot: the server halts with ``EXIT_BOOT`` rather than crash-looping (during a
  reload, the reload fails instead and the serving generation stays).
* Reload, two-phase: load and check the new config, certificates and contexts, and bind any new
  listener, all in the supervisor; on failure log why and change nothing. Then start generation
  g+1 on the same sockets; once all its workers are ready, tell generation g to drain. A SIGHUP
  during a reload is not lost: one follow-up reload (however many SIGHUPs came) starts when the
  current one ends. Requests and reloads are numbered so ``edgeterm reload`` can wait for a
  reload that began after its own signal.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edgeterm.workers import main as worker_main
from edgeterm.workers.loop import Loop
from edgeterm.workers.route import check_routes
from edgeterm.workers.worker import Listener

from edgeterm import control, logs, prometheus
from edgeterm.admin import MAX_REQUEST
from edgeterm.config import Config, ListenerConfig
from edgeterm.config_loader import load_config
from edgeterm.errors import ConfigError, StartupError
from edgeterm.keyring import KeyFileError
from edgeterm.sdnotify import Notifier
from edgeterm.signals import SignalQueue
from edgeterm.sockets import bind_group, bound_address, set_listener_options
from edgeterm.telemetry import SupervisorFacts
from edgeterm.tls import TlsContexts, build_contexts

from . import pidfile
from .health import HealthChecker
from .policy import Backoff, Heartbeats, Slot, plan_slots, slots_to_spawn
from .ticketkeys import TicketKeys

log = logging.getLogger("edgeterm.supervisor")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BOOT = worker_main.EXIT_BOOT

TICK = 1.0
RELOAD_READY_TIMEOUT = 30.0
STOP_NOW_GRACE = 2.0

ReadyCallback = Callable[[str | None], None]


@dataclass(eq=False)
class WorkerProc:
    pid: int
    slot: Slot
    generation: int
    ctl: socket.socket
    started: float
    decoder: control.Decoder = field(default_factory=control.Decoder)
    ready: bool = False
    draining: bool = False
    drain_deadline: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)
    boot_error: str | None = None
    tickets: bool = False  # holds the ticket key ring (its generation has tickets on)


@dataclass(eq=False)
class Generation:
    number: int
    config: Config
    contexts: TlsContexts
    slots: list[Slot]
    groups: dict[str, tuple[ListenerConfig, list[socket.socket]]]
    loaded_at: float


class Supervisor:
    def __init__(
        self,
        config: Config,
        config_file: str,
        contexts: TlsContexts,
        *,
        on_ready: ReadyCallback | None = None,
    ) -> None:
        self.config_file = config_file
        self.loop = Loop()
        self.on_ready = on_ready
        self.workers: dict[int, WorkerProc] = {}
        self.backoff: dict[int, Backoff] = {}
        self.not_before: dict[int, float] = {}
        self.heartbeats = Heartbeats(config.server.heartbeat_timeout)
        self.started = time.time()
        self.announced = False
        # systemd Type=notify (deploy/systemd): READY/RELOADING/STOPPING; a no-op without
        # NOTIFY_SOCKET, which is taken out of the environment the workers inherit
        self.notifier = Notifier.from_environment()
        self.stopping = False
        self.stop_deadline = 0.0
        self.exit_code = EXIT_OK
        self.restarts = 0
        self.reloads_ok = 0
        self.reloads_failed = 0
        # reload requests (SIGHUPs) received, and the request number the most recent reload
        # started at: a reload started at number n has read the files as they were after
        # request n arrived (status: reloads.requested / reloads.started / reloads.last.seq)
        self.reload_requests = 0
        self.reload_started = 0
        self._reload_queued = False
        self.last_reload: dict[str, Any] | None = None
        self.pending: Generation | None = None
        self.pending_deadline = 0.0
        self.listeners_released = False
        self._signals: SignalQueue | None = None
        self._admin: socket.socket | None = None
        self._admin_conns: dict[int, tuple[socket.socket, bytearray]] = {}
        self.tickets: TicketKeys | None = None
        self._rotation_due = False
        self._rotation_deferred = False  # "deferred" is logged once per episode
        for warning in check_routes(config, contexts, config_file):  # strict_sni: an error
            log.warning("%s", warning)
        if config.tls.tickets.enabled:
            try:
                self.tickets = TicketKeys(config.tls.tickets, self.loop.now)
            except KeyFileError as exc:
                raise ConfigError([f"{config_file}: tls.tickets.key_files: {exc}"]) from exc
            log.info(
                "ticket keys: %s, in %s memory excluded from core dumps",
                "from key files" if self.tickets.ring.from_files else "generated",
                "locked" if self.tickets.store.buf.locked else "UNLOCKED (RLIMIT_MEMLOCK)",
            )
        # telemetry (issue 6): the workers' board and the Prometheus endpoint, bound now
        self.telemetry = prometheus.SupervisorTelemetry(config.telemetry, self._telemetry_facts)
        groups = self._bind(config, {})
        self.serving = Generation(1, config, contexts, self._slots(config), groups, self.started)
        # active upstream health checks (docs/routing.md), pushed to every worker
        self.health = HealthChecker(self.loop, self._broadcast)
        self.health.configure(config)

    # -- sockets -------------------------------------------------------------------------
    @staticmethod
    def _slots(config: Config) -> list[Slot]:
        return plan_slots(
            config.server.worker_count(), config.server.pin_cpus, os.sched_getaffinity(0)
        )

    def _bind(
        self,
        config: Config,
        current: dict[str, tuple[ListenerConfig, list[socket.socket]]],
    ) -> dict[str, tuple[ListenerConfig, list[socket.socket]]]:
        """Listener groups for ``config``: reuse held sockets, bind what is new (all or none)."""
        count = config.server.worker_count()
        groups: dict[str, tuple[ListenerConfig, list[socket.socket]]] = {}
        fresh: list[socket.socket] = []
        try:
            for lcfg in config.listeners:
                key = _group_key(lcfg)
                if key in current:
                    socks = list(current[key][1])
                    if len(socks) < count:
                        port = socks[0].getsockname()[1]
                        more = bind_group(
                            _with_port(lcfg, port).bind,
                            lcfg.backlog,
                            count - len(socks),
                            check_free=False,
                        )
                        fresh.extend(more)
                        socks.extend(more)
                    for s in socks:
                        set_listener_options(
                            s, tcp_fastopen=lcfg.tcp_fastopen, defer_accept=lcfg.defer_accept
                        )
                        s.listen(lcfg.backlog)
                else:
                    socks = bind_group(
                        lcfg.bind,
                        lcfg.backlog,
                        count,
                        tcp_fastopen=lcfg.tcp_fastopen,
                        defer_accept=lcfg.defer_accept,
                    )
                    fresh.extend(socks)
                groups[key] = (lcfg, socks)
                log.info("listening name=%s addr=%s", lcfg.name, bound_address(socks[0]))
        except BaseException:
            for s in fresh:
                s.close()
            raise
        return groups

    def _listeners_for(self, gen: Generation, slot: Slot) -> list[Listener]:
        n = len(gen.slots)
        out: list[Listener] = []
        for lcfg, socks in gen.groups.values():
            out.extend(Listener(lcfg, s) for i, s in enumerate(socks) if i % n == slot.index)
        return out

    def _all_sockets(self) -> list[socket.socket]:
        seen: dict[int, socket.socket] = {}
        for gen in (self.serving, self.pending):
            if gen is not None:
                for _lcfg, socks in gen.groups.values():
                    for s in socks:
                        seen[id(s)] = s
        return list(seen.values())

    def _release_listeners(self) -> None:
        """Final stop: close our copy of every listening socket, right after the workers were
        told to drain (or to stop). Each socket lives on in the workers that hold it until
        their last accept; one that no worker holds (its slot waiting for a restart) ends now,
        which refuses its clients rather than leave them queued until we exit."""
        if self.listeners_released:
            return
        self.listeners_released = True
        for s in self._all_sockets():
            s.close()
        log.info(
            "listening sockets released: new connections are refused once the workers have "
            "taken what was queued"
        )

    # -- workers -------------------------------------------------------------------------
    def _spawn(self, gen: Generation, slot: Slot) -> None:
        ours, theirs = socket.socketpair()
        listeners = self._listeners_for(gen, slot)
        keep = {id(theirs)} | {id(lst.sock) for lst in listeners}
        pid = os.fork()
        if pid == 0:  # the child: never returns from here
            code = EXIT_BOOT
            try:
                ours.close()
                self._close_inherited(keep)
                tickets_on = gen.config.tls.tickets.enabled
                if self.tickets is not None and not tickets_on:
                    self.tickets.close()  # our copy of the ring, inherited at fork: unused here
                code = worker_main.serve(
                    gen.config,
                    gen.contexts,
                    listeners,
                    theirs,
                    slot=slot.index,
                    cpu=slot.cpu,
                    generation=gen.number,
                    ticket_seed=self._ticket_seed() if tickets_on else None,
                    worker_count=len(gen.slots),
                    upstream_state=self.health.snapshot(),
                )
            except BaseException as exc:
                log.exception("worker %d crashed: %s", slot.index, exc)
                code = EXIT_FAILURE
            finally:
                for handler in logging.getLogger("edgeterm").handlers:
                    handler.flush()
                os._exit(code)
        theirs.close()
        ours.setblocking(False)
        now = self.loop.now
        wp = WorkerProc(pid, slot, gen.number, ours, now)
        self.workers[pid] = wp
        self.heartbeats.seen(pid, now)
        if self.tickets is not None and gen.config.tls.tickets.enabled:
            wp.tickets = True
            self.tickets.ring.ack(pid, self.tickets.ring.seq)  # inherited at fork
        self.loop.add(ours.fileno(), select.EPOLLIN, self._control_handler(wp))
        log.info(
            "started worker %d pid=%d cpu=%s generation=%d", slot.index, pid, slot.cpu, gen.number
        )

    def _ticket_seed(self) -> tuple[Any, tuple[int, ...], int] | None:
        t = self.tickets
        if t is None:
            return None
        return (t.store, t.ring.order(), t.ring.seq)

    def _close_inherited(self, keep: set[int]) -> None:
        """In a new child: close every descriptor of the supervisor's it must not hold."""
        self.loop.close()
        if self._signals is not None:
            self._signals.close(restore=False)
        if self._admin is not None:
            self._admin.close()
        self.telemetry.close_in_child()
        self.health.close_in_child()
        for sock, _buf in self._admin_conns.values():
            sock.close()
        for wp in self.workers.values():
            wp.ctl.close()
        for s in self._all_sockets():
            if id(s) not in keep:
                s.close()

    def _control_handler(self, wp: WorkerProc) -> Callable[[int], None]:
        def on_control(_ev: int) -> None:
            try:
                data = wp.ctl.recv(65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self.loop.remove(wp.ctl.fileno())
                return
            try:
                messages = wp.decoder.feed(data)
                for msg in messages:
                    self._on_message(wp, msg)
            except control.FrameError as exc:
                log.error(
                    "worker %d pid=%d sent a bad frame (%s): killing it", wp.slot.index, wp.pid, exc
                )
                self.loop.remove(wp.ctl.fileno())
                _kill(wp.pid, signal.SIGKILL)

        return on_control

    def _on_message(self, wp: WorkerProc, msg: control.Message) -> None:
        self.heartbeats.seen(wp.pid, self.loop.now)
        t = control.MsgType
        if msg.type == t.STATS:
            wp.stats = msg.json()
        elif msg.type == t.READY:
            wp.stats = msg.json()
            wp.ready = True
            self._check_generations()
        elif msg.type == t.ACK:
            ack = msg.json()
            seq = ack.get("seq")
            if ack.get("of") == "TICKET_KEYS" and self.tickets is not None:
                if not isinstance(seq, int) or isinstance(seq, bool):
                    raise control.FrameError(f"ACK: seq is not an integer: {seq!r}")
                self.tickets.ring.ack(wp.pid, seq)
        elif msg.type == t.BOOT_ERROR:
            wp.boot_error = str(msg.json().get("error", "unknown error"))

    def _broadcast(self, frame: bytes) -> None:
        for wp in self.workers.values():
            self._send(wp, frame)

    def _send(self, wp: WorkerProc, frame: bytes) -> None:
        try:
            wp.ctl.send(frame)
        except OSError:
            pass  # the worker is exiting; SIGCHLD tells us the rest

    def _check_generations(self) -> None:
        gen = self.serving
        if not self.announced and self._generation_ready(gen):
            self.announced = True
            log.info(
                "ready pid=%d workers=%d generation=%d", os.getpid(), len(gen.slots), gen.number
            )
            if self.on_ready is not None:
                self.on_ready(None)
            self.notifier.ready(self._serving_status())
        pending = self.pending
        if pending is not None and not self.stopping and self._generation_ready(pending):
            self._promote(pending)

    def _serving_status(self) -> str:
        """The STATUS= line for systemd."""
        gen = self.serving
        return f"serving: generation {gen.number}, {len(gen.slots)} workers"

    def _generation_ready(self, gen: Generation) -> bool:
        ready = {
            wp.slot.index
            for wp in self.workers.values()
            if wp.generation == gen.number and wp.ready
        }
        return all(s.index in ready for s in gen.slots)

    # -- reaping and replacing -------------------------------------------------------------
    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            wp = self.workers.pop(pid, None)
            if wp is None:
                continue
            self.loop.remove(wp.ctl.fileno())
            wp.ctl.close()
            self.heartbeats.forget(pid)
            if self.tickets is not None:
                self.tickets.ring.forget(pid)
            self._on_exit(wp, os.waitstatus_to_exitcode(status))

    def _on_exit(self, wp: WorkerProc, code: int) -> None:
        how = f"exit code {code}" if code >= 0 else f"signal {signal.Signals(-code).name}"
        if self.stopping:
            log.info("worker %d pid=%d stopped (%s)", wp.slot.index, wp.pid, how)
            if not self.workers:
                self.loop.stop()
            return
        if wp.draining:
            log.info(
                "worker %d pid=%d generation=%d drained (%s)",
                wp.slot.index,
                wp.pid,
                wp.generation,
                how,
            )
            return
        if not wp.ready:
            reason = wp.boot_error or f"it exited ({how}) before it was ready"
            pending = self.pending
            if pending is not None and wp.generation == pending.number:
                self._abort_reload(f"a worker of the new generation cannot start: {reason}")
                return
            if wp.generation == self.serving.number:
                log.error("worker %d cannot start: %s; stopping the server", wp.slot.index, reason)
                self.exit_code = EXIT_BOOT
                if not self.announced and self.on_ready is not None:
                    self.on_ready(f"worker {wp.slot.index} cannot start: {reason}")
                    self.announced = True
                self.stop(graceful=False)
                return
        lived = self.loop.now - wp.started
        delay = self.backoff.setdefault(wp.slot.index, Backoff()).on_exit(lived)
        self.not_before[wp.slot.index] = self.loop.now + delay
        if delay > 0:
            # Respawn when the back-off ends, not at the next one-second tick.
            self.loop.call_later(delay, self._reconcile)
        self.restarts += 1
        log.warning(
            "worker %d pid=%d died (%s) after %.1fs; replacing it in %.1fs",
            wp.slot.index,
            wp.pid,
            how,
            lived,
            delay,
        )
        self._reconcile()

    def _reconcile(self) -> None:
        if self.stopping:
            return
        now = self.loop.now
        for gen in (self.serving, self.pending):
            if gen is None:
                continue
            occupied = [
                wp.slot.index
                for wp in self.workers.values()
                if wp.generation == gen.number and not wp.draining
            ]
            for slot in slots_to_spawn(gen.slots, occupied, self.not_before, now):
                self._spawn(gen, slot)

    def _tick(self) -> None:
        now = self.loop.now
        beat = control.encode_json(control.MsgType.HEARTBEAT, {"t": now})
        for wp in list(self.workers.values()):
            self._send(wp, beat)
            if wp.draining and now > wp.drain_deadline:
                log.warning(
                    "worker %d pid=%d did not finish draining: SIGKILL", wp.slot.index, wp.pid
                )
                _kill(wp.pid, signal.SIGKILL)
                wp.drain_deadline = float("inf")
        term, kill = self.heartbeats.due(now)
        for pid in term:
            log.warning("worker pid=%d missed its heartbeats: SIGTERM", pid)
            _kill(pid, signal.SIGTERM)
        for pid in kill:
            log.warning("worker pid=%d still there: SIGKILL", pid)
            _kill(pid, signal.SIGKILL)
        if self.pending is not None and not self.stopping and now > self.pending_deadline:
            self._abort_reload(
                f"the new generation was not ready within {RELOAD_READY_TIMEOUT:.0f}s"
            )
        if self.stopping and now > self.stop_deadline:
            for wp in self.workers.values():
                _kill(wp.pid, signal.SIGKILL)
            self.stop_deadline = float("inf")
        if self._rotation_due:
            self._rotation_due = False
            self._rotate_tickets()
        self._reconcile()
        self.loop.call_later(TICK, self._tick)

    # -- reload ------------------------------------------------------------------------
    def reload(self) -> None:
        """A reload request (SIGHUP): start one now, or once the one in progress has ended.

        Requests that arrive during a reload are coalesced into one follow-up reload: it reads
        the files as they are when it starts, which is after every one of those requests."""
        self.reload_requests += 1
        if self.stopping:
            log.warning("reload requested while stopping: ignored")
            self.last_reload = {
                "ok": False,
                "error": "edgeterm is stopping",
                "at": time.time(),
                "seq": self.reload_requests,
            }
            return
        if self.pending is not None:
            if not self._reload_queued:
                log.info(
                    "reload requested while generation %d is starting: "
                    "another reload follows once this one has ended",
                    self.pending.number,
                )
            self._reload_queued = True
            return
        self._start_reload()

    def _reload_ended(self) -> None:
        """The reload in progress succeeded or failed: start the queued one, if any."""
        if self._reload_queued and not self.stopping:
            self._reload_queued = False
            # after this round, not from inside the handler that ended the last reload
            self.loop.call_soon(self._start_reload)

    def _start_reload(self) -> None:
        if self.stopping or self.pending is not None:
            return
        self._reload_queued = False
        self.reload_started = self.reload_requests
        log.info("reloading %s", self.config_file)
        if self.announced:
            self.notifier.reloading(f"reloading {self.config_file}")
        current = self.serving.groups
        staged: list[int] = []
        fresh: TicketKeys | None = None
        try:
            config = load_config(self.config_file)
            contexts = build_contexts(config.tls, self.config_file)
            route_warnings = check_routes(config, contexts, self.config_file)
            staged, fresh = self._stage_ticket_files(config)
            groups = self._bind(config, current)
        except (ConfigError, StartupError, OSError, KeyFileError) as exc:
            if staged and self.tickets is not None:
                self.tickets.discard(staged)
            if fresh is not None:
                fresh.close()
            self._reload_failed(str(exc))
            self._reload_ended()
            return
        for warning in (*contexts.warnings, *route_warnings):
            log.warning("%s", warning)
        if fresh is not None:
            self.tickets = fresh
            self._broadcast_tickets()
        else:
            self._change_ticket_keys(config, staged)
        gen = Generation(
            self.serving.number + 1, config, contexts, self._slots(config), groups, time.time()
        )
        self.pending = gen
        self.health.configure(config)  # the new workers get its state at fork
        self.pending_deadline = self.loop.now + RELOAD_READY_TIMEOUT
        for slot in gen.slots:
            self.not_before.pop(slot.index, None)
            self._spawn(gen, slot)

    # -- ticket keys ---------------------------------------------------------------------
    def _stage_ticket_files(self, config: Config) -> tuple[list[int], TicketKeys | None]:
        """Read new key files without touching the live keys: (staged slots, or a new ring
        when there was none). Raises KeyFileError naming the config key."""
        cfg = config.tls.tickets
        if not cfg.enabled or not cfg.key_files:
            return [], None
        try:
            if self.tickets is None:
                return [], TicketKeys(cfg, self.loop.now)  # reads the files itself
            return self.tickets.stage_files([str(p) for p in cfg.key_files]), None
        except KeyFileError as exc:
            raise KeyFileError(f"{self.config_file}: tls.tickets.key_files: {exc}") from exc

    def _change_ticket_keys(self, config: Config, staged: list[int]) -> None:
        """On SIGHUP: new key files, or a rotation of the generated ring; tell every worker."""
        cfg = config.tls.tickets
        tickets = self.tickets
        if not cfg.enabled:
            # Tickets turned off: the ring goes once the new generation serves (``_promote``);
            # until then the serving generation may still need it (a respawn, a failed reload).
            return
        now = self.loop.now
        if tickets is None or (tickets.ring.from_files and not cfg.key_files):
            if tickets is not None:
                tickets.close()
            self.tickets = TicketKeys(cfg, now)
        elif staged:
            tickets.commit_files(staged, cfg, now)
            log.info("ticket keys: %d loaded from key files", len(staged))
        elif not tickets.ring.from_files:
            tickets.rotate_every = cfg.rotate_every
            self._rotate_tickets()
            return
        self._broadcast_tickets()

    def _rotate_tickets(self) -> None:
        tickets = self.tickets
        if tickets is None or tickets.ring.from_files:
            return
        holders = [pid for pid, wp in self.workers.items() if wp.tickets]
        if tickets.rotate(self.loop.now, holders):
            if self._rotation_deferred:
                log.info("ticket key rotation no longer deferred: every worker has the ring")
                self._rotation_deferred = False
            log.info("ticket keys rotated (rotation %d)", tickets.ring.rotations)
            self._broadcast_tickets()
        else:
            if not self._rotation_deferred:  # once per episode; retried every second
                late = [pid for pid in holders if not tickets.ring.all_acked([pid])]
                log.warning(
                    "ticket key rotation deferred: worker pid(s) %s have not acknowledged the "
                    "ring; retrying every second",
                    ", ".join(map(str, late)) or "?",
                )
                self._rotation_deferred = True
            self._rotation_due = True

    def _broadcast_tickets(self) -> None:
        tickets = self.tickets
        if tickets is None:
            return
        for wp in self.workers.values():
            if not wp.tickets:
                continue
            try:
                tickets.send(wp.ctl)
            except OSError:
                pass

    def _drop_ticket_keys(self) -> None:
        """Tickets are off in the serving generation: zero the ring and let go of it (the
        locked buffer is unmapped with its last reference). Draining workers keep their own
        copies until they exit; new workers get none."""
        tickets = self.tickets
        if tickets is None:
            return
        self.tickets = None
        self._rotation_due = False
        self._rotation_deferred = False
        tickets.close()  # zeroes every slot
        log.info("ticket keys wiped and released: tickets are off")

    def _rotation_timer(self) -> None:
        tickets = self.tickets
        if (
            tickets is not None
            and self.serving.config.tls.tickets.enabled
            and not tickets.ring.from_files
            and self.loop.now - tickets.ring.current_since >= tickets.rotate_every - 0.5
        ):
            self._rotate_tickets()
        self.loop.call_later(1.0, self._rotation_timer)

    def _reload_failed(self, why: str) -> None:
        self.reloads_failed += 1
        self.last_reload = {
            "ok": False,
            "error": why,
            "at": time.time(),
            "seq": self.reload_started,
        }
        for line in why.splitlines():
            log.error("reload failed, still serving generation %d: %s", self.serving.number, line)
        if self.announced:
            first = why.splitlines()[0] if why else "unknown error"
            self.notifier.ready(f"reload failed ({first}); {self._serving_status()}")

    def _abort_reload(self, why: str) -> None:
        pending = self.pending
        assert pending is not None
        self.pending = None
        self._retire(pending, keep=self.serving)
        self.health.configure(self.serving.config)
        self._reload_failed(why)
        self._reload_ended()

    def _promote(self, gen: Generation) -> None:
        old = self.serving
        self.serving = gen
        self.pending = None
        self.heartbeats.timeout = gen.config.server.heartbeat_timeout
        self._retire(old, keep=gen)
        if not gen.config.tls.tickets.enabled:
            self._drop_ticket_keys()
        self.reloads_ok += 1
        self.last_reload = {
            "ok": True,
            "generation": gen.number,
            "at": time.time(),
            "seq": self.reload_started,
        }
        log.info(
            "reload done: generation %d serving, generation %d draining", gen.number, old.number
        )
        if self.announced:
            self.notifier.ready(self._serving_status())
        self._reload_ended()

    def _retire(self, gen: Generation, keep: Generation) -> None:
        """Drain ``gen``'s workers; let go of its sockets that ``keep`` does not use.

        Those sockets (a listener the reload removed or moved) are closed here, right after
        the DRAIN: ``gen``'s workers still hold them, take what is queued once more and close
        their copies, and the last close refuses new clients. No worker is ever started on
        them again, and keeping them open would queue clients for nobody until the drain ends.
        """
        grace = gen.config.server.graceful_timeout + 5.0
        for wp in self.workers.values():
            if wp.generation == gen.number and not wp.draining:
                wp.draining = True
                wp.drain_deadline = self.loop.now + grace
                self._send(wp, control.encode(control.MsgType.DRAIN))
        kept = {id(s) for _l, socks in keep.groups.values() for s in socks}
        dropped = [s for _l, socks in gen.groups.values() for s in socks if id(s) not in kept]
        for s in dropped:
            s.close()
        if dropped:
            log.info(
                "generation %d: %d listening socket(s) no longer used, released",
                gen.number,
                len(dropped),
            )

    # -- stop ------------------------------------------------------------------------------
    def stop(self, graceful: bool) -> None:
        if self.stopping and graceful:
            return
        self.stopping = True
        self.notifier.stopping("draining" if graceful else "stopping now")
        if graceful:
            grace = self.serving.config.server.graceful_timeout
            self.stop_deadline = self.loop.now + grace + STOP_NOW_GRACE
            frame = control.encode(control.MsgType.DRAIN)
        else:
            self.stop_deadline = self.loop.now + STOP_NOW_GRACE
            frame = control.encode(control.MsgType.STOP)
        for wp in self.workers.values():
            self._send(wp, frame)
        # The workers now hold the only copies: each socket ends with its worker's last accept.
        self._release_listeners()
        if not self.workers:
            self.loop.stop()

    # -- signals -----------------------------------------------------------------------
    def _on_signals(self, _ev: int) -> None:
        assert self._signals is not None
        for signum in self._signals.take():
            if signum == signal.SIGCHLD:
                self._reap()
            elif signum in (signal.SIGTERM, signal.SIGINT):
                if self.stopping:
                    log.info("second stop signal: stopping now")
                    self.stop(graceful=False)
                else:
                    log.info("graceful stop (%s)", signal.Signals(signum).name)
                    self.stop(graceful=True)
            elif signum == signal.SIGQUIT:
                log.info("immediate stop (SIGQUIT)")
                self.stop(graceful=False)
            elif signum == signal.SIGHUP:
                self.reload()
            elif signum == signal.SIGUSR1:
                logs.reopen()
                for wp in self.workers.values():
                    _kill(wp.pid, signal.SIGUSR1)

    # -- admin socket ------------------------------------------------------------------
    def _open_admin(self) -> None:
        path = self.serving.config.server.admin_socket
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        sock.listen(16)
        sock.setblocking(False)
        self._admin = sock
        self.loop.add(sock.fileno(), select.EPOLLIN, self._on_admin_accept)

    def _on_admin_accept(self, _ev: int) -> None:
        assert self._admin is not None
        try:
            conn, _ = self._admin.accept()
        except OSError:
            return
        conn.setblocking(False)
        self._admin_conns[conn.fileno()] = (conn, bytearray())
        fd = conn.fileno()
        self.loop.add(fd, select.EPOLLIN, lambda ev: self._on_admin_data(fd))

    def _on_admin_data(self, fd: int) -> None:
        conn, buf = self._admin_conns[fd]
        try:
            data = conn.recv(MAX_REQUEST)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        buf += data
        if data and b"\n" not in buf and len(buf) < MAX_REQUEST:
            return
        try:
            request = json.loads(bytes(buf).split(b"\n", 1)[0] or b"{}")  # may raise
            cmd = request.get("cmd") if isinstance(request, dict) else None
            answer = self.status() if cmd == "status" else {"error": f"unknown command {cmd!r}"}
        except (ValueError, RecursionError):
            answer = {"error": "request is not JSON"}
        self.loop.remove(fd)
        del self._admin_conns[fd]
        try:
            conn.settimeout(1.0)
            conn.sendall(json.dumps(answer).encode() + b"\n")
        except OSError:
            pass
        conn.close()

    def _telemetry_facts(self) -> SupervisorFacts:
        """For the Prometheus endpoint and the workers' OTLP metrics (issue 6)."""
        t = self.tickets if self.serving.config.tls.tickets.enabled else None
        return SupervisorFacts(
            workers={pid: wp.stats for pid, wp in self.workers.items()},
            running=len(self.workers),
            restarts=self.restarts,
            reloads_ok=self.reloads_ok,
            reloads_failed=self.reloads_failed,
            ticket_rotations=t.ring.rotations if t is not None else 0,
            key_since=t.ring.current_since if t is not None else None,
        )

    def status(self) -> dict[str, Any]:
        workers = []
        for wp in sorted(self.workers.values(), key=lambda w: (w.generation, w.slot.index)):
            st = wp.stats
            workers.append(
                {
                    "pid": wp.pid,
                    "slot": wp.slot.index,
                    "cpu": wp.slot.cpu,
                    "generation": wp.generation,
                    "ready": wp.ready,
                    "draining": wp.draining,
                    "active": st.get("active", 0),
                    "accepted": st.get("accepted", 0),
                    "handshakes": st.get("handshakes", 0),
                    "resumed": st.get("resumed", 0),
                    "closed_by": st.get("closed_by", {}),
                    "upstream_connect_errors": st.get("upstream_connect_errors", 0),
                    "upstream_connect_timeouts": st.get("upstream_connect_timeouts", 0),
                    # clients closed with no server left: upstream_unavailable + upstream_full
                    "upstream_unavailable": st.get("upstream_unavailable", 0),
                    "accept_errors": st.get("accept_errors", 0),
                }
            )
        return {
            "pid": os.getpid(),
            "uptime": round(time.time() - self.started, 3),
            "stopping": self.stopping,  # a graceful stop is under way: not ready
            "generation": self.serving.number,
            "slots": len(self.serving.slots),  # workers the serving generation runs
            "config": os.path.abspath(self.config_file),
            "loaded_at": self.serving.loaded_at,
            "reloads": {
                "ok": self.reloads_ok,
                "failed": self.reloads_failed,
                "last": self.last_reload,
                "in_progress": self.pending is not None,
                "requested": self.reload_requests,  # SIGHUPs received (edgeterm reload)
                "started": self.reload_started,  # the request number the last reload began at
            },
            "restarts": self.restarts,
            "upstreams": self.health.status(),
            "tickets": (
                self.tickets.status(self.loop.now)
                if self.tickets is not None and self.serving.config.tls.tickets.enabled
                else {"enabled": False}
            ),
            "workers": workers,
        }

    # -- running -------------------------------------------------------------------------
    def run(self) -> int:
        config = self.serving.config
        self._signals = SignalQueue(
            (
                signal.SIGTERM,
                signal.SIGINT,
                signal.SIGQUIT,
                signal.SIGHUP,
                signal.SIGUSR1,
                signal.SIGCHLD,
            )
        )
        pid = os.getpid()
        pidfile.write(config.server.pidfile, pid)
        try:
            self._open_admin()
            self.telemetry.start(self.loop)
            self.loop.add(self._signals.fileno(), select.EPOLLIN, self._on_signals)
            for slot in self.serving.slots:
                self._spawn(self.serving, slot)
            self.loop.call_later(TICK, self._tick)
            self.loop.call_later(1.0, self._rotation_timer)
            self.loop.run()
        finally:
            for wp in self.workers.values():
                _kill(wp.pid, signal.SIGKILL)
            self._reap_all()
            for s in self._all_sockets():
                s.close()
            self.telemetry.close()
            self.health.close()
            if self._admin is not None:
                self._admin.close()
                try:
                    config.server.admin_socket.unlink()
                except OSError:
                    pass
            pidfile.remove(config.server.pidfile, pid)
            self._signals.close()
            self.loop.close()
        log.info("supervisor exiting with code %d", self.exit_code)
        return self.exit_code

    def _reap_all(self) -> None:
        deadline = time.monotonic() + 5.0
        while self.workers and time.monotonic() < deadline:
            try:
                pid, _status = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            self.workers.pop(pid, None)


def _kill(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _with_port(lcfg: ListenerConfig, port: int) -> ListenerConfig:
    from dataclasses import replace

    return replace(lcfg, bind=replace(lcfg.bind, port=port))


def _group_key(lcfg: ListenerConfig) -> str:
    """Which held sockets a listener reuses across reloads: its address (or, for port 0,
    which means "any free port", its name too)."""
    if lcfg.bind.port == 0:
        return f"{lcfg.name}@{lcfg.bind}"
    return str(lcfg.bind)
