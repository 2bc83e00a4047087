"""Storage backends: how a snapshot is begun, published and removed (issue 14).

The backend follows the storage's filesystem (``statfs`` ``f_type``), never
a setting, so a user who points ``--storage`` at btrfs gets snapshots with
no other change:

* :class:`HardLinks` (ext4, xfs, everything but btrfs): the in-progress dir
  is a plain dir, rsync hard-links unchanged files from the name's newest
  snapshot (``--link-dest``), and publishing is one rename;
* :class:`Subvolumes` (btrfs): the in-progress dir is a writable subvolume,
  a snapshot of the name's newest one (an empty new subvolume for a first
  backup), which rsync updates in place (``--inplace --no-whole-file``, no
  ``--link-dest``): unchanged files cost nothing and a changed block of a
  large file costs one block. Publishing snapshots it read-only *into*
  place (``NAME.YYYY-mm-dd.UNIXTIME`` appears whole and read-only at once),
  then deletes the in-progress subvolume; a removal deletes the subvolume,
  in constant time whatever its size.

Why publishing is a read-only snapshot and not a rename (measured, see
:mod:`bakgrab.worker.btrfs`): a read-only subvolume cannot be moved to
another directory (EROFS: the move rewrites its ``..``), and a rename first
then the flag would leave a published snapshot writable for a moment.

Both backends keep the layout of :mod:`bakgrab.worker.storage`: the names,
the in-progress place (kept on failure: the next grab resumes into it) and
the metadata are the same. A storage that holds plain-dir snapshots (made
before it was btrfs-aware) keeps working: a new subvolume is started empty
and filled by a full pull, the old snapshots are removed by ``rm`` as ever.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

from bakgrab.tasks import caps
from bakgrab.worker import btrfs, damage
from bakgrab.worker.storage import Snapshot, Storage

log = logging.getLogger(__name__)


class HardLinks:
    """Hard-linked trees: the original design."""

    name = "hardlink"
    pull_options: tuple[str, ...] = ()
    links = True
    """Whether rsync links unchanged files from the newest snapshot (``--link-dest``)."""

    def begin(self, storage: Storage, name: str, newest: Snapshot | None) -> bool:
        """Make ``storage.inprogress(name)`` ready for a pull; whether it
        already held an earlier attempt's files (a resume)."""
        dest = storage.inprogress(name)
        with caps.raised("dac_override", "fowner"):
            resumed = dest.is_dir()
            dest.mkdir(mode=0o700, exist_ok=True)
            os.utime(dest)  # an in-progress dir in use is never "stale"
        return resumed

    def publish(self, storage: Storage, name: str, snapshot: str) -> None:
        """Make the finished pull of ``name`` appear as ``snapshot``, atomically."""
        # Moving a directory to another parent rewrites its "..": that needs write
        # access to the (client-owned) directory itself.
        with caps.raised("dac_override"):
            os.rename(storage.inprogress(name), storage.root / snapshot)

    def unfreeze(self, path: Path) -> None:
        """Make a published snapshot movable before a removal (nothing to do)."""

    def delete(self, path: Path, frees: bool = True) -> bool:
        """Delete ``path`` if this backend deletes it specially (``frees``:
        space may come back later); False: the caller removes the tree
        (``rm -rf``)."""
        return False


class Subvolumes(HardLinks):
    """btrfs: a read-only subvolume per snapshot."""

    name = "btrfs"
    # --inplace: rewrite only the changed blocks of the snapshot's own copy, so
    # the rest stays shared with the previous snapshot; --no-whole-file: the
    # delta algorithm even where rsync would pick whole files (issue 14).
    pull_options = ("--inplace", "--no-whole-file")
    links = False

    def begin(self, storage: Storage, name: str, newest: Snapshot | None) -> bool:
        dest = storage.inprogress(name)
        with caps.raised("dac_override", "fowner"):
            if btrfs.is_subvolume(dest):
                # an earlier attempt's subvolume: resume into it (the links
                # that attempt made are found by a walk)
                self.unshare(dest, None)
                os.utime(dest)
                return True
            if os.path.lexists(dest):
                # a plain dir of a hard-link era pull: it cannot become a
                # subvolume, so it goes and the pull starts over
                log.warning("in-progress dir of %s is no subvolume: starting anew", name)
                from bakgrab.worker import retention

                retention.delete_tree(dest)
            if newest is not None and btrfs.is_subvolume(storage.root / newest.dirname):
                btrfs.snapshot(storage.root / newest.dirname, dest)
                # files verify found bad are pulled anew, not carried over
                # (issue 15; a snapshot keeps inode numbers), every path of
                # them: before unshare() gives a path of theirs a new inode
                bad = damage.bad_paths(storage, name, newest.dirname)
                inos = {os.lstat(storage.root / newest.dirname / p).st_ino for p in bad}
                for rel in bad:
                    damage.unlink_beneath(dest, rel, inos)
                self.unshare(dest, linked_in(storage, newest))
            else:
                btrfs.create(dest)
            os.chmod(dest, 0o700)  # (rsync sets the client's mode on it)
            os.utime(dest)
        return False

    @staticmethod
    def unshare(dest: Path, groups: dict[int, list[str]] | None) -> None:
        """Give every path of each hard-linked inode in ``dest`` its own inode
        before rsync ``--inplace`` writes there (see
        :func:`bakgrab.worker.btrfs.unshare`); rsync's ``-H`` then links again
        what the client still links. ``groups`` (inode: paths) from the
        previous snapshot's manifest spares a walk; None walks."""
        count = 0
        # a clone of another's file keeps its owner, setuid bits and file
        # capabilities: the capabilities rsync --super uses for the same
        with caps.raised("chown", "dac_override", "fowner", "fsetid", "setfcap"):
            if groups is None:
                groups = btrfs.linked_files(dest)
            for ino, paths in groups.items():
                for rel in paths[1:]:
                    try:
                        count += btrfs.unshare(dest, rel, ino)
                    except (FileNotFoundError, ValueError):
                        continue
                    except OSError as e:
                        # (a clone refused, e.g. nodatacow): rsync sends it anew
                        log.warning("%s: %s not given its own inode (%s): unlinked",
                                    dest, rel, e.strerror)
                        count += damage.unlink_beneath(dest, rel, {ino})
        if count:
            log.info("%s: %d hard link(s) given their own inode before an in-place pull",
                     dest, count)

    def publish(self, storage: Storage, name: str, snapshot: str) -> None:
        dest = storage.inprogress(name)
        with caps.raised("dac_override", "fowner"):
            btrfs.snapshot(dest, storage.root / snapshot, readonly=True)
            # A crash here leaves the in-progress subvolume too: the snapshot
            # is published, and the next grab resumes into the copy. (Its
            # blocks are the new snapshot's: no space to wait for.)
            self.delete(dest, frees=False)

    def unfreeze(self, path: Path) -> None:
        # a read-only subvolume cannot move to the trash (EROFS)
        if btrfs.is_subvolume(path):
            with caps.raised("fowner"):
                btrfs.set_readonly(path, False)

    def delete(self, path: Path, frees: bool = True) -> bool:
        if not btrfs.is_subvolume(path):
            return False
        with caps.raised("dac_override", "fowner"):
            btrfs.delete(path)
        if frees:  # the next measure waits for the cleaner (see settle())
            global _deleted
            _deleted = True
        return True


LINK_LIMIT_SUFFIX = ".link-limit"
"""``.bakgrab/heal/NAME.link-limit``: the --link-dest tree of a pull again
without the files at the link limit (beside issue 15's heal trees)."""


@contextlib.contextmanager
def without_linked(dest: Path, link_dest: Path, leaders: list[str]) -> Iterator[tuple[Path, int]]:
    """The hard-link backend at the link limit (issue 14): the inodes rsync
    could not link to (``leaders``, paths in ``dest`` linked from
    ``link_dest``) are unlinked from ``dest`` wherever this pull linked them,
    and a --link-dest tree without any of their paths is made, so the next
    rsync run copies those files (one new inode per hard-link group) and
    links everything else as before. Yields that tree and how many paths it
    leaves out; removes it afterwards. One walk of each tree, only when the
    limit was hit."""
    inos: set[int] = set()
    with caps.raised("dac_override"):
        for rel in leaders:
            parts = Path(rel).parts
            if not parts or Path(rel).is_absolute() or ".." in parts:
                continue
            # (rsync's own words; a symlink on the way only finds an inode
            # that no path of the two trees has)
            with contextlib.suppress(OSError):
                st = os.lstat(dest / rel)
                if stat.S_ISREG(st.st_mode):
                    inos.add(st.st_ino)
        omit = list(_paths_with(link_dest, inos))
        for rel in list(_paths_with(dest, inos)):
            damage.unlink_beneath(dest, rel, inos)
    shadow = dest.parent.parent / damage.HEAL_DIR / f"{dest.name}{LINK_LIMIT_SUFFIX}"
    try:
        damage.build_heal_tree(link_dest, shadow, omit)
        yield shadow, len(omit)
    finally:
        shutil.rmtree(shadow, ignore_errors=True)


def _paths_with(root: Path, inos: set[int]) -> Iterator[str]:
    """Paths under ``root`` (relative) of regular files that are one of
    ``inos`` (os.walk follows no symlink)."""
    for dirpath, _dirs, files in os.walk(root):
        for fn in files:
            path = os.path.join(dirpath, fn)
            with contextlib.suppress(OSError):
                if os.lstat(path).st_ino in inos:
                    yield os.path.relpath(path, root)


def linked_in(storage: Storage, snap: Snapshot) -> dict[int, list[str]] | None:
    """The hard-linked files of ``snap`` (inode: paths) by its manifest
    (issue 15), or None when it has no trustworthy one (then a walk)."""
    from bakgrab.worker import manifest

    try:
        found = manifest.load(storage, snap.dirname)
    except manifest.Damaged:
        return None
    if found is None:
        return None
    paths: dict[int, list[str]] = {}
    for entry in found.entries:
        paths.setdefault(entry.ino, []).append(entry.path)
    return {ino: p for ino, p in paths.items() if len(p) > 1}


_deleted = False
"""Whether this process deleted a subvolume whose space may not be back yet."""


def for_path(path: Path) -> HardLinks:
    """The backend of the filesystem holding ``path``."""
    try:
        return Subvolumes() if btrfs.on_btrfs(path) else HardLinks()
    except OSError:
        return HardLinks()


def for_storage(storage: Storage) -> HardLinks:
    return for_path(storage.root)


def settling() -> bool:
    """Whether this process deleted subvolumes whose blocks may still be on
    their way back (see :func:`settle`)."""
    return _deleted


def settle(path: Path) -> None:
    """Before free space is measured: if this process deleted subvolumes,
    wait until btrfs's cleaner gave their blocks back (statvfs alone would
    show them used for up to a commit interval, and cleanup would remove
    more snapshots than needed)."""
    global _deleted
    if not _deleted:
        return
    _deleted = False
    with caps.raised("dac_override"):
        btrfs.settle(path)
