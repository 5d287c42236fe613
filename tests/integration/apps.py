"""Handlers and server scripts that the process-level tests run in subprocesses.

As a module: handler classes for `servekit serve tests.integration.apps:NAME`.
As a script: `python -m tests.integration.apps MODE PORT` runs a prefork server
configured for one fault scenario and prints `servekit: ready: ... :PORT` like the CLI.
"""

from __future__ import annotations

import http.server
import os
import socket
import sys
import time

import servekit
from servekit.features.pool import ThreadPoolMixIn
from servekit.process.prefork import PreforkMixIn
from servekit.testing import read_until


class PathPage(http.server.BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive: answer every GET with 200 and the request's path as the body,
    without logging (so wait_for_request="auto" waits for a whole head)."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = self.path.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class Upload(http.server.BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive: PUT echoes its body; GET and HEAD answer "hello"."""

    protocol_version = "HTTP/1.1"

    def do_PUT(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "5")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(b"hello")

    do_HEAD = do_GET

    def log_message(self, format: str, *args: object) -> None:
        pass


def check_upload_conversation(client: socket.socket) -> None:
    """GET, HEAD and a PUT with "Expect: 100-continue" on one keep-alive connection to
    Upload: the 100 Continue must reach the client before the server waits for the body
    (with held heads, a read sends a held head), and every answer is whole, in order."""
    client.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    assert read_until(client, b"hello").startswith(b"HTTP/1.1 200 OK\r\n")
    client.sendall(b"HEAD / HTTP/1.1\r\nHost: t\r\n\r\n")
    head = read_until(client, b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"Content-Length: 5" in head
    client.sendall(
        b"PUT /x HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
    )
    assert read_until(client, b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
    client.sendall(b"data")
    answer = read_until(client, b"data")
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\ndata")


class PidEcho(servekit.StreamRequestHandler):
    """Answer each line with "<worker pid> <line>"."""

    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(b"%d %s" % (os.getpid(), line))


class Slow(servekit.StreamRequestHandler):
    """Say "started <pid>" at once, then "done <pid>" after the number of seconds asked."""

    def handle(self) -> None:
        line = self.rfile.readline()
        if not line:
            return
        self.wfile.write(b"started %d\n" % os.getpid())
        time.sleep(float(line))  # the simulated work of the request
        self.wfile.write(b"done %d\n" % os.getpid())


class Server(PreforkMixIn, ThreadPoolMixIn, servekit.TCPServer):
    def on_workers_ready(self) -> None:
        print(f"servekit: ready: test on tcp://127.0.0.1:{self.server_address[1]}", flush=True)


class CrashingServer(Server):
    """Every worker dies right after starting: a crash loop."""

    def worker_init(self) -> None:
        os._exit(1)


class FailingBootServer(Server):
    """Every worker fails its initialisation: a boot error."""

    def worker_init(self) -> None:
        raise RuntimeError("cannot boot: missing configuration")


class NoPoolServer(PreforkMixIn, servekit.TCPServer):
    """Handlers run on the worker's loop thread, so a slow handler stalls heartbeats."""

    def on_workers_ready(self) -> None:
        print(f"servekit: ready: test on tcp://127.0.0.1:{self.server_address[1]}", flush=True)


def main(argv: list[str]) -> int:
    import logging

    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="[%(process)d] %(name)s: %(message)s"
    )
    mode = argv[0]
    if mode == "crash":
        server: servekit.TCPServer = CrashingServer(("127.0.0.1", 0), PidEcho, workers=1)
    elif mode == "bootfail":
        server = FailingBootServer(("127.0.0.1", 0), PidEcho, workers=1)
    elif mode == "stuck":
        server = NoPoolServer(("127.0.0.1", 0), Slow, workers=1, worker_timeout=1.0)
    elif mode == "api":
        # The Python API: serve_forever() in a thread, shutdown() from the main thread.
        import threading

        server = Server(("127.0.0.1", 0), PidEcho, workers=2, max_threads=4)
        thread = threading.Thread(target=server.serve_forever)
        thread.start()
        line = sys.stdin.readline()  # the test says when to stop
        assert line.strip() == "stop", line
        server.shutdown()
        thread.join()
        server.server_close()
        print("servekit: api stopped", flush=True)
        return 0
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    with server:
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


class AcceptBatch(servekit.StreamRequestHandler):
    """Answer each line with "<worker pid> <the server's accept_batch>"."""

    def handle(self) -> None:
        for _line in self.rfile:
            self.wfile.write(b"%d %d\n" % (os.getpid(), self.server.accept_batch))
