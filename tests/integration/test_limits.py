"""LimitsMixIn: connection cap, waiting for the first request in the loop, timeouts."""

from __future__ import annotations

import logging
import socket
import threading
import time

import pytest

import servekit
from servekit.features.limits import (
    LimitsMixIn,
    LineTooLongError,
    readline_limited,
    request_deadline,
    time_left,
)
from servekit.features.listeners import ListenersMixIn
from servekit.features.pool import ThreadPoolMixIn
from servekit.testing import (
    LOCALHOST,
    closed_by_peer,
    connect,
    dripping,
    read_until,
    serving,
    wait_until,
)
from tests.integration.apps import PathPage


class Server(LimitsMixIn, ThreadPoolMixIn, servekit.TCPServer):
    pass


class ListenersServer(ListenersMixIn, LimitsMixIn, ThreadPoolMixIn, servekit.TCPServer):
    pass


class Echo(servekit.StreamRequestHandler):
    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(line)


def echo_once(address: tuple[str, int], payload: bytes = b"hello\n", timeout: float = 10) -> bytes:
    with connect(address, timeout) as sock, sock.makefile("rb") as reader:
        sock.sendall(payload)
        return reader.readline()


def test_connection_cap_holds_exactly_under_a_burst() -> None:
    """With max_connections=10 and 50 clients at once, never more than 10 are accepted; all 50 are served in the end."""
    release = threading.Event()
    lock = threading.Lock()
    running = peak = 0
    accepted = 0

    class Held(servekit.StreamRequestHandler):
        def handle(self) -> None:
            nonlocal running, peak
            with lock:
                running += 1
                peak = max(peak, running)
            line = self.rfile.readline()
            release.wait(20)
            self.wfile.write(line)
            with lock:
                running -= 1

    class Counting(Server):
        def get_request(self) -> tuple[socket.socket, object]:
            nonlocal accepted
            request = super().get_request()
            accepted += 1
            return request

    with (
        Counting((LOCALHOST, 0), Held, max_connections=10, max_threads=64) as server,
        serving(server),
    ):
        clients = [connect(server.server_address) for _ in range(50)]
        for i, client in enumerate(clients):
            client.sendall(b"%d\n" % i)
        deadline = time.monotonic() + 10
        while running < 10 and time.monotonic() < deadline:
            release.wait(0.01)  # bounded readiness poll
        assert running == 10
        assert server.connections == 10
        assert accepted == 10
        assert not server.accepting
        release.set()
        for i, client in enumerate(clients):
            with client, client.makefile("rb") as reader:
                assert reader.readline() == b"%d\n" % i
    assert accepted == 50
    assert peak == 10


def test_silent_clients_wait_in_the_loop_not_on_threads(caplog: pytest.LogCaptureFixture) -> None:
    """Clients that connect and send nothing take no thread: with a pool of 2 and 20 silent clients, a real client is answered; the silent ones are closed after request_timeout."""
    with caplog.at_level(logging.INFO, logger="servekit.limits"):
        with (
            Server((LOCALHOST, 0), Echo, max_threads=2, request_timeout=1.0) as server,
            serving(server),
        ):
            silent = [connect(server.server_address) for _ in range(20)]
            deadline = time.monotonic() + 10
            while server.waiting_connections < 20 and time.monotonic() < deadline:
                time.sleep(0.01)  # bounded readiness poll
            assert server.waiting_connections == 20
            assert server.pool.busy == 0
            assert echo_once(server.server_address) == b"hello\n"
            for sock in silent:
                with sock:
                    assert closed_by_peer(sock, 10)
            # The count drops just after the close the clients see: a bounded poll.
            deadline = time.monotonic() + 10
            while server.connections and time.monotonic() < deadline:
                time.sleep(0.01)
            assert server.connections == 0
    assert caplog.text.count("no request within request_timeout=1.0s") == 20


@pytest.mark.timeout(60)
def test_200_slowloris_clients_do_not_starve_a_pool_of_8() -> None:
    """200 clients sending one byte every 0.5 s never get a thread from a pool of 8; a real client is answered at once, the slow ones are cut off at request_timeout."""
    with (
        Server(
            (LOCALHOST, 0),
            Echo,
            max_threads=8,
            wait_for_request="line",
            request_timeout=3.0,
        ) as server,
        serving(server),
    ):
        slow = [connect(server.server_address) for _ in range(200)]
        stop = threading.Event()

        def drip() -> None:
            for _ in range(40):  # bounded: 20 s at most, stopped earlier
                for sock in slow:
                    try:
                        sock.send(b"x")  # one byte, never a newline
                    except OSError:
                        pass
                if stop.wait(0.5):
                    return

        dripper = threading.Thread(target=drip, daemon=True)
        dripper.start()
        try:
            deadline = time.monotonic() + 10
            while server.waiting_connections < 200 and time.monotonic() < deadline:
                time.sleep(0.01)  # bounded readiness poll
            assert server.waiting_connections == 200
            assert server.pool.busy == 0
            for _ in range(5):
                started = time.monotonic()
                assert echo_once(server.server_address, timeout=5) == b"hello\n"
                assert time.monotonic() - started < 2.0
            cut = sum(closed_by_peer(sock, 10) for sock in slow)
            assert cut == 200
        finally:
            stop.set()
            dripper.join(10)
            for sock in slow:
                sock.close()


def test_line_mode_hands_over_bytes_intact() -> None:
    """In line mode the peeked first line and everything after it reach the handler unchanged."""
    with Server((LOCALHOST, 0), Echo, wait_for_request="line") as server, serving(server):
        with connect(server.server_address) as sock, sock.makefile("rb") as reader:
            sock.sendall(b"par")
            sock.sendall(b"tial line\nsecond\n")
            assert reader.readline() == b"partial line\n"
            assert reader.readline() == b"second\n"


def test_first_line_too_long_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    """In line mode a first line longer than max_line_length is closed in the loop, with the reason logged."""
    with caplog.at_level(logging.INFO, logger="servekit.limits"):
        with (
            Server((LOCALHOST, 0), Echo, wait_for_request="line", max_line_length=100) as server,
            serving(server),
        ):
            with connect(server.server_address) as sock:
                sock.sendall(b"y" * 200)
                assert closed_by_peer(sock, 10)
    assert "line longer than 100 bytes" in caplog.text


def test_idle_timeout_cuts_a_silent_connection(caplog: pytest.LogCaptureFixture) -> None:
    """A client silent longer than idle_timeout while the handler reads is closed and logged, without handle_error."""
    errors: list[object] = []

    class Recording(Server):
        def handle_error(self, request: object, client_address: object) -> None:
            errors.append(client_address)

    with caplog.at_level(logging.INFO, logger="servekit"):
        with Recording((LOCALHOST, 0), Echo, idle_timeout=0.3) as server, serving(server):
            with connect(server.server_address) as sock, sock.makefile("rb") as reader:
                sock.sendall(b"one\n")
                assert reader.readline() == b"one\n"
                assert closed_by_peer(sock, 10)
    assert errors == []
    assert "silent for longer than the read timeout of 0.3s" in caplog.text


def test_handler_reads_its_request_deadline() -> None:
    """request_deadline() and time_left() tell the handler when its request's time is up."""
    seen: list[tuple[float | None, float | None]] = []

    class Deadline(servekit.StreamRequestHandler):
        def handle(self) -> None:
            seen.append((request_deadline(), time_left()))
            self.wfile.write(self.rfile.readline())

    before = time.monotonic()
    with Server((LOCALHOST, 0), Deadline, request_timeout=5.0) as server, serving(server):
        assert echo_once(server.server_address) == b"hello\n"
    ((deadline, left),) = seen
    assert deadline is not None and left is not None
    assert before + 5.0 <= deadline <= time.monotonic() + 5.0
    assert 0 < left <= 5.0
    assert request_deadline() is None


def test_server_speaks_first_with_wait_none() -> None:
    """wait_for_request='none' hands the connection over at once, so a server-first greeting works."""

    class Banner(servekit.StreamRequestHandler):
        def handle(self) -> None:
            self.wfile.write(b"220 ready\n")
            self.wfile.write(self.rfile.readline())

    with Server((LOCALHOST, 0), Banner, wait_for_request="none") as server, serving(server):
        with connect(server.server_address) as sock, sock.makefile("rb") as reader:
            assert reader.readline() == b"220 ready\n"
            sock.sendall(b"ehlo\n")
            assert reader.readline() == b"ehlo\n"


def test_client_closing_while_waiting_is_quiet(caplog: pytest.LogCaptureFixture) -> None:
    """A client that connects and closes without a byte is dropped without an INFO line (health checks do this)."""
    with caplog.at_level(logging.INFO, logger="servekit.limits"):
        with Server((LOCALHOST, 0), Echo, wait_for_request="line") as server, serving(server):
            connect(server.server_address).close()
            assert echo_once(server.server_address) == b"hello\n"
            deadline = time.monotonic() + 10
            while server.connections and time.monotonic() < deadline:
                time.sleep(0.01)
            assert server.connections == 0
    assert "closing" not in caplog.text


def test_readline_limited() -> None:
    """readline_limited() returns lines up to the limit and refuses a longer one."""
    import io

    stream = io.BytesIO(b"short\n" + b"z" * 20 + b"\n")
    assert readline_limited(stream, 10) == b"short\n"
    with pytest.raises(LineTooLongError, match="longer than 10 bytes"):
        readline_limited(stream, 10)
    assert readline_limited(io.BytesIO(b""), 10) == b""


# -- what to wait for: the handler says (wait_for_request="auto") ------------------------------


def test_request_wait_of_reads_the_handler_class() -> None:
    """auto resolves to what the handler declares: http.server's handlers a whole head, the echo handler a line, the WSGI handler a head, anything else its first bytes."""
    import functools
    import http.server

    from servekit.apps.echo import EchoHandler
    from servekit.apps.wsgi import WSGIRequestHandler
    from servekit.features.messages import request_wait_of

    simple = http.server.SimpleHTTPRequestHandler
    assert request_wait_of(simple) == "head"
    assert request_wait_of(functools.partial(simple, directory="/")) == "head"
    assert request_wait_of(EchoHandler) == "line"
    assert request_wait_of(WSGIRequestHandler) == "head"
    assert request_wait_of(Echo) == "data"

    class Greeter(http.server.BaseHTTPRequestHandler):
        wait_for_request = "none"

    assert request_wait_of(Greeter) == "none"


def test_a_handler_declaring_an_unknown_wait_is_refused() -> None:
    class Odd(Echo):
        wait_for_request = "sometimes"

    with pytest.raises(ValueError, match="wait_for_request = 'sometimes'"):
        Server((LOCALHOST, 0), Odd)


@pytest.mark.parametrize(
    ("data", "complete"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", True),
        (b"GET / HTTP/1.1\nHost: x\n\n", True),  # bare LF, as http.server accepts
        (b"GET / HTTP/1.1\r\n\r\n", True),  # no header at all
        (b"GET /\r\n", True),  # HTTP/0.9: the request line is the request
        (b"GET / HTTP/1.1\r\nHost: x\r\n", False),
        (b"GET / HTTP/1.1\r\nHo", False),
        (b"GET / HTTP/1.1", False),
        (b"", False),
    ],
)
def test_head_complete(data: bytes, complete: bool) -> None:
    from servekit.features.limits import _head_complete

    assert _head_complete(data, len(data)) is complete


def _assert_served_past(
    server: Server, slow: list[socket.socket], gets: int, within: float
) -> None:
    """While slow trickle: they all wait in the loop, no thread is busy, a real client gets
    its page within `within` seconds each time; then each slow one is cut off."""
    assert wait_until(lambda: server.waiting_connections == len(slow))
    assert wait_until(lambda: server.pool.busy == 0)
    for _ in range(gets):
        started = time.monotonic()
        assert _get(server.server_address).startswith(b"HTTP/1.1 200 OK\r\n")
        assert time.monotonic() - started < within
    assert sum(closed_by_peer(sock, 10) for sock in slow) == len(slow)


def _get(address: tuple[str, int], timeout: float = 5) -> bytes:
    with connect(address, timeout) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        return read_until(sock, b"\r\n\r\n/")


@pytest.mark.timeout(60)
def test_clients_trickling_their_headers_hold_no_thread() -> None:
    """100 HTTP clients that send a request line and then one header byte every 0.3 s, against an http.server handler on 4 threads (wait_for_request left at auto: a whole head): none gets a thread, a real client is answered at once each time, and the slow ones are cut off at request_timeout."""
    with (
        Server((LOCALHOST, 0), PathPage, max_threads=4, request_timeout=3.0) as server,
        serving(server),
    ):
        slow = [connect(server.server_address) for _ in range(100)]
        for sock in slow:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n")
        with dripping(slow):
            _assert_served_past(server, slow, gets=5, within=2.0)


def test_head_mode_hands_a_whole_head_over_intact() -> None:
    """A head that arrives in pieces is handed to the handler once complete, byte for byte (the peek leaves it in the kernel), and a pipelined second request is served too."""
    with Server((LOCALHOST, 0), PathPage, max_threads=2) as server, serving(server):
        with connect(server.server_address) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\n")
            # The server holds a partial head in its loop before the rest arrives.
            assert wait_until(lambda: server.waiting_connections == 1)
            sock.sendall(b"Host: t\r\n")
            sock.sendall(b"Accept: */*\r\n")
            sock.sendall(b"\r\nGET /b HTTP/1.1\r\nHost: t\r\n\r\n")
            answer = read_until(sock, b"\r\n\r\n/b")
            assert answer.count(b"HTTP/1.1 200 OK\r\n") == 2


def test_a_handler_that_speaks_first_is_not_kept_waiting() -> None:
    """Under auto, a handler declaring wait_for_request = "none" gets the connection at once."""

    class Banner(Echo):
        wait_for_request = "none"

        def handle(self) -> None:
            self.wfile.write(b"220 ready\n")

    with Server((LOCALHOST, 0), Banner) as server, serving(server):
        with connect(server.server_address) as sock, sock.makefile("rb") as reader:
            assert reader.readline() == b"220 ready\n"


@pytest.mark.timeout(60)
def test_keep_alive_clients_trickling_their_next_request_hold_no_thread() -> None:
    """20 keep-alive clients send one good request, then trickle the next one's headers, against an http.server handler on 2 threads: the head wait runs before every request, so a real client is still answered at once, and the tricklers are closed at request_timeout with their handler finished."""
    finished = []

    class Page(PathPage):
        def finish(self) -> None:
            finished.append(self.client_address)
            super().finish()

    # With ListenersMixIn (as every server of the command): its ConnectionSocket can be
    # peeked in the loop between messages without waiting.
    with (
        ListenersServer("127.0.0.1:0", Page, max_threads=2, request_timeout=2.0) as server,
        serving(server),
    ):
        slow = [connect(server.server_address) for _ in range(20)]
        for sock in slow:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            assert read_until(sock, b"\r\n\r\n/").startswith(b"HTTP/1.1 200 OK\r\n")
            sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n")  # the next head, unfinished
        with dripping(slow):
            _assert_served_past(server, slow, gets=3, within=1.5)
    assert len(finished) == 23  # the 20 tricklers and the 3 real clients
