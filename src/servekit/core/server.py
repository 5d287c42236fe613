# BaseServer: the server lifecycle and the serving loop, socket-type agnostic.
#
# Strategy. The contract is socketserver's template method: serve_forever() and
# handle_request() call get_request / verify_request / process_request /
# shutdown_request, each of which a subclass or mix-in may override and chain with
# super(). What differs from the stdlib is how the loop waits:
#   * it blocks in a selector on the listener(s) *and* a wake-up channel, so shutdown()
#     returns as soon as the loop has stopped instead of up to poll_interval later;
#     poll_interval keeps only its other meaning, the longest gap between
#     service_actions() calls;
#   * shutdown() from inside a handler that runs on the loop's own thread stops the loop
#     after the current request instead of deadlocking;
#   * accepting can be paused (resource exhaustion, a full worker pool, a connection
#     cap) by unregistering the listener, so the loop never spins on a ready socket it
#     will not accept from, and pending connections wait in the kernel backlog.
#
# Lifecycle state is one field, guarded by one lock:
#   IDLE     not inside serve_forever()
#   SERVING  serve_forever() is running
#   STOPPING shutdown() was called; the loop exits at its next wake-up, or, if no loop
#            is running yet, the next serve_forever() returns at once (stdlib semantics)
from __future__ import annotations

import contextlib
import enum
import heapq
import itertools
import selectors
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Any, Self

from servekit.core.accept import RESOURCE_ERRNOS, AcceptBackoff
from servekit.core.wakeup import Wakeup

__all__ = ["BaseServer", "ServerState", "Timer"]


class _Watched:
    """A selector registration made through BaseServer.watch()."""

    __slots__ = ("callback",)

    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback = callback


class Timer:
    """A call scheduled with BaseServer.call_at(); cancel() stops it (from any thread)."""

    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        # A flag, not a heap removal: the loop drops cancelled timers when they surface,
        # so cancel() needs no lock and is safe from any thread.
        self.cancelled = True


class ServerState(enum.Enum):
    IDLE = "idle"
    SERVING = "serving"
    STOPPING = "stopping"


class BaseServer:
    """Base class for servers: the lifecycle and the serving loop.

    Methods for the caller:

    - __init__(server_address, RequestHandlerClass)
    - serve_forever(poll_interval=0.5)
    - shutdown()
    - handle_request()  # if you do not use serve_forever()
    - fileno() -> int   # for selectors
    - pause_accepting(reason) / resume_accepting(reason)
    - watch(fileobj, callback) / unwatch(fileobj)   # the loop API for mix-ins
    - call_at(when, callback) -> Timer
    - call_soon_threadsafe(callback)

    Methods that may be overridden:

    - server_bind()
    - server_activate()
    - get_request() -> request, client_address
    - handle_timeout()
    - verify_request(request, client_address)
    - server_close()
    - process_request(request, client_address)
    - shutdown_request(request)
    - close_request(request)
    - service_actions()
    - handle_error()

    Class variables that may be overridden by derived classes or instances:

    - timeout
    - address_family
    - socket_type
    - allow_reuse_address
    - allow_reuse_port

    Instance variables:

    - RequestHandlerClass
    - socket
    """

    #: Seconds handle_request() waits before calling handle_timeout(); None waits forever.
    timeout: float | None = None
    #: Requests serve_forever() takes from a listener per wake-up. More than 1 needs a
    #: non-blocking listener (get_request() raising BlockingIOError when none is left);
    #: the production mix-ins set both, to save a select() per connection under load.
    accept_batch: int = 1

    def __init__(self, server_address: Any, RequestHandlerClass: Callable[..., Any]) -> None:
        """Constructor. May be extended, do not override."""
        self.server_address = server_address
        self.RequestHandlerClass = RequestHandlerClass
        self.__lock = threading.Lock()
        # Same name as the stdlib's event (some code waits on it directly).
        self.__is_shut_down = threading.Event()
        self.__is_serving = threading.Event()
        self.__state = ServerState.IDLE
        self.__wakeup: Wakeup | None = None
        self.__loop_thread: int | None = None
        self.__accept_holds: set[str] = set()
        # Set without the lock by request_shutdown(), which signal handlers call.
        self.__stop_soon = False
        self.__backoff = AcceptBackoff()
        self.__watched: dict[Any, _Watched] = {}
        self.__selector: selectors.BaseSelector | None = None
        self.__init_loop_calls()
        #: The listener that select() reported ready, for get_request() of servers that
        #: listen on several sockets; None means "the only one".
        self.ready_listener: Any = None

    def __init_loop_calls(self) -> None:
        self.__timers: list[tuple[float, int, Timer]] = []
        self.__timer_seq = itertools.count()
        self.__timer_lock = threading.Lock()
        # deque.append and popleft are atomic, so call_soon_threadsafe() takes no lock
        # and is safe in a signal handler that interrupts the loop itself.
        self.__soon: deque[Callable[[], None]] = deque()
        #: When the loop's current select() returns at the latest (it is woken early by
        #: a timer set for before then from another thread).
        self.__wake_by = float("inf")

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def state(self) -> ServerState:
        """Where the serving loop is in its lifecycle (read-only)."""
        return self.__state

    def server_activate(self) -> None:
        """Called by constructor to activate the server. May be overridden."""

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Handle one request at a time until shutdown().

        Returns promptly when shutdown() is called from another thread, or after the
        current request when it is called from a handler running on this thread.
        poll_interval is the longest time between service_actions() calls; it is not a
        shutdown latency.
        """
        wakeup = self.__begin_serving()
        if wakeup is None:
            return
        try:
            self.run_loop(wakeup, poll_interval)
        finally:
            self.__end_serving(wakeup)

    def run_loop(self, wakeup: Wakeup, poll_interval: float) -> None:
        """The body of serve_forever(): run until a stop is requested. May be overridden.

        For mix-ins that replace the loop itself (the pre-fork supervisor runs its own
        in the parent process). wakeup becomes readable whenever the loop should look
        at its state again; stop_requested tells whether to return.
        """
        with selectors.DefaultSelector() as selector:
            selector.register(wakeup, selectors.EVENT_READ, None)
            for fileobj, watched in self.__watched.items():
                selector.register(fileobj, selectors.EVENT_READ, watched)
            self.__selector = selector
            try:
                self.__run_selector(selector, wakeup, poll_interval)
            finally:
                self.__selector = None

    def __run_selector(
        self, selector: selectors.BaseSelector, wakeup: Wakeup, poll_interval: float
    ) -> None:
        listeners = tuple(self.accept_sources())
        watching = False
        while not self.__stopping():
            now = time.monotonic()
            want = not self.__accept_holds and not self.__backoff.paused(now)
            if want != watching:
                for listener in listeners:
                    if want:
                        selector.register(listener, selectors.EVENT_READ, listener)
                    else:
                        selector.unregister(listener)
                watching = want
            timeout = poll_interval
            if self.__backoff.resume_at is not None:
                timeout = min(timeout, self.__backoff.resume_at - now)
            with self.__timer_lock:
                if self.__timers:
                    timeout = min(timeout, self.__timers[0][0] - now)
                timeout = max(0.0, timeout)
                self.__wake_by = now + timeout
            if self.__soon:
                timeout = 0.0
            events = selector.select(timeout)
            self.__wake_by = float("-inf")  # not waiting: nobody needs to wake us
            if self.__stopping():
                break
            for key, _ in events:
                data = key.data
                if data is None:
                    wakeup.drain()
                elif isinstance(data, _Watched):
                    data.callback()
                else:
                    self.ready_listener = data
                    for _ in range(self.accept_batch):
                        if self.__accept_holds or self.__stopping():
                            break
                        if not self._handle_one_request():
                            break
            self.__run_soon()
            self.__run_timers()
            self.service_actions()

    def __run_soon(self) -> None:
        # Bounded: only what was queued before we started; later calls wait a turn.
        for _ in range(len(self.__soon)):
            self.__soon.popleft()()

    def __run_timers(self) -> None:
        timers = self.__timers
        now = time.monotonic()
        if not timers or timers[0][0] > now:
            return  # the common case, read without the lock: a stale read only delays
        due: list[Timer] = []
        with self.__timer_lock:
            while self.__timers and self.__timers[0][0] <= now:
                timer = heapq.heappop(self.__timers)[2]
                if not timer.cancelled:
                    due.append(timer)
        for timer in due:
            if not timer.cancelled:
                timer.callback()

    # -- the loop API, for mix-ins that keep work in the serving loop ----------------------

    def watch(self, fileobj: Any, callback: Callable[[], None]) -> None:
        """Call callback on the loop's thread whenever fileobj is readable.

        For mix-ins that keep connections in the loop (the connection pipeline parks
        idle connections there). Call from the loop's thread, or before serve_forever();
        the watch lasts until unwatch(), across serve_forever() calls.
        """
        watched = _Watched(callback)
        self.__watched[fileobj] = watched
        if self.__selector is not None:
            self.__selector.register(fileobj, selectors.EVENT_READ, watched)

    def unwatch(self, fileobj: Any) -> None:
        """Stop a watch(). Call from the loop's thread, or when no loop runs."""
        if self.__watched.pop(fileobj, None) is not None and self.__selector is not None:
            self.__selector.unregister(fileobj)

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        """Call callback on the loop's thread once time.monotonic() reaches when.

        Safe from any thread: a timer due before the loop's next wake-up wakes it. The
        timer fires only while serve_forever() runs (a pending one waits for the next
        run). Returns a Timer whose cancel() stops it.
        """
        timer = Timer(when, callback)
        with self.__timer_lock:
            heapq.heappush(self.__timers, (when, next(self.__timer_seq), timer))
            wake = when < self.__wake_by and self.__loop_thread != threading.get_ident()
        if wake:
            self.__notify()
        return timer

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
        """Call callback on the loop's thread at its next turn, waking it.

        Safe from any thread and from a signal handler (it takes no lock). Calls queued
        while no loop runs are made when serve_forever() next runs.
        """
        self.__soon.append(callback)
        self.__notify()

    def __notify(self) -> None:
        wakeup = self.__wakeup
        if wakeup is not None:
            wakeup.notify()

    @property
    def stop_requested(self) -> bool:
        """True once shutdown() or request_shutdown() asked the running loop to stop."""
        return self.__stopping()

    def __stopping(self) -> bool:
        # A method, not the property, inside the loop: type checkers narrow a property
        # read in a while condition as if another thread could not change it.
        return self.__state is not ServerState.SERVING or self.__stop_soon

    def _loop_wakeup(self) -> Wakeup | None:
        # For ForkingMixIn, inside the core only: it blocks on the loop's thread at
        # max_children and must still notice shutdown().
        return self.__wakeup

    @property
    def on_loop_thread(self) -> bool:
        """True when called from the thread running serve_forever() or handle_request()."""
        return self.__loop_thread == threading.get_ident()

    def reset_after_fork(self) -> None:
        """Forget the parent's loop state in a forked child that will serve on its own.

        The child inherits a copy of the parent's lock (possibly held), its state
        (SERVING, if the parent forked from inside its loop) and its wake-up channel.
        """
        self.__lock = threading.Lock()
        self.__is_shut_down = threading.Event()
        self.__is_serving = threading.Event()
        self.__state = ServerState.IDLE
        inherited = self.__wakeup
        self.__wakeup = None
        if inherited is not None:
            inherited.close()  # our copy only; the parent's stays open
        self.__loop_thread = None
        self.__accept_holds = set()
        self.__stop_soon = False
        self.__backoff = AcceptBackoff()
        self.__watched = {}
        self.__selector = None
        self.__init_loop_calls()

    def __begin_serving(self) -> Wakeup | None:
        with self.__lock:
            if self.__state is ServerState.STOPPING or self.__stop_soon:
                # shutdown() came first: honour it, as the stdlib does.
                self.__state = ServerState.IDLE
                self.__stop_soon = False
                self.__is_shut_down.set()
                return None
            if self.__state is ServerState.SERVING:
                raise RuntimeError("serve_forever() is already running on this server")
            self.__is_shut_down.clear()
            self.__wakeup = Wakeup()
            self.__state = ServerState.SERVING
            self.__loop_thread = threading.get_ident()
            self.__is_serving.set()
            return self.__wakeup

    def __end_serving(self, wakeup: Wakeup) -> None:
        with self.__lock:
            self.__is_serving.clear()
            self.__stop_soon = False
            self.__state = ServerState.IDLE
            self.__loop_thread = None
            self.__wakeup = None
            wakeup.close()
        self.__is_shut_down.set()

    def wait_serving(self, timeout: float | None = None) -> bool:
        """Block until serve_forever() is running; False if timeout expired first.

        Connections are queued by the kernel from the moment the server is activated,
        so clients need not wait for this; it is for code that must know the loop runs
        (tests, supervisors reporting readiness).
        """
        return self.__is_serving.wait(timeout)

    def shutdown(self) -> None:
        """Stop the serve_forever() loop.

        From another thread: blocks until the loop has exited (as in the stdlib, it
        waits forever if serve_forever() is never called). From a handler running on
        the loop's own thread: requests the stop and returns at once; the loop exits
        after the current request instead of deadlocking as the stdlib does.
        """
        with self.__lock:
            if self.__loop_thread == threading.get_ident():
                if self.__state is ServerState.SERVING:
                    self.__state = ServerState.STOPPING
                return
            self.__request_stop_locked()
        self.__is_shut_down.wait()

    def request_shutdown(self) -> None:
        """Ask serve_forever() to stop, and return at once without waiting.

        Safe to call from a signal handler and from any thread. The loop stops at its
        next wake-up (at once when called on its own thread or when the server's lock
        is free, otherwise within poll_interval). If no loop is running, the next
        serve_forever() returns immediately, as after shutdown().
        """
        self.__stop_soon = True
        if self.__loop_thread == threading.get_ident():
            # A signal handler interrupting our own loop: the lock may be held by the
            # very frame we interrupted, and the wake-up channel cannot be closed under
            # us (closing happens on this thread).
            wakeup = self.__wakeup
            if wakeup is not None:
                wakeup.notify()
            return
        if self.__lock.acquire(blocking=False):
            try:
                if self.__wakeup is not None:
                    self.__wakeup.notify()
            finally:
                self.__lock.release()

    def __request_stop_locked(self) -> None:
        self.__state = ServerState.STOPPING
        if self.__wakeup is not None:
            self.__wakeup.notify()

    # Compatibility: code in the wild sets ``server._BaseServer__shutdown_request = True``
    # to stop the stdlib loop without waiting. Keep that working, and make it prompt.
    def __get_shutdown_request(self) -> bool:
        return self.__state is ServerState.STOPPING or self.__stop_soon

    def __set_shutdown_request(self, value: bool) -> None:
        with self.__lock:
            if value:
                self.__request_stop_locked()
            elif self.__state is ServerState.STOPPING and self.__wakeup is None:
                self.__state = ServerState.IDLE

    __shutdown_request = property(__get_shutdown_request, __set_shutdown_request)

    def service_actions(self) -> None:
        """Called by serve_forever() after each wake-up and at least every poll_interval.

        May be overridden by a subclass or mix-in to do periodic work.
        """

    # -- accepting ---------------------------------------------------------------------

    def pause_accepting(self, reason: str) -> None:
        """Stop taking new requests until resume_accepting(reason); thread-safe.

        While any reason holds, the loop does not watch the listener, so connections
        wait in the kernel backlog (and datagrams in the socket buffer) instead of being
        accepted and dropped. May be extended.
        """
        with self.__lock:
            self.__accept_holds.add(reason)
            if self.__wakeup is not None and self.__loop_thread != threading.get_ident():
                self.__wakeup.notify()

    def resume_accepting(self, reason: str) -> None:
        """Release a hold taken with pause_accepting(); thread-safe. May be extended."""
        with self.__lock:
            if reason not in self.__accept_holds:
                return
            self.__accept_holds.discard(reason)
            if self.__wakeup is not None and not self.__accept_holds:
                self.__wakeup.notify()

    @property
    def accepting(self) -> bool:
        """False while a pause_accepting() hold or an accept back-off is in force."""
        return not self.__accept_holds and self.__backoff.resume_at is None

    def accept_sources(self) -> Sequence[Any]:
        """Objects with fileno() whose readability means get_request() will not block.

        The default is the server itself (its fileno()). Servers that listen on several
        sockets return each; get_request() then reads ``self.ready_listener``. May be
        overridden.
        """
        return (self,)

    # -- one request ---------------------------------------------------------------------

    def handle_request(self) -> None:
        """Wait for and handle one request, honouring self.timeout and the socket's."""
        timeout = self._handle_request_timeout()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.__owning_loop(), selectors.DefaultSelector() as selector:
            for listener in self.accept_sources():
                selector.register(listener, selectors.EVENT_READ, listener)
            while True:
                events = selector.select(timeout)
                if events:
                    self.ready_listener = events[0][0].data
                    self._handle_request_noblock()
                    return
                if deadline is not None:
                    timeout = deadline - time.monotonic()
                    if timeout < 0:
                        self.handle_timeout()
                        return

    def _handle_request_timeout(self) -> float | None:
        sock = getattr(self, "socket", None)
        timeout: float | None = sock.gettimeout() if sock is not None else None
        if not timeout:
            # None (blocking) or 0.0: a listener the production layer made non-blocking
            # for batch accepts, which says nothing about how long to wait here.
            return self.timeout
        if self.timeout is not None:
            return min(timeout, self.timeout)
        return timeout

    @contextlib.contextmanager
    def __owning_loop(self) -> Iterator[None]:
        # Lets shutdown() called by a handler inside handle_request() return instead of
        # waiting for a loop that does not exist.
        with self.__lock:
            previous = self.__loop_thread
            if previous is None:
                self.__loop_thread = threading.get_ident()
        try:
            yield
        finally:
            if previous is None:
                with self.__lock:
                    self.__loop_thread = None

    def _handle_request_noblock(self) -> None:
        """Handle one request, assuming get_request() will not block."""
        self._handle_one_request()

    def _handle_one_request(self) -> bool:
        """Get and handle one request; False if get_request() failed (none was ready)."""
        try:
            request, client_address = self.get_request()
        except OSError as exc:
            if exc.errno in RESOURCE_ERRNOS:
                self.__backoff.failed(exc)
            # Every other error belongs to one connection (or one datagram's ICMP
            # echo), or says that a non-blocking listener has nothing more; the stdlib
            # ignores them and so do we.
            return False
        if self.__backoff.active:
            self.__backoff.succeeded()
        if self.verify_request(request, client_address):
            try:
                self.process_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
                self.shutdown_request(request)
            except BaseException:
                self.shutdown_request(request)
                raise
        else:
            self.shutdown_request(request)
        return True

    def handle_timeout(self) -> None:
        """Called if no new request arrives within self.timeout. May be overridden."""

    def get_request(self) -> tuple[Any, Any]:
        """Return (request, client_address) for one request. Must be overridden."""
        raise NotImplementedError

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Return True to process the request. May be overridden."""
        return True

    def process_request(self, request: Any, client_address: Any) -> None:
        """Handle the request and close it. Overridden by the concurrency mix-ins."""
        self.finish_request(request, client_address)
        self.shutdown_request(request)

    def server_close(self) -> None:
        """Clean up the server. May be overridden."""

    def finish_request(self, request: Any, client_address: Any) -> None:
        """Finish one request by instantiating RequestHandlerClass."""
        self.RequestHandlerClass(request, client_address, self)

    def shutdown_request(self, request: Any) -> None:
        """Called to shut down and close an individual request."""
        self.close_request(request)

    def close_request(self, request: Any) -> None:
        """Called to clean up an individual request."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Handle an exception raised by the handler. May be overridden.

        The default prints the traceback to stderr and carries on serving.
        """
        rule = "-" * 40
        print(rule, file=sys.stderr)
        print(
            "Exception occurred during processing of request from",
            client_address,
            file=sys.stderr,
        )
        traceback.print_exc()
        print(rule, file=sys.stderr)

    # -- context manager -----------------------------------------------------------------

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.server_close()
