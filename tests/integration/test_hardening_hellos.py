"""Odd and hostile ClientHellos, garbage after the handshake, renegotiation and key updates.

ClientHellos are built byte by byte here (``client_hello``) so that each odd case is exactly
what it says. The rules they are held to (OpenSSL's, which edgeterm keeps):

| case                                   | outcome                                       |
|----------------------------------------|-----------------------------------------------|
| SNI of 255 bytes (the maximum)         | served (ServerHello, then a full session)     |
| SNI of 256 bytes, or holding a NUL     | refused: fatal alert unrecognized_name (112)  |
| an empty SNI name                      | served with the default certificate (OpenSSL) |
| 300 unknown extensions                 | served (unknown extensions are ignored)       |
| the same extension twice               | refused: fatal alert illegal_parameter (47)   |
| no SNI                                 | served with the default certificate           |
| only unknown ALPN protocols            | served, without ALPN                          |
| a ClientHello in 1-byte records        | served                                        |
| a 60 KB ClientHello (padding)          | served                                        |
| a ClientHello announcing 200 KiB       | refused at its header: fatal alert            |
| only TLS 1.0/1.1                       | refused: protocol_version (70)                |
| only weak cipher suites (RC4, 3DES...) | refused: handshake_failure (40)               |
| an extension longer than the hello     | refused: decode_error (50)                    |

After every case the next client is served, the worker is the same process, and the server
logs no traceback (the ``edgeterm`` fixture fails the test on one).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import ssl
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from tests.support.tlsclient import (
    HOST,
    BioTlsClient,
    client_context,
    connect_tls,
    recv_exactly,
    s_client_args,
    tls_alert,
    wait_peer_close,
)
from tests.support.waiting import Deadline

pytestmark = pytest.mark.timeout(90)

# alert descriptions (RFC 8446 §6)
HANDSHAKE_FAILURE, ILLEGAL_PARAMETER, DECODE_ERROR = 40, 47, 50
PROTOCOL_VERSION, UNRECOGNIZED_NAME = 70, 112

# -- a ClientHello, byte by byte --------------------------------------------------------------

TLS13_SUITES = (0x1301, 0x1302, 0x1303)
TLS12_SUITES = (0xC02B, 0xC02F, 0xC02C, 0xC030, 0xCCA9, 0xCCA8)
WEAK_SUITES = (0x0005, 0x000A, 0xC012, 0x0001, 0x002F)  # RC4, 3DES, 3DES, NULL, RSA-AES-CBC
SIG_ALGS = (0x0403, 0x0503, 0x0804, 0x0805, 0x0401, 0x0501)


def _u8(b: bytes) -> bytes:
    return struct.pack(">B", len(b)) + b


def _u16(b: bytes) -> bytes:
    return struct.pack(">H", len(b)) + b


def ext(kind: int, data: bytes) -> bytes:
    return struct.pack(">H", kind) + _u16(data)


def sni_ext(name: bytes) -> bytes:
    return ext(0, _u16(b"\x00" + _u16(name)))


def alpn_ext(protocols: list[bytes]) -> bytes:
    return ext(16, _u16(b"".join(_u8(p) for p in protocols)))


def client_hello(
    *,
    sni: bytes | None = b"localhost",
    alpn: list[bytes] | None = None,
    versions: tuple[int, ...] = (0x0304, 0x0303),
    suites: tuple[int, ...] = TLS13_SUITES + TLS12_SUITES,
    extra: list[bytes] = (),  # type: ignore[assignment]
    legacy_version: int = 0x0303,
) -> bytes:
    """The handshake message (without the record layer) of a plausible ClientHello."""
    exts = []
    if sni is not None:
        exts.append(sni_ext(sni))
    exts += [
        ext(10, _u16(struct.pack(">HH", 0x001D, 0x0017))),  # supported_groups
        ext(11, _u8(b"\x00")),  # ec_point_formats: uncompressed
        ext(13, _u16(b"".join(struct.pack(">H", a) for a in SIG_ALGS))),
        ext(23, b""),  # extended_master_secret
        ext(0xFF01, b"\x00"),  # renegotiation_info (empty: initial handshake)
    ]
    if versions:
        exts.append(ext(43, _u8(b"".join(struct.pack(">H", v) for v in versions))))
        if 0x0304 in versions:
            exts.append(ext(45, _u8(b"\x01")))  # psk_key_exchange_modes: psk_dhe_ke
            share = struct.pack(">H", 0x001D) + _u16(os.urandom(32))  # any 32 bytes: x25519
            exts.append(ext(51, _u16(share)))
    if alpn is not None:
        exts.append(alpn_ext(alpn))
    exts += list(extra)
    body = (
        struct.pack(">H", legacy_version)
        + os.urandom(32)
        + _u8(os.urandom(32))  # legacy_session_id
        + _u16(b"".join(struct.pack(">H", s) for s in suites))
        + _u8(b"\x00")  # compression: null
        + _u16(b"".join(exts))
    )
    return b"\x01" + struct.pack(">I", len(body))[1:] + body


def records(message: bytes, size: int = 16384) -> bytes:
    """``message`` in handshake records of at most ``size`` bytes each."""
    out = bytearray()
    for i in range(0, len(message), size):
        chunk = message[i : i + size]
        out += b"\x16\x03\x01" + struct.pack(">H", len(chunk)) + chunk
    return bytes(out)


def answer(port: int, data: bytes, *, timeout: float = 5.0) -> tuple[str, int | None]:
    """Send ``data`` as the start of a connection; return what the server answered first:
    ("server_hello", None), ("alert", description) or ("closed", None)."""
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            s.sendall(data)
        got = bytearray()
        deadline = Deadline(timeout)
        while len(got) < 6:
            deadline.check(f"the server's answer (got {bytes(got)!r})")
            s.settimeout(max(0.05, deadline.remaining()))
            try:
                chunk = s.recv(4096)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                break
            got += chunk
    if len(got) >= 6 and got[0] == 0x16 and got[5] == 0x02:
        return "server_hello", None
    alert = tls_alert(bytes(got))
    if alert is not None:
        assert alert[0] == 2, f"alert level {alert[0]}, expected fatal"
        return "alert", alert[1]
    assert not got, f"answered {bytes(got[:32])!r}"
    return "closed", None


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory, certs, upstream_loop):
    """One server for the module (a long handshake timeout: closes come from the rules)."""
    from tests.support.launcher import EdgetermFactory
    from tests.support.upstreams import EchoUpstream

    echo = EchoUpstream(upstream_loop).start()
    directory = tmp_path_factory.mktemp("hellos")
    factory = EdgetermFactory(directory, certs)
    server = factory.start([echo.addr], timeouts={"handshake": 30.0})
    worker = {p.pid for p in psutil.Process(server.pid).children()}
    yield server, echo, worker, factory
    problems = factory.close()
    echo.close()
    if problems:
        pytest.fail("\n\n".join(problems), pytrace=False)


@pytest.fixture
def server(stack, show_logs):
    srv, _, worker, factory = stack
    show_logs(factory.servers)
    yield srv
    # after every case: the same worker, serving the next client
    assert srv.running()
    assert {p.pid for p in psutil.Process(srv.pid).children()} == worker, "the worker changed"


def next_client_served(port: int, ctx: ssl.SSLContext) -> None:
    with connect_tls(port, ctx) as s:
        s.sendall(b"next client")
        assert recv_exactly(s, 11) == b"next client"


LONGEST_NAME = b".".join([b"a" * 63, b"b" * 63, b"c" * 63, b"d" * 63])  # 255 bytes
assert len(LONGEST_NAME) == 255

CASES = {
    "sni-255": (records(client_hello(sni=LONGEST_NAME)), ("server_hello", None)),
    "sni-256": (records(client_hello(sni=LONGEST_NAME + b"e")), ("alert", UNRECOGNIZED_NAME)),
    "sni-nul": (records(client_hello(sni=b"local\x00host")), ("alert", UNRECOGNIZED_NAME)),
    "sni-empty": (records(client_hello(sni=b"")), ("server_hello", None)),
    "no-sni": (records(client_hello(sni=None)), ("server_hello", None)),
    "unknown-alpn": (records(client_hello(alpn=[b"foo/9", b"x" * 255])), ("server_hello", None)),
    "300-extensions": (
        records(client_hello(extra=[ext(1000 + i, os.urandom(i % 8)) for i in range(300)])),
        ("server_hello", None),
    ),
    "grease-extensions": (
        records(client_hello(extra=[ext(0x0A0A + 0x1010 * i, b"") for i in range(16)])),
        ("server_hello", None),
    ),
    "duplicate-sni": (
        records(client_hello(extra=[sni_ext(b"localhost")])),
        ("alert", ILLEGAL_PARAMETER),
    ),
    "one-byte-records": (records(client_hello(), size=1), ("server_hello", None)),
    "60k-hello": (
        records(client_hello(extra=[ext(21, bytes(60_000))])),  # the padding extension
        ("server_hello", None),
    ),
    "tls10-only": (
        records(client_hello(versions=(), legacy_version=0x0301, suites=(0xC013, 0x002F))),
        ("alert", PROTOCOL_VERSION),
    ),
    "tls11-only": (
        records(client_hello(versions=(0x0302,), suites=(0xC013, 0x002F))),
        ("alert", PROTOCOL_VERSION),
    ),
    "weak-suites-only": (
        records(client_hello(versions=(0x0303,), suites=WEAK_SUITES)),
        ("alert", HANDSHAKE_FAILURE),
    ),
    "extension-overruns-hello": (
        # an extension announcing 300 bytes where 2 follow
        records(client_hello(extra=[struct.pack(">HH", 1234, 300) + b"xx"])),
        ("alert", DECODE_ERROR),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_odd_client_hello_refused_or_served_per_the_rules(server, client_ctx, case):
    data, expected = CASES[case]
    assert answer(server.port(), data) == expected
    next_client_served(server.port(), client_ctx)


def test_oversized_client_hello_refused_at_its_header(server, client_ctx):
    """A ClientHello announcing 200 KiB (the largest a valid one can be is about 128 KiB:
    OpenSSL's limit): refused from the handshake header, before the body is buffered."""
    body = client_hello()[4:]
    size = 200 * 1024
    message = b"\x01" + struct.pack(">I", size)[1:] + body + bytes(size - len(body))
    how, description = answer(server.port(), records(message))
    assert how in ("alert", "closed"), (how, description)
    next_client_served(server.port(), client_ctx)


# -- real clients: longest SNI, no SNI, unknown ALPN ----------------------------------------


def test_longest_sni_full_session(server, ca):
    ctx = client_context(ca, check_hostname=False)
    name = LONGEST_NAME.decode()
    with connect_tls(server.port(), ctx, server_hostname=name) as s:
        s.sendall(b"long name")
        assert recv_exactly(s, 9) == b"long name"


def test_no_sni_gets_the_default_certificate(server, certs):
    ctx = client_context(certs.ca, check_hostname=False)
    with connect_tls(server.port(), ctx, server_hostname=None) as s:
        assert s.getpeercert(binary_form=True) == certs.default.der()
        s.sendall(b"no sni")
        assert recv_exactly(s, 6) == b"no sni"


def test_unknown_alpn_connects_without_alpn(server, certs):
    ctx = client_context(certs.ca, alpn=["foo/9", "spdy/1"])
    with connect_tls(server.port(), ctx) as s:
        assert s.selected_alpn_protocol() is None
        s.sendall(b"no alpn")
        assert recv_exactly(s, 7) == b"no alpn"


# -- garbage after the handshake --------------------------------------------------------------

AFTER_HANDSHAKE = {
    "plain-http": b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "random": os.urandom(2048),
    # a well-formed application-data record that does not decrypt
    "bad-record-mac": b"\x17\x03\x03\x00\x40" + os.urandom(64),
    "oversized-record": b"\x17\x03\x03\xff\xff" + os.urandom(64),
    "handshake-record": b"\x16\x03\x03\x00\x04\x01\x00\x00\x00",
}


@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
@pytest.mark.parametrize("garbage", list(AFTER_HANDSHAKE))
def test_garbage_after_the_handshake_closes_that_connection_only(
    stack, server, certs, client_ctx, garbage, version
):
    _, echo, _, _ = stack
    tls = ssl.TLSVersion[version.replace(".", "_")]
    ctx = client_context(certs.ca, min_version=tls, max_version=tls)
    before = len(echo.connections())
    with BioTlsClient(server.port(), ctx) as c:
        c.sendall(b"before the garbage")
        got = b""
        while len(got) < 18:
            got += c.recv()
        assert got == b"before the garbage"
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            c.sock.sendall(AFTER_HANDSHAKE[garbage])  # raw bytes under the TLS layer
        closed = wait_peer_close(c.sock, timeout=5)
    if closed.data:
        # an encrypted alert: its record type shows in TLS 1.2 (21), not in 1.3 (23)
        assert closed.data[0] == (21 if version == "TLSv1.2" else 23), closed.data[:8]
    assert closed.after < 2.0, closed
    # the upstream connection of that client is closed as well, and received no garbage
    (rec,) = echo.wait_done(before + 1, timeout=5)[before:]
    assert rec.received == 18
    next_client_served(server.port(), client_ctx)


# -- renegotiation and key updates ------------------------------------------------------------


class SClient:
    """An interactive ``openssl s_client``: it reads a command (``R``, ``k``, ``K``) only at the
    start of a read from stdin, so every line is written alone and its effect awaited."""

    def __init__(self, port: int, ca: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            s_client_args(port, ca, *args),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.out, self.err = bytearray(), bytearray()
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.proc.stdout, selectors.EVENT_READ, self.out)
        self.sel.register(self.proc.stderr, selectors.EVENT_READ, self.err)

    @property
    def stderr(self) -> str:
        return self.err.decode(errors="replace")

    def pump(self, until: Callable[[], bool], timeout: float) -> bool:
        deadline = Deadline(timeout)
        while not until() and not deadline.expired() and self.sel.get_map():
            for key, _ in self.sel.select(min(0.2, deadline.remaining())):
                chunk = os.read(key.fd, 65536)
                if chunk:
                    key.data.extend(chunk)
                else:
                    self.sel.unregister(key.fileobj)
        return until()

    def line(self, text: bytes) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.write(text + b"\n")
            self.proc.stdin.flush()

    def echo(self, text: bytes) -> None:
        """Send a line and wait for the echo upstream's answer."""
        count = self.out.count(text + b"\n")
        self.line(text)
        assert self.pump(lambda: self.out.count(text + b"\n") > count, 10), (
            bytes(self.out),
            self.stderr,
        )

    def close(self) -> int:
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.close()
        self.pump(lambda: self.proc.poll() is not None, 10)
        self.pump(lambda: False, 0.3)  # the rest of its output
        self.sel.close()
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.wait(5)


def test_client_initiated_renegotiation_is_refused(server, ca, client_ctx):
    """``openssl s_client -tls1_2`` and its ``R`` command: the server answers no_renegotiation
    (OP_NO_RENEGOTIATION), the client gives up; the server is unharmed."""
    c = SClient(server.port(), ca, "-tls1_2")
    try:
        c.echo(b"ping")
        c.line(b"R")
        c.pump(lambda: c.proc.poll() is not None, 10)  # s_client fails and exits by itself
    finally:
        code = c.close()
    assert "Protocol version: TLSv1.2" in c.stderr, c.stderr
    assert "RENEGOTIATING" in c.stderr, c.stderr
    assert "no renegotiation" in c.stderr, f"renegotiation was not refused:\n{c.stderr}"
    assert code != 0
    next_client_served(server.port(), client_ctx)


@pytest.mark.parametrize("command", [b"k", b"K"], ids=["key-update", "key-update-requested"])
def test_tls13_key_update_keeps_the_connection(server, ca, command):
    """A TLS 1.3 KeyUpdate (``k``: ours; ``K``: and ask the server for one) is not a
    renegotiation: the session goes on, both ways. (One update per session: a second one from
    s_client stalls against ``openssl s_server`` too.)"""
    c = SClient(server.port(), ca, "-tls1_3")
    try:
        c.echo(b"one")
        c.line(command)
        assert c.pump(lambda: "KEYUPDATE" in c.stderr, 5), c.stderr
        c.echo(b"two")
    finally:
        code = c.close()
    assert code == 0, c.stderr
