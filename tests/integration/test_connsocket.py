"""ConnectionSocket keeps socket.socket's behaviour (values, exceptions, timeouts) while
trying I/O before polling; checked over real socket pairs and a real pool server."""

from __future__ import annotations

import http.server
import socket
import threading
import time

import pytest

from servekit.core import StreamRequestHandler, TCPServer
from servekit.features.connsocket import ConnectionSocket
from servekit.features.listeners import ListenersMixIn
from servekit.features.pool import ThreadPoolMixIn
from servekit.testing import exchange_line, read_until, serving
from tests.integration.apps import Upload, check_upload_conversation

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def pair() -> tuple[ConnectionSocket, socket.socket]:
    a, b = socket.socketpair()
    ours = ConnectionSocket(a.family, a.type, a.proto, a.detach())
    yield ours, b
    ours.close()
    b.close()


def test_blocking_by_default_and_timeouts_are_kept(pair) -> None:
    ours, _ = pair
    assert ours.gettimeout() is None and ours.getblocking()
    ours.settimeout(2.5)
    assert ours.gettimeout() == 2.5 and ours.getblocking()
    ours.setblocking(False)
    assert ours.gettimeout() == 0.0 and not ours.getblocking()
    with pytest.raises(ValueError):
        ours.settimeout(-1)


def _recv_sent_later(ours: ConnectionSocket, peer: socket.socket) -> bytes:
    """What ours.recv() returns for a line peer sends 50 ms later."""
    timer = threading.Timer(0.05, peer.sendall, (b"late\n",))
    timer.start()
    try:
        return ours.recv(100)
    finally:
        timer.join()


def test_recv_waits_for_bytes_sent_later(pair) -> None:
    ours, peer = pair
    ours.settimeout(5)
    assert _recv_sent_later(ours, peer) == b"late\n"


def test_recv_times_out_with_timeout_error(pair) -> None:
    ours, _ = pair
    ours.settimeout(0.1)
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="timed out"):
        ours.recv(10)
    assert 0.09 <= time.monotonic() - started < 2


def test_non_blocking_raises_blocking_io_error(pair) -> None:
    ours, _ = pair
    ours.setblocking(False)
    with pytest.raises(BlockingIOError):
        ours.recv(10)
    buffer = bytearray(10)
    with pytest.raises(BlockingIOError):
        ours.recv_into(buffer)


def test_makefile_readline_and_timeout(pair) -> None:
    """What StreamRequestHandler does: rfile over the socket, with a timeout."""
    ours, peer = pair
    ours.settimeout(0.2)
    with ours.makefile("rb") as rfile:
        peer.sendall(b"one\ntwo")
        assert rfile.readline() == b"one\n"
        with pytest.raises(TimeoutError):
            rfile.readline()  # "two" has no newline and nothing more comes


def test_sendall_waits_for_a_slow_reader(pair) -> None:
    """A payload much larger than the socket buffers: sendall() must wait and finish."""
    ours, peer = pair
    ours.settimeout(10)
    payload = bytes(range(256)) * 20_000  # 5 MB
    received = bytearray()

    def read_slowly() -> None:
        while len(received) < len(payload):
            chunk = peer.recv(65536)
            if not chunk:
                return
            received.extend(chunk)

    reader = threading.Thread(target=read_slowly)
    reader.start()
    try:
        ours.sendall(memoryview(payload))
    finally:
        reader.join(10)
    assert bytes(received) == payload


def test_sendall_times_out_when_nobody_reads(pair) -> None:
    ours, _ = pair
    ours.settimeout(0.2)
    with pytest.raises(TimeoutError):
        ours.sendall(b"x" * 50_000_000)


def test_peer_close_reads_as_eof(pair) -> None:
    ours, peer = pair
    ours.settimeout(5)
    peer.close()
    assert ours.recv(10) == b""


class _Echo(StreamRequestHandler):
    kinds: list[type] = []

    def handle(self) -> None:
        self.kinds.append(type(self.request))
        self.request.settimeout(5)
        while line := self.rfile.readline():
            self.wfile.write(line)


class _PoolServer(ListenersMixIn, ThreadPoolMixIn, TCPServer):
    pass


def test_pool_servers_hand_handlers_a_connection_socket() -> None:
    """Through ListenersMixIn, a pool server's handler gets a ConnectionSocket (a
    socket.socket), and a line echo over a real TCP connection works."""
    _Echo.kinds.clear()
    with serving(_PoolServer("127.0.0.1:0", _Echo, max_threads=2)) as server:
        host, port = server.server_address[:2]
        with socket.create_connection((host, port), timeout=5) as client:
            assert exchange_line(client, b"hello\n") == b"hello\n"
            assert exchange_line(client, b"again\n") == b"again\n"
    assert _Echo.kinds and issubclass(_Echo.kinds[0], ConnectionSocket)
    assert issubclass(_Echo.kinds[0], socket.socket)


# -- holding a response head ---------------------------------------------------------------

HEAD = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n"


def _nothing_to_read(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        sock.recv(1)
    except BlockingIOError:
        return True
    finally:
        sock.setblocking(True)
    return False


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    sock.settimeout(5)
    data = b""
    for _ in range(n):  # at most n reads
        if len(data) >= n:
            break
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def test_a_held_head_leaves_with_the_body_in_one_send(pair) -> None:
    ours, peer = pair
    ours.hold_head()
    ours.sendall(HEAD)
    assert _nothing_to_read(peer)  # held
    ours.sendall(b"body")
    # One send(): the peer's single recv() gets head and body together.
    peer.settimeout(5)
    assert peer.recv(1000) == HEAD + b"body"


def test_only_a_head_is_held_and_only_the_first_write(pair) -> None:
    ours, peer = pair
    ours.hold_head()
    ours.sendall(b"not a head\n")  # not held: it is not a head alone
    assert _read_exactly(peer, 11) == b"not a head\n"
    ours.sendall(HEAD)  # a head, but not the first write since hold_head()
    assert _read_exactly(peer, len(HEAD)) == HEAD


def test_a_read_sends_the_held_head_first(pair) -> None:
    """'100 Continue' must reach the client before the server waits for the body."""
    ours, peer = pair
    ours.settimeout(5)
    ours.hold_head()
    ours.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
    answered = threading.Event()

    def client() -> None:
        if _read_exactly(peer, 25) == b"HTTP/1.1 100 Continue\r\n\r\n":
            answered.set()
            peer.sendall(b"the body")

    thread = threading.Thread(target=client)
    thread.start()
    try:
        assert ours.recv(100) == b"the body"
    finally:
        thread.join(5)
    assert answered.is_set()


@pytest.mark.parametrize("how", ["release_head", "close", "shutdown", "send"])
def test_a_held_head_is_never_lost(pair, how: str) -> None:
    ours, peer = pair
    ours.hold_head()
    ours.sendall(HEAD)
    if how == "release_head":
        ours.release_head()
    elif how == "close":
        ours.close()
    elif how == "shutdown":
        ours.shutdown(socket.SHUT_WR)
    else:
        ours.send(b"body")
    expected = HEAD + (b"body" if how == "send" else b"")
    assert _read_exactly(peer, len(expected)) == expected


def test_release_without_a_held_head_sends_nothing_and_disarms(pair) -> None:
    ours, peer = pair
    ours.hold_head()
    ours.release_head()
    assert _nothing_to_read(peer)
    ours.sendall(HEAD)  # no longer armed: sent at once
    assert _read_exactly(peer, len(HEAD)) == HEAD


def test_http_server_handlers_keep_working_with_held_heads() -> None:
    """GET, HEAD and a PUT with "Expect: 100-continue" on one keep-alive connection of a
    pool server: the 100 Continue reaches the client before the server waits for the
    body (a read sends a held head), every answer is whole and in order."""
    with serving(_PoolServer("127.0.0.1:0", Upload, max_threads=2)) as server:
        host, port = server.server_address[:2]
        with socket.create_connection((host, port), timeout=5) as client:
            check_upload_conversation(client)


class _Stream(http.server.BaseHTTPRequestHandler):
    """A server-sent-events style handler: the head, then a wait on something else."""

    protocol_version = "HTTP/1.1"
    hold_response_head = False
    go = threading.Event()

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        if self.go.wait(5):
            self.wfile.write(b"data: 1\n\n")
        self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_a_handler_can_opt_out_of_held_heads() -> None:
    """hold_response_head = False: the head leaves at once, before the first event."""
    _Stream.go.clear()
    with serving(_PoolServer("127.0.0.1:0", _Stream, max_threads=2)) as server:
        host, port = server.server_address[:2]
        with socket.create_connection((host, port), timeout=5) as client:
            client.sendall(b"GET /events HTTP/1.1\r\nHost: t\r\n\r\n")
            try:
                head = read_until(client, b"\r\n\r\n")
            finally:
                _Stream.go.set()
            assert head.startswith(b"HTTP/1.1 200 OK\r\n")
            assert read_until(client, b"data: 1\n\n") == b"data: 1\n\n"


def test_a_pool_server_without_listeners_gives_handlers_a_connection_socket() -> None:
    """ThreadPoolTCPServer accepts as ConnectionSocket itself (ListenersMixIn is not
    needed), and a datagram pool server is left as it was."""
    from servekit.features.pool import ThreadPoolTCPServer

    seen: list[type] = []

    class Kind(StreamRequestHandler):
        def handle(self) -> None:
            seen.append(type(self.request))
            self.wfile.write(self.rfile.readline())

    with ThreadPoolTCPServer(("127.0.0.1", 0), Kind, max_threads=2) as server, serving(server):
        with socket.create_connection(server.server_address, timeout=10) as sock:
            assert exchange_line(sock, b"kind\n") == b"kind\n"
    assert seen == [ConnectionSocket]


# -- rfile and wfile: ConnectionIO and ConnectionWriter --------------------------------


def test_rfile_is_a_buffered_reader_over_connection_io_and_other_modes_are_the_stdlibs(
    pair,
) -> None:
    from servekit.features.connsocket import ConnectionIO

    ours, peer = pair
    ours.settimeout(5)
    rfile = ours.makefile("rb")
    assert type(rfile.raw) is ConnectionIO
    text = ours.makefile("r", encoding="ascii")
    raw = ours.makefile("rb", 0)
    assert type(raw) is socket.SocketIO
    peer.sendall(b"one\ntwo\n")
    assert rfile.readline() == b"one\n"
    assert rfile.readline() == b"two\n"  # from rfile's buffer
    peer.sendall(b"three\n")  # rfile holds nothing more: the text file reads it
    assert text.readline() == "three\n"
    # As with socket.makefile(): close() leaves the descriptor to the open files.
    ours.close()
    peer.sendall(b"still\n")
    assert rfile.readline() == b"still\n"
    for file in (rfile, text, raw):
        file.close()
    assert ours.fileno() == -1


def test_rfile_reads_send_a_held_head_first(pair) -> None:
    """The read that waits for a request body must release '100 Continue' first, through
    rfile as through recv() (ConnectionIO's direct read is not taken while a head is
    held)."""
    ours, peer = pair
    ours.settimeout(5)
    rfile = ours.makefile("rb")
    ours.hold_head()
    ours.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")

    def client() -> None:
        if _read_exactly(peer, 25) == b"HTTP/1.1 100 Continue\r\n\r\n":
            peer.sendall(b"the body\n")

    thread = threading.Thread(target=client)
    thread.start()
    try:
        assert rfile.readline() == b"the body\n"
    finally:
        thread.join(5)
        rfile.close()


def test_rfile_reads_count_towards_the_read_rate(pair) -> None:
    """Bytes read through rfile buy time like bytes read by recv(): 20 bytes at 10 B/s
    are 2 s more, so the wait for a line that never ends is cut after about 2.2 s."""
    from servekit.errors import RequestTooSlow

    ours, peer = pair
    ours.settimeout(10)
    rfile = ours.makefile("rb")
    started = time.monotonic()
    ours.begin_message(None, started + 0.2, 10.0)
    peer.sendall(b"0123456789012345678\n")
    assert rfile.readline() == b"0123456789012345678\n"
    with pytest.raises(RequestTooSlow, match="20 bytes read"):
        rfile.readline()
    assert 2.0 <= time.monotonic() - started < 8
    rfile.close()


def test_rfile_refuses_to_read_after_a_timeout(pair) -> None:
    """SocketIO's rule: after a timeout the stream is in an unknown state."""
    ours, peer = pair
    ours.settimeout(0.1)
    rfile = ours.makefile("rb", buffering=1)
    with pytest.raises(TimeoutError):
        rfile.read(1)
    peer.sendall(b"late\n")
    with pytest.raises(OSError, match="timed out object"):
        rfile.read(1)
    rfile.close()


BIG = bytes(range(256)) * 131072  # 32 MiB: more than one send() takes on loopback


class _Writes(StreamRequestHandler):
    """Writes what the client asks for: 'big' (BIG), 'buffers' (a bytearray and a
    memoryview), and records the class of its wfile."""

    kinds: list[type] = []

    def handle(self) -> None:
        self.kinds.append(type(self.wfile))
        self.request.settimeout(10)
        for line in self.rfile:
            if line == b"big\n":
                self.wfile.write(BIG)
            elif line == b"buffers\n":
                self.wfile.write(bytearray(b"bytearray "))
                self.wfile.write(memoryview(b"and memoryview\n"))


def test_wfile_sends_whole_writes_through_a_full_send_buffer() -> None:
    """A pool server's handler gets ConnectionWriter as its unbuffered wfile: a write
    larger than the socket buffers arrives whole (what one send() did not take goes
    through sendall(), which waits), and other buffers are written too."""
    from servekit.features.connsocket import ConnectionWriter

    _Writes.kinds = []
    with serving(_PoolServer("127.0.0.1:0", _Writes, max_threads=2)) as server:
        with socket.create_connection(server.server_address, timeout=10) as sock:
            sock.sendall(b"big\n")
            received = bytearray()
            for _ in range(len(BIG)):  # bounded: each pass reads at least a byte
                if len(received) >= len(BIG):
                    break
                chunk = sock.recv(1 << 20)
                if not chunk:
                    break
                received.extend(chunk)
            assert received == BIG
            assert exchange_line(sock, b"buffers\n") == b"bytearray and memoryview\n"
    assert _Writes.kinds == [ConnectionWriter]


def test_timeouts_beyond_what_a_socket_takes_are_refused_and_long_ones_work(pair) -> None:
    """settimeout() refuses what socket.settimeout() refuses, with its error; a timeout
    longer than one poll() can wait (about 24.8 days) still waits for the bytes."""
    ours, peer = pair
    plain = socket.socket()
    try:
        for value in (float("inf"), 1e10):
            with pytest.raises(OverflowError) as theirs:
                plain.settimeout(value)
            with pytest.raises(OverflowError, match=str(theirs.value)):
                ours.settimeout(value)
    finally:
        plain.close()
    ours.settimeout(1e9)  # 31 years
    assert _recv_sent_later(ours, peer) == b"late\n"
