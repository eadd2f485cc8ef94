"""The PROXY protocol, versions 1 and 2 (HAProxy's "The PROXY protocol versions 1 & 2").

Two directions, both sans-I/O:

* **To upstreams** (``encode_v1``, ``encode_v2`` and the ``tlv_*`` helpers): the header the
  worker writes first on a fresh upstream connection, so the upstream sees the real client
  address and, in v2, what edgeterm learned from TLS (ALPN, SNI, version, cipher, client
  certificate). Called once per upstream connection: the fixed parts are precomputed and one
  ``struct`` call packs the address block.
* **From an L4 balancer in front** (``ProxyHeaderParser``): fed the first bytes of an accepted
  connection, it returns a ``ParseResult`` once a whole header has arrived (``None`` while more
  bytes are needed) or raises ``ProxyHeaderError``. ``ParseResult.consumed`` is the header's
  length: the bytes after it are the client's TLS ClientHello and belong to TLS. A connection
  that does not start with a PROXY signature is refused at its first byte that differs from
  both signatures (at most 12 bytes in), so a plain ClientHello (0x16 ...) fails at once.

Wire formats, in short (the specification is the authority):

* v1: one ASCII line of at most 107 bytes including its CRLF:
  ``PROXY TCP4|TCP6 <src> <dst> <sport> <dport>\\r\\n`` or ``PROXY UNKNOWN[ anything]\\r\\n``.
  Exactly one space between fields; no leading zeros in numbers.
* v2: the 12-byte signature ``\\r\\n\\r\\n\\0\\r\\nQUIT\\n``; a byte with the version (high
  nibble, 2) and the command (low: 0 LOCAL, 1 PROXY); a byte with the family (high: 0 UNSPEC,
  1 INET, 2 INET6, 3 UNIX) and transport (low: 0 UNSPEC, 1 STREAM, 2 DGRAM); a big-endian
  16-bit length of what follows; the addresses (INET 12 bytes, INET6 36, UNIX 216: source
  address, destination address, then for INET/INET6 source port and destination port); then
  TLVs (1-byte type, 16-bit big-endian length, value) up to the length.
* ``PP2_TYPE_SSL``'s value: a 1-byte client flag field (``PP2_CLIENT_SSL``,
  ``PP2_CLIENT_CERT_CONN``, ``PP2_CLIENT_CERT_SESS``), a 32-bit ``verify`` (0 when the client
  presented a certificate and it was verified, non-zero otherwise), then sub-TLVs.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Final, Literal

# -- constants from the specification -------------------------------------------------------

V1_MAX_LINE: Final = 107  # bytes, including the CRLF ("PROXY UNKNOWN" + two full IPv6 + ports)
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER_LEN: Final = 16  # signature, version/command, family/transport, length

CMD_LOCAL: Final = 0x0
CMD_PROXY: Final = 0x1
FAM_UNSPEC: Final = 0x0
FAM_INET: Final = 0x1
FAM_INET6: Final = 0x2
FAM_UNIX: Final = 0x3
PROTO_UNSPEC: Final = 0x0
PROTO_STREAM: Final = 0x1
PROTO_DGRAM: Final = 0x2

PP2_TYPE_ALPN: Final = 0x01
PP2_TYPE_AUTHORITY: Final = 0x02
PP2_TYPE_CRC32C: Final = 0x03
PP2_TYPE_NOOP: Final = 0x04
PP2_TYPE_UNIQUE_ID: Final = 0x05
PP2_TYPE_SSL: Final = 0x20
PP2_SUBTYPE_SSL_VERSION: Final = 0x21
PP2_SUBTYPE_SSL_CN: Final = 0x22
PP2_SUBTYPE_SSL_CIPHER: Final = 0x23
PP2_SUBTYPE_SSL_SIG_ALG: Final = 0x24
PP2_SUBTYPE_SSL_KEY_ALG: Final = 0x25
PP2_TYPE_NETNS: Final = 0x30

PP2_CLIENT_SSL: Final = 0x01
PP2_CLIENT_CERT_CONN: Final = 0x02
PP2_CLIENT_CERT_SESS: Final = 0x04

_ADDR_LEN: Final = {FAM_UNSPEC: 0, FAM_INET: 12, FAM_INET6: 36, FAM_UNIX: 216}
_MAX_V2_BODY: Final = 0xFFFF

Address = tuple[str, int]
Tlv = tuple[int, bytes]
Command = Literal["LOCAL", "PROXY"]
Accept = Literal["v1", "v2", "any"]


class ProxyHeaderError(Exception):
    """The bytes received are not a valid PROXY header (the sending peer's fault)."""


# -- encoding -------------------------------------------------------------------------------

_V1_UNKNOWN: Final = b"PROXY UNKNOWN\r\n"
_PREFIX_LOCAL: Final = V2_SIGNATURE + bytes(((2 << 4) | CMD_LOCAL, (FAM_UNSPEC << 4)))
_PREFIX_INET: Final = V2_SIGNATURE + bytes(((2 << 4) | CMD_PROXY, (FAM_INET << 4) | PROTO_STREAM))
_PREFIX_INET6: Final = V2_SIGNATURE + bytes(((2 << 4) | CMD_PROXY, (FAM_INET6 << 4) | PROTO_STREAM))
_PACK_INET: Final = struct.Struct("!14sH4s4sHH")  # prefix, length, src, dst, sport, dport
_PACK_INET6: Final = struct.Struct("!14sH16s16sHH")
_PACK_LOCAL: Final = struct.Struct("!14sH")
_TLV_HEAD: Final = struct.Struct("!BH")
_SSL_HEAD: Final = struct.Struct("!BI")
_CRC_PLACEHOLDER: Final = bytes((PP2_TYPE_CRC32C, 0, 4, 0, 0, 0, 0))
_V4_MAPPED: Final = b"\x00" * 10 + b"\xff\xff"
_AF_INET: Final = socket.AF_INET
_AF_INET6: Final = socket.AF_INET6
_pton = socket.inet_pton
_ntop = socket.inet_ntop


def _unmap(host: str) -> str:
    """``::ffff:a.b.c.d`` (an IPv4 client on a dual-stack socket) -> ``a.b.c.d``."""
    if host[:2] == "::" and "." in host and host[:7].lower() == "::ffff:":
        return host[7:]
    return host


def _packed6(host: str) -> bytes:
    """16 bytes for an IPv6 address (scope id dropped), or an IPv4 one as v4-mapped."""
    try:
        if ":" not in host:
            return _V4_MAPPED + _pton(_AF_INET, host)
        pct = host.find("%")
        return _pton(_AF_INET6, host if pct < 0 else host[:pct])
    except OSError:
        raise ValueError(f"not a numeric IP address: {host!r}") from None


def _packed4(host: str) -> bytes:
    try:
        return _pton(_AF_INET, host)
    except OSError:
        raise ValueError(f"not a numeric IPv4 address: {host!r}") from None


def _check_port(port: int) -> int:
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port {port} is out of range 0..65535")
    return port


def encode_v1(src: Address | None, dst: Address | None) -> bytes:
    """A v1 line: TCP4 or TCP6, or UNKNOWN when an address is missing or the families differ.

    IPv4-mapped IPv6 addresses (an IPv4 client accepted on a dual-stack socket) are sent as
    IPv4; IPv6 addresses in their canonical text form, without scope id.
    """
    if src is None or dst is None:
        return _V1_UNKNOWN
    sh = _unmap(src[0])
    dh = _unmap(dst[0])
    six = ":" in sh
    if six != (":" in dh):
        return _V1_UNKNOWN
    sp = _check_port(src[1])
    dp = _check_port(dst[1])
    if six:
        sh = _ntop(_AF_INET6, _packed6(sh))
        dh = _ntop(_AF_INET6, _packed6(dh))
        return f"PROXY TCP6 {sh} {dh} {sp} {dp}\r\n".encode("ascii")
    _packed4(sh)
    _packed4(dh)
    return f"PROXY TCP4 {sh} {dh} {sp} {dp}\r\n".encode("ascii")


def encode_tlvs(tlvs: Sequence[Tlv]) -> bytes:
    """TLVs in wire form, in the order given."""
    if not tlvs:
        return b""
    pack = _TLV_HEAD.pack
    parts: list[bytes] = []
    for t, value in tlvs:
        if not 0 <= t <= 0xFF:
            raise ValueError(f"TLV type {t} is out of range 0..255")
        if len(value) > _MAX_V2_BODY:
            raise ValueError(f"TLV {t:#04x}: value of {len(value)} bytes is over 65535")
        parts.append(pack(t, len(value)))
        parts.append(value)
    return b"".join(parts)


def encode_v2(
    src: Address | None,
    dst: Address | None,
    *,
    tlvs: Sequence[Tlv] = (),
    checksum: bool = False,
) -> bytes:
    """A v2 header: PROXY over TCP (STREAM) for IPv4 or IPv6, or LOCAL when ``src`` or ``dst``
    is None (health checks, or a client address that is not IP; UNSPEC family, no addresses).

    ``tlvs`` are ``(type, value)`` pairs, as built by ``tlv_alpn``, ``tlv_authority`` and
    ``tlv_ssl``. With mixed families the IPv4 address is sent IPv4-mapped in an IPv6 block;
    IPv4-mapped pairs are sent as IPv4. ``checksum`` appends a ``PP2_TYPE_CRC32C`` TLV.
    """
    extra = encode_tlvs(tlvs) if tlvs else b""
    if checksum:
        extra += _CRC_PLACEHOLDER
    if src is None or dst is None:
        if len(extra) > _MAX_V2_BODY:
            raise ValueError(f"TLVs of {len(extra)} bytes do not fit in a v2 header")
        out = _PACK_LOCAL.pack(_PREFIX_LOCAL, len(extra)) + extra
    else:
        sh = src[0]
        dh = dst[0]
        six = ":" in sh or ":" in dh
        if six:
            sh = _unmap(sh)
            dh = _unmap(dh)
            six = ":" in sh or ":" in dh
        try:
            if six:
                if len(extra) > _MAX_V2_BODY - 36:
                    raise ValueError(f"TLVs of {len(extra)} bytes do not fit in a v2 header")
                out = _PACK_INET6.pack(
                    _PREFIX_INET6, 36 + len(extra), _packed6(sh), _packed6(dh), src[1], dst[1]
                )
            else:
                if len(extra) > _MAX_V2_BODY - 12:
                    raise ValueError(f"TLVs of {len(extra)} bytes do not fit in a v2 header")
                out = _PACK_INET.pack(
                    _PREFIX_INET,
                    12 + len(extra),
                    _pton(_AF_INET, sh),
                    _pton(_AF_INET, dh),
                    src[1],
                    dst[1],
                )
        except OSError:
            raise ValueError(f"not a numeric IP address: {sh!r} or {dh!r}") from None
        except struct.error:
            raise ValueError(f"port out of range 0..65535: {src[1]!r}, {dst[1]!r}") from None
        if extra:
            out += extra
    if checksum:
        crc = crc32c(out)
        out = out[:-4] + crc.to_bytes(4, "big")
    return out


def tlv_alpn(protocol: bytes) -> Tlv:
    """``PP2_TYPE_ALPN``: the protocol negotiated with the client (e.g. ``b"h2"``)."""
    return (PP2_TYPE_ALPN, protocol)


def tlv_authority(server_name: str) -> Tlv:
    """``PP2_TYPE_AUTHORITY``: the host name the client asked for (its TLS SNI), UTF-8."""
    return (PP2_TYPE_AUTHORITY, server_name.encode("utf-8"))


def tlv_unique_id(value: bytes) -> Tlv:
    """``PP2_TYPE_UNIQUE_ID``: an opaque connection id of at most 128 bytes."""
    if len(value) > 128:
        raise ValueError("PP2_TYPE_UNIQUE_ID is at most 128 bytes")
    return (PP2_TYPE_UNIQUE_ID, value)


@lru_cache(maxsize=64)
def _ssl_subtlvs(version: str | None, cipher: str | None) -> bytes:
    # A handful of (version, cipher) pairs occur in practice: build their bytes once.
    out = b""
    if version is not None:
        v = version.encode("ascii")
        out += _TLV_HEAD.pack(PP2_SUBTYPE_SSL_VERSION, len(v)) + v
    if cipher is not None:
        c = cipher.encode("ascii")
        out += _TLV_HEAD.pack(PP2_SUBTYPE_SSL_CIPHER, len(c)) + c
    return out


def tlv_ssl(
    version: str | None,
    cipher: str | None,
    client_cert_verified: bool,
    client_cert_presented: bool,
    cn: str | None,
    *,
    resumed: bool = False,
) -> Tlv:
    """``PP2_TYPE_SSL`` for a client connection that used TLS.

    ``version`` (``"TLSv1.3"``), ``cipher`` (OpenSSL name) and ``cn`` (the verified client
    certificate's subject CN) become sub-TLVs when not None. Flags: ``PP2_CLIENT_SSL`` always;
    ``PP2_CLIENT_CERT_SESS`` when a certificate was presented in this TLS session, and
    ``PP2_CLIENT_CERT_CONN`` too unless the session was ``resumed`` (then the certificate was
    presented on an earlier connection). ``verify`` is 0 only when a certificate was presented
    and verified, 1 otherwise (the specification: "non-zero otherwise").
    """
    client = PP2_CLIENT_SSL
    if client_cert_presented:
        client |= PP2_CLIENT_CERT_SESS if resumed else PP2_CLIENT_CERT_SESS | PP2_CLIENT_CERT_CONN
    verify = 0 if client_cert_presented and client_cert_verified else 1
    value = _SSL_HEAD.pack(client, verify) + _ssl_subtlvs(version, cipher)
    if cn is not None:
        c = cn.encode("utf-8")
        value += _TLV_HEAD.pack(PP2_SUBTYPE_SSL_CN, len(c)) + c
    return (PP2_TYPE_SSL, value)


# -- CRC32c (Castagnoli), for PP2_TYPE_CRC32C -----------------------------------------------


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_CRC_TABLE: Final = _crc32c_table()


def crc32c(data: bytes | bytearray) -> int:
    """CRC-32C of ``data`` (only computed when a header carries or asks for a checksum)."""
    crc = 0xFFFFFFFF
    table = _CRC_TABLE
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# -- parsing --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SslInfo:
    """A decoded ``PP2_TYPE_SSL`` value."""

    client: int  # PP2_CLIENT_* flags
    verify: int  # 0: a client certificate was presented and verified
    sub_tlvs: tuple[Tlv, ...]

    def _sub(self, t: int) -> str | None:
        for st, value in self.sub_tlvs:
            if st == t:
                return value.decode("utf-8", "replace")
        return None

    @property
    def version(self) -> str | None:
        return self._sub(PP2_SUBTYPE_SSL_VERSION)

    @property
    def cipher(self) -> str | None:
        return self._sub(PP2_SUBTYPE_SSL_CIPHER)

    @property
    def cn(self) -> str | None:
        return self._sub(PP2_SUBTYPE_SSL_CN)

    @property
    def cert_presented(self) -> bool:
        return bool(self.client & (PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS))

    @property
    def cert_verified(self) -> bool:
        return self.cert_presented and self.verify == 0


def decode_tlvs(data: bytes, where: str = "TLV") -> tuple[Tlv, ...]:
    """Split TLVs; ``ProxyHeaderError`` when one is truncated."""
    out: list[Tlv] = []
    i = 0
    n = len(data)
    while i < n:
        if n - i < 3:
            raise ProxyHeaderError(
                f"truncated {where} at offset {i}: {n - i} bytes left, a TLV needs 3"
            )
        t = data[i]
        length = (data[i + 1] << 8) | data[i + 2]
        end = i + 3 + length
        if end > n:
            raise ProxyHeaderError(
                f"truncated {where} {t:#04x} at offset {i}: length {length}, "
                f"only {n - i - 3} bytes left"
            )
        out.append((t, bytes(data[i + 3 : end])))
        i = end
    return tuple(out)


def decode_ssl(value: bytes) -> SslInfo:
    """Decode a ``PP2_TYPE_SSL`` value; ``ProxyHeaderError`` when malformed."""
    if len(value) < 5:
        raise ProxyHeaderError(f"PP2_TYPE_SSL TLV of {len(value)} bytes, needs at least 5")
    client, verify = _SSL_HEAD.unpack_from(value)
    return SslInfo(client, verify, decode_tlvs(value[5:], "PP2_TYPE_SSL sub-TLV"))


@dataclass(frozen=True, slots=True)
class ParseResult:
    """A complete PROXY header.

    ``src``/``dst`` are None for LOCAL (v2), UNKNOWN (v1) and UNSPEC (v2): the connection's own
    endpoints are then the real ones. ``consumed`` is the header's length from the first byte
    fed; ``rest`` holds the bytes fed after it (the start of the TLS stream).
    """

    version: int  # 1 or 2
    command: Command
    family: socket.AddressFamily | None
    src: Address | None
    dst: Address | None
    tlvs: tuple[Tlv, ...]
    consumed: int
    rest: bytes = b""

    def tlv(self, t: int) -> bytes | None:
        """The value of the first TLV of type ``t``, or None."""
        for tt, value in self.tlvs:
            if tt == t:
                return value
        return None

    @property
    def alpn(self) -> bytes | None:
        return self.tlv(PP2_TYPE_ALPN)

    @property
    def authority(self) -> str | None:
        v = self.tlv(PP2_TYPE_AUTHORITY)
        return None if v is None else v.decode("utf-8", "replace")

    @property
    def ssl(self) -> SslInfo | None:
        v = self.tlv(PP2_TYPE_SSL)
        return None if v is None else decode_ssl(v)


_V1_PREFIX: Final = b"PROXY "
# Bytes allowed in a v1 line before its CRLF: printable ASCII. (CR is checked separately.)
_V1_PRINTABLE: Final = bytes(range(0x20, 0x7F))
_V1_ALLOWED: Final = _V1_PRINTABLE + b"\r"
_UNPACK_INET: Final = struct.Struct("!4s4sHH")
_UNPACK_INET6: Final = struct.Struct("!16s16sHH")
_COMMANDS: Final[dict[int, Command]] = {CMD_LOCAL: "LOCAL", CMD_PROXY: "PROXY"}
_FAMILY_NAMES: Final = {
    FAM_UNSPEC: "UNSPEC",
    FAM_INET: "INET",
    FAM_INET6: "INET6",
    FAM_UNIX: "UNIX",
}
_TLS_RECORD_TYPES: Final = {0x14, 0x15, 0x16, 0x17}


def _first_byte_error(b: int) -> ProxyHeaderError:
    if b in _TLS_RECORD_TYPES:
        why = "a TLS record: the client sent no PROXY header"
    else:
        why = "expected b'PROXY ' (v1) or the v2 signature"
    return ProxyHeaderError(f"not a PROXY protocol header: first byte {b:#04x} ({why})")


def _v1_port(s: str, what: str) -> int:
    if not (0 < len(s) <= 5 and s.isascii() and s.isdigit()):
        raise ProxyHeaderError(f"v1 header: {what} port {s!r} is not a decimal number")
    if len(s) > 1 and s[0] == "0":
        raise ProxyHeaderError(f"v1 header: {what} port {s!r} has a leading zero")
    p = int(s)
    if p > 0xFFFF:
        raise ProxyHeaderError(f"v1 header: {what} port {s} is over 65535")
    return p


def _v1_addr(s: str, af: socket.AddressFamily, what: str) -> str:
    try:
        return _ntop(af, _pton(af, s))
    except (OSError, ValueError):
        kind = "IPv4" if af == _AF_INET else "IPv6"
        raise ProxyHeaderError(
            f"v1 header: {what} address {s!r} is not an {kind} address"
        ) from None


class ProxyHeaderParser:
    """Incremental parser for one connection's PROXY header (v1, v2, or either).

    ``feed`` bytes as they arrive; it returns None until the header is complete, then a
    ``ParseResult``. Any malformed input raises ``ProxyHeaderError`` (and so does every later
    ``feed``). ``max_size`` bounds a v2 header (v1 lines are bounded by the specification at
    107 bytes); ``accept`` restricts the versions.

    Reading from a socket whose TLS stream OpenSSL will read from the same fd: never take a
    byte past the header. ``take(peeked)`` says how many of the bytes peeked (``MSG_PEEK``)
    from the socket belong to the header: receive exactly that many and feed them. Every call
    consumes at least one byte when any was peeked, so a level-triggered loop cannot spin on
    bytes left in the socket, and the TLS stream stays in the kernel::

        peeked = sock.recv(4096, socket.MSG_PEEK)
        n = parser.take(peeked)
        result = parser.feed(sock.recv(n))   # or recv_into the scratch buffer

    ``wanted`` is a lower bound of the bytes still needed (exact for v2 once 16 bytes are in).
    """

    __slots__ = ("_accept_v1", "_accept_v2", "_buf", "_done", "_error", "_max", "_scan", "_ver")

    def __init__(self, max_size: int = 4096, *, accept: Accept = "any") -> None:
        if max_size < V2_HEADER_LEN + _ADDR_LEN[FAM_INET6]:
            raise ValueError(f"max_size {max_size} is below 52 (a v2 IPv6 header)")
        if accept not in ("v1", "v2", "any"):
            raise ValueError(f"accept must be 'v1', 'v2' or 'any', not {accept!r}")
        self._max = max_size
        self._accept_v1 = accept != "v2"
        self._accept_v2 = accept != "v1"
        self._buf = bytearray()
        self._ver = 0  # 0: not known yet
        self._scan = len(_V1_PREFIX)  # v1: where the search for CRLF resumes
        self._error: str | None = None
        self._done = False

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @property
    def wanted(self) -> int:
        """Bytes the header needs at least before it can be complete (0 when done)."""
        if self._done or self._error is not None:
            return 0
        n = len(self._buf)
        if self._ver == 2 and n >= V2_HEADER_LEN:
            return V2_HEADER_LEN + ((self._buf[14] << 8) | self._buf[15]) - n
        if self._ver == 1:
            return 1 if n and self._buf[-1] == 0x0D else 2
        return max(1, min(len(b"PROXY UNKNOWN\r\n"), V2_HEADER_LEN) - n)

    def take(self, upcoming: bytes) -> int:
        """How many of ``upcoming`` (received next, not fed yet) belong to the header.

        v1: up to and including the first LF; v2: up to the length in the fixed header. Bytes
        that would make the header malformed count as header bytes (``feed`` then raises).
        """
        if self._done or self._error is not None or not upcoming:
            return 0
        n = len(self._buf)
        first = self._buf[0] if n else upcoming[0]
        if first == 0x0D:  # v2 (or garbage that feed will reject)
            if n + len(upcoming) < V2_HEADER_LEN:
                return len(upcoming)
            head = bytes(self._buf[:V2_HEADER_LEN]) + upcoming[: max(0, V2_HEADER_LEN - n)]
            total = V2_HEADER_LEN + ((head[14] << 8) | head[15])
            return max(1, min(len(upcoming), total - n))
        lf = upcoming.find(b"\n")
        return len(upcoming) if lf < 0 else lf + 1

    def feed(self, data: bytes) -> ParseResult | None:
        if self._error is not None:
            raise ProxyHeaderError(self._error)
        if self._done:
            raise RuntimeError("the PROXY header was already parsed")
        self._buf += data
        try:
            result = self._parse()
        except ProxyHeaderError as exc:
            self._error = str(exc)
            raise
        if result is not None:
            self._done = True
        return result

    # -- internals ----------------------------------------------------------------------
    def _parse(self) -> ParseResult | None:
        buf = self._buf
        n = len(buf)
        if self._ver == 0:
            if n == 0:
                return None
            first = buf[0]
            if first == 0x50:  # "P"
                if not self._accept_v1:
                    raise ProxyHeaderError("a PROXY v1 header, but this listener accepts only v2")
                sig = _V1_PREFIX
            elif first == 0x0D:
                if not self._accept_v2:
                    raise ProxyHeaderError("a PROXY v2 header, but this listener accepts only v1")
                sig = V2_SIGNATURE
            else:
                raise _first_byte_error(first)
            k = min(n, len(sig))
            if buf[:k] != sig[:k]:
                i = next(i for i in range(k) if buf[i] != sig[i])
                v = 1 if sig is _V1_PREFIX else 2
                raise ProxyHeaderError(
                    f"not a PROXY protocol header: bad v{v} signature at byte {i} "
                    f"({buf[i]:#04x}, expected {sig[i]:#04x})"
                )
            if k < len(sig):
                return None
            self._ver = 1 if sig is _V1_PREFIX else 2
        if self._ver == 1:
            return self._parse_v1()
        return self._parse_v2()

    def _parse_v1(self) -> ParseResult | None:
        buf = self._buf
        n = len(buf)
        scan = self._scan  # bytes before it were checked by an earlier feed
        if scan >= n:
            return None
        limit = min(n, V1_MAX_LINE)
        lf = buf.find(b"\n", scan, limit)
        stop = lf if lf >= 0 else limit
        cr = -1
        if scan < stop:
            seg = bytes(buf[scan:stop])
            bad = seg.translate(None, _V1_ALLOWED)
            if bad:
                raise ProxyHeaderError(
                    f"v1 header: unexpected byte {bad[0]:#04x} (not printable ASCII)"
                )
            cr = seg.find(b"\r")
            if cr >= 0:
                cr += scan
        # A CR is allowed only as the byte right before the LF.
        if buf[scan - 1] == 0x0D and lf != scan:  # a CR that ended the previous feed
            raise ProxyHeaderError("v1 header: CR not followed by LF")
        if lf < 0:
            if n >= V1_MAX_LINE:
                raise ProxyHeaderError(
                    f"v1 header: no CRLF within the first {V1_MAX_LINE} bytes (line too long)"
                )
            if cr >= 0 and cr != n - 1:
                raise ProxyHeaderError("v1 header: CR not followed by LF")
            self._scan = n
            return None
        if cr >= 0 and cr != lf - 1:
            raise ProxyHeaderError("v1 header: CR not followed by LF")
        if buf[lf - 1] != 0x0D:
            raise ProxyHeaderError("v1 header: line ends with LF instead of CRLF")
        line = bytes(buf[: lf - 1]).decode("ascii")
        consumed = lf + 1
        rest = bytes(buf[consumed:])
        parts = line.split(" ")
        proto = parts[1]
        if proto == "UNKNOWN":
            # The specification: the receiver ignores anything after UNKNOWN up to the CRLF.
            return ParseResult(1, "PROXY", None, None, None, (), consumed, rest)
        if proto == "TCP4":
            af = _AF_INET
        elif proto == "TCP6":
            af = _AF_INET6
        else:
            raise ProxyHeaderError(
                f"v1 header: unknown protocol {proto!r} (expected TCP4, TCP6 or UNKNOWN)"
            )
        if len(parts) != 6:
            raise ProxyHeaderError(
                f"v1 header: expected 'PROXY {proto} <src> <dst> <sport> <dport>' "
                f"with single spaces, got {len(parts)} fields"
            )
        src = (_v1_addr(parts[2], af, "source"), _v1_port(parts[4], "source"))
        dst = (_v1_addr(parts[3], af, "destination"), _v1_port(parts[5], "destination"))
        return ParseResult(1, "PROXY", af, src, dst, (), consumed, rest)

    def _parse_v2(self) -> ParseResult | None:
        buf = self._buf
        n = len(buf)
        if n < V2_HEADER_LEN:
            return None
        ver_cmd = buf[12]
        fam_proto = buf[13]
        length = (buf[14] << 8) | buf[15]
        if ver_cmd >> 4 != 2:
            raise ProxyHeaderError(f"v2 header: unsupported version {ver_cmd >> 4} (expected 2)")
        command = _COMMANDS.get(ver_cmd & 0x0F)
        if command is None:
            raise ProxyHeaderError(f"v2 header: unknown command {ver_cmd & 0x0F}")
        fam = fam_proto >> 4
        proto = fam_proto & 0x0F
        addr_len = _ADDR_LEN.get(fam)
        if addr_len is None:
            raise ProxyHeaderError(f"v2 header: unknown address family {fam}")
        if proto > PROTO_DGRAM:
            raise ProxyHeaderError(f"v2 header: unknown transport protocol {proto}")
        total = V2_HEADER_LEN + length
        if total > self._max:
            raise ProxyHeaderError(
                f"v2 header: length {length} makes the header {total} bytes, over the "
                f"maximum {self._max}"
            )
        if command == "PROXY":
            if fam == FAM_UNIX:
                raise ProxyHeaderError("v2 header: AF_UNIX addresses are not supported here")
            if fam != FAM_UNSPEC and proto != PROTO_STREAM:
                what = "DGRAM" if proto == PROTO_DGRAM else "UNSPEC"
                raise ProxyHeaderError(f"v2 header: transport {what}, only STREAM is supported")
        if length < addr_len:
            raise ProxyHeaderError(
                f"v2 header: length {length} is too short for {_FAMILY_NAMES[fam]} "
                f"addresses ({addr_len} bytes)"
            )
        if n < total:
            return None
        body = bytes(buf[V2_HEADER_LEN:total])
        tlvs = decode_tlvs(body[addr_len:])
        at = V2_HEADER_LEN + addr_len  # where the TLV being looked at starts
        for t, value in tlvs:
            if t == PP2_TYPE_SSL:
                decode_ssl(value)  # validates the sub-TLVs
            elif t == PP2_TYPE_CRC32C:
                self._check_crc(value, at, total)
            at += 3 + len(value)
        rest = bytes(buf[total:])
        if command == "LOCAL" or fam == FAM_UNSPEC:
            # LOCAL: the receiver uses the connection's real endpoints and ignores the block.
            return ParseResult(2, command, None, None, None, tlvs, total, rest)
        if fam == FAM_INET:
            sa, da, sp, dp = _UNPACK_INET.unpack_from(body)
            af = _AF_INET
        else:
            sa, da, sp, dp = _UNPACK_INET6.unpack_from(body)
            af = _AF_INET6
        return ParseResult(
            2, command, af, (_ntop(af, sa), sp), (_ntop(af, da), dp), tlvs, total, rest
        )

    def _check_crc(self, value: bytes, at: int, total: int) -> None:
        """The checksum covers the whole header with the checksum's own value zeroed."""
        if len(value) != 4:
            raise ProxyHeaderError(f"v2 header: PP2_TYPE_CRC32C of {len(value)} bytes, not 4")
        zeroed = bytearray(self._buf[:total])
        zeroed[at + 3 : at + 7] = bytes(4)
        got = int.from_bytes(value, "big")
        want = crc32c(zeroed)
        if got != want:
            raise ProxyHeaderError(
                f"v2 header: CRC32c mismatch (header says {got:#010x}, computed {want:#010x})"
            )
