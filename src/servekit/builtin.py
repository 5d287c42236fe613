# Built-in request handlers: what `servekit echo` serves, and a reference for users.
from __future__ import annotations

import logging

from servekit.core import DatagramRequestHandler, StreamRequestHandler

__all__ = ["DatagramEchoHandler", "EchoHandler"]

log = logging.getLogger("servekit.echo")


class EchoHandler(StreamRequestHandler):
    """Echo each line back until the client closes the connection.

    A line longer than max_line_length bytes gets one error line and the connection
    is closed: a client that never sends a newline cannot make the server buffer
    without bound.
    """

    #: Longest line accepted, newline included. 64 KiB is the default line limit of
    #: asyncio streams, so a client that works against asyncio works here.
    max_line_length = 65536
    disable_nagle_algorithm = True

    def handle(self) -> None:
        limit = self.max_line_length
        while True:
            line = self.rfile.readline(limit + 1)
            if not line:
                return
            if len(line) > limit:
                log.info(
                    "%s: line longer than %d bytes; closing", _peer(self.client_address), limit
                )
                self.wfile.write(b"error: line longer than %d bytes\n" % limit)
                return
            self.wfile.write(line)


class DatagramEchoHandler(DatagramRequestHandler):
    """Send each datagram back to its sender."""

    def handle(self) -> None:
        self.wfile.write(self.packet)


def _peer(address: object) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address) or "unix client"
