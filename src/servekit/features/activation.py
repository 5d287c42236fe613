# systemd socket activation, the I/O half: adopting the listening sockets a service
# manager passed (sd_listen_fds(3)). The rules about LISTEN_PID, LISTEN_FDS and
# LISTEN_FDNAMES live in servekit.protocols.sd_daemon; this module reads os.environ and
# touches descriptors.
#
# Strategy. listen_fds() checks every inherited descriptor before adopting any, so a
# bad unit file fails with one clear error and leaves the descriptors as they were.
from __future__ import annotations

import dataclasses
import os
import socket
import stat
from collections.abc import Mapping, MutableMapping
from socket import AddressFamily, SocketKind

from servekit.protocols.sd_daemon import (
    LISTEN_VARIABLES,
    SystemdEnvironmentError,
    parse_listen_fds,
)

__all__ = ["InheritedSocket", "SystemdEnvironmentError", "is_socket_activated", "listen_fds"]

_FILE_KINDS = (
    (stat.S_ISFIFO, "FIFO"),
    (stat.S_ISREG, "regular file"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISDIR, "directory"),
)


# -- socket activation -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class InheritedSocket:
    """A socket passed by the service manager: its descriptor number, name and object.

    ``socket`` owns the descriptor; closing it closes the inherited socket.
    """

    fd: int
    name: str
    socket: socket.socket

    @property
    def family(self) -> AddressFamily:
        return self.socket.family

    @property
    def type(self) -> SocketKind:
        return self.socket.type

    @property
    def listening(self) -> bool:
        """True for a stream socket in listen(); False for a connection (Accept=yes) or
        a datagram socket."""
        return bool(self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))


def listen_fds(
    *,
    unset_environment: bool = True,
    environ: MutableMapping[str, str] | None = None,
) -> list[InheritedSocket]:
    """The sockets the service manager passed, as socket objects, in the manager's order.

    The family, type and protocol of each are read from the descriptor itself. Each is
    marked close-on-exec (children get no copy unless they ask) and put in blocking mode,
    as socketserver's own sockets are: a unit's NonBlocking=yes would otherwise leave
    O_NONBLOCK set where Python's socket object reports blocking, and accept() could raise
    BlockingIOError. An empty list when the process was not socket-activated.

    With unset_environment (the default, as sd_listen_fds(1)), LISTEN_PID, LISTEN_FDS and
    LISTEN_FDNAMES are removed from environ whether or not this succeeds, so child
    processes do not mistake them for their own; a second call then returns [].

    Raises SystemdEnvironmentError if a variable is malformed, or a descriptor is not
    open or is not a socket (a FIFO from ListenFIFO=, say); no descriptor is adopted then.
    environ defaults to os.environ. Call it once: every call adopts the descriptors anew,
    and two socket objects owning one descriptor would close it twice.
    """
    env = os.environ if environ is None else environ
    try:
        passed = parse_listen_fds(env, os.getpid())
        for fd, name in passed:
            _check_is_socket(fd, name, passed.count)
        return [InheritedSocket(fd, name, _adopt(fd)) for fd, name in passed]
    finally:
        if unset_environment:
            for variable in LISTEN_VARIABLES:
                env.pop(variable, None)


def is_socket_activated(environ: Mapping[str, str] | None = None) -> bool:
    """True if the service manager passed this process at least one descriptor.

    Reads the variables without consuming them; raises SystemdEnvironmentError if they
    are meant for this process but malformed.
    """
    env = os.environ if environ is None else environ
    return bool(parse_listen_fds(env, os.getpid()))


def _check_is_socket(fd: int, name: str, count: int) -> None:
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        raise SystemdEnvironmentError(
            f"LISTEN_FDS={count}: descriptor {fd} ({name!r}) is not open: {exc.strerror}"
        ) from None
    if not stat.S_ISSOCK(mode):
        kind = next((kind for test, kind in _FILE_KINDS if test(mode)), "non-socket file")
        raise SystemdEnvironmentError(
            f"LISTEN_FDS={count}: descriptor {fd} ({name!r}) is a {kind}, not a socket"
        )


def _adopt(fd: int) -> socket.socket:
    # Descriptors arrive without FD_CLOEXEC (they had to survive the manager's exec);
    # set it as sd_listen_fds() does.
    os.set_inheritable(fd, False)
    sock = socket.socket(fileno=fd)
    sock.setblocking(True)
    return sock
