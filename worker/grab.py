"""One grab: pull a client's tree into a new hard-linked snapshot.

Order of a grab, each step only after the one before succeeded:

1. the request is validated (by the caller) and the task id checked, then
   it must be the name's own client's: signed by the key registered for the
   name, fresh or a redelivery (:mod:`bakgrab.worker.names`, issue 11); a
   bad or refused request writes nothing;
2. job records older than the results' lifetime are swept; a finished
   record of this task id returns the finished result (a second delivery
   never makes a second snapshot);
3. the name's lock is taken: one grab per name, across workers; under it, a
   record whose rename a dead worker never made is finished (see
   :func:`finished`);
4. (first-use enrolment only) the name is still unregistered, or the
   registration made meanwhile is checked;
5. free-space cleanup runs under the storage lock;
6. the key, known_hosts and exclude rules are written to a private 0700 run
   dir, removed when the grab ends, whatever happens;
7. the pull mark ``.bakgrab/pulls/NAME.json`` names this task as the one
   filling the in-progress dir, its pull not finished; rsync pulls into
   ``.bakgrab/inprogress/NAME`` (kept on failure, so the next attempt resumes
   into it) with ``--link-dest`` = newest snapshot (on btrfs, issue 14: into a
   writable snapshot of the newest, in place: :mod:`bakgrab.worker.backend`);
   an exit 23 whose files the full storage lost fails as NoSpace
   (:func:`check_room`);
8. (first-use enrolment only) the name is registered to the request's key,
   now that its pull succeeded;
9. the pull mark says the pull finished; the stats and the job record are
   written, then the in-progress dir is renamed to ``NAME.YYYY-mm-dd.UNIXTIME``
   and the record marked published.

Invariant (issue 13): an in-progress tree becomes a snapshot only by the
task whose pull mark it carries, and only once that mark says its rsync
exited with a code that publishes (0, 23, 24).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fcntl
import functools
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

from celery.utils.dispatch import Signal

from bakgrab.tasks import GRAB, process
from bakgrab.tasks.app import RESULT_EXPIRES
from bakgrab.tasks.config import Settings, parse_size
from bakgrab.tasks.errors import (
    InvalidRequest,
    JobCancelled,
    TransferFailed,
    TransferInterrupted,
)
from bakgrab.tasks.request import GrabRequest
from bakgrab.tasks.result import GrabResult
from bakgrab.worker import backend as backends
from bakgrab.worker import (
    compress,
    damage,
    locks,
    manifest,
    names,
    retention,
    rsync,
    sandbox,
    watchdog,
)
from bakgrab.worker.storage import Storage, fsync_dir, parse_snapshot, write_atomic

log = logging.getLogger(__name__)

TASK_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
PROGRESS_EVERY = 1.0
"""Seconds between two progress reports (rsync prints many more)."""
READ_SIZE = 65536
"""Bytes asked of rsync's stdout per read (a pipe holds 64 KiB by default)."""
READ_PAUSE = 0.01
"""Seconds the reader waits after a short read of rsync's stdout, so the next
read takes many lines at once (issue 19). rsync writes each line as it comes,
some 60,000 in a 4 s first backup: read as they came, each was one wake-up
and one read, 20 us of the pool's CPU each (measured). 10 ms of lines is a
few KiB, far below what the pipe holds, so rsync never waits on us; the
prehash thread gets its names at most 10 ms later (still in the page cache)."""
MAX_FAILED_PATHS = 1000

ProgressFn = Callable[[dict[str, Any]], None]

grab_accepted = Signal(name="bakgrab_grab_accepted", providing_args={"task_id"})
"""Sent (sender: the backup name) once a grab's request passed every check of
its name's registration, before anything is pulled."""


def check_task_id(task_id: Any) -> str:
    if not isinstance(task_id, str) or not TASK_ID_RE.fullmatch(task_id):
        raise InvalidRequest("task id: letters, digits, _ and - only")
    return task_id


def finished(storage: Storage, task_id: str, *, recover: bool = False) -> dict[str, Any] | None:
    """The result of an earlier delivery of ``task_id`` that completed, if any.

    Its record is written before the final rename, marked published after it.
    A record whose snapshot is there, or that was published (cleanup may have
    removed the snapshot since), gives its result. With ``recover`` (only
    under the name's lock) a record not yet published is finished now if the
    worker died before its rename: the in-progress tree is published only
    when its pull mark names this very task and says its pull finished
    (issue 13); else the record is stale (another grab took the tree over, or
    cleanup removed it) and is dropped, so the job is grabbed again."""
    try:
        record = json.loads(storage.job(task_id).read_text())
        snapshot = str(record["snapshot"])
        name = str(record["name"])
        result: dict[str, Any] = record["result"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    parsed = parse_snapshot(snapshot)
    if parsed is None or parsed.name != name:
        return None
    if not (storage.root / snapshot).is_dir():
        if record.get("published", True):
            # (records of older workers have no flag: never publish for them)
            log.info("task %s finished before; its snapshot %s is gone since", task_id,
                     snapshot)
            return result
        if not recover:
            return None
        if pull_mark(storage, name) == {"task_id": task_id, "finished": True} \
                and storage.inprogress(name).is_dir():
            log.warning("task %s: publishing its finished pull %s (the worker died before "
                        "the rename)", task_id, snapshot)
            promote(storage, name, task_id, snapshot, record)
            return result
        log.warning("task %s: its record names %s, never published, and the in-progress "
                    "tree is not its finished pull; dropping the record", task_id, snapshot)
        for suffix in (".json", ".exclude"):
            storage.meta(snapshot, suffix).unlink(missing_ok=True)
        storage.job(task_id).unlink(missing_ok=True)
        return None
    return result


def pull_mark(storage: Storage, name: str) -> dict[str, Any] | None:
    """Which task fills ``inprogress(name)`` and whether its pull finished."""
    try:
        mark = json.loads(storage.pull_mark(name).read_text())
    except (OSError, ValueError):
        return None
    return mark if isinstance(mark, dict) else None


def mark_pull(storage: Storage, name: str, task_id: str, *, done: bool) -> None:
    """Tie ``inprogress(name)`` to ``task_id``: before its rsync starts
    (``done`` false), and once rsync exited with a code that publishes (true)."""
    write_atomic(storage.pull_mark(name), json.dumps({"task_id": task_id, "finished": done}))


def promote(storage: Storage, name: str, task_id: str, snapshot: str,
            record: dict[str, Any]) -> None:
    """Rename the in-progress tree of ``task_id``'s finished pull to ``snapshot``,
    then mark its record published and drop the pull mark."""
    backends.for_storage(storage).publish(storage, name, snapshot)  # (issue 14)
    fsync_dir(storage.root)
    write_atomic(storage.job(task_id), json.dumps({**record, "published": True}))
    storage.pull_mark(name).unlink(missing_ok=True)


def sweep_job_records(storage: Storage, now: float | None = None) -> None:
    """Remove job records older than the results they stand for (issue 13):
    past that, no client waits for the job. One directory scan."""
    horizon = (time.time() if now is None else now) - RESULT_EXPIRES
    with os.scandir(storage.jobs) as it:
        for entry in it:
            stem, dot, ext = entry.name.rpartition(".")
            if not (dot and ext == "json" and TASK_ID_RE.fullmatch(stem)):
                continue
            with contextlib.suppress(OSError):
                if entry.stat(follow_symlinks=False).st_mtime < horizon:
                    os.unlink(entry.path)


def check_pin(storage: Storage, settings: Settings, task_id: str,
              request: GrabRequest) -> names.Registration | None:
    """Refuse a request that is not the name's own client's (issue 11); the
    registration, or None while first-use enrolment may still register the
    name. Never writes a pin: see :func:`bakgrab.worker.names.enrol_after_pull`."""
    return names.check_request(storage, settings, GRAB, task_id, request)


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
        # No fsync and no rename: the dir is new, no reader sees it before
        # rsync starts, and it is removed when the job ends (or swept after a
        # crash); an fsync here guards nothing and cost ~3 ms each (issue 19).
        for what, text in (("key", request.key),
                           ("known_hosts", f"{host_alias(request.name)} {request.host_key}\n"),
                           ("exclude", rsync.exclude_rules(request.excludes))):
            fd = os.open(files[what], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text)
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
    retention.admit(storage, settings, request.name)  # max_names: reads only (issue 11)
    # before anything else touches the storage for this name (issue 11)
    registered = check_pin(storage, settings, task_id, request)
    # Only now is the grab the name's own client's: monitoring may hear of it
    # (a /start ping before the check could be forged for any name; issue 17).
    grab_accepted.send(sender=request.name, task_id=task_id)
    sweep_job_records(storage)
    done = finished(storage, task_id)  # (a recovery waits for the name's lock)
    if done is not None:
        log.info("task %s already finished: %s", task_id, done.get("snapshot"))
        return GrabResult.from_dict(done)

    started = time.time()
    with locks.held(storage.lock(request.name), what=f"name {request.name}"), locks.one_of(
            storage.client_slots(request.host_key, settings.max_jobs_per_client),
            what=f"the client of {request.name}"):
        done = finished(storage, task_id, recover=True)
        if done is not None:
            return GrabResult.from_dict(done)
        if registered is None:  # an operator may have registered it meanwhile
            registered = check_pin(storage, settings, task_id, request)
        check_watched(settings, task_id, request.name)
        on_progress({"phase": "cleanup"})
        removed = retention.make_room(storage, settings, current=request.name)
        link = storage.newest(request.name)
        previous = storage.read_meta(link.dirname) if link else None
        choice = compress.decide(settings.compress, request.address, previous)  # issue 19
        dest = storage.inprogress(request.name)
        # From here the tree is this task's unfinished pull, whoever filled it
        # before: no earlier task's record may publish it any more (issue 13).
        mark_pull(storage, request.name, task_id, done=False)
        # a plain dir, or on btrfs a writable snapshot of the newest (issue 14)
        store = backends.for_storage(storage)
        resumed = store.begin(storage, request.name, link)
        # a file verify found bad is never linked again, but pulled anew (issue 15)
        with job_files(storage, task_id, request) as files, \
                damage.link_dest(storage, request.name, link if store.links else None,
                                 dest) as (link_dest, link_from), \
                manifest.Prehasher(dest, sample=not resumed and store.links) as hasher:
            # (hashes files as they land, issue 15, until rsync's checksums prove good, 19)
            spec = rsync.PullSpec(
                user=request.user,
                address=request.address,
                port=request.port,
                key_file=files["key"],
                known_hosts=files["known_hosts"],
                host_alias=host_alias(request.name),
                exclude_file=files["exclude"],
                dest=dest,
                link_dest=link_dest,
                timeout=settings.rsync_timeout,
                connect_timeout=settings.connect_timeout,
                alive_interval=settings.server_alive_interval,
                bwlimit=settings.bwlimit,
                as_root=os.geteuid() == 0,
                compress=choice.used,
                ciphers=choice.ciphers,
                backend_options=store.pull_options,
            )
            on_progress({"phase": "pulling", "resumed": resumed})
            confined = confinement(
                settings, read=[files["key"].parent], write=(dest,),
                link_from=link_from, port=request.port)
            pulling = time.monotonic()
            try:
                outcome = run_pull(spec, on_progress, confined, hasher.submit)
            except rsync.CompressRefused as e:
                if choice.used in (compress.OFF, compress.ANY):
                    raise TransferFailed(*e.args[:2]) from None  # not ours: the client's words
                # issue 19: the client's rsync lacks the choice: plain -z, at once, once
                choice = choice.fall_back(e.said)
                log.warning("grab of %s: %s", request.name, choice.fallback)
                spec = dataclasses.replace(spec, compress=choice.used)
                try:
                    outcome = run_pull(spec, on_progress, confined, hasher.submit)
                except rsync.CompressRefused as again:  # plain -z too: words, not a lack
                    raise TransferFailed(*again.args[:2]) from None
            pull_seconds = time.monotonic() - pulling
            # (a resumed tree, or one a refused run may have written into,
            # holds files no line of this run names: issue 19)
            outcome.fresh = not resumed and store.links and outcome.passes == 1 \
                and not choice.fallback
            exclude_text = files["exclude"].read_text()

        check_room(storage, settings, outcome)
        on_progress({"phase": "finalizing"})
        if registered is None:  # first-use enrolment: only after a successful pull
            names.enrol_after_pull(storage, request.name, request.host_key)
        return publish(storage, request, task_id, outcome, exclude_text, removed, started,
                       link.dirname if link else None, attempt,
                       compression=compress.record(choice, outcome.stats, pull_seconds,
                                                   compress.previous_link(previous)),
                       reread=settings.verify_pull == "on" or request.verify,  # issue 15
                       prehashed=hasher)


RESULT_CHANNEL = "celery-task-meta-"
"""Prefix of the Redis channel on which Celery's result backend publishes a
job's result: a waiting client is subscribed to it (issue 13)."""


def watched(settings: Settings, task_id: str) -> bool | None:
    """Whether some client waits for ``task_id``'s result (is subscribed to its
    result channel); None when the broker cannot say."""
    import redis

    try:
        client = redis.Redis.from_url(settings.broker, socket_timeout=10,
                                      socket_connect_timeout=10)
        counts = client.pubsub_numsub(RESULT_CHANNEL + task_id)
    except redis.RedisError as e:
        log.warning("cannot tell whether the client of %s still waits: %s", task_id, e)
        return None
    return bool(counts and int(counts[0][1]) > 0)


def check_watched(settings: Settings, task_id: str, name: str) -> None:
    """The cancel a client can give under the shipped ACL, which denies it
    Celery's remote control: it stops waiting (its ``bakgrab backup`` or
    ``restore`` ended), and a job of it that only starts now is skipped,
    before any connection, instead of running later against an sshd that is
    gone and failing after its retries. Only the job's own client, which alone
    knows its task id and holds its subscription, can make this happen."""
    if settings.cancel_unwatched == "off":
        return
    if watched(settings, task_id) is False:
        log.warning("job %s of %s: no client waits for it any more; cancelled", task_id, name)
        raise JobCancelled(f"the client stopped waiting for the job of {name} before it "
                           "started; cancelled, nothing was pulled")


class PullOutcome:
    """What one rsync run left: exit code, stats, warnings, failed paths."""

    def __init__(self, code: int, stdout_tail: str, stderr_tail: str, failed: list[str],
                 items: rsync.Items | None = None) -> None:
        self.code = code
        self.stats = rsync.parse_stats(stdout_tail)
        self.stderr_tail = stderr_tail
        self.failed_paths = failed
        self.items = items if items is not None else rsync.Items()
        """What rsync's lines said it wrote (issues 15, 19): claims, not facts."""
        self.passes = 1
        """rsync runs into the tree (more past the link limit, issue 14)."""
        self.fresh = False
        """Whether one rsync run, this one, wrote the whole tree, starting
        empty: only then may its checksums go into the manifest (issue 19;
        set by the grab, which knows)."""
        self.notes: tuple[str, ...] = ()
        """Warnings its exit code does not tell (issue 14: files at the link limit)."""


@dataclasses.dataclass(frozen=True)
class Confinement:
    """What the worker, never the client, imposes on one rsync child (issue 11):
    the Landlock sandbox (None when the operator turned it off, which the
    worker logs at start) and the slowest transfer it lets hold a slot."""

    sandbox: sandbox.Sandbox | None
    min_rate: int = 0
    """Bytes per second below which, for ``rate_window`` seconds, rsync is stopped."""
    rate_window: float = 600.0


def confinement(settings: Settings, *, read: list[Path], port: int,
                write: tuple[Path, ...] = (), link_from: tuple[Path, ...] = ()) -> Confinement:
    """The confinement of one rsync child of a job for ``settings``."""
    box = None
    if settings.sandbox != "off":
        box = sandbox.Sandbox(read=read, link_from=list(link_from), write=list(write), port=port)
    return Confinement(box, parse_size(settings.min_rate), float(settings.min_rate_window))


def run_pull(spec: rsync.PullSpec, on_progress: ProgressFn,
             confined: Confinement | None = None,
             on_wrote: Callable[[bytes, bytes], None] | None = None) -> PullOutcome:
    """Run the pull, report its progress, and classify its exit."""
    marker = rsync.new_marker()
    try:
        return run_rsync(rsync.pull_argv(spec, marker), on_progress, confined, on_wrote, marker)
    except rsync.LinkLimit as e:
        if spec.link_dest is None or not e.paths:
            raise
        return pull_past_link_limit(spec, on_progress, confined, e.paths)


LINK_LIMIT_PASSES = 3


def pull_past_link_limit(spec: rsync.PullSpec, on_progress: ProgressFn,
                         confined: Confinement | None, leaders: list[str]) -> PullOutcome:
    """Pull again, the files whose inode reached the link limit (issue 14)
    copied instead of linked, with a warning: never a failed or partial
    snapshot for it (see :func:`bakgrab.worker.backend.without_linked`)."""
    assert spec.link_dest is not None
    omitted = 0
    for attempt in range(LINK_LIMIT_PASSES):
        with backends.without_linked(spec.dest, spec.link_dest, leaders) as (tree, count):
            omitted += count
            log.warning("%d file(s) at the link limit of %s: copied, not linked (pass %d)",
                        count, spec.dest, attempt + 2)
            again = dataclasses.replace(spec, link_dest=tree)
            box = confined.sandbox if confined is not None else None
            if confined is not None and box is not None:
                confined = dataclasses.replace(confined, sandbox=dataclasses.replace(
                    box, link_from=[tree, *box.link_from]))
            marker = rsync.new_marker()
            try:
                outcome = run_rsync(rsync.pull_argv(again, marker), on_progress, confined,
                                    marker=marker)
            except rsync.LinkLimit as e:
                leaders = e.paths
                continue
        outcome.passes = attempt + 2
        outcome.notes = (f"{omitted} file(s) had reached the filesystem's hard-link limit "
                         "in the previous snapshot: stored as new copies, not links",)
        return outcome
    raise rsync.LinkLimit(f"files still at the link limit after {LINK_LIMIT_PASSES} passes: "
                          f"{', '.join(leaders[:5])}", 2, leaders)


def run_rsync(argv: list[str], on_progress: ProgressFn,
              confined: Confinement | None = None,
              on_wrote: Callable[[bytes, bytes], None] | None = None,
              marker: bytes = b"") -> PullOutcome:
    """Run rsync (confined when asked: sandbox and minimum rate), report its
    progress, and classify its exit; ``on_wrote`` is told each file rsync
    says it received, and the checksum it claims, as it says so (issues 15,
    19): on the lines that hold ``marker`` (:func:`bakgrab.worker.rsync.new_marker`)."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C",
           "HOME": os.environ.get("HOME", "/")}
    stderr_lines: collections.deque[str] = collections.deque(maxlen=200)
    failed: list[str] = []
    items = rsync.Items(marker)  # the files rsync received, for the manifest (issues 15, 19)

    with contextlib.ExitStack() as stack:
        confine = None
        if confined is not None and confined.sandbox is not None:
            ruleset = stack.enter_context(confined.sandbox.ruleset())
            confine = functools.partial(sandbox.enter, ruleset)
        child = stack.enter_context(process.spawn(
            argv, env=env, confine=confine, secrets=[marker.decode("ascii")]))
        # the child holds its own domain now; the ruleset fd closes with the stack
        watch = stack.enter_context(watchdog.RateWatch(
            child.pid, confined.min_rate if confined else 0,
            confined.rate_window if confined else 0.0))
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
        # (bytes until the end: only the tail is decoded, once; issue 19)
        tail: collections.deque[bytes] = collections.deque(maxlen=64)
        lines = rsync.Lines()
        due = 0.0
        out = child.stdout.fileno()
        while True:
            chunk = os.read(out, READ_SIZE)
            if not chunk:
                break
            got = lines.feed(chunk)
            for raw in got:
                told = items.add(raw)
                if told is not None and on_wrote is not None:
                    on_wrote(*told)
            tail.extend(got)
            now = time.monotonic()
            if now >= due:
                progress = rsync.last_progress(got)
                if progress is not None:
                    due = now + PROGRESS_EVERY
                    on_progress({"phase": "pulling", **progress.__dict__})
            if len(chunk) < READ_SIZE // 4:
                time.sleep(READ_PAUSE)
        code = child.wait()
        reader.join(10)
    tail.append(lines.rest)
    if watch.stalled:
        raise TransferInterrupted(watch.stalled, code)
    if code < 0:
        raise TransferInterrupted(f"rsync was killed by signal {-code}", code)
    stderr_tail = "\n".join(stderr_lines)
    rsync.classify(code, stderr_tail)
    return PullOutcome(code, b"\n".join(tail).decode(errors="replace"), stderr_tail, failed,
                       items)


def check_room(storage: Storage, settings: Settings, outcome: PullOutcome) -> None:
    """NoSpace if a pull that would publish (exit 23) lost files to a full
    storage: the receiver says so, and the storage's own state agrees.

    rsync's text alone cannot decide (issue 13): sender lines quote client
    file names (any text), and even a receiver-side line can be forged by a
    hostile sender. So ENOSPC counts only when statvfs shows the storage
    below the free bytes or inodes a grab needs (``min_free_abs``,
    ``min_free_inodes``). A quota (EDQUOT) is not visible there: its
    receiver-side message alone decides, which a forger can use only to fail
    its own name's grab."""
    said = rsync.out_of_space(outcome.stderr_tail)
    if said is None:
        return
    if said == rsync.ENOSPC:
        st = os.statvfs(storage.root)
        free, inodes = st.f_bavail * st.f_frsize, st.f_favail
        if free >= max(parse_size(settings.min_free_abs), 1) and (
                st.f_files == 0 or inodes >= max(settings.min_free_inodes, 1)):
            log.warning("rsync's receiver reported %r, but the storage has %d bytes and %d "
                        "inodes free: not taken as a full storage", said, free, inodes)
            return
    raise rsync.no_space(outcome.code, outcome.stderr_tail)


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
    compression: dict[str, Any] | None = None,
    reread: bool = False,
    prehashed: manifest.Prehasher | None = None,
) -> GrabResult:
    """Record the run beside the snapshot, then make the snapshot appear
    (``reread``: the ``verify_pull`` setting, issue 15)."""
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
    warnings.extend(outcome.notes)  # (issue 14)
    # issue 15: the manifest is written before the snapshot appears, so every
    # published snapshot carries one (a grab that dies here publishes nothing)
    built: dict[str, Any] | None = None
    try:
        built = manifest.make(
            storage, storage.inprogress(request.name), snapshot, link_dest,
            outcome.items.wrote, reread=reread,
            prehashed=prehashed.results if prehashed else None,
            claims=manifest.Claims(outcome.items.claims, outcome.items.others)
            if outcome.fresh else None, complete=outcome.items.complete).to_dict()
        if prehashed is not None:  # (hashed during the pull, on its own thread)
            built.update(prehash_bytes=prehashed.bytes,
                         prehash_cpu_seconds=prehashed.cpu_seconds)
    except OSError as e:
        built = None
        log.error("grab of %s: no manifest could be written (%s)", request.name, e)
        warnings.append(f"no manifest could be written ({e.strerror or e}): "
                        "`bakgrab verify` reports this snapshot unverifiable")
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
        compress=compression or {},
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
        # issue 19: the choice and the link it measured, read by the next grab's auto
        "compress": compression or {},
        "result": result.to_dict(),
        "manifest": built,
    }
    # rsync exited with a code that publishes: the tree is this task's finished
    # pull, which only this task's record may publish (see finished()).
    mark_pull(storage, request.name, task_id, done=True)
    write_atomic(storage.meta(snapshot, ".exclude"), exclude_text, mode=0o644)
    write_atomic(storage.meta(snapshot), json.dumps(meta, indent=1), mode=0o644)
    record = {"name": request.name, "snapshot": snapshot, "result": result.to_dict(),
              "published": False}
    write_atomic(storage.job(task_id), json.dumps(record))
    promote(storage, request.name, task_id, snapshot, record)
    log.info("grab of %s complete: %s", request.name, snapshot)
    return result
