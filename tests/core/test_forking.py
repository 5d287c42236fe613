"""ForkingMixIn: a process per request, reaping only our own children."""

from __future__ import annotations

import os

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
        os.close(write_end)
        os.read(read_end, 1)
        os._exit(72)
    os.close(read_end)

    class Capped(servekit.ForkingTCPServer):
        max_children = 1

    try:
        with Capped((LOCALHOST, 0), LineEcho) as server, serving(server, poll_interval=0.01):
            first = connect(server.server_address)  # its child blocks in readline()
            # Let the foreign child exit and wait until it is a zombie, without reaping it.
            os.close(write_end)
            os.waitid(os.P_PID, foreign, os.WEXITED | os.WNOWAIT)
            # The server is at max_children: its loop now waits for a child to exit.
            assert server.active_children and len(server.active_children) == 1
            with first, first.makefile("rb") as reader:
                first.sendall(b"done\n")
                assert reader.readline() == b"done\n"
            with connect(server.server_address) as second, second.makefile("rb") as reader:
                second.sendall(b"next\n")
                assert reader.readline() == b"next\n"
        pid, status = os.waitpid(foreign, 0)
        assert pid == foreign
        assert os.waitstatus_to_exitcode(status) == 72
    finally:
        try:
            os.kill(foreign, 9)
            os.waitpid(foreign, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
