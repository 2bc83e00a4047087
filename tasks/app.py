"""The Celery app both sides build from the same settings.

Invariants, and why each is set:

* JSON only (``accept_content``): a task message is untrusted input; pickle
  would let anyone who reaches the broker run code on the worker.
* Task events on (the worker's): Flower sees a grab from the moment a worker
  receives it, and its progress events. Only the worker sends events: a
  client's app sends no ``task-sent`` event (``worker=False``), and the deploy
  ACL lets no client publish on the events channel, so Flower and ``bakgrab
  status`` show only what a worker saw (issue 11, attack 9). The worker's own
  retries do send ``task-sent``.
* ``task_acks_late`` + ``task_reject_on_worker_lost``: a grab is acked only
  when it ended, so a killed worker gives the job back to the queue; a second
  delivery is made harmless by the per-name lock and job records on the worker.
* ``worker_prefetch_multiplier = 1``: a worker never holds grabs it cannot
  start, so another worker can take them.
* ``visibility_timeout`` longer than the longest grab, so Redis does not hand
  a running grab to a second worker.
* ``result_extended`` off: the result backend never stores task arguments.
"""

from __future__ import annotations

from celery import Celery

from bakgrab.tasks.config import Settings

RESULT_EXPIRES = 7 * 86400
"""Seconds a job's result is kept; the worker keeps its job records as long (issue 13)."""


def make_app(settings: Settings, broker: str | None = None, *, worker: bool = False) -> Celery:
    """A Celery app for ``settings``; ``broker`` overrides the URL (tunnels).
    ``worker``: the backup host's worker (it alone sends ``task-sent`` events)."""
    url = broker or settings.broker
    app = Celery("bakgrab", broker=url, backend=url, set_as_current=True)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_default_queue=settings.queue,
        task_create_missing_queues=True,
        task_track_started=True,
        task_send_sent_event=worker,
        worker_send_task_events=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        result_extended=False,
        result_expires=RESULT_EXPIRES,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout,
            # kombu sweeps for unacked messages of dead workers every
            # interval x throttle seconds (100 s by default); a lost grab
            # should come back soon after its visibility timeout.
            "unacked_restore_interval": max(1, min(60, settings.visibility_timeout // 4)),
            "unacked_restore_throttle": 1,
            "socket_timeout": 30,
            "socket_connect_timeout": 10,
            "socket_keepalive": True,
            "health_check_interval": 25,
        },
        # No read timeout on the result backend: the client blocks in pub/sub
        # while a grab runs for hours; keepalives and health checks notice a
        # dead tunnel instead.
        redis_socket_keepalive=True,
        redis_socket_connect_timeout=10,
        redis_backend_health_check_interval=25,
        # A result stored while Redis restarts is retried, not lost.
        result_backend_always_retry=True,
        result_backend_max_retries=60,
        task_soft_time_limit=settings.job_time_limit,
        task_time_limit=settings.job_time_limit + 300,
        worker_hijack_root_logger=True,
        worker_redirect_stdouts=False,
    )
    return app
