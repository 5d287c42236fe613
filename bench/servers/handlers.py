# The request handlers every socketserver-style contender runs: one line-echo handler
# for streams, one echo for datagrams.
#
# Written against the standard library's socketserver API and nothing else, so that
# stdlib servers and servekit servers run the very same classes and the benchmark
# compares servers, not handlers.
from __future__ import annotations

import socketserver


class LineEchoHandler(socketserver.StreamRequestHandler):
    """Read a line, write it back, until the client closes."""

    def handle(self) -> None:
        try:
            # readline() on the buffered rfile; wfile is unbuffered (wbufsize = 0),
            # so each write() is one sendall().
            while line := self.rfile.readline():
                self.wfile.write(line)
        except ConnectionError:
            # The churn scenario closes with RST (SO_LINGER 0, see loadgen.c) to
            # keep the client out of TIME_WAIT; a reset is the end of the
            # conversation, not an error worth a traceback on stderr.
            pass


class DatagramEchoHandler(socketserver.DatagramRequestHandler):
    """Send each datagram back to where it came from."""

    def handle(self) -> None:
        # DatagramRequestHandler.finish() sends whatever was written to wfile.
        self.wfile.write(self.rfile.read())
