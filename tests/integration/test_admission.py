"""Shutting the kernel's door on a listener that stays open: what is queued stays, nothing new gets in."""

from __future__ import annotations

import socket

import pytest

from servekit.features.admission import refuse_new_connections
from servekit.testing import LOCALHOST

pytestmark = pytest.mark.timeout(30)


def test_queued_connections_stay_and_new_ones_are_dropped() -> None:
    """After refuse_new_connections() a connection already queued is still accepted and readable, an accepted one keeps working, a new attempt gets no answer, and once the listener closes it is refused."""
    with socket.socket() as listener:
        listener.bind((LOCALHOST, 0))
        listener.listen(16)
        address = listener.getsockname()
        early = socket.create_connection(address, timeout=5)
        accepted, _ = listener.accept()
        queued = socket.create_connection(address, timeout=5)
        queued.sendall(b"queued")
        try:
            assert refuse_new_connections(listener)
            early.sendall(b"early")
            assert accepted.recv(10) == b"early"
            with socket.socket() as late:
                late.settimeout(0.3)
                with pytest.raises(TimeoutError):
                    late.connect(address)  # the SYN was dropped: no answer at all
            listener.settimeout(5)
            taken, _ = listener.accept()
            with taken:
                assert taken.recv(10) == b"queued"
            listener.setblocking(False)
            with pytest.raises(BlockingIOError):
                listener.accept()
        finally:
            for sock in (early, accepted, queued):
                sock.close()
    with socket.socket() as after:
        after.settimeout(5)
        with pytest.raises(ConnectionRefusedError):
            after.connect(address)


def test_only_tcp_listeners() -> None:
    """Unix and datagram sockets are left alone (False): the kernel does not filter their connects."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix:
        assert not refuse_new_connections(unix)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        assert not refuse_new_connections(udp)
