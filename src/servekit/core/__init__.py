# The socketserver-compatible core: server lifecycle, socket types, the two stdlib
# mix-ins and the request handlers. Standard library only, and it imports nothing else
# of servekit, so no production feature can break ``import servekit as socketserver``.
from __future__ import annotations

from servekit.core import composed as _composed
from servekit.core.composed import *  # noqa: F403 - the platform-dependent set
from servekit.core.forking import ForkingMixIn
from servekit.core.handlers import (
    BaseRequestHandler,
    DatagramRequestHandler,
    StreamRequestHandler,
)
from servekit.core.server import BaseServer, ServerState
from servekit.core.sockets import TCPServer, UDPServer
from servekit.core.threads import ThreadingMixIn

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
if hasattr(_composed, "ForkingTCPServer"):
    SOCKETSERVER_ALL += ["ForkingUDPServer", "ForkingTCPServer", "ForkingMixIn"]
if hasattr(_composed, "ThreadingUnixStreamServer"):
    from servekit.core.sockets import UnixDatagramServer, UnixStreamServer

    SOCKETSERVER_ALL += [
        "UnixStreamServer",
        "UnixDatagramServer",
        "ThreadingUnixStreamServer",
        "ThreadingUnixDatagramServer",
    ]
    if hasattr(_composed, "ForkingUnixStreamServer"):
        SOCKETSERVER_ALL += ["ForkingUnixStreamServer", "ForkingUnixDatagramServer"]

__all__ = [*SOCKETSERVER_ALL, "SOCKETSERVER_ALL", "ServerState"]
