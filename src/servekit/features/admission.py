# Stopping the kernel from taking new connections on a listening socket that stays open.
#
# Strategy. At shutdown the server takes what the kernel already queued and serves it
# (the shutdown sequence in servekit.features.base), then closes the listener. Between
# the last accept() that finds the queue empty and close(), the kernel keeps completing
# handshakes, and close() resets whatever it queued meanwhile: a client that connected
# and sent its request gets ECONNRESET. On a busy server with a pool thread holding the
# GIL that window is milliseconds wide (measured: 2 to 6 of 300 clients reset).
#
# So the door is shut first: a classic BPF filter attached to the listening socket drops
# every new connection attempt, i.e. every segment with SYN set and ACK clear. The
# kernel runs a listener's filter on incoming SYNs and on the ACKs that complete a
# handshake; those ACKs (and the data that may follow them) still pass, so a handshake
# already under way completes into the accept queue, where the shutdown takes it.
# (Dropping every packet, as a first version did, left such a client connected in its
# own eyes but never in the server's, waiting for an answer until its timeout.)
# Connections already accepted are separate sockets, unaffected. A client whose SYN is
# dropped retransmits it (after 1 s on Linux) and by then finds the listener closed:
# connection refused, never accepted. The queue that remains is then drained to the end,
# and close() resets nothing.
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
# struct sock_filter {u16 code; u8 jt; u8 jf; u32 k}. For a TCP socket the filter sees
# the segment from its TCP header on, so byte 13 holds the flags (ACK 0x10, SYN 0x02).
# Jump offsets count from the next instruction.
_BPF_LD_B_ABS = 0x30  # BPF_LD | BPF_B | BPF_ABS
_BPF_JSET_K = 0x45  # BPF_JMP | BPF_JSET | BPF_K
_BPF_RET_K = 0x06  # BPF_RET | BPF_K: keep k bytes (0: drop)
_DROP_NEW_CONNECTIONS = b"".join(
    struct.pack("HBBI", code, jt, jf, k)
    for code, jt, jf, k in (
        (_BPF_LD_B_ABS, 0, 0, 13),  # 0: A = TCP flags
        (_BPF_JSET_K, 2, 0, 0x10),  # 1: ACK set -> 4 (keep: completes a handshake)
        (_BPF_JSET_K, 0, 1, 0x02),  # 2: SYN set -> 3 (drop), else -> 4
        (_BPF_RET_K, 0, 0, 0),  # 3: drop
        (_BPF_RET_K, 0, 0, 0xFFFFFFFF),  # 4: keep the whole segment
    )
)
_INSTRUCTIONS = len(_DROP_NEW_CONNECTIONS) // 8


def refuse_new_connections(sock: socket.socket) -> bool:
    """Make the kernel drop new connection attempts to the listening TCP socket sock.

    Connections already queued stay queued (accept() still returns them) and accepted
    ones are unaffected. Returns True if the filter is in place.
    """
    if not hasattr(socket, "AF_INET6") or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    if sock.type != socket.SOCK_STREAM or sock.fileno() < 0:
        return False
    program = ctypes.create_string_buffer(_DROP_NEW_CONNECTIONS, len(_DROP_NEW_CONNECTIONS))
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; }, native
    # alignment (the pointer is padded to 8 bytes); the kernel copies the program.
    fprog = struct.pack("HP", _INSTRUCTIONS, ctypes.addressof(program))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
    except OSError as exc:
        log.debug("cannot attach a socket filter to %r: %s", sock, exc)
        return False
    return True
