"""Handlers for the observability tests, run as `servekit serve tests.integration.observability_apps:NAME`."""

from __future__ import annotations

import os
import threading

import servekit


class Hang(servekit.StreamRequestHandler):
    """Answer each line with "<pid> <line>"; the line "hang" makes the handler hang.

    A hanging handler says "hanging <pid>" first, so the test knows which worker's
    thread it holds; it then blocks for a minute (the test kills it long before).
    """

    def handle(self) -> None:
        for line in self.rfile:
            if line.strip() == b"hang":
                self.wfile.write(b"hanging %d\n" % os.getpid())
                self.wfile.flush()
                threading.Event().wait(60)  # the stuck handler under test
                return
            self.wfile.write(b"%d %s" % (os.getpid(), line))
