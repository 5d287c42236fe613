"""Socket activation end to end with the real systemd-socket-activate program.

systemd-socket-activate (systemd-socket-activate(1)) binds the sockets given with -l,
or takes over those passed to it in LISTEN_FDS, waits for the first connection or
datagram without accepting it, then execs the service in its own process (same pid)
with LISTEN_FDS, LISTEN_PID and LISTEN_FDNAMES set. It passes on only TERM, PATH, USER
and HOME from its environment, so NOTIFY_SOCKET and the rest go through -E. The service
here is systemd_app.py; the test plays the service manager's notification socket.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

import servekit
from servekit.protocols.sd_daemon import parse_message
from servekit.testing import LOCALHOST, connect

SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")

pytestmark = [
    pytest.mark.realprogram,
    pytest.mark.skipif(
        SOCKET_ACTIVATE is None,
        reason="systemd-socket-activate is not installed (Debian package 'systemd')",
    ),
]

APP = Path(__file__).with_name("systemd_app.py")
SRC = str(Path(servekit.__file__).resolve().parent.parent)
TIMEOUT = 10.0
# Variables of a service manager that may surround the test run; the programs under
# test must see only the ones each test sets.
MANAGER_VARIABLES = (
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "LISTEN_PIDFDID",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
)

# Stands in for a service manager that already holds the sockets: moves the descriptors
# named in argv[1] to 3, 4, ... (through numbers above 100 so that none is overwritten
# early), sets LISTEN_FDS and LISTEN_PID, and execs argv[2:] in the same process, so
# LISTEN_PID stays right. systemd-socket-activate then passes these sockets through to
# the service in the same positions; the test reserved their ports, so there is no race.
LAUNCHER = textwrap.dedent(
    """
    import fcntl, os, sys
    sources = [int(fd) for fd in sys.argv[1].split(",")]
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in sources]
    for fd in sources:
        os.close(fd)
    for index, fd in enumerate(high):
        os.dup2(fd, 3 + index)
        os.close(fd)
    os.environ.update(LISTEN_FDS=str(len(sources)), LISTEN_PID=str(os.getpid()))
    os.execv(sys.argv[2], sys.argv[2:])
    """
)


class NotifyReceiver:
    """The service manager's side of sd_notify: a datagram socket and what arrived on it."""

    def __init__(self, directory: Path) -> None:
        self.path = str(directory / "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.received: list[dict[str, str]] = []
        self._cursor = 0

    def close(self) -> None:
        self.sock.close()

    def wait_for(
        self, name: str, process: subprocess.Popen[bytes], timeout: float = TIMEOUT
    ) -> dict[str, str]:
        """The next message holding name; fails after timeout or once process has exited
        without sending it."""
        deadline = time.monotonic() + timeout
        while True:
            for index in range(self._cursor, len(self.received)):
                if name in self.received[index]:
                    self._cursor = index + 1
                    return self.received[index]
            self._cursor = len(self.received)
            remaining = deadline - time.monotonic()
            exited = process.poll() is not None
            # Short slices only so that a service that died is noticed; every wait is on
            # the socket, and the whole wait is bounded by the deadline.
            slice_ = 0.0 if exited or remaining <= 0 else min(remaining, 0.2)
            readable, _, _ = select.select([self.sock], [], [], slice_)
            if readable:
                self.received.append(parse_message(self.sock.recv(8192)))
            elif exited or remaining <= 0:
                why = f"exited with {process.returncode}" if exited else f"{timeout}s passed"
                raise AssertionError(f"no {name}= notification ({why}); got {self.received}")


@pytest.fixture
def manager() -> Iterator[NotifyReceiver]:
    # A short directory: sun_path holds 108 bytes, and pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="sk-") as directory:
        receiver = NotifyReceiver(Path(directory))
        try:
            yield receiver
        finally:
            receiver.close()


@contextlib.contextmanager
def activated(
    options: Sequence[str],
    manager: NotifyReceiver,
    *,
    passed: Sequence[socket.socket] = (),
    setenv: Sequence[str] = (),
    service: Sequence[str] = (),
) -> Iterator[subprocess.Popen[bytes]]:
    """Run systemd-socket-activate with options around the service (systemd_app.py
    unless given); kill it if the test did not stop it."""
    assert SOCKET_ACTIVATE is not None
    command = [SOCKET_ACTIVATE, *options, "-E", f"NOTIFY_SOCKET={manager.path}"]
    command += ["-E", f"PYTHONPATH={SRC}"]
    for assignment in setenv:
        command += ["-E", assignment]
    command += list(service) or [sys.executable, str(APP)]
    fds = [sock.fileno() for sock in passed]
    if fds:
        command = [sys.executable, "-c", LAUNCHER, ",".join(map(str, fds)), *command]
    env = {k: v for k, v in os.environ.items() if k not in MANAGER_VARIABLES}
    process = subprocess.Popen(
        command,
        pass_fds=fds,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(TIMEOUT)
        assert process.stderr is not None
        process.stderr.close()


def wait_listening(process: subprocess.Popen[bytes], count: int) -> None:
    """Wait until systemd-socket-activate has logged "Listening on ..." for count sockets."""
    assert process.stderr is not None
    fd = process.stderr.fileno()
    output = b""
    deadline = time.monotonic() + TIMEOUT
    while output.count(b"Listening on") < count:
        remaining = deadline - time.monotonic()
        readable, _, _ = select.select([fd], [], [], max(0.0, remaining))
        chunk = os.read(fd, 4096) if readable else b""
        if not chunk:
            raise AssertionError(
                f"systemd-socket-activate did not report {count} socket(s): {output!r}"
            )
        output += chunk


def stop(process: subprocess.Popen[bytes], manager: NotifyReceiver) -> None:
    """SIGTERM the service by the pid we started; it must say STOPPING=1 and exit 0."""
    os.kill(process.pid, signal.SIGTERM)
    assert manager.wait_for("STOPPING", process)["STOPPING"] == "1"
    assert process.wait(TIMEOUT) == 0


def unused_port(kind: socket.SocketKind) -> int:
    """A port that was free a moment ago, for -l.

    Race: between close() here and systemd-socket-activate's bind(), another process
    would have to be given this exact port, within milliseconds; if it is,
    systemd-socket-activate reports "Address already in use" and wait_listening() fails
    with that message. The tests that need no -l pass reserved sockets instead.
    """
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((LOCALHOST, 0))
        port: int = sock.getsockname()[1]
        return port


def reserved(kind: socket.SocketKind) -> socket.socket:
    sock = socket.socket(socket.AF_INET, kind)
    sock.bind((LOCALHOST, 0))
    if kind == socket.SOCK_STREAM:
        sock.listen()
    return sock


def test_listen_address_is_served_under_its_fdname(manager: NotifyReceiver) -> None:
    """With -l and --fdname the first connection starts the service, which reports READY=1
    and echoes under the socket's name, then stops cleanly on SIGTERM."""
    port = unused_port(socket.SOCK_STREAM)
    options = ["-l", f"{LOCALHOST}:{port}", "--fdname=web"]
    with activated(options, manager) as process:
        wait_listening(process, 1)
        with connect((LOCALHOST, port), timeout=TIMEOUT) as client:
            client.sendall(b"hello\n")
            ready = manager.wait_for("READY", process)
            assert ready == {"READY": "1", "STATUS": f"serving web=SOCK_STREAM:{LOCALHOST}:{port}"}
            assert client.makefile("rb").readline() == b"web: hello\n"
        stop(process, manager)


def test_reserved_socket_is_passed_through_unnamed(manager: NotifyReceiver) -> None:
    """A listening socket handed to systemd-socket-activate reaches the service as fd 3,
    named 'unknown' when no --fdname is given."""
    with reserved(socket.SOCK_STREAM) as listener:
        port = listener.getsockname()[1]
        with activated([], manager, passed=[listener]) as process:
            listener.close()  # the service owns it now
            with connect((LOCALHOST, port), timeout=TIMEOUT) as client:
                client.sendall(b"one\ntwo\n")
                status = manager.wait_for("READY", process)["STATUS"]
                assert status == f"serving unknown=SOCK_STREAM:{LOCALHOST}:{port}"
                with client.makefile("rb") as reader:
                    replies = [reader.readline(), reader.readline()]
                assert replies == [b"unknown: one\n", b"unknown: two\n"]
            stop(process, manager)


def test_datagram_socket_is_served_with_the_datagram_option(manager: NotifyReceiver) -> None:
    """With --datagram the first datagram starts the service, which answers it and later ones."""
    port = unused_port(socket.SOCK_DGRAM)
    options = ["--datagram", "-l", f"{LOCALHOST}:{port}", "--fdname=dns"]
    with activated(options, manager) as process:
        wait_listening(process, 1)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(TIMEOUT)
            client.sendto(b"ping", (LOCALHOST, port))
            status = manager.wait_for("READY", process)["STATUS"]
            assert status == f"serving dns=SOCK_DGRAM:{LOCALHOST}:{port}"
            assert client.recvfrom(8192)[0] == b"dns: ping"
            client.sendto(b"again", (LOCALHOST, port))
            assert client.recvfrom(8192)[0] == b"dns: again"
        stop(process, manager)


def test_several_sockets_keep_their_order_and_names(manager: NotifyReceiver) -> None:
    """A stream and a datagram socket arrive in order with the names --fdname gave them."""
    with reserved(socket.SOCK_STREAM) as tcp, reserved(socket.SOCK_DGRAM) as udp:
        tcp_port, udp_port = tcp.getsockname()[1], udp.getsockname()[1]
        with activated(["--fdname=web:dns"], manager, passed=[tcp, udp]) as process:
            tcp.close()
            udp.close()
            with connect((LOCALHOST, tcp_port), timeout=TIMEOUT) as client:
                client.sendall(b"over tcp\n")
                status = manager.wait_for("READY", process)["STATUS"]
                assert status == (
                    f"serving web=SOCK_STREAM:{LOCALHOST}:{tcp_port}, "
                    f"dns=SOCK_DGRAM:{LOCALHOST}:{udp_port}"
                )
                assert client.makefile("rb").readline() == b"web: over tcp\n"
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
                client.settimeout(TIMEOUT)
                client.sendto(b"over udp", (LOCALHOST, udp_port))
                assert client.recvfrom(8192)[0] == b"dns: over udp"
            stop(process, manager)


def test_watchdog_pings_come_from_the_serving_loop(manager: NotifyReceiver) -> None:
    """With WATCHDOG_USEC set the serving loop sends WATCHDOG=1 repeatedly while it runs."""
    with reserved(socket.SOCK_STREAM) as listener:
        port = listener.getsockname()[1]
        # 200 ms: pings every 100 ms, so three arrive well inside the wait.
        setenv = ["WATCHDOG_USEC=200000"]
        with activated([], manager, passed=[listener], setenv=setenv) as process:
            listener.close()
            with connect((LOCALHOST, port), timeout=TIMEOUT):
                manager.wait_for("READY", process)
            pings = [manager.wait_for("WATCHDOG", process)["WATCHDOG"] for _ in range(3)]
            assert pings == ["1", "1", "1"]
            stop(process, manager)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_servekit_command_serves_an_activated_socket(manager: NotifyReceiver, workers: str) -> None:
    """`servekit echo --bind fd://web` serves the socket systemd passed under that name, reports READY=1, and STOPPING=1 on SIGTERM."""
    with socket.socket() as listener:
        listener.bind((LOCALHOST, 0))
        listener.listen()
        port = listener.getsockname()[1]
        service = [sys.executable, "-m", "servekit", "echo", "--bind", "fd://web"]
        service += ["--workers", workers]
        with activated(["--fdname=web"], manager, passed=[listener], service=service) as process:
            listener.close()  # the service holds it now
            with connect((LOCALHOST, port)) as sock, sock.makefile("rb") as reader:
                sock.sendall(b"activated\n")
                ready = manager.wait_for("READY", process)
                assert ready["READY"] == "1"
                assert reader.readline() == b"activated\n"
            stop(process, manager)
