"""Free-space cleanup: keep as many snapshots as possible, for as long as
possible, and let no name pay for space another name used (issue 11).

Before each grab, under the storage lock, :func:`make_room` first expires
the snapshots of the grab's name (of every name, for a prune) that no keep
rule keeps (issue 16, :mod:`bakgrab.worker.keep`; only when keep rules are
set: without them nothing expires), never a name's newest, a protected one
(:mod:`bakgrab.worker.protect`) or below ``min_keep``. Then it removes
snapshots only while the storage lacks space (or inodes), and only as many
as needed:

* ``min_free = max(min_free_avg * used / snapshots, min_free_abs)`` (the
  average term only when ``min_free_avg`` is set and snapshots exist); the
  same for inodes with ``min_free_inodes``;
* in-progress dirs of failed grabs of other names go first (not backups);
* then snapshots of other names no keep rule keeps, oldest first (issue 16);
* **fair shares**: each name has a share of the storage's bytes and inodes
  (``name_max_bytes`` / ``name_max_inodes``; ``auto`` is the storage's size
  divided by the number of names). A name's usage is what its complete
  snapshots hold alone: every inode whose links all lie in that name's
  snapshots, counted once (hard links between its snapshots are not counted
  twice; an inode another name or an in-progress dir also links to is shared
  and charged to no one, since removing this name would not free it).
  While space is short, :class:`FairQueue` picks, in order:

  1. when the grabbing name is over its share: only that name pays, oldest
     first, down to its newest snapshot (its own ``--link-dest``); then the
     grab fails with :class:`NoSpace` rather than take anything from others;
  2. names over their share (the most over first, its oldest first), down to
     their newest, ignoring ``min_keep``: it protects names within their
     share, not a client that filled the disk;
  3. for a grab of a name within its share only: a name over its share by its
     newest snapshot alone loses that too, unless a grab of it is running;
  4. the classic rule: the name with the most snapshots (ties: the name that
     sorts last) loses its oldest, never below ``min_keep``;

  measuring free space again after each removal;
* a name within its share never goes below ``min_keep``; the newest snapshot
  of a name that a running grab uses as ``--link-dest`` is never removed;
  only complete snapshots of the layout are ever candidates;
* a protected snapshot is never a candidate of any rule; it still counts
  for ``min_keep`` and for its name's usage; when cleanup cannot free
  enough, :class:`NoSpace` names the protections in the way (issue 16);
* if that cannot free enough, :class:`NoSpace` says how much is free, what is
  needed, the shares and ``min_keep``, and nothing more is removed.

Usage is measured only when space is short (a walk of each name's snapshots,
like ``du``), and cached in ``.bakgrab/usage/NAME.json`` keyed by the name's
snapshot list, so a name is walked again only after it gained a snapshot;
a removal by cleanup updates the cache without a walk (removing the oldest
frees exactly what the walk attributed to it).

A removal is a rename into ``.bakgrab/trash`` (atomic: the snapshot leaves the
layout at once), then a delete of the tree at idle I/O priority. A crash
mid-delete leaves only trash, which the next cleanup finishes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from bakgrab.tasks import caps, process
from bakgrab.tasks.config import Settings, parse_size
from bakgrab.tasks.errors import InvalidRequest, NoSpace
from bakgrab.tasks.result import human_bytes
from bakgrab.worker import backend, btrfs, keep, locks, protect
from bakgrab.worker.storage import Snapshot, Storage, write_atomic

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Usage:
    """What statvfs says of the storage filesystem."""

    free_bytes: int
    used_bytes: int
    free_inodes: int
    used_inodes: int
    has_inodes: bool


def measure(path: Path, enough: Callable[[Usage], bool] | None = None) -> Usage:
    """The storage's usage now. A btrfs subvolume this process deleted gives
    its blocks back only once btrfs's cleaner ran (issue 14): then the usage
    is measured again after :func:`backend.settle`, unless it already is
    ``enough`` as it is (blocks still coming back can only add to it), which
    spares the cleanup after a removal that already made room the wait of
    at least a second of polls."""
    usage = _statvfs(path)
    if backend.settling() and not (enough is not None and enough(usage)):
        backend.settle(path)
        usage = _statvfs(path)
    return usage


def _statvfs(path: Path) -> Usage:
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


# -- fair shares (issue 11) ----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Share:
    """The bytes and inodes each name may hold before it pays first (None: no
    limit on that count)."""

    bytes: int | None
    inodes: int | None

    @property
    def limited(self) -> bool:
        return self.bytes is not None or self.inodes is not None


def shares(settings: Settings, usage: Usage, names: int) -> Share:
    """Each name's share: the configured limit, or with ``auto`` the
    storage's capacity (used + free) divided by the number of names."""
    names = max(names, 1)

    def one(value: str, capacity: int | None, parse: Callable[[str], int]) -> int | None:
        if value == "off" or capacity is None:
            return None
        if value == "auto":
            return capacity // names
        return parse(value)

    return Share(
        one(settings.name_max_bytes, usage.used_bytes + usage.free_bytes, parse_size),
        one(settings.name_max_inodes,
            usage.used_inodes + usage.free_inodes if usage.has_inodes else None, int),
    )


@dataclasses.dataclass(frozen=True)
class NameUsage:
    """What one name's complete snapshots hold alone: ``freed[k]`` is the
    (bytes, inodes) removing snapshot ``k`` frees once the older ones are gone
    (the inodes whose newest link is in it); ``shared_bytes`` are bytes also
    linked from outside the name's snapshots, which removing them never frees."""

    snapshots: tuple[str, ...]
    freed: tuple[tuple[int, int], ...]
    shared_bytes: int = 0

    @property
    def bytes(self) -> int:
        return sum(b for b, _ in self.freed)

    @property
    def inodes(self) -> int:
        return sum(i for _, i in self.freed)

    def without_oldest(self) -> NameUsage:
        """The usage once the oldest snapshot is gone: exactly the rest."""
        return NameUsage(self.snapshots[1:], self.freed[1:], self.shared_bytes)

    def to_json(self) -> dict[str, Any]:
        return {"snapshots": list(self.snapshots), "freed": [list(f) for f in self.freed],
                "shared_bytes": self.shared_bytes}


def walk_name(roots: Sequence[Path]) -> tuple[list[tuple[int, int]], int]:
    """One ``du``-like walk over a name's snapshot trees (oldest first): the
    (bytes, inodes) each frees when removed in that order, and the bytes of
    inodes linked from outside them. Directories count too (they are never
    hard-linked); symlinks are not followed."""
    if roots and btrfs.is_subvolume(roots[0]):  # by extent, not by link (issue 14)
        return btrfs.walk_name(list(roots))
    freed = [[0, 0] for _ in roots]
    # (dev, inode) -> [index of its newest snapshot, links seen, bytes, st_nlink]
    linked: dict[tuple[int, int], list[int]] = {}
    for k, root in enumerate(roots):
        for dirpath, dirnames, filenames in os.walk(root):
            try:
                st = os.lstat(dirpath)
            except FileNotFoundError:  # removed by hand meanwhile: nothing to charge
                continue
            freed[k][0] += st.st_blocks * 512
            freed[k][1] += 1
            for fn in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
                try:
                    st = os.lstat(os.path.join(dirpath, fn))
                except FileNotFoundError:
                    continue
                if st.st_nlink == 1:
                    freed[k][0] += st.st_blocks * 512
                    freed[k][1] += 1
                    continue
                entry = linked.get((st.st_dev, st.st_ino))
                if entry is None:
                    linked[(st.st_dev, st.st_ino)] = [k, 1, st.st_blocks * 512, st.st_nlink]
                else:
                    entry[0] = k
                    entry[1] += 1
    shared = 0
    for newest, seen, nbytes, nlink in linked.values():
        if seen >= nlink:
            freed[newest][0] += nbytes
            freed[newest][1] += 1
        else:
            shared += nbytes
    return [(b, i) for b, i in freed], shared


def cached_usage(storage: Storage, name: str, snaps: Sequence[Snapshot]) -> NameUsage:
    """The usage of ``name``, from its cache when that was made for exactly
    these snapshots, else by a walk (then cached)."""
    dirnames = tuple(s.dirname for s in sorted(snaps))
    try:
        data = json.loads(storage.usage(name).read_text())
        if tuple(data["snapshots"]) == dirnames and len(data["freed"]) == len(dirnames):
            return NameUsage(dirnames, tuple((int(b), int(i)) for b, i in data["freed"]),
                             int(data["shared_bytes"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    started = time.monotonic()
    with caps.raised("dac_override"):
        freed, shared = walk_name([storage.root / d for d in dirnames])
    found = NameUsage(dirnames, tuple(freed), shared)
    log.info("measured %s: %s and %d inodes alone in %d snapshot(s) (%.2f s)", name,
             human_bytes(found.bytes), found.inodes, len(dirnames), time.monotonic() - started)
    store_usage(storage, name, found)
    return found


def store_usage(storage: Storage, name: str, found: NameUsage) -> None:
    with contextlib.suppress(OSError):
        write_atomic(storage.usage(name), json.dumps(found.to_json()))


class FairQueue:
    """Snapshots in the order cleanup removes them under fair shares (see the
    module docstring, rules 1 to 4), each with its rule and what removing it
    frees (None when no usage was measured). Iterating updates the model, so
    :meth:`over` tells where the queue stopped."""

    def __init__(
        self,
        inventory: Mapping[str, Sequence[Snapshot]],
        usages: Mapping[str, NameUsage],
        share: Share,
        *,
        current: str | None,
        min_keep: int,
        busy: Collection[str] = (),
        protected: Collection[str] = (),
        remeasure: Callable[[str, Sequence[Snapshot]], NameUsage] | None = None,
    ) -> None:
        if min_keep < 1:
            raise ValueError("min_keep must be at least 1")
        self.left = {name: sorted(snaps) for name, snaps in inventory.items() if snaps}
        self.usages = {n: usages[n] for n in self.left if n in usages}
        self.share = share
        self.current = current
        self.min_keep = min_keep
        self.busy = set(busy) | ({current} if current else set())
        # issue 16: protected snapshots are never candidates, but they count
        # for min_keep and their usage still counts against the name's share
        self.protected = set(protected)
        self.remeasure = remeasure

    def removable(self, name: str) -> list[Snapshot]:
        """The name's snapshots rules 1, 2 and 4 may take, oldest first: not
        its newest, not protected."""
        return [s for s in self.left.get(name, [])[:-1] if s.dirname not in self.protected]

    def ratio(self, name: str) -> float:
        """How far ``name`` is over its share (> 1: over), by bytes or inodes."""
        used = self.usages.get(name)
        if used is None:
            return 0.0
        parts = [0.0]
        if self.share.bytes is not None:
            parts.append(used.bytes / self.share.bytes if self.share.bytes else math.inf)
        if self.share.inodes is not None:
            parts.append(used.inodes / self.share.inodes if self.share.inodes else math.inf)
        return max(parts) if used.bytes or used.inodes else 0.0

    def over(self, name: str) -> bool:
        return self.ratio(name) > 1

    def describe(self, name: str) -> str:
        used = self.usages.get(name) or NameUsage((), ())
        limits = []
        if self.share.bytes is not None:
            limits.append(f"{human_bytes(used.bytes)} of a {human_bytes(self.share.bytes)} share")
        if self.share.inodes is not None:
            limits.append(f"{used.inodes} inodes of a {self.share.inodes} share")
        return ", ".join(limits) or "no share set"

    def _pop(self, name: str,
             snap: Snapshot | None = None) -> tuple[Snapshot, tuple[int, int] | None]:
        """Take ``snap`` (default: the oldest removable) out of the model."""
        snap = snap or self.removable(name)[0]
        index = self.left[name].index(snap)
        self.left[name].pop(index)
        freed = None
        if name in self.usages:
            used = self.usages[name]
            if index == 0:
                freed = used.freed[0]
                self.usages[name] = used.without_oldest()
            elif self.remeasure is not None:
                # an older, protected snapshot stays: what this one freed is
                # no longer "its newest link" arithmetic (issue 16)
                self.usages[name] = self.remeasure(name, self.left[name])
            else:
                # no walk at hand: charge what it held to its older neighbour
                # (an upper bound: the name stays at least this far over)
                merged = list(used.freed)
                b, i = merged.pop(index)
                merged[index - 1] = (merged[index - 1][0] + b, merged[index - 1][1] + i)
                self.usages[name] = NameUsage(used.snapshots[:index] + used.snapshots[index + 1:],
                                              tuple(merged), used.shared_bytes)
        if not self.left[name]:
            del self.left[name]
        return snap, freed

    def __iter__(self) -> Iterator[tuple[Snapshot, str, tuple[int, int] | None]]:
        while self.left:
            cur = self.current
            if cur is not None and self.over(cur):
                # rule 1: a name over its share makes room from its own snapshots only
                if not self.removable(cur):
                    return
                rule = f"{cur} is over its share ({self.describe(cur)}): it alone pays"
                snap, freed = self._pop(cur)
                yield snap, rule, freed
                continue
            over = [n for n in self.left if self.over(n) and self.removable(n)]
            if not over and cur is not None:
                # rule 3: a grab within its share takes even the only snapshot
                # of a name whose newest alone is over its share, if no grab
                # of that name runs (its --link-dest) and it is not protected
                over = [n for n in self.left if self.over(n) and n not in self.busy
                        and len(self.left[n]) == 1
                        and self.left[n][0].dirname not in self.protected]
            if over:
                # rule 2: names over their share pay first, the most over first
                name = max(over, key=lambda n: (self.ratio(n), n))
                rule = f"{name} is over its share ({self.describe(name)}); its oldest goes first"
                snap, freed = self._pop(name, (self.removable(name) or self.left[name])[0])
                yield snap, rule, freed
                continue
            # rule 4: the classic rule, never below min_keep
            keep = {n: s for n, s in self.left.items()
                    if len(s) > self.min_keep and self.removable(n)}
            if not keep:
                return
            name = max(keep, key=lambda n: (len(keep[n]), n))
            snap, freed = self._pop(name)
            yield snap, f"{name} has the most snapshots; its oldest goes first", freed


def known_names(storage: Storage) -> set[str]:
    """Names the storage holds: with a complete snapshot, an in-progress dir,
    or a registration (its pin: written only by an operator or after a grab
    that succeeded, so a refused or failed request never adds a name)."""
    pins = storage.state / "pins"
    registered = {p.name.removesuffix(".pub") for p in pins.iterdir()
                  if p.name.endswith(".pub")} if pins.is_dir() else set()
    return {s.name for s in storage.snapshots()} | set(storage.inprogress_names()) | registered


def admit(storage: Storage, settings: Settings, name: str) -> None:
    """Refuse a grab of a new name beyond ``max_names`` (issue 11: a client
    must not invent thousands of names, each diluting every share); called
    before the grab writes anything. A refused request (exit 4), so nothing
    is recorded for the name either. First grabs of new names running at the
    same moment each see the names before them, so the storage may end up
    over the limit by the number of grabs running at once, never more."""
    if not settings.max_names:
        return
    known = known_names(storage)
    if name not in known and len(known) >= settings.max_names:
        raise InvalidRequest(
            f"refusing a first grab of {name}: the storage already holds "
            f"{len(known)} names, max_names={settings.max_names}. Nothing was written. If "
            f"{name} is a real client, raise max_names (or remove names no longer backed up)."
        )


STORAGE_LOCK_WAIT = 3600.0
"""Seconds a cleanup waits for another cleanup to end (a delete may be slow)."""


def busy(storage: Storage, name: str) -> bool:
    """Whether a grab of ``name`` runs: its lock is held (also the lock of the
    old layout, which a worker not yet upgraded takes)."""
    legacy = storage.legacy_lock(name)
    return locks.is_held(storage.lock(name)) or (legacy is not None and locks.is_held(legacy))


def make_room(
    storage: Storage,
    settings: Settings,
    *,
    dry_run: bool = False,
    measure: Callable[[Path, Callable[[Usage], bool] | None], Usage] = measure,
    current: str | None = None,
    now: float | None = None,
) -> list[dict[str, Any]]:
    """Expire what the keep rules no longer keep (of ``current``, or of every
    name for a prune, when None), then remove snapshots until the storage has
    what a grab needs; the removals, in order, each with its reason and rule.
    NoSpace if that cannot be done."""
    removed: list[dict[str, Any]] = []
    now = time.time() if now is None else now
    if not dry_run:
        # Leftovers of a crash are deleted outside the storage lock: other
        # grabs' cleanups need not wait for a tree that is no backup anymore.
        purge_trash(storage)
    with locks.held(storage.storage_lock, wait=STORAGE_LOCK_WAIT, what="storage"):
        if not dry_run:
            removed += remove_stale_inprogress(storage, settings)
        inventory = storage.by_name()
        protected = protect.active(storage, now)
        # what a dry run would have freed so far (it cannot measure again)
        gained = [0, 0]

        def take(snap: Snapshot, entry: dict[str, Any]) -> None:
            if dry_run:
                alone = exclusive_usage(storage.root / snap.dirname)
                gained[0] += alone[0]
                gained[1] += alone[1]
            else:
                remove_snapshot(storage, snap)
            inventory[snap.name].remove(snap)
            log.info("%s snapshot %s: %s (%s)", "would remove" if dry_run else "removed",
                     snap.dirname, entry["reason"], entry["rule"])
            removed.append(entry)

        # issue 16: expiry, only where keep rules are set
        for name in [current] if current is not None else sorted(inventory):
            for snap in expirable(settings, inventory.get(name, []), protected, now):
                rules = keep.rules_for(settings, name)
                take(snap, {"snapshot": snap.dirname,
                            "reason": f"no keep rule keeps it ({rules.describe()})",
                            "rule": "expired"})

        def adjusted(usage: Usage) -> Usage:
            return dataclasses.replace(usage, free_bytes=usage.free_bytes + gained[0],
                                       free_inodes=usage.free_inodes + gained[1])

        def usage_now(wanted: Need | None = None) -> Usage:
            def enough(usage: Usage) -> bool:
                usage = adjusted(usage)
                return (wanted or need(settings, usage, count)).short(usage) is None

            return adjusted(measure(storage.root, enough))

        count = sum(len(s) for s in inventory.values())
        usage = usage_now()
        wanted = need(settings, usage, count)
        why = wanted.short(usage)
        if why is None:
            return removed
        if not dry_run:
            # Before any backup goes: in-progress dirs of failed grabs (no
            # grab holds their name) are not backups.
            for name in storage.inprogress_names():
                if name == current or busy(storage, name):
                    continue
                target = storage.trash / f".inprogress-{name}.{time.time_ns()}"
                with caps.raised("dac_override"):
                    os.rename(storage.inprogress(name), target)
                delete_tree(target)
                log.info("removed in-progress dir of a failed grab of %s: %s", name, why)
                removed.append({"snapshot": f"in-progress {name}", "reason": why,
                                "rule": "a failed grab's partial data goes before any backup"})
                usage = usage_now(wanted)
                why = wanted.short(usage)
                if why is None:
                    return removed
        # issue 16: then snapshots of other names no keep rule keeps (their
        # own next grab would expire them), oldest first
        unkept = sorted(s for name, snaps in inventory.items()
                        for s in expirable(settings, snaps, protected, now))
        for snap in unkept:
            take(snap, {"snapshot": snap.dirname, "reason": why,
                        "rule": "no keep rule keeps it: it goes first when space is short"})
            usage = usage_now(wanted)
            why = wanted.short(usage)
            if why is None:
                return removed
        inventory = {n: s for n, s in inventory.items() if s}
        names = set(inventory) | ({current} if current else set())
        share = shares(settings, usage, len(names))
        usages = ({name: cached_usage(storage, name, snaps) for name, snaps in inventory.items()}
                  if share.limited else {})
        queue = FairQueue(inventory, usages, share, current=current,
                          min_keep=settings.min_keep,
                          busy={n for n in inventory if n == current or busy(storage, n)},
                          protected=protected,
                          remeasure=lambda n, snaps: cached_usage(storage, n, snaps))
        for snap, rule, freed in queue:
            entry = {"snapshot": snap.dirname, "reason": why, "rule": rule}
            if dry_run:
                # Without removing we cannot re-measure: estimate from what the
                # snapshot frees (the usage walk's count, else the bytes it
                # holds alone: no other snapshot shares them).
                alone_bytes, alone_inodes = freed or exclusive_usage(storage.root / snap.dirname)
                gained[0] += alone_bytes
                gained[1] += alone_inodes
            else:
                remove_snapshot(storage, snap)
                if snap.name in queue.usages:
                    store_usage(storage, snap.name, queue.usages[snap.name])
            usage = usage_now(wanted)
            log.info("%s snapshot %s: %s (%s; need %s and %d inodes free)",
                     "would remove" if dry_run else "removed", snap.dirname, why, rule,
                     human_bytes(wanted.bytes), wanted.inodes)
            removed.append(entry)
            why = wanted.short(usage)
            if why is None:
                return removed
        held = protections_in_the_way(storage, inventory, protected, settings)
        if dry_run:
            removed.append({"snapshot": None, "reason": why + held, "rule": "cannot free enough"})
            return removed
        if current is not None and queue.over(current):
            raise NoSpace(
                f"not enough space on the storage for {current}: {why} (need "
                f"{human_bytes(wanted.bytes)} and {wanted.inodes} inodes free). {current} holds "
                f"{queue.describe(current)}: a name over its share frees room only from its "
                "own snapshots, and only its newest is left. Raise name_max_bytes/"
                f"name_max_inodes, add space, or lower min_free_abs/min_free_avg.{held}"
            )
        raise NoSpace(
            f"not enough space on the storage: {why} (need {human_bytes(wanted.bytes)} and "
            f"{wanted.inodes} inodes free); every name is down to min_keep={settings.min_keep} "
            "snapshots (names over their share to their newest). Add space, lower "
            f"min_free_abs/min_free_avg, or lower min_keep.{held}"
        )


def expirable(settings: Settings, snaps: Sequence[Snapshot], protected: Collection[str],
              now: float) -> list[Snapshot]:
    """The snapshots of one name no keep rule keeps (issue 16), oldest first:
    none without rules; never its newest, a protected one, or below min_keep."""
    if not snaps:
        return []
    rules = keep.rules_for(settings, snaps[0].name)
    if not rules.configured:
        return []
    gone = set(keep.expired([(s.dirname, s.timestamp) for s in snaps], rules,
                            keep.timezone(settings), now, protected=protected,
                            min_keep=settings.min_keep))
    return [s for s in sorted(snaps) if s.dirname in gone]


def protections_in_the_way(storage: Storage, inventory: Mapping[str, Sequence[Snapshot]],
                           protected: Mapping[str, protect.Protection],
                           settings: Settings) -> str:
    """A sentence naming the protected snapshots cleanup had to leave, or ''."""
    present = {s.dirname for snaps in inventory.values() for s in snaps}
    held = sorted(p for p in protected if p in present)
    if not held:
        return ""
    tz = keep.timezone(settings)
    shown = "; ".join(f"{d} ({protected[d].describe(tz)})" for d in held[:10])
    more = f" and {len(held) - 10} more" if len(held) > 10 else ""
    return (f" Protected snapshots were kept: {shown}{more}; `bakgrab unprotect --storage "
            f"{storage.root} SNAPSHOT` releases one.")


def remove_snapshot(storage: Storage, snap: Snapshot) -> None:
    """Take ``snap`` out of the layout at once, then delete its tree."""
    target = storage.trash / f"{snap.dirname}.{time.time_ns()}"
    backend.for_storage(storage).unfreeze(storage.root / snap.dirname)  # (issue 14)
    with caps.raised("dac_override"):
        os.rename(storage.root / snap.dirname, target)
    for suffix in (".json", ".exclude", ".manifest"):  # (.manifest: issue 15)
        storage.meta(snap.dirname, suffix).unlink(missing_ok=True)
    protect.forget(storage, snap.dirname)  # a lapsed protection's record (issue 16)
    delete_tree(target)


def delete_tree(path: Path) -> None:
    """rm -rf at idle I/O priority, staying on this filesystem; a btrfs
    subvolume is deleted whole instead, in constant time (issue 14)."""
    if backend.for_path(path).delete(path):
        return
    process.run(
        ["ionice", "-c", "3", "-t", "rm", "-rf", "--one-file-system", "--", str(path)],
        timeout=None,
    )


def purge_trash(storage: Storage) -> None:
    """Finish deletes a crash interrupted (skipped if another worker is at it)."""
    try:
        with locks.held(storage.trash_lock, what="trash"):
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
        if age < settings.stale_inprogress_age or busy(storage, name):
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
    if btrfs.is_subvolume(path):  # unshared extents, or the quota group (issue 14)
        return btrfs.alone(path)
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
