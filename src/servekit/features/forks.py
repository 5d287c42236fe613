# How many times this process came out of a fork() as the child. State made before a fork
# (a pool, a metrics recorder) belongs to the parent; a feature records ``count`` with it
# and compares, which tells the two processes apart without a getpid() system call on
# every connection or message.
from __future__ import annotations

import os

__all__ = ["count"]

#: Forks this process came out of as the child (0 in the process that started).
count = 0


def _after_fork_in_child() -> None:
    global count
    count += 1


os.register_at_fork(after_in_child=_after_fork_in_child)
