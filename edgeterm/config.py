"""The validated configuration: frozen dataclasses, one per TOML table.

These types are the contract between the loader (``edgeterm.config_loader``), the supervisor
and the workers. Every value here has already been checked; code that receives a ``Config``
never re-validates. Durations are seconds (float); paths are absolute (relative paths in the
file resolve against the config file's directory).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

TlsVersionName = Literal["TLSv1.2", "TLSv1.3"]
BalanceMode = Literal["round_robin"]


@dataclass(frozen=True, slots=True)
class Address:
    """A TCP endpoint. ``host`` is a numeric IP address (names are resolved at load)."""

    host: str
    port: int
    family: socket.AddressFamily

    def sockaddr(self) -> tuple[str, int]:
        return (self.host, self.port)

    def __str__(self) -> str:
        if self.family == socket.AF_INET6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    workers: int | Literal["auto"] = "auto"
    pin_cpus: bool = True
    pidfile: Path = Path("run/edgeterm.pid")
    admin_socket: Path = Path("run/edgeterm.sock")
    graceful_timeout: float = 30.0
    log_file: Path | None = None  # None: stderr
    user: str | None = None
    group: str | None = None
    heartbeat_timeout: float = 10.0  # a worker silent this long is replaced

    def worker_count(self) -> int:
        """The number of workers to run: an explicit count, or one per usable CPU."""
        if self.workers == "auto":
            return max(1, len(os.sched_getaffinity(0)))
        return self.workers


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    name: str
    bind: Address
    upstream: str
    backlog: int = 1024


@dataclass(frozen=True, slots=True)
class CertificateConfig:
    cert: Path
    key: Path | None = None  # None: the key is in the cert file


@dataclass(frozen=True, slots=True)
class TicketsConfig:
    enabled: bool = True
    rotate_every: float = 3600.0
    key_files: tuple[Path, ...] = ()
    count: int = 2  # TLS 1.3 tickets sent per full handshake


@dataclass(frozen=True, slots=True)
class TlsConfig:
    certificates: tuple[CertificateConfig, ...]
    min_version: TlsVersionName = "TLSv1.2"
    ciphers: str = "intermediate"
    alpn: tuple[str, ...] = ("http/1.1",)
    tickets: TicketsConfig = field(default_factory=TicketsConfig)


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    name: str
    servers: tuple[Address, ...]
    balance: BalanceMode = "round_robin"


@dataclass(frozen=True, slots=True)
class TimeoutsConfig:
    handshake: float = 10.0
    connect: float = 5.0
    idle: float = 300.0


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_connections: int = 10000  # per worker
    buffer_size: int = 65536  # bytes: per-worker scratch buffer and per-direction pending cap
    max_handshakes_per_second: int = 0  # per worker; 0 = unlimited; excess waits in the backlog
    max_handshakes_per_client: int = 0  # concurrent, per client address; 0 = unlimited


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    otlp_endpoint: str = ""
    sample_ratio: float = 0.01


@dataclass(frozen=True, slots=True)
class Config:
    path: Path  # the config file, absolute
    listeners: tuple[ListenerConfig, ...]
    tls: TlsConfig
    upstreams: Mapping[str, UpstreamConfig]
    server: ServerConfig = field(default_factory=ServerConfig)
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
