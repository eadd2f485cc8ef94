"""The worker's view of a pool: balancer wiring, caps shared by workers, health by key, and
the PROXY header each pool asks for."""

import socket
from collections import Counter

from edgeterm.workers.upstream import Pool

from edgeterm.config import Address, UpstreamConfig
from edgeterm.proxyproto import ProxyHeaderParser


def _addrs(n):
    return tuple(Address("127.0.0.1", 9000 + i, socket.AF_INET) for i in range(n))


def _pool(n=3, **kw):
    return Pool(UpstreamConfig(name="app", servers=_addrs(n), **kw))


def test_round_robin_spreads_evenly_and_retries_each_server_once():
    pool = _pool(3)
    bal = pool.balancer
    counts = Counter(pool.keys[bal.pick()] for _ in range(300))
    assert counts == {"127.0.0.1:9000": 100, "127.0.0.1:9001": 100, "127.0.0.1:9002": 100}
    tried = set()
    for _ in range(pool.max_attempts):
        i = bal.pick(None, tried)
        assert i is not None and i not in tried
        tried.add(i)
    assert bal.pick(None, tried) is None and bal.why_none(tried) == "tried"


def test_weights_caps_and_attempts_come_from_the_config():
    pool = _pool(3, weights=(3, 1, 1), max_conns=(10, 0, 3), max_attempts=2)
    assert pool.balancer.weights == (3, 1, 1)
    assert pool.balancer.caps == (10, 0, 3)
    assert pool.max_attempts == 2
    # four workers share the caps: each gets floor(cap / 4), at least 1 (docs/routing.md)
    shared = Pool(UpstreamConfig(name="app", servers=_addrs(3), max_conns=(10, 0, 3)), workers=4)
    assert shared.balancer.caps == (2, 0, 1)


def test_unix_and_ipv6_servers_are_keyed_as_written():
    servers = (
        Address("::1", 8080, socket.AF_INET6),
        Address("/run/app.sock", 0, socket.AF_UNIX),
    )
    pool = Pool(UpstreamConfig(name="app", servers=servers))
    assert pool.keys == ("[::1]:8080", "unix:/run/app.sock")
    assert servers[1].sockaddr() == "/run/app.sock"


def test_set_state_by_key():
    pool = _pool(2)
    assert pool.set_state("127.0.0.1:9001", False)
    assert not pool.set_state("127.0.0.1:9999", False)  # another generation's server
    assert {pool.balancer.pick() for _ in range(10)} == {0}
    pool.set_state("127.0.0.1:9000", False)
    assert pool.balancer.pick() is None and pool.balancer.why_none() == "down"


class FakeTls:
    def selected_alpn_protocol(self):
        return "h2"

    def cipher(self):
        return ("TLS_AES_128_GCM_SHA256", "TLSv1.3", 128)

    def version(self):
        return "TLSv1.3"

    session_reused = False


def _parse(header):
    p = ProxyHeaderParser()
    result = p.feed(header)
    assert result is not None and result.consumed == len(header)
    return result


def test_proxy_header_v1():
    pool = _pool(1, proxy_protocol="v1")
    h = pool.proxy_header(("10.1.2.3", 4567), ("10.0.0.1", 443), FakeTls(), "a.example", True, "x")
    assert h == b"PROXY TCP4 10.1.2.3 10.0.0.1 4567 443\r\n"


def test_proxy_header_v2_with_every_tlv():
    pool = _pool(1, proxy_protocol="v2")
    h = pool.proxy_header(
        ("2001:db8::1", 1), ("2001:db8::2", 443), FakeTls(), "a.example", True, "cn"
    )
    r = _parse(h)
    assert (r.src, r.dst) == (("2001:db8::1", 1), ("2001:db8::2", 443))
    assert r.alpn == b"h2" and r.authority == "a.example"
    ssl = r.ssl
    assert ssl is not None and ssl.cert_verified and ssl.cn == "cn"
    assert (ssl.version, ssl.cipher) == ("TLSv1.3", "TLS_AES_128_GCM_SHA256")


def test_proxy_header_v2_only_the_tlvs_asked_for():
    pool = _pool(1, proxy_protocol="v2", proxy_tlvs=("authority",))
    r = _parse(pool.proxy_header(("1.2.3.4", 1), ("5.6.7.8", 2), FakeTls(), None, False, None))
    assert r.tlvs == ()  # no SNI: no authority TLV either
    r = _parse(pool.proxy_header(("1.2.3.4", 1), ("5.6.7.8", 2), FakeTls(), "h", False, None))
    assert r.authority == "h" and r.alpn is None and r.ssl is None


def test_proxy_header_without_addresses_is_local_or_unknown():
    assert _pool(1, proxy_protocol="v1").proxy_header(None, None, FakeTls(), None, False, None) == (
        b"PROXY UNKNOWN\r\n"
    )
    r = _parse(
        _pool(1, proxy_protocol="v2", proxy_tlvs=()).proxy_header(
            None, None, FakeTls(), None, False, None
        )
    )
    assert r.command == "LOCAL"
