"""Property tests of the config loader, beyond tests/unit/test_config.py's random trees.

What is added here: every error line must carry a key path that leads into the file (not just
the file prefix); random *text* (not only valid TOML) is a syntax error, never a crash; several
mutations at once of a valid config, with awkward keys (quotes, dots, unicode, empty); and a NUL
character in every string-valued key, one key at a time. The valid base uses every part of the
schema the mutations should reach: two listeners (one with PROXY protocol from a balancer),
routes (SNI, ALPN, listener scope), pools with weighted and capped servers (IPv6, Unix socket),
PROXY protocol to the servers, passive and active health, client certificates and a CRL.

The contract (docs/configuration.md): ``load_config`` returns a ``Config`` or raises
``ConfigError`` whose lines are ``<file>: <key path>: <problem>`` (or ``<file>: TOML syntax
error: ...``); any other exception is a bug.
"""

from __future__ import annotations

import copy
import re
import socket
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from edgeterm.config_loader import load_config
from edgeterm.errors import ConfigError
from tests.support.routing import make_client_pki

SECTIONS = ("server", "listeners", "tls", "upstreams", "timeouts", "limits", "telemetry")

VALID = """
[server]
workers = 1
pidfile = "run/edgeterm.pid"
admin_socket = "run/edgeterm.sock"

[[listeners]]
name = "https"
bind = "127.0.0.1:0"
upstream = "app"
accept_proxy = "v2"
proxy_timeout = 5.0
proxy_from = ["10.0.0.0/8", "127.0.0.1"]

[[listeners]]
name = "direct"
bind = "[::1]:0"
upstream = "api"

[tls]
alpn = ["h2", "http/1.1"]
strict_sni = false
client_auth = "optional"
client_ca = "client-ca.pem"
client_crl = "client-crl.pem"
[[tls.certificates]]
cert = "site.pem"
key = "site.key"
[tls.tickets]
enabled = true

[[routes]]
sni = ["example.com", "*.example.com"]
upstream = "app"

[[routes]]
sni = "api.example.com"
alpn = "h2"
listeners = ["https"]
upstream = "api"

[upstreams.app]
servers = [
  "127.0.0.1:8080",
  { address = "[::1]:8081", weight = 2, max_conns = 100 },
  "unix:app.sock",
]
balance = "least_conn"
proxy_protocol = "v2"
proxy_tlvs = ["alpn", "authority", "ssl"]
max_attempts = 2

[upstreams.app.passive]
fail_threshold = 3
down_for = 10.0

[upstreams.app.health]
interval = 5.0
timeout = 2.0
rise = 2
fall = 3

[upstreams.api]
servers = ["127.0.0.1:8082"]
balance = "source_hash"
proxy_protocol = "v1"

[timeouts]
handshake = 10.0

[limits]
max_connections = 100

[telemetry]
otlp_endpoint = ""
"""


def fake_getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
    """No DNS here (random host names would be looked up): only "localhost" resolves."""
    if host == "localhost":
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


@pytest.fixture(autouse=True, scope="module")
def no_dns() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket, "getaddrinfo", fake_getaddrinfo)
        yield


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-config")


# --- the shape of an error line ----------------------------------------------------------------

_SEGMENT = r'(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*")'
_PATH = rf"{_SEGMENT}(?:\[\d+\])*(?:\.{_SEGMENT}(?:\[\d+\])*)*"
_FIRST = re.compile(rf"({_SEGMENT})")


def first_segment(path_and_message: str) -> str:
    m = _FIRST.match(path_and_message)
    assert m is not None
    seg = m.group(1)
    return tomllib.loads(f"k = {seg}")["k"] if seg.startswith('"') else seg


def check_error_lines(path: Path, exc: ConfigError, tree: dict[str, Any] | None) -> None:
    assert exc.errors, "a ConfigError without a line"
    prefix = f"{path}: "
    line_re = re.compile(rf"(?:TOML syntax error: .+|cannot read: .+|{_PATH}: .+)")
    for line in exc.errors:
        assert "\n" not in line and "\r" not in line, f"an error spans lines: {line!r}"
        assert line.startswith(prefix), line
        rest = line[len(prefix) :]
        assert line_re.fullmatch(rest), f"no key path in {line!r}"
        if tree is not None and not rest.startswith("TOML syntax error"):
            # the path leads into the file: its first key is one of the file's keys or a
            # section the loader requires
            first = first_segment(rest)
            assert first in tree or first in SECTIONS, f"{line!r}: {first!r} is not in the file"
    assert str(exc).splitlines() == exc.errors


def load_or_report(directory: Path, tree: dict[str, Any]) -> None:
    path = directory / "fuzz.toml"
    path.write_text(tomli_w.dumps(tree))
    try:
        load_config(path)
    except ConfigError as exc:
        check_error_lines(path, exc, tree)


# --- strategies --------------------------------------------------------------------------------

odd_keys = st.sampled_from(
    ["", " ", "a.b", 'say "hi"', "ключ", "tab\there", "[x]", "0", "-", "servers", "cert"]
)
keys = (
    st.sampled_from(
        [
            *SECTIONS,
            *("workers", "bind", "name", "upstream", "cert", "key", "servers", "alpn", "user"),
            *("routes", "sni", "listeners", "passive", "health", "fail_threshold", "rise"),
            *("accept_proxy", "proxy_from", "proxy_protocol", "proxy_tlvs", "client_auth"),
            *("client_ca", "client_crl", "address", "weight", "max_conns"),
        ]
    )
    | odd_keys
    | st.text(st.characters(max_codepoint=0xFFFF, blacklist_categories=("Cs",)), max_size=6)
)
# NUL is covered key by key below (test_nul_in_every_string_key), deterministically
text_no_nul = st.text(
    st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=24
)
scalars = (
    st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats()
    | st.booleans()
    | text_no_nul
    | st.sampled_from(
        [
            *("auto", "127.0.0.1:0", "[::1]:1", "localhost:99999", "TLSv1.3", "x" * 300),
            *("v1", "v2", "any", "none", "optional", "required", "h2", "*.example.com"),
            *("w*.example.com", "10.0.0.0/33", "unix:", "unix:" + "s" * 120, "app", "api"),
        ]
    )
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=24,
)


def paths_in(tree: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every place in a tree: table keys and array indexes."""
    yield prefix
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from paths_in(v, (*prefix, k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from paths_in(v, (*prefix, i))


VALID_TREE = tomllib.loads(VALID)
VALID_PATHS = [p for p in paths_in(VALID_TREE) if p]


def mutate(tree: dict[str, Any], where: tuple[Any, ...], how: str, value: Any, key: str) -> None:
    parent: Any = tree
    for part in where[:-1]:
        parent = parent[part]
    last = where[-1]
    if isinstance(parent, dict) != isinstance(last, str):
        raise TypeError("an earlier mutation changed this place's type")
    if how == "replace":
        parent[last] = value
    elif how == "delete":
        del parent[last]
    elif how == "add" and isinstance(parent, dict):
        parent[key] = value
    elif how == "add" and isinstance(parent, list):
        parent.append(value)
    elif how == "wrap":
        parent[last] = [parent[last], value]


mutations = st.lists(
    st.tuples(
        st.sampled_from(VALID_PATHS),
        st.sampled_from(["replace", "delete", "add", "wrap"]),
        values,
        keys,
    ),
    min_size=1,
    max_size=4,
)


# --- properties --------------------------------------------------------------------------------


def test_the_valid_base_config_loads(fuzz_dir: Path) -> None:
    """Every part of the base loads, so that mutations start from a config that works."""
    path = fuzz_dir / "valid.toml"
    path.write_text(VALID)
    config = load_config(path)
    assert config.limits.max_connections == 100
    https, direct = config.listeners
    assert https.accept_proxy == "v2" and len(https.proxy_from) == 2
    assert direct.upstream == "api"
    assert config.tls.client_auth == "optional"
    assert config.tls.client_ca == fuzz_dir / "client-ca.pem"
    assert config.tls.client_crl == fuzz_dir / "client-crl.pem"
    assert [r.upstream for r in config.routes] == ["app", "api"]
    app, api = config.upstreams["app"], config.upstreams["api"]
    assert [str(a) for a in app.servers] == [
        "127.0.0.1:8080",
        "[::1]:8081",
        f"unix:{fuzz_dir / 'app.sock'}",
    ]
    assert app.proxy_protocol == "v2" and app.max_attempts == 2
    assert app.fail_threshold == 3 and app.health is not None and app.health.rise == 2
    assert api.proxy_protocol == "v1" and api.health is None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(changes=mutations)
def test_several_mutations_load_or_name_the_key(fuzz_dir: Path, changes: list[Any]) -> None:
    tree = copy.deepcopy(VALID_TREE)
    for where, how, value, key in changes:
        try:
            mutate(tree, where, how, value, key)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed or replaced that place
    load_or_report(fuzz_dir, tree)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=st.dictionaries(keys, values, max_size=8))
def test_random_trees_with_odd_keys_name_the_key(fuzz_dir: Path, tree: dict[str, Any]) -> None:
    load_or_report(fuzz_dir, tree)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.binary(max_size=300)
    | st.text(st.characters(blacklist_categories=("Cs",)), max_size=300).map(str.encode)
)
@example(data=b"[server]\nworkers = 1\n[server]\n")  # a table defined twice
@example(data=b"a = 1\na = 2\n")  # a key defined twice
@example(data=b"\xef\xbb\xbf[server]\n")  # a UTF-8 BOM
@example(data=b"x = '''" + b"a" * 10_000)  # an unterminated multi-line string
@example(data=b"[" * 5000)  # deep nesting
def test_random_bytes_are_a_syntax_error_or_a_config_error(fuzz_dir: Path, data: bytes) -> None:
    path = fuzz_dir / "bytes.toml"
    path.write_bytes(data)
    try:
        load_config(path)
    except ConfigError as exc:
        check_error_lines(path, exc, None)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cut=st.integers(min_value=0, max_value=len(VALID)),
    junk=st.sampled_from(["", "=", "[", "]]", '"', "\\", "\n[", "= =", "\x00", "\ufeff"]),
)
def test_truncated_or_spliced_valid_text(fuzz_dir: Path, cut: int, junk: str) -> None:
    path = fuzz_dir / "spliced.toml"
    path.write_text(VALID[:cut] + junk + VALID[cut:])
    try:
        load_config(path)
    except ConfigError as exc:
        check_error_lines(path, exc, None)


# --- NUL in every string-valued key, through the loader and the TLS contexts --------------------


@pytest.fixture(scope="module")
def cert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgeterm import selfsigned

    directory = tmp_path_factory.mktemp("fuzz-certs")
    made = selfsigned.generate(directory, ("localhost",), basename="site")
    assert made.cert_path == directory / "site.pem" and made.key_path == directory / "site.key"
    pki = make_client_pki(directory)  # tls.client_ca and tls.client_crl of the base
    assert (pki.ca, pki.crl) == (directory / "client-ca.pem", directory / "client-crl.pem")
    return directory


def test_the_valid_base_config_builds_its_contexts(cert_dir: Path) -> None:
    """With its files next to it, the base passes ``check-config``'s two steps, client
    certificates and CRL included (so a NUL below is what fails, not a missing file)."""
    from edgeterm.tls import build_contexts

    path = cert_dir / "valid.toml"
    path.write_text(VALID)
    config = load_config(path)
    build_contexts(config.tls, str(path))


def load_and_build(path: Path, tree: dict[str, Any] | None = None) -> None:
    """What ``check-config`` does: load, then build the TLS contexts. Returns, or raises
    ConfigError with well-formed lines; anything else fails the test."""
    from edgeterm.tls import build_contexts

    try:
        config = load_config(path)
        build_contexts(config.tls, str(path))
    except ConfigError as exc:
        check_error_lines(path, exc, tree)


# Every key whose value is a string (or an array of strings), as (table path, key).
STRING_KEYS = [
    (("server",), "pidfile"),
    (("server",), "admin_socket"),
    (("server",), "log_file"),
    (("server",), "user"),
    (("server",), "group"),
    (("listeners", 0), "name"),
    (("listeners", 0), "bind"),
    (("listeners", 0), "upstream"),
    (("listeners", 0), "accept_proxy"),
    (("listeners", 0), "proxy_from"),
    (("tls",), "min_version"),
    (("tls",), "ciphers"),
    (("tls",), "alpn"),
    (("tls",), "client_auth"),
    (("tls",), "client_ca"),
    (("tls",), "client_crl"),
    (("tls", "certificates", 0), "cert"),
    (("tls", "certificates", 0), "key"),
    (("tls", "tickets"), "key_files"),
    (("routes", 0), "sni"),
    (("routes", 1), "alpn"),
    (("routes", 1), "listeners"),
    (("routes", 1), "upstream"),
    (("upstreams", "app"), "servers"),
    (("upstreams", "app"), "balance"),
    (("upstreams", "app"), "proxy_protocol"),
    (("upstreams", "app"), "proxy_tlvs"),
    (("telemetry",), "otlp_endpoint"),
]
LIST_KEYS = ("alpn", "key_files", "servers", "proxy_from", "proxy_tlvs", "listeners", "sni")
BUGS: dict[str, str] = {}  # keys whose NUL crashed the loader (fixed)


def _string_key_params() -> list[Any]:
    params = []
    for table, key in STRING_KEYS:
        marks = [pytest.mark.xfail(strict=True, reason=BUGS[key])] if key in BUGS else []
        ident = ".".join([*(str(p) for p in table), key])
        params.append(pytest.param(table, key, marks=marks, id=ident))
    return params


@pytest.mark.parametrize(("table", "key"), _string_key_params())
def test_nul_in_every_string_key(cert_dir: Path, table: tuple[Any, ...], key: str) -> None:
    tree = copy.deepcopy(VALID_TREE)
    target: Any = tree
    for part in table:
        target = target.setdefault(part, {}) if isinstance(part, str) else target[part]
    bad = "in\x00side"
    target[key] = [bad] if key in LIST_KEYS else bad
    path = cert_dir / "nul.toml"
    path.write_text(tomli_w.dumps(tree))
    load_and_build(path, tree)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ciphers=st.sampled_from(["intermediate", "modern", "ECDHE+AESGCM", "eNULL", "RC4", "ALL:!"])
    | text_no_nul,
    alpn=st.lists(text_no_nul, max_size=3),
    min_version=st.sampled_from(["TLSv1.2", "TLSv1.3"]),
)
def test_random_tls_strings_build_contexts_or_config_error(
    cert_dir: Path, ciphers: str, alpn: list[str], min_version: str
) -> None:
    tree = copy.deepcopy(VALID_TREE)
    tree["tls"].update(ciphers=ciphers, alpn=alpn, min_version=min_version)
    path = cert_dir / "tls.toml"
    path.write_text(tomli_w.dumps(tree))
    load_and_build(path, tree)


def test_an_unprintable_astral_key_is_named_faithfully(fuzz_dir: Path) -> None:
    tree = copy.deepcopy(VALID_TREE)
    tree["\U00018cd6"] = 1  # a private-use-plane character: not printable
    path = fuzz_dir / "astral.toml"
    path.write_text(tomli_w.dumps(tree))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    check_error_lines(path, info.value, tree)
