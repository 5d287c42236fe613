# Switching to an unprivileged user and group once the sockets are bound (--user,
# --group), so that a server can listen on port 80 or in /run without keeping root.
#
# Strategy. The names are looked up and the switch is checked to be possible before
# anything binds (a typo must not surface after root has bound the ports). The switch
# itself happens after binding and before the workers are forked, in the one process
# that exists then, so every worker starts unprivileged; and the kernel clears a
# process's parent-death signal when its credentials change, which must therefore not
# happen in a worker after it has set one (servekit.process.supervisor).
#
# Order matters: supplementary groups and the group while still root, the user last;
# afterwards, regaining root must fail, or the switch did not happen.
from __future__ import annotations

import dataclasses
import grp
import os
import pwd

from servekit.errors import ServekitError

__all__ = ["Credentials", "PrivilegeError", "drop_privileges", "plan_credentials"]


class PrivilegeError(ServekitError):
    """The user or group cannot be switched to."""


@dataclasses.dataclass(frozen=True)
class Credentials:
    """Who the server runs as after binding; None fields stay as they are."""

    uid: int | None
    gid: int | None
    user_name: str | None  # for the supplementary groups (initgroups)

    def groups(self) -> list[int]:
        """The groups the process will have: the group, and the user's supplementary ones."""
        gids = [] if self.gid is None else [self.gid]
        if self.user_name is not None and self.gid is not None:
            gids = os.getgrouplist(self.user_name, self.gid)
        return gids

    def describe(self) -> str:
        parts = []
        if self.uid is not None:
            parts.append(f"user {self.user_name or self.uid} (uid {self.uid})")
        if self.gid is not None:
            parts.append(f"group gid {self.gid}")
        return ", ".join(parts)


def plan_credentials(user: str | int | None, group: str | int | None) -> Credentials | None:
    """Look the names up and check that switching is possible; None when nothing changes.

    Raises PrivilegeError for an unknown name, or when the process is not root and would
    have to change its user or group.
    """
    if user is None and group is None:
        return None
    uid = gid = None
    user_name = None
    if user is not None:
        try:
            entry = pwd.getpwuid(user) if isinstance(user, int) else pwd.getpwnam(user)
        except KeyError:
            raise PrivilegeError(f"no such user {user!r}") from None
        uid, gid, user_name = entry.pw_uid, entry.pw_gid, entry.pw_name
    if group is not None:
        try:
            gid = (grp.getgrgid(group) if isinstance(group, int) else grp.getgrnam(group)).gr_gid
        except KeyError:
            raise PrivilegeError(f"no such group {group!r}") from None
    unchanged = (uid is None or uid == os.geteuid()) and (gid is None or gid == os.getegid())
    if unchanged:
        return None
    if os.geteuid() != 0:
        raise PrivilegeError(f"switching needs root (running as uid {os.geteuid()})")
    return Credentials(uid, gid, user_name)


def drop_privileges(credentials: Credentials) -> None:
    """Become credentials' group and user for good. Call after binding, before forking."""
    try:
        if credentials.gid is not None:
            if credentials.user_name is not None:
                os.initgroups(credentials.user_name, credentials.gid)
            else:
                os.setgroups([credentials.gid])
            os.setresgid(credentials.gid, credentials.gid, credentials.gid)
        if credentials.uid is not None:
            os.setresuid(credentials.uid, credentials.uid, credentials.uid)
    except OSError as exc:
        raise PrivilegeError(
            f"cannot switch to {credentials.describe()}: {exc.strerror or exc}"
        ) from None
    if credentials.uid not in (None, 0):
        try:
            os.setuid(0)
        except PermissionError:
            return  # as it must be: root is gone for good
        raise PrivilegeError(f"switched to {credentials.describe()} but could regain root")
