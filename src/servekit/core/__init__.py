# The socketserver-compatible core: server lifecycle, socket types, the two stdlib
# mix-ins and the request handlers. Standard library only, and it imports nothing else
# of servekit, so no production feature can break ``import servekit as socketserver``.
from __future__ import annotations

import os
import socket

from servekit.core.composed import ThreadingTCPServer as ThreadingTCPServer
from servekit.core.composed import ThreadingUDPServer as ThreadingUDPServer
from servekit.core.forking import ForkingMixIn as ForkingMixIn
from servekit.core.handlers import BaseRequestHandler as BaseRequestHandler
from servekit.core.handlers import DatagramRequestHandler as DatagramRequestHandler
from servekit.core.handlers import StreamRequestHandler as StreamRequestHandler
from servekit.core.server import BaseServer as BaseServer
from servekit.core.server import ServerState as ServerState
from servekit.core.sockets import TCPServer as TCPServer
from servekit.core.sockets import UDPServer as UDPServer
from servekit.core.threads import ThreadingMixIn as ThreadingMixIn

# socketserver.__all__ of Python 3.13, filtered the same way by platform.
SOCKETSERVER_ALL: list[str] = [
    "BaseServer",
    "TCPServer",
    "UDPServer",
    "ThreadingUDPServer",
    "ThreadingTCPServer",
    "BaseRequestHandler",
    "StreamRequestHandler",
    "DatagramRequestHandler",
    "ThreadingMixIn",
]
if hasattr(os, "fork"):
    from servekit.core.composed import ForkingTCPServer as ForkingTCPServer
    from servekit.core.composed import ForkingUDPServer as ForkingUDPServer

    SOCKETSERVER_ALL += ["ForkingUDPServer", "ForkingTCPServer", "ForkingMixIn"]
if hasattr(socket, "AF_UNIX"):
    from servekit.core.composed import ThreadingUnixDatagramServer as ThreadingUnixDatagramServer
    from servekit.core.composed import ThreadingUnixStreamServer as ThreadingUnixStreamServer
    from servekit.core.sockets import UnixDatagramServer as UnixDatagramServer
    from servekit.core.sockets import UnixStreamServer as UnixStreamServer

    SOCKETSERVER_ALL += [
        "UnixStreamServer",
        "UnixDatagramServer",
        "ThreadingUnixStreamServer",
        "ThreadingUnixDatagramServer",
    ]
    if hasattr(os, "fork"):
        from servekit.core.composed import ForkingUnixDatagramServer as ForkingUnixDatagramServer
        from servekit.core.composed import ForkingUnixStreamServer as ForkingUnixStreamServer

        SOCKETSERVER_ALL += ["ForkingUnixStreamServer", "ForkingUnixDatagramServer"]

# Computed like socketserver's own, so it matches the platform exactly.
__all__ = ["SOCKETSERVER_ALL", "ServerState"]
__all__ += SOCKETSERVER_ALL  # noqa: PLE0605
