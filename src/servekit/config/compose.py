# Composing a server class from features, in the one order that works.
#
# Mix-ins override hooks and chain with super(), so their order in the bases is part
# of the behaviour. This module is the single place that knows it; the command line
# uses it, and users who build servers from configuration can too:
#
#   PreforkMixIn       replaces the loop in the parent; everything below runs in workers
#   MetricsMixIn       counts through every hook, before the features that act on them;
#                      its admin listener runs in the process that owns the listeners
#   ListenersMixIn     several listening sockets, inherited sockets
#   LimitsMixIn        connection cap, the wait for the first request (the last preamble
#                      stage), idle timeouts
#   ProxyProtocolMixIn the PROXY header stage, which precedes any TLS bytes
#   TLSMixIn           the handshake stage (waits in the loop, crypto on a pool thread)
#   ThreadPoolMixIn    concurrency: the connection pipeline and its pool threads
#
# ServerFeature.__init_subclass__ refuses any other order with a TypeError.
#   socket type        TCPServer, UDPServer, UnixStreamServer, UnixDatagramServer
from __future__ import annotations

import dataclasses
import socket

from servekit.core import TCPServer, UDPServer

__all__ = ["Features", "feature_classes", "server_class", "socket_server_type"]


@dataclasses.dataclass(frozen=True)
class Features:
    """What a composed server should do; server_class() turns it into a class."""

    kind: str = "tcp"  # of the (first) address: tcp, udp, unix, unix-dgram, fd
    workers: int = 1
    tls: bool = False
    proxy: bool = False
    limits: bool = False
    listeners: bool = False
    metrics: bool = False


def socket_server_type(kind: str) -> type[TCPServer]:
    """The compatibility-core server class for an address kind (see servekit.features.addresses)."""
    if kind in ("tcp", "fd"):
        return TCPServer
    if kind == "udp":
        return UDPServer
    if kind in ("unix", "unix-dgram") and hasattr(socket, "AF_UNIX"):
        from servekit.core import UnixDatagramServer, UnixStreamServer

        return UnixStreamServer if kind == "unix" else UnixDatagramServer
    raise ValueError(f"no server type for address kind {kind!r}")


def feature_classes() -> list[type]:
    """Every production mix-in, in composition order (for settings and docs)."""
    from servekit.features.limits import LimitsMixIn
    from servekit.features.listeners import ListenersMixIn
    from servekit.features.metrics import MetricsMixIn
    from servekit.features.pool import ThreadPoolMixIn
    from servekit.features.proxy import ProxyProtocolMixIn
    from servekit.features.tls import TLSMixIn
    from servekit.process.prefork import PreforkMixIn

    return [
        PreforkMixIn,
        MetricsMixIn,
        ListenersMixIn,
        LimitsMixIn,
        ProxyProtocolMixIn,
        TLSMixIn,
        ThreadPoolMixIn,
    ]


def server_class(features: Features, *, name: str = "Server") -> type[TCPServer]:
    """A server class with the requested features, its mix-ins in the right order.

    Every server gets a bounded thread pool; the rest is as features says.
    """
    prefork, metrics, listeners, limits, proxy, tls, pool = feature_classes()
    wanted = [
        (prefork, features.workers > 1),
        (metrics, features.metrics),
        (listeners, features.listeners),
        (limits, features.limits),
        (proxy, features.proxy),
        (tls, features.tls),
        (pool, True),
    ]
    bases = [cls for cls, on in wanted if on]
    bases.append(socket_server_type(features.kind))
    cls: type[TCPServer] = type(name, tuple(bases), {"__module__": __name__})
    return cls
