# Server settings ("knobs"): the one place where each production setting is declared.
#
# Strategy. socketserver's knobs are plain class attributes (request_queue_size = 5) that
# a subclass or an instance overrides. We keep that, and make each production knob a
# declaration that also carries its type, help text and command-line flag:
#
#     class ThreadPoolMixIn(Configurable):
#         max_threads: int = knob(32, "largest number of worker threads", flag="--threads")
#
# From that one line: the class attribute reads 32, a subclass may write
# ``max_threads = 64``, the constructor accepts ``max_threads=64``, the command line
# gets ``--threads``, the environment SERVEKIT_MAX_THREADS, a config file the key
# max_threads, and docs/settings.md a row. Server classes never read argv or the
# environment themselves: only servekit.cli turns those into keyword arguments.
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Generic, TypeVar, cast

from servekit.errors import ServekitError

__all__ = ["Configurable", "Knob", "SettingError", "knob", "knobs_of"]

T = TypeVar("T")


class SettingError(ServekitError, ValueError):
    """A setting was given a value it cannot take."""


@dataclasses.dataclass(eq=False)
class Knob(Generic[T]):
    """The declaration of one setting; reads as its default on classes and instances."""

    default: T
    help: str
    #: Command-line flag; None derives ``--name-with-dashes``; "" means "no flag".
    flag: str | None = None
    #: Converts a string from argv, the environment or a config file into the value.
    parse: Callable[[str], T] | None = None
    #: Returns an error message for an invalid value, or None.
    check: Callable[[T], str | None] | None = None
    #: Section of docs/settings.md and of the config file.
    section: str = ""
    name: str = ""
    owner: type | None = None

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name
        self.owner = owner
        if not self.section:
            self.section = owner.__module__.rsplit(".", 1)[-1]

    def __get__(self, obj: object, objtype: type | None = None) -> T:
        # Non-data descriptor: an instance attribute of the same name takes precedence,
        # exactly like a plain class attribute would.
        return self.default

    @property
    def cli_flag(self) -> str | None:
        if self.flag == "":
            return None
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def env_var(self) -> str:
        return "SERVEKIT_" + self.name.upper()

    @property
    def type_name(self) -> str:
        if self.parse is not None:
            return getattr(self.parse, "__name__", "value")
        return type(self.default).__name__

    def validate(self, value: Any) -> T:
        if self.check is not None:
            problem = self.check(value)
            if problem:
                raise SettingError(f"{self.name}={value!r}: {problem}")
        return cast(T, value)

    def from_string(self, text: str) -> T:
        parse = self.parse or _default_parser(self.default)
        try:
            value = parse(text)
        except (TypeError, ValueError) as exc:
            raise SettingError(f"{self.name}: cannot read {text!r}: {exc}") from None
        return self.validate(value)


def knob(
    default: T,
    help: str,
    *,
    flag: str | None = None,
    parse: Callable[[str], Any] | None = None,
    check: Callable[[Any], str | None] | None = None,
    section: str = "",
) -> T:
    """Declare a setting as a class attribute. Typed as its value for type checkers."""
    return cast(T, Knob(default, help, flag, parse, check, section))


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected one of 1/0, true/false, yes/no, on/off")


def parse_optional_float(text: str) -> float | None:
    """A number of seconds, or none/off/empty for None."""
    lowered = text.strip().lower()
    if lowered in ("", "none", "off"):
        return None
    return float(lowered)


def parse_optional_int(text: str) -> int | None:
    """A count, or none/off/empty for None."""
    lowered = text.strip().lower()
    if lowered in ("", "none", "off"):
        return None
    return int(lowered)


def _default_parser(default: Any) -> Callable[[str], Any]:
    if isinstance(default, bool):
        return parse_bool
    if isinstance(default, int):
        return int
    if isinstance(default, float):
        return float
    return str


def positive(value: Any) -> str | None:
    return None if value is not None and value > 0 else "must be greater than 0"


def non_negative(value: Any) -> str | None:
    return None if value is not None and value >= 0 else "must be 0 or more"


def optional_positive(value: Any) -> str | None:
    return None if value is None or value > 0 else "must be greater than 0, or None"


_KNOBS_BY_CLASS: dict[type, dict[str, Knob[Any]]] = {}


def knobs_of(cls: type) -> dict[str, Knob[Any]]:
    """Every knob declared on cls or its bases, by name; the most derived wins."""
    cached = _KNOBS_BY_CLASS.get(cls)
    if cached is not None:
        return cached
    found: dict[str, Knob[Any]] = {}
    for klass in reversed(cls.__mro__):
        for name, value in vars(klass).items():
            if isinstance(value, Knob):
                found[name] = value
    _KNOBS_BY_CLASS[cls] = found
    return found


class Configurable:
    """Accept every knob of the final class as a keyword argument of its constructor.

    Production mix-ins derive from it; it sets the knobs on the instance before the
    rest of the constructor chain runs (so server_bind() already sees them) and passes
    every other argument on, so an unknown keyword fails as it would on TCPServer.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        knobs = knobs_of(type(self))
        for name in [n for n in kwargs if n in knobs]:
            value = kwargs.pop(name)
            setattr(self, name, knobs[name].validate(value))
        super().__init__(*args, **kwargs)
