# The serve loop's wake-up channel. Owns one file descriptor (an eventfd on Linux, a
# socketpair elsewhere) that other threads write to so that a loop blocked in select()
# returns at once: this is what makes shutdown() prompt instead of waiting for
# poll_interval. notify() is safe from any thread and from a signal handler.
from __future__ import annotations

import os
import socket

__all__ = ["Wakeup"]


class Wakeup:
    """A level-triggered wake-up flag that a selector can wait on."""

    __slots__ = ("_read_fd", "_reader", "_writer")

    def __init__(self) -> None:
        self._reader: socket.socket | None = None
        self._writer: socket.socket | None = None
        if hasattr(os, "eventfd"):
            # One descriptor instead of two; the counter saturates instead of filling a
            # buffer, so notify() can never block or fail with EAGAIN in practice.
            self._read_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        else:  # pragma: no cover - non-Linux
            self._reader, self._writer = socket.socketpair()
            self._reader.setblocking(False)
            self._writer.setblocking(False)
            self._read_fd = self._reader.fileno()

    def fileno(self) -> int:
        return self._read_fd

    def notify(self) -> None:
        """Make the channel readable. Never blocks; a closed channel is ignored.

        Callers that may race with close() must serialise the two (the server does so
        under its lock): a descriptor number is reused as soon as it is closed.
        """
        if self._read_fd < 0:
            return
        try:
            if self._writer is None:
                os.eventfd_write(self._read_fd, 1)
            else:  # pragma: no cover - non-Linux
                self._writer.send(b"\0")
        except (BlockingIOError, OSError, ValueError):
            # Already signalled (buffer full / counter at max) or closed during a race
            # with close(): either way the loop has been or needs no more waking.
            pass

    def drain(self) -> None:
        """Consume every pending notification."""
        try:
            if self._reader is None:
                os.eventfd_read(self._read_fd)
            else:  # pragma: no cover - non-Linux
                while self._reader.recv(4096):
                    pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        if self._reader is None:
            if self._read_fd >= 0:
                os.close(self._read_fd)
        else:  # pragma: no cover - non-Linux
            self._reader.close()
            if self._writer is not None:
                self._writer.close()
        self._read_fd = -1
