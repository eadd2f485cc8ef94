"""The admin socket protocol: one JSON request line, one JSON answer line, then close.

The supervisor serves it on ``server.admin_socket`` (mode 0600); the CLI is the client.
Requests: ``{"cmd": "status"}``.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

MAX_REQUEST = 4096


def request(path: Path, cmd: str, timeout: float = 5.0) -> dict[str, Any]:
    """Send ``cmd`` and return the answer. Raises OSError when nobody listens there."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(json.dumps({"cmd": cmd}).encode() + b"\n")
        chunks: list[bytes] = []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
    answer = json.loads(b"".join(chunks) or b"{}")
    if not isinstance(answer, dict):
        raise ValueError("admin socket answered something that is not a JSON object")
    return answer
