import ipaddress
import itertools
import re
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeterm import proxyproto as pp
from edgeterm.proxyproto import (
    ParseResult,
    ProxyHeaderError,
    ProxyHeaderParser,
    encode_v1,
    encode_v2,
    tlv_alpn,
    tlv_authority,
    tlv_ssl,
)

SIG = b"\r\n\r\n\x00\r\nQUIT\n"
CLIENT_HELLO = b"\x16\x03\x01\x00\xc8\x01\x00\x00\xc4\x03\x03"


def parse(data, **kw):
    return ProxyHeaderParser(**kw).feed(data)


def parse_bytewise(data, **kw):
    p = ProxyHeaderParser(**kw)
    for i in range(len(data)):
        r = p.feed(data[i : i + 1])
        if r is not None:
            return r, i + 1
    return None, len(data)


# -- an independent v2 decoder, written from the specification for these tests ---------------


def spec_decode_v2(data):
    """Returns (command, family, src, dst, tlvs, header length); asserts on anything off."""
    assert data[:12] == SIG
    ver_cmd, fam_proto, length = struct.unpack(">BBH", data[12:16])
    assert ver_cmd >> 4 == 2
    command = {0: "LOCAL", 1: "PROXY"}[ver_cmd & 0xF]
    family = fam_proto >> 4
    transport = fam_proto & 0xF
    body = data[16 : 16 + length]
    assert len(body) == length
    src = dst = None
    if family == 0:
        addr_len = 0
        assert transport == 0
    elif family == 1:
        assert transport == 1
        addr_len = 12
        src = (str(ipaddress.IPv4Address(body[0:4])), int.from_bytes(body[8:10], "big"))
        dst = (str(ipaddress.IPv4Address(body[4:8])), int.from_bytes(body[10:12], "big"))
    elif family == 2:
        assert transport == 1
        addr_len = 36
        src = (str(ipaddress.IPv6Address(body[0:16])), int.from_bytes(body[32:34], "big"))
        dst = (str(ipaddress.IPv6Address(body[16:32])), int.from_bytes(body[34:36], "big"))
    else:
        raise AssertionError(f"family {family}")
    tlvs = []
    rest = body[addr_len:]
    while rest:
        assert len(rest) >= 3
        t = rest[0]
        n = int.from_bytes(rest[1:3], "big")
        assert len(rest) >= 3 + n
        tlvs.append((t, rest[3 : 3 + n]))
        rest = rest[3 + n :]
    return command, family, src, dst, tlvs, 16 + length


def norm(addr):
    return None if addr is None else (ipaddress.ip_address(addr[0]), addr[1])


def spec_crc32c(data):
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 * (crc & 1))
    return crc ^ 0xFFFFFFFF


def spec_ssl(value):
    client = value[0]
    verify = int.from_bytes(value[1:5], "big")
    subs = {}
    rest = value[5:]
    while rest:
        n = int.from_bytes(rest[1:3], "big")
        subs[rest[0]] = rest[3 : 3 + n]
        rest = rest[3 + n :]
    return client, verify, subs


# -- v1 -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("src", "dst", "line", "family"),
    [
        (("192.0.2.1", 56324), ("198.51.100.7", 443), b"TCP4 192.0.2.1 198.51.100.7 56324 443", 2),
        (("2001:db8::1", 1), ("2001:db8::2", 65535), b"TCP6 2001:db8::1 2001:db8::2 1 65535", 10),
        # non-canonical IPv6 is sent canonical, scope id dropped
        (("2001:DB8:0:0::1%eth0", 0), ("::1", 8443), b"TCP6 2001:db8::1 ::1 0 8443", 10),
        # an IPv4 client on a dual-stack socket is sent as IPv4
        (("::ffff:192.0.2.9", 5), ("::ffff:192.0.2.10", 6), b"TCP4 192.0.2.9 192.0.2.10 5 6", 2),
    ],
)
def test_v1_round_trip(src, dst, line, family):
    header = encode_v1(src, dst)
    assert header == b"PROXY " + line + b"\r\n"
    r = parse(header + CLIENT_HELLO)
    assert r.version == 1
    assert r.command == "PROXY"
    assert r.family == family
    fields = line.decode().split(" ")
    assert r.src == (fields[1], int(fields[3]))
    assert r.dst == (fields[2], int(fields[4]))
    assert r.consumed == len(header)
    assert r.rest == CLIENT_HELLO
    assert r.tlvs == ()


@pytest.mark.parametrize(
    ("src", "dst"),
    [(None, ("1.2.3.4", 1)), (("1.2.3.4", 1), None), (("1.2.3.4", 1), ("2001:db8::1", 2))],
)
def test_v1_unknown_when_address_missing_or_families_differ(src, dst):
    header = encode_v1(src, dst)
    assert header == b"PROXY UNKNOWN\r\n"
    r = parse(header)
    assert (r.version, r.command, r.family, r.src, r.dst) == (1, "PROXY", None, None, None)


def test_v1_unknown_ignores_the_rest_of_its_line():
    r = parse(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\nxyz")
    assert r.src is None and r.rest == b"xyz"


def test_v1_longest_line_is_accepted():
    a = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    line = f"PROXY TCP6 {a} {a} 65535 65535\r\n".encode()
    assert len(line) == 104
    assert parse(line).src == (a, 65535)
    unknown = b"PROXY UNKNOWN " + b"x" * 91 + b"\r\n"
    assert len(unknown) == pp.V1_MAX_LINE
    assert parse(unknown).consumed == pp.V1_MAX_LINE


@pytest.mark.parametrize(
    ("src", "dst"), [(("1.2.3", 1), ("1.2.3.4", 2)), (("1.2.3.4", 70000), ("1.2.3.4", 2))]
)
def test_v1_encoder_refuses_bad_input(src, dst):
    with pytest.raises(ValueError):
        encode_v1(src, dst)


# -- v2 -------------------------------------------------------------------------------------


def test_v2_ipv4_exact_bytes():
    h = encode_v2(("192.0.2.1", 0x1234), ("198.51.100.7", 443))
    assert h == SIG + bytes([0x21, 0x11, 0, 12, 192, 0, 2, 1, 198, 51, 100, 7, 0x12, 0x34, 1, 187])


def test_v2_local_exact_bytes():
    assert encode_v2(None, None) == SIG + bytes([0x20, 0x00, 0, 0])
    r = parse(encode_v2(None, ("1.2.3.4", 1)))
    assert (r.version, r.command, r.family, r.src, r.dst) == (2, "LOCAL", None, None, None)


@pytest.mark.parametrize(
    ("src", "dst", "family", "want_src", "want_dst"),
    [
        (("192.0.2.1", 1), ("192.0.2.2", 2), socket.AF_INET, None, None),
        (("2001:db8::1", 3), ("2001:db8::2", 4), socket.AF_INET6, None, None),
        (
            ("::ffff:192.0.2.1", 5),
            ("::ffff:192.0.2.2", 6),
            socket.AF_INET,
            ("192.0.2.1", 5),
            ("192.0.2.2", 6),
        ),
        (("192.0.2.1", 7), ("2001:db8::2", 8), socket.AF_INET6, ("::ffff:192.0.2.1", 7), None),
        (("fe80::1%eth0", 9), ("fe80::2", 10), socket.AF_INET6, ("fe80::1", 9), None),
    ],
)
def test_v2_round_trip_addresses(src, dst, family, want_src, want_dst):
    h = encode_v2(src, dst)
    r = parse(h + CLIENT_HELLO)
    assert (r.version, r.command, r.family) == (2, "PROXY", family)
    assert r.src == (want_src or src)
    assert r.dst == (want_dst or dst)
    assert (r.consumed, r.rest) == (len(h), CLIENT_HELLO)
    cmd, _fam, src2, dst2, tlvs, n = spec_decode_v2(h)
    assert (cmd, norm(src2), norm(dst2), tlvs, n) == ("PROXY", norm(r.src), norm(r.dst), [], len(h))


def test_v2_every_tlv_round_trips():
    tlvs = [
        tlv_alpn(b"h2"),
        tlv_authority("api.example.com"),
        tlv_ssl("TLSv1.3", "TLS_AES_256_GCM_SHA384", True, True, "alice"),
        pp.tlv_unique_id(b"\x01" * 128),
        (pp.PP2_TYPE_NOOP, b"\x00" * 3),
        (0xE0, b"custom"),
        (pp.PP2_TYPE_ALPN, b""),  # a second ALPN: kept, tlv() returns the first
    ]
    h = encode_v2(("2001:db8::1", 443), ("2001:db8::2", 8443), tlvs=tlvs)
    r = parse(h)
    assert list(r.tlvs) == tlvs
    assert spec_decode_v2(h)[4] == tlvs
    assert r.alpn == b"h2"
    assert r.authority == "api.example.com"
    ssl = r.ssl
    assert ssl is not None
    assert ssl.client == pp.PP2_CLIENT_SSL | pp.PP2_CLIENT_CERT_CONN | pp.PP2_CLIENT_CERT_SESS
    assert ssl.verify == 0 and ssl.cert_verified and ssl.cert_presented
    assert (ssl.version, ssl.cipher, ssl.cn) == ("TLSv1.3", "TLS_AES_256_GCM_SHA384", "alice")
    assert r.tlv(0xE0) == b"custom"
    assert r.tlv(0xE1) is None


@pytest.mark.parametrize(
    ("verified", "presented", "resumed", "client", "verify"),
    [
        (False, False, False, pp.PP2_CLIENT_SSL, 1),  # no certificate: verify non-zero
        (True, False, False, pp.PP2_CLIENT_SSL, 1),  # "verified" without a certificate: still 1
        (False, True, False, 0x07, 1),  # presented, not verified (optional client auth)
        (True, True, False, 0x07, 0),
        (True, True, True, pp.PP2_CLIENT_SSL | pp.PP2_CLIENT_CERT_SESS, 0),  # resumed session
    ],
)
def test_ssl_tlv_flags_and_verify(verified, presented, resumed, client, verify):
    t, value = tlv_ssl("TLSv1.2", None, verified, presented, None, resumed=resumed)
    assert t == pp.PP2_TYPE_SSL
    c, v, subs = spec_ssl(value)
    assert (c, v) == (client, verify)
    assert subs == {pp.PP2_SUBTYPE_SSL_VERSION: b"TLSv1.2"}
    info = parse(encode_v2(("1.1.1.1", 1), ("2.2.2.2", 2), tlvs=[(t, value)])).ssl
    assert (info.client, info.verify, info.cipher, info.cn) == (client, verify, None, None)
    assert info.cert_verified == (verify == 0)


def test_ssl_tlv_utf8_cn_and_all_subtypes():
    _, value = tlv_ssl("TLSv1.3", "TLS_CHACHA20_POLY1305_SHA256", True, True, "Zoë Ünïcode")
    _, _, subs = spec_ssl(value)
    assert subs == {
        pp.PP2_SUBTYPE_SSL_VERSION: b"TLSv1.3",
        pp.PP2_SUBTYPE_SSL_CIPHER: b"TLS_CHACHA20_POLY1305_SHA256",
        pp.PP2_SUBTYPE_SSL_CN: "Zoë Ünïcode".encode(),
    }
    assert pp.decode_ssl(value).cn == "Zoë Ünïcode"


def test_crc32c_known_value_and_checksummed_header():
    assert pp.crc32c(b"123456789") == 0xE3069283 == spec_crc32c(b"123456789")
    h = encode_v2(("192.0.2.1", 1), ("192.0.2.2", 2), tlvs=[tlv_alpn(b"h2")], checksum=True)
    _, _, _, _, tlvs, _ = spec_decode_v2(h)
    assert tlvs[-1][0] == pp.PP2_TYPE_CRC32C
    zeroed = h[:-4] + b"\0\0\0\0"
    assert int.from_bytes(tlvs[-1][1], "big") == spec_crc32c(zeroed)
    assert parse(h).alpn == b"h2"
    bad = h[:-1] + bytes([h[-1] ^ 1])
    with pytest.raises(ProxyHeaderError, match="CRC32c mismatch"):
        parse(bad)


def test_v2_encoder_limits():
    with pytest.raises(ValueError, match="do not fit"):
        encode_v2(("1.1.1.1", 1), ("2.2.2.2", 2), tlvs=[(0xE0, b"x" * 65000)] * 2)
    with pytest.raises(ValueError, match="over 65535"):
        encode_v2(None, None, tlvs=[(0xE0, b"x" * 65536)])
    with pytest.raises(ValueError, match="TLV type"):
        encode_v2(None, None, tlvs=[(256, b"")])
    with pytest.raises(ValueError, match="port"):
        encode_v2(("1.1.1.1", 65536), ("2.2.2.2", 2))
    with pytest.raises(ValueError, match="IP address"):
        encode_v2(("1.1.1", 1), ("2.2.2.2", 2))
    with pytest.raises(ValueError, match="IP address"):
        encode_v2(("2001:db8::g", 1), ("2001:db8::1", 2))


# -- property tests -----------------------------------------------------------------------

ports = st.integers(0, 65535)
v4 = st.ip_addresses(v=4).map(str)
v6 = st.ip_addresses(v=6).map(str).filter(lambda a: not ipaddress.IPv6Address(a).ipv4_mapped)
pairs = st.one_of(
    st.tuples(st.tuples(v4, ports), st.tuples(v4, ports)),
    st.tuples(st.tuples(v6, ports), st.tuples(v6, ports)),
)
opaque_types = st.integers(0, 255).filter(lambda t: t not in (pp.PP2_TYPE_CRC32C, pp.PP2_TYPE_SSL))
tlv_lists = st.lists(st.tuples(opaque_types, st.binary(max_size=300)), max_size=6)


@settings(max_examples=300)
@given(addrs=st.one_of(pairs, st.just((None, None))), tlvs=tlv_lists)
def test_v2_encoder_matches_the_spec_decoder(addrs, tlvs):
    src, dst = addrs
    h = encode_v2(src, dst, tlvs=tlvs)
    cmd, family, src2, dst2, tlvs2, n = spec_decode_v2(h)
    assert n == len(h)
    assert tlvs2 == tlvs
    if src is None:
        assert (cmd, family, src2, dst2) == ("LOCAL", 0, None, None)
    else:
        assert cmd == "PROXY"
        assert family == (2 if ":" in src[0] else 1)
        assert norm(src2) == norm(src)
        assert norm(dst2) == norm(dst)
    # and the parser agrees with both
    r = parse(h)
    assert (norm(r.src), norm(r.dst), list(r.tlvs), r.consumed) == (norm(src), norm(dst), tlvs, n)


@settings(max_examples=200)
@given(
    addrs=pairs,
    ssl=st.tuples(
        st.none() | st.sampled_from(["TLSv1.2", "TLSv1.3"]),
        st.none() | st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40),
        st.booleans(),
        st.booleans(),
        st.none() | st.text(max_size=64),
    ),
    alpn=st.binary(min_size=1, max_size=255),
    sni=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=253),
)
def test_v2_tls_tlvs_match_the_spec_decoder(addrs, ssl, alpn, sni):
    version, cipher, verified, presented, cn = ssl
    tlvs = [tlv_alpn(alpn), tlv_authority(sni), tlv_ssl(version, cipher, verified, presented, cn)]
    h = encode_v2(*addrs, tlvs=tlvs, checksum=True)
    *_, decoded, _n = spec_decode_v2(h)
    assert decoded[0] == (pp.PP2_TYPE_ALPN, alpn)
    assert decoded[1] == (pp.PP2_TYPE_AUTHORITY, sni.encode())
    client, verify, subs = spec_ssl(decoded[2][1])
    assert client & pp.PP2_CLIENT_SSL
    assert bool(client & pp.PP2_CLIENT_CERT_CONN) == presented
    assert (verify == 0) == (presented and verified)
    assert subs.get(pp.PP2_SUBTYPE_SSL_VERSION) == (None if version is None else version.encode())
    assert subs.get(pp.PP2_SUBTYPE_SSL_CIPHER) == (None if cipher is None else cipher.encode())
    assert subs.get(pp.PP2_SUBTYPE_SSL_CN) == (cn.encode() if cn is not None else None)
    assert decoded[3][0] == pp.PP2_TYPE_CRC32C
    assert int.from_bytes(decoded[3][1], "big") == spec_crc32c(h[:-4] + b"\0\0\0\0")
    r = parse(h)
    assert (r.alpn, r.authority, r.ssl.cn) == (alpn, sni, cn)


def _feed_all(parser, chunks):
    """Feeds until a result; returns it (or None). Only ProxyHeaderError may escape."""
    for c in chunks:
        r = parser.feed(c)
        if r is not None:
            return r
    return None


@settings(max_examples=500)
@given(data=st.binary(max_size=300), cuts=st.lists(st.integers(0, 300), max_size=6))
def test_parser_on_random_bytes_raises_only_proxy_header_error(data, cuts):
    bounds = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    chunks = [data[a:b] for a, b in itertools.pairwise(bounds)]
    try:
        r = _feed_all(ProxyHeaderParser(), chunks)
    except ProxyHeaderError as exc:
        assert str(exc)
        return
    if r is not None:
        assert isinstance(r, ParseResult)
        assert r.consumed + len(r.rest) == len(data)


valid_headers = st.one_of(
    st.builds(lambda a, t: encode_v2(*a, tlvs=t), pairs, tlv_lists),
    st.builds(lambda a: encode_v1(*a), pairs),
    st.just(encode_v2(None, None)),
    st.just(b"PROXY UNKNOWN\r\n"),
)


@settings(max_examples=300)
@given(header=valid_headers, data=st.data())
def test_every_truncation_of_a_valid_header_needs_more_and_mutations_fail_cleanly(header, data):
    cut = data.draw(st.integers(0, len(header) - 1))
    p = ProxyHeaderParser(max_size=70000)
    assert p.feed(header[:cut]) is None
    assert p.wanted >= 1
    assert p.feed(header[cut:]) is not None
    # flip one byte anywhere: a result or ProxyHeaderError, nothing else
    pos = data.draw(st.integers(0, len(header) - 1))
    bad = header[:pos] + bytes([header[pos] ^ data.draw(st.integers(1, 255))]) + header[pos + 1 :]
    try:
        ProxyHeaderParser(max_size=70000).feed(bad)
    except ProxyHeaderError:
        pass


# -- incremental feeding ------------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        encode_v1(("192.0.2.1", 1), ("192.0.2.2", 2)),
        encode_v1(("2001:db8::1", 1), ("2001:db8::2", 2)),
        encode_v2(("192.0.2.1", 1), ("192.0.2.2", 2), tlvs=[tlv_alpn(b"http/1.1")]),
        encode_v2(("2001:db8::1", 1), ("2001:db8::2", 2), checksum=True),
        encode_v2(None, None),
    ],
)
def test_byte_by_byte_equals_all_at_once(header):
    whole = parse(header + CLIENT_HELLO)
    r, fed = parse_bytewise(header + CLIENT_HELLO)
    assert fed == len(header)  # complete exactly at the header's last byte
    assert r.rest == b""
    assert r.consumed == whole.consumed == len(header)
    assert (r.src, r.dst, r.tlvs, r.command) == (whole.src, whole.dst, whole.tlvs, whole.command)


def test_wanted_reads_a_v2_header_exactly():
    header = encode_v2(("192.0.2.1", 1), ("192.0.2.2", 2), tlvs=[tlv_authority("a.example")])
    stream = header + CLIENT_HELLO
    p = ProxyHeaderParser()
    pos = 0
    r = None
    while r is None:
        n = p.wanted
        assert n >= 1
        r = p.feed(stream[pos : pos + n])
        pos += n
    assert pos == len(header) and r.rest == b"" and p.wanted == 0


@settings(max_examples=300)
@given(header=valid_headers, data=st.data())
def test_take_never_reads_past_the_header(header, data):
    """The socket loop: peek what has arrived, receive only ``take`` of it, feed that."""
    stream = header + CLIENT_HELLO
    p = ProxyHeaderParser(max_size=70000)
    arrived = 0  # bytes the kernel holds so far (they arrive in random pieces)
    pos = 0  # bytes received from the socket
    r = None
    while r is None:
        if arrived == pos or data.draw(st.booleans()):
            arrived = min(len(stream), arrived + data.draw(st.integers(1, 40)))
        peeked = stream[pos:arrived]
        n = p.take(peeked)
        assert 1 <= n <= len(peeked)
        r = p.feed(stream[pos : pos + n])
        pos += n
    assert pos == len(header) and r.rest == b""
    assert p.take(b"more") == 0


def test_errors_are_sticky_and_feeding_after_done_is_a_bug():
    p = ProxyHeaderParser()
    with pytest.raises(ProxyHeaderError):
        p.feed(b"\x16")
    with pytest.raises(ProxyHeaderError, match="first byte 0x16"):
        p.feed(b"PROXY ")
    p = ProxyHeaderParser()
    p.feed(b"PROXY UNKNOWN\r\n")
    with pytest.raises(RuntimeError):
        p.feed(b"x")


def test_plain_client_hello_is_refused_at_its_first_byte():
    with pytest.raises(ProxyHeaderError, match="TLS record: the client sent no PROXY header"):
        ProxyHeaderParser().feed(CLIENT_HELLO[:1])


@pytest.mark.parametrize("i", range(12))
def test_v2_signature_mismatch_is_refused_at_that_byte(i):
    bad = SIG[:i] + bytes([SIG[i] ^ 0x40])
    p = ProxyHeaderParser()
    if i:
        assert p.feed(bad[:-1]) is None
    with pytest.raises(ProxyHeaderError, match="not a PROXY protocol header"):
        p.feed(bad[-1:])


def test_v2_length_over_max_is_refused_from_the_fixed_header_alone():
    p = ProxyHeaderParser(max_size=512)
    with pytest.raises(ProxyHeaderError, match="over the maximum 512"):
        p.feed(SIG + b"\x21\x11" + struct.pack(">H", 512 - 16 + 1))


def test_parser_settings_are_checked():
    with pytest.raises(ValueError):
        ProxyHeaderParser(max_size=20)
    with pytest.raises(ValueError):
        ProxyHeaderParser(accept="v3")  # type: ignore[arg-type]


# -- malformed headers --------------------------------------------------------------------


def v2(ver_cmd=0x21, fam=0x11, body=bytes(12), length=None):
    return (
        SIG
        + bytes([ver_cmd, fam])
        + struct.pack(">H", len(body) if length is None else length)
        + body
    )


ADDR4 = bytes([192, 0, 2, 1, 192, 0, 2, 2, 0, 1, 0, 2])

MALFORMED = [
    # (header, accept, message regex)
    (CLIENT_HELLO, "any", r"first byte 0x16 \(a TLS record"),
    (b"GET / HTTP/1.1\r\n", "any", r"first byte 0x47 \(expected b'PROXY ' \(v1\) or the v2"),
    (b"PROXX TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "any", r"bad v1 signature at byte 4"),
    (b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "any", r"first byte 0x70"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "any", r"LF instead of CRLF"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n", "any", r"CR not followed by LF"),
    (b"PROXY TCP4 1.2.3.4\r5.6.7.8 1 2\r\n", "any", r"CR not followed by LF"),
    (
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2" + b"0" * 76 + b"\r\n",
        "any",
        r"no CRLF within the first 107",
    ),
    (b"PROXY TCP4 \x001.2.3.4 5.6.7.8 1 2\r\n", "any", r"unexpected byte 0x00"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 \xd9\xa1 2\r\n", "any", r"unexpected byte 0xd9"),
    (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "any", r"unknown protocol 'TCP5'"),
    (b"PROXY \r\n", "any", r"unknown protocol ''"),
    (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", "any", r"single spaces, got 7 fields"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "any", r"got 5 fields"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "any", r"got 7 fields"),
    (b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", "any", r"source address '1.2.3.256' is not an IPv4"),
    (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "any", r"source address '01.2.3.4' is not an IPv4"),
    (b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n", "any", r"destination address '::1' is not an IPv4"),
    (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "any", r"source address '1.2.3.4' is not an IPv6"),
    (b"PROXY TCP6 ::1 ::g 1 2\r\n", "any", r"destination address '::g' is not an IPv6"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "any", r"source port 65536 is over 65535"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 080\r\n", "any", r"destination port '080' has a leading zero"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "any", r"source port '-1' is not a decimal number"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 0x10\r\n", "any", r"destination port '0x10' is not a decimal"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 123456 2\r\n", "any", r"source port '123456' is not a decimal"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "v2", r"v1 header, but this listener accepts only v2"),
    (v2(), "v1", r"v2 header, but this listener accepts only v1"),
    (
        SIG[:5] + b"\x01" + SIG[6:] + b"\x21\x11\x00\x0c" + ADDR4,
        "any",
        r"bad v2 signature at byte 5",
    ),
    (v2(ver_cmd=0x11, body=ADDR4), "any", r"unsupported version 1 \(expected 2\)"),
    (v2(ver_cmd=0x31, body=ADDR4), "any", r"unsupported version 3"),
    (v2(ver_cmd=0x22, body=ADDR4), "any", r"unknown command 2"),
    (v2(fam=0x41, body=ADDR4), "any", r"unknown address family 4"),
    (v2(fam=0x13, body=ADDR4), "any", r"unknown transport protocol 3"),
    (v2(fam=0x12, body=ADDR4), "any", r"transport DGRAM, only STREAM"),
    (v2(fam=0x10, body=ADDR4), "any", r"transport UNSPEC, only STREAM"),
    (v2(fam=0x31, body=bytes(216)), "any", r"AF_UNIX addresses are not supported"),
    (v2(body=ADDR4[:8]), "any", r"length 8 is too short for INET addresses \(12 bytes\)"),
    (v2(fam=0x21, body=bytes(20)), "any", r"length 20 is too short for INET6 addresses \(36"),
    (
        v2(length=5000, body=b""),
        "any",
        r"length 5000 makes the header 5016 bytes, over the maximum 4096",
    ),
    (v2(body=ADDR4 + b"\x01\x00"), "any", r"truncated TLV at offset 0: 2 bytes left"),
    (
        v2(body=ADDR4 + b"\x01\x00\x05abc"),
        "any",
        r"truncated TLV 0x01 at offset 0: length 5, only 3",
    ),
    (v2(body=ADDR4 + b"\x04\x00\x00\x20\x00\x03abc"), "any", r"PP2_TYPE_SSL TLV of 3 bytes"),
    (
        v2(body=ADDR4 + b"\x20\x00\x08\x01\x00\x00\x00\x00\x21\x00\x09"),
        "any",
        r"truncated PP2_TYPE_SSL sub-TLV 0x21 at offset 0: length 9, only 0",
    ),
    (v2(body=ADDR4 + b"\x03\x00\x02ab"), "any", r"PP2_TYPE_CRC32C of 2 bytes, not 4"),
    (v2(body=ADDR4 + b"\x03\x00\x04abcd"), "any", r"CRC32c mismatch"),
]


@pytest.mark.parametrize(("header", "accept", "message"), MALFORMED)
def test_malformed_header_is_rejected_with_a_clear_message(header, accept, message):
    with pytest.raises(ProxyHeaderError, match=message):
        ProxyHeaderParser(accept=accept).feed(header + CLIENT_HELLO)
    # fed byte by byte, the same error (never a result, never another exception)
    p = ProxyHeaderParser(accept=accept)
    with pytest.raises(ProxyHeaderError, match=message):
        for i in range(len(header) + len(CLIENT_HELLO)):
            assert p.feed((header + CLIENT_HELLO)[i : i + 1]) is None


def test_malformed_table_messages_are_distinct_enough():
    # a sanity check on the table itself: each entry really is rejected for its own reason
    seen = set()
    for header, _accept, message in MALFORMED:
        assert (header, message) not in seen
        seen.add((header, message))
        assert re.compile(message)


def test_v2_unspec_proxy_and_local_with_tlvs():
    r = parse(v2(fam=0x00, body=b""))
    assert (r.command, r.family, r.src) == ("PROXY", None, None)
    # LOCAL ignores its (valid) address block
    r = parse(v2(ver_cmd=0x20, fam=0x11, body=ADDR4 + b"\x02\x00\x01x"))
    assert (r.command, r.src, r.authority) == ("LOCAL", None, "x")
