# Connection limits and timeouts: a cap on concurrent connections, connections that
# wait for their first request in the accept loop instead of on a thread, an idle
# timeout on every read, a per-request deadline handlers can read, and a line-length
# helper.
#
# Strategy. With a thread per connection, what a slow or silent client costs is a
# thread. A pool of 8 threads and 8 clients that connect and send nothing (or one byte
# every few seconds: "slowloris") would stall everyone else. So a new connection first
# waits in the loop (wait_for_request): parked in an edge-triggered epoll set that the
# loop watches, it costs a descriptor and a few hundred bytes, no thread. Only when its
# first bytes (or first complete line) have arrived is it handed to the concurrency
# mix-in; if that does not happen within request_timeout it is closed. Checking for a
# line uses recv(MSG_PEEK), so the bytes stay in the kernel for whatever reads next
# (a PROXY header parser, TLS, the handler): nothing is buffered here. The epoll set is
# edge-triggered so that peeked-but-unread data does not wake the loop again until
# more arrives.
#
# Once handed over, idle_timeout bounds every read (a client silent that long is cut
# off and logged, not reported as a handler error), and request_deadline() tells the
# handler when its request's time is up.
#
# The cap: when max_connections are open the server stops accepting (pause_accepting)
# and resumes when one closes, so it never accepts a connection only to drop it.
from __future__ import annotations

import heapq
import logging
import select
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO

from servekit.errors import ServekitError
from servekit.features.addresses import format_peer
from servekit.knobs import (
    Configurable,
    knob,
    optional_positive,
    parse_optional_float,
    parse_optional_int,
    positive,
)

if TYPE_CHECKING:
    from servekit.core.sockets import TCPServer

    _MixinBase = TCPServer
else:
    _MixinBase = object

__all__ = [
    "LimitsMixIn",
    "LineTooLongError",
    "readline_limited",
    "request_deadline",
    "time_left",
]

log = logging.getLogger("servekit.limits")

WAIT_MODES = ("none", "data", "line")

_local = threading.local()


def request_deadline() -> float | None:
    """The time.monotonic() by which the current request should be done, or None.

    Set for handlers run by a LimitsMixIn server with request_timeout; the deadline
    counts from when the connection was accepted.
    """
    return getattr(_local, "deadline", None)


def time_left() -> float | None:
    """Seconds until request_deadline(), never negative; None without a deadline."""
    deadline = request_deadline()
    return None if deadline is None else max(0.0, deadline - time.monotonic())


class LineTooLongError(ServekitError, ValueError):
    """A line exceeded the allowed length before its newline arrived."""


def readline_limited(rfile: BinaryIO | Any, max_length: int) -> bytes:
    """Read one line of at most max_length bytes (newline included) from rfile.

    Returns b"" at EOF, the line otherwise (without a newline only if the peer closed
    mid-line). Raises LineTooLongError if max_length bytes arrived without a newline:
    StreamRequestHandler's rfile.readline() alone would buffer without bound.
    """
    line: bytes = rfile.readline(max_length + 1)
    if len(line) > max_length:
        raise LineTooLongError(f"line longer than {max_length} bytes")
    return line


def _check_wait_mode(value: str) -> str | None:
    return None if value in WAIT_MODES else f"must be one of {', '.join(WAIT_MODES)}"


@dataclass(order=True)
class _Pending:
    deadline: float
    fd: int = field(compare=False)
    request: socket.socket = field(compare=False)
    client_address: Any = field(compare=False)
    accepted: float = field(compare=False)
    done: bool = field(default=False, compare=False)


class _WaitingRoom:
    """Connections parked until their first request arrives. Loop thread only."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.epoll = select.epoll()
        self.by_fd: dict[int, _Pending] = {}
        self.timers: list[_Pending] = []

    def fileno(self) -> int:
        return self.epoll.fileno()

    def __len__(self) -> int:
        return len(self.by_fd)

    def add(self, pending: _Pending) -> None:
        self.by_fd[pending.fd] = pending
        heapq.heappush(self.timers, pending)
        self.epoll.register(pending.fd, select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET)

    def remove(self, pending: _Pending) -> None:
        pending.done = True  # its heap entry is dropped lazily
        del self.by_fd[pending.fd]
        try:
            self.epoll.unregister(pending.fd)
        except (OSError, ValueError):
            pass

    def ready(self) -> Iterator[tuple[_Pending, int]]:
        for fd, events in self.epoll.poll(0):
            pending = self.by_fd.get(fd)
            if pending is not None:
                yield pending, events

    def next_deadline(self) -> float | None:
        while self.timers and self.timers[0].done:
            heapq.heappop(self.timers)
        return self.timers[0].deadline if self.timers else None

    def expired(self, now: float) -> Iterator[_Pending]:
        while self.timers and (self.timers[0].done or self.timers[0].deadline <= now):
            pending = heapq.heappop(self.timers)
            if not pending.done:
                yield pending

    def close(self) -> list[_Pending]:
        left = list(self.by_fd.values())
        for pending in left:
            self.remove(pending)
        self.epoll.close()
        return left


class LimitsMixIn(Configurable, _MixinBase):
    """Connection cap, first-request wait in the loop, idle timeout, request deadline.

    Put it before the concurrency mix-in (and before ProxyProtocolMixIn and TLSMixIn):
    ``class Server(LimitsMixIn, ThreadPoolMixIn, TCPServer)``. Stream servers only;
    on datagram servers it does nothing.
    """

    max_connections: int | None = knob(
        None,
        "connections open at once; at the cap the server stops accepting (None: no cap)",
        check=optional_positive,
        parse=parse_optional_int,
        section="limits",
    )
    wait_for_request: str = knob(
        "data",
        "hold new connections in the loop, without a thread, until: 'data' (first bytes "
        "arrived), 'line' (a whole first line), or 'none' (hand over at once; for "
        "protocols where the server speaks first)",
        check=_check_wait_mode,
        section="limits",
    )
    request_timeout: float | None = knob(
        30.0,
        "seconds from accept for the first request to arrive (longer: closed); also the "
        "handler's request_deadline() (None: no limit)",
        check=optional_positive,
        parse=parse_optional_float,
        section="limits",
    )
    idle_timeout: float | None = knob(
        300.0,
        "seconds a connection may stay silent while a handler reads (None: forever)",
        check=optional_positive,
        parse=parse_optional_float,
        section="limits",
    )
    max_line_length: int = knob(
        65536,
        "longest first line accepted with wait_for_request='line', newline included",
        check=positive,
        section="limits",
    )

    _CAP = "connection cap"

    # -- bookkeeping -----------------------------------------------------------------------

    def _limits(self) -> _LimitsState:
        state: _LimitsState | None = self.__dict__.get("_servekit_limits")
        if state is None:
            state = self.__dict__["_servekit_limits"] = _LimitsState()
        return state

    @property
    def connections(self) -> int:
        """Connections open now: waiting for a request or being handled."""
        return len(self._limits().open)

    @property
    def waiting_connections(self) -> int:
        """Connections parked in the loop, waiting for their first request."""
        room = self._limits().room
        return 0 if room is None else len(room)

    def _is_stream(self) -> bool:
        return bool(self.socket_type == socket.SOCK_STREAM)

    # -- hooks ---------------------------------------------------------------------------

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._is_stream():
            super().process_request(request, client_address)
            return
        state = self._limits()
        with state.lock:
            state.open.add(id(request))
            if self.max_connections is not None and len(state.open) >= self.max_connections:
                self.pause_accepting(self._CAP)
        now = time.monotonic()
        deadline = now + self.request_timeout if self.request_timeout is not None else None
        state.deadlines[id(request)] = deadline
        if self.wait_for_request == "none" or self._loop_wakeup() is None:
            # No loop to park it in (handle_request()): hand over at once.
            self._set_idle_timeout(request)
            super().process_request(request, client_address)
            return
        room = state.room
        if room is None:
            room = state.room = _WaitingRoom(self.wait_for_request)
            self._watch(room, self._on_waiting_ready)
        room.add(
            _Pending(
                deadline if deadline is not None else float("inf"),
                request.fileno(),
                request,
                client_address,
                now,
            )
        )

    def _on_waiting_ready(self) -> None:
        room = self._limits().room
        if room is None:
            return
        for pending, events in list(room.ready()):
            verdict = self._first_request_verdict(pending, events, room.mode)
            if verdict is None:
                continue  # not yet: wait for more bytes (the epoll set is edge-triggered)
            room.remove(pending)
            if verdict == "ready":
                self._hand_over(pending)
            else:
                self._drop(pending, verdict)

    def _first_request_verdict(self, pending: _Pending, events: int, mode: str) -> str | None:
        """'ready', None (wait), or the reason to close the connection."""
        if mode == "data" and events & select.EPOLLIN:
            return "ready"  # the handler reads, and sees EOF or errors itself
        limit = self.max_line_length if mode == "line" else 1
        try:
            peeked = pending.request.recv(limit, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None
        except OSError as exc:
            return f"error before its first request: {exc.strerror or exc}"
        if not peeked:
            return ""  # closed before sending anything: nothing worth logging
        if mode == "data" or b"\n" in peeked:
            return "ready"
        if len(peeked) >= limit:
            return f"first line longer than {limit} bytes"
        if events & (select.EPOLLRDHUP | select.EPOLLHUP):
            return "ready"  # a final line without newline: the handler gets it, then EOF
        return None

    def _set_idle_timeout(self, request: socket.socket) -> None:
        # Set at hand-over, not while parked: a socket with a timeout makes Python
        # poll() before every recv, and the peek in the loop must never wait.
        if self.idle_timeout is not None:
            request.settimeout(self.idle_timeout)

    def _hand_over(self, pending: _Pending) -> None:
        try:
            self._set_idle_timeout(pending.request)
            super().process_request(pending.request, pending.client_address)
        except Exception:
            self.handle_error(pending.request, pending.client_address)
            self.shutdown_request(pending.request)

    def _drop(self, pending: _Pending, reason: str) -> None:
        if reason:
            log.info("%s: %s; closing", format_peer(pending.client_address), reason)
        self.shutdown_request(pending.request)

    def _next_deadline(self) -> float | None:
        room = self._limits().room
        mine = None if room is None else room.next_deadline()
        theirs = super()._next_deadline()
        if mine is None or mine == float("inf"):
            return theirs
        return mine if theirs is None else min(mine, theirs)

    def service_actions(self) -> None:
        room = self._limits().room
        if room is not None:
            now = time.monotonic()
            for pending in list(room.expired(now)):
                room.remove(pending)
                self._drop(
                    pending,
                    f"no request within request_timeout={self.request_timeout}s",
                )
        super().service_actions()

    def finish_request(self, request: Any, client_address: Any) -> None:
        if not self._is_stream():
            super().finish_request(request, client_address)
            return
        _local.deadline = self._limits().deadlines.get(id(request))
        try:
            super().finish_request(request, client_address)
        except TimeoutError:
            # A silent client is the client's doing, not a handler bug: one log line
            # instead of handle_error()'s traceback.
            log.info(
                "%s: silent for more than idle_timeout=%ss; closing",
                format_peer(client_address),
                self.idle_timeout,
            )
        finally:
            _local.deadline = None

    def shutdown_request(self, request: Any) -> None:
        state = self._limits()
        key = id(request)
        try:
            super().shutdown_request(request)
        finally:
            with state.lock:
                if key in state.open:
                    state.open.discard(key)
                    state.deadlines.pop(key, None)
                    if self.max_connections is not None and len(state.open) < self.max_connections:
                        self.resume_accepting(self._CAP)

    def server_close(self) -> None:
        state = self._limits()
        room, state.room = state.room, None
        if room is not None:
            self._unwatch(room)
            # These connections were accepted: a graceful stop serves them too. The
            # concurrency mix-in's server_close() (below) drains them with the rest,
            # bounded by its drain timeout and the idle timeout on their reads.
            for pending in room.close():
                self._hand_over(pending)
        super().server_close()


class _LimitsState:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.open: set[int] = set()
        self.deadlines: dict[int, float | None] = {}
        self.room: _WaitingRoom | None = None
