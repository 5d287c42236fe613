# The socket a pool server's handler gets for a stream connection: a socket.socket whose
# timeouts cost no system call when the bytes are already there.
#
# Strategy. With a timeout set, CPython polls the socket before every recv() and send(),
# even when the data is already queued: two extra system calls per message (and two
# GIL hand-offs) for a handler that reads a request and writes a reply. A connection
# pipeline dispatches a connection when its bytes have arrived, so the read almost never
# has to wait, and a small reply almost never finds the send buffer full. This socket
# tries first and polls only when the kernel says "would block" (EAGAIN), the way
# asyncio's and gevent's sockets do:
#
#   * the descriptor is always non-blocking, as it is under any Python timeout;
#   * gettimeout() / settimeout() / setblocking() keep the timeout the handler asked
#     for, and every blocking method honours it: it waits (poll) when needed and raises
#     TimeoutError("timed out") as the stdlib does, with one deadline for a whole
#     sendall(), as the stdlib has had since 3.5;
#   * with timeout 0.0 the socket is plainly non-blocking (BlockingIOError), as before.
#
# Only the waiting strategy differs from socket.socket's; what a handler sees (values,
# exceptions, timeouts) does not. Pool servers accept their stream connections as it
# (ThreadPoolMixIn.accepted_socket_class: ListenersMixIn honours it, and
# ThreadPoolMixIn.get_request() does without ListenersMixIn).
#
# It also holds a response head for its body (servekit.features.heads.HeadHolding), and
# bounds the waits of a request's reads by a minimum data rate
# (servekit.features.readrate.ReadRate).
from __future__ import annotations

import _socket
import io
import math
import select
import socket
import time
from collections.abc import Callable
from typing import Any

from servekit.core.handlers import _SocketWriter
from servekit.errors import SendTimeout
from servekit.features.heads import HeadHolding
from servekit.features.readrate import ReadRate

__all__ = ["ConnectionIO", "ConnectionSocket", "ConnectionWriter"]

_C = _socket.socket  # the C methods, which never poll on a timeout of 0.0
_POLLIN = select.POLLIN
_POLLOUT = select.POLLOUT
_PEEK = int(socket.MSG_PEEK)
_monotonic = time.monotonic
# socket.settimeout() keeps a timeout as 64-bit nanoseconds and refuses larger ones.
_TIMEOUT_MAX = 2**63 / 1e9
# poll() takes milliseconds as a C int: a longer wait is made of several.
_POLL_MAX_MS = 2**31 - 1


class ConnectionSocket(HeadHolding, ReadRate, socket.socket):
    """socket.socket with a timeout that costs a system call only when it must wait."""

    __slots__ = (
        "_held",
        "_hold",
        "_read_bytes",
        "_read_rate",
        "_read_until",
        "_reset",
        "_wait_timeout",
    )
    _io_refs: int  # socket.socket's count of open makefile() files, undeclared in the stubs

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._wait_timeout: float | None = None  # accept() returns blocking sockets
        #: hold_head() was called and no write came since: the next one may be held.
        self._hold = False
        #: The head being held.
        self._held: bytes | None = None
        self._read_until: float | None = None
        self._read_rate = 0.0
        self._read_bytes = 0
        self._reset = False
        _C.settimeout(self, 0.0)  # the descriptor: non-blocking for good

    # -- the timeout, as the handler sees it ---------------------------------------------

    def settimeout(self, value: float | None) -> None:
        if value is not None:
            value = float(value)
            if value < 0.0 or math.isnan(value):
                raise ValueError("Timeout value out of range")
            if value >= _TIMEOUT_MAX:  # socket.settimeout()'s own limit and error
                raise OverflowError("timestamp out of range for platform time_t")
        self._wait_timeout = value

    def gettimeout(self) -> float | None:
        return self._wait_timeout

    def setblocking(self, flag: bool) -> None:
        self._wait_timeout = None if flag else 0.0

    def getblocking(self) -> bool:
        return self._wait_timeout != 0.0

    # -- waiting -------------------------------------------------------------------------

    def _wait_and(self, event: int, call: Callable[..., Any], *args: Any) -> Any:
        """Wait until the socket is ready for event, then call(self, *args); again while
        it would still block (another reader took the bytes, a spurious wake-up)."""
        timeout = self._wait_timeout
        if timeout == 0.0:
            raise BlockingIOError(11, "Resource temporarily unavailable")
        deadline = None if timeout is None else _monotonic() + timeout
        limited = False
        if event == _POLLIN:
            limit = self.read_limit()
            if limit is not None and (deadline is None or limit < deadline):
                deadline, limited = limit, True  # the request's deadline comes first
        poller = select.poll()
        poller.register(self, event)
        while True:  # bounded by the deadline (or waits, as a blocking socket does)
            if deadline is None:
                ready = poller.poll()
            else:
                left = deadline - _monotonic()
                if left * 1000 > _POLL_MAX_MS:  # poll() takes at most ~24.8 days: again
                    ready = poller.poll(_POLL_MAX_MS)
                    if not ready:
                        continue
                else:
                    ready = poller.poll(max(0, math.ceil(left * 1000))) if left > 0 else []
            if not ready:
                if limited:
                    raise self.too_slow()
                raise TimeoutError("timed out") if event == _POLLIN else SendTimeout("timed out")
            try:
                return call(self, *args)
            except BlockingIOError:
                continue

    # -- reading -------------------------------------------------------------------------

    def makefile(self, mode: str = "r", buffering: int | None = None, **options: Any) -> Any:
        if mode != "rb" or buffering == 0 or options:
            return super().makefile(mode, buffering, **options)  # type: ignore[call-overload]
        # A buffered binary reader (StreamRequestHandler's rfile), over ConnectionIO.
        # Counted in _io_refs as socket.makefile() counts its files: close() leaves the
        # descriptor open until they are closed too.
        raw = ConnectionIO(self, "rb")
        self._io_refs += 1
        size = io.DEFAULT_BUFFER_SIZE if buffering is None or buffering < 0 else buffering
        return io.BufferedReader(raw, size)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if self._held is not None:
            self.release_head()
        try:
            data: bytes = _C.recv(self, bufsize, flags)
        except BlockingIOError:
            data = self._wait_and(_POLLIN, _C.recv, bufsize, flags)
        if self._read_until is not None and not flags & _PEEK:
            self._read_bytes += len(data)
        return data

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        if self._held is not None:
            self.release_head()
        try:
            n: int = _C.recv_into(self, buffer, nbytes, flags)
        except BlockingIOError:
            n = self._wait_and(_POLLIN, _C.recv_into, buffer, nbytes, flags)
        if self._read_until is not None and not flags & _PEEK:
            self._read_bytes += n  # (a peek's bytes are counted when read)
        return n

    def recvfrom(self, bufsize: int, flags: int = 0) -> tuple[bytes, Any]:
        if self._held is not None:
            self.release_head()
        try:
            return _C.recvfrom(self, bufsize, flags)
        except BlockingIOError:
            result: tuple[bytes, Any] = self._wait_and(_POLLIN, _C.recvfrom, bufsize, flags)
            return result

    def recvfrom_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> tuple[int, Any]:
        if self._held is not None:
            self.release_head()
        try:
            return _C.recvfrom_into(self, buffer, nbytes, flags)
        except BlockingIOError:
            result: tuple[int, Any] = self._wait_and(
                _POLLIN, _C.recvfrom_into, buffer, nbytes, flags
            )
            return result

    def recvmsg(self, *args: Any) -> Any:
        if self._held is not None:
            self.release_head()
        try:
            return _C.recvmsg(self, *args)
        except BlockingIOError:
            return self._wait_and(_POLLIN, _C.recvmsg, *args)

    def recvmsg_into(self, *args: Any) -> Any:
        if self._held is not None:
            self.release_head()
        try:
            return _C.recvmsg_into(self, *args)
        except BlockingIOError:
            return self._wait_and(_POLLIN, _C.recvmsg_into, *args)

    # -- closing -------------------------------------------------------------------------

    def client_reset(self) -> None:
        """Note that the client reset the connection (the connection pipeline saw
        EPOLLERR): the kernel has already closed it, so shutdown() has nothing to do."""
        self._reset = True

    def shutdown(self, how: int) -> None:
        if self._reset:
            # The kernel would refuse with ENOTCONN, which TCPServer.shutdown_request()
            # ignores. Under connection churn nearly every client resets: not asking
            # saves a system call and an exception per connection.
            return
        super().shutdown(how)

    # -- writing -------------------------------------------------------------------------

    def unbuffered_writer(self) -> ConnectionWriter:
        """The wfile of an unbuffered StreamRequestHandler (wbufsize 0) on this socket."""
        return ConnectionWriter(self)

    def send(self, data: Any, flags: int = 0) -> int:
        if self._hold or self._held is not None:
            self.release_head()
        try:
            return _C.send(self, data, flags)
        except BlockingIOError:
            result: int = self._wait_and(_POLLOUT, _C.send, data, flags)
            return result

    def sendto(self, data: Any, *args: Any) -> int:
        if self._hold or self._held is not None:
            self.release_head()
        try:
            return _C.sendto(self, data, *args)
        except BlockingIOError:
            result: int = self._wait_and(_POLLOUT, _C.sendto, data, *args)
            return result

    def sendmsg(self, *args: Any) -> int:
        if self._hold or self._held is not None:
            self.release_head()
        try:
            return _C.sendmsg(self, *args)
        except BlockingIOError:
            result: int = self._wait_and(_POLLOUT, _C.sendmsg, *args)
            return result

    def sendall(self, data: Any, flags: int = 0) -> None:
        if self._hold or self._held is not None:
            data = self._hold_step(data, flags)
            if data is None:
                return  # a head, held for its body
        try:
            sent = _C.send(self, data, flags)
        except BlockingIOError:
            if self._wait_timeout == 0.0:
                raise
            sent = 0
        if type(data) is bytes and sent == len(data):
            return  # the usual case, without a memoryview: one send() took it all
        with memoryview(data) as view, view.cast("B") as rest:
            if sent == len(rest):
                return  # the usual case: one send() took it all
            # One deadline for the whole call, as socket.sendall() has since 3.5.
            timeout = self._wait_timeout
            deadline = None if timeout is None else _monotonic() + timeout
            while sent < len(rest):  # bounded by the deadline, or by the peer reading
                try:
                    sent += _C.send(self, rest[sent:], flags)
                    continue
                except BlockingIOError:
                    if timeout == 0.0:
                        raise
                left = None if deadline is None else deadline - _monotonic()
                if left is not None and left <= 0:
                    raise SendTimeout("timed out")
                poller = select.poll()
                poller.register(self, _POLLOUT)
                wait = None if left is None else min(_POLL_MAX_MS, max(1, math.ceil(left * 1000)))
                if not poller.poll(wait) and wait != _POLL_MAX_MS:
                    raise SendTimeout("timed out")


class ConnectionIO(socket.SocketIO):
    """The raw stream under a handler's rfile on a ConnectionSocket.

    SocketIO.readinto() checks the stream's state in Python and then calls the socket's
    recv_into(), which is Python here too: three frames for every read, the largest
    part of a small message's cost. The bytes are usually there (the pipeline hands a
    connection over when they arrive), so this tries the C recv_into() at once and
    takes the general path only when it would block (it waits, and sends a held head
    first: a '100 Continue' must reach the client before the server waits for the
    body; a head held while the bytes are already there leaves with the next write) or
    after a timeout (SocketIO then refuses to read). The bytes a read returns are
    counted as ConnectionSocket.recv_into() counts them (ReadRate).
    """

    # SocketIO's own, undeclared in the type stubs.
    _sock: ConnectionSocket | None
    _timeout_occurred: bool

    def readinto(self, b: Any) -> int | None:
        sock = self._sock
        if sock is not None and not self._timeout_occurred:
            try:
                n: int = _C.recv_into(sock, b)
            except BlockingIOError:
                pass  # nothing there yet: wait, below
            else:
                if sock._read_until is not None:
                    sock._read_bytes += n
                return n
        return super().readinto(b)


class ConnectionWriter(_SocketWriter):
    """The unbuffered wfile of a handler on a ConnectionSocket: every write() is sent
    whole or raises, as with _SocketWriter.

    _SocketWriter.write() calls the socket's sendall(), which is Python here: this
    sends bytes with the C send() at once, and takes sendall() only for what one send()
    did not take, for a head to hold or while one is held, and for other buffers.
    """

    _sock: ConnectionSocket

    def write(self, b: Any) -> int:
        sock = self._sock
        if type(b) is bytes and not sock._hold and sock._held is None:
            try:
                sent: int = _C.send(sock, b)
            except BlockingIOError:
                sent = 0  # the send buffer is full: sendall() waits, or raises at 0.0
            if sent != len(b):
                with memoryview(b) as view:
                    sock.sendall(view[sent:])
            return len(b)
        return super().write(b)
