# Contender: servekit's bounded thread pool in one process (ThreadPoolTCPServer /
# ThreadPoolUDPServer), running the very same handler classes as the stdlib contenders.
# max_threads=128: with long-lived ping-pong connections a stream handler owns its
# thread per connection, so the pool must cover the 128-connection scenario; beyond
# it, connections wait in the kernel backlog (1024) and memory stays bounded.
from __future__ import annotations

import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from common import announce, parse_args
from handlers import DatagramEchoHandler, LineEchoHandler

from servekit.features.pool import ThreadPoolTCPServer, ThreadPoolUDPServer

THREADS = 128


def main() -> None:
    args = parse_args("servekit thread pool, one process")
    server: ThreadPoolTCPServer
    if args.udp:
        server = ThreadPoolUDPServer(
            (args.host, args.port), DatagramEchoHandler, max_threads=THREADS, drain_timeout=1.0
        )
    else:
        server = ThreadPoolTCPServer(
            (args.host, args.port), LineEchoHandler, max_threads=THREADS, drain_timeout=1.0
        )
    # servekit's own stop path: the signal handler only asks the loop to stop.
    signal.signal(signal.SIGTERM, lambda signum, frame: server.request_shutdown())
    signal.signal(signal.SIGINT, lambda signum, frame: server.request_shutdown())
    with server:
        announce(server.server_address[1])
        server.serve_forever()


if __name__ == "__main__":
    main()
