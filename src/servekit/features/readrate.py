# A minimum rate for reading a request: a client that trickles its request body holds
# a thread for request_timeout, not for as long as it likes.
#
# Strategy. The request wait (servekit.features.limits.WaitForRequest) keeps a client
# that trickles its request *head* in the loop, without a thread. A body cannot be
# awaited there (it may be gigabytes, and the handler decides how to read it), so once
# the handler runs, every read is bounded by idle_timeout only: a client that sends one
# byte every idle_timeout - 1 seconds holds a thread for as long as its body lasts.
# Apache's mod_reqtimeout answers this with a deadline that grows with the data
# received ("body=20,MinRate=500"); so does servekit: while a message handler reads a
# request, a read that would wait past
#
#     request_deadline() + bytes read for this message / min_request_rate
#
# raises RequestTooSlow (a TimeoutError) instead. A fast upload is never cut (each
# second of it buys far more than a second), a slow one is cut about request_timeout
# after it started: 1 byte every few seconds is a few bytes more than nothing.
#
# Only waits are checked: a read whose bytes are there costs one addition. The limit is
# armed per message (begin_message(), from LimitsMixIn's message hook) for handlers run
# message by message (a handler that loops in handle() for the connection's life keeps
# only idle_timeout: its "request" is the whole session). ReadRate is mixed into the
# two sockets handlers get on pool servers, ConnectionSocket and TLSConnectionSocket;
# each counts the bytes its reads return and asks read_limit() how long a wait may last.
from __future__ import annotations

import time
from typing import TYPE_CHECKING

from servekit.errors import RequestTooSlow

__all__ = ["ReadRate"]

_monotonic = time.monotonic


class ReadRate:
    """Mix-in for a socket class: begin_message() and the bookkeeping behind it. The class
    gives every instance _read_until = None, _read_rate = 0.0 and _read_bytes = 0."""

    if not TYPE_CHECKING:
        __slots__ = ()  # see servekit.features.heads.HeadHolding

    #: request_deadline() of the message being read (None: reads are not limited).
    _read_until: float | None
    #: Bytes per second of data that buy one more second.
    _read_rate: float
    #: Bytes the reads returned since begin_message().
    _read_bytes: int

    def begin_message(
        self, timeout: float | None, deadline: float | None, min_rate: float | None
    ) -> None:
        """Before each message (LimitsMixIn's per-message hook): the read timeout, and
        a bound on the waits of the reads that follow.

        timeout: the handler's read timeout (idle_timeout), set if it differs (a handler
        may have changed it during its last message); None leaves it as it is. The
        waits are bounded until deadline (a time.monotonic()) plus one second per
        min_rate bytes the reads return; None for either: no bound. One call does both,
        since it runs on every message.
        """
        if timeout is not None and self.gettimeout() != timeout:  # type: ignore[attr-defined]
            self.settimeout(timeout)  # type: ignore[attr-defined]
        self._read_bytes = 0
        if deadline is None or not min_rate:
            self._read_until = None
        else:
            self._read_until = deadline
            self._read_rate = float(min_rate)

    def restart_reads(self, seconds: float) -> None:
        """The server asks for the request body only now ("100 Continue"): a client told
        to wait for that is not slow for having waited, so a bound in force starts again,
        seconds (request_timeout) from now, with no bytes counted."""
        if self._read_until is not None:
            self._read_bytes = 0
            self._read_until = _monotonic() + seconds

    def read_limit(self) -> float | None:
        """The time.monotonic() past which a read must not wait, or None."""
        until = self._read_until
        if until is None:
            return None
        return until + self._read_bytes / self._read_rate

    def too_slow(self) -> RequestTooSlow:
        """The error for a read whose limit passed."""
        self._read_until = None  # one error per message: the handler's cleanup may read
        return RequestTooSlow(
            f"request too slow: {self._read_bytes} bytes read by the request deadline "
            f"(request_timeout, plus 1 s per {self._read_rate:g} bytes: min_request_rate)"
        )
