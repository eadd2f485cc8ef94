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

from edgeterm.health import HealthSettings

TlsVersionName = Literal["TLSv1.2", "TLSv1.3"]
BalanceMode = Literal["round_robin", "least_conn", "two_choices", "source_hash"]
AcceptProxy = Literal["none", "v1", "v2", "any"]
ProxyProtocol = Literal["none", "v1", "v2"]
ProxyTlv = Literal["alpn", "authority", "ssl"]
ClientAuth = Literal["none", "optional", "required"]


@dataclass(frozen=True, slots=True)
class Address:
    """A TCP endpoint. ``host`` is a numeric IP address (names are resolved at load).

    Upstream servers may also be Unix stream sockets: ``family`` AF_UNIX, ``host`` the
    absolute path, ``port`` 0; written ``unix:/path``.
    """

    host: str
    port: int
    family: socket.AddressFamily

    def sockaddr(self) -> tuple[str, int] | str:
        if self.family == socket.AF_UNIX:
            return self.host
        return (self.host, self.port)

    def __str__(self) -> str:
        if self.family == socket.AF_INET6:
            return f"[{self.host}]:{self.port}"
        if self.family == socket.AF_UNIX:
            return f"unix:{self.host}"
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
    tcp_fastopen: int = 0  # TCP_FASTOPEN queue length; 0 = off
    defer_accept: int = 0  # TCP_DEFER_ACCEPT seconds; 0 = off
    # PROXY protocol from an L4 balancer in front (docs/routing.md)
    accept_proxy: AcceptProxy = "none"
    proxy_timeout: float = 5.0  # seconds to receive the whole PROXY header
    proxy_from: tuple[str, ...] = ()  # CIDRs allowed to connect; () = any source


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
    # routing and client certificates (docs/routing.md)
    strict_sni: bool = False  # refuse a ClientHello whose SNI no certificate covers
    client_auth: ClientAuth = "none"
    client_ca: Path | None = None  # required unless client_auth is "none"
    client_crl: Path | None = None  # None: no revocation check


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    name: str
    servers: tuple[Address, ...]
    balance: BalanceMode = "round_robin"
    # per server, in the order of ``servers``; () = all 1 / all 0 (docs/routing.md)
    weights: tuple[int, ...] = ()
    max_conns: tuple[int, ...] = ()  # the server's total cap over all workers; 0 = none
    proxy_protocol: ProxyProtocol = "none"
    proxy_tlvs: tuple[ProxyTlv, ...] = ("alpn", "authority", "ssl")  # v2 only
    max_attempts: int = 0  # connect attempts per client connection; 0 = each server once
    fail_threshold: int = 3  # passive health: consecutive connect failures -> down; 0 = off
    down_for: float = 10.0  # passive health: seconds down
    health: HealthSettings | None = None  # active checks (run by the supervisor); None = off

    def weight(self, i: int) -> int:
        return self.weights[i] if self.weights else 1

    def cap(self, i: int) -> int:
        return self.max_conns[i] if self.max_conns else 0


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """``[[routes]]``: connections whose SNI (and ALPN, if set) match go to ``upstream``."""

    sni: tuple[str, ...]  # lowercased exact names or "*.base" wildcards
    upstream: str
    alpn: str | None = None
    listeners: tuple[str, ...] = ()  # () = every listener


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
    """``[telemetry]``; what each key does is in docs/observability.md."""

    otlp_endpoint: str = ""  # "": no OTLP export; the rule for gRPC vs HTTP: edgeterm.telemetry
    sample_ratio: float = 0.01
    service_name: str = "edgeterm"
    headers: tuple[tuple[str, str], ...] = ()  # sent with every OTLP export (names lowercased)
    export_interval: float = 10.0  # seconds between metric exports and span batches
    prometheus_bind: Address | None = None  # None: no Prometheus endpoint
    access_log: bool = False
    access_log_file: Path | None = None  # None: stderr


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
    routes: tuple[RouteConfig, ...] = ()
