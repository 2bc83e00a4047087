"""``bakgrab verify``: re-read stored files and compare them with their manifests (issue 15).

::

    STORAGE/.bakgrab/verified/NAME.json   when each inode of NAME was last read
                                          and found good, and the last run's summary
    STORAGE/.bakgrab/damage/NAME.json     what was found bad (:mod:`.damage`)
    STORAGE/.bakgrab/locks/verify.lock    one verify at a time (a second: exit 7)

A run gathers the files of the chosen snapshots from their manifests, one
candidate per inode however many snapshots link it, orders them least
recently verified first (never verified first of all, oldest snapshot
first), takes a share of them (``--share``: ceil(P% of the files), so a
nightly 5% covers every file in 20 nights), or as many as fit a time budget
(``--budget``), or all, and reads each with the snapshot's own path, in
path order where it can, at idle I/O priority, without evicting the page
cache's hot data.

What a good result proves: every file read has, byte for byte, the SHA-256
the worker computed right after the pull that stored it. A bad file is
reported with every snapshot that holds its inode, recorded for healing
and marking (:mod:`.damage`). A snapshot without a manifest (made before
manifests existed) is unverifiable, never counted good; a manifest whose
own checksum fails is reported as a damaged manifest, not as damaged data.

Invariants: verify never writes into a snapshot and takes no name's lock
(a published snapshot is never written again; one that cleanup removes
meanwhile is skipped, not reported); a file is read only when it is still
the inode its manifest names, reached without following any symlink
(:class:`bakgrab.worker.manifest.Beneath`).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bakgrab.tasks import caps
from bakgrab.worker import backend, damage, locks, manifest
from bakgrab.worker.storage import Storage, parse_snapshot, write_atomic

log = logging.getLogger(__name__)

VERIFIED_DIR = "verified"
CHECKPOINT = 60.0
"""Seconds between two writes of the verify state during a run: a run that
is stopped (a time limit, Ctrl-C) does not read the same files again."""


@dataclasses.dataclass
class Report:
    """What one verify run found."""

    started: float
    names: list[str] = dataclasses.field(default_factory=list)
    files: int = 0
    """Distinct files (inodes) the chosen snapshots hold, by their manifests."""
    checked: int = 0
    bytes_checked: int = 0
    good: int = 0
    bad: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    """Every bad file of this run, with every snapshot that holds it."""
    known_bad: int = 0
    """Files recorded bad earlier and not read again in this run."""
    damaged_manifests: list[dict[str, str]] = dataclasses.field(default_factory=list)
    unverifiable: list[str] = dataclasses.field(default_factory=list)
    never_verified: int = 0
    gone: int = 0
    """Files whose snapshot cleanup removed while verify ran."""
    seconds: float = 0.0

    @property
    def damage_found(self) -> bool:
        return bool(self.bad or self.damaged_manifests or self.known_bad)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "damage_found": self.damage_found}


@dataclasses.dataclass(slots=True)
class Candidate:
    name: str
    key: str
    """``INODE:HEX[:16]`` (of its digest), the state's key of one stored file."""
    ino: int
    digest: str
    """``HASH:HEX`` (:data:`bakgrab.worker.manifest.HASHES`)."""
    size: int
    snapshot: str
    timestamp: int
    path: str
    last: float


# -- state ------------------------------------------------------------------------

def state_path(storage: Storage, name: str) -> Path:
    return storage.state / VERIFIED_DIR / f"{name}.json"


def read_state(storage: Storage, name: str) -> dict[str, Any]:
    """``{"inodes": {KEY: unix time last found good}, "last_run": {...}}``."""
    try:
        data = json.loads(state_path(storage, name).read_text())
        if isinstance(data, dict) and isinstance(data.get("inodes"), dict):
            return data
    except (OSError, ValueError):
        pass
    return {"inodes": {}, "last_run": None}


def write_state(storage: Storage, name: str, data: dict[str, Any]) -> None:
    path = state_path(storage, name)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    write_atomic(path, json.dumps(data, separators=(",", ":")))


def last_run(storage: Storage, name: str) -> dict[str, Any] | None:
    """The summary of the last verify of ``name`` (for ``status``), if any."""
    run = read_state(storage, name).get("last_run")
    return run if isinstance(run, dict) else None


# -- priority -------------------------------------------------------------------

IOPRIO_SET = {"x86_64": 251, "aarch64": 30, "i686": 289, "armv7l": 314, "riscv64": 30}
IOPRIO_WHO_PROCESS = 1
IOPRIO_CLASS_IDLE = 3


def idle_priority() -> bool:
    """Put this process in the idle I/O class (``ionice -c3``) and lower its
    CPU priority: verify yields to grabs and to everything else."""
    with contextlib.suppress(OSError):
        os.nice(10)
    number = IOPRIO_SET.get(platform.machine())
    if number is None:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.syscall(number, IOPRIO_WHO_PROCESS, 0, IOPRIO_CLASS_IDLE << 13)) == 0


# -- the run ------------------------------------------------------------------------

def run(storage: Storage, *, name: str | None = None, snapshot: str | None = None,
        share: float | None = None, budget: float | None = None, now: float | None = None,
        clock: Callable[[], float] = time.monotonic) -> Report:
    """Verify the snapshots of ``name`` (or of every name, or just ``snapshot``):
    see the module docstring. ``share`` is a fraction (0.05 for 5%),
    ``budget`` seconds."""
    now = time.time() if now is None else now
    report = Report(started=now)
    start = clock()
    by_name = storage.by_name()
    if snapshot is not None:
        snap = parse_snapshot(snapshot)
        if snap is None or snap.dirname not in {s.dirname for s in by_name.get(snap.name, [])}:
            raise FileNotFoundError(f"no snapshot {snapshot!r} in {storage.root}")
        by_name = {snap.name: [snap]}
    elif name is not None:
        by_name = {name: by_name[name]} if name in by_name else {}
        if not by_name:
            raise FileNotFoundError(f"no snapshot of {name!r} in {storage.root}")
    (storage.state / VERIFIED_DIR).mkdir(mode=0o700, exist_ok=True)
    storage.internal_lock("verify").parent.mkdir(mode=0o700, exist_ok=True)
    per_snapshot = backend.for_storage(storage).name == "btrfs"
    with locks.held(storage.internal_lock("verify"), what="verify"):
        candidates: list[Candidate] = []
        states: dict[str, dict[str, Any]] = {}
        complete: dict[str, bool] = {}
        for n, snaps in sorted(by_name.items()):
            report.names.append(n)
            state = states[n] = read_state(storage, n)
            known: dict[str, float] = state["inodes"]
            seen: set[str] = set()
            complete[n] = snapshot is None
            for snap in snaps:
                try:
                    found = manifest.load(storage, snap.dirname)
                except manifest.Damaged as e:
                    report.damaged_manifests.append({"snapshot": snap.dirname, "why": str(e)})
                    complete[n] = False
                    continue
                if found is None:
                    report.unverifiable.append(snap.dirname)
                    continue
                for entry in found.entries:
                    key = file_key(entry, snap.dirname, per_snapshot)
                    if key in seen:
                        continue
                    seen.add(key)
                    candidates.append(Candidate(
                        n, key, entry.ino, entry.digest, entry.size, snap.dirname,
                        snap.timestamp, entry.path, known.get(key, 0.0)))
        report.files = len(candidates)
        candidates.sort(key=lambda c: (c.last, c.timestamp))
        if share is not None:
            chosen = candidates[:math.ceil(share * len(candidates))]
            # read in path order: far fewer seeks than in verify order
            chosen.sort(key=lambda c: (c.name, c.timestamp, c.path))
        elif budget is not None:
            chosen = candidates  # least recently verified first, until the time is up
        else:
            chosen = sorted(candidates, key=lambda c: (c.name, c.timestamp, c.path))
        idle_priority()
        outcome: dict[str, dict[str, dict[str, Any] | None]] = {n: {} for n in by_name}
        trees: dict[str, manifest.Beneath] = {}
        saved = clock()
        with caps.raised("dac_override"), contextlib.ExitStack() as stack:  # 0700 dirs
            for c in chosen:
                if budget is not None and clock() - start >= budget:
                    break
                tree = trees.get(c.snapshot)
                if tree is None:
                    tree = trees[c.snapshot] = stack.enter_context(
                        manifest.Beneath(storage.root / c.snapshot))
                result = check(storage, c, tree)
                if result == "gone":
                    report.gone += 1
                    continue
                report.checked += 1
                if result is None:
                    report.good += 1
                    report.bytes_checked += c.size
                    states[c.name]["inodes"][c.key] = now
                else:
                    states[c.name]["inodes"].pop(c.key, None)
                outcome[c.name][c.key] = result if isinstance(result, dict) else None
                if clock() - saved >= CHECKPOINT:  # a killed run keeps what it read
                    for n, state in states.items():
                        write_state(storage, n, state)
                    saved = clock()
        for n in report.names:
            record_damage(storage, n, by_name[n], outcome[n], report, now, per_snapshot)
            known = states[n]["inodes"]
            keys = {c.key for c in candidates if c.name == n}
            if complete[n]:  # forget inodes no snapshot holds any more
                states[n]["inodes"] = known = {k: t for k, t in known.items() if k in keys}
            never = sum(1 for k in keys if k not in known)
            report.never_verified += never
            states[n]["last_run"] = {
                "time": now, "files": len(keys), "never_verified": never,
                "checked": len(outcome[n]),
                "bad": len(damage.read(storage, n)),
                "unverifiable": sum(1 for s in report.unverifiable
                                    if (p := parse_snapshot(s)) and p.name == n),
            }
            write_state(storage, n, states[n])
    report.seconds = round(clock() - start, 3)
    return report


def check(storage: Storage, c: Candidate, tree: manifest.Beneath) -> dict[str, Any] | str | None:
    """None when ``c`` reads as its manifest says; "gone" when its snapshot
    was removed meanwhile; else what is wrong with it."""
    root = storage.root / c.snapshot
    try:
        fd = tree.open(c.path, c.ino)
    except FileNotFoundError as e:
        if not root.is_dir():
            return "gone"
        return {"kind": "missing", "why": str(e)}
    except OSError as e:
        return {"kind": "unreadable", "why": str(e)}
    try:
        digest, size = manifest.hash_fd(fd, drop_cache=True, hash=manifest.hash_of(c.digest))
    except OSError as e:  # EIO: what a failing disk says
        return {"kind": "unreadable", "why": str(e)}
    finally:
        os.close(fd)
    if digest == c.digest and size == c.size:
        return None
    return {"kind": "content", "found": digest, "size_found": size,
            "why": "its bytes differ from those the pull stored"}


def file_key(entry: manifest.Entry, snapshot: str, per_snapshot: bool) -> str:
    """The key of one stored file: its inode and content hash, which hard-linked
    snapshots share. On btrfs every snapshot is a subvolume that keeps the
    inode numbers of the one it was made from, yet its blocks may differ after
    a copy-on-write, so a file there is one per snapshot (issues 14, 15)."""
    # (the hex alone: a file verified under a version 1 manifest keeps its key)
    key = f"{entry.ino}:{entry.digest.partition(':')[2][:16]}"
    return f"{snapshot}/{key}" if per_snapshot else key


def record_damage(storage: Storage, name: str, snaps: list[Any],
                  outcome: dict[str, dict[str, Any] | None], report: Report, now: float,
                  per_snapshot: bool = False) -> None:
    """Update ``name``'s damage record with this run's outcome (``snaps``: the
    snapshots this run chose; earlier findings count only in those): a file read
    good is no longer bad; a bad one is recorded with every snapshot and path
    holding its inode (the manifests of every snapshot of the name are read
    again for it: damage is rare)."""
    records = {r["key"]: r for r in damage.read(storage, name) if "key" in r}
    bad = {k: v for k, v in outcome.items() if v is not None}
    for key in outcome:
        if key not in bad:
            records.pop(key, None)
    if bad:
        where: dict[str, dict[str, list[str]]] = {k: {} for k in bad}
        entries: dict[str, manifest.Entry] = {}
        for snap in storage.snapshots(name):
            try:
                found = manifest.load(storage, snap.dirname)
            except manifest.Damaged:
                continue
            for e in found.entries if found is not None else ():
                key = file_key(e, snap.dirname, per_snapshot)
                if key in bad:
                    where[key].setdefault(snap.dirname, []).append(e.path)
                    entries.setdefault(key, e)
        for key, what in bad.items():
            first = entries.get(key)
            if first is None:
                continue
            rec = {"key": key, "name": name, "ino": first.ino, "digest": first.digest,
                   "size": first.size,
                   "detected": records.get(key, {}).get("detected", now), "checked": now,
                   **what, "where": where[key], "snapshots": sorted(where[key])}
            records[key] = rec
            report.bad.append(rec)
    damage.write(storage, name, list(records.values()))
    chosen = {s.dirname for s in snaps}
    report.known_bad += sum(1 for k, r in records.items() if k not in bad and k not in outcome
                            and chosen & set(r["where"]))


# -- output -----------------------------------------------------------------------

def to_text(report: Report) -> str:
    """A summary for people: every bad file with every snapshot holding it."""
    from bakgrab.tasks.result import human_bytes

    lines = []
    for rec in report.bad:
        lines.append(f"BAD {rec['name']}: {rec['where'][rec['snapshots'][0]][0]} "
                     f"({rec['kind']}: {rec['why']})")
        for snap in rec["snapshots"]:
            lines.append(f"    in {snap}: {', '.join(rec['where'][snap])}")
    for m in report.damaged_manifests:
        lines.append(f"DAMAGED MANIFEST {m['snapshot']}: {m['why']} (its files cannot be checked)")
    for s in report.unverifiable:
        lines.append(f"UNVERIFIABLE {s}: no manifest (made before manifests existed?)")
    if report.known_bad:
        lines.append(f"{report.known_bad} file(s) found bad before, not read again in this run")
    lines.append(
        f"checked {report.checked} of {report.files} file(s) ({human_bytes(report.bytes_checked)})"
        f" in {report.seconds:.1f}s: {report.good} good, {len(report.bad)} bad; "
        f"{report.never_verified} never verified")
    return "\n".join(lines)
