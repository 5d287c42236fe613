#!/usr/bin/env python3
# Connection scenarios (issue 10: a connection is not a thread). Writes
# connections.md and connections.json into --out (default bench/results/).
#
# What is measured, per scenario (bench/README.md has the why):
#   idle-echo      1,000 line-echo clients: a line, 1 s idle, a second line; answered
#                  per round, and server RSS added per held connection;
#   idle-http      500 keep-alive clients of an unmodified SimpleHTTPRequestHandler
#                  (HTTP/1.1): GET, 1 s idle, GET; 200 responses out of 1,000;
#   stalled-proxy  16 clients stall mid-PROXY-v2-signature on 4 threads; then a real
#                  client's time to its echo;
#   stalled-tls    200 clients stall mid-ClientHello on 8 threads; then a real TLS
#                  client's time to its echo;
#   stalled-http   200 clients stall mid-request-head against http.server on 8 threads
#                  (servekit) or a thread each (stdlib); then a real client's time to
#                  its response;
#   pingpong-128, churn   run.py's loadgen scenarios on `servekit echo --workers 2
#                  --threads 32` beside the stdlib (backlog 5 and 1024), asyncio, uvloop;
#                  for scale, servekit with one worker and the C epoll server.
# Contenders are real commands (`python -m servekit echo ...`) or bench/servers/
# scripts; one that does not start or answer shows as n/a and the run goes on.
from __future__ import annotations

import contextlib
import socket
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import run
from harness import (
    PROXY_V2_SIGNATURE,
    SERVEKIT_READY,
    STATIC_FILE,
    CaseError,
    Context,
    EchoLines,
    Figure,
    HttpGets,
    Probe,
    ProbeFailed,
    Running,
    Scenario,
    Server,
    TwoRounds,
    base_parser,
    base_places,
    chosen,
    client_notes,
    command_line,
    contenders_intro,
    exit_status,
    fmt_kib,
    fmt_ms,
    fmt_x,
    make_docroot,
    make_tls_cert,
    pinning,
    prepare,
    probe_http,
    probe_line,
    probe_proxy_line,
    probe_tls_line,
    results_skeleton,
    run_case,
    run_selected,
    script,
    servekit_cli,
    source_tree,
    tls_client_context,
    write_report,
)
from run import HOST, fmt_bytes, fmt_int, fmt_us, tree_memory

STDLIB = "stdlib_threading"
STDLIB_1024 = "stdlib_threading_1024"


def servekit_echo(
    workers: int, threads: int, *extra: str, name: str = "", note: str = ""
) -> Server:
    """`python -m servekit echo --workers W --threads T ...` as a contender."""
    args = ("echo", "--workers", str(workers), "--threads", str(threads), *extra)
    return Server(
        name or f"servekit_echo_{workers}x{threads}",
        f"`python -m servekit {' '.join(args)}`{note}",
        servekit_cli(*args),
        ready=SERVEKIT_READY,
    )


# The loadgen scenarios' contenders: the judged ones (issue 10: the stdlib with both
# backlogs, servekit's `--workers 2 --threads 32`), and for scale the event loops, one
# servekit worker, and a C server.
LOAD_CONTENDERS = (
    STDLIB,
    STDLIB_1024,
    "asyncio",
    "uvloop",
    "servekit_echo_2x32",
    "servekit_echo_1x32",
    "echo_epoll",
)

SERVERS = {
    s.name: s
    for s in [
        Server(
            STDLIB,
            "socketserver.ThreadingTCPServer as shipped (listen backlog 5), line echo",
            script("stdlib_threading.py"),
        ),
        Server(
            STDLIB_1024,
            "the same with request_queue_size = 1024",
            script("stdlib_threading_1024.py"),
        ),
        Server(
            "asyncio", "asyncio.start_server, StreamReader.readline", script("asyncio_server.py")
        ),
        Server(
            "uvloop", "the asyncio code on uvloop", script("uvloop_server.py"), needs=("uvloop",)
        ),
        servekit_echo(1, 8),
        servekit_echo(2, 32),
        servekit_echo(
            1,
            32,
            note=": one process, what the pinned server's one CPU calls for (two workers share "
            "it and take turns)",
        ),
        Server(
            "echo_epoll",
            "bench/c/echo_epoll.c: C, one thread, epoll; what the kernel and this machine "
            "allow, for scale",
            (str(run.ECHO_EPOLL), "--host", HOST, "--port", "0"),
        ),
        servekit_echo(1, 4, "--proxy-protocol", "v2", name="servekit_echo_proxy_1x4"),
        Server(
            "servekit_echo_tls_1x8",
            "`python -m servekit echo --workers 1 --threads 8 --certfile C --keyfile K` "
            "(a self-signed ECDSA certificate made at run time)",
            servekit_cli(
                "echo",
                "--workers",
                "1",
                "--threads",
                "8",
                "--certfile",
                "{cert}",
                "--keyfile",
                "{key}",
            ),
            ready=SERVEKIT_READY,
        ),
        Server(
            "stdlib_http",
            "http.server.ThreadingHTTPServer as shipped, SimpleHTTPRequestHandler with HTTP/1.1",
            script("http_stdlib.py"),
            cwd="{docroot}",
        ),
        Server(
            "servekit_serve_8",
            "`python -m servekit serve http_handler:Handler --threads 8` (default workers)",
            servekit_cli("serve", "http_handler:Handler", "--threads", "8"),
            ready=SERVEKIT_READY,
            cwd="{docroot}",
        ),
        Server(
            "servekit_serve_8_data",
            "the same with `--wait-for-request data` (a thread once the first bytes are in: "
            "the behaviour before the head wait)",
            servekit_cli(
                "serve", "http_handler:Handler", "--threads", "8", "--wait-for-request", "data"
            ),
            ready=SERVEKIT_READY,
            cwd="{docroot}",
        ),
    ]
}


@dataclass(frozen=True)
class Settings:
    idle_conns: int = 1000
    http_idle_conns: int = 500
    idle_seconds: float = 1.0
    # A round ends when every connection has its answer, or after this long. 10 s
    # covers the ramp-up (1,000 connects) and two SYN retransmissions (1 s, 3 s) for a
    # listen backlog of 5; a server that parks nothing never gets further anyway.
    round_timeout: float = 10.0
    # Opening: at most this many connections without their first answer (run.py's hold
    # scenario uses 4, so that a listen backlog of 5 is never overrun) ...
    paced: int = 4
    # ... until the server answers nothing for this long; then the rest open unpaced.
    # A server that answers at all does so in milliseconds; a full pool never does.
    ramp_stall: float = 0.5
    proxy_stallers: int = 16
    tls_stallers: int = 200
    http_stallers: int = 200
    # The stallers' bytes are out; give the server this long to pick them up before
    # the real client comes (it accepts in its loop: far less than this).
    stall_settle: float = 0.2
    probes: int = 3  # real clients behind the stallers, one after another
    probe_timeout: float = 30.0
    quiet_wait: float = 5.0
    loadgen: run.Settings = run.FULL


FULL = Settings()
QUICK = Settings(
    idle_conns=60,
    http_idle_conns=40,
    idle_seconds=0.2,
    round_timeout=1.5,
    ramp_stall=0.3,
    tls_stallers=24,
    http_stallers=24,
    probes=1,
    probe_timeout=2.0,
    quiet_wait=0.0,
    loadgen=run.QUICK,
)


# -- cells --------------------------------------------------------------------------


def rss_per_conn(record: dict[str, Any]) -> float | None:
    """Server RSS with every connection held minus RSS idle, per client (not per answer)."""
    if record.get("status") != "ok" or "rss_held" not in record:
        return None
    return max(0, record["rss_held"] - record["rss_idle"]) / record["clients"]["conns"]


def answered(round_no: int, key: str = "ok") -> Callable[[dict[str, Any], dict[str, Any]], str]:
    return lambda r, _runs: f"{r['clients'][key][round_no - 1]:,} / {r['clients']['conns']:,}"


def slowest(round_no: int) -> Callable[[dict[str, Any], dict[str, Any]], str]:
    return lambda r, _runs: fmt_ms(r["clients"]["latency_ms"][round_no - 1]["max"])


def rate(r: dict[str, Any]) -> float | None:
    return float(r["load"]["rate"]) if r.get("status") == "ok" and "load" in r else None


def p99(r: dict[str, Any]) -> float | None:
    return float(r["load"]["latency_us"]["p99"]) if rate(r) is not None else None


def vs(base: str, value: Callable[[dict[str, Any]], float | None]) -> Callable[..., str]:
    return lambda r, runs: fmt_x(value(r), value(runs.get(base, {})))


def loadgen_notes(name: str, record: dict[str, Any]) -> list[str]:
    if record.get("cpu", {}).get("loadgen", 0) >= run.LOADGEN_SATURATED:
        return [
            f"`{name}`: loadgen used {record['cpu']['loadgen']:.2f} of its CPU: "
            "it may be the limit, not the server."
        ]
    return []


def stalled_notes(name: str, record: dict[str, Any]) -> list[str]:
    if record.get("probe_error"):
        return [f"`{name}`: the real client behind the stallers: {record['probe_error']}."]
    return []


def behind(r: dict[str, Any], _runs: dict[str, Any]) -> str:
    got = [x for x in r["behind_s"] if x is not None]
    if len(got) < len(r["behind_s"]):
        return f"> {r['probe_timeout']:g} s (no answer)"
    return f"{fmt_ms(min(got) * 1000)} .. {fmt_ms(max(got) * 1000)}"


def under_1s(r: dict[str, Any], _runs: dict[str, Any]) -> str:
    got = r["behind_s"]
    return "yes" if got and all(x is not None and x < 1.0 for x in got) else "**no**"


IDLE_COLUMNS: tuple[tuple[str, Any], ...] = (
    ("round 1 answered", answered(1)),
    ("round 2 answered", answered(2)),
    ("slowest answer, round 1", slowest(1)),
    ("slowest answer, round 2", slowest(2)),
    ("RSS idle", lambda r, _: fmt_bytes(r["rss_idle"])),
    ("RSS holding", lambda r, _: fmt_bytes(r["rss_held"])),
    ("RSS per held connection", lambda r, _: fmt_kib(rss_per_conn(r))),
    ("vs stdlib", vs(STDLIB, rss_per_conn)),
    ("threads holding", lambda r, _: fmt_int(r["threads_held"])),
)

PINGPONG_COLUMNS: tuple[tuple[str, Any], ...] = (
    ("req/s", lambda r, _: fmt_int(r["load"]["rate"])),
    ("vs stdlib", vs(STDLIB, rate)),
    ("vs stdlib 1024", vs(STDLIB_1024, rate)),
    ("p99", lambda r, _: fmt_us(r["load"]["latency_us"]["p99"])),
    ("p99 vs stdlib 1024", vs(STDLIB_1024, p99)),
    ("unanswered", lambda r, _: f"{r['load']['unanswered']} / {r['load']['conns']}"),
    ("slowest first response", lambda r, _: run.first_response(r["load"])),
    ("listen drops", lambda r, _: fmt_int(r["listen_drops"])),
    ("CPU server / loadgen", lambda r, _: f"{r['cpu']['server']:.2f} / {r['cpu']['loadgen']:.2f}"),
)

CHURN_COLUMNS: tuple[tuple[str, Any], ...] = (
    ("conn/s", lambda r, _: fmt_int(r["load"]["rate"])),
    ("vs stdlib", vs(STDLIB, rate)),
    ("vs stdlib 1024", vs(STDLIB_1024, rate)),
    ("p99", lambda r, _: fmt_us(r["load"]["latency_us"]["p99"])),
    ("starved slots", lambda r, _: f"{r['load']['unanswered']} / {r['load']['conns']}"),
    ("errors", lambda r, _: run.error_text(r["load"])),
    ("listen drops", lambda r, _: fmt_int(r["listen_drops"])),
    ("CPU server / loadgen", lambda r, _: f"{r['cpu']['server']:.2f} / {r['cpu']['loadgen']:.2f}"),
)

STALLED_COLUMNS: tuple[tuple[str, Any], ...] = (
    ("stallers", lambda r, _: f"{r['stallers_open']} / {r['stallers']}"),
    ("answer alone", lambda r, _: fmt_ms(r["alone_s"] * 1000)),
    ("answer behind the stallers", behind),
    ("under 1 s", under_1s),
    ("stallers closed by the server", lambda r, _: str(r["stallers_closed"])),
)


# What --rounds compares ping-pong and churn by: the loadgen's rate and p99 (ms).
LOAD_FIGURES = (
    Figure("per s", lambda r: r["load"]["rate"]),
    Figure("p99 ms", lambda r: r["load"]["latency_us"]["p99"] / 1000),
)


def scenarios(s: Settings) -> list[Scenario]:
    return [
        Scenario(
            "idle-echo",
            f"Idle keep-alive, line echo, {s.idle_conns:,} clients",
            f"Each client connects, sends a 64-byte line and reads the echo (round 1), stays "
            f"open and silent for {s.idle_seconds:g} s, then sends a second line on the same "
            f"connection (round 2). A round ends when every connection has its answer or "
            f"after {s.round_timeout:g} s. *RSS per held connection* is the server's RSS (summed "
            "over its processes) with every client connected after round 1, minus its RSS "
            "before the first client, divided by the number of clients.",
            (STDLIB, "asyncio", "servekit_echo_1x8"),
            IDLE_COLUMNS,
            client_notes,
        ),
        Scenario(
            "idle-http",
            f"Idle keep-alive, http.server, {s.http_idle_conns:,} clients",
            'An unmodified `SimpleHTTPRequestHandler` with `protocol_version = "HTTP/1.1"` '
            f"serving a 1 KiB file. Each client sends `GET /{STATIC_FILE}` (round 1), stays "
            f"idle {s.idle_seconds:g} s on the same keep-alive connection, and sends it again "
            f"(round 2); the columns count 200 responses. Rounds end after {s.round_timeout:g} s "
            "at most.",
            ("stdlib_http", "servekit_serve_8"),
            (
                ("round 1: 200", answered(1)),
                ("round 2: 200", answered(2)),
                (
                    "200 responses",
                    lambda r, _: f"{sum(r['clients']['ok']):,} / {2 * r['clients']['conns']:,}",
                ),
                ("slowest answer, round 1", slowest(1)),
                ("slowest answer, round 2", slowest(2)),
                ("RSS holding", lambda r, _: fmt_bytes(r["rss_held"])),
                ("threads holding", lambda r, _: fmt_int(r["threads_held"])),
            ),
            client_notes,
        ),
        Scenario(
            "stalled-proxy",
            f"Stalled PROXY headers: {s.proxy_stallers} clients, 4 threads",
            f"{s.proxy_stallers} clients each send the first 6 of the 12 bytes of the PROXY v2 "
            "signature and stall. A real client then connects and sends a whole PROXY v2 header "
            f"and a line; *answer* is connect() to echo ({s.probes} real clients one after "
            "another; *answer alone* is one before any staller). servekit's default "
            "`--proxy-header-timeout` is 5 s. Target: under 1 s.",
            ("servekit_echo_proxy_1x4",),
            STALLED_COLUMNS,
            stalled_notes,
        ),
        Scenario(
            "stalled-tls",
            f"Stalled TLS handshakes: {s.tls_stallers} clients, 8 threads",
            f"{s.tls_stallers} clients each send the first half of a real TLS ClientHello and "
            "stall. A real TLS client then connects, completes the handshake and sends a line; "
            "*answer* is connect() to echo, handshake included. servekit's default "
            "`--tls-handshake-timeout` is 10 s. Target: under 1 s.",
            ("servekit_echo_tls_1x8",),
            STALLED_COLUMNS,
            stalled_notes,
        ),
        Scenario(
            "stalled-http",
            f"Stalled HTTP request heads: {s.http_stallers} clients, http.server",
            f"{s.http_stallers} clients each send a request line and one header of "
            f"`GET /{STATIC_FILE}` to an unmodified `SimpleHTTPRequestHandler` (HTTP/1.1), "
            "never the empty line that ends the head, and stall. A real client then sends a "
            "whole request; *answer* is connect() to the response. The stdlib holds a thread "
            "per staller; servekit (8 threads) waits for whole heads in its loop "
            "(`wait_for_request` auto: head) and closes stallers at `--request-timeout` "
            "(30 s); with `--wait-for-request data` it gives each staller a thread as "
            "before, and the real client waits for the stallers' timeout. Target: under 1 s.",
            ("stdlib_http", "servekit_serve_8", "servekit_serve_8_data"),
            STALLED_COLUMNS,
            stalled_notes,
        ),
        Scenario(
            "pingpong-128",
            "Ping-pong, 128 connections (loadgen)",
            "bench/run.py's pingpong-128: 128 connections opened at once, each with one 64-byte "
            f"line in flight; {s.loadgen.warmup:g} s warm-up, {s.loadgen.duration:g} s measured. "
            "*Unanswered*: connections with no echo in the measured window (a backlog of 5 "
            "leaves them in SYN retransmission); throughput and p99 count only the others. "
            "Ratios to the stdlib as shipped and to the stdlib with a backlog of 1024 (issue 10's "
            "target: all 128 answered, req/s at least and p99 at most half of the latter's).",
            LOAD_CONTENDERS,
            PINGPONG_COLUMNS,
            loadgen_notes,
            figures=LOAD_FIGURES,
            baseline=STDLIB_1024,
        ),
        Scenario(
            "churn",
            "Connection churn, 16 slots (loadgen)",
            "bench/run.py's churn: each slot connects, sends a line, reads the echo, resets the "
            "connection and starts over. Connections per second; issue 10's target is 3x the "
            "stdlib's.",
            LOAD_CONTENDERS,
            CHURN_COLUMNS,
            loadgen_notes,
            figures=LOAD_FIGURES,
            baseline=STDLIB,
        ),
    ]


# -- cases --------------------------------------------------------------------------


class HeldMemory:
    """A callback for TwoRounds: the server's memory while every client is connected,
    the largest of 3 samples 0.1 s apart (a thread just started may still grow)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.rss = 0
        self.threads = 0

    def __call__(self) -> None:
        for i in range(3):
            if i:
                time.sleep(0.1)
            mem = tree_memory(self.pid)
            self.rss = max(self.rss, mem.rss)
            self.threads = max(self.threads, mem.threads)


def two_rounds_case(
    conns: int, path: str | None, s: Settings
) -> Callable[[Running], dict[str, Any]]:
    def body(run_: Running) -> dict[str, Any]:
        idle = tree_memory(run_.pid)
        exchange = EchoLines() if path is None else HttpGets(path)
        held = HeldMemory(run_.pid)
        drops = run.listen_drops()
        clients = TwoRounds(
            run_.port,
            conns,
            exchange,
            paced=s.paced,
            stall=s.ramp_stall,
            round_timeout=s.round_timeout,
        ).run(s.idle_seconds, held)
        return {
            "clients": clients,
            "rss_idle": idle.rss,
            "threads_idle": idle.threads,
            "rss_held": held.rss,
            "threads_held": held.threads,
            "listen_drops": run.listen_drops() - drops,
        }

    return body


def half_client_hello() -> bytes:
    """The first half of the ClientHello a real Python client sends."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = tls_client_context().wrap_bio(incoming, outgoing)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    return hello[: len(hello) // 2]


def stalled_case(
    stallers: int, payload: bytes, probe: Probe, s: Settings
) -> Callable[[Running], dict[str, Any]]:
    def body(run_: Running) -> dict[str, Any]:
        alone = probe(run_.port, s.probe_timeout)
        socks: list[socket.socket] = []
        record: dict[str, Any] = {"stallers": stallers, "probe_timeout": s.probe_timeout}
        try:
            for _ in range(stallers):
                sock = socket.create_connection((HOST, run_.port), timeout=5.0)
                socks.append(sock)
                sock.sendall(payload)
            time.sleep(s.stall_settle)
            behind: list[float | None] = []
            for _ in range(s.probes):
                try:
                    behind.append(probe(run_.port, s.probe_timeout))
                except (OSError, ProbeFailed) as exc:
                    behind.append(None)
                    record["probe_error"] = f"{type(exc).__name__}: {exc}"
                    break  # the next one would wait as long
            record.update(
                alone_s=alone,
                behind_s=behind,
                stallers_open=len(socks),
                stallers_closed=sum(closed_by_peer(sock) for sock in socks),
            )
        finally:
            for sock in socks:
                sock.close()
        return record

    return body


def closed_by_peer(sock: socket.socket) -> bool:
    """Whether the server has closed (or reset) this connection, without blocking."""
    # Not MSG_DONTWAIT alone: a socket with a timeout polls before recv() whatever the
    # flags, so it would wait that long for a connection the server keeps open.
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def loadgen_case(name: str, ctx: Context, s: Settings) -> Callable[[Running], dict[str, Any]]:
    scenario = next(x for x in run.SCENARIOS if x.name == name)

    def body(run_: Running) -> dict[str, Any]:
        drops = run.listen_drops()
        try:
            load, peak, _plateau, cpu = run.drive_load(
                scenario, s.loadgen, run_.pid, run_.port, ctx.pin
            )
        except run.LoadError as exc:
            raise CaseError(str(exc)) from exc
        return {
            "load": load,
            "listen_drops": run.listen_drops() - drops,
            "peak_rss": peak.rss,
            "cpu": cpu,
            # loadgen runs in its own process group, so run_case would count it as
            # another user's load; drive_load's own measure leaves it out.
            "others_cpu": cpu["others"],
        }

    return body


def run_one(scenario: Scenario, server: Server, ctx: Context, s: Settings) -> dict[str, Any]:
    if scenario.name == "idle-echo":
        body, probe = two_rounds_case(s.idle_conns, None, s), probe_line
    elif scenario.name == "idle-http":
        path = f"/{STATIC_FILE}"
        body, probe = two_rounds_case(s.http_idle_conns, path, s), probe_http(path)
    elif scenario.name == "stalled-proxy":
        payload = PROXY_V2_SIGNATURE[:6]
        body = stalled_case(s.proxy_stallers, payload, probe_proxy_line, s)
        probe = probe_proxy_line
    elif scenario.name == "stalled-http":
        path = f"/{STATIC_FILE}"
        payload = f"GET {path} HTTP/1.1\r\nHost: bench\r\n".encode()
        body = stalled_case(s.http_stallers, payload, probe_http(path), s)
        probe = probe_http(path)
    elif scenario.name == "stalled-tls":
        if not ctx.places.get("cert"):
            return {"status": "n/a", "reason": "no certificate: the openssl command is missing"}
        body = stalled_case(s.tls_stallers, half_client_hello(), probe_tls_line, s)
        probe = probe_tls_line
    else:
        body, probe = loadgen_case(scenario.name, ctx, s), probe_line
    return run_case(server, ctx, scenario.name, probe, body)


def summary(scenario: Scenario, name: str, record: dict[str, Any]) -> str:
    head = f"{scenario.name:<14} {name:<24}"
    if record["status"] != "ok":
        return f"{head} {record['status']}: {record.get('reason', '')}"
    if "clients" in record:
        c = record["clients"]
        per = rss_per_conn(record)
        return (
            f"{head} answered {c['ok'][0]}/{c['conns']} then {c['ok'][1]}/{c['conns']}"
            f"  RSS/conn {fmt_kib(per)}  threads {record['threads_held']}"
        )
    if "behind_s" in record:
        return f"{head} alone {fmt_ms(record['alone_s'] * 1000)}  behind {behind(record, {})}"
    load = record["load"]
    return (
        f"{head} {fmt_int(load['rate'])}/s  p99 {fmt_us(load['latency_us']['p99'])}"
        f"  unanswered {load['unanswered']}/{load['conns']}"
    )


def main(argv: list[str] | None = None) -> int:
    all_scenarios = scenarios(FULL)
    names = [sc.name for sc in all_scenarios]
    parser = base_parser(
        "Connection scenarios of issue 10: idle keep-alive, stalled preambles, ping-pong and "
        "churn against servekit's real command.",
        list(SERVERS),
        names,
    )
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    if args.quiet_wait is not None:
        settings = replace(settings, quiet_wait=args.quiet_wait)
    wanted = chosen(parser, args.scenarios, names, "scenario(s)")
    only = set(chosen(parser, args.only, list(SERVERS), "contender(s)"))
    pin = pinning(args.server_cpu, args.load_cpu)
    prepare(pin)
    places = base_places()
    make_docroot()
    selected = [sc for sc in scenarios(settings) if sc.name in wanted]
    if any(sc.name == "stalled-tls" for sc in selected) and (pair := make_tls_cert()):
        places.update(cert=str(pair[0]), key=str(pair[1]))
    if any(sc.name in ("pingpong-128", "churn") for sc in selected):
        run.build()
    ctx = Context("connections", pin, settings.quiet_wait, source_tree(parser, args.src), places)
    command = command_line("connections.py", argv)
    results = results_skeleton(command, args.quick, pin, asdict(settings), ["uvloop"])
    run_selected(
        selected,
        only,
        SERVERS,
        results,
        run_one=lambda scenario, server: run_one(scenario, server, ctx, settings),
        summary=summary,
        rounds=args.rounds,
    )
    intro = contenders_intro(
        "Issue 10's connection scenarios: the server on one CPU, the clients (this driver, or "
        "bench/build/loadgen) on the other. Contenders:",
        SERVERS,
        results,
    )
    write_report(
        args.out,
        stem="connections",
        title="servekit connection scenarios",
        intro=intro,
        scenarios=selected,
        results=results,
    )
    print(f"wrote {args.out}/connections.md, connections.json in {results['elapsed_s']} s")
    return exit_status(results)


if __name__ == "__main__":
    sys.exit(main())
