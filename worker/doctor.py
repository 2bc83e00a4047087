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
from bakgrab.tasks.errors import ConfigError
from bakgrab.worker import sandbox


def checks(user: str | None, storage_dir: str | None) -> Iterator[Check]:
    yield from capabilities("worker", caps.WORKER_CAPS, "FAIL")
    yield from rsync_sandbox(Path(storage_dir) if storage_dir else None)
    if storage_dir:
        yield from storage(Path(storage_dir))


def rsync_sandbox(storage_dir: Path | None) -> Iterator[Check]:
    """Whether the kernel can confine each rsync to its name's paths (issue 11)."""
    if sandbox.abi() < sandbox.MIN_ABI:
        yield "FAIL", "rsync sandbox", (
            f"{sandbox.describe()}: the worker refuses to start; enable Landlock in the "
            "kernel (lsm= boot parameter), or set sandbox = \"off\" knowingly "
            "(docs/security.md)")
        return
    yield "ok", "rsync sandbox", sandbox.describe()
    if storage_dir is not None:
        try:
            sandbox.check_storage(storage_dir)
        except ConfigError as e:
            yield "FAIL", "storage place", str(e)


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
