"""deploy/systemd/edgeterm.service (issue 8): the unit is valid for systemd, and edgeterm speaks
the ``Type=notify`` protocol to a real ``NOTIFY_SOCKET``.

There is no systemd running here (PID 1 is not systemd), so the protocol is checked from the
receiving side: the test binds the AF_UNIX datagram socket systemd would, starts a real
``edgeterm start --foreground`` with ``NOTIFY_SOCKET`` pointing at it, and reads what arrives
around start, ``edgeterm reload`` (good and bad) and stop. ``systemd-analyze verify`` checks
the unit file itself (a temporary copy whose commands point at this virtualenv's edgeterm,
since verify requires them to exist).
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import launcher
from tests.support.ci import unavailable
from tests.support.configs import write_config
from tests.support.launcher import EdgetermFactory, edgeterm_command, run_cli
from tests.support.supervision import start_supervised
from tests.support.tlsclient import HOST, recv_exactly

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "deploy" / "systemd" / "edgeterm.service"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def systemd_analyze() -> str:
    if SYSTEMD_ANALYZE is None:
        unavailable("systemd-analyze not installed (apt-get install systemd): unit not verified")
    return SYSTEMD_ANALYZE


def unit_settings(text: str) -> dict[str, dict[str, list[str]]]:
    """``[Section] Key=value`` lines; a key may repeat (SystemCallFilter=, ...)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if m := re.fullmatch(r"\[(\w+)\]", line):
            current = sections.setdefault(m[1], {})
            continue
        assert current is not None, f"setting outside a section: {line}"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def local_unit(tmp_path: Path) -> Path:
    """A copy of the unit whose commands run this virtualenv's edgeterm."""
    exe = edgeterm_command()
    assert len(exe) == 1, "the edgeterm console script must be installed next to python"
    text = UNIT.read_text().replace("/opt/edgeterm/bin/edgeterm", exe[0])
    path = tmp_path / "edgeterm.service"
    path.write_text(text)
    return path


# --- the unit file --------------------------------------------------------------------------


def test_unit_settings() -> None:
    s = unit_settings(UNIT.read_text())["Service"]
    one = {k: v[-1] for k, v in s.items()}
    assert one["Type"] == "notify"
    assert one["NotifyAccess"] in ("main", "all")
    assert one["ExecStart"].split()[1:] == [
        "start",
        "--foreground",
        "-c",
        "/etc/edgeterm/edgeterm.toml",
    ]
    reload_cmd = one["ExecReload"].split()
    assert reload_cmd[0] == one["ExecStart"].split()[0]
    assert reload_cmd[1:4] == ["reload", "-c", "/etc/edgeterm/edgeterm.toml"]
    assert int(one["LimitNOFILE"]) >= 65536
    assert one["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"
    assert one["User"] and one["User"] != "root"
    assert one["KillMode"] == "mixed"
    assert one["RuntimeDirectory"] == "edgeterm"
    for key, value in {
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
    }.items():
        assert one[key] == value, key
    assert "@system-service" in s["SystemCallFilter"]
    # the stop timeout leaves room for the default drain (server.graceful_timeout = 30 s)
    assert float(one["TimeoutStopSec"]) > 30


# What Restart=on-failure should do after `edgeterm start --foreground` exits with each of the
# CLI's documented exit codes: "restart", "prevent" (RestartPreventExitStatus=: restarting cannot
# help), or "n/a" (start never exits with it). A new exit code in edgeterm/cli.py or docs/cli.md
# fails test_restart_prevent_exit_status_covers_the_cli_exit_codes until it is classified here.
EXIT_CODE_RESTART_POLICY = {
    0: "n/a",  # success: a clean exit is never restarted by on-failure
    1: "restart",  # an unexpected failure of the supervisor
    2: "prevent",  # the config is invalid
    3: "n/a",  # not running: stop, reload, status only
    4: "prevent",  # cannot start here: port in use, OpenSSL self-check
    5: "prevent",  # a worker could not boot: the server halted instead of crash-looping
    6: "prevent",  # already running
    7: "n/a",  # status --ready: not ready
}


def cli_exit_codes() -> dict[str, int]:
    """``EXIT_* = n`` in edgeterm/cli.py, the codes' single definition."""
    text = (REPO / "edgeterm" / "cli.py").read_text()
    codes = {m[1]: int(m[2]) for m in re.finditer(r"(?m)^(EXIT_[A-Z_]+) = (\d+)$", text)}
    assert codes, "no EXIT_* constants found in edgeterm/cli.py"
    return codes


def documented_exit_codes() -> set[int]:
    """The rows of the exit code table in docs/cli.md."""
    text = (REPO / "docs" / "cli.md").read_text()
    section = text.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    return {int(m[1]) for m in re.finditer(r"(?m)^\| (\d+) \|", section)}


def test_restart_prevent_exit_status_covers_the_cli_exit_codes() -> None:
    codes = set(cli_exit_codes().values())
    assert codes == documented_exit_codes(), "edgeterm/cli.py and docs/cli.md disagree"
    unclassified = codes - set(EXIT_CODE_RESTART_POLICY)
    assert not unclassified, f"exit codes {sorted(unclassified)}: classify them for systemd"
    s = unit_settings(UNIT.read_text())["Service"]
    assert s["Restart"] == ["on-failure"]
    prevent = {int(w) for line in s.get("RestartPreventExitStatus", []) for w in line.split()}
    expected = {c for c in codes if EXIT_CODE_RESTART_POLICY[c] == "prevent"}
    assert prevent == expected, (
        f"RestartPreventExitStatus={sorted(prevent)}, want {sorted(expected)}"
    )
    # and the codes the supervisor itself halts with are the CLI's
    from edgeterm.supervisor import launch, supervisor

    assert cli_exit_codes()["EXIT_BOOT"] == supervisor.EXIT_BOOT
    assert cli_exit_codes()["EXIT_ALREADY_RUNNING"] == launch.EXIT_ALREADY_RUNNING


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = systemd_analyze()
    unit = local_unit(tmp_path)
    r = subprocess.run(
        [analyze, "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    # verify exits 0 on some problems it only warns about ("Unknown key", "Failed to parse"):
    # any output at all is a failure
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), (
        r.returncode,
        r.stdout,
        r.stderr,
    )


def test_sandbox_exposure_is_low(tmp_path: Path) -> None:
    analyze = systemd_analyze()
    unit = local_unit(tmp_path)
    r = subprocess.run(
        [analyze, "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout + r.stderr)
    if m is None:
        unavailable(f"systemd-analyze security --offline not supported here: {r.stderr.strip()}")
    assert float(m[1]) <= 2.5, r.stdout


# --- sd_notify from a real server -------------------------------------------------------------


class NotifySocket:
    """What systemd binds: an AF_UNIX datagram socket; collects ``KEY=VALUE`` messages."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))

    def next(self, timeout: float = 30.0) -> dict[str, str]:
        self.sock.settimeout(timeout)
        data = self.sock.recv(65536)
        return dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)

    def until(self, key: str, timeout: float = 30.0) -> list[dict[str, str]]:
        """Messages up to and including the first that sets ``key``."""
        deadline = time.monotonic() + timeout
        seen = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {key} within {timeout}s; got {seen}")
            msg = self.next(left)
            seen.append(msg)
            if key in msg:
                return seen

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    ns = NotifySocket(tmp_path / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", str(ns.path))
    yield ns
    ns.close()


def test_ready_reloading_stopping(
    edgeterm: EdgetermFactory, echo: Any, notify_socket: NotifySocket
) -> None:
    sv = start_supervised(edgeterm, [echo.addr])
    ready = notify_socket.until("READY")[-1]
    assert ready["READY"] == "1"
    assert ready["MAINPID"] == str(sv.server.pid)
    assert "serving" in ready["STATUS"]

    # a good reload: RELOADING=1 (with a plausible CLOCK_MONOTONIC) then READY=1
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    r = run_cli("reload", "-c", str(sv.config), timeout=60)
    assert r.returncode == 0, r.stderr
    sv.server.remember_pids()
    msgs = notify_socket.until("READY")
    assert msgs[0].get("RELOADING") == "1", msgs
    assert before <= int(msgs[0]["MONOTONIC_USEC"]) <= time.monotonic_ns() // 1000
    assert "generation 2" in msgs[-1]["STATUS"], msgs

    # a failed reload: RELOADING=1, then READY=1 again (still serving the old config)
    bad = dict(sv.cfg, tls=dict(sv.cfg["tls"], certificates=[{"cert": "missing.pem"}]))
    write_config(sv.config, bad)
    sv.server.send_signal(signal.SIGHUP)
    msgs = notify_socket.until("READY")
    assert msgs[0].get("RELOADING") == "1", msgs
    assert msgs[-1]["READY"] == "1" and "reload failed" in msgs[-1]["STATUS"], msgs

    sv.server.send_signal(signal.SIGTERM)
    stopping = notify_socket.until("STOPPING")[-1]
    assert stopping["STOPPING"] == "1"
    assert sv.server.wait_exit(30) == 0


def test_no_notifications_without_notify_socket(
    edgeterm: EdgetermFactory, echo: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    sv = start_supervised(edgeterm, [echo.addr])
    assert "sd_notify" not in sv.server.log()


# --- MemoryDenyWriteExecute= -----------------------------------------------------------------

PR_SET_MDWE, PR_GET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 66, 1

# Sets the kernel's memory-deny-write-execute rule (kept across fork and exec), then runs
# edgeterm: what MemoryDenyWriteExecute=yes imposes.
MDWE_WRAPPER = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0 or libc.prctl(66, 0, 0, 0, 0) != 1:
    sys.exit("PR_SET_MDWE failed: errno %d" % ctypes.get_errno())
os.execv(sys.argv[1], sys.argv[1:])
"""


def mdwe_supported() -> bool:
    r = subprocess.run(
        [sys.executable, "-c", MDWE_WRAPPER, "/bin/true"],
        capture_output=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    return r.returncode == 0


def test_ticket_callbacks_work_without_writable_executable_memory(
    edgeterm: EdgetermFactory,
    echo: Any,
    ca: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Session tickets go through a ctypes (libffi) callback: resumption must work under the
    W^X rule of the unit's MemoryDenyWriteExecute=yes."""
    if not mdwe_supported():
        pytest.skip("the kernel has no PR_SET_MDWE (Linux >= 6.3): MemoryDenyWriteExecute untested")
    wrapper = tmp_path / "mdwe.py"
    wrapper.write_text(MDWE_WRAPPER)
    inner = edgeterm_command()
    if len(inner) != 1:
        pytest.skip("needs the edgeterm console script")
    monkeypatch.setattr(
        launcher, "edgeterm_command", lambda: [sys.executable, str(wrapper), *inner]
    )
    sv = start_supervised(edgeterm, [echo.addr])
    ctx = ssl.create_default_context(cafile=str(ca))
    session = None
    reused = []
    for _ in range(4):
        raw = socket.create_connection((HOST, sv.port), timeout=10)
        with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as s:
            s.sendall(b"ping\n")
            assert recv_exactly(s, 5, timeout=10) == b"ping\n"
            reused.append(s.session_reused)
            session = session or s.session
    assert reused == [False, True, True, True], reused
