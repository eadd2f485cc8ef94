"""edgeterm.tls: server contexts, cipher policy and SNI, through in-memory handshakes."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import ssl
import warnings
from pathlib import Path

import pytest
from cryptography import x509

from edgeterm import openssl, selfsigned
from edgeterm.certs import LoadedCert
from edgeterm.config import CertificateConfig, TicketsConfig, TlsConfig
from edgeterm.errors import ConfigError
from edgeterm.tls import INTERMEDIATE_TLS12_CIPHERS, TlsContexts, build_contexts
from tests.support import memtls

CONFIG = "etc/edgeterm.toml"


@pytest.fixture(scope="module")
def cert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One CA; ``localhost`` (the default), ``example.com`` and ``*.example.org`` under it."""
    directory = tmp_path_factory.mktemp("tls-certs")
    selfsigned.generate(directory, ("localhost",))
    ca = selfsigned.load_ca(directory)
    selfsigned.generate(directory, ("example.com",), basename="example.com", ca=ca)
    selfsigned.generate(directory, ("*.example.org",), basename="wildcard.example.org", ca=ca)
    selfsigned.generate(directory, ("rsa.example.net",), basename="rsa", ca=ca, key_type="rsa-2048")
    return directory


def cert_cfg(directory: Path, basename: str) -> CertificateConfig:
    return CertificateConfig(cert=directory / f"{basename}.pem", key=directory / f"{basename}.key")


@pytest.fixture(scope="module")
def tls_cfg(cert_dir: Path) -> TlsConfig:
    return TlsConfig(
        certificates=(
            cert_cfg(cert_dir, "localhost"),
            cert_cfg(cert_dir, "example.com"),
            cert_cfg(cert_dir, "wildcard.example.org"),
        )
    )


@pytest.fixture(scope="module")
def contexts(tls_cfg: TlsConfig) -> TlsContexts:
    return build_contexts(tls_cfg, CONFIG)


def client_context(cert_dir: Path, *, check_hostname: bool = True) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cert_dir / "ca.pem"))
    ctx.check_hostname = check_hostname
    return ctx


class Handshake:
    """A client SSLObject talking to a server SSLObject through memory BIOs."""

    def __init__(
        self,
        server_ctx: ssl.SSLContext,
        client_ctx: ssl.SSLContext,
        server_hostname: str | None = "localhost",
    ) -> None:
        c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
        self.client = client_ctx.wrap_bio(c_in, c_out, server_hostname=server_hostname)
        self.server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
        memtls.handshake(self.client, self.server, (c_in, c_out), (s_in, s_out))

    def peer_subject(self) -> str:
        der = self.client.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der).subject.rfc4514_string()


def with_tls(cfg: TlsConfig, **changes: object) -> TlsConfig:
    return dataclasses.replace(cfg, **changes)  # type: ignore[arg-type]


# --- versions and ciphers ---


def test_tls13_is_negotiated(contexts: TlsContexts, cert_dir: Path) -> None:
    hs = Handshake(contexts.default, client_context(cert_dir))
    assert hs.server.version() == "TLSv1.3"
    assert hs.client.version() == "TLSv1.3"
    assert hs.server.cipher()[0] in {  # type: ignore[index]
        "TLS_AES_256_GCM_SHA384",
        "TLS_CHACHA20_POLY1305_SHA256",
        "TLS_AES_128_GCM_SHA256",
    }
    assert openssl.negotiated_group(hs.server) == "X25519"


@pytest.mark.parametrize("basename", ["localhost", "rsa"])
def test_tls12_client_gets_ecdhe_aead(cert_dir: Path, basename: str) -> None:
    contexts = build_contexts(TlsConfig(certificates=(cert_cfg(cert_dir, basename),)), CONFIG)
    client = client_context(cert_dir, check_hostname=False)
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    hs = Handshake(contexts.default, client)
    assert hs.server.version() == "TLSv1.2"
    cipher = hs.server.cipher()
    assert cipher is not None
    assert cipher[0] in INTERMEDIATE_TLS12_CIPHERS.split(":")
    assert cipher[0].startswith("ECDHE-ECDSA-" if basename == "localhost" else "ECDHE-RSA-")


@pytest.mark.parametrize(
    ("client_ciphers", "expected"),
    [
        # Server preference: AES-128-GCM first, whatever order the client lists...
        (
            "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-AES128-GCM-SHA256",
            "ECDHE-ECDSA-AES128-GCM-SHA256",
        ),
        # ...except that a client listing ChaCha20 first (no AES instructions) gets ChaCha20.
        (
            "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES128-GCM-SHA256",
            "ECDHE-ECDSA-CHACHA20-POLY1305",
        ),
    ],
)
def test_server_cipher_preference_with_chacha_priority(
    contexts: TlsContexts, cert_dir: Path, client_ciphers: str, expected: str
) -> None:
    client = client_context(cert_dir)
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    client.set_ciphers(client_ciphers)
    assert Handshake(contexts.default, client).server.cipher()[0] == expected  # type: ignore[index]


def test_tls11_client_is_refused(contexts: TlsContexts, cert_dir: Path) -> None:
    client = client_context(cert_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        client.minimum_version = ssl.TLSVersion.TLSv1
        client.maximum_version = ssl.TLSVersion.TLSv1_1
    client.set_ciphers("ALL:@SECLEVEL=0")  # let the client really offer TLS 1.1
    with pytest.raises(ssl.SSLError, match=r"UNSUPPORTED_PROTOCOL|unsupported protocol"):
        Handshake(contexts.default, client)


def cbc_only_tls12_client(cert_dir: Path) -> ssl.SSLContext:
    client = client_context(cert_dir)
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    client.set_ciphers("ECDHE-ECDSA-AES128-SHA:ECDHE-RSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA384")
    return client


def test_cbc_only_tls12_client_is_refused(contexts: TlsContexts, cert_dir: Path) -> None:
    with pytest.raises(ssl.SSLError, match=r"NO_SHARED_CIPHER|no shared cipher"):
        Handshake(contexts.default, cbc_only_tls12_client(cert_dir))


def test_a_custom_cipher_string_is_passed_through(tls_cfg: TlsConfig, cert_dir: Path) -> None:
    # The control for the test above: the same client works when the operator allows CBC.
    contexts = build_contexts(with_tls(tls_cfg, ciphers="ECDHE-ECDSA-AES128-SHA"), CONFIG)
    hs = Handshake(contexts.default, cbc_only_tls12_client(cert_dir))
    assert hs.server.cipher()[0] == "ECDHE-ECDSA-AES128-SHA"  # type: ignore[index]


def test_an_invalid_cipher_string_names_tls_ciphers(tls_cfg: TlsConfig) -> None:
    with pytest.raises(ConfigError) as info:
        build_contexts(with_tls(tls_cfg, ciphers="NO-SUCH-CIPHER"), CONFIG)
    [line] = info.value.errors
    assert line.startswith(
        f"{CONFIG}: tls.ciphers: OpenSSL accepts no cipher from 'NO-SUCH-CIPHER'"
    )


@pytest.mark.parametrize(
    "changes", [{"ciphers": "modern"}, {"min_version": "TLSv1.3"}], ids=["modern", "min-1.3"]
)
def test_tls13_only_refuses_tls12(
    tls_cfg: TlsConfig, cert_dir: Path, changes: dict[str, str]
) -> None:
    contexts = build_contexts(with_tls(tls_cfg, **changes), CONFIG)
    assert contexts.default.minimum_version == ssl.TLSVersion.TLSv1_3
    assert Handshake(contexts.default, client_context(cert_dir)).server.version() == "TLSv1.3"
    client = client_context(cert_dir)
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ssl.SSLError):
        Handshake(contexts.default, client)


# --- options, tickets, ALPN ---


def test_options_on_every_context(contexts: TlsContexts, cert_dir: Path) -> None:
    for ctx in contexts.contexts:
        for option in (
            ssl.OP_NO_COMPRESSION,
            ssl.OP_NO_RENEGOTIATION,
            ssl.OP_CIPHER_SERVER_PREFERENCE,
        ):
            assert ctx.options & option
        assert not ctx.options & ssl.OP_NO_TICKET
        assert ctx.num_tickets == 2
        assert ctx.verify_mode == ssl.CERT_NONE
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert Handshake(contexts.default, client_context(cert_dir)).server.compression() is None


def test_tickets_disabled(tls_cfg: TlsConfig) -> None:
    contexts = build_contexts(with_tls(tls_cfg, tickets=TicketsConfig(enabled=False)), CONFIG)
    for ctx in contexts.contexts:
        assert ctx.options & ssl.OP_NO_TICKET
        assert ctx.num_tickets == 0


def test_alpn(contexts: TlsContexts, tls_cfg: TlsConfig, cert_dir: Path) -> None:
    client = client_context(cert_dir)
    client.set_alpn_protocols(["h2", "http/1.1"])
    hs = Handshake(contexts.default, client)
    assert hs.server.selected_alpn_protocol() == "http/1.1"
    assert hs.client.selected_alpn_protocol() == "http/1.1"

    no_alpn = build_contexts(with_tls(tls_cfg, alpn=()), CONFIG)
    assert Handshake(no_alpn.default, client).server.selected_alpn_protocol() is None


# --- SNI ---


@pytest.mark.parametrize(
    ("server_name", "subject"),
    [
        ("example.com", "CN=example.com"),
        ("EXAMPLE.com", "CN=example.com"),
        ("www.example.org", "CN=*.example.org"),
        ("WWW.Example.Org", "CN=*.example.org"),
        ("a.b.example.org", "CN=localhost"),  # a wildcard covers exactly one label
        ("example.org", "CN=localhost"),
        ("www.example.com", "CN=localhost"),
        ("unknown.test", "CN=localhost"),
        (None, "CN=localhost"),  # no SNI
    ],
)
def test_sni_picks_the_certificate(
    contexts: TlsContexts, cert_dir: Path, server_name: str | None, subject: str
) -> None:
    hs = Handshake(contexts.default, client_context(cert_dir, check_hostname=False), server_name)
    assert hs.peer_subject() == subject
    assert hs.server.version() == "TLSv1.3"


def test_select_without_a_handshake(contexts: TlsContexts) -> None:
    default, example_com, wildcard = contexts.contexts
    assert contexts.default is default
    assert contexts.select("example.com") is example_com
    assert contexts.select("example.com.") is example_com
    assert contexts.select("x.example.org") is wildcard
    assert contexts.select(".example.org") is default  # an empty label is not a label
    assert contexts.select("localhost") is default
    assert contexts.select(None) is default


def test_the_first_certificate_wins_a_shared_name(tls_cfg: TlsConfig, cert_dir: Path) -> None:
    ca = selfsigned.load_ca(cert_dir)
    second = cert_dir / "second"
    selfsigned.generate(second, ("example.com", "only.example.com"), basename="dup", ca=ca)
    cfg = with_tls(tls_cfg, certificates=(*tls_cfg.certificates, cert_cfg(second, "dup")))
    contexts = build_contexts(cfg, CONFIG)
    assert contexts.select("example.com") is contexts.contexts[1]
    assert contexts.select("only.example.com") is contexts.contexts[3]
    assert contexts.warnings == (
        f"{CONFIG}: tls.certificates[3].cert: example.com is also covered by "
        "tls.certificates[1], which wins (the first certificate listed)",
    )


# --- errors, key handling ---


def test_errors_of_all_certificates_come_together(tls_cfg: TlsConfig, cert_dir: Path) -> None:
    ca = selfsigned.load_ca(cert_dir)
    old = cert_dir / "old"
    selfsigned.generate(
        old, valid_from=dt.datetime.now(dt.UTC) - dt.timedelta(days=9), days=3, ca=ca
    )
    cfg = with_tls(
        tls_cfg,
        ciphers="NOPE",
        certificates=(
            CertificateConfig(cert=cert_dir / "missing.pem"),
            tls_cfg.certificates[1],
            cert_cfg(old, "localhost"),
        ),
    )
    with pytest.raises(ConfigError) as info:
        build_contexts(cfg, CONFIG)
    keys = [line.split(": ", 2)[1] for line in info.value.errors]
    assert keys == ["tls.ciphers", "tls.certificates[0].cert", "tls.certificates[2].cert"]


def test_no_certificate(tls_cfg: TlsConfig) -> None:
    with pytest.raises(ConfigError, match="at least one certificate"):
        build_contexts(with_tls(tls_cfg, certificates=()), CONFIG)


def test_key_material_goes_through_memory_files_only(tls_cfg: TlsConfig) -> None:
    fds_before = set(os.listdir("/proc/self/fd"))
    contexts = build_contexts(tls_cfg, CONFIG)
    assert set(os.listdir("/proc/self/fd")) == fds_before  # every memfd closed
    assert all(isinstance(cert, LoadedCert) for cert in contexts.certs)
    assert [cert.names for cert in contexts.certs] == [
        ("localhost",),
        ("example.com",),
        ("*.example.org",),
    ]


def test_alpn_without_a_common_protocol_still_connects(
    contexts: TlsContexts, cert_dir: Path
) -> None:
    client = client_context(cert_dir)
    client.set_alpn_protocols(["h2"])
    assert Handshake(contexts.default, client).server.selected_alpn_protocol() is None
