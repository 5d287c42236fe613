# The connection pipeline: every accepted stream connection goes
#
#   admit -> preamble stages (in the loop) -> handler (pool thread) -> park (epoll set)
#                                                  ^                       |
#                                                  +---- its next bytes ---+   -> close
#
# Strategy (gunicorn's gthread worker, generalised). Threads run handlers and CPU-bound
# stage steps, never wait on a client. Everything that waits -- a PROXY header that
# trickles in, a TLS handshake waiting for the client's next flight, a connection that
# has not sent its first request, a keep-alive connection between two messages -- waits
# as a descriptor in one epoll set, which the serving loop watches (BaseServer.watch()).
#
#   * Ownership, not locks: a connection is owned by the loop (ADMITTED, PREAMBLE), by
#     exactly one pool thread (HANDLING), or, PARKED, by whoever pops it from
#     parked_by_fd; see servekit.features.connection. A thread hands a connection on by
#     arming its descriptor (epoll_ctl is thread-safe) after setting every field, and
#     never touches it again.
#   * Two epoll sets: the loop watches the preamble set; the pool's threads watch the
#     parking set themselves (leader/followers: WorkerPool.follow(), take_ready()). A
#     message on a parked connection goes from the kernel to a thread: between messages a
#     thread takes the next ready connection without waiting, and one idle thread waits
#     in the set. The loop used to take those events and hand them to the pool: a
#     wake-up of the loop, a queue and a wake-up of a thread per message, measured at
#     about one context switch per message on ping-pong; following costs about 0.1.
#   * Every arm is EPOLLONESHOT | EPOLLET: one event, then the descriptor is silent until
#     re-armed, so the loop never spins on a socket a thread is reading, and an event for a
#     connection the loop does not own is simply dropped. The one exception: a connection
#     waiting for the rest of a line stays armed edge-triggered without one-shot, because
#     re-arming a socket with unread bytes reports it ready again at once (epoll_ctl
#     re-polls), and the line wait peeks without reading.
#   * Busy connections stay off the loop: after a message the thread checks whether the
#     next one is already buffered (in the handler's rfile, or in TLS's buffer) and, if
#     so, handles it at once; only a connection with nothing buffered is parked (bytes
#     in the kernel are reported by epoll as soon as it is re-armed).
#   * A stage may run before every message, not only the first (Stage.each_message: the
#     whole-head wait for HTTP handlers), so a keep-alive client that trickles its next
#     request holds no thread either.
#   * Deadlines (stage timeouts, the idle timeout of parked connections) are fields of the
#     record, checked by one sweep of the loop-owned connections every sweep interval
#     (at most 1 s, finer for short timeouts): no timer per message, so a busy connection
#     costs no heap operations and memory does not grow with the message rate.
#   * Handlers are run message by message when their class allows it
#     (servekit.features.messages): the handler object is kept on the record between
#     messages and its finish() deferred until the connection closes. Any other handler
#     runs whole on its thread, as with the stdlib.
from __future__ import annotations

import collections
import enum
import functools
import logging
import os
import select
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Any

from servekit.errors import RequestTooSlow, SendTimeout, ServekitError
from servekit.features.addresses import format_peer
from servekit.features.connection import (
    WAIT_MORE_MASK,
    Connection,
    ConnectionState,
    _local,
    _set_current,
    current_connection,
)
from servekit.features.connsocket import ConnectionIO, ConnectionSocket
from servekit.features.heads import HeadHolding
from servekit.features.httpserver import handler_methods
from servekit.features.messages import holds_response_head, message_loop_of

__all__ = [
    "PEEK_NOW",
    "PEER_GONE",
    "ConnectionPipeline",
    "Stage",
    "StageError",
    "Step",
    "run_stages_blocking",
]

log = logging.getLogger("servekit.pipeline")

# Exceptions that mean the client went away mid-conversation: a normal event on the
# Internet (a closed browser tab, a load balancer's health check, a phone losing signal),
# logged at debug, never a traceback.
PEER_GONE = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, ssl.SSLEOFError)

_IN = select.EPOLLIN | select.EPOLLRDHUP
_ERR = select.EPOLLERR
_HANGUP = select.EPOLLRDHUP | select.EPOLLHUP | _ERR
_ARM_ONCE = select.EPOLLET | select.EPOLLONESHOT
_PARK_MASK = _IN | _ARM_ONCE
_ONESHOT = select.EPOLLONESHOT
_EVENTS = _IN | select.EPOLLOUT
# A registration whose one-shot event was delivered: registered (re-armed with
# epoll_ctl(MOD)), and silent until then.
_SPENT = _ONESHOT
_PARKED = ConnectionState.PARKED
_HANDLING = ConnectionState.HANDLING
_monotonic = time.monotonic
#: MSG_PEEK | MSG_DONTWAIT as an int, computed once (| on the enum runs Flag.__or__ in
#: Python): a peek that never waits, for the stages' and the loop's peeks.
PEEK_NOW = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)
# Longest and shortest gap between deadline sweeps: a timeout fires at most this late.
_SWEEP_MAX = 1.0
_SWEEP_MIN = 0.05
# Events taken per epoll_wait(): one wake-up of the loop serves a burst.
_MAX_EVENTS = 256
# At shutdown, how long a connection accepted but still in its preamble may take to
# deliver its request. A client sends its first bytes together with (or right after) the
# ACK that completed the handshake, so they arrive within milliseconds of accept() even
# across a WAN; 0.25 s covers a retransmission-free path with room to spare. Short,
# because a silent client must not hold up the stop: Ctrl-C ends the process in well
# under a second.
SHUTDOWN_GRACE = 0.25


class Step(enum.Enum):
    """What a stage step needs next."""

    DONE = "done"  # the stage is complete
    READ = "read"  # wait until the socket is readable
    MORE = "more"  # bytes are queued but not enough: wait until *more* arrive
    WRITE = "write"  # wait until the socket is writable


class StageError(ServekitError):
    """A connection failed a preamble stage: the peer's doing, reported in one line.

    ``level`` is the logging level; ``cause`` the underlying exception, if any.
    """

    def __init__(
        self, reason: str, level: int = logging.INFO, cause: BaseException | None = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.level = level
        self.cause = cause


class Stage:
    """One preamble step of a connection, driven without blocking. Subclass it.

    step() is called when the stage starts (for the first stage: at accept, before
    any wait) and whenever the socket becomes ready for what it asked, with the epoll
    events that woke it in ``connection.events``; it must not block, and returns
    Step.READ / Step.WRITE / Step.MORE to wait or Step.DONE. A failure raises
    StageError, which fail() reports. Stages run on the loop's thread unless
    ``offload`` is true (CPU-heavy steps: the TLS handshake's crypto), in which case
    each step runs on a pool thread.
    """

    #: Short name for logs and docs ("proxy", "tls", "wait").
    name = "stage"
    #: Run steps on a pool thread instead of the loop.
    offload = False
    #: Also run before every later message of a parked connection, not only before the
    #: first: its bytes wake the connection, and the stage decides when a thread takes
    #: it (WaitForRequest for HTTP heads). Costs its step (a peek) per message.
    each_message = False

    def timeout(self) -> float | None:
        """Seconds the whole stage may take, from its start (None: no limit)."""
        return None

    def timeout_reason(self) -> str:
        """What to log when the stage's deadline passes."""
        return f"{self.name} not completed in time"

    def expired(self, connection: Connection) -> StageError:
        """The error for a connection whose deadline passed in this stage. May be
        overridden to say how far it got."""
        return StageError(connection.deadline_reason)

    def step(self, connection: Connection) -> Step:
        raise NotImplementedError

    def fail(self, connection: Connection, error: StageError) -> None:
        """Report a failed stage (the connection is closed after). May be overridden."""
        log.log(error.level, "%s: %s; closing", format_peer(connection.peer), error.reason)


def run_stages_blocking(
    server: Any, connection: Connection, stages: Sequence[Stage], *, until: float | None = None
) -> bool:
    """Run every stage on this thread, waiting with select(); True if all completed.

    For servers without a pipeline (ThreadingMixIn, ForkingMixIn, handle_request()), and
    for connections finished during shutdown, where ``until`` (a time.monotonic())
    caps every wait: a connection still waiting then is closed quietly. Restores the
    socket's timeout.
    """
    if not stages:
        return True
    sock = connection.request
    previous = sock.gettimeout()
    sock.setblocking(False)
    waiter: Any = None  # for Step.MORE: an edge-triggered epoll set, made on first use
    try:
        for index, stage in enumerate(stages):
            connection.stage = index
            connection.set_deadline(stage.timeout(), stage.timeout_reason())
            while True:  # bounded by the stage's deadline, or by the peer closing
                try:
                    step = stage.step(connection)
                except StageError as error:
                    connection.outcome = "stage-failed"
                    stage.fail(connection, error)
                    return False
                if step is Step.DONE:
                    break
                sock = connection.request  # a stage may have wrapped it (TLS)
                remaining = None
                if connection.deadline is not None:
                    remaining = connection.deadline - time.monotonic()
                    if remaining <= 0:
                        connection.outcome = "stage-timeout"
                        stage.fail(connection, stage.expired(connection))
                        return False
                if until is not None:
                    cap = until - time.monotonic()
                    if cap <= 0:
                        connection.outcome = "shutdown"
                        log.debug(
                            "%s: still in its %s stage at shutdown; closed",
                            format_peer(connection.peer),
                            stage.name,
                        )
                        return False
                    remaining = cap if remaining is None else min(remaining, cap)
                if step is Step.MORE:
                    if waiter is None:
                        # Registering reports the bytes queued now, once: that report is
                        # taken here and the step runs again (bytes that came meanwhile
                        # are in its peek), and from then on the set reports only bytes
                        # that arrive later, or the client closing. Waiting right after
                        # registering would return at once, every time: a busy loop
                        # until the deadline for a client that sent part of a line.
                        waiter = select.epoll(1)
                        waiter.register(sock.fileno(), WAIT_MORE_MASK)
                        connection.events = _poll_events(waiter, 0)
                        continue
                    connection.events = _poll_events(waiter, remaining)
                else:
                    want = ([sock], []) if step is Step.READ else ([], [sock])
                    select.select(want[0], want[1], [], remaining)
        connection.stage = len(stages)
        return True
    finally:
        if waiter is not None:
            waiter.close()
        connection.deadline = None
        if connection.request.fileno() != -1:
            connection.request.settimeout(previous)


def _poll_events(waiter: Any, timeout: float | None) -> int:
    """The events of waiter's one descriptor within timeout (None: no limit), or 0."""
    ready = waiter.poll(-1 if timeout is None else timeout, 1)
    return ready[0][1] if ready else 0


@functools.lru_cache(maxsize=64)
def _parkable_class(cls: type, initial: bool) -> type:
    """A subclass of cls whose constructor handles only the first message.

    Its __init__ is the class's own (so a handler that takes extra arguments through
    functools.partial, like SimpleHTTPRequestHandler's directory=, keeps them); handle()
    runs one handle_one_request(), and finish() is deferred until the pipeline closes
    the connection.
    """

    def handle(self: Any) -> None:
        self.close_connection = initial
        self.handle_one_request()
        # Only now: if the first message raised, the constructor's own finish() ran
        # for real and the pipeline must not call it again.
        self._servekit_deferred = True
        connection = current_connection()
        if connection is not None:
            connection.handler = self

    def finish(self: Any) -> None:
        if getattr(self, "_servekit_deferred", False):
            return
        cls.finish(self)  # type: ignore[attr-defined]

    namespace = {
        # http.server's handlers format the current time once a second, not per request.
        **handler_methods(cls),
        "handle": handle,
        "finish": finish,
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        "__doc__": cls.__doc__,
    }
    return type(cls.__name__, (cls,), namespace)


def parkable_factory(factory: Any) -> Any:
    """A factory like RequestHandlerClass whose handlers can be parked, or None."""
    if isinstance(factory, functools.partial) and isinstance(factory.func, type):
        initial = message_loop_of(factory.func)
        if initial is None:
            return None
        return functools.partial(
            _parkable_class(factory.func, initial), *factory.args, **factory.keywords
        )
    if isinstance(factory, type):
        initial = message_loop_of(factory)
        return None if initial is None else _parkable_class(factory, initial)
    return None


class ConnectionPipeline:
    """The loop side and the thread side of every stream connection of one server.

    Created by ThreadPoolMixIn per process. ``submit`` runs a callable on a pool thread.
    """

    def __init__(
        self,
        server: Any,
        stages: Sequence[Stage],
        submit: Callable[..., None],
        *,
        idle_timeout: float | None,
    ) -> None:
        self.server = server
        self.stages = tuple(stages)
        self.submit = submit
        #: Seconds a parked connection may wait for its next message (None: forever).
        self.idle_timeout = idle_timeout
        #: Connections in a preamble stage wait here; the serving loop watches it.
        self.epoll = select.epoll()
        #: Parked connections wait here; the pool's threads watch it (take_ready()), so
        #: a message on a parked connection goes from the kernel to a thread directly.
        self.parking = select.epoll()
        #: Parked connections by descriptor: whoever pops one owns it (a thread that got
        #: its event, the idle sweep, the shutdown sequence). dict.pop() is atomic.
        self.parked_by_fd: dict[int, Connection] = {}
        #: Written by wake() to interrupt a thread waiting in take_ready().
        self._wakeup = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.parking.register(self._wakeup, select.EPOLLIN)
        #: Every open connection by descriptor. Written by the loop (admit) and by
        #: whoever closes a connection; dict operations are atomic.
        self.connections: dict[int, Connection] = {}
        #: Set by close_idle(): threads close connections instead of parking them.
        self.closing = False
        self._factory_source: Any = None
        self._factory: Any = None
        self._hold_heads = False
        #: What runs before each message (ServerFeature.per_message_hooks()), composed
        #: with the factory.
        self._hooks: tuple[Callable[[Connection], object], ...] = ()
        #: Index of the stage that runs before every message (Stage.each_message), or
        #: None; refreshed when the handler class changes (a stage may ask it).
        self._rewait: int | None = self._each_message_stage()
        timeouts = [s.timeout() for s in self.stages] + [idle_timeout]
        shortest = min((t for t in timeouts if t is not None), default=4 * _SWEEP_MAX)
        self.sweep_interval = min(_SWEEP_MAX, max(_SWEEP_MIN, shortest / 4))
        self._sweep_timer: Any = None

    def fileno(self) -> int:
        return self.epoll.fileno()

    # -- counters ------------------------------------------------------------------------

    @property
    def parked(self) -> int:
        """Connections waiting between messages without a thread."""
        return sum(1 for c in list(self.connections.values()) if c.state is ConnectionState.PARKED)

    @property
    def waiting(self) -> int:
        """Connections in a preamble stage (PROXY header, TLS, first request)."""
        return sum(
            1
            for c in list(self.connections.values())
            if c.state in (ConnectionState.PREAMBLE, ConnectionState.ADMITTED)
        )

    # -- the loop side -------------------------------------------------------------------

    def start(self) -> None:
        """Watch the epoll set from the server's loop. Call on the loop's thread."""
        self.server.watch(self, self.on_ready)
        self._schedule_sweep()

    def stop(self) -> None:
        self.server.unwatch(self)
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()
            self._sweep_timer = None

    def admit(self, sock: socket.socket, peer: Any) -> None:
        """Take a freshly accepted connection (loop thread)."""
        connection = Connection(sock, peer)
        connection.timeout = sock.gettimeout()
        sock.setblocking(False)
        self.connections[connection.fd] = connection
        self.server.connection_opened(connection)
        self._enter(connection, 0)
        # The first stage is tried at once; the descriptor is registered only if it has
        # to wait. A client sends its first bytes right behind the ACK that completed
        # the handshake, and the loop's wake-up for that ACK takes longer than the
        # bytes take to follow: measured on loopback under churn, they were there at
        # accept for 92 % of connections (99.8 % for one client at a time), so waiting
        # for readability first cost an epoll_ctl() pair and a turn of the loop per
        # connection to save a failed peek on the rest.
        if self._advance(connection, on_loop=True):
            self._dispatch(connection)

    def on_ready(self) -> None:
        """The epoll set is readable: move each ready connection on (loop thread)."""
        connections = self.connections
        for fd, events in self.epoll.poll(0, _MAX_EVENTS):
            connection = connections.get(fd)
            if connection is None or connection.state is not ConnectionState.PREAMBLE:
                continue
            connection.events = events
            if connection.loop_mask & _ONESHOT:
                connection.loop_mask = _SPENT  # its one event, delivered
            if self.stages[connection.stage].offload or self._advance(connection, on_loop=True):
                self._dispatch(connection)
            # Any other state: a late event (a thread owns it, or it is parked in the
            # parking set now); whoever owns it arms it again.

    # -- the thread side of parked connections (a ReadySource for the pool) ---------------

    def take_ready(self, timeout: float) -> tuple[Callable[..., object], tuple[Any, ...]] | None:
        """A parked connection whose next bytes arrived, as a task for this thread.

        Called by pool threads (WorkerPool.follow()): with timeout 0 between messages,
        and with -1 by the one idle thread that waits. None if nothing is ready, on
        wake(), and for an event of a connection somebody else took.
        """
        parked = self.parked_by_fd
        while True:  # one event per turn; a client that closed is closed here, at once
            try:
                events = self.parking.poll(timeout, 1)
            except (OSError, ValueError):
                return None  # closed by the shutdown sequence
            if not events:
                return None
            fd, mask = events[0]
            connection = parked.pop(fd, None)
            if connection is not None and connection.parking_mask & _ONESHOT:
                connection.parking_mask = _SPENT  # its one event, delivered
            if connection is None:
                if fd == self._wakeup and timeout:
                    # Only the waiting thread clears it (the event is level-triggered): a
                    # look between messages must not swallow the wake-up meant for it.
                    try:
                        os.eventfd_read(self._wakeup)
                    except OSError:
                        pass  # read by a previous waiter already
                return None
            if mask & _HANGUP and (
                # A reset (EPOLLERR) leaves nothing to read: no peek, which would raise.
                mask & _ERR
                or (connection.tls is None and peek_ready(connection, readable=True) == "")
            ):
                if mask & _ERR and type(connection.request) is ConnectionSocket:
                    connection.request.client_reset()
                # Closed by the client between messages, the usual end of a keep-alive
                # connection: closed by this thread without a turn as a task (which, for
                # the thread that waits, means waking another to wait first). Never
                # blocks: the handler's finish() runs with the socket non-blocking.
                connection.state = _HANDLING
                self._close(connection, "", finish_on_loop=True)
                continue
            if not mask & _HANGUP and connection.tls is None and self._rewait is None:
                # The busy path, kept short: bytes of the next message (see
                # _message_ready()), handled at once.
                connection.state = _HANDLING
                return (self._handle, (connection,))
            return (self.serve_parked, (connection, mask))

    def wake(self) -> None:
        """Make a take_ready() that waits return."""
        wakeup = self._wakeup
        if wakeup >= 0:  # after close() the number may belong to another file
            os.eventfd_write(wakeup, 1)

    def serve_parked(self, connection: Connection, events: int) -> None:
        """A pool thread's turn with a parked connection that became readable."""
        _local.connection = connection  # _set_current(), inlined
        try:
            self._unpark(connection, events)
        finally:
            _local.connection = None

    def _unpark(self, connection: Connection, events: int) -> None:
        index = self._rewait
        request = connection.request
        if (
            index is not None
            and not events & _HANGUP
            and (
                type(request) is ConnectionSocket
                or (connection.tls is None and not request.gettimeout())
                or hasattr(request, "read_ahead")
            )
        ):
            # The stage that waits for a whole request runs again, in the loop, with its
            # own deadline: a client that trickles its next request holds no thread (the
            # stage's wait is in the loop). Only where its look at the bytes cannot
            # wait: a plain socket keeps the handler's timeout while parked, and CPython
            # polls such a socket for up to that timeout before any recv(), MSG_DONTWAIT
            # or not; ConnectionSocket does not, and TLSConnectionSocket.read_ahead()
            # makes itself non-blocking.
            #
            # The connection stays HANDLING (this thread's) while the step runs here:
            # _wait() makes it PREAMBLE, the loop's, only as it arms it. Published as
            # PREAMBLE before, the shutdown sequence could take it meanwhile.
            self._enter(connection, index)
            connection.state = _HANDLING
            connection.events = events
            if self._advance(connection, on_loop=False):
                self._handle(connection)
            return
        verdict = self._message_ready(connection, events)
        if verdict == "ready":
            connection.state = _HANDLING
            self._handle(connection)
        elif verdict == "wait":
            self._park(connection, renew=False)  # a spurious event: wait again
        elif verdict == "more":
            # A part of a TLS record: only new bytes may wake it (see the strategy).
            self._park(connection, renew=False, mask=_IN | select.EPOLLET)
        else:
            if verdict:
                connection.outcome = "stage-failed"
            self._close(connection, verdict)

    def _message_ready(self, connection: Connection, events: int) -> str:
        """'ready', 'wait' (nothing yet), or '' (the client closed) for a parked connection.

        A readable event without a hang-up means bytes of the next message: dispatched
        without a system call. Only a hang-up needs a peek, to tell a last message from
        a plain close (usually closed in take_ready() already). A whole line is
        awaited for the first request only (WaitForRequest): a client that completed a
        request is no longer an anonymous connection, and peeking every message of a
        busy connection would cost a system call each; its handler reads the rest of a
        message within idle_timeout.
        """
        if not events & _HANGUP and connection.tls is None:
            return "ready"
        return peek_ready(connection, readable=True)

    def sweep(self) -> None:
        """Close loop-owned connections whose deadline passed (loop thread)."""
        now = time.monotonic()
        for connection in list(self.connections.values()):
            deadline = connection.deadline
            if deadline is None or deadline > now:
                continue
            if connection.state is ConnectionState.PREAMBLE:
                stage = self.stages[connection.stage]
                if self._remove(connection):
                    connection.outcome = "stage-timeout"
                    stage.fail(connection, stage.expired(connection))
                    self._close_socket(connection)
            elif connection.state is ConnectionState.PARKED:
                # Only the descriptor is looked at, never TLS's state: a pool thread
                # may take the connection meanwhile.
                if _peek_descriptor(connection, readable=False) == "ready":
                    # Not idle: its next message arrived and waits for a free thread
                    # (every one is busy; take_ready() hands it over when one is done),
                    # as a new connection would wait in the backlog. Looked at again
                    # at the next sweep until a thread has it.
                    continue
                if self.parked_by_fd.pop(connection.fd, None) is not connection:
                    continue  # a thread took it meanwhile
                connection.outcome = "idle-timeout"
                self._close(connection, "", finish_on_loop=True)
                log.debug(
                    "%s: idle for idle_timeout=%ss between messages; closed",
                    format_peer(connection.client_address),
                    self.idle_timeout,
                )

    def _schedule_sweep(self) -> None:
        def tick() -> None:
            self.sweep()
            self._schedule_sweep()

        self._sweep_timer = self.server.call_at(time.monotonic() + self.sweep_interval, tick)

    # -- stages ----------------------------------------------------------------------------

    def _each_message_stage(self) -> int | None:
        for index in range(len(self.stages) - 1, -1, -1):
            if self.stages[index].each_message:
                return index
        return None

    def _enter(self, connection: Connection, index: int) -> None:
        connection.stage = index
        if index < len(self.stages):
            stage = self.stages[index]
            connection.set_deadline(stage.timeout(), stage.timeout_reason())
        else:
            connection.deadline = None

    def _advance(self, connection: Connection, *, on_loop: bool) -> bool:
        """Run stages until one must wait (armed: False) or all are done (True)."""
        stages = self.stages
        while connection.stage < len(stages):
            stage = stages[connection.stage]
            if on_loop and stage.offload:
                # Never run its step on the loop, even when the bytes are already there:
                # wait for readability (reported at once if they are) and hand it over.
                self._wait(connection, Step.READ)
                return False
            try:
                step = stage.step(connection)
            except StageError as error:
                if self._remove(connection):
                    connection.outcome = "stage-failed"
                    stage.fail(connection, error)
                    self._close_socket(connection, on_loop=on_loop)
                return False
            except Exception:
                if self._remove(connection):
                    connection.outcome = "error"
                    self.server.handle_error(connection.request, connection.client_address)
                    self._close_socket(connection, on_loop=on_loop)
                return False
            if step is Step.DONE:
                self._enter(connection, connection.stage + 1)
                continue
            self._wait(connection, step)
            return False
        return True

    def _wait(self, connection: Connection, step: Step) -> None:
        if connection.state is not ConnectionState.PARKED:
            connection.state = ConnectionState.PREAMBLE
        if self.closing:
            # The shutdown sequence has collected the connections to close (a stage
            # step that ran on a thread meanwhile, the TLS handshake, ends here): armed
            # now, it would wait in a loop that no longer runs. Read after the state
            # write, as in _park(): close_idle() sets closing, then reads the states, so
            # one of us sees the other, and _remove() lets only one close it.
            if self._remove(connection):
                connection.outcome = "shutdown"
                self._close_socket(connection)
            return
        if step is Step.WRITE:
            self._modify(connection, select.EPOLLOUT | _ARM_ONCE)
        elif step is Step.MORE:
            if connection.loop_mask != WAIT_MORE_MASK:
                # Bytes are there but not a whole message: stay armed edge-triggered so
                # that only new bytes wake us (see the strategy comment).
                self._modify(connection, WAIT_MORE_MASK)
        else:
            self._arm(connection)

    # -- handing over and back -----------------------------------------------------------

    def _arm_loop_off(self, connection: Connection) -> None:
        # Left armed without one-shot by a partial read (Step.MORE): silence it, or every
        # byte of later messages would wake the loop for nothing.
        self._modify(connection, _ARM_ONCE)

    def _arm(self, connection: Connection) -> None:
        self._modify(connection, _IN | _ARM_ONCE)

    def _modify(self, connection: Connection, mask: int) -> None:
        registered = connection.loop_mask
        connection.loop_mask = mask  # first: the event may come before the call returns
        try:
            if registered:
                self.epoll.modify(connection.fd, mask)
            else:
                self.epoll.register(connection.fd, mask)
        except (OSError, ValueError):
            # Closed under us (shutdown closed it from another thread): nothing to arm.
            pass

    def _dispatch(self, connection: Connection) -> None:
        if connection.loop_mask == WAIT_MORE_MASK:
            self._arm_loop_off(connection)
        connection.state = ConnectionState.HANDLING
        try:
            self.submit(self.run, connection)
        except RuntimeError:
            # The pool is shut down (server closing): this connection will not be served.
            connection.outcome = "shutdown"
            self._close(connection, "", finish_on_loop=True)

    def run(self, connection: Connection) -> None:
        """A pool thread's turn with a connection: stage steps, then messages."""
        if connection.stage < len(self.stages):  # an offloaded stage's step (TLS)
            _set_current(connection)
            try:
                if not self._advance(connection, on_loop=False):
                    return
            finally:
                _set_current(None)
        self._handle(connection)

    def _handle(self, connection: Connection) -> None:
        """Run the connection's messages on this thread, then park or close it.

        A pool task by itself for a parked connection whose next bytes arrived (the busy
        path: take_ready() hands it over as is), so it names the thread's connection
        itself; this runs once per message, and a call saved here is saved on each.
        """
        _local.connection = connection  # _set_current(), inlined
        try:
            if connection.handler is None:
                factory = self._parkable_factory()
                connection.handler_factory = factory
                if factory is None:
                    # A handler that loops in handle() itself: it keeps this thread for
                    # the connection's whole life, exactly as with the stdlib.
                    self._run_whole(connection)
                    return
            server = self.server
            request = connection.request
            if connection.messages == 0 and request.gettimeout() != connection.timeout:
                # The preamble left the socket non-blocking; the handler gets the timeout
                # it had at accept. From then on the socket keeps the handler's own
                # timeout, parked too (once per connection, not per message: on a plain
                # socket settimeout() is a system call), so nothing may read it while
                # parked expecting not to wait (peek_ready() polls first).
                request.settimeout(connection.timeout)
            # A response head waits for its body (servekit.features.heads), on the
            # sockets that can hold one (ConnectionSocket, TLSConnectionSocket).
            hold = self._hold_heads and isinstance(request, HeadHolding)
            hooks = self._hooks
            while True:
                connection.messages += 1
                for hook in hooks:
                    hook(connection)
                # One message. Its errors close the connection; on SystemExit and
                # KeyboardInterrupt too, which then propagate as with ThreadingMixIn (the
                # pool worker survives and logs them).
                try:
                    if hold:
                        request.hold_head()
                    handler = connection.handler
                    if handler is None:
                        server.finish_request(request, connection.client_address)
                        handler = connection.handler
                        if handler is None:  # the constructor did not reach handle()
                            self._close(connection, "")
                            return
                    else:
                        handler.handle_one_request()
                    if hold:
                        request.release_head()  # a head with no body after it
                except Exception as exc:
                    self._report(connection, exc)
                    self._close(connection, "")
                    return
                except BaseException:
                    connection.outcome = "error"
                    self._close(connection, "")
                    raise
                connection.message_ended = _monotonic()
                if handler.close_connection or connection.closing or self.closing:
                    self._close(connection, "")
                    return
                if not message_buffered(connection):
                    break
                if self._rewait is not None and not self._next_request_ready(connection):
                    return  # the rest of its head is awaited in the loop, without a thread
            self._park(connection)
        finally:
            _local.connection = None

    def _next_request_ready(self, connection: Connection) -> bool:
        """For a connection whose handler's rfile holds part of the next request (the
        client pipelined): whether the request wait is satisfied (True: serve it now).
        If not, the wait was armed in the loop, as for a parked connection whose next
        bytes came (_unpark()): a client that sends one request and a trickle of the
        next holds no thread. The wait sees what rfile holds (buffered_request())."""
        self._enter(connection, self._rewait)  # type: ignore[arg-type]
        # Still HANDLING: see _unpark().
        return self._advance(connection, on_loop=False)

    def _run_whole(self, connection: Connection) -> None:
        connection.request.settimeout(connection.timeout)
        connection.messages = 1
        for hook in self._hooks:
            hook(connection)
        try:
            self.server.finish_request(connection.request, connection.client_address)
        except Exception as exc:
            self._report(connection, exc)
        finally:
            self._close(connection, "")

    def _report(self, connection: Connection, exc: Exception) -> None:
        connection.outcome = outcome_of(exc)
        if not report_peer_exception(connection, exc):
            self.server.handle_error(connection.request, connection.client_address)

    def _parkable_factory(self) -> Any:
        source = self.server.RequestHandlerClass
        if source is not self._factory_source:  # changed by a reload
            self._factory = parkable_factory(source)
            self._factory_source = source
            handler_class = source.func if isinstance(source, functools.partial) else source
            self._hold_heads = self._factory is not None and holds_response_head(handler_class)
            self._rewait = self._each_message_stage()
            self._hooks = self.server.per_message_hooks()
        return self._factory

    def _park(self, connection: Connection, *, renew: bool = True, mask: int = _PARK_MASK) -> None:
        # No lock (a lock held across epoll_ctl, which releases the GIL, convoys every
        # thread behind the one waiting for the GIL). Against close_idle() the order of
        # two writes suffices: we publish the connection as parked, then read closing; it
        # sets closing, then collects parked connections. Whichever comes second sees the
        # other, and parked_by_fd.pop() lets only one of us have it.
        if renew:
            idle = self.idle_timeout
            connection.deadline = None if idle is None else _monotonic() + idle
            connection.deadline_reason = "idle"
        fd = connection.fd
        registered = connection.parking_mask
        connection.parking_mask = mask
        self.parked_by_fd[fd] = connection
        connection.state = _PARKED
        if self.closing:
            if self.parked_by_fd.pop(fd, None) is connection:
                self._close(connection, "")
            return
        try:  # last: from here on, whoever pops it from parked_by_fd owns it
            if registered:
                self.parking.modify(fd, mask)
            else:
                self.parking.register(fd, mask)
        except (OSError, ValueError):
            pass  # closed under us by the shutdown sequence: nothing to arm

    # -- closing -------------------------------------------------------------------------

    def _claim(self, connection: Connection) -> bool:
        """Take the connection out of the set; True for the one caller that gets it.

        dict.pop() is atomic, so of two threads that both decide to close a connection
        (shutdown racing a thread that parks it) exactly one closes it.
        """
        current = self.connections.pop(connection.fd, None)
        if current is connection:
            connection.state = ConnectionState.CLOSED
            return True
        if current is not None:
            # A newer connection on a descriptor number the kernel reused: not ours.
            self.connections.setdefault(connection.fd, current)
        return False

    def _remove(self, connection: Connection) -> bool:
        if not self._claim(connection):
            return False
        # Only a registration that may still report an event is removed: closing the
        # socket removes the others (a spent one-shot stays silent even while a forked
        # child holds a copy of the descriptor). On the usual path -- an event, the
        # handler, the client's close reported in the parking set -- that is neither,
        # and two epoll_ctl() calls per connection are saved.
        if connection.loop_mask & _EVENTS:
            _unregister(self.epoll, connection.fd)
        if connection.parking_mask & _EVENTS:
            _unregister(self.parking, connection.fd)
        return True

    def _close_socket(self, connection: Connection, *, on_loop: bool = True) -> None:
        """Finish the handler kept between messages, if any, then close the socket."""
        handler = connection.handler
        if handler is not None:
            connection.handler = None
            try:
                if on_loop:
                    # Not on a pool thread: the socket must not block us (whatever was
                    # left unflushed cannot be delivered to a client that left anyway).
                    connection.request.setblocking(False)
                handler._servekit_deferred = False  # its finish(), deferred until now
                handler.finish()
            except Exception:
                self.server.handle_error(connection.request, connection.client_address)
        try:
            self.server.shutdown_request(connection.request)
        except Exception:
            log.exception("closing %r failed", connection)
        finally:
            self.server.connection_closed(connection)

    def _close(self, connection: Connection, reason: str, *, finish_on_loop: bool = False) -> None:
        """Close a connection its caller owns: the handler's finish(), then the socket."""
        if not self._remove(connection):
            return  # somebody else closed it
        if reason:
            log.info("%s: %s; closing", format_peer(connection.client_address), reason)
        self._close_socket(connection, on_loop=finish_on_loop)

    def close_idle(self) -> int:
        """Stop parking; close the connections parked with nothing to read.

        For the shutdown sequence, after the loop stopped: connections owned by the loop
        are owned by nobody else now. A parked one whose next request has already
        arrived, and one still in its preamble, is served once more on a pool thread
        instead, without keep-alive (a preamble waits SHUTDOWN_GRACE at most). Returns
        how many were closed at once.
        """
        self.closing = True  # first; see _park()
        idle = [
            c for c in list(self.connections.values()) if c.state is not ConnectionState.HANDLING
        ]
        closed = 0
        grace_until = time.monotonic() + SHUTDOWN_GRACE
        for connection in idle:
            # The list is a snapshot: read the state again. A parked connection is ours
            # only if we take it from parked_by_fd; one a thread took since the snapshot
            # (for its next message: HANDLING; or closed it) is the thread's, which closes
            # it after this message (closing is set, see _park()). Closing it here would
            # close the socket under its running handler.
            state = connection.state
            if state is ConnectionState.PARKED:
                if self.parked_by_fd.pop(connection.fd, None) is not connection:
                    continue  # a thread took it just now
            elif state is ConnectionState.HANDLING or state is ConnectionState.CLOSED:
                continue
            connection.closing = True
            # Served once more: a connection whose request is here, and one accepted
            # but still in its preamble (its client just connected: the request is
            # likely in flight), for at most SHUTDOWN_GRACE.
            serve = connection.handler is None or peek_ready(connection) == "ready"
            if serve and self._claim(connection):
                # Claimed (a thread racing to close it now finds it gone), then put back
                # as handled by the pool thread that serves it.
                self.connections[connection.fd] = connection
                connection.state = ConnectionState.HANDLING
                try:
                    self.submit(self._serve_last, connection, grace_until)
                    continue
                except RuntimeError:
                    pass  # the pool is already shut down
            connection.outcome = "shutdown"
            if connection.handler is None:
                if self._remove(connection):
                    closed += 1
                    self._close_socket(connection)
            elif connection.state is not ConnectionState.CLOSED:
                closed += 1
                self._close(connection, "", finish_on_loop=True)
        return closed

    def _serve_last(self, connection: Connection, until: float) -> None:
        """Finish a connection's preamble and serve one message, blocking (shutdown)."""
        _set_current(connection)
        try:
            if connection.stage < len(self.stages):
                remaining = self.stages[connection.stage :]
                if not run_stages_blocking(self.server, connection, remaining, until=until):
                    if self._remove(connection):
                        # On a pool thread; a keep-alive connection has its handler.
                        self._close_socket(connection, on_loop=False)
                    return
                connection.stage = len(self.stages)
            self._handle(connection)
        finally:
            _set_current(None)

    def serve_blocking(self, sock: socket.socket, peer: Any, until: float | None = None) -> None:
        """Serve one connection whole on this thread: preamble, one handler run, close.

        For connections taken from the backlog during shutdown: no parking, and the
        preamble may wait until ``until`` (a time.monotonic(); default SHUTDOWN_GRACE from
        now), as a connection the loop had already admitted does (close_idle()): a
        client that connected and says nothing must not hold up the stop for its whole
        request_timeout. The backlog's connections share one such deadline: served
        a few at a time, each with a grace of its own would add up.
        """
        if until is None:
            until = time.monotonic() + SHUTDOWN_GRACE
        connection = Connection(sock, peer)
        connection.closing = True
        self.connections[connection.fd] = connection
        self.server.connection_opened(connection)
        connection.state = ConnectionState.HANDLING
        _set_current(connection)
        try:
            if not run_stages_blocking(self.server, connection, self.stages, until=until):
                if self._remove(connection):
                    self._close_socket(connection)
                return
            self._handle(connection)
        finally:
            _set_current(None)

    def close(self) -> None:
        self.stop()
        self.epoll.close()
        self.parking.close()
        wakeup, self._wakeup = self._wakeup, -1
        os.close(wakeup)


def _unregister(epoll: Any, fd: int) -> None:
    try:
        epoll.unregister(fd)
    except (OSError, ValueError):
        pass  # closed under us


def report_peer_exception(connection: Connection, exc: BaseException) -> bool:
    """Log a handler's exception that is the client's doing, in one line; False for any
    other (a bug, for handle_error()).

    The client went away (reset, broken pipe): debug. It was silent for longer than the
    read timeout: info, with the timeout.
    """
    if isinstance(exc, PEER_GONE):
        log.debug("%s: the client went away (%s)", format_peer(connection.client_address), exc)
        return True
    if isinstance(exc, RequestTooSlow):
        log.info("%s: %s; closing", format_peer(connection.client_address), exc)
        return True
    if isinstance(exc, TimeoutError):
        try:
            timeout = connection.request.gettimeout()
        except OSError:
            timeout = None
        log.info(
            "%s: %s %ss; closing",
            format_peer(connection.client_address),
            # A send that waited (ConnectionSocket says which) or, as a rule, a read.
            "took none of its response for longer than the socket timeout of"
            if isinstance(exc, SendTimeout)
            else "silent for longer than the read timeout of",
            "?" if timeout is None else f"{timeout:g}",
        )
        return True
    return False


def outcome_of(exc: BaseException) -> str:
    """Connection.outcome for a connection whose handler raised exc."""
    if isinstance(exc, PEER_GONE):
        return "client-gone"
    if isinstance(exc, TimeoutError):
        return "read-timeout"
    return "error"


def peek_ready(connection: Connection, *, readable: bool = False) -> str:
    """Whether a byte of the next message is queued: 'ready', 'wait', or '' at EOF.

    Peeks below TLS (at the encrypted bytes), so it works for every connection. Never
    waits: ``readable`` says an event just reported the socket readable; otherwise a
    socket with a timeout is polled first (with a timeout set, Python polls before
    recv() for up to that timeout, MSG_DONTWAIT or not).
    """
    if connection.tls is not None and connection.request.pending():
        return "ready"
    return _peek_descriptor(connection, readable)


def _peek_descriptor(connection: Connection, readable: bool) -> str:
    """peek_ready() at the descriptor alone, without TLS's buffer."""
    request = connection.request
    try:
        if not readable and request.gettimeout():
            fd = request.fileno()
            if fd < 0:
                return ""
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            if not poller.poll(0):
                return "wait"
        peeked = socket.socket.recv(request, 1, PEEK_NOW)
    except BlockingIOError:
        return "wait"
    except OSError:
        return ""
    return "ready" if peeked else ""


# A raw readinto() that finds no bytes: None, "would block", so that peek() returns what
# the buffer holds and reads nothing. A C callable that returns None for any argument
# (an append to a deque that keeps nothing), not a Python function: a frame less per
# message.
_no_bytes_yet: Callable[[Any], None] = collections.deque(maxlen=0).append


def message_buffered(connection: Connection) -> bool:
    """Whether bytes of the next message are already read (in the handler's rfile, or in
    TLS's decrypted buffer), so the thread must serve it instead of parking. Never
    blocks, and makes no system call on a plain socket.

    The kernel's buffer is not looked at: parking arms the descriptor, and epoll reports
    bytes already there at once (epoll_ctl polls the socket). Asking the kernel first
    costs a recv() per message that fails on nearly every one in ping-pong (the reply
    has not come back yet), and the failure, an exception, is the most expensive part.

    BufferedReader.peek() returns what its buffer holds, or reads the raw stream when it
    is empty. For the usual rfile (socket.makefile(): a BufferedReader over a SocketIO,
    a Python object), the raw stream's readinto() is shadowed, for the length of the
    peek, by one that finds no bytes: an empty buffer answers "nothing" instead of
    reading the socket. The thread owns the connection, so nobody else reads the rfile
    meanwhile. Any other rfile is peeked the safe way, with the socket non-blocking for
    the moment.
    """
    request = connection.request
    if connection.tls is not None and request.pending():
        return True
    rfile = getattr(connection.handler, "rfile", None)
    if rfile is None:
        return False
    if rfile is not connection.probed:
        connection.probed = rfile
        connection.probe = _probe_of(rfile)
    probe = connection.probe
    if probe is None:
        return False  # unbuffered: no bytes of ours anywhere but in the kernel
    if probe is not rfile:
        probe.readinto = _no_bytes_yet  # probe is the raw stream (see above)
        try:
            return bool(rfile.peek(1))
        except (OSError, ValueError):
            return False  # closed by the handler: the close path reports it
        finally:
            del probe.readinto
    timeout = request.gettimeout()
    try:
        request.settimeout(0.0)
        return bool(rfile.peek(1))
    except (OSError, ValueError):
        # Nothing to read yet (BlockingIOError, SSLWantReadError), or an error the
        # loop will see as readiness and the handler then report.
        return False
    finally:
        try:
            request.settimeout(timeout)
        except OSError:
            pass


def buffered_request(connection: Connection) -> bytes:
    """The bytes of the next message that the handler's rfile read with the last one (a
    pipelining client): b"" if none, or if that rfile cannot be looked into without
    reading the socket. Called after message_buffered() said there are some; looks the
    way it does (see there)."""
    probe = connection.probe
    rfile = connection.probed
    if probe is None or probe is rfile or rfile is None:
        return b""
    probe.readinto = _no_bytes_yet
    try:
        return bytes(rfile.peek(1))
    except (OSError, ValueError):
        return b""
    finally:
        del probe.readinto


def _probe_of(rfile: Any) -> Any:
    """How message_buffered() looks into rfile: its raw stream, whose readinto() can be
    shadowed; rfile itself (peek with the socket non-blocking); None if it has no
    buffer to look into."""
    if not hasattr(rfile, "peek"):
        return None
    raw = getattr(rfile, "raw", None)
    if type(raw) is ConnectionIO:  # the usual one, without io's ABC isinstance()
        return raw
    if isinstance(raw, socket.SocketIO) and hasattr(raw, "__dict__"):
        return raw
    return rfile
