# The pid file (--pid FILE): the server's process id, for init scripts and monitoring
# that expect one. Written once the server listens, removed when it exits.
#
# Strategy. Written to a temporary name in the same directory and renamed over the
# final one, so a reader never sees an empty or half-written file. Removed only if it
# still holds our pid: a newer instance may have taken the name over. A file left by a
# process that died without removing it (SIGKILL) is replaced, never a reason to refuse
# to start: refusing would turn a crash into an outage, and pids are reused anyway.
from __future__ import annotations

import logging
import os
import stat
from collections.abc import Sequence

from servekit.errors import ServekitError

__all__ = ["PidFile", "PidFileError"]

log = logging.getLogger("servekit.cli")


class PidFileError(ServekitError):
    """The pid file cannot be written."""


class PidFile:
    """One pid file; write() after binding, remove() on the way out."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self._pid: int | None = None

    def check(self, uid: int | None = None, gids: Sequence[int] = ()) -> None:
        """Before binding: the directory exists and, when the server will switch to uid
        (and groups gids), that user may create and remove files in it.

        The file is written after switching user, by the user that must also remove it
        on exit; a file root wrote into /run could not be removed then. The permission
        bits are checked (ACLs are not seen: a directory they open is still refused).
        """
        directory = os.path.dirname(self.path)
        if not os.path.isdir(directory):
            raise PidFileError(f"directory {directory} does not exist")
        if os.path.isdir(self.path):
            raise PidFileError(f"{self.path} is a directory")
        if uid is not None and uid != 0 and not _writable_by(directory, uid, gids):
            raise PidFileError(
                f"directory {directory} is not writable by uid {uid}, which writes the pid "
                "file after switching user and removes it on exit"
            )

    def write(self) -> None:
        pid = os.getpid()
        previous = self._read()
        if previous not in (None, pid) and _alive(previous):
            log.warning("pid file %s named live process %d; replacing it", self.path, previous)
        temporary = f"{self.path}.{pid}.tmp"
        try:
            with open(temporary, "w") as fh:
                fh.write(f"{pid}\n")
            os.replace(temporary, self.path)
        except OSError as exc:
            try:
                os.unlink(temporary)
            except OSError:
                pass  # never created
            raise PidFileError(
                f"cannot write pid file {self.path}: {exc.strerror or exc}"
            ) from None
        self._pid = pid

    def remove(self) -> None:
        if self._pid is None or self._pid != os.getpid():
            return  # never written, or a forked child: only the writer removes it
        if self._read() == self._pid:
            try:
                os.unlink(self.path)
            except OSError as exc:
                log.warning("cannot remove pid file %s: %s", self.path, exc.strerror or exc)
        self._pid = None

    def _read(self) -> int | None:
        try:
            with open(self.path) as fh:
                return int(fh.read().strip() or "0") or None
        except (OSError, ValueError):
            return None


def _writable_by(directory: str, uid: int, gids: Sequence[int]) -> bool:
    info = os.stat(directory)
    if info.st_uid == uid:
        return bool(info.st_mode & stat.S_IWUSR and info.st_mode & stat.S_IXUSR)
    if info.st_gid in gids:
        return bool(info.st_mode & stat.S_IWGRP and info.st_mode & stat.S_IXGRP)
    return bool(info.st_mode & stat.S_IWOTH and info.st_mode & stat.S_IXOTH)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True
