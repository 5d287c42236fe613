"""servekit: a drop-in replacement for socketserver, and a production server framework.

``import servekit as socketserver`` gives every public name of the standard library's
socketserver (Python 3.13) with the same behaviour. ``servekit.__all__`` is exactly
socketserver's, so ``from servekit import *`` is a drop-in too.

The production layer (thread pools, pre-forked workers, ...) is imported by name, e.g.
``from servekit import ThreadPoolMixIn``; those names load their module on first use,
so ``import servekit`` alone loads only the standard-library-only core.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from servekit.core import *  # noqa: F403 - socketserver's public names
from servekit.core import SOCKETSERVER_ALL as _SOCKETSERVER_ALL
from servekit.core import ServerState as ServerState
from servekit.install import InstallError as InstallError
from servekit.install import install as install
from servekit.install import installed as installed
from servekit.install import uninstall as uninstall

if TYPE_CHECKING:
    from servekit.features.limits import LimitsMixIn as LimitsMixIn
    from servekit.features.listeners import ListenerOptions as ListenerOptions
    from servekit.features.listeners import ListenersMixIn as ListenersMixIn
    from servekit.features.metrics import MetricsMixIn as MetricsMixIn
    from servekit.features.pool import ThreadPoolMixIn as ThreadPoolMixIn
    from servekit.features.pool import ThreadPoolTCPServer as ThreadPoolTCPServer
    from servekit.features.pool import ThreadPoolUDPServer as ThreadPoolUDPServer
    from servekit.features.pool import ThreadPoolUnixDatagramServer as ThreadPoolUnixDatagramServer
    from servekit.features.pool import ThreadPoolUnixStreamServer as ThreadPoolUnixStreamServer
    from servekit.features.pool import WorkerPool as WorkerPool
    from servekit.features.proxy import ProxyProtocolMixIn as ProxyProtocolMixIn
    from servekit.features.tls import TLSMixIn as TLSMixIn
    from servekit.process.prefork import PreforkMixIn as PreforkMixIn
    from servekit.process.supervisor import Supervisor as Supervisor

__version__ = "0.1.0.dev0"

__all__ = list(_SOCKETSERVER_ALL)

# Production names and the module that defines each; loaded on first access (PEP 562).
_LAZY = {
    "ThreadPoolMixIn": "servekit.features.pool",
    "ThreadPoolTCPServer": "servekit.features.pool",
    "ThreadPoolUDPServer": "servekit.features.pool",
    "ThreadPoolUnixStreamServer": "servekit.features.pool",
    "ThreadPoolUnixDatagramServer": "servekit.features.pool",
    "WorkerPool": "servekit.features.pool",
    "PreforkMixIn": "servekit.process.prefork",
    "Supervisor": "servekit.process.supervisor",
    "LimitsMixIn": "servekit.features.limits",
    "ListenersMixIn": "servekit.features.listeners",
    "ListenerOptions": "servekit.features.listeners",
    "MetricsMixIn": "servekit.features.metrics",
    "TLSMixIn": "servekit.features.tls",
    "ProxyProtocolMixIn": "servekit.features.proxy",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'servekit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
