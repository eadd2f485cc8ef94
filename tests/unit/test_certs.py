"""edgeterm.certs: loading and checking certificates."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from edgeterm import selfsigned
from edgeterm.certs import LoadedCert, load_certificate
from edgeterm.config import CertificateConfig
from edgeterm.errors import ConfigError

CONFIG = "etc/edgeterm.toml"
WHERE = "tls.certificates[1]"
NOW = dt.datetime.now(dt.UTC)


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("ca")
    selfsigned.generate(directory, ("localhost",))
    return directory


@pytest.fixture(scope="module")
def ca(ca_dir: Path) -> selfsigned.CA:
    return selfsigned.load_ca(ca_dir)


def leaf(
    directory: Path, ca: selfsigned.CA, *names: str, **kwargs: object
) -> selfsigned.GeneratedCert:
    return selfsigned.generate(directory, names or ("www.example.com",), ca=ca, **kwargs)  # type: ignore[arg-type]


def load(cert: Path, key: Path | None) -> LoadedCert:
    return load_certificate(CertificateConfig(cert=cert, key=key), WHERE, CONFIG)


def errors_of(cert: Path, key: Path | None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(cert, key)
    return info.value.errors


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def read_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def self_signed(subject: x509.Name, *, san: list[str] | None) -> tuple[x509.Certificate, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=90))
    )
    if san is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in san]), critical=False
        )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return builder.sign(key, hashes.SHA256()), key_pem


# --- what loads ---


def test_good_pem_chain(tmp_path: Path, ca: selfsigned.CA) -> None:
    made = leaf(tmp_path, ca, "www.example.com", "Example.COM")
    chain = tmp_path / "chain.pem"
    chain.write_bytes(made.cert_path.read_bytes() + ca.cert_path.read_bytes())

    loaded = load(chain, made.key_path)

    assert loaded.cert_path == chain
    assert loaded.key_path == made.key_path
    assert loaded.names == ("www.example.com", "example.com")
    assert loaded.warnings == ()
    assert loaded.not_after == read_cert(made.cert_path).not_valid_after_utc
    assert loaded.chain_pem.count(b"-----BEGIN CERTIFICATE-----") == 2
    assert loaded.chain_pem.startswith(made.cert_path.read_bytes())
    assert loaded.key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")


def test_der_certificate_and_der_key(tmp_path: Path, ca: selfsigned.CA) -> None:
    made = leaf(tmp_path, ca, "der.example.com")
    cert_der, key_der = tmp_path / "cert.der", tmp_path / "key.der"
    cert_der.write_bytes(read_cert(made.cert_path).public_bytes(serialization.Encoding.DER))
    key = serialization.load_pem_private_key(made.key_path.read_bytes(), password=None)
    key_der.write_bytes(
        key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )

    loaded = load(cert_der, key_der)

    assert loaded.names == ("der.example.com",)
    assert loaded.chain_pem == made.cert_path.read_bytes()
    assert loaded.key_pem == made.key_path.read_bytes()  # normalized to PKCS#8 PEM


def test_key_in_the_cert_file(tmp_path: Path, ca: selfsigned.CA) -> None:
    made = leaf(tmp_path, ca, "combined.example.com", key_type="rsa-2048")
    combined = tmp_path / "combined.pem"
    # Traditional "RSA PRIVATE KEY" framing, key first: both are accepted.
    key = serialization.load_pem_private_key(made.key_path.read_bytes(), password=None)
    traditional = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    combined.write_bytes(traditional + made.cert_path.read_bytes() + ca.cert_path.read_bytes())

    loaded = load(combined, None)

    assert loaded.key_path == combined
    assert loaded.names == ("combined.example.com",)
    assert loaded.chain_pem.count(b"BEGIN CERTIFICATE") == 2
    assert b"PRIVATE KEY" not in loaded.chain_pem


def test_repr_never_shows_key_material(tmp_path: Path, ca: selfsigned.CA) -> None:
    made = leaf(tmp_path, ca)
    assert "PRIVATE" not in repr(load(made.cert_path, made.key_path))


# --- names ---


def test_names_come_from_the_san_not_the_cn(tmp_path: Path) -> None:
    cert, key_pem = self_signed(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cn.example.net")]),
        san=["A.Example.net", "*.Example.net", "a.example.net."],
    )
    path = tmp_path / "c.pem"
    path.write_bytes(pem(cert) + key_pem)
    assert load(path, None).names == ("a.example.net", "*.example.net")


def test_cn_is_used_only_without_san(tmp_path: Path) -> None:
    cert, key_pem = self_signed(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Legacy.Example.net")]), san=None
    )
    path = tmp_path / "c.pem"
    path.write_bytes(pem(cert) + key_pem)
    assert load(path, None).names == ("legacy.example.net",)


def test_no_name_at_all_is_a_warning(tmp_path: Path) -> None:
    cert, key_pem = self_signed(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "My Server")]), san=None
    )
    path = tmp_path / "c.pem"
    path.write_bytes(pem(cert) + key_pem)
    path.chmod(0o600)  # a key readable by others would add its own warning
    loaded = load(path, None)
    assert loaded.names == ()
    assert loaded.warnings == (
        f"{CONFIG}: {WHERE}.cert: {path} covers no DNS name; "
        "it can only serve clients as the default",
    )


# --- what is refused, and how it is told ---


def test_missing_cert_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    assert errors_of(missing, tmp_path / "nope.key") == [
        f"{CONFIG}: {WHERE}.cert: cannot read {missing}: No such file or directory",
        f"{CONFIG}: {WHERE}.key: cannot read {tmp_path / 'nope.key'}: No such file or directory",
    ]


def test_a_directory_is_unreadable(tmp_path: Path, ca: selfsigned.CA) -> None:
    made = leaf(tmp_path, ca)
    assert errors_of(made.cert_path, tmp_path) == [
        f"{CONFIG}: {WHERE}.key: cannot read {tmp_path}: Is a directory"
    ]


def test_not_a_certificate(tmp_path: Path, ca: selfsigned.CA) -> None:
    made = leaf(tmp_path, ca)
    junk = tmp_path / "junk.pem"
    junk.write_bytes(b"hello, I am not DER\n")
    [line] = errors_of(junk, made.key_path)
    assert (
        line == f"{CONFIG}: {WHERE}.cert: {junk} is not a certificate (neither PEM nor DER X.509)"
    )


def test_cert_and_key_swapped(tmp_path: Path, ca: selfsigned.CA) -> None:
    made = leaf(tmp_path, ca)
    errors = errors_of(made.key_path, made.cert_path)
    assert errors[0].startswith(f"{CONFIG}: {WHERE}.cert: {made.key_path} holds no certificate")
    assert "did you swap cert and key?" in errors[0]
    assert errors[1] == f"{CONFIG}: {WHERE}.key: {made.cert_path} holds no private key"


def test_no_key_in_the_cert_file(tmp_path: Path, ca: selfsigned.CA) -> None:
    made = leaf(tmp_path, ca)
    assert errors_of(made.cert_path, None) == [
        f"{CONFIG}: {WHERE}.cert: {made.cert_path} holds no private key: "
        f"add it to the file or set {WHERE}.key"
    ]


def test_der_certificate_without_a_key_setting(tmp_path: Path, ca: selfsigned.CA) -> None:
    made = leaf(tmp_path, ca)
    der = tmp_path / "c.der"
    der.write_bytes(read_cert(made.cert_path).public_bytes(serialization.Encoding.DER))
    [line] = errors_of(der, None)
    assert "DER certificate, which cannot hold the key" in line


def test_encrypted_key(tmp_path: Path, ca: selfsigned.CA) -> None:
    made = leaf(tmp_path, ca)
    key = serialization.load_pem_private_key(made.key_path.read_bytes(), password=None)
    encrypted = tmp_path / "enc.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    [line] = errors_of(made.cert_path, encrypted)
    assert line == (
        f"{CONFIG}: {WHERE}.key: the private key in {encrypted} is encrypted; "
        "edgeterm needs it unencrypted"
    )


def test_small_rsa_key(tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    path = tmp_path / "small.key"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert, _ = self_signed(x509.Name([]), san=["x.example"])
    cert_path = tmp_path / "c.pem"
    cert_path.write_bytes(pem(cert))
    [line] = errors_of(cert_path, path)
    assert "has 1024 bits; at least 2048" in line


def test_key_mismatch(tmp_path: Path, ca: selfsigned.CA) -> None:
    one = leaf(tmp_path / "one", ca, "one.example.com")
    two = leaf(tmp_path / "two", ca, "two.example.com")
    assert errors_of(one.cert_path, two.key_path) == [
        f"{CONFIG}: {WHERE}.key: the private key does not match the certificate in "
        f"{one.cert_path} (CN=one.example.com)"
    ]


def test_chain_out_of_order(tmp_path: Path, ca: selfsigned.CA) -> None:
    made = leaf(tmp_path, ca, "order.example.com")
    chain = tmp_path / "chain.pem"
    chain.write_bytes(ca.cert_path.read_bytes() + made.cert_path.read_bytes())
    ca_name = ca.cert.subject.rfc4514_string()
    assert errors_of(chain, made.key_path) == [
        f"{CONFIG}: {WHERE}.key: the private key matches certificate 2 in {chain} "
        "(CN=order.example.com), not the first: put the server's certificate first",
        f"{CONFIG}: {WHERE}.cert: chain out of order in {chain}: certificate 1 ({ca_name}) "
        f"is issued by {ca_name}, but certificate 2 is CN=order.example.com; "
        "order: server certificate, then each issuer",
    ]


def test_chain_with_a_lookalike_issuer(tmp_path: Path, ca: selfsigned.CA) -> None:
    # Same subject name as the real CA, other key: the names line up, the signature does not.
    impostor, _ = self_signed(ca.cert.subject, san=None)
    made = leaf(tmp_path, ca, "sig.example.com")
    chain = tmp_path / "chain.pem"
    chain.write_bytes(made.cert_path.read_bytes() + pem(impostor))
    [line] = errors_of(chain, made.key_path)
    assert "certificate 1 (CN=sig.example.com) is not signed by the key of certificate 2" in line


def test_expired(tmp_path: Path, ca: selfsigned.CA) -> None:
    made = leaf(tmp_path, ca, valid_from=NOW - dt.timedelta(days=40), days=30)
    not_after = read_cert(made.cert_path).not_valid_after_utc
    assert errors_of(made.cert_path, made.key_path) == [
        f"{CONFIG}: {WHERE}.cert: the certificate in {made.cert_path} expired on "
        f"{not_after:%Y-%m-%d %H:%M:%S} UTC"
    ]


def test_not_yet_valid(tmp_path: Path, ca: selfsigned.CA) -> None:
    made = leaf(tmp_path, ca, valid_from=NOW + dt.timedelta(days=2))
    [line] = errors_of(made.cert_path, made.key_path)
    assert "is not valid before" in line


def test_expiring_in_five_days_is_a_warning(tmp_path: Path, ca: selfsigned.CA) -> None:
    made = leaf(tmp_path, ca, valid_from=NOW - dt.timedelta(days=1), days=6)
    loaded = load(made.cert_path, made.key_path)
    [warning] = loaded.warnings
    assert warning.startswith(f"{CONFIG}: {WHERE}.cert: the certificate in {made.cert_path}")
    assert warning.endswith("(in 4 days)") or warning.endswith("(in 5 days)")


def test_all_problems_of_a_certificate_come_together(tmp_path: Path, ca: selfsigned.CA) -> None:
    expired = leaf(tmp_path / "a", ca, valid_from=NOW - dt.timedelta(days=40), days=30)
    other = leaf(tmp_path / "b", ca)
    chain = tmp_path / "chain.pem"
    chain.write_bytes(ca.cert_path.read_bytes() + expired.cert_path.read_bytes())
    errors = errors_of(chain, other.key_path)
    assert [e.split(": ", 2)[1] for e in errors] == [
        f"{WHERE}.key",
        f"{WHERE}.cert",
        f"{WHERE}.cert",
    ]
    assert "does not match" in errors[0]
    assert "chain out of order" in errors[1]
    assert "expired on" in errors[2]
