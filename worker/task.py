"""The Celery side of the worker: task ``bakgrab.grab`` and ``bakgrab worker``.

The task body validates the request before anything else, runs
:func:`bakgrab.worker.grab.grab`, reports progress as a ``PROGRESS`` state (readable
through ``AsyncResult(id).info``) and a ``task-progress`` event (shown by
Flower), and retries transient failures with exponential backoff and jitter.
A retry carries the same redacted ``argsrepr``/``kwargsrepr`` (Celery's
``retry()`` would otherwise drop them and show the raw arguments).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from celery import Celery, Task
from celery.exceptions import Ignore, SoftTimeLimitExceeded
from celery.signals import before_task_publish, worker_shutting_down
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from bakgrab.tasks import GRAB, RESTORE, caps, request_key_name, sealed
from bakgrab.tasks.app import make_app
from bakgrab.tasks.config import Settings, parse_size
from bakgrab.tasks.errors import BakgrabError, ConfigError, InvalidRequest, JobTimeout
from bakgrab.tasks.request import redacted, validate, validate_restore
from bakgrab.worker import compress, grab, notify, restore, sandbox, status, transport
from bakgrab.worker.storage import Storage

log = logging.getLogger(__name__)
R = TypeVar("R")


class Terminated(SystemExit):
    """The pool process was asked to stop (SIGTERM): unwind so that rsync is
    killed and the job's key file removed on the way out."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(128 + signum)


def pool_children() -> list[int]:
    """Pids of this process's children (the prefork pool)."""
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == me:
                        found.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    return found


def stop_grabs_after(grace: float) -> None:
    """Warm shutdown waits for running grabs; past ``grace`` seconds, SIGTERM
    the pool so each running grab stops cleanly and goes back to the queue."""

    def later() -> None:
        time.sleep(grace)
        pids = pool_children()
        if pids:
            log.warning("shutdown: grabs still running after %.0fs; stopping and re-queueing",
                        grace)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    threading.Thread(target=later, name="shutdown-grace", daemon=True).start()


def backoff(retries: int, settings: Settings) -> float:
    """Delay before retry number ``retries + 1``: exponential, capped, jittered."""
    base = min(settings.retry_backoff * (2**retries), settings.retry_backoff_max)
    return base / 2 + random.uniform(0, base / 2)  # noqa: S311 -- jitter, not crypto


def accept(task: Task, storage: Storage, validator: Callable[..., R], args: tuple[Any, ...],
           fields: dict[str, Any]) -> R:
    """The validated request of a task, its key opened; InvalidRequest if not."""
    # Celery's own SIGTERM handling in pool children ends the process without
    # running any finally: block (rsync orphaned, key file left); set per task,
    # as Celery installs its handlers after process init.
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        if args:
            raise InvalidRequest("request: fields go in keyword arguments, not positional ones")
        return validator(fields, request_key=sealed.load_or_create_private(storage.request_key))
    except InvalidRequest as exc:
        log.warning("refused invalid request %s: %s", task.request.id, exc)
        raise


def reporter(task: Task, name: str) -> Callable[[dict[str, Any]], None]:
    """Progress as a PROGRESS state (AsyncResult.info) and a task-progress event."""

    def report(info: dict[str, Any]) -> None:
        task.update_state(state="PROGRESS", meta={"name": name, **info})
        # Flower merges event fields into its task: "name" would replace the
        # task's name (bakgrab.grab), so the backup name travels as "backup".
        task.send_event("task-progress", backup=name, **info)

    return report


def retry_if_transient(task: Task, exc: BakgrabError, settings: Settings,
                       fields: dict[str, Any], what: str) -> None:
    """Retry a transient failure with backoff while retries are left (raises
    Celery's Retry); return for a permanent one. The retried message keeps the
    redacted argsrepr/kwargsrepr, which Celery's retry() would otherwise drop."""
    if not exc.transient or task.request.retries >= settings.max_retries:
        return
    delay = backoff(task.request.retries, settings)
    log.warning("%s failed (%s); retry %d/%d in %.0fs", what, exc,
                task.request.retries + 1, settings.max_retries, delay)
    raise task.retry(exc=exc, countdown=delay, argsrepr="()",
                     kwargsrepr=redacted(fields)) from None


def register(app: Celery, settings: Settings) -> Task:
    """Define ``bakgrab.grab`` on ``app`` for a worker with ``settings``."""

    # throws: bakgrab's own errors are outcomes, logged in one line by Celery
    # ("raised expected"), not as tracebacks of an unexpected error.
    @app.task(name=GRAB, bind=True, acks_late=True, max_retries=settings.max_retries,
              throws=(BakgrabError,))
    def grab_task(self: Task, *args: Any, **fields: Any) -> dict[str, Any]:
        storage = Storage(settings.storage)
        request = accept(self, storage, validate, args, fields)
        if status.failed_for_good(storage, request.name, self.request.id):
            # A worker stopped between the job's end and its ack: the broker
            # gives it again. Its client has its outcome; running it anew would
            # count a second failure and tell a false one (its client is gone).
            log.warning("job %s of %s already failed for good; its redelivery is dropped",
                        self.request.id, request.name)
            raise Ignore()
        report = reporter(self, request.name)
        try:
            result = grab.grab(storage, settings, request, self.request.id, report,
                               attempt=self.request.retries + 1)
        except Terminated:
            # Stopped by a worker shutdown (or a revoke): rsync is dead and the
            # key file gone; give the job back to the queue. A revoked id is
            # discarded by every worker when it comes round again.
            log.warning("grab of %s stopped by SIGTERM; re-queued", request.name)
            raise self.retry(countdown=0, max_retries=None, argsrepr="()",
                             kwargsrepr=redacted(fields)) from None
        except SoftTimeLimitExceeded:
            timeout = JobTimeout(
                f"the grab of {request.name} ran past job_time_limit="
                f"{settings.job_time_limit}s and was stopped; its in-progress dir is kept "
                "for the next grab"
            )
            # raised from this clause, it would pass the ones below: count it here
            # (issue 13: `bakgrab status` missed every time-limited grab)
            status.record_failure(storage, request.name, self.request.id, timeout)
            raise timeout from None
        except InvalidRequest:
            # refused (issue 11: maybe not the name's own client): nothing is
            # recorded for a name the sender may not own
            raise
        except BakgrabError as exc:
            retry_if_transient(self, exc, settings, fields, f"grab of {request.name}")
            status.record_failure(storage, request.name, self.request.id, exc)
            raise
        except Exception as exc:
            # A final failure of any kind feeds `bakgrab status` (failures_total).
            status.record_failure(storage, request.name, self.request.id, exc)
            raise
        return result.to_dict()

    @app.task(name=RESTORE, bind=True, acks_late=True, max_retries=settings.max_retries,
              throws=(BakgrabError,))
    def restore_task(self: Task, *args: Any, **fields: Any) -> dict[str, Any]:
        storage = Storage(settings.storage)
        request = accept(self, storage, validate_restore, args, fields)
        report = reporter(self, request.name)
        try:
            return restore.restore(storage, settings, request, self.request.id, report)
        except BakgrabError as exc:
            retry_if_transient(self, exc, settings, fields, f"restore of {request.name}")
            raise

    return grab_task


def publish_request_key(settings: Settings, public: str) -> None:
    """Put the request public key where clients reaching this broker find it,
    now and every minute (a Redis restart without persistence loses it)."""
    import redis

    key = request_key_name(settings.queue)

    def put() -> None:
        try:
            redis.Redis.from_url(settings.broker, socket_timeout=10).set(key, public)
        except redis.RedisError as e:
            log.warning("cannot publish the request key to the broker: %s", e)

    def again() -> None:
        while True:
            time.sleep(60)
            put()

    put()
    threading.Thread(target=again, name="request-key", daemon=True).start()


def check_privileges() -> None:
    """rsync >= 3.4, and without root the worker's capabilities (ambient), of
    which it then keeps none effective itself (rsync gets them on exec)."""
    version = caps.rsync_version()
    if version < caps.MIN_RSYNC:
        raise ConfigError(f"rsync {'.'.join(map(str, version))} is too old: bakgrab needs "
                          f">= {'.'.join(map(str, caps.MIN_RSYNC))} (security fixes)")
    if os.geteuid() == 0:
        return
    missing = caps.missing_ambient(caps.WORKER_CAPS)
    if missing:
        raise ConfigError(
            "the worker runs without root and lacks the capabilities rsync needs to keep "
            f"owners, modes, ACLs, xattrs and devices: {', '.join(missing)}; "
            + caps.how_to_grant(caps.WORKER_CAPS))
    caps.drop_effective()


def guard_broker(app: Celery, settings: Settings, private: X25519PrivateKey) -> None:
    """Every queued item passes :func:`bakgrab.worker.transport.admit` before
    kombu decodes it, and every task message this worker publishes (its
    retries) carries its MAC (issue 11, attacks 2, 5, 6 and 7)."""
    policy = transport.Policy(max_message_bytes=parse_size(settings.max_message_bytes),
                              mac_key=transport.mac_key(private))
    app.conf.broker_transport = transport.transport_for(policy)
    before_task_publish.connect(transport.sign_publish(policy), weak=False)


def only_bakgrab_tasks(app: Celery) -> None:
    """Celery's built-in tasks (celery.chord_unlock, celery.accumulate, ...)
    are unregistered: the transport drops them already; should one ever get
    past it, Celery refuses it as unknown instead of running it (issue 11)."""
    for name in [n for n in app.tasks if n not in transport.TASKS]:
        app.tasks.unregister(name)


def serve(settings: Settings) -> None:
    """Run a Celery worker (prefork pool, events on) serving ``settings.queue``."""
    if not settings.storage:
        raise ConfigError("the worker needs a storage directory: --storage DIR")
    check_privileges()
    compress.check_available(settings.compress)  # issue 19: the worker's own rsync has it
    storage = Storage(settings.storage)
    try:
        storage.prepare()
    except (FileNotFoundError, PermissionError) as e:
        raise ConfigError(f"storage: {e}") from None
    if sandbox.check_available(settings.sandbox) == "off":
        log.warning("sandbox = off: rsync runs unconfined; a hostile client can make it read "
                    "files of this host through symlinks it stored (docs/security.md)")
    else:
        sandbox.check_storage(storage.root)
    private = sealed.load_or_create_private(storage.request_key)
    app = make_app(settings, worker=True)
    guard_broker(app, settings, private)
    register(app, settings)
    only_bakgrab_tasks(app)
    notify.install(app, settings)  # issue 17: notices, internal queue, --beat
    public = sealed.public_text(private.public_key())
    print(f"bakgrab: request public key of queue {settings.queue}: {public}\n"
          "bakgrab: (clients may pin it with request_public_key in their config)",
          file=sys.stderr, flush=True)
    publish_request_key(settings, public)
    worker_shutting_down.connect(
        lambda **_: stop_grabs_after(settings.shutdown_grace), weak=False)
    app.worker_main([
        "worker",
        "--pool=prefork",
        f"--concurrency={settings.concurrency}",
        "--task-events",
        f"--queues={settings.queue}",
        f"--loglevel={settings.loglevel}",
        f"--hostname=bakgrab.{settings.queue}@{socket.gethostname()}",
        "--without-mingle",
        "--without-gossip",
    ])
