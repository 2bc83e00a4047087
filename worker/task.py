"""The Celery side of the worker: task ``bakgrab.grab`` and ``bakgrab worker``.

The task body validates the request before anything else, runs
:func:`worker.grab.grab`, reports progress as a ``PROGRESS`` state (readable
through ``AsyncResult(id).info``) and a ``task-progress`` event (shown by
Flower), and retries transient failures with exponential backoff and jitter.
A retry carries the same redacted ``argsrepr``/``kwargsrepr`` (Celery's
``retry()`` would otherwise drop them and show the raw arguments).
"""

from __future__ import annotations

import logging
import random
import signal
import socket
from typing import Any

from celery import Celery, Task
from celery.signals import worker_process_init

from tasks import GRAB
from tasks.app import make_app
from tasks.config import Settings
from tasks.errors import BakgrabError, ConfigError, InvalidRequest
from tasks.request import redacted, validate
from worker import grab
from worker.storage import Storage

log = logging.getLogger(__name__)


class Terminated(SystemExit):
    """The pool process was asked to stop (SIGTERM): unwind so that rsync is
    killed and the job's key file removed on the way out."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(128 + signum)


@worker_process_init.connect
def _pool_child_signals(**_: Any) -> None:
    # Celery resets SIGTERM to the default in pool children, which would end
    # the child without running any finally: block (rsync orphaned, key left).
    signal.signal(signal.SIGTERM, _raise_terminated)


def backoff(retries: int, settings: Settings) -> float:
    """Delay before retry number ``retries + 1``: exponential, capped, jittered."""
    base = min(settings.retry_backoff * (2**retries), settings.retry_backoff_max)
    return base / 2 + random.uniform(0, base / 2)  # noqa: S311 -- jitter, not crypto


def register(app: Celery, settings: Settings) -> Task:
    """Define ``bakgrab.grab`` on ``app`` for a worker with ``settings``."""

    @app.task(name=GRAB, bind=True, acks_late=True, max_retries=settings.max_retries)
    def grab_task(self: Task, **fields: Any) -> dict[str, Any]:
        try:
            request = validate(fields)
        except InvalidRequest:
            log.warning("refused invalid request %s", self.request.id)
            raise
        storage = Storage(settings.storage)

        def report(info: dict[str, Any]) -> None:
            info = {"name": request.name, **info}
            self.update_state(state="PROGRESS", meta=info)
            self.send_event("task-progress", **info)

        try:
            result = grab.grab(storage, settings, request, self.request.id, report,
                               attempt=self.request.retries + 1)
        except BakgrabError as exc:
            if exc.transient and self.request.retries < settings.max_retries:
                delay = backoff(self.request.retries, settings)
                log.warning("grab of %s failed (%s); retry %d/%d in %.0fs", request.name,
                            exc, self.request.retries + 1, settings.max_retries, delay)
                raise self.retry(exc=exc, countdown=delay, argsrepr="()",
                                 kwargsrepr=redacted(fields)) from None
            raise
        return result.to_dict()

    return grab_task


def serve(settings: Settings) -> None:
    """Run a Celery worker (prefork pool, events on) serving ``settings.queue``."""
    if not settings.storage:
        raise ConfigError("the worker needs a storage directory: --storage DIR")
    storage = Storage(settings.storage)
    try:
        storage.prepare()
    except (FileNotFoundError, PermissionError) as e:
        raise ConfigError(f"storage: {e}") from None
    app = make_app(settings)
    register(app, settings)
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
