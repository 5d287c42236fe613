"""ConnectionSocket keeps socket.socket's behaviour (values, exceptions, timeouts) while
trying I/O before polling; checked over real socket pairs and a real pool server."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from servekit.core import StreamRequestHandler, TCPServer
from servekit.features.connsocket import ConnectionSocket
from servekit.features.listeners import ListenersMixIn
from servekit.features.pool import ThreadPoolMixIn
from servekit.testing import exchange_line, serving

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


def test_recv_waits_for_bytes_sent_later(pair) -> None:
    ours, peer = pair
    ours.settimeout(5)
    timer = threading.Timer(0.05, peer.sendall, (b"late\n",))
    timer.start()
    try:
        assert ours.recv(100) == b"late\n"
    finally:
        timer.join()


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
