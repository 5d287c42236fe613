"""Accept failures: resource exhaustion backs off instead of spinning, and recovers."""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import servekit
from servekit.core.accept import BACKOFF_MAX, BACKOFF_MIN, AcceptBackoff

SRC = str(Path(servekit.__file__).resolve().parent.parent)

SERVER = textwrap.dedent(
    """
    import logging, resource, sys
    import servekit

    limit = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s")

    class Echo(servekit.StreamRequestHandler):
        def handle(self):
            self.wfile.write(self.rfile.readline())

    class Server(servekit.ThreadingTCPServer):
        request_queue_size = 128
        daemon_threads = True

    server = Server(("127.0.0.1", 0), Echo)
    print(server.server_address[1], flush=True)
    server.serve_forever()
    """
)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


def _read_line(stream: object, timeout: float) -> str:
    fd = stream.fileno()  # type: ignore[attr-defined]
    ready, _, _ = select.select([fd], [], [], timeout)
    if not ready:
        raise TimeoutError("no output from the server")
    return stream.readline()  # type: ignore[attr-defined, no-any-return]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
@pytest.mark.timeout(60)
def test_out_of_descriptors_backs_off_logs_once_and_recovers() -> None:
    """Under EMFILE the loop idles (the stdlib spins at 100 % CPU), logs one warning, and serves every waiting client once descriptors free up."""
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, "24"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    clients: list[socket.socket] = []
    try:
        port = int(_read_line(proc.stdout, 10))
        for _ in range(40):
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        warning = _read_line(proc.stderr, 10)
        assert "accept() failed" in warning
        assert "Too many open files" in warning

        # A one-second window of the exhausted state: CPU use must be near zero.
        before, start = _cpu_seconds(proc.pid), time.monotonic()
        time.sleep(1.0)  # a measurement window, not synchronisation
        busy = (_cpu_seconds(proc.pid) - before) / (time.monotonic() - start)
        assert busy < 0.3, f"server used {busy:.0%} of a CPU while out of descriptors"

        # Every client, accepted earlier or waiting in the backlog, gets its echo.
        for i, client in enumerate(clients):
            client.sendall(b"c%d\n" % i)
        for i, client in enumerate(clients):
            with client.makefile("rb") as reader:
                assert reader.readline() == b"c%d\n" % i
            client.close()
    finally:
        for client in clients:
            client.close()
        proc.kill()
        _, errors = proc.communicate(timeout=10)
    # Only the one warning within the 10 s log interval.
    assert "accept() failed" not in errors


def test_backoff_grows_and_resets() -> None:
    """Consecutive resource failures double the pause up to the cap; a success resets it."""
    backoff = AcceptBackoff()
    exc = OSError(errno.EMFILE, "Too many open files")
    delays = [backoff.failed(exc, now=100.0) for _ in range(12)]
    assert delays[0] == BACKOFF_MIN
    assert delays[1] == 2 * BACKOFF_MIN
    assert max(delays) == BACKOFF_MAX
    assert backoff.paused(now=100.0)
    assert not backoff.paused(now=100.0 + BACKOFF_MAX)
    backoff.succeeded()
    assert not backoff.active
    assert backoff.failed(exc, now=200.0) == BACKOFF_MIN


def test_backoff_logs_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    """Many failures within the log interval produce one warning, then one with the count."""
    backoff = AcceptBackoff()
    exc = OSError(errno.ENFILE, "Too many open files in system")
    with caplog.at_level(logging.WARNING, logger="servekit.accept"):
        for i in range(100):
            backoff.failed(exc, now=1000.0 + i * 0.01)
        backoff.failed(exc, now=1000.0 + 11)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "99 more since the last report" in messages[1]


def test_resource_errors_are_classified() -> None:
    """EMFILE, ENFILE, ENOBUFS and ENOMEM back off; a per-connection error does not."""
    for code in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
        assert AcceptBackoff.is_resource_error(OSError(code, "x"))
    assert not AcceptBackoff.is_resource_error(OSError(errno.ECONNABORTED, "x"))
