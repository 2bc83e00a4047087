"""The client's own broker messages (bakgrab.client.broker), without servers.

The client builds its task message and reads its job's states without Celery
(issue 19), so these tests hold both ends to Celery's own: the message to
what ``send_task`` builds (``app.amqp.as_task_v2``) and to the worker's
admission; the states to what Celery's result backend stores. The real
broker path is in tests/integration/test_fixed_cost.py and every end-to-end
backup test.
"""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import pytest
from celery import Celery
from celery.exceptions import TaskRevokedError
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from bakgrab.client import broker
from bakgrab.tasks import GRAB, RESTORE, errors
from bakgrab.tasks.errors import BakgrabError, NoSpace, TransferFailed
from bakgrab.worker import transport

APP = Celery(broker="memory://", backend="cache+memory://")
APP.conf.update(result_serializer="json", accept_content=["json"])
POLICY = transport.Policy(max_message_bytes=1 << 20,
                          mac_key=transport.mac_key(X25519PrivateKey.generate()))
FIELDS = {"v": 1, "name": "host-a", "key": "sealed", "excludes": ["/proc/*"]}


@pytest.mark.parametrize("task", [GRAB, RESTORE])
def test_the_message_is_what_send_task_builds(task: str) -> None:
    """Same header names, same body (args, kwargs, embed) as Celery's own
    builder; the id is ours and the kwargs shown are the ones we pass."""
    task_id = str(uuid.uuid4())
    ours = json.loads(broker.task_message(task, task_id, FIELDS, "bakgrab", "{'name': 'x'}"))
    celery = APP.amqp.as_task_v2(task_id, task, args=(), kwargs=FIELDS)
    assert set(ours["headers"]) == set(celery.headers)
    assert json.loads(base64.b64decode(ours["body"])) == json.loads(json.dumps(celery.body))
    h = ours["headers"]
    assert (h["task"], h["id"], h["root_id"], h["retries"]) == (task, task_id, task_id, 0)
    assert (h["argsrepr"], h["kwargsrepr"]) == ("()", "{'name': 'x'}")
    assert ours["properties"]["delivery_info"] == {"exchange": "", "routing_key": "bakgrab"}
    assert ours["properties"]["body_encoding"] == "base64"
    assert set(ours) == transport.ENVELOPE_KEYS


def test_the_worker_admits_the_message() -> None:
    """The worker's admission takes it with the id and kwargs it carries."""
    task_id = str(uuid.uuid4())
    out = transport.admit(broker.task_message(GRAB, task_id, FIELDS, "bakgrab", "{}"),
                          "bakgrab", POLICY)
    assert out["headers"]["id"] == task_id
    assert transport.decode_body(out["body"]) == ([], FIELDS)


def stored(state: str, result: Any) -> dict[str, Any]:
    """The meta Celery's result backend stores for ``state``, as JSON gives it back."""
    if isinstance(result, BaseException):
        result = APP.backend.prepare_exception(result)
    meta = APP.backend._get_result_meta(result=result, state=state, traceback="tb",
                                        request=None)
    return json.loads(json.dumps(meta))


def test_a_success_gives_its_value() -> None:
    assert broker.outcome(stored("SUCCESS", {"snapshot": "a"})) == {"snapshot": "a"}
    with pytest.raises(BakgrabError, match="unexpected result: list"):
        broker.outcome(stored("SUCCESS", [1]))


@pytest.mark.parametrize("error", [NoSpace("storage full", "x"), TransferFailed("bad"),
                                   errors.ProgramFailed("rsync failed", "rsync", 23, "tail")])
def test_a_failure_is_bakgrabs_own_error_again(error: BakgrabError) -> None:
    """The class, args and so the exit code of the worker's error come back."""
    with pytest.raises(type(error)) as caught:
        broker.outcome(stored("FAILURE", error))
    assert type(caught.value) is type(error)
    assert caught.value.args == error.args
    assert caught.value.exit_code == error.exit_code


def test_any_other_failure_is_a_plain_error_and_imports_nothing() -> None:
    """A result is the backup host's word: a module it names is never
    imported, a class outside bakgrab's errors never built."""
    plain = stored("FAILURE", ValueError("boom"))
    with pytest.raises(BakgrabError, match="the job failed: ValueError: boom") as caught:
        broker.outcome(plain)
    assert type(caught.value) is BakgrabError
    for value in ({"exc_type": "NoSpace", "exc_module": "os", "exc_message": ["x"]},
                  {"exc_type": "EXIT_OK", "exc_module": errors.__name__, "exc_message": []},
                  {"exc_type": "annotations", "exc_module": errors.__name__},
                  {"exc_type": "system", "exc_module": "os", "exc_message": ["id"]},
                  "not a mapping", None):
        with pytest.raises(BakgrabError) as caught:
            broker.outcome({"status": "FAILURE", "result": value})
        assert type(caught.value) is BakgrabError, value


def test_a_revoke_says_so() -> None:
    for meta in ({"status": "REVOKED", "result": None},
                 stored("FAILURE", TaskRevokedError("terminated"))):
        with pytest.raises(BakgrabError, match="revoked on the backup host"):
            broker.outcome(meta)


def test_only_final_states_end_the_wait() -> None:
    assert {"SUCCESS", "FAILURE", "REVOKED"} == broker.FINAL
    for state in ("PENDING", "STARTED", "RETRY", "PROGRESS"):
        assert stored(state, {}).get("status") not in broker.FINAL


def test_a_result_that_is_not_json_is_ignored() -> None:
    assert broker.decode(b"\xff") is None
    assert broker.decode(b"[1]") is None
    assert broker.decode(None) is None
    assert broker.decode(b'{"status": "SUCCESS"}') == {"status": "SUCCESS"}
