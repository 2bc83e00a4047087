"""The schedule the backup host keeps: Celery beat and the stale check (issue 17).

``bakgrab scheduler`` (or ``bakgrab worker --beat``) runs Celery beat, which
sends ``bakgrab.stale_check`` every ``stale_check_every`` and, every
``prune_every``, ``bakgrab.scheduled_prune`` (the keep rules applied to every
name, where any are set: issue 16) to the worker's internal queue; for a
stale check the worker looks at every name's last success (the same
reading as ``bakgrab status``) and the notifier sends a notice when a name
turns stale, and a recovery when it is fresh again. No client has to call
for a silent name to be found. Invariants:

* **One scheduler per storage.** It holds an flock on
  ``STORAGE/.bakgrab/locks/scheduler.lock`` for its whole life; a second one
  (standalone or embedded) is refused with exit 7. The kernel drops the lock
  when the holder dies.
* **Its messages are the worker's own.** Beat signs what it sends with the
  MAC key derived from the storage's request key (only the backup host's
  user can read it), and the transport admits nothing unsigned on the
  internal queue (:mod:`bakgrab.worker.transport`).
* The same check tells of damage ``bakgrab verify`` recorded (issue 15):
  ``damaged`` while some snapshot of the name holds a file found bad. With
  ``verify_every``, beat also sends ``bakgrab.scheduled_verify``, which reads
  ``verify_share`` of the stored files (:func:`scheduled_verify`).
* The schedule lives in memory (``celery.beat:Scheduler``): nothing is
  written beside the storage; a restarted scheduler starts a fresh period.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

from celery import Celery
from celery.signals import before_task_publish, worker_ready, worker_shutdown

from bakgrab.tasks import sealed
from bakgrab.tasks.app import make_app
from bakgrab.tasks.config import Settings, parse_duration, parse_size
from bakgrab.tasks.errors import Busy, ConfigError, NoSpace
from bakgrab.worker import damage, keep, retention, status, transport
from bakgrab.worker.notify import PRUNE, STALE_CHECK, VERIFY, Notifier, internal_queue, signer
from bakgrab.worker.status import human_duration
from bakgrab.worker.storage import Storage

log = logging.getLogger(__name__)

_held: list[int] = []
"""The scheduler lock's fd, kept open for the life of the process."""


def check_stale(notifier: Notifier) -> str:
    """Mark each name stale or fresh; notices for those that changed."""
    limit = parse_duration(notifier.settings.stale_after)
    statuses = status.collect(notifier.storage, limit)
    for s in statuses:
        if s.stale and first_grab_under_way(notifier.storage, s, limit):
            continue  # a new name is not stale while its first grab runs
        if s.stale:
            reason = ("no successful snapshot at all" if s.age is None else
                      f"last success {human_duration(s.age)} ago ({s.snapshot})")
        else:
            reason = f"a snapshot {human_duration(s.age or 0)} old ({s.snapshot})"
        reason += f"; stale_after = {notifier.settings.stale_after}"
        notifier.outcome(s.name, {"stale": s.stale}, snapshot=s.snapshot, reason=reason)
        bad = damaged(notifier.storage, s.name)
        reason = (", ".join(f"{snap} ({count} file(s))" for snap, count in sorted(bad.items()))
                  if bad else "no snapshot of it holds a file found bad any more")
        notifier.outcome(s.name, {"damaged": bool(bad)}, snapshot=max(bad) if bad else None,
                         reason=reason[:300])
    stale = sum(s.stale for s in statuses)
    return f"{stale} of {len(statuses)} name(s) stale"


def first_grab_under_way(storage: Storage, s: status.NameStatus, limit: float) -> bool:
    """``s`` never succeeded nor failed, and its in-progress dir is younger
    than ``limit``: its first grab runs (or was interrupted and will resume)."""
    if s.snapshot is not None or not s.in_progress or s.failures:
        return False
    try:
        age = time.time() - storage.inprogress(s.name).stat().st_mtime
    except OSError:
        return False
    return age < limit


def damaged(storage: Storage, name: str) -> dict[str, int]:
    """The snapshots of ``name`` holding files ``bakgrab verify`` found bad
    (issue 15), with their counts."""
    try:
        return damage.damaged_snapshots(storage, name)
    except OSError as e:
        log.warning("cannot read the damage record of %s: %s", name, e)
        return {}


def lock(storage: Storage) -> None:
    """Hold the storage's scheduler lock, or Busy (exit 7) if another has it."""
    import fcntl

    path = storage.internal_lock("scheduler")  # never a backup name's lock (issue 11)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise Busy(f"another scheduler runs for storage {storage.root} (it holds "
                   f"{path.name}); run one per storage") from None
    _held.append(fd)


def scheduled_prune(notifier: Notifier) -> str:
    """What ``bakgrab prune`` does, on the scheduler's clock: expire what the
    keep rules no longer keep, for every name, then the free-space rule. Only
    where some name has keep rules: without them the cleanup runs before
    grabs only, as it always did (issue 16)."""
    storage, settings = notifier.storage, notifier.settings
    names = sorted(storage.by_name())
    if not any(keep.rules_for(settings, name).configured for name in names):
        return "no keep rules: nothing expires"
    try:
        removed = retention.make_room(storage, settings)
    except NoSpace as e:
        log.warning("scheduled prune: %s", e)
        return f"cannot free enough: {e}"
    for entry in removed:
        log.info("scheduled prune removed %s: %s (%s)", entry["snapshot"], entry["reason"],
                 entry["rule"])
    return f"removed {len(removed)} snapshot(s)"


def scheduled_verify(notifier: Notifier) -> dict[str, Any]:
    """What ``bakgrab verify --share verify_share`` does, on the scheduler's
    clock (issue 15), on a thread of its own: verify lowers its thread's CPU
    and I/O priority (per thread on Linux), never the pool process's, which
    goes on to serve grabs. Its summary is the task's result (Flower shows
    it); damage it records is told by the next stale check (``damaged``)."""
    import threading

    from bakgrab.tasks.config import parse_share
    from bakgrab.worker import verify

    share = parse_share(notifier.settings.verify_share)
    out: list[verify.Report | BaseException] = []

    def run() -> None:
        try:
            out.append(verify.run(notifier.storage, share=share))
        except BaseException as e:  # handed to the task's own thread
            out.append(e)

    thread = threading.Thread(target=run, name="bakgrab-verify")
    thread.start()
    thread.join()
    if isinstance(out[0], BaseException):
        raise out[0]
    report = out[0]
    summary = {"checked": report.checked, "files": report.files, "good": report.good,
               "bad": len(report.bad), "known_bad": report.known_bad,
               "damaged_manifests": len(report.damaged_manifests),
               "unverifiable": len(report.unverifiable),
               "never_verified": report.never_verified, "seconds": report.seconds,
               "damage_found": report.damage_found}
    log.log(logging.WARNING if report.damage_found else logging.INFO,
            "scheduled verify: %s", summary)
    return summary


def configure(app: Celery, settings: Settings) -> None:
    """Beat's schedule on ``app``: every stale_check_every a stale check, and
    every prune_every (unless off) the keep rules applied."""
    every = parse_duration(settings.stale_check_every)
    queue = {"queue": internal_queue(settings.queue)}
    app.conf.beat_scheduler = "celery.beat:Scheduler"
    app.conf.beat_schedule = {
        "stale-check": {"task": STALE_CHECK, "schedule": every, "options": queue},
    }
    if settings.prune_every != "off":
        app.conf.beat_schedule["prune"] = {
            "task": PRUNE, "schedule": parse_duration(settings.prune_every), "options": queue}
    if settings.verify_every != "off":  # issue 15
        app.conf.beat_schedule["verify"] = {
            "task": VERIFY, "schedule": parse_duration(settings.verify_every), "options": queue}


def prepared(settings: Settings) -> Storage:
    if not settings.storage:
        raise ConfigError("the scheduler needs the storage directory: --storage DIR")
    try:
        return Storage(settings.storage).prepare()
    except (FileNotFoundError, PermissionError) as e:
        raise ConfigError(f"storage: {e}") from None


def embed(app: Celery, settings: Settings) -> None:
    """``bakgrab worker --beat``: the lock now, beat in a thread once the worker is ready."""
    from celery.beat import EmbeddedService

    lock(prepared(settings))
    configure(app, settings)
    service: list[Any] = []

    def start(**_: Any) -> None:
        beat = EmbeddedService(app, thread=True, scheduler_cls="celery.beat:Scheduler")
        beat.start()
        service.append(beat)
        log.info("scheduler: stale checks every %s (embedded)", settings.stale_check_every)
        if settings.metrics_listen:
            from bakgrab.worker import metrics

            metrics.serve(settings)

    def stop(**_: Any) -> None:
        for beat in service:
            beat.stop()

    worker_ready.connect(start, weak=False)
    worker_shutdown.connect(stop, weak=False)


def serve(settings: Settings) -> None:
    """``bakgrab scheduler``: Celery beat (and /metrics) for one storage, until stopped."""
    storage = prepared(settings)
    lock(storage)
    private = sealed.load_or_create_private(storage.request_key)
    policy = transport.Policy(max_message_bytes=parse_size(settings.max_message_bytes),
                              mac_key=transport.mac_key(private))
    app = make_app(settings, worker=True)
    configure(app, settings)
    before_task_publish.connect(transport.sign_publish(signer(policy)), weak=False)
    if settings.metrics_listen:
        from bakgrab.worker import metrics

        address = metrics.serve(settings)
        print(f"bakgrab: metrics on http://{address}/metrics", file=sys.stderr, flush=True)
    print(f"bakgrab: scheduler for {storage.root}: stale checks every "
          f"{settings.stale_check_every} on queue {internal_queue(settings.queue)}",
          file=sys.stderr, flush=True)
    app.Beat(loglevel=settings.loglevel, scheduler="celery.beat:Scheduler",
             quiet=True).run()
