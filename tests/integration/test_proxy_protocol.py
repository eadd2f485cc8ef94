"""PROXY protocol (issue 7), both directions.

To upstreams: servers that decode the header (``edgeterm.proxyproto.ProxyHeaderParser``)
check every field of v1 and v2, for IPv4 and IPv6 clients, and each v2 TLV (ALPN, authority,
SSL with version, cipher, client certificate and CN).

From an L4 balancer in front (``accept_proxy``): the header's client address is what the
upstream sees; a connection without a valid header, a table of malformed ones, is closed
without TLS and without harming the worker (the next client is served); a header that does
not arrive in time is a timeout; ``proxy_from`` screens who may send one.
"""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path

import pytest

from edgeterm import proxyproto as pp
from tests.support.routing import NamedUpstream, make_client_pki, read_name, tls_after_header
from tests.support.supervision import wait_status
from tests.support.tlsclient import HOST, client_context, connect_tls, wait_peer_close
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_client_pki(tmp_path_factory.mktemp("client-pki"))


def served(sock: ssl.SSLSocket, upstream) -> pp.ParseResult:
    """The connection reached the upstream: its greeting came back; the header it decoded."""
    assert read_name(sock) == upstream.name
    wait_until(lambda: upstream.headers, timeout=5, what="the header at the upstream")
    assert not upstream.header_errors, upstream.header_errors
    return upstream.headers.pop()


# -- to upstreams ----------------------------------------------------------------------------


def test_v1_to_upstream_ipv4_and_ipv6_clients(edgeterm, upstream, client_ctx):
    up = upstream(NamedUpstream, name="v1", proxy=True)
    cfg = edgeterm.config([up.addr])
    cfg["upstreams"]["app"]["proxy_protocol"] = "v1"
    cfg["listeners"].append({"name": "six", "bind": "[::1]:0", "upstream": "app", "backlog": 128})
    server = edgeterm.start(cfg=cfg)
    with connect_tls(server.port(), client_ctx) as s:
        h = served(s, up)
        me = s.getsockname()
    assert (h.version, h.command, h.family) == (1, "PROXY", socket.AF_INET)
    assert h.src == ("127.0.0.1", me[1]) and h.dst == ("127.0.0.1", server.port())
    assert h.consumed == len(f"PROXY TCP4 127.0.0.1 127.0.0.1 {me[1]} {server.port()}\r\n")

    raw = socket.create_connection(("::1", server.port("six")), timeout=10)
    with client_ctx.wrap_socket(raw, server_hostname="localhost") as s:
        h = served(s, up)
        me = s.getsockname()
    assert (h.version, h.family) == (1, socket.AF_INET6)
    assert h.src == ("::1", me[1]) and h.dst == ("::1", server.port("six"))


def tls_config(edgeterm, up, pki, **pool):
    cfg = edgeterm.config([up.addr])
    cfg["upstreams"]["app"].update({"proxy_protocol": "v2", **pool})
    cfg["tls"]["alpn"] = ["h2", "http/1.1"]
    cfg["tls"]["client_auth"] = "optional"
    cfg["tls"]["client_ca"] = str(pki.ca)
    return cfg


def test_v2_to_upstream_with_every_tlv(edgeterm, upstream, pki, ca):
    up = upstream(NamedUpstream, name="v2", proxy=True)
    cfg = tls_config(edgeterm, up, pki)
    cfg["listeners"].append({"name": "six", "bind": "[::1]:0", "upstream": "app", "backlog": 128})
    server = edgeterm.start(cfg=cfg)
    ctx = pki.valid.context(ca, alpn=["h2"])
    with connect_tls(server.port(), ctx, server_hostname="example.com") as s:
        h = served(s, up)
        me, cipher = s.getsockname(), s.cipher()[0]
    assert (h.version, h.command, h.family) == (2, "PROXY", socket.AF_INET)
    assert h.src == ("127.0.0.1", me[1]) and h.dst == ("127.0.0.1", server.port())
    assert h.alpn == b"h2"
    assert h.authority == "example.com"
    info = h.ssl
    assert info is not None
    assert info.client == pp.PP2_CLIENT_SSL | pp.PP2_CLIENT_CERT_CONN | pp.PP2_CLIENT_CERT_SESS
    assert info.verify == 0 and info.cert_verified
    assert (info.version, info.cipher, info.cn) == ("TLSv1.3", cipher, "alice")
    assert [t for t, _ in h.tlvs] == [pp.PP2_TYPE_ALPN, pp.PP2_TYPE_AUTHORITY, pp.PP2_TYPE_SSL]

    # IPv6, TLS 1.2, no client certificate, no ALPN, no SNI: only what is known is sent
    ctx12 = client_context(ca, max_version=ssl.TLSVersion.TLSv1_2, check_hostname=False)
    raw = socket.create_connection(("::1", server.port("six")), timeout=10)
    with ctx12.wrap_socket(raw, server_hostname=None) as s:
        h = served(s, up)
        me, cipher = s.getsockname(), s.cipher()[0]
    assert (h.version, h.family) == (2, socket.AF_INET6)
    assert h.src == ("::1", me[1]) and h.dst == ("::1", server.port("six"))
    assert h.alpn is None and h.authority is None
    info = h.ssl
    assert info is not None
    assert info.client == pp.PP2_CLIENT_SSL and info.verify != 0 and not info.cert_presented
    assert (info.version, info.cipher, info.cn) == ("TLSv1.2", cipher, None)


def test_v2_resumed_session_says_cert_sess_only(edgeterm, upstream, pki, ca):
    up = upstream(NamedUpstream, name="v2", proxy=True)
    server = edgeterm.start(cfg=tls_config(edgeterm, up, pki))
    ctx = pki.valid.context(ca, max_version=ssl.TLSVersion.TLSv1_2)
    with connect_tls(server.port(), ctx) as s:
        first = served(s, up).ssl
        session = s.session
    raw = socket.create_connection((HOST, server.port()), timeout=10)
    with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as s:
        assert s.session_reused
        again = served(s, up).ssl
    assert first is not None and again is not None
    assert first.client == pp.PP2_CLIENT_SSL | pp.PP2_CLIENT_CERT_CONN | pp.PP2_CLIENT_CERT_SESS
    assert again.client == pp.PP2_CLIENT_SSL | pp.PP2_CLIENT_CERT_SESS
    assert again.verify == 0 and again.cn == "alice"


def test_v2_only_the_configured_tlvs(edgeterm, upstream, pki, ca):
    up = upstream(NamedUpstream, name="v2", proxy=True)
    server = edgeterm.start(cfg=tls_config(edgeterm, up, pki, proxy_tlvs=["authority"]))
    with connect_tls(server.port(), client_context(ca, alpn=["h2"])) as s:
        h = served(s, up)
    assert h.tlvs == ((pp.PP2_TYPE_AUTHORITY, b"localhost"),)


# -- from a balancer in front ----------------------------------------------------------------


def front_config(edgeterm, up, accept="any", **listener):
    cfg = edgeterm.config([up.addr])
    cfg["listeners"][0].update({"accept_proxy": accept, "proxy_timeout": 1.0, **listener})
    cfg["upstreams"]["app"]["proxy_protocol"] = "v2"
    cfg["upstreams"]["app"]["proxy_tlvs"] = []
    return cfg


FRONT_V4 = (("203.0.113.7", 51000), ("198.51.100.1", 443))
FRONT_V6 = (("2001:db8::7", 52000), ("2001:db8::1", 8443))


@pytest.mark.parametrize(
    "header",
    [
        pp.encode_v1(*FRONT_V4),
        pp.encode_v1(*FRONT_V6),
        pp.encode_v2(*FRONT_V4),
        pp.encode_v2(*FRONT_V6, tlvs=[pp.tlv_authority("ignored.example")], checksum=True),
    ],
    ids=["v1-ipv4", "v1-ipv6", "v2-ipv4", "v2-ipv6-tlvs-crc"],
)
def test_client_address_from_the_balancer_reaches_the_upstream(
    edgeterm, upstream, client_ctx, header
):
    up = upstream(NamedUpstream, name="behind", proxy=True)
    server = edgeterm.start(cfg=front_config(edgeterm, up))
    with tls_after_header(server.port(), client_ctx, header) as s:
        h = served(s, up)
    sent = pp.ProxyHeaderParser().feed(header)
    assert sent is not None
    assert (h.src, h.dst) == (sent.src, sent.dst)
    assert h.tlvs == ()  # what the balancer sent is not forwarded


def test_local_header_keeps_the_connection_addresses(edgeterm, upstream, client_ctx):
    up = upstream(NamedUpstream, name="behind", proxy=True)
    server = edgeterm.start(cfg=front_config(edgeterm, up))
    for header in (pp.encode_v2(None, None), b"PROXY UNKNOWN\r\n"):
        with tls_after_header(server.port(), client_ctx, header) as s:
            h = served(s, up)
            me = s.getsockname()
        assert h.src == ("127.0.0.1", me[1]) and h.dst == ("127.0.0.1", server.port())


def test_header_split_into_single_bytes(edgeterm, upstream, client_ctx):
    up = upstream(NamedUpstream, name="behind", proxy=True)
    server = edgeterm.start(cfg=front_config(edgeterm, up))
    for header in (pp.encode_v1(*FRONT_V4), pp.encode_v2(*FRONT_V6)):
        raw = socket.create_connection((HOST, server.port()), timeout=10)
        for b in header:
            raw.sendall(bytes([b]))
            time.sleep(0.002)
        with client_ctx.wrap_socket(raw, server_hostname="localhost") as s:
            h = served(s, up)
        assert h.src == pp.ProxyHeaderParser().feed(header).src  # type: ignore[union-attr]


def _client_hello() -> bytes:
    ctx = ssl.create_default_context()
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def _v2(ver_cmd=0x21, fam=0x11, body=None, length=None):
    body = bytes(12) if body is None else body
    n = len(body) if length is None else length
    return pp.V2_SIGNATURE + bytes((ver_cmd, fam)) + n.to_bytes(2, "big") + body


MALFORMED = {
    "tls-clienthello": _client_hello(),
    "http-request": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "v1-bad-protocol": b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
    "v1-missing-field": b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
    "v1-bad-address": b"PROXY TCP4 1.2.3.400 5.6.7.8 1 2\r\n",
    "v1-v6-in-tcp4": b"PROXY TCP4 ::1 ::1 1 2\r\n",
    "v1-port-too-big": b"PROXY TCP4 1.2.3.4 5.6.7.8 70000 2\r\n",
    "v1-leading-zero": b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
    "v1-double-space": b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",
    "v1-lf-only": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
    "v1-no-crlf": b"PROXY TCP4 " + b"1" * 120,
    "v1-binary": b"PROXY TCP4 1.2.3.4\x00 5.6.7.8 1 2\r\n",
    "v1-lowercase": b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
    "v2-bad-signature": b"\r\n\r\n\x00\r\nQUIX\n" + bytes(4),
    "v2-version-1": _v2(ver_cmd=0x11),
    "v2-bad-command": _v2(ver_cmd=0x2F),
    "v2-bad-family": _v2(fam=0x41),
    "v2-dgram": _v2(fam=0x12),
    "v2-unix": _v2(fam=0x31, body=bytes(216)),
    "v2-too-short-for-inet": _v2(body=bytes(8)),
    "v2-over-max-size": _v2(length=0xFFFF, body=b""),
    "v2-truncated-tlv": _v2(body=bytes(12) + b"\x02\x00\x09abc"),
    "v2-bad-ssl-tlv": _v2(body=bytes(12) + b"\x20\x00\x02ab"),
    "v2-bad-crc": _v2(body=bytes(12) + b"\x03\x00\x04\x00\x00\x00\x01"),
}


def test_malformed_headers_are_rejected_without_harming_the_worker(edgeterm, upstream, client_ctx):
    up = upstream(NamedUpstream, name="behind", proxy=True)
    server = edgeterm.start(cfg=front_config(edgeterm, up))
    port = server.port()
    for name, data in MALFORMED.items():
        raw = socket.create_connection((HOST, port), timeout=10)
        with raw:
            raw.sendall(data)
            closed = wait_peer_close(raw, timeout=5)
        assert closed.data == b"", f"{name}: got {closed.data!r} (no TLS: nothing is sent)"
        assert closed.after < 0.9, f"{name}: closed after {closed.after:.2f}s, not at once"
        # the worker is fine: the next client is served
        with tls_after_header(port, client_ctx, pp.encode_v1(*FRONT_V4)) as s:
            assert served(s, up).src == FRONT_V4[0], name
    assert not up.header_errors
    assert len(up.connections()) == len(MALFORMED)
    admin = Path(edgeterm.directory) / "run" / "edgeterm.sock"
    wait_status(
        admin,
        lambda st: st["workers"][0]["closed_by"].get("proxy_header_invalid") == len(MALFORMED),
        timeout=5,
        what="every malformed header counted",
    )


def test_version_restriction_and_timeouts(edgeterm, upstream, client_ctx):
    up = upstream(NamedUpstream, name="behind", proxy=True)
    server = edgeterm.start(cfg=front_config(edgeterm, up, accept="v1"))
    port = server.port()
    cases = {
        "v2-on-a-v1-listener": (pp.encode_v2(*FRONT_V4), False),
        "half-a-header": (b"PROXY TCP4 1.2.3.4 ", True),
        "nothing": (b"", True),
    }
    for name, (data, times_out) in cases.items():
        raw = socket.create_connection((HOST, port), timeout=10)
        with raw:
            raw.sendall(data)
            closed = wait_peer_close(raw, timeout=5)
        assert closed.data == b"", name
        if times_out:  # proxy_timeout = 1.0
            assert 0.8 <= closed.after <= 1.0 + 1.0, f"{name}: {closed.after:.2f}s"
        else:
            assert closed.after < 0.9, f"{name}: {closed.after:.2f}s"
    # a whole header, then EOF: the header was taken, so this is a TLS handshake cut short,
    # answered as any other (OpenSSL's alert for an unexpected EOF), within the handshake
    # timeout rather than the PROXY one
    raw = socket.create_connection((HOST, port), timeout=10)
    with raw:
        raw.sendall(pp.encode_v1(*FRONT_V4))
        raw.shutdown(socket.SHUT_WR)
        closed = wait_peer_close(raw, timeout=5)
    assert closed.data[:1] in (b"", b"\x15"), closed  # nothing, or a TLS alert record
    assert closed.after < 0.9
    with tls_after_header(port, client_ctx, pp.encode_v1(*FRONT_V6)) as s:
        assert served(s, up).src == FRONT_V6[0]
    assert len(up.connections()) == 1


def test_proxy_from_screens_the_sender(edgeterm, upstream, client_ctx):
    up = upstream(NamedUpstream, name="behind", proxy=True)
    cfg = front_config(edgeterm, up, proxy_from=["192.0.2.0/24"])
    cfg["listeners"].append(
        {
            "name": "trusted",
            "bind": "127.0.0.1:0",
            "upstream": "app",
            "accept_proxy": "v1",
            "proxy_from": ["10.0.0.0/8", "127.0.0.0/8"],
        }
    )
    server = edgeterm.start(cfg=cfg)
    raw = socket.create_connection((HOST, server.port()), timeout=10)
    with raw:
        raw.sendall(pp.encode_v1(*FRONT_V4))
        closed = wait_peer_close(raw, timeout=5)
    assert closed.data == b"" and closed.after < 0.9
    with tls_after_header(server.port("trusted"), client_ctx, pp.encode_v1(*FRONT_V4)) as s:
        assert served(s, up).src == FRONT_V4[0]
    assert len(up.connections()) == 1
