"""A socket-activated echo service for test_systemd_socket_activate.py.

Run by systemd-socket-activate (or systemd itself): serves every inherited socket, a
stream socket with a line echo and a datagram socket with a datagram echo, each reply
prefixed with the socket's name ("web: hello\\n"). Sends READY=1 once every loop is
running, WATCHDOG=1 from the first server's loop when WATCHDOG_USEC asks for it, and
STOPPING=1 on SIGTERM, then exits 0. Exits by itself after LIFETIME seconds so that a
broken test never leaves it behind.

Deliberately small: servekit's listeners API will replace the socket swapping below.
"""

from __future__ import annotations

import signal
import socket
import sys
import threading
import time
from typing import Any

import servekit
from servekit.features import activation
from servekit.process import systemd

LIFETIME = 60.0
POLL_INTERVAL = 0.5
START_TIMEOUT = 10.0


class LineEcho(servekit.StreamRequestHandler):
    def handle(self) -> None:
        # Bounded: a test client sends a few lines, then closes.
        for _ in range(100):
            line = self.rfile.readline()
            if not line:
                return
            self.wfile.write(self.server.name.encode() + b": " + line)


class DatagramEcho(servekit.DatagramRequestHandler):
    def handle(self) -> None:
        self.wfile.write(self.server.name.encode() + b": " + self.rfile.read())


class WatchedServing:
    """Pings the watchdog from the serving loop itself (service_actions runs every turn)."""

    name = "unknown"
    watchdog: systemd.Watchdog | None = None

    def service_actions(self) -> None:
        super().service_actions()  # type: ignore[misc]
        if self.watchdog is not None:
            self.watchdog.maybe_ping(time.monotonic())


class StreamServer(WatchedServing, servekit.ThreadingTCPServer):
    daemon_threads = True
    # A client that keeps its connection open must not keep SIGTERM from ending the
    # service; draining connections gracefully is the production layer's job, not this
    # test service's.
    block_on_close = False


class DatagramServer(WatchedServing, servekit.UDPServer):
    pass


def adopt(inherited: activation.InheritedSocket) -> Any:
    """A server around an inherited socket: constructed unbound, then given the socket."""
    if inherited.type == socket.SOCK_STREAM:
        server: Any = StreamServer(None, LineEcho, bind_and_activate=False)
    else:
        server = DatagramServer(None, DatagramEcho, bind_and_activate=False)
    server.socket.close()
    server.socket = inherited.socket
    server.address_family = inherited.family
    server.server_address = inherited.socket.getsockname()
    server.name = inherited.name
    return server


def main() -> int:
    # Block SIGTERM before any thread starts, so every thread inherits the mask and the
    # signal waits for sigtimedwait() below: no handler, no race with the serving threads.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    notifier = systemd.Notifier()
    inherited = activation.listen_fds()
    if not inherited:
        print("systemd_app: no sockets were passed (LISTEN_FDS)", file=sys.stderr)
        return 2
    servers = [adopt(each) for each in inherited]
    poll_interval = POLL_INTERVAL
    watchdog = systemd.Watchdog.from_environment(unset_environment=True, notifier=notifier)
    if watchdog is not None:
        servers[0].watchdog = watchdog
        poll_interval = min(poll_interval, watchdog.period)
    threads = [
        threading.Thread(target=server.serve_forever, args=(poll_interval,), daemon=True)
        for server in servers
    ]
    for thread in threads:
        thread.start()
    for server in servers:
        if not server.wait_serving(START_TIMEOUT):
            return 3
    described = ", ".join(
        f"{server.name}={server.socket.type.name}:{server.server_address[0]}:"
        f"{server.server_address[1]}"
        for server in servers
    )
    notifier.ready(f"serving {described}")
    if signal.sigtimedwait({signal.SIGTERM}, LIFETIME) is None:
        print(f"systemd_app: no SIGTERM within {LIFETIME}s, exiting", file=sys.stderr)
        return 4
    notifier.stopping()
    for server in servers:
        server.shutdown()
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
