"""Handlers for the command-line tests of the connection pipeline."""

from __future__ import annotations

import socket

import servekit


class NoDelay(servekit.StreamRequestHandler):
    """Answer one line with the TCP_NODELAY setting of the accepted connection."""

    def handle(self) -> None:
        self.rfile.readline()
        value = self.request.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        self.wfile.write(b"nodelay %d\n" % value)
