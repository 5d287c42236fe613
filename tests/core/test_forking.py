"""ForkingMixIn: a process per request, reaping only our own children."""

from __future__ import annotations

import os
import threading

import pytest

import servekit
from servekit.testing import LOCALHOST, connect, serving

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


class LineEcho(servekit.StreamRequestHandler):
    def handle(self) -> None:
        self.wfile.write(self.rfile.readline())


def test_forking_round_trip_and_children_reaped() -> None:
    """Each request runs in a child process; server_close() leaves no child behind."""
    with (
        servekit.ForkingTCPServer((LOCALHOST, 0), LineEcho) as server,
        serving(server, poll_interval=0.05),
    ):
        for i in range(5):
            with connect(server.server_address) as sock, sock.makefile("rb") as reader:
                sock.sendall(b"%d\n" % i)
                assert reader.readline() == b"%d\n" % i
    assert not server.active_children


def test_max_children_wait_does_not_reap_foreign_child() -> None:
    """At max_children the server waits for its own child only; an application's child keeps its exit status (the stdlib's waitpid(-1) can steal it)."""
    read_end, write_end = os.pipe()
    foreign = os.fork()
    if foreign == 0:
        os.read(read_end, 1)  # a byte, not EOF: server children inherit the pipe too
        os._exit(72)
    os.close(read_end)

    class Capped(servekit.ForkingTCPServer):
        max_children = 1

    first = None
    try:
        with Capped((LOCALHOST, 0), LineEcho) as server, serving(server, poll_interval=0.01):
            first = connect(server.server_address)  # its child blocks in readline()
            # Let the foreign child exit and wait until it is a zombie, without reaping it.
            os.write(write_end, b"x")
            os.waitid(os.P_PID, foreign, os.WEXITED | os.WNOWAIT)
            # The server is at max_children: its loop now waits for a child to exit.
            with first.makefile("rb") as reader:
                first.sendall(b"done\n")
                assert reader.readline() == b"done\n"
            first.close()
            with connect(server.server_address) as second, second.makefile("rb") as reader:
                second.sendall(b"next\n")
                assert reader.readline() == b"next\n"
        pid, status = os.waitpid(foreign, 0)
        assert pid == foreign
        assert os.waitstatus_to_exitcode(status) == 72
    finally:
        if first is not None:
            first.close()
        os.close(write_end)
        try:
            os.kill(foreign, 9)
            os.waitpid(foreign, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def test_shutdown_at_max_children_does_not_wait_for_a_long_request() -> None:
    """shutdown() while the loop waits at max_children returns at once instead of waiting for a child (the stdlib blocks)."""

    class Capped(servekit.ForkingTCPServer):
        max_children = 1
        block_on_close = False

    server = Capped((LOCALHOST, 0), LineEcho)
    client = None
    try:
        with serving(server, poll_interval=0.01):
            client = connect(server.server_address)  # its child waits in readline()
            for _ in range(500):  # bounded readiness poll: the child has been forked
                if server.active_children:
                    break
                threading.Event().wait(0.01)
            assert server.active_children
        # serving() returned: shutdown() was not stuck behind the child.
    finally:
        if client is not None:
            # A line, not EOF: the forked child holds a copy of this client socket.
            client.sendall(b"bye\n")
            client.close()
        server.collect_children(blocking=True)
    assert not server.active_children
