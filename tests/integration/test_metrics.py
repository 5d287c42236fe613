"""MetricsMixIn in one process: what it counts through the hooks, the exposition, health, the access log and the shutdown summary."""

from __future__ import annotations

import http.client
import logging
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import servekit
from servekit.apps.echo import EchoHandler
from servekit.features.limits import LimitsMixIn
from servekit.features.metrics import SLOTS, MetricsMixIn, exposition
from servekit.features.pool import ThreadPoolMixIn
from servekit.process.supervisor import MAX_WORKERS
from servekit.testing import LOCALHOST, connect, exchange_line, serving, wait_until

pytestmark = pytest.mark.timeout(60)

TIMEOUT = 10.0
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class Server(MetricsMixIn, LimitsMixIn, ThreadPoolMixIn, servekit.TCPServer):
    pass


class DatagramServer(MetricsMixIn, ThreadPoolMixIn, servekit.UDPServer):
    pass


def make(handler: Any = EchoHandler, **kwargs: Any) -> Server:
    kwargs.setdefault("collect_metrics", True)
    return Server((LOCALHOST, 0), handler, **kwargs)


def samples_of(server: MetricsMixIn) -> Samples:
    """The server's exposition, read back with prometheus-client's parser."""
    out: Samples = {}
    for family in text_string_to_metric_families(server.render_metrics()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def metric(server: MetricsMixIn, name: str, **labels: str) -> float:
    return samples_of(server)[(name, tuple(sorted(labels.items())))]


@pytest.fixture
def access_records() -> Iterator[list[logging.LogRecord]]:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("servekit.access")
    handler = Keep()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)


def test_counts_connections_messages_and_outcomes() -> None:
    """Ten connections of two lines each: 10 accepted, 20 messages timed, 10 closed as done, none open."""
    with make() as server, serving(server):
        for number in range(10):
            with connect(server.server_address, TIMEOUT) as sock:
                assert exchange_line(sock, b"a%d\n" % number) == b"a%d\n" % number
                assert exchange_line(sock, b"b%d\n" % number) == b"b%d\n" % number
        assert wait_until(
            lambda: metric(server, "servekit_connections_closed_total", outcome="done") == 10
        )
        assert metric(server, "servekit_connections_accepted_total") == 10
        assert metric(server, "servekit_messages_total") == 20
        assert metric(server, "servekit_handler_duration_seconds_count") == 20
        assert metric(server, "servekit_connections_open") == 0
        assert metric(server, "servekit_handler_errors_total") == 0


@pytest.mark.parametrize("idle_timeout", [300.0, None])
def test_handler_duration_leaves_out_the_wait_between_messages(idle_timeout: float | None) -> None:
    """A keep-alive client that thinks 0.4 s between two lines: the two handler durations add up to far less than that, since the connection waited parked, not in the handler. Also without an idle timeout (the end of a message is on the record, not guessed from the parked connection's deadline)."""
    with make(idle_timeout=idle_timeout) as server, serving(server):
        with connect(server.server_address, TIMEOUT) as sock:
            assert exchange_line(sock, b"one\n") == b"one\n"
            assert wait_until(lambda: server.parked_connections == 1)
            threading.Event().wait(0.4)  # the client's think time: the scenario itself
            assert exchange_line(sock, b"two\n") == b"two\n"
        assert wait_until(lambda: metric(server, "servekit_handler_duration_seconds_count") == 2)
        assert metric(server, "servekit_handler_duration_seconds_sum") < 0.2
        assert metric(server, "servekit_handler_duration_seconds_bucket", le="0.25") == 2


def test_refused_connections_and_handler_errors_are_counted() -> None:
    """verify_request() refusing counts as refused; a handler that raises counts as a handler error and closes with outcome error."""

    class Boom(servekit.StreamRequestHandler):
        def handle(self) -> None:
            self.rfile.readline()
            raise RuntimeError("boom (expected by the test)")

    class RefuseFirst:
        """Refuses the first connection: a verify_request() below MetricsMixIn, where it sees it."""

        refuse = True

        def verify_request(self, request: Any, client_address: Any) -> bool:
            allowed: bool = super().verify_request(request, client_address)  # type: ignore[misc]
            if self.refuse:
                self.refuse = False
                return False
            return allowed

    class Picky(MetricsMixIn, RefuseFirst, LimitsMixIn, ThreadPoolMixIn, servekit.TCPServer):
        pass

    with Picky((LOCALHOST, 0), Boom, collect_metrics=True) as server, serving(server):
        with connect(server.server_address, TIMEOUT) as sock:
            assert sock.recv(10) == b""  # refused: closed at once
        with connect(server.server_address, TIMEOUT) as sock:
            sock.sendall(b"x\n")
            assert sock.recv(10) == b""
        assert wait_until(
            lambda: metric(server, "servekit_connections_closed_total", outcome="error") == 1
        )
        assert metric(server, "servekit_connections_refused_total") == 1
        assert metric(server, "servekit_handler_errors_total") == 1
        assert metric(server, "servekit_connections_accepted_total") == 1


def test_timeouts_are_counted_by_cause() -> None:
    """A client that never sends its request is a stage timeout; one silent after its first line an idle timeout."""
    with make(request_timeout=0.2, idle_timeout=0.2) as server, serving(server):
        with (
            connect(server.server_address, TIMEOUT) as silent,
            connect(server.server_address, TIMEOUT) as idle,
        ):
            assert exchange_line(idle, b"hello\n") == b"hello\n"
            assert silent.recv(10) == b""
            assert idle.recv(10) == b""
        assert wait_until(
            lambda: (
                metric(server, "servekit_connections_timed_out_total", cause="idle-timeout") == 1
            )
        )
        assert metric(server, "servekit_connections_timed_out_total", cause="stage-timeout") == 1
        assert metric(server, "servekit_connections_timed_out_total", cause="read-timeout") == 0
        assert metric(server, "servekit_connections_closed_total", outcome="stage-timeout") == 1


def test_gauges_follow_the_pool_and_the_pipeline() -> None:
    """Three clients parked between lines show as 3 open and 3 parked; the pool's size shows as its maximum."""
    with make(max_threads=4) as server, serving(server):
        clients = [connect(server.server_address, TIMEOUT) for _ in range(3)]
        try:
            for sock in clients:
                assert exchange_line(sock, b"x\n") == b"x\n"
            assert wait_until(lambda: metric(server, "servekit_connections_parked") == 3)
            assert metric(server, "servekit_connections_open") == 3
            assert metric(server, "servekit_pool_threads_max") == 4
            assert metric(server, "servekit_connections_waiting") == 0
        finally:
            for sock in clients:
                sock.close()
        assert wait_until(lambda: metric(server, "servekit_connections_open") == 0)


def test_nothing_is_counted_unless_someone_can_read_it() -> None:
    """Without metrics_bind or collect_metrics the hooks count nothing (per-message counting is not free)."""
    with make(collect_metrics=False) as server, serving(server):
        with connect(server.server_address, TIMEOUT) as sock:
            assert exchange_line(sock, b"x\n") == b"x\n"
        assert metric(server, "servekit_connections_accepted_total") == 0
        assert metric(server, "servekit_messages_total") == 0


def test_datagrams_are_counted_and_timed() -> None:
    """A datagram server counts each datagram and times its handler."""
    from servekit.apps.echo import DatagramEchoHandler

    with (
        DatagramServer((LOCALHOST, 0), DatagramEchoHandler, collect_metrics=True) as server,
        serving(server),
    ):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(TIMEOUT)
            for number in range(5):
                client.sendto(b"d%d" % number, server.server_address)
                assert client.recvfrom(100)[0] == b"d%d" % number
        assert wait_until(lambda: metric(server, "servekit_datagrams_total") == 5)
        assert wait_until(lambda: metric(server, "servekit_handler_duration_seconds_count") == 5)


def test_access_log_has_one_line_per_connection(access_records: list[logging.LogRecord]) -> None:
    """access_log: one record per connection at close, with client, listener, messages, duration and outcome as fields."""
    with make(access_log=True, collect_metrics=False) as server, serving(server):
        with connect(server.server_address, TIMEOUT) as sock:
            assert exchange_line(sock, b"a\n") == b"a\n"
            assert exchange_line(sock, b"b\n") == b"b\n"
            local = sock.getsockname()
        assert wait_until(lambda: len(access_records) == 1)
    [record] = access_records
    fields: Any = record
    assert fields.client == f"127.0.0.1:{local[1]}"
    assert fields.listener == f"tcp://127.0.0.1:{server.server_address[1]}"
    assert fields.messages == 2
    assert fields.outcome == "done"
    assert fields.tls is False
    assert 0 < fields.duration < TIMEOUT
    assert record.getMessage().startswith(f"client=127.0.0.1:{local[1]} listener=tcp://")
    assert "messages=2" in record.getMessage() and "outcome=done" in record.getMessage()


def test_admin_listener_serves_metrics_and_health() -> None:
    """metrics_bind: GET /metrics in the text format, /livez 200, /readyz 200 while serving and 503 before; other paths 404, other methods 405."""
    server = make(metrics_bind="127.0.0.1:0")
    with server:
        assert server.readiness() == (False, "not serving yet")
        with serving(server):
            address = server.admin_address
            assert address is not None
            for method, path, status in [
                ("GET", "/metrics", 200),
                ("GET", "/livez", 200),
                ("GET", "/readyz", 200),
                ("GET", "/readyz?verbose", 200),
                ("HEAD", "/metrics", 200),
                ("GET", "/other", 404),
                ("POST", "/metrics", 405),
            ]:
                conn = http.client.HTTPConnection(*address, timeout=TIMEOUT)
                conn.request(method, path)
                response = conn.getresponse()
                body = response.read()
                conn.close()
                assert response.status == status, (method, path)
                if method == "HEAD":
                    assert body == b""
            conn = http.client.HTTPConnection(*address, timeout=TIMEOUT)
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode()
            conn.close()
            names = [family.name for family in text_string_to_metric_families(text)]
            assert names and all(name.startswith("servekit_") for name in names)
    assert server.readiness() == (False, "stopped")
    with pytest.raises(OSError):
        http.client.HTTPConnection(*address, timeout=TIMEOUT).request("GET", "/livez")


def test_exposition_escapes_labels_and_help() -> None:
    """Label values and help texts with quotes, backslashes and newlines read back unchanged through prometheus-client's parser."""
    odd = 'a "quoted" \\ back\nslash'
    text = exposition(
        [("servekit_odd_total", "counter", "help with \\ and\nnewline", [("", {"l": odd}, 3.0)])]
    )
    assert text.endswith("\n")
    [family] = text_string_to_metric_families(text)
    assert family.documentation == "help with \\ and\nnewline"
    [sample] = family.samples
    assert sample.labels == {"l": odd}
    assert sample.value == 3.0


def test_shutdown_ends_with_one_summary_line(caplog: pytest.LogCaptureFixture) -> None:
    """server_close() of a server that served logs one summary line with its counts; one that never served logs none."""
    with caplog.at_level(logging.INFO, logger="servekit.metrics"):
        with make(collect_metrics=False) as server, serving(server):
            with connect(server.server_address, TIMEOUT) as sock:
                assert exchange_line(sock, b"x\n") == b"x\n"
        with make():
            pass
    summaries = [r.getMessage() for r in caplog.records if "shutdown: complete" in r.getMessage()]
    assert len(summaries) == 1, summaries
    assert "handler(s) still running after drain_timeout" in summaries[0]


def test_a_row_for_every_supervisor_slot() -> None:
    """The shared table has a row for the single process and one for each of the supervisor's worker slots."""
    assert SLOTS >= MAX_WORKERS + 1
