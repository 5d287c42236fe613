# PROXY protocol for servers behind a load balancer (HAProxy, nginx, cloud balancers):
# a mix-in that reads the header the proxy puts before the client's bytes and gives the
# handler the client's real address. Owns the trusted-network check, the deadline for
# the header, taking exactly the header off a connection or a datagram, the address
# objects a handler sees, and the one place that decides what a missing or bad header
# means. Parsing belongs to servekit.protocols.proxy_header (sans-IO); this module does the I/O.
#
# Strategy.
#   * Trust is checked in verify_request(), on the loop thread, before any worker is
#     involved. It needs only the address accept() or recvfrom() returned: one
#     ipaddress parse and a membership test per network, a few microseconds. A peer
#     outside proxy_trusted therefore never occupies a pool thread, not even for
#     proxy_header_timeout, which matters because such peers are the ones that may be
#     hostile.
#   * A stream's header is read by a preamble stage of the connection pipeline
#     (ProxyHeaderStage), in the serving loop, without blocking: a proxy (or anyone in
#     proxy_trusted) that connects and stalls mid-header costs a descriptor, not a
#     thread, for at most proxy_header_timeout. Parsing a header is microseconds of
#     work, so it stays on the loop. Without the pipeline (ThreadingMixIn, ForkingMixIn)
#     the same stage runs on the worker before the handler, waiting with select().
#   * Stream reading. Peek (MSG_PEEK) and parse what is queued. Normally the whole
#     header arrived in the proxy's first segment: one peek, then recv() of exactly
#     header.length bytes, and the handler's first read starts at the client's first
#     byte (a TLS ClientHello included). When the header is incomplete, every byte peeked
#     belongs to it (parse() returns NeedData only for a strict prefix of a header), so
#     they are taken off the socket before waiting again: a peek returns at once while
#     unread bytes are queued, so peeking again without that would spin, while with the
#     queue emptied the next peek blocks until new bytes arrive. Each round takes at
#     least one byte or ends, so the loop is bounded by the header size limit, and one
#     deadline covers the whole header however it trickles in.
#   * Datagrams. Each starts with a v2 header (the specification allows v1 on TCP only);
#     it is parsed and cut off, and the handler gets the payload. client_address stays
#     the proxy's address, carrying the header: DatagramRequestHandler answers with
#     sendto(client_address), and a reply must go back through the proxy, which alone
#     knows which client it belongs to (and the client may not even be routable from
#     here).
#   * A missing, malformed, slow or truncated header, and a peer outside the trusted
#     networks, are the peer's doing: handle_proxy_error() logs one line naming the peer
#     and the precise reason, the connection is closed (the datagram dropped), the
#     handler never runs, and handle_error(), which reports our own bugs, is not called.
from __future__ import annotations

import ipaddress
import logging
import socket
import time
from collections.abc import Iterable, Sequence
from typing import Any, Final, TypeAlias

from servekit.features.addresses import format_peer
from servekit.features.base import ServerFeature
from servekit.features.connection import Connection
from servekit.features.pipeline import Stage, StageError, Step
from servekit.knobs import SettingError, knob, positive
from servekit.protocols.proxy_header import (
    V1_MAX_LENGTH,
    V2_HEADER_LENGTH,
    V2_MAX_LENGTH,
    NeedData,
    ProxyHeader,
    ProxyProtocolError,
    parse,
)

__all__ = [
    "DEFAULT_HEADER_TIMEOUT",
    "DEFAULT_MAX_V2_LENGTH",
    "DEFAULT_TRUSTED",
    "ProxiedAddress",
    "ProxiedBytesPath",
    "ProxiedPath",
    "ProxyConfigError",
    "ProxyHeaderError",
    "ProxyHeaderStage",
    "ProxyProtocolMixIn",
    "client_address_for",
    "is_trusted",
    "parse_networks",
    "proxy_header",
    "proxy_peer",
    "read_header",
]

log = logging.getLogger("servekit.proxy")

Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

# Whoever is trusted can claim any client address, defeating every IP-based access
# rule, rate limit and log line behind it. So the default trusts only this host (the
# common sidecar HAProxy or nginx, and tests), as gunicorn's forwarded_allow_ips does
# ("127.0.0.1,::1"); a proxy on another host must be named, and until it is, its
# connections are refused with a log line naming its address: a misconfiguration fails
# closed and says so.
DEFAULT_TRUSTED: Final = "127.0.0.0/8,::1/128"

# HAProxy and nginx write the header as soon as their connection to us is established,
# before any client byte, so it arrives one round trip after accept(). 5 s leaves room
# for that segment to be lost and retransmitted twice (TCP's initial retransmission
# timeout is 1 s, then 2 s: RFC 6298), while a peer that connects and sends nothing
# holds a worker for 5 s at most. nginx's proxy_protocol_timeout defaults to 30 s, but
# there a pending connection costs no thread; here it costs a worker.
DEFAULT_HEADER_TIMEOUT: Final = 5.0

# HAProxy's own receiver peeks the header into one buffer, tune.bufsize, 16384 bytes by
# default, so no HAProxy can accept a longer header from another and no known sender
# writes one (a header with every SSL TLV is a few hundred bytes). The protocol allows
# 16 + 65535 = 65551; the cap bounds what one peer can make us buffer and parse.
DEFAULT_MAX_V2_LENGTH: Final = 16384

# proxy_protocol -> (accept v1, accept v2).
_VERSIONS: Final[dict[str, tuple[bool, bool]]] = {
    "v1": (True, False),
    "v2": (False, True),
    "any": (True, True),
}
# Transports whose source is an (ip, port) a handler can use as client_address.
_INET_TRANSPORTS: Final = frozenset({"TCP4", "TCP6", "UDP4", "UDP6"})
# Log lines quote at most this many bytes of a partial header: enough to recognise it.
_QUOTE_LIMIT: Final = 40


class ProxyConfigError(SettingError):
    """The PROXY protocol settings cannot work: the message names the setting and value."""


class ProxyHeaderError(StageError):
    """A peer did not deliver a PROXY header the server accepts.

    None at all, a malformed one, one too slow or cut short, or one from a peer outside
    the trusted networks. ``reason`` (also ``str(error)``) says which, quoting what
    arrived; ``level`` is the logging level the server reports it at. The underlying
    error, if any (ProxyProtocolError, TimeoutError, ConnectionResetError), is the
    ``__cause__``.
    """

    def __init__(self, reason: str, level: int = logging.INFO) -> None:
        super().__init__(reason, level)


# -- knob parsers and checks ----------------------------------------------------------


def _check_versions(value: object) -> str | None:
    if value not in _VERSIONS:
        return f"must be one of {', '.join(_VERSIONS)}"
    return None


def parse_networks(value: str | Iterable[str]) -> tuple[Network, ...]:
    """The networks of a proxy_trusted setting.

    ``value`` is a comma-separated string ("127.0.0.0/8,::1/128,10.0.0.0/8") or an
    iterable of such items; a bare address is a network of one. Raises ValueError that
    quotes the offending item, for anything but networks, for host bits set
    ("10.0.0.1/8", a typo for a network or for an address), and for an empty list,
    which would refuse every connection.
    """
    items = value.split(",") if isinstance(value, str) else list(value)
    networks: list[Network] = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"{item!r} is not a network written as a string")
        text = item.strip()
        if not text:
            continue
        try:
            networks.append(ipaddress.ip_network(text))
        except ValueError as exc:
            hint = ""
            try:
                loose = ipaddress.ip_network(text, strict=False)
            except ValueError:
                pass  # not a network at all; ipaddress's message says why
            else:
                hint = (
                    f" (the network is {loose}; for the one address write /{loose.max_prefixlen})"
                )
            raise ValueError(f"{text!r}: {exc}{hint}") from None
    if not networks:
        raise ValueError("names no network, so every connection would be refused")
    return tuple(networks)


def _check_trusted(value: object) -> str | None:
    if not isinstance(value, (str, Sequence)):
        return "must be a comma-separated string or a sequence of networks"
    try:
        parse_networks(value)
    except ValueError as exc:
        return str(exc)
    return None


def _check_max_v2_length(value: object) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return "must be an integer"
    if not V2_HEADER_LENGTH <= value <= V2_MAX_LENGTH:
        return f"must be in {V2_HEADER_LENGTH}..{V2_MAX_LENGTH} (16 + the 16-bit length field)"
    return None


# -- what a handler sees --------------------------------------------------------------


class _Proxied:
    """What every client_address of a proxied connection or datagram carries."""

    #: The whole header, TLVs included (ALPN, authority, unique id, SSL information).
    proxy_header: ProxyHeader
    #: The address accept() or recvfrom() returned: the proxy's own end.
    peer: Any


class ProxiedAddress(_Proxied, tuple[Any, ...]):
    """An IP client_address behind a proxy: a tuple, so ``host, port = ...`` still works.

    For a PROXY header of an inet family on a stream it is ``(ip, port)`` of the
    header's source, the real client (two items, IPv6 too: the header carries no flow
    info or scope). For LOCAL, UNKNOWN and Unix families, and for every datagram, it is
    the peer's own address, unchanged. Equal to the plain tuple; ``proxy_header`` and
    ``peer`` ride along.
    """

    def __new__(cls, address: Iterable[Any], header: ProxyHeader, peer: Any) -> ProxiedAddress:
        self = super().__new__(cls, address)
        self.proxy_header = header
        self.peer = peer
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (tuple(self), self.proxy_header, self.peer))


class ProxiedPath(_Proxied, str):
    """A Unix-socket client_address (a path, "" when unnamed) carrying the header."""

    def __new__(cls, address: str, header: ProxyHeader, peer: Any) -> ProxiedPath:
        self = super().__new__(cls, address)
        self.proxy_header = header
        self.peer = peer
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.proxy_header, self.peer))


class ProxiedBytesPath(_Proxied, bytes):
    """A Linux abstract Unix address (bytes starting with NUL) carrying the header."""

    def __new__(cls, address: bytes, header: ProxyHeader, peer: Any) -> ProxiedBytesPath:
        self = super().__new__(cls, address)
        self.proxy_header = header
        self.peer = peer
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (bytes(self), self.proxy_header, self.peer))


def _with_header(address: Any, header: ProxyHeader, peer: Any) -> Any:
    if isinstance(address, tuple):
        return ProxiedAddress(address, header, peer)
    if isinstance(address, str):
        return ProxiedPath(address, header, peer)
    if isinstance(address, bytes):
        return ProxiedBytesPath(address, header, peer)
    # An unbound Unix datagram sender has no address (None), and None takes no
    # attributes; it could not receive a reply either.
    return address


def client_address_for(header: ProxyHeader, peer: Any, *, stream: bool = True) -> Any:
    """The client_address a handler gets for this header from this peer.

    The header's source for a stream's PROXY command with an inet family; otherwise the
    peer's own address. Either way with ``proxy_header`` and ``peer`` attached.
    """
    source = header.source
    if (
        stream
        and header.command == "PROXY"
        and header.transport in _INET_TRANSPORTS
        and isinstance(source, tuple)
    ):
        return ProxiedAddress(source, header, peer)
    return _with_header(peer, header, peer)


def _address_of(handler_or_address: Any) -> Any:
    return getattr(handler_or_address, "client_address", handler_or_address)


def proxy_header(handler_or_address: Any) -> ProxyHeader | None:
    """The PROXY header of a handler's connection (or of a client_address); None when the
    server does not read PROXY headers. Call it with ``self`` from handle()."""
    header = getattr(_address_of(handler_or_address), "proxy_header", None)
    return header if isinstance(header, ProxyHeader) else None


def proxy_peer(handler_or_address: Any) -> Any:
    """The address of the connection's other end, i.e. the proxy's, as accept() returned
    it; the client_address itself when the server does not read PROXY headers."""
    address = _address_of(handler_or_address)
    return getattr(address, "peer", address)


# -- trust ----------------------------------------------------------------------------


def is_trusted(peer: Any, networks: Sequence[Network]) -> bool:
    """Whether a peer may send PROXY headers: its IP is in one of ``networks``.

    An IPv4-mapped IPv6 peer ("::ffff:10.1.2.3", an IPv4 client of a dual-stack
    listener) is matched as the IPv4 address it is. Unix-socket peers (a path, "" or
    None) are always trusted: the socket file's permissions already decide who may
    connect, and there is no address to match.
    """
    if not isinstance(peer, tuple):
        return True
    host = str(peer[0]).split("%", 1)[0]  # a link-local scope ("fe80::1%eth0")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


# -- reading a stream's header ---------------------------------------------------------


def _describe(address: Any) -> str:
    if address is None:
        return "the peer"  # read_header() called without naming it
    return format_peer(address)


def _quote(data: bytes) -> str:
    shown = repr(bytes(data[:_QUOTE_LIMIT]))
    return shown + ("..." if len(data) > _QUOTE_LIMIT else "")


class _StreamHeader:
    """One header being read off one connection, against one deadline."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        timeout: float,
        accept_v1: bool,
        accept_v2: bool,
        max_v2_length: int,
        peer: Any,
    ) -> None:
        self.sock = sock
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.accept_v1 = accept_v1
        self.accept_v2 = accept_v2
        self.max_v2_length = max_v2_length
        self.peer = peer
        # The most one header of an accepted version can take.
        self.limit = max(V1_MAX_LENGTH if accept_v1 else 0, max_v2_length if accept_v2 else 0)
        self.taken = b""  # header bytes already taken off the socket
        self.minimum = 0  # the parser's lower bound on the header's length

    def read(self) -> ProxyHeader:
        # Bounded: every round that does not return takes at least one byte, and a
        # header of an accepted version cannot be longer than limit (parse() raises
        # first), so there are at most limit rounds; the deadline bounds the time.
        while len(self.taken) < self.limit:
            peeked = self._recv(self.limit - len(self.taken), socket.MSG_PEEK)
            buffer = self.taken + peeked
            try:
                result = parse(
                    buffer,
                    accept_v1=self.accept_v1,
                    accept_v2=self.accept_v2,
                    max_v2_length=self.max_v2_length,
                )
            except ProxyProtocolError as exc:
                # From a trusted peer, so most likely a proxy not configured to send
                # the header (or the version) we expect: worth a warning.
                raise ProxyHeaderError(f"bad PROXY header: {exc}", logging.WARNING) from exc
            if isinstance(result, ProxyHeader):
                self._take(result.length - len(self.taken))
                return result
            self._take(len(peeked))
            self.taken = buffer
            self.minimum = result.minimum
            log.debug(
                "PROXY header from %s incomplete: %d of at least %d bytes so far; waiting",
                _describe(self.peer),
                len(self.taken),
                self.minimum,
            )
        raise AssertionError(  # pragma: no cover - parse() raises before the limit
            f"parse() still wants more after {len(self.taken)} bytes, the limit"
        )

    def _take(self, count: int) -> None:
        """Consume ``count`` bytes that a peek has already shown to be queued."""
        got = 0
        while got < count:  # bounded: each recv() returns at least one byte or raises
            got += len(self._recv(count - got, 0))

    def _recv(self, size: int, flags: int) -> bytes:
        remaining = self.deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise TimeoutError
            self.sock.settimeout(remaining)
            data = self.sock.recv(size, flags)
        except TimeoutError as exc:
            raise self._failure("timeout") from exc
        except (ConnectionResetError, ConnectionAbortedError) as exc:
            raise self._failure("reset") from exc
        except OSError as exc:
            raise ProxyHeaderError(f"could not read the PROXY header: {exc}") from exc
        if not data:
            raise self._failure("closed")
        return data

    def _failure(self, how: str) -> ProxyHeaderError:
        return _failure(how, self.taken, self.minimum, self.timeout)


def _failure(how: str, taken: bytes, minimum: int, timeout: float) -> ProxyHeaderError:
    """The error for a header that timed out, or whose peer closed or reset, after
    ``taken`` bytes of a header of at least ``minimum``."""
    got = len(taken)
    if how == "timeout":
        if not got:
            return ProxyHeaderError(f"no PROXY header within {timeout:g}s")
        return ProxyHeaderError(
            f"PROXY header incomplete after {timeout:g}s: {got} of at least "
            f"{minimum} bytes arrived: {_quote(taken)}"
        )
    verb = "the peer reset the connection" if how == "reset" else "the peer closed it"
    if not got:
        # A plain TCP health check, or a client that gave up: nothing to act on.
        return ProxyHeaderError(f"{verb} before sending any byte", logging.DEBUG)
    return ProxyHeaderError(
        f"{verb} after {got} of at least {minimum} bytes of a PROXY header: {_quote(taken)}"
    )


def _minimum(taken: bytes, accept_v1: bool, accept_v2: bool, max_v2_length: int) -> int:
    try:
        result = parse(taken, accept_v1=accept_v1, accept_v2=accept_v2, max_v2_length=max_v2_length)
    except ProxyProtocolError:
        return len(taken)
    return result.minimum if isinstance(result, NeedData) else len(taken)


class ProxyHeaderStage(Stage):
    """The PROXY header as a pipeline stage: read in the loop, without blocking."""

    name = "proxy"

    def __init__(self, server: ProxyProtocolMixIn) -> None:
        self.server = server
        self.accept_v1, self.accept_v2 = server._proxy_accept
        self.max_v2_length = server.proxy_max_v2_length
        # The most one header of an accepted version can take.
        self.limit = max(
            V1_MAX_LENGTH if self.accept_v1 else 0,
            self.max_v2_length if self.accept_v2 else 0,
        )

    def timeout(self) -> float:
        return self.server.proxy_header_timeout

    def expired(self, connection: Connection) -> StageError:
        return self._failure(connection, "timeout")

    def _failure(self, connection: Connection, how: str) -> ProxyHeaderError:
        taken = connection.proxy_buffer
        minimum = _minimum(taken, self.accept_v1, self.accept_v2, self.max_v2_length)
        return _failure(how, taken, minimum, self.server.proxy_header_timeout)

    def step(self, connection: Connection) -> Step:
        # Bounded: each round that does not return takes at least one byte off the
        # socket, and parse() raises before a header grows past the limit.
        while len(connection.proxy_buffer) < self.limit:
            want = self.limit - len(connection.proxy_buffer)
            peeked = self._recv(connection, want, socket.MSG_PEEK)
            if peeked is None:
                return Step.READ
            buffer = connection.proxy_buffer + peeked
            try:
                result = parse(
                    buffer,
                    accept_v1=self.accept_v1,
                    accept_v2=self.accept_v2,
                    max_v2_length=self.max_v2_length,
                )
            except ProxyProtocolError as exc:
                # From a trusted peer, so most likely a proxy not configured to send
                # the header (or the version) we expect: worth a warning.
                raise ProxyHeaderError(f"bad PROXY header: {exc}", logging.WARNING) from exc
            if isinstance(result, ProxyHeader):
                self._take(connection, result.length - len(connection.proxy_buffer))
                connection.proxy_header = result
                connection.client_address = client_address_for(result, connection.peer)
                connection.proxy_buffer = b""
                return Step.DONE
            self._take(connection, len(peeked))
            connection.proxy_buffer = buffer
            log.debug(
                "PROXY header from %s incomplete: %d of at least %d bytes so far; waiting",
                _describe(connection.peer),
                len(buffer),
                result.minimum,
            )
        raise AssertionError(  # pragma: no cover - parse() raises before the limit
            f"parse() still wants more after {len(connection.proxy_buffer)} bytes"
        )

    def _take(self, connection: Connection, count: int) -> None:
        got = 0
        while got < count:  # bounded: the bytes were peeked, so each recv() returns some
            data = self._recv(connection, count - got, 0)
            if data is None:  # pragma: no cover - peeked bytes are always there
                raise ProxyHeaderError("PROXY header bytes vanished from the socket")
            got += len(data)

    def _recv(self, connection: Connection, size: int, flags: int) -> bytes | None:
        try:
            data: bytes = connection.request.recv(size, flags | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None
        except (ConnectionResetError, ConnectionAbortedError) as exc:
            raise self._failure(connection, "reset") from exc
        except OSError as exc:
            raise ProxyHeaderError(f"could not read the PROXY header: {exc}") from exc
        if not data:
            raise self._failure(connection, "closed")
        return data

    def fail(self, connection: Connection, error: StageError) -> None:
        if not isinstance(error, ProxyHeaderError):
            error = ProxyHeaderError(error.reason, error.level)
        self.server.handle_proxy_error(connection.request, connection.peer, error)


def read_header(
    sock: socket.socket,
    *,
    timeout: float = DEFAULT_HEADER_TIMEOUT,
    accept_v1: bool = True,
    accept_v2: bool = True,
    max_v2_length: int = DEFAULT_MAX_V2_LENGTH,
    peer: Any = None,
) -> ProxyHeader:
    """Read one PROXY header off a connected stream socket, and not one byte more.

    Waits at most ``timeout`` seconds for the whole header. Raises ProxyHeaderError,
    whose reason and level say what went wrong (the peer closed or reset first, the
    deadline passed, the bytes are not a header of an accepted version, or a v2 header
    is longer than ``max_v2_length``). The socket's own timeout is restored on return.
    ``peer`` names the other end in debug log lines only.
    """
    if not (accept_v1 or accept_v2):
        raise ValueError("read_header() with accept_v1=False and accept_v2=False accepts nothing")
    previous = sock.gettimeout()
    try:
        reader = _StreamHeader(
            sock,
            timeout=timeout,
            accept_v1=accept_v1,
            accept_v2=accept_v2,
            max_v2_length=max_v2_length,
            peer=peer,
        )
        return reader.read()
    finally:
        sock.settimeout(previous)


# -- the mix-in -----------------------------------------------------------------------


class ProxyProtocolMixIn(ServerFeature):
    """Read a PROXY protocol header (v1 or v2) before each connection or datagram.

    For servers behind HAProxy (``send-proxy``, ``send-proxy-v2``), nginx
    (``proxy_protocol on``) or a cloud load balancer. Put it before TLSMixIn (the
    header comes in clear, before any TLS byte) and before the concurrency mix-in::

        class Server(ProxyProtocolMixIn, ThreadPoolMixIn, TCPServer): ...
        Server(("127.0.0.1", 8080), Handler, proxy_trusted="10.0.0.0/8")

    Connections from outside proxy_trusted are refused on the loop thread. The header is
    read in the loop, without a thread, within proxy_header_timeout (on the worker for
    servers without the connection pipeline); the handler's client_address is
    then the real client's ``(ip, port)``, with ``.proxy_header`` and ``.peer`` (the
    proxy's address) attached (see ProxiedAddress, proxy_header(), proxy_peer()).
    Datagram servers take a v2 header at the start of every datagram and keep the
    proxy's address as client_address, so that replies go back through the proxy.

    Methods that may be overridden: handle_proxy_error().
    """

    feature_rank = 30

    proxy_protocol: str = knob(
        # HAProxy's accept-proxy takes both versions; telling them apart costs nothing
        # (their first bytes differ), and a proxy upgraded from send-proxy to
        # send-proxy-v2 keeps working.
        "any",
        "PROXY protocol versions accepted: v1, v2 or any (datagrams: v2 only)",
        check=_check_versions,
        section="proxy",
    )
    proxy_trusted: str | Sequence[str] = knob(
        DEFAULT_TRUSTED,
        "networks allowed to send PROXY headers, comma-separated (e.g. "
        "127.0.0.0/8,::1/128,10.0.0.0/8); connections from elsewhere are refused",
        check=_check_trusted,
        section="proxy",
    )
    proxy_header_timeout: float = knob(
        DEFAULT_HEADER_TIMEOUT,
        "seconds a connection has to deliver its whole PROXY header",
        check=positive,
        section="proxy",
    )
    proxy_max_v2_length: int = knob(
        DEFAULT_MAX_V2_LENGTH,
        "largest v2 header accepted, in bytes (16..65551; HAProxy's buffer holds 16384)",
        check=_check_max_v2_length,
        section="proxy",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Constructor. May be extended, do not override.

        Raises ProxyConfigError (a SettingError) for settings that cannot work, such as
        ``proxy_protocol="v1"`` on a datagram server or a proxy_trusted that is not a
        list of networks; the listening socket is closed again in that case.
        """
        super().__init__(*args, **kwargs)
        try:
            self._proxy_check_settings()
        except BaseException:
            self.server_close()
            raise

    def _proxy_check_settings(self) -> None:
        # Knobs given as keywords were checked by Configurable; these may have been set
        # as class attributes, so check all of them once more.
        for name, check in (
            ("proxy_protocol", _check_versions),
            ("proxy_header_timeout", positive),
            ("proxy_max_v2_length", _check_max_v2_length),
        ):
            value = getattr(self, name)
            problem = check(value)
            if problem:
                raise ProxyConfigError(f"{name}={value!r}: {problem}")
        try:
            self._proxy_networks = parse_networks(self.proxy_trusted)
        except (TypeError, ValueError) as exc:
            raise ProxyConfigError(f"proxy_trusted={self.proxy_trusted!r}: {exc}") from None
        accept_v1, accept_v2 = _VERSIONS[self.proxy_protocol]
        self._proxy_datagram = getattr(self, "socket_type", None) == socket.SOCK_DGRAM
        if self._proxy_datagram:
            if not accept_v2:
                raise ProxyConfigError(
                    f"proxy_protocol={self.proxy_protocol!r}: {type(self).__name__} is a "
                    "datagram server, and PROXY v1 exists for TCP only; use 'v2' or 'any'"
                )
            accept_v1 = False
        self._proxy_accept = (accept_v1, accept_v2)

    @property
    def proxy_networks(self) -> tuple[Network, ...]:
        """The parsed proxy_trusted networks (read-only)."""
        return self._proxy_networks

    # -- the request hooks ---------------------------------------------------------------

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Refuse peers outside proxy_trusted, on the loop thread, before any worker.

        May be extended.
        """
        if not is_trusted(client_address, self._proxy_networks):
            trusted = ", ".join(str(network) for network in self._proxy_networks)
            error = ProxyHeaderError(
                # A proxy we were not told about, or someone bypassing the proxy: both
                # need an operator's attention.
                f"{client_address[0]} is not in proxy_trusted ({trusted})",
                logging.WARNING,
            )
            self.handle_proxy_error(request, client_address, error)
            return False
        return super().verify_request(request, client_address)

    def connection_stages(self) -> list[Stage]:
        # First of all: the header precedes every other byte, TLS included.
        return [ProxyHeaderStage(self), *super().connection_stages()]

    def finish_request(self, request: Any, client_address: Any) -> None:
        """For datagrams: cut the PROXY header off, then run the handler.

        Streams read theirs in the ProxyHeaderStage. When no acceptable header arrives,
        handle_proxy_error() reports it and the handler does not run.
        """
        if self._proxy_datagram:
            self._finish_datagram(request, client_address)
            return
        super().finish_request(request, client_address)

    def _finish_datagram(self, request: Any, client_address: Any) -> None:
        data, sock = request
        try:
            result = parse(
                data, accept_v1=False, accept_v2=True, max_v2_length=self.proxy_max_v2_length
            )
        except ProxyProtocolError as exc:
            error = ProxyHeaderError(f"bad PROXY header: {exc}", logging.WARNING)
            error.__cause__ = exc
            self.handle_proxy_error(request, client_address, error)
            return
        if isinstance(result, NeedData):
            size = getattr(self, "max_packet_size", None)
            self.handle_proxy_error(
                request,
                client_address,
                ProxyHeaderError(
                    f"datagram of {len(data)} bytes ends inside a PROXY v2 header of at "
                    f"least {result.minimum} bytes (max_packet_size is {size})",
                    logging.WARNING,
                ),
            )
            return
        payload = data[result.length :]
        address = client_address_for(result, client_address, stream=False)
        super().finish_request((payload, sock), address)

    def handle_proxy_error(
        self, request: Any, client_address: Any, error: ProxyHeaderError
    ) -> None:
        """Report a refused connection or datagram: one log line, peer and reason.

        Called instead of handle_error(), which reports errors of the handler: on the
        loop thread for an untrusted peer and for stream headers read in the loop, on
        the worker for datagrams and servers without the connection pipeline.
        The connection is closed after it returns. May be overridden (to count
        refusals, or log them differently); ``error.level`` is the level used here.
        """
        what = "datagram" if self._proxy_datagram else "connection"
        verb = "dropped" if self._proxy_datagram else "refused"
        log.log(error.level, "%s %s from %s: %s", verb, what, _describe(client_address), error)
