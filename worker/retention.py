"""Free-space cleanup: keep as many snapshots as possible, for as long as possible.

Before each grab, under the storage lock, :func:`make_room` applies the
original design's rule and removes snapshots only while the storage lacks
space (or inodes), and only as many as needed:

* ``min_free = max(min_free_avg * used / snapshots, min_free_abs)`` (the
  average term only when ``min_free_avg`` is set and snapshots exist); the
  same for inodes with ``min_free_inodes``;
* while free space or inodes are short: take the name with the most
  snapshots (ties: the name that sorts last), remove its oldest, measure
  again;
* a name never goes below ``min_keep`` snapshots, so the newest snapshot of a
  name, the one every running grab of that name uses as ``--link-dest``, is
  never removed; only complete snapshots of the layout are ever candidates;
* if that cannot free enough, :class:`NoSpace` says how much is free, what is
  needed and ``min_keep``, and nothing more is removed.

A removal is a rename into ``.bakgrab/trash`` (atomic: the snapshot leaves the
layout at once), then a delete of the tree at idle I/O priority. A crash
mid-delete leaves only trash, which the next cleanup finishes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from bakgrab.tasks import caps, process
from bakgrab.tasks.config import Settings, parse_size
from bakgrab.tasks.errors import NoSpace
from bakgrab.tasks.result import human_bytes
from bakgrab.worker import locks
from bakgrab.worker.storage import Snapshot, Storage

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Usage:
    """What statvfs says of the storage filesystem."""

    free_bytes: int
    used_bytes: int
    free_inodes: int
    used_inodes: int
    has_inodes: bool


def measure(path: Path) -> Usage:
    st = os.statvfs(path)
    return Usage(
        free_bytes=st.f_bavail * st.f_frsize,
        used_bytes=(st.f_blocks - st.f_bfree) * st.f_frsize,
        free_inodes=st.f_favail,
        used_inodes=st.f_files - st.f_ffree,
        has_inodes=st.f_files > 0,
    )


@dataclasses.dataclass(frozen=True)
class Need:
    bytes: int
    inodes: int

    def short(self, usage: Usage) -> str | None:
        """Why ``usage`` falls short of this need, or None."""
        if usage.free_bytes < self.bytes:
            return f"free space {human_bytes(usage.free_bytes)} < {human_bytes(self.bytes)}"
        if usage.has_inodes and usage.free_inodes < self.inodes:
            return f"free inodes {usage.free_inodes} < {self.inodes}"
        return None


def need(settings: Settings, usage: Usage, snapshots: int) -> Need:
    """The free bytes and inodes a grab needs, by the original design's rule."""
    need_bytes = parse_size(settings.min_free_abs)
    need_inodes = settings.min_free_inodes
    if settings.min_free_avg and snapshots:
        need_bytes = max(int(settings.min_free_avg * usage.used_bytes / snapshots), need_bytes)
        need_inodes = max(int(settings.min_free_avg * usage.used_inodes / snapshots), need_inodes)
    return Need(need_bytes, need_inodes)


def removal_queue(
    inventory: Mapping[str, Sequence[Snapshot]], min_keep: int
) -> Iterator[Snapshot]:
    """Snapshots in the order cleanup removes them, never leaving a name with
    fewer than ``min_keep`` (>= 1)."""
    if min_keep < 1:
        raise ValueError("min_keep must be at least 1")
    left = {name: sorted(snaps) for name, snaps in inventory.items() if snaps}
    while left:
        name = max(left, key=lambda n: (len(left[n]), n))
        if len(left[name]) <= min_keep:
            return
        yield left[name].pop(0)


def make_room(
    storage: Storage,
    settings: Settings,
    *,
    dry_run: bool = False,
    measure: Callable[[Path], Usage] = measure,
    current: str | None = None,
) -> list[dict[str, Any]]:
    """Remove snapshots until the storage has what a grab needs; the removals,
    in order, each with its reason. NoSpace if that cannot be done."""
    removed: list[dict[str, Any]] = []
    if not dry_run:
        # Leftovers of a crash are deleted outside the storage lock: other
        # grabs' cleanups need not wait for a tree that is no backup anymore.
        purge_trash(storage)
    with locks.held(storage.state / "locks" / "storage.lock", wait=3600, what="storage"):
        if not dry_run:
            removed += remove_stale_inprogress(storage, settings)
        inventory = storage.by_name()
        count = sum(len(s) for s in inventory.values())
        usage = measure(storage.root)
        wanted = need(settings, usage, count)
        why = wanted.short(usage)
        if why is None:
            return removed
        if not dry_run:
            # Before any backup goes: in-progress dirs of failed grabs (no
            # grab holds their name) are not backups.
            for name in storage.inprogress_names():
                if name == current or locks.is_held(storage.lock(name)):
                    continue
                target = storage.trash / f".inprogress-{name}.{time.time_ns()}"
                with caps.raised("dac_override"):
                    os.rename(storage.inprogress(name), target)
                delete_tree(target)
                log.info("removed in-progress dir of a failed grab of %s: %s", name, why)
                removed.append({"snapshot": f"in-progress {name}", "reason": why,
                                "rule": "a failed grab's partial data goes before any backup"})
                usage = measure(storage.root)
                why = wanted.short(usage)
                if why is None:
                    return removed
        for snap in removal_queue(inventory, settings.min_keep):
            entry = {"snapshot": snap.dirname, "reason": why,
                     "rule": f"{snap.name} has the most snapshots; its oldest goes first"}
            if dry_run:
                # Without removing we cannot re-measure: estimate from what the
                # snapshot holds alone (bytes no other snapshot shares).
                alone_bytes, alone_inodes = exclusive_usage(storage.root / snap.dirname)
                usage = dataclasses.replace(
                    usage,
                    free_bytes=usage.free_bytes + alone_bytes,
                    free_inodes=usage.free_inodes + alone_inodes,
                )
            else:
                remove_snapshot(storage, snap)
                usage = measure(storage.root)
            log.info("%s snapshot %s: %s (need %s and %d inodes free)",
                     "would remove" if dry_run else "removed", snap.dirname, why,
                     human_bytes(wanted.bytes), wanted.inodes)
            removed.append(entry)
            why = wanted.short(usage)
            if why is None:
                return removed
        if dry_run:
            removed.append({"snapshot": None, "reason": why, "rule": "cannot free enough"})
            return removed
        raise NoSpace(
            f"not enough space on the storage: {why} (need {human_bytes(wanted.bytes)} and "
            f"{wanted.inodes} inodes free); every name is down to min_keep={settings.min_keep} "
            "snapshots. Add space, lower min_free_abs/min_free_avg, or lower min_keep."
        )


def remove_snapshot(storage: Storage, snap: Snapshot) -> None:
    """Take ``snap`` out of the layout at once, then delete its tree."""
    target = storage.trash / f"{snap.dirname}.{time.time_ns()}"
    with caps.raised("dac_override"):
        os.rename(storage.root / snap.dirname, target)
    for suffix in (".json", ".exclude"):
        storage.meta(snap.dirname, suffix).unlink(missing_ok=True)
    delete_tree(target)


def delete_tree(path: Path) -> None:
    """rm -rf at idle I/O priority, staying on this filesystem."""
    process.run(
        ["ionice", "-c", "3", "-t", "rm", "-rf", "--one-file-system", "--", str(path)],
        timeout=None,
    )


def purge_trash(storage: Storage) -> None:
    """Finish deletes a crash interrupted (skipped if another worker is at it)."""
    try:
        with locks.held(storage.state / "locks" / "trash.lock", what="trash"):
            for entry in sorted(storage.trash.iterdir()):
                delete_tree(entry)
    except locks.Busy:
        pass


def remove_stale_inprogress(storage: Storage, settings: Settings) -> list[dict[str, Any]]:
    """In-progress dirs of grabs that failed long ago are not backups: remove
    them first. A dir whose name is locked (a grab is running) is kept."""
    removed = []
    now = time.time()
    for name in storage.inprogress_names():
        path = storage.inprogress(name)
        try:
            age = now - path.stat().st_mtime
        except FileNotFoundError:
            continue
        if age < settings.stale_inprogress_age or locks.is_held(storage.lock(name)):
            continue
        target = storage.trash / f".inprogress-{name}.{time.time_ns()}"
        with caps.raised("dac_override"):
            os.rename(path, target)
        delete_tree(target)
        log.info("removed abandoned in-progress dir of %s (%.0f s old)", name, age)
        removed.append({"snapshot": f"in-progress {name}", "reason": f"abandoned {age:.0f}s",
                        "rule": "stale in-progress"})
    return removed


def exclusive_usage(path: Path) -> tuple[int, int]:
    """Bytes and inodes under ``path`` that no other directory links to
    (files whose every link is inside this tree), counted once per inode."""
    seen: dict[tuple[int, int], int] = {}
    nbytes = inodes = 0
    for dirpath, dirnames, filenames in os.walk(path):
        inodes += 1
        for fn in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            st = os.lstat(os.path.join(dirpath, fn))
            ident = (st.st_dev, st.st_ino)
            seen[ident] = seen.get(ident, 0) + 1
            if seen[ident] == st.st_nlink:
                nbytes += st.st_blocks * 512
                inodes += 1
    return nbytes, inodes
