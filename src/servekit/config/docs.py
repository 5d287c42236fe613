# docs/settings.md, generated from the knob declarations of every production feature.
# `python -m servekit.config` prints it; a test keeps the committed file current.
from __future__ import annotations

from typing import Any

from servekit.knobs import Knob, knobs_of

__all__ = ["main", "markdown_table"]


def markdown_table(knobs: list[Knob[Any]]) -> str:
    """docs/settings.md: one table per section, generated from the declarations."""
    sections: dict[str, list[Knob[Any]]] = {}
    for declared in knobs:
        sections.setdefault(declared.section, []).append(declared)
    out = [
        "# Settings",
        "",
        "Generated from the knob declarations by `python -m servekit.config`; do not edit.",
        "",
        "Every setting is a class attribute of its mix-in (a subclass may override it), a",
        "keyword argument of the server's constructor, a flag of the `servekit` command, an",
        "environment variable, and a key in the `[section]` table of a `--config` TOML file.",
        "Precedence on the command line: flag, then environment, then config file, then",
        "the default.",
        "",
    ]
    for section, members in sections.items():
        owner = members[0].owner
        where = f"{owner.__module__}.{owner.__qualname__}" if owner else ""
        out += [f"## [{section}]: `{where}`", ""]
        out += ["| setting | default | flag | environment | meaning |", "|---|---|---|---|---|"]
        for declared in members:
            flag = f"`{declared.cli_flag}`" if declared.cli_flag else "(Python only)"
            default = declared.default
            shown = oct(default) if declared.name.endswith("_mode") else repr(default)
            out.append(
                f"| `{declared.name}` | `{shown}` | {flag} | "
                f"`{declared.env_var}` | {declared.help} |"
            )
        out.append("")
    return "\n".join(out)


def main() -> None:
    """Print docs/settings.md for every knob of every production mix-in."""
    from servekit.config.compose import feature_classes

    seen: list[Knob[Any]] = []
    for feature in feature_classes():
        for declared in knobs_of(feature).values():
            if declared not in seen:
                seen.append(declared)
    print(markdown_table(seen))
