# ServerFeature: the base class of every production mix-in. Owns the public hooks through
# which features talk to each other, the check that mix-ins are composed in the one order
# that works, the blocking preamble for servers without a connection pipeline, and the
# one shutdown sequence.
#
# Strategy. socketserver's mix-ins override a hook and chain with super(), so their order
# in the bases is behaviour. Here every feature declares its place (feature_rank), and
# __init_subclass__ refuses a class that puts them out of order with a TypeError naming
# the order that works, instead of a server that silently skips a step.
#
# Features never call each other's methods. They contribute:
#   connection_stages()    preamble stages a new connection goes through, in order
#   connection_opened(c)   a connection was accepted (before its preamble)
#   connection_closed(c)   it was closed (exactly once per connection)
#   message_hooks()        callables run before each message, composed once: a feature
#                          adds one only when its settings call for per-message work
#                          (message_started(c), for subclasses, runs after them)
# and the shutdown steps below. The stages run in the serving loop when the server has a
# connection pipeline (ThreadPoolMixIn); otherwise finish_request() runs them here, on
# the worker, blocking with their deadlines, before the handler.
#
# The shutdown sequence, in this order, once (server_close() is idempotent):
#   0. make the kernel stop completing new connections on     stop_admitting()
#      the listeners (they stay open: closing would reset
#      what is queued), so step 1 can take all there is
#   1. stop accepting: take what the kernel already queued   accept_backlog()
#      and serve it (each connection once, no keep-alive)
#   2. close the listening stream sockets                      stop_listening()
#   3. close connections parked idle or still in a preamble   close_idle_connections()
#   4. wait for in-flight handlers, up to drain_timeout        drain()
#   5. release the rest: datagram sockets (in-flight replies   release()
#      were sent through them), then the core's own close      super().server_close()
from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from servekit.features.admission import refuse_new_connections
from servekit.features.connection import Connection, _set_current, current_connection
from servekit.features.pipeline import (
    Stage,
    outcome_of,
    report_peer_exception,
    run_stages_blocking,
)
from servekit.knobs import Configurable

if TYPE_CHECKING:
    from servekit.core.sockets import TCPServer

    _MixinBase = TCPServer
else:
    _MixinBase = object

__all__ = ["ServerFeature"]

log = logging.getLogger("servekit.features")


def _feature_order(cls: type) -> list[type]:
    return [k for k in cls.__mro__ if "feature_rank" in vars(k)]


class ServerFeature(Configurable, _MixinBase):
    """Base class of servekit's production mix-ins: their shared hooks and shutdown.

    A feature mix-in sets feature_rank (its place in the bases: lower comes first) and
    overrides the hooks it needs, chaining with super(). Hooks, all may be extended:

    - connection_stages() -> list of Stage: the preamble a connection goes through
    - connection_opened(connection) / connection_closed(connection)
    - message_hooks() -> list of callables(connection), run before each message
    - message_started(connection), for subclasses: after the message hooks
    - stop_admitting(), accept_backlog(), stop_listening(), close_idle_connections(),
      drain(), release(): the steps of server_close(), in that order
    """

    #: Place in the bases; ServerFeature itself has none.
    feature_rank: ClassVar[int]
    #: The class of the sockets ListenersMixIn accepts. The concurrency mix-in chooses
    #: it (ThreadPoolMixIn: servekit.features.connsocket.ConnectionSocket); a feature
    #: earlier in the bases must not set it.
    accepted_socket_class: type[socket.socket] = socket.socket
    # Set by server_close() as it starts; a class default because server_close() may run
    # before the features' __init__ (TCPServer.__init__ calls it when bind() fails).
    _close_started: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _check_order(cls)

    # -- hooks ---------------------------------------------------------------------------

    def connection_stages(self) -> list[Stage]:
        """The preamble stages of a new stream connection, in order. May be extended."""
        return []

    def connection_opened(self, connection: Connection) -> None:
        """Called once per accepted stream connection, before its preamble. May be extended."""

    def connection_closed(self, connection: Connection) -> None:
        """Called once per stream connection, when it is closed. May be extended."""

    def message_hooks(self) -> list[Callable[[Connection], object]]:
        """What features do before each message: callables, run in order on the
        handler's thread with the connection. May be extended (append to super()'s).

        Composed once (by the pipeline when it first sees a handler class; per
        connection without a pipeline), so a feature adds a hook only when its
        settings call for per-message work, and reads its settings then: a message
        costs a call per hook, and nothing for a feature that has nothing to do.
        """
        return []

    def message_started(self, connection: Connection) -> None:
        """Called on the handler's thread before it reads each message, after the
        message_hooks(). For subclasses: called only when a class overrides it."""

    def per_message_hooks(self) -> tuple[Callable[[Connection], object], ...]:
        """message_hooks(), then message_started() if the class overrides it: what runs
        before each message. For the pipeline; not meant to be extended."""
        hooks = self.message_hooks()
        if type(self).message_started is not ServerFeature.message_started:
            hooks.append(self.message_started)
        return tuple(hooks)

    def park_timeout(self) -> float | None:
        """Seconds a connection may stay parked between messages (None: until shutdown).

        May be extended; LimitsMixIn returns its idle_timeout.
        """
        return None

    # -- the handler ---------------------------------------------------------------------

    def finish_request(self, request: Any, client_address: Any) -> None:
        """Run the handler; without a connection pipeline, run the preamble first.

        With a pipeline the preamble already ran in the loop and this constructs the
        handler (for its first message). Elsewhere (ThreadingMixIn, ForkingMixIn,
        handle_request()) the stages run here, on the worker, each bounded by its own
        deadline; a failed stage is reported by the feature that owns it and the handler
        does not run.
        """
        if self.socket_type != socket.SOCK_STREAM:
            super().finish_request(request, client_address)
            return
        connection = current_connection()
        if connection is not None:
            factory = connection.handler_factory
            if factory is not None:
                factory(request, client_address, self)
            else:
                super().finish_request(request, client_address)
            return
        connection = Connection(request, client_address)
        _set_current(connection)
        self.connection_opened(connection)
        try:
            if not run_stages_blocking(self, connection, self.connection_stages()):
                return
            connection.messages = 1
            for hook in self.per_message_hooks():
                hook(connection)
            super().finish_request(connection.request, connection.client_address)
        except Exception as exc:
            connection.outcome = outcome_of(exc)
            if not report_peer_exception(connection, exc):
                raise  # a bug of the handler: the concurrency mix-in calls handle_error()
        except BaseException as exc:
            connection.outcome = outcome_of(exc)
            raise
        finally:
            _set_current(None)
            if connection.request is not request:
                # The handler ran over a wrapper (TLS); the caller closes only the raw
                # socket it gave us, which the wrapper has detached.
                self.shutdown_request(connection.request)
            self.connection_closed(connection)

    # -- the shutdown sequence -----------------------------------------------------------

    def stop_admitting(self) -> None:
        """Step 0: make the kernel drop new connection attempts on the listening TCP
        sockets, which stay open, so that accept_backlog() takes every connection the
        kernel will ever queue and stop_listening() resets none. May be extended."""
        if self.socket_type != socket.SOCK_STREAM:
            return
        for source in self.accept_sources():
            sock = source if isinstance(source, socket.socket) else source.socket
            refuse_new_connections(sock)

    def accept_backlog(self) -> None:
        """Step 1: take connections already queued by the kernel. May be extended."""

    def stop_listening(self) -> None:
        """Step 2: close the listening stream socket(s), so that the kernel refuses new
        connections instead of queueing them for nobody. May be extended."""
        if self.socket_type == socket.SOCK_STREAM:
            self.socket.close()

    def close_idle_connections(self) -> None:
        """Step 3: close connections that wait without a handler. May be extended."""

    def drain(self) -> None:
        """Step 4: wait for in-flight handlers, bounded. May be extended."""

    def release(self) -> None:
        """Step 5: release what in-flight handlers might still have used. May be extended."""

    def server_close(self) -> None:
        """Shut down in the documented order; a second call does nothing more."""
        if self._close_started:
            return
        self._close_started = True
        try:
            self.stop_admitting()
            self.accept_backlog()
            self.stop_listening()
            self.close_idle_connections()
            self.drain()
            self.release()
        finally:
            super().server_close()

    @property
    def closed(self) -> bool:
        """True once server_close() started."""
        return self._close_started


_CORE_CONCURRENCY = ("ThreadingMixIn", "ForkingMixIn")


def _check_order(cls: type) -> None:
    """Raise TypeError if cls composes features in an order that cannot work."""
    features = _feature_order(cls)
    if not features:
        return
    ranks = [k.feature_rank for k in features]  # type: ignore[attr-defined]
    if ranks != sorted(ranks):
        right = sorted(features, key=lambda k: k.feature_rank)  # type: ignore[attr-defined]
        names = ", ".join(k.__name__ for k in right)
        raise TypeError(
            f"{cls.__name__}: mix-ins in the wrong order "
            f"({', '.join(k.__name__ for k in features)}); write them as {names}, "
            "then the socket type (e.g. TCPServer)"
        )
    mro = cls.__mro__
    last_feature = max(mro.index(k) for k in features)
    concurrency = [
        k for k in mro if k.__name__ in _CORE_CONCURRENCY and "process_request" in vars(k)
    ]
    pools = [k for k in features if "pool_concurrency" in vars(k)]
    if pools and concurrency:
        raise TypeError(
            f"{cls.__name__}: {pools[0].__name__} and {concurrency[0].__name__} are both "
            "concurrency mix-ins; use one"
        )
    for klass in mro:
        if klass.__name__ == "BaseServer" and mro.index(klass) < last_feature:
            late = features[-1].__name__
            raise TypeError(
                f"{cls.__name__}: {late} comes after the server class in the bases, so "
                f"its hooks would never run; put every mix-in before the server class, "
                f"e.g. class {cls.__name__}({late}, TCPServer)"
            )
    for klass in concurrency:
        if mro.index(klass) < last_feature:
            raise TypeError(
                f"{cls.__name__}: {klass.__name__} must come after "
                f"{features[-1].__name__}: servekit's mix-ins go first, then the "
                "concurrency mix-in, then the socket type"
            )
