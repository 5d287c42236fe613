# The per-connection record: everything the pipeline knows about one accepted stream
# connection, in one object that every stage reads and writes.
#
# Strategy. "Where is this connection now, and who may touch it?" is answered by one
# field, ``state``, and one rule: a connection has exactly one owner at a time.
#
#   ADMITTED  accepted; the loop is about to run its preamble        owner: the loop
#   PREAMBLE  in a preamble stage (PROXY header, TLS handshake,
#             waiting for the first request), no thread held         owner: the loop
#   HANDLING  a pool thread runs a stage step or the handler         owner: that thread
#   PARKED    between two messages, waiting for bytes, no thread     owner: whoever
#             (in the pipeline's parked_by_fd table)                 pops it from the
#                                                                    table
#   CLOSED    closed; the record is kept only by whoever logs it     owner: nobody
#
# Ownership passes from the loop to a thread by pool.submit(), back to the loop by arming
# the connection's descriptor in the loop's epoll set, and to the parking table by
# entering it there and arming the descriptor in the parking epoll set; a thread that
# gets its event, the idle sweep and the shutdown sequence each pop it from the table,
# and only the one that gets it acts. The thread sets every field first and arms last,
# and never touches the record after arming, so no lock is needed. Stages and
# handlers read the record (peer, real client, TLS and PROXY details, counters) through
# current_connection() on the thread that runs them.
from __future__ import annotations

import enum
import select
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import ssl

    from servekit.protocols.proxy_header import ProxyHeader

__all__ = ["OUTCOMES", "Connection", "ConnectionState", "current_connection"]

#: Every value of Connection.outcome: how a connection ended.
OUTCOMES = (
    "done",  # the handler finished it (or the client closed between messages)
    "client-gone",  # reset or broken pipe while the handler worked
    "read-timeout",  # silent for longer than the handler's socket timeout
    "idle-timeout",  # parked between messages for longer than idle_timeout
    "stage-timeout",  # a preamble stage (PROXY header, TLS, first request) took too long
    "stage-failed",  # a preamble stage failed: bad header, failed handshake, ...
    "error",  # the handler raised: handle_error() reported it
    "shutdown",  # closed by the shutdown sequence
)


class ConnectionState(enum.Enum):
    ADMITTED = "admitted"
    PREAMBLE = "preamble"
    HANDLING = "handling"
    PARKED = "parked"
    CLOSED = "closed"


#: The loop-set mask of a connection waiting for the rest of a line or head: readable,
#: edge-triggered, without one-shot (new bytes wake it, the queued ones do not).
WAIT_MORE_MASK = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET


class Connection:
    """One accepted stream connection, from accept() to close."""

    __slots__ = (
        "accepted_at",
        "client_address",
        "closing",
        "deadline",
        "deadline_reason",
        "events",
        "fd",
        "handler",
        "handler_factory",
        "loop_mask",
        "message_ended",
        "messages",
        "outcome",
        "parking_mask",
        "peer",
        "probe",
        "probed",
        "proxy_buffer",
        "proxy_header",
        "request",
        "request_deadline",
        "sock",
        "stage",
        "state",
        "timeout",
        "tls",
    )

    def __init__(self, sock: socket.socket, peer: Any) -> None:
        #: The socket accept() returned. Owned by the record until close.
        self.sock = sock
        #: Its descriptor, the key of the loop's epoll set (kept after close for logs).
        self.fd = sock.fileno()
        #: The address accept() returned: the client, or the proxy in front of it.
        self.peer = peer
        #: The address the handler sees: the real client behind a PROXY header, else peer.
        self.client_address: Any = peer
        #: What the handler gets as self.request: sock, or the ssl.SSLSocket over it.
        self.request: Any = sock
        self.state = ConnectionState.ADMITTED
        #: Index of the preamble stage the connection is in (len(stages): all done).
        self.stage = 0
        self.accepted_at = time.monotonic()
        #: time.monotonic() by which the current wait must end (None: no limit), and
        #: what to log if it does not.
        self.deadline: float | None = None
        self.deadline_reason = ""
        #: The handler's request_deadline() for the message being handled.
        self.request_deadline: float | None = None
        #: The PROXY header, once read; the header bytes taken so far while it trickles in.
        self.proxy_header: ProxyHeader | None = None
        self.proxy_buffer = b""
        #: The TLS socket once the handshake started (the same object as request after).
        self.tls: ssl.SSLSocket | None = None
        #: The handler object kept between messages of a parkable handler.
        self.handler: Any = None
        #: What finish_request() constructs for this connection: a parkable variant of
        #: RequestHandlerClass, or None for the class itself.
        self.handler_factory: Any = None
        #: Messages handled so far (1 after the first handle_one_request()).
        self.messages = 0
        #: time.monotonic() when the handler last returned from a message (None: not
        #: yet), so that what comes after -- parked, waiting for the next -- is not
        #: counted as the handler's time (servekit_handler_duration_seconds).
        self.message_ended: float | None = None
        #: How it ended, for metrics and access logs (see OUTCOMES); set before close.
        self.outcome = "done"
        #: True once the loop decided to close it (server stopping): no more parking.
        self.closing = False
        #: The socket timeout the handler starts with (the accepted socket's own).
        self.timeout: float | None = None
        #: The epoll events that last woke it (0 before any: a stage tried at accept).
        #: A stage can tell from them that the client closed its side (EPOLLRDHUP),
        #: which no peek shows while bytes are queued.
        self.events = 0
        #: The events it is armed for in the pipeline's preamble set and in its parking
        #: set; 0 while not registered there (see ConnectionPipeline._remove()).
        self.loop_mask = 0
        self.parking_mask = 0
        #: The handler's rfile as last seen between messages, and how to look into its
        #: buffer (servekit.features.pipeline.message_buffered()).
        self.probed: Any = None
        self.probe: Any = None

    def __repr__(self) -> str:
        return (
            f"<Connection fd={self.fd} {self.state.value} peer={self.peer!r} "
            f"messages={self.messages}>"
        )

    @property
    def waiting_armed(self) -> bool:
        """Armed in the loop's set for more bytes of a partial line or head."""
        return self.loop_mask == WAIT_MORE_MASK

    @property
    def is_tls(self) -> bool:
        return self.tls is not None

    def set_deadline(self, seconds: float | None, reason: str) -> None:
        """Start a wait of at most seconds (None: unbounded), logged as reason if it ends."""
        self.deadline = None if seconds is None else time.monotonic() + seconds
        self.deadline_reason = reason


_local = threading.local()


def current_connection() -> Connection | None:
    """The connection record of the message this thread is handling, or None.

    Set while a pool thread runs a stage step or a handler of a connection pipeline
    server; None elsewhere (datagram servers, ThreadingMixIn servers without the pipeline).
    """
    return getattr(_local, "connection", None)


def _set_current(connection: Connection | None) -> None:
    _local.connection = connection
