# HTTP/1.1 request parsing: RFC 9112 (message syntax) and the parts of RFC 9110 that
# decide where a request ends. Sans-IO: bytes in, events (a request head, body data, the
# end of the message) or an HTTPRequestError carrying the status to answer. Never imports
# socket, threading, time or selectors. Owns every limit on the size of a request.
#
# Strategy. One RequestParser reads one request. receive_data() takes bytes and returns
# how many of them belong to this request; it never takes a byte past the request's end,
# so whatever follows (a pipelined request) stays with the caller, e.g. in a buffered
# file, and a server can hand the connection back to its loop knowing that no bytes hide
# in a parser. The parser works line by line on the head, the chunk-size lines and the
# trailers, and by byte counts on body data; body data is passed on as it arrives, never
# accumulated. Every line is judged by a rule on the bytes seen so far (a bare CR or LF,
# a line longer than its limit, a malformed line once it is complete), so the outcome,
# events or error, is the same however the input is split into receive_data() calls;
# the property tests check exactly that. Errors are queued after the events that
# preceded them: next_event() raises the error once those events have been taken.
# bytes_wanted() tells a caller how many body bytes it may read and hand over whole.
#
# Decisions where the RFCs leave room, each with its reason. Every rejection below is
# also a request smuggling vector: a front proxy and this server must never disagree
# about where a request ends, so when two readings are possible we refuse both.
#   * Line endings: CRLF only. A bare LF or a bare CR anywhere in the head, a chunk-size
#     line or the trailers is a 400. RFC 9112 section 2.2 lets a recipient accept a bare
#     LF ("MAY") and requires a bare CR to be rejected or replaced; proxies differ on
#     both, and every HTTP client in use sends CRLF.
#   * Empty lines before the request line are skipped (RFC 9112 section 2.2: "SHOULD
#     ignore at least one empty line"); they count towards the head's size limit.
#   * The request line is exactly "method SP target SP HTTP/d.d" with single spaces
#     (section 3 allows splitting on any whitespace: we do not, since a proxy that does
#     not might read a different target). The target is visible ASCII (0x21-0x7e), in
#     origin form ("/path?query"), absolute form ("http://host/path"), authority form
#     (CONNECT only) or asterisk form (OPTIONS only), section 3.2. The first byte of a
#     request must be able to start a method: a TLS ClientHello (0x16) or other binary
#     sent to an HTTP port is refused at once rather than waited on.
#   * Versions: HTTP/1.0 and HTTP/1.1; HTTP/1.x for x > 1 is served as HTTP/1.1 (RFC
#     9110 section 6.2, a higher minor version is compatible); another major is a 505.
#   * Field lines: whitespace between the name and the colon is a 400 (RFC 9112 section
#     5.1: MUST). obs-fold, a line starting with SP or HTAB, is a 400 (section 5.2 allows
#     rejecting or unfolding; unfolding changes what a proxy forwarded). A value may hold
#     SP, HTAB, visible ASCII and obs-text (0x80-0xff); CR, LF, NUL and other controls are
#     a 400 (RFC 9110 section 5.5). Names are reported lower-cased, values with their
#     surrounding whitespace removed, both decoded as Latin-1, which maps every byte to
#     one character, so nothing is lost.
#   * Framing (RFC 9112 section 6.3): Transfer-Encoding and Content-Length together is a
#     400 (the RFC says it "ought to be handled as an error"); Transfer-Encoding in an
#     HTTP/1.0 request is a 400 (section 6.1: its framing is faulty). chunked must be the
#     final coding and appear once, else 400; any coding before it (gzip, ...) is a 501,
#     since we cannot decode it. Content-Length is 1*DIGIT; repeated fields or a list
#     are accepted only when every value is the same (RFC 9110 section 8.6), else 400.
#     A request with neither has no body.
#   * Host: an HTTP/1.1 request needs exactly one Host field, any request at most one,
#     and its value must be made of URI host and port characters (RFC 9112 section 3.2:
#     "MUST respond with a 400"); "Host: a/b" or "Host: a b" are refused.
#   * Chunk extensions are checked against their grammar and then ignored (section
#     7.1.1: "MUST ignore unrecognized chunk extensions"); the extension bytes of one
#     request share the budget of a head (max_head_size), so a peer cannot make us parse
#     kilobytes of metadata per byte of content. Trailer fields are parsed like header
#     fields, under the same size and count limits, and reported in EndOfMessage.
#   * Keep-alive (section 9.3): HTTP/1.1 persists unless Connection lists "close";
#     HTTP/1.0 persists only if it lists "keep-alive" and not "close".
#   * Expect: 100-continue is reported for HTTP/1.1 only (RFC 9110 section 10.1.1: an
#     HTTP/1.0 request's expectation MUST be ignored); other expectations are ignored.
from __future__ import annotations

import enum
import re
from collections import deque
from dataclasses import dataclass
from typing import Final

from servekit.errors import ServekitError

__all__ = [
    "MAX_CHUNK_LINE",
    "MAX_HEADER_COUNT",
    "MAX_HEAD_SIZE",
    "MAX_REQUEST_LINE",
    "NEED_DATA",
    "PAUSED",
    "REASONS",
    "Data",
    "EndOfMessage",
    "Event",
    "HTTPRequestError",
    "IncompleteRequest",
    "Request",
    "RequestParser",
    "Sentinel",
]

# --- Limits ---------------------------------------------------------------------------

# RFC 9112 section 3: "It is RECOMMENDED that all HTTP senders and recipients support, at
# a minimum, request-line lengths of 8000 octets." 8 KiB, slightly more; Apache's
# LimitRequestLine is 8190. Longer: 414 URI Too Long.
MAX_REQUEST_LINE: Final = 8192
# The whole head (request line, fields, the empty line, and any empty lines before it).
# nginx forwards at most 4 x 8 KiB (large_client_header_buffers), Node.js accepts 16 KiB;
# 64 KiB is CPython's http.client line limit (_MAXLINE) and takes anything a browser
# sends, big cookies included. Longer: 431 Request Header Fields Too Large (RFC 6585).
MAX_HEAD_SIZE: Final = 65536
# Apache's LimitRequestFields, gunicorn's limit_request_fields and CPython's
# http.client _MAXHEADERS are all 100; browsers send 10 to 20. More: 431.
MAX_HEADER_COUNT: Final = 100
# A chunk-size line: up to 16 hex digits and extensions. No client in use sends chunk
# extensions (curl, browsers, requests, Go's net/http do not), so 4 KiB leaves room for
# any real one while keeping one line's cost small. Longer: 400.
MAX_CHUNK_LINE: Final = 4096
# Content-Length and chunk sizes with more significant digits than this are refused as
# too large before converting them: 10**18 bytes is beyond any body limit, and Python
# refuses int() of more than 4300 digits (sys.get_int_max_str_digits()) anyway.
_MAX_LENGTH_DIGITS: Final = 18
_MAX_CHUNK_HEX_DIGITS: Final = 15  # 16**15 is about 10**18

# Reason phrases for the statuses this module raises (RFC 9110 section 15; RFC 6585 for
# 431). 413 is "Content Too Large" since RFC 9110.
REASONS: Final = {
    400: "Bad Request",
    413: "Content Too Large",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
    505: "HTTP Version Not Supported",
}


class HTTPRequestError(ServekitError, ValueError):
    """A request we refuse; status is the HTTP status to answer with, and the connection
    must be closed after the answer (the request's end is unknown or untrusted)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status

    @property
    def reason(self) -> str:
        return REASONS.get(self.status, "Bad Request")


class IncompleteRequest(HTTPRequestError):
    """The connection ended in the middle of a request (receive_eof()). Nobody is left to
    answer: a server closes quietly."""

    def __init__(self, message: str) -> None:
        super().__init__(400, message)


# --- Events ---------------------------------------------------------------------------


class Sentinel(enum.Enum):
    NEED_DATA = "need data"  # give receive_data() more bytes, then ask again
    PAUSED = "paused"  # the request is complete; this parser takes nothing more


NEED_DATA: Final = Sentinel.NEED_DATA
PAUSED: Final = Sentinel.PAUSED


@dataclass(frozen=True, slots=True)
class Request:
    """A request's head. headers keeps every field in order, names lower-cased."""

    method: str
    target: str
    http_version: tuple[int, int]
    headers: tuple[tuple[str, str], ...]
    # Whether the connection may carry another request after this one (RFC 9112 9.3).
    keep_alive: bool
    # HTTP/1.1 and "Expect: 100-continue": the client may wait for 100 before the body.
    expect_continue: bool
    # The body's framing: its length, or None for chunked.
    content_length: int | None
    chunked: bool

    @property
    def has_body(self) -> bool:
        """Whether a body follows (possibly an empty chunked one)."""
        return self.chunked or bool(self.content_length)


@dataclass(frozen=True, slots=True)
class Data:
    """Body bytes (decoded: chunk framing removed). Never empty."""

    data: bytes


@dataclass(frozen=True, slots=True)
class EndOfMessage:
    """The request is complete; trailers are the chunked body's trailer fields."""

    trailers: tuple[tuple[str, str], ...] = ()


Event = Request | Data | EndOfMessage

# --- Grammar (RFC 9110 section 5.6.2 tchar, RFC 9112 sections 3, 5, 7.1) --------------

_TCHAR = rb"!#$%&'*+\-.^_`|~0-9A-Za-z"
_TCHARS: Final = frozenset(
    b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)
_REQUEST_LINE = re.compile(rb"([%s]+) ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])" % _TCHAR)
_VERSION = re.compile(rb"HTTP/[0-9]\.[0-9]")
_TOKEN = re.compile(rb"[%s]+" % _TCHAR)
_ABSOLUTE_FORM = re.compile(rb"[A-Za-z][A-Za-z0-9+.\-]*://")
# Greedy value and strip() afterwards: a lazy value followed by [ \t]* backtracks
# quadratically on a value with many inner spaces.
_FIELD = re.compile(rb"([%s]+):([\t\x20-\x7e\x80-\xff]*)" % _TCHAR)
_QUOTED = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
_CHUNK_LINE = re.compile(
    rb"([0-9A-Fa-f]+)((?:[ \t]*;[ \t]*[%s]+(?:[ \t]*=[ \t]*(?:[%s]+|%s))?)*)"
    % (_TCHAR, _TCHAR, _QUOTED)
)
_DIGITS = re.compile(r"[0-9]+")
# RFC 3986 host (reg-name, IPv4, IP-literal in brackets) and port characters.
_HOST = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:\[\]%]*")
# Fields that decide framing or connection handling; the rest are only passed on.
_NOTED = frozenset({"content-length", "transfer-encoding", "host", "connection", "expect"})


def _quote(value: bytes | str, limit: int = 60) -> str:
    """A value for an error message: repr(), cut to limit characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _State(enum.Enum):
    REQUEST_LINE = "request line"
    FIELDS = "header fields"
    BODY = "body"
    CHUNK_LINE = "chunk-size line"
    CHUNK_DATA = "chunk data"
    CHUNK_END = "CRLF after chunk data"
    TRAILERS = "trailer fields"
    DONE = "done"
    ERROR = "error"


class RequestParser:
    """Parse one HTTP/1.x request. Feed bytes with receive_data(), take events with
    next_event(); a new request on the same connection needs a new parser.

    max_body_size bounds the decoded body (None: no bound); a larger Content-Length, or
    chunks adding up to more, is a 413, raised before the body is read. The other limits
    default to the module's constants, whose comments give their reasons.
    """

    def __init__(
        self,
        *,
        max_body_size: int | None = None,
        max_head_size: int = MAX_HEAD_SIZE,
        max_request_line: int = MAX_REQUEST_LINE,
        max_header_count: int = MAX_HEADER_COUNT,
    ) -> None:
        self.max_body_size = max_body_size
        self.max_head_size = max_head_size
        self.max_request_line = max_request_line
        self.max_header_count = max_header_count
        self._state = _State.REQUEST_LINE
        self._events: deque[Event] = deque()
        self._error: HTTPRequestError | None = None
        # A line being collected across receive_data() calls. Invariant: it holds no LF,
        # and no CR except possibly as its last byte.
        self._line_buffer = bytearray()
        self._started = False  # a byte of the request line has been received
        self._head_used = 0  # bytes of the head (or of the trailers) so far
        self._method = ""
        self._target = ""
        self._version = (1, 1)
        self._fields: list[tuple[str, str]] = []
        self._noted: dict[str, list[str]] = {}
        self._request: Request | None = None
        self._remaining = 0  # bytes left of the Content-Length body or of a chunk
        self._body_size = 0  # decoded body bytes announced so far
        self._extension_bytes = 0
        self._crlf_seen = 0  # of the CRLF after a chunk's data

    # -- public API ----------------------------------------------------------------------

    @property
    def started(self) -> bool:
        """Whether any byte of the request line has arrived (empty lines do not count):
        an end of input before that is a clean close, after it an incomplete request."""
        return self._started

    @property
    def complete(self) -> bool:
        """Whether the whole request, body included, has been received."""
        return self._state is _State.DONE

    @property
    def request(self) -> Request | None:
        """The request's head once it has been parsed."""
        return self._request

    def bytes_wanted(self) -> int:
        """How many bytes certainly belong to the body data being read: the rest of a
        Content-Length body or of the current chunk; 0 while reading framing (the head,
        chunk-size lines, trailers). A caller may read up to this many bytes and pass
        them to receive_data(), which then takes them all."""
        if self._state is _State.BODY or self._state is _State.CHUNK_DATA:
            return self._remaining
        return 0

    def receive_data(self, data: bytes) -> int:
        """Take bytes of this request from the start of data; return how many were taken.

        Fewer than len(data) are taken only when the request ends inside data: the rest
        belongs to whatever follows. After the request is complete, or after an error
        (which next_event() will raise), nothing more is taken.
        """
        if self._state is _State.DONE or self._state is _State.ERROR:
            return 0
        data = bytes(data)
        end = len(data)
        pos = 0
        try:
            if self._state is _State.REQUEST_LINE and not self._line_buffer:
                pos = self._whole_head(data)
            while pos < end and not self.complete:
                pos = self._step(data, pos)
        except HTTPRequestError as error:
            self._error = error
            self._state = _State.ERROR
        return pos

    def receive_eof(self) -> None:
        """The peer will send nothing more. Before any byte of a request this is a clean
        end; in the middle of one, next_event() raises IncompleteRequest."""
        if self._state is _State.DONE or self._state is _State.ERROR:
            return
        if self._started:
            self._error = IncompleteRequest(
                f"connection closed while reading the {self._state.value}"
            )
            self._state = _State.ERROR

    def next_event(self) -> Event | Sentinel:
        """The next event; NEED_DATA if more input is needed, PAUSED once the request is
        complete. Raises the HTTPRequestError that ended parsing once the events before
        it have been taken (and again on every later call)."""
        if self._events:
            return self._events.popleft()
        if self._error is not None:
            raise self._error
        if self._state is _State.DONE:
            return PAUSED
        return NEED_DATA

    # -- the state machine ---------------------------------------------------------------

    def _step(self, data: bytes, pos: int) -> int:
        state = self._state
        if state is _State.BODY or state is _State.CHUNK_DATA:
            take = min(len(data) - pos, self._remaining)
            self._events.append(Data(data if take == len(data) else data[pos : pos + take]))
            self._remaining -= take
            if not self._remaining:
                if state is _State.BODY:
                    self._end(())
                else:
                    self._state = _State.CHUNK_END
                    self._crlf_seen = 0
            return pos + take
        if state is _State.CHUNK_END:
            while pos < len(data) and self._crlf_seen < 2:
                if data[pos] != b"\r\n"[self._crlf_seen]:
                    raise HTTPRequestError(400, "chunk data not followed by CRLF")
                self._crlf_seen += 1
                pos += 1
            if self._crlf_seen == 2:
                self._state = _State.CHUNK_LINE
            return pos
        if state is _State.REQUEST_LINE:
            if not self._started and not self._line_buffer and data[pos] not in b"\r":
                # Fail fast on bytes that cannot start a method (TLS, binary, a PROXY v2
                # header after its empty lines).
                if data[pos] not in _TCHARS:
                    raise HTTPRequestError(
                        400, f"a request cannot start with byte 0x{data[pos]:02x}"
                    )
                self._started = True
            line, pos = self._line(
                data, pos, self.max_request_line, status=414, what="request line"
            )
            if line is not None:
                if line:
                    self._started = True
                    self._request_line(line)
                    self._state = _State.FIELDS
                elif self._head_used > self.max_head_size:
                    raise HTTPRequestError(
                        431, f"empty lines before the request exceed {self.max_head_size} bytes"
                    )
            return pos
        if state is _State.FIELDS or state is _State.TRAILERS:
            trailers = state is _State.TRAILERS
            limit = self.max_head_size - self._head_used - 2
            what = "trailer section" if trailers else "request head"
            line, pos = self._line(
                data, pos, max(limit, -1), status=431, what=what, shown=self.max_head_size
            )
            if line is not None:
                if not line:
                    if trailers:
                        self._end(tuple(self._fields))
                    else:
                        self._finish_head()
                else:
                    self._field(line, trailers)
            return pos
        if state is _State.CHUNK_LINE:
            line, pos = self._line(data, pos, MAX_CHUNK_LINE, status=400, what="chunk-size line")
            if line is not None:
                self._chunk_line(line)
            return pos
        raise AssertionError(f"receive_data() in state {state}")  # pragma: no cover

    def _whole_head(self, data: bytes) -> int:
        """The common case in one pass: a whole, valid head at the start of data, with no
        empty lines before it. Returns the position after it, or 0 (nothing taken, state
        untouched) if anything is unusual, and the line-by-line path then decides: it
        alone raises errors, so both paths cannot disagree."""
        if not data or data[0] not in _TCHARS:
            return 0
        end = data.find(b"\r\n\r\n", 0, self.max_head_size)
        if end < 0 or end + 4 > self.max_head_size:
            return 0
        lines = data[:end].split(b"\r\n")
        request_line = lines[0]
        if len(request_line) > self.max_request_line:
            return 0
        for line in lines:
            if b"\r" in line or b"\n" in line:
                return 0
        try:
            self._request_line(request_line)
            for line in lines[1:]:
                self._field(line, trailers=False)
            self._head_used = end + 4
            self._started = True
            self._finish_head()
        except HTTPRequestError:
            self._fields = []
            self._noted = {}
            self._events.clear()
            self._request = None
            self._state = _State.REQUEST_LINE
            self._head_used = 0
            self._started = False
            return 0
        return end + 4

    def _line(
        self, data: bytes, pos: int, limit: int, *, status: int, what: str, shown: int | None = None
    ) -> tuple[bytes | None, int]:
        """Collect one CRLF-terminated line of at most limit bytes (CRLF excluded).

        Returns (line, new pos), or (None, len(data)) while the line is incomplete. A bare
        CR or LF is a 400 as soon as it is seen; a line is too long (status) once limit + 2
        bytes hold no CRLF. Both rules read only the bytes seen so far, in that order.
        """
        buffer = self._line_buffer
        prev = len(buffer)
        stop = min(len(data), pos + limit + 2 - prev)
        source: bytes | bytearray
        if prev:
            buffer += data[pos:stop]
            source, start, scan = buffer, 0, prev - 1
        else:
            source, start, scan = data, pos, pos
        end = source.find(b"\r\n", scan, len(buffer) if prev else stop)
        last = end if end >= 0 else (len(buffer) if prev else stop)
        lf = source.find(b"\n", scan + (1 if prev else 0), last)
        # A CR is bare unless an LF follows; one at the very end is not judged yet.
        cr = source.find(b"\r", scan, last if end >= 0 else max(last - 1, scan))
        if lf >= 0 or cr >= 0:
            kind = "LF" if lf >= 0 and (cr < 0 or lf < cr) else "CR"
            raise HTTPRequestError(400, f"bare {kind} in the {what} (only CRLF ends a line)")
        if end < 0:
            if last - start >= limit + 2:
                raise HTTPRequestError(
                    status, f"{what} longer than {shown if shown is not None else limit} bytes"
                )
            if not prev:
                buffer += data[pos:stop]
            return None, stop
        line = bytes(source[start:end])
        self._head_used += end - start + 2
        if prev:
            buffer.clear()
            return line, pos + end + 2 - prev
        return line, end + 2

    def _request_line(self, line: bytes) -> None:
        match = _REQUEST_LINE.fullmatch(line)
        if match is None:
            parts = line.split(b" ")
            if len(parts) != 3:
                raise HTTPRequestError(
                    400, f"request line is not 'method SP target SP version': {_quote(line)}"
                )
            method, target, version = parts
            if not _VERSION.fullmatch(version):
                raise HTTPRequestError(400, f"malformed HTTP version {_quote(version)}")
            if not _TOKEN.fullmatch(method):
                raise HTTPRequestError(400, f"malformed method {_quote(method)}")
            raise HTTPRequestError(400, f"malformed request target {_quote(target)}")
        method, target, major, minor = match.groups()
        if major != b"1":
            raise HTTPRequestError(505, f"HTTP/{major.decode()}.{minor.decode()} is not supported")
        self._method = method.decode("ascii")
        self._target = target.decode("ascii")
        self._version = (1, int(minor))
        first = target[:1]
        if self._method == "CONNECT":
            if first == b"/" or target == b"*":
                raise HTTPRequestError(400, "CONNECT needs an authority-form target (host:port)")
        elif target == b"*":
            if self._method != "OPTIONS":
                raise HTTPRequestError(
                    400, f"the asterisk target is for OPTIONS, not {self._method}"
                )
        elif first != b"/" and not _ABSOLUTE_FORM.match(target):
            raise HTTPRequestError(
                400, f"request target {_quote(target)} is neither a path nor an absolute URI"
            )

    def _field(self, line: bytes, trailers: bool) -> None:
        match = _FIELD.fullmatch(line)
        if match is None:
            if line[:1] in (b" ", b"\t"):
                raise HTTPRequestError(
                    400, "obs-fold (a field line starting with whitespace) is not accepted"
                )
            colon = line.find(b":")
            if colon < 0:
                raise HTTPRequestError(400, f"field line without a colon: {_quote(line)}")
            raw = line[:colon]
            if raw and raw[-1:] in (b" ", b"\t"):
                raise HTTPRequestError(
                    400, f"whitespace between field name and colon: {_quote(raw)}"
                )
            if not _TOKEN.fullmatch(raw):
                raise HTTPRequestError(400, f"malformed field name {_quote(raw)}")
            raise HTTPRequestError(
                400, f"control character in the value of field {_quote(raw.decode('latin-1'))}"
            )
        if len(self._fields) >= self.max_header_count:
            what = "trailer" if trailers else "header"
            raise HTTPRequestError(431, f"more than {self.max_header_count} {what} fields")
        name = match.group(1).lower().decode("ascii")
        value = match.group(2).strip(b" \t").decode("latin-1")
        self._fields.append((name, value))
        if not trailers and name in _NOTED:
            self._noted.setdefault(name, []).append(value)

    def _finish_head(self) -> None:
        version = self._version
        noted = self._noted
        content_length: int | None = 0
        chunked = False
        encodings = noted.get("transfer-encoding")
        lengths = noted.get("content-length")
        if encodings is not None:
            if version < (1, 1):
                raise HTTPRequestError(400, "Transfer-Encoding in an HTTP/1.0 request")
            if lengths is not None:
                raise HTTPRequestError(400, "both Content-Length and Transfer-Encoding")
            codings = [c.strip(" \t").lower() for v in encodings for c in v.split(",")]
            codings = [c for c in codings if c]
            if not codings or codings[-1] != "chunked":
                raise HTTPRequestError(
                    400, f"chunked is not the final transfer coding: {_quote(', '.join(encodings))}"
                )
            if "chunked" in codings[:-1]:
                raise HTTPRequestError(400, "chunked transfer coding applied twice")
            if len(codings) > 1:
                raise HTTPRequestError(
                    501, f"transfer coding {_quote(codings[0])} is not supported"
                )
            chunked = True
            content_length = None
        elif lengths is not None:
            values = {e.strip(" \t") for v in lengths for e in v.split(",")}
            for value in sorted(values):
                if not _DIGITS.fullmatch(value):
                    raise HTTPRequestError(400, f"malformed Content-Length {_quote(value)}")
            significant = {value.lstrip("0") or "0" for value in values}
            if len(significant) > 1:
                shown = ", ".join(sorted(values))
                raise HTTPRequestError(400, f"differing Content-Length values: {_quote(shown)}")
            (value,) = significant
            if len(value) > _MAX_LENGTH_DIGITS:
                raise HTTPRequestError(413, f"Content-Length of {len(value)} digits is too large")
            content_length = int(value)
            if self.max_body_size is not None and content_length > self.max_body_size:
                raise HTTPRequestError(
                    413,
                    f"Content-Length {content_length} exceeds the limit of"
                    f" {self.max_body_size} bytes",
                )
        hosts = noted.get("host", [])
        if len(hosts) > 1:
            raise HTTPRequestError(400, "more than one Host field")
        if not hosts and version >= (1, 1):
            raise HTTPRequestError(400, "HTTP/1.1 request without a Host field")
        if hosts and not _HOST.fullmatch(hosts[0]):
            raise HTTPRequestError(400, f"malformed Host {_quote(hosts[0])}")
        options = {
            o.strip(" \t").lower() for v in noted.get("connection", ()) for o in v.split(",")
        }
        if version >= (1, 1):
            keep_alive = "close" not in options
        else:
            keep_alive = "keep-alive" in options and "close" not in options
        expect_continue = version >= (1, 1) and any(
            e.strip(" \t").lower() == "100-continue"
            for v in noted.get("expect", ())
            for e in v.split(",")
        )
        self._request = Request(
            method=self._method,
            target=self._target,
            http_version=version,
            headers=tuple(self._fields),
            keep_alive=keep_alive,
            expect_continue=expect_continue,
            content_length=content_length,
            chunked=chunked,
        )
        self._events.append(self._request)
        self._fields = []
        if chunked:
            self._state = _State.CHUNK_LINE
        elif content_length:
            self._state = _State.BODY
            self._remaining = content_length
        else:
            self._end(())

    def _chunk_line(self, line: bytes) -> None:
        match = _CHUNK_LINE.fullmatch(line)
        if match is None:
            raise HTTPRequestError(400, f"malformed chunk-size line {_quote(line)}")
        digits, extensions = match.groups()
        significant = digits.lstrip(b"0")
        if len(significant) > _MAX_CHUNK_HEX_DIGITS:
            raise HTTPRequestError(413, f"chunk size of {len(significant)} hex digits is too large")
        self._extension_bytes += len(extensions)
        if self._extension_bytes > self.max_head_size:
            raise HTTPRequestError(
                400, f"chunk extensions exceed {self.max_head_size} bytes in total"
            )
        size = int(digits, 16)
        self._body_size += size
        if self.max_body_size is not None and self._body_size > self.max_body_size:
            raise HTTPRequestError(
                413, f"chunked body exceeds the limit of {self.max_body_size} bytes"
            )
        if size:
            self._state = _State.CHUNK_DATA
            self._remaining = size
        else:
            self._state = _State.TRAILERS
            self._head_used = 0

    def _end(self, trailers: tuple[tuple[str, str], ...]) -> None:
        self._events.append(EndOfMessage(trailers))
        self._state = _State.DONE
