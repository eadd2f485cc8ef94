"""Property tests of the control channel's decoding (``edgeterm.control``) and of the ticket key
frame (``edgeterm.tickets.install_ring``), beyond tests/unit/test_control.py.

Contract: bytes from the peer give messages or ``FrameError``, never another exception, never
an allocation sized by the peer; a valid stream decodes to the same messages however the bytes
are split; an invalid TICKET_KEYS payload leaves the installed keys untouched.
"""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from edgeterm import control
from edgeterm.control import HEADER, MAX_PAYLOAD, Decoder, FrameError, Message, MsgType
from edgeterm.keyring import KEY_SIZE
from edgeterm.tickets import KeyStore, install_ring

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

frames = st.tuples(st.sampled_from(list(MsgType)), st.binary(max_size=300))
streams = st.lists(frames, max_size=8)


def encode_all(msgs: list[tuple[MsgType, bytes]]) -> bytes:
    return b"".join(control.encode(t, p) for t, p in msgs)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return pieces


@FAST
@given(msgs=streams, cuts=st.lists(st.integers(min_value=0), max_size=12))
def test_any_split_of_a_valid_stream_gives_the_same_messages(msgs, cuts):
    data = encode_all(msgs)
    dec = Decoder()
    got: list[Message] = []
    for piece in split(data, cuts):
        got += dec.feed(piece)
    assert [(m.type, m.payload) for m in got] == msgs
    assert dec.buffered == 0


@FAST
@given(msgs=st.lists(frames, min_size=1, max_size=6), data=st.data())
def test_a_truncated_stream_gives_the_complete_frames_and_buffers_the_rest(msgs, data):
    stream = encode_all(msgs)
    cut = data.draw(st.integers(min_value=0, max_value=len(stream) - 1))
    dec = Decoder()
    got = dec.feed(stream[:cut])
    ends, end = [], 0
    for _t, p in msgs:
        end += HEADER.size + len(p)
        ends.append(end)
    complete = sum(1 for e in ends if e <= cut)
    assert [(m.type, m.payload) for m in got] == msgs[:complete]
    assert dec.buffered == cut - (ends[complete - 1] if complete else 0)
    # the rest arrives later: every frame, once
    assert [(m.type, m.payload) for m in dec.feed(stream[cut:])] == msgs[complete:]


@FAST
@given(
    prefix=streams,
    junk=st.binary(min_size=1, max_size=64),
    cuts=st.lists(st.integers(min_value=0), max_size=6),
)
@example(prefix=[], junk=struct.pack(">IB", 0xFFFFFFFF, MsgType.STATS), cuts=[])
@example(prefix=[], junk=struct.pack(">IB", MAX_PAYLOAD + 1, MsgType.TICKET_KEYS), cuts=[])
@example(prefix=[(MsgType.HEARTBEAT, b"{}")], junk=struct.pack(">IB", 0, 0), cuts=[7])
def test_valid_frames_then_junk_give_messages_then_frame_error_or_a_bounded_buffer(
    prefix, junk, cuts
):
    data = encode_all(prefix) + junk
    dec = Decoder()
    got: list[Message] = []
    failed = False
    try:
        for piece in split(data, cuts):
            got += dec.feed(piece)
    except FrameError:
        failed = True
    delivered = [(m.type, m.payload) for m in got[: len(prefix)]]
    if failed:
        # A feed() that raises drops the frames it had decoded in that call: the peer is
        # broken and the channel is given up (the worker drains, the supervisor kills it).
        assert delivered == prefix[: len(delivered)]
    else:
        # the junk may parse as more frames, after every frame before it
        assert delivered == prefix
    for m in got:
        assert isinstance(m.type, MsgType) and len(m.payload) <= MAX_PAYLOAD
    # nothing the peer announced was allocated: the decoder holds only what it was fed
    assert dec.buffered <= len(data)


@FAST
@given(data=st.binary(max_size=2048), chunk=st.integers(min_value=1, max_value=64))
def test_random_bytes_fed_in_chunks_give_messages_or_frame_error(data, chunk):
    dec = Decoder(max_payload=512)
    try:
        for i in range(0, len(data), chunk):
            for m in dec.feed(data[i : i + chunk]):
                assert isinstance(m.type, MsgType)
                assert len(m.payload) <= 512
    except FrameError:
        return
    assert dec.buffered < HEADER.size + 512


def test_a_frame_of_exactly_the_maximum_is_accepted():
    payload = bytes(MAX_PAYLOAD)
    (msg,) = Decoder().feed(control.encode(MsgType.TICKET_KEYS, payload))
    assert msg.payload == payload


# --- JSON payloads -------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=10,
)


@FAST
@given(
    payload=st.binary(max_size=200)
    | json_values.map(lambda v: json.dumps(v).encode())
    | st.text(max_size=50).map(lambda s: s.encode("utf-8", "surrogatepass"))
)
def test_json_payload_is_an_object_or_frame_error(payload):
    msg = Message(MsgType.STATS, payload)
    try:
        obj = msg.json()
    except FrameError:
        return
    assert isinstance(obj, dict)


@pytest.mark.parametrize("depth", [1000, MAX_PAYLOAD // 2])
def test_deeply_nested_json_payload_is_a_frame_error(depth):
    (msg,) = Decoder().feed(control.encode(MsgType.STATS, b"[" * depth + b"]" * depth))
    with pytest.raises(FrameError):
        msg.json()


# --- TICKET_KEYS ---------------------------------------------------------------------------

_RING_HEADER = struct.Struct(">QB")


@pytest.fixture(scope="module")
def store() -> KeyStore:
    s = KeyStore(capacity=4)
    for slot in range(4):
        s.fill_random(slot)
    return s


def ring_payload(seq: int, keys: list[bytes]) -> bytes:
    return _RING_HEADER.pack(seq, len(keys)) + b"".join(keys)


@FAST
@given(payload=st.binary(max_size=5 * KEY_SIZE + 20))
@example(payload=_RING_HEADER.pack(1, 255) + bytes(KEY_SIZE))
@example(payload=_RING_HEADER.pack(2**64 - 1, 0))
def test_install_ring_on_random_payloads_returns_or_frame_error(store, payload):
    before = bytes(store.buf.view)
    try:
        seq, count = install_ring(store, payload)
    except FrameError as exc:
        assert "TICKET_KEYS" in str(exc)
        assert bytes(store.buf.view) == before, "a rejected ring changed the installed keys"
        return
    assert 1 <= count <= store.capacity
    assert len(payload) == _RING_HEADER.size + count * KEY_SIZE
    assert seq == _RING_HEADER.unpack_from(payload)[0]


@FAST
@given(
    seq=st.integers(min_value=0, max_value=2**64 - 1),
    keys=st.lists(st.binary(min_size=KEY_SIZE, max_size=KEY_SIZE), min_size=1, max_size=4),
    tail=st.sampled_from(["none", "drop-one", "add-one"]),
)
def test_install_ring_installs_exactly_a_well_formed_ring(store, seq, keys, tail):
    payload = ring_payload(seq, keys)
    if tail == "drop-one":
        payload = payload[:-1]
    elif tail == "add-one":
        payload += b"\x00"
    before = bytes(store.buf.view)
    if tail != "none":
        with pytest.raises(FrameError):
            install_ring(store, payload)
        assert bytes(store.buf.view) == before
        return
    assert install_ring(store, payload) == (seq, len(keys))
    for i, key in enumerate(keys):
        assert bytes(store.view(i)) == key
    for i in range(len(keys), store.capacity):
        assert bytes(store.view(i)) == bytes(KEY_SIZE), "a slot beyond the ring was not wiped"
