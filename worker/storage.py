"""The storage layout on the backup host.

::

    STORAGE/NAME.YYYY-mm-dd.UNIXTIME/   a complete snapshot, a pure mirror of
                                        the client's tree and nothing else
    STORAGE/.bakgrab/                   everything else bakgrab keeps (0700):
        inprogress/NAME/                the pull of NAME under way (resumable; on
                                        btrfs a writable subvolume, issue 14)
        meta/SNAPSHOT.json              stats, excludes, exit code, host key
        meta/SNAPSHOT.exclude           the exclude rules the pull used
        meta/SNAPSHOT.manifest          every regular file's SHA-256 (issue 15)
        verified/NAME.json              when verify last read each inode of NAME
        damage/NAME.json                files verify found bad, and where
        heal/NAME/                      a grab's --link-dest without them
        pins/NAME.pub                   the client's pinned sshd host key
        locks/WHAT.lock                 bakgrab's own flock(2) files (storage, trash, scheduler)
        locks/names/NAME.lock           flock(2) file of one name (issue 11)
        locks/clients/KEYHASH.N.lock    the job slots of one client key (issue 11)
        usage/NAME.json                 cached per-name usage (what cleanup weighs)
        jobs/TASK_ID.json               finished jobs, for idempotent redelivery
                                        (kept as long as the results, then swept)
        pulls/NAME.json                 which task filled inprogress/NAME, and
                                        whether its pull finished (issue 13)
        failures/NAME                   one JSON line per grab that failed for good
        notify-state/NAME.json          the name's conditions already told (issue 17)
        run/                            per-job private files (key, known_hosts)
        trash/                          snapshots being deleted
        protected/SNAPSHOT.json         a protection: until, note (issue 16)

Invariants: a name matching :data:`SNAPSHOT_RE` exists only for a complete
snapshot (it appears by one atomic rename, on btrfs by one read-only
snapshot of the in-progress subvolume: :mod:`bakgrab.worker.backend`); everything else lives under
dot-names so it never matches; the date in a snapshot name is the UTC date of
its UNIXTIME.

Internal names never collide with backup names (issue 11, attack 8): a
directory under ``.bakgrab`` holds either only per-name entries (``NAME`` or
``NAME.<suffix>``) or only bakgrab's own files, never both (``locks/``
holds the storage-wide locks and the ``names/`` subdir). Storages made before
this layout kept name locks as ``locks/NAME.lock`` beside
``locks/storage.lock``; those files are ignored now (flock files are empty),
and cleanup still honours a legacy name lock an older worker holds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any

SNAPSHOT_RE = re.compile(r"^(?P<name>[^.].*)\.(?P<date>\d{4}-\d{2}-\d{2})\.(?P<ts>\d+)\Z")
STATE = ".bakgrab"
INTERNAL_LOCKS = ("storage", "trash", "scheduler", "verify")  # (verify: issue 15)
"""bakgrab's own flock files, ``.bakgrab/locks/WHAT.lock``; names' locks are
in ``locks/names/`` (issue 11), so no backup name can hold one of these."""


@dataclasses.dataclass(frozen=True, order=True)
class Snapshot:
    """A complete snapshot directory in STORAGE."""

    timestamp: int
    name: str
    dirname: str

    @property
    def date(self) -> str:
        return time.strftime("%Y-%m-%d", time.gmtime(self.timestamp))


def snapshot_dirname(name: str, timestamp: int) -> str:
    return f"{name}.{time.strftime('%Y-%m-%d', time.gmtime(timestamp))}.{timestamp}"


def parse_snapshot(dirname: str) -> Snapshot | None:
    m = SNAPSHOT_RE.match(dirname)
    if not m:
        return None
    return Snapshot(int(m.group("ts")), m.group("name"), dirname)


class Storage:
    """A storage directory and the paths bakgrab keeps in it."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).absolute()
        self.state = self.root / STATE

    def prepare(self) -> Storage:
        """Create the state directories (0700); the storage itself must exist."""
        if not self.root.is_dir():
            raise FileNotFoundError(f"storage {self.root} is not a directory")
        for sub in ("", "inprogress", "meta", "pins", "locks", "locks/names", "locks/clients",
                    "usage", "jobs", "pulls", "run", "trash"):
            path = self.state / sub
            path.mkdir(mode=0o700, exist_ok=True)
            os.chmod(path, 0o700)
        return self

    # -- paths ------------------------------------------------------------
    def inprogress(self, name: str) -> Path:
        return self.state / "inprogress" / name

    def meta(self, snapshot: str, suffix: str = ".json") -> Path:
        return self.state / "meta" / (snapshot + suffix)

    def pin(self, name: str) -> Path:
        return self.state / "pins" / f"{name}.pub"

    def lock(self, name: str) -> Path:
        """The flock file of one name: one grab per name at a time."""
        return self.state / "locks" / "names" / f"{name}.lock"

    def client_slots(self, key: str, count: int) -> list[Path]:
        """The flock files of the ``count`` jobs one client key may run at once
        (issue 11), named by the key's hash so no name can collide."""
        digest = hashlib.sha256(key.encode()).hexdigest()[:32]
        return [self.state / "locks" / "clients" / f"{digest}.{i}.lock" for i in range(count)]

    def legacy_lock(self, name: str) -> Path | None:
        """Where a worker of the old layout locks ``name``, or None when that
        path is one of the storage-wide locks (the collision of issue 11)."""
        if name in INTERNAL_LOCKS:
            return None
        return self.state / "locks" / f"{name}.lock"

    def internal_lock(self, what: str) -> Path:
        """A storage-wide lock of bakgrab's own (one of :data:`INTERNAL_LOCKS`)."""
        if what not in INTERNAL_LOCKS:
            raise ValueError(f"not an internal lock: {what}")
        return self.state / "locks" / f"{what}.lock"

    @property
    def storage_lock(self) -> Path:
        """Held by the free-space cleanup: one at a time over the storage."""
        return self.internal_lock("storage")

    @property
    def trash_lock(self) -> Path:
        return self.internal_lock("trash")

    def usage(self, name: str) -> Path:
        return self.state / "usage" / f"{name}.json"

    def job(self, task_id: str) -> Path:
        return self.state / "jobs" / f"{task_id}.json"

    @property
    def jobs(self) -> Path:
        return self.state / "jobs"

    def pull_mark(self, name: str) -> Path:
        """The record tying ``inprogress(name)`` to the task that fills it."""
        return self.state / "pulls" / f"{name}.json"

    @property
    def request_key(self) -> Path:
        """The request private key: clients seal one-time keys to its public half."""
        return self.state / "request.key"

    @property
    def run_dir(self) -> Path:
        return self.state / "run"

    @property
    def trash(self) -> Path:
        return self.state / "trash"

    # -- inventory --------------------------------------------------------
    def snapshots(self, name: str | None = None) -> list[Snapshot]:
        """Complete snapshots, oldest first (of one name, or all)."""
        found = []
        with os.scandir(self.root) as it:
            for entry in it:
                snap = parse_snapshot(entry.name)
                if (snap and entry.is_dir(follow_symlinks=False)
                        and (name is None or snap.name == name)):
                    found.append(snap)
        return sorted(found)

    def by_name(self) -> dict[str, list[Snapshot]]:
        """Every name with its complete snapshots, oldest first."""
        out: dict[str, list[Snapshot]] = {}
        for snap in self.snapshots():
            out.setdefault(snap.name, []).append(snap)
        return out

    def newest(self, name: str) -> Snapshot | None:
        snaps = self.snapshots(name)
        return snaps[-1] if snaps else None

    def inprogress_names(self) -> list[str]:
        base = self.state / "inprogress"
        return sorted(p.name for p in base.iterdir()) if base.is_dir() else []

    # -- records ----------------------------------------------------------
    def read_meta(self, snapshot: str) -> dict[str, Any]:
        try:
            data = json.loads(self.meta(snapshot).read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def next_dirname(self, name: str, timestamp: int) -> str:
        """A snapshot dirname for ``name`` at ``timestamp`` that is not taken yet."""
        while os.path.lexists(self.root / snapshot_dirname(name, timestamp)):
            timestamp += 1
        return snapshot_dirname(name, timestamp)


def write_atomic(path: Path, data: bytes | str, mode: int = 0o600) -> None:
    """Write ``path`` by a rename so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)  # a leftover would keep its old mode
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
