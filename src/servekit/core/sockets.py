# The socket types: stream and datagram servers over IP and Unix sockets. Owns how a
# listening socket is created, bound, activated and closed, and what a "request" is for
# each socket type (an accepted socket, or a (datagram, socket) pair).
#
# One compatible difference from the stdlib: an IPv6 literal host ("::", "::1",
# "fe80::1%eth0") selects AF_INET6 by itself, so TCPServer(("::1", 0), H) works without
# a subclass that sets address_family. server_close() chains to super() so that
# mix-ins below TCPServer in the MRO are closed too.
from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from typing import Any

from servekit.core.server import BaseServer

__all__ = ["TCPServer", "UDPServer", "UnixDatagramServer", "UnixStreamServer"]


def _is_ipv6_literal(address: Any) -> bool:
    if not (isinstance(address, tuple) and address and isinstance(address[0], str)):
        return False
    host = address[0]
    if ":" not in host:
        return False
    try:
        ipaddress.IPv6Address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


class TCPServer(BaseServer):
    """A stream-socket server: one request is one accepted connection.

    Class variables that may be overridden: address_family, socket_type,
    request_queue_size (the listen() backlog), allow_reuse_address, allow_reuse_port.
    """

    address_family: int = socket.AF_INET
    socket_type: int = socket.SOCK_STREAM
    #: listen() backlog. 5 is the stdlib's value, kept for compatibility; the production
    #: servers raise it (see servekit.features.listeners).
    request_queue_size: int = 5
    allow_reuse_address: bool = False
    allow_reuse_port: bool = False
    #: Set TCP_NODELAY on accepted TCP connections (servekit's default; the stdlib leaves
    #: Nagle's algorithm on). A handler that writes a response in two parts (headers,
    #: then body: http.server does) otherwise waits for the client's delayed ACK of the
    #: first part, 40 ms on Linux, before the second leaves: a request/response server
    #: then answers 25 requests/s per connection. Set False to keep Nagle on.
    tcp_nodelay: bool = True

    def __init__(
        self,
        server_address: Any,
        RequestHandlerClass: Callable[..., Any],
        bind_and_activate: bool = True,
    ) -> None:
        """Constructor. May be extended, do not override."""
        super().__init__(server_address, RequestHandlerClass)
        if self.address_family == socket.AF_INET and _is_ipv6_literal(server_address):
            self.address_family = socket.AF_INET6
        self.socket = socket.socket(self.address_family, self.socket_type)
        if bind_and_activate:
            try:
                self.server_bind()
                self.server_activate()
            except BaseException:
                self.server_close()
                raise

    def server_bind(self) -> None:
        """Called by constructor to bind the socket. May be overridden."""
        if self.allow_reuse_address and hasattr(socket, "SO_REUSEADDR"):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if (
            self.allow_reuse_port
            and hasattr(socket, "SO_REUSEPORT")
            and self.address_family in (socket.AF_INET, socket.AF_INET6)
        ):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self.socket.bind(self.server_address)
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        """Called by constructor to activate the server. May be overridden."""
        self.socket.listen(self.request_queue_size)
        if self.tcp_nodelay and self.socket.family in (socket.AF_INET, socket.AF_INET6):
            # Set on the listener: Linux copies it to every accepted socket, so it costs
            # no system call per connection.
            try:
                self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass  # not a TCP socket after all (a subclass's own protocol)

    def server_close(self) -> None:
        """Called to clean up the server. May be overridden."""
        self.socket.close()
        super().server_close()

    def fileno(self) -> int:
        """Return the listening socket's file descriptor, for selectors."""
        return self.socket.fileno()

    def get_request(self) -> tuple[Any, Any]:
        """Accept one connection. May be overridden."""
        return self.socket.accept()

    def shutdown_request(self, request: Any) -> None:
        """Half-close then close one connection, so buffered output is delivered."""
        try:
            # shutdown(SHUT_WR) sends FIN after the data already queued, where close()
            # alone could reset the connection if unread input remains.
            request.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the peer may already have gone
        self.close_request(request)

    def close_request(self, request: Any) -> None:
        """Called to clean up an individual request."""
        request.close()


class UDPServer(TCPServer):
    """A datagram-socket server: one request is one datagram, as (data, socket)."""

    allow_reuse_address = False
    allow_reuse_port = False
    socket_type = socket.SOCK_DGRAM
    #: Largest datagram read by get_request(); longer ones are truncated by the kernel.
    max_packet_size: int = 8192

    def get_request(self) -> tuple[Any, Any]:
        data, client_address = self.socket.recvfrom(self.max_packet_size)
        return (data, self.socket), client_address

    def server_activate(self) -> None:
        # Datagram sockets have nothing to listen() for.
        pass

    def shutdown_request(self, request: Any) -> None:
        # Nothing to half-close: the socket is shared by every request.
        self.close_request(request)

    def close_request(self, request: Any) -> None:
        # The (data, socket) pair owns nothing that needs releasing.
        pass


if hasattr(socket, "AF_UNIX"):

    class UnixStreamServer(TCPServer):
        """A stream server on a Unix-domain socket (server_address is a path)."""

        address_family = socket.AF_UNIX

    class UnixDatagramServer(UDPServer):
        """A datagram server on a Unix-domain socket (server_address is a path)."""

        address_family = socket.AF_UNIX
