# The `servekit` command: run a built-in or user handler class the way gunicorn runs a
# WSGI app. The only module that reads argv and the environment, prints for humans, and
# turns exceptions into exit codes; everything else takes keyword arguments.
#
#   servekit echo  [settings]               the built-in line echo server
#   servekit serve [MODULE:CLASS] [settings] a request handler class
#   servekit wsgi  [MODULE:APP] [settings]   a WSGI application (default: a hello app)
#   servekit config --print [settings]      the effective settings and their origins
#
# Settings come from, in increasing precedence: defaults, a TOML config file (--config,
# one table per section), SERVEKIT_<FLAG NAME> environment variables, flags. Flags,
# keys, variables and their checks are generated from the knob declarations
# (servekit.config.schema), so a new knob needs no change here. Bad input of any kind
# is one line on stderr and exit status 2, before anything binds.
#
# The server class is composed from what the settings ask for (servekit.config.compose):
# pre-fork when --workers > 1, TLS when a certificate is given, the PROXY protocol when
# asked, always a bounded thread pool, the listeners layer, and the limits layer for
# stream sockets. systemd readiness, stopping and watchdog pings are sent when systemd
# set NOTIFY_SOCKET / WATCHDOG_USEC. Order of start-up: check everything, bind, switch
# user (--user/--group), write the pid file, serve.
from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import servekit
from servekit.apps.echo import DatagramEchoHandler, EchoHandler
from servekit.cli.logsetup import LogConfigError, configure_logging, load_log_config
from servekit.cli.pidfile import PidFile, PidFileError
from servekit.cli.privileges import PrivilegeError, drop_privileges, plan_credentials
from servekit.cli.targets import TargetError, load_app, load_handler
from servekit.config.compose import Features, server_class
from servekit.config.schema import Setting, command_settings
from servekit.config.sources import Origin, Resolved, render, resolve, toml_value
from servekit.features.addresses import Address, AddressError, parse_addresses
from servekit.features.metrics import AdminBindError
from servekit.knobs import SettingError, knobs_of

__all__ = ["main"]

log = logging.getLogger("servekit.cli")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """Bad command-line input: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors in the command's one-line form."""

    def error(self, message: str) -> NoReturn:
        # argparse prints the whole usage before the error; for a typo in one flag that
        # buries the one line that matters.
        self.exit(EXIT_USAGE, f"servekit: error: {message} (see: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="servekit",
        description="Run a socketserver-style handler on a production server.",
    )
    parser.add_argument("--version", action="version", version=f"servekit {servekit.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    echo = commands.add_parser("echo", help="a line echo server on the built-in handler")
    _add_settings(echo, command_settings())

    serve = commands.add_parser("serve", help="serve a handler class: servekit serve module:Class")
    serve.add_argument(
        "target",
        nargs="?",
        metavar="MODULE:CLASS",
        help="the request handler class (a BaseRequestHandler subclass of servekit or "
        "socketserver); may instead be `target` in the [server] table of --config",
    )
    _add_settings(serve, command_settings())

    wsgi = commands.add_parser("wsgi", help="serve a WSGI application: servekit wsgi module:app")
    wsgi.add_argument(
        "target",
        nargs="?",
        metavar="MODULE:APP",
        help="the WSGI application (default: a built-in hello app); may instead be "
        "`target` in the [server] table of --config",
    )
    _add_settings(wsgi, command_settings())

    config = commands.add_parser(
        "config", help="check the settings, or print them with where each came from"
    )
    config.add_argument(
        "--print",
        dest="print_settings",
        action="store_true",
        help="print the effective settings as TOML, each with its origin "
        "(default, file, environment or flag)",
    )
    _add_settings(config, command_settings())
    return parser


def _add_settings(parser: argparse.ArgumentParser, settings: dict[str, Setting]) -> None:
    parser.add_argument("--config", "-c", metavar="FILE", help="a TOML file of settings")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for setting in settings.values():
        group = groups.get(setting.section)
        if group is None:
            group = groups[setting.section] = parser.add_argument_group(
                f"{setting.section} settings"
            )
        text = setting.help
        if "(default" not in text:  # some say it in their own words
            text += f" (default: {setting.show(setting.default)})"
        text = text.replace("%", "%%")  # argparse %-formats help texts
        if setting.knob.value_type.kind == "bool":
            group.add_argument(
                setting.flag,
                dest=setting.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=text,
            )
        elif setting.name == "bind":
            group.add_argument(
                setting.flag,
                "-b",
                dest="bind",
                action="append",
                metavar=setting.metavar,
                help=text,
            )
        else:
            group.add_argument(
                setting.flag, dest=setting.name, metavar=setting.metavar, default=None, help=text
            )


def _where(resolved: Resolved, name: str) -> str:
    """Where a setting's value came from, as the start of an error line."""
    setting = resolved.settings[name]
    origin = resolved.origins[name]
    if origin.kind == "file":
        return f"{origin.where}: {setting.key}"
    if origin.kind == "environment":
        return f"environment: {origin.where}"
    return f"command line: {setting.flag}"


def _compose(resolved: Resolved, addresses: list[Address]) -> tuple[type, dict[str, Any], Features]:
    """The server class and its keyword arguments; UsageError for settings that conflict."""
    from servekit.features.limits import LimitsMixIn
    from servekit.features.proxy import ProxyProtocolMixIn
    from servekit.features.tls import TLSMixIn
    from servekit.process.prefork import PreforkMixIn

    values, explicit = resolved.values, resolved.explicit()
    tls = values.get("certfile") is not None
    proxy = values.get("proxy_protocol", "off") != "off"
    workers = int(values.get("workers", 1))
    stream = all(a.stream for a in addresses if a.kind != "fd")
    needs = [
        (set(knobs_of(TLSMixIn)), tls, "needs --certfile (TLS is off without it)"),
        (set(knobs_of(ProxyProtocolMixIn)) - {"proxy_protocol"}, proxy, "needs --proxy-protocol"),
        (set(knobs_of(PreforkMixIn)) - {"workers"}, workers > 1, "needs --workers 2 or more"),
        (set(knobs_of(LimitsMixIn)), stream, "applies to stream servers only"),
    ]
    for names, enabled, problem in needs:
        for name in sorted(names & explicit):
            if not enabled:
                raise UsageError(f"{_where(resolved, name)}: {problem}")
    kinds = {a.kind for a in addresses}
    features = Features(
        kind=addresses[0].kind if len(kinds) == 1 else "tcp",
        workers=workers,
        tls=tls,
        proxy=proxy,
        limits=stream,
        # Always: one address or several, it owns the listening-socket settings
        # (backlog, TCP options) and safe Unix socket files.
        listeners=True,
        # Always: the access log and the shutdown's summary line. It counts requests
        # only with --metrics-bind, since counting costs CPU per request.
        metrics=True,
    )
    cls = server_class(features, name="ServekitServer")
    accepted = knobs_of(cls)
    kwargs = {}
    for name, value in values.items():
        declared = accepted.get(name)
        if declared is None or (name == "proxy_protocol" and not proxy):
            continue
        # Explicit values, and the command's defaults where they differ from the class's.
        if name in explicit or value != declared.default:
            kwargs[name] = value
    return cls, kwargs, features


def _resolve(args: argparse.Namespace, environ: dict[str, str]) -> Resolved:
    settings = command_settings()
    flags = {name: getattr(args, name, None) for name in settings}
    resolved = resolve(settings, config_path=args.config, environ=environ, flags=flags)
    positional = getattr(args, "target", None)
    if positional:
        resolved.target, resolved.target_origin = positional, Origin("argument")
    if args.command == "echo" and resolved.target is not None:
        origin = resolved.target_origin
        where = origin.where if origin is not None else "config file"
        raise UsageError(
            f"{where}: server.target = {toml_value(resolved.target)}: servekit echo runs "
            "its built-in handler; run the target with servekit serve (or servekit wsgi)"
        )
    if args.command == "serve" and resolved.target is None:
        raise UsageError(
            "servekit serve needs a handler class: servekit serve MODULE:CLASS, or "
            'target = "module:Class" in the [server] table of --config'
        )
    return resolved


def _loader(command: str, target: str | None) -> tuple[Callable[[bool], type], str]:
    """A function that (re)loads the handler class, and the server's label."""
    if command == "serve":
        assert target is not None
        return lambda reload: load_handler(target, reload=reload), target
    if command == "wsgi":
        # By name, and only for this command: the WSGI module is not needed by the
        # others, and loading it lazily keeps their start-up lean.
        def load_wsgi(reload: bool) -> type:
            try:
                wsgi = importlib.import_module("servekit.apps.wsgi")
            except ImportError as exc:
                raise TargetError(f"the WSGI support cannot be loaded: {exc}") from None
            app = wsgi.hello_app if target is None else load_app(target, reload=reload)
            handler: type = wsgi.handler_for(app)
            return handler

        return load_wsgi, f"wsgi {target or 'hello app'}"
    raise AssertionError(command)


class _Hooks:
    """What the command line adds to the composed server: announcing readiness (a line
    on stdout and systemd's READY=1), STOPPING=1, watchdog pings from the serving loop
    (or the supervisor's), and SIGHUP handling in a single process."""

    cli_label = "echo"
    cli_loader: Callable[[bool], type] | None = None
    cli_notifier: Any = None
    cli_watchdog: Any = None

    @property
    def supervisor_label(self: Any) -> str:
        # The supervisor's log lines name what runs ("echo", "myapp:Handler"), not the
        # class composed for it here.
        return str(self.cli_label)

    def cli_announce(self: Any) -> None:
        describe = ", ".join(str(a) for a in self.cli_bound_addresses())
        workers = getattr(self, "workers", 1) if hasattr(self, "supervisor") else 1
        threads = getattr(self, "max_threads", 0)
        mode = f"{workers} workers x {threads} threads" if workers > 1 else f"{threads} threads"
        print(
            f"servekit: ready: {self.cli_label} on {describe} ({mode}, pid {os.getpid()})",
            flush=True,
        )
        # The same as a log line, for logs that are collected apart from stdout.
        log.info(
            "listening: %s on %s, %d worker process(es) of %d thread(s) each (pid %d)",
            self.cli_label,
            describe,
            workers,
            threads,
            os.getpid(),
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
        if self.cli_loader is not None:
            self.RequestHandlerClass = self.cli_loader(True)
        if hasattr(self, "reload_tls"):
            self.reload_tls()
        if self.cli_notifier is not None:
            self.cli_notifier.ready()

    # single process: the serving loop pings, and does the SIGHUP reload
    def service_actions(self: Any) -> None:
        if self.cli_watchdog is not None and getattr(self, "worker_context", None) is None:
            self.cli_watchdog.maybe_ping(time.monotonic())
        super().service_actions()  # type: ignore[misc]

    def cli_reload(self: Any) -> None:
        """SIGHUP in a single process, run on the loop's thread (queued by the handler)."""
        try:
            self.on_reload()
            log.info("reloaded")
        except TargetError as exc:  # a syntax error in the edited module: one line
            log.error("reload failed; still serving with the previous setup: %s", exc)
        except Exception:
            log.exception("reload failed; still serving with the previous setup")


def run(args: argparse.Namespace, environ: dict[str, str]) -> int:
    resolved = _resolve(args, environ)
    values = resolved.values
    addresses = parse_addresses(list(values["bind"]))
    cls_base, kwargs, features = _compose(resolved, addresses)
    try:
        credentials = plan_credentials(values.get("user"), values.get("group"))
    except PrivilegeError as exc:
        name = "user" if values.get("user") is not None else "group"
        raise UsageError(f"{_where(resolved, name)} {values[name]!r}: {exc}") from None
    pidfile = PidFile(values["pid"]) if values.get("pid") else None
    if pidfile is not None:
        try:
            if credentials is not None:
                pidfile.check(credentials.uid, credentials.groups())
            else:
                pidfile.check()
        except PidFileError as exc:
            raise UsageError(f"{_where(resolved, 'pid')} {values['pid']!r}: {exc}") from None
    if values.get("log_config") is not None:
        for name in ("log_level", "log_format"):
            if name in resolved.explicit():
                raise UsageError(
                    f"{_where(resolved, name)}: not used with --log-config (the file "
                    "configures levels and formatters)"
                )
        try:
            load_log_config(values["log_config"])  # read now: `servekit config` checks it
        except LogConfigError as exc:
            raise UsageError(f"{_where(resolved, 'log_config')} {exc}") from None
    if args.command == "config":
        if args.print_settings:
            sys.stdout.write(render(resolved))
        else:
            print("servekit: settings are valid (servekit config --print shows them)")
        return EXIT_OK

    try:
        configure_logging(
            str(values["log_level"]), str(values["log_format"]), values.get("log_config")
        )
    except LogConfigError as exc:
        raise UsageError(f"{_where(resolved, 'log_config')} {exc}") from None
    for warning in resolved.warnings:
        log.warning("%s", warning)
    if args.command == "echo":
        handler: type = EchoHandler if features.limits else DatagramEchoHandler
        loader, label = None, "echo"
    else:
        loader, label = _loader(args.command, resolved.target)
        handler = loader(False)  # before binding: a bad target is exit 2, not a dead server
    cls: Any = type("ServekitServer", (_Hooks, cls_base), {"__module__": __name__})
    cls.cli_label = label
    cls.cli_loader = staticmethod(loader) if loader is not None else None

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
        server = cls(server_address, handler, **kwargs)
    except OSError as exc:
        where = ", ".join(str(a) for a in addresses)
        if isinstance(exc, AdminBindError):
            where = f"--metrics-bind {exc.address}"
        print(f"servekit: cannot listen on {where}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILURE
    poll_interval = 0.5
    if cls.cli_watchdog is not None:
        poll_interval = min(poll_interval, cls.cli_watchdog.period)
    with server:
        try:
            if credentials is not None:
                drop_privileges(credentials)
                log.info("running as %s", credentials.describe())
            if pidfile is not None:
                pidfile.write()
        except (PrivilegeError, PidFileError) as exc:
            print(f"servekit: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        try:
            if features.workers <= 1:
                _single_process_signals(server)
                server.cli_announce()
            server.serve_forever(poll_interval)
            if features.workers <= 1 and cls.cli_notifier is not None:
                cls.cli_notifier.stopping()
        finally:
            if pidfile is not None:
                pidfile.remove()
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
        server.call_soon_threadsafe(server.cli_reload)  # takes no lock: signal-safe

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, hup)


def main(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args, dict(os.environ) if environ is None else environ)
    except (UsageError, SettingError, AddressError, TargetError) as exc:
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
