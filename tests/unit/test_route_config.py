"""The config keys of issue 7 (docs/routing.md): routes, pools, health, PROXY protocol, client
certificates; values, defaults, and one error line per problem with its key path."""

from __future__ import annotations

import socket
import textwrap
from pathlib import Path

import pytest

from edgeterm.config_loader import load_config
from edgeterm.errors import ConfigError
from edgeterm.health import HealthSettings

FULL = """
[[listeners]]
name = "public"
bind = "127.0.0.1:0"
upstream = "web"
accept_proxy = "v2"
proxy_timeout = 2.5
proxy_from = ["10.0.0.0/8", "::1", "192.168.1.7/24"]

[[listeners]]
name = "admin"
bind = "127.0.0.1:1"
upstream = "api"

[tls]
alpn = ["h2", "http/1.1"]
strict_sni = true
client_auth = "optional"
client_ca = "ca.pem"
client_crl = "crl.pem"
[[tls.certificates]]
cert = "c.pem"

[[routes]]
sni = ["*.Example.com", "example.com."]
upstream = "web"

[[routes]]
sni = "api.example.com"
alpn = "h2"
upstream = "api"
listeners = ["public"]

[upstreams.web]
servers = [
  { address = "127.0.0.1:8080", weight = 2, max_conns = 100 },
  "[::1]:80",
  "unix:run/web.sock",
  { address = "unix:/abs/web.sock" },
]
balance = "least_conn"
proxy_protocol = "v2"
proxy_tlvs = ["ssl", "alpn"]
max_attempts = 2
[upstreams.web.passive]
fail_threshold = 0
down_for = 1.5
[upstreams.web.health]
interval = 1
rise = 4

[upstreams.api]
servers = ["127.0.0.1:9"]
"""


def write(directory: Path, text: str) -> Path:
    path = directory / "edgeterm.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_every_new_key(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL))
    public, admin = config.listeners
    assert (public.accept_proxy, public.proxy_timeout) == ("v2", 2.5)
    assert public.proxy_from == ("10.0.0.0/8", "::1/128", "192.168.1.0/24")
    assert (admin.accept_proxy, admin.proxy_timeout, admin.proxy_from) == ("none", 5.0, ())
    tls = config.tls
    assert (tls.strict_sni, tls.client_auth) == (True, "optional")
    assert (tls.client_ca, tls.client_crl) == (tmp_path / "ca.pem", tmp_path / "crl.pem")
    r0, r1 = config.routes
    assert (r0.sni, r0.upstream, r0.alpn, r0.listeners) == (
        ("*.example.com", "example.com"),
        "web",
        None,
        (),
    )
    assert (r1.sni, r1.alpn, r1.listeners) == (("api.example.com",), "h2", ("public",))
    web = config.upstreams["web"]
    assert [str(a) for a in web.servers] == [
        "127.0.0.1:8080",
        "[::1]:80",
        f"unix:{tmp_path}/run/web.sock",
        "unix:/abs/web.sock",
    ]
    assert web.servers[2].family == socket.AF_UNIX and web.servers[2].port == 0
    assert (web.weights, web.max_conns) == ((2, 1, 1, 1), (100, 0, 0, 0))
    assert (web.balance, web.proxy_protocol, web.proxy_tlvs) == (
        "least_conn",
        "v2",
        ("ssl", "alpn"),
    )
    assert (web.max_attempts, web.fail_threshold, web.down_for) == (2, 0, 1.5)
    assert web.health == HealthSettings(interval=1.0, timeout=2.0, rise=4, fall=3)
    api = config.upstreams["api"]
    assert (api.balance, api.proxy_protocol, api.health, api.fail_threshold) == (
        "round_robin",
        "none",
        None,
        3,
    )
    assert (api.weight(0), api.cap(0)) == (1, 0)


BROKEN = """
[[listeners]]
name = "public"
bind = "127.0.0.1:0"
upstream = "web"
accept_proxy = "v3"
proxy_timeout = 0
proxy_from = ["10.0.0.0/33"]

[tls]
client_auth = "required"
strict_sni = "yes"
[[tls.certificates]]
cert = "c.pem"

[[routes]]
sni = ["w*.example.com", "x..y"]
upstream = "nope"
alpn = "h2"
listeners = ["zz"]

[[routes]]
sni = "a.com"
upstream = "web"

[[routes]]
sni = "A.com."
upstream = "web"
colour = "red"

[[routes]]
upstream = "web"

[upstreams.web]
servers = [{ adress = "127.0.0.1:8080", weight = 0 }, "unix:", 5]
proxy_tlvs = ["ssl", "tlv"]
balance = "random"
[upstreams.web.passive]
fail_threshold = -1
[upstreams.web.health]
rise = 0
foo = 1

[upstreams.dup]
servers = ["127.0.0.1:1", "127.0.0.1:1"]
proxy_protocol = "v3"
"""


def test_every_problem_is_reported_with_its_key_path(tmp_path: Path) -> None:
    path = write(tmp_path, BROKEN)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    got = [line.removeprefix(f"{path}: ") for line in info.value.errors]
    want = [
        'listeners[0].accept_proxy: expected one of "none", "v1", "v2", "any", got "v3"',
        "listeners[0].proxy_timeout: must be > 0, got integer 0",
        'listeners[0].proxy_from[0]: expected an IP network such as 10.0.0.0/8, got "10.0.0.0/33"',
        "tls.strict_sni: expected a boolean (true or false), got string",
        'tls.client_ca: required with client_auth = "required"',
        "upstreams.dup.proxy_protocol: expected one of",
        "upstreams.dup.servers[1]: 127.0.0.1:1 is listed twice (also servers[0])",
        'upstreams.web.servers[0].adress: unknown key (did you mean "address"?)',
        "upstreams.web.servers[0].address: missing required key",
        "upstreams.web.servers[0].weight: must be between 1 and 256, got integer 0",
        'upstreams.web.servers[1]: expected unix:/path/to/socket, got "unix:"',
        "upstreams.web.servers[2]: expected an address string or a table",
        'upstreams.web.balance: expected one of "round_robin", "least_conn", "two_choices", '
        '"source_hash", got "random"',
        "upstreams.web.proxy_tlvs[1]: expected one of",
        'upstreams.web.proxy_tlvs: TLVs exist only in PROXY v2: set proxy_protocol = "v2"',
        "upstreams.web.passive.fail_threshold: must be between 0 and 1000, got integer -1",
        "upstreams.web.health.rise: must be between 1 and 100, got integer 0",
        "upstreams.web.health.foo: unknown key",
        'routes[0].sni[0]: invalid name "w*.example.com": a wildcard is a whole first label',
        'routes[0].sni[1]: invalid host name "x..y"',
        'routes[0].upstream: no pool named "nope" in [upstreams] (known: dup, web)',
        'routes[0].alpn: "h2" is not in tls.alpn',
        'routes[0].listeners[0]: no listener named "zz" (known: public)',
        "routes[2].colour: unknown key",
        "routes[2].sni: a.com on every listener is already routed by routes[1]",
        "routes[3].sni: missing required key",
    ]
    assert len(got) == len(want), "\n".join(got)
    for line, expected in zip(sorted(got), sorted(want), strict=True):
        assert line.startswith(expected), (line, expected)


def test_routes_on_other_listeners_or_alpn_are_not_duplicates(tmp_path: Path) -> None:
    text = FULL + textwrap.dedent(
        """
        [[routes]]
        sni = "api.example.com"
        upstream = "web"

        [[routes]]
        sni = "api.example.com"
        upstream = "web"
        listeners = ["admin"]
        """
    )
    config = load_config(write(tmp_path, text))
    assert len(config.routes) == 4
