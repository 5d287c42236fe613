# What the command runs, named as module:attribute: a request handler class for
# `servekit serve`, a WSGI application for `servekit wsgi`.
#
# Strategy. Everything that can go wrong with a target is found before anything binds and
# reported in one line (exit status 2): a module that is missing, has a syntax error or
# raises while it is imported (any exception, SystemExit included: a module that runs
# argparse at import exits), an attribute that is not there, an object of the wrong kind.
# A class that is not a handler used to start and then fail on every connection.
#
# What counts as a request handler class. socketserver only ever calls
# RequestHandlerClass(request, client_address, server) and lets the constructor do the
# work, so we accept:
#   * a subclass of servekit.BaseRequestHandler or of the standard library's
#     socketserver.BaseRequestHandler (http.server's handlers are);
#   * any other class with a handle() method whose constructor takes
#     (request, client_address, server): the duck type socketserver itself relies on.
# Server classes and factories are refused: the command composes the server from its
# settings (workers, TLS, limits, ...), which a factory would bypass; code that builds
# its own server runs it with python directly.
from __future__ import annotations

import functools
import importlib
import inspect
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

from servekit.core import BaseRequestHandler, BaseServer
from servekit.errors import ServekitError

__all__ = ["TargetError", "import_target", "load_app", "load_handler", "split_target"]


class TargetError(ServekitError):
    """The target cannot be loaded or is not what the command runs; one line, exit 2."""


def split_target(target: str) -> tuple[str, str]:
    """``module:attr`` (or ``module.attr``) as (module, attr)."""
    module_name, sep, attr = target.partition(":")
    if not sep:
        module_name, _, attr = target.rpartition(".")
    if not module_name or not attr:
        raise TargetError(f"target {target!r} must be written module:Name")
    return module_name.strip(), attr.strip()


def import_target(target: str, *, reload: bool = False) -> Any:
    """Import the module and return the attribute; TargetError says what went wrong."""
    module_name, attr = split_target(target)
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` would, so local modules import
    try:
        module = sys.modules.get(module_name) if reload else None
        if module is not None:
            module = importlib.reload(module)
        else:
            module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise TargetError(
                f"cannot import {module_name!r} for {target!r}: no such module"
            ) from None
        raise TargetError(_import_failure(module_name, target, exc)) from None
    except SyntaxError as exc:
        where = f"{exc.filename}, line {exc.lineno}" if exc.filename else "unknown place"
        raise TargetError(
            f"cannot import {module_name!r} for {target!r}: syntax error in {where}: {exc.msg}"
        ) from None
    except (Exception, SystemExit) as exc:
        raise TargetError(_import_failure(module_name, target, exc)) from None
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise TargetError(
                f"module {module_name!r} has no attribute {attr!r} (for {target!r})"
                + _candidates(module)
            ) from None
    return obj


def _import_failure(module_name: str, target: str, exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    text = str(exc).splitlines()[0] if str(exc) else ""
    what = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return f"cannot import {module_name!r} for {target!r}: {what}{where}"


def _candidates(module: Any) -> str:
    names = sorted(
        name
        for name, value in vars(module).items()
        if not name.startswith("_") and _handler_problem(value) is None
    )
    return f"; handler classes there: {', '.join(names)}" if names else ""


def _handler_bases() -> tuple[type, ...]:
    bases: list[type] = [BaseRequestHandler]
    stdlib = sys.modules.get("socketserver")
    # Only if already imported: a class derived from it has imported it.
    stdlib_base = getattr(stdlib, "BaseRequestHandler", None)
    if isinstance(stdlib_base, type) and stdlib_base is not BaseRequestHandler:
        bases.append(stdlib_base)
    return tuple(bases)


def _server_bases() -> tuple[type, ...]:
    bases: list[type] = [BaseServer]
    stdlib_base = getattr(sys.modules.get("socketserver"), "BaseServer", None)
    if isinstance(stdlib_base, type) and stdlib_base is not BaseServer:
        bases.append(stdlib_base)
    return tuple(bases)


def _handler_problem(obj: object) -> str | None:
    """Why obj is not a request handler class, or None if it is one."""
    if not isinstance(obj, type):
        name = type(obj).__name__
        article = "an" if name[:1].lower() in "aeiou" else "a"
        kind = "a function" if inspect.isroutine(obj) else f"{article} {name} object"
        return f"is {kind}, not a request handler class"
    if issubclass(obj, _handler_bases()):
        return None
    if issubclass(obj, _server_bases()):
        return (
            "is a server class; the command composes the server from its settings and "
            "takes the request handler class"
        )
    if not callable(getattr(obj, "handle", None)):
        return "is a class without a handle() method, not a request handler class"
    try:
        inspect.signature(obj).bind(None, None, None)
    except TypeError:
        return "has handle() but cannot be created as Class(request, client_address, server)"
    except ValueError:
        pass  # no signature to read (a builtin): let socketserver's call decide
    return None


def load_handler(target: str, *, reload: bool = False) -> Any:
    """The request handler class named by target (see the module comment for what counts),
    or a functools.partial of one (SimpleHTTPRequestHandler with directory=, say), as
    socketserver itself takes."""
    obj = import_target(target, reload=reload)
    if (
        isinstance(obj, functools.partial)
        and isinstance(obj.func, type)
        and _handler_problem(obj.func) is None
    ):
        return functools.partial(_with_unix_peers(obj.func), *obj.args, **obj.keywords)
    problem = _handler_problem(obj)
    if problem is not None:
        hint = ""
        if inspect.isroutine(obj) and len(_positional(obj)) == 2:
            hint = " (a WSGI application? run it with servekit wsgi)"
        raise TargetError(
            f"{target!r} {problem}: expected a subclass of servekit.BaseRequestHandler or "
            f"socketserver.BaseRequestHandler{hint}"
        )
    assert isinstance(obj, type)
    return _with_unix_peers(obj)


def _with_unix_peers(handler_class: type) -> type:
    """handler_class, or for an http.server handler a subclass that can log a Unix peer.

    BaseHTTPRequestHandler.address_string() returns client_address[0], the host of a TCP
    peer; on a Unix socket client_address is the peer's path, usually '' (an unbound
    client), so every request raised IndexError while logging itself and the client got
    no answer (the standard library's http.server fails the same way). The command
    serves Unix sockets (--bind unix:PATH), so it gives such handlers the address as
    nginx logs it, "unix:" and the peer's path, if any. A handler with its own
    address_string() is left alone; library code that builds its own server keeps the
    stdlib's behaviour.
    """
    http = sys.modules.get("http.server")  # imported by the handler's module if it is one
    base = getattr(http, "BaseHTTPRequestHandler", None)
    if (
        base is None
        or not issubclass(handler_class, base)
        or getattr(handler_class, "address_string", None) is not base.address_string
    ):
        return handler_class

    def address_string(self: Any) -> str:
        address = self.client_address
        if isinstance(address, tuple):
            return str(address[0])
        return "unix:" + (os.fsdecode(address) if address else "")

    namespace = {
        "address_string": address_string,
        "__module__": handler_class.__module__,
        "__qualname__": handler_class.__qualname__,
        "__doc__": handler_class.__doc__,
    }
    return type(handler_class.__name__, (handler_class,), namespace)


def load_app(target: str, *, reload: bool = False) -> Callable[..., Any]:
    """The WSGI application named by target: any callable but a request handler class."""
    obj = import_target(target, reload=reload)
    if isinstance(obj, type) and _handler_problem(obj) is None:
        raise TargetError(
            f"{target!r} is a request handler class, not a WSGI application: run it with "
            "servekit serve"
        )
    if not callable(obj):
        raise TargetError(
            f"{target!r} is not callable ({type(obj).__name__}), so not a WSGI application "
            "(a callable taking environ and start_response)"
        )
    return obj  # type: ignore[no-any-return]


def _positional(function: Callable[..., Any]) -> list[inspect.Parameter]:
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
