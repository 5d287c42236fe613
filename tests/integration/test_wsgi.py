"""WSGI applications on servekit (servekit.apps.wsgi) over real loopback sockets.

Clients are http.client and raw sockets read by a small response reader, so the bytes on
the wire (framing, Connection headers, pipelining, 100 Continue) are checked exactly.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import logging
import os
import shutil
import socket
import struct
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest

import servekit
from servekit.apps.wsgi import HELLO_BODY, WSGIRequestHandler, handler_for, hello_app
from servekit.features.pool import ThreadPoolTCPServer, ThreadPoolUnixStreamServer
from servekit.testing import (
    LOCALHOST,
    LOCALHOST_V6,
    closed_by_peer,
    connect,
    has_ipv6_loopback,
    serving,
)
from tests.tls_certs import LogWatcher, watching_log

if TYPE_CHECKING:
    from tests.tls_certs import CertSet

# Bounds every client-side wait; the server answers in milliseconds.
TIMEOUT = 5.0

Environ = dict[str, Any]
StartResponse = Callable[..., Callable[[bytes], None]]
App = Callable[[Environ, StartResponse], Iterable[bytes]]


# --- helpers ----------------------------------------------------------------------------


@contextlib.contextmanager
def wsgi_server(
    app: App,
    address: Any = (LOCALHOST, 0),
    server_class: type[Any] = ThreadPoolTCPServer,
    handler: type[WSGIRequestHandler] | None = None,
    **knobs: Any,
) -> Iterator[Any]:
    """A pool server serving app, running in a thread for the duration of the block."""
    with (
        server_class(address, handler or handler_for(app, **knobs)) as server,
        serving(server),
    ):
        yield server


@dataclass
class Response:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = [v for n, v in self.headers if n == name.lower()]
        return ", ".join(values) if values else None


class Client:
    """A raw HTTP/1.1 client: send bytes, read responses one by one from one buffer (so
    pipelined responses are read exactly, unlike http.client's per-response files)."""

    def __init__(self, address: Any) -> None:
        self.sock = connect(address, TIMEOUT)
        self.file = self.sock.makefile("rb")

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def head_block(self) -> tuple[int, str, list[tuple[str, str]]]:
        line = self.file.readline(65537)
        assert line.endswith(b"\r\n"), f"no status line: {line!r}"
        version, status, reason = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
        assert version == "HTTP/1.1"
        headers = []
        for _ in range(200):
            line = self.file.readline(65537)
            if line == b"\r\n":
                break
            name, _, value = line.decode("latin-1").rstrip("\r\n").partition(":")
            headers.append((name.lower(), value.strip()))
        else:
            raise AssertionError("more than 200 header lines")
        return int(status), reason, headers

    def response(self, *, head: bool = False) -> Response:
        status, reason, headers = self.head_block()
        response = Response(status, reason, headers, b"")
        if head or status in (204, 304) or status < 200:
            return response
        if response.header("transfer-encoding") == "chunked":
            body = io.BytesIO()
            for _ in range(100000):
                size = int(self.file.readline(100).split(b";")[0], 16)
                if size == 0:
                    assert self.file.readline(100) == b"\r\n"
                    break
                body.write(self.file.read(size))
                assert self.file.read(2) == b"\r\n"
            response.body = body.getvalue()
        elif (length := response.header("content-length")) is not None:
            response.body = self.file.read(int(length))
        else:
            response.body = self.file.read()  # until the server closes
        return response

    def closed_by_server(self) -> bool:
        """True if the server closes the connection (EOF), sending nothing more."""
        return closed_by_peer(self.sock, TIMEOUT)


def get(path: str = "/", host: str = "example.com", extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode("latin-1")


def reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the kernel sends a reset instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def echo_environ(keys: Iterable[str]) -> App:
    """An app answering a JSON object of the chosen environ keys (and the body read)."""

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        body = environ["wsgi.input"].read()
        answer = {key: environ.get(key) for key in keys}
        answer["body"] = body.decode("latin-1")
        data = json.dumps(answer).encode()
        start_response("200 OK", [("Content-Type", "application/json")])
        return [data]

    return app


@pytest.fixture
def wsgi_log() -> Iterator[LogWatcher]:
    """Every record of the servekit loggers, DEBUG and up, during the test."""
    with watching_log("servekit", logging.DEBUG) as watcher:
        yield watcher


def loud(watcher: LogWatcher) -> list[str]:
    """Records at WARNING or above."""
    return [r.getMessage() for r in watcher.records if r.levelno >= logging.WARNING]


# --- keep-alive, pipelining, framing ------------------------------------------------------


def test_hello_app_serves_1024_bytes() -> None:
    """hello_app answers any GET with exactly 1 KiB of text/plain, and other methods with 405."""
    with wsgi_server(hello_app) as server:
        conn = http.client.HTTPConnection(*server.server_address, timeout=TIMEOUT)
        conn.request("GET", "/anything?x=1")
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Type") == "text/plain; charset=utf-8"
        assert response.read() == HELLO_BODY and len(HELLO_BODY) == 1024
        conn.request("POST", "/", body=b"x")
        response = conn.getresponse()
        assert (response.status, response.getheader("Allow")) == (405, "GET, HEAD")
        response.read()
        conn.close()


def test_keep_alive_serves_several_requests_on_one_connection() -> None:
    """HTTP/1.1 requests on one connection are all answered on it, bodies and all."""
    app = echo_environ(["REMOTE_PORT", "PATH_INFO"])
    with wsgi_server(app) as server:
        conn = http.client.HTTPConnection(*server.server_address, timeout=TIMEOUT)
        ports = set()
        for i in range(5):
            conn.request("POST", f"/r{i}", body=b"x" * i)
            response = conn.getresponse()
            assert response.status == 200 and response.getheader("Connection") is None
            answer = json.loads(response.read())
            assert (answer["PATH_INFO"], answer["body"]) == (f"/r{i}", "x" * i)
            ports.add(answer["REMOTE_PORT"])
        assert ports == {str(conn.sock.getsockname()[1])}
        conn.close()


def test_keep_alive_with_a_looping_server() -> None:
    """On a server that runs handle() (ThreadingTCPServer), the handler loops over requests on the same connection."""
    with wsgi_server(hello_app, server_class=servekit.ThreadingTCPServer) as server:
        client = Client(server.server_address)
        for _ in range(3):
            client.send(get())
            assert client.response().body == HELLO_BODY
        client.close()


def test_pipelined_requests_are_answered_in_order() -> None:
    """Requests sent back to back before any answer are answered in order, each body read exactly."""
    app = echo_environ(["PATH_INFO", "REQUEST_METHOD"])
    with wsgi_server(app) as server:
        client = Client(server.server_address)
        client.send(
            get("/one")
            + b"POST /two HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello"
            + b"POST /three HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"3\r\nabc\r\n0\r\n\r\n"
            + get("/four")
        )
        answers = [json.loads(client.response().body) for _ in range(4)]
        assert [(a["PATH_INFO"], a["body"]) for a in answers] == [
            ("/one", ""),
            ("/two", "hello"),
            ("/three", "abc"),
            ("/four", ""),
        ]
        client.close()


def test_chunked_request_body_is_decoded() -> None:
    """A chunked body reaches wsgi.input decoded (extensions and trailers dropped), with no CONTENT_LENGTH and wsgi.input_terminated set."""
    app = echo_environ(["CONTENT_LENGTH", "wsgi.input_terminated", "HTTP_TRANSFER_ENCODING"])
    with wsgi_server(app) as server:
        client = Client(server.server_address)
        client.send(
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nX-Trailer: t\r\n\r\n"
        )
        answer = json.loads(client.response().body)
        assert answer == {
            "CONTENT_LENGTH": None,
            "wsgi.input_terminated": True,
            "HTTP_TRANSFER_ENCODING": "chunked",
            "body": "hello, world",
        }
        client.close()


def test_wsgi_input_reads() -> None:
    """wsgi.input supports read(n), readline(), readlines(), iteration, and reads past the end return b''."""
    seen: dict[str, Any] = {}

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        stream = environ["wsgi.input"]
        seen["read3"] = stream.read(3)
        seen["line"] = stream.readline()
        seen["limited"] = stream.readline(2)
        seen["lines"] = stream.readlines()
        seen["after"] = (stream.read(), stream.read(10), stream.readline(), list(stream))
        start_response("204 No Content", [])
        return []

    body = b"abcdef\nghij\nkl\nmn"
    with wsgi_server(app) as server:
        conn = http.client.HTTPConnection(*server.server_address, timeout=TIMEOUT)
        conn.request("PUT", "/", body=iter([body[:4], body[4:9], body[9:]]))  # chunked
        assert conn.getresponse().status == 204
        conn.close()
    assert seen == {
        "read3": b"abc",
        "line": b"def\n",
        "limited": b"gh",
        "lines": [b"ij\n", b"kl\n", b"mn"],
        "after": (b"", b"", b"", []),
    }


def test_chunked_response_when_the_length_is_unknown() -> None:
    """A generator's body goes out chunked to HTTP/1.1 clients and close-delimited, with Connection: close, to HTTP/1.0 clients."""

    def app(environ: Environ, start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"first "
        yield b""
        yield b"second"

    with wsgi_server(app) as server:
        client = Client(server.server_address)
        client.send(get())
        response = client.response()
        assert response.header("transfer-encoding") == "chunked"
        assert response.header("content-length") is None
        assert response.body == b"first second"
        client.send(b"GET / HTTP/1.0\r\n\r\n")
        response = client.response()
        assert response.header("transfer-encoding") is None
        assert response.header("connection") == "close"
        assert response.body == b"first second"
        client.close()


def test_list_body_gets_a_content_length() -> None:
    """A body returned as a list gets a Content-Length (no chunking), also on HTTP/1.0, which then stays open on keep-alive."""

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        start_response("200 OK", [])
        return [b"ab", b"cd", b""]

    with wsgi_server(app) as server:
        client = Client(server.server_address)
        client.send(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        response = client.response()
        assert (response.header("content-length"), response.body) == ("4", b"abcd")
        assert response.header("connection") == "keep-alive"
        client.send(get())
        assert client.response().body == b"abcd"
        client.close()


class CountingSocket:
    """Wraps a connection's socket to record each sendall() (the writes on the wire)."""

    writes: list[bytes]

    def __init__(self, sock: socket.socket, writes: list[bytes]) -> None:
        self._sock = sock
        self.writes = writes

    def sendall(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        self._sock.sendall(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def counting_handler(app: App, writes: list[bytes]) -> type[WSGIRequestHandler]:
    base = handler_for(app)

    class Counting(base):  # type: ignore[valid-type, misc]
        def setup(self) -> None:
            super().setup()
            self.connection = CountingSocket(self.connection, writes)  # type: ignore[assignment]

    return Counting


def test_head_and_first_body_chunk_leave_in_one_write() -> None:
    """The response head and a small body (a list, or a generator's first chunk) leave in a single sendall(); the chunked terminator follows in its own."""

    def streaming(environ: Environ, start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"chunk-one"
        yield b"chunk-two"

    writes: list[bytes] = []
    with wsgi_server(hello_app, handler=counting_handler(hello_app, writes)) as server:
        client = Client(server.server_address)
        client.send(get())
        assert client.response().body == HELLO_BODY
        client.close()
    assert len(writes) == 1 and writes[0].endswith(b"\r\n\r\n" + HELLO_BODY)
    writes.clear()
    with wsgi_server(streaming, handler=counting_handler(streaming, writes)) as server:
        client = Client(server.server_address)
        client.send(get())
        assert client.response().body == b"chunk-onechunk-two"
        client.close()
    assert writes[0].endswith(b"\r\n\r\n9\r\nchunk-one\r\n")
    assert writes[1:] == [b"9\r\nchunk-two\r\n", b"0\r\n\r\n"]


def test_head_request_gets_headers_only() -> None:
    """HEAD gets the GET's status and Content-Length and no body; the connection then serves the next request."""
    with wsgi_server(hello_app) as server:
        client = Client(server.server_address)
        client.send(b"HEAD / HTTP/1.1\r\nHost: h\r\n\r\n" + get())
        head = client.response(head=True)
        assert (head.status, head.header("content-length"), head.body) == (200, "1024", b"")
        assert client.response().body == HELLO_BODY
        client.close()


def test_write_callable_and_date_server_headers() -> None:
    """start_response()'s write() sends at once; Date and Server are added unless the application set them."""

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        write = start_response("200 OK", [("Server", "mine"), ("Content-Length", "10")])
        write(b"hello")
        write(b"")
        return [b"world"]

    with wsgi_server(app) as server:
        client = Client(server.server_address)
        client.send(get())
        response = client.response()
        assert response.body == b"helloworld"
        assert response.header("server") == "mine"
        assert response.header("date") is not None and response.header("date").endswith(" GMT")
        client.close()


def test_application_connection_close_is_honoured() -> None:
    """ "Connection: close" from the application closes the connection after its answer; other hop-by-hop headers are the server's: the application's start_response() raises and it gets a 500."""

    def closing(environ: Environ, start_response: StartResponse) -> list[bytes]:
        start_response("200 OK", [("Connection", "close")])
        return [b"bye"]

    def framing(environ: Environ, start_response: StartResponse) -> list[bytes]:
        start_response("200 OK", [("Transfer-Encoding", "chunked")])
        return [b"0\r\n\r\n"]

    with wsgi_server(closing) as server:
        client = Client(server.server_address)
        client.send(get())
        response = client.response()
        assert (response.body, response.header("connection")) == (b"bye", "close")
        assert client.closed_by_server()
        client.close()
    with watching_log("servekit.wsgi", logging.ERROR) as log, wsgi_server(framing) as server:
        client = Client(server.server_address)
        client.send(get())
        assert client.response().status == 500
        client.close()
    assert "raised" in log.messages()[0]


def test_application_content_length_mismatch(wsgi_log: LogWatcher) -> None:
    """A body longer than the application's Content-Length is cut to it; a shorter one closes the connection; both are logged as the application's error."""

    def longer(environ: Environ, start_response: StartResponse) -> list[bytes]:
        start_response("200 OK", [("Content-Length", "3")])
        return [b"abcdef"]

    def shorter(environ: Environ, start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Length", "10")])
        yield b"abc"

    with wsgi_server(longer) as server:
        client = Client(server.server_address)
        client.send(get() + get())
        assert client.response().body == b"abc"
        assert client.closed_by_server()
        client.close()
    with wsgi_server(shorter) as server:
        client = Client(server.server_address)
        client.send(get())
        assert client.head_block()[0] == 200
        assert client.file.read() == b"abc"  # then EOF: the server closed
        client.close()
    messages = loud(wsgi_log)
    assert len(messages) == 2
    assert "more than its Content-Length of 3" in messages[0]
    assert "sent 3 of its Content-Length of 10" in messages[1]


def test_a_stopping_server_says_connection_close() -> None:
    """While the server stops, an answer carries Connection: close and the connection closes after it."""
    stopping = threading.Event()

    class Server(servekit.ThreadingTCPServer):
        @property
        def state(self) -> servekit.ServerState:  # type: ignore[override]
            return servekit.ServerState.STOPPING if stopping.is_set() else super().state

    with wsgi_server(hello_app, server_class=Server) as server:
        client = Client(server.server_address)
        client.send(get())
        assert client.response().header("connection") is None
        stopping.set()
        client.send(get())
        response = client.response()
        assert (response.body, response.header("connection")) == (HELLO_BODY, "close")
        assert client.closed_by_server()
        client.close()


def test_idle_connection_times_out_quietly(wsgi_log: LogWatcher) -> None:
    """On a server that loops in handle(), a keep-alive connection idle for the handler's timeout is closed, logged at DEBUG only."""
    with wsgi_server(hello_app, server_class=servekit.ThreadingTCPServer, timeout=0.2) as server:
        client = Client(server.server_address)
        client.send(get())
        assert client.response().status == 200
        assert client.closed_by_server()
        client.close()
        wsgi_log.wait_for("idle for")
    assert loud(wsgi_log) == []


# --- 100-continue and unread bodies ---------------------------------------------------------


def test_expect_100_continue_when_the_body_is_read() -> None:
    """With Expect: 100-continue the server sends 100 Continue when the application reads the body, then the final answer."""
    app = echo_environ([])
    with wsgi_server(app) as server:
        client = Client(server.server_address)
        client.send(
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
        )
        interim = client.response()
        assert (interim.status, interim.reason) == (100, "Continue")
        client.send(b"data")
        response = client.response()
        assert json.loads(response.body) == {"body": "data"}
        assert response.header("connection") is None
        client.send(get())
        assert client.response().status == 200
        client.close()


def test_expect_100_continue_refused_without_reading() -> None:
    """An application that answers without reading gets no 100 Continue sent: the final answer says Connection: close and the connection closes."""
    with wsgi_server(hello_app) as server:
        client = Client(server.server_address)
        client.send(
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
        )
        response = client.response()
        assert response.status == 405
        assert response.header("connection") == "close"
        assert client.closed_by_server()
        client.close()


def test_unread_body_is_drained_and_the_connection_kept() -> None:
    """A small body the application does not read is discarded and the next request is served on the same connection."""
    with wsgi_server(hello_app) as server:
        client = Client(server.server_address)
        client.send(b"DELETE / HTTP/1.1\r\nHost: h\r\nContent-Length: 1000\r\n\r\n" + b"x" * 1000)
        response = client.response()
        assert response.status == 405 and response.header("connection") is None
        client.send(get())
        assert client.response().body == HELLO_BODY
        client.send(b"DELETE / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
        client.send(b"3\r\nabc\r\n0\r\n\r\n" + get())
        assert client.response().status == 405
        assert client.response().body == HELLO_BODY
        client.close()


def test_large_unread_body_closes_the_connection() -> None:
    """A body the application leaves unread with more than max_drain_size bytes still to come gets Connection: close instead of being read."""
    with wsgi_server(hello_app, max_drain_size=100) as server:
        client = Client(server.server_address)
        client.send(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 100000\r\n\r\n" + b"x" * 50)
        response = client.response()
        assert response.status == 405 and response.header("connection") == "close"
        assert client.closed_by_server()
        client.close()


# --- refused requests -----------------------------------------------------------------------

BAD_REQUESTS = [
    pytest.param(b"GET / HTTP/1.1\nHost: h\n\n", 400, "bare LF", id="bare-lf"),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        "both Content-Length and Transfer-Encoding",
        id="cl-and-te",
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost : h\r\n\r\n", 400, "whitespace between", id="space-before-colon"
    ),
    pytest.param(b"GET / HTTP/1.1\r\n\r\n", 400, "without a Host", id="no-host"),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 101\r\n\r\n",
        413,
        "exceeds the limit of 100 bytes",
        id="too-large",
    ),
    pytest.param(
        b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: h\r\n\r\n",
        414,
        "request line longer",
        id="uri-too-long",
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: " + b"b" * 70000 + b"\r\n\r\n",
        431,
        "request head longer than 65536 bytes",
        id="head-too-large",
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: h\r\n"
        + b"".join(b"X-%d: v\r\n" % i for i in range(100))
        + b"\r\n",
        431,
        "more than 100 header fields",
        id="too-many-fields",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        501,
        "transfer coding 'gzip' is not supported",
        id="gzip",
    ),
    pytest.param(b"GET / HTTP/2.0\r\nHost: h\r\n\r\n", 505, "HTTP/2.0", id="http2"),
    pytest.param(bytes.fromhex("160301") + b"\x00" * 50, 400, "byte 0x16", id="tls-hello"),
]


@pytest.mark.parametrize(("request_bytes", "status", "message"), BAD_REQUESTS)
def test_bad_requests_get_a_clear_answer_and_the_connection_closes(
    request_bytes: bytes, status: int, message: str, wsgi_log: LogWatcher
) -> None:
    """A request we refuse gets its status with a plain-text reason and Connection: close, then the connection closes; the application never runs and nothing is logged above DEBUG."""
    calls: list[Environ] = []

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        calls.append(environ)
        return hello_app(environ, start_response)

    with wsgi_server(app, max_body_size=100) as server:
        client = Client(server.server_address)
        client.send(request_bytes)
        response = client.response()
        assert response.status == status
        assert response.header("connection") == "close"
        assert response.header("content-type") == "text/plain; charset=utf-8"
        assert message in response.body.decode()
        assert client.closed_by_server()
        client.close()
    assert calls == []
    assert loud(wsgi_log) == []


def test_chunked_body_over_the_limit_is_a_413() -> None:
    """A chunked body that grows past max_body_size while the application reads it is answered 413 (the application's failure is the client's), and the connection closes."""

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        environ["wsgi.input"].read()
        start_response("200 OK", [])
        return [b"read it all"]

    with wsgi_server(app, max_body_size=10) as server:
        client = Client(server.server_address)
        client.send(
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"8\r\n12345678\r\n8\r\n12345678\r\n0\r\n\r\n"
        )
        response = client.response()
        assert response.status == 413 and b"exceeds the limit of 10 bytes" in response.body
        assert client.closed_by_server()
        client.close()


# --- application errors and clients that go away --------------------------------------------


def test_application_exception_is_a_500_logged_once(
    wsgi_log: LogWatcher, capfd: pytest.CaptureFixture[str]
) -> None:
    """An exception from the application is answered 500, logged once at ERROR with its traceback on "servekit.wsgi", and the connection closes; nothing reaches the server's handle_error()."""

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        raise ZeroDivisionError("the bug")

    with wsgi_server(app) as server:
        client = Client(server.server_address)
        client.send(get("/boom"))
        response = client.response()
        assert response.status == 500 and response.header("connection") == "close"
        assert client.closed_by_server()
        client.close()
    errors = [r for r in wsgi_log.records if r.levelno >= logging.WARNING]
    assert len(errors) == 1
    assert errors[0].name == "servekit.wsgi" and errors[0].levelno == logging.ERROR
    assert errors[0].exc_info is not None and errors[0].exc_info[0] is ZeroDivisionError
    assert "GET /boom" in errors[0].getMessage()
    assert "Exception occurred during processing" not in capfd.readouterr().err


def test_exception_after_the_head_was_sent_closes_the_connection(wsgi_log: LogWatcher) -> None:
    """An exception while streaming the body cannot become a 500: it is logged once and the connection closes, so the client sees a truncated body."""
    closed = threading.Event()

    class Body:
        def __iter__(self) -> Iterator[bytes]:
            yield b"partial"
            raise RuntimeError("mid-body")

        def close(self) -> None:
            closed.set()

    def app(environ: Environ, start_response: StartResponse) -> Body:
        start_response("200 OK", [])
        return Body()

    with wsgi_server(app) as server:
        conn = http.client.HTTPConnection(*server.server_address, timeout=TIMEOUT)
        conn.request("GET", "/")
        response = conn.getresponse()
        with pytest.raises(http.client.IncompleteRead):
            response.read()
        conn.close()
    assert closed.is_set()
    errors = loud(wsgi_log)
    assert len(errors) == 1 and "raised" in errors[0]


def test_start_response_with_exc_info() -> None:
    """An application may replace its status with start_response(..., exc_info) before the head is sent."""

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        try:
            raise KeyError("missing")
        except KeyError:
            import sys

            start_response("503 Service Unavailable", [], sys.exc_info())
        return [b"sorry"]

    with wsgi_server(app) as server:
        client = Client(server.server_address)
        client.send(get())
        response = client.response()
        assert (response.status, response.body) == (503, b"sorry")
        assert response.header("content-type") is None
        client.close()


def test_client_reset_mid_response_is_quiet(
    wsgi_log: LogWatcher, capfd: pytest.CaptureFixture[str]
) -> None:
    """A client that resets the connection while the body streams is logged once at DEBUG with its address: no warning, no error, no traceback; the server serves on."""
    reset_done = threading.Event()
    closed = threading.Event()

    def app(environ: Environ, start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", [])
        try:
            yield b"first"
            reset_done.wait(TIMEOUT)
            for _ in range(1000):  # a write fails at the latest once the buffers are full
                yield b"x" * 65536
        finally:
            closed.set()

    with wsgi_server(app) as server:
        client = Client(server.server_address)
        client.send(get())
        client.head_block()
        peer = client.sock.getsockname()
        client.file.close()  # else the socket's close() waits for its file to be closed
        reset(client.sock)
        reset_done.set()
        record = wsgi_log.wait_for("went away")
        assert record.levelno == logging.DEBUG and f"{peer[0]}:{peer[1]}" in record.getMessage()
        assert closed.wait(TIMEOUT)
        again = Client(server.server_address)
        again.send(get())
        assert again.response().status == 200
        again.close()
    assert loud(wsgi_log) == []
    assert "Traceback" not in capfd.readouterr().err


def test_many_client_resets_are_quiet(
    wsgi_log: LogWatcher, capfd: pytest.CaptureFixture[str]
) -> None:
    """Clients that send a request, or half of one, and reset at once leave nothing above DEBUG in the log and nothing on stderr; the server keeps serving."""
    with wsgi_server(hello_app) as server:
        for i in range(60):
            sock = connect(server.server_address, TIMEOUT)
            sock.sendall(get() if i % 2 else b"GET / HTTP/1.1\r\nHost")
            reset(sock)
        client = Client(server.server_address)
        client.send(get())
        assert client.response().body == HELLO_BODY
        client.close()
    assert loud(wsgi_log) == []
    assert capfd.readouterr().err == ""


def test_client_gone_while_the_application_reads_the_body(wsgi_log: LogWatcher) -> None:
    """A client that closes in the middle of its body makes wsgi.input raise ClientDisconnected; if the application lets it through, that is a debug line, not an error."""
    raised: list[BaseException] = []

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        try:
            environ["wsgi.input"].read()
        except ConnectionError as exc:
            raised.append(exc)
            raise
        start_response("200 OK", [])
        return []

    with wsgi_server(app) as server:
        sock = connect(server.server_address, TIMEOUT)
        sock.sendall(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\nonly some")
        sock.shutdown(socket.SHUT_WR)
        assert closed_by_peer(sock, TIMEOUT)
        sock.close()
        wsgi_log.wait_for("went away")
    assert len(raised) == 1 and type(raised[0]).__name__ == "ClientDisconnected"
    assert loud(wsgi_log) == []


# --- the environ ----------------------------------------------------------------------------


def test_environ() -> None:
    """The environ follows PEP 3333: client and server addresses, protocol, decoded PATH_INFO, raw QUERY_STRING, HTTP_ headers joined, underscored names and Proxy dropped."""
    keys = [
        "REQUEST_METHOD", "SCRIPT_NAME", "PATH_INFO", "QUERY_STRING", "REQUEST_URI",
        "SERVER_NAME", "SERVER_PORT", "SERVER_PROTOCOL", "REMOTE_ADDR", "REMOTE_PORT",
        "CONTENT_TYPE", "CONTENT_LENGTH", "HTTP_ACCEPT", "HTTP_COOKIE", "HTTP_X_FORWARDED_FOR",
        "HTTP_PROXY", "HTTP_HOST", "wsgi.version", "wsgi.url_scheme", "wsgi.multithread",
        "wsgi.multiprocess", "wsgi.run_once", "SERVER_SOFTWARE",
    ]  # fmt: skip
    with wsgi_server(echo_environ(keys)) as server:
        client = Client(server.server_address)
        client.send(
            b"POST /caf%C3%A9/a%2Fb?q=%20x&y HTTP/1.1\r\nHost: example.com:8080\r\n"
            b"Accept: text/html\r\nAccept: application/json\r\nCookie: a=1\r\nCookie: b=2\r\n"
            b"X_Forwarded_For: 6.6.6.6\r\nProxy: http://evil\r\n"
            b"Content-Type: text/plain\r\nContent-Length: 003\r\n\r\nabc"
        )
        answer = json.loads(client.response().body)
        host, port = client.sock.getsockname()
        client.close()
    assert answer == {
        "REQUEST_METHOD": "POST",
        "SCRIPT_NAME": "",
        "PATH_INFO": "/caf\u00c3\u00a9/a/b",
        "QUERY_STRING": "q=%20x&y",
        "REQUEST_URI": "/caf%C3%A9/a%2Fb?q=%20x&y",
        "SERVER_NAME": LOCALHOST,
        "SERVER_PORT": str(server.server_address[1]),
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": host,
        "REMOTE_PORT": str(port),
        "CONTENT_TYPE": "text/plain",
        "CONTENT_LENGTH": "3",
        "HTTP_ACCEPT": "text/html, application/json",
        "HTTP_COOKIE": "a=1; b=2",
        "HTTP_X_FORWARDED_FOR": None,
        "HTTP_PROXY": None,
        "HTTP_HOST": "example.com:8080",
        "wsgi.version": [1, 0],
        "wsgi.url_scheme": "http",
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
        "SERVER_SOFTWARE": f"servekit/{servekit.__version__}",
        "body": "abc",
    }


def test_remote_addr_is_the_client_behind_a_proxy_header() -> None:
    """Behind the PROXY protocol, REMOTE_ADDR and REMOTE_PORT are the real client's, from the header."""
    from servekit.features.proxy import ProxyProtocolMixIn
    from servekit.protocols.proxy_header import build_v1

    class ProxiedServer(ProxyProtocolMixIn, ThreadPoolTCPServer):
        pass

    app = echo_environ(["REMOTE_ADDR", "REMOTE_PORT"])
    with (
        ProxiedServer((LOCALHOST, 0), handler_for(app), proxy_protocol="v1") as server,
        serving(server),
    ):
        client = Client(server.server_address)
        client.send(build_v1("TCP4", ("203.0.113.7", 51000), ("192.0.2.1", 443)) + get() + get())
        for _ in range(2):
            answer = json.loads(client.response().body)
            assert answer == {"REMOTE_ADDR": "203.0.113.7", "REMOTE_PORT": "51000", "body": ""}
        client.close()


def test_absolute_form_target_sets_host() -> None:
    """An absolute-form target gives PATH_INFO and QUERY_STRING, and its authority replaces Host (RFC 9112 3.2.2)."""
    app = echo_environ(["PATH_INFO", "QUERY_STRING", "HTTP_HOST"])
    with wsgi_server(app) as server:
        client = Client(server.server_address)
        client.send(b"GET http://real.example:81/p?q=1 HTTP/1.1\r\nHost: other\r\n\r\n")
        answer = json.loads(client.response().body)
        client.close()
    assert answer == {
        "PATH_INFO": "/p",
        "QUERY_STRING": "q=1",
        "HTTP_HOST": "real.example:81",
        "body": "",
    }


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback here")
def test_ipv6() -> None:
    """Over IPv6 the environ carries the v6 addresses."""
    app = echo_environ(["REMOTE_ADDR", "SERVER_NAME"])
    with wsgi_server(app, address=(LOCALHOST_V6, 0)) as server:
        conn = http.client.HTTPConnection(LOCALHOST_V6, server.server_address[1], timeout=TIMEOUT)
        conn.request("GET", "/")
        answer = json.loads(conn.getresponse().read())
        conn.close()
    assert answer == {"REMOTE_ADDR": LOCALHOST_V6, "SERVER_NAME": LOCALHOST_V6, "body": ""}


@pytest.fixture
def sockdir() -> Iterator[str]:
    """A short directory for socket files (sun_path holds 107 bytes; tmp_path can be long)."""
    path = tempfile.mkdtemp(prefix="sk-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_unix_socket(sockdir: str) -> None:
    """Over a Unix socket, SERVER_NAME and SERVER_PORT come from Host, and keep-alive works."""
    app = echo_environ(["SERVER_NAME", "SERVER_PORT", "REMOTE_ADDR"])
    path = os.path.join(sockdir, "wsgi.sock")
    with wsgi_server(app, address=path, server_class=ThreadPoolUnixStreamServer) as server:
        client = Client(server.server_address)
        client.send(get(host="app.example:8443") + get(host="plain.example"))
        first = json.loads(client.response().body)
        second = json.loads(client.response().body)
        client.close()
    assert first == {
        "SERVER_NAME": "app.example",
        "SERVER_PORT": "8443",
        "REMOTE_ADDR": "",
        "body": "",
    }
    assert second["SERVER_NAME"] == "plain.example" and second["SERVER_PORT"] == "80"


def test_tls_sets_https(tls_certs: CertSet) -> None:
    """Behind TLSMixIn, wsgi.url_scheme is https."""
    from servekit.features.tls import TLSMixIn

    class TLSServer(TLSMixIn, ThreadPoolTCPServer):
        pass

    app = echo_environ(["wsgi.url_scheme"])
    with (
        TLSServer(
            (LOCALHOST, 0),
            handler_for(app),
            certfile=str(tls_certs.server.cert),
            keyfile=str(tls_certs.server.key),
        ) as server,
        serving(server),
    ):
        conn = http.client.HTTPSConnection(
            "localhost",
            server.server_address[1],
            timeout=TIMEOUT,
            context=tls_certs.client_context(),
        )
        for _ in range(2):
            conn.request("GET", "/")
            assert json.loads(conn.getresponse().read())["wsgi.url_scheme"] == "https"
        conn.close()


def test_handler_for_checks_its_settings() -> None:
    """handler_for() sets knobs on the class it returns and refuses unknown names and non-callables."""
    handler = handler_for(hello_app, max_body_size=5, timeout=None)
    assert issubclass(handler, WSGIRequestHandler)
    assert (handler.max_body_size, handler.timeout) == (5, None)
    assert handler.application is hello_app  # type: ignore[comparison-overlap]
    with pytest.raises(TypeError, match="no setting 'max_bodysize'"):
        handler_for(hello_app, max_bodysize=5)
    with pytest.raises(TypeError, match="must be callable"):
        handler_for("module:app")  # type: ignore[arg-type]


# --- a real application from the registry: Flask --------------------------------------------


def make_flask_app() -> Any:
    flask = pytest.importorskip("flask")
    app = flask.Flask("servekit_wsgi_test")

    @app.get("/hello/<name>")
    def hello(name: str) -> str:
        return f"Hello, {name}!"

    @app.post("/json")
    def echo_json() -> Any:
        return flask.jsonify(received=flask.request.get_json(), remote=flask.request.remote_addr)

    @app.post("/form")
    def form() -> Any:
        upload = flask.request.files.get("file")
        return flask.jsonify(
            fields=dict(flask.request.form),
            file=upload.read().decode() if upload else None,
            filename=upload.filename if upload else None,
        )

    @app.get("/stream")
    def stream() -> Any:
        return flask.Response((f"line {i}\n" for i in range(3)), mimetype="text/plain")

    @app.get("/url")
    def url() -> str:
        return flask.request.url

    return app


def test_flask_application_end_to_end() -> None:
    """A Flask application serves routes, JSON, urlencoded and multipart forms, streaming, 404 and 405, all on one keep-alive connection."""
    with wsgi_server(make_flask_app()) as server:
        host, port = server.server_address
        conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)

        def call(
            method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
        ) -> tuple[int, str | None, bytes]:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.getheader("Content-Type"), response.read()

        assert call("GET", "/hello/world") == (200, "text/html; charset=utf-8", b"Hello, world!")
        status, kind, body = call(
            "POST", "/json", json.dumps({"a": [1, 2]}), {"Content-Type": "application/json"}
        )
        assert (status, kind) == (200, "application/json")
        assert json.loads(body) == {"received": {"a": [1, 2]}, "remote": LOCALHOST}
        status, _, body = call(
            "POST",
            "/form",
            "name=Ada+Lovelace&lang=en",
            {"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert json.loads(body) == {
            "fields": {"name": "Ada Lovelace", "lang": "en"},
            "file": None,
            "filename": None,
        }
        boundary = "servekitboundary"
        multipart = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="title"\r\n\r\nnotes\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.txt"\r\n'
            f"Content-Type: text/plain\r\n\r\nfile contents\r\n--{boundary}--\r\n"
        ).encode()
        status, _, body = call(
            "POST",
            "/form",
            iter([multipart[:50], multipart[50:]]),
            {"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        assert json.loads(body) == {
            "fields": {"title": "notes"},
            "file": "file contents",
            "filename": "a.txt",
        }
        assert call("GET", "/stream") == (
            200,
            "text/plain; charset=utf-8",
            b"line 0\nline 1\nline 2\n",
        )
        assert (
            call("GET", "/url?x=1", headers={"Host": "site.example"})[2]
            == b"http://site.example/url?x=1"
        )
        assert call("GET", "/missing")[0] == 404
        assert call("DELETE", "/json")[0] == 405
        conn.close()


def test_flask_over_a_unix_socket(sockdir: str) -> None:
    """The same Flask application over a Unix socket builds its URLs from Host."""
    path = os.path.join(sockdir, "flask.sock")
    with wsgi_server(
        make_flask_app(), address=path, server_class=ThreadPoolUnixStreamServer
    ) as server:
        client = Client(server.server_address)
        client.send(get("/url", host="unix.example"))
        assert client.response().body == b"http://unix.example/url"
        client.close()
