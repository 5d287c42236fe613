"""What pool servers change in http.server's handlers: the cached date methods return
exactly what http.server's own return in the same second, and are only given to classes
that use http.server's own."""

from __future__ import annotations

import calendar
import http.server
import time

import pytest

from servekit.features import httpserver
from servekit.features.httpserver import handler_methods
from servekit.features.pipeline import parkable_factory

pytestmark = pytest.mark.timeout(30)

Base = http.server.BaseHTTPRequestHandler

# Seconds around the edges the formatting could get wrong: year and month ends (UTC and
# local), a leap day, and ordinary times.
INSTANTS = [
    calendar.timegm((1999, 12, 31, 23, 59, 59)),
    calendar.timegm((2000, 1, 1, 0, 0, 0)),
    calendar.timegm((2024, 2, 29, 12, 0, 0)),
    calendar.timegm((2026, 12, 3, 9, 5, 7)),
    time.mktime((2026, 3, 31, 23, 59, 59, 0, 0, -1)),
    1_234_567_890,
]


def _handler(cls: type) -> http.server.BaseHTTPRequestHandler:
    return cls.__new__(cls)  # no request: the date methods need none


@pytest.mark.parametrize("instant", INSTANTS)
def test_same_strings_as_http_server(monkeypatch: pytest.MonkeyPatch, instant: float) -> None:
    cls = type("H", (http.server.SimpleHTTPRequestHandler,), handler_methods(Base))
    ours, theirs = _handler(cls), _handler(http.server.SimpleHTTPRequestHandler)
    for offset in (0.0, 0.25, 0.999, 1.0):  # the cache's second turns over at 1.0
        monkeypatch.setattr(time, "time", lambda at=instant + offset: at)
        assert ours.date_time_string() == theirs.date_time_string()
        assert ours.log_date_time_string() == theirs.log_date_time_string()
        # A timestamp given (Last-Modified) is formatted, never taken from the cache.
        assert ours.date_time_string(instant - 86400) == theirs.date_time_string(instant - 86400)


def test_a_class_with_its_own_month_names_gets_them(monkeypatch: pytest.MonkeyPatch) -> None:
    class French(http.server.BaseHTTPRequestHandler):
        monthname = [None, "jan", "fév", "mar", "avr", "mai", "jun", "jul", "aoû", "sep",
                     "oct", "nov", "déc"]  # fmt: skip

    monkeypatch.setattr(time, "time", lambda: INSTANTS[3])
    plain = type("P", (Base,), handler_methods(Base))
    french = type("F", (French,), handler_methods(French))
    assert "/Dec/" in _handler(plain).log_date_time_string()
    assert "/déc/" in _handler(french).log_date_time_string()
    assert _handler(french).log_date_time_string() == _handler(French).log_date_time_string()


def test_only_classes_that_use_http_servers_own_methods() -> None:
    class OwnDate(http.server.BaseHTTPRequestHandler):
        def date_time_string(self, timestamp: float | None = None) -> str:
            return "mine"

    assert set(handler_methods(http.server.SimpleHTTPRequestHandler)) == {
        "date_time_string",
        "log_date_time_string",
    }
    assert set(handler_methods(OwnDate)) == {"log_date_time_string"}
    assert handler_methods(object) == {}


def test_pool_servers_run_http_server_handlers_with_cached_dates() -> None:
    class Handler(http.server.SimpleHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

    parkable = parkable_factory(Handler)
    assert parkable.date_time_string is httpserver._date_time_string
    assert parkable.log_date_time_string is httpserver._log_date_time_string
