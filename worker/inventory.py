"""What the storage holds, for people: ``bakgrab list``.

Reads the layout only (never writes), so it is safe while grabs run. A
snapshot holding a file ``bakgrab verify`` found bad carries its count of
bad files (``damaged_files``, issue 15); a protected one its protection
(``protected``: until, note, and whether it is still in force; issue 16).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bakgrab.worker import damage, protect
from bakgrab.worker.retention import exclusive_usage, walk_name
from bakgrab.worker.storage import Storage


def inventory(root: Path, sizes: bool = True) -> list[dict[str, Any]]:
    """Every name with its complete snapshots, newest first, names sorted.

    With ``sizes``, each snapshot has ``alone_bytes``: the space it holds alone
    (files no other snapshot links to), what removing it would free. That is
    one walk per snapshot, counting inodes whose every link lies inside it.
    Each name then has ``alone_bytes``/``alone_inodes``: what the whole name
    holds alone, each inode counted once however many of its snapshots link
    to it (the usage cleanup weighs against the name's share, issue 11), and
    ``shared_bytes``, linked from outside its snapshots too."""
    storage = Storage(root)
    if not storage.root.is_dir():
        raise FileNotFoundError(f"storage {storage.root} is not a directory")
    in_progress = set(storage.inprogress_names()) if storage.state.is_dir() else set()
    by_name = storage.by_name()
    out = []
    held = protect.read_all(storage)
    for name in sorted(set(by_name) | in_progress):
        snaps = []
        bad = damage.damaged_snapshots(storage, name)
        for snap in reversed(by_name.get(name, [])):
            meta = storage.read_meta(snap.dirname)
            entry: dict[str, Any] = {
                "snapshot": snap.dirname,
                "timestamp": snap.timestamp,
                "complete": True,
                "partial": bool(meta.get("partial", False)),
                "rsync_exit": meta.get("rsync_exit"),
                "damaged_files": bad.get(snap.dirname, 0),
                "protected": None,
            }
            if snap.dirname in held:  # issue 16
                entry["protected"] = {**held[snap.dirname].to_dict(),
                                      "text": held[snap.dirname].describe()}
            if sizes:
                entry["alone_bytes"], entry["alone_inodes"] = exclusive_usage(
                    storage.root / snap.dirname)
            snaps.append(entry)
        entry = {
            "name": name,
            "count": len(snaps),
            "newest_age": round(time.time() - by_name[name][-1].timestamp) if snaps else None,
            "snapshots": snaps,
            "in_progress": name in in_progress,
            "damaged_files": len(damage.read(storage, name)),
        }
        if sizes:
            freed, shared = walk_name([storage.root / s.dirname for s in by_name.get(name, [])])
            entry["alone_bytes"] = sum(b for b, _ in freed)
            entry["alone_inodes"] = sum(i for _, i in freed)
            entry["shared_bytes"] = shared
        out.append(entry)
    return out
