"""The history of one path across the snapshots of a name: ``bakgrab versions``.

Fast by the hard-link identity: a path unchanged since the previous snapshot
is the same inode there (rsync --link-dest linked it), so one lstat per
snapshot tells the story without reading any content. A row whose inode
``bakgrab verify`` found bad says ``damaged`` (issue 15).

On btrfs (issue 14) each snapshot is a subvolume with its own ``st_dev``; a
snapshot keeps every file's inode number and ctime, and rsync ``--inplace``
changing a file (content or metadata) moves its ctime. So the identity is
the inode number with its ctime, which on hard-linked trees says the same
as (device, inode): one inode has one ctime.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bakgrab.tasks.errors import InvalidRequest
from bakgrab.tasks.request import check_name, check_paths
from bakgrab.worker import damage
from bakgrab.worker.storage import Storage


def versions(root: Path, name: str, path: str) -> list[dict[str, Any]]:
    """One row per snapshot of ``name``, oldest first: whether ``path`` is there,
    its size and mtime, and whether it changed since the previous snapshot."""
    name = check_name(name)
    (rel,) = check_paths([path])
    storage = Storage(root)
    rows = []
    bad = {(snap, int(rec["ino"])) for rec in damage.read(storage, name)
           for snap in rec["where"]}
    previous: tuple[int, int] | None = None
    for snap in storage.snapshots(name):
        base = os.path.realpath(storage.root / snap.dirname)
        target = os.path.join(base, rel)
        parent = os.path.realpath(os.path.dirname(target))
        if parent != base and not parent.startswith(base + os.sep):
            raise InvalidRequest(f"{path!r} leads outside the snapshot (a symlink)")
        try:
            st = os.lstat(target)
        except FileNotFoundError:
            rows.append({"snapshot": snap.dirname, "present": False})
            previous = None
            continue
        ident = (st.st_ino, st.st_ctime_ns)  # (not st_dev: see the module docstring)
        rows.append({
            "snapshot": snap.dirname,
            "present": True,
            "size": st.st_size,
            "mtime": st.st_mtime,
            "inode": st.st_ino,
            "changed": ident != previous,
            "damaged": (snap.dirname, st.st_ino) in bad,
        })
        previous = ident
    return rows
