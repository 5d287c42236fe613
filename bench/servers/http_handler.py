# The request handlers of the http.server contenders (bench/httpbench.py and
# bench/connections.py): http.server.SimpleHTTPRequestHandler, unmodified but for
# protocol_version = "HTTP/1.1", which turns on keep-alive (the class default, HTTP/1.0,
# closes the connection after every response). It serves the current directory; the
# drivers start every server in bench/build/docroot/, which holds the 1 KiB file the
# clients ask for.
#
# Used two ways: as module:Class by `servekit serve http_handler:Handler` (the drivers
# put bench/servers/ on PYTHONPATH), and by http_stdlib.py for the standard library's
# ThreadingHTTPServer. Nothing here may import socketserver before http_stdlib.py has
# had the chance to call servekit.install().
from __future__ import annotations

import http.server
import socket


class Handler(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"


class NoDelayHandler(Handler):
    """Handler with Nagle's algorithm off, set by hand as a user would.

    SimpleHTTPRequestHandler writes the headers and the body in separate small writes;
    with Nagle on, the body waits for the client's delayed ACK of the headers (about
    40 ms on Linux), which caps a keep-alive connection at about 25 responses/s.
    """

    def setup(self) -> None:
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().setup()
