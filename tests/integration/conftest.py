"""Fixtures for edgeterm's integration tests: real processes, real sockets, real OpenSSL.

- ``certs``: a CA and three leaf certificates (session-wide).
- ``upstream_loop`` and ``upstream``: plaintext upstream servers (see ``tests.support.upstreams``).
- ``refusing_port`` / ``blackhole_port``: upstream addresses that refuse / never answer.
- ``edgeterm``: a factory that writes a config and starts ``edgeterm start --foreground``;
  every server it starts is stopped by PID (SIGTERM, then SIGKILL after a deadline) at teardown,
  and a test that fails gets the server's log in its report.
"""

from __future__ import annotations

import ssl
import sys
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

_REPO = Path(__file__).resolve().parents[2]
if str(_REPO) not in sys.path:  # `tests.support` is imported from the repository root
    sys.path.insert(0, str(_REPO))

from tests.support.certs import CertSet, make_cert_set  # noqa: E402
from tests.support.launcher import Edgeterm, EdgetermFactory  # noqa: E402
from tests.support.tlsclient import client_context  # noqa: E402
from tests.support.upstreams import (  # noqa: E402
    BlackholePort,
    EchoUpstream,
    RefusingPort,
    Upstream,
    UpstreamLoop,
)

_SERVERS_KEY = pytest.StashKey[list[list[Edgeterm]]]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: a test that moves a lot of data or waits on timers")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        servers = [s for group in item.stash.get(_SERVERS_KEY, []) for s in group]
        for i, server in enumerate(servers):
            report.sections.append((f"edgeterm log #{i} (pid {server.pid})", server.log()))
    return report


def show_logs_on_failure(request: pytest.FixtureRequest, servers: list[Edgeterm]) -> None:
    """Attach these servers' logs to the report of the current test if it fails."""
    request.node.stash.setdefault(_SERVERS_KEY, []).append(servers)


@pytest.fixture
def show_logs(request: pytest.FixtureRequest) -> Callable[[list[Edgeterm]], None]:
    """``show_logs(servers)``: attach those servers' logs to this test's report if it fails
    (for servers started by module-scoped fixtures)."""
    return lambda servers: show_logs_on_failure(request, servers)


# certificates -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertSet:
    return make_cert_set(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="session")
def ca(certs: CertSet) -> Path:
    return certs.ca


@pytest.fixture(scope="session")
def client_ctx(ca: Path) -> ssl.SSLContext:
    """A default verifying client context (TLS 1.2+)."""
    return client_context(ca)


# upstreams ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def upstream_loop() -> Iterator[UpstreamLoop]:
    loop = UpstreamLoop().start()
    yield loop
    loop.stop()


@pytest.fixture
def upstream(upstream_loop: UpstreamLoop) -> Iterator[Callable[..., Any]]:
    """``upstream(EchoUpstream, **kw)``: start an upstream server for this test."""
    started: list[Upstream] = []

    def make(cls: type[Upstream] = EchoUpstream, **kw: Any) -> Any:
        server = cls(upstream_loop, **kw).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.close()


@pytest.fixture
def echo(upstream: Callable[..., Any]) -> EchoUpstream:
    return upstream(EchoUpstream)  # type: ignore[no-any-return]


@pytest.fixture
def refusing_port() -> Iterator[RefusingPort]:
    port = RefusingPort()
    yield port
    port.close()


@pytest.fixture
def blackhole_port() -> Iterator[BlackholePort]:
    port = BlackholePort()
    yield port
    port.close()


# edgeterm -----------------------------------------------------------------------------------


@pytest.fixture
def edgeterm(
    request: pytest.FixtureRequest, tmp_path: Path, certs: CertSet
) -> Iterator[EdgetermFactory]:
    """``edgeterm.start([upstream addrs], timeouts={...}, ...)`` -> a ready ``Edgeterm``."""
    directory = tmp_path / "edgeterm"
    directory.mkdir()
    factory = EdgetermFactory(directory, certs)
    show_logs_on_failure(request, factory.servers)
    yield factory
    problems = factory.close()
    if problems:
        pytest.fail("\n\n".join(problems), pytrace=False)
