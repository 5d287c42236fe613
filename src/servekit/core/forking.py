# ForkingMixIn: a new process per request, as in the stdlib. Owns the set of child
# pids and reaping them.
#
# Difference from the stdlib: when max_children is reached, the stdlib waits with
# waitpid(-1), which can reap (and so steal the exit status of) a child that the
# application forked itself. Where the kernel has pidfds (Linux 5.3+) we wait only for
# our own children; elsewhere we fall back to the stdlib's waitpid(-1).
from __future__ import annotations

import os
import select
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from servekit.core.server import BaseServer

    _MixinBase = BaseServer
else:
    _MixinBase = object

__all__ = ["ForkingMixIn"]


class ForkingMixIn(_MixinBase):
    """Handle each request in a new process. Put it first in the bases.

    max_children: at most this many request processes at once; the loop waits for one
    to exit before accepting more. block_on_close: server_close() waits for every child.
    timeout: handle_request()'s default wait, as in the stdlib (children are also
    reaped when it expires).
    """

    timeout: float | None = 300
    #: pids of running request processes, or None before the first fork.
    active_children: set[int] | None = None
    max_children: int = 40
    block_on_close: bool = True

    def collect_children(self, *, blocking: bool = False) -> None:
        """Reap finished children; block while at max_children (or for all if blocking)."""
        if self.active_children is None:
            return
        while len(self.active_children) >= self.max_children:
            if not self._wait_for_one_child():
                break
        self._reap_children(blocking)

    def _reap_children(self, blocking: bool) -> None:
        if self.active_children is None:
            return
        flags = 0 if blocking else os.WNOHANG
        for pid in list(self.active_children):
            try:
                reaped, _ = os.waitpid(pid, flags)
            except ChildProcessError:
                # Already reaped elsewhere (e.g. by a SIGCHLD handler): forget it.
                self.active_children.discard(pid)
            except OSError:
                pass
            else:
                if reaped:
                    self.active_children.discard(pid)

    def _wait_for_one_child(self) -> bool:
        """Block until one of our children exits and reap it; False if none can be."""
        children = self.active_children
        assert children is not None
        if hasattr(os, "pidfd_open"):
            pidfds: dict[int, int] = {}
            try:
                for pid in list(children):
                    try:
                        pidfds[os.pidfd_open(pid)] = pid
                    except ProcessLookupError:
                        children.discard(pid)  # no longer exists: not ours to wait for
                        return True
                if pidfds:
                    # Also wake for the server's own wake-up channel, so that shutdown()
                    # is not stuck behind a long request at max_children.
                    wakeup = self._loop_wakeup()
                    watched = [*pidfds, wakeup.fileno()] if wakeup is not None else list(pidfds)
                    readable, _, _ = select.select(watched, [], [])
                    if wakeup is not None and wakeup.fileno() in readable:
                        if self.stop_requested:
                            return False
                        wakeup.drain()
                    for fd in readable:
                        if fd not in pidfds:
                            continue
                        pid = pidfds[fd]
                        try:
                            os.waitpid(pid, os.WNOHANG)
                        except ChildProcessError:
                            pass
                        children.discard(pid)
                    return True
            except OSError:
                pass  # e.g. EMFILE: fall back to the stdlib's behaviour below
            finally:
                for fd in pidfds:
                    os.close(fd)
        try:
            pid, _ = os.waitpid(-1, 0)
        except ChildProcessError:
            children.clear()
        except OSError:
            return False
        else:
            children.discard(pid)
        return True

    def handle_timeout(self) -> None:
        """Reap children when handle_request() times out."""
        self.collect_children()

    def service_actions(self) -> None:
        """Reap children on every turn of serve_forever()."""
        self.collect_children()

    def process_request(self, request: Any, client_address: Any) -> None:
        """Fork a new process to handle the request."""
        pid = os.fork()
        if pid:
            # Parent: remember the child and drop our copy of the connection.
            if self.active_children is None:
                self.active_children = set()
            self.active_children.add(pid)
            self.close_request(request)
            return
        # Child: handle the request, then leave without running the parent's cleanup
        # (atexit handlers, buffered files) a second time.
        status = 1
        try:
            self.finish_request(request, client_address)
            status = 0
        except Exception:
            self.handle_error(request, client_address)
        finally:
            try:
                self.shutdown_request(request)
            finally:
                os._exit(status)

    def server_close(self) -> None:
        super().server_close()
        # Nothing will be accepted any more, so unlike collect_children() this never
        # waits for room below max_children (the stdlib does, even without
        # block_on_close); with block_on_close it waits for every child.
        self._reap_children(blocking=self.block_on_close)
