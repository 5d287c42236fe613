# Built-in request handlers: what `servekit echo` serves, and the reference for writing a
# handler that works message by message (servekit.features.messages).
from __future__ import annotations

import logging

from servekit.core import DatagramRequestHandler
from servekit.features.addresses import format_peer
from servekit.features.limits import LineTooLongError
from servekit.features.messages import MessageHandler

__all__ = ["DatagramEchoHandler", "EchoHandler"]

log = logging.getLogger("servekit.echo")


class EchoHandler(MessageHandler):
    """Echo each line back until the client closes the connection.

    One line is one message: on a pool server the connection waits between lines in
    the serving loop, without a thread, so idle clients cost no thread. A line longer
    than max_line_length bytes gets one error line and the connection is closed: a
    client that never sends a newline cannot make the server buffer without bound.
    """

    #: Longest line accepted, newline included. 64 KiB is the default line limit of
    #: asyncio streams, so a client that works against asyncio works here.
    max_line_length = 65536
    # A new connection gets a thread once its first whole line is in (LimitsMixIn's
    # wait_for_request="auto"): a client that never sends a newline costs no thread.
    wait_for_request = "line"
    # No disable_nagle_algorithm: servekit's servers set TCP_NODELAY on the listener
    # (tcp_nodelay, on by default), which every accepted connection inherits; setting it
    # again here would be a system call per connection for nothing.

    def handle_one_request(self) -> None:
        # readline_limited(), inlined: this runs per line.
        limit = self.max_line_length
        line = self.rfile.readline(limit + 1)
        if len(line) > limit:
            exc = LineTooLongError(f"line longer than {limit} bytes")
            log.info("%s: %s; closing", format_peer(self.client_address), exc)
            self.wfile.write(b"error: %s\n" % str(exc).encode())
            self.close_connection = True
            return
        if not line:
            self.close_connection = True  # the client closed its end
            return
        self.wfile.write(line)


class DatagramEchoHandler(DatagramRequestHandler):
    """Send each datagram back to its sender."""

    def handle(self) -> None:
        self.wfile.write(self.packet)
