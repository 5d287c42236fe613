"""ThreadPoolMixIn: bounded, reusable worker threads that stop accepting when full."""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import servekit
from servekit.features.pool import (
    ThreadPoolMixIn,
    ThreadPoolTCPServer,
    ThreadPoolUDPServer,
    WorkerPool,
)
from servekit.testing import LOCALHOST, connect, serving, wait_until


class Gate:
    """Handlers that hold their connection until released, counting concurrency."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.peak = 0
        self.release = threading.Event()
        self.entered = threading.Semaphore(0)

    def handler(self) -> type[servekit.StreamRequestHandler]:
        gate = self

        class Held(servekit.StreamRequestHandler):
            def handle(self) -> None:
                with gate.lock:
                    gate.running += 1
                    gate.peak = max(gate.peak, gate.running)
                gate.entered.release()
                line = self.rfile.readline()
                gate.release.wait(20)
                self.wfile.write(line)
                with gate.lock:
                    gate.running -= 1

        return Held


class CountingServer(ThreadPoolTCPServer):
    accepted = 0

    def get_request(self) -> tuple[socket.socket, object]:
        request = super().get_request()
        self.accepted += 1
        return request


def test_full_pool_stops_accepting() -> None:
    """When every worker is busy the server stops calling accept() and resumes when one frees; no connection is lost."""
    gate = Gate()
    with CountingServer((LOCALHOST, 0), gate.handler(), max_threads=4) as server, serving(server):
        clients = [connect(server.server_address) for _ in range(40)]
        for i, client in enumerate(clients):
            client.sendall(b"%d\n" % i)
        for _ in range(4):
            assert gate.entered.acquire(timeout=10)
        # Full: the loop has stopped watching the listener; the other 36 wait in the
        # kernel backlog, not in the server.
        assert not server.accepting
        assert server.accepted == 4
        assert gate.entered.acquire(timeout=0.2) is False
        gate.release.set()
        for i, client in enumerate(clients):
            with client, client.makefile("rb") as reader:
                assert reader.readline() == b"%d\n" % i
        assert server.accepted == 40
        assert gate.peak == 4


def test_threads_are_reused() -> None:
    """Five hundred sequential connections run on a handful of threads, not five hundred."""
    idents: set[int] = set()

    class Who(servekit.StreamRequestHandler):
        def handle(self) -> None:
            idents.add(threading.get_ident())
            self.wfile.write(self.rfile.readline())

    with ThreadPoolTCPServer((LOCALHOST, 0), Who, max_threads=8) as server, serving(server):
        for _ in range(500):
            with connect(server.server_address) as sock, sock.makefile("rb") as reader:
                sock.sendall(b"x\n")
                assert reader.readline() == b"x\n"
        assert server.pool.size <= 8
    assert len(idents) <= 8


def test_idle_workers_shrink_to_min_threads() -> None:
    """After a burst, workers above min_threads exit once idle for thread_idle_timeout."""
    gate = Gate()
    with (
        ThreadPoolTCPServer(
            (LOCALHOST, 0), gate.handler(), max_threads=6, min_threads=2, thread_idle_timeout=0.1
        ) as server,
        serving(server),
    ):
        clients = [connect(server.server_address) for _ in range(6)]
        for client in clients:
            client.sendall(b"b\n")
        for _ in range(6):
            assert gate.entered.acquire(timeout=10)
        assert server.pool.size == 6
        gate.release.set()
        for client in clients:
            with client:
                assert client.recv(10) == b"b\n"
        deadline = time.monotonic() + 10
        while server.pool.size > 2 and time.monotonic() < deadline:
            gate.release.wait(0.02)  # readiness poll of the pool size, bounded
        assert server.pool.size == 2


def test_server_close_drains_in_flight_requests() -> None:
    """server_close() lets running requests finish before returning."""
    gate = Gate()
    server = ThreadPoolTCPServer((LOCALHOST, 0), gate.handler(), max_threads=4)
    with serving(server):
        client = connect(server.server_address)
        client.sendall(b"drain\n")
        assert gate.entered.acquire(timeout=10)
        threading.Timer(0.1, gate.release.set).start()
    # serving() returned only after server_close(): the handler has answered.
    assert gate.running == 0
    with client:
        assert client.recv(10) == b"drain\n"


def test_drain_timeout_bounds_server_close(caplog: pytest.LogCaptureFixture) -> None:
    """A request that outlives drain_timeout does not hold server_close() hostage; it is logged."""
    gate = Gate()
    server = ThreadPoolTCPServer((LOCALHOST, 0), gate.handler(), max_threads=2, drain_timeout=0.2)
    with caplog.at_level(logging.WARNING, logger="servekit.pool"):
        with serving(server):
            client = connect(server.server_address)
            client.sendall(b"stuck\n")
            assert gate.entered.acquire(timeout=10)
            started = time.monotonic()
        elapsed = time.monotonic() - started
    gate.release.set()
    client.close()
    assert elapsed < 5
    assert "still running after drain_timeout" in caplog.text


def test_handler_error_keeps_worker() -> None:
    """An exception in a handler goes to handle_error() and the worker thread serves the next request."""
    errors: list[str] = []

    class Flaky(servekit.StreamRequestHandler):
        def handle(self) -> None:
            line = self.rfile.readline()
            if line.startswith(b"raise"):
                raise ValueError("bad request")
            if line.startswith(b"exit"):
                raise SystemExit(3)
            self.wfile.write(line)

    class Recording(ThreadPoolTCPServer):
        def handle_error(self, request: object, client_address: object) -> None:
            errors.append("handled")

    with Recording((LOCALHOST, 0), Flaky, max_threads=1) as server, serving(server):
        for payload in (b"raise\n", b"exit\n", b"ok\n"):
            with connect(server.server_address) as sock:
                sock.sendall(payload)
                reply = sock.recv(10)
        assert reply == b"ok\n"
        assert server.pool.size == 1
    assert errors == ["handled"]


def test_udp_pool_round_trip() -> None:
    """ThreadPoolUDPServer answers datagrams from pool threads."""

    class Echo(servekit.DatagramRequestHandler):
        def handle(self) -> None:
            self.wfile.write(self.rfile.read())

    with ThreadPoolUDPServer((LOCALHOST, 0), Echo, max_threads=2) as server, serving(server):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(5)
            for i in range(20):
                client.sendto(b"d%d" % i, server.server_address)
                assert client.recvfrom(64)[0] == b"d%d" % i


def test_unix_stream_pool(tmp_path: os.PathLike[str]) -> None:
    """The pool composes with UnixStreamServer."""

    class UnixPool(ThreadPoolMixIn, servekit.UnixStreamServer):
        pass

    class Echo(servekit.StreamRequestHandler):
        def handle(self) -> None:
            self.wfile.write(self.rfile.readline())

    path = os.path.join(tmp_path, "pool.sock")
    with UnixPool(path, Echo, max_threads=2) as server, serving(server):
        with connect(path) as sock, sock.makefile("rb") as reader:
            sock.sendall(b"u\n")
            assert reader.readline() == b"u\n"


def test_knob_validation() -> None:
    """A bad keyword value is refused with the knob's name, before binding."""
    from servekit.knobs import SettingError

    with pytest.raises(SettingError, match="max_threads=0"):
        ThreadPoolTCPServer((LOCALHOST, 0), servekit.BaseRequestHandler, max_threads=0)
    with pytest.raises(TypeError):
        ThreadPoolTCPServer((LOCALHOST, 0), servekit.BaseRequestHandler, no_such_knob=1)


def test_worker_pool_saturation_edges_are_ordered() -> None:
    """on_saturated and on_unsaturated alternate, exactly at the max_threads boundary."""
    events: list[str] = []
    release = threading.Event()
    pool = WorkerPool(
        2,
        on_saturated=lambda: events.append("full"),
        on_unsaturated=lambda: events.append("free"),
    )
    done = threading.Semaphore(0)

    def task() -> None:
        release.wait(10)
        done.release()

    pool.submit(task)
    assert events == []
    pool.submit(task)
    assert events == ["full"]
    release.set()
    assert done.acquire(timeout=5) and done.acquire(timeout=5)
    assert pool.shutdown(timeout=5)
    assert events == ["full", "free"]
    with pytest.raises(RuntimeError):
        pool.submit(task)


class ReadyQueue:
    """A ReadySource over a queue: add() makes a task ready; wake() interrupts a wait."""

    def __init__(self) -> None:
        self.items: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def add(self, fn: Callable[..., object], *args: Any) -> None:
        self.items.put((fn, args))

    def take_ready(self, timeout: float) -> Any:
        try:
            if timeout == 0:
                return self.items.get_nowait()
            return self.items.get(timeout=None if timeout < 0 else timeout)
        except queue.Empty:
            return None

    def wake(self) -> None:
        self.items.put(None)


def test_a_following_pool_runs_ready_work_and_is_woken_for_queued_work() -> None:
    """A pool of one thread following a source runs what the source makes ready, and a
    submit() while that thread waits in the source still runs (the leader is woken)."""
    source = ReadyQueue()
    pool = WorkerPool(1, idle_timeout=None)
    pool.follow(source)
    ran = threading.Semaphore(0)
    source.add(ran.release)
    pool.submit(lambda: None)  # starts the thread; it then leads, waiting in the source
    assert ran.acquire(timeout=5)
    assert wait_until(lambda: pool.busy == 0 and pool.leading and pool.size == 1)
    assert pool.idle == 1  # the leader waits for work: idle, for the metrics too
    pool.submit(ran.release)  # every thread is in the source: only a wake reaches it
    assert ran.acquire(timeout=5)
    source.add(ran.release)  # and it leads again afterwards
    assert ran.acquire(timeout=5)
    assert pool.shutdown(timeout=5)
    assert wait_until(lambda: pool.size == 0)  # the leader left the source and exited


def test_a_following_pool_counts_ready_work_as_busy() -> None:
    """A task taken from the source counts towards busy and saturation like a submitted one."""
    source = ReadyQueue()
    events: list[str] = []
    pool = WorkerPool(
        1,
        idle_timeout=None,
        on_saturated=lambda: events.append("full"),
        on_unsaturated=lambda: events.append("free"),
    )
    pool.follow(source)
    entered, release = threading.Event(), threading.Event()

    def held() -> None:
        entered.set()
        release.wait(10)

    pool.submit(lambda: None)
    assert wait_until(lambda: events == ["full", "free"] and pool.busy == 0)
    source.add(held)
    assert entered.wait(5)
    assert pool.busy == 1 and events == ["full", "free", "full"]
    release.set()
    assert wait_until(lambda: pool.busy == 0)
    assert events == ["full", "free", "full", "free"]
    assert pool.shutdown(timeout=5)
