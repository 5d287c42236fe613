#!/usr/bin/env python3
# HTTP scenarios (issue 11: http.server, wsgiref and xmlrpc at production speed, and a
# WSGI command). Writes http.md, http.json and http.png into --out (default
# bench/results/).
#
# Named httpbench.py, not http.py: Python puts a script's directory first on sys.path,
# so a bench/http.py would shadow the standard library's http package for every
# script in bench/ (http.client, and through it urllib, matplotlib's downloads, ...).
#
# What is measured, per scenario (bench/README.md has the why):
#   wrk-static   wrk -t1 -c50 -d4s, keep-alive, on SimpleHTTPRequestHandler (HTTP/1.1)
#                serving a 1 KiB file: the stdlib ThreadingHTTPServer, the same with
#                TCP_NODELAY set by hand, the same script after servekit.install(),
#                and `servekit serve http_handler:Handler --workers 1`;
#   wrk-wsgi     the same load on one 1 KiB hello WSGI app: wsgiref (threaded),
#                `servekit wsgi`, gunicorn gthread and sync, waitress;
#   idle-wsgi    500 keep-alive clients: GET, 1 s idle, GET, on the WSGI servers;
#   resets       1,000 clients that send a request and reset the connection: lines on
#                the server's stderr, and whether it still serves afterwards.
from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import run
from harness import (
    LINE,
    SERVEKIT_READY,
    STATIC_FILE,
    CaseError,
    Context,
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
    fmt_ms,
    fmt_x,
    http_request,
    make_docroot,
    pinning,
    prepare,
    probe_http,
    probe_line,
    results_skeleton,
    run_case,
    run_selected,
    script,
    servekit_cli,
    source_tree,
    tool_version,
    write_report,
)
from run import BENCH, HOST, fmt_int

WRK_SCRIPT = BENCH / "wrk" / "report.lua"
STATIC_PATH = f"/{STATIC_FILE}"
WSGI_PATH = "/"
GUNICORN_READY = r"Listening at: http://[^ ]*:(\d+)"
WAITRESS_READY = r"Serving on http://[^ ]*:(\d+)"

STDLIB_HTTP = "stdlib_http"
STDLIB_NODELAY = "stdlib_http_nodelay"
STDLIB_WSGI = "stdlib_wsgiref"
RIVALS = ("gunicorn_gthread", "waitress")  # issue 11: servekit wsgi at least the better


def gunicorn(*args: str) -> tuple[str, ...]:
    # --graceful-timeout 2: SIGTERM would otherwise wait up to 30 s for a worker still
    # holding keep-alive connections; the figures are taken before the stop.
    return (
        "{python}",
        "-m",
        "gunicorn",
        *args,
        "-b",
        f"{HOST}:0",
        "--graceful-timeout",
        "2",
        "{gunicorn_extra}",
        "wsgi_hello:app",
    )


SERVERS = {
    s.name: s
    for s in [
        Server(
            STDLIB_HTTP,
            "http.server.ThreadingHTTPServer as shipped (bench/servers/http_stdlib.py)",
            script("http_stdlib.py"),
            cwd="{docroot}",
        ),
        Server(
            STDLIB_NODELAY,
            "the same, TCP_NODELAY set by hand in the handler's setup() (--nodelay)",
            script("http_stdlib.py", "--nodelay"),
            cwd="{docroot}",
        ),
        Server(
            "stdlib_http_install",
            "the same script with servekit.install() first (--install)",
            script("http_stdlib.py", "--install"),
            cwd="{docroot}",
        ),
        Server(
            "servekit_serve",
            "`python -m servekit serve http_handler:Handler --workers 1` (default threads)",
            servekit_cli("serve", "http_handler:Handler", "--workers", "1"),
            ready=SERVEKIT_READY,
            cwd="{docroot}",
        ),
        Server(
            STDLIB_WSGI,
            "wsgiref.simple_server with socketserver.ThreadingMixIn (HTTP/1.0, closes "
            "after each response)",
            script("wsgi_stdlib.py"),
        ),
        Server(
            "servekit_wsgi",
            "`python -m servekit wsgi wsgi_hello:app --workers 1 --threads 8`",
            servekit_cli("wsgi", "wsgi_hello:app", "--workers", "1", "--threads", "8"),
            ready=SERVEKIT_READY,
        ),
        Server(
            "gunicorn_gthread",
            "`gunicorn -k gthread --threads 8 -w 1 wsgi_hello:app`",
            gunicorn("-k", "gthread", "--threads", "8", "-w", "1"),
            ready=GUNICORN_READY,
            needs=("gunicorn",),
        ),
        Server(
            "gunicorn_sync",
            "`gunicorn -w 1 wsgi_hello:app` (sync worker: no keep-alive)",
            gunicorn("-w", "1"),
            ready=GUNICORN_READY,
            needs=("gunicorn",),
        ),
        Server(
            "waitress",
            "`waitress-serve --threads=8 wsgi_hello:app` (as `python -m waitress`)",
            ("{python}", "-m", "waitress", "--threads=8", f"--listen={HOST}:0", "wsgi_hello:app"),
            ready=WAITRESS_READY,
            needs=("waitress",),
        ),
        Server(
            "servekit_echo",
            "`python -m servekit echo` (defaults: 2 workers x 128 threads)",
            servekit_cli("echo"),
            ready=SERVEKIT_READY,
        ),
    ]
}


@dataclass(frozen=True)
class Settings:
    wrk_conns: int = 50
    wrk_threads: int = 1
    wrk_seconds: int = 4
    idle_conns: int = 500
    idle_seconds: float = 1.0
    round_timeout: float = 10.0  # as connections.py
    paced: int = 4
    ramp_stall: float = 0.5
    resets: int = 1000
    # After the resets, the server's stderr must stay unchanged this long (at most
    # settle_limit) before its lines are counted: tracebacks are written after the fact.
    settle_quiet: float = 0.5
    settle_limit: float = 10.0
    quiet_wait: float = 5.0


FULL = Settings()
QUICK = Settings(
    wrk_seconds=1,
    idle_conns=40,
    idle_seconds=0.2,
    round_timeout=1.5,
    ramp_stall=0.3,
    resets=100,
    settle_quiet=0.3,
    settle_limit=3.0,
    quiet_wait=0.0,
)


# -- cells --------------------------------------------------------------------------


def rate(r: dict[str, Any]) -> float | None:
    return float(r["wrk"]["rate"]) if r.get("status") == "ok" and "wrk" in r else None


def best_rival(runs: dict[str, Any]) -> float | None:
    rates = [x for x in (rate(runs.get(n, {})) for n in RIVALS) if x]
    return max(rates) if rates else None


def wrk_errors(r: dict[str, Any], _runs: dict[str, Any]) -> str:
    errors = {k: v for k, v in r["wrk"]["errors"].items() if v}
    return ", ".join(f"{v:,} {k}" for k, v in errors.items()) or "0"


def vs(base: str) -> Callable[..., str]:
    return lambda r, runs: fmt_x(rate(r), rate(runs.get(base, {})))


def wrk_columns(base: str, second: tuple[str, Callable[..., str]]) -> tuple[tuple[str, Any], ...]:
    return (
        ("req/s", lambda r, _: fmt_int(r["wrk"]["rate"])),
        ("vs stdlib", vs(base)),
        second,
        ("p50", lambda r, _: fmt_ms(r["wrk"]["latency_us"]["p50"] / 1000)),
        ("p99", lambda r, _: fmt_ms(r["wrk"]["latency_us"]["p99"] / 1000)),
        ("errors", wrk_errors),
        ("listen drops", lambda r, _: fmt_int(r["listen_drops"])),
        ("CPU server", lambda r, _: f"{r['cpu_server']:.2f}"),
    )


STATIC_COLUMNS = wrk_columns(STDLIB_HTTP, ("vs TCP_NODELAY by hand", vs(STDLIB_NODELAY)))
WSGI_COLUMNS = wrk_columns(
    STDLIB_WSGI, ("vs best of gthread, waitress", lambda r, runs: fmt_x(rate(r), best_rival(runs)))
)


# What --rounds compares the wrk scenarios by: requests/s and p99 (ms).
WRK_FIGURES = (
    Figure("req/s", lambda r: r["wrk"]["rate"]),
    Figure("p99 ms", lambda r: r["wrk"]["latency_us"]["p99"] / 1000),
)


def answered(round_no: int) -> Callable[..., str]:
    return lambda r, _: f"{r['clients']['ok'][round_no - 1]:,} / {r['clients']['conns']:,}"


def reset_notes(name: str, record: dict[str, Any]) -> list[str]:
    notes = []
    if record.get("sample"):
        notes.append(f"`{name}`: first lines: `{' | '.join(record['sample'])[:300]}`")
    if record.get("still_serves_error"):
        notes.append(f"`{name}`: afterwards: {record['still_serves_error']}.")
    return notes


def scenarios(s: Settings) -> list[Scenario]:
    wrk = f"`wrk -t{s.wrk_threads} -c{s.wrk_conns} -d{s.wrk_seconds}s`"
    return [
        Scenario(
            "wrk-static",
            f"http.server under wrk, {s.wrk_conns} keep-alive connections",
            f"{wrk} keep-alive, `GET {STATIC_PATH}`: an unmodified `SimpleHTTPRequestHandler` "
            'with `protocol_version = "HTTP/1.1"` serving a 1 KiB file, which logs every '
            "request to stderr as shipped. Issue 11's targets: `install()` at least 0.9 times "
            "and `servekit serve --workers 1` at least 1.0 times TCP_NODELAY by hand.",
            (STDLIB_HTTP, STDLIB_NODELAY, "stdlib_http_install", "servekit_serve"),
            STATIC_COLUMNS,
            figures=WRK_FIGURES,
            baseline=STDLIB_NODELAY,
        ),
        Scenario(
            "wrk-wsgi",
            f"A hello WSGI app under wrk, {s.wrk_conns} keep-alive connections",
            f"{wrk} keep-alive, `GET /` on bench/servers/wsgi_hello.py (a 1 KiB body), every "
            "server in one process with 8 threads where it has threads. gunicorn's sync worker "
            "and wsgiref close the connection after each response, so wrk reconnects. Issue "
            "11's target: `servekit wsgi` at least the better of gunicorn gthread and waitress.",
            (STDLIB_WSGI, "servekit_wsgi", "gunicorn_gthread", "gunicorn_sync", "waitress"),
            WSGI_COLUMNS,
            figures=WRK_FIGURES,
            baseline="waitress",  # the better of the two rivals in every run so far
        ),
        Scenario(
            "idle-wsgi",
            f"Idle keep-alive on the WSGI servers, {s.idle_conns:,} clients",
            f"Each client sends `GET /` (round 1), stays idle {s.idle_seconds:g} s on the same "
            f"connection and sends it again (round 2); rounds end after {s.round_timeout:g} s "
            "at most; the columns count 200 responses. A server that closes after each "
            "response (gunicorn sync) cannot answer round 2 on the same connection. Issue "
            "11's target for `servekit wsgi`: all of them.",
            ("servekit_wsgi", "gunicorn_gthread", "gunicorn_sync", "waitress"),
            (
                ("round 1: 200", answered(1)),
                ("round 2: 200", answered(2)),
                (
                    "200 responses",
                    lambda r, _: f"{sum(r['clients']['ok']):,} / {2 * r['clients']['conns']:,}",
                ),
                (
                    "slowest answer, round 1",
                    lambda r, _: fmt_ms(r["clients"]["latency_ms"][0]["max"]),
                ),
                (
                    "slowest answer, round 2",
                    lambda r, _: fmt_ms(r["clients"]["latency_ms"][1]["max"]),
                ),
            ),
            client_notes,
        ),
        Scenario(
            "resets",
            f"Clients that reset: {s.resets:,} connections",
            f"{s.resets:,} clients, one after another, each connect, send one request (`GET "
            f"{STATIC_PATH}`, or a line to the echo server) and close with RST (`SO_LINGER` 0) "
            "without reading. Then the server's stderr is counted (once it has been quiet "
            f"{s.settle_quiet:g} s) and a fresh client checks that it still answers. "
            "http.server logs each request it parsed (*access log*); issue 11's target is at "
            "most 10 lines besides those.",
            (STDLIB_HTTP, "servekit_serve", "servekit_echo"),
            (
                ("request", lambda r, _: r["request"]),
                ("stderr lines", lambda r, _: fmt_int(r["lines"])),
                ("of which access log", lambda r, _: fmt_int(r["access_lines"])),
                ("other lines", lambda r, _: fmt_int(r["lines"] - r["access_lines"])),
                ("tracebacks", lambda r, _: fmt_int(r["tracebacks"])),
                ("still serves", lambda r, _: "yes" if r["still_serves"] else "**no**"),
            ),
            reset_notes,
        ),
    ]


# -- cases --------------------------------------------------------------------------


def run_wrk(port: int, path: str, ctx: Context, s: Settings) -> dict[str, Any]:
    argv = [
        *ctx.pin.prefix(ctx.pin.load_cpu),
        "wrk",
        f"-t{s.wrk_threads}",
        f"-c{s.wrk_conns}",
        f"-d{s.wrk_seconds}s",
        "-s",
        str(WRK_SCRIPT),
        f"http://{HOST}:{port}{path}",
    ]
    # wrk stops by itself after -d; 20 s more covers closing and a wedged server.
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=s.wrk_seconds + 20)
    except subprocess.TimeoutExpired as exc:
        raise CaseError(f"wrk still running after {s.wrk_seconds + 20} s") from exc
    if done.returncode != 0:
        raise CaseError(f"wrk exited with {done.returncode}: {done.stderr.strip()[-300:]}")
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise CaseError(f"wrk printed no JSON: {done.stdout[-300:]!r}")
    result: dict[str, Any] = json.loads(lines[-1])
    result["rate"] = result["requests"] / (result["duration_us"] / 1e6)
    result["text"] = done.stdout
    return result


def wrk_case(path: str, ctx: Context, s: Settings) -> Callable[[Running], dict[str, Any]]:
    def body(run_: Running) -> dict[str, Any]:
        cpu_before = run.tree_cpu_seconds(run_.pid)
        drops = run.listen_drops()
        started = time.monotonic()
        result = run_wrk(run_.port, path, ctx, s)
        wall = time.monotonic() - started
        return {
            "wrk": result,
            "listen_drops": run.listen_drops() - drops,
            "cpu_server": round((run.tree_cpu_seconds(run_.pid) - cpu_before) / wall, 3),
        }

    return body


def idle_case(s: Settings) -> Callable[[Running], dict[str, Any]]:
    def body(run_: Running) -> dict[str, Any]:
        clients = TwoRounds(
            run_.port,
            s.idle_conns,
            HttpGets(WSGI_PATH),
            paced=s.paced,
            stall=s.ramp_stall,
            round_timeout=s.round_timeout,
        ).run(s.idle_seconds, lambda: None)
        return {"clients": clients}

    return body


ACCESS_LOG = re.compile(r'"[A-Z]+ \S+ HTTP/\d\.\d" \d{3} ')  # BaseHTTPRequestHandler.log_request


def send_and_reset(port: int, payload: bytes, count: int, deadline: float) -> dict[str, int]:
    """count connections, one after another: connect, send payload, close with RST."""
    linger_zero = struct.pack("ii", 1, 0)  # struct linger {l_onoff = 1, l_linger = 0}
    done = failed = 0
    for _ in range(count):
        if time.monotonic() > deadline:
            break
        try:
            with socket.create_connection((HOST, port), timeout=5.0) as sock:
                sock.sendall(payload)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger_zero)
            done += 1
        except OSError:
            failed += 1
    return {"reset": done, "failed": failed}


def wait_quiet_file(path: Path, quiet: float, limit: float) -> None:
    """Return once path has not grown for `quiet` seconds, or after `limit`."""
    deadline = time.monotonic() + limit
    size, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        now_size = path.stat().st_size
        if now_size != size:
            size, since = now_size, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
        time.sleep(0.05)


def resets_case(payload: bytes, probe: Probe, s: Settings) -> Callable[[Running], dict[str, Any]]:
    def body(run_: Running) -> dict[str, Any]:
        mark = run_.stderr.stat().st_size
        clients = send_and_reset(run_.port, payload, s.resets, time.monotonic() + 60.0)
        wait_quiet_file(run_.stderr, s.settle_quiet, s.settle_limit)
        with open(run_.stderr, "rb") as f:
            f.seek(mark)
            lines = f.read().decode(errors="replace").splitlines()
        access = sum(bool(ACCESS_LOG.search(line)) for line in lines)
        record: dict[str, Any] = {
            "request": "GET" if payload.startswith(b"GET") else "line",
            "clients": clients,
            "lines": len(lines),
            "access_lines": access,
            "tracebacks": sum(line.startswith("Traceback") for line in lines),
            "sample": [ln for ln in lines if not ACCESS_LOG.search(ln)][:3],
        }
        try:
            record["still_serves_s"] = probe(run_.port, 5.0)
            record["still_serves"] = True
        except (OSError, ProbeFailed) as exc:
            record["still_serves"] = False
            record["still_serves_error"] = f"{type(exc).__name__}: {exc}"
        return record

    return body


def run_one(scenario: Scenario, server: Server, ctx: Context, s: Settings) -> dict[str, Any]:
    # http.server contenders serve the static file; the WSGI app answers on /.
    path = STATIC_PATH if scenario.name in ("wrk-static", "resets") else WSGI_PATH
    if scenario.name.startswith("wrk-"):
        if shutil.which("wrk") is None:
            return {"status": "n/a", "reason": "wrk not installed (apt-get install wrk)"}
        return run_case(server, ctx, scenario.name, probe_http(path), wrk_case(path, ctx, s))
    if scenario.name == "idle-wsgi":
        return run_case(server, ctx, scenario.name, probe_http(path), idle_case(s))
    if server.name == "servekit_echo":
        return run_case(server, ctx, scenario.name, probe_line, resets_case(LINE, probe_line, s))
    probe = probe_http(path)
    return run_case(server, ctx, scenario.name, probe, resets_case(http_request(path), probe, s))


def summary(scenario: Scenario, name: str, record: dict[str, Any]) -> str:
    head = f"{scenario.name:<11} {name:<20}"
    if record["status"] != "ok":
        return f"{head} {record['status']}: {record.get('reason', '')}"
    if "wrk" in record:
        w = record["wrk"]
        errors = sum(w["errors"].values())
        return (
            f"{head} {fmt_int(w['rate'])}/s  p99 {fmt_ms(w['latency_us']['p99'] / 1000)}"
            f"  errors {errors}"
        )
    if "clients" in record and "ok" in record["clients"]:
        c = record["clients"]
        return f"{head} 200: {c['ok'][0]}/{c['conns']} then {c['ok'][1]}/{c['conns']}"
    return (
        f"{head} stderr {record['lines']} lines ({record['access_lines']} access log, "
        f"{record['tracebacks']} tracebacks); still serves: {record['still_serves']}"
    )


def write_chart(results: dict[str, Any], path: Path) -> None:
    """Requests/s per contender in the two wrk scenarios, labelled with the ratio to the
    stdlib; n/a where a contender did not run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(n, results["runs"][n]) for n in ("wrk-static", "wrk-wsgi") if n in results["runs"]]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    for ax, (name, runs) in zip(axes[0], panels, strict=True):
        base = rate(runs.get(STDLIB_HTTP if name == "wrk-static" else STDLIB_WSGI, {}))
        names = list(runs)
        values = [rate(runs[n]) or 0.0 for n in names]
        bars = ax.bar(range(len(names)), values, color="tab:blue")
        labels = [
            ("n/a" if not v else f"{v:,.0f}" + (f"\n×{v / base:.2f}" if base else ""))  # noqa: RUF001
            for v in values
        ]
        ax.bar_label(bars, labels, fontsize="small")
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
        ax.set_ylabel("requests/s")
        conns = results["settings"]["wrk_conns"]
        ax.set_title(f"{name}: wrk -c{conns} keep-alive, server on one CPU")
        ax.set_ylim(top=max([*values, 1.0]) * 1.25)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"servekit HTTP bench, {results['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def gunicorn_extra() -> list[str]:
    """--no-control-socket where gunicorn has it (newer releases open a control socket
    under ~/.gunicorn/ by default; a benchmark should leave nothing outside the tree)."""
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        done = subprocess.run(
            [sys.executable, "-m", "gunicorn", "--help"], capture_output=True, text=True, timeout=30
        )
        if "--no-control-socket" in done.stdout:
            return ["--no-control-socket"]
    return []


def main(argv: list[str] | None = None) -> int:
    names = [sc.name for sc in scenarios(FULL)]
    parser = base_parser(
        "HTTP scenarios of issue 11: wrk on http.server and WSGI servers, idle keep-alive, "
        "client resets.",
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
    make_docroot()
    places = base_places()
    places["gunicorn_extra"] = gunicorn_extra()
    selected = [sc for sc in scenarios(settings) if sc.name in wanted]
    ctx = Context("http", pin, settings.quiet_wait, source_tree(parser, args.src), places)
    command = command_line("httpbench.py", argv)
    results = results_skeleton(command, args.quick, pin, asdict(settings), ["gunicorn", "waitress"])
    results["machine"]["versions"]["wrk"] = (
        tool_version(["wrk", "-v"]).split(" [")[0].removeprefix("wrk ")
    )
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
        "Issue 11's HTTP scenarios: the server on one CPU, the clients (wrk, or this driver) "
        "on the other. Contenders:",
        SERVERS,
        results,
    )
    write_report(
        args.out,
        stem="http",
        title="servekit HTTP scenarios",
        intro=[*intro, "", "![requests/s under wrk](http.png)"],
        scenarios=selected,
        results=results,
    )
    write_chart(results, args.out / "http.png")
    print(f"wrote {args.out}/http.md, http.json, http.png in {results['elapsed_s']} s")
    return exit_status(results)


if __name__ == "__main__":
    sys.exit(main())
