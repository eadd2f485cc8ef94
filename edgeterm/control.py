"""The supervisor <-> worker control channel: typed, length-prefixed frames.

Wire format of one frame: a 4-byte big-endian payload length, a 1-byte message type, then the
payload. The length is checked against ``MAX_PAYLOAD`` before anything is allocated for it, and
the type against the known types, so a corrupt or hostile peer gets a ``FrameError`` and
never an unbounded allocation. Payloads of control messages are small JSON objects; binary
payloads (ticket keys) are raw bytes.

Sans-I/O: ``encode`` builds bytes, ``Decoder.feed`` turns received bytes into messages. The
worker and the supervisor own the sockets.
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass
from typing import Any, Final

HEADER: Final = struct.Struct(">IB")
MAX_PAYLOAD: Final = 64 * 1024


class MsgType(enum.IntEnum):
    READY = 1  # worker -> supervisor: accepting; payload {"pid", "worker", "cpu", "generation"}
    HEARTBEAT = 2  # both ways; payload {"t": monotonic seconds}
    DRAIN = 3  # supervisor -> worker: stop accepting, finish connections, exit
    STOP = 4  # supervisor -> worker: close everything now, exit
    STATS_REQUEST = 5  # supervisor -> worker
    STATS = 6  # worker -> supervisor: the worker's counters
    TICKET_KEYS = 7  # supervisor -> worker: the ticket key ring (binary)
    ACK = 8  # worker -> supervisor: {"of": type, ...}
    BOOT_ERROR = 9  # worker -> supervisor: {"error": why the worker cannot serve}
    # supervisor -> worker: active health check results (docs/routing.md);
    # payload {"pool": name, "servers": [[server key, up], ...]}
    UPSTREAM_STATE = 10


class FrameError(Exception):
    """The peer sent bytes that are not a valid frame (the peer's fault)."""


@dataclass(frozen=True, slots=True)
class Message:
    type: MsgType
    payload: bytes = b""

    def json(self) -> dict[str, Any]:
        try:
            obj = json.loads(self.payload) if self.payload else {}
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise FrameError(f"{self.type.name}: payload is not JSON: {exc}") from exc
        if not isinstance(obj, dict):
            raise FrameError(f"{self.type.name}: payload is not a JSON object")
        return obj


def encode(msg_type: MsgType, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes is over the maximum {MAX_PAYLOAD}")
    return HEADER.pack(len(payload), msg_type) + payload


def encode_json(msg_type: MsgType, obj: dict[str, Any] | None = None) -> bytes:
    payload = json.dumps(obj or {}, separators=(",", ":")).encode()
    return encode(msg_type, payload)


class Decoder:
    """Accumulates bytes and yields complete messages."""

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self._buf = bytearray()
        self._max = max_payload

    def feed(self, data: bytes) -> list[Message]:
        self._buf += data
        out: list[Message] = []
        buf = self._buf
        while len(buf) >= HEADER.size:
            length, raw_type = HEADER.unpack_from(buf)
            if length > self._max:
                raise FrameError(f"frame of {length} bytes is over the maximum {self._max}")
            try:
                msg_type = MsgType(raw_type)
            except ValueError:
                raise FrameError(f"unknown message type {raw_type}") from None
            end = HEADER.size + length
            if len(buf) < end:
                break
            out.append(Message(msg_type, bytes(buf[HEADER.size : end])))
            buf[:end] = bytes(end)  # zero first: frames may carry ticket keys
            del buf[:end]
        return out

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame held (a truncated frame at EOF is an error)."""
        return len(self._buf)
