"""min_request_rate: a client that trickles its request body is cut off about
request_timeout after the request started, over real sockets; a fast upload and a
handler that loops in handle() are not."""

from __future__ import annotations

import http.server
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import pytest

import servekit
from servekit.apps.wsgi import handler_for
from servekit.errors import RequestTooSlow
from servekit.features.connsocket import ConnectionSocket
from servekit.features.limits import LimitsMixIn
from servekit.features.listeners import ListenersMixIn
from servekit.features.messages import MessageHandler
from servekit.features.pool import ThreadPoolMixIn
from servekit.features.tls import TLSMixIn
from servekit.testing import (
    LOCALHOST,
    closed_by_peer,
    connect,
    dripping,
    exchange_line,
    read_until,
    serving,
    wait_until,
)
from tests.integration.apps import Upload
from tests.tls_certs import CertSet

pytestmark = pytest.mark.timeout(60)

TIMEOUT = 10.0

# One thread, so a held one shows; a body at 10 B/s is cut about 0.5 s after its request
# started, well before idle_timeout.
SLOW_BODY_LIMITS: dict[str, Any] = {
    "max_threads": 1,
    "request_timeout": 0.5,
    "idle_timeout": 30,
    "min_request_rate": 100,
}


class Server(ListenersMixIn, LimitsMixIn, ThreadPoolMixIn, servekit.TCPServer):
    pass


class TLSServer(LimitsMixIn, TLSMixIn, ThreadPoolMixIn, servekit.TCPServer):
    pass


class PlainServer(LimitsMixIn, ThreadPoolMixIn, servekit.TCPServer):
    """Without ListenersMixIn: ThreadPoolMixIn accepts ConnectionSockets itself."""


@pytest.fixture
def pair() -> Iterator[tuple[ConnectionSocket, socket.socket]]:
    a, b = socket.socketpair()
    ours = ConnectionSocket(a.family, a.type, a.proto, a.detach())
    yield ours, b
    ours.close()
    b.close()


# -- the socket ------------------------------------------------------------------------


def test_each_byte_read_buys_time(pair: tuple[ConnectionSocket, socket.socket]) -> None:
    """With 0.3 s left and 10 B/s, 5 bytes read (by recv() and recv_into()) buy 0.5 s
    more: the wait that follows ends with RequestTooSlow about 0.8 s after the start,
    long before the 10 s timeout."""
    ours, peer = pair
    ours.settimeout(10)
    started = time.monotonic()
    ours.begin_message(None, started + 0.3, 10.0)
    peer.sendall(b"123")
    assert ours.recv(100) == b"123"
    peer.sendall(b"45")
    assert ours.recv_into(bytearray(100)) == 2
    with pytest.raises(RequestTooSlow, match="5 bytes read"):
        ours.recv(100)
    assert 0.7 <= time.monotonic() - started < 5


def test_bytes_already_there_are_read_past_the_limit(
    pair: tuple[ConnectionSocket, socket.socket],
) -> None:
    """Only waits are cut: a read whose bytes have arrived returns them even after the limit."""
    ours, peer = pair
    ours.settimeout(10)
    ours.begin_message(None, time.monotonic() - 5, 500.0)
    peer.sendall(b"late but here")
    buffer = bytearray(100)
    assert ours.recv_into(buffer) == 13
    with pytest.raises(RequestTooSlow):
        ours.recv(1)


def test_without_a_limit_the_timeout_alone_applies(
    pair: tuple[ConnectionSocket, socket.socket],
) -> None:
    ours, _ = pair
    ours.settimeout(0.2)
    ours.begin_message(None, None, 500.0)
    with pytest.raises(TimeoutError, match="timed out") as raised:
        ours.recv(1)
    assert not isinstance(raised.value, RequestTooSlow)


# -- a pool server ---------------------------------------------------------------------


def _put_head(length: int) -> bytes:
    return b"PUT /up HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % length


class Recorded(Upload):
    """Upload, keeping what http.server logs as errors (it catches the TimeoutError a
    too-slow body raises, logs it with log_error() and closes the connection)."""

    errors: list[str] = []

    def log_error(self, format: str, *args: Any) -> None:
        self.errors.append(format % args)


def _trickled_body_is_cut(server: Any, connect_to: Any) -> None:
    """One client sends a head and trickles its body, on a pool of one thread: it is
    closed well before its idle_timeout, the handler logs why, and the thread serves the
    next client."""
    Recorded.errors = []
    slow = connect_to()
    slow.sendall(_put_head(1000))
    started = time.monotonic()
    with dripping([slow], data=b"x", interval=0.1, rounds=100):
        assert closed_by_peer(slow, TIMEOUT)
        assert time.monotonic() - started < 5  # request_timeout 0.5 s; idle_timeout 30 s
    assert wait_until(lambda: server.pool.busy == 0)
    with connect_to() as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        assert read_until(sock, b"hello").startswith(b"HTTP/1.1 200")
    assert any("request too slow" in error for error in Recorded.errors)


@pytest.mark.parametrize("server_class", [Server, PlainServer])
def test_a_trickled_body_is_cut_off(server_class: type[Any]) -> None:
    """http.server handler, plain TCP: a body at 10 B/s against min_request_rate=100;
    with ListenersMixIn and without it."""
    address: Any = f"{LOCALHOST}:0" if server_class is Server else (LOCALHOST, 0)
    with (
        server_class(
            address,
            Recorded,
            **SLOW_BODY_LIMITS,
        ) as server,
        serving(server),
    ):
        _trickled_body_is_cut(server, lambda: connect(server.server_address, TIMEOUT))


def test_a_trickled_body_is_cut_off_over_tls(tls_certs: CertSet) -> None:
    """The same over TLS (TLSConnectionSocket lowers the read's timeout to the limit)."""
    context = tls_certs.client_context()

    def tls_client() -> ssl.SSLSocket:
        raw = connect(server.server_address, TIMEOUT)
        return context.wrap_socket(raw, server_hostname="localhost")

    with (
        TLSServer(
            (LOCALHOST, 0),
            Recorded,
            certfile=str(tls_certs.server.cert),
            keyfile=str(tls_certs.server.key),
            **SLOW_BODY_LIMITS,
        ) as server,
        serving(server),
    ):
        _trickled_body_is_cut(server, tls_client)


def test_a_fast_upload_outlives_request_timeout() -> None:
    """A 1 MiB body sent in 16 pieces over about a second: each byte buys time, so
    request_timeout=0.2 and min_request_rate=100 do not cut it; it comes back whole."""
    body = os.urandom(1024 * 1024)
    pieces = [_put_head(len(body))] + [body[i : i + 65536] for i in range(0, len(body), 65536)]
    pause = threading.Event()

    def send() -> None:
        for piece in pieces:
            sock.sendall(piece)
            pause.wait(0.06)  # the scenario: a client uploading at about 1 MiB/s

    with (
        Server(
            f"{LOCALHOST}:0", Upload, max_threads=2, request_timeout=0.2, min_request_rate=100
        ) as server,
        serving(server),
        connect(server.server_address, TIMEOUT) as sock,
    ):
        sender = threading.Thread(target=send)
        sender.start()
        try:
            answer = read_until(sock, body[-64:], max_reads=100_000)
        finally:
            sender.join(TIMEOUT)
        assert answer.startswith(b"HTTP/1.1 200")
        assert answer.endswith(body)


def test_a_handler_that_loops_in_handle_keeps_idle_timeout_only() -> None:
    """A session handler's "request" is the whole connection: a pause longer than
    request_timeout between its lines is not cut."""

    class Session(servekit.StreamRequestHandler):
        def handle(self) -> None:
            for line in self.rfile:
                self.wfile.write(line)

    with (
        Server(f"{LOCALHOST}:0", Session, request_timeout=0.2, min_request_rate=100) as server,
        serving(server),
        connect(server.server_address, TIMEOUT) as sock,
    ):
        assert exchange_line(sock, b"one\n") == b"one\n"
        threading.Event().wait(0.6)  # the scenario: silent for 3x request_timeout
        assert exchange_line(sock, b"two\n") == b"two\n"


def test_a_wsgi_body_trickled_in_gets_408(caplog: pytest.LogCaptureFixture) -> None:
    """servekit's WSGI handler answers a body that came too slowly with 408 and one INFO line."""

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        body = environ["wsgi.input"].read()
        start_response("200 OK", [("Content-Length", str(len(body)))])
        return [body]

    with (
        caplog.at_level(logging.INFO, logger="servekit"),
        Server(
            f"{LOCALHOST}:0",
            handler_for(app),
            **SLOW_BODY_LIMITS,
        ) as server,
        serving(server),
        connect(server.server_address, TIMEOUT) as sock,
    ):
        sock.sendall(b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n")
        with dripping([sock], data=b"x", interval=0.1, rounds=100):
            answer = read_until(sock, b"min_request_rate")
        assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
        assert "request too slow" in caplog.text


def test_min_request_rate_is_a_setting() -> None:
    """The knob is validated like the other limits; None turns the limit off."""
    with pytest.raises(ValueError):
        Server(f"{LOCALHOST}:0", Upload, min_request_rate=-1)
    assert Server.min_request_rate == 500.0
    with Server(f"{LOCALHOST}:0", Upload, min_request_rate=None) as server:
        assert server.min_request_rate is None


# -- Expect: 100-continue ----------------------------------------------------------------

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def _expecting_post(length: int) -> bytes:
    return (
        b"POST /up HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n"
        b"Content-Length: %d\r\n\r\n" % length
    )


class Works(http.server.BaseHTTPRequestHandler):
    """Answers 100 Continue as http.server does (before do_POST), then waits until the
    client says it has its 100 and works past request_timeout before it reads the body."""

    protocol_version = "HTTP/1.1"
    got_continue = threading.Event()

    def do_POST(self) -> None:
        self.got_continue.wait(TIMEOUT)
        threading.Event().wait(0.5)  # the scenario: work past request_timeout (0.2 s)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_100_continue_leaves_at_once() -> None:
    """http.server sends '100 Continue' before do_POST runs: a pool server sends it at
    once (an interim head is never held for a body), so the client's body is there when
    the handler, having worked past request_timeout, reads it."""
    Works.got_continue = threading.Event()
    with (
        Server(
            f"{LOCALHOST}:0", Works, max_threads=1, request_timeout=0.2, min_request_rate=100
        ) as server,
        serving(server),
        connect(server.server_address, TIMEOUT) as sock,
    ):
        sock.sendall(_expecting_post(5))
        # do_POST waits for this event: the 100 must come before it runs (a held one
        # would come only when do_POST reads: after this socket's timeout).
        sock.settimeout(2)
        assert read_until(sock, b"\r\n\r\n") == CONTINUE
        sock.settimeout(TIMEOUT)
        Works.got_continue.set()
        sock.sendall(b"hello")
        answer = read_until(sock, b"hello")
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"\r\n\r\nhello")


def test_a_wsgi_body_asked_for_late_is_not_too_slow() -> None:
    """servekit's WSGI handler sends '100 Continue' when the application first reads
    wsgi.input, past request_timeout here: the body's bound starts then."""

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        threading.Event().wait(0.5)  # the scenario: work past request_timeout (0.2 s)
        body = environ["wsgi.input"].read()
        start_response("200 OK", [("Content-Length", str(len(body)))])
        return [body]

    with (
        Server(
            f"{LOCALHOST}:0",
            handler_for(app),
            max_threads=1,
            request_timeout=0.2,
            min_request_rate=1000,  # the head's bytes buy 0.1 s: not past the work
        ) as server,
        serving(server),
        connect(server.server_address, TIMEOUT) as sock,
    ):
        sock.sendall(_expecting_post(5))
        assert read_until(sock, b"\r\n\r\n") == CONTINUE
        sock.sendall(b"hello")
        answer = read_until(sock, b"hello")
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"\r\n\r\nhello")


# -- the read timeout, before every message --------------------------------------------


class TimeoutReporter(MessageHandler):
    """Answers each line with its socket's read timeout, then changes that timeout: the
    next message must see idle_timeout again."""

    def handle_one_request(self) -> None:
        if not self.rfile.readline():
            self.close_connection = True
            return
        self.wfile.write(b"%r\n" % (self.request.gettimeout(),))
        self.request.settimeout(99.0)


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
def test_each_message_starts_with_the_idle_timeout(tls: bool, tls_certs: CertSet) -> None:
    """A handler that changes its socket's timeout during a message does not keep it
    for the next: idle_timeout is set again before each one (begin_message(), on
    ConnectionSocket and on the TLS socket)."""
    server_class: type[Any] = TLSServer if tls else Server
    options: dict[str, Any] = {"idle_timeout": 7.5, "max_threads": 2}
    if tls:
        options.update(certfile=str(tls_certs.server.cert), keyfile=str(tls_certs.server.key))
    with (
        server_class(
            f"{LOCALHOST}:0" if not tls else (LOCALHOST, 0), TimeoutReporter, **options
        ) as server,
        serving(server),
    ):
        sock: Any = connect(server.server_address, TIMEOUT)
        if tls:
            context = tls_certs.client_context()
            sock = context.wrap_socket(sock, server_hostname="localhost")
        with sock:
            for _ in range(3):
                assert exchange_line(sock, b"x\n") == b"7.5\n"
