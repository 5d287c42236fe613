# The ssl.SSLSocket a TLS handler gets: one that can decrypt a request ahead of the
# handler, in the serving loop, and hand the bytes over to the handler's first reads.
#
# Strategy. The request wait (servekit.features.limits.WaitForRequest) looks for a whole
# line or HTTP head with recv(MSG_PEEK), which leaves the bytes in the kernel for the
# handler. Over TLS the kernel holds encrypted records: there is nothing to peek at, and
# a client that completed its handshake could trickle its request and hold a thread.
# This subclass decrypts what has arrived without waiting (read_ahead()) and keeps it;
# every read the handler makes (recv, recv_into, read, and so rfile) takes those bytes
# first (SSLSocket's recv() and recv_into() read through read()), then reads the
# connection as usual, and pending() counts them. It also holds a response head for its
# body, as ConnectionSocket does (servekit.features.heads): one TLS record and one
# send() per http.server response instead of two. Its reads' waits are bounded by the
# request's minimum data rate (servekit.features.readrate), with the socket's timeout
# lowered for a read that must not wait past it.
#
# TLSMixIn makes its contexts return this class (SSLContext.sslsocket_class, the
# documented way): contexts it builds, and a context given as ssl_context whose
# sslsocket_class is still ssl.SSLSocket. A context with a class of its own is left
# alone; its connections then wait for data, not a line or a head.
from __future__ import annotations

import socket
import ssl
import time
from typing import Any

from servekit.features.heads import HeadHolding
from servekit.features.readrate import ReadRate

__all__ = ["TLSConnectionSocket", "adopt_context"]

_len = len  # read()'s first parameter is called len, as SSLSocket.read()'s is
# A look at the encrypted bytes under TLS: socket.socket's recv(), never waiting.
_C_recv = socket.socket.recv
_PEEK_NOW = socket.MSG_PEEK | socket.MSG_DONTWAIT


class TLSConnectionSocket(HeadHolding, ReadRate, ssl.SSLSocket):
    """ssl.SSLSocket whose request can be decrypted ahead of the handler, which can hold
    a response head for its body, and whose reads can be held to a minimum rate."""

    #: Decrypted bytes read ahead and not yet taken by the handler.
    _ahead = b""
    _hold = False
    _held: bytes | None = None
    _read_until: float | None = None
    _read_rate = 0.0
    _read_bytes = 0

    def read_ahead(self, limit: int) -> tuple[bytes, bool]:
        """Decrypt what has arrived, up to limit bytes in all, without waiting; keep it
        for the handler. Returns everything kept so far, and whether the client has
        closed its side (the handler reads the bytes first, then EOF). A socket with a
        timeout (a parked connection keeps its handler's) is made non-blocking for the
        call: the loop must never wait."""
        timeout = self.gettimeout()
        if timeout != 0.0:
            self.settimeout(0.0)
        try:
            ahead = self._ahead
            closed = False
            while len(ahead) < limit:  # bounded: each turn takes bytes, or ends the loop
                if not super().pending():
                    # The encrypted bytes first: at a bare end of stream (a client that
                    # half-closed TCP after its request, without close_notify) OpenSSL's
                    # read would fail the connection for good, "unexpected EOF", and the
                    # response could not be sent. The end is the handler's to read.
                    try:
                        if not _C_recv(self, 1, _PEEK_NOW):
                            closed = True
                            break
                    except BlockingIOError:
                        break  # nothing has arrived
                    except OSError:
                        pass  # a reset: OpenSSL's read reports it
                try:
                    chunk = super().read(limit - len(ahead))
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    break  # nothing more decrypted yet
                if not chunk:
                    closed = True
                    break
                ahead += chunk
            self._ahead = ahead
            return ahead, closed
        finally:
            if timeout != 0.0:
                self.settimeout(timeout)

    def read(self, len: int = 1024, buffer: Any = None) -> Any:
        # recv() and recv_into() (and so the handler's rfile) read through this.
        if self._held is not None:
            self.release_head()  # a "100 Continue" must reach the client first
        if self._ahead:
            result = self._give(len, buffer)
        elif self._read_until is None:
            return super().read(len, buffer)
        else:
            result = self._read_limited(len, buffer)
        if self._read_until is not None:
            self._read_bytes += result if type(result) is int else _len(result)
        return result

    def _read_limited(self, size: int, buffer: Any) -> Any:
        """read(), waiting no longer than the request's read limit allows."""
        limit = self.read_limit()
        assert limit is not None
        timeout = self.gettimeout()
        left = limit - time.monotonic()
        if timeout == 0.0 or (timeout is not None and timeout <= left):
            return super().read(size, buffer)  # the socket's own timeout comes first
        # SSLSocket.read() tries first and waits only for want of bytes, so a limit
        # already passed still reads what has arrived (1 ms is the least it polls).
        self.settimeout(max(left, 0.001))
        try:
            return super().read(size, buffer)
        except TimeoutError:
            raise self.too_slow() from None
        finally:
            self.settimeout(timeout)

    def _give(self, size: int, buffer: Any) -> Any:
        ahead = self._ahead
        if buffer is None:
            taken, self._ahead = ahead[:size], ahead[size:]
            return taken
        with memoryview(buffer) as view, view.cast("B") as target:
            n = min(len(target), len(ahead))
            if size > 0:
                n = min(n, size)
            target[:n] = ahead[:n]
            self._ahead = ahead[n:]
            return n

    def sendall(self, data: Any, flags: int = 0) -> None:
        if self._hold or self._held is not None:
            data = self._hold_step(data, flags)
            if data is None:
                return  # a head, held for its body
        super().sendall(data, flags)

    def send(self, data: Any, flags: int = 0) -> int:
        # SSLSocket.sendall() sends through this: it finds nothing held by then.
        if self._hold or self._held is not None:
            self.release_head()
        return super().send(data, flags)

    def unwrap(self) -> Any:
        if self._hold or self._held is not None:
            self._release_quietly()
        return super().unwrap()

    def pending(self) -> int:
        return super().pending() + len(self._ahead)


def adopt_context(context: ssl.SSLContext) -> ssl.SSLContext:
    """Make context's sockets TLSConnectionSocket, unless it has a class of its own."""
    if context.sslsocket_class is ssl.SSLSocket:
        context.sslsocket_class = TLSConnectionSocket
    return context
