"""BaseServer lifecycle: prompt shutdown, shutdown from a handler, pausing accepts."""

from __future__ import annotations

import socket
import threading
import time

import pytest

import servekit
from servekit.testing import LOCALHOST, connect, serving


class LineEcho(servekit.StreamRequestHandler):
    def handle(self) -> None:
        self.wfile.write(self.rfile.readline())


def roundtrip(address: tuple[str, int], payload: bytes = b"ping\n") -> bytes:
    with connect(address) as sock, sock.makefile("rb") as reader:
        sock.sendall(payload)
        return reader.readline()


def test_shutdown_does_not_wait_for_poll_interval() -> None:
    """shutdown() returns once the loop stops, even with a 60 s poll_interval (stdlib: up to 60 s)."""
    server = servekit.TCPServer((LOCALHOST, 0), LineEcho)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 60})
    thread.start()
    try:
        assert server.wait_serving(5)
        started = time.monotonic()
        server.shutdown()
        elapsed = time.monotonic() - started
        thread.join(5)
        assert not thread.is_alive()
        assert elapsed < 5.0, f"shutdown took {elapsed:.3f}s"
    finally:
        if thread.is_alive():
            server.shutdown()
        server.server_close()


def test_shutdown_before_serve_forever_makes_it_return_at_once() -> None:
    """A shutdown() that arrives before serve_forever() starts stops that loop immediately (stdlib semantics)."""
    server = servekit.TCPServer((LOCALHOST, 0), LineEcho)
    caller = threading.Thread(target=server.shutdown)
    caller.start()
    try:
        # shutdown() blocks until a loop has run and stopped; give it one.
        deadline = time.monotonic() + 5
        while server.state is not servekit.ServerState.STOPPING and time.monotonic() < deadline:
            caller.join(0.01)
        assert server.state is servekit.ServerState.STOPPING
        server.serve_forever(poll_interval=60)
        caller.join(5)
        assert not caller.is_alive()
        assert server.state is servekit.ServerState.IDLE
    finally:
        server.server_close()


def test_shutdown_from_handler_on_loop_thread_stops_after_request() -> None:
    """A handler running on the serve_forever thread may call shutdown(): the stdlib deadlocks, servekit stops after that request."""
    handled = threading.Event()

    class Quit(servekit.StreamRequestHandler):
        def handle(self) -> None:
            self.wfile.write(b"bye\n")
            self.server.shutdown()
            handled.set()

    server = servekit.TCPServer((LOCALHOST, 0), Quit)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 60}, daemon=True
    )
    thread.start()
    try:
        assert roundtrip(server.server_address) == b"bye\n"
        assert handled.wait(5)
        thread.join(5)
        assert not thread.is_alive(), "serve_forever() did not return after shutdown() in a handler"
    finally:
        server.server_close()


def test_shutdown_from_handler_in_handle_request_returns() -> None:
    """shutdown() called by a handler inside handle_request() returns instead of waiting for a loop."""
    returned = threading.Event()

    class Quit(servekit.BaseRequestHandler):
        def handle(self) -> None:
            self.server.shutdown()
            returned.set()

    with servekit.TCPServer((LOCALHOST, 0), Quit) as server:
        with connect(server.server_address):
            runner = threading.Thread(target=server.handle_request, daemon=True)
            runner.start()
            runner.join(5)
        assert returned.is_set()
        assert not runner.is_alive()


def test_legacy_shutdown_request_flag_stops_loop() -> None:
    """Setting _BaseServer__shutdown_request = True, as some code does with the stdlib, stops the loop promptly."""
    server = servekit.TCPServer((LOCALHOST, 0), LineEcho)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 60}, daemon=True
    )
    thread.start()
    try:
        assert server.wait_serving(5)
        server._BaseServer__shutdown_request = True  # type: ignore[attr-defined]
        thread.join(5)
        assert not thread.is_alive()
    finally:
        server.server_close()


def test_serve_forever_twice_concurrently_is_refused() -> None:
    """A second concurrent serve_forever() on one server raises instead of racing the first."""
    with servekit.TCPServer((LOCALHOST, 0), LineEcho) as server, serving(server):
        with pytest.raises(RuntimeError, match="already running"):
            server.serve_forever()


def test_service_actions_runs_every_poll_interval() -> None:
    """service_actions() is still called at poll_interval when no request arrives."""
    calls = threading.Semaphore(0)

    class Ticking(servekit.TCPServer):
        def service_actions(self) -> None:
            calls.release()

    with Ticking((LOCALHOST, 0), LineEcho) as server, serving(server, poll_interval=0.01):
        for _ in range(3):
            assert calls.acquire(timeout=5)


def test_paused_server_leaves_connections_in_backlog_then_serves_them() -> None:
    """While accepting is paused nothing is accepted; after resume every queued client is served."""
    server = servekit.TCPServer((LOCALHOST, 0), LineEcho)
    with serving(server):
        server.pause_accepting("test")
        assert not server.accepting
        # The kernel completes the handshake from the backlog; the server must not accept.
        client = connect(server.server_address)
        client.sendall(b"queued\n")
        client.settimeout(0.3)
        with pytest.raises(TimeoutError):
            client.recv(100)
        server.resume_accepting("test")
        client.settimeout(5)
        with client, client.makefile("rb") as reader:
            assert reader.readline() == b"queued\n"
        assert server.accepting


def test_handle_request_honours_timeout() -> None:
    """handle_request() calls handle_timeout() when nothing arrives within server.timeout."""
    timed_out = threading.Event()

    class Impatient(servekit.TCPServer):
        timeout = 0.05

        def handle_timeout(self) -> None:
            timed_out.set()

    with Impatient((LOCALHOST, 0), LineEcho) as server:
        server.handle_request()
    assert timed_out.is_set()


def test_handler_error_goes_to_handle_error_and_serving_continues() -> None:
    """An exception in a handler reaches handle_error() and the next request is served."""
    errors: list[type[BaseException]] = []

    class Flaky(servekit.StreamRequestHandler):
        def handle(self) -> None:
            line = self.rfile.readline()
            if line == b"boom\n":
                raise ValueError("handler failed")
            self.wfile.write(line)

    class Recording(servekit.TCPServer):
        def handle_error(self, request: object, client_address: object) -> None:
            import sys

            errors.append(sys.exc_info()[0])  # type: ignore[arg-type]

    with Recording((LOCALHOST, 0), Flaky) as server, serving(server):
        assert roundtrip(server.server_address, b"boom\n") == b""
        assert roundtrip(server.server_address, b"ok\n") == b"ok\n"
    assert errors == [ValueError]


def test_verify_request_false_closes_without_handling() -> None:
    """A request refused by verify_request() is closed and never reaches the handler."""
    reached = threading.Event()

    class Never(servekit.BaseRequestHandler):
        def handle(self) -> None:
            reached.set()

    class Refusing(servekit.TCPServer):
        def verify_request(self, request: object, client_address: object) -> bool:
            return False

    with Refusing((LOCALHOST, 0), Never) as server, serving(server):
        with connect(server.server_address) as sock:
            assert sock.recv(10) == b""
    assert not reached.is_set()


def test_context_manager_closes_socket() -> None:
    """Leaving the with block closes the listening socket."""
    with servekit.TCPServer((LOCALHOST, 0), LineEcho) as server:
        address = server.server_address
    assert server.socket.fileno() == -1
    with pytest.raises(ConnectionRefusedError), socket.create_connection(address, timeout=5):
        pass
