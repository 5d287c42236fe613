# TLS for any stream server: a mix-in that turns each accepted connection into an
# ssl.SSLSocket before the handler sees it. Owns the server context (building it from
# certificate paths, swapping it on reload), the handshake and its deadline, the
# orderly TLS close, and the one place that decides what a failed handshake means.
#
# Strategy. The handshake is a preamble stage of the connection pipeline (TLSHandshake),
# driven without blocking: while it waits for the client's next flight the connection
# is a descriptor in the serving loop's epoll set and holds no thread, so 200 clients
# stalled mid-ClientHello cost 200 descriptors, not 200 workers. Its steps -- where the
# crypto happens: the key exchange and the certificate signature -- run on a pool thread
# (Stage.offload), never on the loop, so a burst of handshakes cannot stall accepting
# (gevent's lesson: handshake in the spawned worker, not the accept loop). On servers
# without the pipeline (ThreadingMixIn, ForkingMixIn) the same stage runs in the worker
# before the handler, waiting with select(), bounded by handshake_timeout in total.
#
# A failed handshake (plaintext, a stall, a rejected certificate, no common protocol)
# is the peer's doing: it is logged once with the client address and a precise reason
# by handle_tls_error(), the connection is closed, the handler never runs, and
# handle_error() -- which reports *our* bugs -- is not called.
#
# The server context is one object in a slot. A handshake reads the slot once, so
# reload_tls() swaps contexts atomically: connections already made keep the context
# they were made with, new handshakes get the new one, and a reload that cannot load
# its files raises and leaves the slot untouched.
from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import re
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from typing import Any

from servekit.features.addresses import format_peer
from servekit.features.base import ServerFeature
from servekit.features.connection import Connection
from servekit.features.pipeline import Stage, StageError, Step
from servekit.features.tlssocket import adopt_context
from servekit.knobs import SettingError, knob, positive

__all__ = [
    "TLSConfigError",
    "TLSHandshake",
    "TLSInfo",
    "TLSMixIn",
    "close_tls",
    "describe_handshake_error",
    "peer_certificate",
    "server_context",
    "tls_info",
]

log = logging.getLogger("servekit.tls")

# TLS 1.0 and 1.1 were deprecated by RFC 8996 (2021): no AEAD ciphers, SHA-1 in the
# handshake. Every client of the last decade speaks 1.2. Python 3.10+ already defaults
# to this minimum; we set it explicitly so that it shows here and so a system
# openssl.cnf that lowers MinProtocol cannot weaken our servers.
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2

# A plaintext HTTP request on the TLS port gets this answer (as nginx does) instead of
# a bare reset, so "curl http://host:port" says what is wrong. After sending it we read
# and discard what the client still sends, for at most this long and this much: closing
# with unread input makes the kernel send RST, which can destroy the response before
# the client reads it (the "lingering close" of Apache and nginx). One second is ample
# for a request that was sent in one go; 64 KiB bounds the work a client can make us do.
PLAINTEXT_HTTP_RESPONSE_BODY = b"This port expects TLS: retry with https://\n"
PLAINTEXT_HTTP_RESPONSE = (
    b"HTTP/1.1 400 Bad Request\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: %d\r\n"
    b"Connection: close\r\n"
    b"\r\n%s" % (len(PLAINTEXT_HTTP_RESPONSE_BODY), PLAINTEXT_HTTP_RESPONSE_BODY)
)
PLAINTEXT_LINGER_SECONDS = 1.0
PLAINTEXT_LINGER_BYTES = 64 * 1024

StrPath = str | os.PathLike[str]

# ALPN protocol names are 1 to 255 bytes (RFC 7301, section 3.1).
_ALPN_MAX = 255


class TLSConfigError(SettingError):
    """TLS cannot be set up as configured.

    A missing or unreadable certificate or key, conflicting settings, or a socket type
    TLS does not apply to. The message names the setting and the problem.
    """


# -- the server context ---------------------------------------------------------------


def _refuse_key_password() -> str:
    # Without a callback OpenSSL would prompt for the passphrase on the terminal and
    # block the server (or a reload) forever.
    raise TLSConfigError(
        "the private key is encrypted; decrypt it, or build an ssl.SSLContext with "
        "load_cert_chain(password=...) and pass it as ssl_context"
    )


def _load_error(what: str, exc: Exception) -> str:
    if isinstance(exc, TLSConfigError):
        return str(exc)
    if isinstance(exc, ssl.SSLError):
        if exc.reason == "KEY_VALUES_MISMATCH":
            return "the private key does not belong to the certificate"
        detail = exc.reason or re.sub(r" \(_ssl\.c:\d+\)$", "", str(exc.args[-1]))
        return f"not a usable PEM {what} ({detail})"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)


def server_context(
    certfile: StrPath,
    keyfile: StrPath | None = None,
    *,
    client_ca: StrPath | None = None,
    require_client_cert: bool = True,
    alpn_protocols: Sequence[str] = (),
) -> ssl.SSLContext:
    """Build the server context TLSMixIn uses when it is given paths.

    TLS 1.2 or later, Python's default cipher list (forward secrecy only, no SHA-1 or
    RC4), no renegotiation. certfile may hold the key too (keyfile None). With client_ca,
    clients are asked for a certificate signed by a CA in that bundle, and only those
    CAs are trusted for it (never the system store); require_client_cert refuses clients
    that send none. Raises TLSConfigError naming the file and the problem.

    Start from this to adjust a setting, then pass the result as ssl_context.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_VERSION
    # Client-initiated renegotiation lets one client make the server repeat its most
    # expensive step at will (CVE-2011-1473); TLS 1.3 has no renegotiation at all.
    context.options |= ssl.OP_NO_RENEGOTIATION
    try:
        context.load_cert_chain(certfile, keyfile, password=_refuse_key_password)
    except (OSError, TLSConfigError) as exc:
        files = f"certfile={certfile!r}" + (f" keyfile={keyfile!r}" if keyfile else "")
        raise TLSConfigError(
            f"cannot load {files}: {_load_error('certificate and key', exc)}"
        ) from exc
    if client_ca is not None:
        try:
            context.load_verify_locations(cafile=client_ca)
        except OSError as exc:
            raise TLSConfigError(
                f"cannot load client_ca={client_ca!r}: {_load_error('CA bundle', exc)}"
            ) from exc
        context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    if alpn_protocols:
        context.set_alpn_protocols(list(alpn_protocols))
    return context


class _ContextSlot:
    """The context new handshakes use.

    Readers take ``current`` without the lock (one attribute read is atomic); reloads
    hold it, so that two at once cannot interleave and the last one called wins.
    """

    __slots__ = ("current", "lock")

    def __init__(self, context: ssl.SSLContext) -> None:
        self.current = context
        self.lock = threading.Lock()


# -- knob parsers and checks ----------------------------------------------------------


def python_only(text: str) -> ssl.SSLContext | None:
    raise ValueError("an SSLContext can only be passed from Python; use certfile and keyfile")


def _check_context(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, ssl.SSLContext):
        return f"must be an ssl.SSLContext, not {type(value).__name__}"
    if value.protocol is ssl.PROTOCOL_TLS_CLIENT:
        # Every handshake would fail with a confusing error; say it once, here.
        return "is a client context (PROTOCOL_TLS_CLIENT); create it with PROTOCOL_TLS_SERVER"
    return None


def path(text: str) -> str | None:
    return text or None


def comma_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _check_alpn(value: Sequence[str]) -> str | None:
    if isinstance(value, str):
        return "must be a sequence of protocol names, not one string"
    for name in value:
        if not 1 <= len(name.encode()) <= _ALPN_MAX:
            return f"protocol name {name!r} must be 1 to {_ALPN_MAX} bytes (RFC 7301)"
    return None


# -- failed handshakes ----------------------------------------------------------------

_NOT_TLS = frozenset({"WRONG_VERSION_NUMBER", "UNKNOWN_PROTOCOL", "PACKET_LENGTH_TOO_LONG"})
_NO_COMMON_VERSION = frozenset(
    {"UNSUPPORTED_PROTOCOL", "NO_PROTOCOLS_AVAILABLE", "TLSV1_ALERT_PROTOCOL_VERSION"}
)
# Alerts with which a client says it does not accept *our* certificate. Unlike the rest,
# these usually mean our configuration is wrong (expired certificate, missing
# intermediate, wrong name), so they are logged as warnings.
_REJECTED_OUR_CERTIFICATE = frozenset(
    {
        "TLSV1_ALERT_UNKNOWN_CA",
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_EXPIRED",
        "SSLV3_ALERT_CERTIFICATE_REVOKED",
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
        "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
        "TLSV1_ALERT_DECRYPT_ERROR",
    }
)
_ALERT_PREFIXES = ("SSLV3_ALERT_", "TLSV1_ALERT_", "TLSV13_ALERT_")


def _alert_name(reason: str) -> str:
    for prefix in _ALERT_PREFIXES:
        if reason.startswith(prefix):
            return reason.removeprefix(prefix).lower().replace("_", " ")
    return reason


def describe_handshake_error(
    exc: BaseException, *, timeout: float | None = None
) -> tuple[int, str]:
    """The log level and a one-line reason for a failed server-side handshake.

    Every failure is the peer's doing or a mismatch between the two sides, so none is
    an error of ours: INFO, except a client rejecting our certificate (WARNING, since
    that usually means our certificate is expired, incomplete or for another name).
    timeout is the handshake deadline, quoted when the handshake timed out.
    """
    if isinstance(exc, TimeoutError):  # socket.timeout is TimeoutError
        within = f" within {timeout:g}s" if timeout is not None else " in time"
        return logging.INFO, f"handshake not completed{within}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return logging.INFO, f"client certificate rejected: {exc.verify_message}"
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return logging.INFO, "client closed the connection during the handshake"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or ""
        if reason == "HTTP_REQUEST":
            return logging.INFO, "plaintext HTTP request on the TLS port"
        if reason == "HTTPS_PROXY_REQUEST":
            return logging.INFO, "plaintext HTTP CONNECT (proxy) request on the TLS port"
        if reason in _NOT_TLS:
            return (
                logging.INFO,
                "client did not start a TLS handshake (plaintext or another protocol)",
            )
        if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            return logging.INFO, "client sent no certificate and one is required"
        if reason in _NO_COMMON_VERSION:
            return logging.INFO, f"no TLS version in common ({reason.lower()})"
        if reason == "NO_SHARED_CIPHER":
            return logging.INFO, "no cipher suite in common"
        if reason in _REJECTED_OUR_CERTIFICATE:
            return (
                logging.WARNING,
                f"client rejected the server certificate ({_alert_name(reason)})",
            )
        if reason.startswith(_ALERT_PREFIXES):
            return logging.INFO, f"client aborted the handshake (alert: {_alert_name(reason)})"
        return logging.INFO, f"handshake failed: {reason or exc}"
    if isinstance(exc, (ConnectionResetError, ConnectionAbortedError)):
        return logging.INFO, "client reset the connection during the handshake"
    if isinstance(exc, OSError) and exc.errno == errno.ENOTCONN:
        return logging.INFO, "client disconnected before the handshake"
    return logging.INFO, f"handshake failed: {exc}"


# -- the orderly close ----------------------------------------------------------------


def close_tls(tls: ssl.SSLSocket) -> None:
    """Close a server-side TLS connection the way TCPServer.shutdown_request closes TCP.

    TLS's half-close is the close_notify alert: without it a client cannot tell our
    end of the response from a truncation attack (Python clients raise SSLEOFError).
    So: send close_notify, then shutdown(SHUT_WR) so the FIN follows the data already
    queued, then close. We do not wait for the client's close_notify (RFC 8446,
    section 6.1 allows it), so a client that never answers cannot hold the worker.
    """
    if tls.fileno() == -1:
        return  # the handler closed or detached it
    try:
        # Non-blocking, OpenSSL writes our close_notify and then stops with
        # SSLWantReadError where it would wait for the peer's.
        tls.setblocking(False)
        tls.unwrap()
    except (OSError, ValueError):
        # SSLWantReadError: as planned. Other SSLErrors: the client sent data after our
        # alert, or the connection was already broken. ValueError: the handler unwrapped
        # or shut it down itself. In every case nothing more is owed to the peer.
        pass
    with contextlib.suppress(OSError):  # the peer may already have gone
        tls.shutdown(socket.SHUT_WR)
    tls.close()


def _answer_plaintext_http(tls: ssl.SSLSocket, server: Any = None) -> None:
    """Answer a plaintext HTTP request with the 400, then close after a lingering read.

    Closing a socket with the client's request unread sends a reset, which can destroy
    the 400 before the client reads it; so the rest of what the client sends is read and
    dropped until it closes, for PLAINTEXT_LINGER_SECONDS (or BYTES) at most, as Apache's
    lingering close does. With server (a pool server's loop), that wait is the loop's, so
    no pool thread is held by a client that never closes; without, it is this thread's.
    """
    # The connection failed as TLS but is a working TCP socket: take its descriptor
    # back from the SSLSocket and answer in the client's own protocol.
    sock = socket.socket(fileno=tls.detach())
    try:
        sock.settimeout(PLAINTEXT_LINGER_SECONDS)
        sock.sendall(PLAINTEXT_HTTP_RESPONSE)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        sock.close()  # the client left; the reply was a courtesy
        return
    if server is None:
        with sock:
            _linger(sock, time.monotonic() + PLAINTEXT_LINGER_SECONDS)
    else:
        server.call_soon_threadsafe(_LoopLinger(server, sock).start)


def _linger(sock: socket.socket, deadline: float) -> None:
    drained = 0
    try:
        while drained < PLAINTEXT_LINGER_BYTES:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            sock.settimeout(remaining)
            chunk = sock.recv(4096)
            if not chunk:
                break
            drained += len(chunk)
    except OSError:
        pass  # the client left


def _has_pipeline(server: Any) -> bool:
    # A pool server (servekit.features.pool) runs its connections from its loop; any
    # other keeps a thread per connection, where waiting is what the thread is for.
    return getattr(server, "pipeline", None) is not None


class _LoopLinger:
    """A lingering close run by the server's loop: readable -> read and drop; EOF, the
    byte limit or the deadline -> close. Every method runs on the loop's thread."""

    def __init__(self, server: Any, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.drained = 0
        self.timer: Any = None

    def start(self) -> None:
        self.sock.setblocking(False)
        self.server.watch(self.sock, self.readable)
        self.timer = self.server.call_at(time.monotonic() + PLAINTEXT_LINGER_SECONDS, self.close)

    def readable(self) -> None:
        try:
            while self.drained < PLAINTEXT_LINGER_BYTES:
                chunk = self.sock.recv(4096)
                if not chunk:
                    break
                self.drained += len(chunk)
        except BlockingIOError:
            return  # all read for now: wait for more, or EOF
        except OSError:
            pass  # the client left
        self.close()

    def close(self) -> None:
        if self.sock.fileno() == -1:
            return
        if self.timer is not None:
            self.timer.cancel()
        self.server.unwatch(self.sock)
        self.sock.close()


# -- what a handler sees --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TLSInfo:
    """The negotiated parameters of one TLS connection, as a handler sees them."""

    #: "TLSv1.3", "TLSv1.2".
    version: str | None
    #: The cipher suite's OpenSSL name, e.g. "TLS_AES_256_GCM_SHA384".
    cipher: str | None
    #: The protocol chosen by ALPN, or None when either side offered none.
    alpn_protocol: str | None
    #: The client certificate as ssl.SSLSocket.getpeercert() decodes it. None when the
    #: client sent none; only verified certificates are decoded, so this is None
    #: unless client_ca is set.
    peer_certificate: dict[str, Any] | None
    #: The client certificate in DER form, verified or not; None when it sent none.
    peer_certificate_der: bytes | None

    @property
    def peer_subject(self) -> dict[str, str]:
        """The client certificate's subject as a flat dict, e.g. {"commonName": "alice"}.

        Empty when there is no verified certificate. Where a name has several values
        (rare: two OU entries) the last one wins; read peer_certificate for all of them.
        """
        if not self.peer_certificate:
            return {}
        return {
            key: value for rdn in self.peer_certificate.get("subject", ()) for key, value in rdn
        }


def _connection_of(handler_or_sock: Any) -> Any:
    if isinstance(handler_or_sock, socket.socket):
        return handler_or_sock
    return getattr(handler_or_sock, "request", None)


def tls_info(handler_or_sock: Any) -> TLSInfo | None:
    """TLS details of a handler's connection (or of a socket); None if it is not TLS.

    Call it with ``self`` from a handler's handle(), or with ``self.request``.
    """
    sock = _connection_of(handler_or_sock)
    if not isinstance(sock, ssl.SSLSocket):
        return None
    cipher = sock.cipher()
    return TLSInfo(
        version=sock.version(),
        cipher=cipher[0] if cipher else None,
        alpn_protocol=sock.selected_alpn_protocol(),
        peer_certificate=sock.getpeercert() or None,
        peer_certificate_der=sock.getpeercert(binary_form=True),
    )


def peer_certificate(handler_or_sock: Any) -> dict[str, Any] | None:
    """The verified client certificate of a handler's connection, decoded; else None."""
    info = tls_info(handler_or_sock)
    return info.peer_certificate if info is not None else None


# -- the mix-in -----------------------------------------------------------------------


class TLSHandshake(Stage):
    """The TLS handshake as a pipeline stage: non-blocking, its steps on a pool thread."""

    name = "tls"
    offload = True

    def __init__(self, server: TLSMixIn) -> None:
        self.server = server

    def timeout(self) -> float:
        return self.server.handshake_timeout

    def timeout_reason(self) -> str:
        return f"handshake not completed within {self.server.handshake_timeout:g}s"

    def expired(self, connection: Connection) -> StageError:
        return StageError(self.timeout_reason(), cause=TimeoutError())

    def step(self, connection: Connection) -> Step:
        tls = connection.tls
        if tls is None:
            raw = connection.request
            try:
                # A client that connected and reset at once (port scanners do) is gone
                # before we start. Checking here matters: ssl's wrap_socket() detaches
                # the descriptor first and then, on this error, raises without closing it.
                raw.getpeername()
                context = self.server.tls_context  # once: a reload cannot change it under us
                tls = context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
            except OSError as exc:
                raise StageError(str(exc), cause=exc) from exc
            connection.tls = tls
            connection.request = tls
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            return Step.READ
        except ssl.SSLWantWriteError:
            return Step.WRITE
        except OSError as exc:
            raise StageError(str(exc), cause=exc) from exc
        return Step.DONE

    def fail(self, connection: Connection, error: StageError) -> None:
        exc = error.cause if error.cause is not None else error
        request = connection.request
        try:
            self.server.handle_tls_error(request, connection.client_address, exc)
        finally:
            if isinstance(request, ssl.SSLSocket) and request.fileno() != -1:
                if self.server.plaintext_http_reply and _is_plaintext_http(exc):
                    request.settimeout(None)
                    # On a pool server the lingering close is the loop's (no thread).
                    loop = self.server if _has_pipeline(self.server) else None
                    _answer_plaintext_http(request, loop)  # detaches the descriptor
                else:
                    request.close()  # OpenSSL has already sent whatever alert applies


class TLSMixIn(ServerFeature):
    """Serve every connection over TLS; composes with any stream server.

    Any concurrency mix-in works with it; by convention TLSMixIn comes first::

        class Server(TLSMixIn, ThreadingMixIn, TCPServer): ...
        Server(("", 8443), Handler, certfile="cert.pem", keyfile="key.pem")

    The handshake is a stage of the connection pipeline (in the loop without a thread
    while it waits for the client, its crypto on a pool thread), bounded by
    handshake_timeout; without the pipeline it runs in the worker before the handler.
    Handlers get the ssl.SSLSocket as self.request (rfile and wfile work over it);
    tls_info(self) gives the version, cipher and client certificate. reload_tls() swaps
    the certificate without a restart.

    Methods that may be overridden: handle_tls_error(). Datagram servers are refused
    at construction: DTLS is out of scope.
    """

    feature_rank = 40

    ssl_context: ssl.SSLContext | None = knob(
        None,
        "a ready server context (PROTOCOL_TLS_SERVER); the path settings must then be unset",
        flag="",
        parse=python_only,
        check=_check_context,
        section="tls",
    )
    certfile: str | None = knob(
        None,
        "PEM certificate chain, leaf first (may also hold the key)",
        parse=path,
        section="tls",
    )
    keyfile: str | None = knob(
        None,
        "PEM private key, unencrypted (default: read it from certfile)",
        parse=path,
        section="tls",
    )
    client_ca: str | None = knob(
        None,
        "PEM bundle of the CAs whose client certificates are accepted; "
        "when set, clients are asked for a certificate (mutual TLS)",
        parse=path,
        section="tls",
    )
    require_client_cert: bool = knob(
        # Configuring a CA for clients almost always means "authenticate them", so
        # refusing clients without a certificate is the default; optional is the opt-in.
        True,
        "with client_ca: refuse clients without a certificate (false: ask, but allow)",
        section="tls",
    )
    handshake_timeout: float = knob(
        # TCP's initial retransmission timeout is 1 s (RFC 6298), so a two-round-trip
        # handshake that loses a packet or two on a bad mobile link still completes in
        # a few seconds; 10 s covers that, while a client that connects and sends
        # nothing holds a worker for 10 s at most. Node.js allows 120 s, but there a
        # pending handshake costs no thread; here it costs a worker.
        10.0,
        "seconds a client has to complete the TLS handshake, in total",
        flag="--tls-handshake-timeout",
        check=positive,
        section="tls",
    )
    alpn_protocols: tuple[str, ...] = knob(
        (),
        "ALPN protocol names the server accepts, in order of preference (e.g. h2,http/1.1)",
        parse=comma_list,
        check=_check_alpn,
        section="tls",
    )
    plaintext_http_reply: bool = knob(
        True,
        "answer a plaintext HTTP request on the TLS port with 400 and a one-line "
        "explanation instead of a bare reset",
        section="tls",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Constructor. May be extended, do not override.

        Raises TLSConfigError for a datagram server, conflicting settings, or files
        that cannot be loaded; the listening socket is closed again in that case.
        """
        socket_type = getattr(self, "socket_type", socket.SOCK_STREAM)
        if socket_type != socket.SOCK_STREAM:
            raise TLSConfigError(
                f"{type(self).__name__}: TLS needs a stream socket, and this is a "
                "datagram server; DTLS is out of scope for servekit"
            )
        super().__init__(*args, **kwargs)
        try:
            # Handlers get a TLSConnectionSocket: the request wait can read ahead.
            self._tls_slot = _ContextSlot(adopt_context(self._initial_tls_context()))
        except BaseException:
            self.server_close()
            raise

    def _initial_tls_context(self) -> ssl.SSLContext:
        if self.ssl_context is not None:
            problem = _check_context(self.ssl_context)
            if problem:  # set as a class attribute, so Configurable did not check it
                raise TLSConfigError(f"ssl_context {problem}")
            conflicting = [
                name
                for name in ("certfile", "keyfile", "client_ca", "alpn_protocols")
                if getattr(self, name)
            ]
            if conflicting:
                raise TLSConfigError(
                    f"ssl_context is set, so {', '.join(conflicting)} would be ignored; "
                    "configure those on the context, or give paths instead of a context"
                )
            return self.ssl_context
        if self.keyfile is not None and self.certfile is None:
            raise TLSConfigError("keyfile is set without certfile")
        if self.certfile is None:
            raise TLSConfigError(
                f"{type(self).__name__} needs a certificate: "
                "pass certfile= (and keyfile=) or ssl_context="
            )
        return self._context_from_paths()

    def _context_from_paths(self) -> ssl.SSLContext:
        assert self.certfile is not None
        return server_context(
            self.certfile,
            self.keyfile,
            client_ca=self.client_ca,
            require_client_cert=self.require_client_cert,
            alpn_protocols=self.alpn_protocols,
        )

    @property
    def tls_context(self) -> ssl.SSLContext:
        """The context the next handshake will use (read-only; see reload_tls())."""
        return self._tls_slot.current

    def reload_tls(self, context: ssl.SSLContext | None = None) -> ssl.SSLContext:
        """Swap the context new handshakes use; return the new one. Thread-safe.

        With no argument, rebuild it from certfile, keyfile and client_ca, re-reading
        the files (to rotate certificates, replace the files, then call this). If they
        cannot be loaded, raise TLSConfigError and keep serving with the current
        context. Connections already made keep the context they were made with.

        It reads files, so do not call it from a signal handler: queue the signal and
        call it from the serving loop (service_actions()) or another thread.
        """
        slot = self._tls_slot
        with slot.lock:
            if context is None:
                if self.certfile is None:
                    raise TLSConfigError(
                        "reload_tls() rebuilds from certfile, which is not set (this "
                        "server was given ssl_context); pass the new context instead"
                    )
                context = self._context_from_paths()
                source = f"certfile={self.certfile!r}"
            else:
                problem = _check_context(context)
                if problem:
                    raise TLSConfigError(f"reload_tls(context): {problem}")
                source = "a new ssl_context"
            slot.current = adopt_context(context)
        log.info("TLS context reloaded from %s; new connections use it", source)
        return context

    # -- the request hooks ---------------------------------------------------------------

    def connection_stages(self) -> list[Stage]:
        # Before the stages of the mix-ins after us (none wait before TLS), after those
        # before us (the PROXY header comes in clear, before the handshake).
        return [TLSHandshake(self), *super().connection_stages()]

    def shutdown_request(self, request: Any) -> None:
        """Close a TLS connection with close_notify (see close_tls()), then as usual."""
        if isinstance(request, ssl.SSLSocket):
            close_tls(request)
        super().shutdown_request(request)

    def handle_tls_error(self, request: Any, client_address: Any, exc: BaseException) -> None:
        """Report a failed handshake: one log line with the client and the reason.

        Called instead of handle_error(), which reports errors of the handler: on a
        pool thread, or on the loop's thread for a handshake that timed out. The
        connection is closed after it returns. May be overridden (to count
        failures, or to log them differently); describe_handshake_error() gives the
        level and reason used here.
        """
        level, reason = describe_handshake_error(exc, timeout=self.handshake_timeout)
        log.log(level, "TLS handshake with %s failed: %s", format_peer(client_address), reason)


def _is_plaintext_http(exc: BaseException) -> bool:
    return isinstance(exc, ssl.SSLError) and exc.reason in ("HTTP_REQUEST", "HTTPS_PROXY_REQUEST")
