# What an operator watches: metrics in the Prometheus text format, health checks, the
# access log, and the one line that sums up a shutdown.
#
# Strategy. MetricsMixIn counts through the public hooks only (connection_opened and
# connection_closed, message_hooks, verify_request, handle_error, the shutdown steps)
# and the public properties of the pool; it never reaches into another feature. Counts
# go into a table of 64-bit integers in an anonymous shared mapping that the constructor
# creates, before any fork: one row ("slot") per serving process. Row 0 is a single
# process's; pre-forked worker N writes row N + 1 (the supervisor's slot index, stable
# for the worker's life and taken over by its replacement, so counters survive
# restarts). A worker counts with a store into memory it already has: no syscall, no
# lock shared between processes, no message to the parent. The parent, which owns the
# listening sockets, sums the rows when it is scraped.
#
# Why not prometheus-client's multiprocess mode: it keeps an mmap'd file per process
# and metric type in a directory that must exist, be emptied at start and be cleaned
# after every dead worker, and it reads them all on each scrape; it is also a
# dependency, and the core promises to need none. The text format 0.0.4 is simple
# enough to write here; the tests read it back with prometheus-client's own parser.
#
# Counters only grow, and a replacement worker adds onto its predecessor's row. Gauges
# (open, parked and waiting connections, pool threads) are each row's current values:
# a serving process refreshes its own from its loop (service_actions, at most every
# GAUGE_PERIOD seconds, since counting parked connections walks them all), and the
# parent sums only the rows of live workers, so a killed worker's last values vanish
# with it.
#
# The admin listener (metrics_bind) is a small servekit.core server on a thread of the
# process that owns the listening sockets: the supervisor with workers, the single
# process otherwise. /readyz answers from what that process knows: its own state, or
# the supervisor's count of serving workers. It runs until the end of server_close(),
# so a load balancer sees 503 for the whole drain.
from __future__ import annotations

import bisect
import logging
import math
import mmap
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

from servekit.core import StreamRequestHandler, TCPServer, ThreadingMixIn
from servekit.errors import ServekitError
from servekit.features import forks
from servekit.features.addresses import AddressError, format_peer, parse_address
from servekit.features.base import ServerFeature
from servekit.features.connection import OUTCOMES, Connection
from servekit.knobs import ValueType, knob

__all__ = [
    "HANDLER_BUCKETS",
    "SLOTS",
    "AdminBindError",
    "AdminServer",
    "MetricsMixIn",
    "MetricsTable",
    "exposition",
]

log = logging.getLogger("servekit.metrics")
access_log = logging.getLogger("servekit.access")

# Rows of the table: row 0 for a single process, one per pre-fork worker slot after it.
# The supervisor allocates at most 1024 slots (servekit.process.supervisor.MAX_WORKERS;
# a test keeps the two in step). Untouched pages of an anonymous mapping cost no memory.
SLOTS = 1 + 1024

# Upper bounds of the handler duration buckets, in seconds: Prometheus client libraries'
# default buckets (5 ms .. 10 s), with 1 ms below for fast handlers and 30 s and 60 s
# above for handlers that keep a connection for its whole life.
HANDLER_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)

# Gauges walk the connections (parked, waiting): refreshed at most this often.
GAUGE_PERIOD = 0.25

# The timeouts among the outcomes, for servekit_connections_timed_out_total.
TIMEOUT_OUTCOMES = ("stage-timeout", "idle-timeout", "read-timeout")


class _Fields:
    """Column numbers of one row of the table."""

    def __init__(self) -> None:
        names = [
            "pid",  # the process writing the row (0: never used)
            "accepted",
            "refused",
            "messages",
            "handler_errors",
            "datagrams",
        ]
        names += [f"closed:{outcome}" for outcome in (*OUTCOMES, "other")]
        names += [f"bucket:{index}" for index in range(len(HANDLER_BUCKETS) + 1)]
        names += ["duration_ns"]
        # Gauges: the process's current values.
        names += ["open", "parked", "waiting", "busy", "idle", "threads", "max_threads"]
        # This process's shutdown: connections served from the kernel's backlog,
        # idle ones closed, handlers still running after the drain, and when it ended
        # (time.monotonic_ns(), system-wide on Linux; 0: not yet).
        names += ["sd_backlog", "sd_idle_closed", "sd_still_running", "sd_done_ns"]
        self.names = names
        self.index = {name: number for number, name in enumerate(names)}
        self.count = len(names)

    def __getitem__(self, name: str) -> int:
        return self.index[name]


F = _Fields()
_GAUGES = ("open", "parked", "waiting", "busy", "idle", "threads", "max_threads")
_PER_LIFE = (*_GAUGES, "sd_backlog", "sd_idle_closed", "sd_still_running", "sd_done_ns")
# Column numbers the hooks use, looked up once (the hooks run per connection).
_ACCEPTED, _OPEN, _MESSAGES = F["accepted"], F["open"], F["messages"]
_SD_BACKLOG, _SD_IDLE_CLOSED = F["sd_backlog"], F["sd_idle_closed"]
_DURATION_NS, _BUCKET0 = F["duration_ns"], F["bucket:0"]
_CLOSED = {outcome: F[f"closed:{outcome}"] for outcome in OUTCOMES}
_OTHER = F["closed:other"]

_monotonic = time.monotonic


class MetricsTable:
    """SLOTS rows of 64-bit counters in an anonymous shared mapping.

    Created before any fork, so every worker writes into the same pages the parent
    reads. Writers serialise within their process (a lock in _Recorder); the reader
    takes each aligned 8-byte value whole.
    """

    def __init__(self, slots: int = SLOTS) -> None:
        self.slots = slots
        # MAP_SHARED | MAP_ANONYMOUS: shared with children forked later, zero-filled,
        # and pages never written take no memory.
        self._map = mmap.mmap(-1, slots * F.count * 8)
        self.view = memoryview(self._map).cast("q")

    def row(self, slot: int) -> list[int]:
        base = slot * F.count
        return self.view[base : base + F.count].tolist()

    def rows(self) -> Iterator[tuple[int, list[int]]]:
        """(slot, values) of every row some process has written."""
        view, width = self.view, F.count
        for slot in range(self.slots):
            if view[slot * width]:  # the pid column: 0 for a row nobody used
                yield slot, self.row(slot)


class _Live:
    """What the metrics keep per open connection (the record itself has no room)."""

    __slots__ = ("listener", "started")

    def __init__(self, listener: str) -> None:
        #: time.monotonic() at which the current message started (None: none yet).
        self.started: float | None = None
        self.listener = listener


class _Recorder:
    """One process's writer into its row of the table."""

    __slots__ = (
        "access_log",
        "base",
        "counting",
        "forks",
        "gauges_due",
        "live",
        "lock",
        "stopping",
        "view",
    )

    def __init__(self, view: memoryview, slot: int, *, access_log: bool, counting: bool) -> None:
        self.forks = forks.count
        #: The server's access_log knob, read once (a knob read is a descriptor call).
        self.access_log = access_log
        #: Whether to count at all: only when someone can read the counts (metrics_bind
        #: or collect_metrics), since per-message counting costs a few microseconds a
        #: message. The shutdown's tallies and the access log do not depend on it.
        self.counting = counting
        self.view = view
        self.base = slot * F.count
        # Within a process several threads count at once, and `view[i] += 1` is a read
        # and a write: without the lock two threads could both write n + 1.
        self.lock = threading.Lock()
        self.live: dict[int, _Live] = {}
        self.gauges_due = 0.0
        #: Set when this process's shutdown sequence began (accept_backlog()).
        self.stopping = False

    def add(self, field: int, amount: int = 1) -> None:
        with self.lock:
            self.view[self.base + field] += amount

    def set(self, field: int, value: int) -> None:
        self.view[self.base + field] = value

    def get(self, field: int) -> int:
        return int(self.view[self.base + field])

    def observe_locked(self, seconds: float) -> None:
        """Count one handler duration; the caller holds the lock."""
        # bisect_left: the first bucket whose upper bound is >= seconds ("le").
        base = self.base
        self.view[base + _BUCKET0 + bisect.bisect_left(HANDLER_BUCKETS, seconds)] += 1
        self.view[base + _DURATION_NS] += int(seconds * 1e9)


class AdminBindError(ServekitError, OSError):
    """The admin listener (metrics_bind) cannot listen; .address says where."""

    def __init__(self, errno: int | None, strerror: str | None, address: str) -> None:
        super().__init__(errno, strerror or "cannot listen")
        self.address = address

    def __str__(self) -> str:
        return f"metrics_bind {self.address}: {self.strerror}"


def metrics_address(text: str) -> str | None:
    """HOST:PORT of the admin listener; empty or none for no listener."""
    text = text.strip()
    return None if text.lower() in ("", "none", "off") else text


def _check_metrics_address(value: Any) -> str | None:
    if value is None:
        return None
    try:
        address = parse_address(value)
    except AddressError as exc:
        return str(exc)
    if address.kind != "tcp":
        return f"{value!r} is not a TCP address (write HOST:PORT)"
    return None


class MetricsMixIn(ServerFeature):
    """Count connections, messages, timeouts and errors; serve /metrics, /livez and
    /readyz on metrics_bind; log one line per connection with access_log; log one
    summary line at the end of a shutdown.

    Put it right after PreforkMixIn (or first): it then sees every hook before the
    features that act on them. With pre-forked workers the counts are summed over the
    workers by the parent, which serves the admin listener.
    """

    feature_rank = 5

    metrics_bind: str | None = knob(
        None,
        "address of the admin HTTP listener, HOST:PORT: GET /metrics (Prometheus), "
        "/livez, /readyz (None: no listener)",
        parse=metrics_address,
        check=_check_metrics_address,
        metavar="HOST:PORT",
        type=ValueType("str", optional=True, textual=True, description="HOST:PORT or none"),
        section="metrics",
    )
    access_log: bool = knob(
        False,
        "log one line per connection when it closes (client, listener, messages, "
        "duration, outcome) to the servekit.access logger",
        section="metrics",
    )
    collect_metrics: bool = knob(
        False,
        "count even without metrics_bind, for metric_families() and render_metrics()",
        flag="",
        section="metrics",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Before the constructor chain binds anything, and before any fork.
        self._metrics_table = MetricsTable()
        self._recorder: _Recorder | None = None
        self._admin: AdminServer | None = None
        self._admin_thread: threading.Thread | None = None
        self._stop_began: float | None = None
        self._served_in: int | None = None
        super().__init__(*args, **kwargs)
        if self.metrics_bind is not None:
            try:
                self._admin = AdminServer(self.metrics_bind, self)
            except OSError as exc:
                self.server_close()
                raise AdminBindError(exc.errno, exc.strerror, self.metrics_bind) from exc

    # -- where this process stands ----------------------------------------------------

    def _role(self) -> str:
        """'worker' (pre-forked), 'supervisor' (its parent) or 'single'."""
        if getattr(self, "worker_context", None) is not None:
            return "worker"
        return "supervisor" if hasattr(self, "supervisor") else "single"

    def _rec(self) -> _Recorder:
        """This process's writer, claiming its row on first use in the process."""
        recorder = self._recorder
        if recorder is not None and recorder.forks == forks.count:
            return recorder
        context = getattr(self, "worker_context", None)
        slot = 0 if context is None else 1 + context.index
        table = self._metrics_table
        recorder = _Recorder(
            table.view,
            min(slot, table.slots - 1),
            access_log=bool(self.access_log),
            counting=self.metrics_bind is not None or bool(self.collect_metrics),
        )
        if context is not None or not recorder.get(F["pid"]):
            # A new worker in this row (or the row's first user): its gauges and its
            # shutdown start from zero; the counters carry on. A ForkingMixIn child
            # shares row 0 with its parent and resets nothing.
            for name in _PER_LIFE:
                recorder.set(F[name], 0)
            recorder.set(F["pid"], os.getpid())
        self._recorder = recorder
        return recorder

    # -- serving ----------------------------------------------------------------------

    @property
    def admin_address(self) -> tuple[str, int] | None:
        """The admin listener's bound address, or None without metrics_bind."""
        admin = getattr(self, "_admin", None)
        return None if admin is None else admin.server_address[:2]

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        if self._role() != "worker":
            self._start_admin()
        if self._role() != "supervisor":
            self._served_in = os.getpid()
            self._rec()  # claim the row on the loop's thread, before any pool thread
        super().serve_forever(poll_interval)

    def _start_admin(self) -> None:
        admin = self._admin
        if admin is None or self._admin_thread is not None:
            return
        thread = threading.Thread(target=admin.serve_forever, name="servekit-metrics", daemon=True)
        self._admin_thread = thread
        thread.start()
        host, port = admin.server_address[:2]
        shown = f"[{host}]" if ":" in host else host
        log.info("metrics: /metrics, /livez and /readyz on http://%s:%d", shown, port)

    def _stop_admin(self) -> None:
        admin, thread = self._admin, self._admin_thread
        self._admin = self._admin_thread = None
        if admin is None:
            return
        if thread is not None:
            admin.shutdown()
            thread.join(5.0)
        admin.server_close()

    def reset_after_fork(self) -> None:
        """In a pre-forked worker: give up this process's copy of the admin listener
        (the parent serves it; its thread was not forked)."""
        super().reset_after_fork()
        admin = self._admin
        self._admin = self._admin_thread = None
        if admin is not None:
            admin.reset_after_fork()
            admin.socket.close()

    def service_actions(self) -> None:
        super().service_actions()
        recorder = self._recorder
        if recorder is None or recorder.forks != forks.count:
            recorder = self._rec()
        now = _monotonic()
        if now >= recorder.gauges_due:
            recorder.gauges_due = now + GAUGE_PERIOD
            self._publish_gauges(recorder)

    def _publish_gauges(self, recorder: _Recorder) -> None:
        recorder.set(F["parked"], int(getattr(self, "parked_connections", 0)))
        recorder.set(F["waiting"], int(getattr(self, "waiting_connections", 0)))
        pool = getattr(self, "pool", None)  # ThreadPoolMixIn's, in a serving process
        if pool is not None:
            recorder.set(F["busy"], pool.busy)
            recorder.set(F["idle"], pool.idle)
            recorder.set(F["threads"], pool.size)
            recorder.set(F["max_threads"], pool.max_threads)

    # -- counting through the hooks -----------------------------------------------------
    #
    # These run once per connection or message, on the loop and on pool threads, so they
    # are written for speed: column numbers are constants, the recorder is checked
    # against the fork count rather than getpid(), and each takes the lock once.

    def verify_request(self, request: Any, client_address: Any) -> bool:
        # Counts the refusals of the classes after this one in the MRO: the features
        # and the socket type. A subclass that refuses in its own verify_request()
        # before calling super() is not seen; put such a check in a mix-in after
        # MetricsMixIn to have it counted.
        allowed = super().verify_request(request, client_address)
        if not allowed:
            self._rec().add(F["refused"])
        return allowed

    def connection_opened(self, connection: Connection) -> None:
        recorder = self._recorder
        if recorder is None or recorder.forks != forks.count:
            recorder = self._rec()
        if recorder.counting or recorder.access_log:
            recorder.live[id(connection)] = _Live(
                _listener_of(connection.sock) if recorder.access_log else ""
            )
        if recorder.counting:
            with recorder.lock:
                view, base = recorder.view, recorder.base
                view[base + _ACCEPTED] += 1
                view[base + _OPEN] += 1
                if recorder.stopping:
                    view[base + _SD_BACKLOG] += 1
        elif recorder.stopping:
            recorder.add(_SD_BACKLOG)
        super().connection_opened(connection)

    def message_hooks(self) -> list[Callable[[Connection], object]]:
        hooks = super().message_hooks()
        if self._rec().counting:  # without counting, a message costs metrics nothing
            hooks.append(self._record_message)
        return hooks

    def _record_message(self, connection: Connection) -> None:
        recorder = self._recorder
        if recorder is None or recorder.forks != forks.count:
            recorder = self._rec()
        live = recorder.live.get(id(connection))
        ended = None
        if live is not None:
            now = _monotonic()
            if live.started is not None:
                ended = _message_end(connection, live, now) - live.started
            live.started = now
        with recorder.lock:
            recorder.view[recorder.base + _MESSAGES] += 1
            if ended is not None:
                recorder.observe_locked(ended)

    def connection_closed(self, connection: Connection) -> None:
        try:
            super().connection_closed(connection)
        finally:
            self._count_close(connection)

    def _count_close(self, connection: Connection) -> None:
        now = _monotonic()
        recorder = self._recorder
        if recorder is None or recorder.forks != forks.count:
            recorder = self._rec()
        live = recorder.live.pop(id(connection), None)
        ended = None
        if live is not None and live.started is not None:
            ended = _message_end(connection, live, now) - live.started
        outcome = connection.outcome
        if recorder.counting:
            with recorder.lock:
                view, base = recorder.view, recorder.base
                view[base + _CLOSED.get(outcome, _OTHER)] += 1
                view[base + _OPEN] -= 1
                if recorder.stopping and outcome == "shutdown":
                    view[base + _SD_IDLE_CLOSED] += 1
                if ended is not None:
                    recorder.observe_locked(ended)
        elif recorder.stopping and outcome == "shutdown":
            recorder.add(_SD_IDLE_CLOSED)
        if recorder.access_log:
            self._log_access(connection, live, now - connection.accepted_at)

    def handle_error(self, request: Any, client_address: Any) -> None:
        self._rec().add(F["handler_errors"])
        super().handle_error(request, client_address)

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.socket_type == socket.SOCK_STREAM:
            super().finish_request(request, client_address)
            return
        # A datagram: one request, timed here (it has no connection record).
        started = time.monotonic()
        outcome = "error"
        try:
            super().finish_request(request, client_address)
            outcome = "done"
        finally:
            duration = time.monotonic() - started
            recorder = self._rec()
            if recorder.counting:
                with recorder.lock:
                    recorder.view[recorder.base + F["datagrams"]] += 1
                    recorder.observe_locked(duration)
            if self.access_log:
                access_log.info(
                    "client=%s listener=%s datagram duration=%.6fs outcome=%s",
                    format_peer(client_address),
                    _listener_of(self.socket),
                    duration,
                    outcome,
                    extra={
                        "client": format_peer(client_address),
                        "listener": _listener_of(self.socket),
                        "duration": round(duration, 6),
                        "outcome": outcome,
                    },
                )

    def _log_access(self, connection: Connection, live: _Live | None, duration: float) -> None:
        client = format_peer(connection.client_address)
        peer = format_peer(connection.peer)
        listener = live.listener if live is not None else ""
        extra: dict[str, Any] = {
            "client": client,
            "listener": listener,
            "messages": connection.messages,
            "duration": round(duration, 6),
            "outcome": connection.outcome,
            "tls": connection.is_tls,
        }
        via = ""
        if connection.proxy_header is not None or peer != client:
            extra["peer"] = peer
            via = f" peer={peer}"
        access_log.info(
            "client=%s%s listener=%s messages=%d duration=%.6fs outcome=%s%s",
            client,
            via,
            listener,
            connection.messages,
            duration,
            connection.outcome,
            " tls" if connection.is_tls else "",
            extra=extra,
        )

    # -- the shutdown steps ---------------------------------------------------------------

    def accept_backlog(self) -> None:
        # Only a process that served has a shutdown to count (not the supervisor, not
        # a server whose constructor failed).
        if self._served_in == os.getpid() and self._role() != "supervisor":
            self._stop_began = time.monotonic()
            self._rec().stopping = True
        super().accept_backlog()

    def drain(self) -> None:
        super().drain()
        if self._role() != "supervisor" and self._stop_began is not None:
            pool = getattr(self, "pool", None)
            still = 0 if pool is None else pool.busy
            self._rec().set(F["sd_still_running"], still)

    def server_close(self) -> None:
        first = not self.closed
        try:
            super().server_close()
        finally:
            if first:
                self._end_of_shutdown()

    def _end_of_shutdown(self) -> None:
        role = self._role()
        try:
            if role == "supervisor":
                self._log_prefork_summary()
            elif self._stop_began is not None:
                recorder = self._rec()
                recorder.set(F["sd_done_ns"], time.monotonic_ns())
                self._publish_gauges(recorder)
                level = logging.DEBUG if role == "worker" else logging.INFO
                log.log(
                    level,
                    "shutdown: complete after %.2fs: %s",
                    time.monotonic() - self._stop_began,
                    _summary(
                        recorder.get(F["sd_backlog"]),
                        recorder.get(F["sd_idle_closed"]),
                        recorder.get(F["sd_still_running"]),
                    ),
                )
        finally:
            self._stop_admin()

    def _log_prefork_summary(self) -> None:
        since = getattr(self, "stopping_since", None)
        if since is None:
            return  # never served (a constructor that failed), nothing to sum up
        since_ns = int(since * 1e9)
        drained = killed = backlog = idle = still = 0
        for _slot, row in self._metrics_table.rows():
            if _slot == 0:
                continue
            if row[F["sd_done_ns"]] >= since_ns:
                drained += 1
                backlog += row[F["sd_backlog"]]
                idle += row[F["sd_idle_closed"]]
                still += row[F["sd_still_running"]]
            elif not row[F["sd_done_ns"]]:
                killed += 1  # ended without finishing its drain: killed, or a fast stop
        log.info(
            "shutdown: complete after %.2fs: %d worker(s) drained: %s; %d worker(s) ended "
            "before draining",
            time.monotonic() - since,
            drained,
            _summary(backlog, idle, still),
            killed,
        )

    # -- health and the exposition ------------------------------------------------------

    def readiness(self) -> tuple[bool, str]:
        """(ready, why): ready when every listener is bound (the constructor did that)
        and every worker serves; not while starting, stopping or draining."""
        if self.closed:
            return False, "stopped"
        if self._role() == "supervisor":
            supervisor: Any = getattr(self, "supervisor", None)
            if supervisor is None:
                return False, "not serving (supervisor not running)"
            if supervisor.stopping:
                return False, "stopping: workers are draining"
            serving, wanted = supervisor.serving_workers, supervisor.target
            if serving < wanted:
                return False, f"{serving} of {wanted} workers serving"
            return True, f"{serving} workers serving"
        if self._served_in is None:
            return False, "not serving yet"
        if self.stop_requested or self._stop_began is not None:
            return False, "stopping: draining"
        return True, "serving"

    def metric_families(self) -> list[Family]:
        """Every metric, summed over the processes that count (the exposition's input)."""
        role = self._role()
        live_pids: set[int] | None = None
        supervisor: Any = None
        if role == "supervisor":
            supervisor = getattr(self, "supervisor", None)
            live_pids = set(supervisor.worker_pids) if supervisor is not None else set()
        totals = [0] * F.count
        gauges = [0] * F.count
        for slot, row in self._metrics_table.rows():
            for column in range(F.count):
                totals[column] += row[column]
            if (live_pids is None and slot == 0) or (
                live_pids is not None and slot > 0 and row[F["pid"]] in live_pids
            ):
                for name in _GAUGES:
                    gauges[F[name]] += row[F[name]]
        return _families(totals, gauges, supervisor)

    def render_metrics(self) -> str:
        return exposition(self.metric_families())


def _message_end(connection: Connection, live: _Live, now: float) -> float:
    """When the message that started at live.started ended: when its handler returned
    (Connection.message_ended, set by the pipeline), else now (it raised, or the handler
    loops in handle() and the connection is its one message)."""
    ended = connection.message_ended
    if ended is None or live.started is None or ended < live.started:
        return now
    return ended


def _summary(backlog: int, idle: int, still: int) -> str:
    return (
        # "waiting for their client": idle keep-alive connections and those still in
        # their preamble (a stalled PROXY header or TLS handshake) alike.
        f"served {backlog} connection(s) taken from the kernel backlog, closed {idle} "
        f"connection(s) waiting for their client, {still} handler(s) still running after "
        "drain_timeout"
    )


def _listener_of(sock: Any) -> str:
    """The local address of a socket, as a listening address is written."""
    try:
        name = sock.getsockname()
        kind = sock.type
    except OSError:
        return ""
    scheme = "udp" if kind == socket.SOCK_DGRAM else "tcp"
    if isinstance(name, tuple):
        host = f"[{name[0]}]" if ":" in str(name[0]) else name[0]
        return f"{scheme}://{host}:{name[1]}"
    text = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
    prefix = "unix-dgram:" if kind == socket.SOCK_DGRAM else "unix:"
    return prefix + ("@" + text[1:] if text.startswith("\0") else text)


# -- the exposition: Prometheus text format 0.0.4 -------------------------------------

#: A metric family: name, type, help, and samples of (suffix, labels, value).
Family = tuple[str, str, str, list[tuple[str, dict[str, str], float]]]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


# The families with one unlabelled sample: name, type, help, and the table's column.
_SIMPLE = (
    ("servekit_connections_accepted_total", "counter", "Stream connections accepted.", "accepted"),
    (
        "servekit_connections_refused_total",
        "counter",
        "Connections closed at once because verify_request() refused them.",
        "refused",
    ),
    (
        "servekit_messages_total",
        "counter",
        "Messages (requests) handlers started on stream connections.",
        "messages",
    ),
    ("servekit_datagrams_total", "counter", "Datagrams handled.", "datagrams"),
    (
        "servekit_handler_errors_total",
        "counter",
        "Exceptions from handlers, reported through handle_error().",
        "handler_errors",
    ),
    ("servekit_connections_open", "gauge", "Stream connections open now.", "open"),
    (
        "servekit_connections_parked",
        "gauge",
        "Connections waiting in the loop, without a thread, between two messages.",
        "parked",
    ),
    (
        "servekit_connections_waiting",
        "gauge",
        "Connections in the loop before their first message (PROXY header, TLS "
        "handshake, waiting for the request).",
        "waiting",
    ),
    (
        "servekit_pool_threads_busy",
        "gauge",
        "Pool tasks running or queued (handlers and offloaded stage steps).",
        "busy",
    ),
    ("servekit_pool_threads_idle", "gauge", "Pool threads waiting for work.", "idle"),
    ("servekit_pool_threads", "gauge", "Pool threads alive.", "threads"),
    (
        "servekit_pool_threads_max",
        "gauge",
        "Largest number of pool threads (max_threads, summed over workers).",
        "max_threads",
    ),
)


def _families(totals: list[int], gauges: list[int], supervisor: Any) -> list[Family]:
    families: list[Family] = []
    for name, kind, help_text, column in _SIMPLE:
        value = (gauges if kind == "gauge" else totals)[F[column]]
        families.append((name, kind, help_text, [("", {}, float(value))]))
    closed = [("", {"outcome": o}, float(totals[F[f"closed:{o}"]])) for o in (*OUTCOMES, "other")]
    families.append(
        (
            "servekit_connections_closed_total",
            "counter",
            "Stream connections closed, by how they ended.",
            closed,
        )
    )
    timed_out = [("", {"cause": o}, float(totals[F[f"closed:{o}"]])) for o in TIMEOUT_OUTCOMES]
    families.append(
        (
            "servekit_connections_timed_out_total",
            "counter",
            "Stream connections closed by a timeout, by cause (a preamble stage, idle "
            "between messages, a handler's read).",
            timed_out,
        )
    )
    buckets: list[tuple[str, dict[str, str], float]] = []
    cumulative = 0
    for index, bound in enumerate((*HANDLER_BUCKETS, float("inf"))):
        cumulative += totals[_BUCKET0 + index]
        buckets.append(("_bucket", {"le": _number(bound)}, float(cumulative)))
    buckets.append(("_sum", {}, totals[F["duration_ns"]] / 1e9))
    buckets.append(("_count", {}, float(cumulative)))
    families.append(
        (
            "servekit_handler_duration_seconds",
            "histogram",
            "Time a handler spent on one message or datagram (a keep-alive connection's "
            "wait between messages left out).",
            buckets,
        )
    )
    if supervisor is not None:
        restarts = supervisor.counters.restarts
        families += [
            (
                "servekit_workers",
                "gauge",
                "Worker processes serving.",
                [("", {}, float(supervisor.serving_workers))],
            ),
            (
                "servekit_workers_desired",
                "gauge",
                "Worker processes the supervisor keeps running.",
                [("", {}, float(supervisor.target))],
            ),
            (
                "servekit_worker_restarts_total",
                "counter",
                "Workers replaced while the server ran, by cause.",
                [("", {"cause": cause}, float(count)) for cause, count in restarts.items()],
            ),
        ]
    return families


def _number(value: float) -> str:
    """A bucket bound as client libraries write it: 0.005, 1.0, +Inf."""
    return "+Inf" if value == float("inf") else repr(float(value))


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def exposition(families: list[Family]) -> str:
    """The Prometheus text format (version 0.0.4) of families: a HELP and a TYPE line
    per family, then one line per sample, ending with a newline."""
    lines: list[str] = []
    for name, kind, help_text, samples in families:
        lines.append(f"# HELP {name} {_escape_help(help_text)}")
        lines.append(f"# TYPE {name} {kind}")
        for suffix, labels, value in samples:
            if labels:
                shown = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items())
                lines.append(f"{name}{suffix}{{{shown}}} {_value(value)}")
            else:
                lines.append(f"{name}{suffix} {_value(value)}")
    return "\n".join(lines) + "\n"


# -- the admin listener ---------------------------------------------------------------


class _AdminHandler(StreamRequestHandler):
    """GET (or HEAD) /metrics, /livez, /readyz over HTTP/1.1; one request per connection."""

    # A client that connects and says nothing must not hold a thread for long.
    timeout = 5.0
    # Request line and header lines longer than this are refused (400).
    max_line = 8192
    max_headers = 100

    server: AdminServer

    def handle(self) -> None:
        request_line = self.rfile.readline(self.max_line + 1)
        parts = request_line.split()
        if len(parts) != 3 or len(request_line) > self.max_line:
            self._respond(400, "bad request\n")
            return
        for _ in range(self.max_headers):
            header = self.rfile.readline(self.max_line + 1)
            if header in (b"\r\n", b"\n", b""):
                break
        else:
            self._respond(400, "too many header lines\n")
            return
        method, target = parts[0], parts[1].decode("latin-1")
        path = target.split("?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            self._respond(405, "only GET and HEAD\n", extra="Allow: GET, HEAD\r\n")
            return
        owner = self.server.owner
        if path == "/metrics":
            self._respond(200, owner.render_metrics(), CONTENT_TYPE, head=method == b"HEAD")
        elif path == "/livez":
            self._respond(200, "ok\n", head=method == b"HEAD")
        elif path == "/readyz":
            ready, why = owner.readiness()
            self._respond(200 if ready else 503, why + "\n", head=method == b"HEAD")
        else:
            self._respond(404, "not found: try /metrics, /livez or /readyz\n")

    _REASONS: ClassVar[dict[int, str]] = {
        200: "OK",
        400: "Bad Request",
        404: "Not Found",
        405: "Method Not Allowed",
        503: "Service Unavailable",
    }

    def _respond(
        self,
        status: int,
        body: str,
        content_type: str = "text/plain; charset=utf-8",
        *,
        head: bool = False,
        extra: str = "",
    ) -> None:
        data = body.encode()
        header = (
            f"HTTP/1.1 {status} {self._REASONS[status]}\r\n"
            f"Content-Type: {content_type}\r\n"
            f"Content-Length: {len(data)}\r\n"
            "Cache-Control: no-store\r\n"
            f"{extra}"
            "Connection: close\r\n\r\n"
        ).encode("latin-1")
        self.wfile.write(header if head else header + data)


class AdminServer(ThreadingMixIn, TCPServer):
    """The admin listener: a core server, a thread per request (scrapes are rare and
    short), daemon threads so that a stuck client never holds up the exit."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, address: str, owner: MetricsMixIn) -> None:
        parsed = parse_address(address)
        self.owner = owner
        if parsed.is_ipv6:
            self.address_family = socket.AF_INET6
        super().__init__((parsed.host, parsed.port), _AdminHandler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A scraper that went away mid-answer is no error worth a traceback.
        log.debug("metrics: request from %s failed", format_peer(client_address), exc_info=True)
