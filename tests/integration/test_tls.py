"""TLSMixIn: TLS over any stream server, the handshake in the worker, failures the peer's."""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import shutil
import socket
import ssl
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

import servekit
from servekit.features.tls import (
    TLSConfigError,
    TLSInfo,
    TLSMixIn,
    describe_handshake_error,
    peer_certificate,
    tls_info,
)
from servekit.knobs import SettingError
from servekit.testing import (
    LOCALHOST,
    closed_by_peer,
    connect,
    dripping,
    exchange_line,
    read_until,
    serving,
    wait_until,
)
from tests.integration.apps import PathPage, Upload, check_upload_conversation

if TYPE_CHECKING:
    from tests.tls_certs import CertSet, LogWatcher

# Bounds every client-side wait; the server answers in milliseconds.
CLIENT_TIMEOUT = 5.0


class Echo(servekit.StreamRequestHandler):
    """Reports its connection's TLS details, then echoes lines until the client stops."""

    def handle(self) -> None:
        self.server.handled.put(tls_info(self))
        for line in self.rfile:
            self.wfile.write(line)


class OneLine(servekit.StreamRequestHandler):
    """Answers one line with the line and the client certificate's common name."""

    def handle(self) -> None:
        self.server.handled.put(tls_info(self))
        line = self.rfile.readline().rstrip(b"\n")
        cert = peer_certificate(self)
        info = tls_info(self.request)
        name = info.peer_subject.get("commonName", "-") if info else "?"
        self.wfile.write(b"%s %s %s\n" % (line, name.encode(), b"cert" if cert else b"nocert"))


class Failing(servekit.StreamRequestHandler):
    def handle(self) -> None:
        self.server.handled.put(tls_info(self))
        raise RuntimeError("handler bug")


class Recording:
    """Test servers record handler errors and handler runs instead of printing them."""

    handler_errors: list[BaseException | None]
    handled: queue.Queue[TLSInfo | None]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.handler_errors = []
        self.handled = queue.Queue()
        super().__init__(*args, **kwargs)

    def handle_error(self, request: Any, client_address: Any) -> None:
        self.handler_errors.append(sys.exc_info()[1])


class ThreadingTLSServer(Recording, TLSMixIn, servekit.ThreadingMixIn, servekit.TCPServer):
    pass


class ForkingTLSServer(Recording, TLSMixIn, servekit.ForkingMixIn, servekit.TCPServer):
    pass


@contextlib.contextmanager
def running(
    certs: CertSet,
    handler: type[servekit.BaseRequestHandler] = Echo,
    server_class: type[Any] = ThreadingTLSServer,
    **knobs: Any,
) -> Iterator[Any]:
    if "ssl_context" not in knobs:
        knobs.setdefault("certfile", str(certs.server.cert))
        knobs.setdefault("keyfile", str(certs.server.key))
    with server_class((LOCALHOST, 0), handler, **knobs) as server, serving(server):
        yield server


def tls_connect(
    address: Any, context: ssl.SSLContext, *, ragged_eofs: bool = True
) -> ssl.SSLSocket:
    return context.wrap_socket(
        connect(address, CLIENT_TIMEOUT),
        server_hostname="localhost",
        suppress_ragged_eofs=ragged_eofs,
    )


def common_name(cert: dict[str, Any] | None) -> str:
    assert cert is not None
    return str(dict(rdn[0] for rdn in cert["subject"])["commonName"])


def read_to_eof(sock: socket.socket) -> bytes | None:
    """Everything until EOF; None if the connection was reset or aborted by an alert."""
    received = b""
    try:
        while chunk := sock.recv(4096):
            received += chunk
    except (ssl.SSLError, ConnectionError):
        return None
    return received


# -- serving -----------------------------------------------------------------------------


def test_round_trip_ends_with_close_notify(tls_certs: CertSet) -> None:
    """A line goes through the handler's rfile and wfile over TLS, and the server ends with
    close_notify, so the client sees a clean EOF rather than a truncation."""
    with (
        running(tls_certs, OneLine) as server,
        tls_connect(server.server_address, tls_certs.client_context(), ragged_eofs=False) as sock,
    ):
        assert exchange_line(sock, b"hello\n") == b"hello - nocert\n"
        # Without close_notify this recv() raises SSLEOFError (suppress_ragged_eofs=False).
        assert sock.recv(1) == b""
        info = server.handled.get(timeout=CLIENT_TIMEOUT)
    assert info is not None
    assert info.version in ("TLSv1.2", "TLSv1.3")
    assert info.cipher
    assert server.handler_errors == []


def test_forking_server_round_trip(tls_certs: CertSet) -> None:
    """Composed with ForkingMixIn, the handshake and the handler run in the child process."""
    if not hasattr(os, "fork"):
        pytest.skip("needs os.fork")
    with (
        # One line, not until EOF: the child inherits this process's copy of the client
        # socket, so it would never see our close.
        running(tls_certs, OneLine, ForkingTLSServer) as server,
        tls_connect(server.server_address, tls_certs.client_context(), ragged_eofs=False) as sock,
    ):
        assert exchange_line(sock, b"forked\n") == b"forked - nocert\n"
        assert sock.recv(1) == b""  # close_notify from the child


def test_thread_pool_server(tls_certs: CertSet) -> None:
    """TLS composes with ThreadPoolMixIn, whose settings are keywords beside TLS's."""
    from servekit.features.pool import ThreadPoolMixIn

    class PoolTLSServer(Recording, TLSMixIn, ThreadPoolMixIn, servekit.TCPServer):
        pass

    with (
        running(tls_certs, Echo, PoolTLSServer, max_threads=2) as server,
        tls_connect(server.server_address, tls_certs.client_context()) as sock,
    ):
        assert server.max_threads == 2
        assert exchange_line(sock, b"pooled\n") == b"pooled\n"


def test_unix_stream_server(tls_certs: CertSet, tmp_path: Path) -> None:
    """TLS composes with a Unix-domain stream server as with TCP."""

    class UnixTLSServer(Recording, TLSMixIn, servekit.ThreadingMixIn, servekit.UnixStreamServer):
        pass

    path = str(tmp_path / "tls.sock")
    keys = {"certfile": str(tls_certs.server.cert), "keyfile": str(tls_certs.server.key)}
    with (
        UnixTLSServer(path, Echo, **keys) as server,
        serving(server),
        tls_connect(path, tls_certs.client_context()) as sock,
    ):
        assert exchange_line(sock, b"over unix\n") == b"over unix\n"


def test_handler_error_goes_to_handle_error(tls_certs: CertSet, tls_log: LogWatcher) -> None:
    """An exception in the handler after a good handshake is the server's to report (handle_error),
    not a TLS failure."""
    with (
        running(tls_certs, Failing) as server,
        tls_connect(server.server_address, tls_certs.client_context()) as sock,
    ):
        assert read_to_eof(sock) == b""
        server.handled.get(timeout=CLIENT_TIMEOUT)
    # serving() has joined the request thread, so handle_error() has run.
    assert [type(e) for e in server.handler_errors] == [RuntimeError]
    assert tls_log.messages() == []


def test_alpn_protocol_is_negotiated(tls_certs: CertSet) -> None:
    """alpn_protocols offers protocols by name, and the handler sees the one chosen."""
    context = tls_certs.client_context()
    context.set_alpn_protocols(["http/1.1"])
    with (
        running(tls_certs, alpn_protocols=("h2", "http/1.1")) as server,
        tls_connect(server.server_address, context) as sock,
    ):
        assert exchange_line(sock, b"x\n") == b"x\n"
        info = server.handled.get(timeout=CLIENT_TIMEOUT)
    assert info is not None and info.alpn_protocol == "http/1.1"


# -- mutual TLS --------------------------------------------------------------------------


def test_handler_sees_client_certificate(tls_certs: CertSet) -> None:
    """With client_ca set, the handler sees the verified client certificate's subject."""
    context = tls_certs.client_context(tls_certs.client)
    with (
        running(tls_certs, OneLine, client_ca=str(tls_certs.ca)) as server,
        tls_connect(server.server_address, context) as sock,
    ):
        assert exchange_line(sock, b"who\n") == b"who client-1 cert\n"
        info = server.handled.get(timeout=CLIENT_TIMEOUT)
    assert info is not None
    assert info.peer_subject == {"commonName": "client-1"}
    assert info.peer_certificate_der is not None


def test_client_without_certificate_is_refused(tls_certs: CertSet, tls_log: LogWatcher) -> None:
    """When a client certificate is required, a client without one is closed and logged, and neither
    the handler nor handle_error runs."""
    context = tls_certs.client_context()
    with running(tls_certs, OneLine, client_ca=str(tls_certs.ca)) as server:
        with connect(server.server_address, CLIENT_TIMEOUT) as raw:
            port = raw.getsockname()[1]
            # A TLS 1.3 client finishes its side first and hears the refusal on first read.
            with (
                contextlib.suppress(ssl.SSLError, ConnectionError),
                context.wrap_socket(raw, server_hostname="localhost") as sock,
            ):
                assert not read_to_eof(sock)
        record = tls_log.wait_for("client sent no certificate and one is required")
    assert record.levelno == logging.INFO
    assert record.getMessage().startswith(f"TLS handshake with 127.0.0.1:{port} failed")
    assert server.handled.empty()
    assert server.handler_errors == []


def test_untrusted_client_certificate_is_refused(tls_certs: CertSet, tls_log: LogWatcher) -> None:
    """A client certificate from a CA not in client_ca is refused with the verification reason."""
    context = tls_certs.client_context(tls_certs.stranger)
    with running(tls_certs, OneLine, client_ca=str(tls_certs.ca)) as server:
        with (
            contextlib.suppress(ssl.SSLError, ConnectionError),
            tls_connect(server.server_address, context) as sock,
        ):
            assert not read_to_eof(sock)
        tls_log.wait_for("client certificate rejected: unable to get local issuer certificate")
    assert server.handled.empty()
    assert server.handler_errors == []


def test_optional_client_certificate(tls_certs: CertSet) -> None:
    """With require_client_cert=False, clients with and without a certificate are both served."""
    with running(
        tls_certs, OneLine, client_ca=str(tls_certs.ca), require_client_cert=False
    ) as server:
        with tls_connect(server.server_address, tls_certs.client_context()) as sock:
            assert exchange_line(sock, b"a\n") == b"a - nocert\n"
        identified = tls_certs.client_context(tls_certs.client)
        with tls_connect(server.server_address, identified) as sock:
            assert exchange_line(sock, b"b\n") == b"b client-1 cert\n"


# -- failed handshakes -------------------------------------------------------------------


def test_stalled_client_does_not_block_others_and_is_cut_off(
    tls_certs: CertSet, tls_log: LogWatcher
) -> None:
    """A client that connects and sends nothing does not delay another client, and is closed after
    handshake_timeout."""
    timeout = 0.5
    with running(tls_certs, handshake_timeout=timeout) as server:
        with connect(server.server_address, CLIENT_TIMEOUT) as stalled:
            started = time.monotonic()
            with tls_connect(server.server_address, tls_certs.client_context()) as other:
                assert exchange_line(other, b"not blocked\n") == b"not blocked\n"
            assert not closed_by_peer(stalled, 0), "served the other client only after the stall"
            assert closed_by_peer(stalled, CLIENT_TIMEOUT)
            waited = time.monotonic() - started
        record = tls_log.wait_for("handshake not completed within 0.5s")
    # The server's clock starts after our connect(), so it cannot have cut us off sooner.
    assert timeout * 0.9 <= waited < CLIENT_TIMEOUT
    assert record.getMessage().startswith("TLS handshake with 127.0.0.1:")
    assert server.handled.qsize() == 1  # the other client only
    assert server.handler_errors == []


def test_plaintext_http_gets_400_and_is_logged(
    tls_certs: CertSet, caplog: pytest.LogCaptureFixture, tls_log: LogWatcher
) -> None:
    """A plaintext HTTP request on the TLS port gets a 400 that says to use https, and the log names
    the client and the reason."""
    caplog.set_level(logging.INFO, logger="servekit.tls")
    with running(tls_certs) as server, connect(server.server_address, CLIENT_TIMEOUT) as sock:
        port = sock.getsockname()[1]
        sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        response = read_to_eof(sock)
        tls_log.wait_for("plaintext HTTP request")
    assert response is not None
    assert response.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert response.endswith(b"This port expects TLS: retry with https://\n")
    [record] = [r for r in caplog.records if r.name == "servekit.tls"]
    assert record.levelno == logging.INFO
    assert record.getMessage() == (
        f"TLS handshake with 127.0.0.1:{port} failed: plaintext HTTP request on the TLS port"
    )
    assert server.handled.empty()
    assert server.handler_errors == []


def test_plaintext_clients_that_never_close_hold_no_thread(tls_certs: CertSet) -> None:
    """On a pool server the lingering close after the 400 is the loop's: three plaintext
    clients that send a request and never close, on one thread, get their 400 and do not
    delay a real TLS client (each held the thread for a second before: about 3 s in
    all); the server closes them after the linger."""
    with running(tls_certs, PathPage, _limits_pool_tls(), max_threads=1) as server:
        plain = [connect(server.server_address, CLIENT_TIMEOUT) for _ in range(3)]
        try:
            started = time.monotonic()
            for sock in plain:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            for sock in plain:
                assert read_until(sock, b"https://\n").startswith(b"HTTP/1.1 400")
            with tls_connect(server.server_address, tls_certs.client_context()) as tls:
                tls.sendall(b"GET /real HTTP/1.1\r\nHost: t\r\n\r\n")
                assert read_until(tls, b"\r\n\r\n/real").startswith(b"HTTP/1.1 200")
            assert time.monotonic() - started < 1.5
            for sock in plain:
                assert closed_by_peer(sock, CLIENT_TIMEOUT)
        finally:
            for sock in plain:
                sock.close()


def test_plaintext_other_protocol_is_closed(tls_certs: CertSet, tls_log: LogWatcher) -> None:
    """A client speaking another protocol is closed without a reply, and the log says it did not
    start TLS."""
    with (
        running(tls_certs, plaintext_http_reply=False) as server,
        connect(server.server_address, CLIENT_TIMEOUT) as sock,
    ):
        sock.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
        assert not read_to_eof(sock)  # EOF or reset, never data
        tls_log.wait_for("client did not start a TLS handshake (plaintext or another protocol)")
    assert server.handled.empty()
    assert server.handler_errors == []


def test_client_that_resets_at_once(tls_certs: CertSet, tls_log: LogWatcher) -> None:
    """A client that connects and resets (a port scan) is logged as the peer's doing, not as a
    server error."""
    with running(tls_certs) as server:
        sock = connect(server.server_address, CLIENT_TIMEOUT)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # linger 0: RST instead of FIN
        record = tls_log.wait_for("TLS handshake with 127.0.0.1:")
    assert "client disconnected before the handshake" in record.getMessage() or (
        "client reset the connection" in record.getMessage()
    )
    assert server.handled.empty()
    assert server.handler_errors == []


def test_client_rejecting_our_certificate_is_a_warning(
    tls_certs: CertSet, tls_log: LogWatcher
) -> None:
    """A client that does not trust the server certificate is logged as a warning, since it usually
    means our certificate is wrong."""
    distrustful = ssl.create_default_context(cafile=str(tls_certs.client.cert))
    with running(tls_certs) as server:
        with pytest.raises(ssl.SSLCertVerificationError):
            tls_connect(server.server_address, distrustful)
        record = tls_log.wait_for("client rejected the server certificate")
    assert record.levelno == logging.WARNING
    assert "unknown ca" in record.getMessage()


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        ("HTTP_REQUEST", "plaintext HTTP request on the TLS port"),
        ("HTTPS_PROXY_REQUEST", "plaintext HTTP CONNECT (proxy) request on the TLS port"),
        ("WRONG_VERSION_NUMBER", "client did not start a TLS handshake"),
        ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "client sent no certificate and one is required"),
        ("UNSUPPORTED_PROTOCOL", "no TLS version in common (unsupported_protocol)"),
        ("NO_SHARED_CIPHER", "no cipher suite in common"),
        ("TLSV1_ALERT_UNKNOWN_CA", "client rejected the server certificate (unknown ca)"),
        ("SSLV3_ALERT_CERTIFICATE_EXPIRED", "client rejected the server certificate"),
        ("TLSV1_ALERT_INTERNAL_ERROR", "client aborted the handshake (alert: internal error)"),
        ("SOMETHING_NEW", "handshake failed: SOMETHING_NEW"),
    ],
)
def test_handshake_error_reasons(reason: str, expected: str) -> None:
    """Each OpenSSL reason maps to a one-line explanation; only rejections of our certificate are
    warnings."""
    exc = ssl.SSLError(1, f"[SSL: {reason}] ...")
    exc.reason = reason
    level, text = describe_handshake_error(exc)
    assert text.startswith(expected)
    assert level == (logging.WARNING if "rejected the server" in expected else logging.INFO)


def test_other_handshake_error_reasons() -> None:
    """Timeouts, EOFs and resets are described by what the client did."""
    assert describe_handshake_error(TimeoutError(), timeout=2.5) == (
        logging.INFO,
        "handshake not completed within 2.5s",
    )
    eof = ssl.SSLEOFError(8, "EOF occurred in violation of protocol")
    assert describe_handshake_error(eof)[1] == "client closed the connection during the handshake"
    reset = ConnectionResetError(104, "Connection reset by peer")
    assert describe_handshake_error(reset)[1] == "client reset the connection during the handshake"


# -- reloading ---------------------------------------------------------------------------


@pytest.fixture
def rotating_files(tls_certs: CertSet, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of server-1's certificate and key that a test may overwrite."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    shutil.copyfile(tls_certs.server.cert, cert)
    shutil.copyfile(tls_certs.server.key, key)
    return cert, key


def install(source: Path, target: Path) -> None:
    """Replace target atomically, as a deployment tool would."""
    staging = target.with_suffix(".new")
    shutil.copyfile(source, staging)
    os.replace(staging, target)


def test_reload_rotates_certificate_for_new_connections(
    tls_certs: CertSet, rotating_files: tuple[Path, Path], tls_log: LogWatcher
) -> None:
    """After reload_tls() a new connection gets the new certificate, while one already open keeps
    working."""
    cert, key = rotating_files
    context = tls_certs.client_context()
    with (
        running(tls_certs, certfile=str(cert), keyfile=str(key)) as server,
        tls_connect(server.server_address, context) as before,
    ):
        assert exchange_line(before, b"one\n") == b"one\n"
        assert common_name(before.getpeercert()) == "server-1"
        old = server.tls_context
        install(tls_certs.server2.cert, cert)
        install(tls_certs.server2.key, key)
        assert server.reload_tls() is server.tls_context is not old
        with tls_connect(server.server_address, context) as after:
            assert common_name(after.getpeercert()) == "server-2"
            assert exchange_line(after, b"two\n") == b"two\n"
        assert exchange_line(before, b"still here\n") == b"still here\n"
    tls_log.wait_for(f"TLS context reloaded from certfile={str(cert)!r}")


def test_failed_reload_keeps_old_context(
    tls_certs: CertSet, rotating_files: tuple[Path, Path]
) -> None:
    """A reload whose files cannot be loaded raises an error naming the file and the problem, and
    the server keeps its certificate."""
    cert, key = rotating_files
    with running(tls_certs, certfile=str(cert), keyfile=str(key)) as server:
        old = server.tls_context
        cert.write_text("not a certificate\n")
        with pytest.raises(TLSConfigError, match=r"cannot load certfile=.*cert\.pem.*PEM"):
            server.reload_tls()
        # Half a rotation: the new certificate with the old key.
        install(tls_certs.server2.cert, cert)
        with pytest.raises(TLSConfigError, match="private key does not belong to the certificate"):
            server.reload_tls()
        assert server.tls_context is old
        with tls_connect(server.server_address, tls_certs.client_context()) as sock:
            assert common_name(sock.getpeercert()) == "server-1"
            assert exchange_line(sock, b"ok\n") == b"ok\n"


def test_reload_with_a_given_context(tls_certs: CertSet) -> None:
    """A server built from ssl_context reloads by being handed the next context; without one it says
    so."""
    first = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    first.load_cert_chain(tls_certs.server.cert, tls_certs.server.key)
    second = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    second.load_cert_chain(tls_certs.server2.cert, tls_certs.server2.key)
    with running(tls_certs, ssl_context=first) as server:
        with pytest.raises(TLSConfigError, match="pass the new context instead"):
            server.reload_tls()
        server.reload_tls(second)
        with tls_connect(server.server_address, tls_certs.client_context()) as sock:
            assert common_name(sock.getpeercert()) == "server-2"


# -- configuration -----------------------------------------------------------------------


def test_datagram_server_is_refused() -> None:
    """A datagram server with TLSMixIn fails at construction: DTLS is out of scope."""

    class DatagramTLSServer(TLSMixIn, servekit.ThreadingMixIn, servekit.UDPServer):
        pass

    with pytest.raises(TLSConfigError, match="DTLS is out of scope"):
        DatagramTLSServer((LOCALHOST, 0), servekit.DatagramRequestHandler, certfile="x.pem")


def test_configuration_errors(tls_certs: CertSet, tmp_path: Path) -> None:
    """Missing certificates, conflicting settings and client contexts are refused with a message
    that names the setting."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cases: list[tuple[dict[str, Any], str]] = [
        ({}, "needs a certificate: pass certfile="),
        ({"keyfile": str(tls_certs.server.key)}, "keyfile is set without certfile"),
        ({"certfile": str(tmp_path / "missing.pem")}, "missing.pem'.*No such file"),
        ({"ssl_context": context, "certfile": "x.pem"}, "ssl_context is set, so certfile"),
        ({"ssl_context": ssl.create_default_context()}, "is a client context"),
        ({"handshake_timeout": 0}, "handshake_timeout=0: must be greater than 0"),
        ({"alpn_protocols": "h2"}, "not one string"),
    ]
    for knobs, message in cases:
        with pytest.raises(SettingError, match=message):
            ThreadingTLSServer((LOCALHOST, 0), Echo, **knobs)


def test_failed_construction_closes_the_listener(tmp_path: Path) -> None:
    """When the certificate cannot be loaded, the socket the constructor bound is closed again."""
    before = set(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    if before is None:
        pytest.skip("needs /proc/self/fd")
    with pytest.raises(TLSConfigError):
        ThreadingTLSServer((LOCALHOST, 0), Echo, certfile=str(tmp_path / "missing.pem"))
    assert set(os.listdir("/proc/self/fd")) <= before


# -- the request wait over TLS: decrypted ahead, in the loop ----------------------------------


def _limits_pool_tls() -> type[Any]:
    from servekit.features.limits import LimitsMixIn
    from servekit.features.pool import ThreadPoolMixIn

    class Server(Recording, LimitsMixIn, TLSMixIn, ThreadPoolMixIn, servekit.TCPServer):
        pass

    return Server


def _assert_served_past(server: Any, context: ssl.SSLContext, slow: int) -> None:
    """While `slow` TLS clients trickle their heads: all wait in the loop, no thread is
    busy, a real TLS client gets its page within 1.5 s, three times; then the server
    closes the slow ones at request_timeout (a reset counts as closed too)."""
    assert wait_until(lambda: server.waiting_connections == slow)
    assert wait_until(lambda: server.pool.busy == 0)
    for _ in range(3):
        started = time.monotonic()
        with tls_connect(server.server_address, context) as sock:
            sock.sendall(b"GET /real HTTP/1.1\r\nHost: t\r\n\r\n")
            assert read_until(sock, b"\r\n\r\n/real").startswith(b"HTTP/1.1 200")
        assert time.monotonic() - started < 1.5
    assert wait_until(lambda: server.waiting_connections == 0)


def test_a_head_in_several_records_reaches_the_handler_intact(tls_certs: CertSet) -> None:
    """Over TLS the head is decrypted ahead in the loop: one sent in three records, with a second request pipelined behind it, is handed over whole, and both are answered."""
    with (
        running(tls_certs, PathPage, _limits_pool_tls(), max_threads=2) as server,
        tls_connect(server.server_address, tls_certs.client_context()) as sock,
    ):
        for record in (b"GET /a HTTP/1.1\r\n", b"Host: t\r\n", b"\r\nGET /b HTTP/1.1\r\n\r\n"):
            sock.sendall(record)  # one TLS record each
        answer = read_until(sock, b"\r\n\r\n/b")
        assert answer.count(b"HTTP/1.1 200 OK\r\n") == 2
        assert answer.endswith(b"/b") and b"\r\n\r\n/a" in answer


@pytest.mark.parametrize("handler", ["http.server", "wsgi"])
def test_a_client_that_half_closes_after_its_request_is_answered(
    tls_certs: CertSet, handler: str
) -> None:
    """A TLS client that sends its request and then shuts down its TCP side (no
    close_notify, as some clients do) gets its response, as with the stdlib: reading the
    head ahead must not run into the end of stream, where OpenSSL would fail the
    connection for good. Ten times, since the end may come with the request or after."""
    from servekit.apps.wsgi import handler_for

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]

    handler_class = PathPage if handler == "http.server" else handler_for(app)
    ending = b"/x" if handler == "http.server" else b"ok"
    with running(tls_certs, handler_class, _limits_pool_tls(), max_threads=2) as server:
        for _ in range(10):
            with tls_connect(server.server_address, tls_certs.client_context()) as sock:
                sock.sendall(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n")
                socket.socket.shutdown(sock, socket.SHUT_WR)  # TCP only: no close_notify
                answer = read_until(sock, b"\r\n\r\n" + ending)
                assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(ending)


def test_echo_line_over_tls_in_pieces(tls_certs: CertSet) -> None:
    """The echo handler declares a line wait: over TLS a line sent in two records is echoed whole."""
    from servekit.apps.echo import EchoHandler

    with (
        running(tls_certs, EchoHandler, _limits_pool_tls(), max_threads=2) as server,
        tls_connect(server.server_address, tls_certs.client_context()) as sock,
    ):
        sock.sendall(b"hel")
        sock.sendall(b"lo\n")
        assert sock.recv(100) == b"hello\n"


@pytest.mark.timeout(60)
def test_tls_clients_trickling_their_head_hold_no_thread(tls_certs: CertSet) -> None:
    """20 clients complete the TLS handshake, then trickle a head one byte (one record) every 0.3 s, against an http.server handler on 2 threads: none holds a thread, a real TLS client is answered at once, the slow ones are closed at request_timeout."""
    context = tls_certs.client_context()
    with running(
        tls_certs, PathPage, _limits_pool_tls(), max_threads=2, request_timeout=2.0
    ) as server:
        slow = [tls_connect(server.server_address, context) for _ in range(20)]
        for sock in slow:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n")
        with dripping(slow):
            _assert_served_past(server, context, len(slow))


def test_held_heads_over_tls(tls_certs: CertSet) -> None:
    """Over TLS too, an http.server response's head waits for its body (one record and one send), and a read sends a held head first: GET, HEAD and a PUT with "Expect: 100-continue" on one keep-alive connection."""
    with (
        running(tls_certs, Upload, _limits_pool_tls(), max_threads=2) as server,
        tls_connect(server.server_address, tls_certs.client_context()) as sock,
    ):
        check_upload_conversation(sock)


@pytest.mark.timeout(60)
def test_tls_keep_alive_clients_trickling_their_next_head_hold_no_thread(
    tls_certs: CertSet,
) -> None:
    """10 TLS keep-alive clients send one good request, then trickle the next head: the head wait runs again in the loop (decrypting ahead without waiting, though the parked socket keeps the handler's timeout), so on 2 threads a real TLS client is answered at once and the tricklers are closed at request_timeout."""
    context = tls_certs.client_context()
    with running(
        tls_certs, PathPage, _limits_pool_tls(), max_threads=2, request_timeout=2.0
    ) as server:
        slow = [tls_connect(server.server_address, context) for _ in range(10)]
        for sock in slow:
            sock.sendall(b"GET /first HTTP/1.1\r\nHost: t\r\n\r\n")
            assert read_until(sock, b"\r\n\r\n/first").startswith(b"HTTP/1.1 200 OK\r\n")
            sock.sendall(b"GET /next HTTP/1.1\r\nHost: t\r\n")  # the next head, unfinished
        with dripping(slow):
            _assert_served_past(server, context, len(slow))


def test_tls_client_closing_mid_head_is_handled_at_once(tls_certs: CertSet) -> None:
    """A TLS client that sends part of a head and closes is handed over (the handler reads the bytes, then EOF) instead of waiting for request_timeout: a closed socket must not keep the connection in the loop."""
    with running(
        tls_certs, PathPage, _limits_pool_tls(), max_threads=2, request_timeout=20.0
    ) as server:
        with tls_connect(server.server_address, tls_certs.client_context()) as sock:
            sock.sendall(b"GET /partial HTTP/1.1\r\nHost: t\r\n")
            assert wait_until(lambda: server.waiting_connections == 1)
            sock.close()  # FIN, without close_notify: a client that just went away
        assert wait_until(lambda: server.connections == 0, timeout=3.0)
