# The `servekit` command: run a built-in or user handler class the way gunicorn runs a
# WSGI app. The only module that reads argv and the environment, prints for humans, and
# turns exceptions into exit codes; everything else takes keyword arguments.
#
# Settings come from, in increasing precedence: knob defaults, a TOML config file
# (--config, one table per section), SERVEKIT_<NAME> environment variables, flags.
# The flags, keys and variables are generated from the knob declarations
# (servekit.settings), so a new knob needs no change here.
from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import tomllib
from collections.abc import Callable, Sequence
from typing import Any

import servekit
from servekit.addresses import Address, AddressError, parse_address
from servekit.builtin import DatagramEchoHandler, EchoHandler
from servekit.compose import server_class
from servekit.settings import Knob, SettingError, knobs_of

__all__ = ["main"]

log = logging.getLogger("servekit.cli")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

DEFAULT_BIND = "127.0.0.1:8000"


class UsageError(Exception):
    """Bad command-line input: reported in one line, exit status 2."""


def _cli_knobs() -> dict[str, Knob[Any]]:
    """Every knob the command line exposes, by name, from the classes it composes."""
    from servekit.pool import ThreadPoolMixIn
    from servekit.prefork import PreforkMixIn

    knobs: dict[str, Knob[Any]] = {}
    for cls in (PreforkMixIn, ThreadPoolMixIn):
        for name, knob in knobs_of(cls).items():
            if knob.cli_flag is not None:
                knobs[name] = knob
    return knobs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="servekit",
        description="Run a socketserver-style handler on a production server.",
    )
    parser.add_argument("--version", action="version", version=f"servekit {servekit.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    echo = commands.add_parser("echo", help="a line echo server on the built-in handler")
    _add_common(echo)
    echo.set_defaults(target=None)

    serve = commands.add_parser("serve", help="serve a handler class: servekit serve module:Class")
    serve.add_argument("target", help="the handler class, as module:Class (or module.Class)")
    _add_common(serve)
    return parser


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bind",
        "-b",
        metavar="ADDRESS",
        help=f"address to listen on (default {DEFAULT_BIND}): HOST:PORT, [::]:PORT, "
        "tcp://..., udp://HOST:PORT, unix:/path, unix:@name",
    )
    parser.add_argument("--config", "-c", metavar="FILE", help="a TOML file of settings")
    parser.add_argument(
        "--log-level",
        default=None,
        choices=["debug", "info", "warning", "error"],
        help="log verbosity on stderr (default info)",
    )
    sections: dict[str, argparse._ArgumentGroup] = {}
    for knob in _cli_knobs().values():
        group = sections.get(knob.section)
        if group is None:
            group = sections[knob.section] = parser.add_argument_group(f"{knob.section} settings")
        flag = knob.cli_flag
        assert flag is not None
        if isinstance(knob.default, bool):
            group.add_argument(
                flag,
                dest=knob.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"{knob.help} (default {knob.default})",
            )
        else:
            group.add_argument(
                flag,
                dest=knob.name,
                metavar=knob.type_name.upper(),
                default=None,
                help=f"{knob.help} (default {knob.default})",
            )


def _settings(args: argparse.Namespace, environ: dict[str, str]) -> dict[str, Any]:
    """Merge config file, environment and flags into keyword arguments."""
    knobs = _cli_knobs()
    values: dict[str, Any] = {}
    if args.config:
        try:
            with open(args.config, "rb") as fh:
                document = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise UsageError(f"cannot read config file {args.config}: {exc}") from None
        for section, table in document.items():
            if section == "server":
                for key in ("bind", "target", "log_level"):
                    if key in table and getattr(args, key, None) is None:
                        setattr(args, key, table[key])
                continue
            if not isinstance(table, dict):
                raise UsageError(f"{args.config}: [{section}] must be a table")
            for key, value in table.items():
                knob = knobs.get(key)
                if knob is None or knob.section != section:
                    raise UsageError(f"{args.config}: unknown setting {section}.{key}")
                values[key] = knob.validate(value)
    for name, knob in knobs.items():
        if knob.env_var in environ:
            values[name] = knob.from_string(environ[knob.env_var])
    for name, knob in knobs.items():
        given = getattr(args, name, None)
        if given is not None:
            values[name] = (
                knob.validate(given) if isinstance(given, bool) else knob.from_string(given)
            )
    return values


def load_handler(target: str) -> type:
    """Import module:Class (or module.Class) and return the class."""
    module_name, sep, attr = target.partition(":")
    if not sep:
        module_name, _, attr = target.rpartition(".")
    if not module_name or not attr:
        raise UsageError(f"handler {target!r} must be written module:Class")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` would, so local modules import
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"cannot import {module_name!r}: {exc}") from None
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UsageError(f"{module_name!r} has no attribute {attr!r}") from None
    if not isinstance(obj, type):
        raise UsageError(f"{target!r} is not a class")
    return obj


def _describe(address: Address, server: Any, values: dict[str, Any]) -> str:
    actual = server.server_address
    if address.kind in ("tcp", "udp") and isinstance(actual, tuple):
        shown = Address(address.kind, host=actual[0], port=actual[1])
    else:
        shown = address
    workers = values.get("workers", 1)
    threads = server.max_threads
    mode = f"{workers} workers x {threads} threads" if workers > 1 else f"{threads} threads"
    return f"{shown} ({mode}, pid {os.getpid()})"


def run(args: argparse.Namespace, environ: dict[str, str]) -> int:
    values = _settings(args, environ)
    level = (args.log_level or "info").upper()
    logging.basicConfig(
        level=getattr(logging, level),
        stream=sys.stderr,
        format="%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    try:
        address = parse_address(args.bind or DEFAULT_BIND)
    except AddressError as exc:
        raise UsageError(str(exc)) from None
    if address.kind == "fd":
        raise UsageError("fd:// addresses need socket activation support (not available yet)")
    if args.target is None:
        handler: type = EchoHandler if address.stream else DatagramEchoHandler
        label = "echo"
    else:
        handler = load_handler(args.target)
        label = args.target
    workers = int(values.get("workers", 1))
    cls = server_class(address.kind, workers=workers, name="ServekitServer")
    if workers <= 1:
        values.pop("workers", None)
        for name in list(values):
            if name in _prefork_only():
                values.pop(name)
    ready_line: list[str] = []

    def announce() -> None:
        print(f"servekit: ready: {label} on {ready_line[0]}", flush=True)

    attrs: dict[str, Callable[..., None]] = {}
    if workers > 1:
        attrs["on_workers_ready"] = lambda self: announce()
    cls = type(cls.__name__, (cls,), attrs)
    try:
        server = cls(address.sockaddr(), handler, **values)
    except OSError as exc:
        print(f"servekit: cannot listen on {address}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILURE
    ready_line.append(_describe(address, server, {"workers": workers}))
    with server:
        if workers <= 1:
            _stop_on_signals(server)
            announce()
        server.serve_forever()
    print("servekit: stopped", file=sys.stderr, flush=True)
    return EXIT_OK


def _prefork_only() -> set[str]:
    from servekit.prefork import PreforkMixIn

    return set(knobs_of(PreforkMixIn))


def _stop_on_signals(server: Any) -> None:
    """Single process: SIGTERM and SIGINT stop the loop; server_close() then drains."""

    def stop(signum: int, frame: object) -> None:
        server.request_shutdown()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def main(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args, dict(os.environ) if environ is None else environ)
    except (UsageError, SettingError) as exc:
        print(f"servekit: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
