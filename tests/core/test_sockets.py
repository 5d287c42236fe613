"""The socket types: IPv6 literals, datagram and Unix servers, bind failures."""

from __future__ import annotations

import os
import pathlib
import socket

import pytest

import servekit
from servekit.testing import LOCALHOST, LOCALHOST_V6, connect, has_ipv6_loopback, serving


class LineEcho(servekit.StreamRequestHandler):
    def handle(self) -> None:
        self.wfile.write(self.rfile.readline())


class DatagramEcho(servekit.DatagramRequestHandler):
    def handle(self) -> None:
        self.wfile.write(self.rfile.read())


needs_ipv6 = pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback here")


@needs_ipv6
@pytest.mark.parametrize("host", [LOCALHOST_V6, "::"])
def test_ipv6_literal_binds_without_subclassing(host: str) -> None:
    """TCPServer(("::1", 0)) and (("::", 0)) pick AF_INET6 themselves (the stdlib raises gaierror)."""
    with servekit.ThreadingTCPServer((host, 0), LineEcho) as server, serving(server):
        assert server.address_family == socket.AF_INET6
        assert server.socket.family == socket.AF_INET6
        port = server.server_address[1]
        with connect((LOCALHOST_V6, port)) as sock, sock.makefile("rb") as reader:
            sock.sendall(b"six\n")
            assert reader.readline() == b"six\n"


@needs_ipv6
def test_ipv6_udp_literal() -> None:
    """UDPServer(("::1", 0)) is an IPv6 datagram server."""
    with servekit.UDPServer((LOCALHOST_V6, 0), DatagramEcho) as server, serving(server):
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as client:
            client.settimeout(5)
            client.sendto(b"dgram", server.server_address)
            assert client.recvfrom(100)[0] == b"dgram"


def test_ipv4_hostname_keeps_ipv4() -> None:
    """A hostname or IPv4 address keeps the class's address family."""
    with servekit.TCPServer(("localhost", 0), LineEcho) as server:
        assert server.address_family == socket.AF_INET


def test_explicit_address_family_is_respected() -> None:
    """A subclass that sets address_family keeps it (only the AF_INET default is inferred)."""

    class V6(servekit.TCPServer):
        address_family = socket.AF_INET6

    if not has_ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    with V6((LOCALHOST_V6, 0), LineEcho) as server:
        assert server.socket.family == socket.AF_INET6


def test_udp_server_round_trip() -> None:
    """A UDPServer answers each datagram through DatagramRequestHandler's wfile."""
    with servekit.ThreadingUDPServer((LOCALHOST, 0), DatagramEcho) as server, serving(server):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(5)
            for i in range(3):
                client.sendto(b"n%d" % i, server.server_address)
                assert client.recvfrom(100)[0] == b"n%d" % i


def test_unix_stream_server(tmp_path: os.PathLike[str]) -> None:
    """UnixStreamServer serves a Unix-domain path."""
    path = os.path.join(tmp_path, "s.sock")
    with servekit.ThreadingUnixStreamServer(path, LineEcho) as server, serving(server):
        with connect(path) as sock, sock.makefile("rb") as reader:
            sock.sendall(b"unix\n")
            assert reader.readline() == b"unix\n"


def test_bind_failure_closes_socket() -> None:
    """A failed bind closes the new socket instead of leaking it."""
    with socket.socket() as taken:
        taken.bind((LOCALHOST, 0))
        taken.listen()
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(50):
            with pytest.raises(OSError):
                servekit.TCPServer(taken.getsockname(), LineEcho)
        assert len(os.listdir("/proc/self/fd")) <= before


def test_allow_reuse_port_sets_option() -> None:
    """allow_reuse_port = True sets SO_REUSEPORT, so two servers share one port."""

    class Shared(servekit.TCPServer):
        allow_reuse_port = True

    with Shared((LOCALHOST, 0), LineEcho) as first:
        with Shared(first.server_address, LineEcho) as second:
            assert second.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1


def _nodelay_of_accepted(server_class: type) -> int:
    seen: list[int] = []

    class Report(servekit.BaseRequestHandler):
        def handle(self) -> None:
            seen.append(self.request.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    with server_class(("127.0.0.1", 0), Report) as server:
        with socket.create_connection(server.server_address, timeout=10):
            server.handle_request()
    return seen[0]


def test_tcp_nodelay_is_on_for_accepted_connections_by_default() -> None:
    """Accepted TCP connections have TCP_NODELAY (a documented difference from the stdlib, which leaves Nagle on)."""
    assert _nodelay_of_accepted(servekit.TCPServer) != 0


def test_tcp_nodelay_false_keeps_nagle() -> None:
    """tcp_nodelay = False on the server class keeps the stdlib's behaviour."""

    class Nagle(servekit.TCPServer):
        tcp_nodelay = False

    assert _nodelay_of_accepted(Nagle) == 0


def test_disable_nagle_algorithm_on_a_unix_socket(tmp_path: pathlib.Path) -> None:
    """disable_nagle_algorithm on a Unix-socket handler is ignored instead of failing setup() (the stdlib raises OSError)."""
    answered: list[bytes] = []

    class Handler(servekit.StreamRequestHandler):
        disable_nagle_algorithm = True

        def handle(self) -> None:
            answered.append(self.rfile.readline())

    path = str(tmp_path / "s.sock")
    with servekit.UnixStreamServer(path, Handler) as server:
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(10)
            client.connect(path)
            client.sendall(b"hi\n")
            server.handle_request()
    assert answered == [b"hi\n"]
