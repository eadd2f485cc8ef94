"""Loading and checking certificates (PEM chain + key, or DER) with ``cryptography``.

Every problem names the config file and key path, e.g.
``etc/edgeterm.toml: tls.certificates[1].cert: expired on 2024-03-01 12:00:00 UTC``, and all
problems of one certificate are reported together in one :class:`ConfigError`.

Checks: the files are readable and hold a certificate / an unencrypted private key; the key
matches the first (server) certificate; each certificate is issued (and signed) by the next one;
no certificate is expired or not yet valid (a warning within :data:`EXPIRY_WARNING_DAYS`); the
key is usable for TLS (RSA >= 2048 bits, ECDSA on P-256/P-384/P-521, Ed25519/Ed448). A file
holding the private key that every user may read (mode o+r) is a warning.

The names a certificate covers are its subjectAltName DNS names, lowercased; the subject CN is
used only when there is no DNS name in the subjectAltName (RFC 6125).
"""

from __future__ import annotations

import datetime as dt
import itertools
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID

from edgeterm.config import CertificateConfig
from edgeterm.errors import ConfigError

__all__ = ["EXPIRY_WARNING_DAYS", "LoadedCert", "load_certificate"]

EXPIRY_WARNING_DAYS = 14
MAX_FILE_SIZE = 1024 * 1024  # no certificate or key file is larger; refuse to slurp a wrong path
MIN_RSA_BITS = 2048  # OpenSSL's default security level refuses smaller keys anyway
TLS_CURVES = ("secp256r1", "secp384r1", "secp521r1")  # the ECDSA curves TLS 1.3 signs with

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----.*?-----END \1-----", re.DOTALL)
_CERT_LABELS = (b"CERTIFICATE", b"X509 CERTIFICATE")
_KEY_LABELS = (b"PRIVATE KEY", b"RSA PRIVATE KEY", b"EC PRIVATE KEY", b"ENCRYPTED PRIVATE KEY")
_HOSTNAME = re.compile(
    r"^(\*\.)?[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*$"
)

_ServerKey = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)


@dataclass(frozen=True, slots=True)
class LoadedCert:
    """A checked certificate, normalized for ``ssl.SSLContext.load_cert_chain``."""

    cert_path: Path
    key_path: Path  # equals cert_path when the key is in the cert file
    names: tuple[str, ...]  # DNS names covered, lowercased; may hold wildcards ("*.example.org")
    not_after: dt.datetime  # the server (first) certificate's expiry, UTC
    warnings: tuple[str, ...]  # "<config file>: <key path>.cert: ..." lines
    chain_pem: bytes = field(repr=False)  # server certificate first, then the chain, PEM
    key_pem: bytes = field(repr=False)  # PKCS#8 PEM, unencrypted: never log or write it


class _Problems:
    """Collects the lines of one certificate's ConfigError."""

    def __init__(self, config_file: str, key_path: str) -> None:
        self.key_path = key_path
        self.prefix = f"{config_file}: {key_path}"
        self.errors: list[str] = []
        self.warnings: list[str] = []

    def error(self, which: str, message: str) -> None:
        self.errors.append(f"{self.prefix}.{which}: {message}")

    def warn(self, which: str, message: str) -> None:
        self.warnings.append(f"{self.prefix}.{which}: {message}")


def _when(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _describe(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "an empty subject"


def _read(path: Path, which: str, problems: _Problems) -> bytes | None:
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_FILE_SIZE + 1)
    except OSError as exc:
        problems.error(which, f"cannot read {path}: {exc.strerror or exc}")
        return None
    if len(data) > MAX_FILE_SIZE:
        problems.error(which, f"{path} is larger than {MAX_FILE_SIZE} bytes: not a certificate")
        return None
    if not data.strip():
        problems.error(which, f"{path} is empty")
        return None
    return data


def _pem_blocks(data: bytes) -> list[tuple[bytes, bytes]]:
    return [(match.group(1), match.group(0)) for match in _PEM_BLOCK.finditer(data)]


def _parse_certificates(
    data: bytes, path: Path, problems: _Problems
) -> list[x509.Certificate] | None:
    if b"-----BEGIN" not in data:
        try:
            return [x509.load_der_x509_certificate(data)]
        except ValueError:
            problems.error("cert", f"{path} is not a certificate (neither PEM nor DER X.509)")
            return None
    blocks = _pem_blocks(data)
    chain: list[x509.Certificate] = []
    cert_blocks = [block for label, block in blocks if label in _CERT_LABELS]
    for number, block in enumerate(cert_blocks, start=1):
        try:
            chain.append(x509.load_pem_x509_certificate(block))
        except ValueError as exc:
            problems.error("cert", f"{path}: certificate {number} cannot be parsed: {exc}")
            return None
    if not chain:
        labels = ", ".join(sorted({label.decode() for label, _ in blocks})) or "no PEM block"
        hint = " (did you swap cert and key?)" if any(b[0] in _KEY_LABELS for b in blocks) else ""
        problems.error("cert", f"{path} holds no certificate (found: {labels}){hint}")
        return None
    return chain


def _parse_key(data: bytes, path: Path, which: str, problems: _Problems) -> _ServerKey | None:
    try:
        if b"-----BEGIN" in data:
            keys = [block for label, block in _pem_blocks(data) if label in _KEY_LABELS]
            if not keys:
                if which == "cert":
                    problems.error(
                        "cert",
                        f"{path} holds no private key: add it to the file "
                        f"or set {problems.key_path}.key",
                    )
                else:
                    problems.error("key", f"{path} holds no private key")
                return None
            if len(keys) > 1:
                problems.error(which, f"{path} holds {len(keys)} private keys; keep only one")
                return None
            key = serialization.load_pem_private_key(keys[0], password=None)
        else:
            key = serialization.load_der_private_key(data, password=None)
    except TypeError:
        problems.error(
            which, f"the private key in {path} is encrypted; edgeterm needs it unencrypted"
        )
        return None
    except (ValueError, UnsupportedAlgorithm):
        problems.error(which, f"{path} is not a private key (neither PEM nor DER)")
        return None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            problems.error(
                which, f"the RSA key in {path} has {key.key_size} bits; at least {MIN_RSA_BITS}"
            )
            return None
        return key
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if key.curve.name not in TLS_CURVES:
            problems.error(
                which,
                f"the ECDSA key in {path} is on {key.curve.name}; TLS needs one of "
                + ", ".join(TLS_CURVES),
            )
            return None
        return key
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return key
    problems.error(
        which, f"the {type(key).__name__} in {path} cannot sign TLS handshakes (use RSA or ECDSA)"
    )
    return None


def _check_key_mode(path: Path, which: str, problems: _Problems) -> None:
    """Warn when every user of the host may read the file holding the private key.

    Only the "other" read bit: a key readable by its group is the documented deployment
    (deploy/systemd: 0640 with the edgeterm group; deploy/kubernetes: 0440), as with Debian's
    ``ssl-cert`` group. A warning, not an error. The owner and the directories above are not
    checked.
    """
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return  # it was just read; a vanished file is not this check's problem
    if mode & stat.S_IROTH:
        problems.warn(
            which,
            f"the private key file {path} is readable by other users (mode {mode:04o}); "
            "chmod 600 it",
        )


def _spki(cert_or_key: x509.Certificate | _ServerKey) -> bytes:
    return cert_or_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _check_key_matches(
    chain: list[x509.Certificate], key: _ServerKey, which: str, cert_path: Path, problems: _Problems
) -> None:
    key_spki = _spki(key)
    if _spki(chain[0]) == key_spki:
        return
    for number, cert in enumerate(chain[1:], start=2):
        if _spki(cert) == key_spki:
            problems.error(
                which,
                f"the private key matches certificate {number} in {cert_path} "
                f"({_describe(cert)}), not the first: put the server's certificate first",
            )
            return
    problems.error(
        which,
        f"the private key does not match the certificate in {cert_path} ({_describe(chain[0])})",
    )


def _check_chain_order(chain: list[x509.Certificate], path: Path, problems: _Problems) -> None:
    for number, (child, parent) in enumerate(itertools.pairwise(chain), start=1):
        if child.issuer != parent.subject:
            problems.error(
                "cert",
                f"chain out of order in {path}: certificate {number} ({_describe(child)}) is "
                f"issued by {child.issuer.rfc4514_string()}, but certificate {number + 1} is "
                f"{_describe(parent)}; order: server certificate, then each issuer",
            )
            return
        try:
            child.verify_directly_issued_by(parent)
        except InvalidSignature:
            problems.error(
                "cert",
                f"in {path}, certificate {number} ({_describe(child)}) is not signed by the key "
                f"of certificate {number + 1} ({_describe(parent)})",
            )
            return
        except (ValueError, TypeError, UnsupportedAlgorithm):
            continue  # an algorithm cryptography cannot verify: the names matched, accept


def _check_validity(
    chain: list[x509.Certificate], path: Path, now: dt.datetime, problems: _Problems
) -> None:
    soon = now + dt.timedelta(days=EXPIRY_WARNING_DAYS)
    for number, cert in enumerate(chain, start=1):
        which = "the certificate" if number == 1 else f"certificate {number} ({_describe(cert)})"
        where = f" in {path}"
        not_before, not_after = cert.not_valid_before_utc, cert.not_valid_after_utc
        if not_after < now:
            problems.error("cert", f"{which}{where} expired on {_when(not_after)}")
        elif not_before > now:
            problems.error("cert", f"{which}{where} is not valid before {_when(not_before)}")
        elif not_after < soon:
            days = (not_after - now).days
            problems.warn("cert", f"{which}{where} expires on {_when(not_after)} (in {days} days)")


def _normalize_name(name: str) -> str:
    return name.strip().rstrip(".").lower()


def _names(cert: x509.Certificate, path: Path, problems: _Problems) -> tuple[str, ...]:
    names: list[str] = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [_normalize_name(name) for name in san.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        pass
    except ValueError as exc:
        problems.error("cert", f"the subjectAltName of {path} cannot be parsed: {exc}")
    if not names:
        for attribute in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
            value = attribute.value
            common_name = _normalize_name(value if isinstance(value, str) else value.decode())
            if _HOSTNAME.match(common_name):
                names.append(common_name)
    unique = tuple(dict.fromkeys(name for name in names if name))
    for name in unique:
        if "*" in name and not name.startswith("*."):
            problems.warn("cert", f"{path}: the partial wildcard {name!r} never matches SNI")
    if not unique:
        problems.warn(
            "cert", f"{path} covers no DNS name; it can only serve clients as the default"
        )
    return unique


def load_certificate(
    cfg: CertificateConfig,
    key_path: str,
    config_file: str,
    *,
    now: dt.datetime | None = None,
) -> LoadedCert:
    """Load and check one ``[[tls.certificates]]`` entry.

    ``key_path`` is where it sits in the config (``"tls.certificates[1]"``) and ``config_file``
    the config path as the operator gave it; both prefix every message. Raises
    :class:`ConfigError` with every problem found.
    """
    problems = _Problems(config_file, key_path)
    moment = now if now is not None else dt.datetime.now(dt.UTC)

    cert_data = _read(cfg.cert, "cert", problems)
    chain = _parse_certificates(cert_data, cfg.cert, problems) if cert_data is not None else None

    key: _ServerKey | None = None
    if cfg.key is None:
        if cert_data is not None and b"-----BEGIN" in cert_data:
            key = _parse_key(cert_data, cfg.cert, "cert", problems)
            if key is not None:
                _check_key_mode(cfg.cert, "cert", problems)
        elif cert_data is not None:
            problems.error(
                "cert",
                f"{cfg.cert} is a DER certificate, which cannot hold the key: set {key_path}.key",
            )
    else:
        key_data = _read(cfg.key, "key", problems)
        if key_data is not None:
            key = _parse_key(key_data, cfg.key, "key", problems)
            if key is not None:
                _check_key_mode(cfg.key, "key", problems)

    names: tuple[str, ...] = ()
    if chain is not None:
        if key is not None:
            _check_key_matches(chain, key, "cert" if cfg.key is None else "key", cfg.cert, problems)
        _check_chain_order(chain, cfg.cert, problems)
        _check_validity(chain, cfg.cert, moment, problems)
        names = _names(chain[0], cfg.cert, problems)

    if problems.errors or chain is None or key is None:
        raise ConfigError(problems.errors)
    return LoadedCert(
        cert_path=cfg.cert,
        key_path=cfg.key if cfg.key is not None else cfg.cert,
        names=names,
        not_after=chain[0].not_valid_after_utc,
        warnings=tuple(problems.warnings),
        chain_pem=b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in chain),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
