# install() / uninstall(): make ``import socketserver`` yield servekit, so that
# http.server, xmlrpc.server, wsgiref and third-party code built on socketserver run on
# servekit without being edited.
#
# Strategy. Python binds ``import socketserver`` at import time, so replacing the entry
# in sys.modules only affects modules imported afterwards. A module that already holds
# the stdlib's socketserver (or one of its classes) would silently keep running on the
# stdlib; install() refuses in that case and names the modules, instead of leaving the
# user with a half-installed process.
#
# While installed, the compatibility classes report ``__module__ == "socketserver"``:
# servekit *is* socketserver then, so pickle, inspect and introspection that checks
# where a class lives (CPython's own test_socketserver does) find them there.
# uninstall() puts the real module names back.
from __future__ import annotations

import sys
import threading
import types

import servekit.core as _core
from servekit.errors import ServekitError

__all__ = ["InstallError", "install", "installed", "uninstall"]

_lock = threading.Lock()
_previous: types.ModuleType | None = None
_installed = False
_original_modules: dict[str, str] = {}


class InstallError(ServekitError, RuntimeError):
    """install() cannot take effect: modules already imported the stdlib socketserver."""


def _stdlib_dependents(stdlib: types.ModuleType) -> list[str]:
    """Modules whose globals reference the stdlib socketserver or a class defined in it.

    Only classes socketserver defines count: its namespace also holds classes it
    imported (io.BufferedIOBase, selectors.PollSelector as _ServerSelector), and
    io and selectors hold those by identity without having anything to do with
    socketserver.
    """
    classes = {
        id(v)
        for v in vars(stdlib).values()
        if isinstance(v, type) and v.__module__ == stdlib.__name__
    }
    users = []
    for name, module in list(sys.modules.items()):
        if module is None or module is stdlib or name == "socketserver":
            continue
        try:
            values = list(vars(module).values())
        except TypeError:
            continue
        if any(v is stdlib or id(v) in classes for v in values):
            users.append(name)
    return sorted(users)


def installed() -> bool:
    """True between install() and uninstall()."""
    return _installed


def install() -> None:
    """Make ``import socketserver`` return servekit, for modules imported from now on.

    Call it before importing http.server, xmlrpc.server, wsgiref.simple_server or any
    other module built on socketserver. Raises InstallError naming the modules that
    already imported the stdlib's socketserver. Calling it twice is harmless.
    """
    global _previous, _installed
    import servekit

    with _lock:
        if _installed:
            return
        current = sys.modules.get("socketserver")
        if current is not None and current is not servekit:
            dependents = _stdlib_dependents(current)
            if dependents:
                raise InstallError(
                    "servekit.install() must run before these modules are imported, "
                    "because they already hold the standard library's socketserver: "
                    + ", ".join(dependents)
                )
        _previous = current
        for name in _core.SOCKETSERVER_ALL:
            cls = getattr(_core, name)
            _original_modules.setdefault(name, cls.__module__)
            cls.__module__ = "socketserver"
        sys.modules["socketserver"] = servekit
        _installed = True


def uninstall() -> None:
    """Undo install(): later imports of socketserver get the standard library again.

    Modules imported while servekit was installed keep the reference they took.
    """
    global _previous, _installed
    import servekit

    with _lock:
        if not _installed:
            return
        if sys.modules.get("socketserver") is servekit:
            if _previous is None:
                del sys.modules["socketserver"]
            else:
                sys.modules["socketserver"] = _previous
        for name, module in _original_modules.items():
            getattr(_core, name).__module__ = module
        _original_modules.clear()
        _previous = None
        _installed = False
