"""Run a server in a subprocess and watch it: readiness from its ready line, logs as events."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType

import psutil

ROOT = Path(__file__).resolve().parents[2]
# Its sitecustomize makes each server process dump its stacks on SIGUSR2 (see __exit__).
STACKDUMP = Path(__file__).resolve().parent / "stackdump"
READY = re.compile(r"servekit: ready: .* on \w+://[^ ]*:(\d+)")


class ServerProcess:
    """A server started with Popen in its own session; stopped by pid on exit."""

    def __init__(self, argv: list[str], *, env: dict[str, str] | None = None) -> None:
        self.argv = argv
        self.env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}", **(env or {})}
        self.env["PYTHONPATH"] = f"{STACKDUMP}:{self.env['PYTHONPATH']}"
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._readers: list[threading.Thread] = []
        self.seen_pids: set[int] = set()

    @classmethod
    def cli(cls, *args: str, env: dict[str, str] | None = None) -> ServerProcess:
        return cls([sys.executable, "-m", "servekit", *args], env=env)

    @classmethod
    def app(cls, mode: str) -> ServerProcess:
        return cls([sys.executable, "-m", "tests.integration.apps", mode])

    def __enter__(self) -> ServerProcess:
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=self.env,
            start_new_session=True,
        )
        for stream in (self.proc.stdout, self.proc.stderr):
            reader = threading.Thread(target=self._read, args=(stream,), daemon=True)
            reader.start()
            self._readers.append(reader)
        return self

    def _read(self, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def wait_for(self, pattern: str, timeout: float = 10.0, start: int = 0) -> re.Match[str]:
        """Block until an output line (from index start) matches; return the match."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            index = start
            while True:
                while index < len(self.lines):
                    match = regex.search(self.lines[index])
                    if match:
                        return match
                    index += 1
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (
                    self.proc is not None
                    and self.proc.poll() is not None
                    and not any(r.is_alive() for r in self._readers)
                ):
                    raise TimeoutError(
                        f"no line matching {pattern!r} within {timeout}s; output:\n"
                        + "\n".join(self.lines[-40:])
                    )
                self._changed.wait(remaining)

    def count(self, pattern: str, start: int = 0) -> int:
        """Output lines (from index start) that match pattern."""
        regex = re.compile(pattern)
        with self._changed:
            return sum(1 for line in self.lines[start:] if regex.search(line))

    def wait_ready(self, timeout: float = 15.0) -> int:
        self.port = int(self.wait_for(READY.pattern, timeout).group(1))
        self.workers()  # remember the first generation
        return self.port

    def workers(self) -> list[int]:
        """Live worker processes (children of the server), remembered for the zombie check."""
        try:
            children = psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return []
        pids = []
        for child in children:
            try:
                if child.status() != psutil.STATUS_ZOMBIE:
                    pids.append(child.pid)
            except psutil.NoSuchProcess:
                pass  # a worker that exited (retired) since children() listed it
        self.seen_pids.update(pids)
        return pids

    def send(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def connect(self, timeout: float = 10.0) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=timeout)

    def request(self, line: bytes, timeout: float = 10.0) -> bytes:
        with self.connect(timeout) as sock, sock.makefile("rb") as reader:
            sock.sendall(line)
            return reader.readline()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.workers()
            if exc_type is not None:
                self.dump_stacks()
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)
        for reader in self._readers:
            reader.join(10)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()

    def dump_stacks(self, timeout: float = 3.0) -> None:
        """Print (for pytest's report of a failed test) where every thread of the server
        and of its workers waits: each dumps its stacks on SIGUSR2 (stackdump/)."""
        assert self.proc is not None
        try:
            processes = [psutil.Process(self.proc.pid)]
            processes += processes[0].children(recursive=True)
        except psutil.NoSuchProcess:
            return
        mark = len(self.lines)
        signalled = 0
        for process in processes:
            try:
                process.send_signal(signal.SIGUSR2)
                signalled += 1
            except psutil.NoSuchProcess:
                pass
        with self._changed:  # until each process wrote its dump, or the timeout
            self._changed.wait_for(
                lambda: self.count(r"^Current thread 0x", start=mark) >= signalled, timeout
            )
            dump = self.lines[mark:]
        print(f"stacks of {signalled} server process(es) at the failure:")
        print("\n".join(dump))

    def assert_no_leftovers(self, timeout: float = 5.0) -> None:
        """Every worker this server ever had is gone (reaped by it, not orphaned)."""
        _gone, alive = psutil.wait_procs(
            [p for p in map(_process, self.seen_pids) if p is not None], timeout=timeout
        )
        assert not alive, f"worker processes left behind: {[p.pid for p in alive]}"


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None
