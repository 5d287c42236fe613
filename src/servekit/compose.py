# Composing a server class from features, in the one order that works.
#
# Mix-ins override hooks and chain with super(), so their order in the bases is part
# of the behaviour. This module is the single place that knows it; the command line
# uses it, and users who build servers from configuration can too:
#
#   PreforkMixIn      replaces the loop in the parent; everything below runs in workers
#   ListenersMixIn    several listening sockets (only when there is more than one)
#   LimitsMixIn       connection cap and idle timeouts, before anything reads the socket
#   ProxyProtocolMixIn reads the PROXY header, which precedes any TLS bytes
#   TLSMixIn          the handshake, on the worker thread
#   ThreadPoolMixIn   concurrency: hands each request to a pool thread
#   socket type       TCPServer, UDPServer, UnixStreamServer, UnixDatagramServer
from __future__ import annotations

import socket

from servekit.core import TCPServer, UDPServer
from servekit.pool import ThreadPoolMixIn

__all__ = ["server_class", "socket_server_type"]


def socket_server_type(kind: str) -> type[TCPServer]:
    """The compatibility-core server class for an address kind (see servekit.addresses)."""
    if kind == "tcp":
        return TCPServer
    if kind == "udp":
        return UDPServer
    if kind in ("unix", "unix-dgram") and hasattr(socket, "AF_UNIX"):
        from servekit.core import UnixDatagramServer, UnixStreamServer

        return UnixStreamServer if kind == "unix" else UnixDatagramServer
    raise ValueError(f"no server type for address kind {kind!r}")


def server_class(
    kind: str,
    *,
    workers: int = 1,
    name: str = "Server",
) -> type[TCPServer]:
    """A server class with the requested features, its mix-ins in the right order.

    workers > 1 adds the pre-fork supervisor; every server gets a bounded thread pool.
    """
    bases: list[type] = []
    if workers > 1:
        from servekit.prefork import PreforkMixIn

        bases.append(PreforkMixIn)
    bases.append(ThreadPoolMixIn)
    bases.append(socket_server_type(kind))
    cls: type[TCPServer] = type(name, tuple(bases), {"__module__": __name__})
    return cls
