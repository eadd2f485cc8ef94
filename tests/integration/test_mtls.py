"""Client certificates (issue 7): ``tls.client_auth = "none" | "optional" | "required"`` with a
valid, an untrusted, a revoked (CRL) and a missing client certificate; the verified subject CN
reaches the upstream in the PROXY v2 SSL TLV; a CA or CRL file that does not load is a config
error naming the key."""

from __future__ import annotations

import ssl

import pytest

from edgeterm import proxyproto as pp
from tests.support.configs import write_config
from tests.support.launcher import run_cli
from tests.support.routing import NamedUpstream, make_client_pki, read_name
from tests.support.tlsclient import client_context, connect_tls, recv_exactly
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_client_pki(tmp_path_factory.mktemp("client-pki"))


def attempt(port, ctx):
    """ "served" (the upstream's greeting and an echo came back) or "refused: <reason>".

    In TLS 1.3 the client's certificate is checked after the client has finished its side of
    the handshake, so a refusal can surface as the alert on the first read."""
    try:
        with connect_tls(port, ctx) as s:
            read_name(s)
            s.sendall(b"hello")
            assert recv_exactly(s, 5) == b"hello"
            return "served"
    except ssl.SSLError as exc:
        return f"refused: {exc.reason}"
    except (EOFError, ConnectionError) as exc:
        return f"refused: {exc!r}"


def start(edgeterm, up, pki, mode, crl=True):
    cfg = edgeterm.config([up.addr])
    cfg["upstreams"]["app"]["proxy_protocol"] = "v2"
    cfg["tls"]["client_auth"] = mode
    if mode != "none":
        cfg["tls"]["client_ca"] = str(pki.ca)
        if crl:
            cfg["tls"]["client_crl"] = str(pki.crl)
    return edgeterm.start(cfg=cfg)


def last_ssl_info(up):
    wait_until(lambda: up.headers, timeout=5, what="a PROXY header at the upstream")
    info = up.headers.pop().ssl
    assert info is not None
    return info


UNKNOWN_CA = "TLSV1_ALERT_UNKNOWN_CA"
REVOKED = "SSLV3_ALERT_CERTIFICATE_REVOKED"
REQUIRED = "TLSV13_ALERT_CERTIFICATE_REQUIRED"


def test_required(edgeterm, upstream, pki, ca):
    up = upstream(NamedUpstream, name="up", proxy=True)
    port = start(edgeterm, up, pki, "required").port()
    assert attempt(port, pki.valid.context(ca)) == "served"
    info = last_ssl_info(up)
    assert info.cert_verified and info.cn == "alice"
    assert info.client & pp.PP2_CLIENT_CERT_CONN
    assert attempt(port, pki.untrusted.context(ca)) == f"refused: {UNKNOWN_CA}"
    assert attempt(port, pki.revoked.context(ca)) == f"refused: {REVOKED}"
    assert attempt(port, client_context(ca)) == f"refused: {REQUIRED}"
    # TLS 1.2: the refusal comes during the handshake itself
    tls12 = client_context(ca, max_version=ssl.TLSVersion.TLSv1_2)
    assert attempt(port, tls12).startswith("refused: ")
    assert len(up.client_connections()) == 1  # only the valid one got through
    assert attempt(port, pki.valid.context(ca)) == "served"  # and the worker is fine


def test_optional(edgeterm, upstream, pki, ca):
    up = upstream(NamedUpstream, name="up", proxy=True)
    port = start(edgeterm, up, pki, "optional").port()
    assert attempt(port, pki.valid.context(ca)) == "served"
    info = last_ssl_info(up)
    assert info.cert_verified and info.cn == "alice"
    assert attempt(port, client_context(ca)) == "served"  # no certificate: fine
    info = last_ssl_info(up)
    assert not info.cert_presented and info.verify != 0 and info.cn is None
    # a certificate that is presented must verify
    assert attempt(port, pki.untrusted.context(ca)) == f"refused: {UNKNOWN_CA}"
    assert attempt(port, pki.revoked.context(ca)) == f"refused: {REVOKED}"
    assert len(up.client_connections()) == 2


def test_none_never_asks(edgeterm, upstream, pki, ca):
    up = upstream(NamedUpstream, name="up", proxy=True)
    port = start(edgeterm, up, pki, "none").port()
    for cert in (pki.valid, pki.untrusted, pki.revoked):  # not requested, so not sent
        assert attempt(port, cert.context(ca)) == "served"
        info = last_ssl_info(up)
        assert not info.cert_presented and info.cn is None
    assert attempt(port, client_context(ca)) == "served"


def test_optional_without_crl_accepts_the_revoked_certificate(edgeterm, upstream, pki, ca):
    """The CRL is what refuses ``mallory``: without it the certificate verifies."""
    up = upstream(NamedUpstream, name="up", proxy=True)
    port = start(edgeterm, up, pki, "optional", crl=False).port()
    assert attempt(port, pki.revoked.context(ca)) == "served"
    assert last_ssl_info(up).cn == "mallory"
    assert attempt(port, pki.untrusted.context(ca)) == f"refused: {UNKNOWN_CA}"


@pytest.mark.parametrize(
    ("key", "content", "message"),
    [
        ("client_ca", b"not a certificate\n", "tls.client_ca: "),
        ("client_crl", b"", "tls.client_crl: "),
    ],
)
def test_unloadable_ca_or_crl_is_a_config_error(
    edgeterm, pki, tmp_path, key, content, message, echo
):
    bad = tmp_path / "bad.pem"
    bad.write_bytes(content)
    cfg = edgeterm.config([echo.addr])
    cfg["tls"].update({"client_auth": "required", "client_ca": str(pki.ca), key: str(bad)})
    path = write_config(tmp_path / "edgeterm.toml", cfg)
    (tmp_path / "certs").symlink_to(edgeterm.directory / "certs")
    r = run_cli("check-config", "-c", str(path), timeout=60)
    assert r.returncode != 0, (r.stdout, r.stderr)
    assert message in r.stdout + r.stderr, (r.stdout, r.stderr)
