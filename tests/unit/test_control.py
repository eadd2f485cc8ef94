import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeterm import control
from edgeterm.control import Decoder, FrameError, MsgType


def test_round_trip_in_pieces():
    frames = control.encode_json(MsgType.HEARTBEAT, {"t": 1.5}) + control.encode(MsgType.DRAIN)
    dec = Decoder()
    got = []
    for i in range(len(frames)):
        got += dec.feed(frames[i : i + 1])
    assert [m.type for m in got] == [MsgType.HEARTBEAT, MsgType.DRAIN]
    assert got[0].json() == {"t": 1.5}
    assert dec.buffered == 0


def test_over_maximum_is_rejected_from_the_header_alone():
    dec = Decoder(max_payload=1024)
    with pytest.raises(FrameError, match="over the maximum"):
        dec.feed(struct.pack(">IB", 1025, MsgType.STATS))


def test_unknown_type_is_rejected():
    with pytest.raises(FrameError, match="unknown message type"):
        Decoder().feed(struct.pack(">IB", 0, 250))


def test_truncated_frame_stays_buffered():
    frame = control.encode_json(MsgType.STATS, {"a": 1})
    dec = Decoder()
    assert dec.feed(frame[:-1]) == []
    assert dec.buffered == len(frame) - 1


def test_encoder_refuses_oversized_payload():
    with pytest.raises(ValueError):
        control.encode(MsgType.STATS, b"x" * (control.MAX_PAYLOAD + 1))


def test_non_object_json_payload_is_a_frame_error():
    (msg,) = Decoder().feed(control.encode(MsgType.STATS, b"[1,2]"))
    with pytest.raises(FrameError):
        msg.json()


@given(st.binary(max_size=512))
def test_decoder_on_random_bytes_returns_messages_or_frame_error(data):
    dec = Decoder(max_payload=256)
    try:
        msgs = dec.feed(data)
    except FrameError:
        return
    for m in msgs:
        assert isinstance(m.type, MsgType)
        assert len(m.payload) <= 256
