"""Client certificates (issue 7): ``tls.client_auth = "none" | "optional" | "required"`` with a
valid, an untrusted, a revoked (CRL) and a missing client certificate; the verified subject CN
reaches the upstream in the PROXY v2 SSL TLV; a CA or CRL file that does not load is a config
error naming the key; the CRL file is read again on ``edgeterm reload`` (and a reload with a
CRL that does not load fails and keeps the old one)."""

from __future__ import annotations

import datetime as dt
import os
import ssl
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edgeterm import proxyproto as pp
from tests.support.configs import write_config
from tests.support.launcher import EdgetermFactory, run_cli
from tests.support.routing import (
    ClientCert,
    NamedUpstream,
    _ca,
    _leaf,
    _pem_key,
    make_client_pki,
    read_name,
)
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


# -- the CRL is re-read on reload ----------------------------------------------------------------


def write_crl(
    path: Path, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, revoked: list[int]
) -> None:
    """A CRL of ``ca`` revoking the serial numbers ``revoked``, put in place atomically (a
    reader sees the old file or the new one, never a part)."""
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(now - dt.timedelta(minutes=5))
        .next_update(now + dt.timedelta(days=1))
    )
    for serial in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(now - dt.timedelta(minutes=1))
            .build()
        )
    crl = builder.sign(ca_key, hashes.SHA256())
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    os.replace(tmp, path)


def reload_server(config: Path) -> subprocess.CompletedProcess[str]:
    return run_cli("reload", "-c", str(config), timeout=60)


def test_the_crl_file_is_read_again_on_reload(
    edgeterm: EdgetermFactory, upstream: Callable[..., Any], tmp_path: Path, ca: Path
) -> None:
    """bob's certificate is accepted until a new CRL revoking it is in the file *and*
    ``edgeterm reload`` has run; a CRL file that does not load fails the reload and the
    server keeps the CRL it had."""
    now = dt.datetime.now(dt.UTC)
    client_ca, client_ca_key = _ca("edgeterm reload test CA", now)
    ca_file, crl_file = tmp_path / "clients.pem", tmp_path / "clients-crl.pem"
    ca_file.write_bytes(client_ca.public_bytes(serialization.Encoding.PEM))
    clients: dict[str, ssl.SSLContext] = {}
    serials: dict[str, int] = {}
    for cn in ("alice", "bob"):
        cert, key = _leaf(cn, client_ca, client_ca_key, now)
        cert_file, key_file = tmp_path / f"{cn}.pem", tmp_path / f"{cn}.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(_pem_key(key))
        clients[cn] = ClientCert(cn, cert_file, key_file).context(ca)
        serials[cn] = cert.serial_number
    write_crl(crl_file, client_ca, client_ca_key, [])  # nobody revoked yet

    up = upstream(NamedUpstream, name="up")
    cfg = edgeterm.config([up.addr])
    cfg["tls"].update(
        {"client_auth": "required", "client_ca": str(ca_file), "client_crl": str(crl_file)}
    )
    server = edgeterm.start(cfg=cfg)
    port = server.port()
    assert attempt(port, clients["alice"]) == "served"
    assert attempt(port, clients["bob"]) == "served"

    # the new CRL on disk changes nothing by itself: the file is read at start and reload
    write_crl(crl_file, client_ca, client_ca_key, [serials["bob"]])
    assert attempt(port, clients["bob"]) == "served"

    r = reload_server(server.config)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert attempt(port, clients["bob"]) == f"refused: {REVOKED}"
    assert attempt(port, clients["alice"]) == "served"

    # a CRL file that does not load: the reload fails, bob stays revoked, alice served
    crl_file.write_bytes(b"-----BEGIN X509 CRL-----\nnot base64\n-----END X509 CRL-----\n")
    r = reload_server(server.config)
    assert r.returncode != 0, (r.stdout, r.stderr)
    assert "tls.client_crl" in r.stdout + r.stderr, (r.stdout, r.stderr)
    assert attempt(port, clients["bob"]) == f"refused: {REVOKED}"
    assert attempt(port, clients["alice"]) == "served"

    # and the revocation is lifted by the next CRL (and reload) without it
    write_crl(crl_file, client_ca, client_ca_key, [])
    r = reload_server(server.config)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert attempt(port, clients["bob"]) == "served"
    assert len(up.client_connections()) == 6  # exactly the six "served" above
