# Holding a response head for its body: one send() per http.server response.
#
# Strategy. http.server's handlers write a response in two writes, the head
# (end_headers()) and then the body, so every response costs two send() calls, two
# segments (over TLS, two records) on the wire and two wake-ups of the client.
# hold_head() holds the next write if it is a head alone (ends with an empty line) and
# sends it together with whatever comes next: the body's first write, in one send().
# Anything else the handler does with the socket first -- a read (a "100 Continue" waits
# for the body; through rfile, only a read that must wait: ConnectionIO), another kind
# of send, shutdown(), close() -- sends the head at once,
# and the connection pipeline sends it at the end of the message whatever happens
# (release_head()), so a head is never held while the handler waits for its client.
# Only a head followed by a wait on something else (a server-sent event stream's first
# event) is delayed until the next write; such a handler sets hold_response_head = False
# (see servekit.features.messages).
#
# HeadHolding is mixed into the two sockets handlers get on pool servers:
# servekit.features.connsocket.ConnectionSocket and, over TLS,
# servekit.features.tlssocket.TLSConnectionSocket. Each calls _hold_step() at the top
# of its sendall() and releases a held head before its reads and other sends.
from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["HeadHolding"]

# Longest head held, and longest body joined to it (a copy: a larger body is sent by
# itself, right after the head).
HEAD_MAX = 16384
JOIN_MAX = 65536
# Interim responses ("100 Continue") are sent at once: the client waits for them before it
# sends its body, and nothing follows them until the handler has read it.
_INTERIM = (b"HTTP/1.1 1", b"HTTP/1.0 1")


class HeadHolding:
    """Mix-in for a socket class: hold_head() and release_head(). Put it first in the
    bases; the class gives every instance _hold = False and _held = None."""

    if not TYPE_CHECKING:
        # No __dict__ of its own: ConnectionSocket keeps its state in slots. (Hidden
        # from mypy, which would then refuse the attributes the classes provide.)
        __slots__ = ()

    #: hold_head() was called and no write came since: the next one may be held.
    _hold: bool
    #: The head being held.
    _held: bytes | None

    def hold_head(self) -> None:
        """Hold the next write if it is a response head alone (bytes ending with an empty
        line), to send it with the next one. Any other use of the socket, or
        release_head(), sends it first."""
        self._hold = True

    def release_head(self) -> None:
        """Send a held head now, and hold nothing more (the end of a message)."""
        self._hold = False
        held = self._held
        if held is not None:
            self._held = None
            self.sendall(held)  # type: ignore[attr-defined]

    def _hold_step(self, data: Any, flags: int) -> Any:
        """For sendall() while holding: None if data is the head to hold, else what to
        send now (a held head joined to data, when small enough to copy)."""
        if self._hold:
            self._hold = False  # one write per hold_head(): this one
            if (
                not flags
                and type(data) is bytes
                and len(data) <= HEAD_MAX
                and data.endswith(b"\r\n\r\n")
                and not data.startswith(_INTERIM)
                and self._held is None
            ):
                self._held = data  # a head: wait for the body
                return None
        held = self._held
        if held is not None:
            self._held = None
            if type(data) is bytes and len(data) <= JOIN_MAX:
                return held + data  # head and body in one send()
            self.sendall(held)  # type: ignore[attr-defined]
        return data

    def _release_quietly(self) -> None:
        # Before shutdown(), close() and detach(): the head goes out first, as it would
        # have without holding; a client already gone cannot be sent to, which is not
        # this call's error to report (the handler's own I/O reports it).
        try:
            self.release_head()
        except OSError:
            pass

    def shutdown(self, how: int) -> None:
        if self._hold or self._held is not None:
            self._release_quietly()
        super().shutdown(how)  # type: ignore[misc]

    def close(self) -> None:
        if self._hold or self._held is not None:
            self._release_quietly()
        super().close()  # type: ignore[misc]

    def detach(self) -> int:
        if self._hold or self._held is not None:
            self._release_quietly()
        fd: int = super().detach()  # type: ignore[misc]
        return fd

    def sendfile(self, file: Any, offset: int = 0, count: int | None = None) -> int:
        if self._hold or self._held is not None:
            self.release_head()
        sent: int = super().sendfile(file, offset, count)  # type: ignore[misc]
        return sent
