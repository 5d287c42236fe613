# PreforkMixIn: serve from N pre-forked worker processes under a supervisor.
#
# Strategy. The parent binds the listening socket once (in the constructor, as every
# socketserver does) and then, in serve_forever(), runs a Supervisor instead of the
# request loop. Each worker is a fork of the parent that runs the ordinary servekit
# loop on the inherited socket, with whatever concurrency mix-in comes after this one
# in the bases (a thread pool per worker, typically). The same object is the parent's
# supervisor handle and each child's server, so a user's script does not change:
#
#     class Server(PreforkMixIn, ThreadPoolMixIn, TCPServer): ...
#     with Server(("0.0.0.0", 8000), Handler, workers=4) as server:
#         server.serve_forever()
#
# Sharing one listening socket (the default) lets the kernel hand each connection to
# whichever worker accepts first; it is non-blocking so that a worker that loses the
# race returns to its loop instead of blocking in accept(), and a worker accepts one
# connection per wake-up from it, so that a burst is spread over the workers. With
# reuse_port=True each worker binds its own SO_REUSEPORT socket instead and the kernel
# hashes connections across them: no wake-up of idle workers, but a connection queued
# on a worker that dies is reset, and a busy worker's queue is not drained by idle
# siblings.
from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from servekit.core.wakeup import Wakeup
from servekit.features.base import ServerFeature
from servekit.features.connection import Connection
from servekit.features.listeners import ListenerOptions, bind_listeners
from servekit.knobs import (
    knob,
    non_negative,
    optional_positive,
    parse_optional_float,
    positive,
)
from servekit.process.supervisor import (
    EXIT_BOOT_ERROR,
    EXIT_OK,
    Supervisor,
    WorkerContext,
    WorkerState,
)

__all__ = ["PreforkMixIn"]

log = logging.getLogger("servekit.prefork")


class PreforkMixIn(ServerFeature):
    """Serve from pre-forked worker processes under a supervisor. Put it first.

    serve_forever() in the parent supervises `workers` processes until shutdown(),
    SIGTERM (graceful), SIGINT/SIGQUIT (fast); SIGHUP replaces every worker and
    SIGTTIN/SIGTTOU add or remove one. Override worker_init() for per-process setup
    (it runs in each worker before it serves; an exception there is a boot error).
    """

    feature_rank = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._worker_context: WorkerContext | None = None
        self._supervisor: Supervisor | None = None
        self._stopping_since: float | None = None
        self._stuck_reported: float | None = None
        super().__init__(*args, **kwargs)

    workers: int = knob(2, "number of worker processes", check=positive, section="prefork")
    graceful_timeout: float = knob(
        30.0,
        "seconds a stopping worker may spend finishing in-flight requests before SIGKILL",
        check=positive,
        section="prefork",
    )
    worker_timeout: float | None = knob(
        30.0,
        "seconds a worker's loop may go without a heartbeat, or every one of its pool "
        "threads stay in the same handler, before the worker is replaced (None: never)",
        check=optional_positive,
        parse=parse_optional_float,
        section="prefork",
    )
    max_requests: int = knob(
        0,
        "requests after which a worker retires and is replaced (0: never)",
        check=non_negative,
        section="prefork",
    )
    max_requests_jitter: int = knob(
        0,
        "random extra requests (0..N) per worker, so workers do not all retire at once",
        check=non_negative,
        section="prefork",
    )
    reuse_port: bool = knob(
        False,
        "each worker binds its own SO_REUSEPORT socket instead of sharing the parent's",
        section="prefork",
    )

    # -- parent --------------------------------------------------------------------------

    @property
    def worker_context(self) -> WorkerContext | None:
        """In a worker process, its context (index, generation, ...); None in the parent."""
        return getattr(self, "_worker_context", None)

    @property
    def supervisor(self) -> Supervisor | None:
        """The running supervisor, in the parent while serve_forever() runs."""
        return getattr(self, "_supervisor", None)

    @property
    def stopping_since(self) -> float | None:
        """In the parent: time.monotonic() when the graceful or fast stop began, or None."""
        return getattr(self, "_stopping_since", None)

    def server_bind(self) -> None:
        if self.reuse_port:
            if self.socket_type != socket.SOCK_STREAM or self.address_family not in (
                socket.AF_INET,
                socket.AF_INET6,
            ):
                raise ValueError("reuse_port applies to TCP servers only")
            self.allow_reuse_port = True
        super().server_bind()

    def server_activate(self) -> None:
        if self.reuse_port and len(getattr(self, "sockets", None) or [self.socket]) > 1:
            raise ValueError("reuse_port applies to a server with one listening address")
        if self.reuse_port:
            # The parent only holds the address (bound, not listening): a listening
            # socket would join the SO_REUSEPORT group and get connections nobody
            # accepts. Each worker opens its own listening socket.
            return
        super().server_activate()

    def run_loop(self, wakeup: Wakeup, poll_interval: float) -> None:
        if self.worker_context is not None:
            super().run_loop(wakeup, poll_interval)
            return
        supervisor = Supervisor(
            lambda context: self._worker_main(context, poll_interval),
            workers=self.workers,
            graceful_timeout=self.graceful_timeout,
            worker_timeout=self.worker_timeout,
            max_requests=self.max_requests,
            max_requests_jitter=self.max_requests_jitter,
            on_reload=self.on_reload,
            on_ready=self.on_workers_ready,
            on_stop=self._on_supervisor_stop,
            on_tick=self.supervisor_tick,
            name=self.supervisor_label,
            hold_signals=True,  # _worker_main releases them once its handlers are set
        )
        self._supervisor = supervisor
        try:
            supervisor.run(wakeup=wakeup, should_stop=lambda: self.stop_requested)
        finally:
            self._supervisor = None

    @property
    def supervisor_label(self) -> str:
        """How the supervisor's log lines name this server ("echo: worker 0 started").
        The class name by default. May be overridden."""
        return type(self).__name__

    def on_reload(self) -> None:
        """Called in the parent on SIGHUP before new workers start. May be overridden."""

    def on_workers_ready(self) -> None:
        """Called in the parent once all workers serve for the first time. May be overridden."""

    def supervisor_tick(self) -> None:
        """Called on every turn of the supervisor's loop (at least once a second).

        May be overridden, e.g. to ping a watchdog only while the supervisor runs.
        """

    def on_stopping(self) -> None:
        """Called in the parent when a graceful or fast stop begins. May be overridden."""

    def _on_supervisor_stop(self) -> None:
        self._stopping_since = time.monotonic()
        if not self.reuse_port:
            # The whole server stops: shut the shared listener's door before the
            # workers drain its queue (see stop_admitting()).
            super().stop_admitting()
        # Stopping: refuse new connections at once instead of letting them queue in a
        # backlog that no worker will accept from (they would be reset later).
        for sock in getattr(self, "sockets", None) or [self.socket]:
            sock.close()
        self.on_stopping()

    # -- worker --------------------------------------------------------------------------

    def worker_init(self) -> None:
        """Called in each worker process before it serves. May be overridden."""

    def _worker_main(self, context: WorkerContext, poll_interval: float) -> int:
        self.reset_after_fork()
        self._worker_context = context
        # Graceful: stop the loop, then drain (below). Fast: leave now. The supervisor
        # owns reloads and resizing; a worker ignores them (SIGTTIN/SIGTTOU would
        # otherwise stop the process, SIGHUP would kill it).
        signal.signal(signal.SIGTERM, lambda signum, frame: self.request_shutdown())
        signal.signal(signal.SIGINT, lambda signum, frame: os._exit(EXIT_OK))
        signal.signal(signal.SIGQUIT, lambda signum, frame: os._exit(EXIT_OK))
        for ignored in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):
            signal.signal(ignored, signal.SIG_IGN)
        context.release_signals()
        try:
            if self.reuse_port:
                self._open_worker_listener()
            else:
                for sock in getattr(self, "sockets", None) or [self.socket]:
                    sock.setblocking(False)
                # One connection per wake-up from the shared listener, not a batch: every
                # worker's loop wakes for a new connection, and one that took a batch of
                # 16 kept a burst. 128 ping-pong clients connecting at once, two workers
                # on one CPU: 128/0 to 80/48 with batches, 95/33 to 72/56 one at a time,
                # churn the same (docs/concurrency.md has the figures).
                self.accept_batch = 1
            self.worker_init()
        except Exception:
            log.exception("worker %d failed to start", context.index)
            return EXIT_BOOT_ERROR
        context.set_state(WorkerState.SERVING)
        self.serve_forever(poll_interval)
        context.set_state(WorkerState.DRAINING)
        self.server_close()
        return EXIT_OK

    def _open_worker_listener(self) -> None:
        # The listener code builds it, so it gets the same options as every listener
        # (TCP_NODELAY, keep-alive, backlog, IPV6_V6ONLY), plus SO_REUSEPORT.
        options = (
            self
            if isinstance(self, ListenerOptions)
            else ListenerOptions(
                so_reuseport=True,
                backlog=self.request_queue_size,
                tcp_nodelay=getattr(self, "tcp_nodelay", True),
            )
        )
        host, port = self.server_address[0], self.server_address[1]
        address = f"tcp://[{host}]:{port}" if ":" in str(host) else f"tcp://{host}:{port}"
        [listener] = bind_listeners([address], options, stream=True, nonblocking=True)
        inherited, self.socket = self.socket, listener.socket
        listeners = getattr(self, "listeners", None)
        if listeners:
            listeners[0].socket = listener.socket  # ListenersMixIn serves from its list
        inherited.close()

    def stop_admitting(self) -> None:
        # Without reuse_port a worker shares the listener with its siblings, and the
        # door is the parent's to shut when the whole server stops: a worker that
        # retires, or is replaced by a reload, must not refuse connections for all.
        if self.worker_context is not None and self.reuse_port:
            super().stop_admitting()

    def accept_backlog(self) -> None:
        # In the parent the listener is the workers': it accepts nothing itself.
        if self.worker_context is not None:
            super().accept_backlog()

    def service_actions(self) -> None:
        context = self.worker_context
        if context is not None:
            context.heartbeat(self._alive_since())
        super().service_actions()

    def _alive_since(self) -> float:
        """The heartbeat to publish: now, or, while every thread of the pool runs a
        handler, the moment the last of them started it.

        A worker whose loop turns but whose every thread hangs in a handler serves
        nobody (it stopped accepting when the pool filled), so the heartbeat stays at
        the moment the pool filled and the supervisor replaces the worker once that is
        worker_timeout old, as gunicorn replaces a worker stuck in a request. One
        handler finishing frees a thread and the heartbeat is current again.
        """
        now = time.monotonic()
        pool = getattr(self, "pool", None)  # ThreadPoolMixIn's; other concurrency has none
        timeout = self.worker_timeout
        if pool is None or timeout is None or pool.busy < pool.max_threads:
            self._stuck_reported = None
            return now
        running = pool.running_since()
        if len(running) < pool.max_threads:
            return now  # tasks submitted but not started yet: the pool is not stuck
        since: float = max(running)
        if self._stuck_reported != since:
            # Report the stacks before the supervisor's SIGKILL (which nobody can log
            # from inside): at half the timeout, from a timer on this loop, so that the
            # report does not depend on how often the loop turns.
            self._stuck_reported = since
            self.call_at(since + timeout / 2, lambda: self._report_stuck(since))
        return since

    def _report_stuck(self, since: float) -> None:
        pool = getattr(self, "pool", None)
        if pool is None or pool.busy < pool.max_threads:
            return
        running = pool.running_since()
        if len(running) < pool.max_threads or max(running) != since:
            return  # a thread freed up in the meantime: not stuck after all
        frames = sys._current_frames()
        stacks = []
        for thread in threading.enumerate():
            frame = frames.get(thread.ident or -1)
            if frame is not None and thread.name.startswith(pool.name + "-"):
                stack = "".join(traceback.format_stack(frame))
                stacks.append(f"thread {thread.name}:\n{stack.rstrip()}")
        context = self.worker_context
        log.error(
            "worker %d (pid %d): all %d threads have been in a handler for %.1fs; the "
            "supervisor replaces this worker when that reaches worker_timeout=%ss. "
            "Where they are:\n%s",
            -1 if context is None else context.index,
            os.getpid(),
            pool.max_threads,
            time.monotonic() - since,
            self.worker_timeout,
            "\n".join(stacks),
        )

    # max_requests counts requests as gunicorn does: each message of a stream connection
    # (an HTTP request of a keep-alive connection, a line of the echo handler) and each
    # datagram; not connections, which a keep-alive client keeps for thousands of them.

    def message_hooks(self) -> list[Callable[[Connection], object]]:
        hooks = super().message_hooks()
        context = self.worker_context
        if context is not None and context.max_requests:  # nothing to count otherwise
            # Composed in the worker, whose context is fixed: bound here, not looked up
            # on every message.
            def count_toward_max_requests(connection: Connection) -> None:
                if context.count_request():
                    self._retire()

            hooks.append(count_toward_max_requests)
        return hooks

    def process_request(self, request: Any, client_address: Any) -> None:
        if self.socket_type != socket.SOCK_STREAM:
            context = self.worker_context
            if context is not None and context.count_request():
                self._retire()
        super().process_request(request, client_address)

    def _retire(self) -> None:
        # Retire after this request: the supervisor sees DRAINING and starts a
        # replacement while we finish what is in flight (count_request() says so once).
        context = self.worker_context
        assert context is not None
        context.set_state(WorkerState.DRAINING)
        self.request_shutdown()

    def server_close(self) -> None:
        supervisor = self.supervisor
        if supervisor is not None and self.worker_context is None:
            supervisor.stop(graceful=True, wait=True)
        super().server_close()
