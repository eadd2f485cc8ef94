"""What one server-side TLS connection costs in OpenSSL itself, before edgeterm adds anything.

    python -m loadtest.tlsmem [--conns N] [--variants tls13-x25519,tls13-p256,tls12-x25519]

A forked server process wraps N connected socket pairs the way an edgeterm worker does
(``SSLContext._wrap_socket``, read-ahead on, the policy's ticket count), completes the
handshake and reads one byte on each, while a client process holds the other ends. The server
reports, per connection: bytes malloc holds in use (glibc ``mallinfo2().uordblks``: every live
allocation of OpenSSL and of the ``_ssl`` object, without fragmentation) and PSS growth
(``/proc/self/smaps_rollup``: what the kernel charges, fragmentation included).

This is the floor under BENCHMARKS.md's "memory per idle TLS connection": an edgeterm worker
holds this plus its own objects and the upstream socket.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import signal
import socket
import ssl
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

VARIANTS = ("tls13-x25519", "tls13-p256", "tls12-x25519")


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


@dataclass(frozen=True, slots=True)
class Result:
    variant: str
    conns: int
    malloc_kib: float  # malloc in use per connection
    pss_kib: float  # PSS growth per connection


def _malloc_in_use() -> int:
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _MallInfo2
    info: _MallInfo2 = libc.mallinfo2()
    return int(info.uordblks) + int(info.hblkhd)


def _pss_kib() -> int:
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    raise RuntimeError("no Pss line in /proc/self/smaps_rollup")


def _server_context(variant: str, cert: Path, key: Path) -> ssl.SSLContext:
    from edgeterm import openssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    openssl.set_read_ahead(ctx, True)
    openssl.set_groups(ctx, "P-256" if "p256" in variant else "X25519")
    if variant.startswith("tls12"):
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def measure(variant: str, conns: int, cert: Path, key: Path) -> Result:
    """Run one variant in a fresh server process and a fresh client process."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the server process
        os.close(rfd)
        code = 0
        try:
            line = _serve(variant, conns, cert, key)
            os.write(wfd, line.encode())
        except BaseException as exc:  # report, never return into the caller's code
            os.write(wfd, f"error {exc!r}".encode())
            code = 1
        finally:
            os._exit(code)
    os.close(wfd)
    with os.fdopen(rfd) as r:
        answer = r.read()
    os.waitpid(pid, 0)
    if answer.startswith("error"):
        raise RuntimeError(f"{variant}: {answer}")
    malloc_b, pss_k = answer.split()
    return Result(variant, conns, int(malloc_b) / conns / 1024, int(pss_k) / conns)


def _serve(variant: str, conns: int, cert: Path, key: Path) -> str:
    ctx = _server_context(variant, cert, key)
    pairs = [socket.socketpair() for _ in range(conns)]
    client = os.fork()
    if client == 0:  # the client process holds the other ends until killed
        try:
            cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            cctx.check_hostname = False
            cctx.verify_mode = ssl.CERT_NONE
            held = []
            for ours, theirs in pairs:
                ours.close()
                tls = cctx.wrap_socket(theirs, server_hostname="localhost")
                tls.sendall(b"x")
                held.append(tls)
            signal.pause()
        finally:
            os._exit(0)
    for _, theirs in pairs:
        theirs.close()
    try:
        # one connection first, so that what OpenSSL creates once is not counted
        first = ctx._wrap_socket(pairs[0][0], True)  # type: ignore[attr-defined]
        first.do_handshake()
        first.read(1)
        gc.collect()
        m0, p0 = _malloc_in_use(), _pss_kib()
        held = []
        for ours, _ in pairs[1:]:
            tls = ctx._wrap_socket(ours, True)  # type: ignore[attr-defined]
            tls.do_handshake()
            tls.read(1)
            held.append(tls)
        gc.collect()
        m1, p1 = _malloc_in_use(), _pss_kib()
    finally:
        os.kill(client, signal.SIGKILL)
        os.waitpid(client, 0)
    n = conns - 1
    # scaled back to ``conns`` by the caller's division
    return f"{(m1 - m0) * conns // n} {(p1 - p0) * conns // n}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.tlsmem", description=__doc__)
    ap.add_argument("--conns", type=int, default=2000)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r} (known: {', '.join(VARIANTS)})")
    if args.conns < 2 or args.conns * 2 + 64 > os.sysconf("SC_OPEN_MAX"):
        ap.error("--conns must be at least 2 and fit twice in the descriptor limit")
    from edgeterm.selfsigned import generate

    with tempfile.TemporaryDirectory(prefix="loadtest-tlsmem-") as tmp:
        cert = generate(Path(tmp), ["localhost"], key_type="ecdsa-p256")
        print("| variant | connections | malloc in use, KiB per conn | PSS, KiB per conn |")
        print("|---|---|---|---|")
        for v in variants:
            r = measure(v, args.conns, cert.cert_path, cert.key_path)
            print(f"| {r.variant} | {r.conns:,} | {r.malloc_kib:.1f} | {r.pss_kib:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
