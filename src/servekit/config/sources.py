# Where each setting's value comes from: the command's default, a TOML config file
# (--config), SERVEKIT_* environment variables, flags; each overrides the one before.
#
# Strategy. Every value is checked against its setting's type as it is read, so an error
# can say where the value came from: the message is one line naming the source (the
# file's path, the variable, the flag), the key and what was expected, e.g.
#
#     servekit.toml: pool.max_threads = 4.5: expected an integer
#
# and it is raised before anything binds. The result keeps each value's origin, which
# `servekit config --print` shows beside it. Nothing here touches sockets or argv: the
# command line passes in the flags argparse collected and the environment.
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import tomllib
from collections.abc import Mapping
from typing import Any

from servekit.config.schema import Setting, all_knobs, settings_by_env_var
from servekit.knobs import SettingError

__all__ = ["ConfigError", "Origin", "Resolved", "render", "resolve", "toml_value"]

TARGET_KEY = "target"  # [server] target = "module:Name", for serve and wsgi


class ConfigError(SettingError):
    """Configuration input that cannot be used; the message is the whole one-line report."""


@dataclasses.dataclass(frozen=True)
class Origin:
    """Where a value came from: ("default", ""), ("file", path), ("environment", VAR),
    ("flag", --name) or ("argument", "")."""

    kind: str
    where: str = ""

    def __str__(self) -> str:
        return f"{self.kind} {self.where}" if self.where else self.kind


DEFAULT = Origin("default")


@dataclasses.dataclass
class Resolved:
    """The effective settings: a value and its origin for every setting of the command."""

    settings: dict[str, Setting]
    values: dict[str, Any]
    origins: dict[str, Origin]
    target: str | None = None
    target_origin: Origin | None = None
    #: Things worth telling the operator that do not stop the command.
    warnings: list[str] = dataclasses.field(default_factory=list)

    def explicit(self) -> set[str]:
        """Names of the settings that some source gave (not left at their default)."""
        return {name for name, origin in self.origins.items() if origin != DEFAULT}


def resolve(
    settings: dict[str, Setting],
    *,
    config_path: str | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Resolved:
    """Read the file, then the environment, then the flags; raise ConfigError on bad input.

    flags holds what argparse collected, by setting name (None: not given): text, a
    bool for --x/--no-x, a list for repeatable --bind.
    """
    resolved = Resolved(
        settings,
        {name: s.default for name, s in settings.items()},
        dict.fromkeys(settings, DEFAULT),
    )
    if config_path is not None:
        _read_file(resolved, config_path)
    _read_environment(resolved, environ or {})
    _read_flags(resolved, flags or {})
    return resolved


def _read_file(resolved: Resolved, path: str) -> None:
    try:
        with open(path, "rb") as fh:
            document = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    settings = resolved.settings
    sections = list(dict.fromkeys(s.section for s in settings.values()))
    origin = Origin("file", path)
    for section, table in document.items():
        if not isinstance(table, dict):
            home = settings.get(section)
            hint = f"; write it under [{home.section}]" if home else ""
            raise ConfigError(
                f"{path}: {section} = {toml_value(table)}: a setting must be inside a "
                f"section such as [{sections[-1]}]{hint}"
            )
        if section not in sections:
            raise ConfigError(
                f"{path}: unknown section [{section}]{_suggest(section, sections)} "
                f"(sections: {', '.join(sections)})"
            )
        for key, value in table.items():
            if section == "server" and key == TARGET_KEY:
                if not isinstance(value, str) or not value.strip():
                    raise ConfigError(
                        f"{path}: server.target = {toml_value(value)}: expected a string "
                        'such as "myapp:Handler"'
                    )
                resolved.target, resolved.target_origin = value.strip(), origin
                continue
            setting = settings.get(key)
            if setting is None or setting.section != section:
                raise ConfigError(f"{path}: {_unknown_key(section, key, settings)}")
            try:
                resolved.values[key] = setting.from_config(value)
            except SettingError as exc:
                raise ConfigError(f"{path}: {setting.key} = {toml_value(value)}: {exc}") from None
            resolved.origins[key] = origin


def _unknown_key(section: str, key: str, settings: dict[str, Setting]) -> str:
    setting = settings.get(key)
    if setting is not None:
        return f"unknown setting {section}.{key}: {key} belongs under [{setting.section}]"
    python_only = next((k for k in all_knobs() if k.name == key and k.section == section), None)
    if python_only is not None:
        return f"{section}.{key} can only be set from Python, not from a config file"
    here = [s.name for s in settings.values() if s.section == section]
    return f"unknown setting {section}.{key}{_suggest(key, here)}"


def _suggest(word: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _read_environment(resolved: Resolved, environ: Mapping[str, str]) -> None:
    by_var = settings_by_env_var(resolved.settings)
    # Names that earlier versions documented (SERVEKIT_ + the knob's name) where the
    # variable is now named after the flag, or where the setting has no variable at all:
    # refused, because ignoring them would silently run with a different configuration.
    renamed: dict[str, str] = {}
    for declared in all_knobs():
        old = "SERVEKIT_" + declared.name.upper()
        if old in by_var:
            continue
        if declared.env_var is None:
            renamed[old] = f"{declared.name} can only be set from Python"
        else:
            renamed[old] = f"the variable for {declared.cli_flag} is {declared.env_var}"
    for var in sorted(environ):
        if not var.startswith("SERVEKIT_"):
            continue
        text = environ[var]
        setting = by_var.get(var)
        if setting is None:
            if var in renamed:
                raise ConfigError(f"environment: {var} is not read: {renamed[var]}")
            resolved.warnings.append(f"environment: {var} is not a servekit setting; ignored")
            continue
        try:
            resolved.values[setting.name] = setting.from_text(text)
        except SettingError as exc:
            raise ConfigError(f"environment: {var}={text!r}: {exc}") from None
        resolved.origins[setting.name] = Origin("environment", var)


def _read_flags(resolved: Resolved, flags: Mapping[str, Any]) -> None:
    for name, given in flags.items():
        setting = resolved.settings.get(name)
        if given is None or setting is None:
            continue
        try:
            if isinstance(given, str):
                value = setting.from_text(given)
            else:  # True/False from --x/--no-x, a list from a repeated flag
                value = setting.from_config(given)
        except SettingError as exc:
            # A repeated flag's problem quotes the bad item itself.
            shown = f" {given!r}" if isinstance(given, str) else ""
            raise ConfigError(f"command line: {setting.flag}{shown}: {exc}") from None
        resolved.values[name] = value
        resolved.origins[name] = Origin("flag", setting.flag)


def toml_value(value: Any) -> str:
    """A value as a TOML literal (JSON's string escapes are TOML's)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(str(value))


def _toml_line(setting: Setting, value: Any) -> str:
    if value is None:
        if setting.default is not None and setting.knob.value_type.optional:
            return f'{setting.name} = "none"'  # read back as None
        return f"# {setting.name} is not set"
    if isinstance(value, int) and not isinstance(value, bool) and setting.name.endswith("_mode"):
        return f"{setting.name} = {oct(value)}"  # TOML has octal integers too
    return f"{setting.name} = {toml_value(value)}"


def render(resolved: Resolved) -> str:
    """The effective settings as a TOML document, each value commented with its origin.

    Saved as a file it reads back to the same settings (`--config`).
    """
    lines = [
        "# servekit: the effective settings, each with where it came from",
        "# (default, file PATH, environment VARIABLE or flag --NAME).",
    ]
    section = None
    for name, setting in resolved.settings.items():
        if setting.section != section:
            section = setting.section
            lines += ["", f"[{section}]"]
            if section == "server" and resolved.target is not None:
                entry = f"{TARGET_KEY} = {toml_value(resolved.target)}"
                lines.append(f"{entry:<44} # {resolved.target_origin or DEFAULT}")
        entry = _toml_line(setting, resolved.values[name])
        lines.append(f"{entry:<44} # {resolved.origins[name]}")
    return "\n".join(lines) + "\n"
