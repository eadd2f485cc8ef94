"""``[[listeners]] tcp_fastopen`` and ``defer_accept`` (issue 8): loading, and the socket options
``edgeterm.sockets`` sets on a real (local) listening socket."""

from __future__ import annotations

import socket
import textwrap
from pathlib import Path

import pytest

from edgeterm.config import Address
from edgeterm.config_loader import load_config
from edgeterm.errors import ConfigError
from edgeterm.sockets import bind_group, set_listener_options

CONFIG = """
[[listeners]]
name = "https"
bind = "127.0.0.1:0"
upstream = "app"
{extra}

[tls]
[[tls.certificates]]
cert = "site.pem"

[upstreams.app]
servers = ["127.0.0.1:8080"]
"""


def load(tmp_path: Path, extra: str):
    path = tmp_path / "edgeterm.toml"
    path.write_text(textwrap.dedent(CONFIG.format(extra=extra)))
    return load_config(path)


def errors(tmp_path: Path, extra: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, extra)
    return info.value.errors


def test_defaults_are_off(tmp_path: Path) -> None:
    [listener] = load(tmp_path, "").listeners
    assert (listener.tcp_fastopen, listener.defer_accept) == (0, 0)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("tcp_fastopen = 256\ndefer_accept = true", (256, 1)),
        ("tcp_fastopen = 0\ndefer_accept = false", (0, 0)),
        ("defer_accept = 5", (0, 5)),
    ],
)
def test_values(tmp_path: Path, extra: str, expected: tuple[int, int]) -> None:
    [listener] = load(tmp_path, extra).listeners
    assert (listener.tcp_fastopen, listener.defer_accept) == expected


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ("tcp_fastopen = -1", "tcp_fastopen"),
        ("tcp_fastopen = 70000", "tcp_fastopen"),
        ("tcp_fastopen = true", "tcp_fastopen"),
        ("defer_accept = 1.5", "defer_accept"),
        ('defer_accept = "yes"', "defer_accept"),
        ("defer_accept = 3601", "defer_accept"),
        ("defer_accept = -1", "defer_accept"),
    ],
)
def test_bad_values_are_reported(tmp_path: Path, extra: str, key: str) -> None:
    [line] = errors(tmp_path, extra)
    assert f"listeners[0].{key}: " in line, line


def test_the_shipped_config_documents_both_keys() -> None:
    shipped = Path(__file__).resolve().parents[2] / "etc" / "edgeterm.toml"
    text = shipped.read_text()
    assert "\ntcp_fastopen = 0\n" in text and "\ndefer_accept = false\n" in text


def test_socket_options_on_a_bound_group() -> None:
    addr = Address("127.0.0.1", 0, socket.AF_INET)
    socks = bind_group(addr, 128, 2, tcp_fastopen=256, defer_accept=1)
    try:
        for s in socks:
            assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN) == 256
            assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT) == 1
        # a reload sets them again on the same sockets: 0 turns them off
        set_listener_options(socks[0], tcp_fastopen=0, defer_accept=0)
        assert socks[0].getsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN) == 0
        assert socks[0].getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT) == 0
    finally:
        for s in socks:
            s.close()


def test_defaults_leave_the_socket_alone() -> None:
    addr = Address("127.0.0.1", 0, socket.AF_INET)
    [s] = bind_group(addr, 128, 1)
    with s:
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN) == 0
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT) == 0
