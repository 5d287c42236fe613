"""ProxyProtocolMixIn behind the real HAProxy: client addresses end to end, and failover.

Each test writes a haproxy.cfg into a temporary directory: mode tcp, a frontend on
listening sockets the test made itself (127.0.0.1 and, where the host has it, ::1, port
0, handed over as ``bind fd@N`` so no port is ever guessed), and a backend of two
servekit instances, each a subprocess running proxy_app.py, with ``send-proxy`` (v1) or
``send-proxy-v2`` and health checks every 100 ms that send the PROXY header too
(``check-send-proxy``: a v1 line with HAProxy's own addresses, or a v2 LOCAL header).
HAProxy runs in the foreground (-db) as the test's child, logs server state changes on
stderr, and is stopped by its pid.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from servekit.testing import has_ipv6_loopback
from tests.integration.procs import ServerProcess

# Debian installs haproxy in /usr/sbin, which an unprivileged PATH often lacks.
HAPROXY = shutil.which("haproxy", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/usr/local/sbin")

pytestmark = [
    pytest.mark.realprogram,
    pytest.mark.skipif(
        HAPROXY is None, reason="haproxy is not installed (Debian: apt install haproxy)"
    ),
]

APP = Path(__file__).with_name("proxy_app.py")
# Bounds every wait; HAProxy and the apps start and answer in milliseconds.
TIMEOUT = 10.0
# What HAProxy writes on stderr when its health checks take a server out.
DOWN = r"Server be/{name} is DOWN"


class HAProxy:
    """haproxy -db as the test's child: stderr lines with their arrival times, stopped by pid."""

    def __init__(self, config: Path, listeners: list[socket.socket]) -> None:
        assert HAPROXY is not None
        self.lines: list[tuple[float, str]] = []
        self._changed = threading.Condition()
        self.proc = subprocess.Popen(
            [HAPROXY, "-db", "-f", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            pass_fds=[listener.fileno() for listener in listeners],
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append((time.monotonic(), line.rstrip("\n")))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, pattern: str, timeout: float = TIMEOUT) -> tuple[float, str]:
        """The first output line matching pattern, with the time it was read."""
        regex = re.compile(pattern)

        def find() -> tuple[float, str] | None:
            return next(((t, line) for t, line in self.lines if regex.search(line)), None)

        with self._changed:
            found = self._changed.wait_for(lambda: find() or self.proc.poll() is not None, timeout)
            match = find()
        if not found or match is None:
            raise AssertionError(
                f"haproxy printed no line matching {pattern!r} in {timeout}s "
                f"(exit status {self.proc.poll()}): {self.output()}"
            )
        return match

    def output(self) -> str:
        with self._changed:
            return "\n".join(line for _, line in self.lines)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)  # -db: SIGTERM is an immediate stop
            try:
                self.proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(TIMEOUT)
        self._reader.join(TIMEOUT)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@dataclasses.dataclass
class Setup:
    """A running HAProxy in front of two servekit instances."""

    haproxy: HAProxy
    apps: list[ServerProcess]
    frontends: dict[int, tuple[str, int]]  # address family -> frontend address

    @property
    def pids(self) -> list[int]:
        return [app.pid for app in self.apps]


def write_config(
    directory: Path, listeners: list[socket.socket], ports: list[int], send: str
) -> Path:
    binds = "\n".join(f"    bind fd@{listener.fileno()}" for listener in listeners)
    servers = "\n".join(
        f"    server s{index} 127.0.0.1:{port} {send} check inter 100ms fall 2 rise 2 "
        "check-send-proxy"
        for index, port in enumerate(ports, 1)
    )
    config = directory / "haproxy.cfg"
    config.write_text(
        textwrap.dedent(
            """\
            global
                # Two threads are plenty for a test; the default is one per CPU.
                nbthread 2

            defaults
                mode tcp
                timeout connect 1s
                timeout client 10s
                timeout server 10s
                # In mode tcp, retries apply to connection attempts only. A killed
                # instance refuses connections at once; with redispatch on every retry
                # (1), the retry goes to the other server instead of waiting a second
                # to try the dead one again. So before health checks even notice, only
                # connections already established to the dead instance can fail.
                retries 3
                option redispatch 1

            frontend fe
            {binds}
                default_backend be

            backend be
                balance roundrobin
            {servers}
            """
        ).format(binds=binds, servers=servers)
    )
    return config


def ask(frontend: tuple[str, int], source: str | None = None) -> tuple[list[str], tuple[str, int]]:
    """One connection through HAProxy: send a line, return the answer's fields and our address."""
    family = socket.AF_INET6 if ":" in frontend[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT)
        if source is not None:
            sock.bind((source, 0))  # the source address HAProxy sees, and reports to us
        sock.connect(frontend)
        local = sock.getsockname()
        sock.sendall(b"who am I?\n")
        with sock.makefile("rb") as reader:
            answer = reader.readline(1024)
    return answer.decode().split(), (local[0], local[1])


def wait_until_both_answer(setup: Setup) -> None:
    """Readiness: requests through HAProxy until each instance has answered one."""
    seen: set[int] = set()
    deadline = time.monotonic() + TIMEOUT
    for _ in range(100):
        fields, _ = ask(setup.frontends[socket.AF_INET])
        seen.add(int(fields[2]))
        if seen == set(setup.pids) or time.monotonic() > deadline:
            break
    assert seen == set(setup.pids), (
        f"only {seen} of {setup.pids} answered: {setup.haproxy.output()}"
    )


@contextlib.contextmanager
def haproxy_in_front(send: str) -> Iterator[Setup]:
    with contextlib.ExitStack() as stack:
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sk-haproxy-")))
        apps = [stack.enter_context(ServerProcess([sys.executable, str(APP)])) for _ in range(2)]
        ports = [app.wait_ready() for app in apps]
        listeners = [stack.enter_context(socket.create_server(("127.0.0.1", 0)))]
        if has_ipv6_loopback():
            listeners.append(
                stack.enter_context(socket.create_server(("::1", 0), family=socket.AF_INET6))
            )
        frontends = {sock.family: sock.getsockname()[:2] for sock in listeners}
        haproxy = HAProxy(write_config(directory, listeners, ports, send), listeners)
        stack.callback(haproxy.stop)
        for listener in listeners:
            listener.close()  # HAProxy has its own copy; ours would only queue connections
        setup = Setup(haproxy, apps, frontends)
        wait_until_both_answer(setup)
        yield setup


SENDS = [
    pytest.param("send-proxy", "v1", id="send-proxy"),
    pytest.param("send-proxy-v2", "v2", id="send-proxy-v2"),
]


def warnings_logged(app: ServerProcess) -> list[str]:
    return [line for line in app.lines if line.startswith(("WARNING", "ERROR", "CRITICAL"))]


@pytest.mark.parametrize(("send", "version"), SENDS)
def test_client_addresses_arrive_intact(send: str, version: str) -> None:
    """Clients connecting from 127.0.0.2, 127.0.0.3 and ::1 are each reported by the servekit
    handler with exactly their own source address and port, and HAProxy's health checks (which
    send the header too) are accepted without a warning."""
    with haproxy_in_front(send) as setup:
        sources = [("127.0.0.2", socket.AF_INET), ("127.0.0.3", socket.AF_INET)]
        if socket.AF_INET6 in setup.frontends:
            sources.append(("::1", socket.AF_INET6))
        for source, family in sources:
            fields, local = ask(setup.frontends[family], source)
            host, port, pid, seen_version, command = fields
            assert (host, int(port)) == local, f"sent from {local}, the handler saw {fields}"
            assert int(pid) in setup.pids
            assert (seen_version, command) == (version, "PROXY")
        # Dozens of health checks have run by now (every 100 ms, two servers).
        for app in setup.apps:
            assert warnings_logged(app) == []


@dataclasses.dataclass(frozen=True)
class Attempt:
    started: float
    finished: float
    pid: int | None  # the instance that answered; None when the request failed
    error: str | None


class Load:
    """Client threads sending one request per connection through HAProxy, every attempt
    recorded with its start and end time."""

    # Pacing, not waiting for readiness: it keeps the run to a few hundred requests while
    # spreading them over the detection window (a client asks again 5 ms after an answer).
    PAUSE = 0.005
    # Every thread stops after this many requests even if the test never stops it.
    MAX_PER_CLIENT = 500

    def __init__(self, frontend: tuple[str, int], clients: int) -> None:
        self.frontend = frontend
        self.attempts: list[Attempt] = []
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(TIMEOUT)
        assert not any(thread.is_alive() for thread in self._threads)

    def _run(self) -> None:
        for _ in range(self.MAX_PER_CLIENT):
            if self._stop.is_set():
                return
            started = time.monotonic()
            pid: int | None = None
            error: str | None = None
            try:
                fields, _ = ask(self.frontend)
                pid = int(fields[2]) if len(fields) == 5 else None
                if pid is None:
                    error = f"answer {fields!r}"
            except OSError as exc:
                error = repr(exc)
            with self._changed:
                self.attempts.append(Attempt(started, time.monotonic(), pid, error))
                self._changed.notify_all()
            self._stop.wait(self.PAUSE)

    def wait_until(self, count: int, started_after: float = 0.0) -> None:
        """Block until count attempts that started after started_after have finished."""
        with self._changed:
            done = self._changed.wait_for(
                lambda: sum(1 for a in self.attempts if a.started > started_after) >= count,
                TIMEOUT,
            )
        assert done, f"only {len(self.attempts)} attempts in {TIMEOUT}s"


@pytest.mark.parametrize(("send", "version"), SENDS)
def test_failover_after_kill(send: str, version: str) -> None:
    """When one servekit instance is killed under load, every request started after HAProxy marked
    it DOWN succeeds on the other; before that, only requests already in flight on the killed
    instance may fail."""
    clients = 4
    with haproxy_in_front(send) as setup:
        victim, survivor = setup.apps
        with Load(setup.frontends[socket.AF_INET], clients) as load:
            load.wait_until(60)
            killed_at = time.monotonic()
            os.kill(victim.pid, signal.SIGKILL)
            detected_at, _line = setup.haproxy.wait_for(DOWN.format(name="s1"))
            load.wait_until(150, started_after=detected_at)
        victim.wait(TIMEOUT)
        attempts = sorted(load.attempts, key=lambda a: a.started)

    before = [a for a in attempts if a.finished < killed_at]
    window = [a for a in attempts if a.finished >= killed_at and a.started <= detected_at]
    after = [a for a in attempts if a.started > detected_at]
    failed_window = [a for a in window if a.error is not None]
    failed_after = [a for a in after if a.error is not None]
    print(
        f"\n{send}: {len(attempts)} requests; {len(before)} before the kill, all "
        f"{'ok' if all(a.error is None for a in before) else 'NOT ok'}; detection "
        f"{(detected_at - killed_at) * 1000:.0f} ms after SIGKILL; {len(window)} in flight or "
        f"started in the detection window, {len(failed_window)} failed "
        f"({[a.error for a in failed_window]}); {len(after)} after detection, "
        f"{len(failed_after)} failed"
    )
    assert all(a.error is None for a in before)
    assert failed_after == [], f"failures after HAProxy marked s1 DOWN: {failed_after}"
    assert {a.pid for a in after} == {survivor.pid}
    # With retries and redispatch, a refused connection is retried on the survivor; what can
    # still fail is a connection the killed instance had already accepted: one per client.
    assert len(failed_window) <= clients
    assert warnings_logged(survivor) == []
