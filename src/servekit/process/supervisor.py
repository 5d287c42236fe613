# Pre-fork process supervision: start N worker processes, keep N alive, stop them well.
#
# Strategy. The supervisor knows nothing about servers: it forks, runs a given
# worker_main(WorkerContext) in each child, and watches the children. The server side
# lives in servekit.process.prefork, which composes an ordinary servekit server in each child.
#
# The parent's loop is one selector over a wake-up pipe (signal.set_wakeup_fd) and one
# pidfd per child (readable when the child exits, so no SIGCHLD race and it works when
# the loop does not run on the main thread). Signal handlers only queue the signal; the
# loop dispatches to handle_<signal> (gunicorn's arbiter, without its sleep loop).
#
# Liveness: each worker's serving loop writes a heartbeat (CLOCK_MONOTONIC, which is
# system-wide on Linux) into its slot of a shared anonymous mmap on every iteration.
# A worker whose heartbeat is older than worker_timeout while it claims to be serving
# is stuck (a handler blocking the loop, a deadlock) and is killed with SIGKILL.
# Heartbeats through shared memory cost one store per loop iteration; gunicorn's
# file-timestamp heartbeats cost a syscall and depend on the filesystem.
#
# Signals, as operators expect from gunicorn and nginx:
#   SIGTERM          graceful stop: workers stop accepting at once, finish in-flight
#                    requests for up to graceful_timeout, then are killed
#   SIGINT, SIGQUIT  fast stop: workers exit at once
#   SIGHUP           replace every worker: start a new generation, wait until it
#                    serves, then stop the old one gracefully (no refused connection,
#                    since the listening socket stays open in the parent throughout)
#   SIGTTIN/SIGTTOU  one worker more / one fewer
#
# Workers die with their supervisor. A supervisor killed without a chance to stop its
# workers (SIGKILL, the OOM killer, a crashed container init) would leave them serving
# as orphans, holding the listening socket, so that a restart fails with EADDRINUSE.
# Each worker asks the kernel for SIGKILL when its parent dies (prctl PR_SET_PDEATHSIG,
# Linux) as the first thing after fork, then compares getppid() with the supervisor's
# pid recorded before fork: a supervisor that died in between is caught there. SIGKILL
# rather than SIGTERM because nobody is left to bound a graceful drain: a worker whose
# threads hang would keep the socket forever. The kernel sends the signal when the
# *thread* that forked exits; every fork happens in the thread running run(), which
# returns only after its workers are gone.
#
# Exit codes of a worker tell the supervisor what happened (gunicorn's lesson: distinct
# codes stop restart storms): 0 = finished on purpose (stop, retirement after
# max_requests); EXIT_BOOT_ERROR = failed before serving, repeated boot errors stop the
# supervisor instead of forking forever; anything else = crash, restarted with
# exponential back-off while it keeps crashing young.
from __future__ import annotations

import enum
import errno
import logging
import mmap
import os
import random
import selectors
import signal
import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from servekit.errors import ServekitError

__all__ = [
    "EXIT_BOOT_ERROR",
    "EXIT_CRASH",
    "EXIT_OK",
    "RESTART_CAUSES",
    "Supervisor",
    "SupervisorError",
    "WorkerContext",
    "WorkerState",
    "die_with_parent",
]

log = logging.getLogger("servekit.supervisor")

EXIT_OK = 0
EXIT_CRASH = 1
EXIT_BOOT_ERROR = 3

# Heartbeat slots are allocated once, before the first fork, so every worker shares
# the same mapping. 1024 workers is far beyond what one machine runs.
MAX_WORKERS = 1024

# After this many consecutive boot errors with no worker ever serving in between,
# the configuration is broken: stop instead of forking forever.
MAX_BOOT_ERRORS = 5

# <linux/prctl.h>: the signal a process receives when its parent (thread) dies.
PR_SET_PDEATHSIG = 1

# Why a worker was replaced while the supervisor kept running (Supervisor.counters.restarts):
RESTART_CAUSES = (
    "crash",  # died on its own with a failure exit code or a signal
    "boot-error",  # failed before serving (EXIT_BOOT_ERROR)
    "exit",  # exited 0 without being asked to
    "timeout",  # killed: stuck (no heartbeat) or slow to start, for worker_timeout
    "max-requests",  # retired after max_requests
    "reload",  # replaced by a new generation (SIGHUP)
)

# Crash-loop back-off: a worker that dies within CRASH_WINDOW seconds of starting is
# "crashing young"; the n-th consecutive one waits RESTART_DELAY_MIN * 2**(n-1), capped.
# A worker that lived longer (e.g. killed under load) is replaced at once.
CRASH_WINDOW = 5.0
RESTART_DELAY_MIN = 0.1
RESTART_DELAY_MAX = 10.0


def _load_prctl() -> Callable[..., int] | None:
    """libc's prctl(), or None where there is none. Loaded in the supervisor, before any
    fork, so that a new worker does not import ctypes in its first milliseconds."""
    try:
        import ctypes

        function = ctypes.CDLL(None, use_errno=True).prctl
    except (ImportError, OSError, AttributeError):
        return None
    function.argtypes = [
        ctypes.c_int,
        ctypes.c_ulong,
        ctypes.c_ulong,
        ctypes.c_ulong,
        ctypes.c_ulong,
    ]
    function.restype = ctypes.c_int
    prctl: Callable[..., int] = function
    return prctl


def die_with_parent(parent_pid: int, prctl: Callable[..., int] | None) -> None:
    """In a freshly forked worker: be killed when the supervisor (parent_pid) dies.

    Exits at once if the supervisor died before the request reached the kernel (the
    worker was then already re-parented, and no signal will ever come).
    """
    if prctl is not None and prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(_errno()))
    if os.getppid() != parent_pid:
        os._exit(EXIT_CRASH)


def _errno() -> int:
    import ctypes

    return ctypes.get_errno()


class SupervisorError(ServekitError, RuntimeError):
    """The supervisor cannot keep workers running (e.g. every worker fails to boot)."""


class WorkerState(enum.IntEnum):
    """What a worker says about itself in its shared slot."""

    STARTING = 0
    SERVING = 1
    DRAINING = 2  # stopped accepting; finishing in-flight requests


class _SupervisorState(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPING = "stopping"  # graceful: waiting for workers to drain
    STOPPING_FAST = "stopping fast"
    STOPPED = "stopped"


class _Wakeable(Protocol):
    def fileno(self) -> int: ...
    def drain(self) -> None: ...


# One slot per worker: heartbeat (monotonic seconds), requests handled, state.
_SLOT = struct.Struct("=dQi4x")


class _Slots:
    """Shared memory written by workers and read by the supervisor."""

    def __init__(self, count: int) -> None:
        # An anonymous mapping is MAP_SHARED: children see the parent's pages and the
        # parent sees their writes, with no file and no syscall per heartbeat.
        self._map = mmap.mmap(-1, _SLOT.size * count)

    def reset(self, index: int) -> None:
        _SLOT.pack_into(self._map, index * _SLOT.size, 0.0, 0, WorkerState.STARTING)

    def read(self, index: int) -> tuple[float, int, WorkerState]:
        beat, requests, state = _SLOT.unpack_from(self._map, index * _SLOT.size)
        return beat, requests, WorkerState(state)

    def beat(self, index: int, now: float, requests: int, state: WorkerState) -> None:
        _SLOT.pack_into(self._map, index * _SLOT.size, now, requests, state)

    def close(self) -> None:
        self._map.close()


class WorkerContext:
    """What a worker process knows about itself; passed to worker_main in the child."""

    def __init__(
        self,
        slots: _Slots,
        index: int,
        generation: int,
        max_requests: int,
        status: socket.socket | None = None,
    ) -> None:
        self._slots = slots
        self._status = status
        #: Slot number, stable for the worker's life (0 .. workers-1 usually).
        self.index = index
        #: Incremented by every SIGHUP reload.
        self.generation = generation
        #: Retire after this many requests (0: never); jitter already applied.
        self.max_requests = max_requests
        self.requests = 0
        self.state = WorkerState.STARTING
        #: Signals blocked since before the fork (see Supervisor._spawn()).
        self._held: tuple[int, ...] = ()

    def release_signals(self) -> None:
        """Unblock the signals held since the fork; call once the worker's own handlers
        are installed. A SIGTERM the supervisor sent in between is delivered now."""
        held, self._held = self._held, ()
        if held:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, held)

    def heartbeat(self, now: float | None = None) -> None:
        """Tell the supervisor this worker's loop is alive. Call on every loop turn."""
        self._slots.beat(
            self.index, time.monotonic() if now is None else now, self.requests, self.state
        )

    def set_state(self, state: WorkerState) -> None:
        """Publish a state change and wake the supervisor so it reacts at once."""
        self.state = state
        self.heartbeat()
        if self._status is not None:
            try:
                self._status.send(b"s")
            except OSError:
                pass  # a wake-up is already pending, or the supervisor is gone

    def count_request(self) -> bool:
        """Count one request; True once, when the worker should retire (max_requests
        reached)."""
        self.requests += 1
        return 0 < self.max_requests == self.requests


@dataclass(eq=False)
class _Worker:
    pid: int
    pidfd: int
    index: int
    generation: int
    started: float
    stop_sent: float | None = None  # when SIGTERM/SIGQUIT was sent
    kill_at: float | None = None  # SIGKILL deadline
    killed: bool = False
    retiring: bool = False  # draining on its own (max_requests): already replaced


@dataclass
class _Counters:
    spawned: int = 0
    exited: int = 0
    crashed: int = 0
    killed_stuck: int = 0
    restarts_delayed: int = 0
    #: Workers that ended and were replaced, by cause (see RESTART_CAUSES).
    restarts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RESTART_CAUSES, 0))
    exit_codes: deque[int] = field(default_factory=lambda: deque(maxlen=64))


class Supervisor:
    """Run worker_main in `workers` child processes and keep them running.

    run() blocks until the supervisor is stopped (by a signal, stop(), or a fatal
    error) and every child has been reaped; it returns the exit status for the process.
    """

    def __init__(
        self,
        worker_main: Callable[[WorkerContext], int],
        *,
        workers: int = 2,
        graceful_timeout: float = 30.0,
        fast_timeout: float = 5.0,
        worker_timeout: float | None = 30.0,
        max_requests: int = 0,
        max_requests_jitter: int = 0,
        on_reload: Callable[[], None] | None = None,
        on_ready: Callable[[], None] | None = None,
        on_stop: Callable[[], None] | None = None,
        on_tick: Callable[[], None] | None = None,
        name: str = "servekit",
        hold_signals: bool = False,
    ) -> None:
        """hold_signals: worker_main calls context.release_signals() itself, once its
        signal handlers are installed; otherwise signals are released before it runs
        (with the default dispositions)."""
        if not 1 <= workers <= MAX_WORKERS:
            raise ValueError(f"workers must be between 1 and {MAX_WORKERS}, got {workers}")
        self.worker_main = worker_main
        self.hold_signals = hold_signals
        self.target = workers
        self.graceful_timeout = graceful_timeout
        self.fast_timeout = fast_timeout
        self.worker_timeout = worker_timeout
        self.max_requests = max_requests
        self.max_requests_jitter = max_requests_jitter
        self.on_reload = on_reload
        self.on_ready = on_ready
        self.on_stop = on_stop
        self.on_tick = on_tick
        self.name = name
        self.counters = _Counters()
        self._state = _SupervisorState.NEW
        self._workers: dict[int, _Worker] = {}  # by pid
        self._generation = 0
        self._boot_errors = 0
        self._young_crashes = 0
        self._respawn_at = 0.0
        self._reload_pending_since: float | None = None
        self._pending_signals: deque[int] = deque()
        self._pending_lock = threading.Lock()
        self._slots = _Slots(MAX_WORKERS)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        # Workers write to this when their state changes (serving, draining), so
        # readiness and retirement are noticed at once rather than at the next tick.
        self._status_r, self._status_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._status_r.setblocking(False)
        self._status_w.setblocking(False)
        self._selector: selectors.BaseSelector | None = None
        self._stopped = threading.Event()
        self._ready_reported = False
        self._fatal: str | None = None
        self._external_wakeup: _Wakeable | None = None
        self._should_stop: Callable[[], bool] | None = None
        self._prctl = _load_prctl()

    # -- public --------------------------------------------------------------------------

    @property
    def worker_pids(self) -> list[int]:
        return sorted(self._workers)

    @property
    def running(self) -> bool:
        return self._state in (_SupervisorState.RUNNING, _SupervisorState.STOPPING)

    @property
    def stopping(self) -> bool:
        """True once a graceful or fast stop began (workers draining or exiting)."""
        return self._state in (_SupervisorState.STOPPING, _SupervisorState.STOPPING_FAST)

    @property
    def serving_workers(self) -> int:
        """Workers that say they serve and are not on their way out (for readiness)."""
        serving = 0
        for worker in list(self._workers.values()):
            if worker.stop_sent is not None or worker.retiring or worker.killed:
                continue
            if self._slots.read(worker.index)[2] is WorkerState.SERVING:
                serving += 1
        return serving

    def stop(self, graceful: bool = True, wait: bool = True, timeout: float | None = None) -> None:
        """Stop from another thread (or a signal handler with wait=False)."""
        self._queue(signal.SIGTERM if graceful else signal.SIGQUIT)
        if wait:
            self._stopped.wait(timeout)

    def reload(self) -> None:
        """Replace every worker gracefully, as SIGHUP does."""
        self._queue(signal.SIGHUP)

    def resize(self, delta: int) -> None:
        """Add (delta > 0) or remove (delta < 0) workers, as SIGTTIN/SIGTTOU do."""
        for _ in range(abs(delta)):
            self._queue(signal.SIGTTIN if delta > 0 else signal.SIGTTOU)

    def run(
        self,
        *,
        wakeup: _Wakeable | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> int:
        """Supervise until stopped; return the process exit status (0).

        wakeup/should_stop let an owner stop the supervisor through its own channel:
        whenever wakeup is readable it is drained and should_stop() consulted; True
        starts a graceful stop. Raises SupervisorError if workers cannot be kept up.
        """
        if self._state is not _SupervisorState.NEW:
            raise RuntimeError("a Supervisor runs once")
        self._state = _SupervisorState.RUNNING
        self._external_wakeup = wakeup
        self._should_stop = should_stop
        previous = self._install_signal_handlers()
        selector = self._selector = selectors.DefaultSelector()
        selector.register(self._wake_r, selectors.EVENT_READ, None)
        selector.register(self._status_r, selectors.EVENT_READ, None)
        if wakeup is not None:
            selector.register(wakeup, selectors.EVENT_READ, wakeup)
        log.info("%s: supervisor pid %d starting %d worker(s)", self.name, os.getpid(), self.target)
        try:
            self._loop()
        finally:
            self._kill_all()
            self._restore_signal_handlers(previous)
            selector.close()
            self._selector = None
            for sock in (self._wake_r, self._wake_w, self._status_r, self._status_w):
                sock.close()
            self._slots.close()
            self._state = _SupervisorState.STOPPED
            self._stopped.set()
        if self._fatal:
            raise SupervisorError(self._fatal)
        return 0

    # -- signals -------------------------------------------------------------------------

    _HANDLED = (
        signal.SIGTERM,
        signal.SIGINT,
        signal.SIGQUIT,
        signal.SIGHUP,
        signal.SIGTTIN,
        signal.SIGTTOU,
    )

    def _install_signal_handlers(self) -> dict[int, object] | None:
        if threading.current_thread() is not threading.main_thread():
            log.info("supervisor not on the main thread: signals are left to the caller")
            return None
        previous: dict[int, object] = {}
        for signum in self._HANDLED:
            previous[signum] = signal.signal(signum, self._on_signal)
        previous[-1] = signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        return previous

    def _restore_signal_handlers(self, previous: dict[int, object] | None) -> None:
        if previous is None:
            return
        wakeup_fd = previous.pop(-1)
        signal.set_wakeup_fd(wakeup_fd)  # type: ignore[arg-type]
        for signum, handler in previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]

    def _on_signal(self, signum: int, frame: object) -> None:
        # Record and wake; the loop does the work (the C-level handler has already
        # written to the wake-up fd, but stop()/reload() from threads need it too).
        self._pending_signals.append(signum)

    def _queue(self, signum: int) -> None:
        self._pending_signals.append(signum)
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass  # buffer full (a wake-up is already pending) or already closed

    # -- the loop ------------------------------------------------------------------------

    def _loop(self) -> None:
        self._spawn_missing(time.monotonic())
        assert self._selector is not None
        while self._state is not _SupervisorState.STOPPED:
            now = time.monotonic()
            events = self._selector.select(self._next_timeout(now))
            for key, _ in events:
                if key.data is None:
                    self._drain(key.fileobj)  # type: ignore[arg-type]
                elif key.data is self._external_wakeup and key.data is not None:
                    key.data.drain()
                    if self._should_stop is not None and self._should_stop():
                        self.handle_term()
                else:
                    self._reap(key.data)
            while self._pending_signals:
                self._dispatch(self._pending_signals.popleft())
            now = time.monotonic()
            self._check_workers(now)
            if self.on_tick is not None:
                self.on_tick()
            if self._state is _SupervisorState.RUNNING:
                self._progress_reload(now)
                self._spawn_missing(now)
            elif not self._workers:
                break

    def _next_timeout(self, now: float) -> float:
        deadlines = [now + 1.0]  # at least once a second: heartbeats, retirements
        if self.worker_timeout is not None:
            deadlines.append(now + min(1.0, self.worker_timeout / 4))
        for worker in self._workers.values():
            if worker.kill_at is not None:
                deadlines.append(worker.kill_at)
        if self._state is _SupervisorState.RUNNING and len(self._serving_pool()) < self.target:
            deadlines.append(self._respawn_at)
        return max(0.0, min(deadlines) - now)

    @staticmethod
    def _drain(sock: socket.socket) -> None:
        try:
            for _ in range(1024):  # bounded: a flood of writes cannot pin the loop here
                sock.recv(4096)
        except OSError:
            pass

    def _dispatch(self, signum: int) -> None:
        name = {
            signal.SIGTERM: "term",
            signal.SIGINT: "int",
            signal.SIGQUIT: "quit",
            signal.SIGHUP: "hup",
            signal.SIGTTIN: "ttin",
            signal.SIGTTOU: "ttou",
        }.get(signal.Signals(signum))
        if name is not None:
            getattr(self, f"handle_{name}")()

    def handle_term(self) -> None:
        if self._state is _SupervisorState.RUNNING:
            # State first, then the line: whoever reads the line (a test, an operator)
            # must find /readyz already answering 503 (the admin thread reads the state).
            self._state = _SupervisorState.STOPPING
            log.info("%s: graceful stop (up to %ss)", self.name, self.graceful_timeout)
            self._notify_stop()
            now = time.monotonic()
            for worker in self._workers.values():
                self._stop_worker(worker, now, graceful=True)

    def handle_int(self) -> None:
        if self._state in (_SupervisorState.RUNNING, _SupervisorState.STOPPING):
            log.info("%s: fast stop", self.name)
            if self._state is _SupervisorState.RUNNING:
                self._notify_stop()
            self._state = _SupervisorState.STOPPING_FAST
            now = time.monotonic()
            for worker in self._workers.values():
                self._stop_worker(worker, now, graceful=False)

    handle_quit = handle_int

    def _notify_stop(self) -> None:
        if self.on_stop is not None:
            try:
                self.on_stop()
            except Exception:
                log.exception("%s: stop hook failed", self.name)

    def handle_hup(self) -> None:
        if self._state is not _SupervisorState.RUNNING:
            return
        if self.on_reload is not None:
            try:
                self.on_reload()
            except Exception:
                log.exception("%s: reload hook failed; keeping the current workers", self.name)
                return
        self._generation += 1
        self._reload_pending_since = time.monotonic()
        log.info("%s: reloading: starting generation %d", self.name, self._generation)

    def handle_ttin(self) -> None:
        if self._state is _SupervisorState.RUNNING and self.target < MAX_WORKERS:
            self.target += 1
            log.info("%s: workers %d", self.name, self.target)

    def handle_ttou(self) -> None:
        if self._state is _SupervisorState.RUNNING and self.target > 1:
            self.target -= 1
            log.info("%s: workers %d", self.name, self.target)
            extra = sorted(self._serving_pool(), key=lambda w: w.started)
            if len(extra) > self.target:
                self._stop_worker(extra[0], time.monotonic(), graceful=True)

    # -- workers -------------------------------------------------------------------------

    def _serving_pool(self) -> list[_Worker]:
        """Workers of the current generation that are not on their way out."""
        return [
            w
            for w in self._workers.values()
            if w.generation == self._generation and w.stop_sent is None and not w.retiring
        ]

    def _spawn_missing(self, now: float) -> None:
        missing = self.target - len(self._serving_pool())
        if missing <= 0 or now < self._respawn_at:
            return
        for _ in range(missing):
            self._spawn(now)

    def _free_slot(self) -> int:
        used = {w.index for w in self._workers.values()}
        for index in range(MAX_WORKERS):
            if index not in used:
                return index
        raise SupervisorError(f"more than {MAX_WORKERS} workers")

    def _spawn(self, now: float) -> None:
        index = self._free_slot()
        self._slots.reset(index)
        jitter = random.randint(0, self.max_requests_jitter) if self.max_requests_jitter else 0
        context = WorkerContext(
            self._slots,
            index,
            self._generation,
            self.max_requests + jitter if self.max_requests else 0,
            self._status_w,
        )
        # Flush so that buffered output is not written twice (once by each process).
        sys.stdout.flush()
        sys.stderr.flush()
        supervisor_pid = os.getpid()
        # Block the signals we handle across the fork: the child starts with the mask,
        # and a SIGTERM sent to it before it has installed its own handlers (it is told
        # to stop while starting) waits instead of reaching the parent's handlers in the
        # child, where it would be lost. The child unblocks them with
        # context.release_signals() once ready; the parent at once.
        signal.pthread_sigmask(signal.SIG_BLOCK, self._HANDLED)
        pid = -1
        try:
            pid = os.fork()
            if pid == 0:
                context._held = self._HANDLED
                self._become_worker(context, supervisor_pid)  # never returns
        finally:
            if pid != 0:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, self._HANDLED)
        pidfd = os.pidfd_open(pid)
        worker = _Worker(pid, pidfd, index, self._generation, now)
        self._workers[pid] = worker
        assert self._selector is not None
        self._selector.register(pidfd, selectors.EVENT_READ, worker)
        self.counters.spawned += 1
        log.info("%s: worker %d started, pid %d", self.name, index, pid)

    def _become_worker(self, context: WorkerContext, supervisor_pid: int) -> None:
        code = EXIT_CRASH
        try:
            die_with_parent(supervisor_pid, self._prctl)
            # The parent's signal plumbing must not leak into the child.
            signal.set_wakeup_fd(-1)
            for signum in self._HANDLED:
                signal.signal(signum, signal.SIG_DFL)
            for worker in self._workers.values():
                os.close(worker.pidfd)
            self._wake_r.close()
            self._wake_w.close()
            self._status_r.close()
            if self._selector is not None:
                self._selector.close()
            if not self.hold_signals:
                context.release_signals()
            code = self.worker_main(context)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else EXIT_CRASH
        except BaseException:
            log.exception("worker %d crashed", context.index)
            code = EXIT_CRASH
        finally:
            try:
                logging.shutdown()
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)

    def _stop_worker(self, worker: _Worker, now: float, *, graceful: bool) -> None:
        if worker.stop_sent is not None and graceful:
            return
        signum = signal.SIGTERM if graceful else signal.SIGQUIT
        self._signal(worker, signum)
        worker.stop_sent = now
        timeout = self.graceful_timeout if graceful else self.fast_timeout
        deadline = now + timeout
        worker.kill_at = deadline if worker.kill_at is None else min(worker.kill_at, deadline)

    def _signal(self, worker: _Worker, signum: int) -> None:
        try:
            # pidfd_send_signal cannot hit a recycled pid; os.kill could in theory.
            signal.pidfd_send_signal(worker.pidfd, signum)
        except ProcessLookupError:
            pass
        except OSError as exc:
            if exc.errno != errno.ESRCH:
                raise

    def _check_workers(self, now: float) -> None:
        for worker in list(self._workers.values()):
            if worker.kill_at is not None and now >= worker.kill_at and not worker.killed:
                self._kill(worker, "did not stop in time")
                continue
            beat, _requests, state = self._slots.read(worker.index)
            if state is WorkerState.DRAINING and not worker.retiring and worker.stop_sent is None:
                # Retiring on its own (max_requests): replace it now, bound its drain.
                worker.retiring = True
                worker.kill_at = now + self.graceful_timeout
                log.info("%s: worker %d (pid %d) is retiring", self.name, worker.index, worker.pid)
            if (
                self.worker_timeout is not None
                and state is WorkerState.STARTING
                and now - worker.started > self.worker_timeout
                and not worker.killed
            ):
                self._kill(worker, f"did not start serving within {self.worker_timeout}s")
                continue
            if (
                self.worker_timeout is not None
                and state is WorkerState.SERVING
                and beat
                and now - beat > self.worker_timeout
                and not worker.killed
            ):
                self.counters.killed_stuck += 1
                self._kill(
                    worker, f"stuck for {now - beat:.1f}s (worker_timeout={self.worker_timeout}s)"
                )

    def _kill(self, worker: _Worker, why: str) -> None:
        log.warning(
            "%s: worker %d (pid %d) %s; killing it", self.name, worker.index, worker.pid, why
        )
        self._signal(worker, signal.SIGKILL)
        worker.killed = True

    def _reap(self, worker: _Worker) -> None:
        try:
            pid, status = os.waitpid(worker.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = worker.pid, 0
        if pid == 0:
            return  # spurious wake-up
        assert self._selector is not None
        self._selector.unregister(worker.pidfd)
        os.close(worker.pidfd)
        del self._workers[worker.pid]
        self.counters.exited += 1
        code = os.waitstatus_to_exitcode(status)
        self.counters.exit_codes.append(code)
        now = time.monotonic()
        _beat, _requests, state = self._slots.read(worker.index)
        expected = worker.stop_sent is not None or worker.retiring or worker.killed
        how = f"exit code {code}" if code >= 0 else f"signal {signal.Signals(-code).name}"
        if self._state is _SupervisorState.RUNNING:
            cause = self._restart_cause(worker, code)
            if cause is not None:
                self.counters.restarts[cause] += 1
        if expected or code == EXIT_OK:
            log.info("%s: worker %d (pid %d) exited (%s)", self.name, worker.index, pid, how)
            if code == EXIT_OK and not expected and self._state is _SupervisorState.RUNNING:
                self._young_crashes = 0
            return
        self.counters.crashed += 1
        log.warning("%s: worker %d (pid %d) died (%s)", self.name, worker.index, pid, how)
        if self._state is not _SupervisorState.RUNNING:
            return
        if code == EXIT_BOOT_ERROR and state is WorkerState.STARTING:
            self._boot_errors += 1
            if self._boot_errors >= MAX_BOOT_ERRORS:
                self._fatal = (
                    f"{self._boot_errors} workers in a row failed to boot "
                    f"(exit code {EXIT_BOOT_ERROR}); stopping"
                )
                log.error("%s: %s", self.name, self._fatal)
                self.handle_int()
                return
        if now - worker.started < CRASH_WINDOW:
            self._young_crashes += 1
            delay = min(RESTART_DELAY_MIN * 2 ** (self._young_crashes - 1), RESTART_DELAY_MAX)
            self._respawn_at = now + delay
            self.counters.restarts_delayed += 1
            if self._young_crashes == 1:
                # One early death (a worker killed by hand, an OOM kill) is not yet a
                # loop: say what happened, and the back-off it starts.
                log.warning(
                    "%s: worker %d died %.1fs after starting: next worker in %.2fs",
                    self.name,
                    worker.index,
                    now - worker.started,
                    delay,
                )
            else:
                log.warning(
                    "%s: crash loop (%d workers in a row died within %gs of starting): "
                    "next worker in %.2fs",
                    self.name,
                    self._young_crashes,
                    CRASH_WINDOW,
                    delay,
                )
        else:
            self._young_crashes = 0

    def _restart_cause(self, worker: _Worker, code: int) -> str | None:
        """Why a worker that just exited will be replaced; None if it will not be
        (removed by SIGTTOU)."""
        if worker.retiring:
            return "max-requests"
        if worker.stop_sent is not None:
            return "reload" if worker.generation < self._generation else None
        if worker.killed:
            return "timeout"
        if code == EXIT_OK:
            return "exit"
        return "boot-error" if code == EXIT_BOOT_ERROR else "crash"

    def _progress_reload(self, now: float) -> None:
        """After SIGHUP: once the new generation serves, stop the old one gracefully."""
        serving_new = 0
        for worker in self._workers.values():
            if worker.generation == self._generation:
                _beat, _req, state = self._slots.read(worker.index)
                if state is WorkerState.SERVING:
                    serving_new += 1
                    self._boot_errors = 0
        if not self._ready_reported and serving_new >= self.target:
            self._ready_reported = True
            log.info("%s: %d worker(s) serving", self.name, serving_new)
            if self.on_ready is not None:
                self.on_ready()
        if self._reload_pending_since is None:
            return
        if serving_new >= self.target:
            for worker in self._workers.values():
                if worker.generation < self._generation:
                    self._stop_worker(worker, now, graceful=True)
            log.info("%s: generation %d serving; old workers draining", self.name, self._generation)
            self._reload_pending_since = None

    def _kill_all(self) -> None:
        """Last resort on the way out (an exception in the loop): leave no child behind."""
        for worker in list(self._workers.values()):
            self._signal(worker, signal.SIGKILL)
            try:
                os.waitpid(worker.pid, 0)
            except ChildProcessError:
                pass
            os.close(worker.pidfd)
        self._workers.clear()
