"""servekit: a drop-in replacement for socketserver, and a production server framework.

``import servekit as socketserver`` gives every public name of the standard library's
socketserver (Python 3.13) with the same behaviour. ``servekit.__all__`` is exactly
socketserver's, so ``from servekit import *`` is a drop-in too; the production layer
(thread pools, pre-forked workers, TLS, PROXY protocol, ...) is imported by name.
"""

from __future__ import annotations

from servekit.core import *  # noqa: F403 - socketserver's public names
from servekit.core import SOCKETSERVER_ALL as _SOCKETSERVER_ALL
from servekit.core import ServerState as ServerState
from servekit.install import InstallError as InstallError
from servekit.install import install as install
from servekit.install import installed as installed
from servekit.install import uninstall as uninstall

__version__ = "0.1.0.dev0"

__all__ = list(_SOCKETSERVER_ALL)
