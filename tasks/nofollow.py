"""Walking a tree another party writes (a client's snapshot, a restore's
staging dir) without following its symlinks: each directory is opened
relative to the one before, ``O_NOFOLLOW``, so a symlink put where a
directory was fails the open (ELOOP or ENOTDIR) instead of leading out of
the tree. Shared by both sides (the worker's manifest and btrfs unsharing,
the client's restore)."""

from __future__ import annotations

import os
from collections.abc import Iterable

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def descend(fd: int, names: Iterable[str]) -> int:
    """The fd of the directory reached from the directory ``fd`` through
    ``names``, one at a time, following no symlink on the way. ``fd`` is
    consumed: closed, or returned when ``names`` is empty."""
    try:
        for name in names:
            nxt = os.open(name, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd
