"""edgeterm configs for the tests, written as TOML with ``tomli_w``."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import tomli_w

from .certs import CertSet


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with ``override`` merged in (tables merge; other values replace)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def base_config(
    certs: CertSet,
    upstream_servers: list[str],
    *,
    cert_dir: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One worker, one listener ``https`` on 127.0.0.1:<ephemeral> forwarding to pool ``app``.

    ``cert_dir``: write certificate paths relative to the config file (e.g. ``"certs"``, the
    caller makes that directory); default: absolute paths.
    """
    entries = certs.config_entries()
    if cert_dir is not None:
        entries = [
            {
                "cert": f"{cert_dir}/{Path(e['cert']).name}",
                "key": f"{cert_dir}/{Path(e['key']).name}",
            }
            for e in entries
        ]
    cfg: dict[str, Any] = {
        # one worker: limits are per worker; a short drain keeps teardown quick
        "server": {"workers": 1, "graceful_timeout": 5.0},
        "listeners": [
            {"name": "https", "bind": "127.0.0.1:0", "upstream": "app", "backlog": 1024},
        ],
        "tls": {
            "min_version": "TLSv1.2",
            "ciphers": "intermediate",
            "alpn": ["http/1.1"],
            "certificates": entries,
            "tickets": {"enabled": True},
        },
        "upstreams": {"app": {"servers": list(upstream_servers)}},
        "timeouts": {"handshake": 10.0, "connect": 5.0, "idle": 300.0},
        "limits": {"max_connections": 10000},
    }
    return deep_merge(cfg, overrides or {})


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tomli_w.dumps(cfg).encode())
    return path
