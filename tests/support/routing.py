"""Helpers for the routing, upstream, PROXY protocol and client certificate tests (issue 7).

- ``NamedUpstream``: an echo server that first sends its name (``b"<name>\\n"``), so a client
  knows which server it reached; optionally on a fixed port (to bring a killed server back)
  or a Unix socket; optionally decoding a PROXY header first (``proxy=True``), with every
  decoded header kept in ``headers`` (or the error in ``header_errors``).
- ``ClientPki``: a client CA, client certificates (valid, revoked, from an untrusted CA) and
  a CRL, made with ``cryptography``.
- ``tls_after_header``: connect, send raw bytes (a PROXY header), then TLS on the same socket.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edgeterm.proxyproto import ParseResult, ProxyHeaderError, ProxyHeaderParser
from edgeterm.selfsigned import ca_certificate

from .tlsclient import HOST, recv_exactly
from .upstreams import CHUNK, ConnRecord, Upstream, UpstreamLoop


class NamedUpstream(Upstream):
    """Greets with its name, then echoes; see the module docstring."""

    def __init__(
        self,
        loop: UpstreamLoop,
        *,
        name: str = "up",
        port: int = 0,
        unix_path: Path | None = None,
        proxy: bool = False,
        greet: bool = True,
        **kw: Any,
    ) -> None:
        super().__init__(loop, **kw)
        self.name = name
        self.port = port
        self.unix_path = unix_path
        self.proxy = proxy
        self.greet = greet
        self.headers: list[ParseResult] = []
        self.header_errors: list[str] = []

    @property
    def addr(self) -> str:
        if self.unix_path is not None:
            return f"unix:{self.unix_path}"
        return f"{HOST}:{self.port}"

    async def _start(self) -> None:
        if self.unix_path is not None:
            self._server = await asyncio.start_unix_server(
                self._handle, str(self.unix_path), backlog=self._backlog, limit=CHUNK
            )
            return
        self._server = await asyncio.start_server(
            self._handle, HOST, self.port, backlog=self._backlog, limit=CHUNK, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def serve(
        self, rec: ConnRecord, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        rest = b""
        if self.proxy:
            parser = ProxyHeaderParser()
            result = None
            while result is None:
                data = await reader.read(4096)
                if not data:
                    return  # a health check closing without a header (or with a part of one)
                rec.on_received(data)
                try:
                    result = parser.feed(data)
                except ProxyHeaderError as exc:
                    self.header_errors.append(str(exc))
                    return
            self.headers.append(result)
            rest = result.rest
        if self.greet:
            hello = self.name.encode() + b"\n"
            rec.on_sent(hello)
            writer.write(hello)
        if rest:
            rec.on_sent(rest)
            writer.write(rest)
        while data := await reader.read(CHUNK):
            rec.on_received(data)
            writer.write(data)
            rec.on_sent(data)
            await writer.drain()
        rec.eof_received = True
        if writer.can_write_eof():
            writer.write_eof()

    def client_connections(self) -> list[ConnRecord]:
        """Connections that carried client bytes: not the supervisor's health checks, which
        send nothing (without ``proxy``; with it, count ``headers`` instead)."""
        return [r for r in self.connections() if r.received > 0]


def read_name(sock: socket.socket, *, timeout: float = 10.0) -> str:
    """The greeting line of a ``NamedUpstream``, read through edgeterm."""
    line = b""
    while not line.endswith(b"\n"):
        line += recv_exactly(sock, 1, timeout=timeout)
    return line[:-1].decode()


def tls_after_header(
    port: int,
    ctx: ssl.SSLContext,
    header: bytes,
    *,
    server_hostname: str | None = "localhost",
    timeout: float = 10.0,
) -> ssl.SSLSocket:
    """What a client behind an L4 balancer looks like: the PROXY header, then TLS."""
    raw = socket.create_connection((HOST, port), timeout=timeout)
    try:
        raw.sendall(header)
        return ctx.wrap_socket(raw, server_hostname=server_hostname, suppress_ragged_eofs=False)
    except BaseException:
        raw.close()
        raise


# client certificates ------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _ca(cn: str, now: dt.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = ca_certificate(key, _name(cn), now - dt.timedelta(days=1), now + dt.timedelta(days=30))
    return cert, key


def _leaf(
    cn: str, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, now: dt.datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


@dataclass(frozen=True)
class ClientCert:
    cn: str
    cert: Path
    key: Path

    def context(self, server_ca: Path, **kw: Any) -> ssl.SSLContext:
        from .tlsclient import client_context

        ctx = client_context(server_ca, **kw)
        ctx.load_cert_chain(str(self.cert), str(self.key))
        return ctx


@dataclass(frozen=True)
class ClientPki:
    ca: Path  # the client CA edgeterm trusts (tls.client_ca)
    crl: Path  # its CRL, revoking ``revoked``
    valid: ClientCert  # CN "alice"
    revoked: ClientCert  # CN "mallory", in the CRL
    untrusted: ClientCert  # CN "eve", from a CA edgeterm does not know


def make_client_pki(directory: Path) -> ClientPki:
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca, ca_key = _ca("edgeterm test client CA", now)
    other, other_key = _ca("some other CA", now)
    (directory / "client-ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))

    def leaf(cn: str, issuer: x509.Certificate, issuer_key: Any) -> tuple[ClientCert, Any]:
        cert, key = _leaf(cn, issuer, issuer_key, now)
        cpath, kpath = directory / f"{cn}.pem", directory / f"{cn}.key"
        cpath.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        kpath.write_bytes(_pem_key(key))
        kpath.chmod(0o600)
        return ClientCert(cn, cpath, kpath), cert

    valid, _ = leaf("alice", ca, ca_key)
    revoked, revoked_cert = leaf("mallory", ca, ca_key)
    untrusted, _ = leaf("eve", other, other_key)
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(now - dt.timedelta(hours=1))
        .next_update(now + dt.timedelta(days=7))
        .add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(revoked_cert.serial_number)
            .revocation_date(now - dt.timedelta(minutes=5))
            .build()
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    (directory / "client-crl.pem").write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    return ClientPki(
        ca=directory / "client-ca.pem",
        crl=directory / "client-crl.pem",
        valid=valid,
        revoked=revoked,
        untrusted=untrusted,
    )
