"""``edgeterm init``: a starter config (written with tomli-w) and a self-signed certificate."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tomli_w

from edgeterm import selfsigned

HEADER = """\
# edgeterm starter config, written by `edgeterm init`.
# Every key is documented, with its default and unit, in the shipped etc/edgeterm.toml and
# docs/configuration.md. Durations are seconds; relative paths are relative to this file.
# The certificate in certs/ is self-signed: clients must trust certs/ca.pem.

"""


def starter_config(names: Sequence[str]) -> dict[str, Any]:
    return {
        "server": {
            "workers": "auto",
            "pin_cpus": True,
            "pidfile": "run/edgeterm.pid",
            "admin_socket": "run/edgeterm.sock",
            "graceful_timeout": 30.0,
            "log_file": "",
        },
        "listeners": [
            {"name": "https", "bind": "127.0.0.1:8443", "backlog": 1024, "upstream": "app"}
        ],
        "tls": {
            "min_version": "TLSv1.2",
            "ciphers": "intermediate",
            "alpn": ["http/1.1"],
            "certificates": [{"cert": f"certs/{names[0]}.pem", "key": f"certs/{names[0]}.key"}],
            "tickets": {"enabled": True, "rotate_every": 3600.0},
        },
        "upstreams": {"app": {"servers": ["127.0.0.1:8080"], "balance": "round_robin"}},
        "timeouts": {"handshake": 10.0, "connect": 5.0, "idle": 300.0},
        "limits": {"max_connections": 10000},
        "telemetry": {"otlp_endpoint": "", "sample_ratio": 0.01},
    }


def write_starter(directory: Path, names: Sequence[str] = ("localhost",)) -> list[Path]:
    """Write ``edgeterm.toml`` and ``certs/`` into ``directory``; never overwrite."""
    config_path = directory / "edgeterm.toml"
    if config_path.exists():
        raise FileExistsError(str(config_path))
    directory.mkdir(parents=True, exist_ok=True)
    generated = selfsigned.generate(directory / "certs", names, basename=names[0])
    config_path.write_text(HEADER + tomli_w.dumps(starter_config(names)))
    return [config_path, generated.cert_path, generated.key_path, generated.ca_cert_path]
