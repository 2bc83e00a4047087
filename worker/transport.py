"""The worker's broker transport: every queued item is hostile until admitted (issue 11).

kombu's Redis transport decodes each item it pops (``json.loads``, kombu's
object hook) and builds a Message from it in the worker's *main* process; a
malformed item raises there, Celery logs "Unrecoverable error" and the worker
exits. Anyone holding a client credential may ``LPUSH`` anything onto the
queue, so this transport (installed by :func:`transport_for`) runs
:func:`admit` on every raw item first. Invariants:

* **Size first.** An item larger than ``max_message_bytes`` is dropped before
  any decoding.
* **Only bakgrab's own tasks.** The item must be the envelope Celery's
  ``send_task`` makes (protocol 2, JSON body in base64) for ``bakgrab.grab`` or
  ``bakgrab.restore``; anything else (Celery's built-ins such as
  ``celery.chord_unlock`` or ``celery.accumulate``, unknown names, protocol 1,
  pickle, links, chords) is dropped without running and without a result.
* **The worker's limits are the worker's.** The envelope is rebuilt from a
  whitelist: time limits and expiry are reset (the app's ``job_time_limit``
  applies), links and groups removed, ``kwargsrepr`` recomputed from the
  body (so Flower shows what the worker saw). An ``eta`` or ``retries > 0`` is
  only ever the worker's own retry: such an item must carry a MAC made with a
  key derived from the worker's request key (:func:`sign_publish` adds it to
  every task message the worker itself publishes); without a valid one it is
  dropped at once, so a client can neither hold items in the worker's memory
  nor claim a retry count.
* **Dropped means gone, logged once.** A dropped item was already popped:
  it never reaches the unacked hash, is never redelivered, and is logged in
  one line with its size and the reason, never its content (lines are
  rate-limited; a flood is counted, not printed).

What an admitted item still carries from the client (task id, kwargs) is
checked again by the task body (:mod:`bakgrab.tasks.request`,
:func:`bakgrab.worker.grab.check_task_id`).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime
import hashlib
import hmac
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any, cast

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from kombu.transport import redis as kombu_redis

from bakgrab.tasks import GRAB, RESTORE
from bakgrab.tasks.errors import InvalidRequest
from bakgrab.tasks.request import (
    SNAPSHOT_ID_RE,
    check_address,
    check_name,
    check_port,
    check_user,
    redacted,
)

log = logging.getLogger(__name__)

TASKS = frozenset({GRAB, RESTORE})
"""The only task names the worker runs."""
MAC_HEADER = "bakgrab_mac"
"""Header holding the worker's MAC of its own retry messages."""
MAC_INFO = b"bakgrab worker message mac v1"
ENVELOPE_KEYS = frozenset({"body", "content-encoding", "content-type", "headers", "properties"})
EMBED_KEYS = frozenset({"callbacks", "errbacks", "chain", "chord"})
MAX_TASK_ID = 1024
"""Longest task id passed on (the task body then checks it for real)."""
MAX_DEPTH = 8
"""Deepest nesting of lists and mappings in a body (a request needs 3)."""
SHOWN_TASK_RE = re.compile(r"[A-Za-z0-9_.:-]{1,100}")
SHOWN_ID_RE = re.compile(r"[A-Za-z0-9-]{1,64}")


class Refused(Exception):
    """An item the worker does not take; the message says why, never what it held."""


@dataclasses.dataclass(frozen=True)
class Policy:
    """What the transport admits."""

    max_message_bytes: int
    mac_key: bytes = dataclasses.field(repr=False)
    tasks: frozenset[str] = TASKS
    internal_queue: str | None = None
    """The backup host's own queue (issue 17: notifications, stale checks),
    which no client ACL may write: on it only ``internal_tasks`` are admitted,
    each with a valid MAC, and ``tasks`` are not (nor the reverse elsewhere)."""
    internal_tasks: frozenset[str] = frozenset()


def mac_key(request_key: X25519PrivateKey) -> bytes:
    """The key of the worker's own message MACs, derived from its request key:
    every worker that can open a queue's requests can sign its retries, and no
    client can."""
    raw = request_key.private_bytes(serialization.Encoding.Raw,
                                    serialization.PrivateFormat.Raw,
                                    serialization.NoEncryption())
    return HKDF(hashes.SHA256(), 32, salt=None, info=MAC_INFO).derive(raw)


def mac(key: bytes, task: str, task_id: str, retries: int, eta: str | None,
        args: Any, kwargs: Any) -> str:
    """The MAC binding a message's schedule (retries, eta) to its task and body."""
    text = json.dumps([task, task_id, retries, eta, args, kwargs], sort_keys=True,
                      separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hmac.new(key, text.encode("ascii"), hashlib.sha256).hexdigest()


def sign_publish(policy: Policy):  # type: ignore[no-untyped-def]
    """A ``before_task_publish`` receiver that MACs every bakgrab task message
    this process publishes (the worker's retries and SIGTERM re-queues)."""

    def receiver(sender: str | None = None, body: Any = None,
                 headers: dict[str, Any] | None = None, **_: Any) -> None:
        if headers is None or headers.get("task") not in policy.tasks:
            return
        try:
            args, kwargs = body[0], body[1]
            headers[MAC_HEADER] = mac(policy.mac_key, headers["task"], headers["id"],
                                      headers.get("retries") or 0, headers.get("eta"),
                                      list(args), kwargs)
        except (TypeError, ValueError, KeyError, IndexError) as e:
            # unsigned, the message is dropped on arrival (and logged there)
            log.warning("could not sign a task message: %s", type(e).__name__)

    return receiver


# -- admission ----------------------------------------------------------------------

def admit(raw: bytes | str, queue: str, policy: Policy) -> dict[str, Any]:
    """The envelope kombu may build a Message from, rebuilt from ``raw``; or Refused."""
    if len(raw) > policy.max_message_bytes:
        raise Refused(f"larger than max_message_bytes={policy.max_message_bytes}")
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        envelope = json.loads(text)  # no object hook: plain JSON values only
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise Refused("not a JSON message") from None
    if not isinstance(envelope, dict) or set(envelope) != ENVELOPE_KEYS:
        raise Refused("not a task message envelope (body, headers, properties)")
    if envelope["content-type"] != "application/json":
        raise Refused("content type is not application/json (JSON only)")
    if envelope["content-encoding"] != "utf-8":
        raise Refused("content encoding is not utf-8")
    properties, headers = envelope["properties"], envelope["headers"]
    if not isinstance(properties, dict) or properties.get("body_encoding") != "base64":
        raise Refused("properties: body_encoding must be base64")
    if not isinstance(headers, dict):
        raise Refused("headers: not a mapping")
    task, task_id = headers.get("task"), headers.get("id")
    if not isinstance(task, str) or not isinstance(task_id, str):
        raise Refused("headers: no task name or id (protocol 1 is not accepted)")
    internal = policy.internal_queue is not None and queue == policy.internal_queue
    if internal and task not in policy.internal_tasks:
        raise Refused("a task the backup host does not send itself, on its internal queue")
    if not internal and task not in policy.tasks:
        raise Refused(f"task {task if SHOWN_TASK_RE.fullmatch(task) else '<other>'} "
                      "is not run for clients (only bakgrab.grab and bakgrab.restore)")
    if not 0 < len(task_id) <= MAX_TASK_ID:
        raise Refused("headers: task id of 1-1024 characters")
    args, kwargs = decode_body(envelope["body"])
    retries, eta = headers.get("retries", 0), headers.get("eta")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise Refused("headers: retries must be a whole number")
    if eta is not None and not (isinstance(eta, str) and is_iso_time(eta)):
        raise Refused("headers: eta is not a time")
    signature = headers.get(MAC_HEADER)
    if retries or eta is not None or internal:
        if not isinstance(signature, str) or not hmac.compare_digest(
                signature, safe_mac(policy, task, task_id, retries, eta, args, kwargs)):
            raise Refused("a retry, scheduled or internal message (retries, eta, countdown, "
                          "the internal queue) not made by this worker")
    else:
        signature = None
    redelivered = headers.get("redelivered") is True
    return rebuilt(envelope["body"], queue, task, task_id, retries, eta, args, kwargs,
                   signature, redelivered)


def decode_body(body: Any) -> tuple[list[Any], dict[str, Any]]:
    """``args`` and ``kwargs`` of a protocol-2 body: base64 of JSON
    ``[args, kwargs, embed]`` with no links, chords or chains."""
    if not isinstance(body, str):
        raise Refused("body: not base64 text")
    try:
        data = json.loads(base64.b64decode(body, validate=True).decode("utf-8"))
    except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError):
        raise Refused("body: not base64 of JSON") from None
    if not isinstance(data, list) or len(data) != 3:
        raise Refused("body: not [args, kwargs, embed]")
    args, kwargs, embed = data
    if not isinstance(args, list):
        raise Refused("body: args is not a list")
    if not isinstance(kwargs, dict):
        raise Refused("body: kwargs is not a mapping")
    if not isinstance(embed, dict) or not set(embed) <= EMBED_KEYS or any(embed.values()):
        raise Refused("body: callbacks, errbacks, chains and chords are not run for clients")
    if not plain(args) or not plain(kwargs):
        raise Refused("body: too deeply nested, or a typed value ('__type__') kombu would "
                      "decode into an object")
    return args, kwargs


def plain(value: Any, depth: int = 0) -> bool:
    """Plain JSON data, not too deep, with no mapping kombu's decoder would turn
    into an object (``{"__type__": ...}``)."""
    if depth > MAX_DEPTH:
        return False
    if isinstance(value, list):
        return all(plain(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return "__type__" not in value and all(plain(v, depth + 1) for v in value.values())
    return True


def is_iso_time(text: str) -> bool:
    if len(text) > 64:
        return False
    try:
        datetime.datetime.fromisoformat(text)
    except ValueError:
        return False
    return True


def safe_mac(policy: Policy, task: str, task_id: str, retries: int, eta: str | None,
             args: Any, kwargs: Any) -> str:
    try:
        return mac(policy.mac_key, task, task_id, retries, eta, args, kwargs)
    except ValueError:  # NaN or infinity in the body: never signed
        return ""


def shown_kwargs(kwargs: Mapping[str, Any]) -> str:
    """``kwargsrepr`` as the worker sees the request: :func:`redacted` of its
    fields, each shown only when it passes its check (the rest as ``<invalid>``),
    so events, logs and Flower never echo what a sender chose."""
    fields = dict(kwargs)
    for name, check in (("name", check_name), ("address", check_address),
                        ("port", check_port), ("user", check_user)):
        if name in fields:
            try:
                fields[name] = check(fields[name])
            except InvalidRequest:
                fields[name] = "<invalid>"
    snapshot = fields.get("snapshot")
    if isinstance(snapshot, str) and not SNAPSHOT_ID_RE.fullmatch(snapshot):
        fields["snapshot"] = "<invalid>"
    return redacted(fields)


def rebuilt(body: str, queue: str, task: str, task_id: str, retries: int, eta: str | None,
            args: list[Any], kwargs: dict[str, Any], signature: str | None,
            redelivered: bool) -> dict[str, Any]:
    """The envelope of an admitted item: only what Celery needs, the worker's
    own values for everything that is not the request."""
    headers: dict[str, Any] = {
        "lang": "py", "task": task, "id": task_id, "shadow": None, "eta": eta,
        "expires": None, "group": None, "group_index": None, "retries": retries,
        "timelimit": [None, None], "root_id": task_id, "parent_id": None,
        "argsrepr": "()" if not args else f"<{len(args)} positional>",
        "kwargsrepr": shown_kwargs(kwargs), "origin": None, "ignore_result": None,
        "replaced_task_nesting": 0, "stamped_headers": None, "stamps": {},
    }
    if signature is not None:
        headers[MAC_HEADER] = signature  # kept: a redelivery is admitted again
    if redelivered:
        headers["redelivered"] = True
    return {
        "body": body, "content-encoding": "utf-8", "content-type": "application/json",
        "headers": headers,
        "properties": {
            "correlation_id": task_id, "reply_to": None, "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue}, "priority": 0,
            "body_encoding": "base64",
            # the worker's own tag: a sender's choice could collide with another
            # message's entry in the unacked hash
            "delivery_tag": str(uuid.uuid4()),
        },
    }


# -- logging a drop -------------------------------------------------------------------

class DropLog:
    """One warning line per dropped item, at most ``burst`` per ``window``
    seconds; the rest are counted and the count reported."""

    def __init__(self, burst: int = 100, window: float = 60.0) -> None:
        self.burst, self.window = burst, window
        self.started = 0.0
        self.lines = 0
        self.hidden = 0
        self.lock = threading.Lock()

    def __call__(self, queue: str, size: int, reason: str, task_id: str | None = None) -> None:
        with self.lock:
            now = time.monotonic()
            if now - self.started > self.window:
                if self.hidden:
                    log.warning("dropped %d more message(s) from queue %s in the last %.0fs "
                                "(not logged one by one)", self.hidden, queue, self.window)
                self.started, self.lines, self.hidden = now, 0, 0
            if self.lines >= self.burst:
                self.hidden += 1
                return
            self.lines += 1
        shown = f" (task id {task_id})" if task_id and SHOWN_ID_RE.fullmatch(task_id) else ""
        log.warning("dropped a message from queue %s%s, %d bytes: %s", queue, shown, size,
                    reason)


def peek_id(raw: bytes | str) -> str | None:
    """The task id of an item for the log line, when one is cheaply found."""
    m = re.search(rb'"id": ?"([A-Za-z0-9-]{1,64})"',
                  raw[:4096] if isinstance(raw, bytes) else raw[:4096].encode())
    return m.group(1).decode() if m else None


# -- the kombu transport ------------------------------------------------------------

class Channel(kombu_redis.Channel):
    """kombu's Redis channel with :func:`admit` between the pop and the Message."""

    def _admitted(self, item: bytes, queue: str) -> dict[str, Any] | None:
        policy: Policy = self.connection.policy
        try:
            return admit(item, queue, policy)
        except Refused as e:
            self.connection.drop_log(queue, len(item), str(e), peek_id(item))
            return None

    def _deliver_admitted(self, message: dict[str, Any], queue: str) -> None:
        try:
            self.connection._deliver(message, queue)
        except self.connection_errors:
            raise
        except Exception as e:
            # Defence in depth: nothing a sender put in an admitted item may
            # stop the consumer; forget the item (it is never redelivered).
            self.connection.drop_log(queue, 0, f"the worker could not take it "
                                     f"({type(e).__name__})")
            log.debug("taking an admitted message failed", exc_info=True)
            self.qos.reject(message["properties"]["delivery_tag"], requeue=False)

    # kombu 5.7's Channel._brpop_read, with admit() in place of loads().
    def _brpop_read(self, **options: Any) -> bool:
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP",
                                                        **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if dest__item:
                dest, item = dest__item
                dest = kombu_redis.bytes_to_str(dest).rsplit(self.sep, 1)[0]
                self._queue_cycle.rotate(dest)
                message = self._admitted(item, dest)
                if message is None:
                    raise kombu_redis.Empty()
                self._deliver_admitted(message, dest)
                return True
            raise kombu_redis.Empty()
        finally:
            # kombu sets None here too (its attribute is typed bool)
            self._in_poll = None  # type: ignore[assignment]
            flush = getattr(self, "_flush_brpop_reauth", None)
            if flush is not None:
                flush()

    # kombu 5.7's Channel._get (basic_get, polling), with admit() in place of loads().
    def _get(self, queue: str, timeout: Any = None) -> dict[str, Any]:
        with self.conn_or_acquire() as client:
            for pri in self.priority_steps:
                item = client.rpop(self._q_for_pri(queue, pri))
                if item:
                    self._maybe_update_queues_expire(client, queue)
                    message = self._admitted(item, queue)
                    if message is not None:
                        return message
            self._maybe_update_queues_expire(client, queue)
            raise kombu_redis.Empty()


class Shown(type):
    """kombu prints a transport class given as ``broker_transport`` where it
    prints the URL's scheme (the worker's banner, "Connected to ..."): show
    "redis" there, as for kombu's own."""

    def __str__(cls) -> str:
        return "redis"


class Transport(kombu_redis.Transport, metaclass=Shown):
    """kombu's Redis transport with :class:`Channel`; see :func:`transport_for`."""

    Channel = Channel
    policy: Policy
    drop_log: DropLog


def transport_for(policy: Policy) -> type[Transport]:
    """A transport class admitting items by ``policy`` (the worker's broker_transport)."""
    cls = Shown("Transport", (Transport,), {"policy": policy, "drop_log": DropLog(),
                                            "__module__": __name__})
    return cast("type[Transport]", cls)
