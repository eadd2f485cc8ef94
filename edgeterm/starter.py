"""``edgeterm init``: a commented starter config and a self-signed certificate.

The config has the layout of the shipped ``etc/edgeterm.toml``: one table per section in the
same order, ``[[listeners]]`` and ``[[tls.certificates]]`` as tables, a comment above each key
saying what it does, its unit and its default. The values come from ``starter_config`` and
are written by tomli-w (one ``key = value`` at a time), so quoting is never hand-made; the
comments come from ``LAYOUT``, which must name every key of ``starter_config`` exactly once.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from edgeterm import selfsigned

HEADER = """\
# edgeterm starter config, written by `edgeterm init`.
#
# Every key below is set to its default, except the listener's address, the upstream server
# and the certificate files, which are this machine's. Keys left out take their default; the
# shipped etc/edgeterm.toml documents every key, docs/configuration.md the rules.
# Durations are seconds, sizes bytes; relative paths are relative to this file.
# The certificate in certs/ is self-signed: clients must trust certs/ca.pem.
# Check a change with: edgeterm check-config -c <this file>
"""


@dataclass(frozen=True)
class Section:
    """One TOML table: ``path`` into the config dict (an ``int`` picks an element of an array
    of tables), the comment above its header, and each key with the comment above it."""

    path: tuple[str | int, ...]
    comment: str
    keys: tuple[tuple[str, str], ...]

    def header(self) -> str:
        names = [p for p in self.path if isinstance(p, str)]
        dotted = ".".join(names)
        return f"[[{dotted}]]" if isinstance(self.path[-1], int) else f"[{dotted}]"


LAYOUT: tuple[Section, ...] = (
    Section(
        ("server",),
        "The supervisor and its workers. To drop privileges once the ports are bound, add\n"
        'user = "..." and group = "..." (default: stay the user that starts edgeterm).',
        (
            (
                "workers",
                'Worker processes: an integer >= 1, or "auto" (one per usable CPU).\n'
                'Default: "auto".',
            ),
            ("pin_cpus", "Pin worker i to the i-th usable CPU. Default: true."),
            ("pidfile", "The supervisor's pid file. Default: run/edgeterm.pid."),
            (
                "admin_socket",
                "Unix socket that `edgeterm status`, `reload` and `stop` talk to.\n"
                "Default: run/edgeterm.sock.",
            ),
            (
                "graceful_timeout",
                "Seconds a stopping or reloaded worker may spend finishing its connections,\n"
                "> 0. Default: 30.0.",
            ),
            ("log_file", 'Log file; "" logs to stderr. Default: "".'),
            (
                "heartbeat_timeout",
                "Seconds a worker may leave the supervisor's heartbeat unanswered before it is\n"
                "replaced, and a worker waits for one before it drains. At least 2.0.\n"
                "Default: 10.0.",
            ),
        ),
    ),
    Section(
        ("listeners", 0),
        "One [[listeners]] table per listening address; at least one is required.",
        (
            ("name", 'Required, unique: letters, digits, "_", "." and "-"; used in logs, metrics.'),
            ("bind", 'Required: "host:port" or "[ipv6]:port"; "0.0.0.0:443" listens everywhere.'),
            ("upstream", "Required: the [upstreams.<name>] pool this listener forwards to."),
            ("backlog", "Accept queue length (listen backlog), 1..65535. Default: 1024."),
            (
                "tcp_fastopen",
                "TCP Fast Open queue length, 0..65535; 0 = off. Default: 0.",
            ),
            (
                "defer_accept",
                "Wake a worker only once the client has sent data: true (1 s), false, or\n"
                "seconds 0..3600. Default: false.",
            ),
            (
                "accept_proxy",
                'PROXY protocol from a balancer in front: "none", "v1", "v2" or "any".\n'
                'Default: "none".',
            ),
        ),
    ),
    Section(
        ("tls",),
        "",
        (
            ("min_version", 'Lowest TLS version: "TLSv1.2" or "TLSv1.3". Default: "TLSv1.2".'),
            (
                "ciphers",
                'TLS 1.2 cipher suites: "intermediate", "modern" or an OpenSSL cipher string.\n'
                'Default: "intermediate".',
            ),
            (
                "alpn",
                "ALPN protocols offered, in order; only what every upstream speaks.\n"
                'Default: ["http/1.1"].',
            ),
            (
                "strict_sni",
                "true: refuse a client whose SNI no certificate covers; false: give it the\n"
                "first certificate. Default: false.",
            ),
            (
                "client_auth",
                'Client certificates: "none", "optional" or "required" (then set client_ca).\n'
                'Default: "none".',
            ),
        ),
    ),
    Section(
        ("tls", "certificates", 0),
        "One [[tls.certificates]] table per certificate, chosen by the client's SNI; at least\n"
        "one is required. PEM or DER, checked at start and reload.",
        (
            ("cert", "Required: the certificate followed by its chain (leaf first)."),
            ("key", "The private key. Default: none (the key is in the cert file)."),
        ),
    ),
    Section(
        ("tls", "tickets"),
        "Session tickets: resumption without a full handshake, on any worker.",
        (
            ("enabled", "Issue session tickets. Default: true."),
            ("rotate_every", "Seconds between ticket key rotations, > 0. Default: 3600.0."),
            (
                "count",
                "TLS 1.3 tickets sent after each full handshake, 0..16. Default: 2.\n"
                "(key_files = [...] shares keys across hosts: docs/operations.md.)",
            ),
        ),
    ),
    Section(
        ("upstreams", "app"),
        "One [upstreams.<name>] table per pool of backend servers; at least one is required.",
        (
            (
                "servers",
                'Required: "host:port", "[ipv6]:port" or "unix:/path", or tables\n'
                '{ address = "...", weight = 1..256, max_conns = N } (docs/routing.md).',
            ),
            (
                "balance",
                '"round_robin", "least_conn", "two_choices" or "source_hash".\n'
                'Default: "round_robin".',
            ),
            (
                "max_attempts",
                "Connect attempts per client connection, each on another server; 0 = each\n"
                "server once. Default: 0.",
            ),
        ),
    ),
    Section(
        ("upstreams", "app", "passive"),
        "Passive health, per worker: servers whose connects keep failing are skipped a while.",
        (
            (
                "fail_threshold",
                "Failed connects in a row that mark a server down; 0 = off. Default: 3.",
            ),
            ("down_for", "Seconds a server stays down before it is tried again. Default: 10.0."),
        ),
    ),
    Section(
        ("timeouts",),
        "",
        (
            ("handshake", "Seconds for a client's TLS handshake, > 0. Default: 10.0."),
            ("connect", "Seconds to connect to an upstream server, > 0. Default: 5.0."),
            ("idle", "Seconds a connection may carry no traffic, > 0. Default: 300.0."),
        ),
    ),
    Section(
        ("limits",),
        "",
        (
            ("max_connections", "Open client connections per worker, >= 1. Default: 10000."),
            (
                "buffer_size",
                "Bytes, 4096..16777216: read buffer, and most data pending per direction.\n"
                "Default: 65536.",
            ),
            (
                "max_handshakes_per_second",
                "New handshakes per worker per second; 0 = unlimited. Default: 0.",
            ),
            (
                "max_handshakes_per_client",
                "Handshakes in progress per client address, per worker; 0 = unlimited.\n"
                "Default: 0.",
            ),
        ),
    ),
    Section(
        ("telemetry",),
        "Traces, metrics and the access log: docs/observability.md.",
        (
            (
                "otlp_endpoint",
                'OTLP collector, e.g. "http://127.0.0.1:4317"; "" exports nothing. Default: "".',
            ),
            ("sample_ratio", "Fraction of connections traced, 0.0..1.0. Default: 0.01."),
            (
                "prometheus_bind",
                '"host:port" for GET /metrics; "" serves none. Default: "".',
            ),
            ("access_log", "One JSON line per connection. Default: false."),
            ("access_log_file", 'Where the access log goes; "" is stderr. Default: "".'),
        ),
    ),
)


def starter_config(names: Sequence[str]) -> dict[str, Any]:
    return {
        "server": {
            "workers": "auto",
            "pin_cpus": True,
            "pidfile": "run/edgeterm.pid",
            "admin_socket": "run/edgeterm.sock",
            "graceful_timeout": 30.0,
            "log_file": "",
            "heartbeat_timeout": 10.0,
        },
        "listeners": [
            {
                "name": "https",
                "bind": "127.0.0.1:8443",
                "upstream": "app",
                "backlog": 1024,
                "tcp_fastopen": 0,
                "defer_accept": False,
                "accept_proxy": "none",
            }
        ],
        "tls": {
            "min_version": "TLSv1.2",
            "ciphers": "intermediate",
            "alpn": ["http/1.1"],
            "strict_sni": False,
            "client_auth": "none",
            "certificates": [{"cert": f"certs/{names[0]}.pem", "key": f"certs/{names[0]}.key"}],
            "tickets": {"enabled": True, "rotate_every": 3600.0, "count": 2},
        },
        "upstreams": {
            "app": {
                "servers": ["127.0.0.1:8080"],
                "balance": "round_robin",
                "max_attempts": 0,
                "passive": {"fail_threshold": 3, "down_for": 10.0},
            }
        },
        "timeouts": {"handshake": 10.0, "connect": 5.0, "idle": 300.0},
        "limits": {
            "max_connections": 10000,
            "buffer_size": 65536,
            "max_handshakes_per_second": 0,
            "max_handshakes_per_client": 0,
        },
        "telemetry": {
            "otlp_endpoint": "",
            "sample_ratio": 0.01,
            "prometheus_bind": "",
            "access_log": False,
            "access_log_file": "",
        },
    }


def _comment(text: str) -> list[str]:
    return [f"# {line}".rstrip() for line in text.splitlines()]


def _table(config: Mapping[str, Any], path: tuple[str | int, ...]) -> Mapping[str, Any]:
    node: Any = config
    for part in path:
        node = node[part]
    assert isinstance(node, Mapping), path
    return node


def _scalars(table: Mapping[str, Any]) -> set[str]:
    """The keys of a table that are written in it (not sub-tables or arrays of tables)."""
    return {
        k
        for k, v in table.items()
        if not isinstance(v, Mapping)
        and not (isinstance(v, list) and v and all(isinstance(e, Mapping) for e in v))
    }


def render_starter(names: Sequence[str]) -> str:
    """The commented config text; ``tomllib.loads`` of it equals ``starter_config(names)``."""
    config = starter_config(names)
    out = [HEADER.rstrip("\n")]
    for section in LAYOUT:
        table = _table(config, section.path)
        keys = [k for k, _ in section.keys]
        if set(keys) != _scalars(table) or len(keys) != len(set(keys)):
            raise AssertionError(f"LAYOUT {section.header()} does not match starter_config")
        out.append("")
        if section.comment:
            out += _comment(section.comment)
        out.append(section.header())
        for key, comment in section.keys:
            out += _comment(comment)
            out.append(tomli_w.dumps({key: table[key]}).rstrip("\n"))
    text = "\n".join(out) + "\n"
    if tomllib.loads(text) != config:  # a table of starter_config missing from LAYOUT
        raise AssertionError("the rendered starter config differs from starter_config")
    return text


def write_starter(directory: Path, names: Sequence[str] = ("localhost",)) -> list[Path]:
    """Write ``edgeterm.toml`` and ``certs/`` into ``directory``; never overwrite."""
    config_path = directory / "edgeterm.toml"
    if config_path.exists():
        raise FileExistsError(str(config_path))
    text = render_starter(names)  # before any file is written: a layout error writes nothing
    directory.mkdir(parents=True, exist_ok=True)
    generated = selfsigned.generate(directory / "certs", names, basename=names[0])
    config_path.write_text(text)
    return [config_path, generated.cert_path, generated.key_path, generated.ca_cert_path]
