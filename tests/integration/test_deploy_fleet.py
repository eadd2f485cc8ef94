"""A fleet behind an L4 balancer (issue 8): three edgeterm instances sharing ticket key files,
HAProxy in TCP mode in front of them with the health checks of deploy/l4/haproxy.cfg.

Two topologies run the same tests:

* ``netns``: each instance in its own network namespace with its own address (192.0.2.11-13,
  TEST-NET-1) on a veth pair to a bridge (192.0.2.1) in a fourth namespace, where HAProxy and
  the clients run (on that namespace's loopback). Everything is created by the test, inside
  namespaces of its own: nothing is attached to the host's namespace, so no packet can leave.
  The kernel settings of deploy/sysctl/90-edgeterm.conf (the per-namespace net.* ones) are
  applied inside each instance's namespace, and the listeners use tcp_fastopen/defer_accept.
  Skipped, saying why, where namespaces cannot be created (not root, no CAP_SYS_ADMIN).
* ``loopback``: the same three instances and HAProxy on 127.0.0.1 ports.

What is checked (issue 8, "The fleet test"):

1. a client's session resumes on whichever instance it lands on (shared key files);
2. a fleet-wide ticket key rotation (previous <- current <- next <- new, written on each
   instance in turn and followed by ``edgeterm reload`` there, under a continuous client loop)
   keeps the resumption rate above 95% and fails no connection;
3. killing one instance (SIGKILL) under a continuous client loop: no connection started after
   HAProxy marked it DOWN fails.

The instances read HAProxy's PROXY v2 header (``accept_proxy = "v2"``), as shipped in
deploy/l4/haproxy.cfg (``send-proxy-v2`` and ``check-send-proxy``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.certs import CertSet
from tests.support.ci import unavailable
from tests.support.configs import base_config, write_config
from tests.support.launcher import Edgeterm, edgeterm_command, run_cli
from tests.support.supervision import admin_status, free_port
from tests.support.tlsclient import client_context
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(90)

REPO = Path(__file__).resolve().parents[2]
HAPROXY_CFG = REPO / "deploy" / "l4" / "haproxy.cfg"
SYSCTL_CONF = REPO / "deploy" / "sysctl" / "90-edgeterm.conf"
HAPROXY = shutil.which("haproxy")
IP = shutil.which("ip")
INSTANCES = 3
SUBNET = "192.0.2"  # TEST-NET-1, only ever inside the test's own namespaces
REQUEST = b"GET /fleet HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
CLONE_NEWNET = 0x40000000


# --- network namespaces ---------------------------------------------------------------------


def sh(*args: str, timeout: float = 20) -> str:
    r = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: exit {r.returncode}: {r.stderr.strip()}")
    return r.stdout


def netns_unavailable() -> str | None:
    """Why network namespaces cannot be used here, or None."""
    if IP is None:
        return "the ip command is missing (apt-get install iproute2)"
    if os.geteuid() != 0:
        return "not root: creating network namespaces needs CAP_SYS_ADMIN"
    probe = f"etprobe{os.getpid()}"
    try:
        sh("ip", "netns", "add", probe)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        return f"cannot create a network namespace: {exc}"
    with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
        sh("ip", "netns", "del", probe)
    return None


def enter_netns(name: str) -> None:
    """Move the calling thread (only it) into network namespace ``name``: sockets it creates
    from now on belong there."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns({name})")
    finally:
        os.close(fd)


def per_namespace_sysctls() -> list[tuple[str, str]]:
    """The net.* settings of deploy/sysctl/90-edgeterm.conf (fs.* are host-wide: never set)."""
    out = []
    for raw in SYSCTL_CONF.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, _, value = (p.strip() for p in line.partition("="))
            if key.startswith("net."):
                out.append((key, value))
    return out


# --- the topology -----------------------------------------------------------------------------


@dataclass
class Topology:
    kind: str
    balancer: tuple[str, int]  # where clients connect (HAProxy's frontend)
    instances: list[tuple[str, int]]  # edgeterm listener addresses
    upstreams: list[tuple[str, int]]  # each instance's own upstream
    prefixes: list[list[str]]  # command prefix to run a process "on" instance i
    lb_prefix: list[str]
    lb_netns: str | None
    cleanup: list[Callable[[], None]] = field(default_factory=list)

    def client_executor(self) -> ThreadPoolExecutor:
        """One thread for the clients, in the balancer's namespace (netns)."""
        if self.lb_netns is None:
            return ThreadPoolExecutor(max_workers=1)
        return ThreadPoolExecutor(max_workers=1, initializer=enter_netns, initargs=(self.lb_netns,))


def make_netns_topology(tag: str) -> Topology:
    lb = f"et{tag}lb"
    edges = [f"et{tag}e{i}" for i in range(1, INSTANCES + 1)]
    topo = Topology(
        kind="netns",
        balancer=("127.0.0.1", 8443),
        instances=[(f"{SUBNET}.{10 + i}", 8443) for i in range(1, INSTANCES + 1)],
        upstreams=[("127.0.0.1", 8080)] * INSTANCES,
        prefixes=[["ip", "netns", "exec", e] for e in edges],
        lb_prefix=["ip", "netns", "exec", lb],
        lb_netns=lb,
    )
    created: list[str] = []

    def delete() -> None:
        for name in reversed(created):  # deleting a namespace removes its links and addresses
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                sh("ip", "netns", "del", name)

    topo.cleanup.append(delete)
    try:
        for name in (lb, *edges):
            sh("ip", "netns", "add", name)
            created.append(name)
            sh("ip", "-n", name, "link", "set", "lo", "up")
        sh("ip", "-n", lb, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", lb, "addr", "add", f"{SUBNET}.1/24", "dev", "br0")
        sh("ip", "-n", lb, "link", "set", "br0", "up")
        sysctls = per_namespace_sysctls()
        for i, edge in enumerate(edges, 1):
            port = f"v{i}"
            sh("ip", "-n", lb, "link", "add", port, "type", "veth", "peer", "name", "eth0",
               "netns", edge)  # fmt: skip
            sh("ip", "-n", lb, "link", "set", port, "master", "br0", "up")
            sh("ip", "-n", edge, "addr", "add", f"{SUBNET}.{10 + i}/24", "dev", "eth0")
            sh("ip", "-n", edge, "link", "set", "eth0", "up")
            for key, value in sysctls:
                sh("ip", "netns", "exec", edge, "sysctl", "-q", "-w", f"{key}={value}")
    except BaseException:
        delete()
        raise
    return topo


def make_loopback_topology() -> Topology:
    return Topology(
        kind="loopback",
        balancer=("127.0.0.1", free_port()),
        instances=[("127.0.0.1", free_port()) for _ in range(INSTANCES)],
        upstreams=[("127.0.0.1", free_port()) for _ in range(INSTANCES)],
        prefixes=[[] for _ in range(INSTANCES)],
        lb_prefix=[],
        lb_netns=None,
    )


# --- processes ----------------------------------------------------------------------------------


class FleetEdgeterm(Edgeterm):
    """``edgeterm start --foreground`` behind a command prefix (``ip netns exec NS``): ``ip``
    execs edgeterm, so the pid is edgeterm's own."""

    def __init__(self, config: Path, prefix: list[str]) -> None:
        super().__init__(config)
        self.prefix = prefix

    def start(self, *, timeout: float = 30.0) -> FleetEdgeterm:
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
        self.proc = subprocess.Popen(
            [*self.prefix, *edgeterm_command(), "start", "--foreground", "-c", str(self.config)],
            cwd=self.cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.known_pids.add(self.proc.pid)
        self._reader = threading.Thread(target=self._read_log, name="edgeterm-log", daemon=True)
        self._reader.start()
        self.wait_ready(timeout)
        return self

    def kill(self) -> None:
        """SIGKILL the supervisor and its workers at once (a crashed host)."""
        assert self.proc is not None
        self.remember_pids()
        self.stopped_by_us = True
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


class Background:
    """A helper process (upstream, HAProxy) with its output in a file; stopped by pid."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.log_path = log
        self.out = log.open("wb")
        self.proc = subprocess.Popen(
            argv,
            stdout=self.out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float = 15) -> None:
        def seen() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"exited with {self.proc.returncode}:\n{self.log()}")
            return text in self.log()

        wait_until(seen, timeout=timeout, interval=0.05, what=f"{text!r} in {self.log_path}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.out.close()


# --- HAProxy ----------------------------------------------------------------------------------


def haproxy_config(topo: Topology, stats_socket: Path, *, proxy: bool = False) -> str:
    """deploy/l4/haproxy.cfg with this topology's addresses; everything else as shipped."""
    text = HAPROXY_CFG.read_text()
    text, n = re.subn(r"(?m)^(\s*stats socket )\S+", rf"\g<1>{stats_socket}", text)
    assert n == 1
    # a test's file descriptor limit, not a production host's
    text, n = re.subn(r"(?m)^(\s*maxconn )\d+", r"\g<1>2000", text)
    assert n == 1
    host, port = topo.balancer
    text, n = re.subn(r"(?m)^(\s*bind )\S+", rf"\g<1>{host}:{port}", text)
    assert n == 1
    servers = iter(topo.instances)

    def server(m: re.Match[str]) -> str:
        h, p = next(servers)
        return f"{m[1]}{h}:{p}"

    text, n = re.subn(r"(?m)^(\s*server \S+ )\S+", server, text)
    assert n == INSTANCES, "the shipped config has one server line per instance"
    if not proxy:
        # for a variant without PROXY (not used by the tests below)
        text = re.sub(r" (send-proxy-v2|check-send-proxy)\b", "", text)
    return text


def haproxy_servers(stats_socket: Path) -> dict[str, str]:
    """server name -> status ("UP", "DOWN", "UP 1/2", ...) from the runtime API."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(stats_socket))
        s.sendall(b"show stat\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    lines = data.decode().splitlines()
    header = lines[0].lstrip("# ").split(",")
    out = {}
    for line in lines[1:]:
        row = dict(zip(header, line.split(","), strict=False))
        if row.get("pxname") == "edgeterm" and row.get("svname") not in ("BACKEND", None):
            out[row["svname"]] = row["status"]
    return out


# --- the fleet --------------------------------------------------------------------------------

KEY_NAMES = ("current", "previous", "next")


@dataclass
class Fleet:
    topo: Topology
    servers: list[FleetEdgeterm]
    configs: list[Path]
    key_dirs: list[Path]
    admin_sockets: list[Path]
    stats_socket: Path
    ctx: ssl.SSLContext
    executor: ThreadPoolExecutor

    def statuses(self) -> list[dict[str, Any]]:
        return [admin_status(a) for a in self.admin_sockets]

    def in_client_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.executor.submit(fn, *args).result(timeout=80)


def write_keys(directory: Path, keys: dict[str, bytes]) -> None:
    """Replace the instance's key files, each atomically (what a config manager does)."""
    for name, key in keys.items():
        tmp = directory / f".{name}.tmp"
        tmp.write_bytes(key)
        tmp.chmod(0o600)
        tmp.rename(directory / f"{name}.key")


def instance_config(
    certs: CertSet, topo: Topology, i: int, directory: Path, key_dir: Path
) -> dict[str, Any]:
    host, port = topo.instances[i]
    uhost, uport = topo.upstreams[i]
    listener: dict[str, Any] = {
        "name": "https",
        "bind": f"{host}:{port}",
        "upstream": "app",
        "backlog": 1024,
        "accept_proxy": "v2",  # HAProxy sends send-proxy-v2 (and check-send-proxy)
    }
    if topo.kind == "netns":  # as deployed (deploy/docker/edgeterm.toml), with TFO allowed
        listener |= {"tcp_fastopen": 256, "defer_accept": True}
    return base_config(
        certs,
        [f"{uhost}:{uport}"],
        overrides={
            "server": {
                "workers": 1,
                "pin_cpus": False,
                "graceful_timeout": 3.0,
                "pidfile": str(directory / "edgeterm.pid"),
                "admin_socket": str(directory / "edgeterm.sock"),
            },
            "listeners": [listener],
            "tls": {
                "tickets": {
                    "enabled": True,
                    "key_files": [str(key_dir / f"{n}.key") for n in KEY_NAMES],
                }
            },
        },
    )


@pytest.fixture(scope="module", params=["netns", "loopback"])
def fleet(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, certs: CertSet
) -> Iterator[Fleet]:
    if HAPROXY is None:
        unavailable("haproxy not installed (apt-get install haproxy)")
    if request.param == "netns":
        why = netns_unavailable()
        if why is not None:
            unavailable(f"network namespaces unavailable ({why}); the loopback variant runs")
        topo = make_netns_topology(f"{os.getpid() % 100000}")
    else:
        topo = make_loopback_topology()
    root = tmp_path_factory.mktemp(f"fleet-{topo.kind}")
    helpers: list[Background] = []
    servers: list[FleetEdgeterm] = []
    executor = topo.client_executor()
    try:
        keys = {n: secrets.token_bytes(80) for n in KEY_NAMES}
        configs, key_dirs, admin_sockets = [], [], []
        for i in range(INSTANCES):
            directory = root / f"edge{i + 1}"
            key_dir = directory / "tickets"
            key_dir.mkdir(parents=True)
            write_keys(key_dir, keys)  # the same keys on every instance
            uhost, uport = topo.upstreams[i]
            upstream = Background(
                [*topo.prefixes[i], sys.executable, "-m", "edgeterm.demo_upstream",
                 "--bind", f"{uhost}:{uport}"],
                directory / "upstream.log",
            )  # fmt: skip
            helpers.append(upstream)
            upstream.wait_for("serving")
            cfg = instance_config(certs, topo, i, directory, key_dir)
            config = write_config(directory / "edgeterm.toml", cfg)
            server = FleetEdgeterm(config, topo.prefixes[i])
            servers.append(server)
            server.start()
            configs.append(config)
            key_dirs.append(key_dir)
            admin_sockets.append(directory / "edgeterm.sock")
        stats_socket = root / "haproxy.sock"
        hcfg = root / "haproxy.cfg"
        hcfg.write_text(haproxy_config(topo, stats_socket, proxy=True))
        haproxy = Background(
            [*topo.lb_prefix, HAPROXY, "-db", "-f", str(hcfg)], root / "haproxy.log"
        )
        helpers.append(haproxy)

        def listening() -> bool:
            if haproxy.proc.poll() is not None:
                raise AssertionError(f"haproxy exited:\n{haproxy.log()}")
            return stats_socket.exists()

        wait_until(listening, timeout=15, what="HAProxy's stats socket")
        wait_until(
            lambda: all(s == "UP" for s in haproxy_servers(stats_socket).values()),
            timeout=20,
            what="HAProxy to see every instance UP",
        )
        yield Fleet(
            topo,
            servers,
            configs,
            key_dirs,
            admin_sockets,
            stats_socket,
            client_context(certs.ca),
            executor,
        )
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
        for server in servers:
            server.stop(timeout=10)
        for helper in reversed(helpers):
            helper.stop()
        for undo in topo.cleanup:
            undo()


@pytest.fixture(autouse=True)
def _fleet_logs(request: pytest.FixtureRequest, show_logs: Callable[[list[Edgeterm]], None]):
    if "fleet" in request.fixturenames:
        show_logs(request.getfixturevalue("fleet").servers)


# --- clients ----------------------------------------------------------------------------------


def fetch(
    addr: tuple[str, int], ctx: ssl.SSLContext, session: ssl.SSLSession | None
) -> tuple[bool, ssl.SSLSession]:
    """One HTTPS request through the balancer and an instance to its demo upstream: (resumed,
    the session the client holds afterwards)."""
    raw = socket.create_connection(addr, timeout=5)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as s:
        s.sendall(REQUEST)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        if not data.startswith(b"HTTP/1.1 200") or b"you asked for /fleet" not in data:
            raise AssertionError(f"unexpected answer: {data[:200]!r}")
        reused = bool(s.session_reused)
        after = s.session
        assert after is not None
        with contextlib.suppress(OSError, ValueError):
            s.unwrap()
    return reused, after


@dataclass
class Attempt:
    started: float
    ok: bool
    reused: bool
    error: str = ""


def client_loop(
    fleet: Fleet, stop: threading.Event, *, clients: int = 8, max_seconds: float = 40
) -> list[Attempt]:
    """``clients`` clients taking turns, each reconnecting with the latest session it holds
    (as a browser does), until ``stop`` is set (or ``max_seconds``: the loop ends by itself)."""
    sessions: list[ssl.SSLSession | None] = []
    for _ in range(clients):
        sessions.append(fetch(fleet.topo.balancer, fleet.ctx, None)[1])
    attempts: list[Attempt] = []
    end = time.monotonic() + max_seconds
    i = 0
    while not stop.is_set() and time.monotonic() < end:
        k = i % clients
        t0 = time.monotonic()
        try:
            reused, sessions[k] = fetch(fleet.topo.balancer, fleet.ctx, sessions[k])
            attempts.append(Attempt(t0, True, reused))
        except (OSError, ssl.SSLError, AssertionError) as exc:
            attempts.append(Attempt(t0, False, False, repr(exc)))
        i += 1
        time.sleep(0.005)
    return attempts


def handshakes(st: dict[str, Any]) -> tuple[int, int]:
    """(handshakes, resumed) of the serving generation's workers."""
    workers = [w for w in st["workers"] if w["generation"] == st["generation"]]
    return sum(w.get("handshakes", 0) for w in workers), sum(w.get("resumed", 0) for w in workers)


# --- the tests ----------------------------------------------------------------------------------


def test_a_session_resumes_on_every_instance(fleet: Fleet) -> None:
    before = [handshakes(st) for st in fleet.statuses()]

    def run() -> list[bool]:
        _, session = fetch(fleet.topo.balancer, fleet.ctx, None)
        # always offer the first session: every instance must read a ticket another issued
        return [fetch(fleet.topo.balancer, fleet.ctx, session)[0] for _ in range(30)]

    outcomes = fleet.in_client_thread(run)
    assert outcomes.count(True) == 30, f"{outcomes.count(False)} of 30 did not resume"

    def counted() -> list[int] | None:
        resumed = [handshakes(st)[1] - b[1] for st, b in zip(fleet.statuses(), before, strict=True)]
        return resumed if sum(resumed) == 30 else None

    resumed = wait_until(counted, timeout=10, what="30 resumptions in the instances' counters")
    assert all(n > 0 for n in resumed), f"resumed per instance: {resumed} (balancing?)"


def test_fleet_wide_key_rotation_keeps_resumption(fleet: Fleet) -> None:
    old = {n: (fleet.key_dirs[0] / f"{n}.key").read_bytes() for n in KEY_NAMES}
    new_key = secrets.token_bytes(80)
    rotated = {"previous": old["current"], "current": old["next"], "next": new_key}
    rotations = [st["tickets"]["rotations"] for st in fleet.statuses()]
    stop = threading.Event()
    loop = fleet.executor.submit(client_loop, fleet, stop)
    try:
        time.sleep(0.5)
        # a rolling rotation: one instance after the other, with traffic in between
        for i in range(INSTANCES):
            write_keys(fleet.key_dirs[i], rotated)
            r = run_cli("reload", "-c", str(fleet.configs[i]), timeout=60)
            assert r.returncode == 0, (i, r.stdout, r.stderr)
            fleet.servers[i].remember_pids()
            time.sleep(0.5)
        time.sleep(1.0)
    finally:
        stop.set()
        attempts = loop.result(timeout=60)
    failed = [a for a in attempts if not a.ok]
    assert not failed, f"{len(failed)} of {len(attempts)} connections failed: {failed[:5]}"
    rate = sum(a.reused for a in attempts) / len(attempts)
    print(f"{fleet.topo.kind}: rotation: {len(attempts)} connections, {rate:.1%} resumed")
    assert len(attempts) >= 50, f"only {len(attempts)} connections in the loop"
    assert rate > 0.95, f"resumption rate {rate:.1%} over {len(attempts)} connections"
    sts = fleet.statuses()
    for st, before in zip(sts, rotations, strict=True):
        assert st["tickets"]["source"] == "files"
        assert st["tickets"]["rotations"] == before + 1  # the key files were loaded again


def test_killing_an_instance_fails_no_connection_once_the_balancer_noticed(fleet: Fleet) -> None:
    victim = 1
    name = f"edge{victim + 1}"
    assert haproxy_servers(fleet.stats_socket)[name] == "UP"
    stop = threading.Event()
    loop = fleet.executor.submit(client_loop, fleet, stop)
    noticed = killed = 0.0
    try:
        time.sleep(1.0)
        killed = time.monotonic()
        fleet.servers[victim].kill()
        wait_until(
            lambda: haproxy_servers(fleet.stats_socket)[name].startswith("DOWN"),
            timeout=15,
            interval=0.02,
            what=f"HAProxy to mark {name} DOWN",
        )
        noticed = time.monotonic()
        time.sleep(2.0)
    finally:
        stop.set()
        attempts = loop.result(timeout=60)
    after = [a for a in attempts if a.started >= noticed]
    failed_after = [a for a in after if not a.ok]
    failed_between = [a for a in attempts if killed <= a.started < noticed and not a.ok]
    print(
        f"{fleet.topo.kind}: kill: DOWN after {noticed - killed:.2f}s; failed before: "
        f"{len(failed_between)}, after: {len(failed_after)} of {len(after)}"
    )
    assert len(after) >= 20, f"only {len(after)} connections after the balancer noticed"
    assert not failed_after, (
        f"{len(failed_after)} of {len(after)} connections failed after HAProxy marked {name} "
        f"DOWN ({noticed - killed:.2f}s after the kill): {failed_after[:5]}"
    )
    # no more than the connections in flight at the kill (redispatch covers refused connects)
    assert len(failed_between) <= 8, failed_between
    # the survivors resume sessions the killed instance issued: the same keys
    assert sum(a.reused for a in after) / len(after) > 0.95


# --- the shipped balancer config ----------------------------------------------------------------


def test_shipped_haproxy_config_is_valid(tmp_path: Path) -> None:
    if HAPROXY is None:
        unavailable("haproxy not installed (apt-get install haproxy)")
    r = subprocess.run(
        [HAPROXY, "-c", "-f", str(HAPROXY_CFG)], capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 0, r.stdout + r.stderr
    text = HAPROXY_CFG.read_text()
    assert re.search(r"(?m)^\s*mode tcp$", text)
    defaults = re.search(r"(?m)^\s*default-server (.*)$", text)
    assert defaults is not None
    for option in ("check", "check-ssl", "send-proxy-v2", "check-send-proxy"):
        assert option in defaults[1].split(), option
    assert len(re.findall(r"(?m)^\s*server ", text)) == INSTANCES
