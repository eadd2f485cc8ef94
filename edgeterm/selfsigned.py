"""A private CA and leaf certificates signed by it, for ``make run``, ``edgeterm init`` and tests.

Files written into the target directory:

- ``ca.pem`` / ``ca.key``: the CA (created unless one is passed in); trust ``ca.pem`` in clients;
- ``<basename>.pem``: the leaf certificate alone (the CA is the trust anchor, not sent);
- ``<basename>.key``: the leaf's private key, unencrypted PKCS#8 PEM, mode 0600.

Command line: ``python -m edgeterm.selfsigned DIR [NAME...]`` creates ``DIR/localhost.pem``
(and a CA, unless ``DIR`` already holds one) only when it does not exist yet.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import secrets
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CA", "GeneratedCert", "KeyType", "generate", "load_ca", "main"]

KeyType = Literal["ecdsa-p256", "rsa-2048"]
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

CA_CERT_NAME = "ca.pem"
CA_KEY_NAME = "ca.key"
_CA_DAYS = 3650
_BACKDATE = dt.timedelta(minutes=5)  # tolerate clients whose clocks run a little behind


@dataclass(frozen=True, slots=True)
class CA:
    cert: x509.Certificate
    key: PrivateKey
    cert_path: Path
    key_path: Path


@dataclass(frozen=True, slots=True)
class GeneratedCert:
    cert_path: Path  # the leaf certificate (PEM)
    key_path: Path  # its private key (PEM, 0600)
    ca_cert_path: Path
    ca_key_path: Path
    names: tuple[str, ...]
    not_after: dt.datetime


def _new_key(key_type: KeyType) -> PrivateKey:
    if key_type == "rsa-2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write atomically (temporary file + rename) with ``mode`` from the first byte on."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed it; never widen a key beyond mode
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        temporary.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(temporary, path)


def ca_certificate(
    key: PrivateKey, name: x509.Name, not_before: dt.datetime, not_after: dt.datetime
) -> x509.Certificate:
    """A self-signed CA certificate for ``key`` (may sign leaves and CRLs, no sub-CAs)."""
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def _create_ca(directory: Path, key_type: KeyType, now: dt.datetime, days: int) -> CA:
    key = _new_key(key_type)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgeterm"),
            # A unique name, so two test CAs never shadow each other in a trust store.
            x509.NameAttribute(NameOID.COMMON_NAME, f"edgeterm local CA {secrets.token_hex(4)}"),
        ]
    )
    cert = ca_certificate(key, name, now - _BACKDATE, now + dt.timedelta(days=max(days, _CA_DAYS)))
    cert_path, key_path = directory / CA_CERT_NAME, directory / CA_KEY_NAME
    _write(key_path, _key_pem(key), 0o600)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return CA(cert=cert, key=key, cert_path=cert_path, key_path=key_path)


def load_ca(directory: Path) -> CA:
    """The CA that an earlier :func:`generate` wrote into ``directory``."""
    cert_path, key_path = directory / CA_CERT_NAME, directory / CA_KEY_NAME
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ValueError(f"{key_path}: unsupported CA key type {type(key).__name__}")
    return CA(cert=cert, key=key, cert_path=cert_path, key_path=key_path)


def _subject_alt_names(names: Sequence[str]) -> list[x509.GeneralName]:
    general: list[x509.GeneralName] = [x509.DNSName(name) for name in names]
    if "localhost" in names:
        general.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
        general.append(x509.IPAddress(ipaddress.ip_address("::1")))
    return general


def generate(
    directory: Path,
    names: Sequence[str] = ("localhost",),
    *,
    basename: str = "localhost",
    key_type: KeyType = "ecdsa-p256",
    days: int = 365,
    ca: CA | None = None,
    valid_from: dt.datetime | None = None,
) -> GeneratedCert:
    """Write a leaf certificate for ``names`` (DNS SANs) signed by ``ca`` (or a new CA).

    ``valid_from`` (default: now, minus a few minutes for clock skew) and ``days`` set the
    validity window; tests use them to make expired and not-yet-valid certificates.
    """
    if not names:
        raise ValueError("a certificate needs at least one name")
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    if ca is None:
        ca = _create_ca(directory, key_type, now, days)
    start = valid_from if valid_from is not None else now - _BACKDATE
    not_after = start + dt.timedelta(days=days)
    key = _new_key(key_type)
    public = key.public_key()
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    is_rsa = isinstance(key, rsa.RSAPrivateKey)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca.cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=is_rsa,  # RSA key transport (TLS 1.2 clients may ask)
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(_subject_alt_names(names)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{basename}.pem", directory / f"{basename}.key"
    _write(key_path, _key_pem(key), 0o600)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return GeneratedCert(
        cert_path=cert_path,
        key_path=key_path,
        ca_cert_path=ca.cert_path,
        ca_key_path=ca.key_path,
        names=tuple(names),
        not_after=not_after,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m edgeterm.selfsigned DIR [NAME...]``: create DIR/localhost.pem if absent."""
    parser = argparse.ArgumentParser(
        prog="python -m edgeterm.selfsigned",
        description="Create a local CA and a certificate for development (only if absent).",
    )
    parser.add_argument("directory", type=Path)
    parser.add_argument("names", nargs="*", default=["localhost"], help="DNS names (localhost)")
    args = parser.parse_args(argv)
    directory: Path = args.directory
    names: list[str] = args.names
    target = directory / "localhost.pem"
    if target.exists():
        print(f"{target} exists; nothing to do")
        return 0
    ca: CA | None = None
    if (directory / CA_CERT_NAME).exists() and (directory / CA_KEY_NAME).exists():
        ca = load_ca(directory)
        print(f"using the existing CA {ca.cert_path}")
    generated = generate(directory, names, ca=ca)
    if ca is None:
        print(f"created CA {generated.ca_cert_path} (key {generated.ca_key_path})")
    print(
        f"created {generated.cert_path} (key {generated.key_path}) for {', '.join(names)}, "
        f"valid until {generated.not_after:%Y-%m-%d}"
    )
    print(f"clients can trust {generated.ca_cert_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
