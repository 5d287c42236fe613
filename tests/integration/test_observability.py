"""The command's metrics, health checks, logs, stuck-worker replacement and shutdown accounting, with real processes."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from servekit.testing import wait_until
from tests.integration.procs import ROOT, ServerProcess

pytestmark = pytest.mark.timeout(90)

METRICS_LINE = r"metrics: /metrics, /livez and /readyz on http://127\.0\.0\.1:(\d+)"
SUMMARY = r"shutdown: complete after [\d.]+s: "
PREFORK_SUMMARY = (
    SUMMARY + r"(\d+) worker\(s\) drained: served (\d+) connection\(s\) taken from the kernel "
    r"backlog, closed (\d+) connection\(s\) waiting for their client, (\d+) handler\(s\) "
    r"still running after drain_timeout; (\d+) worker\(s\) ended before draining"
)
SINGLE_SUMMARY = (
    SUMMARY + r"served (\d+) connection\(s\) taken from the kernel backlog, closed (\d+) "
    r"connection\(s\) waiting for their client, (\d+) handler\(s\) still running after "
    r"drain_timeout"
)


def http_get(port: int, path: str) -> tuple[int, str, str]:
    """(status, content type, body) of GET path on the admin listener."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read().decode()
    finally:
        conn.close()


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, read with prometheus-client's own parser."""
    status, content_type, body = http_get(port, "/metrics")
    assert status == 200
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    samples = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def echo_client(port: int, line: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(line)
        with sock.makefile("rb") as reader:
            return reader.readline()


def test_metrics_are_summed_over_workers_and_readyz_answers() -> None:
    """`servekit echo --workers 2 --metrics-bind`: after 200 connections the accepted counter sums to at least 200 over both workers, /livez and /readyz answer 200."""
    with ServerProcess.cli(
        "echo",
        "--bind",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--threads",
        "8",
        "--metrics-bind",
        "127.0.0.1:0",
        "--access-log",
    ) as server:
        server.wait_ready()
        port = int(server.wait_for(METRICS_LINE).group(1))
        assert http_get(port, "/readyz")[0] == 200
        assert http_get(port, "/livez")[:3:2] == (200, "ok\n")
        for number in range(200):
            assert echo_client(server.port, b"ping %d\n" % number) == b"ping %d\n" % number
        samples = scrape(port)
        assert value(samples, "servekit_connections_accepted_total") >= 200
        assert value(samples, "servekit_messages_total") >= 200
        assert value(samples, "servekit_workers") == 2
        assert value(samples, "servekit_workers_desired") == 2
        assert value(samples, "servekit_pool_threads_max") == 16  # 8 threads x 2 workers
        assert value(samples, "servekit_worker_restarts_total", cause="crash") == 0
        # Every connection closes "done" once the client hung up (the server sees the
        # EOF a moment after the client's close: poll, bounded).
        assert wait_until(
            lambda: value(scrape(port), "servekit_connections_closed_total", outcome="done") >= 200
        )
        # A message's duration is recorded when it ends: at the next message or the close.
        assert value(scrape(port), "servekit_handler_duration_seconds_count") >= 200
        # The counts came from both workers: each wrote access lines under its own pid.
        workers = server.workers()
        per_worker = [server.count(rf"\[{pid}\] INFO servekit\.access: client=") for pid in workers]
        assert len(workers) == 2 and all(per_worker) and sum(per_worker) >= 200, per_worker
        assert http_get(port, "/nope")[0] == 404
        server.send(signal.SIGTERM)
        assert server.wait() == 0
        server.assert_no_leftovers()


def test_readyz_turns_503_while_draining() -> None:
    """After SIGTERM, while a slow handler still holds a connection, /readyz answers 503 and /livez 200; the slow request still completes."""
    with ServerProcess.cli(
        "serve",
        "tests.integration.apps:Slow",
        "--bind",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--metrics-bind",
        "127.0.0.1:0",
        "--drain-timeout",
        "20",
    ) as server:
        server.wait_ready()
        port = int(server.wait_for(METRICS_LINE).group(1))
        assert http_get(port, "/readyz")[0] == 200
        with server.connect() as sock, sock.makefile("rb") as reader:
            sock.sendall(b"3\n")
            assert reader.readline().startswith(b"started ")
            server.send(signal.SIGTERM)
            server.wait_for("graceful stop")
            status, _, body = http_get(port, "/readyz")
            assert (status, body) == (503, "stopping: workers are draining\n")
            assert http_get(port, "/livez")[0] == 200
            assert reader.readline().startswith(b"done ")
        assert server.wait() == 0
        match = server.wait_for(PREFORK_SUMMARY)
        assert match.group(1) == "2"  # both workers drained
        assert match.group(5) == "0"  # none killed


def test_single_process_metrics_json_logs_and_summary() -> None:
    """One process: /metrics counts, --log-format json writes one object per line (the access log's fields included), and the shutdown ends with one summary line."""
    with ServerProcess.cli(
        "echo",
        "--bind",
        "127.0.0.1:0",
        "--metrics-bind",
        "127.0.0.1:0",
        "--access-log",
        "--log-format",
        "json",
    ) as server:
        server.wait_ready()
        port = int(server.wait_for(METRICS_LINE).group(1))
        for number in range(20):
            assert echo_client(server.port, b"%d\n" % number) == b"%d\n" % number
        assert wait_until(
            lambda: value(scrape(port), "servekit_connections_closed_total", outcome="done") >= 20
        )
        samples = scrape(port)
        assert value(samples, "servekit_connections_accepted_total") == 20
        assert value(samples, "servekit_connections_open") == 0
        assert ("servekit_workers", ()) not in samples  # no supervisor, no worker gauges
        assert http_get(port, "/readyz")[:3:2] == (200, "serving\n")
        server.send(signal.SIGTERM)
        assert server.wait() == 0
        records = [json.loads(line) for line in server.lines if line.startswith("{")]
        plain = [line for line in server.lines if not line.startswith("{")]
        # Only the command's own two lines for humans are not JSON.
        assert all(line.startswith(("servekit: ready:", "servekit: stopped")) for line in plain)
        assert all({"time", "level", "logger", "message", "pid"} <= set(r) for r in records)
        access = [r for r in records if r["logger"] == "servekit.access"]
        assert len(access) == 20
        assert access[0]["listener"] == f"tcp://127.0.0.1:{server.port}"
        assert access[0]["outcome"] == "done" and access[0]["messages"] == 1
        assert access[0]["client"].startswith("127.0.0.1:")
        assert isinstance(access[0]["duration"], float)
        messages = [r["message"] for r in records]
        assert any(m.startswith("listening: echo on tcp://127.0.0.1:") for m in messages)
        summaries = [m for m in messages if m.startswith("shutdown: complete after")]
        assert len(summaries) == 1, summaries
        assert summaries[0].endswith(
            "served 0 connection(s) taken from the kernel backlog, closed 0 connection(s) "
            "waiting for their client, 0 handler(s) still running after drain_timeout"
        )


def test_stuck_worker_is_replaced_within_worker_timeout() -> None:
    """A worker whose every pool thread hangs in a handler is replaced within worker_timeout + 1 s, its stacks are logged, and a client arriving afterwards is served."""
    worker_timeout = 2.0
    with ServerProcess.cli(
        "serve",
        "tests.integration.observability_apps:Hang",
        "--bind",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--threads",
        "1",
        "--worker-timeout",
        str(worker_timeout),
        "--metrics-bind",
        "127.0.0.1:0",
    ) as server:
        server.wait_ready()
        port = int(server.wait_for(METRICS_LINE).group(1))
        first = set(server.workers())
        hung: dict[int, socket.socket] = {}
        held = []
        try:
            # Hang the one thread of each worker. A worker whose thread hangs stops
            # accepting, so the next connection goes to the other; bounded tries.
            for _ in range(10):
                if len(hung) == 2:
                    break
                sock = server.connect()
                held.append(sock)
                sock.sendall(b"hang\n")
                sock.settimeout(1.0)
                try:
                    reply = sock.recv(100)
                except TimeoutError:
                    continue  # queued behind a hung thread: try again
                assert reply.startswith(b"hanging ")
                hung[int(reply.split()[1])] = sock
            assert set(hung) == first
            all_hung = time.monotonic()
            start = len(server.lines)
            for _ in hung:
                server.wait_for(r"worker \d+ started, pid \d+", timeout=10, start=start)
                start = (
                    next(
                        i
                        for i in range(start, len(server.lines))
                        if "started, pid" in server.lines[i]
                    )
                    + 1
                )
            replaced_after = time.monotonic() - all_hung
            assert replaced_after < worker_timeout + 1.0, replaced_after
            reply = echo_client(server.port, b"after\n")
            assert reply.endswith(b" after\n")
            assert int(reply.split()[0]) not in first
        finally:
            for sock in held:
                sock.close()
        assert server.count(r"stuck for [\d.]+s \(worker_timeout=2\.0s\); killing it") == 2
        # Each worker logged where its thread was stuck before it was killed.
        assert server.count(r"all 1 threads have been in a handler for") == 2
        stacks = "\n".join(server.lines)
        assert "observability_apps.py" in stacks and "in handle" in stacks
        samples = scrape(port)
        assert value(samples, "servekit_worker_restarts_total", cause="timeout") == 2
        server.send(signal.SIGTERM)
        assert server.wait() == 0
        server.assert_no_leftovers()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_with_300_clients_arriving(workers: str) -> None:
    """SIGTERM while 300 clients connect: each is served or refused by the kernel, none is reset, and the last log line sums up the shutdown."""
    args = ["echo", "--bind", "127.0.0.1:0", "--threads", "8"]
    if workers != "1":
        args += ["--workers", workers]
    with ServerProcess.cli(*args) as server:
        server.wait_ready()
        results: dict[str, int] = {"served": 0, "refused": 0}
        failures: list[str] = []
        lock = threading.Lock()
        halfway = threading.Event()

        def client(number: int) -> None:
            line = b"client %d\n" % number
            try:
                sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            except ConnectionRefusedError:
                with lock:
                    results["refused"] += 1
                return
            try:
                with sock, sock.makefile("rb") as reader:
                    sock.sendall(line)
                    reply = reader.readline()
            except OSError as exc:
                reply = f"{type(exc).__name__}: {exc}".encode()
            with lock:
                if reply == line:
                    results["served"] += 1
                    if results["served"] == 100:
                        halfway.set()
                else:
                    failures.append(f"client {number}: {reply!r}")

        with ThreadPoolExecutor(max_workers=16) as pool:
            futures = [pool.submit(client, number) for number in range(300)]
            assert halfway.wait(30)
            server.send(signal.SIGTERM)
            for future in futures:
                future.result(timeout=60)
        assert server.wait() == 0
        assert not failures, failures[:10]
        assert results["served"] + results["refused"] == 300
        assert results["served"] >= 100
        if workers == "1":
            match = server.wait_for(SINGLE_SUMMARY)
            still = match.group(3)
        else:
            match = server.wait_for(PREFORK_SUMMARY)
            assert match.group(1) == workers
            still = match.group(4)
        assert still == "0"
        # The summary is the last log line (only the command's "stopped" follows).
        last_logged = [line for line in server.lines if " INFO " in line or " WARNING " in line][-1]
        assert "shutdown: complete after" in last_logged, last_logged


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVEKIT_")}
    return subprocess.run(
        [sys.executable, "-m", "servekit", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env={**env, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}"},
    )


@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_log_config_file_configures_logging(tmp_path: Path, suffix: str) -> None:
    """--log-config applies a dictConfig file (JSON or TOML): here, every record to a file with the operator's own format."""
    log_file = tmp_path / "servekit.log"
    config = {
        "version": 1,
        "formatters": {"plain": {"format": "%(levelname)s|%(name)s|%(message)s"}},
        "handlers": {
            "file": {
                "class": "logging.FileHandler",
                "filename": str(log_file),
                "formatter": "plain",
            }
        },
        "root": {"level": "INFO", "handlers": ["file"]},
    }
    path = tmp_path / f"logging{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(config))
    else:
        path.write_text(
            "version = 1\n"
            '[formatters.plain]\nformat = "%(levelname)s|%(name)s|%(message)s"\n'
            '[handlers.file]\nclass = "logging.FileHandler"\n'
            f'filename = {json.dumps(str(log_file))}\nformatter = "plain"\n'
            '[root]\nlevel = "INFO"\nhandlers = ["file"]\n'
        )
    with ServerProcess.cli("echo", "--bind", "127.0.0.1:0", "--log-config", str(path)) as server:
        server.wait_ready()
        server.send(signal.SIGTERM)
        assert server.wait() == 0
    logged = log_file.read_text().splitlines()
    assert any(line.startswith("INFO|servekit.cli|listening: echo on tcp://") for line in logged)
    assert any(line.startswith("INFO|servekit.metrics|shutdown: complete after") for line in logged)
    # Nothing went to stderr through logging: the file took it all.
    assert not [line for line in server.lines if "servekit.cli" in line]


@pytest.mark.parametrize(
    ("content", "suffix", "extra", "message"),
    [
        ("{not json", ".json", [], "not valid JSON"),
        (
            '{"version": 1, "handlers": {"h": {"class": "no.such.Handler"}}}',
            ".json",
            [],
            "Unable to configure handler 'h'",
        ),
        ("version = 1\n", ".yaml", [], "expected a .json or .toml file"),
        (
            '{"version": 1}',
            ".json",
            ["--log-format", "json"],
            "command line: --log-format: not used with --log-config",
        ),
    ],
)
def test_bad_log_config_is_one_line(
    tmp_path: Path, content: str, suffix: str, extra: list[str], message: str
) -> None:
    """A log config that cannot be read or applied, or flags it would ignore, stop the command with exit status 2 and one line, before anything binds."""
    path = tmp_path / f"logging{suffix}"
    path.write_text(content)
    proc = run_cli("echo", "--bind", "127.0.0.1:0", "--log-config", str(path), *extra)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("servekit: error: "), proc.stderr
    assert message in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


def test_metrics_bind_errors() -> None:
    """A --metrics-bind that is no TCP address is exit 2; one already in use is exit 1 naming the metrics listener."""
    proc = run_cli("echo", "--bind", "127.0.0.1:0", "--metrics-bind", "unix:/tmp/metrics.sock")
    assert proc.returncode == 2
    assert "--metrics-bind" in proc.stderr and "not a TCP address" in proc.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_cli("echo", "--bind", "127.0.0.1:0", "--metrics-bind", f"127.0.0.1:{port}")
    assert proc.returncode == 1, proc.stderr
    assert (
        f"cannot listen on --metrics-bind 127.0.0.1:{port}: Address already in use" in proc.stderr
    )


def doc_block(text: str, language: str, first_line: str) -> str:
    """The fenced block of the given language in text whose first line is first_line."""
    for block in text.split(f"```{language}\n")[1:]:
        body = block.split("```", 1)[0]
        if body.startswith(first_line):
            return body
    raise AssertionError(f"no ```{language} block starting with {first_line!r}")


def test_operations_doc_setup_works_as_written(tmp_path: Path) -> None:
    """docs/operations.md: its handler module, settings file and logging file run as written (only the ports and the log directory are the test's)."""
    doc = (ROOT / "docs" / "operations.md").read_text()
    (tmp_path / "myapp.py").write_text(doc_block(doc, "python", "# /srv/myapp/myapp.py"))
    settings = doc_block(doc, "toml", "# /etc/myapp/servekit.toml")
    settings = settings.replace('"0.0.0.0:9000"', '"127.0.0.1:0"')
    settings = settings.replace('"127.0.0.1:9100"', '"127.0.0.1:0"').replace(
        "workers = 4", "workers = 2"
    )
    config = tmp_path / "servekit.toml"
    config.write_text(settings)
    logging_config = tmp_path / "logging.json"
    logging_config.write_text(
        doc_block(doc, "json", '{\n  "version": 1,').replace("/var/log/myapp", str(tmp_path))
    )
    env = {"PYTHONPATH": f"{tmp_path}:{ROOT / 'src'}"}

    def check(*args: str) -> None:
        checked = subprocess.run(
            [sys.executable, "-m", "servekit", "config", *args],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=tmp_path,
            env={**os.environ, **env},
        )
        assert checked.returncode == 0, checked.stderr

    check("--config", str(config))
    # log_format = "json" in the file and --log-config together would be refused: the
    # page shows them as two alternatives, so run them one at a time.
    with ServerProcess.cli("serve", "--config", str(config), env=env) as server:
        server.wait_ready()
        port = int(server.wait_for(METRICS_LINE).group(1))
        assert server.request(b"hello\n") == b"HELLO\n"
        assert http_get(port, "/readyz")[:3:2] == (200, "2 workers serving\n")
        assert value(scrape(port), "servekit_connections_accepted_total") == 1
        server.send(signal.SIGTERM)
        assert server.wait() == 0
    assert any(
        json.loads(line)["logger"] == "servekit.access"
        for line in server.lines
        if line.startswith("{")
    )
    settings_without_format = settings.replace('log_format = "json"\n', "")
    config.write_text(settings_without_format)
    check("--config", str(config), "--log-config", str(logging_config))
    with ServerProcess.cli(
        "serve", "--config", str(config), "--log-config", str(logging_config), env=env
    ) as server:
        server.wait_ready()
        assert server.request(b"again\n") == b"AGAIN\n"
        server.send(signal.SIGTERM)
        assert server.wait() == 0
    access = (tmp_path / "access.log").read_text().splitlines()
    assert len(access) == 1 and json.loads(access[0])["outcome"] == "done"
    others = [json.loads(line) for line in server.lines if line.startswith("{")]
    assert any(entry["message"].startswith("shutdown: complete after") for entry in others)
