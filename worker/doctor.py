"""The backup-host half of ``bakgrab doctor``: the capabilities rsync needs to
keep all metadata, and a storage directory the worker can use safely."""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

from bakgrab.tasks import caps
from bakgrab.tasks.doctor import Check, capabilities


def checks(user: str | None, storage_dir: str | None) -> Iterator[Check]:
    yield from capabilities("worker", caps.WORKER_CAPS, "FAIL")
    if storage_dir:
        yield from storage(Path(storage_dir))


def storage(path: Path) -> Iterator[Check]:
    if not path.is_dir():
        yield "FAIL", "storage", f"{path} is not a directory"
        return
    st = path.stat()
    if st.st_uid not in (os.geteuid(), 0):
        yield "warn", "storage owner", f"{path} belongs to uid {st.st_uid}, not to this user"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        yield "FAIL", "storage mode", f"{path} is group/world-writable: chmod go-w {path}"
    else:
        yield "ok", "storage mode", oct(stat.S_IMODE(st.st_mode))
    if not os.access(path, os.W_OK):
        yield "FAIL", "storage access", f"{path} is not writable by this user"
    state = path / ".bakgrab"
    if state.exists() and stat.S_IMODE(state.stat().st_mode) != 0o700:
        yield "FAIL", "state dir", f"{state} must be 0700: chmod 700 {state}"
    free = shutil.disk_usage(path).free
    yield "ok", "storage free", f"{free / (1 << 30):.1f} GiB"
