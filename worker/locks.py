"""flock(2) locks under STORAGE: one grab per name, one cleanup at a time.

flock is released by the kernel when the holder dies, so a crashed worker
never leaves a stale lock behind. The lock files themselves stay (they are
empty and harmless).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from bakgrab.tasks.errors import Busy


@contextlib.contextmanager
def held(path: Path, *, wait: float = 0.0, what: str = "") -> Iterator[None]:
    """Hold an exclusive flock on ``path``; Busy if not had within ``wait`` s."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise Busy(f"{what or path.name} is busy: another grab holds it") from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)


def is_held(path: Path) -> bool:
    """Whether some process holds the lock on ``path`` right now."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


@contextlib.contextmanager
def one_of(paths: list[Path], *, what: str) -> Iterator[None]:
    """Hold an exclusive flock on the first free file of ``paths`` (a pool of
    slots); Busy at once if every one is held."""
    for path in paths:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            yield
        finally:
            os.close(fd)
        return
    raise Busy(f"{what}: all {len(paths)} slot(s) are busy with its other jobs")
