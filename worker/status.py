"""Is every name backed up recently? ``bakgrab status``, for cron and Prometheus.

Per name: its last successful snapshot (the newest complete one, partial
included: it was published), that snapshot's age, duration and size (the
``total_size`` of rsync's stats, from its metadata), how many grabs of the
name ended in a final failure, and whether it is STALE: older than the limit,
or no successful snapshot at all. Also (issue 15) the files ``bakgrab
verify`` found bad in its snapshots, and when its last verify ran.

Failures are an append-only record written by the worker when a grab ends
for good (no retry left, or not retryable)::

    STORAGE/.bakgrab/failures/NAME      one JSON line per failed grab

Invariants: reading never writes to the storage (safe while grabs run); a
failure record holds no secret (time, task id, error class, exit code, and
only a bakgrab error's message, which never carries one); recording a failure
never raises, so it cannot hide the failure it records; the metrics file
appears by one rename, so node_exporter never reads half of it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bakgrab.tasks.errors import EXIT_STALE, BakgrabError, InvalidRequest, exit_code_for
from bakgrab.tasks.result import human_bytes
from bakgrab.worker.storage import Storage, write_atomic

log = logging.getLogger(__name__)


FAILURES_DIR = "failures"
MAX_MESSAGE = 300
"""Characters of an error message kept in a failure record."""


@dataclasses.dataclass(frozen=True)
class NameStatus:
    """The backup state of one name at one moment."""

    name: str
    stale: bool
    snapshot: str | None = None
    """The last successful snapshot's directory name; None if there is none."""
    finished: float | None = None
    """Unix time the last successful grab ended."""
    age: float | None = None
    """Seconds since ``finished``."""
    duration: float | None = None
    """Seconds the last successful grab took (None without metadata)."""
    total_size: int | None = None
    """Bytes of the last successful snapshot's tree (rsync's total size)."""
    partial: bool = False
    failures: int = 0
    """Grabs of this name that ended in a final failure, ever."""
    last_failure: float | None = None
    in_progress: bool = False
    """An in-progress dir exists: a grab runs, or one was interrupted."""
    damaged_files: int = 0
    """Files verify found bad that some snapshot of the name still holds (issue 15)."""
    damaged_snapshots: int = 0
    last_verify: float | None = None
    """Unix time of the name's last verify run."""
    last_verify_checked: int | None = None
    """Files that run read."""
    never_verified: int | None = None
    """Files no verify has read yet, as of that run."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- failure records (written by the worker) ------------------------------------

def failures_path(storage: Storage, name: str) -> Path:
    return storage.state / FAILURES_DIR / name


def record_failure(storage: Storage, name: str, task_id: str, exc: BaseException) -> None:
    """Append one failed grab of ``name`` to its record; log, never raise.

    A refused request is not recorded: a bad request writes nothing."""
    if isinstance(exc, InvalidRequest):
        return
    entry: dict[str, Any] = {
        "time": time.time(),
        "task_id": task_id,
        "error": type(exc).__name__,
        "exit_code": exit_code_for(exc),
    }
    if isinstance(exc, BakgrabError):
        entry["message"] = exc.message[:MAX_MESSAGE]
    line = (json.dumps(entry) + "\n").encode()
    try:
        path = failures_path(storage, name)
        path.parent.mkdir(mode=0o700, exist_ok=True)
        # One write(2) with O_APPEND: lines of concurrent workers never interleave.
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
    except OSError as e:
        log.warning("could not record the failure of %s: %s", name, e)


def read_failures(storage: Storage, name: str) -> tuple[int, float | None]:
    """How many final failures ``name`` had, and when the last one was."""
    try:
        lines = failures_path(storage, name).read_bytes().splitlines()
    except FileNotFoundError:
        return 0, None
    lines = [line for line in lines if line.strip()]
    last = None
    if lines:
        try:
            last = float(json.loads(lines[-1])["time"])
        except (ValueError, KeyError, TypeError):
            last = None
    return len(lines), last


def failed_for_good(storage: Storage, name: str, task_id: str) -> bool:
    """Whether ``task_id`` already ended in a final failure of ``name`` (a
    redelivery of it: the worker died before the broker had its ack)."""
    try:
        data = failures_path(storage, name).read_bytes()
    except FileNotFoundError:
        return False
    needle = json.dumps(task_id).encode()
    if needle not in data:  # (the common case, without parsing a line)
        return False
    for line in data.splitlines():
        try:
            if json.loads(line).get("task_id") == task_id:
                return True
        except (ValueError, AttributeError):
            continue
    return False


def failure_names(storage: Storage) -> list[str]:
    base = storage.state / FAILURES_DIR
    if not base.is_dir():
        return []
    return sorted(p.name for p in base.iterdir() if not p.name.startswith("."))


# -- status -----------------------------------------------------------------------

def collect(storage: Storage, stale_after: float, now: float | None = None) -> list[NameStatus]:
    """The status of every name the storage knows (snapshots, failures, or a
    grab in progress), sorted by name; ``now`` is for tests."""
    if not storage.root.is_dir():
        raise FileNotFoundError(f"storage {storage.root} is not a directory")
    now = time.time() if now is None else now
    by_name = storage.by_name()
    in_progress = set(storage.inprogress_names())
    names = set(by_name) | in_progress | set(failure_names(storage))
    out = []
    for name in sorted(names):
        failures, last_failure = read_failures(storage, name)
        common: dict[str, Any] = {"name": name, "failures": failures,
                                  "last_failure": last_failure,
                                  "in_progress": name in in_progress,
                                  **verify_fields(storage, name)}
        snaps = by_name.get(name)
        if not snaps:
            out.append(NameStatus(stale=True, **common))
            continue
        newest = snaps[-1]
        meta = storage.read_meta(newest.dirname)
        finished = _number(meta.get("finished")) or float(newest.timestamp)
        started = _number(meta.get("started"))
        result, stats = (meta.get(k) for k in ("result", "stats"))
        result = result if isinstance(result, dict) else {}
        stats = stats if isinstance(stats, dict) else {}
        duration = _number(result.get("duration"))
        if duration is None and started is not None:
            duration = round(finished - started, 3)
        size = stats.get("total_size", result.get("total_size"))
        age = max(0.0, now - finished)
        out.append(NameStatus(
            stale=age > stale_after,
            snapshot=newest.dirname,
            finished=finished,
            age=round(age, 3),
            duration=duration,
            total_size=int(size) if isinstance(size, int | float) else None,
            partial=bool(meta.get("partial", False)),
            **common,
        ))
    return out


def verify_fields(storage: Storage, name: str) -> dict[str, Any]:
    """Damage and last verify of ``name`` (issue 15): reads, never writes."""
    from bakgrab.worker import damage, verify

    bad = damage.damaged_snapshots(storage, name)
    run = verify.last_run(storage, name) or {}
    return {"damaged_files": len(damage.read(storage, name)), "damaged_snapshots": len(bad),
            "last_verify": _number(run.get("time")),
            "last_verify_checked": run.get("checked") if isinstance(run.get("checked"), int)
            else None,
            "never_verified": run.get("never_verified")
            if isinstance(run.get("never_verified"), int) else None}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def exit_code(statuses: Iterable[NameStatus]) -> int:
    return EXIT_STALE if any(s.stale for s in statuses) else 0


# -- output -------------------------------------------------------------------------

def human_duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"


def to_text(statuses: list[NameStatus], stale_after: float) -> str:
    """A table for people, one name a line, then a one-line verdict."""
    if not statuses:
        return "no backup names in this storage"
    rows = [("NAME", "LAST SUCCESS (UTC)", "AGE", "DURATION", "SIZE", "FAILURES", "STATUS")]
    for s in statuses:
        notes = ["partial"] if s.partial else []
        if s.snapshot is None:
            notes.insert(0, "no successful snapshot")
        if s.in_progress:
            notes.append("a grab in progress or interrupted")
        if s.damaged_files:
            notes.append(f"DAMAGED: {s.damaged_files} bad file(s) in "
                         f"{s.damaged_snapshots} snapshot(s), see bakgrab verify")
        state = ("STALE" if s.stale else "ok") + (f" ({'; '.join(notes)})" if notes else "")
        if s.snapshot is None:
            rows.append((s.name, "-", "-", "-", "-", str(s.failures), state))
            continue
        assert s.finished is not None and s.age is not None
        rows.append((
            s.name,
            time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(s.finished)),
            human_duration(s.age),
            "-" if s.duration is None else human_duration(s.duration),
            "-" if s.total_size is None else human_bytes(s.total_size),
            str(s.failures),
            state,
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    stale = sum(s.stale for s in statuses)
    limit = next((f"{stale_after / size:g}{unit}" for unit, size in
                  (("d", 86400), ("h", 3600), ("m", 60)) if stale_after % size == 0),
                 f"{stale_after:g}s")
    lines.append(f"{stale} of {len(statuses)} name(s) STALE (limit {limit})" if stale
                 else f"all {len(statuses)} name(s) backed up within {limit}")
    return "\n".join(lines)


METRICS = (
    ("bakgrab_last_success_timestamp_seconds", "gauge",
     "Unix time the last successful grab of the name ended.", "finished"),
    ("bakgrab_last_success_bytes", "gauge",
     "Size in bytes of the name's last successful snapshot (rsync total size).", "total_size"),
    ("bakgrab_last_success_duration_seconds", "gauge",
     "Seconds the last successful grab of the name took.", "duration"),
    ("bakgrab_failures_total", "counter",
     "Grabs of the name that ended in a final failure.", "failures"),
    ("bakgrab_stale", "gauge",
     "1 if the name's last success is older than the stale limit or missing, else 0.", "stale"),
    ("bakgrab_damaged_files", "gauge",
     "Files verify found bad that a snapshot of the name still holds.", "damaged_files"),
    ("bakgrab_last_verify_timestamp_seconds", "gauge",
     "Unix time the last verify of the name ran.", "last_verify"),
    ("bakgrab_last_verify_files", "gauge",
     "Files the last verify of the name read.", "last_verify_checked"),
)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def metrics_text(statuses: list[NameStatus]) -> str:
    """Prometheus text exposition; a name without a success has no last_success_* samples."""
    out = []
    for metric, kind, help_text, field in METRICS:
        out.append(f"# HELP {metric} {help_text}")
        out.append(f"# TYPE {metric} {kind}")
        for s in statuses:
            value = getattr(s, field)
            if value is None:
                continue
            number = int(value) if isinstance(value, bool) else value
            out.append(f'{metric}{{name="{_label(s.name)}"}} {_format(number)}')
    return "\n".join(out) + "\n"


def _format(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def write_metrics(statuses: list[NameStatus], path: Path) -> None:
    """Write :func:`metrics_text` to ``path`` by a rename (0644: node_exporter reads it)."""
    write_atomic(Path(path), metrics_text(statuses), mode=0o644)
