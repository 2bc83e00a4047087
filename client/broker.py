"""The client's link to the broker: one Redis client, no Celery (issue 19).

A job is three things on the broker, and the client does them by hand with
redis-py instead of through Celery and kombu (about 60 ms of imports and
five connections, each opened with redis-py's four-command handshake, so
about 30 round trips before a job was in flight; each is one of the
tunnel's):

* ``GET bakgrab:request-key:QUEUE``: the backup host's request key;
* ``SUBSCRIBE celery-task-meta-ID``, then ``LPUSH QUEUE`` of the task message
  (Celery's protocol 2, as ``send_task`` builds it: the worker admits and
  rebuilds every message, :mod:`bakgrab.worker.transport`), then ``GET`` of the
  result key: subscribed first, so that the worker, which skips a job nobody
  waits for, sees us waiting, and no state is missed;
* the states the worker stores and publishes on that channel (Celery's result
  meta: ``PROGRESS`` with its info, ``SUCCESS``, ``FAILURE`` with the error's
  type, module and args, ``REVOKED``), until a final one.

Both connections speak RESP2 and send no driver info, so nothing precedes
the first command but ``AUTH`` when the URL has a password. Invariants:

* a lost connection is tried again for :data:`RECONNECT_FOR` seconds (a Redis
  restart, a tunnel's hiccup), subscribing again and reading the result key,
  so that a result stored meanwhile is not missed; then ClientSetupError;
* a silent connection is pinged every :data:`PING_EVERY` seconds and counts as
  lost when nothing came back within :data:`PONG_WITHIN` (a frozen tunnel
  keeps its socket open);
* an error from the backup host is rebuilt only as a class of
  :mod:`bakgrab.tasks.errors` (a result is the backup host's word: it never
  names a module to import); any other becomes a plain BakgrabError.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from bakgrab.tasks import errors
from bakgrab.tasks.errors import BakgrabError, ClientSetupError, JobTimeout

log = logging.getLogger(__name__)

RESULT_PREFIX = "celery-task-meta-"
"""Celery's Redis result backend: the key, and the channel, of a task's state."""
FINAL = frozenset({"SUCCESS", "FAILURE", "REVOKED"})
PING_EVERY = 25.0
"""Seconds of silence on the result channel before the client pings."""
PONG_WITHIN = 10.0
"""Seconds a ping may go unanswered before the connection counts as lost."""
RECONNECT_FOR = 60.0
"""Seconds a lost connection is tried again before the client gives up."""
COMMAND_TIMEOUT = 10.0
"""Seconds one command (GET, LPUSH, SUBSCRIBE) may take."""

LOST = (redis.ConnectionError, redis.TimeoutError, OSError)
"""What a broken connection raises (redis-py's errors, and the socket's)."""


def task_message(task: str, task_id: str, kwargs: dict[str, Any], queue: str,
                 kwargsrepr: str) -> bytes:
    """The item ``send_task`` would LPUSH for ``task`` (Celery's protocol 2, JSON,
    kombu's Redis envelope): no positional args, no links, retries 0."""
    body = json.dumps([[], kwargs, {"callbacks": None, "errbacks": None, "chain": None,
                                    "chord": None}])
    return json.dumps({
        "body": base64.b64encode(body.encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py", "task": task, "id": task_id, "shadow": None, "eta": None,
            "expires": None, "group": None, "group_index": None, "retries": 0,
            "timelimit": [None, None], "root_id": task_id, "parent_id": None,
            "argsrepr": "()", "kwargsrepr": kwargsrepr,
            "origin": f"{os.getpid()}@{socket.gethostname()}", "ignore_result": False,
            "replaced_task_nesting": 0, "stamped_headers": None, "stamps": {},
        },
        "properties": {
            "correlation_id": task_id, "reply_to": None, "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue}, "priority": 0,
            "body_encoding": "base64", "delivery_tag": str(uuid.uuid4()),
        },
    }).encode()


def outcome(meta: dict[str, Any]) -> dict[str, Any]:
    """The value of a final state: a SUCCESS's result, or its error raised."""
    status, value = meta.get("status"), meta.get("result")
    if status == "SUCCESS":
        if not isinstance(value, dict):
            raise BakgrabError(
                f"the worker returned an unexpected result: {type(value).__name__}")
        return value
    if status == "REVOKED" or (isinstance(value, dict)
                               and value.get("exc_type") == "TaskRevokedError"):
        raise BakgrabError("the job was revoked on the backup host (e.g. from Flower)")
    raise rebuilt_error(value)


def rebuilt_error(value: Any) -> BakgrabError:
    """The error a FAILURE names: its class, if one of bakgrab's, with its args."""
    if not isinstance(value, dict):
        return BakgrabError("the job failed, and the backup host said nothing about why")
    kind, module, args = value.get("exc_type"), value.get("exc_module"), value.get("exc_message")
    args = list(args) if isinstance(args, list | tuple) else [args]
    cls = getattr(errors, kind, None) if isinstance(kind, str) else None
    if module == errors.__name__ and isinstance(cls, type) and issubclass(cls, BakgrabError):
        return cls(*args)
    shown = args[0] if len(args) == 1 else tuple(args)
    name = kind if isinstance(kind, str) and kind.isidentifier() else "an error"
    return BakgrabError(f"the job failed: {name[:100]}: {str(shown)[:1000]}")


class Broker:
    """One backup host's broker, as this client uses it for one job."""

    def __init__(self, url: str, shown: str) -> None:
        self.shown = shown
        """The URL without its password, for messages."""
        # No retries inside redis-py: a reconnect must be followed by a GET of
        # the result (a state published meanwhile is gone), so it is ours.
        self.redis = redis.Redis.from_url(
            url, socket_timeout=COMMAND_TIMEOUT, socket_connect_timeout=COMMAND_TIMEOUT,
            socket_keepalive=True, protocol=2, driver_info=None, retry=Retry(NoBackoff(), 0))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.redis.close()
            self.redis.connection_pool.disconnect()

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get(self, key: str) -> bytes | None:
        """One GET; ClientSetupError if the broker cannot be reached."""
        try:
            value = self.redis.get(key)
        except redis.RedisError as e:
            raise ClientSetupError(f"cannot reach the broker {self.shown}: {e}") from None
        return value if isinstance(value, bytes) or value is None else str(value).encode()

    @contextlib.contextmanager
    def sending(self, task: str, task_id: str, kwargs: dict[str, Any], queue: str,
                kwargsrepr: str) -> Iterator[Watch]:
        """Subscribe to the job's result, send the job, and yield its Watch;
        unsubscribed on the way out (the worker cancels a job nobody waits for)."""
        watch = Watch(self, task_id)
        try:
            watch.subscribe()
            self.redis.lpush(queue, task_message(task, task_id, kwargs, queue, kwargsrepr))
        except redis.RedisError as e:
            watch.close()
            raise ClientSetupError(f"cannot send the job to the broker {self.shown}: {e}") from None
        except BaseException:
            watch.close()
            raise
        try:
            yield watch
        finally:
            watch.close()


class Watch:
    """The result channel of one job, subscribed."""

    def __init__(self, broker: Broker, task_id: str) -> None:
        self.broker = broker
        self.key = RESULT_PREFIX + task_id
        self._sub: Any = None
        self._unread = False
        """Subscribed since the result key was last read."""

    def subscribe(self) -> None:
        self.close()
        self._sub = self.broker.redis.pubsub()
        self._sub.subscribe(self.key)
        self._unread = True

    def close(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                self._sub.close()
            self._sub = None

    def stored(self) -> dict[str, Any] | None:
        """The state the result key holds now, if any."""
        return decode(self.broker.redis.get(self.key))

    def wait(self, timeout: float, on_state: Callable[[dict[str, Any]], None],
             check: Callable[[], None] = lambda: None, poll: float = 1.0) -> dict[str, Any]:
        """The job's final value, raising its error; ``on_state`` sees every
        state before it (progress). JobTimeout past ``timeout`` seconds;
        ``check`` is called at least every ``poll`` seconds (a run's stop)."""
        deadline = time.monotonic() + timeout
        lost_since: float | None = None
        while True:
            try:
                if self._sub is None:
                    self.subscribe()
                if self._unread:
                    # once after each subscription: a state stored before it
                    # is read here, one published after it comes on the channel
                    meta = self.stored()
                    self._unread = False
                    if lost_since is not None:
                        log.info("the broker connection is back")
                        lost_since = None
                    if meta is not None:
                        if meta.get("status") in FINAL:
                            return outcome(meta)
                        on_state(meta)
                meta = self._next_final(deadline, timeout, on_state, check, poll)
                return outcome(meta)
            except LOST as e:
                self.close()
                now = time.monotonic()
                if lost_since is None:
                    lost_since = now
                    log.warning("lost the broker connection while waiting (%s: %s); "
                                "trying again for %.0fs", type(e).__name__, e, RECONNECT_FOR)
                if now - lost_since >= RECONNECT_FOR:
                    raise ClientSetupError(
                        "lost the connection to the broker while waiting for the job (a dead "
                        "tunnel or Redis gone?); the job may still run on the backup host: "
                        f"see Flower or `bakgrab list` there ({type(e).__name__}: "
                        f"{str(e)[:200]})") from None
                if now >= deadline:
                    raise JobTimeout(f"the job did not finish within {timeout:.0f}s") from None
                check()
                time.sleep(min(1.0, 0.1 + (now - lost_since) / 4))

    def _next_final(self, deadline: float, timeout: float,
                    on_state: Callable[[dict[str, Any]], None],
                    check: Callable[[], None], poll: float) -> dict[str, Any]:
        """Read the channel until a final state; pings a silent connection."""
        heard = time.monotonic()
        pinged: float | None = None
        while True:
            check()
            now = time.monotonic()
            if now >= deadline:
                raise JobTimeout(f"the job did not finish within {timeout:.0f}s")
            if pinged is not None and now - pinged >= PONG_WITHIN:
                raise redis.ConnectionError(f"no answer to a ping within {PONG_WITHIN:.0f}s")
            if pinged is None and now - heard >= PING_EVERY:
                self._sub.ping()
                pinged = now
            message = self._sub.get_message(timeout=min(poll, max(0.0, deadline - now)))
            if message is None:
                continue
            heard, pinged = time.monotonic(), None
            if message.get("type") != "message":
                continue  # the subscription's confirmation, a pong
            meta = decode(message.get("data"))
            if meta is None:
                continue
            if meta.get("status") in FINAL:
                return meta
            on_state(meta)


def decode(raw: Any) -> dict[str, Any] | None:
    """A result meta from the key or the channel; None if it is not one."""
    if raw is None:
        return None
    try:
        meta = json.loads(raw)
    except (ValueError, TypeError, RecursionError):
        log.warning("the broker holds a result that is not JSON: ignored")
        return None
    return meta if isinstance(meta, dict) else None
