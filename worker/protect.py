"""Protected snapshots: a legal hold, or "the one before the upgrade" (issue 16).

``bakgrab protect`` writes ``STORAGE/.bakgrab/protected/SNAPSHOT.json``
(never anything inside the snapshot, which stays a pure mirror of the
client); ``bakgrab unprotect`` removes it. Invariants:

* a protected snapshot survives every rule: expiry by the keep rules, the
  fair shares and the classic free-space rule (:mod:`bakgrab.worker.retention`
  asks :func:`active` before each candidate);
* a protection with an ``until`` time lapses at that moment by itself (its
  record stays, marked expired, until ``unprotect`` or the snapshot goes);
* a record whose snapshot is gone (removed by hand) protects nothing;
  an unreadable record protects its snapshot (fail safe: keep, not delete).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import time
from pathlib import Path
from typing import Any

from bakgrab.tasks.errors import BakgrabError, ConfigError
from bakgrab.worker.storage import Storage, parse_snapshot, write_atomic

NOTE_MAX = 500
"""Characters a note may have."""


@dataclasses.dataclass(frozen=True)
class Protection:
    snapshot: str
    since: float
    until: float | None = None
    note: str = ""

    def active(self, now: float | None = None) -> bool:
        return self.until is None or (time.time() if now is None else now) < self.until

    def describe(self, tz: dt.tzinfo | None = None) -> str:
        until = "" if self.until is None else " until " + dt.datetime.fromtimestamp(
            self.until, tz).isoformat(timespec="minutes")
        lapsed = "" if self.active() else " (lapsed)"
        return f"protected{until}{lapsed}" + (f": {self.note}" if self.note else "")

    def to_dict(self) -> dict[str, Any]:
        return {"snapshot": self.snapshot, "since": self.since, "until": self.until,
                "note": self.note, "active": self.active()}


def directory(storage: Storage) -> Path:
    return storage.state / "protected"


def parse_until(text: str, tz: dt.tzinfo) -> float:
    """A time from ``--until``: an ISO date protects through the end of that
    day in ``tz``; a date and time (ISO, optionally with an offset) until then."""
    try:
        if len(text.strip()) == 10:
            day = dt.date.fromisoformat(text.strip())
            end = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), tz)
            return end.timestamp()
        moment = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ConfigError(f"--until {text!r}: use a date (2027-01-31) or a date and time "
                          "(2027-01-31T18:00)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=tz)
    return moment.timestamp()


def check_snapshot(storage: Storage, snapshot: str) -> str:
    """``snapshot`` as a complete snapshot's dirname of this storage."""
    snapshot = snapshot.rstrip("/")
    snap = parse_snapshot(snapshot)
    if snap is None or "/" in snapshot or not (storage.root / snapshot).is_dir() or (
            storage.root / snapshot).is_symlink():
        raise BakgrabError(f"{snapshot!r} is no complete snapshot of {storage.root} "
                           "(give its directory name, NAME.YYYY-mm-dd.UNIXTIME, as `bakgrab "
                           "list` shows it)")
    return snapshot


def protect(storage: Storage, snapshot: str, until: float | None = None,
            note: str = "") -> Protection:
    snapshot = check_snapshot(storage, snapshot)
    if len(note) > NOTE_MAX or any(ord(c) < 32 for c in note):
        raise ConfigError(f"--note: at most {NOTE_MAX} characters, no control characters")
    if until is not None and until <= time.time():
        raise ConfigError("--until is in the past: the protection would hold nothing")
    found = Protection(snapshot, time.time(), until, note)
    path = directory(storage)
    path.mkdir(mode=0o700, exist_ok=True)
    write_atomic(path / f"{snapshot}.json", json.dumps(dataclasses.asdict(found)))
    return found


def unprotect(storage: Storage, snapshot: str) -> Protection | None:
    """Remove the protection of ``snapshot``; the one it had, or None."""
    snapshot = snapshot.rstrip("/")
    if parse_snapshot(snapshot) is None or "/" in snapshot:
        raise BakgrabError(f"{snapshot!r} is no snapshot name (NAME.YYYY-mm-dd.UNIXTIME)")
    old = read_all(storage).get(snapshot)
    (directory(storage) / f"{snapshot}.json").unlink(missing_ok=True)
    return old


def read_all(storage: Storage) -> dict[str, Protection]:
    """Every protection record of snapshots that exist, lapsed ones included."""
    path = directory(storage)
    out: dict[str, Protection] = {}
    if not path.is_dir():
        return out
    for entry in os.scandir(path):
        if not entry.name.endswith(".json"):
            continue
        snapshot = entry.name.removesuffix(".json")
        if parse_snapshot(snapshot) is None or not os.path.isdir(storage.root / snapshot):
            continue
        try:
            data = json.loads(Path(entry.path).read_text())
            until = data.get("until")
            out[snapshot] = Protection(snapshot, float(data.get("since", 0)),
                                       None if until is None else float(until),
                                       str(data.get("note", ""))[:NOTE_MAX])
        except (OSError, ValueError, TypeError, AttributeError):
            out[snapshot] = Protection(snapshot, 0.0, None, "(unreadable protection record)")
    return out


def active(storage: Storage, now: float | None = None) -> dict[str, Protection]:
    """The protections in force now, by snapshot dirname."""
    return {k: p for k, p in read_all(storage).items() if p.active(now)}


def forget(storage: Storage, snapshot: str) -> None:
    """Drop the record of a snapshot that is gone."""
    (directory(storage) / f"{snapshot}.json").unlink(missing_ok=True)
