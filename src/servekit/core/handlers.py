# Request handlers: one object per request, constructed by the server, running
# setup() / handle() / finish(). Owns the file-like views of a connection (rfile,
# wfile) and of a datagram.
from __future__ import annotations

import io
import socket
from typing import TYPE_CHECKING, Any

from servekit.core.kinds import TCP_FAMILIES, family_of

if TYPE_CHECKING:
    from typing_extensions import Buffer  # collections.abc.Buffer from 3.12 on

__all__ = ["BaseRequestHandler", "DatagramRequestHandler", "StreamRequestHandler"]


class BaseRequestHandler:
    """Base class for request handlers.

    The constructor sets request, client_address and server, then calls setup(),
    handle() and, even if handle() raises, finish(). Override handle() (and setup() /
    finish() for per-request resources).
    """

    def __init__(self, request: Any, client_address: Any, server: Any) -> None:
        self.request = request
        self.client_address = client_address
        self.server = server
        self.setup()
        try:
            self.handle()
        finally:
            self.finish()

    def setup(self) -> None:
        pass

    def handle(self) -> None:
        pass

    def finish(self) -> None:
        pass


class _SocketWriter(io.BufferedIOBase):
    """An unbuffered, writable file over a socket: every write() is one sendall().

    makefile("wb", 0) is not allowed for sockets, and a raw SocketIO may write only part
    of the data; this gives wfile the "everything or an exception" semantics handlers
    expect without a buffer that needs flushing.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def writable(self) -> bool:
        return True

    def write(self, b: Buffer) -> int:
        self._sock.sendall(b)
        if type(b) is bytes:
            return len(b)  # the usual case, without a memoryview
        with memoryview(b) as view:
            return view.nbytes

    def fileno(self) -> int:
        return self._sock.fileno()


class StreamRequestHandler(BaseRequestHandler):
    """A handler for stream sockets with rfile and wfile file objects.

    Class variables: rbufsize (-1: default buffering), wbufsize (0: unbuffered, each
    write is sent at once), timeout (socket timeout, None: blocking),
    disable_nagle_algorithm (set TCP_NODELAY).
    """

    rbufsize: int = -1
    wbufsize: int = 0
    timeout: float | None = None
    disable_nagle_algorithm: bool = False

    connection: socket.socket
    rfile: io.BufferedIOBase
    wfile: io.BufferedIOBase

    def setup(self) -> None:
        self.connection = self.request
        if self.timeout is not None:
            self.connection.settimeout(self.timeout)
        if self.disable_nagle_algorithm and family_of(self.connection) in TCP_FAMILIES:
            # TCP only: on a Unix socket setsockopt() fails, and there is no Nagle there.
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        # A BufferedReader (BufferedWriter below) for these modes; typeshed's overloads say
        # IOBase for a buffering that is not a literal. Not cast(): a call per connection.
        self.rfile = self.connection.makefile("rb", self.rbufsize)  # type: ignore[assignment]
        if self.wbufsize == 0:
            # A socket class may bring its own unbuffered writer, with the same contract
            # (servekit's ConnectionSocket does, to save a call per write); any other
            # socket gets _SocketWriter.
            writer = getattr(self.connection, "unbuffered_writer", None)
            self.wfile = _SocketWriter(self.connection) if writer is None else writer()
        else:
            self.wfile = self.connection.makefile("wb", self.wbufsize)  # type: ignore[assignment]

    def finish(self) -> None:
        if not self.wfile.closed:
            try:
                self.wfile.flush()
            except OSError:
                # The peer is gone; what was buffered cannot be delivered. The stdlib
                # ignores this too, so a handler's finish() never masks handle()'s result.
                pass
        self.wfile.close()
        self.rfile.close()


class DatagramRequestHandler(BaseRequestHandler):
    """A handler for datagram sockets: rfile reads the datagram, wfile is the reply."""

    packet: bytes
    socket: socket.socket
    rfile: io.BytesIO
    wfile: io.BytesIO

    def setup(self) -> None:
        self.packet, self.socket = self.request
        self.rfile = io.BytesIO(self.packet)
        self.wfile = io.BytesIO()

    def finish(self) -> None:
        self.socket.sendto(self.wfile.getvalue(), self.client_address)
