"""Which pool a connection goes to: routes by SNI (and ALPN), per listener (docs/routing.md).

Pure (no sockets, no TLS). The certificate is chosen during the ClientHello (the SNI callback,
``edgeterm.tls``); the pool after the handshake, when the negotiated ALPN is known too:

    router.select(listener_index, sni, alpn) -> pool

Built once per generation, so a connection costs at most four dict lookups: exact name with
the ALPN, exact name (a route without ``alpn``), wildcard with the ALPN, wildcard; then the
listener's default pool. Names compare lowercased without a trailing dot, and a wildcard
``*.example.com`` covers exactly one more label (``a.example.com``, not ``example.com`` nor
``a.b.example.com``), as for certificates. A route restricted to some listeners (``listeners``)
wins over a route for every listener with the same name and ALPN.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from typing import Generic, TypeVar

from edgeterm.config import Config, ListenerConfig, RouteConfig
from edgeterm.errors import ConfigError
from edgeterm.proxyproto import Accept
from edgeterm.tls import TlsContexts

P = TypeVar("P")

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class _Table(Generic[P]):
    __slots__ = ("default", "exact", "wild")

    def __init__(self, default: P) -> None:
        self.default = default
        # name -> {alpn or None: pool}; wildcard names are stored without "*."
        self.exact: dict[str, dict[str | None, P]] = {}
        self.wild: dict[str, dict[str | None, P]] = {}

    def add(self, name: str, alpn: str | None, pool: P) -> None:
        if name.startswith("*."):
            self.wild.setdefault(name[2:], {})[alpn] = pool
        else:
            self.exact.setdefault(name, {})[alpn] = pool


def _pick(by_alpn: dict[str | None, P], alpn: str | None) -> P | None:
    if alpn is not None:
        pool = by_alpn.get(alpn)
        if pool is not None:
            return pool
    return by_alpn.get(None)


class Router(Generic[P]):
    """The route table of one generation: listener index, SNI, ALPN -> pool."""

    __slots__ = ("_tables", "uses_alpn")

    def __init__(
        self,
        listeners: Sequence[ListenerConfig],
        routes: Sequence[RouteConfig],
        pools: Mapping[str, P],
    ) -> None:
        index = {lst.name: i for i, lst in enumerate(listeners)}
        self._tables: list[_Table[P]] = [_Table(pools[lst.upstream]) for lst in listeners]
        # Every-listener routes first, so that listener-specific ones overwrite them.
        ordered = [r for r in routes if not r.listeners] + [r for r in routes if r.listeners]
        for route in ordered:
            pool = pools[route.upstream]
            scope = [index[n] for n in route.listeners] if route.listeners else range(len(index))
            for i in scope:
                for name in route.sni:
                    self._tables[i].add(name, route.alpn, pool)
        #: whether any route names an ALPN (else the caller may pass alpn=None and save a call)
        self.uses_alpn = any(r.alpn is not None for r in routes)

    def select(self, listener: int, sni: str | None, alpn: str | None) -> P:
        t = self._tables[listener]
        if sni is None or not (t.exact or t.wild):
            return t.default
        by_alpn = t.exact.get(sni)
        if by_alpn is None:
            name = sni.lower()
            if name.endswith("."):
                name = name[:-1]
            if name != sni:
                by_alpn = t.exact.get(name)
        else:
            name = sni
        if by_alpn is not None:
            pool = _pick(by_alpn, alpn)
            if pool is not None:
                return pool
        dot = name.find(".")
        if dot > 0 and t.wild:
            by_alpn = t.wild.get(name[dot + 1 :])
            if by_alpn is not None:
                pool = _pick(by_alpn, alpn)
                if pool is not None:
                    return pool
        return t.default


class Entry(Generic[P]):
    """How connections arrive on one listener: its index (for the router), its default pool,
    and the PROXY protocol it expects from a balancer in front."""

    __slots__ = ("accept", "default", "index", "name", "networks", "proxy_timeout")

    def __init__(self, index: int, cfg: ListenerConfig, default: P) -> None:
        self.index = index
        self.name = cfg.name
        self.default = default
        self.accept: Accept | None = None if cfg.accept_proxy == "none" else cfg.accept_proxy
        self.proxy_timeout = cfg.proxy_timeout
        self.networks: tuple[IpNetwork, ...] = tuple(
            ipaddress.ip_network(n) for n in cfg.proxy_from
        )

    def trusted(self, host: str) -> bool:
        """Whether ``host`` may connect (``proxy_from``; an empty list trusts everyone).
        Called at accept only when the list is not empty."""
        try:
            ip = ipaddress.ip_address(host.partition("%")[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.networks)


def check_routes(config: Config, contexts: TlsContexts, config_file: str) -> list[str]:
    """Route names no certificate covers: warnings; with ``tls.strict_sni`` such a route can
    never match (the handshake is refused), so they are a ``ConfigError``."""
    problems = []
    file = config_file
    strict = config.tls.strict_sni
    for i, route in enumerate(config.routes):
        for name in route.sni:
            probe = "x" + name[1:] if name.startswith("*.") else name  # a name the wildcard covers
            if contexts.match(probe) is None:
                if strict:
                    why = "tls.strict_sni refuses it, so the route can never match"
                else:
                    why = "clients asking for it get the default certificate"
                problems.append(f"{file}: routes[{i}].sni: no certificate covers {name}: {why}")
    if strict and problems:
        raise ConfigError(problems)
    return problems
