# Logging for the `servekit` command: the default handler on stderr (text or one JSON
# object per line), or the operator's own configuration from a file given to
# logging.config.dictConfig. Everything servekit logs goes through `logging`, under the
# "servekit" logger tree ("servekit.access" for the access log), so any configuration
# the standard library understands works.
#
# JSONFormatter is public, for a dictConfig file that wants JSON on its own handlers:
#     "formatters": {"json": {"()": "servekit.cli.logsetup.JSONFormatter"}}
from __future__ import annotations

import datetime
import json
import logging
import logging.config
import sys
import tomllib
from pathlib import Path
from typing import Any

__all__ = ["JSONFormatter", "LogConfigError", "configure_logging", "load_log_config"]

TEXT_FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"

# Attributes every LogRecord has: what is left over came from `extra=`.
_STANDARD = frozenset(vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None)).keys()) | {
    "message",
    "asctime",
    "taskName",
}


class LogConfigError(ValueError):
    """A --log-config file cannot be read or applied."""


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, pid,
    then the record's extra fields (the access log's client, listener, duration, ...),
    and exception / stack when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        created = datetime.datetime.fromtimestamp(record.created, tz=datetime.UTC)
        entry: dict[str, Any] = {
            "time": created.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # default=str: an extra field that JSON cannot hold (an address tuple is fine,
        # an object is not) is written as text rather than losing the line.
        return json.dumps(entry, default=str, ensure_ascii=False)


def load_log_config(path: str) -> dict[str, Any]:
    """The dictConfig dictionary in a JSON (.json) or TOML (.toml) file."""
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix not in (".json", ".toml"):
        raise LogConfigError(f"{path}: expected a .json or .toml file")
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise LogConfigError(f"{path}: {exc.strerror or exc}") from None
    try:
        config = json.loads(text) if suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise LogConfigError(f"{path}: not valid {suffix[1:].upper()}: {exc}") from None
    if not isinstance(config, dict):
        raise LogConfigError(f"{path}: expected a table of logging settings")
    config.setdefault("version", 1)
    # dictConfig disables every logger that exists when it runs unless told otherwise;
    # servekit's own loggers exist by then (created at import), so the default would
    # silence the server whatever the file says about them.
    config.setdefault("disable_existing_loggers", False)
    return config


def configure_logging(level: str, log_format: str, config_path: str | None) -> None:
    """Set up logging for the command; LogConfigError for a file that does not apply.

    With a config file, the file decides everything (handlers, formatters, levels).
    Otherwise one handler on stderr at level, as text or JSON lines.
    """
    if config_path is not None:
        config = load_log_config(config_path)
        try:
            logging.config.dictConfig(config)
        except (ValueError, TypeError, AttributeError, ImportError) as exc:
            # dictConfig wraps the cause: "Unable to configure handler 'x'" + why.
            cause = exc.__cause__
            detail = f"{exc}: {cause}" if cause is not None else str(exc)
            raise LogConfigError(f"{config_path}: {detail}") from None
        return
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
