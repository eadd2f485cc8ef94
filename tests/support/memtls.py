"""TLS between two in-memory endpoints (ssl.MemoryBIO): real OpenSSL, no sockets."""

from __future__ import annotations

import ssl


def handshake(
    client: ssl.SSLObject,
    server: ssl.SSLObject,
    client_bios: tuple[ssl.MemoryBIO, ssl.MemoryBIO],
    server_bios: tuple[ssl.MemoryBIO, ssl.MemoryBIO],
    rounds: int = 10,
) -> None:
    """Drive both sides until each finished its handshake; each BIO pair is (incoming, outgoing).

    Raises AssertionError if that takes more than ``rounds`` rounds.
    """
    c_in, c_out = client_bios
    s_in, s_out = server_bios
    done = [False, False]
    for _ in range(rounds):
        for index, side in enumerate((client, server)):
            if not done[index]:
                try:
                    side.do_handshake()
                    done[index] = True
                except ssl.SSLWantReadError:
                    pass
            s_in.write(c_out.read())
            c_in.write(s_out.read())
        if all(done):
            return
    raise AssertionError("handshake did not finish")
