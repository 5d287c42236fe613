# What kind of socket a socket is, as plain ints. socket.socket's family and type are
# Python properties that build an enum on every read (microseconds each); the C members
# under them do not, and accept() and setup() ask on every connection.
from __future__ import annotations

import _socket
import socket
from collections.abc import Callable

__all__ = ["STREAM", "TCP_FAMILIES", "family_of", "is_tcp", "type_of"]

#: The socket's address family and type, as ints.
family_of: Callable[[socket.socket], int] = _socket.socket.family.__get__
type_of: Callable[[socket.socket], int] = _socket.socket.type.__get__

STREAM = int(socket.SOCK_STREAM)
TCP_FAMILIES = (int(socket.AF_INET), int(socket.AF_INET6))


def is_tcp(sock: socket.socket) -> bool:
    """A TCP socket (IPv4 or IPv6 stream): where TCP options such as TCP_NODELAY apply."""
    return type_of(sock) == STREAM and family_of(sock) in TCP_FAMILIES
