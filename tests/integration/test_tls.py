"""TLS through edgeterm: versions, cipher policy, ALPN and SNI, with the ssl module and s_client.

One edgeterm (default config: TLS 1.2+, "intermediate" ciphers, ALPN http/1.1, three
certificates) in front of an echo upstream serves the whole module.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from tests.support.certs import CertSet
from tests.support.launcher import EdgetermFactory
from tests.support.tlsclient import (
    client_context,
    connect_tls,
    recv_exactly,
    s_client_exchange,
    s_client_handshake_only,
)
from tests.support.upstreams import EchoUpstream, UpstreamLoop

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, certs: CertSet, upstream_loop: UpstreamLoop
) -> Iterator[SimpleNamespace]:
    echo = EchoUpstream(upstream_loop).start()
    factory = EdgetermFactory(tmp_path_factory.mktemp("tls"), certs)
    try:
        server = factory.start([echo.addr])
        yield SimpleNamespace(echo=echo, server=server, port=server.port(), factory=factory)
    finally:
        problems = factory.close()
        echo.close()
    if problems:
        pytest.fail("\n\n".join(problems), pytrace=False)


@pytest.fixture(autouse=True)
def _logs(show_logs, stack: SimpleNamespace) -> None:
    show_logs(stack.factory.servers)


def echo_round_trip(sock: ssl.SSLSocket, size: int = 100_000) -> None:
    payload = os.urandom(size)
    sock.sendall(payload)
    assert recv_exactly(sock, size, timeout=10) == payload


# versions -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2], ids=["tls13", "tls12"]
)
def test_round_trip_ssl_module(stack, ca, version):
    ctx = client_context(ca, min_version=version, max_version=version)
    with connect_tls(stack.port, ctx) as s:
        assert s.version() == version.name.replace("_", ".")
        info = s.cipher()
        assert info is not None
        cipher = info[0]
        if version is ssl.TLSVersion.TLSv1_2:
            # intermediate profile: ECDHE key exchange and AEAD only
            assert cipher.startswith("ECDHE-"), cipher
            assert "GCM" in cipher or "CHACHA20" in cipher, cipher
            assert s.compression() is None
        echo_round_trip(s)


def test_default_client_negotiates_tls13(stack, client_ctx):
    with connect_tls(stack.port, client_ctx) as s:
        assert s.version() == "TLSv1.3"
        echo_round_trip(s, 1000)


@pytest.mark.parametrize("flag,version", [("-tls1_3", "TLSv1.3"), ("-tls1_2", "TLSv1.2")])
def test_round_trip_openssl_s_client(stack, ca, flag, version):
    line = b"hello through edgeterm " + os.urandom(8).hex().encode() + b"\n"
    r = s_client_exchange(stack.port, ca, flag, send=line, expect=line)
    assert r.established, r.stderr
    assert f"Protocol version: {version}" in r.stderr
    assert "Verification: OK" in r.stderr
    assert line in r.stdout, (r.stdout, r.stderr)


# refused clients ----------------------------------------------------------------------------

OLD_PROTOCOLS = [
    # SECLEVEL=0 so that OpenSSL 3's client allows TLS 1.0/1.1: the refusal must be the server's
    pytest.param(["-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0"], id="tls11"),
    pytest.param(["-tls1", "-cipher", "DEFAULT:@SECLEVEL=0"], id="tls10"),
]
CBC_ONLY = [
    pytest.param(["-tls1_2", "-cipher", c], id=c)
    for c in ("ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA384", "ECDHE-ECDSA-AES128-SHA256")
]


@pytest.mark.parametrize("args", OLD_PROTOCOLS + CBC_ONLY)
def test_s_client_refused(stack, ca, args):
    r = s_client_handshake_only(stack.port, ca, *args)
    assert not r.established, r.stderr
    assert r.returncode != 0, r.stderr


@pytest.mark.parametrize("args", OLD_PROTOCOLS)
def test_old_protocol_gets_protocol_version_alert(stack, ca, args):
    r = s_client_handshake_only(stack.port, ca, *args)
    assert "alert protocol version" in r.stderr, r.stderr


@pytest.mark.parametrize("args", CBC_ONLY)
def test_cbc_only_gets_handshake_failure_alert(stack, ca, args):
    r = s_client_handshake_only(stack.port, ca, *args)
    assert "alert handshake failure" in r.stderr, r.stderr


def test_tls11_ssl_module_refused_with_alert(stack, ca):
    ctx = client_context(
        ca,
        min_version=ssl.TLSVersion.TLSv1_1,
        max_version=ssl.TLSVersion.TLSv1_1,
        ciphers="DEFAULT:@SECLEVEL=0",
    )
    with pytest.raises(ssl.SSLError) as info:
        connect_tls(stack.port, ctx).close()
    assert info.value.reason == "TLSV1_ALERT_PROTOCOL_VERSION", info.value


def test_cbc_only_ssl_module_refused_with_alert(stack, ca):
    ctx = client_context(ca, max_version=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE-ECDSA-AES128-SHA")
    with pytest.raises(ssl.SSLError) as info:
        connect_tls(stack.port, ctx).close()
    assert info.value.reason == "SSLV3_ALERT_HANDSHAKE_FAILURE", info.value


def test_served_after_refusals(stack, ca, client_ctx):
    for args in (
        ["-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0"],
        ["-tls1_2", "-cipher", "AES128-SHA"],
    ):
        assert not s_client_handshake_only(stack.port, ca, *args).established
    with connect_tls(stack.port, client_ctx) as s:
        echo_round_trip(s)


# ALPN ---------------------------------------------------------------------------------------


def test_alpn_http11_negotiated(stack, ca):
    ctx = client_context(ca, alpn=["h2", "http/1.1"])
    with connect_tls(stack.port, ctx) as s:
        assert s.selected_alpn_protocol() == "http/1.1"
        echo_round_trip(s, 1000)


def test_alpn_http11_negotiated_tls12(stack, ca):
    ctx = client_context(ca, max_version=ssl.TLSVersion.TLSv1_2, alpn=["h2", "http/1.1"])
    with connect_tls(stack.port, ctx) as s:
        assert s.version() == "TLSv1.2"
        assert s.selected_alpn_protocol() == "http/1.1"


def test_alpn_h2_only_client_is_not_given_h2(stack, ca):
    """The upstream speaks HTTP/1.1: edgeterm must never agree to h2."""
    ctx = client_context(ca, alpn=["h2"])
    try:
        s = connect_tls(stack.port, ctx)
    except ssl.SSLError as exc:  # no_application_protocol alert: also a correct answer
        assert "NO_APPLICATION_PROTOCOL" in str(exc), exc
        return
    with s:
        assert s.selected_alpn_protocol() is None


def test_no_alpn_offered(stack, client_ctx):
    with connect_tls(stack.port, client_ctx) as s:
        assert s.selected_alpn_protocol() is None
        echo_round_trip(s, 1000)


# SNI ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sni,expected",
    [
        ("localhost", "localhost"),
        ("example.com", "example.com"),
        ("EXAMPLE.COM", "example.com"),  # DNS names are case-insensitive
        ("www.example.org", "wildcard"),
        ("a.example.org", "wildcard"),
        ("example.org", "localhost"),  # *.example.org does not cover the bare domain
        ("a.b.example.org", "localhost"),  # nor two labels
        ("unknown.test", "localhost"),  # no match: the first certificate is the default
        (None, "localhost"),  # no SNI at all
    ],
)
@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2], ids=["tls13", "tls12"]
)
def test_sni_selects_certificate(stack, certs, sni, expected, version):
    # chain still verified against the CA; the name is checked by comparing certificates
    ctx = client_context(certs.ca, check_hostname=False, max_version=version)
    with connect_tls(stack.port, ctx, server_hostname=sni) as s:
        served = s.getpeercert(binary_form=True)
        names = {n: f.der() for n, f in certs.leaves.items()}
        got = next((n for n, der in names.items() if der == served), "an unknown certificate")
        assert got == expected
        echo_round_trip(s, 1000)


@pytest.mark.parametrize("sni", ["example.com", "x.example.org"])
def test_sni_hostname_verification(stack, ca, sni):
    """A strictly verifying client (check_hostname) accepts the certificate edgeterm picks."""
    with connect_tls(stack.port, client_context(ca), server_hostname=sni) as s:
        echo_round_trip(s, 1000)
