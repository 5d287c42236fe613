# Connection limits and timeouts: a cap on concurrent connections, the wait for each
# request in the serving loop instead of on a thread, an idle timeout on every read and
# between messages, a per-request deadline handlers can read, and a line-length helper.
#
# Strategy. With a thread per connection, what a slow or silent client costs is a
# thread. A pool of 8 threads and 8 clients that connect and send nothing (or one byte
# every few seconds: "slowloris") would stall everyone else. So a connection waits for
# its request as the last preamble stage of the connection pipeline (WaitForRequest):
# a descriptor in the loop's epoll set, no thread. Only when its first bytes (or first
# complete line, or whole HTTP request head) have arrived does a handler run; if that
# does not happen within request_timeout it is closed. What to wait for is the handler's
# to say (wait_for_request="auto", the default: see request_wait_of()): an http.server
# handler given a thread on its first bytes would hold it for as long as a client takes
# to trickle in its headers. A parked connection's later messages are dispatched on
# their first bytes, except that a whole head is awaited again before every HTTP request
# (WaitForRequest.each_message); idle_timeout bounds how long a connection may stay
# parked (park_timeout()). Checking for a line or a head uses recv(MSG_PEEK), so the
# bytes stay in the kernel for the handler: nothing is buffered here. Over TLS the
# kernel holds encrypted records, so the request is decrypted ahead instead and kept on
# the socket for the handler (servekit.features.tlssocket).
#
# While a handler runs, idle_timeout bounds every read (a client silent that long is
# cut off and logged, not reported as a handler error), request_deadline() tells the
# handler when its request's time is up, and past it a message handler's reads must keep
# up min_request_rate (servekit.features.readrate): a trickled request body holds a
# thread for about request_timeout, not for as long as the client likes.
#
# The cap: when max_connections are open the server stops accepting (pause_accepting)
# and resumes when one closes, so it never accepts a connection only to drop it.
from __future__ import annotations

import functools
import logging
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any, BinaryIO

from servekit.errors import ServekitError
from servekit.features.addresses import format_peer
from servekit.features.base import ServerFeature
from servekit.features.connection import Connection, current_connection
from servekit.features.messages import request_wait_of
from servekit.features.pipeline import (
    PEEK_NOW,
    Stage,
    StageError,
    Step,
    buffered_request,
    peek_ready,
)
from servekit.features.readrate import ReadRate
from servekit.knobs import (
    knob,
    optional_positive,
    parse_optional_float,
    parse_optional_int,
    positive,
)

__all__ = [
    "LimitsMixIn",
    "LineTooLongError",
    "WaitForRequest",
    "readline_limited",
    "request_deadline",
    "time_left",
]

log = logging.getLogger("servekit.limits")
_monotonic = time.monotonic

WAIT_MODES = ("none", "data", "line", "head", "auto")
# Bytes peeked first when waiting for a line or a head (see WaitForRequest.ready).
_FIRST_PEEK = 2048
# A request head is looked for in this many bytes at most; a longer one goes to the
# handler as it is (http.server answers it with 431 or 400 itself). 64 KiB is
# http.server's own limit for one header line.
HEAD_LIMIT = 65536


def request_deadline() -> float | None:
    """The time.monotonic() by which the current request should be done, or None.

    Set for handlers run by a LimitsMixIn server with request_timeout. For a
    connection's first message the deadline counts from accept(); for later messages of
    a parked connection, from when the message's first bytes arrived.
    """
    connection = current_connection()
    return None if connection is None else connection.request_deadline


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


def _verdict(
    data: bytes, closed: bool, complete: Callable[[bytes, int], bool], limit: int, head: bool
) -> str:
    """ready()'s answer for bytes already read from the socket: decrypted ahead (TLS), or
    read by the handler's rfile with the last request (pending)."""
    if closed and not data:
        return ""  # closed before sending anything
    if complete(data, len(data)) or (head and len(data) >= limit) or closed:
        # Whole, too long for the wait, or all the client will send: the handler reads
        # it (and then EOF). Waiting on a closed socket would report it readable forever.
        return "ready"
    if len(data) >= limit:
        return f"line longer than {limit} bytes"
    # Part of it: wait, edge-triggered, for more (as for a plain socket's partial line).
    return "more" if data else "wait"


def _pending_verdict(
    request: Any, pending: bytes, complete: Callable[[bytes, int], bool], limit: int, head: bool
) -> str:
    # Part of the request is in the handler's rfile already (read with the last one): it
    # and what the kernel holds make the request, which no peek alone would see.
    try:
        more = _peek(request, limit, PEEK_NOW)
        closed = not more
    except BlockingIOError:
        more, closed = b"", False
    except OSError:
        return "ready"  # reset: the handler reads what it has, then the error
    return _verdict(pending + more, closed, complete, limit, head)


# socket.socket's own methods for the peeks: never a wait (ConnectionSocket's would wait
# out the handler's timeout for bytes that are not there), and one call less.
_peek = socket.socket.recv
_peek_into = socket.socket.recv_into


def _line_complete(data: bytes | bytearray, got: int) -> bool:
    return data.find(b"\n", 0, got) >= 0


def _head_complete(data: bytes | bytearray, got: int) -> bool:
    """An HTTP request head is in data[:got]: its request line and headers, up to the
    empty line that ends them (CRLF or bare LF, as http.server accepts both). A first
    line without an HTTP version (HTTP/0.9, or not HTTP at all) is a request by itself."""
    first = data.find(b"\n", 0, got)
    if first < 0:
        return False
    if data.find(b"HTTP/", 0, first) < 0:
        return True
    return data.find(b"\n\r\n", first - 1, got) >= 0 or data.find(b"\n\n", first - 1, got) >= 0


class WaitForRequest(Stage):
    """The last preamble stage: wait, without a thread, until a request has arrived."""

    name = "wait"

    def __init__(
        self,
        mode: str,
        request_timeout: float | None,
        limit: int,
        handler_class: Callable[[], Any] | None = None,
    ) -> None:
        #: none, data, line, head, or auto: what handler_class() declares (see
        #: servekit.features.messages.request_wait_of), looked up per connection so that
        #: a reload that changes the handler class changes the wait too.
        self.mode = mode
        self._handler_class = handler_class
        self._resolved: tuple[Any, str] = (None, "data")
        self.request_timeout = request_timeout
        # Formatted once: every connection enters this stage.
        self._reason = f"no request within request_timeout={request_timeout}s"
        self.limit = limit
        # One peek buffer per thread: the loop's is reused for every message, and pool
        # threads get their own (they run the wait before a parked connection's next
        # request, and stages run blocking on servers without a pipeline).
        self._buffers = threading.local()

    @property
    def each_message(self) -> bool:  # type: ignore[override]
        # A whole HTTP head is awaited before every request of a keep-alive connection,
        # not only the first: a peek per request is little next to what an HTTP request
        # costs, and a client that sent one good request could otherwise trickle the
        # next and hold a thread. A line is awaited for the first message only: in a
        # line protocol a message costs about as much as the peek.
        return self.mode_now() == "head"

    def mode_now(self) -> str:
        """The mode in force: mode itself, or for "auto" what the handler class declares."""
        if self.mode != "auto":
            return self.mode
        handler_class = None if self._handler_class is None else self._handler_class()
        resolved = self._resolved
        if resolved[0] is not handler_class:
            mode = request_wait_of(handler_class)
            # An invalid declaration is refused when the server is created; one brought
            # in by a reload falls back to the plain wait.
            valid = mode in WAIT_MODES and mode != "auto"
            resolved = self._resolved = (handler_class, mode if valid else "data")
        return resolved[1]

    def timeout(self) -> float | None:
        return self.request_timeout

    def timeout_reason(self) -> str:
        return self._reason

    def step(self, connection: Connection) -> Step:
        # The events that woke the connection tell a client that closed after part of a
        # line (its last line, without a newline) from one still sending it.
        verdict = self.ready(connection, connection.events)
        if verdict == "ready":
            return Step.DONE
        if verdict == "wait":
            return Step.READ
        if verdict == "more":
            return Step.MORE
        # "" means the client closed before sending anything: nothing worth logging.
        if verdict:
            raise StageError(verdict)
        raise StageError("closed before sending a request", logging.DEBUG)

    def fail(self, connection: Connection, error: StageError) -> None:
        log.log(error.level, "%s: %s; closing", format_peer(connection.peer), error.reason)

    def _tls_ready(
        self,
        request: Any,
        complete: Callable[[bytes, int], bool],
        limit: int,
        head: bool,
        pending: bytes,
    ) -> str:
        # Over TLS the kernel holds encrypted records: the request is decrypted ahead
        # and kept on the socket for the handler (servekit.features.tlssocket), after
        # what the handler's rfile holds already (pending).
        try:
            data, closed = request.read_ahead(limit)
        except (ConnectionResetError, ConnectionAbortedError, ssl.SSLEOFError):
            return "ready" if pending else ""  # gone: a normal event, not worth a line
        except OSError as exc:
            return f"error before its request: {exc.strerror or exc}"
        return _verdict(pending + data, closed, complete, limit, head)

    def ready(self, connection: Connection, events: int) -> str:
        """'ready', 'wait' (nothing yet), 'more' (part of a line or head), '' (the
        client closed), or the reason to close the connection."""
        mode = self.mode_now()
        if mode == "none":
            return "ready"
        request = connection.request
        tls = isinstance(request, ssl.SSLSocket)
        # Between messages: what the handler's rfile read with the last request (a
        # pipelining client) is the start of this one, where no peek sees it.
        pending = b"" if connection.handler is None else buffered_request(connection)
        if mode == "data" or (tls and not hasattr(request, "read_ahead")):
            if pending:
                return "ready"
            return peek_ready(connection)  # the handler reads, and sees EOF or errors itself
        head = mode == "head"
        complete = _head_complete if head else _line_complete
        limit = HEAD_LIMIT if head else self.limit
        if tls:
            return self._tls_ready(request, complete, limit, head, pending)
        if pending:
            return _pending_verdict(request, pending, complete, limit, head)
        try:
            # A small peek first, into a reused buffer: the whole line (or head) is almost
            # always in it, and peeking 64 KiB would allocate that much on every message.
            buffer = getattr(self._buffers, "buffer", None)
            if buffer is None:
                buffer = self._buffers.buffer = bytearray(_FIRST_PEEK)
            got = _peek_into(request, buffer, _FIRST_PEEK, PEEK_NOW)
            if got and complete(buffer, got):
                return "ready"
            if got == _FIRST_PEEK and limit > _FIRST_PEEK:
                peeked = _peek(request, limit, PEEK_NOW)
                got = len(peeked)
                if complete(peeked, got):
                    return "ready"
        except BlockingIOError:
            return "wait"
        except (ConnectionResetError, ConnectionAbortedError):
            return ""  # the client went away: a normal event, not worth a log line
        except OSError as exc:
            return f"error before its request: {exc.strerror or exc}"
        if not got:
            return ""
        if got >= limit:
            if head:
                return "ready"  # a huge head: the handler's own limits answer it
            return f"line longer than {self.limit} bytes"
        if events & (select.EPOLLRDHUP | select.EPOLLHUP):
            return "ready"  # a final line without newline: the handler gets it, then EOF
        return "more"


def _message_limits(
    idle: float | None, limit: float | None, min_rate: float | None
) -> Callable[[Connection], None]:
    """LimitsMixIn's work before each message: the read timeout idle, the handler's
    request_deadline() (limit after accept for the first message, after the message
    started for the others) and the minimum read rate."""

    def limit_message(connection: Connection) -> None:
        request = connection.request
        if limit is None:
            deadline = None
        elif connection.messages <= 1:
            deadline = connection.accepted_at + limit
        else:
            deadline = _monotonic() + limit
        connection.request_deadline = deadline
        if isinstance(request, ReadRate):
            # A message handler reads a request: at least min_request_rate bytes a
            # second once its deadline passed (servekit.features.readrate). Not a
            # handler that loops in handle(): its "request" is the whole session.
            rate = min_rate if connection.handler_factory is not None else None
            request.begin_message(idle, deadline, rate)
        elif idle is not None and request.gettimeout() != idle:
            request.settimeout(idle)

    return limit_message


class LimitsMixIn(ServerFeature):
    """Connection cap, request waits in the loop, idle timeout, request deadline.

    Put it before ProxyProtocolMixIn, TLSMixIn and the concurrency mix-in:
    ``class Server(LimitsMixIn, ThreadPoolMixIn, TCPServer)``. Stream servers only;
    on datagram servers it does nothing.
    """

    feature_rank = 20

    max_connections: int | None = knob(
        None,
        "connections open at once; at the cap the server stops accepting (None: no cap)",
        check=optional_positive,
        parse=parse_optional_int,
        section="limits",
    )
    wait_for_request: str = knob(
        "auto",
        "hold new connections in the loop, without a thread, until: 'data' (bytes of "
        "the first request arrived), 'line' (a whole line), 'head' (a whole HTTP request "
        "head), 'none' (start the handler at once; for protocols where the server speaks "
        "first), or 'auto' (what the handler class declares in its own wait_for_request; "
        "http.server's handlers: head; any other: data)",
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
        "seconds a connection may stay silent, while a handler reads or parked between "
        "messages (None: forever)",
        check=optional_positive,
        parse=parse_optional_float,
        section="limits",
    )
    min_request_rate: float | None = knob(
        500.0,
        "bytes per second a client must keep up, after request_timeout, while a message "
        "handler reads its request: a read that would wait past request_deadline() plus "
        "1 s per min_request_rate bytes read is cut off (None: idle_timeout alone bounds "
        "reads)",
        check=optional_positive,
        parse=parse_optional_float,
        section="limits",
    )
    max_line_length: int = knob(
        65536,
        "longest line accepted with wait_for_request='line', newline included",
        check=positive,
        section="limits",
    )

    _CAP = "connection cap"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._limits = _Counter()
        super().__init__(*args, **kwargs)
        if self.wait_for_request == "auto":
            declared = request_wait_of(self.RequestHandlerClass)
            if declared not in WAIT_MODES or declared == "auto":
                self.server_close()
                raise ValueError(
                    f"{self.RequestHandlerClass!r} declares wait_for_request = {declared!r}; "
                    "must be one of none, data, line, head"
                )

    @property
    def connections(self) -> int:
        """Connections open now: waiting in the loop or being handled."""
        return len(self._limits.open)

    def _is_stream(self) -> bool:
        return bool(self.socket_type == socket.SOCK_STREAM)

    # -- hooks ---------------------------------------------------------------------------

    def connection_stages(self) -> list[Stage]:
        stages = super().connection_stages()
        if self._is_stream() and self.wait_for_request != "none":
            # Last: the PROXY header and the TLS handshake come before the request.
            stages.append(
                WaitForRequest(
                    self.wait_for_request,
                    self.request_timeout,
                    self.max_line_length,
                    # A C callable, not a lambda: called per connection.
                    functools.partial(getattr, self, "RequestHandlerClass"),
                )
            )
        return stages

    def process_request(self, request: Any, client_address: Any) -> None:
        if self._is_stream():
            # Counted here, on the loop's thread, before anything else can accept:
            # the cap holds exactly.
            counter = self._limits
            if self.max_connections is None:
                counter.open.add(id(request))  # atomic; no cap to keep consistent with it
            else:
                with counter.lock:
                    counter.open.add(id(request))
                    if len(counter.open) >= self.max_connections:
                        self.pause_accepting(self._CAP)
        super().process_request(request, client_address)

    def park_timeout(self) -> float | None:
        # A parked connection is a silent one too: idle_timeout bounds it the same way.
        return self.idle_timeout

    def message_hooks(self) -> list[Callable[[Connection], object]]:
        hooks = super().message_hooks()
        if self._is_stream():
            limits = (self.idle_timeout, self.request_timeout, self.min_request_rate)
            hooks.append(_message_limits(*limits))
        return hooks

    def connection_closed(self, connection: Connection) -> None:
        if id(connection.sock) in self._limits.open:
            # Counted by the socket accept() returned. Usually shutdown_request() forgot
            # it already; not if the handler got another object (TLS: the SSLSocket),
            # or an override of shutdown_request() did not reach ours.
            self._forget(connection.sock)
        super().connection_closed(connection)

    def shutdown_request(self, request: Any) -> None:
        try:
            super().shutdown_request(request)
        finally:
            self._forget(request)  # a connection refused or failed before the pipeline

    def _forget(self, request: Any) -> None:
        counter = self._limits
        if self.max_connections is None:
            counter.open.discard(id(request))
            return
        with counter.lock:
            if id(request) in counter.open:
                counter.open.discard(id(request))
                if len(counter.open) < self.max_connections:
                    self.resume_accepting(self._CAP)


class _Counter:
    """The open connections, by the id of the socket accept() returned."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.open: set[int] = set()
