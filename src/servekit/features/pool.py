# Bounded thread pool: reusable worker threads instead of a thread per request.
#
# Strategy. The pool never queues work it cannot start: the server submits a request
# only while fewer than max_threads requests are in flight, and the moment the last
# worker becomes busy it pauses accepting (BaseServer.pause_accepting), so further
# connections wait in the kernel's listen backlog (datagrams in the socket buffer), not
# in our memory. When a worker frees up, accepting resumes. Memory is therefore bounded
# by max_threads whatever the number of clients (gevent's pool-full policy).
#
# Idle workers wait on a per-worker lock in a LIFO stack: the most recently used
# worker gets the next request (warm caches), and workers at the bottom stay idle long
# enough to time out, so the pool shrinks back to min_threads after a burst. A shared
# Condition would wake waiters FIFO and keep every thread just busy enough to live.
#
# The saturation edges (busy reaching max_threads, and dropping below it) are reported
# under the pool's lock, so "pause" and "resume" can never arrive out of order.
#
# A pool may also follow a ReadySource: the connection pipeline's parked connections
# (leader/followers). One idle worker, the leader, waits in the source (epoll_wait) instead
# of on its lock; the others sleep as before. A worker that finishes a task and finds the
# queue empty takes a ready connection from the source itself, without blocking, before
# it goes idle. So under load a thread goes from one connection's message to the next
# without a hand-off through the loop, a queue and a wake-up (the kernel's epoll ready
# list is the queue, first ready, first served), and when idle the kernel wakes the
# leader directly. Measured on ping-pong, 128 connections: hand-offs through the loop
# cost about a context switch per message; following costs a few per hundred.
#
# For stream servers the pool is the thread side of the connection pipeline
# (servekit.features.pipeline): a connection holds a thread only while a stage step or
# its handler runs, so max_threads bounds handlers running at once, not connections.
from __future__ import annotations

import atexit
import logging
import os
import socket
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any, Final, Protocol

from servekit.core import ServerState, TCPServer, ThreadingMixIn, UDPServer
from servekit.core.accept import accept_as
from servekit.features import forks
from servekit.features.base import ServerFeature
from servekit.features.connsocket import ConnectionSocket
from servekit.features.pipeline import SHUTDOWN_GRACE, ConnectionPipeline
from servekit.knobs import (
    knob,
    non_negative,
    optional_positive,
    parse_optional_float,
    positive,
)

__all__ = [
    "ReadySource",
    "ThreadPoolMixIn",
    "ThreadPoolTCPServer",
    "ThreadPoolUDPServer",
    "WorkerPool",
]

log = logging.getLogger("servekit.pool")

Task = tuple[Callable[..., object], tuple[Any, ...]]


class ReadySource(Protocol):
    """Work that arrives as readiness rather than as submit(): see WorkerPool.follow()."""

    def take_ready(self, timeout: float) -> Task | None:
        """A task for something ready now, waiting up to timeout seconds (-1: until
        woken); None if nothing (timed out, woken, or a stale event). Thread-safe."""

    def wake(self) -> None:
        """Make a take_ready() that waits return now (None)."""


# A worker that goes from ready connection to ready connection never blocks, so under
# load its process keeps the CPU for a whole scheduler slice (milliseconds) while a
# sibling worker process on the same core (servekit --workers N on fewer cores) waits
# with its connections' messages. Yielding the CPU every so many messages bounds that
# wait. Measured on ping-pong, 128 connections, 2 processes of 32 threads on one core
# (alternated rounds; p99 of the stdlib with 128 threads: 6-10 ms): never yielding,
# p99 31-41 ms; every 16 messages, 6.6-8.2 ms; every 8, 6.0 ms with the same throughput;
# every 2, 7.0 ms and 25 % fewer messages per second. A yield with nothing else to run
# on the core returns at once.
_YIELD_EVERY = 8
_yield: Callable[[], None] = getattr(os, "sched_yield", lambda: None)


def _look() -> None:
    """Never run: _LOOK, _idle_wait()'s answer "go and look at the queue"."""


_LOOK: Final[Task] = (_look, ())


class _Worker:
    __slots__ = ("stop", "thread", "wake")

    def __init__(self) -> None:
        self.wake = threading.Lock()
        self.wake.acquire()  # held = "sleeping"; release() wakes the worker
        self.stop = False
        self.thread: threading.Thread | None = None


class WorkerPool:
    """A bounded set of reusable threads running submitted callables.

    busy counts tasks running or waiting; on_saturated() is called (under the pool's
    lock) when busy reaches max_threads and on_unsaturated() when it drops below again.
    submit() never blocks.

    Tasks wait in one FIFO queue. A worker that finishes a task takes the next one
    without sleeping, and submit() wakes a sleeping worker only when no woken worker
    is already on its way to the queue; a worker that takes a task and sees more
    waiting wakes one more. So a burst of short tasks (one message each, from the
    connection pipeline) is run by as few threads as keep up with it, instead of
    waking a thread per task to fight over the GIL, while a task that blocks never
    holds up the others: the next submit() finds nobody searching and wakes a thread.
    """

    def __init__(
        self,
        max_threads: int,
        *,
        min_threads: int = 0,
        idle_timeout: float | None = 30.0,
        name: str = "servekit-worker",
        on_saturated: Callable[[], None] | None = None,
        on_unsaturated: Callable[[], None] | None = None,
    ) -> None:
        if max_threads < 1:
            raise ValueError(f"max_threads must be at least 1, got {max_threads}")
        self.max_threads = max_threads
        self.min_threads = min(min_threads, max_threads)
        self.idle_timeout = idle_timeout
        self.name = name
        self.pid = os.getpid()
        self._on_saturated = on_saturated
        self._on_unsaturated = on_unsaturated
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []  # LIFO: the top was busy most recently
        self._workers: set[_Worker] = set()
        self._queue: deque[Task] = deque()
        self._busy = 0
        #: Workers woken (or started) that have not taken a task yet.
        self._searching = 0
        self._closing = False
        self._all_idle = threading.Condition(self._lock)
        #: Threads in shutdown(wait=True): only they need the "all idle" notification
        #: (Condition.notify_all() is Python code, too slow for every time busy hits 0).
        self._waiting_for_idle = 0
        self._counter = 0
        self._started: dict[int, float] = {}  # thread ident -> when its task started
        #: What idle workers follow besides the queue (see follow()), its leader (the
        #: worker waiting in it), and whether submit() woke the leader for the queue.
        self._source: ReadySource | None = None
        self._leader: _Worker | None = None
        self._leader_woken = False
        for _ in range(self.min_threads):
            self._spawn_locked(searching=False)

    # -- introspection -------------------------------------------------------------------

    @property
    def busy(self) -> int:
        """Tasks running or waiting to run."""
        return self._busy

    @property
    def size(self) -> int:
        """Worker threads alive (idle or busy)."""
        return len(self._workers)

    @property
    def idle(self) -> int:
        """Worker threads waiting for work: asleep, or the one leading in the source."""
        return len(self._idle) + (self._leader is not None)

    @property
    def leading(self) -> bool:
        """Whether a thread waits in the source followed (follow()) for ready work."""
        return self._leader is not None

    @property
    def saturated(self) -> bool:
        return self._busy >= self.max_threads

    def running_since(self) -> list[float]:
        """time.monotonic() at which each task now running started (for stuck checks)."""
        return list(self._started.values())

    def follow(self, source: ReadySource) -> None:
        """Take tasks from source too: readiness instead of submit() (leader/followers).

        A worker that finds the queue empty takes source.take_ready(0) before going idle;
        of the idle workers, one (the leader) waits in source.take_ready() and, when it
        gets a task, wakes another to lead while it runs it. The leader does not exit
        after idle_timeout: one thread stays to watch the source.
        """
        with self._lock:
            self._source = source

    # -- submitting ----------------------------------------------------------------------

    def submit(self, fn: Callable[..., object], *args: Any) -> None:
        with self._lock:
            if self._closing:
                raise RuntimeError("the pool is shut down")
            self._begin_locked()
            self._queue.append((fn, args))
            if self._searching == 0:
                self._wake_one_locked()

    def _begin_locked(self) -> None:
        """Count one more task busy; report reaching max_threads."""
        self._busy += 1
        if self._busy == self.max_threads and self._on_saturated is not None:
            self._on_saturated()

    def _wake_one_locked(self) -> None:
        if self._idle:
            worker = self._idle.pop()
            self._searching += 1
            worker.wake.release()
        elif len(self._workers) < self.max_threads:
            self._spawn_locked(searching=True)
        elif self._leader is not None and not self._leader_woken:
            # Every other thread is busy: the leader leaves the source for the queue.
            assert self._source is not None
            self._leader_woken = True
            self._searching += 1
            self._source.wake()
        # else: every thread is running a task; the first to finish takes the next.

    def _spawn_locked(self, *, searching: bool) -> None:
        worker = _Worker()
        self._counter += 1
        thread = threading.Thread(
            target=self._run,
            args=(worker, searching),
            name=f"{self.name}-{self._counter}",
            daemon=True,
        )
        worker.thread = thread
        self._workers.add(worker)
        if searching:
            self._searching += 1
        # else: it joins the idle stack itself, in _sleep(), once it runs.
        try:
            thread.start()
        except BaseException:
            self._workers.discard(worker)
            if searching:
                self._searching -= 1
            raise

    # -- the worker ----------------------------------------------------------------------

    def _run(self, worker: _Worker, searching: bool) -> None:
        me = threading.get_ident()
        # _LOOK: go to the queue (a searching worker is counted in _searching); a task
        # from the source; None: exit.
        got = _LOOK if searching else self._idle_wait(worker)
        while got is not None:  # one turn per idle period
            task: Task | None = got
            if got is _LOOK:
                with self._lock:
                    self._searching -= 1
                    task = self._take_locked()
            source = self._source
            chained = 0
            while task is not None:
                fn, args = task
                self._started[me] = time.monotonic()
                try:
                    fn(*args)
                except BaseException:
                    # The server's task wrapper reports handler errors itself; anything
                    # that escapes it (SystemExit in a handler, a bug in a hook) must not
                    # kill the worker silently and leak its slot.
                    log.exception("uncaught exception in pool worker")
                finally:
                    self._started.pop(me, None)
                    task = None
                    if source is not None and not self._queue:
                        chained += 1
                        if chained >= _YIELD_EVERY:
                            chained = 0
                            _yield()
                        # Straight on to the next ready connection: one task ends and
                        # one starts, so busy is unchanged and no lock is taken. The
                        # queue (new connections, stage steps) goes first; reading its
                        # length without the lock only risks one message's delay.
                        task = source.take_ready(0)
                    if task is None:
                        task = self._finished()
            got = self._idle_wait(worker)

    def _take_locked(self) -> Task | None:
        if not self._queue:
            return None
        task = self._queue.popleft()
        if self._queue and self._searching == 0:
            self._wake_one_locked()  # more work than this thread: bring in one more
        return task

    def _finished(self) -> Task | None:
        """Account for a finished task; return the next queued one, if any."""
        with self._lock:
            self._busy -= 1
            if self._busy == self.max_threads - 1 and self._on_unsaturated is not None:
                self._on_unsaturated()
            if not self._busy and self._waiting_for_idle:
                self._all_idle.notify_all()
            return self._take_locked()

    def _idle_wait(self, worker: _Worker) -> Task | None:
        """Wait, idle, for work: _LOOK (go to the queue), a task from the source, or
        None (exit: told to stop, or timed out above min_threads)."""
        with self._lock:
            if self._queue:
                # A task was submitted after our last look at the queue (in _finished())
                # and before we went idle, when submit() found no one to wake: take it
                # instead of sleeping on it (also while shutting down: queued tasks
                # still run).
                self._searching += 1
                return _LOOK
            if self._closing:
                self._workers.discard(worker)
                return None
            lead = self._source is not None and self._leader is None
            if lead:
                self._leader = worker
            else:
                self._idle.append(worker)
        if lead:
            return self._lead(worker)
        while True:
            timeout = self.idle_timeout
            if worker.wake.acquire(timeout=-1 if timeout is None else timeout):
                return None if worker.stop else _LOOK
            with self._lock:
                # Timed out while idle. Leave unless that would go below min_threads or
                # we were woken between the timeout and taking the lock.
                if worker in self._idle and len(self._workers) > self.min_threads:
                    self._idle.remove(worker)
                    self._workers.discard(worker)
                    return None

    def _lead(self, worker: _Worker) -> Task | None:
        """Wait in the source as the leader until it gives a task or the queue needs us."""
        source = self._source
        assert source is not None
        while True:  # one turn per wake-up; stale events and spurious wakes loop
            task = source.take_ready(-1)
            with self._lock:
                woken = self._leader_woken
                if task is None and not woken and not self._closing:
                    continue  # a stale event: still the leader
                self._leader = None
                self._leader_woken = False
                if task is not None:
                    self._begin_locked()
                    if woken:
                        self._searching -= 1
                    # Somebody must watch the source while this thread runs the task.
                    if self._searching == 0:
                        self._wake_one_locked()
                    return task
                if woken or self._queue:
                    if not woken:
                        self._searching += 1
                    return _LOOK  # queued work (also while closing: it still runs)
                self._workers.discard(worker)  # closing, nothing queued
                return None

    # -- shutting down -------------------------------------------------------------------

    def shutdown(self, *, wait: bool = True, timeout: float | None = None) -> bool:
        """Refuse new tasks, stop idle workers, and optionally wait for busy ones.

        Tasks already queued still run. Returns True if no task is still running or
        queued when it returns.
        """
        with self._lock:
            self._closing = True
            while self._idle:
                worker = self._idle.pop()
                self._workers.discard(worker)
                worker.stop = True
                worker.wake.release()
            if self._leader is not None and self._source is not None:
                self._source.wake()
            if not wait:
                return self._busy == 0
            deadline = None if timeout is None else time.monotonic() + timeout
            self._waiting_for_idle += 1
            try:
                while self._busy:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        break
                    self._all_idle.wait(remaining)
            finally:
                self._waiting_for_idle -= 1
            return self._busy == 0


# Connections taken from the kernel's backlog in one shutdown, at most: a bound on the
# work a stop can be asked to do (somaxconn, the largest backlog, is 4096 by default).
BACKLOG_DRAIN_LIMIT = 4096


def _drain_at_exit(ref: weakref.ReferenceType[ThreadPoolMixIn]) -> None:
    server = ref()
    if server is not None and not server.closed:
        server.drain()


class _Runtime:
    """What a ThreadPoolMixIn server holds in one process: its pool and pipeline."""

    __slots__ = ("drained", "forks", "pipeline", "pool")

    def __init__(self, pool: WorkerPool) -> None:
        self.forks = forks.count
        self.pool = pool
        self.pipeline: ConnectionPipeline | None = None
        self.drained = False


class ThreadPoolMixIn(ServerFeature):
    """Handle requests on a bounded pool of reusable threads. Put it last of the mix-ins.

    When max_threads handlers run at once the server stops accepting until one
    finishes, so extra clients wait in the kernel backlog and memory stays bounded.
    Stream connections go through the connection pipeline: PROXY header, TLS handshake
    and waiting for a request happen in the serving loop, and a handler that works
    message by message (servekit.features.messages: http.server's handlers and
    MessageHandler) gives its thread back between messages. max_threads therefore bounds
    messages in progress, not open connections.

    daemon_threads and block_on_close keep their ThreadingMixIn meaning: with
    block_on_close, server_close() waits up to drain_timeout for running handlers;
    without daemon_threads, the interpreter does the same at exit.
    """

    feature_rank = 50
    #: Marks the pipeline's concurrency mix-in (it excludes ThreadingMixIn/ForkingMixIn).
    pool_concurrency = True

    max_threads: int = knob(
        128,
        "largest number of worker threads, i.e. of handlers running at once",
        flag="--threads",
        check=positive,
        section="pool",
    )
    min_threads: int = knob(
        0,
        "worker threads kept alive when idle; extra ones exit after thread_idle_timeout",
        check=non_negative,
        section="pool",
    )
    thread_idle_timeout: float = knob(
        30.0,
        "seconds an idle worker above min_threads waits for work before exiting",
        check=positive,
        section="pool",
    )
    drain_timeout: float | None = knob(
        30.0,
        "seconds server_close() waits for in-flight handlers (None: forever)",
        check=optional_positive,
        parse=parse_optional_float,
        section="pool",
    )
    # ThreadingMixIn's two knobs, with their meaning, accepted as keywords too.
    daemon_threads: bool = knob(
        False,
        "pool threads are daemon threads: the interpreter does not wait for requests at exit",
        flag="",
        section="pool",
    )
    block_on_close: bool = knob(
        True,
        "server_close() waits (up to drain_timeout) for in-flight requests",
        flag="",
        section="pool",
    )
    # A full pool leaves new connections in the kernel's listen backlog, so the backlog
    # must hold a burst: the stdlib's 5 drops SYNs (clients retry after 1 s, 3 s, ...)
    # as soon as more than five connect at once. Linux caps it at net.core.somaxconn
    # (4096 since kernel 5.4).
    request_queue_size: int = 1024
    # Under load several connections are ready per wake-up; taking up to this many at
    # once (from a non-blocking listener, see server_activate) saves a select() each.
    accept_batch: int = 16
    # Handlers get a socket whose timeout costs no system call when the bytes are there
    # (servekit.features.connsocket; ListenersMixIn and get_request() honour it).
    accepted_socket_class = ConnectionSocket

    _POOL_FULL = "thread pool full"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._runtime: _Runtime | None = None
        self._served_in: int | None = None
        super().__init__(*args, **kwargs)

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        # Remembered for the shutdown sequence: only a process that served takes the
        # backlog (not one whose constructor failed, nor a pre-fork parent).
        self._served_in = os.getpid()
        super().serve_forever(poll_interval)

    def _here(self) -> _Runtime | None:
        runtime: _Runtime | None = getattr(self, "_runtime", None)
        if runtime is None or runtime.forks != forks.count:
            return None
        return runtime

    @property
    def pool(self) -> WorkerPool:
        """This process's worker pool, created on first use (so after any fork)."""
        runtime = self._here()
        if runtime is None:
            pool = WorkerPool(
                self.max_threads,
                min_threads=self.min_threads,
                idle_timeout=self.thread_idle_timeout,
                name=f"servekit-{type(self).__name__}",
                on_saturated=lambda: self.pause_accepting(self._POOL_FULL),
                on_unsaturated=lambda: self.resume_accepting(self._POOL_FULL),
            )
            runtime = self._runtime = _Runtime(pool)
            if not self.daemon_threads:
                atexit.register(_drain_at_exit, weakref.ref(self))
        return runtime.pool

    @property
    def pipeline(self) -> ConnectionPipeline | None:
        """This process's connection pipeline, once the serving loop admitted a connection."""
        runtime = self._here()
        return None if runtime is None else runtime.pipeline

    @property
    def waiting_connections(self) -> int:
        """Connections in the loop before their first handler: PROXY header, TLS
        handshake, waiting for the first request."""
        pipeline = self.pipeline
        return 0 if pipeline is None else pipeline.waiting

    @property
    def parked_connections(self) -> int:
        """Connections waiting in the loop, without a thread, between two messages."""
        pipeline = self.pipeline
        return 0 if pipeline is None else pipeline.parked

    def _pipeline_here(self) -> ConnectionPipeline:
        runtime = self._here()
        if runtime is not None and runtime.pipeline is not None:
            return runtime.pipeline  # the usual case, once per connection: one lookup
        pool = self.pool  # this process's runtime, made on first use
        runtime = self._here()
        assert runtime is not None
        pipeline = ConnectionPipeline(
            self,
            self.connection_stages(),
            pool.submit,
            idle_timeout=self.park_timeout(),
        )
        pipeline.start()
        pool.follow(pipeline)
        runtime.pipeline = pipeline
        return pipeline

    def get_request(self) -> tuple[Any, Any]:
        """Accept a stream connection as accepted_socket_class (ConnectionSocket), as
        ListenersMixIn does, so that a pool server without it (ThreadPoolTCPServer)
        gives its handlers the same socket: no poll() before each read and write, held
        response heads, the request wait before every HTTP request, min_request_rate."""
        if self.socket_type != socket.SOCK_STREAM or type(self.socket) is not socket.socket:
            return super().get_request()  # a datagram server, or a listener of its own
        return accept_as(self.socket, self.accepted_socket_class)

    def server_activate(self) -> None:
        super().server_activate()
        # Non-blocking, so a batch of accepts ends with BlockingIOError instead of
        # blocking the loop, and a sibling process taking the connection first (shared
        # listener, pre-fork) costs nothing. Accepted sockets stay blocking on Linux.
        self.socket.setblocking(False)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Run one request on a pool thread: finish, report errors, always close.

        ThreadingMixIn's implementation, shared (one place for "finish, report errors,
        always close"), so a subclass overriding it behaves the same with either.
        """
        ThreadingMixIn.process_request_thread(self, request, client_address)  # type: ignore[arg-type]

    def process_request(self, request: Any, client_address: Any) -> None:
        """Admit a stream connection to the pipeline; run anything else on a pool thread.

        The pipeline needs the serving loop: under handle_request(), or for datagrams,
        the request runs whole on a pool thread.
        """
        if (
            self.socket_type == socket.SOCK_STREAM
            and self.state is ServerState.SERVING
            and self.on_loop_thread
        ):
            self._pipeline_here().admit(request, client_address)
        else:
            self.pool.submit(self.process_request_thread, request, client_address)

    # -- the shutdown steps (the order is ServerFeature.server_close's) -------------------

    def accept_backlog(self) -> None:
        """Serve, once each, the connections the kernel queued before we stopped."""
        super().accept_backlog()
        if self.socket_type != socket.SOCK_STREAM or self._served_in != os.getpid():
            return
        runtime = self._here()
        if runtime is not None and runtime.drained:
            return
        pipeline = self._pipeline_here()
        runtime = self._here()
        assert runtime is not None
        taken = 0
        # One grace for every preamble of the backlog (see serve_blocking()).
        until = time.monotonic() + SHUTDOWN_GRACE
        for source in self.accept_sources():
            self.ready_listener = source
            while taken < BACKLOG_DRAIN_LIMIT:
                try:
                    request, client_address = self.get_request()
                except OSError:
                    break  # BlockingIOError: the queue is empty (or the listener closed)
                if not self.verify_request(request, client_address):
                    self.shutdown_request(request)
                    continue
                taken += 1
                try:
                    runtime.pool.submit(pipeline.serve_blocking, request, client_address, until)
                except RuntimeError:
                    self.shutdown_request(request)
        if taken:
            log.info("shutdown: serving %d connection(s) already queued by the kernel", taken)

    def close_idle_connections(self) -> None:
        super().close_idle_connections()
        runtime = self._here()
        if runtime is not None and runtime.pipeline is not None:
            closed = runtime.pipeline.close_idle()
            if closed:
                log.info("shutdown: closed %d idle connection(s)", closed)

    def drain(self) -> None:
        """Wait once, up to drain_timeout, for running handlers (if block_on_close)."""
        super().drain()
        runtime = self._here()
        if runtime is None or runtime.drained:
            return
        runtime.drained = True
        pool = runtime.pool
        if not self.block_on_close:
            pool.shutdown(wait=False)
        elif not pool.shutdown(wait=True, timeout=self.drain_timeout):
            log.warning(
                "shutdown: %d handler(s) still running after drain_timeout=%ss; not waiting longer",
                pool.busy,
                self.drain_timeout,
            )
        if runtime.pipeline is not None:
            runtime.pipeline.close()


class ThreadPoolTCPServer(ThreadPoolMixIn, TCPServer):
    """TCPServer handling connections on a bounded thread pool."""


class ThreadPoolUDPServer(ThreadPoolMixIn, UDPServer):
    """UDPServer handling datagrams on a bounded thread pool."""


if hasattr(socket, "AF_UNIX"):
    from servekit.core import UnixDatagramServer, UnixStreamServer

    __all__ += ["ThreadPoolUnixDatagramServer", "ThreadPoolUnixStreamServer"]

    class ThreadPoolUnixStreamServer(ThreadPoolMixIn, UnixStreamServer):
        """UnixStreamServer handling connections on a bounded thread pool."""

    class ThreadPoolUnixDatagramServer(ThreadPoolMixIn, UnixDatagramServer):
        """UnixDatagramServer handling datagrams on a bounded thread pool."""
