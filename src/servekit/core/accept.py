# Accepting: what to do when accept() (or recvfrom() on a datagram server) fails (the
# errno sets and the back-off policy for resource exhaustion), and accept_as(), an
# accept() that returns a socket.socket subclass of the caller's choosing.
#
# The stdlib swallows every OSError from get_request() and goes straight back to
# select(); when the process is out of descriptors the listening socket stays readable,
# so that loop spins at 100 % CPU and never gives the rest of the process a chance to
# close anything. We tell the two kinds of failure apart:
#   * per-connection errors: the peer went away between SYN and accept, a firewall
#     refused it, ... Nothing to do; the next accept() is independent.
#   * resource exhaustion (EMFILE, ENFILE, ENOBUFS, ENOMEM): retrying at once cannot
#     succeed. Stop watching the listener for a growing delay, log once per interval,
#     and resume; pending connections wait in the kernel backlog meanwhile.
from __future__ import annotations

import errno
import logging
import socket
import time
from typing import Any

from servekit.core.kinds import family_of, type_of

__all__ = ["RESOURCE_ERRNOS", "AcceptBackoff", "accept_as"]

log = logging.getLogger("servekit.accept")

# Same classification as trio's _highlevel_open_tcp_listeners / _highlevel_socket.
RESOURCE_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("EMFILE", "ENFILE", "ENOMEM", "ENOBUFS")
    if hasattr(errno, name)
)

# The first pause is short because descriptors often free up within milliseconds when
# requests finish; the cap keeps a long exhaustion from costing more than one wasted
# accept() per half second.
BACKOFF_MIN = 0.005
BACKOFF_MAX = 0.5
# One warning per this many seconds, with the count of failures in between: enough to
# see in the logs, never enough to fill a disk.
LOG_INTERVAL = 10.0


class AcceptBackoff:
    """Tracks resource-exhaustion failures of accept() and when to try again.

    Not thread-safe: only the serving loop touches it.
    """

    __slots__ = ("_delay", "_last_log", "_suppressed", "resume_at")

    def __init__(self) -> None:
        self._delay = 0.0
        self._last_log = float("-inf")
        self._suppressed = 0
        #: monotonic time before which the listener must not be polled, or None.
        self.resume_at: float | None = None

    @staticmethod
    def is_resource_error(exc: OSError) -> bool:
        return exc.errno in RESOURCE_ERRNOS

    def failed(self, exc: OSError, now: float | None = None) -> float:
        """Record a resource failure; return the delay before the next attempt."""
        now = time.monotonic() if now is None else now
        self._delay = BACKOFF_MIN if self._delay == 0.0 else min(self._delay * 2, BACKOFF_MAX)
        self.resume_at = now + self._delay
        if now - self._last_log >= LOG_INTERVAL:
            more = f" ({self._suppressed} more since the last report)" if self._suppressed else ""
            log.warning(
                "accept() failed: %s; pausing accepts for %.3fs%s",
                exc.strerror or exc,
                self._delay,
                more,
            )
            self._last_log = now
            self._suppressed = 0
        else:
            self._suppressed += 1
        return self._delay

    @property
    def active(self) -> bool:
        """True from a resource failure until the next successful accept."""
        return self._delay != 0.0

    def succeeded(self) -> None:
        if self._delay:
            log.info("accept() recovered after resource exhaustion")
        self._delay = 0.0
        self.resume_at = None

    def paused(self, now: float | None = None) -> bool:
        if self.resume_at is None:
            return False
        now = time.monotonic() if now is None else now
        if now >= self.resume_at:
            self.resume_at = None
            return False
        return True


def accept_as(listener: socket.socket, kind: type[socket.socket]) -> tuple[socket.socket, Any]:
    """listener.accept(), returning a kind (a socket.socket subclass), without the two
    enum conversions (family, type) socket.accept() makes per call.

    The accepted socket is blocking, as socket.accept() leaves it when no default
    timeout is set; with one, accept() itself is used (and kind is not).
    """
    if socket.getdefaulttimeout() is not None:
        return listener.accept()
    # _accept() is the C method socket.accept() itself wraps (socket.py): the documented
    # accept() builds the same socket, reading family and type through the properties.
    fd, address = listener._accept()  # type: ignore[attr-defined]
    return kind(family_of(listener), type_of(listener), listener.proto, fd), address
