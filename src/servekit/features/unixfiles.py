# Unix socket files: created with their permissions atomically, replaced only when
# stale, removed only by their owner. Used by servekit.features.listeners.
#
# Strategy. A socket is bound under a random temporary name in the same directory, given
# its mode and owner there, and published under its final name only once it listens,
# with link() (which never replaces an existing file) or, on a file system without hard
# links, rename(). The final path therefore never exists with other permissions or
# refusing connections, and nothing depends on the umask, which is process-wide and so
# racy with threads. A file already at the path is replaced only when it is a socket
# nobody listens on (connect() is refused); a live socket or a file of another type
# stops start-up with a clear error and is left alone. On close the file is removed
# only by the process that bound it, and only if it is still the same file
# (st_dev, st_ino), so a successor's socket is never deleted.
from __future__ import annotations

import dataclasses
import errno
import grp
import logging
import os
import pwd
import secrets
import socket
import stat

from servekit.errors import ListenerError
from servekit.features.addresses import UNIX_PATH_MAX
from servekit.knobs import SettingError

__all__ = [
    "UnixSocketFile",
    "bind_socket_file",
    "check_path",
    "file_kind",
    "publish",
    "remove_if_same",
    "remove_stale",
    "resolve_ids",
    "unlink_quietly",
]

log = logging.getLogger("servekit.listeners")

# A temporary name is ".sk" and 8 random hex digits: 16**8 names, so the bounded retry
# on a clash is there for correctness, not because a clash is expected.
_TEMP_PREFIX = ".sk"
_TEMP_ATTEMPTS = 8
# Publishing retries when a stale file is removed and something re-creates the path
# before our link(); more than a few rounds means another server is starting on it.
_PUBLISH_ATTEMPTS = 3
# errno values with which link() says the file system has no hard links for us.
_NO_HARD_LINKS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK})


def file_kind(mode: int) -> str:
    """A file's type in words, for error messages."""
    kinds = (
        (stat.S_ISREG, "regular file"),
        (stat.S_ISDIR, "directory"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISLNK, "symbolic link"),
        (stat.S_ISSOCK, "socket"),
    )
    return next((name for test, name in kinds if test(mode)), "file of unknown type")


@dataclasses.dataclass(eq=False)
class UnixSocketFile:
    """A Unix socket file this process created: where, which file, and who may remove it."""

    path: str  # absolute final path
    temporary: str  # absolute temporary path, the name the socket is bound to
    pid: int
    identity: tuple[int, int]  # (st_dev, st_ino)
    published: bool = False


def remove_if_same(path: str, identity: tuple[int, int]) -> None:
    """Remove path if it is still the file identified by (st_dev, st_ino)."""
    try:
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) != identity:
            log.debug("not removing %s: it is another server's socket file now", path)
            return
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        # Closing must finish: a file we cannot remove is reported, not raised.
        log.warning("could not remove socket file %s: %s", path, exc.strerror)


def bind_socket_file(
    sock: socket.socket,
    path: str,
    mode: int,
    ids: tuple[int, int],
    label: str,
    *,
    owner: object = None,
    group: object = None,
) -> UnixSocketFile:
    """Bind sock under a temporary name next to path, with its final mode and owner.

    publish() later gives it the name path. ids is (uid, gid) for chown, -1 for
    "unchanged"; owner and group are what the user asked for, for the error message.
    """
    # Linux creates the file with the socket inode's mode minus the umask, so after this
    # the file never has a permission bit that mode lacks, even under its temporary name.
    os.fchmod(sock.fileno(), mode)
    directory = os.path.dirname(path)
    for _ in range(_TEMP_ATTEMPTS):
        temporary = os.path.join(directory, _TEMP_PREFIX + secrets.token_hex(4))
        length = len(os.fsencode(temporary))
        if length > UNIX_PATH_MAX:
            spare = UNIX_PATH_MAX - (length - len(os.fsencode(path)))
            raise ListenerError(
                errno.ENAMETOOLONG,
                f"{label}: the temporary name {temporary!r}, under which the "
                f"socket gets its permissions before it appears, is {length} bytes, over "
                f"the kernel's {UNIX_PATH_MAX}; use a path of at most {spare} bytes",
            )
        try:
            sock.bind(temporary)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                continue
            raise
        break
    else:
        raise ListenerError(
            errno.EEXIST,
            f"{label}: {_TEMP_ATTEMPTS} random temporary names in "
            f"{directory or '.'} were all taken",
        )
    try:
        os.chmod(temporary, mode)  # exactly mode: the umask may have removed bits
        if ids != (-1, -1):
            try:
                os.chown(temporary, *ids)
            except OSError as exc:
                raise ListenerError(
                    exc.errno,
                    f"{label}: cannot give the socket file to owner "
                    f"{owner!r}, group {group!r}: "
                    f"{exc.strerror} (a new owner needs root or CAP_CHOWN; a group, "
                    "membership of it)",
                ) from None
        st = os.lstat(temporary)
    except BaseException:
        unlink_quietly(temporary)
        raise
    return UnixSocketFile(
        os.path.abspath(path), os.path.abspath(temporary), os.getpid(), (st.st_dev, st.st_ino)
    )


def unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass  # already gone, or never ours to remove; nothing to report


def resolve_ids(owner: str | int | None, owner_group: str | int | None) -> tuple[int, int]:
    """(uid, gid) for os.chown, -1 for "unchanged"; names resolved before binding."""
    uid = gid = -1
    if isinstance(owner, str) and owner.isdigit():
        owner = int(owner)
    if isinstance(owner_group, str) and owner_group.isdigit():
        owner_group = int(owner_group)
    if isinstance(owner, int):
        uid = owner
    elif owner is not None:
        try:
            uid = pwd.getpwnam(owner).pw_uid
        except KeyError:
            raise SettingError(f"unix_socket_owner={owner!r}: no such user") from None
    if isinstance(owner_group, int):
        gid = owner_group
    elif owner_group is not None:
        try:
            gid = grp.getgrnam(owner_group).gr_gid
        except KeyError:
            raise SettingError(f"unix_socket_group={owner_group!r}: no such group") from None
    return uid, gid


def check_path(path: str, label: str, kind: int) -> os.stat_result | None:
    """None if nothing is at path; its stat if it is a socket nobody listens on.

    Raises ListenerError, touching nothing, for a live socket or a file that is not a
    socket.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ListenerError(exc.errno, f"{label}: cannot inspect {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ListenerError(
            errno.EEXIST,
            f"{label}: {path} exists and is a {file_kind(st.st_mode)}, not a "
            "socket; not removing it",
        )
    with socket.socket(socket.AF_UNIX, kind) as probe:
        # Non-blocking: a live server whose backlog is full makes connect() wait.
        probe.setblocking(False)
        try:
            probe.connect(path)
        except FileNotFoundError:
            return None  # removed meanwhile
        except ConnectionRefusedError:
            return st  # a file without a socket behind it: a crashed server's
        except BlockingIOError:
            pass  # alive, with a full backlog
        except OSError as exc:
            if exc.errno != errno.EPROTOTYPE:  # alive, and of the other socket type
                raise ListenerError(
                    exc.errno,
                    f"{label}: cannot tell whether {path} is in use: "
                    f"connect() failed with {exc.strerror}; not removing it",
                ) from None
    raise ListenerError(
        errno.EADDRINUSE,
        f"{label}: another server is listening on {path}; not removing its socket file",
    )


def remove_stale(path: str, label: str, kind: int) -> None:
    st = check_path(path, label, kind)
    if st is None:
        return
    try:
        now = os.lstat(path)
        if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
            os.unlink(path)
            log.info("removed stale socket file %s (nothing was listening on it)", path)
    except FileNotFoundError:
        pass


def publish(unix_file: UnixSocketFile, label: str, kind: int) -> None:
    """Give the bound socket its final name; never replace a live socket or a non-socket."""
    for _ in range(_PUBLISH_ATTEMPTS):
        try:
            # link() fails with EEXIST instead of replacing: nothing that appeared at the
            # path since we looked is ever overwritten.
            os.link(unix_file.temporary, unix_file.path)
        except FileExistsError:
            remove_stale(unix_file.path, label, kind)
            continue
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise ListenerError(exc.errno, f"cannot create {label}: {exc.strerror}") from None
            # No hard links here: check, then rename() over a stale file atomically.
            # Another server starting on this path in the instant between could lose
            # its file; only link() closes that gap.
            check_path(unix_file.path, label, kind)
            os.rename(unix_file.temporary, unix_file.path)
        else:
            unlink_quietly(unix_file.temporary)
        unix_file.published = True
        return
    raise ListenerError(
        errno.EADDRINUSE,
        f"{label}: {unix_file.path} was re-created {_PUBLISH_ATTEMPTS} times while "
        "a stale socket file was being replaced; is another server starting on it?",
    )
