"""The connection pipeline: preamble in the loop, handlers on threads, keep-alive parking, one shutdown order."""

from __future__ import annotations

import http.server
import io
import logging
import select
import socket
import ssl
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import servekit
from servekit.apps.echo import EchoHandler
from servekit.features.connection import current_connection
from servekit.features.limits import LimitsMixIn
from servekit.features.messages import MessageHandler, message_loop_of
from servekit.features.pipeline import ConnectionPipeline
from servekit.features.pool import ThreadPoolMixIn, ThreadPoolTCPServer, ThreadPoolUnixStreamServer
from servekit.features.proxy import ProxyProtocolMixIn
from servekit.features.tls import TLSMixIn
from servekit.protocols.proxy_header import build_v2
from servekit.testing import (
    LOCALHOST,
    closed_by_peer,
    connect,
    exchange_line,
    read_until,
    serving,
    wait_until,
)
from tests.tls_certs import CertSet

TIMEOUT = 10.0


class LimitsPool(LimitsMixIn, ThreadPoolMixIn, servekit.TCPServer):
    pass


class Counting(MessageHandler):
    """Echo lines; count setup() and finish() calls per connection."""

    setups = 0
    finishes = 0
    lock = threading.Lock()

    def setup(self) -> None:
        super().setup()
        with Counting.lock:
            Counting.setups += 1
        self.seen = 0

    def handle_one_request(self) -> None:
        line = self.rfile.readline()
        if not line:
            self.close_connection = True
            return
        self.seen += 1  # state kept on the handler between messages
        self.wfile.write(b"%d %s" % (self.seen, line))

    def finish(self) -> None:
        with Counting.lock:
            Counting.finishes += 1
        super().finish()


class HttpOk(http.server.BaseHTTPRequestHandler):
    """Answers every GET with 200 and the body ok (keep-alive)."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def idle_closed(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Set once the shutdown sequence has closed the idle connections (close_idle())."""
    done = threading.Event()
    close_idle = ConnectionPipeline.close_idle

    def closes_idle(pipeline: ConnectionPipeline) -> int:
        try:
            return close_idle(pipeline)
        finally:
            done.set()

    monkeypatch.setattr(ConnectionPipeline, "close_idle", closes_idle)
    return done


@pytest.fixture
def counting() -> Iterator[type[Counting]]:
    Counting.setups = Counting.finishes = 0
    yield Counting


# -- parking ----------------------------------------------------------------------------


def test_idle_keepalive_connections_hold_no_thread(counting: type[Counting]) -> None:
    """With 2 threads, 60 clients that each send a line, stay open idle and send another are all answered in both rounds: idle connections wait parked, without a thread."""
    with ThreadPoolTCPServer((LOCALHOST, 0), counting, max_threads=2) as server, serving(server):
        clients = [connect(server.server_address, TIMEOUT) for _ in range(60)]
        try:
            for i, sock in enumerate(clients):
                assert exchange_line(sock, b"a%d\n" % i) == b"1 a%d\n" % i
            assert wait_until(lambda: server.parked_connections == 60)
            assert wait_until(lambda: server.pool.busy == 0)
            for i, sock in enumerate(clients):
                assert exchange_line(sock, b"b%d\n" % i) == b"2 b%d\n" % i
        finally:
            for sock in clients:
                sock.close()
        assert wait_until(lambda: counting.finishes == 60)
    assert counting.setups == 60, "one handler object per connection, kept between messages"


def test_unmodified_http_handler_is_parked_between_requests(tmp_path: Path) -> None:
    """An unmodified SimpleHTTPRequestHandler (HTTP/1.1, directory= through functools.partial) on 2 threads serves 30 keep-alive clients twice each; between requests they are parked."""
    import functools

    (tmp_path / "f.txt").write_bytes(b"x" * 1024)

    class Handler(http.server.SimpleHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

    assert message_loop_of(Handler) is True
    factory = functools.partial(Handler, directory=str(tmp_path))
    with ThreadPoolTCPServer((LOCALHOST, 0), factory, max_threads=2) as server, serving(server):
        clients = [connect(server.server_address, TIMEOUT) for _ in range(30)]
        try:
            for _round in range(2):
                for sock in clients:
                    sock.sendall(b"GET /f.txt HTTP/1.1\r\nHost: t\r\n\r\n")
                for sock in clients:
                    reader = sock.makefile("rb")
                    assert reader.readline().startswith(b"HTTP/1.1 200")
                    length = 0
                    for line in iter(reader.readline, b"\r\n"):
                        if line.lower().startswith(b"content-length:"):
                            length = int(line.split(b":")[1])
                    assert reader.read(length) == b"x" * 1024
                    reader.detach()
                assert wait_until(lambda: server.parked_connections == 30)
        finally:
            for sock in clients:
                sock.close()


def test_pipelined_messages_in_the_read_buffer_are_served_not_parked(
    counting: type[Counting],
) -> None:
    """Three lines sent in one write land in the handler's rfile buffer after the first read; the connection is not parked while they wait there, so all three are answered."""
    with ThreadPoolTCPServer((LOCALHOST, 0), counting, max_threads=1) as server, serving(server):
        with connect(server.server_address, TIMEOUT) as sock, sock.makefile("rb") as reader:
            sock.sendall(b"x\ny\nz\n")
            assert [reader.readline() for _ in range(3)] == [b"1 x\n", b"2 y\n", b"3 z\n"]


def test_a_handler_that_loops_in_handle_keeps_its_thread() -> None:
    """A stdlib-style handler that loops in handle() runs exactly as before: whole, on one thread."""

    class Loop(servekit.StreamRequestHandler):
        def handle(self) -> None:
            for line in self.rfile:
                self.wfile.write(line)

    assert message_loop_of(Loop) is None
    with ThreadPoolTCPServer((LOCALHOST, 0), Loop, max_threads=2) as server, serving(server):
        with connect(server.server_address, TIMEOUT) as sock:
            assert exchange_line(sock, b"one\n") == b"one\n"
            assert server.pool.busy == 1
            assert server.parked_connections == 0
            assert exchange_line(sock, b"two\n") == b"two\n"


def test_parked_connection_is_closed_at_idle_timeout(counting: type[Counting]) -> None:
    """A parked connection silent for idle_timeout is closed, and its handler's finish() runs once."""
    with LimitsPool((LOCALHOST, 0), counting, idle_timeout=0.3) as server, serving(server):
        with connect(server.server_address, TIMEOUT) as sock:
            assert exchange_line(sock, b"hi\n") == b"1 hi\n"
            started = time.monotonic()
            assert closed_by_peer(sock, TIMEOUT)
            waited = time.monotonic() - started
    assert 0.2 < waited < 0.3 + 1.5
    assert wait_until(lambda: counting.finishes == 1)


def test_a_message_that_arrived_is_not_closed_as_idle_while_threads_are_busy() -> None:
    """A parked connection whose next line has arrived waits for a thread, however long
    every thread stays busy: past its idle deadline it is served, not closed as idle."""
    release = threading.Event()
    blocking = threading.Event()

    class Blocks(MessageHandler):
        def handle_one_request(self) -> None:
            line = self.rfile.readline()
            if line == b"block\n":
                blocking.set()
                release.wait(TIMEOUT)
            self.wfile.write(line)
            self.close_connection = not line

    with LimitsPool((LOCALHOST, 0), Blocks, idle_timeout=0.3, max_threads=1) as server:
        with serving(server), connect(server.server_address, TIMEOUT) as waiting:
            assert exchange_line(waiting, b"first\n") == b"first\n"
            parked_at = time.monotonic()
            pipeline = server.pipeline
            assert pipeline is not None
            sweeps: list[float] = []
            sweep = pipeline.sweep

            def counted() -> None:
                sweep()
                sweeps.append(time.monotonic())

            pipeline.sweep = counted  # type: ignore[method-assign]
            with connect(server.server_address, TIMEOUT) as busy:
                busy.sendall(b"block\n")
                assert blocking.wait(TIMEOUT)  # the only thread is busy
                waiting.sendall(b"second\n")
                # Two sweeps past the idle deadline: the connection would be closed.
                assert wait_until(lambda: sum(t > parked_at + 0.3 for t in sweeps) >= 2, TIMEOUT)
                release.set()
                assert waiting.recv(100) == b"second\n"
                assert busy.recv(100) == b"block\n"


def test_a_pipelined_partial_head_waits_in_the_loop(caplog: pytest.LogCaptureFixture) -> None:
    """A client that sends a request and the start of the next in one packet, then
    stalls: the part read with the first request is in the handler's rfile, where no
    peek sees it. Its wait is in the loop all the same: on one thread, another client is
    answered at once, the staller is closed at request_timeout with one line, and a
    client that completes its pipelined head later is answered."""
    from tests.integration.apps import Upload

    request = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"
    with (
        caplog.at_level(logging.INFO, logger="servekit"),
        LimitsPool((LOCALHOST, 0), Upload, max_threads=1, request_timeout=2.0) as server,
        serving(server),
        connect(server.server_address, TIMEOUT) as staller,
        connect(server.server_address, TIMEOUT) as finisher,
    ):
        staller.sendall(request + b"GET / HTTP/1.1\r\nHo")
        assert read_until(staller, b"hello").endswith(b"\r\n\r\nhello")
        started = time.monotonic()
        with connect(server.server_address, TIMEOUT) as other:
            other.sendall(request)
            assert read_until(other, b"hello").endswith(b"\r\n\r\nhello")
        assert time.monotonic() - started < 1.0  # not behind the staller's thread (2 s)
        finisher.sendall(request + b"GET / HTTP/1.1\r\n")
        assert read_until(finisher, b"hello").endswith(b"\r\n\r\nhello")
        finisher.sendall(b"Host: t\r\n\r\n")  # the rest of the pipelined head
        assert read_until(finisher, b"hello").endswith(b"\r\n\r\nhello")
        assert closed_by_peer(staller, TIMEOUT)
    assert any("request_timeout" in r.getMessage() for r in caplog.records)


def test_an_error_in_a_later_message_is_reported_and_closes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A handler that raises in its second message goes through handle_error once; the connection closes and finish() runs once."""
    errors: list[object] = []
    finished: list[int] = []

    class Fails(MessageHandler):
        def handle_one_request(self) -> None:
            line = self.rfile.readline()
            if line == b"boom\n":
                raise RuntimeError("boom")
            self.wfile.write(line)
            self.close_connection = not line

        def finish(self) -> None:
            finished.append(1)
            super().finish()

    class Recording(ThreadPoolTCPServer):
        def handle_error(self, request: object, client_address: object) -> None:
            errors.append(client_address)

    with Recording((LOCALHOST, 0), Fails, max_threads=1) as server, serving(server):
        with connect(server.server_address, TIMEOUT) as sock:
            assert exchange_line(sock, b"ok\n") == b"ok\n"
            sock.sendall(b"boom\n")
            assert closed_by_peer(sock, TIMEOUT)
        assert wait_until(lambda: finished == [1])
    assert len(errors) == 1


def test_a_client_that_resets_is_not_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    """Clients that reset mid-conversation cause no handle_error and nothing on stderr; the server keeps serving."""
    errors: list[object] = []

    class Slow(MessageHandler):
        def handle_one_request(self) -> None:
            line = self.rfile.readline()
            if not line:
                self.close_connection = True
                return
            for _ in range(200):  # a long answer the client will not read
                self.wfile.write(b"y" * 4096)

    class Recording(ThreadPoolTCPServer):
        def handle_error(self, request: object, client_address: object) -> None:
            errors.append(client_address)

    with Recording((LOCALHOST, 0), Slow, max_threads=2) as server, serving(server):
        for _ in range(20):
            sock = connect(server.server_address, TIMEOUT)
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            sock.sendall(b"go\n")
            sock.close()  # SO_LINGER 0: RST
        assert wait_until(lambda: server.pool.busy == 0)
        with connect(server.server_address, TIMEOUT) as sock:
            sock.sendall(b"go\n")
            assert sock.recv(10)
    assert errors == []
    assert capsys.readouterr().err == ""


def test_a_parked_client_that_resets_costs_no_shutdown_call() -> None:
    """A parked connection the client resets is closed without shutdown(), which the
    kernel would refuse (ENOTCONN); a client that closes normally still gets it."""
    outcomes: list[object] = []

    class Recording(ThreadPoolTCPServer):
        def shutdown_request(self, request: Any) -> None:
            # As a user's override might: no try around shutdown().
            try:
                request.shutdown(socket.SHUT_WR)
                outcomes.append("shut down")
            except OSError as exc:
                outcomes.append(exc.errno)
            self.close_request(request)

    with Recording((LOCALHOST, 0), EchoHandler, max_threads=2) as server, serving(server):
        sock = connect(server.server_address, TIMEOUT)
        assert exchange_line(sock, b"a\n") == b"a\n"
        assert wait_until(lambda: server.parked_connections == 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()  # SO_LINGER 0: RST
        assert wait_until(lambda: len(outcomes) == 1)
        with connect(server.server_address, TIMEOUT) as sock:
            assert exchange_line(sock, b"b\n") == b"b\n"
            sock.shutdown(socket.SHUT_WR)
            assert closed_by_peer(sock, TIMEOUT)
        assert wait_until(lambda: len(outcomes) == 2)
    assert outcomes == ["shut down", "shut down"]


def test_current_connection_describes_the_connection() -> None:
    """A handler reads its connection record: the peer, the message count, the state."""
    seen: list[tuple[object, int, str]] = []

    class Describe(MessageHandler):
        def handle_one_request(self) -> None:
            line = self.rfile.readline()
            record = current_connection()
            assert record is not None
            seen.append((record.peer, record.messages, record.state.value))
            self.close_connection = not line
            self.wfile.write(line)

    with ThreadPoolTCPServer((LOCALHOST, 0), Describe, max_threads=1) as server, serving(server):
        with connect(server.server_address, TIMEOUT) as sock:
            assert exchange_line(sock, b"a\n") == b"a\n"
            assert exchange_line(sock, b"b\n") == b"b\n"
            peer = sock.getsockname()
    assert seen == [(peer, 1, "handling"), (peer, 2, "handling")]


def test_unix_socket_echo_parks_too(tmp_path: Path) -> None:
    """The built-in echo handler works on a Unix socket (no TCP options there) and parks between lines."""
    path = str(tmp_path / "echo.sock")
    with ThreadPoolUnixStreamServer(path, EchoHandler, max_threads=1) as server, serving(server):
        with connect(path, TIMEOUT) as sock:
            assert exchange_line(sock, b"unix\n") == b"unix\n"
            assert wait_until(lambda: server.parked_connections == 1)
            assert exchange_line(sock, b"again\n") == b"again\n"


# -- the preamble in the loop ---------------------------------------------------------------


class ProxiedTLS(LimitsMixIn, ProxyProtocolMixIn, TLSMixIn, ThreadPoolMixIn, servekit.TCPServer):
    pass


def tls_client(certs: CertSet, address: tuple[str, int], header: bytes = b"") -> ssl.SSLSocket:
    raw = socket.create_connection(address, TIMEOUT)
    if header:
        raw.sendall(header)
    return certs.client_context().wrap_socket(raw, server_hostname="localhost")


def test_four_features_compose_over_real_sockets(tls_certs: CertSet) -> None:
    """Limits, PROXY, TLS and the pool compose: the real client address arrives through a v2 header, the TLS connection is parked between lines, and the line wait applies after the handshake."""
    addresses: list[object] = []

    class Echo(EchoHandler):
        def setup(self) -> None:
            super().setup()
            addresses.append(self.client_address)

    with (
        ProxiedTLS(
            (LOCALHOST, 0),
            Echo,
            certfile=str(tls_certs.server.cert),
            keyfile=str(tls_certs.server.key),
            max_threads=2,
            wait_for_request="line",
        ) as server,
        serving(server),
    ):
        header = build_v2("PROXY", "TCP4", ("198.51.100.7", 4242), ("203.0.113.1", 443))
        clients = [tls_client(tls_certs, server.server_address, header) for _ in range(5)]
        try:
            for sock in clients:
                assert exchange_line(sock, b"tls\n") == b"tls\n"
            assert wait_until(lambda: server.parked_connections == 5)
            for sock in clients:
                assert exchange_line(sock, b"again\n") == b"again\n"
        finally:
            for sock in clients:
                sock.close()
    assert addresses == [("198.51.100.7", 4242)] * 5


def test_clients_stalled_mid_client_hello_hold_no_thread(tls_certs: CertSet) -> None:
    """40 clients that send half a TLS record header and stall, on a pool of 2, do not delay a real TLS client, and are cut at the handshake timeout."""

    class TLSPool(TLSMixIn, ThreadPoolMixIn, servekit.TCPServer):
        pass

    with (
        TLSPool(
            (LOCALHOST, 0),
            EchoHandler,
            certfile=str(tls_certs.server.cert),
            keyfile=str(tls_certs.server.key),
            max_threads=2,
            handshake_timeout=2.0,
        ) as server,
        serving(server),
    ):
        stalled = [connect(server.server_address, TIMEOUT) for _ in range(40)]
        try:
            for sock in stalled:
                sock.sendall(b"\x16\x03")
            started = time.monotonic()
            with tls_client(tls_certs, server.server_address) as good:
                assert exchange_line(good, b"real\n") == b"real\n"
            assert time.monotonic() - started < 1.0
            assert all(closed_by_peer(sock, TIMEOUT) for sock in stalled)
        finally:
            for sock in stalled:
                sock.close()


def test_a_handshake_step_that_ends_as_the_server_stops_is_closed(
    tls_certs: CertSet, monkeypatch: pytest.MonkeyPatch, idle_closed: threading.Event
) -> None:
    """A TLS handshake step runs on a pool thread. One still running when the shutdown
    sequence closes the idle connections, and that then has to wait for the client, is
    closed by its thread, not armed in a loop that no longer runs (where nothing would
    ever close it)."""
    from servekit.features.tls import TLSHandshake

    class TLSPool(TLSMixIn, ThreadPoolMixIn, servekit.TCPServer):
        pass

    in_step = threading.Event()
    release = threading.Event()
    step = TLSHandshake.step

    def held_step(stage: TLSHandshake, connection: Any) -> Any:
        if not in_step.is_set():
            in_step.set()
            release.wait(TIMEOUT)
        return step(stage, connection)

    monkeypatch.setattr(TLSHandshake, "step", held_step)
    server = TLSPool(
        (LOCALHOST, 0),
        EchoHandler,
        certfile=str(tls_certs.server.cert),
        keyfile=str(tls_certs.server.key),
        max_threads=2,
    )
    # A client that sends its ClientHello and then nothing: the server's step, run after
    # close_idle(), always has to wait for the client's next flight (a real client can
    # answer so fast that the step completes the handshake instead).
    client_side = tls_certs.client_context().wrap_bio(
        ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname="localhost"
    )
    with pytest.raises(ssl.SSLWantReadError):
        client_side.do_handshake()
    with serving(server), connect(server.server_address, TIMEOUT) as client:
        client.sendall(outgoing.read())
        assert in_step.wait(TIMEOUT)
        pipeline = server.pipeline
        assert pipeline is not None
        server.shutdown()
        closer = threading.Thread(target=server.server_close)
        closer.start()
        assert idle_closed.wait(TIMEOUT)
        release.set()  # the step goes on, and has to wait for the client
        closer.join(TIMEOUT)
        assert not closer.is_alive()
        assert wait_until(lambda: not pipeline.connections)
        # The server's flight, then the close (left open, this times out).
        received = read_until(client, b"\0")
        assert received  # the server hello and the rest of its flight


# -- the order of mix-ins ---------------------------------------------------------------------


def test_mixins_in_the_wrong_order_are_refused_when_the_class_is_defined() -> None:
    """A class that puts TLSMixIn before ProxyProtocolMixIn is a TypeError naming the order that works."""
    with pytest.raises(TypeError, match="ProxyProtocolMixIn, TLSMixIn, ThreadPoolMixIn"):

        class Wrong(TLSMixIn, ProxyProtocolMixIn, ThreadPoolMixIn, servekit.TCPServer):
            pass


def test_a_mixin_after_the_server_class_is_refused() -> None:
    """A mix-in listed after the server class (whose hooks would never run) is a TypeError."""
    with pytest.raises(TypeError, match="put every mix-in before the server class"):

        class Late(servekit.TCPServer, ThreadPoolMixIn):
            pass


def test_two_concurrency_mixins_are_refused() -> None:
    """ThreadPoolMixIn with ThreadingMixIn is a TypeError: one concurrency model per server."""
    with pytest.raises(TypeError, match="both concurrency mix-ins"):

        class Both(ThreadPoolMixIn, servekit.ThreadingMixIn, servekit.TCPServer):
            pass


# -- shutdown -------------------------------------------------------------------------------


def test_server_close_closes_parked_connections_at_once(counting: type[Counting]) -> None:
    """server_close() with 20 parked keep-alive clients returns at once and closes them all."""
    server = ThreadPoolTCPServer((LOCALHOST, 0), counting, max_threads=2)
    with serving(server):
        clients = [connect(server.server_address, TIMEOUT) for _ in range(20)]
        for sock in clients:
            assert exchange_line(sock, b"x\n") == b"1 x\n"
        assert wait_until(lambda: server.parked_connections == 20)
        server.shutdown()
        started = time.monotonic()
    assert time.monotonic() - started < 1.0
    assert all(closed_by_peer(sock, TIMEOUT) for sock in clients)
    assert counting.finishes == 20
    for sock in clients:
        sock.close()


def test_shutdown_serves_connections_the_kernel_had_queued() -> None:
    """Connections queued in the backlog when the loop stops are accepted and served by server_close(), not reset."""
    server = ThreadPoolTCPServer((LOCALHOST, 0), EchoHandler, max_threads=4)
    with serving(server):
        server.shutdown()  # the loop stops; the listener still queues connections
        queued = [connect(server.server_address, TIMEOUT) for _ in range(10)]
        for i, sock in enumerate(queued):
            sock.sendall(b"q%d\n" % i)
    # serving() closed the server: each queued connection got its answer, then EOF.
    for i, sock in enumerate(queued):
        with sock, sock.makefile("rb") as reader:
            assert reader.readline() == b"q%d\n" % i
            assert reader.readline() == b""


def test_a_message_taken_by_a_thread_as_the_server_stops_is_answered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Closing idle connections works from a list made when it starts: a connection
    parked then, whose next message a pool thread takes before its turn comes, is the
    thread's. Its message is answered and the connection closed after it, not closed
    under its running handler."""
    import servekit.features.pipeline as pipeline_module

    release = threading.Event()

    class Blocks(MessageHandler):
        def handle_one_request(self) -> None:
            line = self.rfile.readline()
            if not line:
                self.close_connection = True
                return
            if line == b"block\n":
                release.wait(TIMEOUT)
            self.wfile.write(line)

    server = ThreadPoolTCPServer((LOCALHOST, 0), Blocks, max_threads=4)
    first = connect(server.server_address, TIMEOUT)
    second = connect(server.server_address, TIMEOUT)
    peek_ready = pipeline_module.peek_ready
    taken: list[bool] = []

    def second_message_arrives(connection: Any, **kwargs: Any) -> str:
        # close_idle() looks at the first connection: meanwhile the second's next
        # message arrives and a pool thread takes it.
        if not taken:
            second.sendall(b"block\n")
            pipeline = server.pipeline
            assert pipeline is not None
            taken.append(
                wait_until(
                    lambda: any(
                        c.state.value == "handling" for c in list(pipeline.connections.values())
                    )
                )
            )
        return peek_ready(connection, **kwargs)

    with first, second:
        with serving(server):
            assert exchange_line(first, b"a\n") == b"a\n"
            assert exchange_line(second, b"b\n") == b"b\n"
            assert wait_until(lambda: server.parked_connections == 2)
            monkeypatch.setattr(pipeline_module, "peek_ready", second_message_arrives)
            server.shutdown()
            closer = threading.Thread(target=server.server_close)
            closer.start()
            assert wait_until(lambda: taken == [True])
            assert closed_by_peer(first, TIMEOUT)  # idle: closed
            release.set()
            closer.join(TIMEOUT)
            assert not closer.is_alive()
        with second.makefile("rb") as reader:
            assert reader.readline() == b"block\n"
            assert reader.readline() == b""


def test_a_request_wait_run_by_a_thread_as_the_server_stops_is_the_threads(
    monkeypatch: pytest.MonkeyPatch, idle_closed: threading.Event
) -> None:
    """The whole-head wait before a keep-alive HTTP request runs on the pool thread that
    took the connection. Until it hands the connection to the loop, the connection is
    that thread's: the shutdown sequence, closing idle connections meanwhile, must not
    take it and serve the request a second time."""
    import servekit.features.pipeline as pipeline_module
    from servekit.features.limits import WaitForRequest

    in_step = threading.Event()
    release = threading.Event()
    steps: list[str] = []
    ready = WaitForRequest.ready

    def held_ready(stage: WaitForRequest, connection: Any, events: int) -> str:
        # The pool thread's step for the second client's request, held until the
        # shutdown sequence has closed the idle connections.
        first_step = not steps
        steps.append(threading.current_thread().name)
        if first_step:
            in_step.set()
            release.wait(TIMEOUT)
        return ready(stage, connection, events)

    errors: list[str] = []

    class Recording(LimitsPool):
        def handle_error(self, request: object, client_address: object) -> None:
            errors.append(traceback.format_exc())

    server = Recording((LOCALHOST, 0), HttpOk, max_threads=4)
    first = connect(server.server_address, TIMEOUT)
    second = connect(server.server_address, TIMEOUT)
    peek_ready = pipeline_module.peek_ready
    request = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"

    def second_request_arrives(connection: Any, **kwargs: Any) -> str:
        if not in_step.is_set():
            second.sendall(request)
            assert in_step.wait(TIMEOUT)
        return peek_ready(connection, **kwargs)

    with first, second:
        with serving(server):
            for sock in (first, second):
                sock.sendall(request)
                assert read_until(sock, b"\r\n\r\nok").endswith(b"ok")
            assert wait_until(lambda: server.parked_connections == 2)
            monkeypatch.setattr(WaitForRequest, "ready", held_ready)
            monkeypatch.setattr(pipeline_module, "peek_ready", second_request_arrives)
            server.shutdown()
            closer = threading.Thread(target=server.server_close)
            closer.start()
            assert idle_closed.wait(TIMEOUT)
            release.set()
            closer.join(TIMEOUT)
            assert not closer.is_alive()
        answer = read_until(second, b"\0")  # everything, until EOF
    assert answer.count(b"HTTP/1.1 200") == 1, answer
    assert errors == []
    assert len(steps) == 1, steps  # the one thread's step, not a second one


def test_a_silent_connection_in_the_backlog_does_not_hold_up_the_stop() -> None:
    """A client queued in the backlog when the loop stops that never sends its request is closed after the shutdown grace (0.25 s), not after request_timeout: Ctrl-C must not wait for it."""
    server = LimitsPool((LOCALHOST, 0), EchoHandler, max_threads=4, request_timeout=20)
    with serving(server):
        server.shutdown()
        silent = connect(server.server_address, TIMEOUT)  # in the backlog, says nothing
        talker = connect(server.server_address, TIMEOUT)
        talker.sendall(b"hello\n")
        started = time.monotonic()
        server.server_close()
        took = time.monotonic() - started
    with silent, talker, talker.makefile("rb") as reader:
        assert reader.readline() == b"hello\n"  # the one with a request was served
        assert closed_by_peer(silent, TIMEOUT)
    assert took < 2.0, took


def test_silent_connections_in_the_backlog_share_one_grace() -> None:
    """Forty silent clients in the backlog, on two threads: the shutdown grace is one
    for them all (0.25 s), not one each, which served two at a time added up to 5 s."""
    server = LimitsPool((LOCALHOST, 0), EchoHandler, max_threads=2, request_timeout=20)
    with serving(server):
        server.shutdown()
        silent = [connect(server.server_address, TIMEOUT) for _ in range(40)]
        talker = connect(server.server_address, TIMEOUT)
        talker.sendall(b"hello\n")
        started = time.monotonic()
        server.server_close()
        took = time.monotonic() - started
    with talker, talker.makefile("rb") as reader:
        assert reader.readline() == b"hello\n"
    for sock in silent:
        with sock:
            assert closed_by_peer(sock, TIMEOUT)
    assert took < 1.5, took


def test_a_client_that_reads_nothing_is_logged_as_such(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A handler whose send waits out the socket timeout because the client reads
    nothing: one INFO line that says so (not that the client was silent), no traceback."""

    class Floods(MessageHandler):
        def handle_one_request(self) -> None:
            self.rfile.readline()
            self.wfile.write(b"x" * (64 << 20))  # far more than the socket buffers

    with (
        caplog.at_level(logging.INFO, logger="servekit"),
        LimitsPool((LOCALHOST, 0), Floods, idle_timeout=0.3) as server,
        serving(server),
        connect(server.server_address, TIMEOUT) as sock,
    ):
        sock.sendall(b"go\n")  # and never reads
        assert wait_until(lambda: "took none of its response" in caplog.text, TIMEOUT)
    assert "socket timeout of 0.3s; closing" in caplog.text
    assert "silent for longer" not in caplog.text
    assert "Traceback" not in caplog.text


def test_drain_waits_once_for_hung_handlers(caplog: pytest.LogCaptureFixture) -> None:
    """A handler that hangs past drain_timeout delays server_close() by drain_timeout once, with a warning; daemon pool threads do not hold the process."""
    release = threading.Event()

    class Hang(MessageHandler):
        def handle_one_request(self) -> None:
            self.rfile.readline()
            self.wfile.write(b"started\n")
            release.wait(30)
            self.close_connection = True

    server = ThreadPoolTCPServer((LOCALHOST, 0), Hang, max_threads=2, drain_timeout=0.5)
    try:
        with caplog.at_level(logging.WARNING, logger="servekit.pool"), serving(server):
            with connect(server.server_address, TIMEOUT) as sock:
                assert exchange_line(sock, b"go\n") == b"started\n"
                server.shutdown()
                started = time.monotonic()
                server.server_close()
                took = time.monotonic() - started
                server.server_close()  # a second call does nothing more
                assert time.monotonic() - started - took < 0.1
    finally:
        release.set()
    assert 0.4 < took < 1.5
    assert "still running after drain_timeout=0.5s" in caplog.text


def test_threading_http_server_closes_at_once_with_an_idle_keepalive_client() -> None:
    """With servekit's core, ThreadingHTTPServer (daemon_threads) closes at once while a keep-alive client idles, as the stdlib does: daemon threads are not joined."""

    class Server(servekit.ThreadingTCPServer):
        daemon_threads = True

    server = Server((LOCALHOST, 0), HttpOk)
    with serving(server), connect(server.server_address, TIMEOUT) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        response = b""
        while not response.endswith(b"\r\n\r\nok"):  # bounded by the socket timeout
            response += sock.recv(4096)
        assert response.startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        server.shutdown()
        server.server_close()
        assert time.monotonic() - started < 1.0


def test_message_loop_of_recognises_only_unmodified_loops() -> None:
    """A handler is run message by message only if its handle() is MessageHandler's or BaseHTTPRequestHandler's own."""

    class Wrapped(http.server.BaseHTTPRequestHandler):
        def handle(self) -> None:
            super().handle()

    assert message_loop_of(MessageHandler) is False
    assert message_loop_of(http.server.SimpleHTTPRequestHandler) is True
    assert message_loop_of(Wrapped) is None
    assert message_loop_of(servekit.StreamRequestHandler) is None
    assert message_loop_of(io.BytesIO) is None


def test_read_timeout_on_a_threading_server_is_one_line(caplog: pytest.LogCaptureFixture) -> None:
    """Without the pipeline (ThreadingMixIn), a handler's read that hits idle_timeout is one info line, not a handle_error() traceback."""
    errors: list[object] = []

    class Server(LimitsMixIn, servekit.ThreadingMixIn, servekit.TCPServer):
        def handle_error(self, request: object, client_address: object) -> None:
            errors.append(client_address)

    with caplog.at_level(logging.INFO, logger="servekit"):
        with Server((LOCALHOST, 0), EchoHandler, idle_timeout=0.3) as server, serving(server):
            with connect(server.server_address, TIMEOUT) as sock:
                assert exchange_line(sock, b"one\n") == b"one\n"
                assert closed_by_peer(sock, TIMEOUT)
    assert errors == []
    assert "silent for longer than the read timeout of 0.3s" in caplog.text


def test_idle_timeout_applies_to_parked_connections_without_a_request_wait(
    counting: type[Counting],
) -> None:
    """With wait_for_request='none', idle_timeout still closes a connection parked between messages."""
    with (
        LimitsPool((LOCALHOST, 0), counting, idle_timeout=0.3, wait_for_request="none") as server,
        serving(server),
    ):
        with connect(server.server_address, TIMEOUT) as sock:
            assert exchange_line(sock, b"hi\n") == b"1 hi\n"
            assert closed_by_peer(sock, TIMEOUT)


def test_system_exit_in_a_message_closes_the_connection() -> None:
    """A SystemExit raised by handle_one_request() closes the connection (the client is not left hanging) and the pool keeps serving."""

    class Exits(MessageHandler):
        def handle_one_request(self) -> None:
            line = self.rfile.readline()
            if line == b"exit\n":
                raise SystemExit(3)
            self.close_connection = not line
            self.wfile.write(line)

    with ThreadPoolTCPServer((LOCALHOST, 0), Exits, max_threads=1) as server, serving(server):
        with connect(server.server_address, TIMEOUT) as sock:
            assert exchange_line(sock, b"a\n") == b"a\n"
            sock.sendall(b"exit\n")
            assert closed_by_peer(sock, TIMEOUT)
        with connect(server.server_address, TIMEOUT) as sock:
            assert exchange_line(sock, b"b\n") == b"b\n"


def test_a_look_between_messages_leaves_the_wake_up_to_the_waiting_thread() -> None:
    """take_ready(0) (a thread between messages) does not consume wake(): the thread
    waiting in take_ready() must still see it, or it keeps waiting while work queues."""

    class NoLoop:
        def unwatch(self, what: object) -> None:
            pass

    pipeline = ConnectionPipeline(NoLoop(), (), lambda *args: None, idle_timeout=None)
    try:
        pipeline.wake()
        assert pipeline.take_ready(0) is None
        assert select.select([pipeline.parking], [], [], 0)[0]  # still there
        assert pipeline.take_ready(5) is None  # the waiting thread takes it
        assert not select.select([pipeline.parking], [], [], 0)[0]
    finally:
        pipeline.close()


def test_keep_alive_connections_are_served_by_threads_without_the_loop() -> None:
    """Messages on a parked connection go from epoll to a pool thread: the loop's own epoll
    set reports nothing after the first message, over 200 round trips on 10 connections."""
    with ThreadPoolTCPServer((LOCALHOST, 0), EchoHandler, max_threads=4) as server, serving(server):
        clients = [connect(server.server_address, TIMEOUT) for _ in range(10)]
        try:
            for sock in clients:
                assert exchange_line(sock, b"first\n") == b"first\n"
            pipeline = server.pipeline
            assert pipeline is not None
            calls = 0
            real = pipeline.epoll

            class Counting:
                def poll(self, *args: object) -> list[tuple[int, int]]:
                    nonlocal calls
                    events = real.poll(*args)
                    calls += len(events)
                    return events

                def __getattr__(self, name: str) -> object:
                    return getattr(real, name)

            pipeline.epoll = Counting()  # type: ignore[assignment]
            for _ in range(20):
                for sock in clients:
                    assert exchange_line(sock, b"again\n") == b"again\n"
            assert calls == 0
        finally:
            for sock in clients:
                sock.close()


# -- epoll registrations -----------------------------------------------------------------


def _epoll_targets(epoll: object) -> set[int]:
    """The descriptors an epoll set watches, as Linux lists them in /proc."""
    with open(f"/proc/self/fdinfo/{epoll.fileno()}") as info:  # type: ignore[attr-defined]
        return {int(line.split()[1]) for line in info if line.startswith("tfd:")}


class _CountingEpoll:
    """An epoll set that counts unregister() calls and passes everything on."""

    def __init__(self, real: object) -> None:
        self.real = real
        self.unregisters = 0

    def unregister(self, fd: int) -> None:
        self.unregisters += 1
        self.real.unregister(fd)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self.real, name)


def test_a_request_there_at_accept_is_served_without_arming_the_loop() -> None:
    """The first stage is tried at accept: a connection whose line came with it is never
    registered in the loop's epoll set; one whose line comes later waits there armed."""
    masks: list[int] = []

    class Recording(MessageHandler):
        def handle_one_request(self) -> None:
            connection = current_connection()
            assert connection is not None
            masks.append(connection.loop_mask)
            self.wfile.write(self.rfile.readline())
            self.close_connection = True

    with LimitsPool((LOCALHOST, 0), Recording, max_threads=2) as server:
        # Accepted by the kernel and its line queued before the loop runs: both are there
        # when the loop calls accept().
        early = connect(server.server_address, TIMEOUT)
        early.sendall(b"early\n")
        with early, serving(server):
            assert read_until(early, b"\n") == b"early\n"
            with connect(server.server_address, TIMEOUT) as late:
                assert wait_until(lambda: server.waiting_connections == 1, TIMEOUT)
                assert exchange_line(late, b"late\n") == b"late\n"
    assert masks[0] == 0  # never registered
    assert masks[1] & select.EPOLLIN == 0 and masks[1] != 0  # registered, its event spent


def test_the_usual_close_needs_no_epoll_call_and_leaves_nothing_registered() -> None:
    """A connection that sends a line and closes is closed without epoll_ctl(DEL): its
    one-shot registrations were spent, and closing the socket removes them."""
    with LimitsPool((LOCALHOST, 0), EchoHandler, max_threads=2) as server, serving(server):
        with connect(server.server_address, TIMEOUT) as sock:
            assert exchange_line(sock, b"first\n") == b"first\n"
        pipeline = server.pipeline
        assert pipeline is not None
        assert wait_until(lambda: not pipeline.connections, TIMEOUT)
        loop_set, parking = _CountingEpoll(pipeline.epoll), _CountingEpoll(pipeline.parking)
        pipeline.epoll, pipeline.parking = loop_set, parking  # type: ignore[assignment]
        for _ in range(20):
            with connect(server.server_address, TIMEOUT) as sock:
                assert exchange_line(sock, b"hi\n") == b"hi\n"
        assert wait_until(lambda: not pipeline.connections, TIMEOUT)
        # A connection leaves the table before its socket is closed, and the kernel drops
        # a registration when the socket's file goes: wait for that (bounded), then look.
        assert wait_until(
            lambda: not _epoll_targets(loop_set.real) and len(_epoll_targets(parking.real)) == 1,
            TIMEOUT,
        )  # the parking set's one: the wake-up eventfd
        assert loop_set.unregisters == parking.unregisters == 0


def test_a_parked_connection_closed_while_its_descriptor_is_copied_leaves_no_registration() -> None:
    """The idle sweep closes a parked connection, armed in the parking set, while a copy
    of its descriptor lives on (as in a child forked meanwhile): the registration is
    removed, not left armed to report the copy's bytes under a number the kernel may
    give to the next connection."""
    copies: list[socket.socket] = []
    fds: list[int] = []

    class Copying(MessageHandler):
        def handle_one_request(self) -> None:
            connection = current_connection()
            assert connection is not None
            fds.append(connection.fd)
            copies.append(self.request.dup())
            self.wfile.write(self.rfile.readline())

    try:
        with LimitsPool((LOCALHOST, 0), Copying, idle_timeout=0.3) as server, serving(server):
            with connect(server.server_address, TIMEOUT) as sock:
                assert exchange_line(sock, b"hi\n") == b"hi\n"
                pipeline = server.pipeline
                assert pipeline is not None
                assert wait_until(lambda: fds[0] in _epoll_targets(pipeline.parking), TIMEOUT)
                assert closed_by_peer(sock, TIMEOUT)  # closed by the sweep
                assert wait_until(lambda: not pipeline.connections, TIMEOUT)
                assert fds[0] not in _epoll_targets(pipeline.parking)
    finally:
        for copy in copies:
            copy.close()


# -- a last line without a newline -------------------------------------------------------


def _send_and_close(sock: socket.socket, data: bytes) -> bytes:
    """Send data, close the sending side, and read what comes back until EOF."""
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)
    return read_until(sock, b"\0")  # until EOF: nothing here ends with NUL


def test_a_last_line_without_newline_is_served_when_the_client_closes() -> None:
    """A client that sends part of a line and closes its side has sent its last line:
    the handler gets it at once (and then EOF), as with the stdlib, instead of the
    connection waiting in the loop for a newline until request_timeout. Both when the
    bytes and the close came before accept() and when they come after."""
    with LimitsPool((LOCALHOST, 0), EchoHandler, request_timeout=30) as server:
        early = connect(server.server_address, TIMEOUT)
        early.sendall(b"early")
        early.shutdown(socket.SHUT_WR)
        with early, serving(server):
            started = time.monotonic()
            assert read_until(early, b"\0") == b"early"
            with connect(server.server_address, TIMEOUT) as late:
                assert wait_until(lambda: server.waiting_connections == 1, TIMEOUT)
                late.sendall(b"la")
                pipeline = server.pipeline
                assert pipeline is not None
                # Waiting for the rest of the line, edge-triggered.
                assert wait_until(
                    lambda: any(c.waiting_armed for c in list(pipeline.connections.values())),
                    TIMEOUT,
                )
                assert _send_and_close(late, b"te") == b"late"
            assert time.monotonic() - started < 5  # not request_timeout (30 s)


class BlockingLimits(LimitsMixIn, servekit.ThreadingMixIn, servekit.TCPServer):
    """Stages run blocking on the handler's thread (no pipeline)."""

    daemon_threads = True


def test_blocking_stages_serve_a_last_line_and_do_not_spin_on_a_partial_one() -> None:
    """Without the pipeline, the request wait on the handler's thread also serves a last
    line without a newline at once, and waits for the rest of a partial line without
    looking again and again: registering an edge-triggered set reports the bytes
    already queued, and waiting right after registering returned at once, every time."""
    with BlockingLimits((LOCALHOST, 0), EchoHandler, request_timeout=30) as server:
        with serving(server):
            with connect(server.server_address, TIMEOUT) as sock:
                started = time.monotonic()
                assert _send_and_close(sock, b"last") == b"last"
                assert time.monotonic() - started < 5
            steps = 0
            stage_class = type(server.connection_stages()[-1])
            real_step = stage_class.step

            def counted(self: object, connection: object) -> object:
                nonlocal steps
                steps += 1
                return real_step(self, connection)  # type: ignore[arg-type]

            stage_class.step = counted  # type: ignore[method-assign]
            try:
                with connect(server.server_address, TIMEOUT) as sock:
                    sock.sendall(b"par")
                    assert wait_until(lambda: steps >= 1, TIMEOUT)
                    # A trickle of 5 more bytes: a step for each, not a loop meanwhile.
                    for byte in b"tial":
                        sock.sendall(bytes([byte]))
                        time.sleep(0.05)  # the trickle itself: bytes apart in time
                    assert exchange_line(sock, b"\n") == b"partial\n"
            finally:
                stage_class.step = real_step  # type: ignore[method-assign]
            assert steps <= 12, steps


# -- the per-message hooks -----------------------------------------------------------


class StartedPool(LimitsMixIn, ThreadPoolMixIn, servekit.TCPServer):
    """Overrides message_started(): it runs before each message, after the features'
    message hooks (LimitsMixIn's has set the request deadline by then)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.started: list[tuple[int, bool]] = []

    def message_started(self, connection: Any) -> None:
        super().message_started(connection)
        self.started.append((connection.messages, connection.request_deadline is not None))


def test_an_overridden_message_started_runs_before_each_message(
    counting: type[Counting],
) -> None:
    with (
        StartedPool((LOCALHOST, 0), counting, request_timeout=5.0) as server,
        serving(server),
        connect(server.server_address, TIMEOUT) as sock,
    ):
        for n in (1, 2, 3):
            assert exchange_line(sock, b"x\n") == b"%d x\n" % n
        assert server.started == [(1, True), (2, True), (3, True)]


def test_a_server_that_does_not_override_message_started_has_only_the_feature_hooks() -> None:
    """The hooks a message pays for are the features' own: LimitsMixIn's on a stream
    server, nothing for ServerFeature.message_started()."""
    with LimitsPool((LOCALHOST, 0), Counting) as server:
        assert len(server.per_message_hooks()) == 1
    with StartedPool((LOCALHOST, 0), Counting) as server:
        hooks = server.per_message_hooks()
        assert len(hooks) == 2 and hooks[-1] == server.message_started
