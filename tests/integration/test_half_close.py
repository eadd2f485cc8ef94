"""Half-close through edgeterm, both ways.

Client -> upstream: the client ends its side (close_notify, optionally followed by a TCP FIN);
edgeterm passes that on as a FIN to the upstream, which only then writes its answer and closes.
The answer must arrive whole at the client, followed by close_notify (a clean end: no
``SSLEOFError``).

Upstream -> client: the upstream sends and shuts its write side; the client gets everything
and close_notify, and can still send: its bytes reach the upstream.
"""

from __future__ import annotations

import hashlib
import os
import ssl

import pytest

from tests.support.tlsclient import BioTlsClient, client_context
from tests.support.upstreams import AnswerAfterEofUpstream, GreetThenHalfCloseUpstream

MiB = 1 << 20

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("tcp_fin", [False, True], ids=["close_notify", "close_notify+FIN"])
def test_answer_written_after_client_half_close_arrives_whole(edgeterm, upstream, ca, tcp_fin):
    up = upstream(AnswerAfterEofUpstream, answer_size=MiB)
    server = edgeterm.start([up.addr])
    ctx = client_context(ca, min_version=ssl.TLSVersion.TLSv1_3)
    request = os.urandom(300_000)
    with BioTlsClient(server.port(), ctx) as client:
        client.sendall(request)
        assert client.send_close_notify() is False
        if tcp_fin:
            client.shutdown_tcp_write()
        # raises ssl.SSLEOFError if the stream ends without close_notify
        answer = client.recv_to_eof(timeout=30)
    (rec,) = up.wait_done(1)
    assert rec.eof_received, "the upstream never saw the client's end of stream"
    assert rec.received_sha256 == hashlib.sha256(request).hexdigest()
    assert len(answer) == 32 + MiB, f"got {len(answer)} bytes of {32 + MiB}"
    assert answer[:32] == hashlib.sha256(request).digest()
    assert hashlib.sha256(answer).hexdigest() == rec.sent_sha256


def test_upstream_half_close_gives_close_notify_and_client_can_still_send(edgeterm, upstream, ca):
    up = upstream(GreetThenHalfCloseUpstream, greeting_size=MiB)
    server = edgeterm.start([up.addr])
    ctx = client_context(ca, min_version=ssl.TLSVersion.TLSv1_3)
    with BioTlsClient(server.port(), ctx) as client:
        greeting = client.recv_to_eof(timeout=30)  # ends with close_notify, not SSLEOFError
        (rec,) = up.wait_connections(1)
        assert len(greeting) == MiB
        assert hashlib.sha256(greeting).hexdigest() == rec.sent_sha256_so_far()
        assert not rec.done.is_set(), "the upstream's read side was closed too"
        late = os.urandom(200_000)
        client.sendall(late)
        client.send_close_notify()
        (rec,) = up.wait_done(1, timeout=30)
    assert rec.eof_received
    assert rec.received_sha256 == hashlib.sha256(late).hexdigest()
