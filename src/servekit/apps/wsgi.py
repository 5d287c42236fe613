# WSGI (PEP 3333) over HTTP/1.1: handler_for(app) is a MessageHandler class that serves
# one request per handle_one_request(), so a pool server parks keep-alive connections
# between requests and any other server loops in handle(). Owns the environ, the
# response framing, and what happens to a connection after each request.
#
# Strategy. Bytes are read from self.rfile only, through the sans-IO parser of
# servekit.protocols.http1, which never takes a byte past the end of the request: the
# head is offered from rfile.peek() and only what the parser took is consumed, body data
# is read by exact counts (bytes_wanted()). So when a request is answered, everything
# that followed it (a pipelined request) is still in rfile's buffer, where the server
# looks before parking the connection. Nothing else is kept between requests but the
# handler's per-connection environ.
#
# Responses leave in as few writes as possible: the head is held until the first
# non-empty body chunk (PEP 3333 requires that too) and leaves with it in one sendall();
# a list result is sent as head + body in one write with a Content-Length computed for
# it. With TCP_NODELAY set, every write is a packet: a head and a body in two writes
# cost a second packet, and without TCP_NODELAY the second write waits for the peer's
# delayed ACK (about 40 ms on Linux).
#
# After a response the connection is kept only if both sides agree (RFC 9112 9.3), the
# request was read to its end (what the application left unread is drained, up to
# max_drain_size bytes), and the server is not stopping. Everything else closes, after a
# half-close and a bounded read of what the client still sends (linger), so that the
# client reads our answer instead of a reset.
#
# Who is to blame decides the log: a request we refuse is answered (400, 413, 414, 431,
# 501, 505) and logged at debug; a client that goes away (reset, broken pipe, timeout,
# EOF mid-request) is logged once at debug with its address; an exception from the
# application is logged once at ERROR with its traceback and answered 500 if nothing was
# sent yet. Socket errors are recognised by where they happen (our reads and writes,
# which record them), never by their type, so an application's own ConnectionError (to
# its database, say) is still the application's error.
from __future__ import annotations

import io
import logging
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from email.utils import formatdate
from types import TracebackType
from typing import Any, Final, TypeAlias, cast
from urllib.parse import unquote

from servekit import __version__
from servekit.core.kinds import TCP_FAMILIES, family_of
from servekit.core.server import ServerState
from servekit.errors import RequestTooSlow, ServekitError
from servekit.features.addresses import format_peer
from servekit.features.connection import current_connection
from servekit.features.messages import MessageHandler
from servekit.features.readrate import ReadRate
from servekit.protocols import http1
from servekit.protocols.http1 import (
    NEED_DATA,
    Data,
    HTTPRequestError,
    IncompleteRequest,
    Request,
    RequestParser,
)

__all__ = [
    "ClientDisconnected",
    "FileWrapper",
    "WSGIApplication",
    "WSGIRequestHandler",
    "handler_for",
    "hello_app",
]

log = logging.getLogger("servekit.wsgi")

ExcInfo: TypeAlias = tuple[type[BaseException], BaseException, TracebackType | None]
Write: TypeAlias = Callable[[bytes], None]
StartResponse: TypeAlias = Callable[..., Write]
WSGIApplication: TypeAlias = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


SERVER_SOFTWARE: Final = f"servekit/{__version__}"

# Headers that belong to one connection (RFC 9110 7.6.1, RFC 9112 6.1): the server's
# business, which PEP 3333 forbids applications to set. "Connection: close" from an
# application is honoured (the connection closes after the response) and dropped; the
# others are refused, since their framing would contradict ours.
_HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_TCHARS: Final = frozenset(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)
# Characters a response header value or status line must not hold: CR and LF would split
# the response (RFC 9110 5.5), NUL and other controls are invalid.
_FORBIDDEN_IN_VALUES: Final = frozenset(chr(c) for c in (*range(0x20), 0x7F) if c != 0x09)
# Statuses whose responses never have a body (RFC 9110 6.4.1).
_NO_BODY: Final = frozenset({204, 304})
# Bodies up to this size are joined with their head (or chunk framing) into one write: a
# copy of 64 KiB costs a few microseconds, less than a second system call and packet.
_JOIN_LIMIT: Final = 65536
# Largest single read of body data: a large read goes straight from the socket into the
# result (BufferedReader.read1 bypasses its 8 KiB buffer), and 64 KiB keeps a read's
# memory small whatever the application asks for.
_READ_SIZE: Final = 65536
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"


class ClientDisconnected(ServekitError, ConnectionError):
    """The client went away (closed, reset, or silent past the timeout) while the request
    was being read or answered. Raised to the application by wsgi.input and write()."""


# --- helpers --------------------------------------------------------------------------

_date_cache: list[tuple[int, str]] = [(0, "")]


def _http_date() -> str:
    """The Date header's value (RFC 9110 6.6.1), formatted once per second."""
    now = int(time.time())
    second, text = _date_cache[0]
    if second != now:
        text = formatdate(now, usegmt=True)
        _date_cache[0] = (now, text)
    return text


# HTTP_ names of header fields, computed once per field name. Names come from clients,
# so the cache is bounded: past 1024 names, new ones are computed each time.
_environ_keys: dict[str, str] = {}


def _environ_key(name: str) -> str:
    key = _environ_keys.get(name)
    if key is None:
        key = "HTTP_" + name.upper().replace("-", "_")
        if len(_environ_keys) < 1024:
            _environ_keys[name] = key
    return key


class FileWrapper:
    """wsgi.file_wrapper: iterate a file-like object in blocks (PEP 3333, optional
    platform-specific file handling); close() closes the file."""

    def __init__(self, filelike: Any, blksize: int = 8192) -> None:
        self.filelike = filelike
        self.blksize = blksize
        close = getattr(filelike, "close", None)
        if close is not None:
            self.close = close

    def __iter__(self) -> Iterator[bytes]:
        read = self.filelike.read
        while True:
            block = read(self.blksize)
            if not block:
                return
            yield block


class _ErrorStream(io.TextIOBase):
    """wsgi.errors: text written here goes to the "servekit.wsgi" logger at ERROR, one
    record per line (PEP 3333: "a text mode stream ... where errors are written")."""

    def __init__(self, peer: str) -> None:
        self._peer = peer
        self._partial = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            log.error("%s: wsgi.errors: %s", self._peer, line)
        return len(text)

    def flush(self) -> None:
        if self._partial:
            log.error("%s: wsgi.errors: %s", self._peer, self._partial)
            self._partial = ""


class _Input:
    """wsgi.input: the request body, chunked framing removed. Reads past its end return
    b'' (PEP 3333 leaves that to servers; wsgi.input_terminated promises it)."""

    __slots__ = ("_buffer", "_done", "_handler", "_parser")

    def __init__(self, handler: WSGIRequestHandler, parser: RequestParser) -> None:
        self._handler = handler
        self._parser = parser
        self._buffer = bytearray()
        self._done = False

    def _more(self) -> bytes:
        if self._done:
            return b""
        chunk = self._handler._body_chunk(self._parser)
        if not chunk:
            self._done = True
        return chunk

    def read(self, size: int | None = -1) -> bytes:
        buffer = self._buffer
        if size is None or size < 0:
            while chunk := self._more():
                buffer += chunk
            data = bytes(buffer)
            buffer.clear()
            return data
        if size == 0:
            return b""
        if not buffer:
            chunk = self._more()
            if len(chunk) == size:
                return chunk  # the common case: one read of a small body, no copy
            buffer += chunk
        while len(buffer) < size:
            chunk = self._more()
            if not chunk:
                break
            buffer += chunk
        data = bytes(buffer[:size])
        del buffer[:size]
        return data

    def readline(self, size: int | None = -1) -> bytes:
        buffer = self._buffer
        limit = size if size is not None and size >= 0 else None
        scanned = 0
        while True:
            newline = buffer.find(b"\n", scanned)
            if newline >= 0:
                end = newline + 1
                break
            if limit is not None and len(buffer) >= limit:
                end = limit
                break
            scanned = len(buffer)
            chunk = self._more()
            if not chunk:
                end = len(buffer)
                break
            buffer += chunk
        if limit is not None:
            end = min(end, limit)
        data = bytes(buffer[:end])
        del buffer[:end]
        return data

    def readlines(self, hint: int | None = -1) -> list[bytes]:
        lines = []
        total = 0
        while line := self.readline():
            lines.append(line)
            total += len(line)
            if hint is not None and 0 < hint <= total:
                break
        return lines

    def __iter__(self) -> Iterator[bytes]:
        while line := self.readline():
            yield line

    def close(self) -> None:
        pass


# --- the built-in application ---------------------------------------------------------

_HELLO_LINE = b"Hello, world! This is servekit's built-in WSGI application.\n"
# Exactly 1 KiB: the body size of the HTTP benchmarks (issue 11's scenarios).
HELLO_BODY: Final = (_HELLO_LINE * (1024 // len(_HELLO_LINE) + 1))[:1023] + b"\n"
_HELLO_HEADERS: Final = [
    ("Content-Type", "text/plain; charset=utf-8"),
    ("Content-Length", str(len(HELLO_BODY))),
]


def hello_app(environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
    """A WSGI application answering any GET (or HEAD) with a 1024-byte text/plain body;
    other methods get 405. What `servekit wsgi` serves when given no application."""
    if environ["REQUEST_METHOD"] not in ("GET", "HEAD"):
        start_response(
            "405 Method Not Allowed",
            [("Content-Type", "text/plain; charset=utf-8"), ("Allow", "GET, HEAD")],
        )
        return [b"405 Method Not Allowed\n"]
    start_response("200 OK", list(_HELLO_HEADERS))
    return [HELLO_BODY]


class _Response:
    """One response: start_response(), write(), and the framing decided from them."""

    __slots__ = (
        "chunked",
        "code",
        "content_length",
        "has_date",
        "has_server",
        "head_only",
        "headers",
        "headers_sent",
        "keep_alive",
        "may_keep",
        "no_body",
        "peer",
        "request",
        "send",
        "sent",
        "server",
        "status",
        "total",
        "version11",
    )

    def __init__(
        self,
        request: Request,
        send: Callable[..., None],
        may_keep: Callable[[], bool],
        *,
        peer: str,
        server: str,
    ) -> None:
        self.request = request
        self.send = send
        self.may_keep = may_keep
        self.peer = peer
        self.server = server
        self.version11 = request.http_version >= (1, 1)
        self.head_only = request.method == "HEAD"
        self.keep_alive = request.keep_alive
        self.status: str | None = None
        self.code = 0
        self.headers: list[tuple[str, str]] = []
        self.content_length: int | None = None
        self.has_date = self.has_server = False
        self.headers_sent = False
        self.no_body = self.head_only
        self.chunked = False
        self.sent = 0
        self.total: int | None = None  # the whole body's size, when given all at once

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None
    ) -> Write:
        if exc_info is not None:
            try:
                if self.headers_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None  # no reference cycle through the traceback (PEP 3333)
        elif self.status is not None:
            raise RuntimeError("start_response() called a second time without exc_info")
        if type(status) is not str:
            raise TypeError(f"status must be a str, not {type(status).__name__}")
        if len(status) < 4 or not status[:3].isdigit() or status[3] != " ":
            raise ValueError(f"status must be 'NNN reason', not {status!r}")
        if not _FORBIDDEN_IN_VALUES.isdisjoint(status):
            raise ValueError(f"control character in status {status!r}")
        code = int(status[:3])
        kept: list[tuple[str, str]] = []
        content_length: int | None = None
        has_date = has_server = False
        keep_alive = self.keep_alive
        for name, value in headers:
            if type(name) is not str or type(value) is not str:
                raise TypeError(f"header names and values must be str: {(name, value)!r}")
            if not name or not _TCHARS.issuperset(name):
                raise ValueError(f"malformed header name {name!r}")
            if not _FORBIDDEN_IN_VALUES.isdisjoint(value):
                raise ValueError(f"control character in the value of header {name!r}")
            lower = name.lower()
            if lower in _HOP_BY_HOP:
                if lower == "connection":
                    if "close" in (o.strip().lower() for o in value.split(",")):
                        keep_alive = False
                    continue
                raise ValueError(f"hop-by-hop header {name!r} is set by the server (PEP 3333)")
            if lower == "content-length":
                if not value.isascii() or not value.strip().isdigit():
                    raise ValueError(f"malformed Content-Length {value!r}")
                content_length = int(value)
            elif lower == "date":
                has_date = True
            elif lower == "server":
                has_server = True
            kept.append((name, value))
        self.status = status
        self.code = code
        self.headers = kept
        self.content_length = content_length
        self.has_date = has_date
        self.has_server = has_server
        self.keep_alive = keep_alive
        self.no_body = self.head_only or code in _NO_BODY or code < 200
        return self.write

    def write(self, data: bytes) -> None:
        """The write() callable of start_response(): send data now."""
        if self.status is None:
            raise RuntimeError("write() before start_response()")
        self.body(data)

    def head(self) -> bytes:
        """The response head. Decides the framing, and whether the connection is kept."""
        assert self.status is not None
        lines = [f"HTTP/1.1 {self.status}\r\n"]
        lines.extend(f"{name}: {value}\r\n" for name, value in self.headers)
        if self.content_length is None and self.code >= 200 and self.code not in _NO_BODY:
            total = self.total
            if total is not None:
                self.content_length = total
                lines.append(f"Content-Length: {total}\r\n")
            elif self.head_only:
                pass  # the length is unknown, and no body follows anyway
            elif self.version11:
                self.chunked = True
                lines.append("Transfer-Encoding: chunked\r\n")
            else:
                self.keep_alive = False  # HTTP/1.0: the body ends where the connection does
        if self.keep_alive and not self.may_keep():
            self.keep_alive = False
        if not self.has_date:
            lines.append(f"Date: {_http_date()}\r\n")
        if not self.has_server:
            lines.append(f"Server: {self.server}\r\n")
        if not self.keep_alive:
            lines.append("Connection: close\r\n\r\n")
        elif not self.version11:
            lines.append("Connection: keep-alive\r\n\r\n")
        else:
            lines.append("\r\n")
        self.headers_sent = True
        return "".join(lines).encode("latin-1")

    def body(self, data: bytes) -> None:
        """Send one chunk of the body (the head with it, the first time)."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"response body chunks must be bytes, not {type(data).__name__}")
        size = len(data)
        if not size:
            return
        if self.no_body:
            if not self.headers_sent:
                self.send(self.head())
            return
        if self.content_length is not None:
            room = self.content_length - self.sent
            if size > room:
                log.error(
                    "%s: %s %s: the application sent more than its Content-Length of %d"
                    " bytes; the excess is dropped",
                    self.peer,
                    self.request.method,
                    self.request.target,
                    self.content_length,
                )
                self.keep_alive = False
                data, size = data[:room], room
        head = self.head() if not self.headers_sent else b""
        self.sent += size
        if self.chunked:
            self.send(head, b"%x\r\n" % size, data, b"\r\n")
        elif size:
            self.send(head, data)
        elif head:
            self.send(head)

    def whole(self, chunks: list[bytes] | tuple[bytes, ...]) -> None:
        """Send a body given all at once, with a Content-Length when the application
        gave none."""
        for chunk in chunks:
            if not isinstance(chunk, (bytes, bytearray, memoryview)):
                raise TypeError(f"response body chunks must be bytes, not {type(chunk).__name__}")
        total = sum(len(chunk) for chunk in chunks)
        self.total = total
        if total <= _JOIN_LIMIT and len(chunks) > 1:
            chunks = [b"".join(chunks)]
        for chunk in chunks:
            self.body(chunk)

    def end(self) -> None:
        """The application is done: send what the framing still needs."""
        if self.status is None:
            raise RuntimeError("the application returned without calling start_response()")
        if not self.headers_sent:
            if not self.no_body:
                self.total = 0  # nothing was sent: the body is empty
            self.send(self.head())
        elif self.chunked:
            self.send(b"0\r\n\r\n")
        if not self.no_body and self.content_length is not None and self.sent < self.content_length:
            log.error(
                "%s: %s %s: the application sent %d of its Content-Length of %d bytes;"
                " closing the connection",
                self.peer,
                self.request.method,
                self.request.target,
                self.sent,
                self.content_length,
            )
            self.keep_alive = False


class WSGIRequestHandler(MessageHandler):
    """Serve the WSGI application in ``application`` over HTTP/1.1, one request per
    handle_one_request(). Use handler_for(app) rather than subclassing by hand.

    The class attributes below are the knobs; a subclass (or handler_for's keywords)
    may override them.
    """

    #: The WSGI application, as a staticmethod. The built-in hello_app by default.
    application = staticmethod(hello_app)

    #: Largest request body accepted, in bytes (None: no limit); larger gets a 413. The
    #: same 1 GiB as waitress's max_request_body_size, so an upload that works there
    #: works here; lower it for applications that read whole bodies into memory.
    max_body_size: int | None = 1 << 30
    #: Largest request head (request line, header fields), in bytes; larger gets a 431.
    max_head_size: int = http1.MAX_HEAD_SIZE
    #: Longest request line, in bytes; longer gets a 414.
    max_request_line: int = http1.MAX_REQUEST_LINE
    #: Most header fields in a request; more gets a 431.
    max_header_count: int = http1.MAX_HEADER_COUNT
    #: Request body bytes the application left unread that are read and discarded to
    #: keep the connection; more, and it is closed instead. 64 KiB is the largest TCP
    #: window without window scaling (RFC 7323 section 2), about what a client has in
    #: flight anyway; reading it costs less than the client's new connection.
    max_drain_size: int = 65536
    #: Seconds a connection closed with input possibly pending keeps reading (and
    #: discarding) before it is closed, so the client reads the answer rather than a
    #: reset (RFC 9112 section 9.6, "close in stages"). Apache lingers 2 s as well.
    linger_timeout: float = 2.0
    #: Socket timeout for every read and write, unless the server set one already
    #: (LimitsMixIn's idle_timeout): a client silent this long mid-request is gone. 31 s
    #: covers TCP's five first retransmissions (1 + 2 + 4 + 8 + 16 s, RFC 6298).
    timeout: float | None = 31.0
    #: The Server header and SERVER_SOFTWARE.
    server_software: str = SERVER_SOFTWARE
    #: A new connection gets a thread once its whole request head is in (LimitsMixIn's
    #: wait_for_request="auto"): a client trickling its headers costs no thread.
    wait_for_request = "head"

    rbufsize = -1  # rfile must be a BufferedReader: the parser peeks into it

    _environ: dict[str, Any]
    _parser: RequestParser
    _response: _Response | None
    _gone: BaseException | None
    _input_error: HTTPRequestError | None
    _body_requested: bool

    def setup(self) -> None:
        sock = self.request
        if sock.gettimeout() is not None:
            self.timeout = None  # the server's own timeout stands
        # TCP_NODELAY: a response is written whole, so Nagle's algorithm only delays it.
        # A server with tcp_nodelay (servekit's default) set it on the listener, which
        # the connection inherited: no system call per connection for it here.
        self.disable_nagle_algorithm = family_of(sock) in TCP_FAMILIES and not getattr(
            self.server, "tcp_nodelay", False
        )
        super().setup()
        if not hasattr(self.rfile, "peek"):
            raise TypeError(f"{type(self).__name__} needs a buffered rfile (rbufsize != 0)")
        self._reader = cast(io.BufferedReader, self.rfile)
        self._peer = format_peer(self.client_address)
        self._environ = self._connection_environ()
        self._response = None

    def _connection_environ(self) -> dict[str, Any]:
        """The environ entries that are the same for every request of the connection."""
        ssl = sys.modules.get("ssl")  # not imported: no connection can be TLS
        https = ssl is not None and isinstance(self.request, ssl.SSLSocket)
        environ: dict[str, Any] = {
            "SERVER_SOFTWARE": self.server_software,
            "SCRIPT_NAME": "",
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "https" if https else "http",
            "wsgi.errors": _ErrorStream(self._peer),
            "wsgi.multithread": True,
            "wsgi.multiprocess": int(getattr(self.server, "workers", 1) or 1) > 1,
            "wsgi.run_once": False,
            "wsgi.input_terminated": True,
            "wsgi.file_wrapper": FileWrapper,
        }
        address = self.server.server_address
        if isinstance(address, tuple):
            environ["SERVER_NAME"] = str(address[0])
            environ["SERVER_PORT"] = str(address[1])
        client = self.client_address
        if isinstance(client, tuple) and len(client) >= 2:
            environ["REMOTE_ADDR"] = str(client[0])
            environ["REMOTE_PORT"] = str(client[1])
        elif isinstance(client, bytes):
            environ["REMOTE_ADDR"] = client.decode("utf-8", "surrogateescape")
        else:
            environ["REMOTE_ADDR"] = str(client or "")  # a Unix peer: its path, often none
        return environ

    # -- one request -----------------------------------------------------------------------

    def handle_one_request(self) -> None:
        """Read one request, run the application, answer; set close_connection."""
        self.close_connection = True
        self._gone = None
        self._input_error = None
        self._body_requested = False
        self._response = None
        self._parser = RequestParser(
            max_body_size=self.max_body_size,
            max_head_size=self.max_head_size,
            max_request_line=self.max_request_line,
            max_header_count=self.max_header_count,
        )
        try:
            request = self._read_head()
        except IncompleteRequest as exc:
            log.debug("%s: the client went away: %s", self._peer, exc)
            return
        except HTTPRequestError as exc:
            log.debug("%s: %d %s: %s", self._peer, exc.status, exc.reason, exc)
            self._refuse(exc.status, exc.reason, str(exc))
            return
        except ClientDisconnected as exc:
            if isinstance(exc.__cause__, TimeoutError) and not self._parser.started:
                log.debug(
                    "%s: idle for %ss between requests; closing",
                    self._peer,
                    self.connection.gettimeout(),
                )
            else:
                log.debug("%s: the client went away: %s", self._peer, exc)
            return
        if request is None:
            return  # the client closed the connection between requests
        # Whether to keep the connection was decided when the response head was written
        # (_may_keep), and said in it: deciding again now could close a connection whose
        # answer promised to keep it open.
        self.close_connection = not self._serve(request)

    def _serve(self, request: Request) -> bool:
        """Run the application for request; whether the connection may carry another."""
        response = _Response(
            request, self._send, self._may_keep, peer=self._peer, server=self.server_software
        )
        self._response = response
        environ = self._request_environ(request)
        result: Iterable[bytes] | None = None
        try:
            try:
                result = self.application(environ, response.start_response)
                if (
                    type(result) in (list, tuple)
                    and response.status is not None
                    and not response.headers_sent
                ):
                    response.whole(result)
                else:
                    for chunk in result:
                        response.body(chunk)
                response.end()
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
        except Exception as exc:
            self._failed(request, response, exc)
            return False
        if not response.keep_alive:
            if not self._parser.complete:
                self._linger()
            return False
        if not self._drain():
            self._linger()
            return False
        return True

    def _may_keep(self) -> bool:
        """Whether the connection can outlive the request, judged when the response head is
        written, so that "Connection: close" is said up front: not while the server stops,
        not if the client may be waiting for a 100 Continue it will never get, nor if
        more is left of the body than max_drain_size. A chunked body's end is unknown
        until read: it is drained after the response if it ends soon enough, else the
        connection closes unannounced (RFC 9112 9.6 allows closing at any time)."""
        if getattr(self.server, "state", None) is ServerState.STOPPING:
            return False  # draining: say so in this answer rather than close unannounced
        connection = current_connection()
        if connection is not None and connection.closing:
            return False  # the pipeline serves this one last message (shutdown)
        parser = self._parser
        if parser.complete:
            return True
        request = parser.request
        if request is None or self._input_error is not None:
            return False
        if request.expect_continue and not self._body_requested:
            return False
        return parser.bytes_wanted() <= self.max_drain_size

    def _failed(self, request: Request, response: _Response, exc: Exception) -> None:
        """The application (or our sending) raised: log it once and answer if possible."""
        if isinstance(self._gone, RequestTooSlow):
            # A body trickled in slower than min_request_rate: told, in one line.
            log.info(
                "%s: %s %s: %s; closing",
                self._peer,
                request.method,
                _shorten(request.target),
                self._gone,
            )
            if not response.headers_sent:
                self._refuse(408, "Request Timeout", str(self._gone), response.head_only)
            return
        if self._gone is not None:
            log.debug(
                "%s: the client went away during %s %s: %s",
                self._peer,
                request.method,
                _shorten(request.target),
                self._gone,
            )
            return
        if self._input_error is not None:
            # The application failed because the body was bad: the client's fault.
            exc = self._input_error
            log.debug("%s: %d %s: %s", self._peer, exc.status, exc.reason, exc)
            if not response.headers_sent:
                self._refuse(exc.status, exc.reason, str(exc))
            return
        log.error(
            "%s: %s %s: the WSGI application %r raised",
            self._peer,
            request.method,
            _shorten(request.target),
            self.application,
            exc_info=exc,
        )
        if not response.headers_sent:
            self._refuse(500, "Internal Server Error", "the application failed", response.head_only)
        elif not self._parser.complete:
            self._linger()

    # -- reading -------------------------------------------------------------------------

    def _read_head(self) -> Request | None:
        """The next request's head, or None if the connection closed cleanly before it."""
        parser = self._parser
        while True:
            event = parser.next_event()
            if event is NEED_DATA:
                if not self._fill():
                    if not parser.started:
                        return None
                    parser.receive_eof()
                continue
            assert isinstance(event, Request)
            return event

    def _fill(self) -> bool:
        """Give the parser more of this request's bytes; False at end of input."""
        parser = self._parser
        reader = self._reader
        try:
            wanted = parser.bytes_wanted()
            if wanted:
                data = reader.read1(min(wanted, _READ_SIZE))
                if data:
                    parser.receive_data(data)
                return bool(data)
            data = reader.peek(1)
            if not data:
                return False
            # The parser takes at least one byte until the request is complete or refused
            # (a property the parser's tests check), so every caller's loop advances.
            reader.read(parser.receive_data(data))
        except OSError as exc:
            self._gone = exc
            raise ClientDisconnected(f"{type(exc).__name__}: {exc}") from exc
        return True

    def _body_chunk(self, parser: RequestParser) -> bytes:
        """The next piece of the decoded body, b"" at its end (wsgi.input's source)."""
        if parser is not self._parser:
            return b""  # a wsgi.input kept past its request reads nothing of the next
        response = self._response
        while True:
            try:
                event = parser.next_event()
            except HTTPRequestError as exc:
                self._input_error = exc
                raise
            if type(event) is Data:
                return event.data
            if event is not NEED_DATA:
                return b""  # EndOfMessage, then PAUSED
            if not self._body_requested:
                # The application wants the body: a client waiting on "Expect:
                # 100-continue" is told to send it, unless a final answer already began.
                self._body_requested = True
                request = parser.request
                expected = request is not None and request.expect_continue
                if expected and (response is None or not response.headers_sent):
                    self._send(_CONTINUE)
                    seconds = getattr(self.server, "request_timeout", None)
                    if seconds is not None and isinstance(self.request, ReadRate):
                        self.request.restart_reads(seconds)  # asked only now: not slow yet
            if not self._fill():
                self._gone = EOFError("connection closed in the middle of the body")
                raise ClientDisconnected("the connection closed in the middle of the body")

    def _drain(self) -> bool:
        """Read and discard the rest of the request body, up to max_drain_size bytes;
        whether the request is now complete."""
        parser = self._parser
        if parser.complete:
            return True
        request = parser.request
        if request is None or (request.expect_continue and not self._body_requested):
            return False  # the client may be waiting for a 100 it will never get
        if parser.bytes_wanted() > self.max_drain_size:
            return False
        drained = 0
        try:
            while drained <= self.max_drain_size:
                event = parser.next_event()
                if type(event) is Data:
                    drained += len(event.data)
                elif event is not NEED_DATA:
                    return True
                elif not self._fill():
                    return False
        except (HTTPRequestError, ClientDisconnected) as exc:
            log.debug("%s: while discarding the request body: %s", self._peer, exc)
        return False

    # -- writing -------------------------------------------------------------------------

    def _send(self, *parts: bytes) -> None:
        """Send parts in as few writes as possible."""
        sock = self.connection
        try:
            if len(parts) == 1:
                sock.sendall(parts[0])
            elif sum(len(p) for p in parts) <= _JOIN_LIMIT:
                sock.sendall(b"".join(parts))
            else:
                for part in parts:
                    if part:
                        sock.sendall(part)
        except OSError as exc:
            self._gone = exc
            raise ClientDisconnected(f"{type(exc).__name__}: {exc}") from exc

    def _refuse(self, status: int, reason: str, message: str, head_only: bool = False) -> None:
        """Answer an error and close: the connection is not to be trusted further."""
        body = f"{status} {reason}\n{message}\n".encode()
        head = (
            f"HTTP/1.1 {status} {reason}\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n"
            "X-Content-Type-Options: nosniff\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"Date: {_http_date()}\r\n"
            f"Server: {self.server_software}\r\n"
            "Connection: close\r\n\r\n"
        ).encode("latin-1")
        try:
            self._send(head if head_only else head + body)
        except ClientDisconnected as exc:
            log.debug("%s: the client went away before the %d answer: %s", self._peer, status, exc)
            return
        if not self._parser.complete:
            self._linger()  # the client may still be sending the rest of its request

    def _linger(self) -> None:
        """Half-close, then read and discard what the client still sends until it closes
        too, for at most linger_timeout seconds, so that closing does not turn unread
        input into a reset that destroys our answer in flight."""
        sock = self.connection
        try:
            sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + self.linger_timeout
            while (left := deadline - time.monotonic()) > 0:
                sock.settimeout(left)
                if not sock.recv(_READ_SIZE):
                    break
        except (OSError, ValueError):
            pass  # gone, reset or timed out: in every case we are done with it

    # -- environ ---------------------------------------------------------------------------

    def _request_environ(self, request: Request) -> dict[str, Any]:
        environ = self._environ.copy()
        major, minor = request.http_version
        environ["REQUEST_METHOD"] = request.method
        environ["SERVER_PROTOCOL"] = f"HTTP/{major}.{minor}"
        target = request.target
        environ["REQUEST_URI"] = environ["RAW_URI"] = target
        host: str | None = None
        if target[:1] == "/":
            path, _, query = target.partition("?")
        elif request.method == "CONNECT" or target == "*":
            path, query = ("*" if target == "*" else ""), ""
        else:
            # Absolute form: RFC 9112 section 3.2.2, the target's authority replaces Host.
            rest = target.split("://", 1)[1]
            authority, slash, path_query = rest.partition("/")
            host = authority.rpartition("@")[2]
            path, _, query = (slash + path_query).partition("?")
            path = path or "/"
        # PEP 3333: PATH_INFO is the decoded path as a native string, each byte one
        # Latin-1 character (so "%C3%A9" becomes "\xc3\xa9"; frameworks re-decode it).
        environ["PATH_INFO"] = unquote(path, "latin-1") if "%" in path else path
        environ["QUERY_STRING"] = query
        environ["wsgi.input"] = _Input(self, self._parser)
        for name, value in request.headers:
            if name == "content-type":
                environ.setdefault("CONTENT_TYPE", value)
                continue
            if name == "content-length":
                environ["CONTENT_LENGTH"] = str(request.content_length)
                continue
            if "_" in name:
                # "X_Forwarded_For" would become HTTP_X_FORWARDED_FOR and pass for the
                # X-Forwarded-For a proxy set; nginx and gunicorn drop such names too.
                continue
            key = _environ_key(name)
            if key == "HTTP_PROXY":
                continue  # httpoxy (CVE-2016-5385): it would read as the proxy variable
            previous = environ.get(key)
            if previous is None:
                environ[key] = value
            else:
                # RFC 9110 5.3: repeated fields join with commas; cookies with "; " (RFC
                # 6265 5.4, and what HTTP/2 does when it splits them, RFC 9113 8.2.3).
                environ[key] = previous + ("; " if key == "HTTP_COOKIE" else ", ") + value
        if host is not None:
            environ["HTTP_HOST"] = host
        if "SERVER_NAME" not in environ:
            # A Unix socket has no host or port: take them from Host, as PEP 3333's URL
            # reconstruction would.
            name, _, port = environ.get("HTTP_HOST", "").rpartition(":")
            if not name or "]" in port:
                name, port = environ.get("HTTP_HOST", ""), ""
            https = environ["wsgi.url_scheme"] == "https"
            environ["SERVER_NAME"] = name or "localhost"
            environ["SERVER_PORT"] = port or ("443" if https else "80")
        return environ


def _shorten(target: str, limit: int = 200) -> str:
    """A request target for a log line: long ones cut, with a mark."""
    return target if len(target) <= limit else target[: limit - 3] + "..."


def handler_for(app: WSGIApplication, **attributes: Any) -> type[WSGIRequestHandler]:
    """A handler class serving the WSGI application app, for any servekit stream server.

    Keywords set the handler's knobs (max_body_size, timeout, ...); an unknown name is a
    TypeError. Example::

        server = ThreadPoolTCPServer(("127.0.0.1", 8000), handler_for(app))
    """
    if not callable(app):
        raise TypeError(f"a WSGI application must be callable, not {type(app).__name__}")
    for name in attributes:
        if name.startswith("_") or not hasattr(WSGIRequestHandler, name):
            raise TypeError(f"WSGIRequestHandler has no setting {name!r}")
    label = getattr(app, "__qualname__", None) or type(app).__qualname__
    namespace: dict[str, Any] = {
        "application": staticmethod(app),
        "__module__": __name__,
        "__doc__": f"Serves the WSGI application {label}.",
        **attributes,
    }
    return type(f"WSGIHandler[{label}]", (WSGIRequestHandler,), namespace)
