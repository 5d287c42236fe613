"""A servekit server behind HAProxy, for test_haproxy.py.

ProxyProtocolMixIn + ThreadPoolMixIn + TCPServer on 127.0.0.1, port 0. Each line a
client sends is answered with what the handler knows about the connection:

    <client host> <client port> <pid> v<header version> <header command>\\n

Prints "servekit: ready: proxy_app pid=<pid> on tcp://127.0.0.1:<port>" on stdout once
the loop runs (the form tests/integration/procs.py waits for), logs servekit's lines to
stderr as "<LEVEL> <logger>: <message>", stops on SIGTERM, and exits by itself after
LIFETIME seconds so that a broken test never leaves it behind.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

import servekit
from servekit.features.pool import ThreadPoolMixIn
from servekit.features.proxy import ProxyProtocolMixIn, proxy_header

LIFETIME = 60.0
START_TIMEOUT = 10.0
# A test client sends a handful of short lines per connection.
MAX_LINES = 100
MAX_LINE = 1024


class Whoami(servekit.StreamRequestHandler):
    def handle(self) -> None:
        host, port = self.client_address[:2]
        header = proxy_header(self)
        assert header is not None  # ProxyProtocolMixIn always attaches it
        about = f"{host} {port} {os.getpid()} v{header.version} {header.command}\n".encode()
        try:
            for _ in range(MAX_LINES):
                line = self.rfile.readline(MAX_LINE)
                if not line:
                    return
                self.wfile.write(about)
        except (ConnectionResetError, BrokenPipeError):
            # HAProxy ends its health checks with a reset right after the header.
            return


class Server(ProxyProtocolMixIn, ThreadPoolMixIn, servekit.TCPServer):
    daemon_threads = True
    # SIGTERM must end the process at once, whatever connection is still open.
    block_on_close = False


def main() -> int:
    # Block SIGTERM before any thread starts, so every thread inherits the mask and the
    # signal waits for sigtimedwait() below.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    server = Server(("127.0.0.1", 0), Whoami)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    if not server.wait_serving(START_TIMEOUT):
        return 3
    host, port = server.server_address[:2]
    print(f"servekit: ready: proxy_app pid={os.getpid()} on tcp://{host}:{port}", flush=True)
    if signal.sigtimedwait({signal.SIGTERM}, LIFETIME) is None:
        print(f"proxy_app: no SIGTERM within {LIFETIME}s, exiting", file=sys.stderr)
        return 4
    server.shutdown()
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
