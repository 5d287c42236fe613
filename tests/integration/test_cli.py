"""The servekit command: the echo server, settings, signals, systemd notifications."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from servekit.cli.main import cli_knobs
from tests.integration.procs import ROOT, ServerProcess

pytestmark = pytest.mark.timeout(60)


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "servekit", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}", **(env or {})},
    )


def test_echo_serves_and_stops_on_sigint() -> None:
    """`servekit echo` prints one ready line, echoes lines, and Ctrl-C stops it with status 0."""
    with ServerProcess.cli("echo", "--bind", "127.0.0.1:0") as server:
        server.wait_ready()
        assert server.request(b"hello\n") == b"hello\n"
        server.send(signal.SIGINT)
        assert server.wait() == 0
        assert server.count("servekit: stopped") == 1
        assert server.count("servekit: ready: echo on tcp://127.0.0.1:") == 1


def test_echo_with_workers_and_threads() -> None:
    """`--workers 2 --threads 4` runs two workers and announces it; SIGTERM stops them."""
    with ServerProcess.cli(
        "echo", "--bind", "127.0.0.1:0", "--workers", "2", "--threads", "4"
    ) as server:
        server.wait_ready()
        assert server.count(r"2 workers x 4 threads") == 1
        assert len(server.workers()) == 2
        for _ in range(10):
            assert server.request(b"w\n") == b"w\n"
        server.send(signal.SIGTERM)
        assert server.wait() == 0
        server.assert_no_leftovers()


def test_echo_refuses_an_overlong_line() -> None:
    """A client that never sends a newline gets an error line and is closed, not buffered forever."""
    with ServerProcess.cli("echo", "--bind", "127.0.0.1:0", "--wait-for-request", "none") as server:
        server.wait_ready()
        with server.connect() as sock, sock.makefile("rb") as reader:
            sock.sendall(b"x" * 70000)
            assert reader.readline() == b"error: line longer than 65536 bytes\n"
            assert reader.read() == b""
        server.send(signal.SIGTERM)
        assert server.wait() == 0


def test_udp_echo() -> None:
    """`--bind udp://...` serves datagrams."""
    with ServerProcess.cli("echo", "--bind", "udp://127.0.0.1:0") as server:
        server.wait_ready()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(5)
            client.sendto(b"dgram", ("127.0.0.1", server.port))
            assert client.recvfrom(100)[0] == b"dgram"
        server.send(signal.SIGTERM)
        assert server.wait() == 0


def test_serve_a_handler_class() -> None:
    """`servekit serve module:Class` runs a user's handler."""
    with ServerProcess.cli(
        "serve", "tests.integration.apps:PidEcho", "--bind", "127.0.0.1:0"
    ) as server:
        server.wait_ready()
        reply = server.request(b"hi\n")
        assert reply == b"%d hi\n" % server.pid
        server.send(signal.SIGTERM)
        assert server.wait() == 0


def test_settings_precedence_flag_env_file(tmp_path: Path) -> None:
    """Flags beat environment variables, which beat the config file."""
    config = tmp_path / "servekit.toml"
    config.write_text(
        '[server]\nbind = "127.0.0.1:0"\n[pool]\nmax_threads = 3\n[prefork]\nworkers = 2\n'
    )
    with ServerProcess.cli("echo", "--config", str(config)) as server:
        server.wait_ready()
        assert server.count(r"2 workers x 3 threads") == 1
        server.send(signal.SIGTERM)
        assert server.wait() == 0
    with ServerProcess.cli(
        "echo", "--config", str(config), env={"SERVEKIT_MAX_THREADS": "5"}
    ) as server:
        server.wait_ready()
        assert server.count(r"2 workers x 5 threads") == 1
        server.send(signal.SIGTERM)
        assert server.wait() == 0
    with ServerProcess.cli(
        "echo", "--config", str(config), "--threads", "7", env={"SERVEKIT_MAX_THREADS": "5"}
    ) as server:
        server.wait_ready()
        assert server.count(r"2 workers x 7 threads") == 1
        server.send(signal.SIGTERM)
        assert server.wait() == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["echo", "--bind", "localhost"], "missing ':PORT'"),
        (["echo", "--bind", "127.0.0.1:99999"], "out of range"),
        (["echo", "--threads", "0"], "max_threads=0: must be greater than 0"),
        (["echo", "--threads", "many"], "cannot read 'many'"),
        (["echo", "--max-requests", "5"], "needs --workers 2 or more"),
        (["serve", "no_such_module:Handler"], "cannot import 'no_such_module'"),
        (["echo", "--tls-handshake-timeout", "3"], "without --certfile"),
    ],
)
def test_bad_input_is_one_clear_line(args: list[str], message: str) -> None:
    """Bad command-line input exits with status 2 and one line naming the problem."""
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert proc.stderr.startswith("servekit: error: ")


def test_unknown_config_key_is_refused(tmp_path: Path) -> None:
    """A misspelt key in the config file is an error, not silently ignored."""
    config = tmp_path / "bad.toml"
    config.write_text("[pool]\nmax_thread = 3\n")
    proc = run_cli("echo", "--config", str(config))
    assert proc.returncode == 2
    assert "unknown setting pool.max_thread" in proc.stderr


def test_address_in_use_is_reported() -> None:
    """A port already taken gives a one-line error and status 1."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = run_cli("echo", "--bind", f"127.0.0.1:{taken.getsockname()[1]}")
    assert proc.returncode == 1
    assert "cannot listen on" in proc.stderr
    assert "Address already in use" in proc.stderr


def test_every_knob_has_a_flag_in_help() -> None:
    """The command line's flags are generated from the knob declarations."""
    text = subprocess.run(
        [sys.executable, "-m", "servekit", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    ).stdout
    for knob in cli_knobs().values():
        assert knob.cli_flag in text, knob.name


def _notify_socket(directory: str) -> tuple[socket.socket, str]:
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)
    return sock, path


@pytest.mark.parametrize("workers", ["1", "2"])
def test_systemd_ready_watchdog_stopping(workers: str) -> None:
    """Under systemd (NOTIFY_SOCKET, WATCHDOG_USEC) the server sends READY=1, watchdog pings, and STOPPING=1 on SIGTERM."""
    with tempfile.TemporaryDirectory() as directory:
        notify, path = _notify_socket(directory)
        with (
            notify,
            ServerProcess.cli(
                "echo",
                "--bind",
                "127.0.0.1:0",
                "--workers",
                workers,
                env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"},
            ) as server,
        ):
            messages = [notify.recv(4096).decode()]
            while not any("READY=1" in m for m in messages):
                messages.append(notify.recv(4096).decode())
            pings = 0
            while pings < 3:  # 0.4 s interval: a ping at least every 0.2 s
                if "WATCHDOG=1" in notify.recv(4096).decode():
                    pings += 1
            server.wait_ready()
            server.send(signal.SIGTERM)
            seen = ""
            while "STOPPING=1" not in seen:
                seen = notify.recv(4096).decode()
            assert server.wait() == 0
