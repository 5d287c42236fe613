"""Pre-forked workers under the supervisor: serving, signals and faults, with real processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.integration.procs import ROOT, ServerProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]


def serve(*args: str) -> ServerProcess:
    return ServerProcess.cli("serve", *args, "--bind", "127.0.0.1:0")


def test_workers_share_the_listener_and_stop_gracefully() -> None:
    """Two workers answer; SIGTERM stops both with exit status 0 and leaves no process behind."""
    with serve("tests.integration.apps:PidEcho", "--workers", "2", "--threads", "4") as server:
        server.wait_ready()
        assert len(server.workers()) == 2
        pids = {int(server.request(b"x\n").split()[0]) for _ in range(40)}
        assert pids <= set(server.workers())
        server.send(signal.SIGTERM)
        assert server.wait() == 0
        server.assert_no_leftovers()


def test_sigterm_lets_200_in_flight_requests_finish() -> None:
    """SIGTERM with 200 slow requests in flight: all 200 complete; new connections are not admitted any more."""
    with serve("tests.integration.apps:Slow", "--workers", "2", "--threads", "128") as server:
        server.wait_ready()
        clients = []
        for _ in range(200):
            sock = server.connect()
            sock.sendall(b"1.5\n")
            clients.append((sock, sock.makefile("rb")))
        for _, reader in clients:
            assert reader.readline().startswith(b"started ")
        server.send(signal.SIGTERM)
        server.wait_for("graceful stop")
        refused = False
        deadline = time.monotonic() + 5
        while not refused and time.monotonic() < deadline:
            try:
                probe = socket.create_connection(("127.0.0.1", server.port), timeout=1)
            except (ConnectionRefusedError, ConnectionResetError, TimeoutError):
                # Refused or reset: the listener is closed. Timed out: its door is shut
                # (the shutdown drops new SYNs while it drains the queue; see
                # servekit.features.admission). Either way no new connection gets in.
                refused = True
            else:
                probe.close()
                threading.Event().wait(0.01)  # the workers close their copies next
        assert refused, "the listener was still open after SIGTERM"
        done = 0
        for sock, reader in clients:
            with sock, reader:
                if reader.readline().startswith(b"done "):
                    done += 1
        assert done == 200
        assert server.wait() == 0
        server.assert_no_leftovers()


class Load:
    """A client thread making one request per connection until stopped; records every outcome."""

    def __init__(self, server: ServerProcess, clients: int = 4) -> None:
        self.server = server
        self.stop = threading.Event()
        self.ok: list[tuple[int, int]] = []  # (request id, worker pid)
        self.failed: list[tuple[int, str]] = []
        self.lock = threading.Lock()
        self.counter = 0
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self) -> None:
        for _ in range(100_000):  # bounded; stops long before via self.stop
            if self.stop.is_set():
                return
            with self.lock:
                self.counter += 1
                rid = self.counter
            try:
                reply = self.server.request(b"%d\n" % rid, timeout=5)
                pid, echoed = reply.split()
                assert int(echoed) == rid
                with self.lock:
                    self.ok.append((rid, int(pid)))
            except (OSError, ValueError) as exc:
                with self.lock:
                    self.failed.append((rid, type(exc).__name__))

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def wait_for_requests(self, n: int, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while len(self.ok) < n and time.monotonic() < deadline:
            self.stop.wait(0.01)  # readiness poll, bounded
        assert len(self.ok) >= n

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(10)


def test_sigkill_of_a_worker_under_load() -> None:
    """A worker killed with SIGKILL under load is replaced within 1 s; completed requests are neither lost nor repeated; the supervisor lives on."""
    with serve("tests.integration.apps:PidEcho", "--workers", "2", "--threads", "8") as server:
        server.wait_ready()
        with Load(server, clients=4) as load:
            load.wait_for_requests(200)
            victim = load.ok[-1][1]
            mark = len(server.lines)
            killed_at = time.monotonic()
            server.workers()
            import os

            os.kill(victim, signal.SIGKILL)
            server.wait_for(r"died \(signal SIGKILL\)", start=mark)
            server.wait_for(r"worker \d+ started, pid", start=mark)
            replaced_in = time.monotonic() - killed_at
            before = len(load.ok)
            load.wait_for_requests(before + 200)
        assert replaced_in < 1.0, f"replacement took {replaced_in:.2f}s"
        ids = [rid for rid, _ in load.ok]
        assert len(ids) == len(set(ids)), "a request was answered twice"
        # Only requests in flight on the killed worker may fail: at most one per client.
        assert len(load.failed) <= 4, load.failed
        assert server.proc is not None and server.proc.poll() is None
        assert victim not in server.workers()
        assert len(server.workers()) == 2
        server.send(signal.SIGTERM)
        assert server.wait() == 0
        server.assert_no_leftovers()


def test_sighup_replaces_every_worker_without_refusing() -> None:
    """SIGHUP under load starts new workers, then retires the old ones; no request fails meanwhile."""
    with serve("tests.integration.apps:PidEcho", "--workers", "2", "--threads", "8") as server:
        server.wait_ready()
        old = set(server.workers())
        with Load(server, clients=4) as load:
            load.wait_for_requests(100)
            mark = len(server.lines)
            server.send(signal.SIGHUP)
            server.wait_for(r"generation 1 serving", start=mark)
            exits = 0
            while exits < 2:  # both old workers gone (bounded by wait_for's timeout)
                match = server.wait_for(r"exited \(exit code 0\)", start=mark)
                mark = server.lines.index(match.string, mark) + 1
                exits += 1
            with load.lock:
                last_before = load.counter  # requests started from now on meet new workers
            load.wait_for_requests(len(load.ok) + 100)
            new = set(server.workers())
        assert load.failed == []
        assert not (old & new)
        assert len(new) == 2
        assert {pid for rid, pid in load.ok if rid > last_before} <= new
        server.send(signal.SIGTERM)
        assert server.wait() == 0
        server.assert_no_leftovers()


def test_sigttin_and_sigttou_resize() -> None:
    """SIGTTIN adds a worker and SIGTTOU removes one."""
    with serve("tests.integration.apps:PidEcho", "--workers", "2", "--threads", "2") as server:
        server.wait_ready()
        mark = len(server.lines)
        server.send(signal.SIGTTIN)
        server.wait_for(r"workers 3", start=mark)
        server.wait_for(r"worker 2 started", start=mark)
        assert len(server.workers()) == 3
        mark = len(server.lines)
        server.send(signal.SIGTTOU)
        server.wait_for(r"exited \(exit code 0\)", start=mark)
        assert len(server.workers()) == 2
        server.send(signal.SIGTERM)
        assert server.wait() == 0
        server.assert_no_leftovers()


def test_sigint_is_a_fast_stop() -> None:
    """SIGINT stops at once, without waiting for a 30 s request in flight."""
    with serve("tests.integration.apps:Slow", "--workers", "2", "--threads", "4") as server:
        server.wait_ready()
        with server.connect() as sock, sock.makefile("rb") as reader:
            sock.sendall(b"30\n")
            assert reader.readline().startswith(b"started ")
            started = time.monotonic()
            server.send(signal.SIGINT)
            assert server.wait(timeout=10) == 0
            assert time.monotonic() - started < 10
        server.assert_no_leftovers()


@pytest.mark.parametrize("reuse_port", [False, True], ids=["shared", "reuse-port"])
def test_workers_sharing_a_listener_accept_one_connection_per_wake_up(reuse_port: bool) -> None:
    """A worker that shares the listener with its siblings takes one connection per
    wake-up (a batch let one worker keep a whole burst of connections); one with its own
    SO_REUSEPORT listener keeps the pool's batch."""
    extra = ["--reuse-port"] if reuse_port else []
    with serve(
        "tests.integration.apps:AcceptBatch", "--workers", "2", "--threads", "2", *extra
    ) as server:
        server.wait_ready()
        batches = {int(server.request(b"x\n").split()[1]) for _ in range(4)}
        assert batches == ({16} if reuse_port else {1})
        server.send(signal.SIGTERM)
        assert server.wait() == 0
        server.assert_no_leftovers()


def test_max_requests_recycles_workers() -> None:
    """With max_requests, workers retire and are replaced, and no request fails."""
    with serve(
        "tests.integration.apps:PidEcho", "--workers", "2", "--threads", "2", "--max-requests", "5"
    ) as server:
        server.wait_ready()
        pids = set()
        for i in range(40):
            reply = server.request(b"%d\n" % i)
            pids.add(int(reply.split()[0]))
        assert len(pids) >= 4, pids
        assert server.count("is retiring") >= 2
        server.workers()
        server.send(signal.SIGTERM)
        assert server.wait() == 0
        server.assert_no_leftovers()


def test_max_requests_counts_the_requests_of_a_keep_alive_connection() -> None:
    """max_requests counts requests, as gunicorn does, not connections: a single client
    that keeps one connection open and sends line after line to a message handler makes
    its worker retire after 5 of them. (A handler that loops in handle() is one request
    per connection.)"""
    with serve(
        "servekit.apps.echo:EchoHandler", "--workers", "2", "--threads", "2", "--max-requests", "5"
    ) as server:
        server.wait_ready()
        with server.connect() as sock, sock.makefile("rb") as reader:
            for i in range(5):
                sock.sendall(b"%d\n" % i)
                assert reader.readline() == b"%d\n" % i
        server.wait_for("is retiring")
        server.send(signal.SIGTERM)
        assert server.wait() == 0
        server.assert_no_leftovers()


def test_reuse_port_workers() -> None:
    """With --reuse-port each worker has its own SO_REUSEPORT listener and requests are served."""
    with serve(
        "tests.integration.apps:PidEcho", "--workers", "2", "--threads", "2", "--reuse-port"
    ) as server:
        server.wait_ready()
        pids = {int(server.request(b"r\n").split()[0]) for _ in range(60)}
        assert pids <= set(server.workers())
        # The kernel hashes connections by source port: both workers get some.
        assert len(pids) == 2
        server.send(signal.SIGTERM)
        assert server.wait() == 0
        server.assert_no_leftovers()


def test_crash_loop_backs_off() -> None:
    """Workers that die right after starting are restarted with growing delays, not in a tight loop."""
    with ServerProcess.app("crash") as server:
        delays = []
        for _ in range(4):
            match = server.wait_for(
                r"(died [\d.]+s after starting|crash loop \((\d+) workers in a row died "
                r"within 5s of starting\)): next worker in ([\d.]+)s",
                start=len(server.lines),
            )
            # The first early death is named as such; from the second, a crash loop.
            assert (match.group(2) is None) == (not delays), match.group(0)
            delays.append(float(match.group(3)))
        assert delays == sorted(delays) and delays[-1] > delays[0]
        assert delays[:3] == [0.1, 0.2, 0.4]
        server.send(signal.SIGTERM)
        assert server.wait() == 0


def test_repeated_boot_errors_stop_the_supervisor() -> None:
    """Workers that fail to boot five times in a row stop the supervisor with an error."""
    with ServerProcess.app("bootfail") as server:
        assert server.wait(timeout=60) != 0
        server.wait_for("failed to boot")
        assert server.count("worker 0 failed to start") >= 5
        server.wait_for("cannot boot: missing configuration")


def test_stuck_worker_is_killed_and_replaced() -> None:
    """A worker whose loop stops heartbeating for worker_timeout is killed and replaced."""
    with ServerProcess.app("stuck") as server:
        server.wait_ready()
        stuck = server.workers()
        with server.connect() as sock:
            sock.sendall(b"60\n")  # the handler blocks the worker's only thread
            server.wait_for(r"stuck for [\d.]+s", timeout=15)
            server.wait_for(r"worker \d+ started, pid", start=len(server.lines) - 1, timeout=15)
        fresh = server.workers()
        assert fresh and not (set(fresh) & set(stuck))
        server.send(signal.SIGTERM)
        assert server.wait() == 0
        server.assert_no_leftovers()


def test_python_api_shutdown_from_another_thread() -> None:
    """serve_forever() on a thread and shutdown() from another stop every worker, as with any server."""
    with ServerProcess.app("api") as server:
        server.wait_for(r"2 worker\(s\) serving")
        workers = server.workers()
        assert len(workers) == 2
        assert server.proc is not None and server.proc.stdin is not None
        server.proc.stdin.write("stop\n")
        server.proc.stdin.flush()
        server.wait_for("servekit: api stopped")
        assert server.wait() == 0
        server.assert_no_leftovers()


def _gone(pid: int) -> bool:
    """The process no longer runs: it does not exist, or is a zombie (holding no socket)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def test_sigkill_of_the_supervisor_takes_the_workers_with_it() -> None:
    """SIGKILL of the supervisor: no worker is left within 2 s, and a restart on the same port listens at once."""
    with ServerProcess.cli("echo", "--workers", "2", "--bind", "127.0.0.1:0") as server:
        port = server.wait_ready()
        workers = server.workers()
        assert len(workers) == 2
        assert server.request(b"before\n") == b"before\n"
        server.send(signal.SIGKILL)
        assert server.wait() == -signal.SIGKILL
        deadline = time.monotonic() + 2.0
        while not all(map(_gone, workers)) and time.monotonic() < deadline:
            threading.Event().wait(0.02)
        assert [pid for pid in workers if not _gone(pid)] == []
    with ServerProcess.cli("echo", "--workers", "2", "--bind", f"127.0.0.1:{port}") as again:
        assert again.wait_ready(timeout=10) == port
        assert again.count("cannot listen") == 0
        assert again.request(b"after\n") == b"after\n"
        again.send(signal.SIGTERM)
        assert again.wait() == 0
        again.assert_no_leftovers()


def test_a_worker_whose_supervisor_died_before_prctl_exits() -> None:
    """The race: a worker that finds its parent is no longer the supervisor it was forked from exits at once."""
    code = (
        "import os\n"
        "from servekit.process.supervisor import die_with_parent\n"
        "die_with_parent(os.getppid(), None)\n"  # the parent it has: goes on
        "print('still here', flush=True)\n"
        "die_with_parent(os.getppid() + 1_000_000, None)\n"  # not its parent: gone
        "print('not reached', flush=True)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    assert proc.stdout == "still here\n", proc.stderr
    assert proc.returncode != 0
