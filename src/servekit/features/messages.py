# The per-message handler API: how a handler tells the server where one message ends, so
# that an idle connection can wait in the serving loop instead of on a thread.
#
# Strategy. The standard library already has the seam: BaseHTTPRequestHandler.handle()
# is a loop over handle_one_request() until close_connection is true. We adopt exactly
# that protocol for every stream handler, so one rule covers http.server's handlers
# unmodified and servekit's own:
#
#   * handle_one_request() reads and answers one message, blocking as long as it needs;
#   * close_connection, set by it, says whether the connection ends after this message.
#
# A server with a connection pipeline (ThreadPoolMixIn) runs handle_one_request() once
# per message on a pool thread and, between messages, parks the connection in its loop
# without a thread (servekit.features.pipeline). Any other server (ThreadingMixIn,
# ForkingMixIn, handle_request()) runs handle(), the plain loop, as before. A handler
# class is run message by message only when its handle() is one of the loops below,
# i.e. not overridden: a subclass that wraps handle() in its own logic keeps a thread
# for the connection's whole life, exactly as it was written.
from __future__ import annotations

import functools
import sys
from typing import Any

from servekit.core.handlers import StreamRequestHandler

__all__ = ["MessageHandler", "holds_response_head", "message_loop_of", "request_wait_of"]

# Marks a handle() that is only "handle_one_request() until close_connection"; the value
# is close_connection's initial value for the first message.
_MARK = "__servekit_message_loop__"


class MessageHandler(StreamRequestHandler):
    """A stream handler that answers one message at a time. Override handle_one_request().

    handle_one_request() reads one message from rfile and writes its answer to wfile;
    it sets ``self.close_connection = True`` to end the connection (at EOF, after an
    error reply, when the protocol says so). Attributes set on self persist from one
    message to the next: the same handler object serves the whole connection, and
    setup() and finish() run once, at its start and end.

    On a pool server, between messages the connection waits in the serving loop without a
    thread; its next bytes bring it back to a pool thread. Elsewhere handle() loops over
    handle_one_request() on one thread, as BaseHTTPRequestHandler.handle() does.
    """

    close_connection: bool = False
    #: On a pool server, hold a write that is a response head alone (ends with an empty
    #: line) until the next write, and send both in one send()
    #: (servekit.features.connsocket). For protocols that write a head and then a body
    #: in two writes; off here, on by default for http.server's handlers.
    hold_response_head: bool = False
    #: What a LimitsMixIn server with wait_for_request="auto" (the default) waits for,
    #: in its loop and without a thread, before the first message: "data" (its first
    #: bytes), "line" (a whole line), "head" (a whole HTTP request head) or "none" (the
    #: server speaks first). None: "data".
    wait_for_request: str | None = None

    def handle(self) -> None:
        """Call handle_one_request() until close_connection. Do not override: a handler
        whose handle() is overridden is no longer run message by message."""
        self.close_connection = False
        while not self.close_connection:
            self.handle_one_request()

    setattr(handle, _MARK, False)

    def handle_one_request(self) -> None:
        """Read one message and answer it. Must be overridden."""
        raise NotImplementedError


def message_loop_of(handler_class: Any) -> bool | None:
    """close_connection's initial value if handler_class can be run message by message,
    else None (its handle() is its own: run it whole, on one thread).

    True for http.server.BaseHTTPRequestHandler and its subclasses that keep its handle()
    (HTTP starts as "close", and parse_request() turns keep-alive on); False for
    MessageHandler's.
    """
    handle = getattr(handler_class, "handle", None)
    if handle is None:
        return None
    marked = getattr(handle, _MARK, None)
    if marked is not None:
        return bool(marked)
    http = sys.modules.get("http.server")  # never import it ourselves
    base = getattr(http, "BaseHTTPRequestHandler", None)
    if base is not None and handle is base.handle:
        return True
    return None


def holds_response_head(handler_class: Any) -> bool:
    """Whether a pool server holds this handler's response heads for its bodies.

    A class's own hold_response_head decides; without one, True for http.server's
    handlers (BaseHTTPRequestHandler writes the head and the body in two writes). A
    handler that writes a head and then waits on something other than its client
    before the body (a server-sent event stream) sets hold_response_head = False, so
    the head leaves at once instead of with the first event.
    """
    own = getattr(handler_class, "hold_response_head", None)
    if own is not None:
        return bool(own)
    http = sys.modules.get("http.server")  # never import it ourselves
    base = getattr(http, "BaseHTTPRequestHandler", None)
    return base is not None and isinstance(handler_class, type) and issubclass(handler_class, base)


def request_wait_of(handler_class: Any) -> str:
    """What a server should wait for before giving a new connection of this handler a
    thread (LimitsMixIn's wait_for_request="auto").

    The class's own wait_for_request attribute if it has one; "head" for http.server's
    handlers (a request is a line and headers up to an empty line: given a thread on
    its first bytes, a client that trickles its headers would hold that thread); "data"
    for any other.
    """
    if isinstance(handler_class, functools.partial):
        handler_class = handler_class.func
    declared = getattr(handler_class, "wait_for_request", None)
    if isinstance(declared, str):
        return declared
    http = sys.modules.get("http.server")  # never import it ourselves
    base = getattr(http, "BaseHTTPRequestHandler", None)
    if base is not None and isinstance(handler_class, type) and issubclass(handler_class, base):
        return "head"
    return "data"
