# The composed server classes of the stdlib: a concurrency mix-in first, a socket type
# second. Forking ones exist only where os.fork does, Unix ones only where AF_UNIX does.
from __future__ import annotations

import os
import socket

from servekit.core.forking import ForkingMixIn
from servekit.core.sockets import TCPServer, UDPServer
from servekit.core.threads import ThreadingMixIn

__all__ = ["ThreadingTCPServer", "ThreadingUDPServer"]


class ThreadingUDPServer(ThreadingMixIn, UDPServer):
    """UDPServer handling each datagram in a new thread."""


class ThreadingTCPServer(ThreadingMixIn, TCPServer):
    """TCPServer handling each connection in a new thread."""


if hasattr(os, "fork"):
    __all__ += ["ForkingTCPServer", "ForkingUDPServer"]

    class ForkingUDPServer(ForkingMixIn, UDPServer):
        """UDPServer handling each datagram in a new process."""

    class ForkingTCPServer(ForkingMixIn, TCPServer):
        """TCPServer handling each connection in a new process."""


if hasattr(socket, "AF_UNIX"):
    from servekit.core.sockets import UnixDatagramServer, UnixStreamServer

    __all__ += ["ThreadingUnixDatagramServer", "ThreadingUnixStreamServer"]

    class ThreadingUnixStreamServer(ThreadingMixIn, UnixStreamServer):
        """UnixStreamServer handling each connection in a new thread."""

    class ThreadingUnixDatagramServer(ThreadingMixIn, UnixDatagramServer):
        """UnixDatagramServer handling each datagram in a new thread."""

    if hasattr(os, "fork"):
        __all__ += ["ForkingUnixDatagramServer", "ForkingUnixStreamServer"]

        class ForkingUnixStreamServer(ForkingMixIn, UnixStreamServer):
            """UnixStreamServer handling each connection in a new process."""

        class ForkingUnixDatagramServer(ForkingMixIn, UnixDatagramServer):
            """UnixDatagramServer handling each datagram in a new process."""
