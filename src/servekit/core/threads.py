# ThreadingMixIn: a new thread per request, as in the stdlib. Owns the set of live
# request threads that server_close() waits for.
#
# The stdlib keeps every thread object in a list and prunes dead ones only when the
# next request arrives, so a burst leaves its threads referenced until more traffic
# comes. Here each thread removes itself from the live set as its last action: the set
# holds exactly the requests in flight, and memory is flat however many connections the
# server has seen.
from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from servekit.core.server import BaseServer

    _MixinBase = BaseServer
else:
    # At run time the mix-in derives from object only, so the MRO of a composed class
    # is exactly the stdlib's; type checkers see the server methods it chains to.
    _MixinBase = object

__all__ = ["LiveThreads", "ThreadingMixIn"]


class LiveThreads:
    """The request threads still running; each one removes itself when done."""

    __slots__ = ("_lock", "_threads")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()

    def __len__(self) -> int:
        return len(self._threads)

    def add(self, thread: threading.Thread) -> None:
        with self._lock:
            self._threads.add(thread)

    def discard(self, thread: threading.Thread) -> None:
        with self._lock:
            self._threads.discard(thread)

    def snapshot(self) -> list[threading.Thread]:
        with self._lock:
            return list(self._threads)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for every live thread; return False if some were still running at timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self.snapshot():
            if thread is threading.current_thread():
                continue  # server_close() called from a request thread
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            thread.join(remaining)
        return not any(t.is_alive() and t is not threading.current_thread() for t in self._threads)


class ThreadingMixIn(_MixinBase):
    """Handle each request in a new thread. Put it first in the bases.

    daemon_threads: request threads are daemon threads (the interpreter does not wait
    for them at exit). block_on_close: server_close() waits for running request threads.
    """

    daemon_threads: bool = False
    block_on_close: bool = True

    @property
    def _threads(self) -> LiveThreads:
        # Created on first use rather than in __init__, because subclasses commonly
        # serve requests from inside their own __init__ before calling ours.
        live: LiveThreads | None = self.__dict__.get("_servekit_live_threads")
        if live is None:
            live = self.__dict__.setdefault("_servekit_live_threads", LiveThreads())
        return live

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Run one request in its thread: finish, report errors, always close."""
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)

    def _run_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            self.process_request_thread(request, client_address)
        finally:
            self._threads.discard(threading.current_thread())

    def process_request(self, request: Any, client_address: Any) -> None:
        """Start a new thread to process the request."""
        thread = threading.Thread(
            target=self._run_request_thread,
            args=(request, client_address),
            name=f"servekit-request-{client_address!r}"[:64],
            daemon=self.daemon_threads,
        )
        threads = self._threads
        # As in the stdlib (3.7+), server_close() waits for non-daemon threads only: a
        # daemon thread is one the application said it need not wait for, and it may
        # be blocked on an idle keep-alive client forever (ThreadingHTTPServer sets
        # daemon_threads, and Ctrl-C on `python -m http.server` must not hang).
        if not thread.daemon:
            threads.add(thread)
        try:
            thread.start()
        except BaseException:
            threads.discard(thread)
            raise

    def server_close(self) -> None:
        super().server_close()
        if self.block_on_close:
            self._threads.join()
