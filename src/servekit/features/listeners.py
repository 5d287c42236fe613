# Listening sockets: one server on several addresses (TCP over IPv4 and IPv6, UDP, Unix
# sockets, inherited descriptors), Unix socket files created and removed safely, and the
# socket options that belong to listeners and to the connections they accept.
#
# Strategy. Setting up listeners runs in three phases, so that a mistake anywhere is
# found before anything is bound and a failure half-way leaves nothing behind:
#   1. plan: parse every address (servekit.features.addresses reports all bad ones at once),
#      resolve host names, adopt inherited descriptors and check every listener is of
#      the server's kind. Nothing is bound; adopted descriptors are given back on error.
#   2. bind: create and bind each socket in order; if one fails, the ones before it are
#      closed (and their Unix socket files removed) and the error names the address.
#   3. activate: listen(), set the options accepted connections inherit, and only then
#      publish each Unix socket file under its final name.
# Unix socket files (temporary name, atomic publish, stale-file checks, removal by
# their owner only) are servekit.features.unixfiles' business.
from __future__ import annotations

import dataclasses
import errno
import ipaddress
import logging
import os
import socket
import stat
import sys
import threading
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from servekit.core.accept import accept_as
from servekit.core.kinds import STREAM, is_tcp, type_of
from servekit.errors import ListenerError
from servekit.features.activation import InheritedSocket, is_socket_activated, listen_fds
from servekit.features.addresses import Address, AddressError, parse_addresses
from servekit.features.base import ServerFeature
from servekit.features.unixfiles import (
    UnixSocketFile,
    bind_socket_file,
    check_path,
    file_kind,
    publish,
    remove_if_same,
    resolve_ids,
)
from servekit.knobs import Configurable, knob, positive

if TYPE_CHECKING:
    from servekit.core.sockets import TCPServer

    _MixinBase = TCPServer
else:
    _MixinBase = object

__all__ = [
    "Listener",
    "ListenerError",
    "ListenerOptions",
    "ListenersMixIn",
    "bind_listener",
    "bind_listeners",
    "effective_backlog",
    "inherited_sockets",
]

log = logging.getLogger("servekit.listeners")

AddressesLike = str | Address | Sequence[str | Address]

# listen(2): "If the backlog argument is greater than the value in
# /proc/sys/net/core/somaxconn, then it is silently capped to that value. Since Linux
# 5.4, the default in this file is 4096; in earlier kernels, the default value is 128."
SOMAXCONN_PATH = "/proc/sys/net/core/somaxconn"
# Older kernels kept the queue length in 16 bits (sk_max_ack_backlog was an unsigned
# short), so a larger somaxconn could wrap "as large as possible" to a tiny queue.
MAX_BACKLOG = 65535

# Linux limits for the keep-alive options (MAX_TCP_KEEPIDLE, MAX_TCP_KEEPINTVL and
# MAX_TCP_KEEPCNT in include/net/tcp.h); setsockopt() refuses larger values with EINVAL.
MAX_TCP_KEEPIDLE = 32767
MAX_TCP_KEEPINTVL = 32767
MAX_TCP_KEEPCNT = 127

# Linux copies the listening socket's TCP_NODELAY, SO_KEEPALIVE and keep-alive timings
# to every socket accept() returns (sk_clone_lock() copies the whole tcp_sock, and
# tcp_create_openreq_child() starts the keep-alive timer), so setting them once on the
# listener costs no system call per connection and a bad value fails at start-up.
# Elsewhere they are set again on each accepted connection, in get_request().
KERNEL_COPIES_TCP_OPTIONS = sys.platform.startswith("linux")

_KIND_NAMES = {socket.SOCK_STREAM: "stream", socket.SOCK_DGRAM: "datagram"}


# -- settings --------------------------------------------------------------------------


def octal(text: str) -> int:
    """A file mode written in octal, as chmod takes it: 660 or 0o660."""
    return int(text.strip().lower().removeprefix("0o"), 8)


def user(text: str) -> str | int | None:
    """A user name or uid; empty or none for "leave as is"."""
    return _name_or_id(text)


def group(text: str) -> str | int | None:
    """A group name or gid; empty or none for "leave as is"."""
    return _name_or_id(text)


def _name_or_id(text: str) -> str | int | None:
    text = text.strip()
    if text.lower() in ("", "none"):
        return None
    return int(text) if text.isdigit() else text


def _file_mode(value: Any) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0o777:
        return None
    return "must be a permission mode from 0o000 to 0o777"


def _name_or_id_check(value: Any) -> str | None:
    if value is None or (isinstance(value, str) and value):
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return None
    return "must be a name, a numeric id, or None"


def _between(low: int, high: int) -> Any:
    def check(value: Any) -> str | None:
        if isinstance(value, int) and low <= value <= high:
            return None
        return f"must be from {low} to {high} (the kernel's limit)"

    return check


class ListenerOptions(Configurable):
    """The settings of listening sockets; ListenersMixIn servers take them as keywords.

    Also usable alone, for bind_listeners(): ``ListenerOptions(backlog=64)``. The TCP
    options only turn things on: leaving one off never switches off a setting that an
    inherited socket arrived with.
    """

    backlog: int = knob(
        1024,
        "listen() backlog: connections the kernel queues until accept(); "
        "capped at net.core.somaxconn",
        check=positive,
        section="listeners",
    )
    tcp_nodelay: bool = knob(
        True,
        "TCP_NODELAY on accepted TCP connections: send small writes at once (no Nagle)",
        section="listeners",
    )
    tcp_keepalive: bool = knob(
        False,
        "SO_KEEPALIVE on accepted TCP connections: probe idle peers, drop dead ones",
        section="listeners",
    )
    tcp_keepidle: int = knob(
        60,
        "seconds a connection is idle before the first keep-alive probe",
        check=_between(1, MAX_TCP_KEEPIDLE),
        section="listeners",
    )
    tcp_keepintvl: int = knob(
        10,
        "seconds between keep-alive probes",
        check=_between(1, MAX_TCP_KEEPINTVL),
        section="listeners",
    )
    tcp_keepcnt: int = knob(
        6,
        "unanswered keep-alive probes after which the connection is dropped",
        check=_between(1, MAX_TCP_KEEPCNT),
        section="listeners",
    )
    reuse_address: bool = knob(
        True,
        "SO_REUSEADDR on TCP listeners, so a restart can bind while old connections "
        "are in TIME_WAIT",
        section="listeners",
    )
    so_reuseport: bool = knob(
        False,
        "SO_REUSEPORT on TCP and UDP listeners: several sockets share one address and "
        "the kernel spreads connections across them",
        section="listeners",
    )
    ipv6_only: bool = knob(
        False,
        "IPV6_V6ONLY on IPv6 listeners: [::] serves IPv6 clients only, not IPv4 too",
        section="listeners",
    )
    unix_socket_mode: int = knob(
        0o660,
        "permissions of a Unix socket file (connecting needs write permission)",
        parse=octal,
        check=_file_mode,
        section="listeners",
    )
    unix_socket_owner: str | int | None = knob(
        None,
        "owner of a Unix socket file, a user name or uid (None: this process's)",
        parse=user,
        check=_name_or_id_check,
        section="listeners",
    )
    unix_socket_group: str | int | None = knob(
        None,
        "group of a Unix socket file, a group name or gid (None: this process's)",
        parse=group,
        check=_name_or_id_check,
        section="listeners",
    )

    def _listener_reuse_address(self) -> bool:
        """Whether TCP listeners get SO_REUSEADDR. May be extended."""
        return self.reuse_address

    def _listener_reuse_port(self) -> bool:
        """Whether TCP and UDP listeners get SO_REUSEPORT. May be extended."""
        return self.so_reuseport


def effective_backlog(requested: int) -> int:
    """The listen() backlog the kernel will really use for requested.

    Linux caps it at net.core.somaxconn without saying so; clamping here makes the value
    we report and log the one in force.
    """
    try:
        with open(SOMAXCONN_PATH, encoding="ascii") as fh:
            limit = int(fh.read())
    except (OSError, ValueError):
        limit = socket.SOMAXCONN
    return max(1, min(requested, limit, MAX_BACKLOG))


# -- inherited sockets ---------------------------------------------------------------

_inherited_lock = threading.Lock()
_inherited: list[InheritedSocket] | None = None


def inherited_sockets() -> list[InheritedSocket]:
    """The sockets systemd passed this process (servekit.features.activation.listen_fds()), cached.

    listen_fds() removes LISTEN_FDS and friends from the environment (so children do not
    take them for their own), so a second call would find nothing: every caller in the
    process shares the result of the first. Empty when not socket-activated.
    """
    global _inherited
    with _inherited_lock:
        if _inherited is None:
            _inherited = listen_fds()
        return _inherited


def _systemd_sockets_if_any() -> list[InheritedSocket]:
    """The cached systemd sockets, reading the environment only if it is meant for us."""
    if _inherited is None and not is_socket_activated():
        return []
    return inherited_sockets()


# -- phase 1: plans ----------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class _Plan:
    """What one listener will be, decided before anything is bound."""

    address: Address
    family: int
    type: int
    sockaddr: Any  # bind()'s argument; None for an inherited socket
    inherited: socket.socket | None = None
    #: fd://N wrapped here (given back with detach() on error), as opposed to a socket
    #: from the process-wide systemd cache, which stays where it is.
    adopted_here: bool = False
    was_inheritable: bool = False


def _label(address: Address) -> str:
    return repr(address.text or str(address))


def _as_addresses(addresses: AddressesLike) -> list[Address]:
    if isinstance(addresses, (str, Address)):
        addresses = [addresses]
    items = list(addresses)
    if not items:
        raise AddressError("no address to listen on")
    texts: list[str] = []
    for item in items:
        if isinstance(item, Address):
            texts.append(item.text or str(item))
        elif isinstance(item, str):
            texts.append(item)
        else:
            raise AddressError(
                f"{item!r} is not an address; write a string such as 'tcp://127.0.0.1:8000'"
            )
    return parse_addresses(texts)


def _plan(addresses: Sequence[Address], stream: bool | None) -> list[_Plan]:
    """Phase 1. Raises AddressError or ListenerError; adopts nothing if it raises."""
    plans: list[_Plan] = []
    problems: list[str] = []
    try:
        for address in addresses:
            if address.kind == "fd":
                plans.extend(_adopt(address))
            elif address.kind in ("unix", "unix-dgram"):
                kind = socket.SOCK_STREAM if address.kind == "unix" else socket.SOCK_DGRAM
                plans.append(_Plan(address, socket.AF_UNIX, kind, address.path))
            else:
                kind = socket.SOCK_STREAM if address.kind == "tcp" else socket.SOCK_DGRAM
                try:
                    family, sockaddr = _resolve(address, kind)
                except AddressError as exc:
                    problems.append(str(exc))
                    continue
                plans.append(_Plan(address, family, kind, sockaddr))
        if problems:
            raise AddressError("; ".join(problems))
        _check_kinds(plans, stream)
        _check_distinct_descriptors(plans)
    except BaseException:
        _release(plans)
        raise
    return plans


def _resolve(address: Address, kind: int) -> tuple[int, Any]:
    host, port = address.host, address.port
    if not host:
        return socket.AF_INET, ("", port)  # ":PORT" means every IPv4 interface
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        pass
    else:
        return socket.AF_INET, (host, port)
    if address.is_ipv6 and "%" not in host:
        return socket.AF_INET6, (host, port)
    # A scoped IPv6 literal (fe80::1%eth0) needs the scope id, and a name its address:
    # getaddrinfo gives both. A name binds the first address the resolver returns.
    flags = socket.AI_PASSIVE | (socket.AI_NUMERICHOST if address.is_ipv6 else 0)
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, kind, 0, flags)
    except socket.gaierror as exc:
        raise AddressError(
            f"cannot resolve {host!r} in {_label(address)}: {exc.strerror}"
        ) from None
    family, _, _, _, sockaddr = infos[0]
    return int(family), sockaddr


def _adopt(address: Address) -> list[_Plan]:
    if address.fd is None:
        return _adopt_named(address)
    fd = address.fd
    for inherited in _systemd_sockets_if_any():
        if inherited.fd == fd:
            _check_open(address, inherited)
            return [_inherited_plan(address, inherited.socket)]
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        raise ListenerError(
            errno.EBADF, f"{_label(address)}: descriptor {fd} is not open ({exc.strerror})"
        ) from None
    if not stat.S_ISSOCK(mode):
        raise ListenerError(
            errno.ENOTSOCK,
            f"{_label(address)}: descriptor {fd} is a {file_kind(mode)}, not a socket",
        )
    was_inheritable = os.get_inheritable(fd)
    sock = socket.socket(fileno=fd)
    # Close-on-exec, like every socket Python creates (PEP 446): programs a handler
    # starts must not keep our listener open.
    os.set_inheritable(fd, False)
    return [_inherited_plan(address, sock, adopted_here=True, was_inheritable=was_inheritable)]


def _check_open(address: Address, inherited: InheritedSocket) -> None:
    if inherited.socket.fileno() == -1:
        raise ListenerError(
            errno.EBADF,
            f"{_label(address)}: the inherited socket {inherited.name!r} (fd {inherited.fd}) "
            "was closed by an earlier server's server_close()",
        )


def _adopt_named(address: Address) -> list[_Plan]:
    passed = inherited_sockets()
    found = [s for s in passed if s.name == address.fd_name]
    if not found:
        if passed:
            names = ", ".join(f"{s.name!r} (fd {s.fd})" for s in passed)
            why = f"the service manager passed {names}"
        else:
            why = "the process was not socket-activated (no LISTEN_FDS for this process)"
        raise ListenerError(
            errno.ENOENT,
            f"{_label(address)}: no inherited socket is named {address.fd_name!r}; {why}",
        )
    for inherited in found:
        _check_open(address, inherited)
    # systemd gives every socket of a unit the same FileDescriptorName= unless each has
    # its own, so one name can stand for several sockets (ListenStream=80 and
    # ListenStream=[::]:80, say): serve them all.
    return [_inherited_plan(address, s.socket) for s in found]


def _inherited_plan(
    address: Address,
    sock: socket.socket,
    *,
    adopted_here: bool = False,
    was_inheritable: bool = False,
) -> _Plan:
    plan = _Plan(
        address, int(sock.family), int(sock.type), None, sock, adopted_here, was_inheritable
    )
    try:
        if sock.type not in _KIND_NAMES:
            raise ListenerError(
                errno.ESOCKTNOSUPPORT,
                f"{_label(address)}: descriptor {sock.fileno()} is a "
                f"{getattr(sock.type, 'name', sock.type)} "
                "socket; servekit serves stream and datagram sockets",
            )
        if sock.type == socket.SOCK_STREAM and not sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_ACCEPTCONN
        ):
            raise ListenerError(
                errno.EINVAL,
                f"{_label(address)}: descriptor {sock.fileno()} is a stream socket that is "
                "not listening (a connection, as systemd's Accept=yes passes, or a socket "
                "that was never given to listen())",
            )
    except BaseException:
        _release([plan])
        raise
    return plan


def _check_kinds(plans: Sequence[_Plan], stream: bool | None) -> None:
    streams = [_label(p.address) for p in plans if p.type == socket.SOCK_STREAM]
    datagrams = [_label(p.address) for p in plans if p.type == socket.SOCK_DGRAM]
    if streams and datagrams:
        raise AddressError(
            f"stream addresses ({', '.join(streams)}) and datagram addresses "
            f"({', '.join(datagrams)}) cannot share a server: their handlers differ"
        )
    if stream is True and datagrams:
        raise AddressError(
            f"{', '.join(datagrams)}: datagram addresses given to a stream server; "
            "compose the server with UDPServer (or UnixDatagramServer) instead"
        )
    if stream is False and streams:
        raise AddressError(
            f"{', '.join(streams)}: stream addresses given to a datagram server; "
            "compose the server with TCPServer (or UnixStreamServer) instead"
        )


def _check_distinct_descriptors(plans: Sequence[_Plan]) -> None:
    seen: dict[int, Address] = {}
    for plan in plans:
        if plan.inherited is None:
            continue
        fd = plan.inherited.fileno()
        if fd in seen:
            raise AddressError(
                f"{_label(seen[fd])} and {_label(plan.address)} are the same socket "
                f"(descriptor {fd})"
            )
        seen[fd] = plan.address


def _release(plans: Iterable[_Plan]) -> None:
    """Give adopted descriptors back as they were found, open and unchanged."""
    for plan in plans:
        if plan.adopted_here and plan.inherited is not None and plan.inherited.fileno() != -1:
            fd = plan.inherited.detach()
            os.set_inheritable(fd, plan.was_inheritable)
            plan.inherited = None


# -- phase 2: binding --------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class Listener:
    """One listening socket, the address it was made from, and what closing it does."""

    socket: socket.socket
    address: Address
    #: Adopted from a descriptor (fd://): never re-bound, its file never removed.
    inherited: bool = False
    _unix_file: UnixSocketFile | None = dataclasses.field(default=None, repr=False)

    #: The bound address: (host, port) with the real port, or the Unix socket path.
    name: Any = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        if not self.inherited and self.address.kind in ("unix", "unix-dgram"):
            # A path socket is bound under its temporary name, which getsockname() would
            # report, and an abstract one comes back as bytes: the address says it right.
            self.name = self.address.path
        else:
            self.name = self.socket.getsockname()

    @property
    def stream(self) -> bool:
        return self.socket.type == socket.SOCK_STREAM

    def close(self) -> None:
        """Close the socket; remove its Unix socket file if this process made it and the
        file at the path is still that one."""
        unix_file, self._unix_file = self._unix_file, None
        try:
            if unix_file is not None and unix_file.pid == os.getpid():
                target = unix_file.path if unix_file.published else unix_file.temporary
                remove_if_same(target, unix_file.identity)
        finally:
            self.socket.close()


def _bind(
    plan: _Plan, options: ListenerOptions, ids: tuple[int, int], sock: socket.socket | None
) -> Listener:
    """Phase 2 for one listener; sock is a fresh socket of the right kind to use, if any."""
    if plan.inherited is not None:
        if sock is not None:
            sock.close()
        return Listener(plan.inherited, plan.address, inherited=True)
    if sock is None:
        sock = socket.socket(plan.family, plan.type)
    try:
        if plan.family in (socket.AF_INET, socket.AF_INET6):
            if plan.type == socket.SOCK_STREAM and options._listener_reuse_address():
                # A restarted server must not fail with EADDRINUSE because connections
                # of its predecessor sit in TIME_WAIT (2 * MSL, 60 s on Linux). Not on
                # UDP, where SO_REUSEADDR would let a second server share the port.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if options._listener_reuse_port():
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if plan.family == socket.AF_INET6:
                # Explicit, because net.ipv6.bindv6only may have changed Linux's
                # default (0: [::] serves IPv4 clients too, as ::ffff:a.b.c.d).
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(options.ipv6_only))
            sock.bind(plan.sockaddr)
            return Listener(sock, plan.address)
        if plan.address.is_abstract:
            sock.bind(plan.sockaddr)  # the abstract namespace has no file to manage
            return Listener(sock, plan.address)
        return Listener(
            sock,
            plan.address,
            _unix_file=bind_socket_file(
                sock,
                plan.address.path,
                options.unix_socket_mode,
                ids,
                _label(plan.address),
                owner=options.unix_socket_owner,
                group=options.unix_socket_group,
            ),
        )
    except ListenerError:
        sock.close()
        raise
    except OSError as exc:
        sock.close()
        raise ListenerError(
            exc.errno, f"cannot bind {_label(plan.address)}: {exc.strerror or exc}"
        ) from exc
    except BaseException:
        sock.close()
        raise


# -- phase 3: activation -------------------------------------------------------------------


def _set_tcp_options(sock: socket.socket, options: ListenerOptions, label: str) -> None:
    settings: list[tuple[int, int, int, str]] = []
    if options.tcp_nodelay:
        # Request/response traffic: with Nagle on, a response written in two parts waits
        # for the ACK of the first, which the client delays by up to 40 ms (Linux) or
        # 200 ms (others). TCP_NODELAY sends each write at once.
        settings.append((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1, "tcp_nodelay"))
    if options.tcp_keepalive:
        settings += [
            (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1, "tcp_keepalive"),
            (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, options.tcp_keepidle, "tcp_keepidle"),
            (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, options.tcp_keepintvl, "tcp_keepintvl"),
            (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, options.tcp_keepcnt, "tcp_keepcnt"),
        ]
    for level, option, value, name in settings:
        try:
            sock.setsockopt(level, option, value)
        except OSError as exc:
            raise ListenerError(
                exc.errno, f"{label}: cannot set {name}={value}: {exc.strerror}"
            ) from None


def _activate(listener: Listener, options: ListenerOptions, backlog: int) -> None:
    sock = listener.socket
    label = _label(listener.address)
    if sock.type == socket.SOCK_STREAM and not listener.inherited:
        try:
            sock.listen(backlog)
        except OSError as exc:
            raise ListenerError(exc.errno, f"cannot listen on {label}: {exc.strerror}") from None
    if is_tcp(sock):
        # Inherited listeners too: these options describe the connections we accept.
        _set_tcp_options(sock, options, label)
    unix_file = listener._unix_file
    if unix_file is not None and not unix_file.published:
        # Only once listening: a client (or a starting server probing for a stale file)
        # must never find the path refusing connections.
        publish(unix_file, _label(listener.address), sock.type)


# -- the three phases together -----------------------------------------------------------


def _bind_all(
    plans: Sequence[_Plan],
    options: ListenerOptions,
    first_socket: socket.socket | None = None,
) -> list[Listener]:
    """Phase 2 for every plan; on failure close what was bound (not inherited sockets)."""
    needs_ids = any(
        p.inherited is None and p.family == socket.AF_UNIX and not p.address.is_abstract
        for p in plans
    )
    listeners: list[Listener] = []
    try:
        ids = (
            resolve_ids(options.unix_socket_owner, options.unix_socket_group)
            if needs_ids
            else (-1, -1)
        )
        for plan in plans:
            # Before binding anything: a live server or a foreign file at a path stops
            # start-up with nothing to undo.
            if (
                plan.inherited is None
                and plan.family == socket.AF_UNIX
                and not plan.address.is_abstract
            ):
                check_path(plan.address.path, _label(plan.address), plan.type)
        for index, plan in enumerate(plans):
            listeners.append(_bind(plan, options, ids, first_socket if index == 0 else None))
    except BaseException:
        if first_socket is not None and not listeners:
            first_socket.close()
        _close_all(listeners, keep_inherited=True)
        raise
    return listeners


def _activate_all(
    listeners: Sequence[Listener], options: ListenerOptions, *, nonblocking: bool
) -> int:
    """Phase 3 for every listener; returns the backlog in force."""
    backlog = effective_backlog(options.backlog)
    if backlog < options.backlog:
        log.info(
            "backlog=%d is more than the kernel allows (net.core.somaxconn); using %d",
            options.backlog,
            backlog,
        )
    for listener in listeners:
        _activate(listener, options, backlog)
        # Non-blocking when the loop takes several connections per wake-up: the batch
        # then ends with BlockingIOError instead of blocking the loop.
        listener.socket.setblocking(not nonblocking)
    return backlog


def _close_all(listeners: Iterable[Listener], *, keep_inherited: bool = False) -> None:
    for listener in listeners:
        if keep_inherited and listener.inherited:
            continue
        listener.close()


def bind_listeners(
    addresses: AddressesLike,
    options: ListenerOptions | None = None,
    *,
    stream: bool | None = None,
    nonblocking: bool = False,
) -> list[Listener]:
    """Listening sockets for every address, ready to accept(); all or none.

    Every address is parsed, resolved and checked before anything binds (AddressError,
    naming every bad one). If binding one fails, those before it are closed again and
    ListenerError names the address. stream=True (False) refuses datagram (stream)
    addresses; None only requires that they are all of one kind. Close each Listener
    when done: that also removes the Unix socket files this process created.
    """
    options = options if options is not None else ListenerOptions()
    plans = _plan(_as_addresses(addresses), stream)
    try:
        listeners = _bind_all(plans, options)
        try:
            _activate_all(listeners, options, nonblocking=nonblocking)
        except BaseException:
            _close_all(listeners, keep_inherited=True)
            raise
    except BaseException:
        _release(plans)
        raise
    return listeners


def bind_listener(address: str | Address, options: ListenerOptions | None = None) -> socket.socket:
    """One listening socket for address (a string, or one Address), ready to accept().

    For a Unix path the socket file stays when the socket is closed, as with the
    standard library's servers; use bind_listeners() for Listener objects whose close()
    removes it. An fd://NAME that names several sockets is refused: use bind_listeners().
    """
    listeners = bind_listeners([address], options)
    if len(listeners) != 1:
        _close_all(listeners, keep_inherited=True)
        raise AddressError(
            f"{_label(listeners[0].address)} names {len(listeners)} sockets; "
            "use bind_listeners() to get them all"
        )
    return listeners[0].socket


# -- the mix-in ------------------------------------------------------------------------


class ListenersMixIn(ListenerOptions, ServerFeature):
    """Listen on several addresses at once. Put it before the concurrency mix-in.

    server_address is an address string, an Address, or a list of them::

        class Server(ListenersMixIn, ThreadPoolMixIn, TCPServer): ...
        Server(["tcp://0.0.0.0:8000", "[::]:8001", "unix:/run/app.sock", "fd://3"], Handler)

    Every address must be of the server's kind: stream addresses (tcp, unix, listening
    fd) with TCPServer or UnixStreamServer, datagram addresses (udp, unix-dgram, datagram
    fd) with UDPServer or UnixDatagramServer. ``sockets`` lists the listening sockets,
    ``socket`` is the first, ``server_address`` its bound address and
    ``server_addresses`` all of them (with the real port for port 0).

    This mix-in binds, activates and closes every listener itself; it does not chain
    server_bind() and server_activate() to the classes after it, whose versions know only
    one socket. A mix-in that must act at activation goes before it.
    """

    feature_rank = 10

    def __init__(
        self,
        server_address: AddressesLike,
        RequestHandlerClass: Any,
        bind_and_activate: bool = True,
        **kwargs: Any,
    ) -> None:
        # TCPServer.__init__ always creates self.socket from address_family and
        # socket_type before it binds. So: plan every listener first (parse, resolve,
        # adopt, check kinds: nothing is bound yet, so a mistake leaves nothing behind),
        # give the instance the first listener's family, and let TCPServer create that
        # socket without binding it (bind_and_activate=False). server_bind() then makes it
        # the first listener, so no socket is wasted, and code that sets options on
        # self.socket before server_bind() (bind_and_activate=False) works as with the
        # stdlib. For an inherited first listener the fresh socket is closed instead.
        stream = self.socket_type == socket.SOCK_STREAM
        self._listener_plans: list[_Plan] = _plan(_as_addresses(server_address), stream)
        self.listeners: list[Listener] = []
        first = self._listener_plans[0]
        self.address_family = first.family
        try:
            super().__init__(
                first.sockaddr if first.inherited is None else first.inherited.getsockname(),
                RequestHandlerClass,
                bind_and_activate=False,
                **kwargs,
            )
        except BaseException:
            _release(self._listener_plans)
            raise
        if bind_and_activate:
            try:
                self.server_bind()
                self.server_activate()
            except BaseException:
                self._abandon_listeners()
                self.server_close()
                raise

    def _abandon_listeners(self) -> None:
        """After a failed start: close what was bound, give adopted descriptors back
        open and unchanged, and keep systemd's sockets for another attempt."""
        _close_all(self.listeners, keep_inherited=True)
        _release(self._listener_plans)
        self.listeners = []
        self._listener_plans = []

    @property
    def sockets(self) -> list[socket.socket]:
        """The listening sockets, in the order of the addresses."""
        return [listener.socket for listener in self.listeners]

    @property
    def server_addresses(self) -> list[Any]:
        """Every listener's bound address: (host, port) with the real port, or a path."""
        return [listener.name for listener in self.listeners]

    def _listener_reuse_address(self) -> bool:
        # The stdlib's knob still counts: http.server.HTTPServer sets it, for one.
        return self.reuse_address or self.allow_reuse_address

    def _listener_reuse_port(self) -> bool:
        # PreforkMixIn(reuse_port=True) asks through allow_reuse_port.
        return self.so_reuseport or self.allow_reuse_port

    def server_bind(self) -> None:
        """Bind every listener; if one fails, close those before it. May be extended."""
        if self.listeners:
            raise RuntimeError("server_bind() was already called on this server")
        first = self._listener_plans[0]
        fresh = self.socket
        reusable = (
            first.inherited is None
            and fresh.fileno() != -1
            and fresh.family == first.family
            and fresh.type == first.type
        )
        self.listeners = _bind_all(self._listener_plans, self, fresh if reusable else None)
        if not reusable:
            fresh.close()
        self.socket = self.listeners[0].socket
        self.server_address = self.listeners[0].name

    def server_activate(self) -> None:
        """listen() on every listener, set their options, publish Unix socket files."""
        self.request_queue_size = _activate_all(
            self.listeners, self, nonblocking=self.accept_batch > 1
        )

    def stop_listening(self) -> None:
        """Close every stream listener (removing the Unix socket files this process made).

        Datagram listeners stay open until release(): handlers still running reply
        through them.
        """
        _close_all(listener for listener in self.listeners if listener.stream)

    def release(self) -> None:
        """Close the datagram listeners; adopted descriptors that were never bound too."""
        try:
            _close_all(listener for listener in self.listeners if not listener.stream)
            if not self.listeners:
                # Never bound: the adopted descriptors are still only planned; they are
                # this server's now and closed with it.
                for plan in getattr(self, "_listener_plans", ()):
                    if plan.inherited is not None:
                        plan.inherited.close()
        finally:
            super().release()

    def fileno(self) -> int:
        """The first listener's descriptor (the stdlib's single-socket contract)."""
        return self.socket.fileno()

    def accept_sources(self) -> Sequence[Any]:
        return self.sockets

    def get_request(self) -> tuple[Any, Any]:
        """Accept a connection (or read a datagram) from the listener that is ready."""
        listener = self.ready_listener
        if not isinstance(listener, socket.socket):
            listener = self.socket
        if type_of(listener) == STREAM:
            connection, client_address = accept_as(listener, self.accepted_socket_class)
            if not KERNEL_COPIES_TCP_OPTIONS and is_tcp(connection):
                try:
                    _set_tcp_options(connection, self, "accepted connection")
                except OSError:
                    connection.close()
                    raise
            return connection, client_address
        size: int = getattr(self, "max_packet_size", 8192)
        data, client_address = listener.recvfrom(size)
        return (data, listener), client_address
