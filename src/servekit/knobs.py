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
# gets ``--threads``, the environment SERVEKIT_THREADS (always the flag's name), a config
# file the key max_threads, and docs/settings.md a row. Server classes never read argv
# or the environment themselves: only servekit.cli turns those into keyword arguments.
#
# The value's type is derived rather than written twice: from the return annotation of
# ``parse`` when there is one (``def octal(text: str) -> int``), else from the default.
# It decides which values a config file may give (``max_threads = 4.5`` is refused, not
# started with "4.5 threads"), what an error says is expected, and the metavar of the
# flag. A declaration may state it (``type=``), and ``choices=`` / ``metavar=`` too.
from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable
from typing import Any, Generic, TypeVar, cast

from servekit.errors import ServekitError

__all__ = [
    "Configurable",
    "Knob",
    "SettingError",
    "ValueType",
    "knob",
    "knobs_of",
]

T = TypeVar("T")


class SettingError(ServekitError, ValueError):
    """A setting was given a value it cannot take."""


# The words that mean "no value" (None) for settings that may be unset.
NONE_WORDS = ("", "none", "off")


@dataclasses.dataclass(frozen=True)
class ValueType:
    """What values a setting takes from text and from config files.

    ``kind`` is one of: bool, int, float, str, name-or-id, list, opaque (only Python can
    give it, e.g. an SSLContext). ``optional``: None is a value (written none/off). ``textual``:
    the knob has a parser of its own (an octal mode, a user name), so a config file may
    give the value as a string too and the parser reads it.
    """

    kind: str
    optional: bool = False
    textual: bool = False
    #: What error messages say is expected; derived from the kind when empty.
    description: str = ""

    def accepts(self, value: object) -> bool:
        """True if value has this type as it is (a TOML value or a Python one)."""
        if value is None:
            return self.optional
        if self.kind == "bool":
            return isinstance(value, bool)
        if isinstance(value, bool):
            return False  # True is an int to Python, never a count or a number of seconds
        if self.kind == "int":
            return isinstance(value, int)
        if self.kind == "float":
            return isinstance(value, (int, float))
        if self.kind == "str":
            return isinstance(value, str)
        if self.kind == "name-or-id":
            return isinstance(value, (str, int))
        if self.kind == "list":
            return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
        return False


_SEQUENCES = ("tuple[", "list[", "Sequence[")

_KINDS_BY_ANNOTATION = {
    "bool": "bool",
    "int": "int",
    "float": "float",
    "str": "str",
    "int|str": "name-or-id",
}


def _annotation_atoms(function: Callable[..., Any]) -> set[str] | None:
    """The type names in function's return annotation: ``str | int | None`` -> {str, int, None}."""
    try:
        annotation = inspect.get_annotations(function).get("return")
    except TypeError:
        return None  # a builtin such as int: no annotations to read
    if annotation is None:
        return None
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    atoms = {atom.strip() for atom in str(text).split("|")}
    return {"None" if atom == "NoneType" else atom for atom in atoms if atom}


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
    #: The values a string setting may take, if it is an enumeration.
    choices: tuple[Any, ...] = ()
    #: The flag's metavar in --help; None derives one from the type.
    metavar: str | None = None
    #: The value's type, when it cannot be derived from parse or the default.
    declared_type: ValueType | None = None

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name
        self.owner = owner
        if not self.section:
            self.section = owner.__module__.rsplit(".", 1)[-1]

    def __get__(self, obj: object, objtype: type | None = None) -> T:
        # Non-data descriptor: an instance attribute of the same name takes precedence,
        # exactly like a plain class attribute would. An instance that reads its default
        # keeps it as such an attribute: hooks read knobs per message, and a dict lookup
        # costs a fraction of this call.
        if obj is not None:
            try:
                vars(obj)[self.name] = self.default
            except TypeError:
                pass  # no __dict__ (slots): read through here every time
        return self.default

    @property
    def cli_flag(self) -> str | None:
        if self.flag == "":
            return None
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def env_var(self) -> str | None:
        """SERVEKIT_ and the flag's name (--threads: SERVEKIT_THREADS); None without a flag.

        One rule for both names, so that an operator who knows one knows the other; a
        setting only Python can give has neither.
        """
        flag = self.cli_flag
        if flag is None:
            return None
        return "SERVEKIT_" + flag.lstrip("-").upper().replace("-", "_")

    @property
    def value_type(self) -> ValueType:
        """The setting's type: declared, else from parse's return annotation or the default."""
        if self.declared_type is not None:
            return self.declared_type
        atoms = _annotation_atoms(self.parse) if self.parse is not None else None
        if atoms is None:
            # No parser, or one without an annotation: the default says it. A default of
            # None says nothing more than "text, as given".
            atoms = {"None", "str"} if self.default is None else {type(self.default).__name__}
        optional = "None" in atoms or self.default is None
        named = atoms - {"None"}
        if named and all(a in ("tuple", "list") or a.startswith(_SEQUENCES) for a in named):
            kind = "list"
        else:
            kind = _KINDS_BY_ANNOTATION.get("|".join(sorted(named)), "opaque")
        textual = self.parse is not None and self.parse not in _PLAIN_PARSERS
        return ValueType(kind, optional, textual)

    @property
    def in_seconds(self) -> bool:
        """A duration: the help text of every such knob starts with "seconds"."""
        return self.help.startswith("seconds") and self.value_type.kind in ("int", "float")

    @property
    def expected(self) -> str:
        """What the setting takes, for error messages: "an integer", "one of v1, v2"."""
        vtype = self.value_type
        if vtype.description:
            return vtype.description
        if self.choices:
            text = "one of " + ", ".join(str(c) for c in self.choices)
        elif self.name.endswith("_mode") and vtype.kind == "int":
            text = "a file mode in octal, such as 0o660"
        elif self.in_seconds:
            text = "a whole number of seconds" if vtype.kind == "int" else "a number of seconds"
        else:
            text = {
                "bool": "true or false",
                "int": "an integer",
                "float": "a number",
                "str": "a path" if _parser_name(self.parse) == "path" else "a string",
                "name-or-id": f"a {_parser_name(self.parse) or 'name'} name or numeric id",
                "list": "a list of strings (or one comma-separated string)",
            }.get(vtype.kind, "")
        if not text:  # e.g. an SSLContext: say the type the parser's annotation names
            names = (
                sorted((_annotation_atoms(self.parse) or set()) - {"None"}) if self.parse else []
            )
            text = "an object of type " + " or ".join(names or ["(unknown)"])
        return text + " or none" if vtype.optional and vtype.kind != "str" else text

    @property
    def cli_metavar(self) -> str:
        """The metavar in --help: SECONDS, N, PATH, MODE, {v1,v2,any}, ..."""
        if self.metavar:
            return self.metavar
        if self.choices:
            return "{" + ",".join(str(c) for c in self.choices) + "}"
        kind = self.value_type.kind
        if kind == "bool":
            return "BOOL"  # flags are --x/--no-x; the environment takes true/false, 1/0...
        if kind == "int" and self.name.endswith("_mode"):
            return "MODE"
        if self.in_seconds:
            return "SECONDS"
        if kind == "int":
            return "N"
        if kind == "float":
            return "NUMBER"
        if kind == "list":
            return "NAME,..."
        name = _parser_name(self.parse)
        if name and kind in ("str", "name-or-id"):
            return name.upper()  # path -> PATH, user -> USER, group -> GROUP
        return "NAME" if kind == "name-or-id" else "TEXT"

    def validate(self, value: Any) -> T:
        if self.check is not None:
            problem = self.check(value)
            if problem:
                raise SettingError(f"{self.name}={value!r}: {problem}")
        return cast(T, value)

    def problem_with(self, value: Any) -> str | None:
        """Why value cannot be this setting, in words without the setting's name; or None."""
        if self.choices and value not in self.choices:
            return f"expected {self.expected}"
        if self.check is not None:
            problem = self.check(value)
            if problem:
                return f"{problem} (expected {self.expected})"
        return None

    def from_text(self, text: str) -> T:
        """Text from argv or the environment as the setting's value.

        Raises SettingError whose message is the problem alone ("expected an integer");
        the caller names the setting and where the text came from.
        """
        parse = self.parse or _default_parser(self.default)
        try:
            value = parse(text)
        except (TypeError, ValueError):
            raise SettingError(f"expected {self.expected}") from None
        problem = self.problem_with(value)
        if problem:
            raise SettingError(problem)
        return cast(T, value)

    def from_config(self, value: Any) -> T:
        """A value from a config file (a TOML value) as the setting's value.

        It must have the setting's type: a count is an integer, so 4.5 and "2" are
        refused rather than guessed at. A string is read with the knob's parser when
        the setting is text, when the knob has a parser of its own (an octal mode, a
        user name), or when it is a word for None ("none"). An integer is taken for a
        number of seconds. Raises SettingError like from_text().
        """
        vtype = self.value_type
        if isinstance(value, str):
            readable = vtype.kind in ("str", "name-or-id", "list", "opaque") or vtype.textual
            if readable or (vtype.optional and value.strip().lower() in NONE_WORDS):
                return self.from_text(value)
            raise SettingError(f"expected {self.expected}, not a string")
        if not vtype.accepts(value):
            raise SettingError(f"expected {self.expected}, not {kind_of_value(value)}")
        if vtype.kind == "float" and value is not None:
            value = float(value)
        elif vtype.kind == "list" and isinstance(self.default, tuple):
            value = tuple(value)
        problem = self.problem_with(value)
        if problem:
            raise SettingError(problem)
        return cast(T, value)

    def from_string(self, text: str) -> T:
        """Text as the setting's value; SettingError names the setting and the text."""
        try:
            return self.from_text(text)
        except SettingError as exc:
            raise SettingError(f"{self.name}: cannot read {text!r}: {exc}") from None


def _parser_name(parse: Callable[..., Any] | None) -> str:
    name = getattr(parse, "__name__", "") if parse is not None else ""
    return "" if name.startswith(("parse", "_", "<")) else name


def kind_of_value(value: object) -> str:
    """A TOML value's type in TOML's words, for "expected an integer, not a float"."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"


def knob(
    default: T,
    help: str,
    *,
    flag: str | None = None,
    parse: Callable[[str], Any] | None = None,
    check: Callable[[Any], str | None] | None = None,
    section: str = "",
    choices: tuple[Any, ...] = (),
    metavar: str | None = None,
    type: ValueType | None = None,
) -> T:
    """Declare a setting as a class attribute. Typed as its value for type checkers."""
    return cast(
        T,
        Knob(
            default,
            help,
            flag,
            parse,
            check,
            section,
            choices=tuple(choices),
            metavar=metavar,
            declared_type=type,
        ),
    )


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
    if lowered in NONE_WORDS:
        return None
    return float(lowered)


def parse_optional_int(text: str) -> int | None:
    """A count, or none/off/empty for None."""
    lowered = text.strip().lower()
    if lowered in NONE_WORDS:
        return None
    return int(lowered)


# Parsers that only read the type's ordinary text form: a config file must give such
# a setting as a number or boolean, not as a string (``workers = "2"`` is a mistake).
_PLAIN_PARSERS: tuple[Callable[[str], Any], ...] = (
    int,
    float,
    str,
    parse_bool,
    parse_optional_float,
    parse_optional_int,
)


def _default_parser(default: Any) -> Callable[[str], Any]:
    if isinstance(default, bool):
        return parse_bool
    if isinstance(default, int):
        return int
    if isinstance(default, float):
        return float
    return str


# Infinity passes "> 0" but no timeout or count can use it (socket timeouts and poll()
# take finite numbers): refused, with None as the way to say "no limit".
_INFINITE = "must be a finite number (None, or 'none' on the command line: no limit)"


def positive(value: Any) -> str | None:
    if value is None or not value > 0:
        return "must be greater than 0"
    return None if math.isfinite(value) else _INFINITE


def non_negative(value: Any) -> str | None:
    if value is None or not value >= 0:
        return "must be 0 or more"
    return None if math.isfinite(value) else _INFINITE


def optional_positive(value: Any) -> str | None:
    if value is None:
        return None
    if not value > 0:
        return "must be greater than 0, or None"
    return None if math.isfinite(value) else _INFINITE


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
