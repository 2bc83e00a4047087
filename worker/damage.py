"""Files found bad by ``bakgrab verify``, and how a grab keeps clear of them (issue 15).

::

    STORAGE/.bakgrab/damage/NAME.json   the bad files of NAME: per inode its
                                        expected SHA-256, what was found, when,
                                        and every snapshot (and path) holding it
    STORAGE/.bakgrab/heal/NAME/         for the length of one grab: the
                                        --link-dest tree without the bad files

Healing: rsync ``--link-dest`` hard-links every file whose size, mtime and
attributes match, whatever its content, and it does so even when the
in-progress dir already holds a file at that path (measured with rsync 3.4:
a placeholder there is replaced by the link). So a bad inode of the newest
snapshot must not be reachable through the link-dest path at all. The grab
points ``--link-dest`` at a small private tree instead (:func:`link_dest`):
the directories on the way to each bad file are real directories, holding a
hard link to every sibling file and a symlink to every sibling directory of
the real snapshot (rsync follows a symlink in the middle of a path), and no
entry for the bad file, which rsync therefore transfers anew from the
client. Its cost is one link per entry of those few directories, not one
per file of the tree (a full hard-link copy of a million-file snapshot takes
minutes); without damage the grab links from the snapshot itself.

Invariants: a record names only snapshots that still exist when it is read;
a snapshot a record names is shown damaged by ``list``, ``versions`` and
``status``; a bad inode is never linked into a new snapshot by a grab that
started after the record was written (one that was already pulling may link
it: the next verify finds it there too, by the same inode, and the next
grab heals it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bakgrab.tasks import caps
from bakgrab.worker import manifest
from bakgrab.worker.storage import Snapshot, Storage, write_atomic

log = logging.getLogger(__name__)

DAMAGE_DIR = "damage"
HEAL_DIR = "heal"


def path_of(storage: Storage, name: str) -> Path:
    return storage.state / DAMAGE_DIR / f"{name}.json"


def read(storage: Storage, name: str) -> list[dict[str, Any]]:
    """The bad files of ``name``, each naming only snapshots that still exist
    (a record none of whose snapshots is left is dropped)."""
    try:
        # (dac_override: a verify an operator ran as root wrote it; the
        # worker must still see it, or it would link a bad file again)
        with caps.raised("dac_override"):
            text = path_of(storage, name).read_text()
        data = json.loads(text)
        records = data["files"] if isinstance(data, dict) else []
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("the damage record of %s cannot be read (%s): treated as empty", name, e)
        return []
    existing = {s.dirname for s in storage.snapshots(name)}
    out = []
    for rec in records:
        if not isinstance(rec, dict) or not isinstance(rec.get("where"), dict):
            continue
        where = {snap: paths for snap, paths in rec["where"].items() if snap in existing}
        if where:
            out.append({**rec, "where": where, "snapshots": sorted(where)})
    return out


def write(storage: Storage, name: str, records: list[dict[str, Any]]) -> None:
    path = path_of(storage, name)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    if not records:
        path.unlink(missing_ok=True)
        return
    # 0644 inside the 0700 state dir: whoever ran verify, the worker reads it
    write_atomic(path, json.dumps({"version": 1, "files": records}, indent=1), mode=0o644)


def damaged_snapshots(storage: Storage, name: str) -> dict[str, int]:
    """Each damaged snapshot of ``name`` with its count of bad files."""
    out: dict[str, int] = {}
    for rec in read(storage, name):
        for snap in rec["where"]:
            out[snap] = out.get(snap, 0) + 1
    return out


def bad_paths(storage: Storage, name: str, snapshot: str) -> list[str]:
    """The paths of ``snapshot`` that are a bad inode of ``name`` right now:
    the records' paths, and every other path of those inodes its manifest
    lists (a grab that was pulling when verify found them linked them)."""
    records = read(storage, name)
    if not records:
        return []
    inos = {int(rec["ino"]) for rec in records}
    paths = {p for rec in records for p in rec["where"].get(snapshot, [])}
    try:
        found = manifest.load(storage, snapshot)
    except manifest.Damaged:
        found = None
    if found is not None:
        paths |= {e.path for e in found.entries if e.ino in inos}
    root = storage.root / snapshot
    out = []
    with caps.raised("dac_override"):
        for p in sorted(paths):
            try:
                if os.lstat(root / p).st_ino in inos:
                    out.append(p)
            except OSError:
                continue
    return out


@contextlib.contextmanager
def link_dest(storage: Storage, name: str, link: Snapshot | None, dest: Path
              ) -> Iterator[tuple[Path | None, tuple[Path, ...]]]:
    """The ``--link-dest`` of a grab of ``name`` into ``dest`` whose newest
    snapshot is ``link``, and the trees the rsync child may link from (its
    sandbox): the snapshot itself, or, when it holds bad files, the heal tree
    without them (see the module docstring), removed when the grab ends. A
    bad inode an earlier attempt linked into ``dest`` is unlinked there."""
    if link is None:
        yield None, ()
        return
    real = storage.root / link.dirname
    bad = bad_paths(storage, name, link.dirname)
    if not bad:
        yield real, (real,)
        return
    shadow = storage.state / HEAL_DIR / name
    try:
        inos = {os.lstat(real / p).st_ino for p in bad}
        for p in bad:
            unlink_beneath(dest, p, inos)
        build_heal_tree(real, shadow, bad)
        log.warning("grab of %s: %d bad file(s) of %s are not linked, but pulled anew "
                    "(issue 15)", name, len(bad), link.dirname)
        yield shadow, (shadow, real)
    finally:
        shutil.rmtree(shadow, ignore_errors=True)


def build_heal_tree(real: Path, shadow: Path, bad: list[str]) -> None:
    """``shadow``: the tree ``real`` without ``bad``, made of real directories
    only on the way to a bad path (see the module docstring)."""
    shutil.rmtree(shadow, ignore_errors=True)
    shadow.parent.mkdir(mode=0o700, exist_ok=True)
    excluded = set(bad)
    opened = {""}
    for p in bad:
        parts = p.split("/")
        opened.update("/".join(parts[:i]) for i in range(1, len(parts)))
    # linking files one does not own needs CAP_FOWNER (fs.protected_hardlinks)
    with caps.raised("dac_override", "fowner"):
        for rel in sorted(opened):  # parents before children
            src = real / rel if rel else real
            dst = shadow / rel if rel else shadow
            if not stat.S_ISDIR(os.lstat(src).st_mode):
                continue  # (cannot be: a manifest path runs through directories)
            dst.mkdir(mode=0o700)
            with os.scandir(src) as it:
                for entry in it:
                    sub = f"{rel}/{entry.name}" if rel else entry.name
                    if sub in excluded or sub in opened:
                        continue
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            os.symlink(entry.path, dst / entry.name)
                        else:
                            os.link(entry.path, dst / entry.name, follow_symlinks=False)
                    except OSError as e:  # (a file at its link limit): pulled anew
                        log.info("heal tree: %r not linked: %s", sub, e)


def unlink_beneath(root: Path, rel: str, inos: set[int]) -> bool:
    """Unlink ``root/rel`` if it is one of ``inos``, never following a symlink
    on the way (``root`` is a client-written tree: a symlink there may point
    anywhere, even into another snapshot)."""
    parts = rel.split("/")
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    with caps.raised("dac_override"):
        try:
            fd = os.open(root, flags)
        except OSError:
            return False
        try:
            for part in parts[:-1]:
                nxt = os.open(part, flags, dir_fd=fd)
                os.close(fd)
                fd = nxt
            if os.stat(parts[-1], dir_fd=fd, follow_symlinks=False).st_ino not in inos:
                return False
            os.unlink(parts[-1], dir_fd=fd)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)
