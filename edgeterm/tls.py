"""Server SSLContexts, one per certificate, and the SNI choice between them.

Policy (see docs/tls.md): TLS 1.2 and 1.3 only, TLS 1.3 preferred; ECDHE + AEAD for TLS 1.2
("intermediate"), TLS 1.3 only ("modern"), or an OpenSSL cipher string; key exchange groups
X25519, P-256, P-384; no compression, no renegotiation, server cipher preference; client
certificates when ``tls.client_auth`` asks for them (docs/routing.md).

Sockets are wrapped with :attr:`TlsContexts.default` (the first certificate's context); its SNI
callback switches the connection to the context whose certificate covers the requested name:
exact name first, then a wildcard covering exactly one more label, then the default.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field

from edgeterm import openssl
from edgeterm.certs import LoadedCert, load_certificate
from edgeterm.config import TlsConfig, TlsVersionName
from edgeterm.errors import ConfigError, StartupError

__all__ = [
    "GROUPS",
    "INTERMEDIATE_TLS12_CIPHERS",
    "TlsContexts",
    "build_contexts",
    "new_server_context",
]

# Mozilla "intermediate" minus the DHE suites: ECDHE key exchange, AEAD only; ECDSA and RSA.
INTERMEDIATE_TLS12_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    )
)
GROUPS = "X25519:P-256:P-384"
# SSL_OP_PRIORITIZE_CHACHA (not exported by the ssl module): with server preference, still pick
# ChaCha20-Poly1305 for clients that list it first (phones without AES instructions).
OP_PRIORITIZE_CHACHA = 1 << 21

_VERSIONS: Mapping[TlsVersionName, ssl.TLSVersion] = {
    "TLSv1.2": ssl.TLSVersion.TLSv1_2,
    "TLSv1.3": ssl.TLSVersion.TLSv1_3,
}


def _cipher_policy(tls: TlsConfig) -> tuple[str, ssl.TLSVersion]:
    """The TLS 1.2 cipher string and the minimum version for ``tls.ciphers``."""
    minimum = _VERSIONS[tls.min_version]
    if tls.ciphers == "intermediate":
        return INTERMEDIATE_TLS12_CIPHERS, minimum
    if tls.ciphers == "modern":
        return INTERMEDIATE_TLS12_CIPHERS, ssl.TLSVersion.TLSv1_3
    return tls.ciphers, minimum


def new_server_context(tls: TlsConfig, config_file: str) -> ssl.SSLContext:
    """A server context with edgeterm's policy and no certificate yet.

    Raises :class:`ConfigError` for an unusable ``tls.ciphers`` or ``tls.alpn``, and
    :class:`StartupError` when OpenSSL cannot be reached for the groups.
    """
    ciphers, minimum = _cipher_policy(tls)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = minimum
    ctx.maximum_version = ssl.TLSVersion.MAXIMUM_SUPPORTED
    try:
        ctx.set_ciphers(ciphers)  # TLS 1.2 and below; TLS 1.3 keeps all its (AEAD) suites
    except (ssl.SSLError, ValueError) as exc:  # ValueError: a NUL in the string
        raise ConfigError(
            [f"{config_file}: tls.ciphers: OpenSSL accepts no cipher from {tls.ciphers!r} ({exc})"]
        ) from None
    options = (
        ssl.OP_NO_COMPRESSION
        | ssl.OP_NO_RENEGOTIATION
        | ssl.OP_CIPHER_SERVER_PREFERENCE
        | OP_PRIORITIZE_CHACHA
    )
    if not tls.tickets.enabled:
        options |= ssl.OP_NO_TICKET
    ctx.options |= options
    # TLS 1.3 tickets per full handshake; with tickets off, also none from the (per-process)
    # stateful cache, which could not resume on a sibling worker anyway.
    ctx.num_tickets = tls.tickets.count if tls.tickets.enabled else 0
    ctx.verify_mode = ssl.CERT_NONE
    _client_auth(ctx, tls, config_file)
    if tls.alpn:
        try:
            ctx.set_alpn_protocols(list(tls.alpn))
        except (ValueError, TypeError) as exc:
            raise ConfigError([f"{config_file}: tls.alpn: {exc}"]) from None
    openssl.set_groups(ctx, GROUPS)
    # Read whole socket buffers, not a 5-byte header and then a record body: one read(2) per
    # burst of records instead of two per record. Bytes OpenSSL has read but not yet returned
    # do not wake epoll; the worker checks openssl.has_pending() where it pauses reading.
    openssl.set_read_ahead(ctx, True)
    return ctx


def _client_auth(ctx: ssl.SSLContext, tls: TlsConfig, config_file: str) -> None:
    """``tls.client_auth``, ``tls.client_ca``, ``tls.client_crl`` (docs/routing.md).

    Every context gets the same settings: after the SNI switch OpenSSL verifies the client's
    certificate with the store of the context it switched to. "optional" is OpenSSL's
    SSL_VERIFY_PEER without FAIL_IF_NO_PEER_CERT: a client without a certificate is accepted,
    one whose certificate does not verify is refused. With a CRL only the client's own
    certificate is checked (VERIFY_CRL_CHECK_LEAF); its issuer's CRL must be in the file, or
    every certificate fails (fail closed).
    """
    if tls.client_auth == "none":
        return
    if tls.client_ca is None:
        raise ConfigError([f"{config_file}: tls.client_ca: required with client_auth"])
    for key, path, kind in (
        ("client_ca", tls.client_ca, "x509_ca"),
        ("client_crl", tls.client_crl, "crl"),
    ):
        if path is None:
            continue
        before = ctx.cert_store_stats()[kind]
        try:
            ctx.load_verify_locations(cafile=str(path))
        except OSError as exc:
            raise ConfigError(
                [f"{config_file}: tls.{key}: cannot read {path}: {exc.strerror or exc}"]
            ) from None
        except ssl.SSLError as exc:
            raise ConfigError(
                [f"{config_file}: tls.{key}: OpenSSL refused {path}: {exc.reason or exc}"]
            ) from None
        if ctx.cert_store_stats()[kind] == before:
            what = "CA certificate" if kind == "x509_ca" else "CRL"
            raise ConfigError([f"{config_file}: tls.{key}: no {what} in {path}"])
    if tls.client_crl is not None:
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.client_auth == "required" else ssl.CERT_OPTIONAL


def _load_chain(ctx: ssl.SSLContext, cert: LoadedCert) -> None:
    """``load_cert_chain`` from an anonymous memory file: key material never touches a disk."""
    try:
        fd = os.memfd_create("edgeterm-cert", os.MFD_CLOEXEC)
    except OSError as exc:
        raise StartupError(f"cannot create an in-memory file for a certificate: {exc}") from None
    try:
        size = 0
        for part in (cert.chain_pem, cert.key_pem):
            view = memoryview(part)
            while view:
                written = os.write(fd, view)
                size += written
                view = view[written:]
        try:
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        except FileNotFoundError:
            raise StartupError("loading certificates needs /proc mounted (/proc/self/fd)") from None
    finally:
        try:
            os.pwrite(fd, bytes(size), 0)  # overwrite the key before the pages are released
        finally:
            os.close(fd)


def _wildcard_base(name: str) -> str | None:
    """``example.org`` for ``*.example.org``; None for an exact name or a partial wildcard."""
    if name.startswith("*.") and "*" not in name[2:] and len(name) > 2:
        return name[2:]
    return None


@dataclass(frozen=True, slots=True)
class TlsContexts:
    """The server contexts of one generation and the SNI choice between them."""

    default: ssl.SSLContext  # wrap every accepted socket with this one
    contexts: tuple[ssl.SSLContext, ...]  # one per certificate, in config order
    certs: tuple[LoadedCert, ...]
    warnings: tuple[str, ...]
    _exact: Mapping[str, ssl.SSLContext] = field(repr=False)
    _wildcard: Mapping[str, ssl.SSLContext] = field(repr=False)  # "example.org" for *.example.org
    strict_sni: bool = False  # tls.strict_sni: refuse a name no certificate covers

    def select(self, server_name: str | None) -> ssl.SSLContext:
        """The context for ``server_name``: exact, then one-label wildcard, then the default."""
        chosen = self.match(server_name)
        return self.default if chosen is None else chosen

    def match(self, server_name: str | None) -> ssl.SSLContext | None:
        """The context whose certificate covers ``server_name`` (exact, then one-label
        wildcard), or None."""
        if server_name is None:
            return None
        chosen = self._exact.get(server_name)
        if chosen is not None:
            return chosen
        name = server_name.lower()
        if name.endswith("."):
            name = name[:-1]
        if name != server_name:
            chosen = self._exact.get(name)
            if chosen is not None:
                return chosen
        dot = name.find(".")
        if dot > 0:  # the wildcard stands for one non-empty label
            chosen = self._wildcard.get(name[dot + 1 :])
            if chosen is not None:
                return chosen
        return None

    def sni_callback(
        self, sslobj: ssl.SSLObject, server_name: str | None, ctx: ssl.SSLContext
    ) -> int | None:
        """Installed on :attr:`default`; OpenSSL calls it during the ClientHello.

        With ``strict_sni``, a name no certificate covers (or no name) is refused with the
        ``unrecognized_name`` alert; otherwise it gets the default certificate.
        """
        chosen = self.match(server_name)
        if chosen is None:
            if self.strict_sni:
                return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
            chosen = self.default
        if chosen is not ctx:
            sslobj.context = chosen
        return None


def build_contexts(tls: TlsConfig, config_file: str) -> TlsContexts:
    """Load and check every certificate, then build one server context per certificate.

    All certificate problems, of every certificate, are raised together in one
    :class:`ConfigError`. When two certificates cover the same name, the first one wins and a
    warning says so.
    """
    if not tls.certificates:
        raise ConfigError([f"{config_file}: tls.certificates: at least one certificate is needed"])
    openssl.self_check()  # StartupError now rather than on the first connection
    errors: list[str] = []
    first_ctx: ssl.SSLContext | None = None
    try:
        first_ctx = new_server_context(tls, config_file)  # a bad cipher string fails once, here
    except ConfigError as exc:
        errors.extend(exc.errors)
    loaded: list[LoadedCert] = []
    for index, cert_cfg in enumerate(tls.certificates):
        try:
            loaded.append(load_certificate(cert_cfg, f"tls.certificates[{index}]", config_file))
        except ConfigError as exc:
            errors.extend(exc.errors)
    if errors or first_ctx is None:
        raise ConfigError(errors)

    contexts: list[ssl.SSLContext] = []
    for index, cert in enumerate(loaded):
        ctx = first_ctx if index == 0 else new_server_context(tls, config_file)
        try:
            _load_chain(ctx, cert)
        except ssl.SSLError as exc:
            errors.append(
                f"{config_file}: tls.certificates[{index}].cert: OpenSSL refused "
                f"{cert.cert_path}: {exc.reason or exc}"
            )
        contexts.append(ctx)
    if errors:
        raise ConfigError(errors)

    warnings: list[str] = [line for cert in loaded for line in cert.warnings]
    exact: dict[str, ssl.SSLContext] = {}
    wildcard: dict[str, ssl.SSLContext] = {}
    owner: dict[str, int] = {}  # name as written in the certificate -> index of the first holder
    for index, (cert, ctx) in enumerate(zip(loaded, contexts, strict=True)):
        for name in cert.names:
            first = owner.setdefault(name, index)
            if first != index:
                warnings.append(
                    f"{config_file}: tls.certificates[{index}].cert: {name} is also covered by "
                    f"tls.certificates[{first}], which wins (the first certificate listed)"
                )
                continue
            base = _wildcard_base(name)
            if base is not None:
                wildcard[base] = ctx
            elif "*" not in name:
                exact[name] = ctx

    result = TlsContexts(
        default=contexts[0],
        contexts=tuple(contexts),
        certs=tuple(loaded),
        warnings=tuple(warnings),
        _exact=exact,
        _wildcard=wildcard,
        strict_sni=tls.strict_sni,
    )
    result.default.sni_callback = result.sni_callback
    return result
