# The root of servekit's exceptions. Every error servekit raises on purpose derives
# from ServekitError *and* from the built-in class it has always been (ValueError for
# bad values, OSError for listening failures, RuntimeError for state), so callers may
# catch either: `except servekit.errors.ServekitError` for "anything servekit refused",
# or the built-in class as before. Standard library only, no I/O: the sans-IO protocol
# modules import it too.
from __future__ import annotations

__all__ = ["ListenerError", "RequestTooSlow", "SendTimeout", "ServekitError"]


class ServekitError(Exception):
    """Base class of the exceptions servekit raises."""


class ListenerError(ServekitError, OSError):
    """A listening socket cannot be set up; the message names the address and the cause.

    An OSError, so code that catches a failed bind from TCPServer keeps working; errno is
    the system's (EADDRINUSE, ENOTSOCK, ...) where there is one.
    """

    def __str__(self) -> str:
        return str(self.strerror)


class RequestTooSlow(ServekitError, TimeoutError):
    """A client sent its request slower than min_request_rate allows once
    request_timeout has passed (servekit.features.readrate). A TimeoutError, so handlers
    and servers that treat a read timeout as the client's doing keep doing so."""


class SendTimeout(ServekitError, TimeoutError):
    """A send waited longer than the socket's timeout for the client to take the data
    (ConnectionSocket). A TimeoutError with socket.timeout's message, "timed out", as
    before; its own class only so that the server can log which way the connection
    stalled."""
