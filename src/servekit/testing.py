# Helpers for testing servers and handlers, used by servekit's own test suite too.
# Everything binds to loopback on port 0 and signals readiness with events, never sleeps.
from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from servekit.core.server import BaseServer

__all__ = [
    "LOCALHOST",
    "LOCALHOST_V6",
    "closed_by_peer",
    "connect",
    "dripping",
    "exchange_line",
    "has_ipv6_loopback",
    "read_until",
    "serving",
    "wait_until",
]

LOCALHOST = "127.0.0.1"
LOCALHOST_V6 = "::1"

S = TypeVar("S", bound=BaseServer)


@contextlib.contextmanager
def serving(server: S, *, poll_interval: float = 0.5, timeout: float = 10.0) -> Iterator[S]:
    """Run server.serve_forever() in a thread for the duration of a with block.

    Yields once the loop is running; on exit shuts the loop down, joins the thread and
    closes the server. Raises TimeoutError if the loop does not start or stop in time.
    """
    thread = threading.Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": poll_interval},
        name=f"serving {type(server).__name__}",
        daemon=True,
    )
    thread.start()
    try:
        if not server.wait_serving(timeout):
            raise TimeoutError(f"{type(server).__name__} did not start serving in {timeout}s")
        yield server
    finally:
        if thread.is_alive():
            server.shutdown()
        thread.join(timeout)
        server.server_close()
        if thread.is_alive():
            raise TimeoutError(f"{type(server).__name__} did not stop in {timeout}s")


def connect(address: tuple[str, int] | str, timeout: float = 10.0) -> socket.socket:
    """A client socket connected to address (IPv4, IPv6 or a Unix path), with a timeout."""
    if isinstance(address, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(address)
        return sock
    return socket.create_connection(address[:2], timeout=timeout)


def has_ipv6_loopback() -> bool:
    """True if this host can bind ::1 (containers and some CI runners cannot)."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind((LOCALHOST_V6, 0))
    except OSError:
        return False
    return True


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """True if the peer closes sock (EOF or reset) within timeout, sending nothing first."""
    readable, _, _ = select.select([sock], [], [], timeout)
    if not readable:
        return False
    try:
        return sock.recv(1) == b""
    except ConnectionError:
        return True


def exchange_line(sock: socket.socket, line: bytes) -> bytes:
    """Send line and read until a newline arrives (or the peer closes); bounded by the
    socket's timeout."""
    sock.sendall(line)
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def read_until(sock: socket.socket, ending: bytes, max_reads: int = 1000) -> bytes:
    """Read until what was received ends with ending, the peer closes, or max_reads
    recv() calls; each waits at most the socket's timeout. Returns what was received."""
    data = b""
    for _ in range(max_reads):
        if data.endswith(ending):
            break
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll predicate() every 10 ms until it holds (True) or timeout passes (False).

    For state that has no event to wait on, such as a server's counters.
    """
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not predicate():
        if time.monotonic() > deadline:
            return False
        pause.wait(0.01)
    return True


@contextlib.contextmanager
def dripping(
    socks: list[socket.socket], data: bytes = b"X", interval: float = 0.3, rounds: int = 60
) -> Iterator[None]:
    """Send data on every socket each interval while the block runs, as a slow client
    ("slowloris") does: at most rounds times, on a thread; closes the sockets after.

    Sockets the server closed meanwhile are skipped. For testing that slow clients hold
    no thread: the default never ends a line or an HTTP head.
    """
    stop = threading.Event()

    def drip() -> None:
        for _ in range(rounds):
            for sock in socks:
                try:
                    sock.sendall(data)
                except (OSError, ValueError):  # closed by the server, or by us
                    pass
            if stop.wait(interval):
                return

    dripper = threading.Thread(target=drip, name="dripping", daemon=True)
    dripper.start()
    try:
        yield
    finally:
        stop.set()
        dripper.join(10)
        for sock in socks:
            sock.close()
