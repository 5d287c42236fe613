# The command-line contract every contender follows, in one place:
#
#   python bench/servers/NAME.py --port 0 [--udp] [--host 127.0.0.1]
#
# prints "READY <port>" (flushed) once the socket accepts, and exits with status 0 on
# SIGTERM or SIGINT. bench/run.py relies on nothing else.
from __future__ import annotations

import argparse
import os
import signal
import socketserver
import sys
import types


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--udp", action="store_true", help="serve UDP instead of TCP")
    return parser.parse_args()


def announce(port: int) -> None:
    """Tell the driver the server accepts on port."""
    sys.stdout.write(f"READY {port}\n")
    sys.stdout.flush()


def serve_until_signal(server: socketserver.BaseServer) -> None:
    """serve_forever() until SIGTERM or SIGINT, then server_close() and return.

    The stdlib's serve_forever() notices shutdown() only at its next 0.5 s poll, and
    calling shutdown() from a handler on the serving thread deadlocks. Raising from the
    signal handler ends the select() at once; serve_forever()'s own cleanup and
    server_close() still run.
    """
    parent = os.getpid()

    def on_signal(signum: int, frame: types.FrameType | None) -> None:
        if os.getpid() != parent:
            # A forked per-request child (ForkingMixIn) inherits this handler; it has
            # nothing to drain and its parent reaps it.
            os._exit(0)
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    announce(server.server_address[1])
    try:
        server.serve_forever()
    except SystemExit:
        pass
    finally:
        server.server_close()
