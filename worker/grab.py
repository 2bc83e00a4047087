"""One grab: pull a client's tree into a new hard-linked snapshot.

Order of a grab, each step only after the one before succeeded:

1. the request is validated (by the caller) and the task id checked: a bad
   request writes nothing;
2. a finished record of this task id returns the finished result (a second
   delivery never makes a second snapshot);
3. the name's lock is taken: one grab per name, across workers;
4. the client's sshd host key is compared with the pin (pinned on first use);
5. free-space cleanup runs under the storage lock;
6. the key, known_hosts and exclude rules are written to a private 0700 run
   dir, removed when the grab ends, whatever happens;
7. rsync pulls into ``.bakgrab/inprogress/NAME`` (kept on failure, so the
   next attempt resumes into it) with ``--link-dest`` = newest snapshot;
8. the job record and stats are written, then the in-progress dir is renamed
   to ``NAME.YYYY-mm-dd.UNIXTIME``.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bakgrab.tasks import caps, process
from bakgrab.tasks.config import Settings
from bakgrab.tasks.errors import HostKeyMismatch, InvalidRequest, TransferInterrupted
from bakgrab.tasks.request import GrabRequest, fingerprint
from bakgrab.tasks.result import GrabResult
from bakgrab.worker import locks, retention, rsync
from bakgrab.worker.storage import Storage, fsync_dir, write_atomic

log = logging.getLogger(__name__)

TASK_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
PROGRESS_EVERY = 1.0
"""Seconds between two progress reports (rsync prints many more)."""
MAX_FAILED_PATHS = 1000

ProgressFn = Callable[[dict[str, Any]], None]


def check_task_id(task_id: Any) -> str:
    if not isinstance(task_id, str) or not TASK_ID_RE.fullmatch(task_id):
        raise InvalidRequest("task id: letters, digits, _ and - only")
    return task_id


def finished(storage: Storage, task_id: str) -> dict[str, Any] | None:
    """The result of an earlier delivery of ``task_id`` that completed, if any.

    A record is written before the final rename; if the worker died between
    the two, the completed pull is published now."""
    try:
        record = json.loads(storage.job(task_id).read_text())
    except (OSError, ValueError):
        return None
    snapshot = record.get("snapshot", "")
    if not (storage.root / snapshot).is_dir():
        name = record.get("name", "")
        if not storage.inprogress(name).is_dir():
            return None
        with caps.raised("dac_override"):
            os.rename(storage.inprogress(name), storage.root / snapshot)
    result: dict[str, Any] = record["result"]
    return result


def check_pin(storage: Storage, request: GrabRequest) -> None:
    """Pin the client's host key on first use; refuse a different one later."""
    pin = storage.pin(request.name)
    try:
        pinned = pin.read_text().strip()
    except FileNotFoundError:
        write_atomic(pin, request.host_key + "\n", mode=0o644)
        log.info("pinned host key %s for %s", request.host_key_fingerprint, request.name)
        return
    if pinned != request.host_key:
        raise HostKeyMismatch(
            f"{request.name}: the request's sshd host key {request.host_key_fingerprint} "
            f"differs from the pinned {fingerprint(pinned)}; nothing was changed. If the "
            f"client's key changed legitimately, run `bakgrab trust {request.name}`."
        )


@contextlib.contextmanager
def job_files(storage: Storage, task_id: str, request: GrabRequest) -> Iterator[dict[str, Path]]:
    """The key, known_hosts and exclude file of one job, in a 0700 dir that is
    removed when the job ends, whatever happens. A flock marks the dir live, so
    a later job can remove dirs that a killed process left behind."""
    sweep_run_dir(storage)
    run = storage.run_dir / task_id
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(mode=0o700)
    lock = os.open(run / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        files = {"key": run / "key", "known_hosts": run / "known_hosts", "exclude": run / "exclude"}
        fd = os.open(files["key"], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(request.key)
        write_atomic(files["known_hosts"], f"{host_alias(request.name)} {request.host_key}\n")
        write_atomic(files["exclude"], rsync.exclude_rules(request.excludes))
        yield files
    finally:
        shutil.rmtree(run, ignore_errors=True)
        os.close(lock)


SWEEP_AFTER = 60.0
"""Seconds a run dir must exist before a sweep may judge it (it is locked
right after it is made)."""


def sweep_run_dir(storage: Storage) -> None:
    """Remove run dirs (and the keys in them) of jobs whose process died
    without cleaning up: their lock is no longer held."""
    now = time.time()
    for entry in storage.run_dir.iterdir():
        try:
            young = now - entry.lstat().st_mtime < SWEEP_AFTER
        except FileNotFoundError:
            continue
        if not young and not locks.is_held(entry / ".lock"):
            shutil.rmtree(entry, ignore_errors=True)


def host_alias(name: str) -> str:
    return f"bakgrab-{name}"


def grab(
    storage: Storage,
    settings: Settings,
    request: GrabRequest,
    task_id: str,
    on_progress: ProgressFn = lambda info: None,
    attempt: int = 1,
) -> GrabResult:
    """Pull one snapshot of ``request.name``; see the module docstring."""
    task_id = check_task_id(task_id)
    storage.prepare()
    done = finished(storage, task_id)
    if done is not None:
        log.info("task %s already finished: %s", task_id, done.get("snapshot"))
        return GrabResult.from_dict(done)

    started = time.time()
    retention.admit(storage, settings, request.name)  # max_names, before any write (issue 11)
    with locks.held(storage.lock(request.name), what=f"name {request.name}"):
        done = finished(storage, task_id)
        if done is not None:
            return GrabResult.from_dict(done)
        check_pin(storage, request)
        on_progress({"phase": "cleanup"})
        removed = retention.make_room(storage, settings, current=request.name)
        link = storage.newest(request.name)
        dest = storage.inprogress(request.name)
        with caps.raised("dac_override", "fowner"):
            resumed = dest.is_dir()
            dest.mkdir(mode=0o700, exist_ok=True)
            os.utime(dest)  # an in-progress dir in use is never "stale"
        with job_files(storage, task_id, request) as files:
            spec = rsync.PullSpec(
                user=request.user,
                address=request.address,
                port=request.port,
                key_file=files["key"],
                known_hosts=files["known_hosts"],
                host_alias=host_alias(request.name),
                exclude_file=files["exclude"],
                dest=dest,
                link_dest=storage.root / link.dirname if link else None,
                timeout=settings.rsync_timeout,
                connect_timeout=settings.connect_timeout,
                alive_interval=settings.server_alive_interval,
                bwlimit=settings.bwlimit,
                as_root=os.geteuid() == 0,
            )
            on_progress({"phase": "pulling", "resumed": resumed})
            outcome = run_pull(spec, on_progress)
            exclude_text = files["exclude"].read_text()

        on_progress({"phase": "finalizing"})
        return publish(storage, request, task_id, outcome, exclude_text, removed, started,
                       link.dirname if link else None, attempt)


class PullOutcome:
    """What one rsync run left: exit code, stats, warnings, failed paths."""

    def __init__(self, code: int, stdout_tail: str, stderr_tail: str, failed: list[str]) -> None:
        self.code = code
        self.stats = rsync.parse_stats(stdout_tail)
        self.stderr_tail = stderr_tail
        self.failed_paths = failed


def run_pull(spec: rsync.PullSpec, on_progress: ProgressFn) -> PullOutcome:
    """Run the pull, report its progress, and classify its exit."""
    return run_rsync(rsync.pull_argv(spec), on_progress)


def run_rsync(argv: list[str], on_progress: ProgressFn) -> PullOutcome:
    """Run rsync, report its progress, and classify its exit."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C",
           "HOME": os.environ.get("HOME", "/")}
    stderr_lines: collections.deque[str] = collections.deque(maxlen=200)
    failed: list[str] = []

    with process.spawn(argv, env=env) as child:
        assert child.stdout is not None and child.stderr is not None
        err_stream = child.stderr

        def read_stderr() -> None:
            for raw in err_stream:
                line = raw.decode(errors="replace").rstrip("\n")
                stderr_lines.append(line)
                path = rsync.failed_path(line)
                if path is not None and len(failed) < MAX_FAILED_PATHS:
                    failed.append(path)

        reader = threading.Thread(target=read_stderr, daemon=True)
        reader.start()
        tail: collections.deque[str] = collections.deque(maxlen=64)
        last = 0.0
        buf = b""
        while True:
            chunk = os.read(child.stdout.fileno(), 65536)
            if not chunk:
                break
            buf += chunk
            *lines, buf = re.split(rb"[\r\n]", buf)
            for raw in lines:
                line = raw.decode(errors="replace")
                tail.append(line)
                now = time.monotonic()
                if now - last >= PROGRESS_EVERY:
                    progress = rsync.parse_progress(line)
                    if progress is not None:
                        last = now
                        on_progress({"phase": "pulling", **progress.__dict__})
        code = child.wait()
        reader.join(10)
    tail.append(buf.decode(errors="replace"))
    if code < 0:
        raise TransferInterrupted(f"rsync was killed by signal {-code}", code)
    stderr_tail = "\n".join(stderr_lines)
    rsync.classify(code, stderr_tail)
    return PullOutcome(code, "\n".join(tail), stderr_tail, failed)


def publish(
    storage: Storage,
    request: GrabRequest,
    task_id: str,
    outcome: PullOutcome,
    exclude_text: str,
    removed: list[dict[str, Any]],
    started: float,
    link_dest: str | None,
    attempt: int,
) -> GrabResult:
    """Record the run beside the snapshot, then make the snapshot appear."""
    now = int(time.time())
    snapshot = storage.next_dirname(request.name, now)
    warnings = []
    if outcome.code == rsync.VANISHED:
        warnings.append("some files vanished during the transfer (rsync exit 24)")
    if outcome.code == rsync.PARTIAL:
        warnings.append(
            f"{len(outcome.failed_paths)} files could not be read (rsync exit 23); "
            "the snapshot is marked partial"
        )
    stats = outcome.stats
    result = GrabResult(
        name=request.name,
        snapshot=snapshot,
        bytes_transferred=stats.get("bytes_received", 0),
        files=stats.get("files", 0),
        files_transferred=stats.get("files_transferred", 0),
        total_size=stats.get("total_size", 0),
        duration=round(time.time() - started, 3),
        rsync_exit=outcome.code,
        partial=outcome.code == rsync.PARTIAL,
        warnings=warnings,
        removed=removed,
        attempts=attempt,
    )
    meta = {
        "snapshot": snapshot,
        "name": request.name,
        "task_id": task_id,
        "started": started,
        "finished": time.time(),
        "rsync_exit": outcome.code,
        "partial": result.partial,
        "failed_paths": outcome.failed_paths,
        "stats": stats,
        "link_dest": link_dest,
        "host_key_fingerprint": request.host_key_fingerprint,
        "client": {"address": request.address, "port": request.port, "user": request.user},
        "excludes": list(request.excludes),
        "result": result.to_dict(),
    }
    write_atomic(storage.meta(snapshot, ".exclude"), exclude_text, mode=0o644)
    write_atomic(storage.meta(snapshot), json.dumps(meta, indent=1), mode=0o644)
    write_atomic(storage.job(task_id),
                 json.dumps({"name": request.name, "snapshot": snapshot,
                             "result": result.to_dict()}))
    # Moving a directory to another parent rewrites its "..": that needs write
    # access to the (client-owned) directory itself.
    with caps.raised("dac_override"):
        os.rename(storage.inprogress(request.name), storage.root / snapshot)
    fsync_dir(storage.root)
    log.info("grab of %s complete: %s", request.name, snapshot)
    return result
