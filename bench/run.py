#!/usr/bin/env python3
# Benchmark driver: builds the C programs, runs every contender through every
# scenario, and writes RESULTS.md, results.json and chart.png.
#
# Strategy. One case = one fresh server process + one loadgen run:
#   1. start the contender pinned to the server CPU (taskset), in its own session so
#      that it and every child it forks form one process group we can signal;
#   2. wait for "READY <port>" on its stdout (10 s, else the contender is "n/a");
#   3. run bench/build/loadgen pinned to the load CPU; meanwhile sample the RSS of the
#      server's whole process tree every 0.1 s and keep the peak;
#   4. SIGTERM the group, SIGKILL it after a grace period, and check that no process
#      of the group is left (reaping orphans ourselves: we are a child subreaper).
# The driver pins itself to the load CPU too, so its sampling never takes time from
# the server. Every wait has a deadline; nothing here can run unbounded.
from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import importlib.metadata
import json
import os
import platform
import resource
import selectors
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
BUILD = BENCH / "build"
SERVERS = BENCH / "servers"
LOGS = BUILD / "logs"
LOADGEN = BUILD / "loadgen"
ECHO_EPOLL = BUILD / "echo_epoll"
C_SOURCES = {LOADGEN: BENCH / "c" / "loadgen.c", ECHO_EPOLL: BENCH / "c" / "echo_epoll.c"}
CFLAGS = ["-std=c11", "-O2", "-Wall", "-Wextra"]

HOST = "127.0.0.1"
BASELINE = "stdlib_threading"
# The contract in bench/servers/common.py gives a server 10 s to print READY; a
# Python server on this class of machine needs about 0.1 s.
READY_TIMEOUT = 10.0
# SIGTERM to SIGKILL. Every contender here exits in well under a second; 5 s leaves
# room for a pre-fork supervisor draining its workers.
STOP_GRACE = 5.0
SAMPLE_INTERVAL = 0.1
# Other processes using a tenth of a CPU or more during a case: flag its figures. On an
# idle machine the share is near 0.01 (the odd daemon wake-up).
NOISY = 0.1
# loadgen is one thread on one CPU; above this share it may be what limits a case.
# 0.8, not 1.0: on loopback the receiving side's TCP work runs in the sender's
# softirq, so loadgen's CPU also carries part of the server's kernel work, and the
# churn case with echo_epoll levels off at about 0.85.
LOADGEN_SATURATED = 0.8


# -- what runs ----------------------------------------------------------------------


@dataclass(frozen=True)
class Contender:
    name: str
    description: str
    script: str | None  # bench/servers/<script>; None for the C echo server

    def command(self) -> list[str] | None:
        """argv up to (not including) --port, or None if the program is missing."""
        if self.script is None:
            return [str(ECHO_EPOLL)] if ECHO_EPOLL.exists() else None
        path = SERVERS / self.script
        return [sys.executable, str(path)] if path.exists() else None


CONTENDERS = [
    Contender("echo_epoll", "C, one thread, epoll: the physical limit", None),
    Contender(
        "stdlib_threading",
        "socketserver.ThreadingTCPServer / ThreadingUDPServer, defaults (backlog 5)",
        "stdlib_threading.py",
    ),
    Contender(
        "stdlib_forking",
        "socketserver.ForkingTCPServer / ForkingUDPServer, defaults (backlog 5, max_children 40)",
        "stdlib_forking.py",
    ),
    Contender(
        "asyncio",
        "asyncio.start_server (backlog 100), StreamReader.readline; DatagramProtocol",
        "asyncio_server.py",
    ),
    Contender("uvloop", "the asyncio code on uvloop's event loop", "uvloop_server.py"),
    Contender("servekit_pool", "servekit thread pool, one process", "servekit_pool.py"),
    Contender(
        "servekit_prefork",
        "servekit, 2 pre-forked workers with a thread pool each",
        "servekit_prefork.py",
    ),
]


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    mode: str  # loadgen --mode
    udp: bool = False
    explain: str = ""
    rate: float = 0.0  # loadgen --rate: open loop at this many requests/s in all


SCENARIOS = [
    Scenario(
        "pingpong-1",
        "Ping-pong, 1 connection",
        "pingpong",
        explain="One connection, one 64-byte line at a time: the per-request latency "
        "floor of each server.",
    ),
    Scenario(
        "pingpong-16",
        "Ping-pong, 16 connections",
        "pingpong",
        explain="16 connections, each with one line in flight.",
    ),
    Scenario(
        "pingpong-128",
        "Ping-pong, 128 connections",
        "pingpong",
        explain="128 connections opened at once. A listen backlog smaller than the "
        "burst drops SYNs (*listen drops*: the kernel's TcpExt ListenDrops during the "
        "case) and the client retransmits them after 1 s, 3 s, 7 s ...; *unanswered* "
        "(connections with no echo in the measured window) and *slowest first "
        "response* (from the first connect() to the first echo) show who is left "
        "waiting. Throughput counts only the connections that got in.",
    ),
    Scenario(
        "pingpong-128-open",
        "Ping-pong, 128 connections, open loop at 30,000 requests/s",
        "pingpong",
        rate=30_000,
        explain="The same 128 connections, but each one sends on a fixed schedule "
        "(30,000 requests/s in all, below every contender's capacity except asyncio's "
        "margin), and latency counts from when a request was *due*, not from when the "
        "client could finally send it (wrk2's correction for coordinated omission). A "
        "connection the server leaves waiting in SYN retransmission keeps falling "
        "behind its schedule, and every request it owed counts, at least as "
        "(end of window - due time) if it never completed (*censored*). This is what "
        "the clients of a server that leaves connections unanswered experience; the "
        "closed-loop table above hides it, because a stalled client stops asking.",
    ),
    Scenario(
        "churn",
        "Connection churn",
        "churn",
        explain="Each slot connects, sends one line, reads the echo and closes "
        "(RST, see loadgen.c), then starts over. Latency is the whole connection. A "
        "connection unanswered after 1 s counts as a timeout error (1 s is also Linux's "
        "first SYN retransmission, so a slot whose SYN the backlog dropped times out "
        "instead of waiting); *starved slots* completed nothing in the measured window.",
    ),
    Scenario(
        "udp",
        "UDP request/response",
        "udp",
        udp=True,
        explain="Each slot sends one 64-byte datagram and waits for the echo; no echo "
        "within 1 s counts as lost.",
    ),
    Scenario(
        "hold",
        "Memory while holding concurrent connections",
        "hold",
        explain="Open connections (at most 4 unanswered at a time, so a backlog of 5 "
        "is never overrun), send one line on each, wait for every echo, then measure "
        "the server while all are held open. *RSS* is summed over the process tree "
        "(shared pages counted once per process); *PSS* shares them out and is the "
        "honest total for forking servers.",
    ),
]

SCENARIO_GROUPS = {"pingpong": ["pingpong-1", "pingpong-16", "pingpong-128", "pingpong-128-open"]}


@dataclass(frozen=True)
class Settings:
    warmup: float
    duration: float
    size: int = 64
    churn_slots: int = 16
    udp_slots: int = 16
    hold_conns: int = 5000
    hold_ramp: float = 60.0  # longest ramp-up
    hold_stall: float = 5.0  # ramp ends after this long without a new echo
    hold_bound: float = 30.0  # loadgen lets go by itself after this long holding
    quiet_wait: float = 10.0  # before each case, wait this long at most for a quiet machine

    def conns(self, scenario: Scenario) -> int:
        if scenario.mode == "pingpong":
            return int(scenario.name.split("-")[1])
        return {"churn": self.churn_slots, "udp": self.udp_slots}.get(
            scenario.mode, self.hold_conns
        )


FULL = Settings(warmup=2.0, duration=10.0)
QUICK = Settings(
    warmup=0.2, duration=0.6, hold_conns=500, hold_ramp=10.0, hold_stall=1.5, quiet_wait=0.0
)


# -- processes ----------------------------------------------------------------------


def become_subreaper() -> None:
    """Adopt orphans of the servers we start, so that we can reap and count them.

    When a server's main process dies first, its forked children are re-parented to
    the nearest subreaper instead of PID 1, whose reaping we cannot rely on in a
    container.
    """
    pr_set_child_subreaper = 36  # <linux/prctl.h>
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_child_subreaper, 1, 0, 0, 0)


def reap_orphans() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] != 0:
            pass


def raise_nofile() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit, for us and everything we start.

    5,000 held connections need 5,000 descriptors; the usual soft limit is 1,024. The
    limit is inherited across fork and exec, so raising it once here covers every
    server without a preexec_fn (which is unsafe as soon as a thread exists).
    """
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group pgid."""
    alive = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(proc.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return alive


def signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)


def stop_group(proc: subprocess.Popen[bytes], grace: float = STOP_GRACE) -> dict[str, Any]:
    """SIGTERM the process group led by proc, SIGKILL what is left after grace.

    Returns how it went: the leader's exit status, whether SIGKILL was needed, and the
    pids still alive afterwards (expected: none).
    """
    pgid = proc.pid  # start_new_session=True: the leader's pid is the group id
    killed = False
    signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    try:
        status = proc.wait(grace)
    except subprocess.TimeoutExpired:
        killed = True
        signal_group(pgid, signal.SIGKILL)
        status = proc.wait(5.0)
    # Forked children may outlive their parent by a moment.
    while (left := group_members(pgid)) and time.monotonic() < deadline:
        reap_orphans()
        time.sleep(0.05)
    if left:
        killed = True
        signal_group(pgid, signal.SIGKILL)
        time.sleep(0.2)
    reap_orphans()
    left = group_members(pgid)
    return {"exit_status": status, "sigkill": killed, "left_behind": left}


@dataclass
class Memory:
    rss: int = 0
    pss: int = 0
    processes: int = 0
    threads: int = 0

    def peak(self, other: Memory) -> Memory:
        return Memory(
            max(self.rss, other.rss),
            max(self.pss, other.pss),
            max(self.processes, other.processes),
            max(self.threads, other.threads),
        )


def tree_memory(pid: int, with_pss: bool = False) -> Memory:
    """Memory of process pid and all its descendants, summed.

    RSS counts a page shared by N processes N times (a forked child shares most of
    its parent); PSS charges each process 1/N of it. PSS reads /proc/PID/smaps_rollup,
    which costs more, so only the hold scenario asks for it.
    """
    mem = Memory()
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return mem
    for proc in procs:
        try:
            if with_pss:
                info = proc.memory_full_info()
                mem.pss += info.pss
                mem.rss += info.rss
            else:
                mem.rss += proc.memory_info().rss
            mem.threads += proc.num_threads()
            mem.processes += 1
        except psutil.Error:
            continue
    return mem


@dataclass
class Pinning:
    enabled: bool
    server_cpu: int
    load_cpu: int

    def prefix(self, cpu: int) -> list[str]:
        return ["taskset", "-c", str(cpu)] if self.enabled else []


class NotAvailable(Exception):
    """The contender cannot run in this case (missing script, no READY, early exit)."""


def log_tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


@contextlib.contextmanager
def server_running(
    contender: Contender, scenario: Scenario, pin: Pinning, log: Path
) -> Iterator[tuple[subprocess.Popen[bytes], int, dict[str, Any]]]:
    """Start the contender, yield (process, port, stop report), stop it on exit."""
    argv = contender.command()
    if argv is None:
        raise NotAvailable(f"{contender.script or ECHO_EPOLL.name} not found")
    argv = [*pin.prefix(pin.server_cpu), *argv, "--host", HOST, "--port", "0"]
    if scenario.udp:
        argv.append("--udp")
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log_file,
            cwd=ROOT,
            start_new_session=True,
        )
    stop_report: dict[str, Any] = {}
    try:
        port = wait_ready(proc, log)
        yield proc, port, stop_report
    finally:
        stop_report.update(stop_group(proc))
        assert proc.stdout is not None
        proc.stdout.close()


def wait_ready(proc: subprocess.Popen[bytes], log: Path) -> int:
    """The port from the server's "READY <port>" line; NotAvailable after 10 s."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + READY_TIMEOUT
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise NotAvailable(f"no READY within {READY_TIMEOUT:.0f} s")
            if not sel.select(left):
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                status = proc.wait(STOP_GRACE)
                raise NotAvailable(f"exited with status {status} before READY: {log_tail(log)}")
            buf += chunk
    first = buf.split(b"\n", 1)[0].decode(errors="replace").split()
    if len(first) != 2 or first[0] != "READY" or not first[1].isdigit():
        raise NotAvailable(f"expected 'READY <port>', got {buf[:80]!r}")
    return int(first[1])


# -- one case -----------------------------------------------------------------------


def loadgen_argv(scenario: Scenario, settings: Settings, port: int, pin: Pinning) -> list[str]:
    argv = [
        *pin.prefix(pin.load_cpu),
        str(LOADGEN),
        "--host",
        HOST,
        "--port",
        str(port),
        "--mode",
        scenario.mode,
        "--conns",
        str(settings.conns(scenario)),
        "--size",
        str(settings.size),
    ]
    if scenario.mode == "hold":
        argv += [
            "--duration",
            str(settings.hold_ramp),
            "--timeout",
            str(settings.hold_stall),
            "--hold-seconds",
            str(settings.hold_bound),
        ]
    else:
        argv += ["--duration", str(settings.duration), "--warmup", str(settings.warmup)]
    if scenario.rate:
        argv += ["--rate", str(scenario.rate)]
    return argv


def run_case(
    contender: Contender, scenario: Scenario, settings: Settings, pin: Pinning
) -> dict[str, Any]:
    log = LOGS / f"{contender.name}-{scenario.name}.log"
    record: dict[str, Any] = {"status": "ok"}
    if settings.quiet_wait > 0 and contender.command() is not None:
        record["other_cpu_before"] = round(wait_until_quiet(settings.quiet_wait), 3)
    try:
        with server_running(contender, scenario, pin, log) as (server, port, stop):
            record["stop"] = stop
            with contextlib.suppress(psutil.Error):
                record["server_affinity"] = psutil.Process(server.pid).cpu_affinity()
            idle = tree_memory(server.pid, with_pss=scenario.mode == "hold")
            record["idle"] = vars(idle)
            drops_before = listen_drops()
            load, peak, plateau, cpu = drive_load(scenario, settings, server.pid, port, pin)
            record["listen_drops"] = listen_drops() - drops_before
            record["load"] = load
            record["peak"] = vars(peak)
            record["cpu"] = cpu
            if plateau is not None:
                record["plateau"] = vars(plateau)
    except NotAvailable as exc:
        return {"status": "n/a", "reason": str(exc)}
    except LoadError as exc:
        record.update(status="error", reason=str(exc))
    with contextlib.suppress(OSError):
        record["stderr_lines"] = len(log.read_text(errors="replace").splitlines())
    if record.get("stop", {}).get("left_behind"):
        record.update(status="error", reason=f"left behind: {record['stop']['left_behind']}")
    return record


class LoadError(Exception):
    """loadgen failed or overran its deadline."""


def drive_load(
    scenario: Scenario, settings: Settings, server_pid: int, port: int, pin: Pinning
) -> tuple[dict[str, Any], Memory, Memory | None, dict[str, float]]:
    """Run loadgen against port.

    Returns its JSON, the peak memory, for hold the memory while every connection is
    held, and the CPU used (1.0 = one CPU) by the server, by loadgen and by other
    processes (see other_cpu_seconds) while the load ran.
    """
    hold = scenario.mode == "hold"
    if hold:
        budget = settings.hold_ramp + settings.hold_bound
    else:
        budget = settings.warmup + settings.duration
    # loadgen ends by itself after `budget`; 15 s more covers startup and closing
    # 5,000 sockets before we call it hung.
    deadline = time.monotonic() + budget + 15.0
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    server_before = tree_cpu_seconds(server_pid)
    proc = subprocess.Popen(
        loadgen_argv(scenario, settings, port, pin),
        stdin=subprocess.PIPE if hold else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    assert proc.stderr is not None
    ours = {server_pid, proc.pid}  # process groups: start_new_session=True for both
    others_before = other_cpu_seconds(ours)
    started = time.monotonic()
    # The window closes at the hold plateau or when loadgen ends, whichever is first.
    others_after: dict[int, float] | None = None
    window = 0.0
    peak = Memory()
    plateau: Memory | None = None
    stderr = b""
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stderr.fileno(), selectors.EVENT_READ)
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    raise LoadError(f"loadgen still running after {budget + 15:.0f} s")
                peak = peak.peak(tree_memory(server_pid))
                for _key, _ in sel.select(SAMPLE_INTERVAL):
                    chunk = os.read(proc.stderr.fileno(), 4096)
                    if not chunk:
                        sel.unregister(proc.stderr.fileno())
                        break
                    stderr += chunk
                if hold and plateau is None and b"HOLDING" in stderr:
                    plateau = measure_plateau(server_pid)
                    peak = peak.peak(plateau)
                    assert proc.stdin is not None
                    others_after = other_cpu_seconds(ours)
                    server_after = tree_cpu_seconds(server_pid)
                    window = time.monotonic() - started
                    with contextlib.suppress(BrokenPipeError):
                        proc.stdin.write(b"stop\n")
                        proc.stdin.flush()  # communicate() closes it
            if others_after is None:
                others_after = other_cpu_seconds(ours)
                server_after = tree_cpu_seconds(server_pid)
                window = time.monotonic() - started
            out, rest = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired as exc:
        raise LoadError(f"loadgen still running after {budget + 15:.0f} s") from exc
    finally:
        if proc.poll() is None:
            stop_group(proc, grace=1.0)
    stderr += rest
    if proc.returncode != 0:
        raise LoadError(f"loadgen exited with {proc.returncode}: {stderr.decode()[-300:]}")
    try:
        load: dict[str, Any] = json.loads(out)
    except ValueError as exc:
        raise LoadError(f"loadgen printed no JSON: {out[:200]!r}") from exc
    # Only loadgen was reaped in between (servers are reaped after the case), so the
    # growth of RUSAGE_CHILDREN is its CPU time.
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    loadgen_cpu = (children_after.ru_utime - children_before.ru_utime) + (
        children_after.ru_stime - children_before.ru_stime
    )
    cpu = {
        "server": round((server_after - server_before) / window, 3) if window else 0.0,
        # loadgen runs a little longer than the window (closing, printing): an upper bound.
        "loadgen": round(loadgen_cpu / window, 3) if window else 0.0,
        "others": round(cpu_share(others_before, others_after, window), 3),
    }
    return load, peak, plateau, cpu


def listen_drops() -> int:
    """TcpExt ListenDrops from /proc/net/netstat: SYNs and handshakes the kernel
    dropped because a listen queue was full (it includes ListenOverflows).

    The counter covers the whole network namespace; during a case on a quiet machine
    the only listener under load is ours.
    """
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return 0
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            row = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return int(row.get("ListenDrops", 0))
    return 0


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds used so far by pid, its live descendants and the children it
    reaped (a forking server's finished per-connection processes)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            t = proc.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return total


def other_cpu_seconds(our_groups: set[int]) -> dict[int, float]:
    """CPU seconds used so far by every user-space process that is not ours.

    Pinning keeps our load generator off the server's CPU, but not someone else's test
    run: on a shared machine this is how a case finds out it was disturbed. Kernel
    threads (process group 0) are left out: ksoftirqd doing our loopback traffic is
    part of the measurement.
    """
    me = os.getpid()
    used = {}
    for proc in psutil.process_iter(["cpu_times"]):
        try:
            pgid = os.getpgid(proc.pid)
        except ProcessLookupError:
            continue
        times = proc.info["cpu_times"]
        if pgid == 0 or pgid in our_groups or proc.pid == me or times is None:
            continue
        used[proc.pid] = times.user + times.system
    return used


def cpu_share(before: dict[int, float], after: dict[int, float], wall: float) -> float:
    """CPUs' worth of time (1.0 = one CPU) the processes in `after` used since `before`.

    A process that started in between counts in full; one that ended in between is
    missed, so this is a lower bound.
    """
    used = sum(t - before.get(pid, 0.0) for pid, t in after.items())
    return max(0.0, used) / wall if wall > 0 else 0.0


def wait_until_quiet(limit: float, threshold: float = 0.1) -> float:
    """Wait (at most `limit` seconds) for a 0.5 s window in which other processes use
    less than `threshold` of a CPU; return the last share seen."""
    deadline = time.monotonic() + limit
    while True:
        before = other_cpu_seconds(set())
        time.sleep(0.5)
        share = cpu_share(before, other_cpu_seconds(set()), 0.5)
        if share < threshold or time.monotonic() >= deadline:
            return share


def measure_plateau(server_pid: int) -> Memory:
    """Memory with every connection held: the largest of 3 samples 0.2 s apart (a
    thread or process just spawned may still be growing)."""
    best = Memory()
    for i in range(3):
        if i:
            time.sleep(0.2)
        best = best.peak(tree_memory(server_pid, with_pss=True))
    return best


# -- build --------------------------------------------------------------------------


def build() -> None:
    """Compile the C programs into bench/build/ when missing or older than source."""
    BUILD.mkdir(parents=True, exist_ok=True)
    cc = os.environ.get("CC", "cc")
    for binary, source in C_SOURCES.items():
        if binary.exists() and binary.stat().st_mtime >= source.stat().st_mtime:
            continue
        argv = [cc, *CFLAGS, "-o", str(binary), str(source)]
        print("build:", shlex.join(argv), file=sys.stderr)
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.stderr:
            print(done.stderr, file=sys.stderr, end="")
        if done.returncode != 0:
            raise SystemExit(f"build of {source.name} failed")


# -- machine ------------------------------------------------------------------------


def read_text(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return "?"


def machine() -> dict[str, Any]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for dist in ("uvloop", "psutil", "servekit"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    cc = subprocess.run(
        [os.environ.get("CC", "cc"), "--version"], capture_output=True, text=True
    ).stdout.splitlines()
    git = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return {
        "cpu_model": model,
        "logical_cpus": os.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total,
        "kernel": platform.release(),
        "os": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "compiler": cc[0] if cc else "?",
        "versions": versions,
        "git": (git or "?") + (" (uncommitted changes)" if dirty else ""),
        "sysctl": {
            name: read_text(f"/proc/sys/net/{path}")
            for name, path in (
                ("net.core.somaxconn", "core/somaxconn"),
                ("net.ipv4.tcp_syncookies", "ipv4/tcp_syncookies"),
                ("net.ipv4.tcp_tw_reuse", "ipv4/tcp_tw_reuse"),
                ("net.ipv4.ip_local_port_range", "ipv4/ip_local_port_range"),
            )
        },
        "rlimit_nofile_hard": resource.getrlimit(resource.RLIMIT_NOFILE)[1],
    }


# -- report -------------------------------------------------------------------------


def fmt_int(value: float) -> str:
    return f"{value:,.0f}"


def fmt_us(us: float | None) -> str:
    if us is None:
        return "—"
    if us < 1000:
        return f"{us:.0f} µs"
    if us < 1_000_000:
        return f"{us / 1000:.2f} ms"
    return f"{us / 1_000_000:.2f} s"


def fmt_bytes(n: float) -> str:
    if n >= 1 << 30:
        return f"{n / (1 << 30):.2f} GiB"
    return f"{n / (1 << 20):.1f} MiB"


def fmt_ratio(value: float | None, base: float | None) -> str:
    if value is None or not base:
        return "—"
    return f"×{value / base:.2f}"  # noqa: RUF001 - the multiplication sign is meant


def headline(scenario: Scenario, record: dict[str, Any]) -> float | None:
    """The one number a scenario ranks by: a rate, or for hold the memory held.

    Memory ranks by PSS: an RSS sum counts the pages a forked child shares with its
    parent once per process, which would charge a pre-fork server for memory it does
    not use.
    """
    if record.get("status") != "ok":
        return None
    if scenario.mode == "hold":
        return float((record.get("plateau") or record["peak"])["pss"]) or None
    return float(record["load"]["rate"])


def error_text(load: dict[str, Any]) -> str:
    if not load.get("errors"):
        return "0"
    kinds = ", ".join(f"{n} {k}" for k, n in load["error_kinds"].items() if n)
    return f"{load['errors']} ({kinds})"


Column = tuple[str, Callable[[dict[str, Any]], str]]


def latency_columns() -> list[Column]:
    return [
        ("p50", lambda r: fmt_us(r["load"]["latency_us"]["p50"])),
        ("p99", lambda r: fmt_us(r["load"]["latency_us"]["p99"])),
        ("max", lambda r: fmt_us(r["load"]["latency_us"]["max"])),
    ]


def first_response(load: dict[str, Any]) -> str:
    if load["never_answered"]:
        return f"never, for {load['never_answered']}"
    return fmt_us(load["first_response_max_us"])


def held(record: dict[str, Any]) -> dict[str, int]:
    """Memory while every connection was held (the peak if the plateau was missed)."""
    return record.get("plateau") or record["peak"]


def per_connection(record: dict[str, Any]) -> str:
    """PSS added per answered connection, over the idle server's."""
    answered = record["load"]["answered"]
    if not answered:
        return "—"
    # Clamped at 0: a server that allocates nothing per connection (echo_epoll) can
    # measure a few pages less than idle, which says nothing useful.
    added = max(0, held(record)["pss"] - record["idle"]["pss"])
    return f"{added / answered / 1024:.1f} KiB"


def columns(scenario: Scenario, n: int, ratio: Callable[[dict[str, Any]], str]) -> list[Column]:
    """The table layout of one scenario: (header, cell of a successful record)."""
    peak_rss: Column = ("peak RSS", lambda r: fmt_bytes(r["peak"]["rss"]))
    listen: Column = ("listen drops", lambda r: fmt_int(r.get("listen_drops", 0)))
    cpu: Column = (
        "CPU server / loadgen",
        lambda r: f"{r['cpu']['server']:.2f} / {r['cpu']['loadgen']:.2f}",
    )
    rate = ("conn/s" if scenario.mode == "churn" else "req/s", lambda r: fmt_int(r["load"]["rate"]))
    if scenario.mode == "pingpong":
        return [
            rate,
            ("vs stdlib", ratio),
            *latency_columns(),
            ("unanswered", lambda r: f"{r['load']['unanswered']} / {n}"),
            ("slowest first response", lambda r: first_response(r["load"])),
            *(
                [("censored", lambda r: fmt_int(r["load"].get("censored", 0)))]
                if scenario.rate
                else []
            ),
            listen,
            ("errors", lambda r: error_text(r["load"])),
            cpu,
            peak_rss,
        ]
    if scenario.mode == "churn":
        errors: Column = ("errors", lambda r: error_text(r["load"]))
        starved: Column = ("starved slots", lambda r: f"{r['load']['unanswered']} / {n}")
        return [
            rate,
            ("vs stdlib", ratio),
            *latency_columns(),
            starved,
            errors,
            listen,
            cpu,
            peak_rss,
        ]
    if scenario.mode == "udp":
        lost: Column = ("lost", lambda r: fmt_int(r["load"]["lost"]))
        return [rate, ("vs stdlib", ratio), *latency_columns(), lost, cpu, peak_rss]
    return [
        ("answered", lambda r: f"{r['load']['answered']:,} / {r['load']['conns']:,}"),
        ("ramp-up", lambda r: f"{r['load']['ramp_s']:.2f} s"),
        ("peak RSS (sum)", lambda r: fmt_bytes(r["peak"]["rss"])),
        ("PSS held (sum)", lambda r: fmt_bytes(held(r)["pss"])),
        ("per connection (PSS)", per_connection),
        ("processes", lambda r: str(held(r)["processes"])),
        ("threads", lambda r: str(held(r)["threads"])),
        ("PSS vs stdlib", ratio),
    ]


def scenario_table(
    scenario: Scenario, settings: Settings, runs: dict[str, dict[str, Any]], order: list[str]
) -> list[str]:
    base = headline(scenario, runs.get(BASELINE, {}))
    cols = columns(
        scenario, settings.conns(scenario), lambda r: fmt_ratio(headline(scenario, r), base)
    )
    lines = [
        "| contender | " + " | ".join(h for h, _ in cols) + " |",
        "|---|" + "--:|" * len(cols),
    ]
    notes: list[str] = []
    for name in order:
        record = runs.get(name)
        if record is None:
            continue
        if record["status"] == "ok":
            cells = [cell(record) for _, cell in cols]
        else:
            cells = [record["status"]] + [""] * (len(cols) - 1)
            notes.append(f"`{name}`: {record.get('reason', '')}")
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
        if record["status"] == "ok" and scenario.mode == "hold":
            load = record["load"]
            if load["answered"] < load["conns"]:
                notes.append(
                    f"`{name}`: {load['conns'] - load['answered']:,} connections unanswered "
                    f"when the ramp-up stopped (no new echo for {settings.hold_stall:g} s)."
                )
        cpu = record.get("cpu", {})
        if cpu.get("others", 0) >= NOISY:
            notes.append(
                f"`{name}`: other processes used {cpu['others']:.2f} CPU during this "
                "case; its figures are disturbed."
            )
        if cpu.get("loadgen", 0) >= LOADGEN_SATURATED and scenario.mode != "hold":
            notes.append(
                f"`{name}`: loadgen used {cpu['loadgen']:.2f} of its CPU, so it may be the "
                "limit here, not the server."
            )
        if record.get("stop", {}).get("sigkill"):
            notes.append(f"`{name}`: did not exit within {STOP_GRACE:g} s of SIGTERM; killed.")
        if record.get("stderr_lines"):
            notes.append(
                f"`{name}`: the server wrote {record['stderr_lines']} lines to stderr "
                f"(bench/build/logs/{name}-{scenario.name}.log)."
            )
    if notes:
        lines += [""] + [f"- {note}" for note in notes]
    return lines


def disturbance_warning(results: dict[str, Any]) -> list[str]:
    """A warning paragraph if other processes disturbed some cases, else nothing."""
    cases = [r for runs in results["runs"].values() for r in runs.values() if "cpu" in r]
    noisy = [r for r in cases if r["cpu"]["others"] >= NOISY]
    if not noisy:
        return []
    worst = max(r["cpu"]["others"] for r in noisy)
    return [
        f"**Warning: other processes used {NOISY:g} CPU or more during {len(noisy)} of "
        f"{len(cases)} cases (up to {worst:.2f} CPU).** Those cases are marked below; "
        "their figures understate the contenders. Rerun them on a quiet machine.",
        "",
    ]


def write_markdown(results: dict[str, Any], path: Path) -> None:
    meta = results["machine"]
    settings = Settings(**results["settings"])
    order = [c["name"] for c in results["contenders"]]
    lines = [
        "# servekit benchmark results",
        "",
        f"Run {results['date']} on `{meta['git']}`. Reproduce with:",
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
        f"| compiler | {meta['compiler']} |",
        f"| packages | {', '.join(f'{k} {v}' for k, v in meta['versions'].items())} |",
        f"| sysctl | {', '.join(f'{k} = {v}' for k, v in meta['sysctl'].items())} |",
        f"| pinning | {results['pinning']} |",
        "",
        f"Timed scenarios: {settings.warmup:g} s warm-up, then {settings.duration:g} s "
        f"measured; {settings.size}-byte lines; latency percentiles from loadgen's "
        "1 µs histogram. Ratios are to `stdlib_threading` (socketserver.ThreadingTCPServer "
        "as shipped). *Errors* and *listen drops* count the whole case, warm-up "
        "included. *CPU server / loadgen* is CPU time over the measured time (1.00 = one "
        "CPU). *Peak RSS* is the largest sum over the server's process tree sampled "
        f"every {SAMPLE_INTERVAL:g} s.",
        "",
        *disturbance_warning(results),
        "Contenders:",
        "",
    ]
    lines += [f"- `{c['name']}`: {c['description']}" for c in results["contenders"]]
    for scenario in SCENARIOS:
        runs = results["runs"].get(scenario.name)
        if not runs:
            continue
        n = settings.conns(scenario)
        unit = {"churn": "slots", "udp": "slots", "hold": "connections"}.get(scenario.mode)
        title = scenario.title + (f", {n} {unit}" if unit else "")
        lines += ["", f"## {title}", "", scenario.explain, ""]
        lines += scenario_table(scenario, settings, runs, order)
    lines += ["", "![throughput and memory](chart.png)", ""]
    path.write_text("\n".join(lines))


def runs_of(results: dict[str, Any], scenario: Scenario) -> dict[str, Any]:
    runs: dict[str, Any] = results["runs"].get(scenario.name, {})
    return runs


def write_chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    order = [c["name"] for c in results["contenders"]]
    timed = [s for s in SCENARIOS if s.mode != "hold" and s.name in results["runs"]]
    hold = next((s for s in SCENARIOS if s.mode == "hold" and s.name in results["runs"]), None)
    fig, axes = plt.subplots(
        1, 2, figsize=(15, 5.5), gridspec_kw={"width_ratios": [3, 1.3]}, squeeze=False
    )
    ax, ax_mem = axes[0]
    width = 0.8 / max(1, len(timed))
    for i, scenario in enumerate(timed):
        runs = results["runs"][scenario.name]
        xs, ys, hatches = [], [], []
        for j, name in enumerate(order):
            record = runs.get(name, {})
            value = headline(scenario, record)
            if value:
                xs.append(j + (i - (len(timed) - 1) / 2) * width)
                ys.append(value)
                starved = record["load"].get("unanswered", 0) > 0
                hatches.append("///" if starved else "")
        unit = "conn/s" if scenario.mode == "churn" else "req/s"
        bars = ax.bar(xs, ys, width, label=f"{scenario.name} ({unit})")
        for bar, hatch in zip(bars, hatches, strict=True):
            bar.set_hatch(hatch)
    for j, name in enumerate(order):
        if all(runs_of(results, s).get(name, {}).get("status") != "ok" for s in timed):
            ax.text(j, 0.02, "n/a", transform=ax.get_xaxis_transform(), ha="center")
    ax.set_yscale("log")
    # Headroom above the tallest bar for the legend (a factor of 20 on the log axis).
    top = max((b.get_height() for b in ax.patches), default=1.0)
    ax.set_ylim(top=top * 20)
    ax.set_xticks(range(len(order)), order, rotation=20, ha="right")
    ax.set_xlim(-0.6, len(order) - 0.4)  # room for contenders without a bar (n/a)
    ax.set_ylabel("requests or connections per second (log)")
    ax.set_title("Throughput, server on one CPU")
    ax.grid(axis="y", which="both", alpha=0.3)
    handles, _labels = ax.get_legend_handles_labels()
    starved = Patch(facecolor="white", edgecolor="black", hatch="///")
    ax.legend(
        [*handles, starved],
        [*_labels, "hatched: some connections or slots got no answer"],
        fontsize="small",
        ncol=3,
        loc="upper center",
    )
    if hold is not None:
        runs = results["runs"][hold.name]
        values, labels = [], []
        for name in order:
            record = runs.get(name, {})
            if record.get("status") != "ok":
                values.append(0.0)
                labels.append("")
                continue
            values.append(held(record)["pss"] / (1 << 20))
            labels.append(f"{record['load']['answered']}/{record['load']['conns']}")
        bars = ax_mem.bar(range(len(order)), values, color="tab:gray")
        ax_mem.bar_label(bars, labels, fontsize="x-small")
        for j, value in enumerate(values):
            if not value:
                ax_mem.text(j, 0.02, "n/a", transform=ax_mem.get_xaxis_transform(), ha="center")
        ax_mem.set_xticks(range(len(order)), order, rotation=30, ha="right")
        ax_mem.set_yscale("log")
        ax_mem.set_ylabel("PSS, MiB (log)")
        conns = Settings(**results["settings"]).hold_conns
        ax_mem.set_title(f"Memory holding {conns:,} connections\n(label: answered)")
        ax_mem.grid(axis="y", which="both", alpha=0.3)
    else:
        ax_mem.set_visible(False)
    fig.suptitle(f"servekit bench, {results['date']}, {results['machine']['cpu_model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main ---------------------------------------------------------------------------


@dataclass
class Plan:
    contenders: list[Contender]
    scenarios: list[Scenario]
    settings: Settings
    pinning: Pinning
    out: Path
    command: str = ""
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)


def parse_args(argv: list[str] | None = None) -> Plan:
    names = [c.name for c in CONTENDERS]
    scenario_names = [s.name for s in SCENARIOS]
    parser = argparse.ArgumentParser(
        description="Run the servekit benchmark suite.",
        epilog=f"contenders: {', '.join(names)}; scenarios: {', '.join(scenario_names)} "
        "(or 'pingpong' for all three ping-pong ones)",
    )
    parser.add_argument("--quick", action="store_true", help="short smoke run (< 1 min)")
    parser.add_argument("--only", help="comma-separated contenders")
    parser.add_argument("--scenarios", help="comma-separated scenarios")
    parser.add_argument("--out", type=Path, default=BENCH / "results", help="output directory")
    parser.add_argument("--duration", type=float, help="measured seconds per timed case")
    parser.add_argument("--warmup", type=float, help="warm-up seconds per timed case")
    parser.add_argument("--hold-conns", type=int, help="connections for the hold scenario")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        help="seconds to wait at most, before each case, for other processes to go "
        "quiet (default 10, 0 with --quick)",
    )
    parser.add_argument("--server-cpu", type=int, default=1)
    parser.add_argument("--load-cpu", type=int, default=0)
    args = parser.parse_args(argv)

    contenders = CONTENDERS
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            parser.error(f"unknown contender(s) {', '.join(unknown)}; known: {', '.join(names)}")
        contenders = [c for c in CONTENDERS if c.name in wanted]
    scenarios = SCENARIOS
    if args.scenarios:
        wanted = []
        for n in args.scenarios.split(","):
            wanted += SCENARIO_GROUPS.get(n.strip(), [n.strip()])
        unknown = sorted(set(wanted) - set(scenario_names))
        if unknown:
            parser.error(
                f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(scenario_names)}"
            )
        scenarios = [s for s in SCENARIOS if s.name in wanted]
    settings = QUICK if args.quick else FULL
    overrides = {
        k: v
        for k, v in (
            ("duration", args.duration),
            ("warmup", args.warmup),
            ("hold_conns", args.hold_conns),
            ("quiet_wait", args.quiet_wait),
        )
        if v is not None
    }
    settings = Settings(**{**vars(settings), **overrides})

    cpus = os.sched_getaffinity(0)
    pinned = (
        shutil.which("taskset") is not None
        and args.server_cpu != args.load_cpu
        and {args.server_cpu, args.load_cpu} <= cpus
    )
    if not pinned:
        print(
            f"warning: cannot pin (CPUs available {sorted(cpus)}, taskset "
            f"{'found' if shutil.which('taskset') else 'missing'}); figures will be noisy",
            file=sys.stderr,
        )
    plan = Plan(
        contenders, scenarios, settings, Pinning(pinned, args.server_cpu, args.load_cpu), args.out
    )
    given = sys.argv[1:] if argv is None else argv
    plan.command = shlex.join(["python", "bench/run.py", *given])
    return plan


def summary_line(scenario: Scenario, name: str, record: dict[str, Any]) -> str:
    head = f"{scenario.name:<13} {name:<17}"
    if record["status"] != "ok":
        return f"{head} {record['status']}: {record.get('reason', '')}"
    load = record["load"]
    cpu = record.get("cpu", {})
    noise = f"  (other processes: {cpu.get('others', 0):.2f} CPU)"
    noise = noise if cpu.get("others", 0) >= NOISY else ""
    if scenario.mode == "hold":
        mem = held(record)
        return (
            f"{head} answered {load['answered']}/{load['conns']}  RSS {fmt_bytes(mem['rss'])}"
            f"  PSS {fmt_bytes(mem['pss'])}{noise}"
        )
    lat = load["latency_us"]
    extra = f"  unanswered {load['unanswered']}" if scenario.mode == "pingpong" else ""
    return (
        f"{head} {fmt_int(load['rate']):>9}/s  p50 {fmt_us(lat['p50'])}  "
        f"p99 {fmt_us(lat['p99'])}  errors {load['errors']}{extra}{noise}"
    )


def main(argv: list[str] | None = None) -> int:
    plan = parse_args(argv)
    if plan.pinning.enabled:
        # The driver samples memory while the load runs: keep it off the server's CPU.
        os.sched_setaffinity(0, {plan.pinning.load_cpu})
    become_subreaper()
    raise_nofile()
    build()
    LOGS.mkdir(parents=True, exist_ok=True)
    plan.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    for scenario in plan.scenarios:
        runs = plan.runs.setdefault(scenario.name, {})
        for contender in plan.contenders:
            record = run_case(contender, scenario, plan.settings, plan.pinning)
            runs[contender.name] = record
            print(summary_line(scenario, contender.name, record), flush=True)
    pin = plan.pinning
    results = {
        "date": date,
        "command": plan.command,
        "elapsed_s": round(time.monotonic() - started, 1),
        "machine": machine(),
        "pinning": (
            f"server and its children on CPU {pin.server_cpu}, loadgen and driver on CPU "
            f"{pin.load_cpu} (taskset)"
            if pin.enabled
            else "off: figures are not comparable"
        ),
        "settings": vars(plan.settings),
        "contenders": [{"name": c.name, "description": c.description} for c in plan.contenders],
        "runs": plan.runs,
    }
    tmp = plan.out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(plan.out / "results.json")
    write_markdown(results, plan.out / "RESULTS.md")
    write_chart(results, plan.out / "chart.png")
    print(f"wrote {plan.out}/RESULTS.md, results.json, chart.png in {results['elapsed_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
