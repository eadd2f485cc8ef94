"""``edgeterm.sdnotify``: the systemd notification protocol, against a real AF_UNIX socket."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeterm import sdnotify
from edgeterm.sdnotify import Notifier


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    sock.bind(path)
    sock.settimeout(5)
    yield sock, path
    sock.close()


def fields(datagram: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in datagram.decode().split("\n"))


def test_addresses() -> None:
    assert sdnotify.socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert sdnotify.socket_address("@abstract/name") == b"\0abstract/name"
    assert sdnotify.socket_address("") is None
    assert sdnotify.socket_address("relative/path") is None


def test_message_format_keeps_one_assignment_per_line() -> None:
    assert sdnotify.format_message(READY=1, STATUS="a\nb") == b"READY=1\nSTATUS=a b"


def test_without_notify_socket_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier.from_environment()
    assert not n.enabled
    assert n.ready("x") is False


def test_from_environment_unsets_the_variable(
    monkeypatch: pytest.MonkeyPatch, receiver: tuple[socket.socket, str]
) -> None:
    sock, path = receiver
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    n = Notifier.from_environment()
    assert "NOTIFY_SOCKET" not in os.environ  # the workers forked later do not inherit it
    assert n.ready("serving")
    got = fields(sock.recv(4096))
    assert got == {"READY": "1", "MAINPID": str(os.getpid()), "STATUS": "serving"}


def test_reloading_carries_monotonic_usec(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert Notifier(path).reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    got = fields(sock.recv(4096))
    assert got["RELOADING"] == "1"
    assert before <= int(got["MONOTONIC_USEC"]) <= after
    assert Notifier(path).stopping()
    assert fields(sock.recv(4096))["STOPPING"] == "1"


def test_abstract_namespace() -> None:
    name = f"edgeterm-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        assert Notifier(sdnotify.socket_address("@" + name)).status("hello")
        assert sock.recv(4096) == b"STATUS=hello"


def test_a_missing_socket_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    n = Notifier(str(tmp_path / "nobody"))
    assert n.ready("x") is False
    assert "sd_notify" in caplog.text
