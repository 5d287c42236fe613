# The current time of http.server's handlers, formatted once a second.
#
# Strategy. BaseHTTPRequestHandler formats the current time twice per request: the Date
# header (date_time_string(), through email.utils, about 3.5 us here) and the access log
# line (log_date_time_string(), about 1.3 us); SimpleHTTPRequestHandler also formats its
# file's Last-Modified (about 3.9 us): some 7 % of a small keep-alive request, for
# strings that change once a second. nginx keeps its formatted times in a cache
# refreshed once a second for the same reason.
#
# A pool server runs an http.server handler class through a subclass of its own
# (servekit.features.pipeline); handler_methods() gives that subclass versions of these
# methods that keep the last second's string (and the last timestamp's) and format a new
# one when it changes. What they return is exactly what http.server's return. A class
# that overrides either method keeps its own.
from __future__ import annotations

import sys
import time
from typing import Any

__all__ = ["handler_methods"]

# (key, string), and for the log (second, month names, string): each replaced whole, so
# a reader on another thread sees a matching set. time.time() is looked up per call, so
# that tools that replace it (freezegun) are followed.
_date: tuple[int, str] = (-1, "")
_stamped: tuple[float | None, str] = (None, "")
_log_date: tuple[int, Any, str] = (-1, None, "")


def _format_date(self: Any, timestamp: float) -> str:
    # http.server's own, found where the handler's class found it: http.server is
    # imported by then (never by us: see servekit.install).
    base: Any = sys.modules["http.server"].BaseHTTPRequestHandler
    text: str = base.date_time_string(self, timestamp)
    return text


def _date_time_string(self: Any, timestamp: float | None = None) -> str:
    global _date, _stamped
    if timestamp is not None:
        # A file's Last-Modified: the same file's, request after request, usually.
        stamped = _stamped
        if stamped[0] != timestamp:
            stamped = _stamped = (timestamp, _format_date(self, timestamp))
        return stamped[1]
    now = int(time.time())
    cached = _date
    if cached[0] != now:
        cached = _date = (now, _format_date(self, now))
    return cached[1]


def _log_date_time_string(self: Any) -> str:
    global _log_date
    now = int(time.time())
    names = self.monthname  # a class may have its own month names
    cached = _log_date
    if cached[0] != now or cached[1] is not names:
        year, month, day, hh, mm, ss = time.localtime(now)[:6]
        text = f"{day:02d}/{names[month]:>3s}/{year:04d} {hh:02d}:{mm:02d}:{ss:02d}"
        cached = _log_date = (now, names, text)
    return cached[2]


def handler_methods(handler_class: type) -> dict[str, Any]:
    """The methods a pool server gives its subclass of handler_class: {} unless it is an
    http.server handler."""
    http = sys.modules.get("http.server")  # never import it ourselves
    base = getattr(http, "BaseHTTPRequestHandler", None)
    if base is None or not issubclass(handler_class, base):
        return {}
    methods: dict[str, Any] = {}
    if getattr(handler_class, "date_time_string", None) is base.date_time_string:
        methods["date_time_string"] = _date_time_string
    if getattr(handler_class, "log_date_time_string", None) is base.log_date_time_string:
        methods["log_date_time_string"] = _log_date_time_string
    return methods
