"""The command's logging: JSON lines, and dictConfig files read from JSON or TOML."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

from servekit.cli.logsetup import JSONFormatter, LogConfigError, load_log_config


def record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    made = logging.LogRecord("servekit.test", logging.WARNING, __file__, 1, message, args, None)
    for key, value in extra.items():
        setattr(made, key, value)
    return made


def test_json_line_has_the_standard_fields_and_the_extras() -> None:
    """One JSON object: time in UTC, level, logger, the formatted message, pid, then extra fields as given."""
    line = JSONFormatter().format(
        record("%d clients", 3, client="127.0.0.1:5000", duration=0.25, peer=("10.0.0.1", 9))
    )
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["level"] == "WARNING"
    assert entry["logger"] == "servekit.test"
    assert entry["message"] == "3 clients"
    assert isinstance(entry["pid"], int)
    assert entry["time"].endswith("Z") and "T" in entry["time"]
    assert entry["client"] == "127.0.0.1:5000"
    assert entry["duration"] == 0.25
    assert entry["peer"] == ["10.0.0.1", 9]
    assert not {"args", "msg", "levelno", "exc_info"} & set(entry)


def test_json_line_carries_the_exception_and_survives_odd_extras() -> None:
    """An exception is one field with its traceback; an extra JSON cannot hold is written as text."""
    try:
        raise ValueError("bad value")
    except ValueError:
        made = record("failed", thing=object())
        made.exc_info = sys.exc_info()
    entry = json.loads(JSONFormatter().format(made))
    assert "ValueError: bad value" in entry["exception"]
    assert entry["thing"].startswith("<object object at")


def test_log_config_from_json_and_toml(tmp_path: Path) -> None:
    """The same dictConfig reads from JSON and TOML; version defaults to 1 and existing loggers stay enabled."""
    (tmp_path / "a.json").write_text('{"root": {"level": "DEBUG"}}')
    (tmp_path / "a.toml").write_text('[root]\nlevel = "DEBUG"\n')
    for name in ("a.json", "a.toml"):
        config = load_log_config(str(tmp_path / name))
        assert config == {
            "version": 1,
            "disable_existing_loggers": False,
            "root": {"level": "DEBUG"},
        }


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("a.json", "{", "not valid JSON"),
        ("a.toml", "root = [", "not valid TOML"),
        ("a.json", "[1, 2]", "expected a table of logging settings"),
        ("a.ini", "", "expected a .json or .toml file"),
        ("missing.json", None, "No such file or directory"),
    ],
)
def test_unreadable_log_config_names_the_file(
    tmp_path: Path, name: str, content: str | None, message: str
) -> None:
    """A file that cannot be read or parsed is a LogConfigError naming the file and the problem."""
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(LogConfigError) as raised:
        load_log_config(str(path))
    assert str(raised.value).startswith(str(path))
    assert message in str(raised.value)
