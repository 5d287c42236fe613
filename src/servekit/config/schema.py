# The settings of the `servekit` command as one typed list: every knob of the features the
# command composes, and the command's own settings (the [server] table: bind, log level,
# pid file, user, group). Flags, environment variables, config-file keys, --help,
# `servekit config --print` and docs/settings.md are all generated from this list, so
# the names cannot drift apart: the key is the knob's name in its section's table, the
# flag is the knob's flag, the environment variable is SERVEKIT_ + the flag's name.
#
# A Setting adds to its knob what the command does differently from the classes: the
# default that applies on the command line (the command runs one process unless told,
# where PreforkMixIn's own default is 2), and the presentation that a declaration in a
# feature module does not carry yet (see _COMMAND).
from __future__ import annotations

import dataclasses
import grp
import pwd
from typing import Any

from servekit.features.addresses import AddressError, parse_addresses
from servekit.features.listeners import group, user
from servekit.features.tls import path
from servekit.knobs import Knob, SettingError, ValueType, kind_of_value, knob, knobs_of

__all__ = [
    "COMMANDS",
    "DEFAULT_BIND",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "ServerSettings",
    "Setting",
    "all_knobs",
    "command_settings",
    "settings_by_env_var",
]

DEFAULT_BIND = "127.0.0.1:8000"
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
#: The commands that run a server; `config` reads the same settings.
COMMANDS = ("echo", "serve", "wsgi")


def addresses(text: str) -> tuple[str, ...]:
    """One address or several, comma-separated (SERVEKIT_BIND="[::]:80,unix:/run/a.sock")."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _check_addresses(value: Any) -> str | None:
    if not value:
        return "must name at least one address"
    try:
        parse_addresses(list(value))
    except AddressError as exc:
        return str(exc)
    return None


def _check_user(value: Any) -> str | None:
    # Looked up now, before anything binds: a typo must not surface after the server
    # has bound privileged ports as root.
    if value is None:
        return None
    try:
        if isinstance(value, int):
            pwd.getpwuid(value)
        else:
            pwd.getpwnam(value)
    except KeyError:
        return f"no such user {value!r}"
    return None


def _check_group(value: Any) -> str | None:
    if value is None:
        return None
    try:
        if isinstance(value, int):
            grp.getgrgid(value)
        else:
            grp.getgrnam(value)
    except KeyError:
        return f"no such group {value!r}"
    return None


class ServerSettings:
    """The command's own settings, the [server] table of a config file.

    Not a server mix-in: these say what to run and as whom, and the command acts on them
    (binds the addresses, writes the pid file, switches user). The handler's target is
    the positional argument of `serve` and `wsgi`, or ``target`` in the same table.
    """

    bind: tuple[str, ...] = knob(
        (DEFAULT_BIND,),
        "address to listen on, repeatable: HOST:PORT, [::]:PORT, tcp://..., "
        "udp://HOST:PORT, unix:/path, unix:@name, fd://3, fd://NAME "
        "(the environment variable takes several, comma-separated)",
        parse=addresses,
        check=_check_addresses,
        type=ValueType("list", textual=True, description="an address or a list of addresses"),
        metavar="ADDRESS",
        section="server",
    )
    log_level: str = knob("info", "log verbosity on stderr", choices=LOG_LEVELS, section="server")
    log_format: str = knob(
        "text",
        "how log lines on stderr look: text, or json (one object per line: time, level, "
        "logger, message, pid, and the record's extra fields)",
        choices=LOG_FORMATS,
        section="server",
    )
    log_config: str | None = knob(
        None,
        "configure logging from this file instead (logging.config.dictConfig, as .json "
        "or .toml); --log-level and --log-format are then refused",
        parse=path,
        metavar="FILE",
        section="server",
    )
    pid: str | None = knob(
        None,
        "write the server's process id to this file once it listens (after switching "
        "--user); removed on exit",
        parse=path,
        metavar="FILE",
        section="server",
    )
    user: str | int | None = knob(
        None,
        "run as this user once the sockets are bound (needs root); its primary group "
        "too unless --group is given",
        parse=user,
        check=_check_user,
        section="server",
    )
    group: str | int | None = knob(
        None,
        "run as this group once the sockets are bound (needs root)",
        parse=group,
        check=_check_group,
        section="server",
    )


@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting of the command: its knob, and what applies on the command line."""

    knob: Knob[Any]
    #: The value when no source gives one, on this command.
    default: Any
    #: The values a string setting takes (the knob's, or the command's for it).
    choices: tuple[str, ...] = ()
    #: An extra choice that means "leave the feature out" (--proxy-protocol off).
    off: str | None = None
    help: str = ""
    metavar: str = ""

    @property
    def name(self) -> str:
        return self.knob.name

    @property
    def section(self) -> str:
        return self.knob.section

    @property
    def key(self) -> str:
        """The key in a config file, as a dotted TOML key: ``pool.max_threads``."""
        return f"{self.section}.{self.name}"

    @property
    def flag(self) -> str:
        flag = self.knob.cli_flag
        assert flag is not None, self.name  # settings are knobs with a flag
        return flag

    @property
    def env_var(self) -> str:
        var = self.knob.env_var
        assert var is not None, self.name
        return var

    @property
    def all_choices(self) -> tuple[str, ...]:
        return ((self.off,) if self.off else ()) + self.choices

    @property
    def expected(self) -> str:
        """What the setting takes, in words: "an integer", "one of off, v1, v2, any"."""
        if self.all_choices:
            return "one of " + ", ".join(self.all_choices)
        return self.knob.expected

    def from_text(self, text: str) -> Any:
        """Text from the environment or a flag as the value; SettingError(problem)."""
        return self._checked(text) if self.all_choices else self.knob.from_text(text)

    def from_config(self, value: Any) -> Any:
        """A config file's value as the value; SettingError(problem)."""
        if self.all_choices:
            if not isinstance(value, str):
                raise SettingError(f"expected {self.expected}, not {kind_of_value(value)}")
            return self._checked(value)
        return self.knob.from_config(value)

    def _checked(self, text: str) -> Any:
        if text not in self.all_choices:
            raise SettingError(f"expected {self.expected}")
        return text if text == self.off else self.knob.from_text(text)

    def show(self, value: Any) -> str:
        """A value as an operator writes it: 0o660 for modes, on/off, 30 for 30.0."""
        if value is None:
            return "none"
        if isinstance(value, bool):
            return "on" if value else "off"
        if isinstance(value, int) and self.name.endswith("_mode"):
            return oct(value)
        if isinstance(value, float):
            return f"{value:g}"
        if isinstance(value, (tuple, list)):
            return ",".join(str(v) for v in value) or "none"
        return str(value)


# What the command line does differently from the classes, by knob name, and what the
# declarations in the feature modules do not say yet (choices of wait_for_request and
# proxy_protocol, a metavar for proxy_trusted). Once a declaration carries choices= or
# metavar=, the declaration wins; test_config_schema checks that these choices agree
# with each knob's own check.
_COMMAND: dict[str, dict[str, Any]] = {
    # The command runs one process unless told; PreforkMixIn composed in Python defaults
    # to 2, but the command only composes it for --workers 2 or more.
    "workers": {"default": 1},
    # The PROXY layer is composed only when asked: "off" is the command's default and a
    # choice of its own, so that --help never reads as if PROXY were on.
    "proxy_protocol": {
        "default": "off",
        "off": "off",
        "choices": ("v1", "v2", "any"),
        "help": "expect a PROXY protocol header on every connection: v1, v2 or any "
        "(datagrams: v2 only); off serves clients directly",
    },
    "wait_for_request": {"choices": ("none", "data", "line", "head", "auto")},
    "proxy_trusted": {"metavar": "NETWORKS"},
}


def all_knobs() -> list[Knob[Any]]:
    """Every knob of the command and of the features it composes, flagged or not, in order."""
    from servekit.config.compose import feature_classes

    seen: list[Knob[Any]] = list(knobs_of(ServerSettings).values())
    for feature in feature_classes():
        for declared in knobs_of(feature).values():
            if declared not in seen:
                seen.append(declared)
    return seen


def command_settings() -> dict[str, Setting]:
    """The settings the command takes, by knob name, [server] first; knobs without a flag
    (Python only) are not among them."""
    settings: dict[str, Setting] = {}
    for declared in all_knobs():
        if declared.cli_flag is None:
            continue
        extra = dict(_COMMAND.get(declared.name, {}))
        choices = tuple(declared.choices) or tuple(extra.get("choices", ()))
        off = extra.get("off")
        if choices:
            metavar = "{" + ",".join(((off,) if off else ()) + choices) + "}"
        else:
            metavar = declared.metavar or extra.get("metavar") or declared.cli_metavar
        settings[declared.name] = Setting(
            knob=declared,
            default=extra.get("default", declared.default),
            choices=choices,
            off=off,
            help=extra.get("help", declared.help),
            metavar=metavar,
        )
    return settings


def settings_by_env_var(settings: dict[str, Setting]) -> dict[str, Setting]:
    return {s.env_var: s for s in settings.values()}
