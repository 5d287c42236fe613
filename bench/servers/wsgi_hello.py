# The WSGI application every WSGI contender serves (bench/httpbench.py): a fixed
# 1 KiB text/plain body with its Content-Length, so that every server can keep the
# connection alive and none needs chunked encoding.
#
# The benchmark's own app, not servekit.apps.wsgi's hello app: the comparison must not
# change when servekit's app does, and gunicorn, waitress and wsgiref serve this very
# module (module:app on PYTHONPATH=bench/servers).
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

BODY_SIZE = 1024
BODY = b"Hello, world!\n".ljust(BODY_SIZE - 1, b".") + b"\n"
HEADERS = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(BODY)))]


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response("200 OK", HEADERS)
    return [BODY]
