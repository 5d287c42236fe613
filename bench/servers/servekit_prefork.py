# Contender: servekit with 2 pre-forked worker processes, a thread pool of 64 in each
# (128 in all, like servekit_pool), under the supervisor; the same handler classes as
# every socketserver-style contender. SIGTERM is the supervisor's graceful stop.
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from common import announce, parse_args
from handlers import DatagramEchoHandler, LineEchoHandler

import servekit
from servekit.features.pool import ThreadPoolMixIn
from servekit.process.prefork import PreforkMixIn

WORKERS = 2
THREADS = 64


class TCPServer(PreforkMixIn, ThreadPoolMixIn, servekit.TCPServer):
    def on_workers_ready(self) -> None:
        announce(self.server_address[1])


class UDPServer(PreforkMixIn, ThreadPoolMixIn, servekit.UDPServer):
    def on_workers_ready(self) -> None:
        announce(self.server_address[1])


def main() -> None:
    args = parse_args("servekit, pre-forked workers with a thread pool each")
    cls = UDPServer if args.udp else TCPServer
    handler = DatagramEchoHandler if args.udp else LineEchoHandler
    with cls(
        (args.host, args.port),
        handler,
        workers=WORKERS,
        max_threads=THREADS,
        graceful_timeout=2.0,
        drain_timeout=1.0,
    ) as server:
        server.serve_forever()


if __name__ == "__main__":
    main()
