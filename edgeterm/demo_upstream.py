"""A tiny plaintext HTTP/1.1 server for ``make run``: the upstream behind the demo edgeterm.

python -m edgeterm.demo_upstream [--bind 127.0.0.1:8080]
"""

from __future__ import annotations

import argparse
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "edgeterm-demo-upstream"

    def do_GET(self) -> None:
        body = f"hello from the demo upstream: you asked for {self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        sys.stderr.write("demo-upstream: " + (format % args) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bind", default="127.0.0.1:8080", help="host:port (loopback)")
    args = parser.parse_args(argv)
    host, _, port = args.bind.rpartition(":")
    server = ThreadingHTTPServer((host.strip("[]"), int(port)), _Handler)
    server.daemon_threads = True
    sys.stderr.write(f"demo-upstream: serving http://{args.bind}/\n")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
