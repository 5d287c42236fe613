# Contender: the standard library's ThreadingTCPServer / ThreadingUDPServer, as
# shipped: one thread per connection (per datagram for UDP), listen backlog 5.
# This is the baseline every ratio in RESULTS.md is relative to.
from __future__ import annotations

import socketserver

from common import parse_args, serve_until_signal
from handlers import DatagramEchoHandler, LineEchoHandler


class TCPServer(socketserver.ThreadingTCPServer):
    # The only change from the defaults: without daemon threads, server_close() joins
    # every handler thread, and a client that keeps its connection open would stop
    # the server from exiting on SIGTERM.
    daemon_threads = True


class UDPServer(socketserver.ThreadingUDPServer):
    daemon_threads = True


def main() -> None:
    args = parse_args("stdlib socketserver, thread per connection")
    if args.udp:
        server: socketserver.BaseServer = UDPServer((args.host, args.port), DatagramEchoHandler)
    else:
        server = TCPServer((args.host, args.port), LineEchoHandler)
    serve_until_signal(server)


if __name__ == "__main__":
    main()
