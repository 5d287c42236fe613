"""The command's settings as one typed schema: types derived from the declarations, every source checked, names that agree."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from servekit.config.schema import Setting, all_knobs, command_settings
from servekit.config.sources import ConfigError, render, resolve
from servekit.knobs import Knob, SettingError, knob, knobs_of, parse_optional_float

pytestmark = pytest.mark.timeout(30)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "settings.md"


def _setting(name: str) -> Setting:
    return command_settings()[name]


# -- types derived from the declarations ------------------------------------------------------


def test_types_come_from_the_default_or_the_parser() -> None:
    """A knob's type is read from parse's return annotation, else from its default."""
    settings = command_settings()
    kinds = {name: s.knob.value_type for name, s in settings.items()}
    assert (kinds["max_threads"].kind, kinds["max_threads"].optional) == ("int", False)
    assert (kinds["max_connections"].kind, kinds["max_connections"].optional) == ("int", True)
    assert (kinds["worker_timeout"].kind, kinds["worker_timeout"].optional) == ("float", True)
    assert kinds["reuse_port"].kind == "bool"
    assert (kinds["unix_socket_mode"].kind, kinds["unix_socket_mode"].textual) == ("int", True)
    assert kinds["unix_socket_owner"].kind == "name-or-id"
    assert kinds["alpn_protocols"].kind == "list"
    assert (kinds["certfile"].kind, kinds["certfile"].optional) == ("str", True)


def test_existing_declarations_keep_working() -> None:
    """knob() called the old way (positional default and help, the old keywords) still declares a setting."""

    class Feature:
        limit: int = knob(5, "a limit", flag="--the-limit", check=lambda v: None, section="x")
        wait: float | None = knob(1.0, "seconds to wait", parse=parse_optional_float)

    declared = knobs_of(Feature)
    assert Feature.limit == 5
    assert declared["limit"].env_var == "SERVEKIT_THE_LIMIT"
    assert declared["wait"].cli_metavar == "SECONDS"
    assert declared["wait"].from_string("none") is None
    with pytest.raises(SettingError, match="wait: cannot read 'x': expected a number of seconds"):
        declared["wait"].from_string("x")


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("max_threads", 8, 8),
        ("graceful_timeout", 20, 20.0),  # an integer is a number of seconds too
        ("worker_timeout", "none", None),
        ("unix_socket_mode", 0o600, 0o600),
        ("unix_socket_mode", "600", 0o600),  # the mode has a textual form of its own
        ("unix_socket_owner", 1000, 1000),
        ("alpn_protocols", ["h2", "http/1.1"], ("h2", "http/1.1")),
        ("alpn_protocols", "h2,http/1.1", ("h2", "http/1.1")),
        ("bind", "127.0.0.1:1", ("127.0.0.1:1",)),
        ("bind", ["127.0.0.1:1", "unix:/tmp/x"], ("127.0.0.1:1", "unix:/tmp/x")),
        ("proxy_protocol", "off", "off"),
        ("proxy_protocol", "v2", "v2"),
        ("tcp_nodelay", False, False),
    ],
)
def test_config_values_of_the_right_type_are_taken(name: str, value: Any, expected: Any) -> None:
    """A config file's value of the setting's type is taken (and normalised)."""
    assert _setting(name).from_config(value) == expected


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        ("max_threads", 4.5, "expected an integer, not a float"),
        ("max_threads", -1, "must be greater than 0 (expected an integer)"),
        ("max_threads", True, "expected an integer, not a boolean"),
        ("workers", "2", "expected an integer, not a string"),
        ("max_connections", "10", "expected an integer or none, not a string"),
        ("bind", 8000, "expected an address or a list of addresses, not an integer"),
        ("bind", "localhost", "missing ':PORT'"),
        ("log_level", "verbose", "expected one of debug, info, warning, error"),
        ("proxy_protocol", "v3", "expected one of off, v1, v2, any"),
        ("wait_for_request", "lines", "expected one of none, data, line, head, auto"),
        ("tcp_nodelay", "yes", "expected true or false, not a string"),
        ("unix_socket_mode", 0o1777, "must be a permission mode"),
        ("graceful_timeout", [1], "expected a number of seconds, not an array"),
        # TOML's inf: no timeout can use it (None is "no limit").
        ("idle_timeout", float("inf"), "must be a finite number"),
        ("request_timeout", float("inf"), "must be a finite number"),
        ("graceful_timeout", float("inf"), "must be a finite number"),
    ],
)
def test_config_values_of_the_wrong_type_are_refused(name: str, value: Any, problem: str) -> None:
    """A config file's value of another type, or out of range, is refused with what was expected."""
    with pytest.raises(SettingError) as raised:
        _setting(name).from_config(value)
    assert problem in str(raised.value)


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("max_threads", "16", 16),
        ("reuse_port", "yes", True),
        ("request_timeout", "off", None),
        ("bind", "127.0.0.1:1,unix:@x", ("127.0.0.1:1", "unix:@x")),
        ("unix_socket_mode", "0o640", 0o640),
    ],
)
def test_text_from_flags_and_the_environment(name: str, text: str, expected: Any) -> None:
    """Text (a flag's argument, a variable) is read with the setting's parser."""
    assert _setting(name).from_text(text) == expected


def test_fallback_choices_agree_with_each_knobs_check() -> None:
    """Choices the command knows for a knob are exactly what the knob's own check accepts."""
    for setting in command_settings().values():
        if not setting.choices or setting.knob.choices:
            continue
        check = setting.knob.check
        assert check is not None, setting.name
        assert all(check(choice) is None for choice in setting.choices), setting.name
        assert check("surely-not-a-choice") is not None, setting.name


def test_metavars_say_what_to_type() -> None:
    """Metavars are words an operator understands, never a parser's function name."""
    settings = command_settings()
    metavars = {name: s.metavar for name, s in settings.items()}
    assert metavars["graceful_timeout"] == "SECONDS"
    assert metavars["max_threads"] == "N"
    assert metavars["certfile"] == "PATH"
    assert metavars["unix_socket_mode"] == "MODE"
    assert metavars["proxy_protocol"] == "{off,v1,v2,any}"
    assert metavars["wait_for_request"] == "{none,data,line,head,auto}"
    for name, metavar in metavars.items():
        assert not re.search(r"PARSE|OPTIONAL|^STR$|^INT$|^FLOAT$", metavar), (name, metavar)


# -- names agree -----------------------------------------------------------------------------


def test_every_variable_is_servekit_and_the_flag() -> None:
    """The environment variable of every setting is SERVEKIT_ + the flag's name, upper-cased, dashes as underscores."""
    settings = command_settings()
    for setting in settings.values():
        assert setting.env_var == "SERVEKIT_" + setting.flag[2:].upper().replace("-", "_")
    assert settings["max_threads"].env_var == "SERVEKIT_THREADS"
    assert settings["handshake_timeout"].env_var == "SERVEKIT_TLS_HANDSHAKE_TIMEOUT"
    assert settings["bind"].env_var == "SERVEKIT_BIND"
    assert settings["log_level"].env_var == "SERVEKIT_LOG_LEVEL"


def test_python_only_knobs_have_no_variable_anywhere() -> None:
    """Knobs without a flag have no environment variable, and docs/settings.md lists none for them."""
    python_only = [k for k in all_knobs() if k.cli_flag is None]
    assert {k.name for k in python_only} >= {"ssl_context", "daemon_threads", "block_on_close"}
    documented = DOCS.read_text()
    for declared in python_only:
        assert declared.env_var is None
        assert f"SERVEKIT_{declared.name.upper()}" not in documented
        row = next(
            line for line in documented.splitlines() if line.startswith(f"| `{declared.name}`")
        )
        assert "(Python only)" in row and "SERVEKIT_" not in row


def test_docs_list_each_settings_flag_and_variable() -> None:
    """docs/settings.md has one row per setting with its flag and its variable."""
    documented = DOCS.read_text()
    for setting in command_settings().values():
        row = next(
            line for line in documented.splitlines() if line.startswith(f"| `{setting.name}`")
        )
        assert f"`{setting.flag}" in row and f"`{setting.env_var}`" in row, setting.name


# -- sources ---------------------------------------------------------------------------------


def test_precedence_and_origins(tmp_path: Path) -> None:
    """Flags beat the environment, which beats the file, which beats the default; each value remembers its origin."""
    config = tmp_path / "s.toml"
    config.write_text("[pool]\nmax_threads = 3\nmin_threads = 1\n[prefork]\nworkers = 2\n")
    resolved = resolve(
        command_settings(),
        config_path=str(config),
        environ={"SERVEKIT_THREADS": "5", "SERVEKIT_MIN_THREADS": "2", "HOME": "/"},
        flags={"max_threads": "7"},
    )
    assert resolved.values["max_threads"] == 7
    assert str(resolved.origins["max_threads"]) == "flag --threads"
    assert (resolved.values["min_threads"], str(resolved.origins["min_threads"])) == (
        2,
        "environment SERVEKIT_MIN_THREADS",
    )
    assert str(resolved.origins["workers"]) == f"file {config}"
    assert str(resolved.origins["backlog"]) == "default"
    assert resolved.explicit() == {"max_threads", "min_threads", "workers"}


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[pool]\nmax_threads = 4.5\n", "pool.max_threads = 4.5: expected an integer"),
        ("[pool]\nmax_thread = 4\n", "unknown setting pool.max_thread (did you mean max_threads?)"),
        ("[pool]\nworkers = 4\n", "workers belongs under [prefork]"),
        ("[pools]\nmax_threads = 4\n", "unknown section [pools]"),
        ("max_threads = 4\n", "write it under [pool]"),
        ("[pool]\ndaemon_threads = true\n", "can only be set from Python"),
        ("[server]\ntarget = 3\n", "server.target = 3: expected a string"),
        ("[pool\n", "not valid TOML"),
    ],
)
def test_file_errors_name_the_file_and_the_key(tmp_path: Path, toml: str, message: str) -> None:
    """A bad config file is a ConfigError that starts with the file's path and names the key."""
    config = tmp_path / "bad.toml"
    config.write_text(toml)
    with pytest.raises(ConfigError) as raised:
        resolve(command_settings(), config_path=str(config))
    text = str(raised.value)
    assert text.startswith(f"{config}: ") and message in text and "\n" not in text


def test_renamed_variables_are_refused_and_unknown_ones_reported() -> None:
    """A variable named after the knob instead of the flag is refused with the right name; other SERVEKIT_* names are warned about."""
    with pytest.raises(
        ConfigError,
        match="SERVEKIT_MAX_THREADS is not read: the variable for --threads is SERVEKIT_THREADS",
    ):
        resolve(command_settings(), environ={"SERVEKIT_MAX_THREADS": "4"})
    with pytest.raises(
        ConfigError,
        match="SERVEKIT_BLOCK_ON_CLOSE is not read: block_on_close can only be set from Python",
    ):
        resolve(command_settings(), environ={"SERVEKIT_BLOCK_ON_CLOSE": "1"})
    resolved = resolve(command_settings(), environ={"SERVEKIT_NOPE": "1"})
    assert resolved.warnings == ["environment: SERVEKIT_NOPE is not a servekit setting; ignored"]


def test_print_reads_back_to_the_same_settings(tmp_path: Path) -> None:
    """The --print document is TOML that, used as the config file, gives the same values."""
    config = tmp_path / "s.toml"
    config.write_text(
        '[server]\nbind = ["127.0.0.1:0", "unix:/tmp/a.sock"]\ntarget = "m:H"\n'
        '[listeners]\nunix_socket_mode = "600"\n[limits]\nrequest_timeout = "none"\n'
    )
    first = resolve(
        command_settings(),
        config_path=str(config),
        environ={"SERVEKIT_TLS_HANDSHAKE_TIMEOUT": "3", "SERVEKIT_ALPN_PROTOCOLS": "h2"},
        flags={"proxy_protocol": "v1", "tcp_nodelay": False},
    )
    printed = render(first)
    assert (
        "handshake_timeout = 3.0" in printed
        and "# environment SERVEKIT_TLS_HANDSHAKE_TIMEOUT" in printed
    )
    assert "unix_socket_mode = 0o600" in printed and 'request_timeout = "none"' in printed
    tomllib.loads(printed)
    again = tmp_path / "printed.toml"
    again.write_text(printed)
    second = resolve(command_settings(), config_path=str(again))
    assert second.values == first.values
    assert second.target == "m:H"


def test_a_knob_may_declare_choices_metavar_and_type() -> None:
    """New declarations may carry choices= and metavar=; choices are then checked from every source."""

    class Feature:
        mode: str = knob("a", "a mode", choices=("a", "b"), metavar="MODE", section="x")

    declared: Knob[Any] = knobs_of(Feature)["mode"]
    assert declared.cli_metavar == "MODE"
    assert declared.from_config("b") == "b"
    with pytest.raises(SettingError, match="expected one of a, b"):
        declared.from_text("c")
