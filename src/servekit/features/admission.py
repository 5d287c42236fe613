# Stopping the kernel from taking new connections on a listening socket that stays open.
#
# Strategy. At shutdown the server takes what the kernel already queued and serves it
# (the shutdown sequence in servekit.features.base), then closes the listener. Between
# the last accept() that finds the queue empty and close(), the kernel keeps completing
# handshakes, and close() resets whatever it queued meanwhile: a client that connected
# and sent its request gets ECONNRESET. On a busy server with a pool thread holding the
# GIL that window is milliseconds wide (measured: 2 to 6 of 300 clients reset).
#
# So the door is shut first: a classic BPF filter that drops every packet is attached
# to the listening socket. The kernel runs a listener's filter on incoming SYNs and on
# the ACKs that would complete a handshake, so nothing new enters the accept queue,
# while connections already accepted are separate sockets, cloned before the filter,
# and unaffected. A client whose SYN is dropped retransmits it (after 1 s on Linux) and
# by then finds the listener closed: connection refused, never accepted. The queue
# that remains is then drained to the end, and close() resets nothing.
#
# Linux only, TCP only (Unix sockets do not run the filter on connect); elsewhere, or
# if the filter cannot be attached, refuse_new_connections() returns False and the
# shutdown goes on with the narrow window it had before.
from __future__ import annotations

import ctypes
import logging
import socket
import struct

__all__ = ["refuse_new_connections"]

log = logging.getLogger("servekit.admission")

# <asm-generic/socket.h>
SO_ATTACH_FILTER = 26
# One instruction, BPF_RET | BPF_K with k = 0: keep 0 bytes of every packet, i.e. drop it.
_DROP_ALL = struct.pack("HBBI", 0x06, 0, 0, 0)


def refuse_new_connections(sock: socket.socket) -> bool:
    """Make the kernel drop new connection attempts to the listening TCP socket sock.

    Connections already queued stay queued (accept() still returns them) and accepted
    ones are unaffected. Returns True if the filter is in place.
    """
    if not hasattr(socket, "AF_INET6") or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    if sock.type != socket.SOCK_STREAM or sock.fileno() < 0:
        return False
    program = ctypes.create_string_buffer(_DROP_ALL, len(_DROP_ALL))
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; }, native
    # alignment (the pointer is padded to 8 bytes); the kernel copies the program.
    fprog = struct.pack("HP", 1, ctypes.addressof(program))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
    except OSError as exc:
        log.debug("cannot attach a socket filter to %r: %s", sock, exc)
        return False
    return True
