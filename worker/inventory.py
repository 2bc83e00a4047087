"""What the storage holds, for people: ``bakgrab list``.

Reads the layout only (never writes), so it is safe while grabs run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from worker.storage import Storage


def inventory(root: Path) -> list[dict[str, Any]]:
    """Every name with its complete snapshots, newest first, names sorted."""
    storage = Storage(root)
    if not storage.root.is_dir():
        raise FileNotFoundError(f"storage {storage.root} is not a directory")
    in_progress = set(storage.inprogress_names()) if storage.state.is_dir() else set()
    by_name = storage.by_name()
    out = []
    for name in sorted(set(by_name) | in_progress):
        snaps = []
        for snap in reversed(by_name.get(name, [])):
            meta = storage.read_meta(snap.dirname)
            snaps.append({
                "snapshot": snap.dirname,
                "timestamp": snap.timestamp,
                "complete": True,
                "partial": bool(meta.get("partial", False)),
                "rsync_exit": meta.get("rsync_exit"),
            })
        out.append({"name": name, "snapshots": snaps, "in_progress": name in in_progress})
    return out
