"""Reusable pieces for edgeterm's integration tests.

Everything here is real: upstream servers on loopback sockets, TLS clients on the stdlib ``ssl``
module (OpenSSL), edgeterm started as a separate process, memory and file descriptors read from
/proc through psutil. Nothing is mocked.

- ``waiting``: bounded waits (every wait has a deadline and says what it waited for).
- ``upstreams``: plaintext upstream servers (echo, source/sink, answer-after-FIN, refusing port,
  black hole) running on one asyncio loop in a background thread.
- ``tlsclient``: client ``SSLContext`` builders and blocking helpers (read exactly, read to EOF,
  send close_notify while keeping the read side open).
- ``certs``: the CA and three certificates the SNI tests use.
- ``configs``: edgeterm TOML configs for tests.
- ``launcher``: starts ``edgeterm start --foreground``, waits for readiness, stops it by PID.
- ``procfs``: RSS and file descriptor counts over a process and all its descendants.
"""
