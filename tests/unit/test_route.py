"""The pure router: SNI (exact, wildcard), ALPN, listener scope, defaults; and the listener
entry's proxy_from screen."""

import socket

import pytest
from edgeterm.workers.route import Entry, Router

from edgeterm.config import Address, ListenerConfig, RouteConfig


def _listener(name, upstream="default", **kw):
    return ListenerConfig(name, Address("127.0.0.1", 0, socket.AF_INET), upstream, **kw)


POOLS = {n: n for n in ("default", "other", "web", "api", "api_h2", "exact", "wild", "pub")}


@pytest.fixture
def router():
    routes = [
        RouteConfig(("*.example.com",), "wild"),
        RouteConfig(("example.com", "www.example.com"), "web"),
        RouteConfig(("api.example.com",), "api_h2", alpn="h2"),
        RouteConfig(("api.example.com",), "api"),
        RouteConfig(("*.h2only.test",), "api_h2", alpn="h2"),
        RouteConfig(("pub.example.com",), "pub", listeners=("public",)),
        RouteConfig(("www.example.com",), "pub", listeners=("public",)),
    ]
    return Router([_listener("public"), _listener("admin", "other")], routes, POOLS)


@pytest.mark.parametrize(
    ("listener", "sni", "alpn", "pool"),
    [
        (0, "example.com", None, "web"),
        (0, "EXAMPLE.com.", "http/1.1", "web"),  # case and the trailing dot do not matter
        (0, "a.example.com", None, "wild"),
        (0, "a.b.example.com", None, "default"),  # the wildcard covers one label only
        (0, "api.example.com", "h2", "api_h2"),
        (0, "api.example.com", "http/1.1", "api"),
        (0, "api.example.com", None, "api"),
        (0, "x.h2only.test", "h2", "api_h2"),
        (0, "x.h2only.test", "http/1.1", "default"),  # no route without ALPN: the default
        (0, "pub.example.com", None, "pub"),
        (1, "pub.example.com", None, "wild"),  # that route is only on "public"
        (0, "www.example.com", None, "pub"),  # the listener's own route wins
        (1, "www.example.com", None, "web"),
        (0, "unknown.test", None, "default"),
        (1, "unknown.test", None, "other"),
        (0, None, "h2", "default"),
        (1, None, None, "other"),
    ],
)
def test_select(router, listener, sni, alpn, pool):
    assert router.select(listener, sni, alpn) == pool


def test_uses_alpn_only_when_a_route_names_one():
    plain = Router([_listener("a")], [RouteConfig(("x.test",), "web")], POOLS)
    assert not plain.uses_alpn
    assert plain.select(0, "x.test", None) == "web"
    alpn = Router([_listener("a")], [RouteConfig(("x.test",), "web", alpn="h2")], POOLS)
    assert alpn.uses_alpn


def test_no_routes_always_default():
    r = Router([_listener("a", "web")], [], POOLS)
    assert r.select(0, "anything.test", "h2") == "web"


def test_entry_proxy_settings_and_screen():
    e = Entry(0, _listener("p", accept_proxy="v2", proxy_timeout=2.5), "default")
    assert (e.accept, e.proxy_timeout, e.networks) == ("v2", 2.5, ())
    assert Entry(0, _listener("p"), "default").accept is None
    screened = Entry(0, _listener("p", proxy_from=("10.0.0.0/8", "2001:db8::/32")), "default")
    assert screened.trusted("10.1.2.3")
    assert screened.trusted("::ffff:10.1.2.3")  # an IPv4 client on a dual-stack socket
    assert screened.trusted("2001:db8::5")
    assert not screened.trusted("192.0.2.1")
    assert not screened.trusted("2001:db9::5")
    assert not screened.trusted("not an address")
