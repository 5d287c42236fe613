"""TLSMixIn against the real ``openssl s_client``: handshake and echo, mutual TLS, refusal."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
from typing import TYPE_CHECKING, Any

import pytest

import servekit
from servekit.features.tls import TLSMixIn, tls_info
from servekit.testing import LOCALHOST, serving

if TYPE_CHECKING:
    from tests.tls_certs import CertSet, LogWatcher

OPENSSL = shutil.which("openssl")

pytestmark = [
    pytest.mark.realprogram,
    pytest.mark.skipif(
        OPENSSL is None, reason="needs the openssl command (Debian: apt install openssl)"
    ),
]

# s_client finishes in milliseconds; this only bounds a hang.
S_CLIENT_TIMEOUT = 15.0


class Reply(servekit.StreamRequestHandler):
    """Answers one line with the line and the client certificate's common name."""

    def handle(self) -> None:
        self.server.handler_ran.set()
        line = self.rfile.readline().rstrip(b"\n")
        info = tls_info(self)
        name = info.peer_subject.get("commonName", "-") if info else "?"
        self.wfile.write(b"%s %s\n" % (line, name.encode()))


class Server(TLSMixIn, servekit.ThreadingMixIn, servekit.TCPServer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.handler_ran = threading.Event()
        super().__init__(*args, **kwargs)


def s_client(
    port: int, certs: CertSet, *options: str, line: bytes = b"hello\n"
) -> tuple[int, bytes, bytes]:
    """Run s_client against 127.0.0.1:port, verifying the server as a strict client would.

    -quiet implies -ign_eof: s_client sends the line and exits only when the server
    closes, so the exit marks the end of the server's answer.
    """
    assert OPENSSL is not None
    command = [
        OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", "-quiet",
        "-CAfile", str(certs.ca), "-verify_return_error", "-verify_ip", "127.0.0.1",
        *options,
    ]  # fmt: skip
    proc = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        out, err = proc.communicate(line, timeout=S_CLIENT_TIMEOUT)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=S_CLIENT_TIMEOUT)
    return proc.returncode, out, err


def server_keys(certs: CertSet, **knobs: Any) -> dict[str, Any]:
    return {"certfile": str(certs.server.cert), "keyfile": str(certs.server.key), **knobs}


@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
def test_s_client_handshake_and_echo(tls_certs: CertSet, version: str) -> None:
    """s_client verifies our chain and address, and a line it sends comes back, over TLS 1.2 and
    1.3."""
    with Server((LOCALHOST, 0), Reply, **server_keys(tls_certs)) as server, serving(server):
        code, out, err = s_client(server.server_address[1], tls_certs, version)
    assert (code, out) == (0, b"hello -\n"), err.decode(errors="replace")
    assert b"verify return:1" in err


def test_s_client_mutual_tls(tls_certs: CertSet) -> None:
    """s_client presenting a client certificate with -cert/-key is identified by the handler."""
    knobs = server_keys(tls_certs, client_ca=str(tls_certs.ca))
    identity = ("-cert", str(tls_certs.client.cert), "-key", str(tls_certs.client.key))
    with Server((LOCALHOST, 0), Reply, **knobs) as server, serving(server):
        code, out, err = s_client(server.server_address[1], tls_certs, *identity)
    assert (code, out) == (0, b"hello client-1\n"), err.decode(errors="replace")


def test_s_client_without_certificate_is_refused(tls_certs: CertSet, tls_log: LogWatcher) -> None:
    """A server that requires client certificates refuses s_client without one, and the handler
    never runs."""
    knobs = server_keys(tls_certs, client_ca=str(tls_certs.ca))
    with Server((LOCALHOST, 0), Reply, **knobs) as server, serving(server):
        code, out, err = s_client(server.server_address[1], tls_certs)
        tls_log.wait_for("client sent no certificate and one is required")
    assert code != 0
    assert out == b""
    assert b"certificate required" in err  # TLS 1.3 alert 116, as s_client reports it
    assert not server.handler_ran.is_set()
