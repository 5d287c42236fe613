# The systemd service-manager protocols, sans-IO: the socket-activation environment
# (sd_listen_fds(3)), the watchdog environment (sd_watchdog_enabled(3)) and the
# notification messages (sd_notify(3)). An environment mapping, a pid and clock values
# in; a result, a message, or a precise error out. The caller passes os.environ,
# os.getpid() and the monotonic clock: nothing here imports os, socket, threading or time.
# Owns every rule about what those variables may hold and every limit on a message.
#
# Strategy. Where a service could observe a difference, behave as libsystemd does:
#   * variables meant for another process (LISTEN_PID / WATCHDOG_PID naming a different
#     pid, as after a fork by a parent that did not unset them) mean "not for us": no
#     sockets, no watchdog, and no error;
#   * a variable that is for us but malformed is an error, where libsystemd returns
#     -EINVAL; silently serving nothing would turn a broken unit file into a hang;
#   * without LISTEN_FDNAMES every descriptor is named "unknown".
# Notification messages are built here so that none can be misread by the manager: it
# splits a message at every "\n" and "\r", drops a datagram that holds a NUL byte or is
# longer than 4096 bytes, so a value holding any of those could forge another assignment
# ("STATUS=ok\nREADY=1") or lose the whole message.
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Iterator, Mapping

from servekit.errors import ServekitError

__all__ = [
    "DEFAULT_FD_NAME",
    "LISTEN_VARIABLES",
    "NOTIFY_MESSAGE_MAX",
    "SD_LISTEN_FDS_START",
    "WATCHDOG_VARIABLES",
    "ListenFds",
    "NotifyMessageError",
    "SystemdEnvironmentError",
    "encode_message",
    "escape_status",
    "extend_timeout_message",
    "format_message",
    "mainpid_message",
    "parse_listen_fds",
    "parse_message",
    "parse_notify_socket",
    "parse_watchdog",
    "ready_message",
    "reloading_message",
    "status_message",
    "stopping_message",
    "watchdog_message",
]

#: The first inherited descriptor; the rest follow without gaps (sd_listen_fds(3)).
SD_LISTEN_FDS_START = 3

#: The name of every descriptor when LISTEN_FDNAMES is absent, as in libsystemd.
DEFAULT_FD_NAME = "unknown"

#: What sd_listen_fds(unset_environment=1) removes. LISTEN_PIDFDID is set by systemd 258
#: and later as a second check on LISTEN_PID; we do not check it (LISTEN_PID suffices on
#: the systemd versions we test against) but remove it with the others.
LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PIDFDID")

#: What sd_watchdog_enabled(unset_environment=1) removes.
WATCHDOG_VARIABLES = ("WATCHDOG_USEC", "WATCHDOG_PID")

# libsystemd accepts up to INT_MAX - 3 descriptors. We stop at Linux's default fs.nr_open
# (NR_OPEN, 1024 * 1024 in include/uapi/linux/fs.h): a process cannot hold a descriptor
# numbered above it unless an administrator raised that sysctl, and no socket unit comes
# near it. The limit keeps a corrupt LISTEN_FDS from costing gigabytes of names.
MAX_LISTEN_FDS = 1024 * 1024

#: Longest datagram the manager reads: NOTIFY_BUFFER_MAX, which systemd defines as
#: PIPE_BUF (4096 on Linux). Longer messages are truncated or ignored, depending on the
#: systemd version; either way their assignments are lost.
NOTIFY_MESSAGE_MAX = 4096

# sizeof(sockaddr_un.sun_path) on Linux (unix(7)). systemd 250 and later reach longer
# paths through /proc/self/fd; we do not, and say so instead of failing in connect().
UNIX_PATH_MAX = 108

# pid_t is a signed 32-bit integer; 0 and negative values are never a process.
PID_MAX = 2**31 - 1
# systemd's USEC_INFINITY (UINT64_MAX) means "never"; a watchdog or timeout must be less.
USEC_INFINITY = 2**64 - 1

# Variable names in a notification: conventionally upper case, "X_" for extensions
# (sd_notify(3)); we also accept lower case, which the manager ignores harmlessly.
_ASSIGNMENT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# What the manager splits assignments at, or drops the datagram for.
_BREAKS = ("\n", "\r", "\0")
_STATUS_ESCAPES = str.maketrans({"\n": "\\n", "\r": "\\r", "\0": "\\0"})
_TRUNCATED = "..."


class SystemdEnvironmentError(ServekitError, ValueError):
    """A systemd variable meant for this process holds a value systemd would reject."""


class NotifyMessageError(ServekitError, ValueError):
    """A notification message the service manager would misread or drop."""


# -- socket activation -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ListenFds:
    """The descriptors a service manager passed: numbered from 3, each with a name.

    Empty when the process was not socket-activated, or when the variables were meant
    for another process. Iterating yields ``(fd, name)`` pairs in the manager's order.
    """

    names: tuple[str, ...] = ()

    @property
    def count(self) -> int:
        return len(self.names)

    @property
    def fds(self) -> range:
        return range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + len(self.names))

    def __iter__(self) -> Iterator[tuple[int, str]]:
        return zip(self.fds, self.names, strict=True)

    def __len__(self) -> int:
        return len(self.names)


def parse_listen_fds(environ: Mapping[str, str], pid: int) -> ListenFds:
    """Read LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES as sd_listen_fds_with_names(3).

    pid is the caller's process id. Returns an empty result when LISTEN_PID or
    LISTEN_FDS is absent or LISTEN_PID names another process; raises
    SystemdEnvironmentError when a variable meant for this process is malformed, or
    when LISTEN_FDNAMES does not name exactly LISTEN_FDS descriptors.
    """
    text = environ.get("LISTEN_PID")
    if text is None:
        return ListenFds()
    if _parse_pid("LISTEN_PID", text) != pid:
        return ListenFds()
    text = environ.get("LISTEN_FDS")
    if text is None:
        return ListenFds()
    count = _parse_decimal("LISTEN_FDS", text)
    if count == 0:
        # libsystemd rejects 0 too; a manager with nothing to pass leaves the variable out.
        raise SystemdEnvironmentError("LISTEN_FDS='0': a manager passing no descriptors omits it")
    if count > MAX_LISTEN_FDS:
        raise SystemdEnvironmentError(
            f"LISTEN_FDS={text!r}: more than {MAX_LISTEN_FDS} descriptors (Linux's fs.nr_open)"
        )
    names_text = environ.get("LISTEN_FDNAMES")
    if names_text is None:
        return ListenFds((DEFAULT_FD_NAME,) * count)
    # Empty names are kept, not defaulted: libsystemd splits without merging separators
    # and returns "" for an empty field, so "a::b" names three descriptors.
    names = tuple(names_text.split(":"))
    if len(names) != count:
        raise SystemdEnvironmentError(
            f"LISTEN_FDNAMES={names_text!r} names {len(names)} descriptor(s) but LISTEN_FDS={count}"
        )
    return ListenFds(names)


# -- watchdog ----------------------------------------------------------------------------


def parse_watchdog(environ: Mapping[str, str], pid: int) -> float | None:
    """Read WATCHDOG_USEC and WATCHDOG_PID as sd_watchdog_enabled(3); seconds or None.

    The result is the manager's timeout, not the ping period: sd_watchdog_enabled(3)
    recommends pinging at half of it. None when WATCHDOG_USEC is absent or WATCHDOG_PID
    names another process; SystemdEnvironmentError when a value is malformed, 0, or
    systemd's "infinity".
    """
    text = environ.get("WATCHDOG_USEC")
    if text is None:
        return None
    # Checked before WATCHDOG_PID, as libsystemd does: a broken value is an error even
    # when it turns out to be meant for another process.
    usec = _parse_decimal("WATCHDOG_USEC", text)
    if usec == 0 or usec >= USEC_INFINITY:
        raise SystemdEnvironmentError(
            f"WATCHDOG_USEC={text!r}: must be between 1 and {USEC_INFINITY - 1} microseconds"
        )
    pid_text = environ.get("WATCHDOG_PID")
    if pid_text is not None and _parse_pid("WATCHDOG_PID", pid_text) != pid:
        return None
    return usec / 1_000_000


# -- notification socket -----------------------------------------------------------------


def parse_notify_socket(environ: Mapping[str, str]) -> str | None:
    """The AF_UNIX address NOTIFY_SOCKET names, in Python's form; None if there is none.

    "/path" is a filesystem socket; "@name" a Linux abstract socket, returned as
    "\\0name". An empty value counts as absent (a way to switch notification off).
    SystemdEnvironmentError for anything else, including the "vsock:" addresses that a
    virtual machine's own service manager uses, which services never receive.
    """
    value = environ.get("NOTIFY_SOCKET")
    if not value:
        return None
    if value.startswith("/"):
        address = value
    elif value.startswith("@") and len(value) > 1:
        address = "\0" + value[1:]
    elif value.startswith("vsock"):
        raise SystemdEnvironmentError(
            f"NOTIFY_SOCKET={value!r}: AF_VSOCK notification is not supported, "
            "only AF_UNIX ('/path' or '@abstract')"
        )
    else:
        raise SystemdEnvironmentError(
            f"NOTIFY_SOCKET={value!r}: expected an absolute path or '@' and an abstract name"
        )
    # Python encodes AF_UNIX addresses with the filesystem encoding (UTF-8 with
    # surrogateescape on Linux); measure what the kernel will see.
    size = len(address.encode("utf-8", "surrogateescape"))
    if size > UNIX_PATH_MAX:
        raise SystemdEnvironmentError(
            f"NOTIFY_SOCKET={value!r}: {size} bytes, longer than sun_path ({UNIX_PATH_MAX})"
        )
    return address


# -- notification messages -----------------------------------------------------------------


def format_message(assignments: Iterable[tuple[str, str | int]]) -> str:
    """Join NAME=value assignments into one message, refusing what would be misread.

    Values may not hold a line break or NUL (the manager would read the rest as another
    assignment, or drop the message); use status_message() for free text, which escapes
    them instead.
    """
    lines = []
    for name, value in assignments:
        if not _ASSIGNMENT_NAME.match(name):
            raise NotifyMessageError(f"notification variable name {name!r} is not NAME=")
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise NotifyMessageError(f"{name}={value!r}: a value is a str or an int")
        text = str(value)
        for forbidden in _BREAKS:
            if forbidden in text:
                raise NotifyMessageError(
                    f"{name}={text!r}: values may not contain {forbidden!r}; "
                    "the manager would split or drop the message"
                )
        lines.append(f"{name}={text}")
    if not lines:
        raise NotifyMessageError("a notification message needs at least one assignment")
    return "\n".join(lines)


def escape_status(text: str, limit: int = NOTIFY_MESSAGE_MAX - len("STATUS=")) -> str:
    """Make free text safe as one STATUS= value of at most limit UTF-8 bytes.

    Line feeds, carriage returns and NULs become the two-character escapes \\n, \\r and
    \\0, so the text stays one line in `systemctl status` and cannot end its
    assignment; everything else, backslashes included, passes unchanged since nothing
    parses STATUS back. Text that cannot be encoded (lone surrogates from undecodable
    file names) is backslash-escaped. Longer text is cut at a character boundary and
    ends with "...".
    """
    if limit < len(_TRUNCATED):
        raise NotifyMessageError(f"no room for a status: {limit} bytes left in the message")
    data = text.translate(_STATUS_ESCAPES).encode("utf-8", "backslashreplace")
    if len(data) <= limit:
        return data.decode("utf-8")
    head = data[: limit - len(_TRUNCATED)].decode("utf-8", "ignore")
    return head + _TRUNCATED


def ready_message(status: str | None = None) -> str:
    """READY=1: start-up, or a reload, is complete (Type=notify, Type=notify-reload)."""
    return _with_status([("READY", "1")], status)


def stopping_message(status: str | None = None) -> str:
    """STOPPING=1: the service has begun shutting down."""
    return _with_status([("STOPPING", "1")], status)


def reloading_message(monotonic_usec: int, status: str | None = None) -> str:
    """RELOADING=1 with MONOTONIC_USEC=, which Type=notify-reload requires (systemd 253).

    monotonic_usec is CLOCK_MONOTONIC in microseconds when the reload began; the
    manager uses it to tell this reload from an earlier one. Older managers ignore it.
    """
    if isinstance(monotonic_usec, bool) or not isinstance(monotonic_usec, int):
        raise NotifyMessageError(f"MONOTONIC_USEC={monotonic_usec!r}: expected an int")
    if not 0 <= monotonic_usec < USEC_INFINITY:
        raise NotifyMessageError(f"MONOTONIC_USEC={monotonic_usec}: out of range")
    return _with_status([("RELOADING", "1"), ("MONOTONIC_USEC", monotonic_usec)], status)


def status_message(text: str) -> str:
    """STATUS=text, escaped and cut to fit (see escape_status); "" clears the status."""
    return _with_status([], text)


def watchdog_message() -> str:
    """WATCHDOG=1: the keep-alive ping WatchdogSec= asks for."""
    return "WATCHDOG=1"


def mainpid_message(pid: int) -> str:
    """MAINPID=pid: the service's main process is now pid."""
    if isinstance(pid, bool) or not isinstance(pid, int) or not 0 < pid <= PID_MAX:
        raise NotifyMessageError(f"MAINPID={pid!r}: a pid is an int from 1 to {PID_MAX}")
    return format_message([("MAINPID", pid)])


def extend_timeout_message(seconds: float) -> str:
    """EXTEND_TIMEOUT_USEC=: the next message will come within this many seconds.

    Rounded up to whole microseconds, so the extension is never shorter than asked.
    """
    if not (math.isfinite(seconds) and seconds > 0):
        raise NotifyMessageError(f"EXTEND_TIMEOUT_USEC from {seconds!r} s: must be positive")
    usec = math.ceil(seconds * 1_000_000)
    if usec >= USEC_INFINITY:
        raise NotifyMessageError(f"EXTEND_TIMEOUT_USEC from {seconds!r} s: out of range")
    return format_message([("EXTEND_TIMEOUT_USEC", usec)])


def encode_message(message: str) -> bytes:
    """The datagram for message: UTF-8, no NUL, at most NOTIFY_MESSAGE_MAX bytes."""
    if not message:
        raise NotifyMessageError("empty notification message")
    if "\0" in message:
        raise NotifyMessageError(
            f"notification message {message[:40]!r}... holds a NUL byte; the manager drops it"
        )
    try:
        data = message.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise NotifyMessageError(f"notification message is not valid UTF-8 text: {exc}") from None
    if len(data) > NOTIFY_MESSAGE_MAX:
        raise NotifyMessageError(
            f"notification message of {len(data)} bytes is longer than {NOTIFY_MESSAGE_MAX}"
        )
    return data


def parse_message(data: bytes) -> dict[str, str]:
    """Read a notification datagram as the manager does: the receiving side, for tests
    and for supervisors that collect their workers' notifications.

    Assignments are separated by "\\n" or "\\r"; lines without "=" are skipped and the
    first assignment of a name wins (the manager looks names up with
    strv_find_startswith). Invalid UTF-8 is replaced rather than refused.
    """
    fields: dict[str, str] = {}
    for line in re.split(r"[\r\n]", data.decode("utf-8", "replace")):
        name, sep, value = line.partition("=")
        if sep and name and name not in fields:
            fields[name] = value
    return fields


# -- helpers ----------------------------------------------------------------------------------


def _with_status(assignments: list[tuple[str, str | int]], status: str | None) -> str:
    head = format_message(assignments) if assignments else ""
    if status is None:
        if not head:
            raise NotifyMessageError("a notification message needs at least one assignment")
        return head
    prefix = f"{head}\nSTATUS=" if head else "STATUS="
    budget = NOTIFY_MESSAGE_MAX - len(prefix.encode("utf-8"))
    return prefix + escape_status(status, budget)


def _parse_decimal(name: str, text: str) -> int:
    # ASCII digits only: int() would also take " 3", "+3", "3_0" and other scripts' digits,
    # none of which libsystemd's parsers accept.
    if not (text.isascii() and text.isdigit()):
        raise SystemdEnvironmentError(f"{name}={text!r}: expected a decimal number")
    return int(text)


def _parse_pid(name: str, text: str) -> int:
    pid = _parse_decimal(name, text)
    if not 0 < pid <= PID_MAX:
        raise SystemdEnvironmentError(f"{name}={text!r}: a pid is from 1 to {PID_MAX}")
    return pid
