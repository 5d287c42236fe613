"""The pipeline as a user meets it: the real `servekit` command, idle clients, signals."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

from tests.integration.procs import ServerProcess


def test_ctrl_c_with_an_idle_client_exits_at_once() -> None:
    """Ctrl-C (SIGINT) on `servekit echo` with one idle client and one parked client exits 0 in under 1 s."""
    with ServerProcess.cli("echo", "--bind", "127.0.0.1:0") as server:
        server.wait_ready()
        with server.connect() as parked, server.connect() as idle, parked.makefile("rb") as reader:
            parked.sendall(b"hello\n")
            assert reader.readline() == b"hello\n"
            started = time.monotonic()
            server.send(signal.SIGINT)
            assert server.wait(timeout=10) == 0
            assert time.monotonic() - started < 1.0
            assert idle.recv(1) == b""


def test_sigterm_with_hung_handlers_ends_within_the_drain_timeout() -> None:
    """SIGTERM on a single process whose two handlers hang ends, exit status 0, within --drain-timeout plus a second."""
    with ServerProcess.cli(
        "serve", "tests.integration.apps:Slow", "--bind", "127.0.0.1:0", "--drain-timeout", "2"
    ) as server:
        server.wait_ready()
        clients = [server.connect() for _ in range(2)]
        try:
            for sock in clients:
                sock.sendall(b"60\n")
                assert sock.recv(100).startswith(b"started")
            started = time.monotonic()
            server.send(signal.SIGTERM)
            assert server.wait(timeout=10) == 0
            took = time.monotonic() - started
        finally:
            for sock in clients:
                sock.close()
    assert 1.5 < took < 3.0, took
    assert server.count("still running after drain_timeout=2") == 1


def test_echo_on_a_unix_socket(tmp_path: Path) -> None:
    """`servekit echo --bind unix:PATH` echoes (the TCP-only options are not applied to it)."""
    path = tmp_path / "echo.sock"
    with ServerProcess.cli("echo", "--bind", f"unix:{path}") as server:
        server.wait_for("servekit: ready")
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(path))
            for line in (b"one\n", b"two\n"):
                sock.sendall(line)
                assert sock.recv(100) == line
        server.send(signal.SIGTERM)
        assert server.wait(timeout=10) == 0
    assert "Traceback" not in "\n".join(server.lines)


def test_http_server_handler_on_a_unix_socket(tmp_path: Path) -> None:
    """`servekit serve` with an unmodified SimpleHTTPRequestHandler on a Unix socket answers 200 and logs the peer as "unix:" (http.server's address_string() reads client_address[0], which fails on a Unix peer)."""
    path = tmp_path / "http.sock"
    with ServerProcess.cli(
        "serve", "http.server:SimpleHTTPRequestHandler", "--bind", f"unix:{path}"
    ) as server:
        server.wait_for("servekit: ready")
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(path))
            sock.sendall(b"GET /README.md HTTP/1.0\r\n\r\n")
            response = b""
            for _ in range(1000):  # bounded; HTTP/1.0: the server closes when done
                chunk = sock.recv(65536)
                if not chunk:
                    break
                response += chunk
        assert response.startswith(b"HTTP/1.0 200 OK\r\n"), response[:200]
        assert b"servekit" in response
        server.wait_for(r'unix: - - \[.*\] "GET /README.md HTTP/1.0" 200')
        server.send(signal.SIGTERM)
        assert server.wait(timeout=10) == 0
    assert "Traceback" not in "\n".join(server.lines)


def test_prefork_reuse_port_listeners_keep_tcp_nodelay() -> None:
    """Pre-fork with --reuse-port: each worker's own listener comes from the listener code, so accepted connections have TCP_NODELAY."""
    with ServerProcess.cli(
        "serve",
        "tests.integration.pipeline_apps:NoDelay",
        "--bind",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--reuse-port",
    ) as server:
        server.wait_ready()
        for _ in range(4):
            assert server.request(b"?\n") == b"nodelay 1\n"
        server.send(signal.SIGTERM)
        assert server.wait(timeout=15) == 0
        server.assert_no_leftovers()
