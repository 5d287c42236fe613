"""systemd I/O: inherited sockets, notifications to a real datagram socket, watchdog pacing."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import servekit
from servekit.features import activation
from servekit.process import systemd
from servekit.process.systemd import (
    Notifier,
    NotifyMessageError,
    SystemdEnvironmentError,
    Watchdog,
)
from servekit.protocols.sd_daemon import LISTEN_VARIABLES

SRC = str(Path(servekit.__file__).resolve().parent.parent)
RECV_TIMEOUT = 5.0


# -- a notification socket the test owns -----------------------------------------------


@contextlib.contextmanager
def _bound_datagram_socket(address: str) -> Iterator[socket.socket]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        sock.settimeout(RECV_TIMEOUT)
        yield sock


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # sun_path holds 108 bytes; pytest's tmp_path for a long test id can exceed that.
    with tempfile.TemporaryDirectory(prefix="sk-") as name:
        yield Path(name)


@pytest.fixture
def manager(short_dir: Path) -> Iterator[tuple[socket.socket, dict[str, str]]]:
    """A bound notification socket and the environment that names it."""
    path = str(short_dir / "notify")
    with _bound_datagram_socket(path) as sock:
        yield sock, {"NOTIFY_SOCKET": path}


# -- notify() ------------------------------------------------------------------------------


def test_notify_to_a_filesystem_socket_sends_the_exact_bytes(
    manager: tuple[socket.socket, dict[str, str]],
) -> None:
    """notify() sends the message as one datagram, byte for byte, and returns True."""
    sock, environ = manager
    assert systemd.notify("READY=1\nSTATUS=serving", environ=environ) is True
    assert sock.recv(8192) == b"READY=1\nSTATUS=serving"


def test_notify_to_an_abstract_socket_sends_the_exact_bytes() -> None:
    """A NOTIFY_SOCKET starting with '@' reaches the abstract socket of that name."""
    name = f"servekit-test-{uuid.uuid4().hex}"
    with _bound_datagram_socket("\0" + name) as sock:
        assert systemd.notify("STOPPING=1", environ={"NOTIFY_SOCKET": "@" + name}) is True
        assert sock.recv(8192) == b"STOPPING=1"


def test_notify_reads_os_environ_by_default(
    manager: tuple[socket.socket, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without an environ argument, notify() uses the process environment."""
    sock, environ = manager
    monkeypatch.setenv("NOTIFY_SOCKET", environ["NOTIFY_SOCKET"])
    assert systemd.notify("WATCHDOG=1") is True
    assert sock.recv(8192) == b"WATCHDOG=1"


@pytest.mark.parametrize("environ", [{}, {"NOTIFY_SOCKET": ""}], ids=["unset", "empty"])
def test_notify_without_a_manager_returns_false(environ: dict[str, str]) -> None:
    """With no NOTIFY_SOCKET there is no one to tell: notify() returns False."""
    assert systemd.notify("READY=1", environ=environ) is False


def test_notify_to_a_missing_socket_returns_false_and_logs(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A NOTIFY_SOCKET path with nothing behind it makes notify() return False and log at debug."""
    path = str(short_dir / "gone")
    with caplog.at_level(logging.DEBUG, logger="servekit.systemd"):
        assert systemd.notify("READY=1", environ={"NOTIFY_SOCKET": path}) is False
    assert any(path in record.getMessage() for record in caplog.records)
    assert all(record.levelno == logging.DEBUG for record in caplog.records)


def test_notify_to_a_closed_socket_returns_false(short_dir: Path) -> None:
    """A socket file whose owner closed it refuses the datagram; notify() returns False."""
    path = str(short_dir / "closed")
    with _bound_datagram_socket(path):
        pass
    assert Path(path).exists()
    assert systemd.notify("READY=1", environ={"NOTIFY_SOCKET": path}) is False


def test_notify_to_a_stream_socket_returns_false(short_dir: Path) -> None:
    """A stream socket at NOTIFY_SOCKET cannot take a datagram; notify() returns False."""
    path = str(short_dir / "stream")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen()
        assert systemd.notify("READY=1", environ={"NOTIFY_SOCKET": path}) is False


def test_notify_with_a_malformed_socket_raises() -> None:
    """A NOTIFY_SOCKET that is neither a path nor '@name' raises SystemdEnvironmentError."""
    with pytest.raises(SystemdEnvironmentError, match=r"NOTIFY_SOCKET='notify\.sock'"):
        systemd.notify("READY=1", environ={"NOTIFY_SOCKET": "notify.sock"})


def test_notify_rejects_a_bad_message_even_without_a_manager() -> None:
    """A message the manager would drop raises, so the bug shows without systemd too."""
    with pytest.raises(NotifyMessageError, match="NUL"):
        systemd.notify("READY=1\0", environ={})


# -- Notifier ---------------------------------------------------------------------------

NOTIFIER_CASES: list[tuple[str, Any, bytes]] = [
    ("ready", lambda n: n.ready(), b"READY=1"),
    ("ready with status", lambda n: n.ready("2 sockets"), b"READY=1\nSTATUS=2 sockets"),
    ("stopping", lambda n: n.stopping(), b"STOPPING=1"),
    ("stopping with status", lambda n: n.stopping("draining"), b"STOPPING=1\nSTATUS=draining"),
    ("reloading", lambda n: n.reloading(), b"RELOADING=1\nMONOTONIC_USEC=1234567"),
    ("status escaped", lambda n: n.status("a\nREADY=1"), b"STATUS=a\\nREADY=1"),
    ("watchdog", lambda n: n.watchdog(), b"WATCHDOG=1"),
    ("extend timeout", lambda n: n.extend_timeout(2.5), b"EXTEND_TIMEOUT_USEC=2500000"),
    ("mainpid", lambda n: n.mainpid(4711), b"MAINPID=4711"),
    ("by hand", lambda n: n.send("X_SERVEKIT=1"), b"X_SERVEKIT=1"),
]


@pytest.mark.parametrize(
    ("call", "data"),
    [case[1:] for case in NOTIFIER_CASES],
    ids=[case[0] for case in NOTIFIER_CASES],
)
def test_notifier_sends_each_message(
    manager: tuple[socket.socket, dict[str, str]], call: Any, data: bytes
) -> None:
    """Each Notifier method sends exactly its sd_notify(3) message and returns True."""
    sock, environ = manager
    notifier = Notifier(environ, monotonic_usec=lambda: 1234567)
    assert notifier.enabled
    assert call(notifier) is True
    assert sock.recv(8192) == data


def test_notifier_reloading_carries_the_monotonic_clock(
    manager: tuple[socket.socket, dict[str, str]],
) -> None:
    """By default reloading() stamps MONOTONIC_USEC from CLOCK_MONOTONIC in microseconds."""
    sock, environ = manager
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert Notifier(environ).reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    fields = dict(line.split("=", 1) for line in sock.recv(8192).decode().split("\n"))
    assert fields["RELOADING"] == "1"
    assert before <= int(fields["MONOTONIC_USEC"]) <= after


def test_notifier_reads_notify_socket_once(
    manager: tuple[socket.socket, dict[str, str]],
) -> None:
    """Removing NOTIFY_SOCKET after construction does not silence a Notifier."""
    sock, environ = manager
    notifier = Notifier(environ)
    environ.clear()
    assert notifier.ready()
    assert sock.recv(8192) == b"READY=1"


def test_notifier_without_a_manager_is_disabled() -> None:
    """Without NOTIFY_SOCKET a Notifier is disabled and every method returns False."""
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.ready("up") is False
    assert notifier.watchdog() is False
    with pytest.raises(NotifyMessageError):
        notifier.mainpid(0)


def test_notifier_with_a_malformed_socket_fails_at_construction() -> None:
    """A malformed NOTIFY_SOCKET raises when the Notifier is built, not at the first message."""
    with pytest.raises(SystemdEnvironmentError, match="vsock"):
        Notifier({"NOTIFY_SOCKET": "vsock:2:9"})


# -- Watchdog --------------------------------------------------------------------------------


class Pings:
    """A ping function that counts its calls."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> bool:
        self.count += 1
        return True


def test_watchdog_pings_at_once_then_every_half_interval() -> None:
    """The first call pings; later calls ping only when half the interval has passed."""
    pings = Pings()
    watchdog = Watchdog(10.0, pings)
    assert watchdog.period == 5.0
    assert watchdog.maybe_ping(100.0) is True
    assert [watchdog.maybe_ping(now) for now in (100.0, 101.0, 104.999)] == [False] * 3
    assert watchdog.maybe_ping(105.0) is True
    assert watchdog.maybe_ping(109.0) is False
    assert watchdog.maybe_ping(110.0) is True
    assert pings.count == 3


def test_watchdog_after_a_stall_pings_once_and_reschedules() -> None:
    """A loop that was stuck pings once when it turns again, then a full period later."""
    pings = Pings()
    watchdog = Watchdog(2.0, pings)
    watchdog.maybe_ping(0.0)
    assert watchdog.maybe_ping(60.0) is True
    assert watchdog.maybe_ping(60.5) is False
    assert watchdog.maybe_ping(61.0) is True
    assert pings.count == 3


def test_watchdog_says_how_long_the_loop_may_sleep() -> None:
    """time_until_due() is 0 before the first ping, then counts down to the next one."""
    watchdog = Watchdog(4.0, Pings())
    assert watchdog.due(0.0)
    assert watchdog.time_until_due(0.0) == 0.0
    watchdog.maybe_ping(10.0)
    assert not watchdog.due(11.5)
    assert watchdog.time_until_due(11.5) == pytest.approx(0.5)
    assert watchdog.time_until_due(13.0) == 0.0
    assert watchdog.due(12.0)


@pytest.mark.parametrize("interval", [0.0, -1.0, float("nan"), float("inf")])
def test_watchdog_rejects_an_impossible_interval(interval: float) -> None:
    """An interval that is not a positive finite number of seconds raises ValueError."""
    with pytest.raises(ValueError, match="positive number of seconds"):
        Watchdog(interval, Pings())


def test_watchdog_from_environment_pings_the_manager(
    manager: tuple[socket.socket, dict[str, str]],
) -> None:
    """WATCHDOG_USEC for this process gives a Watchdog whose pings reach NOTIFY_SOCKET."""
    sock, environ = manager
    environ.update(WATCHDOG_USEC="3000000", WATCHDOG_PID=str(os.getpid()))
    watchdog = Watchdog.from_environment(environ)
    assert watchdog is not None
    assert (watchdog.interval, watchdog.period) == (3.0, 1.5)
    assert watchdog.maybe_ping(time.monotonic())
    assert sock.recv(8192) == b"WATCHDOG=1"


@pytest.mark.parametrize(
    "environ",
    [{}, {"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}],
    ids=["no watchdog", "another process's watchdog"],
)
def test_watchdog_from_environment_without_a_watchdog_is_none(environ: dict[str, str]) -> None:
    """No WATCHDOG_USEC, or one meant for another pid, gives no Watchdog."""
    assert Watchdog.from_environment(environ) is None


def test_watchdog_interval_can_unset_its_variables() -> None:
    """watchdog_interval(unset_environment=True) reads the interval and removes both variables."""
    environ = {"WATCHDOG_USEC": "500000", "WATCHDOG_PID": str(os.getpid()), "OTHER": "x"}
    assert systemd.watchdog_interval(environ=environ) == 0.5
    assert "WATCHDOG_USEC" in environ
    assert systemd.watchdog_interval(unset_environment=True, environ=environ) == 0.5
    assert environ == {"OTHER": "x"}


# -- listen_fds(): in this process, environments without descriptors -------------------------


def test_listen_fds_when_not_activated_is_empty() -> None:
    """Without activation variables there are no inherited sockets."""
    assert activation.listen_fds(environ={}) == []
    assert not activation.is_socket_activated({})


def test_listen_fds_for_another_process_is_empty_and_unset() -> None:
    """Variables naming another pid yield no sockets, and are removed all the same."""
    environ = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "web", "HOME": "/"}
    assert activation.listen_fds(environ=environ) == []
    assert environ == {"HOME": "/"}


def test_listen_fds_unsets_variables_even_when_they_are_malformed() -> None:
    """A malformed environment raises, and LISTEN_* is removed regardless, as systemd does."""
    environ = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a"}
    with pytest.raises(SystemdEnvironmentError, match="LISTEN_FDNAMES='a'"):
        activation.listen_fds(environ=environ)
    assert environ == {}


def test_is_socket_activated_reads_without_consuming() -> None:
    """is_socket_activated() answers from LISTEN_PID and LISTEN_FDS and leaves them in place."""
    environ = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1"}
    assert activation.is_socket_activated(environ)
    assert environ == {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1"}
    assert not activation.is_socket_activated({"LISTEN_PID": "1", "LISTEN_FDS": "1"})


# -- listen_fds(): real descriptors at 3, 4, ... in a child process -----------------------------

# The child stands in for the service manager first: it moves the descriptors it was
# given to 3, 4, ... (through numbers above 100 so that no source is overwritten early),
# sets LISTEN_PID to its own pid, then calls listen_fds() and reports what it found.
CHILD = textwrap.dedent(
    """
    import fcntl, json, os, sys
    from servekit.features import activation
    from servekit.process import systemd
    from servekit.protocols.sd_daemon import LISTEN_VARIABLES

    sources = [int(fd) for fd in sys.argv[1].split(",")]
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in sources]
    for fd in sources:
        os.close(fd)
    for index, fd in enumerate(high):
        os.dup2(fd, 3 + index)  # inheritable, as after the manager's exec
        os.close(fd)
    os.environ["LISTEN_PID"] = str(os.getpid())

    report = {"sockets": [], "error": None}
    try:
        found = activation.listen_fds(unset_environment="--keep" not in sys.argv)
    except systemd.SystemdEnvironmentError as exc:
        report["error"] = str(exc)
        found = []
    for inherited in found:
        report["sockets"].append({
            "fd": inherited.fd,
            "socket_fd": inherited.socket.fileno(),
            "name": inherited.name,
            "family": inherited.family.name,
            "type": inherited.type.name,
            "listening": inherited.listening,
            "inheritable": os.get_inheritable(inherited.fd),
            "blocking": os.get_blocking(inherited.fd),
            "socket_blocking": inherited.socket.getblocking(),
        })
    report["untouched"] = {
        fd: os.get_inheritable(fd) for fd in range(3, 3 + len(sources))
    } if report["error"] else {}
    report["environ"] = {name: os.environ.get(name) for name in LISTEN_VARIABLES}
    print(json.dumps(report))
    """
)


def _run_activated(fds: list[int], environ: dict[str, str], *flags: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k not in LISTEN_VARIABLES}
    env.update(environ, PYTHONPATH=SRC)
    result = subprocess.run(
        [sys.executable, "-c", CHILD, ",".join(map(str, fds)), *flags],
        pass_fds=fds,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def test_inherited_sockets_keep_family_type_order_and_name() -> None:
    """Each socket passed at 3, 4, ... comes back with its real family and type and its name."""
    with contextlib.ExitStack() as stack:
        tcp = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        udp = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        udp.bind(("127.0.0.1", 0))
        left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        stack.enter_context(left)
        stack.enter_context(right)
        unix_dgram = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM))
        fds = [tcp.fileno(), udp.fileno(), left.fileno(), unix_dgram.fileno()]
        report = _run_activated(fds, {"LISTEN_FDS": "4", "LISTEN_FDNAMES": "web:dns:control:log"})
    assert report["error"] is None
    found = [
        (s["fd"], s["name"], s["family"], s["type"], s["listening"]) for s in report["sockets"]
    ]
    assert found == [
        (3, "web", "AF_INET", "SOCK_STREAM", True),
        (4, "dns", "AF_INET", "SOCK_DGRAM", False),
        (5, "control", "AF_UNIX", "SOCK_STREAM", False),
        (6, "log", "AF_UNIX", "SOCK_DGRAM", False),
    ]
    assert all(s["socket_fd"] == s["fd"] for s in report["sockets"])
    assert all(not s["inheritable"] for s in report["sockets"]), "FD_CLOEXEC must be set"
    assert report["environ"] == dict.fromkeys(LISTEN_VARIABLES)


def test_inherited_sockets_without_names_are_unknown() -> None:
    """Without LISTEN_FDNAMES every inherited socket is named 'unknown'."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        report = _run_activated([udp.fileno()], {"LISTEN_FDS": "1"})
    assert [s["name"] for s in report["sockets"]] == ["unknown"]


def test_nonblocking_inherited_socket_is_made_blocking() -> None:
    """A socket passed with O_NONBLOCK (NonBlocking=yes) is adopted in blocking mode."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        tcp.setblocking(False)
        report = _run_activated([tcp.fileno()], {"LISTEN_FDS": "1"})
    [found] = report["sockets"]
    assert found["blocking"] and found["socket_blocking"]


def test_variables_can_be_kept_for_children() -> None:
    """With unset_environment=False the LISTEN_* variables stay in the environment."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        report = _run_activated(
            [udp.fileno()], {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "dns"}, "--keep"
        )
    assert len(report["sockets"]) == 1
    assert report["environ"]["LISTEN_FDS"] == "1"
    assert report["environ"]["LISTEN_FDNAMES"] == "dns"
    assert report["environ"]["LISTEN_PID"] is not None


def test_a_descriptor_that_is_not_a_socket_is_refused() -> None:
    """A FIFO among the descriptors raises a clear error, and no descriptor is adopted."""
    read_end, write_end = os.pipe()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            tcp.listen()
            report = _run_activated(
                [tcp.fileno(), read_end], {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "web:jobs"}
            )
    finally:
        os.close(read_end)
        os.close(write_end)
    assert report["error"] == "LISTEN_FDS=2: descriptor 4 ('jobs') is a FIFO, not a socket"
    assert report["untouched"] == {"3": True, "4": True}
    assert report["environ"] == dict.fromkeys(LISTEN_VARIABLES)


def test_a_descriptor_that_is_not_open_is_refused() -> None:
    """LISTEN_FDS counting more descriptors than were passed raises a clear error."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        report = _run_activated([tcp.fileno()], {"LISTEN_FDS": "2"})
    assert report["error"] == (
        "LISTEN_FDS=2: descriptor 4 ('unknown') is not open: Bad file descriptor"
    )
    assert report["untouched"]["3"] is True
