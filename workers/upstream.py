"""Upstream pools as a worker runs them: servers, their balancer, and the PROXY header.

Pure (no sockets): a ``Pool`` wraps one ``[upstreams.<name>]`` of the generation's config with
this worker's ``Balancer`` (``edgeterm.workers.balance``: modes, weights, caps, passive
health, the active health state pushed by the supervisor). The connection asks
``balancer.pick(client_ip, tried)`` for each attempt; ``max_attempts`` bounds the attempts.

``proxy_header`` builds the PROXY protocol header a pool asks for, once per upstream
connection, from what the connection knows (client and destination addresses, SNI, the
client certificate's CN) and what the TLS object says (ALPN, version, cipher, resumption).
"""

from __future__ import annotations

from typing import Any

from edgeterm.config import Address, Config, UpstreamConfig
from edgeterm.proxyproto import Tlv, encode_v1, encode_v2, tlv_alpn, tlv_authority, tlv_ssl

from .balance import Balancer, Server

PROXY_NONE = 0
PROXY_V1 = 1
PROXY_V2 = 2
_PROXY_VERSIONS = {"none": PROXY_NONE, "v1": PROXY_V1, "v2": PROXY_V2}


def worker_share(max_conns: int, workers: int) -> int:
    """One worker's cap on a server's open connections: ``floor(max_conns / workers)``, but at
    least 1; 0 (no cap) stays 0.

    The workers do not share a counter (an atomic operation on the hot path), so each enforces
    its share. Rounding down keeps the total, ``workers * share``, at or under ``max_conns``
    (at most ``workers - 1`` under it). The one exception is ``max_conns < workers``: every
    worker still allows 1 connection, so the total is ``workers``; ``max_conns_warnings`` says
    so at check-config and start. docs/routing.md, "Caps"."""
    if max_conns <= 0:
        return 0
    return max(1, max_conns // max(1, workers))


def max_conns_warnings(config: Config, workers: int, file: str) -> list[str]:
    """A warning per server whose ``max_conns`` is fewer than ``workers``: the total it can
    get is then ``workers``, not ``max_conns``."""
    warnings = []
    for name, pool in config.upstreams.items():
        for i, address in enumerate(pool.servers):
            cap = pool.cap(i)
            if 0 < cap < workers:
                warnings.append(
                    f"{file}: upstreams.{name}.servers[{i}].max_conns: {cap} is fewer than the "
                    f"{workers} workers, and each worker allows at least 1 connection: up to "
                    f"{workers} can be open to {address} (set max_conns >= {workers}, or fewer "
                    "workers)"
                )
    return warnings


class Pool:
    __slots__ = (
        "balancer",
        "index",
        "keys",
        "max_attempts",
        "name",
        "proxy",
        "servers",
        "size",
        "tlv_alpn",
        "tlv_authority",
        "tlv_ssl",
    )

    def __init__(self, cfg: UpstreamConfig, *, workers: int = 1) -> None:
        """``workers``: how many workers share the pool's ``max_conns`` (each gets
        ``worker_share(max_conns, workers)``)."""
        self.name = cfg.name
        self.servers: tuple[Address, ...] = cfg.servers
        self.size = len(cfg.servers)
        self.keys: tuple[str, ...] = tuple(str(a) for a in cfg.servers)
        self.index = {key: i for i, key in enumerate(self.keys)}
        self.balancer = Balancer(
            [
                Server(key, cfg.weight(i), worker_share(cfg.cap(i), workers))
                for i, key in enumerate(self.keys)
            ],
            cfg.balance,
            fail_threshold=cfg.fail_threshold,
            down_for=cfg.down_for,
        )
        self.max_attempts = cfg.max_attempts or self.size
        self.proxy = _PROXY_VERSIONS[cfg.proxy_protocol]
        v2 = self.proxy == PROXY_V2
        self.tlv_alpn = v2 and "alpn" in cfg.proxy_tlvs
        self.tlv_authority = v2 and "authority" in cfg.proxy_tlvs
        self.tlv_ssl = v2 and "ssl" in cfg.proxy_tlvs

    def set_state(self, key: str, up: bool) -> bool:
        """Active health: the supervisor says server ``key`` is up or down. False if this
        pool has no such server (a message meant for another generation's pool)."""
        i = self.index.get(key)
        if i is None:
            return False
        self.balancer.set_state(i, up)
        return True

    def proxy_header(
        self,
        src: tuple[str, int] | None,
        dst: tuple[str, int] | None,
        so: Any,
        sni: str | None,
        cert: bool,
        cn: str | None,
    ) -> bytes:
        """The PROXY header for one upstream connection (``self.proxy`` is not PROXY_NONE).

        ``src``: the client (from accept or the balancer's PROXY header); ``dst``: the address
        it connected to; ``so``: the client's TLS object; ``cert``/``cn``: whether a client
        certificate was presented (and so verified) and its subject CN.
        """
        try:
            if self.proxy == PROXY_V1:
                return encode_v1(src, dst)
            tlvs: list[Tlv] = []
            if self.tlv_alpn:
                alpn = so.selected_alpn_protocol()
                if alpn:
                    tlvs.append(tlv_alpn(alpn.encode("ascii")))
            if self.tlv_authority and sni:
                tlvs.append(tlv_authority(sni))
            if self.tlv_ssl:
                cipher = so.cipher()
                tlvs.append(
                    tlv_ssl(
                        so.version(),
                        cipher[0] if cipher else None,
                        cert,
                        cert,
                        cn,
                        resumed=bool(so.session_reused),
                    )
                )
            return encode_v2(src, dst, tlvs=tlvs)
        except ValueError:  # not IP addresses (cannot happen with TCP listeners): say nothing
            return encode_v1(None, None) if self.proxy == PROXY_V1 else encode_v2(None, None)
