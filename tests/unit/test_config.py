"""The config loader: defaults, paths, addresses, and that every problem is reported at once."""

from __future__ import annotations

import socket
import textwrap
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeterm.config import Address, ServerConfig
from edgeterm.config_loader import load_config, parse_address
from edgeterm.errors import ConfigError

SHIPPED = Path(__file__).resolve().parents[2] / "etc" / "edgeterm.toml"

MINIMAL = """
[[listeners]]
name = "https"
bind = "127.0.0.1:8443"
upstream = "app"

[tls]
[[tls.certificates]]
cert = "site.pem"

[upstreams.app]
servers = ["127.0.0.1:8080"]
"""


def fake_getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
    """No DNS in unit tests: only "localhost" and "v6only.test" resolve."""
    if host == "localhost":
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
    if host == "v6only.test":
        return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", port, 0, 0))]
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


@pytest.fixture(autouse=True, scope="module")
def no_dns() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket, "getaddrinfo", fake_getaddrinfo)
        yield


def write(directory: Path, text: str, name: str = "edgeterm.toml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


def errors_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.errors


# --- valid files -------------------------------------------------------------------------------


def test_shipped_config_loads_with_documented_values() -> None:
    config = load_config(SHIPPED)
    assert config.path == SHIPPED
    [listener] = config.listeners
    assert (listener.name, str(listener.bind), listener.upstream) == (
        "https",
        "127.0.0.1:8443",
        "app",
    )
    assert listener.backlog == 1024
    assert [str(a) for a in config.upstreams["app"].servers] == ["127.0.0.1:8080"]
    [certificate] = config.tls.certificates
    assert certificate.cert == SHIPPED.parent / "certs" / "localhost.pem"
    assert certificate.key == SHIPPED.parent / "certs" / "localhost.key"
    assert config.tls.alpn == ("http/1.1",)
    assert config.tls.min_version == "TLSv1.2"
    assert config.server.workers == "auto"
    assert config.server.log_file is None and config.server.user is None
    assert config.tls.tickets.key_files == ()
    assert (config.timeouts.handshake, config.timeouts.connect, config.timeouts.idle) == (
        10,
        5,
        300,
    )
    assert (config.limits.max_connections, config.limits.buffer_size) == (10000, 65536)
    assert (config.telemetry.otlp_endpoint, config.telemetry.sample_ratio) == ("", 0.01)


def test_shipped_config_loads_without_its_certificate_files(tmp_path: Path) -> None:
    copy = write(tmp_path, SHIPPED.read_text())
    cert = load_config(copy).tls.certificates[0].cert
    assert cert == tmp_path / "certs" / "localhost.pem" and not cert.exists()


def test_shipped_config_documents_every_key_it_sets() -> None:
    lines = SHIPPED.read_text().splitlines()
    for i, line in enumerate(lines):
        if "=" in line and not line.startswith(("#", "[")):
            assert lines[i - 1].startswith("#"), f"undocumented key: {line}"


def test_minimal_config_gets_every_default(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))
    server = config.server
    assert server.workers == "auto" and server.pin_cpus is True
    assert server.pidfile == tmp_path / "run" / "edgeterm.pid"
    assert server.admin_socket == tmp_path / "run" / "edgeterm.sock"
    assert server.graceful_timeout == ServerConfig().graceful_timeout == 30.0
    assert (server.log_file, server.user, server.group) == (None, None, None)
    assert config.listeners[0].backlog == 1024
    tls = config.tls
    assert (tls.min_version, tls.ciphers, tls.alpn) == ("TLSv1.2", "intermediate", ("http/1.1",))
    assert tls.certificates[0].key is None
    tickets = tls.tickets
    assert (tickets.enabled, tickets.rotate_every, tickets.key_files, tickets.count) == (
        True,
        3600.0,
        (),
        2,
    )
    assert config.upstreams["app"].balance == "round_robin"
    assert (config.timeouts.handshake, config.timeouts.connect, config.timeouts.idle) == (
        10.0,
        5.0,
        300.0,
    )
    assert (config.limits.max_connections, config.limits.buffer_size) == (10000, 65536)
    assert (config.telemetry.otlp_endpoint, config.telemetry.sample_ratio) == ("", 0.01)


def test_relative_paths_resolve_against_the_config_directory(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "conf").mkdir()
    path = write(
        tmp_path / "conf",
        MINIMAL.replace('cert = "site.pem"', 'cert = "certs/site.pem"\nkey = "/abs/site.key"')
        + '[server]\nlog_file = "log/edge.log"\npidfile = "../p.pid"\n'
        + '[tls.tickets]\nkey_files = ["k/a.key", "k/b.key"]\n',
    )
    monkeypatch.chdir(tmp_path)
    config = load_config("conf/edgeterm.toml")
    base = tmp_path / "conf"
    assert config.path == path and config.path.is_absolute()
    assert config.tls.certificates[0].cert == base / "certs" / "site.pem"
    assert config.tls.certificates[0].key == Path("/abs/site.key")
    assert config.server.log_file == base / "log" / "edge.log"
    assert config.server.pidfile == base / ".." / "p.pid"
    assert config.tls.tickets.key_files == (base / "k" / "a.key", base / "k" / "b.key")


def test_explicit_values_are_used(tmp_path: Path) -> None:
    extra = """
    [server]
    workers = 3
    user = "nobody"
    graceful_timeout = 2
    [timeouts]
    idle = 0.5
    [telemetry]
    sample_ratio = 1
    """
    config = load_config(write(tmp_path, MINIMAL + textwrap.dedent(extra)))
    assert config.server.workers == 3 and config.server.worker_count() == 3
    assert config.server.user == "nobody"
    assert config.server.graceful_timeout == 2.0 and isinstance(
        config.server.graceful_timeout, float
    )
    assert config.timeouts.idle == 0.5
    assert config.telemetry.sample_ratio == 1.0


def test_ipv6_and_hostname_addresses(tmp_path: Path) -> None:
    text = MINIMAL.replace('"127.0.0.1:8443"', '"[::1]:8443"').replace(
        '["127.0.0.1:8080"]', '["localhost:8080", "v6only.test:9000", "[0:0::1]:1"]'
    )
    config = load_config(write(tmp_path, text))
    bind = config.listeners[0].bind
    assert bind == Address("::1", 8443, socket.AF_INET6)
    assert bind.sockaddr() == ("::1", 8443) and str(bind) == "[::1]:8443"
    assert [str(a) for a in config.upstreams["app"].servers] == [
        "127.0.0.1:8080",
        "[::1]:9000",
        "[::1]:1",
    ]
    assert config.upstreams["app"].servers[1].family == socket.AF_INET6


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("localhost", 'expected host:port, got "localhost"'),
        ("127.0.0.1:70000", "port 70000 out of range 1..65535"),
        ("[::1]", 'expected host:port, got "[::1]"'),
        ("::1:80", "needs brackets"),
        (":80", "missing host"),
        ("127.0.0.1:+80", "numeric port"),
        ("[127.0.0.1]:80", "brackets are for IPv6"),
        ("nowhere.invalid:80", 'cannot resolve host "nowhere.invalid"'),
        ("bad host:80", "invalid host name"),
        ("127.0.0.1:0", "port 0 out of range 1..65535"),
    ],
)
def test_parse_address_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("+", r"\+")):
        parse_address(text)


def test_parse_address_port_zero_only_when_allowed() -> None:
    assert parse_address("127.0.0.1:0", allow_port_zero=True).port == 0
    assert parse_address("localhost:443") == Address("127.0.0.1", 443, socket.AF_INET)


# --- broken files: exact key paths, and every problem at once ----------------------------------


def amend(section: str, lines: str) -> str:
    """MINIMAL with ``lines`` added to table ``section`` ("" for the top level)."""
    header = f"[{section}]\n"
    if not section:
        return lines + "\n" + MINIMAL
    if header in MINIMAL and not section.startswith("["):  # [[array]]: append a new one
        return MINIMAL.replace(header, header + lines + "\n", 1)
    return MINIMAL + header + lines + "\n"


BROKEN = [
    ("server", "wokers = 2", ['server.wokers: unknown key (did you mean "workers"?)']),
    (
        "server",
        'graceful_timeout = "ten"',
        ['server.graceful_timeout: expected a number, got string "ten"'],
    ),
    ("server", "workers = true", ["server.workers: expected an integer, got boolean true"]),
    ("server", "workers = 0", ["server.workers: must be >= 1, got integer 0"]),
    ("server", 'workers = "all"', ['server.workers: expected an integer >= 1 or "auto"']),
    (
        "server",
        "pin_cpus = 1",
        ["server.pin_cpus: expected a boolean (true or false), got integer"],
    ),
    ("limits", "buffer_size = 1024", ["limits.buffer_size: must be between 4096 and 16777216"]),
    (
        "tls",
        'min_version = "SSLv3"',
        ['tls.min_version: expected one of "TLSv1.2", "TLSv1.3", got "SSLv3"'],
    ),
    ("tls", 'min_version = "TLSv1.1"', ['tls.min_version: expected one of "TLSv1.2", "TLSv1.3"']),
    ("tls", 'ciphers = ""', ["tls.ciphers: must not be empty"]),
    ("tls", 'alpn = ["h2", ""]', ["tls.alpn[1]: must not be empty"]),
    ("tls", 'alpn = "h2"', ['tls.alpn: expected an array, got string "h2"']),
    ("timeouts", "idle = -1", ["timeouts.idle: must be > 0, got integer -1"]),
    ("timeouts", "connect = nan", ["timeouts.connect: must be a finite number, got float nan"]),
    (
        "telemetry",
        "sample_ratio = 2",
        ["telemetry.sample_ratio: must be between 0.0 and 1.0, got integer 2"],
    ),
    (
        "upstreams.app",
        'balance = "random"',
        ['upstreams.app.balance: expected one of "round_robin"'],
    ),
    ("upstreams.empty", "servers = []", ["upstreams.empty.servers: must not be empty"]),
    ("upstreams.x", "", ["upstreams.x.servers: missing required key"]),
    ('upstreams."a b"', 'servers = ["127.0.0.1:1"]', ['upstreams."a b": invalid name "a b"']),
    ("tls.tickets", "count = 17", ["tls.tickets.count: must be between 0 and 16, got integer 17"]),
    (
        "tls.tickets",
        "key_files = [1]",
        ["tls.tickets.key_files[0]: expected a string, got integer 1"],
    ),
    ("[tls.certificates]", 'key = "k.pem"', ["tls.certificates[1].cert: missing required key"]),
    ("", "server = 5", ["server: expected a table, got integer 5"]),
    ("", "bogus = 1", ["bogus: unknown key"]),
    ("", "timeouts = [1]", ["timeouts: expected a table, got an array"]),
]


@pytest.mark.parametrize(("section", "lines", "expected"), BROKEN)
def test_broken_config_names_the_key(
    tmp_path: Path, section: str, lines: str, expected: list[str]
) -> None:
    path = write(tmp_path, amend(section, lines))
    errors = errors_of(path)
    assert len(errors) == len(expected), errors
    for line, want in zip(errors, expected, strict=True):
        assert line.startswith(f"{path}: {want}"), line


def test_upstream_servers_errors_have_indexes(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        '["127.0.0.1:8080"]', '["127.0.0.1:8080", "localhost", "127.0.0.1:70000", "[::1]"]'
    )
    path = write(tmp_path, text)
    assert errors_of(path) == [
        f'{path}: upstreams.app.servers[1]: expected host:port, got "localhost"',
        f'{path}: upstreams.app.servers[2]: port 70000 out of range 1..65535 in "127.0.0.1:70000"',
        f'{path}: upstreams.app.servers[3]: expected host:port, got "[::1]"',
    ]


def test_unknown_upstream_and_duplicate_listeners(tmp_path: Path) -> None:
    extra = """
    [[listeners]]
    name = "https"
    bind = "127.0.0.1:8443"
    upstream = "ap"

    [[listeners]]
    name = "all"
    bind = "0.0.0.0:8443"
    upstream = "app"
    """
    path = write(tmp_path, MINIMAL + textwrap.dedent(extra))
    errors = errors_of(path)
    assert errors == [
        f'{path}: listeners[1].name: duplicate listener name "https" (also listeners[0])',
        f'{path}: listeners[1].bind: 127.0.0.1:8443 conflicts with listeners[0] ("https") on '
        "127.0.0.1:8443",
        f'{path}: listeners[2].bind: 0.0.0.0:8443 conflicts with listeners[0] ("https") on '
        "127.0.0.1:8443",
        f'{path}: listeners[2].bind: 0.0.0.0:8443 conflicts with listeners[1] ("https") on '
        "127.0.0.1:8443",
        f'{path}: listeners[1].upstream: no pool named "ap" in [upstreams] (known: app)',
    ]


def test_port_zero_listeners_do_not_conflict(tmp_path: Path) -> None:
    text = (
        MINIMAL.replace("8443", "0")
        + '[[listeners]]\nname = "b"\nbind = "127.0.0.1:0"\nupstream = "app"\n'
    )
    assert [ln.bind.port for ln in load_config(write(tmp_path, text)).listeners] == [0, 0]


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    text = """
    [server]
    wokers = 2
    [[listeners]]
    name = "https"
    bind = "localhost"
    upstream = "app"
    [limits]
    max_connections = "many"
    """
    path = write(tmp_path, text)
    errors = errors_of(path)
    keys = [line.split(": ")[1] for line in errors]
    assert keys == [
        "server.wokers",
        "listeners[0].bind",
        "tls.certificates",
        "upstreams",
        "limits.max_connections",
        "listeners[0].upstream",
    ]
    assert errors[-1].endswith('no pool named "app" in [upstreams] (known: none)')


def test_empty_file_lists_the_required_sections(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    assert errors_of(path) == [
        f"{path}: listeners: at least one [[listeners]] table is required",
        f"{path}: tls.certificates: at least one [[tls.certificates]] table is required",
        f"{path}: upstreams: at least one [upstreams.<name>] table is required",
    ]


def test_toml_syntax_error(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "[server\n")
    [line] = errors_of(path)
    assert line.startswith(f"{path}: TOML syntax error: ") and "line" in line


def test_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(b'x = "\xff"\n')
    assert errors_of(path) == [f"{path}: TOML syntax error: invalid UTF-8 at byte 5"]


def test_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    assert errors_of(missing) == [f"{missing}: cannot read: No such file or directory"]
    assert errors_of(tmp_path) == [f"{tmp_path}: cannot read: Is a directory"]


def test_file_is_named_as_given(tmp_path: Path, monkeypatch) -> None:
    write(tmp_path, MINIMAL + "[server]\nwokers = 1\n")
    monkeypatch.chdir(tmp_path)
    assert errors_of(Path("edgeterm.toml"))[0].startswith("edgeterm.toml: server.wokers: ")


# --- property: any TOML tree loads or raises ConfigError, one well-formed line per problem ------

KEYS = sorted(
    {
        *("server", "listeners", "tls", "upstreams", "timeouts", "limits", "telemetry"),
        *("workers", "pin_cpus", "pidfile", "log_file", "user", "graceful_timeout", "name"),
        *("bind", "upstream", "backlog", "min_version", "ciphers", "alpn", "certificates"),
        *("cert", "key", "tickets", "key_files", "count", "rotate_every", "servers"),
        *("balance", "idle", "max_connections", "buffer_size", "sample_ratio", "app"),
    }
)
scalars = (
    st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats()
    | st.booleans()
    | st.text(max_size=20)
    | st.sampled_from(["auto", "127.0.0.1:0", "[::1]:1", "TLSv1.3", "", "app", "localhost"])
)
keys = st.sampled_from(KEYS) | st.text(max_size=8)
trees = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(keys, children, max_size=4),
    max_leaves=20,
)


@pytest.fixture(scope="module")
def prop_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("prop")


def check_loads_or_reports(directory: Path, tree: dict[str, object]) -> None:
    path = directory / "fuzz.toml"
    path.write_text(tomli_w.dumps(tree))
    try:
        load_config(path)
    except ConfigError as exc:
        assert exc.errors
        for line in str(exc).splitlines():
            assert line.startswith(f"{path}: "), line
        assert len(str(exc).splitlines()) == len(exc.errors)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=st.dictionaries(keys, trees, max_size=6))
def test_random_trees_load_or_raise_config_error(prop_dir: Path, tree: dict[str, object]) -> None:
    check_loads_or_reports(prop_dir, tree)


FIELDS = {
    "server": ("workers", "pin_cpus", "pidfile", "admin_socket", "graceful_timeout", "log_file"),
    "server ": ("user", "group"),
    "listeners": ("name", "bind", "upstream", "backlog"),
    "tls": ("min_version", "ciphers", "alpn", "certificates", "tickets"),
    "tls.certificates": ("cert", "key"),
    "tls.tickets": ("enabled", "rotate_every", "key_files", "count"),
    "upstreams": ("app", "other"),
    "upstreams.app": ("servers", "balance"),
    "timeouts": ("handshake", "connect", "idle"),
    "limits": ("max_connections", "buffer_size"),
    "telemetry": ("otlp_endpoint", "sample_ratio"),
}
plausible = st.sampled_from(
    [
        *(1, 0, 2.5, True, "auto", "127.0.0.1:0", "[::1]:1", "TLSv1.3", "x", "round_robin", ""),
        *(["h2"], ["127.0.0.1:1"], [], {"servers": ["localhost:1"]}),
    ]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    field=st.sampled_from([(t.strip(), k) for t, ks in FIELDS.items() for k in ks]),
    value=plausible | trees,
    extra_key=st.none() | keys,
)
def test_mutated_valid_config_loads_or_raises(
    prop_dir: Path, field: tuple[str, str], value: object, extra_key: str | None
) -> None:
    tree = tomllib.loads(MINIMAL)
    table, key = field
    target: Any = tree
    for part in table.split("."):
        target = target.setdefault(part, {})
        target = target[0] if isinstance(target, list) else target
    target[extra_key if extra_key is not None else key] = value
    check_loads_or_reports(prop_dir, tree)
