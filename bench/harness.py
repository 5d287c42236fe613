# What bench/connections.py and bench/httpbench.py share: contenders given as whole
# commands, the clients that keep many connections open, and the report.
#
# Strategy. run.py's contenders are scripts with one READY contract; these drivers also
# run real commands as a user types them (`python -m servekit echo ...`, gunicorn,
# waitress), each announcing its port its own way. So a contender here is an argv and
# a regular expression that finds the port in what the server writes:
#   1. start the argv pinned to the server CPU, in its own session (one process group),
#      stdout and stderr to files under bench/build/logs/ (a pipe nobody drains would
#      block a server that logs a traceback per connection);
#   2. read both files until the pattern matches (10 s, else the contender is "n/a");
#   3. probe: a real request must be answered (10 s), so a server that prints its
#      address before its workers are up (gunicorn) is not measured while it boots;
#   4. run the case; then SIGTERM the group and SIGKILL what is left (run.stop_group).
# The clients run in the driver itself, pinned to the load CPU: non-blocking sockets
# on one selector, every phase bounded by a deadline.
from __future__ import annotations

import argparse
import contextlib
import datetime
import errno
import importlib.metadata
import importlib.util
import json
import os
import re
import selectors
import shlex
import shutil
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from run import (
    BUILD,
    HOST,
    LOGS,
    READY_TIMEOUT,
    ROOT,
    SERVERS,
    STOP_GRACE,
    NotAvailable,
    Pinning,
    become_subreaper,
    cpu_share,
    fmt_bytes,
    log_tail,
    machine,
    other_cpu_seconds,
    raise_nofile,
    stop_group,
    wait_until_quiet,
)

DOCROOT = BUILD / "docroot"
STATIC_FILE = "hello.txt"
STATIC_SIZE = 1024
TLS_DIR = BUILD / "tls"
# A server that prints its address but answers nothing for this long is not serving.
ANSWER_TIMEOUT = 10.0
NOISY = 0.1  # as run.py: other processes at a tenth of a CPU or more disturb a case

# Patterns that find the port in a server's output (group 1).
READY = r"^READY (\d+)$"  # bench/servers/common.py's contract
SERVEKIT_READY = r"^servekit: ready: .* on tcp://[^ ,]*:(\d+)"  # servekit.cli, on stdout


# -- contenders ---------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    """A contender: a command line and how it says where it listens.

    argv items are str.format() templates over Context.places ({python}, {docroot},
    {cert}, {key}, ...); an item that is exactly "{name}" for a place holding a list
    expands to that list (possibly empty). Every server binds port 0 and reports the
    port it got: `ready` is searched in its stdout and stderr, line by line.
    """

    name: str
    description: str
    argv: tuple[str, ...]
    ready: str = READY
    cwd: str = "{root}"
    needs: tuple[str, ...] = ()  # importable modules; a missing one makes it "n/a"


def script(name: str, *args: str) -> tuple[str, ...]:
    """argv of a bench/servers/ script under the READY contract."""
    return ("{python}", str(SERVERS / name), "--host", HOST, "--port", "0", *args)


def servekit_cli(*args: str) -> tuple[str, ...]:
    """argv of the servekit command as a user runs it (README: `python -m servekit`)."""
    return ("{python}", "-m", "servekit", *args, "--bind", f"{HOST}:0")


@dataclass
class Context:
    """Everything a case needs besides its contender and its settings."""

    driver: str  # log-file prefix: the logs of both drivers share bench/build/logs/
    pin: Pinning
    quiet_wait: float
    src: Path  # the servekit source tree the contenders import
    places: dict[str, str | list[str]] = field(default_factory=dict)

    def argv(self, server: Server) -> list[str]:
        out: list[str] = []
        for item in server.argv:
            key = item[1:-1] if item.startswith("{") and item.endswith("}") else ""
            value = self.places.get(key)
            if isinstance(value, list):
                out += value
            else:
                out.append(item.format(**self.places))
        return out


def base_places() -> dict[str, str | list[str]]:
    return {"python": sys.executable, "root": str(ROOT), "docroot": str(DOCROOT)}


@dataclass
class Running:
    """A started contender: its process (the group leader) and the port it serves."""

    server: Server
    proc: subprocess.Popen[bytes]
    port: int
    stderr: Path
    stdout: Path
    ready_line: str = ""
    stop: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid


Probe = Callable[[int, float], float]  # (port, timeout) -> seconds to the answer


@contextlib.contextmanager
def running(server: Server, ctx: Context, case: str, probe: Probe | None) -> Iterator[Running]:
    """Start server, wait for its port and for an answer to probe, stop it on exit."""
    missing = [m for m in server.needs if importlib.util.find_spec(m) is None]
    if missing:
        raise NotAvailable(f"{', '.join(missing)} not installed (pip install -e '.[bench]')")
    argv = [*ctx.pin.prefix(ctx.pin.server_cpu), *ctx.argv(server)]
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {
        **os.environ,
        # module:Class and module:app targets live in bench/servers/; the servekit of
        # --src (default: this checkout's) comes first even if another one is installed.
        "PYTHONPATH": os.pathsep.join([str(SERVERS), str(ctx.src), *paths]),
        # stdout is a file, not a terminal: without this a ready line could sit in a
        # block buffer.
        "PYTHONUNBUFFERED": "1",
    }
    LOGS.mkdir(parents=True, exist_ok=True)
    stem = f"{ctx.driver}-{case}-{server.name}"
    out_path, err_path = LOGS / f"{stem}.out", LOGS / f"{stem}.log"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            cwd=server.cwd.format(**ctx.places),
            env=env,
            start_new_session=True,
        )
    run = Running(server, proc, 0, err_path, out_path)
    try:
        run.port, run.ready_line = wait_for_port(proc, server.ready, out_path, err_path)
        if probe is not None:
            wait_answering(probe, run.port)
        yield run
    finally:
        run.stop = stop_group(proc)


def wait_for_port(proc: subprocess.Popen[bytes], ready: str, *paths: Path) -> tuple[int, str]:
    """The port the server announced in one of paths, and the line that says so;
    NotAvailable after 10 s."""
    pattern = re.compile(ready, re.MULTILINE)
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        exited = proc.poll()  # before reading, so that a last line is not missed
        for path in paths:
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace")
                if match := pattern.search(text):
                    line = text[text.rfind("\n", 0, match.start()) + 1 :].split("\n", 1)[0]
                    return int(match.group(1)), line
        if exited is not None:
            raise NotAvailable(f"exited with status {exited} before ready: {log_tail(paths[-1])}")
        if time.monotonic() > deadline:
            raise NotAvailable(f"no ready line within {READY_TIMEOUT:.0f} s: {log_tail(paths[-1])}")
        time.sleep(0.02)


def wait_answering(probe: Probe, port: int) -> None:
    deadline = time.monotonic() + ANSWER_TIMEOUT
    while True:
        try:
            probe(port, max(0.1, deadline - time.monotonic()))
            return
        except (OSError, ProbeFailed) as exc:
            if time.monotonic() >= deadline:
                raise NotAvailable(
                    f"announced port {port} but no answer within {ANSWER_TIMEOUT:.0f} s: {exc}"
                ) from exc
            time.sleep(0.05)


class CaseError(Exception):
    """The case ran but its client could not finish (reported as "error")."""


def run_case(
    server: Server,
    ctx: Context,
    case: str,
    probe: Probe | None,
    body: Callable[[Running], dict[str, Any]],
) -> dict[str, Any]:
    """One fresh server, one case: body(running) -> figures, plus what every case records.

    Never raises for a contender's failure: "n/a" when it does not start or answer,
    "error" when the case itself broke, and the run goes on. An exception that is no
    contender's doing (a bug here) is an "error" too, with its traceback on stderr,
    and marks the record `driver_bug` so that the driver exits non-zero at the end.
    """
    record: dict[str, Any] = {"status": "ok"}
    case_started = time.monotonic()
    if ctx.quiet_wait > 0:
        record["other_cpu_before"] = round(wait_until_quiet(ctx.quiet_wait), 3)
    run: Running | None = None
    try:
        with running(server, ctx, case, probe) as run:
            others = other_cpu_seconds({run.pid, os.getpgid(0)})
            started = time.monotonic()
            try:
                record.update(body(run))
            finally:
                wall = time.monotonic() - started
                after = other_cpu_seconds({run.pid, os.getpgid(0)})
                record["others_cpu"] = round(cpu_share(others, after, wall), 3)
    except NotAvailable as exc:
        return {"status": "n/a", "reason": str(exc), "case_s": elapsed(case_started)}
    except (CaseError, OSError) as exc:
        record.update(status="error", reason=f"{type(exc).__name__}: {exc}")
    except Exception as exc:
        traceback.print_exc()
        record.update(status="error", reason=f"driver bug: {type(exc).__name__}: {exc}")
        record["driver_bug"] = True
    if run is not None:
        record["ready_line"] = run.ready_line
        record["stop"] = run.stop
        with contextlib.suppress(OSError):
            record["stderr_lines"] = len(run.stderr.read_text(errors="replace").splitlines())
        if run.stop.get("left_behind"):
            record.update(status="error", reason=f"left behind: {run.stop['left_behind']}")
    record["case_s"] = elapsed(case_started)
    return record


def elapsed(since: float) -> float:
    return round(time.monotonic() - since, 2)


# -- one-shot clients (probes) ------------------------------------------------------


class ProbeFailed(Exception):
    """The server answered, but not what a working server answers."""


LINE = b"probe".ljust(63, b".") + b"\n"


def recv_exactly(sock: socket.socket, n: int, deadline: float) -> bytes:
    data = b""
    while len(data) < n:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ProbeFailed(f"closed by the server after {len(data)} of {n} bytes")
        data += chunk
    return data


def echo_round_trip(sock: socket.socket, deadline: float) -> None:
    sock.sendall(LINE)
    if (got := recv_exactly(sock, len(LINE), deadline)) != LINE:
        raise ProbeFailed(f"echo mismatch: {got[:40]!r}")


def probe_line(port: int, timeout: float) -> float:
    """Seconds from connect() to the echo of one line."""
    start = time.monotonic()
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        echo_round_trip(sock, start + timeout)
    return time.monotonic() - start


PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"  # 12 bytes, HAProxy's proxy-protocol.txt 2.2


def proxy_v2_header(sock: socket.socket) -> bytes:
    """A valid PROXY v2 header for a TCP4 connection, addresses from the socket itself."""
    src_host, src_port = sock.getsockname()[:2]
    dst_host, dst_port = sock.getpeername()[:2]
    addresses = (
        socket.inet_aton(src_host)
        + socket.inet_aton(dst_host)
        + struct.pack("!HH", src_port, dst_port)
    )
    # 0x21: version 2, command PROXY; 0x11: AF_INET, STREAM; then the address length.
    return PROXY_V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x11, len(addresses)) + addresses


def probe_proxy_line(port: int, timeout: float) -> float:
    """Seconds from connect() to the echo of a line sent after a PROXY v2 header."""
    start = time.monotonic()
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(proxy_v2_header(sock))
        echo_round_trip(sock, start + timeout)
    return time.monotonic() - start


def tls_client_context() -> ssl.SSLContext:
    # No verification: the certificate is a throwaway made for this run, and what is
    # timed is the server's handshake and echo, not the client's trust decisions.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def probe_tls_line(port: int, timeout: float) -> float:
    """Seconds from connect() through the TLS handshake to the echo of one line."""
    start = time.monotonic()
    context = tls_client_context()
    with (
        socket.create_connection((HOST, port), timeout=timeout) as raw,
        context.wrap_socket(raw, do_handshake_on_connect=False) as sock,
    ):
        sock.do_handshake()
        echo_round_trip(sock, start + timeout)
    return time.monotonic() - start


def http_request(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()


def parse_http_response(buf: bytes | bytearray) -> tuple[int, int] | None:
    """(bytes used, status) of the first whole response in buf; None if incomplete.

    Enough HTTP for the contenders here: every response has a Content-Length (the
    static file and the WSGI app both set it). Raises ValueError on a malformed one.
    """
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise ValueError(f"not an HTTP status line: {lines[0][:60]!r}")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    total = end + 4 + length
    return (total, int(parts[1])) if len(buf) >= total else None


def probe_http(path: str) -> Probe:
    def probe(port: int, timeout: float) -> float:
        """Seconds from connect() to a whole 200 response to GET path."""
        start = time.monotonic()
        deadline = start + timeout
        with socket.create_connection((HOST, port), timeout=timeout) as sock:
            sock.sendall(http_request(path))
            buf = b""
            while (parsed := parse_http_response(buf)) is None:
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                chunk = sock.recv(65536)
                if not chunk:
                    raise ProbeFailed(f"closed by the server after {len(buf)} bytes")
                buf += chunk
            if parsed[1] != 200:
                raise ProbeFailed(f"status {parsed[1]}")
        return time.monotonic() - start

    return probe


# -- many connections, two rounds -----------------------------------------------------


class Exchange(Protocol):
    """What one connection sends in a round, and how its answer is recognised."""

    def request(self, index: int, round_no: int) -> bytes: ...

    def answer(self, buf: bytearray, request: bytes) -> tuple[int, bool] | None:
        """(bytes used, whether it is the right answer), or None if incomplete."""


class EchoLines:
    """A 64-byte line per round, unique per connection and round; answer: the same line."""

    def request(self, index: int, round_no: int) -> bytes:
        return f"{index:07d} round {round_no}".encode().ljust(63, b".") + b"\n"

    def answer(self, buf: bytearray, request: bytes) -> tuple[int, bool] | None:
        if len(buf) < len(request):
            return None
        return len(request), bytes(buf[: len(request)]) == request


class HttpGets:
    """GET path per round on the same keep-alive connection; answer: a 200 response."""

    def __init__(self, path: str) -> None:
        self.path = path

    def request(self, index: int, round_no: int) -> bytes:
        return http_request(self.path)

    def answer(self, buf: bytearray, request: bytes) -> tuple[int, bool] | None:
        parsed = parse_http_response(buf)
        return None if parsed is None else (parsed[0], parsed[1] == 200)


@dataclass
class Conn:
    index: int
    sock: socket.socket
    connected: bool = False
    ended: str = ""  # why the connection ended early; "" while open
    buf: bytearray = field(default_factory=bytearray)
    pending: deque[tuple[int, bytes, float]] = field(default_factory=deque)  # round, sent, when
    latency: dict[int, float] = field(default_factory=dict)  # round -> seconds
    ok: dict[int, bool] = field(default_factory=dict)


class TwoRounds:
    """N connections that each ask once, stay open idle, and ask again.

    Round 1 opens the connections and each sends its first request as soon as it is
    connected. Opening is paced as in run.py's hold scenario: at most `paced`
    connections without their first answer at a time, so that a listen backlog of 5
    is never overrun (this measures parking and memory, not the backlog). A server
    that holds a thread per connection stops answering once its pool is full; after
    `stall` seconds without progress the rest are opened unpaced (at most 64
    handshakes at a time), and `ramp_stalled_at` says after how many. The round ends
    when every connection has its answer or failed, or at the deadline. `held()` is
    then called (the driver measures the server), the connections stay silent until
    `idle` seconds after the end of round 1, and round 2 sends the second request on
    every connection still open. A connection without an answer in round 1 sends
    its second request behind the first (answers come in order), so round 2 counts
    it only once both are back.
    """

    UNPACED_HANDSHAKES = 64

    def __init__(
        self,
        port: int,
        conns: int,
        exchange: Exchange,
        *,
        paced: int,
        stall: float,
        round_timeout: float,
    ) -> None:
        self.port = port
        self.n = conns
        self.exchange = exchange
        self.paced = paced
        self.stall = stall
        self.round_timeout = round_timeout
        self.unanswered = 0  # connecting, or connected without the round-1 answer
        self.last_progress = 0.0
        self.ramp_stalled_at: int | None = None
        self.sel = selectors.DefaultSelector()
        self.conns: list[Conn] = []
        self.connecting = 0
        self.round_no = 1
        self.failures: Counter[str] = Counter()
        self.last_connected = 0.0

    def run(self, idle: float, held: Callable[[], None]) -> dict[str, Any]:
        started = self.last_progress = time.monotonic()
        try:
            self.pump(started + self.round_timeout, opening=True)
            round1_end = time.monotonic()
            for conn in self.conns:
                if not conn.connected and not conn.ended:
                    self.end(conn, "connect timeout")
            answered1 = sum(1 in c.latency for c in self.conns)
            ok1 = sum(c.ok.get(1, False) for c in self.conns)
            lat1 = [c.latency[1] for c in self.conns if 1 in c.latency]
            held()
            time.sleep(max(0.0, round1_end + idle - time.monotonic()))
            self.round_no = 2
            round2_start = time.monotonic()
            for conn in self.conns:
                if not conn.ended:
                    self.send(conn)
            self.pump(round2_start + self.round_timeout, opening=False)
            round2_end = time.monotonic()
        finally:
            for conn in self.conns:
                with contextlib.suppress(OSError):
                    conn.sock.close()
            self.sel.close()
        return {
            "conns": self.n,
            "connected": sum(c.connected for c in self.conns),
            "answered": [answered1, sum(2 in c.latency for c in self.conns)],
            "ok": [ok1, sum(c.ok.get(2, False) for c in self.conns)],
            "latency_ms": [
                stats_ms(lat1),
                stats_ms([c.latency[2] for c in self.conns if 2 in c.latency]),
            ],
            "ramp_s": round(self.last_connected - started, 3) if self.last_connected else None,
            "ramp_stalled_at": self.ramp_stalled_at,
            "round_s": [round(round1_end - started, 3), round(round2_end - round2_start, 3)],
            "failures": dict(self.failures),
        }

    def resolved(self) -> bool:
        return len(self.conns) == self.n and all(
            c.ended or (self.round_no in c.latency) for c in self.conns
        )

    def pump(self, deadline: float, opening: bool) -> None:
        changed = True
        while True:
            while opening and len(self.conns) < self.n and self.may_open():
                self.open()
                changed = True
            if changed and self.resolved():
                return
            left = deadline - time.monotonic()
            if left <= 0:
                return
            changed = False
            for key, _mask in self.sel.select(min(left, 0.05)):
                changed = self.on_event(key.data) or changed

    def may_open(self) -> bool:
        if self.ramp_stalled_at is None:
            if self.unanswered < self.paced:
                return True
            if time.monotonic() - self.last_progress < self.stall:
                return False
            self.ramp_stalled_at = len(self.conns)
        return self.connecting < self.UNPACED_HANDSHAKES

    def open(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        conn = Conn(len(self.conns), sock)
        self.conns.append(conn)
        self.unanswered += 1
        err = sock.connect_ex((HOST, self.port))
        if err == 0:
            self.on_connected(conn)
        elif err == errno.EINPROGRESS:
            self.connecting += 1
            self.sel.register(sock, selectors.EVENT_WRITE, conn)
        else:
            self.end(conn, f"connect: {errno.errorcode.get(err, err)}")

    def on_connected(self, conn: Conn) -> None:
        conn.connected = True
        self.last_connected = self.last_progress = time.monotonic()
        if conn.sock.fileno() in self.sel.get_map():
            self.sel.modify(conn.sock, selectors.EVENT_READ, conn)
        else:
            self.sel.register(conn.sock, selectors.EVENT_READ, conn)
        self.send(conn)

    def send(self, conn: Conn) -> None:
        request = self.exchange.request(conn.index, self.round_no)
        try:
            sent = conn.sock.send(request)
        except OSError as exc:
            self.end(conn, f"send: {errno.errorcode.get(exc.errno or 0, exc)}")
            return
        if sent != len(request):  # a few dozen bytes into an empty send buffer
            self.end(conn, "send: partial")
            return
        conn.pending.append((self.round_no, request, time.monotonic()))

    def on_event(self, conn: Conn) -> bool:
        """Handle readiness of conn; True if a round got resolved for it."""
        if not conn.connected:
            self.connecting -= 1
            err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.end(conn, f"connect: {errno.errorcode.get(err, err)}")
                return True
            self.on_connected(conn)
            return False
        try:
            data = conn.sock.recv(65536)
        except BlockingIOError:
            return False
        except OSError as exc:
            self.end(conn, "reset" if isinstance(exc, ConnectionResetError) else str(exc))
            return True
        if not data:
            # After its last answer, a close is the server's keep-alive policy (HTTP/1.0,
            # gunicorn's sync worker); before it, a request went unanswered.
            self.end(conn, "closed by the server" + ("" if conn.pending else " after answering"))
            return True
        conn.buf += data
        answered = False
        while conn.pending:
            try:
                found = self.exchange.answer(conn.buf, conn.pending[0][1])
            except ValueError:
                self.end(conn, "malformed answer")
                return True
            if found is None:
                break
            used, ok = found
            del conn.buf[:used]
            round_no, _request, sent = conn.pending.popleft()
            conn.latency[round_no] = time.monotonic() - sent
            conn.ok[round_no] = ok
            if round_no == 1:
                self.unanswered -= 1
                self.last_progress = time.monotonic()
            answered = True
        return answered

    def end(self, conn: Conn, why: str) -> None:
        if 1 not in conn.latency:
            self.unanswered -= 1
        conn.ended = why
        self.failures[f"round {self.round_no}: {why}"] += 1
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(conn.sock)
        conn.sock.close()


def client_notes(name: str, record: dict[str, Any]) -> list[str]:
    """Report notes for a TwoRounds case: how connections ended before the last round."""
    failures = record.get("clients", {}).get("failures", {})
    if not failures:
        return []
    text = ", ".join(f"{why} ×{n}" for why, n in sorted(failures.items()))  # noqa: RUF001
    return [f"`{name}`: connections closed before the end: {text}."]


def stats_ms(seconds: list[float]) -> dict[str, float | None]:
    """p50, p99 and max in milliseconds (nearest rank), None for an empty list."""
    if not seconds:
        return {"p50": None, "p99": None, "max": None}
    ordered = sorted(seconds)

    def rank(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)

    return {"p50": rank(0.50), "p99": rank(0.99), "max": round(ordered[-1] * 1000, 3)}


# -- files the contenders serve -------------------------------------------------------


def make_docroot() -> Path:
    """bench/build/docroot/hello.txt: the 1 KiB file the http.server contenders serve."""
    DOCROOT.mkdir(parents=True, exist_ok=True)
    path = DOCROOT / STATIC_FILE
    body = b"Hello, world!\n".ljust(STATIC_SIZE - 1, b".") + b"\n"
    if not path.exists() or path.read_bytes() != body:
        path.write_bytes(body)
    return path


def make_tls_cert() -> tuple[Path, Path] | None:
    """A throwaway self-signed certificate and key in bench/build/tls/, or None.

    ECDSA P-256 (milliseconds to make, like tests/tls_certs.py), with the openssl
    command; None when it is missing, and the TLS case shows as n/a.
    """
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    TLS_DIR.mkdir(parents=True, exist_ok=True)
    cert, key = TLS_DIR / "cert.pem", TLS_DIR / "key.pem"
    argv = [
        openssl,
        *("req", "-x509", "-nodes", "-days", "2", "-newkey", "ec"),
        *("-pkeyopt", "ec_paramgen_curve:prime256v1"),
        *("-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
        *("-keyout", str(key), "-out", str(cert)),
    ]
    done = subprocess.run(argv, capture_output=True, timeout=30)
    return (cert, key) if done.returncode == 0 else None


# -- command line -------------------------------------------------------------------


def base_parser(
    description: str, contenders: list[str], scenarios: list[str]
) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description,
        epilog=f"contenders: {', '.join(contenders)}; scenarios: {', '.join(scenarios)}",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: every code path, small loads"
    )
    parser.add_argument("--only", help="comma-separated contenders")
    parser.add_argument("--scenarios", help="comma-separated scenarios")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results", help="output directory"
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        help="seconds to wait at most, before each case, for other processes to go quiet "
        "(default 5, 0 with --quick)",
    )
    parser.add_argument(
        "--src",
        type=Path,
        default=ROOT / "src",
        help="servekit source tree the contenders import (default: this checkout's src/; "
        "e.g. a `git archive` of another commit, to compare two)",
    )
    parser.add_argument(
        "--rounds",
        type=_rounds,
        default=1,
        help="run each scenario that has figures (throughput, p99) N times, the contenders "
        "alternating and their order rotating from round to round, and report medians and "
        "the median of each round's ratio to the baseline: this VM's speed drifts by up to "
        "2x between minutes, so one run decides nothing within about 30 %% (default 1)",
    )
    parser.add_argument("--server-cpu", type=int, default=1)
    parser.add_argument("--load-cpu", type=int, default=0)
    return parser


def _rounds(text: str) -> int:
    n = int(text)
    if not 1 <= n <= 50:
        raise argparse.ArgumentTypeError("--rounds: from 1 to 50")
    return n


def chosen(
    parser: argparse.ArgumentParser, given: str | None, known: list[str], what: str
) -> list[str]:
    if not given:
        return known
    wanted = [n.strip() for n in given.split(",") if n.strip()]
    unknown = sorted(set(wanted) - set(known))
    if unknown:
        parser.error(f"unknown {what} {', '.join(unknown)}; known: {', '.join(known)}")
    return [n for n in known if n in wanted]


def source_tree(parser: argparse.ArgumentParser, src: Path) -> Path:
    """--src, checked: without a servekit package there, the installed one would be
    measured without a word."""
    if not (src / "servekit" / "__init__.py").is_file():
        parser.error(f"--src {src}: no servekit package there (expected {src}/servekit/)")
    return src.resolve()


def pinning(server_cpu: int, load_cpu: int) -> Pinning:
    """Pin if taskset exists and both CPUs are ours (as run.py); warn otherwise."""
    cpus = os.sched_getaffinity(0)
    have_taskset = shutil.which("taskset") is not None
    pinned = have_taskset and server_cpu != load_cpu and {server_cpu, load_cpu} <= cpus
    if not pinned:
        print(
            f"warning: cannot pin (CPUs available {sorted(cpus)}, taskset "
            f"{'found' if have_taskset else 'missing'}); figures will be noisy",
            file=sys.stderr,
        )
    return Pinning(pinned, server_cpu, load_cpu)


def prepare(pin: Pinning) -> None:
    """Process-wide setup of a driver: pinning, subreaper, descriptor limit."""
    if pin.enabled:
        # The clients run in this process: keep them off the server's CPU.
        os.sched_setaffinity(0, {pin.load_cpu})
    become_subreaper()
    raise_nofile()


# -- report -------------------------------------------------------------------------


def fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "—"
    if ms < 1:
        return f"{ms * 1000:.0f} µs"
    if ms < 1000:
        return f"{ms:.1f} ms"
    return f"{ms / 1000:.2f} s"


def fmt_x(value: float | None, base: float | None) -> str:
    if value is None or not base:
        return "—"
    return f"×{value / base:.2f}"  # noqa: RUF001 - the multiplication sign is meant


def fmt_kib(n: float | None) -> str:
    return "—" if n is None else f"{n / 1024:.1f} KiB"


Cell = Callable[[dict[str, Any], dict[str, dict[str, Any]]], str]  # (record, all runs)


@dataclass(frozen=True)
class Figure:
    """A number that --rounds compares contenders by: value(record), or None when the
    record has none (a failed case)."""

    label: str
    value: Callable[[dict[str, Any]], float | None]


@dataclass(frozen=True)
class Scenario:
    """A family member: which contenders it runs, how, and its table."""

    name: str
    title: str
    explain: str
    contenders: tuple[str, ...]
    columns: tuple[tuple[str, Cell], ...]
    notes: Callable[[str, dict[str, Any]], list[str]] | None = None
    #: What --rounds N repeats the scenario for (none: it runs once), and the contender
    #: whose figures the others' are divided by, round by round.
    figures: tuple[Figure, ...] = ()
    baseline: str | None = None


def scenario_table(scenario: Scenario, runs: dict[str, dict[str, Any]]) -> list[str]:
    cols = scenario.columns
    lines = [
        "| contender | " + " | ".join(h for h, _ in cols) + " |",
        "|---|" + "--:|" * len(cols),
    ]
    notes: list[str] = []
    for name, record in runs.items():
        if record["status"] == "ok":
            cells = [cell(record, runs) for _, cell in cols]
        else:
            cells = [record["status"]] + [""] * (len(cols) - 1)
            notes.append(f"`{name}`: {record['status']}: {record.get('reason', '')}")
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
        if record["status"] == "ok" and scenario.notes is not None:
            notes += scenario.notes(name, record)
        if record.get("others_cpu", 0) >= NOISY:
            notes.append(
                f"`{name}`: other processes used {record['others_cpu']:.2f} CPU during this "
                "case; its figures are disturbed."
            )
        if record.get("stop", {}).get("sigkill"):
            notes.append(f"`{name}`: did not exit within {STOP_GRACE:g} s of SIGTERM; killed.")
    if notes:
        lines += ["", *[f"- {note}" for note in notes]]
    return lines


def tool_version(argv: list[str]) -> str:
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        text = (done.stdout or done.stderr).strip().splitlines()
        return text[0] if text else "?"
    return "not installed"


def write_report(
    out: Path,
    *,
    stem: str,
    title: str,
    intro: list[str],
    scenarios: list[Scenario],
    results: dict[str, Any],
) -> None:
    """out/<stem>.json (everything) and out/<stem>.md (one table per scenario)."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f"{stem}.json.tmp"
    tmp.write_text(json.dumps(results, indent=2, default=str) + "\n")
    tmp.replace(out / f"{stem}.json")
    meta = results["machine"]
    quick = " (--quick: a smoke run, not figures)" if results["quick"] else ""
    disturbed = [
        r
        for runs in results["runs"].values()
        for r in runs.values()
        if r.get("others_cpu", 0) >= NOISY
    ]
    lines = [
        f"# {title}",
        "",
        f"Run {results['date']} on `{meta['git']}`{quick}. Reproduce with:",
        "",
        "```sh",
        results["command"],
        "```",
        "",
        "| machine | |",
        "|---|---|",
        f"| CPU | {meta['cpu_model']}, {meta['logical_cpus']} logical CPUs |",
        f"| memory | {fmt_bytes(meta['memory_bytes'])} |",
        f"| kernel | {meta['kernel']} |",
        f"| Python | {meta['python']} |",
        f"| packages | {', '.join(f'{k} {v}' for k, v in meta['versions'].items())} |",
        f"| pinning | {results['pinning']} |",
        "",
        *intro,
        "",
    ]
    if disturbed:
        lines += [
            f"**Warning: other processes used {NOISY:g} CPU or more during {len(disturbed)} "
            "cases.** Those cases are marked below; rerun them on a quiet machine.",
            "",
        ]
    for scenario in scenarios:
        runs = results["runs"].get(scenario.name)
        if not runs:
            continue
        lines += [f"## {scenario.title}", "", scenario.explain, ""]
        lines += scenario_table(scenario, runs)
        lines.append("")
        samples = results.get("rounds", {}).get(scenario.name)
        if samples:
            lines += rounds_table(scenario, samples)
            lines.append("")
    (out / f"{stem}.md").write_text("\n".join(lines))


def results_skeleton(
    command: str, quick: bool, pin: Pinning, settings: dict[str, Any], versions: list[str]
) -> dict[str, Any]:
    meta = machine()
    for dist in versions:
        try:
            meta["versions"][dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            meta["versions"][dist] = "not installed"
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "quick": quick,
        "machine": meta,
        "pinning": (
            f"server and its children on CPU {pin.server_cpu}, clients and driver on CPU "
            f"{pin.load_cpu} (taskset)"
            if pin.enabled
            else "off: figures are not comparable"
        ),
        "settings": settings,
        "runs": {},
    }


def exit_status(results: dict[str, Any]) -> int:
    """1 if some case hit a bug in the driver (see run_case), else 0: a contender that
    is n/a or fails is a finding, not a failure of the benchmark."""
    bugs = [r for runs in results["runs"].values() for r in runs.values() if r.get("driver_bug")]
    return 1 if bugs else 0


def command_line(script_name: str, argv: list[str] | None) -> str:
    given = sys.argv[1:] if argv is None else argv
    return shlex.join(["python", f"bench/{script_name}", *given])


def run_selected(
    selected: list[Any],
    only: Any,
    servers: dict[str, Server],
    results: dict[str, Any],
    *,
    run_one: Callable[[Any, Server], dict[str, Any]],
    summary: Callable[[Any, str, dict[str, Any]], str],
    rounds: int = 1,
) -> None:
    """Run every chosen contender of every chosen scenario, printing a line each; record
    the runs, the elapsed time and the contenders' descriptions in results.

    With rounds > 1, a scenario that has figures runs that many times, every contender
    once per round, in an order that rotates from round to round (so none always runs
    first, or right after the same neighbour); results["rounds"][scenario][contender]
    [figure label] lists each round's figure. The tables show the first round's records.
    """
    started = time.monotonic()
    for scenario in selected:
        runs = results["runs"].setdefault(scenario.name, {})
        names = [name for name in scenario.contenders if name in only]
        repeat = rounds if scenario.figures and len(names) > 1 else 1
        samples: dict[str, dict[str, list[float | None]]] = {
            name: {f.label: [] for f in scenario.figures} for name in names
        }
        for round_no in range(repeat):
            shift = round_no % len(names) if names else 0
            for name in names[shift:] + names[:shift]:
                record = run_one(scenario, servers[name])
                if round_no == 0:
                    runs[name] = record
                line = summary(scenario, name, record)
                if repeat > 1:
                    line += f"  [round {round_no + 1}/{repeat}]"
                print(line, flush=True)
                ok = record.get("status") == "ok"
                for figure in scenario.figures:
                    samples[name][figure.label].append(figure.value(record) if ok else None)
        if repeat > 1:
            results.setdefault("rounds", {})[scenario.name] = samples
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    results["contenders"] = {n: s.description for n, s in servers.items()}


def rounds_table(
    scenario: Scenario, samples: dict[str, dict[str, list[float | None]]]
) -> list[str]:
    """Medians over the rounds, and for each contender the median of its per-round ratio
    to the baseline (a pair of figures from the same round: slow spells of the machine
    hit both)."""
    figures = scenario.figures
    count = max((len(v) for per in samples.values() for v in per.values()), default=0)
    lines = [
        f"Alternated rounds ({count}; the order rotates each round): medians, and the median "
        f"of each round's ratio to `{scenario.baseline}`.",
        "",
        "| contender | "
        + " | ".join(f"{f.label} median | vs baseline" for f in figures)
        + " | every round |",
        "|---|" + "--:|--:|" * len(figures) + "---|",
    ]
    base = samples.get(scenario.baseline or "", {})
    for name, per in samples.items():
        cells = []
        for figure in figures:
            values = per[figure.label]
            known = [v for v in values if v is not None]
            median = statistics.median(known) if known else None
            ratios = [
                v / b
                for v, b in zip(values, base.get(figure.label, []), strict=False)
                if v is not None and b
            ]
            cells.append(_fmt_figure(median))
            cells.append(f"x{statistics.median(ratios):.2f}" if ratios else "n/a")
        every = "; ".join(
            f"{f.label} " + ", ".join(_fmt_figure(v) for v in per[f.label]) for f in figures
        )
        lines.append(f"| `{name}` | " + " | ".join(cells) + f" | {every} |")
    return lines


def _fmt_figure(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.0f}" if value >= 100 else f"{value:.2f}"


def contenders_intro(
    headline: str, servers: dict[str, Server], results: dict[str, Any]
) -> list[str]:
    """A report's opening lines: headline, then each contender that ran, described."""
    return [
        headline,
        "",
        *[
            f"- `{n}`: {s.description}"
            for n, s in servers.items()
            if any(n in r for r in results["runs"].values())
        ],
    ]
