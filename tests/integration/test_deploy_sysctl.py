"""deploy/sysctl/90-edgeterm.conf (issue 8): every setting exists, says why, agrees with the
other deploy files, and the kernel takes the per-namespace ones (applied inside a throwaway
network namespace, never on the host)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

from tests.support.ci import unavailable

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "deploy" / "sysctl" / "90-edgeterm.conf"
REQUIRED = (
    "net.ipv4.tcp_fastopen",
    "net.core.somaxconn",
    "net.ipv4.tcp_max_syn_backlog",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.tcp_migrate_req",
    "fs.file-max",
    "fs.nr_open",
)


def settings() -> list[tuple[str, str, list[str]]]:
    """(key, value, the comment lines above it; settings without a blank line between them
    share one comment)."""
    out = []
    comment: list[str] = []
    for raw in CONF.read_text().splitlines():
        line = raw.strip()
        if not line:
            comment = []
        elif line.startswith("#"):
            comment.append(line)
        else:
            key, sep, value = (p.strip() for p in line.partition("="))
            assert sep and re.fullmatch(r"[a-z0-9_.-]+", key), line
            out.append((key, value, comment))
    return out


def proc_path(key: str) -> Path:
    return Path("/proc/sys") / key.replace(".", "/")


def test_every_required_setting_is_there_with_a_reason() -> None:
    found = {key: comment for key, _value, comment in settings()}
    for key in REQUIRED:
        assert key in found, f"{key} missing"
        assert sum(len(c) for c in found[key]) > 40, f"{key}: say why"


def test_every_key_exists_in_this_kernel() -> None:
    for key, value, _ in settings():
        assert proc_path(key).exists(), f"{key}: no such sysctl"
        assert re.fullmatch(r"\d+( \d+)?", value), f"{key} = {value}"


def test_values_agree_with_the_rest_of_deploy() -> None:
    values = {key: value for key, value, _ in settings()}
    assert int(values["net.ipv4.tcp_fastopen"]) & 2, "the server bit, for listeners.tcp_fastopen"
    somaxconn = int(values["net.core.somaxconn"])
    for sample in (REPO / "deploy/docker/edgeterm.toml", REPO / "deploy/kubernetes/edgeterm.toml"):
        for listener in tomllib.loads(sample.read_text())["listeners"]:
            assert listener.get("backlog", 1024) <= somaxconn, sample
    unit = (REPO / "deploy/systemd/edgeterm.service").read_text()
    [nofile] = re.findall(r"(?m)^LimitNOFILE=(\d+)$", unit)
    assert int(nofile) <= int(values["fs.nr_open"]), "LimitNOFILE cannot exceed fs.nr_open"
    lo, hi = map(int, values["net.ipv4.ip_local_port_range"].split())
    assert 1024 < lo < hi <= 65535
    for port in (443, 8443):  # the ports edgeterm listens on must stay out of the range
        assert not lo <= port <= hi


def test_the_kernel_takes_the_per_namespace_settings() -> None:
    if shutil.which("ip") is None:
        unavailable("the ip command is missing (apt-get install iproute2)")
    if shutil.which("sysctl") is None:
        unavailable("the sysctl command is missing (apt-get install procps)")
    if os.geteuid() != 0:
        unavailable("not root: creating a network namespace needs CAP_SYS_ADMIN")
    name = f"etsysctl{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True, timeout=20)
    if r.returncode != 0:
        unavailable(f"cannot create a network namespace: {r.stderr.strip()}")
    try:
        for key, value, _ in settings():
            if not key.startswith("net."):
                continue  # fs.* are host-wide: never written by a test
            w = subprocess.run(
                ["ip", "netns", "exec", name, "sysctl", "-w", f"{key}={value}"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            assert w.returncode == 0, (key, w.stderr)
            got = subprocess.run(
                ["ip", "netns", "exec", name, "sysctl", "-n", key],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.split()
            assert got == value.split(), (key, got, value)
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=20)
