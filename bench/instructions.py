# Instructions per message, counted: what the server's own code costs, free of the
# VM's timing noise.
#
# Strategy. Wall-clock figures on this shared 2-CPU VM drift by up to 2x from one
# minute to the next, which hides any change smaller than that. valgrind's callgrind
# counts the instructions a process executes (user space; the kernel's work is not
# counted), the same from run to run within a few per cent (1 to 6 % between runs of
# the same code here: how many messages a thread serves per wake-up still depends on
# timing, even under valgrind). Each contender is run under it
# twice, serving N and 2N messages from the same clients (16 keep-alive connections);
# the difference divided by N is the cost of one message, without start-up and
# connection set-up. In the churn scenario a message is a whole connection (16 clients
# that each connect, send a line, read it back and close, over and over), set-up
# included. Clients are plain Python in this process, outside valgrind.
#
#   python bench/instructions.py            # about 3 minutes; needs valgrind (apt)
#
# Writes bench/results/instructions.md (--out DIR: elsewhere). Not a replacement for
# run.py: a server can execute fewer instructions and still be slower (system calls,
# context switches, waiting); it shows where the Python work goes.
from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVERS = ROOT / "bench" / "servers"
DOCROOT = ROOT / "bench" / "build" / "docroot"
RESULTS = ROOT / "bench" / "results"
CONNECTIONS = 16
PORT_PATTERNS = (re.compile(rb"READY (\d+)"), re.compile(rb"tcp://127\.0\.0\.1:(\d+)"))

# The line echo servers, for the echo and the churn scenarios.
ECHO_CONTENDERS = [
    ("stdlib ThreadingTCPServer", [str(SERVERS / "stdlib_threading_1024.py"), "--port", "0"]),
    ("servekit echo (1 x 8)", ["-m", "servekit", "echo", "--bind", "127.0.0.1:0",
                               "--workers", "1", "--threads", "8"]),
]  # fmt: skip

# scenario -> (client kind, [(contender, argv)]); the first contender is the baseline.
SCENARIOS: dict[str, tuple[str, list[tuple[str, list[str]]]]] = {
    "line echo": ("line", ECHO_CONTENDERS),
    "connection churn: connect, one line, close (per connection)": ("churn", ECHO_CONTENDERS),
    "SimpleHTTPRequestHandler, keep-alive GET of 1 KiB": (
        "http",
        [
            ("stdlib, TCP_NODELAY by hand", [str(SERVERS / "http_stdlib.py"), "--port", "0",
                                             "--nodelay"]),
            ("servekit serve (1 x 8)", ["-m", "servekit", "serve", "http_handler:Handler",
                                        "--bind", "127.0.0.1:0", "--workers", "1",
                                        "--threads", "8"]),
        ],
    ),
}  # fmt: skip


def clients(kind: str, port: int, total: int) -> None:
    """total round trips over CONNECTIONS connections at once; each socket op bounded."""

    def one(count: int) -> None:
        if kind == "churn":  # a message is a connection: the whole of its life
            for i in range(count):
                with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
                    sock.sendall(b"message %d\n" % i)
                    with sock.makefile("rb") as reader:
                        reader.readline()
            return
        with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
            reader = sock.makefile("rb")
            for i in range(count):
                if kind == "line":
                    sock.sendall(b"message %d\n" % i)
                    reader.readline()
                    continue
                sock.sendall(b"GET /hello.txt HTTP/1.1\r\nHost: bench\r\n\r\n")
                length = 0
                for _ in range(100):  # the head: at most 100 lines
                    line = reader.readline()
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                    if line in (b"\r\n", b""):
                        break
                reader.read(length)

    threads = [
        threading.Thread(target=one, args=(total // CONNECTIONS,)) for _ in range(CONNECTIONS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)


def instructions(argv: list[str], kind: str, total: int, work: Path) -> int:
    """Instructions the server (and its children) executed serving total messages."""
    out, err = work / "out", work / "err"
    for old in work.glob("cg.*"):
        old.unlink()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(SERVERS)]))
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(
            ["valgrind", "--tool=callgrind", "--trace-children=yes",
             f"--callgrind-out-file={work}/cg.%p", sys.executable, *argv],
            stdout=stdout, stderr=stderr, cwd=DOCROOT, env=env, start_new_session=True,
        )  # fmt: skip
    try:
        port = None
        deadline = time.monotonic() + 120  # valgrind starts Python slowly
        while port is None and time.monotonic() < deadline and proc.poll() is None:
            text = out.read_bytes() + err.read_bytes()
            port = next((int(m.group(1)) for p in PORT_PATTERNS if (m := p.search(text))), None)
            time.sleep(0.2)  # polling a file for the server's line; nothing to wait on
        if port is None:
            raise RuntimeError(f"{argv}: no port announced; see {err}")
        clients(kind, port, total)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(120)
    total_ir = 0
    for dump in work.glob("cg.*"):
        match = re.search(r"^summary: (\d+)", dump.read_text(errors="replace"), re.M)
        total_ir += int(match.group(1)) if match else 0
    return total_ir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=3200, help="N (default 3200)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where instructions.md goes")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        print("instructions.py needs valgrind (apt-get install valgrind)", file=sys.stderr)
        return 2
    n = args.messages - args.messages % CONNECTIONS
    DOCROOT.mkdir(parents=True, exist_ok=True)
    hello = DOCROOT / "hello.txt"
    if not hello.exists():
        hello.write_bytes(b"x" * 1023 + b"\n")
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    lines = [
        "# Instructions per message",
        "",
        f"Run {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC on `{commit}` with "
        f"{sys.implementation.name} {sys.version.split()[0]}: `python bench/instructions.py`. "
        f"User-space instructions (callgrind) per message, from {n} and {2 * n} messages over "
        f"{CONNECTIONS} keep-alive connections; the kernel's work is not counted.",
        "",
        "| scenario | contender | instructions per message | vs baseline |",
        "|---|---|--:|--:|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for scenario, (kind, contenders) in SCENARIOS.items():
            base = None
            for name, argv in contenders:
                small = instructions(argv, kind, n, Path(tmp))
                large = instructions(argv, kind, 2 * n, Path(tmp))
                per = (large - small) / n
                base = per if base is None else base
                print(f"{scenario}: {name}: {per:,.0f} instructions per message", flush=True)
                lines.append(f"| {scenario} | {name} | {per:,.0f} | x{per / base:.2f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "instructions.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / 'instructions.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
