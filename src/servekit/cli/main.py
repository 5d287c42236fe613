# The `servekit` command: run a built-in or user handler class the way gunicorn runs a
# WSGI app. The only module that reads argv and the environment, prints for humans, and
# turns exceptions into exit codes; everything else takes keyword arguments.
#
# Settings come from, in increasing precedence: knob defaults, a TOML config file
# (--config, one table per section), SERVEKIT_<NAME> environment variables, flags.
# The flags, keys and variables are generated from the knob declarations
# (servekit.knobs), so a new knob needs no change here.
#
# The server class is composed from what the settings ask for (servekit.config.compose):
# pre-fork when --workers > 1, TLS when a certificate is given, the PROXY protocol when
# asked, several listeners when --bind is repeated; always a bounded thread pool and the
# limits layer. systemd readiness, stopping and watchdog pings are sent when systemd
# set NOTIFY_SOCKET / WATCHDOG_USEC.
from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import time
import tomllib
from collections.abc import Sequence
from typing import Any

import servekit
from servekit.apps.echo import DatagramEchoHandler, EchoHandler
from servekit.config.compose import Features, feature_classes, server_class
from servekit.features.addresses import Address, AddressError, parse_addresses
from servekit.knobs import Knob, SettingError, knobs_of

__all__ = ["main"]

log = logging.getLogger("servekit.cli")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

DEFAULT_BIND = "127.0.0.1:8000"


class UsageError(Exception):
    """Bad command-line input: reported in one line, exit status 2."""


def cli_knobs() -> dict[str, Knob[Any]]:
    """Every knob the command line exposes, by name, from every feature it composes."""
    knobs: dict[str, Knob[Any]] = {}
    for cls in feature_classes():
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
        action="append",
        help=f"address to listen on, repeatable (default {DEFAULT_BIND}): HOST:PORT, "
        "[::]:PORT, tcp://..., udp://HOST:PORT, unix:/path, unix:@name, fd://3, fd://NAME",
    )
    parser.add_argument("--config", "-c", metavar="FILE", help="a TOML file of settings")
    parser.add_argument(
        "--log-level",
        default=None,
        choices=["debug", "info", "warning", "error"],
        help="log verbosity on stderr (default info)",
    )
    sections: dict[str, argparse._ArgumentGroup] = {}
    for knob in cli_knobs().values():
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


def resolve_settings(args: argparse.Namespace, environ: dict[str, str]) -> dict[str, Any]:
    """Merge config file, environment and flags into keyword arguments for the server."""
    knobs = cli_knobs()
    values: dict[str, Any] = {}
    if args.config:
        try:
            with open(args.config, "rb") as fh:
                document = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise UsageError(f"cannot read config file {args.config}: {exc}") from None
        for section, table in document.items():
            if not isinstance(table, dict):
                raise UsageError(f"{args.config}: [{section}] must be a table")
            if section == "server":
                for key, value in table.items():
                    if key not in ("bind", "target", "log_level"):
                        raise UsageError(f"{args.config}: unknown setting server.{key}")
                    if key == "bind" and args.bind is None:
                        args.bind = [value] if isinstance(value, str) else list(value)
                    elif key != "bind" and getattr(args, key, None) is None:
                        setattr(args, key, value)
                continue
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


def reload_handler(target: str) -> type:
    """Re-import the handler's module (for SIGHUP) and return the class again."""
    module_name = target.partition(":")[0] if ":" in target else target.rpartition(".")[0]
    module = sys.modules.get(module_name)
    if module is not None:
        importlib.reload(module)
    return load_handler(target)


def _features(values: dict[str, Any], addresses: list[Address]) -> Features:
    from servekit.features.limits import LimitsMixIn
    from servekit.features.proxy import ProxyProtocolMixIn
    from servekit.features.tls import TLSMixIn
    from servekit.process.prefork import PreforkMixIn

    tls_names = set(knobs_of(TLSMixIn))
    tls = values.get("certfile") is not None
    if not tls and tls_names & set(values):
        raise UsageError("TLS settings were given without --certfile")
    proxy_names = set(knobs_of(ProxyProtocolMixIn))
    proxy = "proxy_protocol" in values  # giving a version is what turns it on
    if not proxy and (proxy_names - {"proxy_protocol"}) & set(values):
        raise UsageError("PROXY protocol settings were given without --proxy-protocol")
    workers = int(values.get("workers", 1))
    if workers <= 1:
        for name in set(knobs_of(PreforkMixIn)) & set(values):
            if name != "workers":
                raise UsageError(f"--{name.replace('_', '-')} needs --workers 2 or more")
        values.pop("workers", None)
    kinds = {a.kind for a in addresses}
    stream = all(a.stream for a in addresses if a.kind != "fd")
    if not stream:
        for name in set(knobs_of(LimitsMixIn)) & set(values):
            raise UsageError(f"--{name.replace('_', '-')} applies to stream servers only")
    for name, enabled in (("tls", tls), ("proxy", proxy)):
        if not enabled:
            for key in [k for k in values if k in (tls_names if name == "tls" else proxy_names)]:
                values.pop(key)
    return Features(
        kind=addresses[0].kind if len(kinds) == 1 else "tcp",
        workers=workers,
        tls=tls,
        proxy=proxy,
        limits=stream,
        # Always: one address or several, it owns the listening-socket settings
        # (backlog, TCP options) and safe Unix socket files.
        listeners=True,
    )


class _Hooks:
    """What the command line adds to the composed server: announcing readiness (a line
    on stdout and systemd's READY=1), STOPPING=1, watchdog pings from the serving loop
    (or the supervisor's), and SIGHUP handling in a single process."""

    cli_label = "echo"
    cli_target: str | None = None
    cli_notifier: Any = None
    cli_watchdog: Any = None
    _cli_reload_requested = False

    def cli_announce(self: Any) -> None:
        describe = ", ".join(str(a) for a in self.cli_bound_addresses())
        workers = getattr(self, "workers", 1) if hasattr(self, "supervisor") else 1
        threads = getattr(self, "max_threads", 0)
        mode = f"{workers} workers x {threads} threads" if workers > 1 else f"{threads} threads"
        print(
            f"servekit: ready: {self.cli_label} on {describe} ({mode}, pid {os.getpid()})",
            flush=True,
        )
        if self.cli_notifier is not None:
            self.cli_notifier.ready(f"serving {self.cli_label} on {describe}")

    def cli_bound_addresses(self: Any) -> list[str]:
        bound = getattr(self, "server_addresses", None) or [self.server_address]
        out = []
        for address in bound:
            if isinstance(address, tuple):
                host, port = address[0], address[1]
                host = f"[{host}]" if ":" in str(host) else host
                scheme = "udp" if self.socket_type == 2 else "tcp"
                out.append(f"{scheme}://{host}:{port}")
            else:
                text = address.decode() if isinstance(address, bytes) else str(address)
                out.append("unix:" + ("@" + text[1:] if text.startswith("\0") else text))
        return out

    # pre-fork parent
    def on_workers_ready(self: Any) -> None:
        self.cli_announce()

    def supervisor_tick(self: Any) -> None:
        if self.cli_watchdog is not None:
            self.cli_watchdog.maybe_ping(time.monotonic())

    def on_stopping(self: Any) -> None:
        if self.cli_notifier is not None:
            self.cli_notifier.stopping()

    def on_reload(self: Any) -> None:
        if self.cli_notifier is not None:
            self.cli_notifier.reloading()
        if self.cli_target is not None:
            self.RequestHandlerClass = reload_handler(self.cli_target)
        if hasattr(self, "reload_tls"):
            self.reload_tls()
        if self.cli_notifier is not None:
            self.cli_notifier.ready()

    # single process: the serving loop pings, and does the SIGHUP reload
    def service_actions(self: Any) -> None:
        if self.cli_watchdog is not None and getattr(self, "worker_context", None) is None:
            self.cli_watchdog.maybe_ping(time.monotonic())
        if self._cli_reload_requested:
            self._cli_reload_requested = False
            try:
                self.on_reload()
                log.info("reloaded")
            except Exception:
                log.exception("reload failed; still serving with the previous setup")
        super().service_actions()  # type: ignore[misc]


def run(args: argparse.Namespace, environ: dict[str, str]) -> int:
    values = resolve_settings(args, environ)
    level = (args.log_level or "info").upper()
    logging.basicConfig(
        level=getattr(logging, level),
        stream=sys.stderr,
        format="%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    try:
        addresses = parse_addresses(args.bind or [DEFAULT_BIND])
    except AddressError as exc:
        raise UsageError(str(exc)) from None
    features = _features(values, addresses)
    if args.target is None:
        stream = features.kind in ("tcp", "unix", "fd") and all(
            a.stream for a in addresses if a.kind != "fd"
        )
        handler: type = EchoHandler if stream else DatagramEchoHandler
        label = "echo"
        if features.limits:
            # Echo is line-based: let a connection wait in the loop for its first line.
            values.setdefault("wait_for_request", "line")
    else:
        handler = load_handler(args.target)
        label = args.target
    base = server_class(features, name="ServekitServer")
    cls: Any = type("ServekitServer", (_Hooks, base), {"__module__": __name__})
    cls.cli_label = label
    cls.cli_target = args.target

    from servekit.process.systemd import Notifier, Watchdog

    notifier = Notifier(environ)
    cls.cli_notifier = notifier if notifier.enabled else None
    cls.cli_watchdog = Watchdog.from_environment(
        environ, notifier=notifier if notifier.enabled else None
    )
    server_address: Any = (
        [str(a) for a in addresses] if features.listeners else addresses[0].sockaddr()
    )
    try:
        server = cls(server_address, handler, **values)
    except OSError as exc:
        where = ", ".join(str(a) for a in addresses)
        print(f"servekit: cannot listen on {where}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILURE
    poll_interval = 0.5
    if cls.cli_watchdog is not None:
        poll_interval = min(poll_interval, cls.cli_watchdog.period)
    with server:
        if features.workers <= 1:
            _single_process_signals(server)
            server.cli_announce()
        server.serve_forever(poll_interval)
        if features.workers <= 1 and cls.cli_notifier is not None:
            cls.cli_notifier.stopping()
    print("servekit: stopped", file=sys.stderr, flush=True)
    return EXIT_OK


def _single_process_signals(server: Any) -> None:
    """SIGTERM/SIGINT stop the loop (server_close() then drains); SIGHUP reloads.

    The handlers only record and wake: the loop does the work (a handler that took
    locks or did I/O could deadlock with the frame it interrupted).
    """

    def stop(signum: int, frame: object) -> None:
        server.request_shutdown()

    def hup(signum: int, frame: object) -> None:
        server._cli_reload_requested = True
        wakeup = server._loop_wakeup()
        if wakeup is not None:
            wakeup.notify()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, hup)


def main(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args, dict(os.environ) if environ is None else environ)
    except (UsageError, SettingError, AddressError) as exc:
        print(f"servekit: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from servekit.process.supervisor import SupervisorError

        if isinstance(exc, SupervisorError):
            print(f"servekit: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
