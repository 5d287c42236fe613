# Contender: the standard library's ForkingTCPServer / ForkingUDPServer, as shipped:
# one process per connection (per datagram for UDP), listen backlog 5, and at most
# ForkingMixIn.max_children = 40 children: the 41st connection waits, with the
# accept loop blocked in waitpid(), until one of the 40 ends.
from __future__ import annotations

import socketserver

from common import parse_args, serve_until_signal
from handlers import DatagramEchoHandler, LineEchoHandler


def main() -> None:
    args = parse_args("stdlib socketserver, process per connection")
    if args.udp:
        server: socketserver.BaseServer = socketserver.ForkingUDPServer(
            (args.host, args.port), DatagramEchoHandler
        )
    else:
        server = socketserver.ForkingTCPServer((args.host, args.port), LineEchoHandler)
    serve_until_signal(server)


if __name__ == "__main__":
    main()
