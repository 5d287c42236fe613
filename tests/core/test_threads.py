"""ThreadingMixIn: a thread per request that forgets itself when done."""

from __future__ import annotations

import gc
import socket
import threading

import pytest

import servekit
from servekit.testing import LOCALHOST, connect, serving


class Recorder(servekit.StreamRequestHandler):
    threads: list[threading.Thread] = []
    lock = threading.Lock()

    def handle(self) -> None:
        with self.lock:
            self.threads.append(threading.current_thread())
        self.wfile.write(self.rfile.readline())


def test_finished_threads_are_not_kept() -> None:
    """Once every request has finished, the server holds no thread (the stdlib keeps the last ones until more traffic)."""
    Recorder.threads = []
    with servekit.ThreadingTCPServer((LOCALHOST, 0), Recorder) as server, serving(server):
        for i in range(50):
            with connect(server.server_address) as sock, sock.makefile("rb") as reader:
                sock.sendall(b"%d\n" % i)
                assert reader.readline() == b"%d\n" % i
        for thread in list(Recorder.threads):
            thread.join(5)
        assert len(Recorder.threads) == 50
        assert len(server._threads) == 0


def test_live_set_is_bounded_by_concurrency() -> None:
    """Over 3,000 sequential connections the live-thread set never grows beyond the requests in flight."""
    peak = 0

    class Watching(servekit.ThreadingTCPServer):
        def process_request(self, request: object, client_address: object) -> None:
            nonlocal peak
            peak = max(peak, len(self._threads))
            super().process_request(request, client_address)

    with Watching((LOCALHOST, 0), Recorder) as server, serving(server):
        Recorder.threads = []
        for _ in range(3000):
            with connect(server.server_address) as sock, sock.makefile("rb") as reader:
                sock.sendall(b"x\n")
                assert reader.readline() == b"x\n"
    # A request's thread is still finishing (closing its socket) when the next one
    # arrives, so a handful may overlap; what matters is that it does not grow with N.
    assert peak < 16


def test_server_close_waits_for_running_requests() -> None:
    """With block_on_close (the default) server_close() returns only after running handlers finish."""
    started = threading.Event()
    release = threading.Event()
    finished = threading.Event()

    class Slow(servekit.BaseRequestHandler):
        def handle(self) -> None:
            started.set()
            release.wait(10)
            finished.set()

    server = servekit.ThreadingTCPServer((LOCALHOST, 0), Slow)
    with serving(server):
        client = connect(server.server_address)
        assert started.wait(5)
        assert len(server._threads) == 1
        timer = threading.Timer(0.2, release.set)
        timer.start()
    # serving() called server_close() on exit, which must have waited for Slow.
    assert finished.is_set()
    client.close()
    timer.join()


def test_daemon_threads_flag_is_applied() -> None:
    """daemon_threads = True starts request threads as daemon threads."""
    seen: list[bool] = []

    class Daemonic(servekit.ThreadingTCPServer):
        daemon_threads = True

    class Probe(servekit.BaseRequestHandler):
        def handle(self) -> None:
            seen.append(threading.current_thread().daemon)

    with Daemonic((LOCALHOST, 0), Probe) as server, serving(server):
        with connect(server.server_address) as sock:
            assert sock.recv(1) == b""
    assert seen == [True]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_memory_flat_over_100k_connections() -> None:
    """Resident memory after 100,000 short connections is within 4 MiB of where it was after 10,000."""
    psutil = pytest.importorskip("psutil")
    me = psutil.Process()
    with servekit.ThreadingTCPServer((LOCALHOST, 0), Ping) as server, serving(server):
        address = server.server_address
        baseline = 0
        for i in range(100_000):
            with socket.create_connection(address, timeout=10) as sock:
                sock.sendall(b"p")
                assert sock.recv(1) == b"p"
            if i == 10_000:
                gc.collect()
                baseline = me.memory_info().rss
        gc.collect()
        grown = me.memory_info().rss - baseline
        assert len(server._threads) <= 2
    assert grown < 4 * 1024 * 1024, f"RSS grew by {grown / 1024:.0f} KiB"


class Ping(servekit.BaseRequestHandler):
    def handle(self) -> None:
        self.request.sendall(self.request.recv(1))
