"""The worker's admission of broker items (bakgrab.worker.transport), without servers.

Messages are made by Celery's own message builder (``app.amqp.as_task_v2``,
what ``send_task`` and ``task.retry`` publish) and put in kombu's Redis
envelope; the integration tests (tests/integration/test_hostile_messages.py)
push the same items to a real worker.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from typing import Any

import pytest
from celery import Celery
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from bakgrab.tasks import GRAB, RESTORE
from bakgrab.worker import transport

KEY = transport.mac_key(X25519PrivateKey.generate())
POLICY = transport.Policy(max_message_bytes=1 << 20, mac_key=KEY)
APP = Celery(broker="memory://")


def message(task: str = GRAB, kwargs: Any = None, sign: bool = False,
            **options: Any) -> dict[str, Any]:
    """kombu's Redis envelope of the message Celery builds for ``task``; MACed
    by the worker's before_task_publish receiver when ``sign``."""
    task_id = str(uuid.uuid4())
    m = APP.amqp.as_task_v2(task_id, task, args=(), kwargs=kwargs or {"v": 1, "name": "n"},
                            **options)
    headers = dict(m.headers)
    if sign:
        transport.sign_publish(POLICY)(sender=task, body=m.body, headers=headers)
    body = json.dumps(list(m.body))
    return {"body": base64.b64encode(body.encode()).decode(), "content-encoding": "utf-8",
            "content-type": "application/json", "headers": headers,
            "properties": {**m.properties, "body_encoding": "base64", "priority": 0,
                           "delivery_info": {"exchange": "", "routing_key": "bakgrab"},
                           "delivery_tag": str(uuid.uuid4())}}


def admit(envelope: dict[str, Any], policy: transport.Policy = POLICY) -> dict[str, Any]:
    return transport.admit(json.dumps(envelope).encode(), "bakgrab", policy)


@pytest.mark.parametrize("task", [GRAB, RESTORE])
def test_a_clients_message_is_admitted_and_rebuilt(task: str) -> None:
    """send_task's message is taken; its time limits, expiry, links and origin
    are the worker's; its id and body are kept; kwargsrepr shows only checked
    fields; the delivery tag is the worker's own."""
    m = message(task, kwargs={"v": 1, "name": "host-a", "user": "not valid!", "key": "x"},
                time_limit=3600, soft_time_limit=3500, expires=60, shadow="forged")
    m["headers"]["kwargsrepr"] = "{'name': 'victim'}"
    out = admit(m)
    h = out["headers"]
    assert h["task"] == task and h["id"] == m["headers"]["id"]
    assert h["timelimit"] == [None, None] and h["expires"] is None and h["eta"] is None
    assert h["shadow"] is None and h["origin"] is None and h["retries"] == 0
    assert h["kwargsrepr"] == "{'name': 'host-a', 'user': '<invalid>', 'key': '<redacted>'}"
    assert out["body"] == m["body"]
    assert out["properties"]["delivery_tag"] != m["properties"]["delivery_tag"]
    assert out["properties"]["delivery_info"] == {"exchange": "", "routing_key": "bakgrab"}
    assert transport.MAC_HEADER not in h


def test_the_workers_retry_is_admitted_with_its_schedule() -> None:
    """What task.retry(countdown=...) publishes, MACed by sign_publish, is
    taken with its eta and retry count (and its MAC, for a redelivery)."""
    m = message(sign=True, countdown=30, retries=2)
    out = admit(m)
    assert out["headers"]["eta"] == m["headers"]["eta"] is not None
    assert out["headers"]["retries"] == 2
    assert admit(out)["headers"]["retries"] == 2  # a redelivery of the rebuilt item


@pytest.mark.parametrize("change", ["retries", "eta", "body", "id", "task", "key"])
def test_a_retry_not_made_by_this_worker_is_refused(change: str) -> None:
    """Unsigned, or signed and then changed (retry count, eta, body, id, task
    name), or signed with another worker's key: refused."""
    m = message(sign=change != "key", countdown=30, retries=1)
    h = m["headers"]
    if change == "retries":
        h["retries"] = 5
    elif change == "eta":
        h["eta"] = h["eta"].replace(h["eta"][:4], str(int(h["eta"][:4]) + 1))
    elif change == "body":
        m["body"] = base64.b64encode(json.dumps([[], {"v": 2}, {}]).encode()).decode()
    elif change == "id":
        h["id"] = str(uuid.uuid4())
    elif change == "task":
        h["task"] = RESTORE
    else:
        other = transport.Policy(1 << 20, transport.mac_key(X25519PrivateKey.generate()))
        transport.sign_publish(other)(headers=h, body=((), {"v": 1, "name": "n"}, {}))
    with pytest.raises(transport.Refused, match="not made by this worker"):
        admit(m)


def test_sign_publish_signs_only_bakgrab_tasks() -> None:
    headers: dict[str, Any] = {"task": "celery.accumulate", "id": "x", "retries": 1}
    transport.sign_publish(POLICY)(headers=headers, body=((), {}, {}))
    assert transport.MAC_HEADER not in headers


def test_size_is_checked_before_decoding() -> None:
    small = transport.Policy(max_message_bytes=100, mac_key=KEY)
    with pytest.raises(transport.Refused, match="larger than max_message_bytes=100"):
        transport.admit(b"x" * 101, "bakgrab", small)  # not JSON: never decoded


def test_drop_log_is_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    """At most ``burst`` lines a window; the rest are counted in one line."""
    drop = transport.DropLog(burst=3, window=0.2)
    with caplog.at_level("WARNING", logger=transport.__name__):
        for _ in range(10):
            drop("bakgrab", 5, "not a JSON message", "abc")
        time.sleep(0.25)
        drop("bakgrab", 5, "not a JSON message")
    lines = [r.getMessage() for r in caplog.records]
    assert sum("dropped a message" in line for line in lines) == 4
    assert any("dropped 7 more message(s)" in line for line in lines)
