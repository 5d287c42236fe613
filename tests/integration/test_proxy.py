"""ProxyProtocolMixIn: the real client's address for the handler, bad headers the peer's fault."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import pickle
import queue
import random
import socket
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

import servekit
from servekit.features.pool import ThreadPoolMixIn
from servekit.features.proxy import (
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_MAX_V2_LENGTH,
    DEFAULT_TRUSTED,
    ProxiedAddress,
    ProxiedPath,
    ProxyConfigError,
    ProxyProtocolMixIn,
    is_trusted,
    parse_networks,
    proxy_header,
    proxy_peer,
)
from servekit.features.tls import TLSMixIn, tls_info
from servekit.knobs import SettingError, knobs_of
from servekit.protocols.proxy_header import (
    PP2_CLIENT_CERT_CONN,
    PP2_CLIENT_SSL,
    PP2_SUBTYPE_SSL_CN,
    PP2_SUBTYPE_SSL_VERSION,
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_NOOP,
    PP2_TYPE_UNIQUE_ID,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyProtocolError,
    build_ssl_value,
    build_v1,
    build_v2,
    parse,
)
from servekit.testing import (
    LOCALHOST,
    LOCALHOST_V6,
    closed_by_peer,
    connect,
    has_ipv6_loopback,
    serving,
)

if TYPE_CHECKING:
    from tests.tls_certs import CertSet, LogWatcher

# Bounds every client-side wait; the server answers in milliseconds.
CLIENT_TIMEOUT = 5.0
# Short enough for tests that wait for it, long enough that a loaded machine does not
# cut off a client that does send its header.
SHORT_TIMEOUT = 0.5

CLIENT = ("203.0.113.7", 56324)
CLIENT_V6 = ("2001:db8::7", 56324)
SERVER = ("192.0.2.1", 443)
SERVER_V6 = ("2001:db8::1", 443)


@dataclasses.dataclass(frozen=True)
class Seen:
    """What a handler saw of its request."""

    client_address: Any
    header: ProxyHeader | None
    peer: Any


class Recording:
    """Test servers record handler errors and what each handler saw instead of printing."""

    handler_errors: list[BaseException | None]
    handled: queue.Queue[Seen]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.handler_errors = []
        self.handled = queue.Queue()
        super().__init__(*args, **kwargs)

    def handle_error(self, request: Any, client_address: Any) -> None:
        self.handler_errors.append(sys.exc_info()[1])


class Server(Recording, ProxyProtocolMixIn, ThreadPoolMixIn, servekit.TCPServer):
    pass


class DatagramServer(Recording, ProxyProtocolMixIn, ThreadPoolMixIn, servekit.UDPServer):
    pass


class Echo(servekit.StreamRequestHandler):
    """Records what it saw, then echoes every byte until the client shuts down its side."""

    def handle(self) -> None:
        self.server.handled.put(Seen(self.client_address, proxy_header(self), proxy_peer(self)))
        for _ in range(100_000):  # far more chunks than any test sends
            chunk = self.request.recv(65536)
            if not chunk:
                return
            self.request.sendall(chunk)


class Failing(servekit.StreamRequestHandler):
    def handle(self) -> None:
        self.server.handled.put(Seen(self.client_address, proxy_header(self), proxy_peer(self)))
        raise RuntimeError("handler bug")


class DatagramEcho(servekit.DatagramRequestHandler):
    """Answers with the payload it got, and records what it saw."""

    def handle(self) -> None:
        self.server.handled.put(Seen(self.client_address, proxy_header(self), proxy_peer(self)))
        self.wfile.write(b"echo " + self.rfile.read())


@contextlib.contextmanager
def running(
    handler: type[servekit.BaseRequestHandler] = Echo,
    server_class: type[Any] = Server,
    address: Any = (LOCALHOST, 0),
    **knobs: Any,
) -> Iterator[Any]:
    with server_class(address, handler, **knobs) as server, serving(server):
        yield server


def exchange(sock: socket.socket, *pieces: bytes) -> bytes:
    """Send the pieces, shut down our side, and return everything the server sends back."""
    for piece in pieces:
        sock.sendall(piece)
    sock.shutdown(socket.SHUT_WR)
    return read_to_eof(sock)


def read_to_eof(sock: socket.socket) -> bytes:
    received = b""
    with contextlib.suppress(ConnectionResetError):
        for _ in range(100_000):
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    return received


@pytest.fixture
def proxy_log() -> Iterator[LogWatcher]:
    """Everything servekit.features.proxy logs during the test, DEBUG included."""
    from tests.tls_certs import watching_log

    with watching_log("servekit.proxy", logging.DEBUG) as watcher:
        yield watcher


# -- the handler sees the real client ------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "source"),
    [
        pytest.param(build_v1("TCP4", CLIENT, SERVER), CLIENT, id="v1-TCP4"),
        pytest.param(build_v1("TCP6", CLIENT_V6, SERVER_V6), CLIENT_V6, id="v1-TCP6"),
        pytest.param(build_v2("PROXY", "TCP4", CLIENT, SERVER), CLIENT, id="v2-TCP4"),
        pytest.param(build_v2("PROXY", "TCP6", CLIENT_V6, SERVER_V6), CLIENT_V6, id="v2-TCP6"),
    ],
)
def test_handler_sees_the_client_named_by_the_header(
    header: bytes, source: tuple[str, int]
) -> None:
    """For a PROXY header of TCP over IPv4 or IPv6, v1 or v2, client_address is the header's
    source, it still unpacks as (host, port), and proxy_peer() is the proxy's own address."""
    with running() as server, connect(server.server_address, CLIENT_TIMEOUT) as sock:
        assert exchange(sock, header, b"hello\n") == b"hello\n"
        seen = server.handled.get(timeout=CLIENT_TIMEOUT)
        proxy_end = sock.getsockname()
    host, port = seen.client_address
    assert (host, port) == source
    assert seen.client_address == source
    assert isinstance(seen.client_address, ProxiedAddress)
    assert seen.peer == proxy_end == seen.client_address.peer
    assert seen.header is not None and seen.header.source == source
    assert seen.header.version == (1 if header.startswith(b"PROXY") else 2)
    assert server.handler_errors == []


def test_handler_sees_tlvs_and_destination() -> None:
    """A v2 header's TLVs (ALPN, authority, unique id, SSL details, custom types) and destination
    reach the handler through client_address.proxy_header."""
    ssl_value = build_ssl_value(
        PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN,
        0,
        [(PP2_SUBTYPE_SSL_VERSION, b"TLSv1.3"), (PP2_SUBTYPE_SSL_CN, b"alice")],
    )
    tlvs = [
        (PP2_TYPE_ALPN, b"h2"),
        (PP2_TYPE_AUTHORITY, b"example.com"),
        (PP2_TYPE_UNIQUE_ID, b"\x01connection-42"),
        (0x20, ssl_value),
        (0xE0, b"custom"),
    ]
    header = build_v2("PROXY", "TCP4", CLIENT, SERVER, tlvs, crc32c=True)
    with running() as server, connect(server.server_address, CLIENT_TIMEOUT) as sock:
        assert exchange(sock, header) == b""
        seen = server.handled.get(timeout=CLIENT_TIMEOUT)
    received = seen.client_address.proxy_header
    assert received is seen.header
    assert received.destination == SERVER
    assert received.alpn == b"h2"
    assert received.authority == "example.com"
    assert received.unique_id == b"\x01connection-42"
    assert received.tlv(0xE0) == b"custom"
    assert received.ssl is not None
    assert (received.ssl.version, received.ssl.cn) == ("TLSv1.3", "alice")
    assert received.ssl.certificate_verified


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(build_v2("LOCAL", "UNKNOWN"), id="v2-LOCAL"),
        pytest.param(build_v2("PROXY", "UNKNOWN"), id="v2-PROXY-UNKNOWN"),
        pytest.param(build_v1("UNKNOWN", None, None), id="v1-UNKNOWN"),
    ],
)
def test_local_and_unknown_keep_the_peer_address(header: bytes) -> None:
    """A LOCAL header (HAProxy's v2 health checks) or an UNKNOWN one leaves client_address the
    real peer's, with the header still attached."""
    with running() as server, connect(server.server_address, CLIENT_TIMEOUT) as sock:
        assert exchange(sock, header, b"check\n") == b"check\n"
        seen = server.handled.get(timeout=CLIENT_TIMEOUT)
        proxy_end = sock.getsockname()
    assert seen.client_address == proxy_end
    assert seen.peer == proxy_end
    assert seen.header is not None
    assert seen.header.source is None


def test_bytes_after_the_header_reach_the_handler_intact() -> None:
    """Application bytes sent in the same write as the header, even ones that look like another
    header, reach the handler exactly as sent."""
    payload = (
        build_v1("TCP4", ("10.9.9.9", 1), SERVER)
        + V2_SIGNATURE
        + random.Random(7).randbytes(200_000)
    )
    with running() as server, connect(server.server_address, CLIENT_TIMEOUT) as sock:
        echoed = exchange(sock, build_v2("PROXY", "TCP4", CLIENT, SERVER) + payload)
        seen = server.handled.get(timeout=CLIENT_TIMEOUT)
    assert echoed == payload
    assert seen.client_address == CLIENT


@pytest.mark.parametrize(
    "pieces",
    [
        pytest.param(
            [b"PROX", b"Y TCP4 203.0.113.7 19", b"2.0.2.1 56324 443\r", b"\nhello\n"], id="v1"
        ),
        pytest.param(
            [
                V2_SIGNATURE[:5],
                V2_SIGNATURE[5:] + b"\x21\x11\x00",
                b"\x0c\xcb\x00\x71\x07",
                b"\xc0\x00\x02\x01\xdc\x04\x01\xbbhello\n",
            ],
            id="v2",
        ),
    ],
)
def test_header_split_over_several_writes(pieces: list[bytes], proxy_log: LogWatcher) -> None:
    """A header that arrives in several segments is read to its end under one deadline, then
    the handler gets exactly the bytes that follow it."""
    with running(proxy_header_timeout=CLIENT_TIMEOUT) as server:
        with connect(server.server_address, CLIENT_TIMEOUT) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sent = 0
            for piece in pieces[:-1]:
                sock.sendall(piece)
                sent += len(piece)
                # Readiness: the server has taken what we sent and waits for more.
                proxy_log.wait_for(f"incomplete: {sent} of at least")
            assert exchange(sock, pieces[-1]) == b"hello\n"
        seen = server.handled.get(timeout=CLIENT_TIMEOUT)
    assert seen.client_address == CLIENT
    assert seen.header is not None and seen.header.destination == SERVER


# -- refusals ----------------------------------------------------------------------------


def test_malformed_header_is_refused_with_the_parsers_reason(
    caplog: pytest.LogCaptureFixture, proxy_log: LogWatcher
) -> None:
    """A malformed header closes the connection with one warning naming the peer and the parser's
    reason; the handler never runs and handle_error is not called."""
    caplog.set_level(logging.DEBUG, logger="servekit.proxy")
    bad = b"PROXY TCP4 010.0.0.1 192.0.2.1 1 2\r\n"
    with pytest.raises(ProxyProtocolError) as parsed:
        parse(bad)
    with running() as server, connect(server.server_address, CLIENT_TIMEOUT) as sock:
        port = sock.getsockname()[1]
        sock.sendall(bad + b"hello\n")
        assert closed_by_peer(sock, CLIENT_TIMEOUT)
        proxy_log.wait_for("bad PROXY header")
    [record] = [r for r in caplog.records if r.name == "servekit.proxy"]
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        f"refused connection from 127.0.0.1:{port}: bad PROXY header: {parsed.value}"
    )
    assert "b'010.0.0.1'" in record.getMessage()
    assert server.handled.empty()
    assert server.handler_errors == []


def test_plaintext_request_is_refused_at_once(proxy_log: LogWatcher) -> None:
    """A plaintext HTTP request without a header is refused on its first byte, not after the
    header timeout, and the log quotes what arrived."""
    with running(proxy_header_timeout=60.0) as server:
        with connect(server.server_address, CLIENT_TIMEOUT) as sock:
            started = time.monotonic()
            sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert closed_by_peer(sock, CLIENT_TIMEOUT)
            waited = time.monotonic() - started
        record = proxy_log.wait_for("not a PROXY protocol header")
    assert waited < 2.0
    assert "got b'GET / HTTP/1.1\\r\\nHost: localhost\\r\\n\\r\\n'" in record.getMessage()
    assert server.handled.empty()
    assert server.handler_errors == []


def test_untrusted_peer_is_refused_on_the_loop_thread(proxy_log: LogWatcher) -> None:
    """A connection from outside proxy_trusted is closed by the accept loop itself, even with a
    valid header, with a warning that names the address and the trusted networks."""
    with running(proxy_trusted="10.0.0.0/8, 192.168.0.0/16") as server:
        with connect(server.server_address, CLIENT_TIMEOUT) as sock:
            port = sock.getsockname()[1]
            sock.sendall(build_v1("TCP4", CLIENT, SERVER) + b"hello\n")
            assert closed_by_peer(sock, CLIENT_TIMEOUT)
        record = proxy_log.wait_for("not in proxy_trusted")
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        f"refused connection from 127.0.0.1:{port}: 127.0.0.1 is not in proxy_trusted "
        "(10.0.0.0/8, 192.168.0.0/16)"
    )
    assert record.threadName == "serving Server"  # the loop, not a pool worker
    assert server.handled.empty()


def test_version_not_accepted_is_refused(proxy_log: LogWatcher) -> None:
    """With proxy_protocol="v2", a v1 header is refused with the reason."""
    with running(proxy_protocol="v2") as server:
        with connect(server.server_address, CLIENT_TIMEOUT) as sock:
            sock.sendall(build_v1("TCP4", CLIENT, SERVER))
            assert closed_by_peer(sock, CLIENT_TIMEOUT)
        proxy_log.wait_for("bad PROXY header: v1 header refused, only v2 is accepted here")
    assert server.handled.empty()


def test_v2_header_longer_than_the_limit_is_refused(proxy_log: LogWatcher) -> None:
    """A v2 header declaring more than proxy_max_v2_length bytes is refused as soon as its length
    field is read."""
    big = build_v2("PROXY", "TCP4", CLIENT, SERVER, [(PP2_TYPE_NOOP, bytes(20_000))])
    with running() as server:
        with connect(server.server_address, CLIENT_TIMEOUT) as sock:
            sock.sendall(big[:16])  # the length field, nothing after it
            assert closed_by_peer(sock, CLIENT_TIMEOUT)
        record = proxy_log.wait_for("more than the limit")
    assert record.getMessage().endswith(
        f"v2 header declares {len(big)} bytes (16 + {len(big) - 16}), more than the limit "
        f"of {DEFAULT_MAX_V2_LENGTH}"
    )
    assert server.handled.empty()


@pytest.mark.parametrize("how", ["close", "reset"])
def test_connection_closed_at_once_logs_only_at_debug(how: str, proxy_log: LogWatcher) -> None:
    """A connection closed or reset before its first byte (a plain TCP health check, a port scan)
    is logged at DEBUG only, and the handler never runs."""
    with running() as server:
        sock = connect(server.server_address, CLIENT_TIMEOUT)
        port = sock.getsockname()[1]
        if how == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        record = proxy_log.wait_for(f"refused connection from 127.0.0.1:{port}")
    assert record.getMessage().endswith("before sending any byte")
    assert all(r.levelno == logging.DEBUG for r in proxy_log.records)
    assert server.handled.empty()
    assert server.handler_errors == []


# -- the header deadline -------------------------------------------------------------------


def test_stalled_clients_do_not_delay_others_and_are_cut_off(proxy_log: LogWatcher) -> None:
    """Two clients that stall (one silent, one mid-header) hold a worker each for at most
    proxy_header_timeout while a third worker serves another client at once."""
    with running(max_threads=3, proxy_header_timeout=SHORT_TIMEOUT) as server:
        with (
            connect(server.server_address, CLIENT_TIMEOUT) as silent,
            connect(server.server_address, CLIENT_TIMEOUT) as partial,
        ):
            started = time.monotonic()
            partial.sendall(b"PROXY ")
            with connect(server.server_address, CLIENT_TIMEOUT) as good:
                assert exchange(good, build_v1("TCP4", CLIENT, SERVER), b"hi\n") == b"hi\n"
            served = time.monotonic() - started
            assert closed_by_peer(silent, CLIENT_TIMEOUT)
            assert closed_by_peer(partial, CLIENT_TIMEOUT)
            cut_off = time.monotonic() - started
        silent_record = proxy_log.wait_for(f"no PROXY header within {SHORT_TIMEOUT:g}s")
        partial_record = proxy_log.wait_for("PROXY header incomplete after")
    assert served < SHORT_TIMEOUT, "the good client waited for a stalled one"
    # The server's clock starts after our connect(), so it cannot cut us off sooner.
    assert SHORT_TIMEOUT * 0.9 <= cut_off < CLIENT_TIMEOUT
    assert silent_record.levelno == partial_record.levelno == logging.INFO
    assert partial_record.getMessage().endswith(
        f"PROXY header incomplete after {SHORT_TIMEOUT:g}s: 6 of at least 15 bytes "
        "arrived: b'PROXY '"
    )
    assert server.handled.qsize() == 1
    assert server.handler_errors == []


def test_clients_stalled_mid_header_hold_no_thread() -> None:
    """Clients stalled mid-header wait in the loop, not on pool threads: with 2 threads and 4
    stalled clients, a good client is answered at once; the stalled ones are cut at the timeout."""
    signature_half = build_v2("PROXY", "TCP4", CLIENT, SERVER)[:6]
    with running(max_threads=2, proxy_header_timeout=SHORT_TIMEOUT) as server:
        stalled = [connect(server.server_address, CLIENT_TIMEOUT) for _ in range(4)]
        try:
            for sock in stalled:
                sock.sendall(signature_half)
            started = time.monotonic()
            with connect(server.server_address, CLIENT_TIMEOUT) as good:
                assert exchange(good, build_v1("TCP4", CLIENT, SERVER), b"hi\n") == b"hi\n"
            served = time.monotonic() - started
            assert all(closed_by_peer(sock, CLIENT_TIMEOUT) for sock in stalled)
        finally:
            for sock in stalled:
                sock.close()
    assert served < SHORT_TIMEOUT, "the good client waited for a stalled one"
    assert server.handled.get_nowait().client_address == CLIENT


# -- composition -----------------------------------------------------------------------------


def test_tls_client_hello_after_the_header_is_intact(tls_certs: CertSet) -> None:
    """Composed before TLSMixIn, the mix-in takes only the header, so the TLS handshake that
    follows succeeds and the TLS handler sees the client named by the header."""

    class ProxiedTLSServer(
        Recording, ProxyProtocolMixIn, TLSMixIn, ThreadPoolMixIn, servekit.TCPServer
    ):
        pass

    keys = {"certfile": str(tls_certs.server.cert), "keyfile": str(tls_certs.server.key)}
    context = tls_certs.client_context()
    with running(Echo, ProxiedTLSServer, **keys) as server:
        raw = connect(server.server_address, CLIENT_TIMEOUT)
        raw.sendall(build_v2("PROXY", "TCP4", CLIENT, SERVER))
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"over tls\n")
            assert tls.recv(100) == b"over tls\n"
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
        seen = server.handled.get(timeout=CLIENT_TIMEOUT)
    assert seen.client_address == CLIENT
    assert server.handler_errors == []


def test_tls_info_is_available_behind_the_proxy(tls_certs: CertSet) -> None:
    """A handler behind both mix-ins reads TLS details with tls_info() and PROXY details with
    proxy_header() side by side."""

    class Both(servekit.StreamRequestHandler):
        def handle(self) -> None:
            info = tls_info(self)
            header = proxy_header(self)
            assert info is not None and header is not None
            self.wfile.write(f"{info.version} {header.authority}\n".encode())

    class ProxiedTLSServer(ProxyProtocolMixIn, TLSMixIn, ThreadPoolMixIn, servekit.TCPServer):
        pass

    keys = {"certfile": str(tls_certs.server.cert), "keyfile": str(tls_certs.server.key)}
    header = build_v2("PROXY", "TCP4", CLIENT, SERVER, [(PP2_TYPE_AUTHORITY, b"example.com")])
    with running(Both, ProxiedTLSServer, **keys) as server:
        raw = connect(server.server_address, CLIENT_TIMEOUT)
        raw.sendall(header)
        with tls_certs.client_context().wrap_socket(raw, server_hostname="localhost") as tls:
            answer = tls.recv(100)
    assert answer.split(b" ")[1] == b"example.com\n"
    assert answer.startswith(b"TLSv1.")


def test_unix_stream_server(tmp_path: Path) -> None:
    """Over a Unix socket the header's inet source becomes client_address, and a LOCAL header
    leaves the unnamed peer's "" with the header attached."""

    class UnixServer(Recording, ProxyProtocolMixIn, ThreadPoolMixIn, servekit.UnixStreamServer):
        pass

    path = str(tmp_path / "proxy.sock")
    with running(Echo, UnixServer, path) as server:
        with connect(path, CLIENT_TIMEOUT) as sock:
            exchange(sock, build_v2("PROXY", "TCP6", CLIENT_V6, SERVER_V6))
        with connect(path, CLIENT_TIMEOUT) as sock:
            exchange(sock, build_v2("LOCAL", "UNKNOWN"))
        proxied = server.handled.get(timeout=CLIENT_TIMEOUT)
        local = server.handled.get(timeout=CLIENT_TIMEOUT)
    assert proxied.client_address == CLIENT_V6
    assert proxied.peer == ""
    assert isinstance(local.client_address, ProxiedPath)
    assert local.client_address == "" == local.peer
    assert local.header is not None and local.header.command == "LOCAL"


def test_ipv6_listener() -> None:
    """On an IPv6 listener a LOCAL header keeps the peer's four-item address, and a PROXY header
    gives the two-item (host, port) of its source."""
    if not has_ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    with running(address=(LOCALHOST_V6, 0)) as server:
        with connect(server.server_address, CLIENT_TIMEOUT) as sock:
            exchange(sock, build_v2("LOCAL", "UNKNOWN"))
            proxy_end = sock.getsockname()
        with connect(server.server_address, CLIENT_TIMEOUT) as sock:
            exchange(sock, build_v1("TCP4", CLIENT, SERVER))
        local = server.handled.get(timeout=CLIENT_TIMEOUT)
        proxied = server.handled.get(timeout=CLIENT_TIMEOUT)
    assert local.client_address == proxy_end and len(local.client_address) == 4
    assert proxied.client_address == CLIENT


def test_handler_errors_still_go_to_handle_error(proxy_log: LogWatcher) -> None:
    """An exception in the handler after a good header is the server's to report (handle_error),
    not a refusal."""
    with running(Failing) as server, connect(server.server_address, CLIENT_TIMEOUT) as sock:
        assert exchange(sock, build_v1("TCP4", CLIENT, SERVER)) == b""
        server.handled.get(timeout=CLIENT_TIMEOUT)
    assert [type(e) for e in server.handler_errors] == [RuntimeError]
    assert proxy_log.messages() == []


# -- datagrams -----------------------------------------------------------------------------


def udp_client() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(CLIENT_TIMEOUT)
    sock.bind((LOCALHOST, 0))
    return sock


def test_datagram_round_trip() -> None:
    """A datagram's v2 header is cut off; the handler sees the payload, the header's client in
    proxy_header.source, and replies to client_address, which is the proxy."""
    header = build_v2("PROXY", "UDP4", ("203.0.113.9", 5353), ("192.0.2.1", 53))
    with running(DatagramEcho, DatagramServer) as server, udp_client() as proxy:
        proxy.sendto(header + b"question", server.server_address)
        reply, sender = proxy.recvfrom(1024)
        seen = server.handled.get(timeout=CLIENT_TIMEOUT)
        proxy_end = proxy.getsockname()
    assert reply == b"echo question"
    assert sender == server.server_address
    assert seen.client_address == proxy_end == seen.peer
    assert seen.header is not None
    assert seen.header.source == ("203.0.113.9", 5353)
    assert seen.header.transport == "UDP4"


@pytest.mark.parametrize(
    ("datagram", "reason"),
    [
        pytest.param(
            b"hello",
            "bad PROXY header: not a PROXY protocol header: expected the v2 signature, got "
            "b'hello'",
            id="no-header",
        ),
        pytest.param(
            build_v1("TCP4", CLIENT, SERVER) + b"hello",
            "bad PROXY header: v1 header refused, only v2 is accepted here",
            id="v1",
        ),
        pytest.param(
            build_v2("PROXY", "UDP4", CLIENT, SERVER)[:20],
            "datagram of 20 bytes ends inside a PROXY v2 header of at least 28 bytes",
            id="truncated",
        ),
    ],
)
def test_bad_datagram_is_dropped_and_the_next_served(
    datagram: bytes, reason: str, proxy_log: LogWatcher
) -> None:
    """A datagram without a valid v2 header is dropped with a warning naming the sender and the
    reason; the handler does not see it, and the next good datagram is served."""
    good = build_v2("PROXY", "UDP4", CLIENT, SERVER) + b"fine"
    with running(DatagramEcho, DatagramServer) as server, udp_client() as proxy:
        port = proxy.getsockname()[1]
        proxy.sendto(datagram, server.server_address)
        record = proxy_log.wait_for("dropped datagram")
        proxy.sendto(good, server.server_address)
        assert proxy.recvfrom(1024)[0] == b"echo fine"
        seen = server.handled.get(timeout=CLIENT_TIMEOUT)
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith(f"dropped datagram from 127.0.0.1:{port}: {reason}")
    assert seen.header is not None and seen.header.source == CLIENT
    assert server.handled.empty()


def test_untrusted_datagram_is_dropped(proxy_log: LogWatcher) -> None:
    """A datagram from outside proxy_trusted is dropped on the loop thread with a warning."""
    with (
        running(DatagramEcho, DatagramServer, proxy_trusted="10.0.0.0/8") as server,
        udp_client() as proxy,
    ):
        proxy.sendto(build_v2("PROXY", "UDP4", CLIENT, SERVER) + b"x", server.server_address)
        record = proxy_log.wait_for("not in proxy_trusted")
    assert record.getMessage().startswith("dropped datagram from 127.0.0.1:")
    assert server.handled.empty()


# -- settings --------------------------------------------------------------------------------


def test_settings_and_their_defaults() -> None:
    """The four knobs live in section "proxy", with the documented defaults."""
    knobs = knobs_of(Server)
    names = ["proxy_protocol", "proxy_trusted", "proxy_header_timeout", "proxy_max_v2_length"]
    assert all(knobs[name].section == "proxy" for name in names)
    assert [knobs[name].default for name in names] == [
        "any",
        DEFAULT_TRUSTED,
        DEFAULT_HEADER_TIMEOUT,
        DEFAULT_MAX_V2_LENGTH,
    ]
    assert (DEFAULT_TRUSTED, DEFAULT_HEADER_TIMEOUT, DEFAULT_MAX_V2_LENGTH) == (
        "127.0.0.0/8,::1/128",
        5.0,
        16384,
    )
    assert knobs["proxy_header_timeout"].cli_flag == "--proxy-header-timeout"
    assert knobs["proxy_trusted"].from_string("10.0.0.0/8,::1") == "10.0.0.0/8,::1"


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"proxy_protocol": "v3"}, "proxy_protocol='v3': must be one of v1, v2, any"),
        (
            {"proxy_trusted": "10.0.0.1/8"},
            "proxy_trusted='10.0.0.1/8': '10.0.0.1/8': 10.0.0.1/8 has host bits set (the "
            "network is 10.0.0.0/8; for the one address write /32)",
        ),
        ({"proxy_trusted": "localhost"}, "'localhost' does not appear to be an IPv4 or IPv6"),
        ({"proxy_trusted": " , "}, "names no network, so every connection would be refused"),
        ({"proxy_header_timeout": 0}, "proxy_header_timeout=0: must be greater than 0"),
        ({"proxy_max_v2_length": 15}, "proxy_max_v2_length=15: must be in 16..65551"),
    ],
)
def test_bad_settings_are_refused_by_name(knobs: dict[str, Any], message: str) -> None:
    """A setting that cannot work is refused at construction with its name, value and the
    problem."""
    with pytest.raises(SettingError) as raised:
        Server((LOCALHOST, 0), Echo, **knobs)
    assert message in str(raised.value)


def test_bad_class_attribute_is_refused_and_the_socket_closed() -> None:
    """Settings made as class attributes are checked too, and the listening socket is closed."""

    class Misconfigured(Server):
        proxy_trusted = "10.0.0.0/33"

    sockets: list[socket.socket] = []

    class Watching(Misconfigured):
        def server_bind(self) -> None:
            sockets.append(self.socket)
            super().server_bind()

    with pytest.raises(ProxyConfigError, match=r"proxy_trusted='10\.0\.0\.0/33'"):
        Watching((LOCALHOST, 0), Echo)
    assert sockets[0].fileno() == -1


def test_v1_on_a_datagram_server_is_refused() -> None:
    """proxy_protocol="v1" on a datagram server is a configuration error: v1 is for TCP only."""
    with pytest.raises(ProxyConfigError, match="PROXY v1 exists for TCP only"):
        DatagramServer((LOCALHOST, 0), DatagramEcho, proxy_protocol="v1")


def test_trusted_networks_as_a_list() -> None:
    """proxy_trusted may be a sequence of networks as well as a comma-separated string."""
    with Server((LOCALHOST, 0), Echo, proxy_trusted=["10.0.0.0/8", "::1"]) as server:
        assert [str(n) for n in server.proxy_networks] == ["10.0.0.0/8", "::1/128"]


def test_trust_matching() -> None:
    """IPv4-mapped peers match as IPv4, scoped IPv6 peers match without their scope, and Unix
    peers are always trusted."""
    networks = parse_networks("127.0.0.0/8,fe80::/10")
    assert is_trusted(("127.0.0.5", 1), networks)
    assert is_trusted(("::ffff:127.0.0.1", 1, 0, 0), networks)
    assert is_trusted(("fe80::1%lo", 1, 0, 1), networks)
    assert not is_trusted(("10.0.0.1", 1), networks)
    assert not is_trusted(("::1", 1, 0, 0), networks)
    assert is_trusted("", networks)
    assert is_trusted(None, networks)


def test_client_address_survives_pickling() -> None:
    """A proxied client_address pickles with its header and peer (to hand it to another process)."""
    header = parse(build_v2("PROXY", "TCP4", CLIENT, SERVER) + b"rest")
    assert isinstance(header, ProxyHeader)
    address = ProxiedAddress(CLIENT, header, ("127.0.0.1", 4000))
    copy = pickle.loads(pickle.dumps(address))
    assert copy == CLIENT
    assert type(copy) is ProxiedAddress
    assert (copy.proxy_header, copy.peer) == (header, ("127.0.0.1", 4000))
    path = pickle.loads(pickle.dumps(ProxiedPath("", header, "")))
    assert (path, path.proxy_header) == ("", header)


def test_without_the_mix_in_nothing_is_parsed() -> None:
    """A server without the mix-in hands the header bytes to the handler untouched, and
    proxy_header() says None."""

    class Plain(Recording, ThreadPoolMixIn, servekit.TCPServer):
        pass

    header = build_v1("TCP4", CLIENT, SERVER)
    with running(Echo, Plain) as server, connect(server.server_address, CLIENT_TIMEOUT) as sock:
        assert exchange(sock, header) == header
        seen = server.handled.get(timeout=CLIENT_TIMEOUT)
    assert seen.header is None
    assert seen.peer == seen.client_address
