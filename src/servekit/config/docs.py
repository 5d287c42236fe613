# docs/settings.md, generated from the knob declarations of the command and of every
# production feature. `python -m servekit.config` prints it; a test keeps the committed
# file current, so the table cannot disagree with the flags and variables it lists.
from __future__ import annotations

from typing import Any

from servekit.knobs import Knob

__all__ = ["main", "markdown_table"]

_INTRO = """\
# Settings

Generated from the knob declarations by `python -m servekit.config`; do not edit.

Every setting of a feature is a class attribute of its mix-in (a subclass may override
it) and a keyword argument of the server's constructor. The `servekit` command reads
each one from, in increasing precedence: its default, a key in the `[section]` table of
a `--config` TOML file, an environment variable, a flag. The variable is always
`SERVEKIT_` and the flag's name (`--threads`: `SERVEKIT_THREADS`). Settings marked
"Python only" have neither a flag nor a variable.

Values are checked against the type shown, from every source: `max_threads = 4.5` or
`workers = "2"` in a file, `SERVEKIT_THREADS=many`, an unknown key or section all stop
the command with exit status 2 and one line naming the source, the key and what was
expected, before anything binds. A number of seconds takes an integer too; a setting
that may be unset takes `none`. Where the command's default differs from the class's,
both are shown. `servekit config --print` shows the effective value of each setting
and where it came from.

The `[server]` table also takes `target = "module:Name"`: the handler class for
`servekit serve`, or the WSGI application for `servekit wsgi`, when the command line
names none (`servekit echo` refuses it).
"""


def markdown_table(knobs: list[Knob[Any]]) -> str:
    """docs/settings.md: one table per section, generated from the declarations."""
    from servekit.config.schema import command_settings

    settings = command_settings()
    sections: dict[str, list[Knob[Any]]] = {}
    for declared in knobs:
        sections.setdefault(declared.section, []).append(declared)
    out = [_INTRO]
    for section, members in sections.items():
        owner = members[0].owner
        where = f"{owner.__module__}.{owner.__qualname__}" if owner else ""
        out += [f"## [{section}]: `{where}`", ""]
        out += [
            "| setting | type | default | flag | environment | meaning |",
            "|---|---|---|---|---|---|",
        ]
        for declared in members:
            setting = settings.get(declared.name)
            if setting is None:
                flag, env, expected, help_text = "(Python only)", "", declared.expected, None
                default = f"`{_show(declared, declared.default)}`"
            else:
                flag, env = f"`{setting.flag} {setting.metavar}`", f"`{setting.env_var}`"
                if declared.value_type.kind == "bool":
                    flag = f"`{setting.flag}`, `--no-{setting.flag[2:]}`"
                expected, help_text = setting.expected, setting.help
                default = f"`{_show(declared, declared.default)}`"
                if section == "server":  # the command's own: shown as an operator writes it
                    default = f"`{setting.show(declared.default)}`"
                elif setting.default != declared.default:
                    default += f" (command: `{setting.show(setting.default)}`)"
            meaning = (help_text or declared.help).replace("|", "\\|")
            out.append(
                f"| `{declared.name}` | {expected} | {default} | {flag} | {env} | {meaning} |"
            )
        out.append("")
    return "\n".join(out)


def _show(declared: Knob[Any], value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and declared.name.endswith("_mode"):
        return oct(value)
    return repr(value)


def main() -> None:
    """Print docs/settings.md for the command's settings and every production mix-in's."""
    from servekit.config.schema import all_knobs

    print(markdown_table(all_knobs()))
